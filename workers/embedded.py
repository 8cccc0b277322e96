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

from producer.submit import batched
from shared.errors import ConfigError
from shared.ledger import LocalLedger, local_ledger_path
from shared.messages import Chunk, DeadLetter, SourceDoc
from shared.models import ModelTokenizer
from shared.settings import Settings
from shared.store import open_store
from workers.chunk import ChunkPolicy, chunk_batch, pack_parts
from workers.embed import Embedder, embed_batch
from workers.load import load_batch
from workers.write import delete_stale, write_batch

log = logging.getLogger(__name__)

QUEUE_PARTS = 4  # parts waiting between stages: enough to keep the model busy, little memory
_DONE = object()


@dataclass
class RunSummary:
    documents: int = 0  # submitted
    documents_stored: int = 0
    failed: int = 0
    chunks: int = 0
    chunks_embedded: int = 0
    tokens: int = 0
    seconds: float = 0.0  # the whole run, model loading included
    model_load_seconds: float = 0.0
    chunks_per_s: float = 0.0
    store: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Batch:
    expected: dict[str, list[str]]  # doc_id -> its chunk IDs, to delete stale ones once written
    parts_left: int
    lock: threading.Lock = field(default_factory=threading.Lock)


class EmbeddedRun:
    def __init__(self, settings: Settings, embedder: Embedder | None = None, progress: Any = None) -> None:
        self.settings = settings
        if "://" in settings.store:
            raise ConfigError("the embedded mode writes a directory store; use the distributed mode for a server store")
        self.store = open_store(settings.store, settings.model)
        self.ledger = LocalLedger(local_ledger_path(settings.store_path))
        self.tokenizer = ModelTokenizer(settings.model)
        self.policy = ChunkPolicy.for_model(
            self.tokenizer.info.max_content_tokens, settings.chunk_tokens, settings.chunk_overlap
        )
        self.embedder = embedder or Embedder(settings.model, settings.device, settings.batch_size)
        self.progress = progress  # a tqdm-like bar, or None
        self.summary = RunSummary(store=str(settings.store_path.resolve()))
        self._errors: list[BaseException] = []

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
                vectors = embed_batch(part, self.embedder)
                self.summary.chunks_embedded += len(part)
                embedded.put((batch, part, vectors))
        finally:
            embedded.put(_DONE)
            writer.join()
        if self._errors:
            raise self._errors[0]
        self.store.optimize()
        self.summary.seconds = round(time.perf_counter() - started, 3)
        self.summary.chunks_per_s = round(self.summary.chunks_embedded / max(self.summary.seconds, 1e-9), 2)
        return self.summary

    def _guard(self, target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as e:  # handed to the main thread, which re-raises it
            self._errors.append(e)
            if target == self._prepare:
                args[-1].put(_DONE)

    def _prepare(self, items: Iterable[SourceDoc | DeadLetter], parts: queue.Queue[Any]) -> None:
        s = self.settings
        for group in batched(items, s.batch_docs):
            rejected = [i for i in group if isinstance(i, DeadLetter)]
            docs, dead = load_batch([i.to_dict() for i in group if isinstance(i, SourceDoc)], s.max_doc_bytes)
            self.ledger.add_dead(rejected + dead)
            chunks = chunk_batch(docs, self.tokenizer, self.policy)
            batch_parts = pack_parts(chunks, s.part_max_chunks, s.part_max_tokens)
            self.summary.documents += len(group)
            self.summary.failed += len(rejected) + len(dead)
            self.summary.chunks += len(chunks)
            self.summary.tokens += sum(c.tokens for c in chunks)
            if self.progress is not None:
                self.progress.total = (self.progress.total or 0) + len(chunks)
                self.progress.refresh()
            batch = _Batch(_expected(docs, chunks), len(batch_parts))
            for part in batch_parts:
                parts.put((batch, part))
        parts.put(_DONE)

    def _write(self, embedded: queue.Queue[Any]) -> None:
        while (item := embedded.get()) is not _DONE:
            batch, part, vectors = item
            write_batch(self.store, part, vectors)
            if self.progress is not None:
                self.progress.update(len(part))
            with batch.lock:
                batch.parts_left -= 1
                complete = batch.parts_left == 0
            if complete:
                delete_stale(self.store, batch.expected)
                self.ledger.clear_dead(batch.expected)
                self.ledger.incr(
                    documents_done=len(batch.expected), chunks_written=sum(map(len, batch.expected.values()))
                )
                self.summary.documents_stored += len(batch.expected)


def _expected(docs: list[Any], chunks: list[Chunk]) -> dict[str, list[str]]:
    expected: dict[str, list[str]] = {d.id: [] for d in docs}
    for c in chunks:
        expected[c.doc_id].append(c.chunk_id)
    return expected
