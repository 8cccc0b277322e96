"""The embedding spec: the fingerprint of everything that changes a vector.

Two vectors are comparable only if they were made with the same spec. Each spec writes into its own
collection (a table of the store), so changing the model, its weights, the prefix, the dimensions or
the chunker never mixes vectors: the new spec fills a new collection while the old one keeps
serving search, until `embedpipe promote` switches search over.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from shared.models import STATIC_CHUNK_TOKENS, is_api_model, model_kind, resolve_model_path
from shared.settings import Settings
from shared.template import NO_TEMPLATE, ChunkTemplate
from shared.tokenizers import Tokenizer, load_tokenizer

# Bump when a change to workers/chunk.py or workers/load.py changes the chunks of a document.
CHUNKER_VERSION = 3


@dataclass(frozen=True)
class ChunkPolicy:
    """How the chunker cuts: part of the spec, since other chunks are other vectors."""

    max_tokens: int  # content tokens per chunk, special tokens excluded
    overlap_tokens: int
    template: ChunkTemplate = NO_TEMPLATE  # context the model reads before each chunk (its tokens count)

    @classmethod
    def for_model(cls, max_content_tokens: int, chunk_tokens: int, overlap: float, template: str = "") -> ChunkPolicy:
        """max_content_tokens: the model's limit (0 = none: a static model, STATIC_CHUNK_TOKENS by default)."""
        size = chunk_tokens or max_content_tokens or STATIC_CHUNK_TOKENS
        if max_content_tokens:
            size = min(size, max_content_tokens)
        return cls(max_tokens=size, overlap_tokens=int(size * overlap), template=ChunkTemplate.parse(template))


def chunk_policy(settings: Settings, tokenizer: Tokenizer) -> ChunkPolicy:
    """The one recipe: how the model of `tokenizer` is chunked under these settings (EMBEDPIPE_CHUNK_TOKENS,
    EMBEDPIPE_CHUNK_OVERLAP). Every runtime, the spec and the cost planner cut with it."""
    info = tokenizer.info
    return ChunkPolicy.for_model(
        info.max_content_tokens, settings.chunk_tokens, settings.chunk_overlap, settings.chunk_template
    )


@dataclass(frozen=True)
class EmbeddingSpec:
    model: str
    revision: str  # a hash of the weights (local models) or "api"
    pooling: str
    normalize: bool
    max_seq_length: int
    dimensions: int  # 0: all the model gives
    prefix: str  # put before every chunk
    chunk_tokens: int
    chunk_overlap_tokens: int
    chunker_version: int = CHUNKER_VERSION
    backend: str = "torch"  # bf16 and int8 ONNX compute other vectors than float32 torch
    vector_dtype: str = "float32"  # float16: vectors rounded to half precision as they travel and are kept
    query_prefix: str = ""  # put before queries: changes no stored vector, so not in the fingerprint
    chunk_template: str = ""  # EMBEDPIPE_CHUNK_TEMPLATE: context the model reads before each chunk

    @property
    def fingerprint(self) -> str:
        fields = asdict(self)
        fields.pop("query_prefix")
        if not fields["chunk_template"]:  # added later: collections made without one keep their names
            fields.pop("chunk_template")
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=8).hexdigest()

    @property
    def collection(self) -> str:
        """A readable, valid table name: model, dimensions, fingerprint."""
        name = re.sub(r"[^a-z0-9]+", "_", self.model.lower().rsplit("/", 1)[-1]).strip("_")[:24]
        return f"{name}_{self.dimensions or 'full'}_{self.fingerprint[:10]}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddingSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def settings_for(self, settings: Settings) -> Settings:
        """Settings that embed (queries, a probe) exactly as this spec did."""
        backend = settings.backend if self.backend == "api" else self.backend
        return replace(
            settings, model=self.model, dimensions=self.dimensions, query_prefix=self.query_prefix, backend=backend
        )


def spec_for(settings: Settings) -> EmbeddingSpec:
    """The spec these settings embed with; reads only small files (no torch, no model load)."""
    tokenizer = load_tokenizer(settings.model, settings.api_max_input_tokens)
    info = tokenizer.info
    policy = chunk_policy(settings, tokenizer)
    if is_api_model(settings.model):
        revision, pooling, normalize = "api", "api", True
    else:
        revision, pooling, normalize = _local_model_facts(str(resolve_model_path(settings.model)))
    return EmbeddingSpec(
        model=settings.model,
        revision=revision,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=info.max_seq_length,
        dimensions=settings.dimensions,
        prefix=settings.doc_prefix,
        chunk_tokens=policy.max_tokens,
        chunk_overlap_tokens=policy.overlap_tokens,
        backend="api" if is_api_model(settings.model) else settings.backend,
        vector_dtype=settings.vector_dtype,
        query_prefix=settings.query_prefix,
        chunk_template=policy.template.text,
    )


@cache
def _local_model_facts(path: str) -> tuple[str, str, bool]:
    """(weights hash, pooling mode, normalised?) of a sentence-transformers model directory."""
    root = Path(path)
    weights = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") and p.stat().st_size > 1_000_000)
    digest = hashlib.blake2b(digest_size=8)
    for p in weights:
        with p.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    pooling = "static" if model_kind(root) == "static" else "mean"  # a static model averages its token vectors
    config = root / "1_Pooling" / "config.json"
    if config.is_file():
        modes = [k.removeprefix("pooling_mode_") for k, v in json.loads(config.read_text()).items() if v is True]
        pooling = "+".join(sorted(modes)) or pooling
    modules = root / "modules.json"
    normalize = modules.is_file() and "Normalize" in modules.read_text()
    return digest.hexdigest(), pooling, normalize
