"""The local embedding model: a sentence-transformers model (transformer or static) in torch, bf16 or
ONNX Runtime, fed token-budget micro-batches of token IDs (or texts), halving its budget on CUDA out
of memory. The embed stage (workers/embed.py) drives it; so do the embedded runtime, search and the probe.

The model is loaded once per process by `LocalEmbedder.warm_up()`, never at import and never per job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError, DecodeError, EmbedFailures
from shared.messages import Chunk
from shared.metrics import (
    EMBED_MICRO_BATCH_LIMIT,
    EMBED_OOM_HALVINGS,
    observe_micro_batch,
)
from shared.models import ModelTokenizer, model_kind, resolve_model_path
from shared.settings import BACKENDS
from shared.vectors import unpack_token_ids
from workers.embed_onnx import OnnxModel
from workers.model_load import CHECK_TEXTS, cpu_bf16, load_sentence_transformer

log = logging.getLogger(__name__)


# Micro-batches: padded tokens per forward pass (longest text x texts, special tokens included).
# CPU: 4096 (16 texts of 256 tokens). Measured here (2 cores, 948 SciFact chunks, a quiet machine):
# 2048 and 4096 took 18.7 s, 8192 20.8 s, sentence-transformers' own encode at batch 16 22.2 s.
# GPU: 65536 (256 x 256), enough to keep a large GPU busy with a small model; on CUDA out-of-memory
# the embedder halves it and grows it back slowly.
CPU_MICRO_BATCH_TOKENS = 4096
GPU_MICRO_BATCH_TOKENS = 65536
# Static models: a forward pass is a lookup and a mean, its cost the tokens it reads (no padding), so a
# micro-batch is as large as a part allows: per-call overhead is the only thing a small one would add.
STATIC_MICRO_BATCH_TOKENS = 1 << 20
UNBOUNDED_TOKENS = 1 << 30  # the "max sequence length" of a model that reads any length
REGROW_AFTER = 16  # successful micro-batches in a row before a halved budget grows again ...
REGROW_FACTOR = 1.25  # ... by a quarter, up to the configured budget


class LocalEmbedder:
    """A local sentence-transformers model. Parts are sorted by length, cut into micro-batches by a
    padded-token budget (at most batch_size texts each), and put back in their order. On CUDA out of
    memory the budget is halved and the micro-batch retried; a single text that still fails is
    reported in EmbedFailures while every other text gets its vector.

    backend: torch (CUDA fp16 where present); torch-bf16 (bfloat16 matmuls on the CPU, bfloat16 weights on
    CUDA); onnx or onnx-int8 (ONNX Runtime, CPU only: exported from the local weights once, cached under
    cache_dir, checked against torch's vectors at export).
    threads: CPU threads for the model; 0 = the CPUs this process may run on (see warm_up)."""

    def __init__(
        self,
        model: str,
        device: str = "auto",
        batch_size: int = 256,
        dimensions: int = 0,
        backend: str = "torch",
        micro_batch_tokens: int = 0,
        threads: int = 0,
        cache_dir: Path | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"unknown embedding backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.model_name = model
        self.device = device
        self.batch_size = batch_size  # the most texts in one micro-batch
        self.dimensions = dimensions  # > 0: keep the first N dimensions, re-normalised
        self.backend = backend
        self.micro_batch_tokens = micro_batch_tokens  # 0 = a default for the device
        self.threads = threads
        self.cache_dir = cache_dir or Path.home() / ".cache" / "embedpipe" / "onnx"
        self._model: Any = None
        self._oom: tuple[type[BaseException], ...] = ()
        self._precision: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext  # around each forward
        self._budget = self._limit = 0  # padded tokens per micro-batch: configured, and current
        self._streak = 0  # successful micro-batches in a row while the limit is below the budget
        self._tokenizer: ModelTokenizer | None = None
        self._special = 2
        self._max_len = 512
        self._static = False  # a static model: token vectors averaged, no special tokens, any length
        self._prefix_ids: dict[str, np.ndarray | None] = {}  # a document prefix as token IDs (None: not separable)
        self._pad_id = 0
        self._token_types = False  # the model takes token_type_ids (BERT)
        self.dimension = 0

    @property
    def ready(self) -> bool:
        return self._model is not None

    def warm_up(self) -> LocalEmbedder:
        """Load the model (idempotent): CUDA with fp16 where present, else CPU."""
        if self._model is not None:
            return self
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and not self.backend.startswith("onnx") else "cpu"
        if self.backend.startswith("onnx") and device != "cpu":
            raise ConfigError(f"the {self.backend} backend runs on the CPU only; use torch on {device}")
        # Threads, deliberately: by default the CPUs this process may run on (its affinity mask, which
        # taskset, cpusets and Kubernetes' static CPU manager narrow), never more than torch's own
        # default (which OMP_NUM_THREADS lowers). In embedded mode the model gets every core: the
        # load/chunk and write threads need a few percent of one core and mostly wait; leaving a core
        # to them would cost the model a third of its speed on two cores. Several embedders (or a
        # chunker and an embedder) busy on one machine must not oversubscribe the cores: pin each to
        # its own CPUs (taskset -c) or give each `threads` = cores / processes.
        threads = self.threads or min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
        if device == "cpu":
            torch.set_num_threads(threads)
        started = time.perf_counter()
        path = resolve_model_path(self.model_name)
        self._tokenizer = ModelTokenizer(self.model_name)  # counts the tokens of embed()'s texts
        self._static = model_kind(path) == "static"
        self._special = 0 if self._static else self._tokenizer.info.special_tokens
        self._max_len = self._tokenizer.info.max_seq_length or UNBOUNDED_TOKENS
        if self.backend.startswith("onnx"):
            self._model = OnnxModel.load(path, self.backend == "onnx-int8", threads, self.cache_dir)
            self._oom = ()
        else:
            bf16 = self.backend == "torch-bf16"
            self._model = load_sentence_transformer(path, device, bf16)
            self._oom = (torch.cuda.OutOfMemoryError,)
            probe = self._model.preprocess(["a"])  # the features the model's first module reads
            self._token_types = "token_type_ids" in probe
            self._pad_id = int(getattr(self._model.tokenizer, "pad_token_id", None) or 0)
            if bf16 and device == "cpu":
                self._precision = cpu_bf16(self._model)
        self.dimension = self._model.dimension
        if 0 < self.dimensions < self.dimension:
            self.dimension = self.dimensions
        default = GPU_MICRO_BATCH_TOKENS if device.startswith("cuda") else CPU_MICRO_BATCH_TOKENS
        if self._static:  # no attention, no padding: a forward pass costs its tokens, and little per call
            default = STATIC_MICRO_BATCH_TOKENS
        self._budget = self._limit = self.micro_batch_tokens or default
        EMBED_MICRO_BATCH_LIMIT.set(self._limit)
        log.info(
            "model %s (%s) on %s, %d threads, loaded in %.1f s",
            self.model_name,
            self.backend,
            device,
            threads,
            time.perf_counter() - started,
        )
        return self

    @property
    def micro_batch_limit(self) -> int:
        """The current padded-token budget of a micro-batch (below the configured one after an OOM)."""
        return self._limit

    def embed(self, texts: list[str]) -> np.ndarray:
        """One normalised vector per text, in order (queries, evaluation sets)."""
        self._check_ready()
        lengths = [self._seen(n) for n in self._tokenizer.count(texts)] if texts else []
        return self._embed_all(texts, lengths, self._encode)

    def embed_chunks(self, chunks: list[Chunk], prefix: str = "") -> np.ndarray:
        """One vector per chunk (of `prefix` + its text), in chunk order: sorted by length, cut into
        micro-batches by a token budget, each measured (observe_micro_batch), put back in order. Chunks
        that carry their token IDs are fed to the model as they are (no tokenisation here). Raises
        EmbedFailures (with the vectors of all other chunks) if a single chunk still runs out of memory."""
        self._check_ready()
        head = self._prefix_as_ids(prefix) if chunks and all(c.token_ids for c in chunks) else None
        if head is None:
            lengths = [self._seen(c.tokens) for c in chunks]
            return self._embed_all([c.model_text(prefix) for c in chunks], lengths, self._encode)
        rows = [self._model_input(head, self._checked_ids(c)) for c in chunks]
        return self._embed_all(rows, [len(r) for r in rows], self._encode_ids)

    def _seen(self, content_tokens: int) -> int:
        """Tokens the model reads for a text of this many content tokens (special tokens, truncation)."""
        return min(content_tokens + self._special, self._max_len)

    def _checked_ids(self, chunk: Chunk) -> np.ndarray:
        """The chunk's token IDs; IDs outside this model's vocabulary (a chunker with another tokenizer)
        fail the job rather than embed garbage."""
        ids = unpack_token_ids(chunk)
        if len(ids) and int(ids.max()) >= self._tokenizer.vocab_size:
            raise DecodeError(
                f"chunk {chunk.chunk_id} holds token ID {int(ids.max())}, outside the vocabulary of "
                f"{self.model_name} ({self._tokenizer.vocab_size}): it was tokenised for another model"
            )
        return ids

    def _prefix_as_ids(self, prefix: str) -> np.ndarray | None:
        """`prefix` as token IDs to put before a chunk's, if tokenising prefix + text always gives the
        prefix's IDs then the text's (checked on fixed texts); None: embed the text instead."""
        if prefix not in self._prefix_ids:
            ids = self._tokenizer.ids([prefix])[0] if prefix else []
            joined = self._tokenizer.ids([prefix + t for t in CHECK_TEXTS])
            alone = self._tokenizer.ids(list(CHECK_TEXTS))
            separable = all(j == ids + a for j, a in zip(joined, alone, strict=True))
            if not separable:
                log.warning("the prefix %r does not tokenise apart from the text: chunks are re-tokenised", prefix)
            self._prefix_ids[prefix] = np.asarray(ids, dtype=np.uint32) if separable else None
        return self._prefix_ids[prefix]

    def _model_input(self, head: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """What the model reads: its special tokens around prefix + chunk IDs, truncated as the model's
        own tokenizer truncates (static models take any length and no special tokens)."""
        content = np.concatenate([head, ids]) if len(head) else ids
        if self._static:
            return content
        tok = self._tokenizer
        return np.concatenate([tok.head_ids, content[: self._max_len - self._special], tok.tail_ids]).astype(np.int64)

    def _check_ready(self) -> None:
        if self._model is None:
            raise RuntimeError("LocalEmbedder.embed() before warm_up(): the model is not loaded")

    def _embed_all(self, texts: list[Any], lengths: list[int], encode: Callable[[list[Any]], np.ndarray]) -> np.ndarray:
        """texts: texts or token-ID rows; lengths: the tokens the model reads of each; encode: one forward pass."""
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # longest first: the largest batch first
        failed: dict[int, str] = {}
        i = 0
        while i < len(order):
            # Sorted longest first, so the first text of the micro-batch sets its padded length.
            count = max(1, min(self.batch_size, self._limit // lengths[order[i]], len(order) - i))
            rows = order[i : i + count]
            started = time.perf_counter()
            try:
                vectors[rows] = encode([texts[r] for r in rows])
            except self._oom as e:
                self._release_memory()
                if len(rows) == 1:
                    failed[rows[0]] = f"out of memory on one text of {lengths[rows[0]]} tokens: {e}"[:500]
                    i += 1
                else:
                    self._halve(len(rows) * lengths[rows[0]])
                continue
            observe_micro_batch(time.perf_counter() - started, len(rows), [lengths[r] for r in rows])
            self._succeeded()
            i += count
        if failed:
            raise EmbedFailures(vectors, failed)
        return vectors

    def _encode(self, texts: list[str]) -> np.ndarray:
        """One forward pass: normalised float32 vectors, truncated to `dimension`."""
        with self._precision():
            vectors = self._model.encode(
                texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
            )
        return self._truncated(np.asarray(vectors, dtype=np.float32))

    def _encode_ids(self, rows: list[np.ndarray]) -> np.ndarray:
        """One forward pass over token-ID rows (special tokens included), without the tokenizer."""
        if self.backend.startswith("onnx"):
            return self._truncated(self._model.encode_ids(rows))
        import torch

        if self._static:  # an EmbeddingBag: all IDs in one row, each text's start in `offsets`
            lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
            features = {
                "input_ids": torch.from_numpy(np.concatenate(rows).astype(np.int64)),
                "offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths[:-1])])),
            }
        else:
            ids = np.full((len(rows), max(len(r) for r in rows)), self._pad_id, dtype=np.int64)
            mask = np.zeros_like(ids)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = r
                mask[i, : len(r)] = 1
            features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
            if self._token_types:
                features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        device = self._model.device
        with torch.inference_mode(), self._precision():
            out = self._model({k: v.to(device) for k, v in features.items()})["sentence_embedding"]
            out = torch.nn.functional.normalize(out.float(), p=2, dim=1)
        return self._truncated(out.cpu().numpy())

    def _truncated(self, vectors: np.ndarray) -> np.ndarray:
        if self.dimension < vectors.shape[1]:  # truncate, then back onto the unit sphere
            vectors = vectors[:, : self.dimension]
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _halve(self, failed_cost: int) -> None:
        """Out of memory on a micro-batch of `failed_cost` padded tokens: half of that from now on."""
        self._limit = max(1, min(self._limit, failed_cost) // 2)
        self._streak = 0
        EMBED_OOM_HALVINGS.inc()
        EMBED_MICRO_BATCH_LIMIT.set(self._limit)
        log.warning("out of memory at %d padded tokens: micro-batches now <= %d", failed_cost, self._limit)

    def _succeeded(self) -> None:
        if self._limit >= self._budget:
            return
        self._streak += 1
        if self._streak >= REGROW_AFTER:
            self._limit = min(self._budget, int(self._limit * REGROW_FACTOR) + 1)
            self._streak = 0
            EMBED_MICRO_BATCH_LIMIT.set(self._limit)

    def _release_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
