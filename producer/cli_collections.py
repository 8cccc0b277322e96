"""`embedpipe` commands of the model lifecycle: collections, reembed, promote, delete. The model, the
store and the pipeline are imported inside each command, when it runs."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import click

from producer.cli_options import (
    CACHE,
    CHUNKING,
    MODEL,
    REDIS,
    SettingsCommand,
    check_store,
    document_bar,
    echo_json,
    fail_clearly,
    json_option,
    progress_option,
    redis_for,
    settings_options,
)
from producer.submit import submit
from shared.messages import SourceDoc
from shared.settings import Settings


@click.command(cls=SettingsCommand)
@json_option
@settings_options("store")
@fail_clearly
def collections(as_json: bool, settings: Settings) -> None:
    """List the store's collections (one per embedding spec): model, dimensions, documents, chunks,
    the last quality probe, and which one search uses (*). Every other collection shows how much of the
    active one it holds with the current text: `backfilling` while a re-embed is short of it,
    `complete` once it holds all; `previous` marks the one `promote --rollback` returns to."""
    from shared.store import open_store

    store = open_store(settings.store)
    rows = _with_progress(store.collections(), settings.store)
    store.close()
    if as_json:
        echo_json({"collections": rows})
        return
    if not rows:
        click.echo("no collections: run `embedpipe run PATH` first")
    for c in rows:
        spec, probe, done = c["spec"], c.get("probe") or {}, c.get("backfill")
        quality = f"recall@10 {probe['recall_at_10']:.3f}" if probe else "no probe"
        state = c["state"] + (f" {done['done']}/{done['total']}" if done else "")
        click.echo(
            f"{'*' if c['active'] else ' '} {c['name']}  {spec['model']}  {spec.get('backend', 'torch')}  "
            f"dims {spec['dimensions'] or 'all'}  "
            f"{c['documents']} documents  {c['chunks']} chunks  {quality}  {state}"
        )


def _with_progress(rows: list[dict[str, Any]], location: str) -> list[dict[str, Any]]:
    """Each collection's state (active, previous, backfilling, complete) and, but for the active one,
    its progress against the active one (producer.lifecycle.progress)."""
    from producer.lifecycle import progress

    done = progress(location) if rows else {}
    for c in rows:
        if c["name"] in done:
            c["backfill"] = done[c["name"]]
        behind = c["name"] in done and (done[c["name"]]["done"] < done[c["name"]]["total"] or done[c["name"]]["extra"])
        c["state"] = (
            "active" if c["active"] else "previous" if c.get("previous") else "backfilling" if behind else "complete"
        )
    return rows


@click.command(cls=SettingsCommand)
@click.option("--from", "source", default=None, help="Collection to read documents from (default: the active one).")
@click.option("--dry-run", is_flag=True, help="Print documents, chunks, tokens (and API cost); embed nothing.")
@click.option(
    "--enqueue",
    "distributed",
    is_flag=True,
    help="Submit to the distributed pipeline (Redis) instead; its pools must embed with the new model "
    "(with EMBEDPIPE_MODELS=ACTIVE,NEW they write new and changed documents to both collections).",
)
@progress_option
@json_option
@settings_options(*REDIS, "store", *MODEL, *CHUNKING, *CACHE, "max_backlog_jobs")
@fail_clearly
def reembed(
    source: str | None, dry_run: bool, distributed: bool, progress: bool | None, as_json: bool, settings: Settings
) -> None:
    """Re-embed every document of the store under the current settings' embedding spec (a new model,
    dimensions, prefix or chunker), into that spec's own collection. The documents' text comes from
    the store: no sources needed. Search keeps using the active collection until `embedpipe promote`."""
    from producer.lifecycle import stored_sources
    from shared.spec import spec_for
    from shared.store import open_store

    target = spec_for(settings)
    store = open_store(settings.store, collection=source)
    if store.collection is None:
        raise click.ClickException("the store has no collection to re-embed: run `embedpipe run PATH` first")
    report: dict[str, Any] = {"from": store.collection, "to": target.collection, "model": target.model}
    if store.collection == target.collection:
        if as_json:
            return echo_json(report | {"nothing_to_do": True})
        click.echo(f"nothing to do: {store.collection} already uses this embedding spec")
        return
    if not as_json:
        click.echo(f"re-embedding {store.collection} -> {target.collection} ({target.model})")
    if dry_run:
        if as_json:
            from producer.estimate import estimate

            return echo_json(report | {"dry_run": estimate(stored_sources(store), settings).to_dict()})
        click.echo(_plan(stored_sources(store), settings))
        return
    show = sys.stderr.isatty() if progress is None else progress
    check_store(settings, write=not distributed)
    if distributed:
        redis = redis_for(settings, sends_payloads=True)
        result = submit(redis, settings, stored_sources(store), backfill_from=store.collection)
        if as_json:
            return echo_json(report | {"documents": result.documents, "batch_ids": result.batch_ids})
        click.echo(
            f"enqueued {result.documents} documents for {target.collection}: the worker pools must embed with this "
            "model, best beside the active one (EMBEDPIPE_MODELS=ACTIVE,NEW: new and changed documents then reach both "
            f"collections); when `embedpipe wait` returns, `embedpipe promote {target.collection}`"
        )
        return
    from producer.lifecycle import backfill

    source_name = store.collection
    held = next((c["documents"] for c in store.collections() if c["name"] == source_name), None)
    store.close()
    with document_bar(held, show, "reading") as bar:
        passes = backfill(settings, source_name, bar=bar)
    documents, chunks = sum(p.documents_stored for p in passes), sum(p.chunks for p in passes)
    if as_json:
        failed = sum(p.failed for p in passes)
        return echo_json(report | {"documents": documents, "chunks": chunks, "failed": failed, "passes": len(passes)})
    click.echo(
        f"{documents} documents, {chunks} chunks into {target.collection} in {len(passes)} passes "
        f"({sum(p.seconds for p in passes):.1f} s; a pass embeds what "
        "changed during the one before); search still uses the active collection: `embedpipe promote` switches it"
    )


def _plan(sources: Iterable[SourceDoc], settings: Settings) -> str:
    """Documents, chunks, tokens and (API models) cost of embedding `sources` with `settings`."""
    from producer.estimate import estimate  # the loader and chunker: numpy, the tokenizer

    planned = estimate(sources, settings)
    line = f"{planned.documents - planned.unreadable} documents, {planned.chunks} chunks, {planned.tokens} tokens"
    if not planned.api:
        return line + ", local model: no API cost"
    if planned.cost_usd is None:
        return line + ", no price known (EMBEDPIPE_API_PRICES)"
    return line + f", ${planned.cost_usd:.6f} at the API's price"


@click.command(cls=SettingsCommand)
@click.argument("name", required=False)
@click.option("--force", is_flag=True, help="Promote even if incomplete or worse on the quality probe.")
@click.option("--rollback", is_flag=True, help="Make the previous active collection active again (no checks).")
@click.option(
    "--tolerance", type=float, default=None, help="Allowed recall@10 drop [default: EMBEDPIPE_PROMOTE_TOLERANCE]."
)
@json_option
@settings_options("store", *MODEL, *CHUNKING, "probe_eval", "promote_tolerance")
@fail_clearly
def promote(
    name: str | None, force: bool, rollback: bool, tolerance: float | None, as_json: bool, settings: Settings
) -> None:
    """Make collection NAME (default: the current settings' spec's) the one search uses; the one it
    replaces stays, as the previous one. Refused, unless --force, when it does not hold every document
    of the active one with its current text or its recall@10 on the quality probe is lower by more than
    the tolerance. With --probe-eval DIR the probes run now. --rollback returns to the previous one."""
    from producer.lifecycle import probe_collection, promotion
    from shared.spec import spec_for
    from shared.store import open_store

    check_store(settings, write=True)
    store = open_store(settings.store)
    if rollback:
        try:
            previous, current = store.previous(), store.active()
            if name or previous is None:
                raise click.UsageError("--rollback takes no NAME" if name else "no previous collection to return to")
            store.activate(previous)
        finally:
            store.close()
        if as_json:
            return echo_json({"active": previous, "previous": current, "rolled_back": True})
        click.echo(f"{previous} is the active collection again ({current} is the previous one: `promote` returns)")
        return
    target = name or spec_for(settings).collection
    probes: dict[str, Any] = {}
    try:
        rows = _with_progress(store.collections(), settings.store)
        if settings.probe_eval:
            for c in rows:
                if c["name"] == target or c["active"]:
                    result = probe_collection(settings.store, c["name"], settings.probe_eval, settings)
                    probes[c["name"]] = result
                    if not as_json:
                        click.echo(f"probe {c['name']}: recall@10 {result['recall_at_10']:.3f}")
            rows = _with_progress(store.collections(), settings.store)
        allowed = tolerance if tolerance is not None else settings.promote_tolerance
        decision = promotion(rows, target, allowed)
        if not decision.allowed and not force:
            raise click.ClickException(f"promotion refused: {decision.message} (--force overrides)")
        store.activate(target)
    finally:
        store.close()
    if as_json:
        return echo_json({"active": target, "message": decision.message, "forced": force, "probes": probes})
    click.echo(f"{target} is now the active collection: {decision.message}" + (" (forced)" if force else ""))


@click.command(cls=SettingsCommand)
@click.argument("ids", nargs=-1, required=True)
@json_option
@settings_options("store")
@fail_clearly
def delete(ids: tuple[str, ...], as_json: bool, settings: Settings) -> None:
    """Delete documents IDS and all their chunks from every collection of the store."""
    from shared.store import delete_documents

    check_store(settings, write=True)
    removed = delete_documents(settings.store, list(ids))
    held = max(removed.values(), default=0)
    if as_json:
        return echo_json({"deleted": held, "requested": len(ids), "by_collection": removed})
    click.echo(f"deleted {held} of {len(ids)} documents (" + ", ".join(f"{k}: {v}" for k, v in removed.items()) + ")")
