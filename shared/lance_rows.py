"""The Arrow tables of a LanceDB collection: the schemas of its chunks and documents tables, and the
rows of each that the store writes (bench/store_scale.py appends them in bulk)."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from shared.messages import Chunk
from shared.store_types import DocRecord


def _metadata_column(chunks: list[Chunk]) -> list[str]:
    """Each chunk's metadata as JSON, encoded once per document (its chunks share the document's)."""
    by_doc: dict[str, str] = {}
    return [by_doc.get(c.doc_id) or by_doc.setdefault(c.doc_id, json.dumps(c.metadata, sort_keys=True)) for c in chunks]


def chunk_rows(chunks: list[Chunk], vectors: np.ndarray) -> Any:
    """Chunks and their vectors as an Arrow table of the chunks table's schema."""
    import pyarrow as pa

    dim = vectors.shape[1]
    return pa.table(
        {
            "chunk_id": [c.chunk_id for c in chunks],
            "doc_id": [c.doc_id for c in chunks],
            "idx": [c.index for c in chunks],
            "text": [c.text for c in chunks],
            "tokens": [c.tokens for c in chunks],
            "char_start": [c.char_start for c in chunks],
            "char_end": [c.char_end for c in chunks],
            "metadata": _metadata_column(chunks),
            "vector": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel()), dim
            ),
        },
        schema=chunk_schema(dim),
    )


def doc_rows(done: list[DocRecord]) -> Any:
    """Document records as an Arrow table of the documents table's schema."""
    import pyarrow as pa

    return pa.table(
        {
            "doc_id": [d.doc_id for d in done],
            "content_hash": [d.content_hash for d in done],
            "chunks": [d.chunks for d in done],
            "text": [d.text for d in done],
            "metadata": [json.dumps(d.metadata, sort_keys=True) for d in done],
            "updated": [time.time()] * len(done),
        },
        schema=docs_schema(),
    )


def docs_schema() -> Any:
    """The documents table: one record per document (its content hash: an unchanged one is skipped)."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("doc_id", pa.string()),
            pa.field("content_hash", pa.string()),
            pa.field("chunks", pa.int32()),
            pa.field("text", pa.string()),
            pa.field("metadata", pa.string()),
            pa.field("updated", pa.float64()),
        ]
    )


def chunk_schema(dim: int) -> Any:
    """The chunks table: one row per chunk, with its vector of `dim` float32."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("chunk_id", pa.string()),
            pa.field("doc_id", pa.string()),
            pa.field("idx", pa.int32()),
            pa.field("text", pa.string()),
            pa.field("tokens", pa.int32()),
            pa.field("char_start", pa.int64()),
            pa.field("char_end", pa.int64()),
            pa.field("metadata", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ]
    )
