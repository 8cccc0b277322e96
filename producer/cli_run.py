"""`embedpipe` commands that embed and search: run (the embedded mode: one process, no Redis) and
search (any store). The pipeline, the model and the store are imported inside each command, when it
runs: importing the CLI (for `embedpipe status`, say) must not load torch, numpy or lancedb."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import click

from producer.cli_options import (
    API,
    CACHE,
    CHUNKING,
    MODEL,
    SettingsCommand,
    check_prune_flags,
    check_store,
    document_bar,
    echo_json,
    exclude_option,
    fail_clearly,
    json_option,
    progress_option,
    prune_options,
    settings_options,
)
from producer.sources import Listed, count_documents, iter_sources, resolve
from shared.embedding import Embedder
from shared.lanes import one_model
from shared.settings import Settings


def _prune(settings: Settings, kept: set[str], scope: str, force: bool) -> dict[str, int]:
    from shared.store import prune

    return prune(settings.store, kept, scope=scope, max_fraction=settings.prune_max_fraction, force=force)


def _probe_after_run(settings: Settings, embedder: Embedder, changed: bool) -> dict[str, Any] | None:
    """The quality probe after a run that changed the store (or of a collection never probed), recorded
    with the collection and in the ledger beside the store."""
    from shared.ledger import LocalLedger, local_ledger_path
    from shared.spec import spec_for
    from shared.store import open_store
    from workers.probe import run_probe

    store = open_store(settings.store, spec_for(settings))
    try:
        if not changed and any(c["name"] == store.collection and c.get("probe") for c in store.collections()):
            return None
        probe = run_probe(store, embedder, settings.probe_eval)
        LocalLedger(local_ledger_path(settings.local_state_dir)).record_probe(probe)
        store.record_probe(probe)
        return probe
    finally:
        store.close()


@click.command(cls=SettingsCommand)
@click.argument("paths", nargs=-1, required=True)
@json_option
@click.option("--fail-on-dead-letters", is_flag=True, help="Exit 1 when any document failed (a dead letter).")
@exclude_option
@progress_option
@prune_options
@settings_options("store", "id_prefix", *MODEL, *CHUNKING, *CACHE, "probe_eval", "prune_max_fraction")
@fail_clearly
def run(
    paths: tuple[str, ...],
    as_json: bool,
    fail_on_dead_letters: bool,
    exclude: tuple[str, ...],
    progress: bool | None,
    prune: bool,
    force_prune: bool,
    prune_scope: str,
    settings: Settings,
) -> None:
    """Embed PATHS (files, directories, globs, URLs, - for JSONL on stdin) into the store (a directory
    or a postgresql:// URL), in one process with no Redis. Unchanged documents are skipped; unchanged
    chunks of edited ones come from the embedding cache. Failed documents are listed by `embedpipe failed`."""
    from workers.embed import make_embedder
    from workers.embedded import run_embedded

    check_prune_flags(prune, force_prune, prune_scope)
    one_model(settings, "run")
    check_store(settings, write=True)
    inputs = resolve(list(paths), exclude, settings.id_prefix)
    show = sys.stderr.isatty() if progress is None else progress
    listed = Listed(iter_sources(inputs, settings.max_doc_bytes))
    embedder = make_embedder(settings)  # warmed up only if something must be embedded (or probed)
    with document_bar(count_documents(inputs), show, "reading") as bar:
        summary = run_embedded(settings, listed, embedder=embedder, progress=bar)
    pruned = _prune(settings, listed.ids, prune_scope, force_prune) if prune else {}
    probe = None
    if settings.probe_eval:
        probe = _probe_after_run(settings, embedder, changed=bool(summary.chunks or pruned))
    if as_json:
        echo_json(summary.to_dict() | ({"probe": probe} if probe else {}) | {"pruned": pruned})
    else:
        _print_summary(summary, pruned, probe)
    if summary.failed and fail_on_dead_letters:
        raise click.ClickException(f"{summary.failed} documents failed: see `embedpipe failed`")
    if summary.failed and not as_json:
        click.echo(f"{summary.failed} failed: see `embedpipe failed`", err=True)


def _print_summary(summary: Any, pruned: dict[str, int], probe: dict[str, Any] | None) -> None:
    click.echo(
        f"{summary.documents} documents ({summary.documents_stored} stored, {summary.unchanged} unchanged, "
        f"{summary.failed} failed), {summary.chunks} chunks ({summary.chunks_embedded} embedded, "
        f"{summary.chunks_cached} from the cache), {summary.tokens} tokens in {summary.seconds:.1f} s"
        + (f" (loading the model took {summary.model_load_seconds:.1f} s)" if summary.model_load_seconds else "")
        + f"\nvectors: {summary.store} (collection {summary.collection})"
    )
    if any(pruned.values()):
        click.echo(f"pruned (no longer in PATHS): {sum(pruned.values())} documents")
    if probe:
        click.echo(
            f"quality probe: recall@10 {probe['recall_at_10']:.3f}, nDCG@10 {probe['ndcg_at_10']:.3f} "
            f"on {probe['queries']} queries of {probe['eval']}"
        )


def parse_where(pairs: tuple[str, ...]) -> dict[str, str]:
    where = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--where")
        where[key] = value
    return where


@click.command(cls=SettingsCommand)
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="How many chunks to return.")
@click.option(
    "--where",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only chunks of documents whose metadata field KEY is the string VALUE (repeatable: all must hold).",
)
@json_option
@click.option("--collection", default=None, help="Search this collection instead of the active one.")
@settings_options("store", "device", "batch_size", *API)
@fail_clearly
def search(
    query: str, k: int, where: tuple[str, ...], as_json: bool, collection: str | None, settings: Settings
) -> None:
    """Find the K chunks closest to QUERY in the store's active collection (document ID, chunk,
    score, text). The query is embedded as that collection was: same model, dimensions, prefix."""
    from producer.search import search as search_store  # the model and the store's backend

    hits = search_store(settings, query, k, parse_where(where), collection)
    if as_json:
        echo_json({"hits": [{**asdict(h), "chunk": h.index} for h in hits]})
        return
    if not hits:
        click.echo("no results: the store is empty" if not where else "no results: nothing matches --where")
    for rank, h in enumerate(hits, 1):
        text = " ".join(h.text.split())
        click.echo(f"{rank}. {h.score:.3f}  {h.doc_id}  #{h.index}\n   {text[:300]}{'…' if len(text) > 300 else ''}")
