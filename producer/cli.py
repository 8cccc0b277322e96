"""The `embedpipe` command line: the group and the commands it registers, explicitly, from their modules
(each a plain module of click commands: importing one registers nothing). Every setting is a flag that
defaults to its EMBEDPIPE_* variable (producer/cli_options.py)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

import click

from producer import cli_api, cli_client, cli_collections, cli_distill, cli_inspect, cli_run, cli_workers
from producer.cli_options import INTERACTIVE_TIMEOUT_S, one_line

PATIENT = ("worker", "janitor")  # processes that wait out an outage; every other command is interactive


class Cli(click.Group):
    """The group that keeps every error to one line on stderr with a non-zero exit: usage errors
    without the usage text, unexpected errors without the traceback (unless --debug)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order COMMANDS registers them, not alphabetical

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as e:
            if ctx.params.get("debug") and e.__cause__ is not None:
                traceback.print_exception(e.__cause__)
            raise
        except (click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(one_line(e)) from e

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as e:
            hint = f" (see `{e.ctx.command_path} --help`)" if isinstance(e, click.UsageError) and e.ctx else ""
            click.echo(f"Error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
    default="WARNING",
    envvar="EMBEDPIPE_LOG_LEVEL",
    show_default=True,
    show_envvar=True,
    help="Logging level (workers and janitor log each job at INFO).",
)
@click.option("--debug", is_flag=True, envvar="EMBEDPIPE_DEBUG", help="Show the traceback of an unexpected error.")
@click.version_option(package_name="embedpipe")
def main(log_level: str, debug: bool) -> None:
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
    if click.get_current_context().invoked_subcommand not in PATIENT:
        os.environ.setdefault("PGCONNECT_TIMEOUT", str(INTERACTIVE_TIMEOUT_S))  # libpq's connect timeout
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# In the order a user meets them: the embedded mode, watching and fixing a run, the distributed mode,
# then the model lifecycle and measuring.
COMMANDS = (
    cli_run.run,
    cli_run.search,
    cli_api.estimate,
    cli_client.status,
    cli_client.failed,
    cli_client.redrive,
    cli_workers.janitor,
    cli_workers.worker,
    cli_client.enqueue,
    cli_client.wait,
    cli_workers.health,
    cli_collections.collections,
    cli_collections.reembed,
    cli_collections.promote,
    cli_collections.delete,
    cli_inspect.probe,
    cli_inspect.evaluate_models,
    cli_distill.distill,
)
for command in COMMANDS:
    main.add_command(command)
