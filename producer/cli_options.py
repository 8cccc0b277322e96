"""What every `embedpipe` command shares: one flag per setting (defaulting to its EMBEDPIPE_* variable)
turned into a ready Settings object, the groups of settings each command takes, and one-line errors
instead of tracebacks. Command modules import this, never producer/cli.py (which imports them)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import click
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from producer import client
from shared.errors import EmbedpipeError
from shared.ledger import Ledger
from shared.settings import Settings, env_name, setting_fields

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
        try:
            return command(*args, **kwargs)
        except EmbedpipeError as e:
            raise click.ClickException(str(e)) from e
        except (RedisConnectionError, ResponseError) as e:
            settings = kwargs.get("settings")
            where = f" at {settings.redis_url_redacted}" if settings else ""
            raise click.ClickException(f"cannot use Redis{where}: {e}") from e

    return wrapper


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
    return client.ledger_of(client.connect(settings), settings)
