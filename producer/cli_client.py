"""`embedpipe` commands of the light client (producer/client.py): enqueue, wait, status, failed, redrive.

They load no model, torch or numpy: only `status --local` (which counts the local store) and
`redrive --local` (which runs the embedded pipeline) import more, inside the command, when asked.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click
from tqdm import tqdm

from producer import client
from producer.cli_options import (
    CHUNKING,
    JOBS,
    MODEL,
    REDIS,
    SettingsCommand,
    check_prune_flags,
    check_store,
    document_bar,
    echo_json,
    exclude_option,
    fail_clearly,
    json_option,
    local_option,
    open_ledger,
    progress_option,
    prune_options,
    redis_for,
    settings_options,
    use_local,
)
from producer.sources import Listed, count_documents, iter_sources, resolve
from shared.errors import REASONS
from shared.ledger import RedisLedger
from shared.settings import Settings
from shared.text import printable


@click.command(cls=SettingsCommand)
@click.argument("paths", nargs=-1, required=True)
@json_option
@exclude_option
@progress_option
@prune_options
@click.option(
    "--inbox",
    "via_inbox",
    is_flag=True,
    help="Push the documents onto the inbox list for the janitor to batch, as any client may: all the "
    "Redis user `producer` is allowed (deploy/redis/users.acl.template).",
)
@settings_options(
    *REDIS,
    "id_prefix",
    "batch_docs",
    "batch_bytes",
    "max_doc_bytes",
    "max_backlog_jobs",
    "hold_redis_share",
    *JOBS,
    "prune_max_fraction",
)
@fail_clearly
def enqueue(
    paths: tuple[str, ...],
    as_json: bool,
    exclude: tuple[str, ...],
    progress: bool | None,
    prune: bool,
    force_prune: bool,
    prune_scope: str,
    via_inbox: bool,
    settings: Settings,
) -> None:
    """Submit PATHS (files, directories, globs, http(s) URLs, - for JSONL on stdin) to the
    distributed pipeline. Local files are sent by content; URLs are fetched by the loaders.
    Unchanged documents are skipped by the chunkers. By default batches and load jobs are written
    directly (the `worker` or `admin` Redis user); --inbox goes through the inbox (`producer`)."""
    check_prune_flags(prune, force_prune, prune_scope)
    if prune and via_inbox:
        raise click.UsageError("--prune deletes documents: it needs the worker or admin user, not --inbox")
    inputs = resolve(list(paths), exclude, settings.id_prefix)
    redis = redis_for(settings, sends_payloads=True)
    redis.ping()
    show = sys.stderr.isatty() if progress is None else progress
    with document_bar(count_documents(inputs), show, "enqueue") as bar:

        def waiting(why: str) -> None:
            bar.set_postfix_str(f"waiting: {why}")

        items = Listed(iter_sources(inputs, settings.max_doc_bytes))
        send = client.push_to_inbox if via_inbox else client.submit
        result = send(redis, settings, items, on_progress=bar.update, on_wait=waiting)
    if prune:
        client.submit_prune(redis, settings, items.ids, prune_scope, force_prune)
    if as_json:
        rejected = [{"doc_id": d.doc_id, "reason": d.reason, "message": d.message} for d in result.rejected_letters]
        echo_json(
            {
                "documents": result.documents,
                "batches": result.batches,
                "batch_ids": result.batch_ids,  # empty with --inbox: the janitor batches the inbox
                "rejected": rejected,
                "inbox": via_inbox,
                "prune": prune,
            }
        )
        return
    where = "pushed to the inbox" if via_inbox else "enqueued"
    click.echo(
        f"{where} {result.documents} documents in {result.batches} batches"
        + (f"; {result.rejected} rejected (see `embedpipe failed`)" if result.rejected and not via_inbox else "")
    )
    if result.rejected and via_inbox:  # the inbox's user may record no dead letters: say them here
        click.echo(f"{result.rejected} rejected here, not submitted:", err=True)
        for letter in result.rejected_letters[:20]:
            click.echo(f"  {printable(letter.doc_id)}: {letter.reason}: {printable(letter.message)}", err=True)
    if prune:
        under = f" under {prune_scope!r}" if prune_scope else ""
        click.echo(f"prune enqueued: the writers delete every stored document{under} but these {len(items.ids)}")


@click.command(cls=SettingsCommand)
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=0,
    show_default=True,
    help="Give up after S seconds (0: never); exit 1.",
)
@click.option(
    "--batch",
    "batch_ids",
    multiple=True,
    metavar="ID",
    help="Wait only for these batches (repeatable; `enqueue --json` prints their IDs).",
)
@json_option
@progress_option
@settings_options(*REDIS)
@fail_clearly
def wait(
    timeout_s: float, batch_ids: tuple[str, ...], as_json: bool, progress: bool | None, settings: Settings
) -> None:
    """Block until the distributed pipeline is idle (inbox and queues empty, nothing running or
    scheduled for retry), or with --batch until those batches are settled: stored, or their documents
    dead letters. Exit 1 if --timeout passes first."""
    redis = redis_for(settings)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(bar_format="{desc}", disable=not show) as line:
        counted = Counted(client.ledger_of(redis, settings), line) if show else None
        if batch_ids:
            done = within(
                timeout_s, lambda: client.wait_for_batches(redis, settings, list(batch_ids), timeout_s), counted
            )
        else:
            done = within(timeout_s, lambda: client.wait(redis, settings, timeout_s), counted)
        if counted is not None:
            counted()  # where it ended
    if as_json:
        echo_json({"done": done, "batch_ids": list(batch_ids), "timeout_s": timeout_s})
    if not done:
        raise click.ClickException(f"still busy after {timeout_s:g} s")


class Counted:
    """`wait --progress`: documents done and failed, and documents per second since the wait began,
    from the pipeline's counters in Redis."""

    def __init__(self, ledger: RedisLedger, line: tqdm) -> None:
        self.ledger, self.line = ledger, line
        self.started, self.done_before = time.monotonic(), ledger.counters().get("documents_done", 0)
        self()

    def __call__(self) -> None:
        done = self.ledger.counters().get("documents_done", 0)
        rate = (done - self.done_before) / max(time.monotonic() - self.started, 1e-9)
        failed = self.ledger.dead_count()
        self.line.set_description_str(f"waiting: {done} documents done, {failed} failed, {rate:.1f} documents/s")


