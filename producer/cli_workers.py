"""`embedpipe` commands that run the distributed pipeline's processes: worker, janitor, and health (their
container probe). A process's runtime is imported inside its command, when it runs."""

from __future__ import annotations

import faulthandler
import signal
import time

import click

from producer.cli_options import (
    CACHE,
    CHUNKING,
    JOBS,
    MODEL,
    REDIS,
    RUNTIME,
    SettingsCommand,
    echo_json,
    fail_clearly,
    json_option,
    redis_for,
    settings_options,
)
from shared.settings import STAGES, Settings


@click.command(cls=SettingsCommand)
@click.argument("stage", type=click.Choice(STAGES))
@click.option("--burst", is_flag=True, help="Work until the queue is empty, then exit 0.")
@settings_options(*REDIS, "store", *MODEL, *CHUNKING, *CACHE, "cache_redis_share", "hold_redis_share", *JOBS, *RUNTIME)
@fail_clearly
def worker(stage: str, burst: bool, settings: Settings) -> None:
    """Start one worker of the STAGE pool (run any number of each, in any order). It loads what its
    stage needs once (tokenizer, model or store), then takes jobs from the rq queue STAGE. With several
    models (EMBEDPIPE_MODELS), an embed worker serves the one --model names, from its queue embed@LANE.
    SIGTERM finishes the current job, then exits; SIGUSR1 prints every thread's stack to stderr."""
    from workers.runtime import run_worker

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    run_worker(settings, stage, burst=burst)


@click.command(cls=SettingsCommand)
@click.option("--burst", is_flag=True, help="Batch the inbox until it is empty, then exit 0.")
@settings_options(
    *REDIS,
    "models",
    "batch_docs",
    "batch_bytes",
    "inbox_wait_s",
    "max_backlog_jobs",
    "hold_redis_share",
    *JOBS,
    *RUNTIME,
)
@fail_clearly
def janitor(burst: bool, settings: Settings) -> None:
    """Start the housekeeping process (run exactly one): batches the inbox into load jobs, runs rq's
    scheduler (delayed retries) and recovers jobs of dead workers every few seconds. SIGUSR1 prints
    every thread's stack to stderr."""
    from workers.janitor import Janitor

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    Janitor(settings).run(burst=burst)


@click.command(cls=SettingsCommand)
@click.option(
    "--stage",
    type=click.Choice(["janitor", *STAGES, "embedded"]),
    default="janitor",
    show_default=True,
    help="Which process is probed: all need Redis but embedded; write needs the store; chunk/embed the model.",
)
@json_option
@settings_options(*REDIS, "store", "model", "models")
@fail_clearly
def health(stage: str, as_json: bool, settings: Settings) -> None:
    """Exit 0 when this process's dependencies answer (for container probes), else 1 with the reason.
    The janitor is also unhealthy when its last round with every housekeeping step done is stale."""
    if stage != "embedded":
        redis = redis_for(settings)
        redis.ping()  # a probe answers now, it does not wait out an outage
        if stage == "janitor":
            from workers.janitor import STALE_TICK_S

            last = redis.get(settings.keys.JANITOR_TICK)
            age = time.time() - float(last) if last is not None else None
            if age is None or age > STALE_TICK_S:
                when = "never" if age is None else f"{age:.0f} s ago"
                raise click.ClickException(
                    f"the janitor's last round with every step done was {when} (see its log: a step fails)"
                )
    if stage in ("chunk", "embed", "embedded"):  # the models on disk (an API model has none here)
        from shared.lanes import lanes, own_lane
        from shared.models import is_api_model, resolve_model_path

        served = [own_lane(settings)] if stage == "embed" else lanes(settings)
        for lane in served:
            if not is_api_model(lane.settings.model):
                resolve_model_path(lane.settings.model)
    if stage in ("chunk", "write", "embedded"):  # chunkers look up unchanged documents in the store
        from shared.store import open_store

        open_store(settings.store).close()
    if as_json:
        return echo_json({"ok": True, "stage": stage})
    click.echo("ok")
