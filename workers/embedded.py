"""Embedded mode: the same stage functions in one process, no Redis, the local store.

Loading and chunking run in one thread, writing in another, so the model (main thread) never waits
for them; bounded queues between them keep memory flat. torch is imported only when there is
something to embed. Dead letters and counters live beside the store (LocalLedger).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.cache import LocalVectorCache
from shared.errors import ConfigError, RateLimited
from shared.ledger import LocalLedger, local_ledger_path
from shared.messages import Chunk, DeadLetter, Document, SourceDoc, batched_by_size
from shared.settings import Settings
from shared.spec import chunk_policy, spec_for
from shared.store import open_store
from shared.tokenizers import load_tokenizer
from workers.chunk import chunk_batch, pack_parts, skip_unchanged
from workers.embed import embed_part, make_embedder, model_error_letters
from workers.embedder import Embedder
from workers.fetch import FetchPolicy
from workers.load import load_batch
from workers.write import commit_documents, complete_in, doc_records, write_batch

log = logging.getLogger(__name__)

QUEUE_PARTS = 4  # parts waiting between stages: enough to keep the model busy, little memory
EMBEDDED_RATE_WAIT_CAP_S = 60.0  # a rate limit is waited out in steps of at most this, then asked again
_DONE = object()


@dataclass
class RunSummary:
    documents: int = 0  # submitted
    documents_stored: int = 0
    unchanged: int = 0  # held by the store with the same text: skipped before chunking
    failed: int = 0
    chunks: int = 0
    chunks_embedded: int = 0  # by the model; the rest came from the embedding cache
    chunks_cached: int = 0
    tokens: int = 0
    seconds: float = 0.0  # the whole run, model loading included
    model_load_seconds: float = 0.0
    chunks_per_s: float = 0.0
    store: str = ""
    collection: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Batch:
    docs: list[Document]
    expected: dict[str, list[str]]  # doc_id -> its chunk IDs, to delete stale ones once written
    parts_left: int
    refused: set[str] = field(default_factory=set)  # documents the model refused (dead letters)
    committed: set[str] = field(default_factory=set)  # documents written whole by one part
    lock: threading.Lock = field(default_factory=threading.Lock)


class EmbeddedRun:
    def __init__(self, settings: Settings, embedder: Embedder | None = None, progress: Any = None) -> None:
        self.settings = settings
        if "://" in settings.store:
            raise ConfigError("the embedded mode writes a directory store; use the distributed mode for a server store")
        self.spec = spec_for(settings)
        self.store = open_store(settings.store, self.spec)
        self.ledger = LocalLedger(local_ledger_path(settings.store_path))
        self.cache = LocalVectorCache(
            settings.store_path / "embedpipe-cache.sqlite", settings.cache_max_entries, settings.cache_ttl_s
        )
        self.tokenizer = load_tokenizer(settings.model, settings.api_max_input_tokens)
        self.policy = chunk_policy(settings, self.tokenizer)
        self.embedder = embedder or make_embedder(settings)
        self.fetch_policy = FetchPolicy.parse(settings.fetch_allow)
        self.progress = progress  # a tqdm-like bar, or None
        self.summary = RunSummary(store=str(settings.store_path.resolve()), collection=self.spec.collection)
        self._errors: list[BaseException] = []
        self._submitted: set[str] = set()

    def run(self, items: Iterable[SourceDoc | DeadLetter]) -> RunSummary:
        started = time.perf_counter()
        parts: queue.Queue[Any] = queue.Queue(QUEUE_PARTS)
        embedded: queue.Queue[Any] = queue.Queue(QUEUE_PARTS)
        prepare = threading.Thread(target=self._guard, args=(self._prepare, items, parts), daemon=True)
        writer = threading.Thread(target=self._guard, args=(self._write, embedded), daemon=True)
        prepare.start()
        writer.start()
        try:
            while (item := parts.get()) is not _DONE and not self._errors:
                batch, part = item
                if not self.embedder.ready:
                    loading = time.perf_counter()
                    self.embedder.warm_up()
                    self.summary.model_load_seconds = round(time.perf_counter() - loading, 3)
                vectors, refused, embedded_now = self._embed(part)
                self.summary.chunks_embedded += embedded_now
                self.summary.chunks_cached += len(part) - embedded_now
                if refused:
                    letters = model_error_letters(part, refused, {d.id: _source(d) for d in batch.docs})
                    self.ledger.add_dead(letters)
                    with batch.lock:
                        batch.refused |= {d.doc_id for d in letters}
                embedded.put((batch, part, vectors))
        finally:
            embedded.put(_DONE)
            writer.join()
            self.cache.close()
        if self._errors:
            raise self._errors[0]
        self.summary.failed = len({d.doc_id for d in self.ledger.dead()} & self._submitted)
        self.store.optimize()
        self.summary.seconds = round(time.perf_counter() - started, 3)
        self.summary.chunks_per_s = round(self.summary.chunks_embedded / max(self.summary.seconds, 1e-9), 2)
        return self.summary

    def _embed(self, part: list[Chunk]) -> tuple[Any, dict[int, str], int]:
        """embed_part, waiting out rate limits here (what the distributed mode does by rescheduling);
        what the API did embed before a limit is kept in the cache, so it is not sent twice."""
        while True:
            try:
                return embed_part(part, self.embedder, self.spec, self.cache)
            except RateLimited as e:
                log.warning("%s; waiting %.0f s", e, e.retry_in_s)
                time.sleep(min(e.retry_in_s, EMBEDDED_RATE_WAIT_CAP_S))

    def _guard(self, target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as e:  # handed to the main thread, which re-raises it
            self._errors.append(e)
            if target == self._prepare:
                args[-1].put(_DONE)

    def _prepare(self, items: Iterable[SourceDoc | DeadLetter], parts: queue.Queue[Any]) -> None:
        s = self.settings
        for group in batched_by_size(items, s.batch_docs, s.batch_bytes):
            rejected = [i for i in group if isinstance(i, DeadLetter)]
            sources = [i.to_dict() for i in group if isinstance(i, SourceDoc)]
            loaded, dead = load_batch(sources, s.max_doc_bytes, self.fetch_policy)
            self.ledger.add_dead(rejected + dead)
            docs, unchanged = skip_unchanged(loaded, self.store)
            self.ledger.clear_dead([d.id for d in unchanged])
            chunks = chunk_batch(docs, self.tokenizer, self.policy)
            batch_parts = pack_parts(chunks, s.part_max_chunks, s.part_max_tokens)
            self._submitted |= {getattr(i, "id", None) or getattr(i, "doc_id", "") for i in group}
            self.summary.documents += len(group)
            self.summary.unchanged += len(unchanged)
            self.summary.chunks += len(chunks)
            self.summary.tokens += sum(c.tokens for c in chunks)
            if self.progress is not None:
                self.progress.total = (self.progress.total or 0) + len(chunks)
                self.progress.refresh()
            batch = _Batch(docs, _expected(docs, chunks), len(batch_parts))
            if not batch_parts and docs:  # documents without a single chunk: nothing to wait for
                self._finish(batch)
            for part in batch_parts:
                parts.put((batch, part))
        parts.put(_DONE)

    def _write(self, embedded: queue.Queue[Any]) -> None:
        while (item := embedded.get()) is not _DONE:
            batch, part, vectors = item
            keep = [i for i, c in enumerate(part) if c.doc_id not in batch.refused]
            kept = [part[i] for i in keep]
            complete = complete_in(kept, batch.expected, batch.docs)
            write_batch(self.store, kept, vectors[keep], complete)
            if self.progress is not None:
                self.progress.update(len(part))
            with batch.lock:
                batch.committed |= {d.doc_id for d in complete}
                batch.parts_left -= 1
                last = batch.parts_left == 0
            if last:
                self._finish(batch)

    def _finish(self, batch: _Batch) -> None:
        """All parts of the batch are written: record its documents, delete what is stale."""
        done = {d: ids for d, ids in batch.expected.items() if d not in batch.refused}
        rest = {d: ids for d, ids in done.items() if d not in batch.committed}  # spread over parts
        commit_documents(self.store, doc_records(batch.docs, rest), rest, sorted(batch.refused))
        self.ledger.clear_dead(done)
        self.ledger.incr(documents_done=len(done), chunks_written=sum(map(len, done.values())))
        self.summary.documents_stored += len(done)


def _source(doc: Document) -> dict[str, Any]:
    """A loaded document as a source again (its clean text), for redrive."""
    return {"id": doc.id, "text": doc.text, "metadata": doc.metadata}


def _expected(docs: list[Any], chunks: list[Chunk]) -> dict[str, list[str]]:
    expected: dict[str, list[str]] = {d.id: [] for d in docs}
    for c in chunks:
        expected[c.doc_id].append(c.chunk_id)
    return expected
