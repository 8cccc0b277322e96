"""`embedpipe` commands that measure quality: probe (a collection, now) and eval (models compared on your
own eval set). The model and the store are imported inside each command, when it runs."""

from __future__ import annotations

import click

from producer import client
from producer.cli_options import (
    API,
    REDIS,
    SettingsCommand,
    echo_json,
    fail_clearly,
    json_option,
    local_option,
    open_ledger,
    settings_options,
    use_local,
)
from shared.settings import Settings


@click.command(cls=SettingsCommand)
@click.option(
    "--eval",
    "eval_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="BEIR-layout eval set: queries.jsonl and qrels/test.tsv about documents in the store.",
)
@json_option
@click.option("--collection", default=None, help="Probe this collection instead of the active one.")
@local_option
@settings_options(*REDIS, "store", "device", "batch_size", *API)
@fail_clearly
def probe(eval_dir: str, as_json: bool, collection: str | None, local: bool | None, settings: Settings) -> None:
    """Measure search quality now: recall@10 and nDCG@10 of a collection (default: the active one)
    on fixed queries, ranking documents by their best chunk, with the model that embedded it.
    Recorded with the collection (for `promote`), for `status` and the dashboard."""
    from producer.lifecycle import embedder_for  # the model
    from shared.store import open_store  # the store's backend
    from workers.probe import run_probe

    store = open_store(settings.store, collection=collection, settings=settings)
    result = run_probe(store, embedder_for(store, settings), eval_dir)
    store.record_probe(result)
    store.close()
    ledger = client.local_ledger(settings) if use_local(local) else open_ledger(False, settings)
    if ledger is not None:
        ledger.record_probe(result)
    if as_json:
        echo_json(result)
    else:
        click.echo(
            f"recall@10 {result['recall_at_10']:.3f}  nDCG@10 {result['ndcg_at_10']:.3f}  "
            f"({result['queries']} queries, {result['seconds']:.1f} s)"
        )


@click.command(cls=SettingsCommand, name="eval")
@click.option(
    "--models",
    required=True,
    help="Comma-separated model specs: NAME or NAME@DIMS (truncated, "
    "re-normalised), e.g. all-MiniLM-L6-v2,all-MiniLM-L6-v2@128.",
)
@click.option(
    "--eval",
    "eval_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="BEIR-layout eval set with its corpus.jsonl.",
)
@click.option("--max-docs", type=int, default=0, help="Embed only the relevant documents plus distractors up to N.")
@json_option
@settings_options("device", "batch_size")
@fail_clearly
def evaluate_models(models: str, eval_dir: str, max_docs: int, as_json: bool, settings: Settings) -> None:
    """Compare models (or configurations of one) on your own data: each embeds the eval corpus into a
    throwaway store; prints recall@10, nDCG@10, dimensions, throughput and cost."""
    from producer.evaluation import compare

    rows = compare([m.strip() for m in models.split(",") if m.strip()], eval_dir, max_docs, settings)
    if as_json:
        echo_json({"models": rows})
        return
    click.echo(f"{'model':<34}{'dims':>6}{'recall@10':>11}{'nDCG@10':>9}{'chunks/s':>10}{'cost $':>8}")
    for r in rows:
        click.echo(
            f"{r['model']:<34}{r['dimensions']:>6}{r['recall_at_10']:>11.3f}{r['ndcg_at_10']:>9.3f}"
            f"{r['chunks_per_s']:>10.1f}{r['cost_usd']:>8.2f}"
        )
