"""The inbox: a Redis list any client pushes documents to, taken by the janitor in load batches.

Taking is atomic and safe with several janitors and with clients that push to either end: one Lua
script moves a batch from the inbox's head to a list of the janitor's own (`keys.inbox_taken`), bounded
by count and by bytes (64 inline documents of 2 MB must not be one 128 MB batch in a 256 MB janitor).
The janitor then enqueues the batch and deletes its list in one transaction, which fails (WatchError)
if another janitor took the list back meanwhile. A janitor that dies holding a batch leaves its list
behind; the next round of any janitor whose owner's liveness key has expired puts it back at the head
of the inbox. Nothing is lost, nothing is enqueued twice.

Every message is decoded on its own: whatever it raises (a lone surrogate, JSON nested 2,000 deep, a
1 MB ID) makes it a `decode_error` dead letter with an ID that can be stored and printed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from redis import Redis
from redis.exceptions import WatchError

from shared.errors import DecodeError
from shared.ledger import RedisLedger
from shared.messages import DeadLetter, SourceDoc, decode_inbox_message, safe_id
from shared.queues import enqueue_batch
from shared.settings import Settings

log = logging.getLogger(__name__)

KEEP_RAW_BYTES = 4096  # of an undecodable message, kept in its dead letter
ALIVE_TTL_S = 30  # a janitor that has not refreshed its liveness key this long is dead: its batch goes back

# KEYS: inbox, taken list, takers set; ARGV: janitor id, most messages, most bytes, flush (0/1).
# Takes the longest run from the head that fits both bounds (at least one message), but only a full
# batch unless flushing; returns the messages taken.
_TAKE = """
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local budget, bytes, taken, full = tonumber(ARGV[3]), 0, 0, #items == tonumber(ARGV[2])
for i, m in ipairs(items) do
  if taken > 0 and bytes + #m > budget then full = true break end
  bytes, taken = bytes + #m, i
end
if taken == 0 or (not full and ARGV[4] ~= '1') then return {} end
redis.call('LTRIM', KEYS[1], taken, -1)
for i = 1, taken do redis.call('RPUSH', KEYS[2], items[i]) end
redis.call('SADD', KEYS[3], ARGV[1])
local out = {}
for i = 1, taken do out[i] = items[i] end
return out
"""

# KEYS: inbox, taken list, takers set; ARGV: the dead janitor's id. Its messages go back to the head of
# the inbox, in their order.
_RETURN = """
local items = redis.call('LRANGE', KEYS[2], 0, -1)
for i = #items, 1, -1 do redis.call('LPUSH', KEYS[1], items[i]) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return #items
"""


class Inbox:
    """One janitor's hold on the inbox."""

    def __init__(self, redis: Redis, settings: Settings, ledger: RedisLedger, janitor_id: str) -> None:
        self.redis, self.settings, self.ledger, self.id = redis, settings, ledger, janitor_id
        self.keys = settings.keys
        self.taken_key = self.keys.inbox_taken(janitor_id)
        self._take = redis.register_script(_TAKE)
        self._return = redis.register_script(_RETURN)

    def keep_alive(self) -> None:
        self.redis.set(self.keys.janitor_alive(self.id), 1, ex=ALIVE_TTL_S)

    def drain(self, flush: bool) -> int:
        """Move up to one batch of inbox messages into a load job; return how many were taken.
        Without `flush`, a batch that is not yet full (in count or bytes) waits for more messages."""
        return self.commit(self.take(flush))

    def take(self, flush: bool) -> list[bytes]:
        """Move a batch from the inbox to this janitor's own list (atomic); the messages."""
        s = self.settings
        bounds = [self.id, s.batch_docs, s.batch_bytes, int(flush)]
        return self._take([self.keys.INBOX, self.taken_key, self.keys.INBOX_TAKERS], bounds)

    def commit(self, raw: list[bytes]) -> int:
        """Enqueue the taken messages as a load batch (dead letters for undecodable ones) and let go of
        them, in one transaction; 0 if another janitor took them back meanwhile."""
        if not raw:
            return 0
        sources, dead = decode_all(raw)
        try:
            with self.redis.pipeline() as pipe:
                # Still ours? Another janitor takes a batch back when it presumed us dead (paused past
                # ALIVE_TTL_S): then the list is gone or other, and a change after WATCH voids the EXEC.
                pipe.watch(self.taken_key)
                if pipe.llen(self.taken_key) != len(raw):
                    raise WatchError("the taken batch is no longer this janitor's")
                pipe.multi()
                if sources:
                    enqueue_batch(self.redis, self.settings, sources, pipe)
                self.ledger.add_dead(dead, pipe=pipe)
                pipe.delete(self.taken_key)
                pipe.execute()
        except WatchError:
            log.warning("inbox: %d messages were taken back by another janitor meanwhile; not enqueued", len(raw))
            return 0
        log.info("inbox: %d documents batched, %d undecodable", len(sources), len(dead))
        return len(raw)

    def recover(self) -> int:
        """Put the batches of janitors that died holding them back at the head of the inbox."""
        returned = 0
        for member in self.redis.smembers(self.keys.INBOX_TAKERS):
            other = member.decode()
            if other != self.id and not self.redis.exists(self.keys.janitor_alive(other)):
                n = self._return([self.keys.INBOX, self.keys.inbox_taken(other), self.keys.INBOX_TAKERS], [other])
                returned += int(n)
                if n:
                    log.warning(
                        "inbox: %d messages of janitor %s, which died holding them, are back in the inbox", n, other
                    )
        return returned


def decode_all(raw: list[bytes]) -> tuple[list[SourceDoc], list[DeadLetter]]:
    """Each message decoded on its own; any failure is that message's dead letter, never the batch's."""
    sources, dead = [], []
    for message in raw:
        try:
            sources.append(decode_inbox_message(message))
        except Exception as e:  # this guard is the point: one message never stops the inbox
            reason = str(e) if isinstance(e, DecodeError) else f"unreadable message: {type(e).__name__}: {e}"
            letter = DeadLetter(_inbox_id(message), "inbox", "decode_error", reason[:500], source=_kept(message))
            dead.append(letter)
    return sources, dead


def _inbox_id(message: bytes) -> str:
    """The ID of an undecodable message if a usable one can be read out of it, else a hash of its bytes."""
    try:
        doc_id = json.loads(message).get("id")
        if safe_id(doc_id) == doc_id:
            return doc_id
    except Exception:  # the message is undecodable: that is why we are here
        pass
    return "inbox:" + hashlib.sha1(message).hexdigest()[:16]


def _kept(message: bytes) -> dict[str, Any]:
    return {"raw": message[:KEEP_RAW_BYTES]}
