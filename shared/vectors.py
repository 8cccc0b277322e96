"""The numeric payloads of a part, as they travel and are kept: token IDs (chunker -> embedder) and
vectors (embedder -> writer), raw little-endian bytes, checked when read back. Apart from
shared/messages.py so that a client that only submits documents never loads numpy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.errors import DecodeError
from shared.messages import Chunk

# How vectors travel (embed -> write) and are kept: raw little-endian bytes, float32 or, where the
# spec says so, float16 (half the bytes; the rounding is part of the spec, so both runtimes apply it).
VECTOR_DTYPES = {"float32": "<f4", "float16": "<f2"}


def pack_token_ids(ids: npt.ArrayLike) -> bytes:
    """Token IDs (a numpy array or a list) as the little-endian uint32 bytes a Chunk carries."""
    return np.asarray(ids, dtype="<u4").tobytes()


def unpack_token_ids(chunk: Chunk) -> npt.NDArray[np.uint32]:
    """A chunk's token IDs as a numpy uint32 array, checked against its token count."""
    raw = chunk.token_ids
    if len(raw) % 4 or len(raw) // 4 != chunk.tokens:
        raise DecodeError(f"chunk {chunk.chunk_id}: {len(raw)} bytes of token IDs for {chunk.tokens} tokens")
    return np.frombuffer(raw, dtype="<u4")


def pack_vectors(vectors: npt.ArrayLike, dtype: str = "float32") -> bytes:
    """A part's vectors (rows) as raw little-endian bytes of `dtype`."""
    return np.ascontiguousarray(vectors, dtype=VECTOR_DTYPES[dtype]).tobytes()


def unpack_vectors(raw: bytes | None, rows: int, dtype: str = "float32") -> npt.NDArray[np.float32]:
    """float32 rows from pack_vectors' bytes, checked: the size must fit `rows`, every number finite."""
    if raw is None:
        raise DecodeError("vectors payload is missing (expired or never written)")
    width = np.dtype(VECTOR_DTYPES[dtype]).itemsize
    if rows == 0 or len(raw) % (width * rows):
        raise DecodeError(f"vectors payload of {len(raw)} bytes does not hold {rows} {dtype} rows")
    vectors = np.frombuffer(raw, dtype=VECTOR_DTYPES[dtype]).reshape(rows, -1).astype(np.float32)
    if not np.isfinite(vectors).all():
        raise DecodeError("vectors payload holds non-finite numbers")
    return vectors
