"""Embed stage for API models: `EMBEDPIPE_MODEL=openai:NAME` through OpenAI's embeddings API or any
OpenAI-compatible server (`EMBEDPIPE_OPENAI_BASE_URL`: TEI, Infinity, vLLM, Ollama, LiteLLM...).

- Inputs over `api_max_input_tokens` (tiktoken's count) never reach the API: they fail as chunks.
- Requests are packed in order up to `api_max_inputs` inputs and `api_max_request_tokens` tokens (and
  the rate budget's token burst), sent concurrently under `api_concurrency` per process; results are
  put back in input order by each item's `index`.
- Every response is validated (JSON, one embedding per input, each index once, the dimension,
  finite non-zero numbers): a malformed one is a retryable error.
- The rate budget (RPM, TPM) is shared by all embedders through Redis (shared/ratelimit.py). A 429
  honours Retry-After (or retry-after-ms, or x-ratelimit-reset-*), pauses the whole shared budget
  and retries the same request (batching goes on). Timeouts, connection errors, 408/409/425 and 5xx
  retry with tenacity: exponential backoff with jitter and a cap, within `api_deadline_s`.
- A 400/413/422 about inputs is bisected down to single inputs: those inputs fail (their documents
  become dead letters with the API's message), the others are embedded. 401/403/404, or a 400 about
  another parameter, fail the whole job: retrying cannot fix them.
- `dimensions` is passed to models that accept it (names starting with DIMENSIONS_PARAM_PREFIXES:
  text-embedding-3-*); for any other model (other servers often reject or ignore it) vectors are cut
  to `dimensions` here and re-normalised, as the local embedder does.
- Tokens billed (the response's usage) and their cost (PRICES_PER_MILLION in workers/api_protocol.py, overridden by
  `api_prices`) are counted per model in Prometheus metrics.

The API key comes from the settings (environment or file) and appears in no log, error or metric.
The rq worker calls this synchronously: each call runs its own event loop (`asyncio.run`) with a
client opened and closed inside it, so nothing outlives the call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from redis import Redis
from tenacity import AsyncRetrying, retry_if_exception_type, stop_before_delay

from shared.errors import ConfigError, EmbedFailures, PermanentError, RateLimited, RetryableError
from shared.messages import Chunk
from shared.metrics import (
    API_COST,
    API_QUOTA_EXHAUSTED,
    API_RATE_WAIT,
    API_REQUEST_SECONDS,
    API_REQUESTS,
    API_TOKENS,
    RETRIES,
)
from shared.ratelimit import Limits, LocalBudget, RedisBudget, make_budget
from shared.settings import Settings, env_name
from shared.tokenizer_api import ApiTokenizer, api_model_name
from workers.api_protocol import (
    billed_tokens,
    cost_usd,
    duration_s,
    embeddings_in,
    plan_requests,
    price_table,
    retry_after_s,
)

log = logging.getLogger(__name__)

STAGE = "embed"
OPENAI_BASE_URL = "https://api.openai.com/v1"

# USD per million tokens (OpenAI's list prices); EMBEDPIPE_API_PRICES overrides or adds models.
# Full dimension of models we know; others learn it from their first response.
KNOWN_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
# Models that take the `dimensions` parameter (Matryoshka on the server); others are cut here.
DIMENSIONS_PARAM_PREFIXES = ("text-embedding-3",)
RETRYABLE_STATUS = {408, 409, 425}  # and every 5xx
INPUT_STATUS = {400, 413, 422}  # refused inputs: bisect down to the input(s) concerned
MESSAGE_CHARS = 500
QUOTA_PAUSE_S = 600.0  # an exhausted account: every embedder pauses this long, then tries again (and alerts)


class ApiRetryable(RetryableError):
    """One attempt failed in a way another attempt may not (timeouts, 5xx, 429, malformed responses)."""

    def __init__(self, message: str, outcome: str = "retried", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome  # the API_REQUESTS label: retried or rate_limited
        self.retry_after = retry_after


class InputRejected(PermanentError):
    """The API refused the inputs of a request (400/413/422): bisect to find which."""


@dataclass
class Usage:
    """What this embedder spent, for its log lines and tests (Prometheus has the same per model)."""

    requests: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    retries: int = 0
    rate_limited: int = 0
    failed_inputs: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


class ApiEmbedder:
    """The embedder of `openai:NAME` models (the Embedder protocol of shared/embedding.py)."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis | None = None,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.model_name = settings.model
        self.api_model = api_model_name(settings.model)
        self.batch_size = settings.api_max_inputs
        self.base_url = settings.openai_base_url or OPENAI_BASE_URL
        self.host = urlsplit(self.base_url).netloc or self.base_url
        self.dimensions = settings.dimensions  # > 0: vectors of this many dimensions
        self.send_dimensions = self.dimensions > 0 and self.api_model.startswith(DIMENSIONS_PARAM_PREFIXES)
        self.prices = price_table(settings.api_prices)
        self.usage = Usage()
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self._redis = redis
        self._tokenizer: ApiTokenizer | None = None
        self._budget: LocalBudget | RedisBudget | None = None
        self._native = 0  # the dimension the server returns
        self.dimension = 0
        self._unpriced_warned = False

    @property
    def ready(self) -> bool:
        return self._tokenizer is not None

    def warm_up(self) -> ApiEmbedder:
        """Check the configuration and load the tokenizer (idempotent; no network)."""
        if self.ready:
            return self
        s = self.settings
        if not s.openai_api_key and not s.openai_base_url:
            raise ConfigError(
                f"{self.model_name} needs an API key: set EMBEDPIPE_OPENAI_API_KEY or EMBEDPIPE_OPENAI_API_KEY_FILE "
                "(or OPENAI_API_KEY / OPENAI_API_KEY_FILE), or EMBEDPIPE_OPENAI_BASE_URL for a server without keys"
            )
        for name in ("api_concurrency", "api_max_inputs", "api_max_input_tokens", "api_max_request_tokens"):
            if getattr(s, name) <= 0:
                raise ConfigError(f"{env_name(name)} must be positive, got {getattr(s, name)}")
        if s.api_timeout_s <= 0 or s.api_deadline_s <= 0:
            raise ConfigError(f"{env_name('api_timeout_s')} and {env_name('api_deadline_s')} must be positive")
        import openai  # noqa: F401 (fail now, not at the first job, if it is missing)

        limits = Limits.from_settings(s.api_rpm, s.api_tpm, s.api_max_input_tokens)
        self._max_request_tokens = min(s.api_max_request_tokens, limits.max_request_tokens or s.api_max_request_tokens)
        if self._max_request_tokens < s.api_max_input_tokens:
            raise ConfigError(
                f"{env_name('api_max_request_tokens')} ({self._max_request_tokens}) must be at least "
                f"{env_name('api_max_input_tokens')} ({s.api_max_input_tokens})"
            )
        self._budget = make_budget(self._redis, self.base_url, self.api_model, limits)
        self._native = self.dimensions if self.send_dimensions else KNOWN_DIMENSIONS.get(self.api_model, 0)
        self._set_dimension()
        self._tokenizer = ApiTokenizer(self.model_name, s.api_max_input_tokens)
        if not logging.getLogger().isEnabledFor(logging.DEBUG):  # one line per request is DEBUG, not INFO
            for name in ("httpx", "httpx2"):
                if logging.getLogger(name).level == logging.NOTSET:
                    logging.getLogger(name).setLevel(logging.WARNING)
        for outcome in ("ok", "rate_limited", "retried", "failed"):
            API_REQUESTS.labels(self.api_model, outcome)
        API_TOKENS.labels(self.api_model)
        API_COST.labels(self.api_model)
        API_RATE_WAIT.labels(self.api_model)
        log.info(
            "API model %s at %s: %s dimensions, up to %d inputs and %d tokens per request, %d concurrent, "
            "rpm %s, tpm %s",
            self.api_model,
            self.host,
            self.dimension or "unknown",
            s.api_max_inputs,
            self._max_request_tokens,
            s.api_concurrency,
            s.api_rpm or "unlimited",
            s.api_tpm or "unlimited",
        )
        return self

    # --- the embedder interface --------------------------------------------------------------

    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 rows, one per text (queries); a text the API refuses raises."""
        vectors, failed = self._embed_texts(texts)
        if failed:
            row, message = min(failed.items())
            raise PermanentError(f"text {row} cannot be embedded: {message}")
        return vectors

    def embed_chunks(self, chunks: list[Chunk], prefix: str = "") -> np.ndarray:
        """One row per chunk (of prefix + its text: the API reads text), in order. Chunks that fail for
        good raise EmbedFailures, which carries the vectors of all the others."""
        vectors, failed = self._embed_texts([c.model_text(prefix) for c in chunks])
        if failed:
            raise EmbedFailures(vectors, failed)
        return vectors

    # --- inside ------------------------------------------------------------------------------

    def _embed_texts(self, texts: list[str]) -> tuple[np.ndarray, dict[int, str]]:
        if self._tokenizer is None:
            raise RuntimeError("ApiEmbedder used before warm_up()")
        limit = self.settings.api_max_input_tokens
        tokens = self._tokenizer.count(texts)
        failed: dict[int, str] = {}
        rows = []
        for row, (text, count) in enumerate(zip(texts, tokens, strict=True)):
            if not text:
                failed[row] = "empty text: the embeddings API refuses empty inputs"
            elif count > limit:
                failed[row] = (
                    f"{count} tokens, over the limit of {limit} per input ({env_name('api_max_input_tokens')}); "
                    "not sent to the API"
                )
            else:
                rows.append(row)
        s = self.settings
        requests = plan_requests(rows, tokens, s.api_max_inputs, self._max_request_tokens, s.api_concurrency)
        started = time.perf_counter()
        before = (self.usage.requests, self.usage.tokens, self.usage.cost_usd, self.usage.retries)
        found: dict[int, np.ndarray] = {}
        if requests:
            try:
                found, refused = asyncio.run(self._embed_requests(texts, tokens, requests))
            except RateLimited as e:  # the rows that did come back, as vectors in their places
                came_back = e.vectors if isinstance(e.vectors, dict) else {}
                if not self.dimension and came_back:
                    self.dimension = len(next(iter(came_back.values())))
                vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
                for row, vector in came_back.items():
                    vectors[row] = vector
                e.vectors = vectors
                raise
            failed.update(refused)
        self.usage.failed_inputs += len(failed)
        if not self.dimension:  # nothing came back to learn it from: ask with one tiny input
            self._learn_dimension()
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, vector in found.items():
            vectors[row] = vector
        log.info(
            "%s: %d texts in %d requests (+%d retries), %d tokens, $%.6f, %d failed, %.2f s",
            self.api_model,
            len(texts),
            self.usage.requests - before[0],
            self.usage.retries - before[3],
            self.usage.tokens - before[1],
            self.usage.cost_usd - before[2],
            len(failed),
            time.perf_counter() - started,
        )
        return vectors, failed

    def _learn_dimension(self) -> None:
        assert self._tokenizer is not None
        probe = ["dimension probe"]
        found, _ = asyncio.run(self._embed_requests(probe, self._tokenizer.count(probe), [[0]]))
        if not found:
            raise PermanentError(f"the API at {self.host} returned no embedding for a probe input")

    async def _embed_requests(
        self, texts: list[str], tokens: list[int], requests: list[list[int]]
    ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        from openai import AsyncOpenAI

        semaphore = asyncio.Semaphore(self.settings.api_concurrency)
        async with AsyncOpenAI(
            api_key=self.settings.openai_api_key or "none",  # a local server may want no key
            base_url=self.base_url,
            timeout=self.settings.api_timeout_s,
            max_retries=0,  # retries are ours (tenacity), with the shared budget
        ) as client:
            tasks = [
                asyncio.ensure_future(self._embed_rows(client, semaphore, texts, tokens, rows)) for rows in requests
            ]
            try:
                results = await asyncio.gather(*tasks, return_exceptions=True)
            except BaseException:  # cancelled from outside
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        found: dict[int, np.ndarray] = {}
        failed: dict[int, str] = {}
        for result in results:
            if not isinstance(result, BaseException):
                found.update(result[0])
                failed.update(result[1])
        errors = [r for r in results if isinstance(r, BaseException)]
        fatal = [e for e in errors if not isinstance(e, RateLimited)]
        if fatal:
            raise fatal[0]
        limits = [e for e in errors if isinstance(e, RateLimited)]
        if limits:  # rate limited only: keep what came back, come back later for the rest
            limited = max(limits, key=lambda e: e.retry_in_s)
            raise RateLimited(str(limited), limited.retry_in_s, limited.quota, found, found)
        if found:
            API_QUOTA_EXHAUSTED.labels(self.api_model).set(0)
        return found, failed

    async def _embed_rows(
        self, client: Any, semaphore: asyncio.Semaphore, texts: list[str], tokens: list[int], rows: list[int]
    ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Embed one request's rows; when the API refuses its inputs, bisect down to the culprits."""
        try:
            vectors = await self._request(client, semaphore, [texts[r] for r in rows], sum(tokens[r] for r in rows))
            return dict(zip(rows, vectors, strict=True)), {}
        except InputRejected as e:
            if len(rows) == 1:
                return {}, {rows[0]: str(e)}
        half = len(rows) // 2
        (ok_a, bad_a), (ok_b, bad_b) = await asyncio.gather(
            self._embed_rows(client, semaphore, texts, tokens, rows[:half]),
            self._embed_rows(client, semaphore, texts, tokens, rows[half:]),
        )
        return ok_a | ok_b, bad_a | bad_b

    async def _request(
        self, client: Any, semaphore: asyncio.Semaphore, inputs: list[str], tokens: int
    ) -> list[np.ndarray]:
        """One request, retried until it succeeds, fails for good or runs past the deadline."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(ApiRetryable),
            wait=self._wait,
            stop=stop_before_delay(self.settings.api_deadline_s),
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(client, semaphore, inputs, tokens)
        except ApiRetryable as e:
            if e.outcome != "rate_limited":
                raise
            # still rate limited at the deadline: the job is rescheduled, its retries unspent
            raise RateLimited(
                f"{e}; still so after {self.settings.api_deadline_s:g} s", e.retry_after or 60.0
            ) from None
        raise AssertionError("unreachable: tenacity returns or raises")

    def _wait(self, state: Any) -> float:
        """A 429's Retry-After (plus up to 10% jitter), else exponential backoff with jitter, capped."""
        error = state.outcome.exception()
        if isinstance(error, ApiRetryable) and error.retry_after is not None:
            return error.retry_after * (1 + 0.1 * random.random())
        exponential = self.backoff_initial_s * 2 ** (state.attempt_number - 1)
        return min(self.backoff_max_s, exponential + random.uniform(0, self.backoff_initial_s))

    def _before_retry(self, state: Any) -> None:
        error = state.outcome.exception()
        seconds = state.upcoming_sleep
        self.usage.retries += 1
        RETRIES.labels(STAGE, "io").inc()
        if isinstance(error, ApiRetryable) and error.outcome == "rate_limited":
            API_RATE_WAIT.labels(self.api_model).inc(seconds)
        log.warning("%s: %s; retry %d in %.1f s", self.api_model, error, state.attempt_number, seconds)

    async def _attempt(self, client: Any, semaphore: asyncio.Semaphore, inputs: list[str], tokens: int) -> list[Any]:
        import openai

        extra: dict[str, Any] = {"dimensions": self.dimensions} if self.send_dimensions else {}
        async with semaphore:
            wait = await asyncio.to_thread(self._budget.reserve, tokens)
            if wait > self.settings.api_deadline_s:  # a long 429 hold, or a deep backlog: the job comes back later
                raise RateLimited(
                    f"the rate budget of {self.api_model} at {self.host} has no room for {wait:.0f} s, more than "
                    f"{env_name('api_deadline_s')}",
                    wait,
                )
            if wait > 0:
                API_RATE_WAIT.labels(self.api_model).inc(wait)
                await asyncio.sleep(wait)
            started = time.perf_counter()
            problem: BaseException | None = None
            try:
                raw = await client.embeddings.with_raw_response.create(
                    input=inputs, model=self.api_model, encoding_format="base64", **extra
                )
            except openai.APIStatusError as e:
                problem = self._status_error(
                    e.status_code, e.response.headers, e.message, e.param, getattr(e, "code", None)
                )
            except openai.APIConnectionError as e:  # timeouts included
                problem = ApiRetryable(f"{type(e).__name__} talking to {self.host}: {self._redact(str(e))}")
            finally:
                API_REQUEST_SECONDS.labels(self.api_model).observe(time.perf_counter() - started)
        # Raised outside the except blocks: the openai exception (its text may quote the key) is not chained.
        if problem is None:
            try:
                vectors = self._parse(raw.http_response.content, len(inputs), tokens)
            except ApiRetryable as e:
                problem = e
        if problem is not None:
            outcome = problem.outcome if isinstance(problem, ApiRetryable) else "failed"
            API_REQUESTS.labels(self.api_model, outcome).inc()
            if outcome == "rate_limited":
                self.usage.rate_limited += 1
            raise problem
        API_REQUESTS.labels(self.api_model, "ok").inc()
        self.usage.requests += 1
        self._note_headers(raw.http_response.headers)
        return vectors

    def _status_error(
        self, status: int, headers: Any, message: str, param: str | None, code: str | None = None
    ) -> BaseException:
        key = str(status)
        self.usage.statuses[key] = self.usage.statuses.get(key, 0) + 1
        text = self._redact(message)[:MESSAGE_CHARS]
        if status == 429 and code == "insufficient_quota":  # not a rate limit: waiting seconds will not help
            self._budget.hold(QUOTA_PAUSE_S)  # every embedder pauses: no hammering an exhausted account
            API_QUOTA_EXHAUSTED.labels(self.api_model).set(1)
            return RateLimited(
                f"the account behind {self.host} has no quota left for {self.api_model} (429 insufficient_quota): "
                f"{text}; paused {QUOTA_PAUSE_S:.0f} s, then tried again",
                QUOTA_PAUSE_S,
                quota=True,
            )
        if status == 429:
            retry_after = retry_after_s(headers)
            if retry_after is not None:
                self._budget.hold(retry_after)  # every embedder sharing the budget pauses
            return ApiRetryable(f"rate limited by {self.host} (429): {text}", "rate_limited", retry_after)
        if status >= 500 or status in RETRYABLE_STATUS:
            return ApiRetryable(f"{self.host} answered {status}: {text}")
        if status == 401:
            return ConfigError(
                f"the embeddings API at {self.host} refused the API key (401): check EMBEDPIPE_OPENAI_API_KEY "
                "or EMBEDPIPE_OPENAI_API_KEY_FILE"
            )
        if status in INPUT_STATUS and param in (None, "input"):
            return InputRejected(f"the API refused this input ({status}): {text}")
        return ConfigError(f"the embeddings API at {self.host} refused {self.api_model} ({status}): {text}")

    def _parse(self, body: bytes, count: int, sent_tokens: int) -> list[np.ndarray]:
        """Bill and validate a response. The tokens billed are the response's usage, even when the
        rest of it is unusable (the API charged them), else our own count of a good response."""
        try:
            doc = json.loads(body)
        except ValueError as e:
            raise ApiRetryable(f"malformed response from {self.host}: not JSON ({e})") from None
        billed = billed_tokens(doc)
        try:
            vectors = self._validate(doc, count)
        except ApiRetryable:
            if billed is not None:
                self._bill(billed)
            raise
        self._bill(sent_tokens if billed is None else billed)
        return vectors

    def _validate(self, doc: Any, count: int) -> list[np.ndarray]:
        """One embedding per input, of one dimension (see embeddings_in). Returns unit vectors, cut to
        `dimensions` when the server was not asked to."""
        try:
            rows = embeddings_in(doc, count)
        except ValueError as e:
            raise ApiRetryable(f"malformed response from {self.host}: {e}") from None
        dims = sorted({len(r) for r in rows})
        native = self._native or dims[0]  # the first response of an unknown model sets it
        if dims != [native]:
            raise ApiRetryable(
                f"malformed response from {self.host}: embeddings of {dims} dimensions, expected {native}"
            )
        if not self._native:
            self._native = native
            self._set_dimension()
            log.info("%s returns %d dimensions", self.api_model, native)
        matrix = np.vstack(rows)
        if self.dimension < matrix.shape[1]:
            matrix = matrix[:, : self.dimension]
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        return list(matrix.astype(np.float32))

    def _set_dimension(self) -> None:
        self.dimension = min(self.dimensions, self._native) if self.dimensions else self._native

    def _note_headers(self, headers: Any) -> None:
        """The server says the account's budget is spent: hold until it resets."""
        waits = [
            duration_s(headers.get(f"x-ratelimit-reset-{kind}"))
            for kind in ("requests", "tokens")
            if headers.get(f"x-ratelimit-remaining-{kind}") == "0"
        ]
        waits = [w for w in waits if w]
        if waits:
            self._budget.hold(max(waits))

    def _bill(self, tokens: int) -> None:
        self.usage.tokens += tokens
        API_TOKENS.labels(self.api_model).inc(tokens)
        cost = cost_usd(tokens, self.api_model, self.prices)
        if cost is None:
            if not self._unpriced_warned:  # a warning for OpenAI; a server of one's own may well be free
                self._unpriced_warned = True
                level = logging.INFO if self.settings.openai_base_url else logging.WARNING
                log.log(
                    level, "no price known for %s: set %s to count its cost", self.api_model, env_name("api_prices")
                )
            return
        self.usage.cost_usd += cost
        API_COST.labels(self.api_model).inc(cost)

    def _redact(self, text: str) -> str:
        """A message from the server or the client, without the API key or anything shaped like one."""
        key = self.settings.openai_api_key
        if key:  # as a whole token: a short key must not mangle the words it happens to be in
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", "***", text)
        return re.sub(r"\bsk-[A-Za-z0-9_\-*]{4,}", "sk-***", text)