TICK_S = 0.5


def within(timeout_s: float, waiting: Callable[[], bool], tick: Callable[[], None] | None = None) -> bool:
    """`waiting()`, or False once `timeout_s` (0: never) passed, even while it waits on Redis; `tick`
    is called every TICK_S meanwhile."""
    outcome: list[bool | Exception] = []

    def run() -> None:
        try:
            outcome.append(waiting())
        except Exception as e:  # said by the command, in the main thread
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)  # left behind on a timeout: the process exits
    thread.start()
    deadline = time.monotonic() + timeout_s if timeout_s else None
    while thread.is_alive() and (deadline is None or time.monotonic() < deadline):
        thread.join(TICK_S if deadline is None else min(TICK_S, max(0.0, deadline - time.monotonic())))
        if tick is not None and thread.is_alive():
            tick()
    if not outcome:
        return False
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


@click.command(cls=SettingsCommand)
@json_option
@click.option(
    "--watch",
    "watch_s",
    type=float,
    default=None,
    is_flag=False,
    flag_value=2.0,
    help="Redraw every S seconds (default 2) until Ctrl+C; with --json, one JSON line every S seconds (NDJSON).",
)
@local_option
@settings_options(*REDIS, "store", "models", "hold_redis_share")
@fail_clearly
def status(as_json: bool, watch_s: float | None, local: bool | None, settings: Settings) -> None:
    """Per stage: queued, running, scheduled and failed jobs and live workers; documents done and
    failed (dead letters); the last quality probe."""
    while True:
        if watch_s and not as_json:  # JSON lines go to a script: no screen codes, no header
            click.clear()
            click.echo(time.strftime("%H:%M:%S  ") + "embedpipe status (Ctrl+C to stop)")
        _print_status(as_json, local, settings)
        if not watch_s:
            return
        try:
            time.sleep(watch_s)
        except KeyboardInterrupt:
            return


def _status(local: bool, settings: Settings) -> dict[str, Any]:
    if not local:
        return client.status(redis_for(settings), settings)
    ledger = open_ledger(True, settings)
    from shared.store import open_store  # the store's backend (numpy, lancedb): only the local status counts it

    store = open_store(settings.store)
    try:
        return client.local_status(ledger, store.count())
    finally:
        store.close()


def _print_status(as_json: bool, local: bool | None, settings: Settings) -> None:
    data = _status(use_local(local), settings)
    if as_json:
        echo_json(data | {"at": time.time()})
        return
    if data["mode"] == "distributed":
        click.echo(f"inbox: {data['inbox']}")
        header = ["stage", "queued", "running", "scheduled", "failed", "workers"]
        width = max(9, *map(len, data["stages"]))  # embed@LANE pools with several models
        click.echo(f"{header[0]:<{width}}  " + "  ".join(f"{h:>9}" for h in header[1:]))
        for stage, s in data["stages"].items():
            row = [s["queued"] + s["dequeuing"], s["running"], s["scheduled"] + s["deferred"], s["failed"]]
            click.echo(f"{stage:<{width}}  " + "  ".join(f"{v:>9}" for v in [*row, s["workers"]]))
        click.echo(redis_line(data["redis"], settings.hold_redis_share))
    else:
        click.echo(f"store: {settings.store_redacted} ({data['chunks_stored']} chunks)")
    click.echo(f"documents: {data['documents_done']} done, {data['documents_failed']} failed (dead letters)")
    for model, counts in data.get("models", {}).items():  # several models: each one's own progress
        done, unchanged = counts.get("documents_done", 0), counts.get("documents_skipped", 0)
        click.echo(f"  {model} ({counts['pool']}): {done} stored, {unchanged} unchanged")
    if probe := data.get("probe"):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(probe["at"]))
        click.echo(f"quality probe: recall@10 {probe['recall_at_10']:.3f}, nDCG@10 {probe['ndcg_at_10']:.3f} ({when})")


