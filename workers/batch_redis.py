"""A batch's state in Redis (the distributed runtime): its claim-check payloads, its plan, and the sets
the stages record into, read and written only here (the key names are in shared/keys.py). Nothing read
back is trusted: every payload is decoded by shared/messages.py or shared/vectors.py.

Writes go into the caller's pipeline where one is given, so a stage's results, its records and the
next stage's jobs land in Redis together."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError

from shared.errors import ConfigError
from shared.ledger import RedisLedger
from shared.messages import (
    BatchPlan,
    Chunk,
    DeadLetter,
    Document,
    decode_chunks,
    decode_documents,
    decode_sources,
    pack,
)
from shared.spec import EmbeddingSpec
from shared.vectors import pack_vectors, unpack_vectors
from workers.batch import Snapshot


class RedisBatch:
    """One batch's keys. Reads are cached for the life of the object (one job)."""

    def __init__(self, redis: Redis, batch_id: str, ledger: RedisLedger, ttl_s: int) -> None:
        self.redis, self.id, self.ledger, self.ttl_s = redis, batch_id, ledger, ttl_s
        self.keys = ledger.keys  # the batch's pipeline's namespace
        self._plan: BatchPlan | None = None
        self._docs: list[Document] | None = None

    # --- the prologue of every job ---------------------------------------------------------------
    def check_spec(self, spec: EmbeddingSpec) -> None:
        """Every stage of a batch must use the same embedding spec: a pool configured with another model
        (or dimensions, prefix, chunker) fails the job rather than mixing vectors."""
        header = BatchPlan.header_from(self.redis.hmget(self.keys.batch_plan(self.id), BatchPlan.HEADER))
        if header is not None and header[1] != spec.fingerprint:
            raise ConfigError(
                f"batch {self.id} was chunked for embedding spec {header[1]}, but this worker uses "
                f"{spec.fingerprint} ({spec.collection}): all pools need the same model settings"
            )

    # --- payloads ---------------------------------------------------------------------------------
    def sources(self) -> list[dict[str, Any]]:
        return decode_sources(self.redis.get(self.keys.sources(self.id)))

    def doc_ids(self) -> list[str]:
        """The batch's document IDs, kept as long as dead letters keep sources (its payloads may be gone)."""
        raw = self.redis.get(self.keys.batch_doc_ids(self.id))
        try:
            ids = msgpack.unpackb(raw) if raw else []
        except Exception:  # a corrupt index: no IDs to name
            return []
        return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []

    def documents(self) -> list[Document]:
        if self._docs is None:
            self._docs = decode_documents(self.redis.get(self.keys.documents(self.id)))
        return self._docs

    def chunks(self, part: int) -> list[Chunk]:
        return decode_chunks(self.redis.get(self.keys.chunks(self.id, part)))

    def vectors(self, part: int, rows: int, dtype: str) -> npt.NDArray[np.float32]:
        return unpack_vectors(self.redis.get(self.keys.vectors(self.id, part)), rows, dtype)

    def put_documents(self, docs: list[Document], pipe: Pipeline) -> None:
        pipe.set(self.keys.documents(self.id), pack(docs), ex=self.ttl_s)

    def put_plan(self, plan: BatchPlan, parts: list[list[Chunk]], pipe: Pipeline) -> None:
        """The chunker's plan and its parts' chunks (without their metadata: the writer takes it back
        from the documents payload)."""
        key = self.keys.batch_plan(self.id)
        pipe.delete(key)
        pipe.hset(key, mapping=plan.to_hash())
        pipe.expire(key, self.ttl_s)
        for p, part in enumerate(parts):
            pipe.set(self.keys.chunks(self.id, p), pack(part), ex=self.ttl_s)
        self._plan = plan

    def put_vectors(self, part: int, vectors: npt.ArrayLike, dtype: str, pipe: Pipeline) -> None:
        pipe.set(self.keys.vectors(self.id, part), pack_vectors(vectors, dtype), ex=self.ttl_s)

    # --- BatchState --------------------------------------------------------------------------------
    def plan(self) -> BatchPlan:
        if self._plan is None:
            self._plan = BatchPlan.from_hash(self.redis.hgetall(self.keys.batch_plan(self.id)))
        return self._plan

    def refused(self) -> set[str]:
        return {m.decode() for m in self.redis.smembers(self.keys.docs_failed(self.id))}

    def finalized(self) -> bool:
        return bool(self.redis.exists(self.keys.batch_finalized(self.id)))

    def snapshot(self) -> Snapshot:
        """The plan and the records of the stages, in one transaction (see Snapshot); a DecodeError if
        the batch's state is gone meanwhile (another writer finalised it)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.keys.batch_plan(self.id))
            pipe.smembers(self.keys.docs_failed(self.id))
            pipe.smembers(self.keys.docs_committed(self.id))
            pipe.smembers(self.keys.parts_failed(self.id))
            plan_fields, refused, committed, failed_parts = pipe.execute()
        self._plan = BatchPlan.from_hash(plan_fields)
        failed: set[str] = set()
        for part in failed_parts:
            failed |= {c.doc_id for c in self.chunks(int(part))}
        return Snapshot(self._plan, {m.decode() for m in refused}, {m.decode() for m in committed}, failed)

    def accounted(self) -> bool:
        """Every part of the batch is either written or failed for good."""
        with self.redis.pipeline() as pipe:
            pipe.scard(self.keys.parts_written(self.id))
            pipe.scard(self.keys.parts_failed(self.id))
            pipe.hmget(self.keys.batch_plan(self.id), BatchPlan.HEADER)
            written, failed, header = pipe.execute()
        parts = BatchPlan.header_from(header)
        return parts is not None and written + failed >= parts[0]

    def record_refused(self, letters: list[DeadLetter], pipe: Pipeline | None = None) -> None:
        if not letters:
            return
        target = pipe if pipe is not None else self.redis.pipeline()
        self.ledger.add_dead(letters, pipe=target)
        target.sadd(self.keys.docs_failed(self.id), *[d.doc_id for d in letters])
        target.expire(self.keys.docs_failed(self.id), self.ttl_s)
        if pipe is None:
            target.execute()

    def record_part(self, part: int, committed: list[str]) -> None:
        with self.redis.pipeline() as pipe:
            if committed:
                pipe.sadd(self.keys.docs_committed(self.id), *committed)
                pipe.expire(self.keys.docs_committed(self.id), self.ttl_s)
            pipe.sadd(self.keys.parts_written(self.id), part)
            pipe.expire(self.keys.parts_written(self.id), self.ttl_s)
            pipe.execute()

    def record_failed_part(self, part: int, pipe: Pipeline) -> None:
        """A part whose embed or write job failed for good (the janitor): its documents fail with it."""
        pipe.sadd(self.keys.parts_failed(self.id), part)
        pipe.expire(self.keys.parts_failed(self.id), self.ttl_s)

    def mark_finalized(self, settled: list[str], counts: dict[str, int]) -> bool:
        """Mark the batch finalized, clear its settled documents' old dead letters, count them and drop
        its payloads in one transaction, once: False if another writer did (a writer killed half-way
        through used to leave the mark set and the counters and dead letters as they were)."""
        final = self.keys.batch_finalized(self.id)
        parts = self.plan().parts
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(final)
                if pipe.exists(final):
                    return False
                pipe.multi()
                pipe.set(final, 1, ex=self.ttl_s)
                self.ledger.clear_dead(settled, pipe=pipe)
                self.ledger.incr(pipe, **counts)
                pipe.delete(*self.keys.batch_keys(self.id, parts))
                pipe.execute()
                return True
            except WatchError:  # another writer finalized it at the same moment
                return False
