"""The `embedpipe` command line: the group and the commands it registers, explicitly, from their modules
(each a plain module of click commands: importing one registers nothing). Every setting is a flag that
defaults to its EMBEDPIPE_* variable (producer/cli_options.py)."""

from __future__ import annotations

import logging

import click

from producer import cli_api, cli_client, cli_collections, cli_distill, cli_inspect, cli_run, cli_workers


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


COMMANDS = (
    cli_run.run,
    cli_run.search,
    cli_client.enqueue,
    cli_client.status,
    cli_client.failed,
    cli_client.redrive,
    cli_client.wait,
    cli_workers.worker,
    cli_workers.janitor,
    cli_workers.health,
    cli_inspect.probe,
    cli_inspect.evaluate_models,
    cli_collections.collections,
    cli_collections.reembed,
    cli_collections.promote,
    cli_collections.delete,
    cli_api.estimate,
    cli_distill.distill,
)
for command in COMMANDS:
    main.add_command(command)
