"""What embedding some documents would cost, before anything is spent: `embedpipe estimate PATHS` and
`embedpipe reembed --dry-run` both plan with this. Documents are loaded and chunked exactly as a run
cuts them (the same loader, chunker and policy); the tokens are what the model reads, the document
prefix (EMBEDPIPE_DOC_PREFIX) included, which an API bills. An upper bound: a run skips unchanged
documents and cached chunks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from shared.messages import DeadLetter, SourceDoc, batched_by_size
from shared.models import is_api_model
from shared.settings import Settings
from shared.spec import chunk_policy
from shared.tokenizer_api import api_model_name
from shared.tokenizers import load_tokenizer
from workers.api_protocol import cost_usd, price_table
from workers.chunk import chunk_batch
from workers.load import load_batch


@dataclass
class Estimate:
    documents: int
    unreadable: int  # rejected before loading, or not loadable
    chunks: int
    tokens: int  # what the model reads: each chunk's tokens, with the document prefix
    chunk_tokens: int  # the most tokens of a chunk
    model: str
    api: bool
    price_per_million_usd: float | None  # API models whose price is known
    cost_usd: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def cost_line(self) -> str:
        model = api_model_name(self.model)
        if not self.api:
            return f"{self.model}: local model: no API cost"
        if self.cost_usd is None:
            return f"{model}: no price known: set EMBEDPIPE_API_PRICES='{model}=USD_PER_MILLION_TOKENS'"
        return f"{model} at ${self.price_per_million_usd:g} per million tokens: ${self.cost_usd:.6f}"


def estimate(items: Iterable[SourceDoc | DeadLetter], settings: Settings) -> Estimate:
    tokenizer = load_tokenizer(settings.model, settings.api_max_input_tokens)
    policy = chunk_policy(settings, tokenizer)
    documents = unreadable = chunks = tokens = 0
    for group in batched_by_size(items, settings.batch_docs, settings.batch_bytes):
        sources = [s.to_dict() for s in group if isinstance(s, SourceDoc)]
        docs, dead = load_batch(sources, settings.max_doc_bytes)
        cut = chunk_batch(docs, tokenizer, policy)
        documents += len(group)
        unreadable += len(group) - len(sources) + len(dead)
        chunks += len(cut)
        if settings.doc_prefix:  # the prefix goes with every chunk, and is billed with it
            tokens += sum(tokenizer.count([c.model_text(settings.doc_prefix) for c in cut]))
        else:
            tokens += sum(c.tokens for c in cut)
    api = is_api_model(settings.model)
    prices = price_table(settings.api_prices)
    price = prices.get(api_model_name(settings.model)) if api else None
    cost = cost_usd(tokens, settings.model, prices) if api else None
    return Estimate(documents, unreadable, chunks, tokens, policy.max_tokens, settings.model, api, price, cost)