def redis_line(memory: dict[str, int], hold_share: float) -> str:
    used, limit = memory["used_bytes"], memory["maxmemory_bytes"]
    if not limit:
        return f"redis: {used / 2**20:.0f} MB used, no maxmemory"
    line = f"redis: {used / 2**20:.0f} of {limit / 2**20:.0f} MB maxmemory ({used / limit:.0%})"
    if used >= hold_share * limit:
        line += f": past {hold_share:.0%}, new work and the loaders, chunkers and embedders wait for later stages"
    return line


stage_filter = click.option(
    "--stage", help="Only dead letters of this stage (submit, inbox, load, chunk, embed, write)."
)
reason_filter = click.option("--reason", type=click.Choice(REASONS), help="Only dead letters with this reason.")


FAILED_LIMIT = 100  # dead letters `failed` lists unless told otherwise: the newest, enough to see what goes wrong


@click.command(cls=SettingsCommand)
@json_option
@stage_filter
@reason_filter
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=FAILED_LIMIT,
    show_default=True,
    help="List the newest N matching dead letters (0: all of them).",
)
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, help="Skip the N newest matching ones (the next page)."
)
@local_option
@settings_options(*REDIS, "store")
@fail_clearly
def failed(
    as_json: bool,
    stage: str | None,
    reason: str | None,
    limit: int,
    offset: int,
    local: bool | None,
    settings: Settings,
) -> None:
    """Failed documents (dead letters): document ID, stage, reason, message, attempts, time; the newest
    --limit of them, oldest first, and how many there are in all."""
    ledger = open_ledger(use_local(local), settings)  # a missing store is said, not taken for an empty one
    letters = client.failed(ledger, stage, reason, limit=limit or None, offset=offset)
    total = ledger.dead_count()
    rows = [{k: v for k, v in asdict(d).items() if k != "source"} for d in letters]
    more = (
        f"{len(rows)} shown of {total:,} failed documents in all; --offset {offset + len(rows)}: "
        f"the next page (older ones), --limit 0: every one"
    )
    partial = offset > 0 or (limit and len(rows) == limit and total > len(rows))
    if as_json:
        echo_json({"failed": rows, "total": total, "limit": limit, "offset": offset})
        if partial:
            click.echo(more, err=True)
        return
    if not rows:
        click.echo("no failed documents" if not total else f"no failed documents here; {total:,} in all")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        doc_id, message = printable(r["doc_id"]), printable(r["message"])
        where = f"{r['stage']}@{r['spec']}" if r.get("spec") else r["stage"]
        click.echo(f"{doc_id}  [{where}/{r['reason']}]  {message}  ({r['attempts']}x, last {when})")
    if partial:
        click.echo(more)


@click.command(cls=SettingsCommand)
@stage_filter
@reason_filter
@click.option("--id", "ids", multiple=True, help="Only this document (repeatable).")
@json_option
@local_option
@settings_options(*REDIS, "store", *MODEL, *CHUNKING, *JOBS)
@fail_clearly
def redrive(
    stage: str | None,
    reason: str | None,
    ids: tuple[str, ...],
    as_json: bool,
    local: bool | None,
    settings: Settings,
) -> None:
    """Submit dead letters again from the source each one kept. A document that succeeds leaves the
    dead letters; one that fails again is listed again, with its attempts counted."""
    local = use_local(local)
    ledger = open_ledger(local, settings)
    sources, skipped = client.redrive_sources(ledger, client.failed(ledger, stage, reason, ids))
    if local:
        from workers.embedded import run_embedded  # the embedded pipeline: the model, torch, the store

        check_store(settings, write=True)
        summary = run_embedded(settings, sources)
        report = {"redriven": len(sources), "stored": summary.documents_stored, "failed": summary.failed}
        line = f"redrove {len(sources)}: {summary.documents_stored} stored, {summary.failed} failed again"
    else:
        result = client.submit(redis_for(settings, sends_payloads=True), settings, sources)
        report = {"redriven": result.documents, "batches": result.batches, "batch_ids": result.batch_ids}
        line = f"resubmitted {result.documents} documents in {result.batches} batches"
    if as_json:
        echo_json(report | {"without_source": skipped})
        return
    click.echo(line)
    if skipped:
        click.echo(
            f"{len(skipped)} without a usable source (resubmit them by hand): {', '.join(skipped[:20])}", err=True
        )
