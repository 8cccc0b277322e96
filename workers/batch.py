"""The bookkeeping of a batch, once, for both runtimes: its plan, which documents a written part
completes, the documents the model refused, and the finalisation that ends every document of the batch
in exactly one place (stored completely, or a dead letter with none of its chunks left in the store)
and counts it once.

Pure functions over a small state interface, `BatchState`, with two implementations: `MemoryBatch` here
(the embedded runner, workers/embedded.py) and `RedisBatch` (the rq jobs, workers/batch_redis.py). The
write stage (workers/write.py) does the store's side of it. The ledger's counters mean the same in both
runtimes, and are counted when a batch is finalised, exactly once:

    documents_done     documents stored completely
    chunks_written     the chunks of those documents (a document's chunks in the store after it)
    documents_skipped  documents not chunked because the store held them unchanged
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from shared.ledger import Ledger
from shared.messages import BatchPlan, Chunk, DeadLetter, Document
from shared.store_types import DocRecord


@dataclass(frozen=True)
class Snapshot:
    """A batch's state read at one instant, to settle it: another writer finalising the same batch at the
    same moment drops its state at once, so a snapshot is either all before that or missing."""

    plan: BatchPlan
    refused: set[str]  # documents the model refused
    committed: set[str]  # documents written whole by one part (their records are written)
    failed_parts: set[str]  # documents with a chunk in a part that failed for good


class BatchState(Protocol):
    """Where a batch's bookkeeping lives while its parts are embedded and written."""

    def plan(self) -> BatchPlan: ...
    def documents(self) -> list[Document]: ...
    def refused(self) -> set[str]: ...
    def accounted(self) -> bool: ...
    def finalized(self) -> bool: ...
    def snapshot(self) -> Snapshot: ...
    def record_refused(self, letters: list[DeadLetter]) -> None: ...
    def record_part(self, part: int, committed: list[str]) -> None: ...
    def mark_finalized(self, result: Outcome) -> bool: ...


def make_plan(docs: list[Document], unchanged: list[Document], chunks: list[Chunk], parts: int, spec: str) -> BatchPlan:
    """The plan of a batch: its parts, its spec, each chunked document's chunk IDs in order."""
    expected: dict[str, list[str]] = {d.id: [] for d in docs}
    for c in chunks:
        expected[c.doc_id].append(c.chunk_id)
    return BatchPlan(parts, spec, expected, [d.id for d in unchanged])


def kept_rows(chunks: list[Chunk], refused: set[str]) -> list[int]:
    """The rows of a part to write: every chunk but those of documents the model refused (their
    documents are dead letters; a partial document is never stored)."""
    return [i for i, c in enumerate(chunks) if c.doc_id not in refused]


def completed_by(chunks: list[Chunk], expected: dict[str, list[str]]) -> list[str]:
    """The documents whose every chunk is among `chunks` (parts keep documents whole where they fit):
    they are replaced in the write of that part itself, not when the batch is finalised."""
    here: dict[str, set[str]] = {}
    for c in chunks:
        here.setdefault(c.doc_id, set()).add(c.chunk_id)
    return [d for d, ids in expected.items() if here.get(d) == set(ids)]


def doc_records(docs: list[Document], chunks: dict[str, list[str]]) -> list[DocRecord]:
    """What the store keeps about each of these documents once all its chunks are in."""
    return [DocRecord(d.id, d.content_hash, len(chunks[d.id]), d.text, d.metadata) for d in docs if d.id in chunks]


@dataclass(frozen=True)
class Outcome:
    """How a batch ends: each planned document done or failed, and what that counts."""

    done: dict[str, list[str]]  # doc_id -> chunk IDs: stored completely
    failed: list[str]  # refused by the model, or with a chunk in a part that failed for good: removed
    uncommitted: dict[str, list[str]]  # done, spread over several parts: their records are written now
    skipped: list[str]  # not chunked: stored already, unchanged

    @property
    def settled(self) -> list[str]:
        """Documents whose earlier dead letters are void now: stored, or found stored unchanged."""
        return [*self.done, *self.skipped]

    def counts(self) -> dict[str, int]:
        return {
            "documents_done": len(self.done),
            "chunks_written": sum(map(len, self.done.values())),
            "documents_skipped": len(self.skipped),
        }


def outcome(state: Snapshot) -> Outcome:
    """The end of a batch whose every part is written or failed for good."""
    plan, failed = state.plan, state.refused | state.failed_parts
    done = {doc: ids for doc, ids in plan.chunks.items() if doc not in failed}
    uncommitted = {doc: ids for doc, ids in done.items() if doc not in state.committed}
    return Outcome(done, sorted(failed & set(plan.chunks)), uncommitted, list(plan.unchanged))


class MemoryBatch:
    """A batch's state in memory (the embedded runner): the embedding thread records refusals, the
    writing thread parts; the ledger beside the store gets the dead letters and the counters."""

    def __init__(self, plan: BatchPlan, docs: list[Document], ledger: Ledger) -> None:
        self._plan, self._docs, self._ledger = plan, docs, ledger
        self._refused: set[str] = set()
        self._committed: set[str] = set()
        self._written: set[int] = set()
        self._finalized = False
        self._lock = threading.Lock()

    def plan(self) -> BatchPlan:
        return self._plan

    def documents(self) -> list[Document]:
        return self._docs

    def refused(self) -> set[str]:
        with self._lock:
            return set(self._refused)

    def accounted(self) -> bool:
        with self._lock:
            return len(self._written) >= self._plan.parts

    def finalized(self) -> bool:
        with self._lock:
            return self._finalized

    def snapshot(self) -> Snapshot:
        with self._lock:  # no failed parts: a part that fails for good fails the whole embedded run
            return Snapshot(self._plan, set(self._refused), set(self._committed), set())

    def record_refused(self, letters: list[DeadLetter]) -> None:
        self._ledger.add_dead(letters)
        with self._lock:
            self._refused |= {d.doc_id for d in letters}

    def record_part(self, part: int, committed: list[str]) -> None:
        with self._lock:
            self._committed |= set(committed)
            self._written.add(part)

    def mark_finalized(self, result: Outcome) -> bool:
        with self._lock:
            if self._finalized:
                return False
            self._finalized = True
        self._ledger.clear_dead(result.settled)
        self._ledger.incr(**result.counts())
        return True
