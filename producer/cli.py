"""The `embedpipe` command line. Every setting is a flag that defaults to its EMBEDPIPE_* variable."""

from __future__ import annotations

import faulthandler
import functools
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import click

from shared.errors import EmbedpipeError
from shared.settings import STAGES, Settings, env_name, setting_fields
from shared.text import printable

log = logging.getLogger("embedpipe")

FIELDS = {f.name: f for f in setting_fields()}
REDIS = ["redis_url"]
API = [
    "openai_base_url",
    "api_concurrency",
    "api_max_inputs",
    "api_max_input_tokens",
    "api_max_request_tokens",
    "api_rpm",
    "api_tpm",
    "api_timeout_s",
    "api_deadline_s",
    "api_prices",
]
MODEL = [
    "model",
    "device",
    "batch_size",
    "micro_batch_tokens",
    "backend",
    "vector_dtype",
    "dimensions",
    "doc_prefix",
    "query_prefix",
    *API,
]
CHUNKING = [
    "chunk_tokens",
    "chunk_overlap",
    "batch_docs",
    "batch_bytes",
    "part_max_chunks",
    "part_max_tokens",
    "max_doc_bytes",
    "fetch_allow",
]
CACHE = ["cache_ttl_s", "cache_max_entries"]
JOBS = [
    "payload_ttl_s",
    "load_timeout_s",
    "chunk_timeout_s",
    "embed_timeout_s",
    "write_timeout_s",
    "job_lease_s",
    "job_retries",
]
RUNTIME = ["metrics_port", "dead_source_ttl_s", "dead_letter_ttl_s", "max_dead_letters", "probe_eval", "support_nice"]


# Where a password goes instead of a flag (the command line shows in `ps` and in shell history).
WHERE_SECRETS_GO = {
    "redis_url": "EMBEDPIPE_REDIS_PASSWORD, EMBEDPIPE_REDIS_PASSWORD_FILE, or the URL in EMBEDPIPE_REDIS_URL",
    "store": "PGPASSWORD, a ~/.pgpass file, or the URL in EMBEDPIPE_STORE",
}


def settings_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add one flag per named setting, defaulting to its environment variable, and pass the
    command a ready `settings` object instead of the raw values."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in names}
            ctx = click.get_current_context()
            for name, where in WHERE_SECRETS_GO.items():
                from_flag = ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
                if name in given and from_flag and "://" in given[name] and urlsplit(given[name]).password:
                    raise click.UsageError(f"a password on the command line shows in `ps`: put it in {where}")
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
prune_option = click.option(
    "--prune",
    is_flag=True,
    help="Sync: afterwards, delete from the store every document that is not among PATHS' documents "
    "(files that disappeared), in every collection.",
)


def _has_probe(store: Any) -> bool:
    return any(c["name"] == store.collection and c.get("probe") for c in store.collections())


def _prune(store: str, kept: set[str]) -> dict[str, int]:
    from shared.store import prune

    return prune(store, kept)


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@exclude_option
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@prune_option
@settings_options("store", *MODEL, *CHUNKING, *CACHE, "probe_eval")
@fail_clearly
def run(
    paths: tuple[str, ...],
    as_json: bool,
    exclude: tuple[str, ...],
    progress: bool | None,
    prune: bool,
    settings: Settings,
) -> None:
    """Embed PATHS (files, directories, globs, URLs, - for JSONL on stdin) into the local store, in
    one process with no Redis. Unchanged documents are skipped; unchanged chunks of edited ones come
    from the embedding cache. Failed documents are listed by `embedpipe failed`."""
    from tqdm import tqdm

    from producer.lifecycle import Listed
    from producer.sources import iter_sources, resolve
    from workers.embedded import EmbeddedRun

    inputs = resolve(list(paths), exclude)
    show = sys.stderr.isatty() if progress is None else progress
    listed = Listed(iter_sources(inputs, settings.max_doc_bytes))
    with tqdm(total=0, unit="chunk", desc="embedding", disable=not show, dynamic_ncols=True) as bar:
        pipeline = EmbeddedRun(settings, progress=bar)
        summary = pipeline.run(listed)
    pruned = _prune(settings.store, listed.ids) if prune else {}
    probe = None
    if settings.probe_eval and (summary.chunks or pruned or not _has_probe(pipeline.store)):
        from workers.probe import run_probe

        probe = run_probe(pipeline.store, pipeline.embedder, settings.probe_eval)
        pipeline.ledger.record_probe(probe)
        pipeline.store.record_probe(probe)
    if as_json:
        click.echo(json.dumps(summary.to_dict() | ({"probe": probe} if probe else {}) | {"pruned": pruned}))
        return
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
    if summary.failed:
        click.echo(f"{summary.failed} failed: see `embedpipe failed`", err=True)


