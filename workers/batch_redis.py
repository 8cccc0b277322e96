"""A batch's state in Redis (the distributed runtime): its claim-check payloads, its plan, and the sets
the stages record into, read and written only here (the key names are in shared/keys.py). Nothing read
back is trusted: every payload is decoded by shared/messages.py or shared/vectors.py.

Writes go into the caller's pipeline where one is given, so a stage's results, its records and the
next stage's jobs land in Redis together.

With several models (shared/lanes.py) a lane's share of a batch, `BATCH~LANE`, is a RedisBatch of its own:
its plan, parts and records are its own, its sources and documents the batch's. The last lane to finalise
joins them (`mark_finalized`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError

from shared.errors import ConfigError
from shared.lanes import lane_of
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
from workers.batch import Outcome, Snapshot


class RedisBatch:
    """One batch's keys. Reads are cached for the life of the object (one job)."""

    def __init__(self, redis: Redis, batch_id: str, ledger: RedisLedger, ttl_s: int) -> None:
        self.redis, self.id, self.ledger, self.ttl_s = redis, batch_id, ledger, ttl_s
        self.batch_id, self.lane = lane_of(batch_id)  # (batch_id, '') with one model
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
        return decode_sources(self.redis.get(self.keys.sources(self.batch_id)))

    def doc_ids(self) -> list[str]:
        """The batch's document IDs, kept as long as dead letters keep sources (its payloads may be gone)."""
        raw = self.redis.get(self.keys.batch_doc_ids(self.batch_id))
        try:
            ids = msgpack.unpackb(raw) if raw else []
        except Exception:  # a corrupt index: no IDs to name
            return []
        return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []

    def documents(self) -> list[Document]:
        if self._docs is None:
            self._docs = decode_documents(self.redis.get(self.keys.documents(self.batch_id)))
        return self._docs

    def chunks(self, part: int) -> list[Chunk]:
        return decode_chunks(self.redis.get(self.keys.chunks(self.id, part)))

    def vectors(self, part: int, rows: int, dtype: str) -> npt.NDArray[np.float32]:
        return unpack_vectors(self.redis.get(self.keys.vectors(self.id, part)), rows, dtype)

    def put_documents(self, docs: list[Document], pipe: Pipeline) -> None:
        pipe.set(self.keys.documents(self.batch_id), pack(docs), ex=self.ttl_s)

    def backfill_source(self) -> str:
        """The collection a backfill batch was read from ('' for any other batch)."""
        raw = self.redis.get(self.keys.batch_backfill(self.batch_id))
        return raw.decode(errors="replace") if raw else ""

    def put_lanes(self, lanes: list[str], pipe: Pipeline) -> None:
        """The lanes the batch fans out to (several models): it is finalised when all of them are."""
        pipe.sadd(self.keys.batch_lanes(self.batch_id), *lanes)
        pipe.expire(self.keys.batch_lanes(self.batch_id), self.ttl_s)

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
        if self.lane:  # the letter names the model that refused the document
            letters = [replace(d, spec=self.lane) for d in letters]
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

    def mark_finalized(self, result: Outcome) -> bool:
        """Mark the batch finalized and drop its payloads in one transaction, once: False if another writer
        did (a writer killed half-way through used to leave the mark set and the counters as they were).
        With one model, its settled documents' old dead letters are cleared and its counts added there too.
        A lane adds its own counts and records its outcome; the last lane of the batch joins them: only the
        documents settled in every lane are done (counted, their old dead letters cleared), and the batch
        itself is marked finalized."""
        final, joined = self.keys.batch_finalized(self.id), self.keys.lanes_finalized(self.batch_id)
        parts = self.plan().parts
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(final, joined)
                    if pipe.exists(final):
                        return False
                    lanes = {m.decode() for m in pipe.smembers(self.keys.batch_lanes(self.batch_id))}
                    others = {k.decode(): v for k, v in pipe.hgetall(joined).items()} if self.lane else {}
                    pipe.multi()
                    pipe.set(final, 1, ex=self.ttl_s)
                    pipe.delete(*self.keys.lane_keys(self.id, parts))
                    if not self.lane:
                        self._settle(pipe, result.settled, result.counts())
                    else:
                        self._join(pipe, result, lanes, others)
                    pipe.execute()
                    return True
                except WatchError:  # another lane (or a writer of this one) finalized meanwhile: read again
                    continue

    def _settle(self, pipe: Pipeline, settled: list[str], counts: dict[str, int]) -> None:
        """The batch is done: its documents counted, their old dead letters void, its payloads gone."""
        self.ledger.clear_dead(settled, pipe=pipe)
        self.ledger.incr(pipe, **counts)
        pipe.set(self.keys.batch_finalized(self.batch_id), 1, ex=self.ttl_s)
        pipe.delete(*self.keys.batch_payload_keys(self.batch_id))

    def _join(self, pipe: Pipeline, result: Outcome, lanes: set[str], others: dict[str, bytes]) -> None:
        counts = result.counts()
        self.ledger.incr_lane(pipe, self.lane, counts)
        mine = {"done": list(result.done), "skipped": result.skipped, "chunks": counts["chunks_written"]}
        if not lanes <= {*others, self.lane}:  # lanes still running: keep this one's outcome for the last
            pipe.hset(self.keys.lanes_finalized(self.batch_id), self.lane, msgpack.packb(mine))
            pipe.expire(self.keys.lanes_finalized(self.batch_id), self.ttl_s)
            return
        outcomes = [mine, *(_lane_outcome(raw) for raw in others.values())]
        settled = set.intersection(*({*o["done"], *o["skipped"]} for o in outcomes))
        written = set().union(*(o["done"] for o in outcomes))
        counts = {
            "documents_done": len(settled & written),
            "chunks_written": sum(o["chunks"] for o in outcomes),
            "documents_skipped": len(settled - written),
        }
        self._settle(pipe, sorted(settled), counts)


def _lane_outcome(raw: bytes) -> dict[str, Any]:
    """A lane's recorded outcome; a corrupt one counts as nothing settled (its documents stay unsettled)."""
    try:
        o = msgpack.unpackb(raw, raw=False)
        return {
            "done": [str(d) for d in o["done"]],
            "skipped": [str(d) for d in o["skipped"]],
            "chunks": int(o["chunks"]),
        }
    except Exception:  # nothing read from Redis is trusted
        return {"done": [], "skipped": [], "chunks": 0}
