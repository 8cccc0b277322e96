"""`embedpipe estimate`: what embedding PATHS would cost, before anything is spent (producer/estimate.py)."""

from __future__ import annotations

import json

import click

from producer.cli_options import exclude_option, fail_clearly, settings_options
from producer.sources import iter_sources, resolve
from shared.settings import Settings


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@exclude_option
@settings_options(
    "model",
    "id_prefix",
    "chunk_tokens",
    "chunk_overlap",
    "chunk_template",
    "batch_docs",
    "batch_bytes",
    "max_doc_bytes",
    "doc_prefix",
    "api_prices",
)
@fail_clearly
def estimate(paths: tuple[str, ...], as_json: bool, exclude: tuple[str, ...], settings: Settings) -> None:
    """Count the documents, chunks and tokens of PATHS as `run` would cut them, and for an API model
    (openai:NAME) what embedding them costs (EMBEDPIPE_API_PRICES overrides the price table). Reads and
    chunks locally; sends nothing anywhere. An upper bound: a run skips unchanged documents and cached
    chunks."""
    from producer.estimate import estimate as plan_cost  # the loader and chunker: numpy, the tokenizer

    result = plan_cost(
        iter_sources(resolve(list(paths), exclude, settings.id_prefix), settings.max_doc_bytes), settings
    )
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(
        f"{result.documents} documents ({result.unreadable} unreadable), {result.chunks} chunks, "
        f"{result.tokens:,} tokens (chunks of at most {result.chunk_tokens} tokens)"
    )
    click.echo(result.cost_line())
