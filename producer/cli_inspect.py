"""`embedpipe` commands that look at the pipeline's results: status, failed, redrive, probe, eval."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import click

from producer.cli import API, CHUNKING, JOBS, MODEL, REDIS, fail_clearly, main, settings_options
from shared.errors import REASONS
from shared.ledger import local_ledger_path
from shared.settings import Settings
from shared.text import printable


def _use_local(local: bool | None) -> bool:
    """status/failed read the embedded store's state unless a Redis URL was set (or --redis)."""
    if local is not None:
        return local
    source = click.get_current_context().get_parameter_source("redis_url")
    return source == click.core.ParameterSource.DEFAULT


local_option = click.option(
    "--local/--redis",
    "local",
    default=None,
    help="Read the embedded store's state, or Redis. Default: Redis if a Redis URL is set, else the store.",
)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--watch",
    "watch_s",
    type=float,
    default=None,
    is_flag=False,
    flag_value=2.0,
    help="Redraw every S seconds (default 2) until Ctrl+C.",
)
@local_option
@settings_options(*REDIS, "store")
@fail_clearly
def status(as_json: bool, watch_s: float | None, local: bool | None, settings: Settings) -> None:
    """Per stage: queued, running, scheduled and failed jobs and live workers; documents done and
    failed (dead letters); the last quality probe."""
    while True:
        if watch_s:
            click.clear()
            click.echo(time.strftime("%H:%M:%S  ") + "embedpipe status (Ctrl+C to stop)")
        _print_status(as_json, local, settings)
        if not watch_s:
            return
        try:
            time.sleep(watch_s)
        except KeyboardInterrupt:
            return


def _print_status(as_json: bool, local: bool | None, settings: Settings) -> None:
    from producer.status import distributed_status, local_status

    use_local = _use_local(local)
    ledger = _ledger(use_local, settings)
    if use_local:
        from shared.store import open_store

        store = open_store(settings.store)
        data = local_status(ledger, store.count())
        store.close()
    else:
        data = distributed_status(ledger.redis)
    if as_json:
        click.echo(json.dumps(data))
        return
    if data["mode"] == "distributed":
        click.echo(f"inbox: {data['inbox']}")
        header = ["stage", "queued", "running", "scheduled", "failed", "workers"]
        click.echo("  ".join(f"{h:>9}" for h in header))
        for stage, s in data["stages"].items():
            click.echo(
                "  ".join(
                    f"{v:>9}"
                    for v in [
                        stage,
                        s["queued"] + s["dequeuing"],
                        s["running"],
                        s["scheduled"] + s["deferred"],
                        s["failed"],
                        s["workers"],
                    ]
                )
            )
    else:
        click.echo(f"store: {settings.store_path} ({data['chunks_stored']} chunks)")
    click.echo(f"documents: {data['documents_done']} done, {data['documents_failed']} failed (dead letters)")
    if probe := data.get("probe"):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(probe["at"]))
        click.echo(f"quality probe: recall@10 {probe['recall_at_10']:.3f}, nDCG@10 {probe['ndcg_at_10']:.3f} ({when})")


def _ledger(local: bool, settings: Settings) -> Any:
    if local:
        from shared.ledger import LocalLedger, local_ledger_path

        path = local_ledger_path(settings.store_path)
        if not path.is_file():
            raise click.ClickException(
                f"no embedded run at {settings.store_path}; set EMBEDPIPE_REDIS_URL for distributed mode"
            )
        return LocalLedger(path)
    from shared.ledger import RedisLedger
    from shared.queues import connect

    return RedisLedger(connect(settings), settings.dead_source_ttl_s)


def _select(letters: list[Any], stage: str | None, reason: str | None, ids: tuple[str, ...] = ()) -> list[Any]:
    return [
        d
        for d in letters
        if (stage is None or d.stage == stage)
        and (reason is None or d.reason == reason)
        and (not ids or d.doc_id in ids)
    ]


