"""The `embedpipe` command line. Every setting is a flag that defaults to its EMBEDPIPE_* variable."""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import click

from shared.errors import REASONS, EmbedpipeError
from shared.ledger import local_ledger_path
from shared.settings import STAGES, Settings, env_name, setting_fields

log = logging.getLogger("embedpipe")

FIELDS = {f.name: f for f in setting_fields()}
REDIS = ["redis_url"]
MODEL = ["model", "device", "batch_size"]
CHUNKING = ["chunk_tokens", "chunk_overlap", "batch_docs", "part_max_chunks", "part_max_tokens", "max_doc_bytes"]
JOBS = ["payload_ttl_s", "load_timeout_s", "chunk_timeout_s", "embed_timeout_s", "write_timeout_s", "job_retries"]
RUNTIME = ["metrics_port", "dead_source_ttl_s", "probe_eval"]


def settings_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one flag per named setting, defaulting to its environment variable, and pass the
    command a ready `settings` object instead of the raw values."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in names}
            ctx = click.get_current_context()
            if "redis_url" in given and ctx.get_parameter_source("redis_url") == click.core.ParameterSource.COMMANDLINE:
                if urlsplit(given["redis_url"]).password:
                    raise click.UsageError(
                        "a password on the command line shows in `ps`: put it in EMBEDPIPE_REDIS_PASSWORD, "
                        "EMBEDPIPE_REDIS_PASSWORD_FILE, or the URL in EMBEDPIPE_REDIS_URL"
                    )
            try:
                settings = Settings.from_env(**given, log_level=ctx.find_root().params["log_level"])
            except EmbedpipeError as e:
                raise click.UsageError(str(e)) from e
            return command(*args, settings=settings, **kwargs)

        for name in reversed(names):
            f = FIELDS[name]
            wrapper = click.option(
                "--" + name.replace("_", "-"),
                name,
                type=type(f.default),
                default=f.default,
                envvar=env_name(name),
                show_default=True,
                show_envvar=True,
                help=f.metadata["help"],
            )(wrapper)
        return wrapper

    return decorate


