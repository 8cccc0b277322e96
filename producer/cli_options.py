"""What every `embedpipe` command shares: one flag per setting (defaulting to its EMBEDPIPE_* variable)
turned into a ready Settings object, the groups of settings each command takes, and one-line errors
instead of tracebacks. Command modules import this, never producer/cli.py (which imports them)."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import click
from redis import Redis
from redis.exceptions import OutOfMemoryError, RedisError
from tqdm import tqdm

from producer import client
from shared.errors import EmbedpipeError
from shared.ledger import Ledger
from shared.queues import connect
from shared.settings import Settings, env_name, redact_url, setting_fields

# A user waits on an interactive command: an unreachable Redis or store is said within this long (workers
# and the janitor keep their patient reconnect with backoff).
INTERACTIVE_TIMEOUT_S = 5
SUBMIT_TIMEOUT_S = 60

FIELDS = {f.name: f for f in setting_fields()}
REDIS = ["redis_url", "namespace"]
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
    "models",
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
    "chunk_template",
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
    "stuck_job_s",
]
RUNTIME = ["metrics_port", "dead_source_ttl_s", "dead_letter_ttl_s", "max_dead_letters", "probe_eval", "support_nice"]

# How --help groups the settings' flags, in this order. API and tuning are folded away (--help-all shows
# them): a first read needs the model, the chunks, the store and Redis. A setting not named is tuning.
HELP_GROUPS = {
    "Model": ["model", "models", "device", "backend", "dimensions", "doc_prefix", "query_prefix", "vector_dtype"],
    "Chunking": ["chunk_tokens", "chunk_overlap", "chunk_template", "id_prefix", "max_doc_bytes", "fetch_allow"],
    "Store": ["store", "probe_eval", "promote_tolerance", "cache_ttl_s", "cache_max_entries"],
    "Redis": ["redis_url"],
    "API": API,
    "Tuning": [],
}
FOLDED = ("API", "Tuning")
GROUP_OF = {name: group for group, names in HELP_GROUPS.items() for name in names}


def _help_all(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        ctx.meta["help_all"] = True
        click.echo(ctx.get_help())
        ctx.exit()


class SettingsCommand(click.Command):
    """A command whose --help lists its own options first, then its settings' flags by group, with the
    API and tuning groups folded away unless --help-all."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["--help-all"],
                is_flag=True,
                expose_value=False,
                is_eager=True,
                callback=_help_all,
                help="Show every setting, the API and tuning ones too, and exit.",
            )
        )

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own: list[tuple[str, str]] = []
        grouped: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None or isinstance(param, click.Argument):  # arguments are in the usage line
                continue
            if param.name in FIELDS:
                grouped.setdefault(GROUP_OF.get(param.name, "Tuning"), []).append(record)
            else:
                own.append(record)
        with formatter.section("Options"):
            formatter.write_dl(own)
        folded = 0
        for group in HELP_GROUPS:
            if not grouped.get(group):
                continue
            if group in FOLDED and not ctx.meta.get("help_all"):
                folded += len(grouped[group])
                continue
            with formatter.section(f"{group} settings"):
                formatter.write_dl(grouped[group])
        if folded:
            formatter.write_paragraph()
            formatter.write_text(f"{folded} more settings ({', '.join(FOLDED)}): --help-all shows them.")


# Every JSON output carries it; raised when a field is renamed or removed (added fields keep it).
SCHEMA_VERSION = 1


def echo_json(data: dict[str, Any]) -> None:
    """One JSON object on one line (NDJSON when repeated), with the schema_version."""
    click.echo(json.dumps({"schema_version": SCHEMA_VERSION, **data}))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (one object with a schema_version).")


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
            if "store" in names:
                check_store(settings, write=False)
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


PIPELINE_COMMAND = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: ", re.DOTALL)


