"""Stateless parts of the OpenAI embeddings protocol: prices, packing requests within the API's
limits, reading a response's embeddings and usage, and how long a 429 asks us to wait. Used by
workers/embed_api.py and `estimate`."""

from __future__ import annotations

import base64
import email.utils
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.errors import ConfigError
from shared.settings import env_name
from shared.tokenizer_api import api_model_name

PRICES_PER_MILLION = {"text-embedding-3-small": 0.02, "text-embedding-3-large": 0.13, "text-embedding-ada-002": 0.10}
MIN_SPLIT_INPUTS = 64  # a part that fits fewer requests than api_concurrency is spread over more, not below this


def price_table(spec: str = "") -> dict[str, float]:
    """The default prices, overridden by `spec` ('model=0.02,other=0.1', USD per million tokens)."""
    prices = dict(PRICES_PER_MILLION)
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            prices[api_model_name(name.strip())] = float(value)
        except ValueError as e:
            raise ConfigError(f"{env_name('api_prices')}: {item!r} is not MODEL=USD_PER_MILLION_TOKENS") from e
    return prices


def cost_usd(tokens: int, model: str, prices: dict[str, float]) -> float | None:
    """What `tokens` tokens of `model` cost; None when the price is unknown."""
    price = prices.get(api_model_name(model))
    return None if price is None else tokens * price / 1e6


def plan_requests(
    rows: Sequence[int], tokens: Sequence[int], max_inputs: int, max_tokens: int, concurrency: int
) -> list[list[int]]:
    """Requests within the API's limits; when they are fewer than `concurrency`, a large part is spread
    over up to `concurrency` requests of at least MIN_SPLIT_INPUTS inputs, so they run side by side."""
    requests = pack_requests(rows, tokens, max_inputs, max_tokens)
    wanted = min(concurrency, len(rows) // MIN_SPLIT_INPUTS)
    if len(requests) < wanted:
        requests = pack_requests(rows, tokens, math.ceil(len(rows) / wanted), max_tokens)
    return requests


def pack_requests(rows: Sequence[int], tokens: Sequence[int], max_inputs: int, max_tokens: int) -> list[list[int]]:
    """Cut `rows` (in order) into requests of at most max_inputs inputs and max_tokens tokens."""
    requests: list[list[int]] = []
    current: list[int] = []
    total = 0
    for row in rows:
        if current and (len(current) >= max_inputs or total + tokens[row] > max_tokens):
            requests.append(current)
            current, total = [], 0
        current.append(row)
        total += tokens[row]
    if current:
        requests.append(current)
    return requests


def billed_tokens(doc: Any) -> int | None:
    """The tokens a response says were billed (usage.prompt_tokens, else total_tokens); None if it says
    nothing usable."""
    usage = doc.get("usage") if isinstance(doc, dict) else None
    billed = usage.get("prompt_tokens", usage.get("total_tokens")) if isinstance(usage, dict) else None
    return billed if isinstance(billed, int) and not isinstance(billed, bool) and billed >= 0 else None


def embeddings_in(doc: Any, count: int) -> list[np.ndarray]:
    """The `count` embeddings of a response, in input order: a 'data' list with one item per input, each
    index once, each embedding finite and non-zero (float64). ValueError says what is wrong."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise ValueError("no 'data' list")
    if len(data) != count:
        raise ValueError(f"{len(data)} embeddings for {count} inputs")
    rows: list[Any] = [None] * count
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or rows[index] is not None:
            raise ValueError(f"bad or repeated index {index!r}")
        rows[index] = embedding_vector(item.get("embedding"))
    return rows


def embedding_vector(embedding: Any) -> np.ndarray:
    """One embedding: a list of numbers or base64 of little-endian float32, finite and non-zero.
    ValueError (binascii.Error is one) says what is wrong."""
    if isinstance(embedding, str):
        raw = base64.b64decode(embedding, validate=True)
        if len(raw) % 4:
            raise ValueError("base64 payload is not float32")
        vector = np.frombuffer(raw, dtype="<f4").astype(np.float64)
    elif isinstance(embedding, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in embedding):
        vector = np.asarray(embedding, dtype=np.float64)
    else:
        raise ValueError(f"an embedding must be a list of numbers or base64, got {type(embedding).__name__}")
    if not len(vector) or not np.all(np.isfinite(vector)) or not np.any(vector):
        raise ValueError("an embedding is empty, zero, NaN or infinite")
    return vector


MAX_RETRY_AFTER_S = 3600.0  # a server asking for longer (inf, 1e12) is asking for an hour: then we ask again


def retry_after_s(headers: Any) -> float | None:
    """How long a 429 asks us to wait, at most MAX_RETRY_AFTER_S: retry-after-ms, retry-after (seconds or
    an HTTP date), or the later of x-ratelimit-reset-requests/-tokens ('1s', '6m0s', '250ms'). None when
    none is given."""
    asked = _asked_s(headers)
    if asked is None:
        return None
    return min(asked, MAX_RETRY_AFTER_S) if math.isfinite(asked) else MAX_RETRY_AFTER_S


def _asked_s(headers: Any) -> float | None:
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            if not math.isnan(asked := float(value) / 1000):  # NaN says nothing
                return max(0.0, asked)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        try:
            if not math.isnan(asked := float(value)):
                return max(0.0, asked)
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    resets = [duration_s(headers.get(f"x-ratelimit-reset-{kind}")) for kind in ("requests", "tokens")]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def duration_s(value: str | None) -> float | None:
    """OpenAI's reset durations: '1s', '6m0s', '59.432s', '120ms', '1h2m3s'."""
    if not value:
        return None
    parts = _DURATION.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = sum(float(n) * scale[u] for n, u in parts)
    return total if math.isfinite(total) else None
