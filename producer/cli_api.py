"""`embedpipe estimate`: what embedding PATHS would cost, before anything is spent."""

from __future__ import annotations

import json

import click

from producer.cli_options import exclude_option, fail_clearly, settings_options
from shared.settings import Settings


@click.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@exclude_option
@settings_options("model", "chunk_tokens", "chunk_overlap", "batch_docs", "max_doc_bytes", "doc_prefix", "api_prices")
@fail_clearly
def estimate(paths: tuple[str, ...], as_json: bool, exclude: tuple[str, ...], settings: Settings) -> None:
    """Count the documents, chunks and tokens of PATHS as `run` would cut them, and for an API model
    (openai:NAME) what embedding them costs (EMBEDPIPE_API_PRICES overrides the price table). Reads and
    chunks locally; sends nothing anywhere. An upper bound: a run skips unchanged documents and cached
    chunks."""
    from producer.sources import iter_sources, resolve
    from producer.submit import batched
    from shared.messages import SourceDoc
    from shared.models import is_api_model
    from shared.spec import chunk_policy
    from shared.tokenizer_api import api_model_name
    from shared.tokenizers import load_tokenizer
    from workers.api_protocol import cost_usd, price_table
    from workers.chunk import chunk_batch
    from workers.load import load_batch

    api = is_api_model(settings.model)
    tokenizer = load_tokenizer(settings.model, settings.api_max_input_tokens)
    policy = chunk_policy(settings, tokenizer)
    documents = unreadable = chunks = tokens = 0
    for group in batched(iter_sources(resolve(list(paths), exclude), settings.max_doc_bytes), settings.batch_docs):
        sources = [s.to_dict() for s in group if isinstance(s, SourceDoc)]
        documents += len(group)
        unreadable += len(group) - len(sources)
        docs, dead = load_batch(sources, settings.max_doc_bytes)
        unreadable += len(dead)
        cut = chunk_batch(docs, tokenizer, policy)
        chunks += len(cut)
        if settings.doc_prefix:  # the prefix goes with every chunk, and is billed with it
            tokens += sum(tokenizer.count([settings.doc_prefix + c.text for c in cut]))
        else:
            tokens += sum(c.tokens for c in cut)
    model = api_model_name(settings.model) if api else settings.model
    prices = price_table(settings.api_prices)
    cost = cost_usd(tokens, model, prices) if api else None
    result = {
        "documents": documents,
        "unreadable": unreadable,
        "chunks": chunks,
        "tokens": tokens,
        "model": settings.model,
        "api": api,
        "price_per_million_usd": prices.get(model) if api else None,
        "cost_usd": cost,
    }
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(
        f"{documents} documents ({unreadable} unreadable), {chunks} chunks, {tokens:,} tokens "
        f"(chunks of at most {policy.max_tokens} tokens)"
    )
    if not api:
        click.echo(f"{settings.model}: local model: no API cost")
    elif cost is None:
        click.echo(f"{model}: no price known: set EMBEDPIPE_API_PRICES='{model}=USD_PER_MILLION_TOKENS'")
    else:
        click.echo(f"{model} at ${prices[model]:g} per million tokens: ${cost:.6f}")