def fail_clearly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known errors into one clear line and exit status 1, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError

        try:
            return command(*args, **kwargs)
        except EmbedpipeError as e:
            raise click.ClickException(str(e)) from e
        except (RedisConnectionError, ResponseError) as e:
            settings = kwargs.get("settings")
            where = f" at {settings.redis_url_redacted}" if settings else ""
            raise click.ClickException(f"cannot use Redis{where}: {e}") from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--log-level",
    default="WARNING",
    envvar="EMBEDPIPE_LOG_LEVEL",
    show_default=True,
    show_envvar=True,
    help="Logging level (workers and janitor log each job at INFO).",
)
@click.version_option(package_name="embedpipe")
def main(log_level: str) -> None:
    """embedpipe turns documents into vectors and keeps them fresh.

    \b
    Embedded (one process, no Redis, a local store):
      embedpipe run examples/            embed a directory, show a summary
      embedpipe search "a question"      ask the store
    Distributed (Redis queues, a pool of workers per stage):
      embedpipe janitor                  housekeeping: inbox, retries, recovery (run one)
      embedpipe worker load|chunk|embed|write
      embedpipe enqueue PATH... | -      submit documents
      embedpipe status / failed / wait   watch it work

    Every flag defaults to its EMBEDPIPE_* environment variable. Secrets never go on the command line:
    the Redis password comes from EMBEDPIPE_REDIS_URL, EMBEDPIPE_REDIS_PASSWORD or EMBEDPIPE_REDIS_PASSWORD_FILE.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


exclude_option = click.option(
    "--exclude", multiple=True, metavar="GLOB", help="Skip files whose ID or name matches GLOB (repeatable)."
)


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@exclude_option
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@settings_options("store", *MODEL, *CHUNKING, "probe_eval")
@fail_clearly
def run(
    paths: tuple[str, ...], as_json: bool, exclude: tuple[str, ...], progress: bool | None, settings: Settings
) -> None:
    """Embed PATHS (files, directories, globs, URLs, - for JSONL on stdin) into the local store, in
    one process with no Redis. Failed documents are listed by `embedpipe failed`."""
    from tqdm import tqdm

    from producer.sources import iter_sources, resolve
    from workers.embedded import EmbeddedRun

    inputs = resolve(list(paths), exclude)
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=0, unit="chunk", desc="embedding", disable=not show, dynamic_ncols=True) as bar:
        pipeline = EmbeddedRun(settings, progress=bar)
        summary = pipeline.run(iter_sources(inputs, settings.max_doc_bytes))
    probe = None
    if settings.probe_eval:
        from workers.probe import run_probe

        probe = run_probe(pipeline.store, pipeline.embedder, settings.probe_eval)
        pipeline.ledger.record_probe(probe)
    if as_json:
        click.echo(json.dumps(summary.to_dict() | ({"probe": probe} if probe else {})))
        return
    click.echo(
        f"{summary.documents} documents ({summary.documents_stored} stored, {summary.failed} failed), "
        f"{summary.chunks} chunks, {summary.tokens} tokens in {summary.seconds:.1f} s "
        f"({summary.chunks_per_s:.1f} chunks/s; loading the model took {summary.model_load_seconds:.1f} s)"
        f"\nvectors: {summary.store}"
    )
    if probe:
        click.echo(
            f"quality probe: recall@10 {probe['recall_at_10']:.3f}, nDCG@10 {probe['ndcg_at_10']:.3f} "
            f"on {probe['queries']} queries of {probe['eval']}"
        )
    if summary.failed:
        click.echo(f"{summary.failed} failed: see `embedpipe failed`", err=True)


@main.command()
@click.argument("query")
@click.option("-k", "k", default=5, show_default=True, help="How many chunks to return.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of hits.")
@settings_options("store", *MODEL)
@fail_clearly
def search(query: str, k: int, as_json: bool, settings: Settings) -> None:
    """Find the K chunks closest to QUERY in the store (document ID, chunk, score, text)."""
    from shared.store import open_store
    from workers.embed import Embedder

    if not settings.store_path.is_dir():
        raise click.ClickException(f"no store at {settings.store_path}: run `embedpipe run PATH` first")
    store = open_store(settings.store, settings.model)
    vector = Embedder(settings.model, settings.device, settings.batch_size).warm_up().embed([query])[0]
    hits = store.search(vector, k)
    if as_json:
        click.echo(json.dumps([{**asdict(h), "chunk": h.index} for h in hits]))
        return
    if not hits:
        click.echo("no results: the store is empty")
    for rank, h in enumerate(hits, 1):
        text = " ".join(h.text.split())
        click.echo(f"{rank}. {h.score:.3f}  {h.doc_id}  #{h.index}\n   {text[:300]}{'…' if len(text) > 300 else ''}")


@main.command()
@click.argument("paths", nargs=-1, required=True)
@exclude_option
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@settings_options(*REDIS, "batch_docs", "max_doc_bytes", "max_backlog_jobs", *JOBS)
@fail_clearly
def enqueue(paths: tuple[str, ...], exclude: tuple[str, ...], progress: bool | None, settings: Settings) -> None:
    """Submit PATHS (files, directories, globs, http(s) URLs, - for JSONL on stdin) to the
    distributed pipeline. Local files are sent by content; URLs are fetched by the loaders."""
    from tqdm import tqdm

    from producer.sources import iter_sources, resolve
    from producer.submit import submit
    from workers.runtime import connect

    inputs = resolve(list(paths), exclude)
    redis = connect(settings)
    redis.ping()
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(inputs), unit="doc", desc="enqueue", disable=not show) as bar:

        def waiting(backlog: int) -> None:
            bar.set_postfix_str(f"waiting: {backlog} jobs queued > {settings.max_backlog_jobs}")

        items = iter_sources(inputs, settings.max_doc_bytes)
        result = submit(redis, settings, items, on_progress=bar.update, on_wait=waiting)
    click.echo(
        f"enqueued {result.documents} documents in {result.batches} batches"
        + (f"; {result.rejected} rejected (see `embedpipe failed`)" if result.rejected else "")
    )


@main.command()
@click.argument("stage", type=click.Choice(STAGES))
@click.option("--burst", is_flag=True, help="Work until the queue is empty, then exit 0.")
@settings_options(*REDIS, "store", *MODEL, *CHUNKING, *JOBS, *RUNTIME)
@fail_clearly
def worker(stage: str, burst: bool, settings: Settings) -> None:
    """Start one worker of the STAGE pool (run any number of each, in any order). It loads what its
    stage needs once (tokenizer, model or store), then takes jobs from the rq queue STAGE.
    SIGTERM finishes the current job, then exits."""
    from workers.runtime import run_worker

    run_worker(settings, stage, burst=burst)


@main.command()
@click.option("--burst", is_flag=True, help="Batch the inbox until it is empty, then exit 0.")
@settings_options(*REDIS, "batch_docs", "inbox_wait_s", *JOBS, *RUNTIME)
@fail_clearly
def janitor(burst: bool, settings: Settings) -> None:
    """Start the housekeeping process (run exactly one): batches the inbox into load jobs, runs rq's
    scheduler (delayed retries) and recovers jobs of dead workers every few seconds."""
    from workers.janitor import Janitor

    Janitor(settings).run(burst=burst)


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
    if _use_local(local):
        from producer.status import local_status
        from shared.ledger import LocalLedger, local_ledger_path
        from shared.store import open_store

        path = local_ledger_path(settings.store_path)
        if not path.is_file():
            raise click.ClickException(
                f"no embedded run at {settings.store_path}; set EMBEDPIPE_REDIS_URL for distributed mode"
            )
        data = local_status(LocalLedger(path), open_store(settings.store, settings.model).count())
    else:
        from producer.status import distributed_status
        from workers.runtime import connect

        data = distributed_status(connect(settings))
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
            raise click.ClickException(f"no embedded run at {settings.store_path}")
        return LocalLedger(path)
    from shared.ledger import RedisLedger
    from workers.runtime import connect

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
        click.echo(f"{r['doc_id']}  [{r['stage']}/{r['reason']}]  {r['message']}  ({r['attempts']}x, last {when})")


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
@local_option
@settings_options(*REDIS, "store", *MODEL)
@fail_clearly
def probe(eval_dir: str, as_json: bool, local: bool | None, settings: Settings) -> None:
    """Measure search quality now: recall@10 and nDCG@10 of the store on fixed queries, ranking
    documents by their best chunk. Recorded for `status` and the dashboard."""
    from shared.store import open_store
    from workers.embed import Embedder
    from workers.probe import run_probe

    store = open_store(settings.store, settings.model)
    result = run_probe(store, Embedder(settings.model, settings.device, settings.batch_size), eval_dir)
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


@main.command()
@click.option(
    "--timeout",
    "timeout_s",
    type=float,
    default=0,
    show_default=True,
    help="Give up after S seconds (0: never); exit 1.",
)
@settings_options(*REDIS)
@fail_clearly
def wait(timeout_s: float, settings: Settings) -> None:
    """Block until the distributed pipeline is idle: inbox and queues empty, nothing running or
    scheduled for retry."""
    from producer.status import distributed_status, is_idle
    from workers.runtime import connect

    redis = connect(settings)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    idle_rounds = 0
    while idle_rounds < 2:  # twice in a row: a job between two stages is never missed
        idle_rounds = idle_rounds + 1 if is_idle(distributed_status(redis)) else 0
        if deadline and time.monotonic() > deadline:
            raise click.ClickException(f"still busy after {timeout_s:g} s")
        time.sleep(0.5)


@main.command()
@click.option(
    "--stage",
    type=click.Choice(["janitor", *STAGES, "embedded"]),
    default="janitor",
    show_default=True,
    help="Which process is probed: all need Redis but embedded; write needs the store; chunk/embed the model.",
)
@settings_options(*REDIS, "store", "model")
@fail_clearly
def health(stage: str, settings: Settings) -> None:
    """Exit 0 when this process's dependencies answer (for container probes), else 1 with the reason."""
    from shared.models import resolve_model_path

    if stage != "embedded":
        from workers.runtime import connect

        connect(settings, retries=0).ping()  # a probe answers now, it does not wait out an outage
    if stage in ("chunk", "embed", "embedded"):
        resolve_model_path(settings.model)
    if stage in ("write", "embedded"):
        from shared.store import open_store

        open_store(settings.store, settings.model)
    click.echo("ok")
