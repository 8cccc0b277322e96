"""The batch engine (workers/batch.py) with plain lists, and both of its states driven through the same
batch: the embedded runner's MemoryBatch and the rq jobs' RedisBatch must end it identically."""

from __future__ import annotations

import numpy as np
import pytest
from redis import Redis

from shared import keys
from shared.ledger import LocalLedger, RedisLedger
from shared.messages import BatchPlan, Chunk, DeadLetter, Document, content_hash
from shared.spec import EmbeddingSpec
from shared.store import open_store
from workers.batch import MemoryBatch, Snapshot, completed_by, kept_rows, make_plan, outcome
from workers.batch_redis import RedisBatch
from workers.write import finalize_batch, write_part


def doc(doc_id: str, text: str = "") -> Document:
    text = text or f"the text of {doc_id}"
    return Document(doc_id, text, content_hash(text), {"source": doc_id})


def chunks_of(doc_id: str, n: int) -> list[Chunk]:
    return [Chunk(f"{doc_id}-{i}", doc_id, i, f"chunk {i} of {doc_id}", 3, 0, 1, {"source": doc_id}) for i in range(n)]


# --- pure functions, plain lists -----------------------------------------------------------------


def test_the_plan_lists_each_chunked_documents_chunks_in_order_and_the_unchanged_ones():
    docs, unchanged = [doc("a"), doc("b"), doc("empty")], [doc("same")]
    chunks = [*chunks_of("a", 2), *chunks_of("b", 3)]
    plan = make_plan(docs, unchanged, chunks, 2, "f00d")
    assert plan == BatchPlan(2, "f00d", {"a": ["a-0", "a-1"], "b": ["b-0", "b-1", "b-2"], "empty": []}, ["same"])


def test_a_part_completes_the_documents_it_holds_whole_and_drops_refused_ones():
    expected = {"a": ["a-0", "a-1"], "b": ["b-0", "b-1", "b-2"], "c": ["c-0"]}
    part = [*chunks_of("a", 2), *chunks_of("b", 2), *chunks_of("c", 1)]  # b's last chunk is in another part
    assert completed_by(part, expected) == ["a", "c"]
    assert kept_rows(part, {"c"}) == [0, 1, 2, 3]
    assert completed_by([part[i] for i in kept_rows(part, {"c"})], expected) == ["a"]


def test_the_outcome_settles_every_document_once_and_counts_it():
    plan = BatchPlan(3, "f00d", {"a": ["a-0", "a-1"], "b": ["b-0", "b-1", "b-2"], "c": ["c-0"], "d": ["d-0"]}, ["u"])
    result = outcome(Snapshot(plan, refused={"c"}, committed={"a"}, failed_parts={"d"}))
    assert result.done == {"a": ["a-0", "a-1"], "b": ["b-0", "b-1", "b-2"]}
    assert result.failed == ["c", "d"]
    assert result.uncommitted == {"b": ["b-0", "b-1", "b-2"]}  # spread over parts: recorded at the end
    assert result.settled == ["a", "b", "u"]  # their earlier dead letters are void
    assert result.counts() == {"documents_done": 2, "chunks_written": 5, "documents_skipped": 1}


# --- both states through the same batch ------------------------------------------------------------

SPEC = EmbeddingSpec("m", "rev", "mean", True, 256, 0, "", 254, 25)


def run_batch(state: MemoryBatch | RedisBatch, store_dir: str, parts: list[list[Chunk]]) -> dict[str, object]:
    """Write the parts as both runtimes do (the model refused document c), then finalise."""
    store = open_store(store_dir, SPEC)
    rng = np.random.default_rng(0)
    state.record_refused([DeadLetter("c", "embed", "model_error", "too long")])
    for number, part in enumerate(parts):
        assert not state.accounted()
        write_part(state, store, number, part, rng.normal(size=(len(part), 8)).astype(np.float32))
    assert state.accounted()
    result = finalize_batch(state, store)
    again = finalize_batch(state, store)  # a redelivered finalisation changes and counts nothing
    return {
        "outcome": result,
        "again": again,
        "stored": store.chunk_ids(["a", "b", "c", "old"]),
        "records": sorted(store.doc_hashes(["a", "b", "c"])),
    }