@main.command()
@click.argument("query")
@click.option("-k", "k", default=5, show_default=True, help="How many chunks to return.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of hits.")
@click.option("--collection", default=None, help="Search this collection instead of the active one.")
@settings_options("store", "device", "batch_size", *API)
@fail_clearly
def search(query: str, k: int, as_json: bool, collection: str | None, settings: Settings) -> None:
    """Find the K chunks closest to QUERY in the store's active collection (document ID, chunk,
    score, text). The query is embedded as that collection was: same model, dimensions, prefix."""
    from producer.lifecycle import embedder_for
    from shared.store import open_store

    if "://" not in settings.store and not settings.store_path.is_dir():
        raise click.ClickException(f"no store at {settings.store_path}: run `embedpipe run PATH` first")
    store = open_store(settings.store, collection=collection)
    embedder = embedder_for(store, settings).warm_up()
    vector = embedder.embed([store.spec.query_prefix + query])[0]
    hits = store.search(vector, k)
    store.close()
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
@prune_option
@click.option(
    "--inbox",
    "via_inbox",
    is_flag=True,
    help="Push the documents onto the inbox list for the janitor to batch, as any client may: all the "
    "Redis user `producer` is allowed (deploy/redis/users.acl.template).",
)
@settings_options(*REDIS, "batch_docs", "batch_bytes", "max_doc_bytes", "max_backlog_jobs", *JOBS)
@fail_clearly
def enqueue(
    paths: tuple[str, ...],
    exclude: tuple[str, ...],
    progress: bool | None,
    prune: bool,
    via_inbox: bool,
    settings: Settings,
) -> None:
    """Submit PATHS (files, directories, globs, http(s) URLs, - for JSONL on stdin) to the
    distributed pipeline. Local files are sent by content; URLs are fetched by the loaders.
    Unchanged documents are skipped by the chunkers. By default batches and load jobs are written
    directly (the `worker` or `admin` Redis user); --inbox goes through the inbox (`producer`)."""
    from tqdm import tqdm

    from producer.lifecycle import Listed
    from producer.sources import iter_sources, resolve
    from producer.submit import push_to_inbox, submit, submit_prune
    from shared.queues import connect

    if prune and via_inbox:
        raise click.UsageError("--prune deletes documents: it needs the worker or admin user, not --inbox")
    inputs = resolve(list(paths), exclude)
    redis = connect(settings)
    redis.ping()
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(inputs), unit="doc", desc="enqueue", disable=not show) as bar:

        def waiting(backlog: int) -> None:
            bar.set_postfix_str(f"waiting: {backlog} jobs queued > {settings.max_backlog_jobs}")

        items = Listed(iter_sources(inputs, settings.max_doc_bytes))
        send = push_to_inbox if via_inbox else submit
        result = send(redis, settings, items, on_progress=bar.update, on_wait=waiting)
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
        submit_prune(redis, settings, items.ids)
        click.echo(f"prune enqueued: the writers delete every stored document but these {len(items.ids)}")


@main.command()
@click.argument("stage", type=click.Choice(STAGES))
@click.option("--burst", is_flag=True, help="Work until the queue is empty, then exit 0.")
@settings_options(*REDIS, "store", *MODEL, *CHUNKING, *CACHE, *JOBS, *RUNTIME)
@fail_clearly
def worker(stage: str, burst: bool, settings: Settings) -> None:
    """Start one worker of the STAGE pool (run any number of each, in any order). It loads what its
    stage needs once (tokenizer, model or store), then takes jobs from the rq queue STAGE.
    SIGTERM finishes the current job, then exits; SIGUSR1 prints every thread's stack to stderr."""
    from workers.runtime import run_worker

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    run_worker(settings, stage, burst=burst)


@main.command()
@click.option("--burst", is_flag=True, help="Batch the inbox until it is empty, then exit 0.")
@settings_options(*REDIS, "batch_docs", "batch_bytes", "inbox_wait_s", *JOBS, *RUNTIME)
@fail_clearly
def janitor(burst: bool, settings: Settings) -> None:
    """Start the housekeeping process (run exactly one): batches the inbox into load jobs, runs rq's
    scheduler (delayed retries) and recovers jobs of dead workers every few seconds. SIGUSR1 prints
    every thread's stack to stderr."""
    from workers.janitor import Janitor

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    Janitor(settings).run(burst=burst)


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
    from shared.queues import connect

    redis = connect(settings)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    idle_rounds = 0
    while True:  # idle twice in a row, 0.2 s apart: a job between two stages is never missed
        idle_rounds = idle_rounds + 1 if is_idle(distributed_status(redis)) else 0
        if idle_rounds == 2:
            return
        if deadline and time.monotonic() > deadline:
            raise click.ClickException(f"still busy after {timeout_s:g} s")
        time.sleep(0.2)


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
    """Exit 0 when this process's dependencies answer (for container probes), else 1 with the reason.
    The janitor is also unhealthy when its last round with every housekeeping step done is stale."""
    from shared.models import resolve_model_path

    if stage != "embedded":
        from shared.queues import connect

        redis = connect(settings, retries=0)
        redis.ping()  # a probe answers now, it does not wait out an outage
        if stage == "janitor":
            from shared import keys
            from workers.janitor import STALE_TICK_S

            last = redis.get(keys.JANITOR_TICK)
            age = time.time() - float(last) if last is not None else None
            if age is None or age > STALE_TICK_S:
                when = "never" if age is None else f"{age:.0f} s ago"
                raise click.ClickException(
                    f"the janitor's last round with every step done was {when} (see its log: a step fails)"
                )
    if stage in ("chunk", "embed", "embedded"):
        resolve_model_path(settings.model)
    if stage in ("chunk", "write", "embedded"):  # chunkers look up unchanged documents in the store
        from shared.store import open_store

        open_store(settings.store).close()
    click.echo("ok")


# The commands that inspect the pipeline (status, failed, redrive, probe, eval) live in their own module.
from producer import cli_api, cli_collections, cli_distill, cli_inspect  # noqa: E402, F401
