"""One rate budget (requests and tokens per minute) for every embedder of an API account.

Rate limits of an embedding API are per account, not per process: all embedder replicas share one
budget in Redis, so four embedders do not quadruple the 429s. Without Redis (the embedded mode) the
same algorithm runs in the process.

The algorithm is GCRA (the generic cell rate algorithm: a token bucket kept as one timestamp per
dimension), for two dimensions at once. Each request reserves 1 request and its N tokens; the
budget answers when it may be sent (now, or after a delay), and moves both dimensions' theoretical
arrival times (TAT) to account for it at that send time, atomically (one Lua script). Reserving
first and sleeping after keeps requests in order: a large request cannot starve behind small ones.

What "never exceed" means here. A dimension with limit L per minute gets a burst capacity C (at
most one second's share, at least 1 request or one largest input) and the rate r = (L - C) / 60 per
second. Every send time s satisfies TAT_after(s) - s <= C / r, so in ANY window of W seconds at
most C + r * W is sent: for W = 60 that is exactly L, and for W = 1 about L/60 + C. (Requests
travel after their send time: a server sees them up to the network's jitter later or earlier.)

A 429 from the server means the account is out of budget whatever we counted (another client uses
it, or the server counts differently): `hold(seconds)` pauses every embedder sharing the budget.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from redis import Redis

from shared import keys
from shared.errors import ConfigError

BURST_S = 1.0  # the burst capacity of each dimension: this many seconds of its budget
STATE_TTL_S = 3600  # an idle budget's state expires (it would be full again by then anyway)


def budget_key(base_url: str, model: str) -> str:
    """Redis hash of one account's budget: fields req_tat, tok_tat, hold (Redis TIME seconds).
    One budget per server and model (OpenAI's limits are per organisation and model)."""
    host = urlsplit(base_url).netloc or "api.openai.com"
    return keys.rate_budget(host, model)


@dataclass(frozen=True)
class Limit:
    """One dimension of the budget: `capacity` units of burst, refilled at `rate` units per second."""

    per_minute: int
    capacity: float
    rate: float

    @classmethod
    def of(cls, per_minute: int, least_capacity: float) -> Limit | None:
        """None: no limit. The capacity is one BURST_S share of the minute, at least
        `least_capacity` (one request, or the largest single input), at most half the minute."""
        if per_minute <= 0:
            return None
        capacity = max(per_minute * BURST_S / 60.0, least_capacity)
        if capacity > per_minute / 2:
            raise ConfigError(
                f"a limit of {per_minute} per minute is too small for units of {least_capacity:g} "
                "(one request, or the largest input): raise the limit or lower EMBEDPIPE_API_MAX_INPUT_TOKENS"
            )
        return cls(per_minute, capacity, (per_minute - capacity) / 60.0)

    def bound(self, window_s: float) -> float:
        """The most this dimension sends in any window of `window_s` seconds."""
        return self.capacity + self.rate * window_s


@dataclass(frozen=True)
class Limits:
    requests: Limit | None
    tokens: Limit | None

    @classmethod
    def from_settings(cls, rpm: int, tpm: int, max_input_tokens: int) -> Limits:
        return cls(Limit.of(rpm, 1.0), Limit.of(tpm, float(max_input_tokens)))

    @property
    def max_request_tokens(self) -> int | None:
        """A request may carry at most the token burst: a larger one could never be sent."""
        return int(self.tokens.capacity) if self.tokens else None

    def args(self) -> list[float]:
        """(interval, tolerance) per dimension in seconds per unit: 0, 0 = unlimited."""
        out: list[float] = []
        for limit in (self.requests, self.tokens):
            out += [1.0 / limit.rate, limit.capacity / limit.rate] if limit else [0.0, 0.0]
        return out


class Budget(Protocol):
    limits: Limits

    def reserve(self, tokens: int) -> float:
        """Reserve one request of `tokens` tokens; returns how many seconds to wait before sending."""
        ...

    def hold(self, seconds: float) -> None:
        """Pause every request sharing this budget for `seconds` (a 429's Retry-After)."""
        ...


def _gcra(
    tats: list[float], hold: float, now: float, needs: list[float], args: list[float]
) -> tuple[float, list[float]]:
    """The send time of a request needing `needs` units per dimension, and the new TATs. The same
    arithmetic as the Lua script below."""
    send = max(now, hold)
    for tat, need, (interval, tolerance) in zip(tats, needs, zip(args[::2], args[1::2], strict=True), strict=True):
        if interval > 0:
            send = max(send, max(tat, now) + need * interval - tolerance)
    new = [
        max(tat, send) + need * interval if interval > 0 else tat
        for tat, need, interval in zip(tats, needs, args[::2], strict=True)
    ]
    return send, new


class LocalBudget:
    """The budget of one process (embedded mode, or no Redis)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._tats = [0.0, 0.0]
        self._hold = 0.0

    def reserve(self, tokens: int) -> float:
        return self.reserve_at(tokens)[0]

    def reserve_at(self, tokens: int) -> tuple[float, float]:
        """(wait in seconds, the send time on this budget's clock)."""
        with self._lock:
            now = self._clock()
            send, self._tats = _gcra(self._tats, self._hold, now, [1.0, float(tokens)], self.limits.args())
            return send - now, send

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._hold = max(self._hold, self._clock() + seconds)


# KEYS[1]: the budget hash. ARGV: tokens, req_interval, req_tolerance, tok_interval, tok_tolerance, ttl.
# Redis' own clock (TIME) orders every embedder's reservations: no clock skew between hosts.
# Returns {wait, send} as strings (Lua numbers would be truncated to integers).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HMGET', KEYS[1], 'req_tat', 'tok_tat', 'hold')
local tats = {tonumber(state[1]) or 0, tonumber(state[2]) or 0}
local needs = {1, tonumber(ARGV[1])}
local send = math.max(now, tonumber(state[3]) or 0)
for i = 1, 2 do
  local interval, tolerance = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if interval > 0 then
    send = math.max(send, math.max(tats[i], now) + needs[i] * interval - tolerance)
  end
end
for i = 1, 2 do
  local interval = tonumber(ARGV[2 * i])
  if interval > 0 then tats[i] = math.max(tats[i], send) + needs[i] * interval end
end
redis.call('HSET', KEYS[1], 'req_tat', string.format('%.6f', tats[1]), 'tok_tat', string.format('%.6f', tats[2]))
redis.call('EXPIRE', KEYS[1], ARGV[6])
return {string.format('%.6f', send - now), string.format('%.6f', send)}
"""

_HOLD = """
local t = redis.call('TIME')
local until_s = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
local hold = tonumber(redis.call('HGET', KEYS[1], 'hold')) or 0
if until_s > hold then redis.call('HSET', KEYS[1], 'hold', string.format('%.6f', until_s)) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class RedisBudget:
    """The budget shared by every embedder using the same Redis, server and model."""

    def __init__(self, redis: Redis, key: str, limits: Limits) -> None:
        self.limits = limits
        self.key = key
        self._reserve = redis.register_script(_RESERVE)
        self._hold = redis.register_script(_HOLD)

    def reserve(self, tokens: int) -> float:
        return self.reserve_at(tokens)[0]

    def reserve_at(self, tokens: int) -> tuple[float, float]:
        """(wait in seconds, the send time in Redis TIME seconds)."""
        wait, send = self._reserve(keys=[self.key], args=[tokens, *self.limits.args(), STATE_TTL_S])
        return float(wait), float(send)

    def hold(self, seconds: float) -> None:
        self._hold(keys=[self.key], args=[seconds, max(STATE_TTL_S, math.ceil(seconds) + 60)])


def make_budget(redis: Redis | None, base_url: str, model: str, limits: Limits) -> LocalBudget | RedisBudget:
    """Shared through Redis when there is one, else this process's own."""
    if redis is None:
        return LocalBudget(limits)
    return RedisBudget(redis, budget_key(base_url, model), limits)