def batch_of_three() -> tuple[BatchPlan, list[Document], list[list[Chunk]]]:
    """a whole in part 0; b spread over parts 0 and 1; c (refused by the model) in part 1; u unchanged."""
    a, b, c = chunks_of("a", 2), chunks_of("b", 3), chunks_of("c", 1)
    parts = [[*a, *b[:2]], [b[2], *c]]
    docs = [doc("a"), doc("b"), doc("c")]
    return make_plan(docs, [doc("u")], [*a, *b, *c], len(parts), SPEC.fingerprint), docs, parts


def test_memory_and_redis_states_end_a_batch_alike(tmp_path, redis_url):
    plan, docs, parts = batch_of_three()
    old = [DeadLetter(d, "load", "source_error", "earlier failure") for d in ("a", "b", "u")]

    local = LocalLedger(tmp_path / "state.sqlite")
    local.add_dead(old)
    in_memory = run_batch(MemoryBatch(plan, docs, local), str(tmp_path / "memory"), parts)

    redis = Redis.from_url(redis_url)
    shared_ledger = RedisLedger(redis, keys.DEFAULT)
    shared_ledger.add_dead(old)
    batch = RedisBatch(redis, "b1", shared_ledger, ttl_s=600)
    with redis.pipeline() as pipe:  # what the load and chunk jobs leave in Redis
        batch.put_documents(docs, pipe)
        batch.put_plan(plan, parts, pipe)
        pipe.execute()
    in_redis = run_batch(RedisBatch(redis, "b1", shared_ledger, ttl_s=600), str(tmp_path / "redis"), parts)

    assert in_memory["outcome"] == in_redis["outcome"] and in_memory["outcome"] is not None
    assert in_memory["again"] is None and in_redis["again"] is None
    assert (
        in_memory["stored"]
        == in_redis["stored"]
        == {
            "a": {"a-0", "a-1"},
            "b": {"b-0", "b-1", "b-2"},
            "c": set(),  # refused: none of its chunks stored, not even the part's
            "old": set(),
        }
    )
    assert in_memory["records"] == in_redis["records"] == ["a", "b"]
    counters = {"documents_done": 2, "chunks_written": 5, "documents_skipped": 1}
    assert local.counters() == shared_ledger.counters() == counters
    assert [d.doc_id for d in local.dead()] == [d.doc_id for d in shared_ledger.dead()] == ["c"]
    assert not redis.keys("embedpipe:chunks:b1:*") and not redis.exists("embedpipe:plan:b1")  # payloads dropped


def test_a_part_that_failed_for_good_fails_its_documents_and_the_rest_is_stored(tmp_path, redis_url):
    plan, docs, parts = batch_of_three()
    redis = Redis.from_url(redis_url)
    batch = RedisBatch(redis, "b2", RedisLedger(redis, keys.DEFAULT), ttl_s=600)
    store = open_store(str(tmp_path / "store"), SPEC)
    with redis.pipeline() as pipe:
        batch.put_documents(docs, pipe)
        batch.put_plan(plan, parts, pipe)
        pipe.execute()
    write_part(batch, store, 0, parts[0], np.ones((len(parts[0]), 8), dtype=np.float32))
    assert not batch.accounted()
    with redis.pipeline() as pipe:  # the janitor, after part 1's jobs failed for good
        batch.record_failed_part(1, pipe)
        pipe.execute()
    assert batch.accounted()
    result = finalize_batch(batch, store)
    assert result is not None and list(result.done) == ["a"] and result.failed == ["b", "c"]
    assert store.chunk_ids(["a", "b"]) == {"a": {"a-0", "a-1"}, "b": set()}  # b's first two chunks removed
    assert RedisLedger(redis, keys.DEFAULT).counters() == {
        "documents_done": 1,
        "chunks_written": 2,
        "documents_skipped": 1,
    }


def test_a_job_checks_the_spec_its_batch_was_planned_for(redis_url):
    from shared.errors import ConfigError

    redis = Redis.from_url(redis_url)
    batch = RedisBatch(redis, "b3", RedisLedger(redis, keys.DEFAULT), ttl_s=600)
    batch.check_spec(SPEC)  # no plan yet: nothing to compare
    with redis.pipeline() as pipe:
        batch.put_plan(BatchPlan(1, "another-spec", {}), [], pipe)
        pipe.execute()
    with pytest.raises(ConfigError, match="another-spec"):
        RedisBatch(redis, "b3", RedisLedger(redis, keys.DEFAULT), ttl_s=600).check_spec(SPEC)