def fail_clearly(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn known errors into one clear line and exit status 1, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except EmbedpipeError as e:
            raise click.ClickException(str(e)) from e
        except RedisError as e:
            settings = kwargs.get("settings")
            where = f" at {settings.redis_url_redacted}" if settings else ""
            message = PIPELINE_COMMAND.sub("", str(e))  # redis-py quotes the command: a document, perhaps
            if isinstance(e, OutOfMemoryError):
                message += " (Redis is full: raise its maxmemory, or let the pipeline drain and try again)"
            raise click.ClickException(f"cannot use Redis{where}: {message}") from e
        except Exception as e:
            settings = kwargs.get("settings")
            if settings is not None and type(e).__module__.split(".")[0] in ("psycopg", "psycopg_pool"):
                raise click.ClickException(f"cannot use the store at {redact_url(settings.store)}: {e}") from e
            raise

    return wrapper


def one_line(error: BaseException) -> str:
    """An unexpected error as one line: its kind and message (`embedpipe --debug` shows the traceback)."""
    if isinstance(error, OSError) and error.strerror:
        message = error.strerror + (f": {error.filename}" if error.filename else "")
    else:
        message = f"{type(error).__name__}: {error}"
    return " ".join(message.split()) + " (--debug shows the traceback)"


def redis_for(settings: Settings, sends_payloads: bool = False) -> Redis:
    """The CLI's Redis client: no retries, and connecting or a reply gives up after INTERACTIVE_TIMEOUT_S
    (no command of the CLI blocks on a read). A command that `sends_payloads` (batches of up to
    batch_bytes) gives each send and reply SUBMIT_TIMEOUT_S: a slow link must not fail a large batch."""
    timeout_s = SUBMIT_TIMEOUT_S if sends_payloads else INTERACTIVE_TIMEOUT_S
    return connect(settings, retries=0, timeout_s=timeout_s, connect_timeout_s=INTERACTIVE_TIMEOUT_S)


def check_store(settings: Settings, write: bool) -> None:
    """Say in one line, before anything touches it, that a local store cannot be used: its path is a
    file, or (`write`) it or the directory it would be made in is read-only."""
    if "://" in settings.store:
        return
    path = settings.store_path
    if path.exists() and not path.is_dir():
        raise click.ClickException(f"the store {path} is a file, not a store directory: name another (--store)")
    if not write:
        return
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise click.ClickException(f"cannot make the store {path}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):  # also false on a read-only file system
        what = f"the store {path} is" if existing == path else f"cannot make the store {path}: {existing} is"
        raise click.ClickException(f"{what} read-only")


exclude_option = click.option(
    "--exclude",
    multiple=True,
    metavar="GLOB",
    help="Skip files whose path (relative to the corpus root) or name matches GLOB (repeatable).",
)


def prune_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--prune (a sync), guarded by EMBEDPIPE_PRUNE_MAX_FRACTION unless --force-prune, within --prune-scope."""
    for option in reversed(
        [
            click.option(
                "--prune",
                is_flag=True,
                help="Sync: afterwards, delete from the store every document that is not among PATHS' documents "
                "(files that disappeared), in every collection. Refused if that is more than "
                "EMBEDPIPE_PRUNE_MAX_FRACTION of a collection's documents and more than 10.",
            ),
            click.option(
                "--force-prune", is_flag=True, help="Prune what the guard of --prune refuses (or an empty listing)."
            ),
            click.option(
                "--prune-scope",
                default="",
                metavar="PREFIX",
                help="Prune only documents whose ID starts with PREFIX (a partial sync: e.g. the --id-prefix).",
            ),
        ]
    ):
        command = option(command)
    return command


def check_prune_flags(prune: bool, force_prune: bool, prune_scope: str) -> None:
    if (force_prune or prune_scope) and not prune:
        raise click.UsageError("--force-prune and --prune-scope go with --prune")


progress_option = click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal)."
)


def document_bar(total: int | None, show: bool, desc: str) -> tqdm:
    """A progress bar over documents; `total` counted up front (None: unknown, it grows as they come)."""
    return tqdm(
        total=total or 0,
        unit="doc",
        desc=desc,
        disable=not show,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} documents "
        "[{elapsed}<{remaining}, {rate_fmt}]",
    )


def use_local(local: bool | None) -> bool:
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


def open_ledger(local: bool, settings: Settings) -> Ledger:
    if local:
        ledger = client.local_ledger(settings)
        if ledger is None:
            raise click.ClickException(
                f"no embedded run at {settings.store_redacted}; set EMBEDPIPE_REDIS_URL for distributed mode"
            )
        return ledger
    return client.ledger_of(redis_for(settings), settings)