stage_filter = click.option(
    "--stage", help="Only dead letters of this stage (submit, inbox, load, chunk, embed, write)."
)
reason_filter = click.option("--reason", type=click.Choice(REASONS), help="Only dead letters with this reason.")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@stage_filter
@reason_filter
@local_option
@settings_options(*REDIS, "store")
@fail_clearly
def failed(as_json: bool, stage: str | None, reason: str | None, local: bool | None, settings: Settings) -> None:
    """Failed documents (dead letters): document ID, stage, reason, message, attempts, time."""
    use_local = _use_local(local)
    if use_local and not local_ledger_path(settings.store_path).is_file():
        letters = []
    else:
        letters = _select(_ledger(use_local, settings).dead(), stage, reason)
    rows = [{k: v for k, v in asdict(d).items() if k != "source"} for d in letters]
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no failed documents")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        doc_id, message = printable(r["doc_id"]), printable(r["message"])
        click.echo(f"{doc_id}  [{r['stage']}/{r['reason']}]  {message}  ({r['attempts']}x, last {when})")


@main.command()
@stage_filter
@reason_filter
@click.option("--id", "ids", multiple=True, help="Only this document (repeatable).")
@local_option
@settings_options(*REDIS, "store", *MODEL, *CHUNKING, *JOBS)
@fail_clearly
def redrive(
    stage: str | None, reason: str | None, ids: tuple[str, ...], local: bool | None, settings: Settings
) -> None:
    """Submit dead letters again from the source each one kept. A document that succeeds leaves the
    dead letters; one that fails again is listed again, with its attempts counted."""
    from shared.errors import DecodeError
    from shared.messages import SourceDoc

    use_local = _use_local(local)
    ledger = _ledger(use_local, settings)
    sources, skipped = [], []
    for letter in _select(ledger.dead(), stage, reason, ids):
        try:
            sources.append(SourceDoc.from_dict(ledger.source(letter.doc_id)))
        except DecodeError:
            skipped.append(letter.doc_id)
    if use_local:
        from workers.embedded import EmbeddedRun

        summary = EmbeddedRun(settings).run(sources)
        click.echo(f"redrove {len(sources)}: {summary.documents_stored} stored, {summary.failed} failed again")
    else:
        from producer.submit import submit

        result = submit(ledger.redis, settings, sources)
        click.echo(f"resubmitted {result.documents} documents in {result.batches} batches")
    if skipped:
        click.echo(
            f"{len(skipped)} without a usable source (resubmit them by hand): {', '.join(skipped[:20])}", err=True
        )


@main.command()
@click.option(
    "--eval",
    "eval_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="BEIR-layout eval set: queries.jsonl and qrels/test.tsv about documents in the store.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--collection", default=None, help="Probe this collection instead of the active one.")
@local_option
@settings_options(*REDIS, "store", "device", "batch_size", *API)
@fail_clearly
def probe(eval_dir: str, as_json: bool, collection: str | None, local: bool | None, settings: Settings) -> None:
    """Measure search quality now: recall@10 and nDCG@10 of a collection (default: the active one)
    on fixed queries, ranking documents by their best chunk, with the model that embedded it.
    Recorded with the collection (for `promote`), for `status` and the dashboard."""
    from producer.lifecycle import embedder_for
    from shared.store import open_store
    from workers.probe import run_probe

    store = open_store(settings.store, collection=collection)
    result = run_probe(store, embedder_for(store, settings), eval_dir)
    store.record_probe(result)
    store.close()
    use_local = _use_local(local)
    if not use_local or local_ledger_path(settings.store_path).is_file():
        _ledger(use_local, settings).record_probe(result)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"recall@10 {result['recall_at_10']:.3f}  nDCG@10 {result['ndcg_at_10']:.3f}  "
            f"({result['queries']} queries, {result['seconds']:.1f} s)"
        )


@main.command(name="eval")
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@settings_options("device", "batch_size")
@fail_clearly
def evaluate_models(models: str, eval_dir: str, max_docs: int, as_json: bool, settings: Settings) -> None:
    """Compare models (or configurations of one) on your own data: each embeds the eval corpus into a
    throwaway store; prints recall@10, nDCG@10, dimensions, throughput and cost."""
    from producer.evaluation import compare

    rows = compare([m.strip() for m in models.split(",") if m.strip()], eval_dir, max_docs, settings)
    if as_json:
        click.echo(json.dumps(rows))
        return
    click.echo(f"{'model':<34}{'dims':>6}{'recall@10':>11}{'nDCG@10':>9}{'chunks/s':>10}{'cost $':>8}")
    for r in rows:
        click.echo(
            f"{r['model']:<34}{r['dimensions']:>6}{r['recall_at_10']:>11.3f}{r['ndcg_at_10']:>9.3f}"
            f"{r['chunks_per_s']:>10.1f}{r['cost_usd']:>8.2f}"
        )
