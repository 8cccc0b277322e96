"""Messages that travel between stages: frozen dataclasses with explicit msgpack encode/decode.

Every payload read from Redis goes through `decode_*`, which validates types and wraps every
failure in one `DecodeError`; nothing is unpickled, nothing is trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import msgpack

from shared.errors import DecodeError

SCHEMA_VERSION = 1
MAX_ID_CHARS = 512
# Metadata rides on every chunk of its document, into the store's JSON columns: it must be JSON (no
# bytes, no NaN), hold no NUL (PostgreSQL refuses it in text) and stay small and shallow.
MAX_METADATA_BYTES = 16_384
MAX_METADATA_DEPTH = 8
_CONTROL_IN_ID = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# Metadata that says where a document was read from, not what it is: a corpus moved to another directory
# (or enqueued from another checkout) is not a changed corpus, so it is not hashed.
PROVENANCE_KEYS = ("root",)


def content_hash(text: str, metadata: dict[str, Any] | None = None) -> str:
    """A stable fingerprint of a document as stored: its clean text and its metadata (which every chunk
    carries), so a metadata-only change is a change too; provenance (PROVENANCE_KEYS) excepted."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16)
    hashed = {k: v for k, v in (metadata or {}).items() if k not in PROVENANCE_KEYS}
    if hashed:
        digest.update(b"\0" + json.dumps(hashed, sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


def safe_id(value: Any, message: Any = None) -> str:
    """`value` if it is a usable document ID, else a stable stand-in (for the dead letter of a message
    whose ID is the problem: a dead letter's ID must itself be storable and printable). With no ID at
    all, the stand-in comes from the whole `message`, so two such messages keep two dead letters."""
    try:
        _check_id(value)
        return value
    except DecodeError:
        prefix, seed = ("<no id>:", message) if value is None else ("invalid-id:", value)
        return prefix + hashlib.blake2b(repr(seed).encode("utf-8", "replace"), digest_size=8).hexdigest()


def _check_id(doc_id: Any) -> None:
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise DecodeError("a document needs a non-empty string 'id'")
    if len(doc_id) > MAX_ID_CHARS:
        raise DecodeError(f"document id longer than {MAX_ID_CHARS} characters")
    _check_unicode(doc_id, "the document id")
    if _CONTROL_IN_ID.search(doc_id):
        raise DecodeError("the document id holds control characters")


def _check_unicode(text: str, what: str) -> None:
    """Text that cannot be written as UTF-8 (a lone surrogate: what JavaScript sends for a string cut
    inside an emoji) fails here, with its document, not later in whatever encodes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DecodeError(f"{what} is not valid Unicode: {e.reason} at character {e.start}") from None


def _check_metadata(value: Any, doc_id: str, depth: int = 0) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise DecodeError(f"document {doc_id!r}: metadata nested deeper than {MAX_METADATA_DEPTH}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise DecodeError(f"document {doc_id!r}: metadata keys must be strings")
            _check_metadata(key, doc_id, depth + 1)
            _check_metadata(item, doc_id, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_metadata(item, doc_id, depth + 1)
    elif isinstance(value, str):
        _check_unicode(value, f"document {doc_id!r}: a metadata string")
        if "\0" in value:
            raise DecodeError(f"document {doc_id!r}: a metadata string holds NUL")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise DecodeError(f"document {doc_id!r}: metadata holds {value} (JSON has no such number)")
    elif not (value is None or isinstance(value, (bool, int))):
        raise DecodeError(f"document {doc_id!r}: metadata holds a {type(value).__name__} (only JSON values)")


def chunk_id(doc_id: str, text: str, occurrence: int) -> str:
    """A chunk's ID comes from its document and its text, not its position: inserting a paragraph
    does not rename every later chunk. `occurrence` tells repeated texts in one document apart."""
    key = f"{doc_id}\0{occurrence}\0{text}".encode()
    return hashlib.blake2b(key, digest_size=16).hexdigest()


@dataclass(frozen=True)
class SourceDoc:
    """A submitted document before loading: inline text, raw file bytes, or a URI to fetch."""

    id: str
    text: str | None = None
    content: bytes | None = None
    uri: str | None = None
    name: str | None = None  # the original file name; its suffix picks the parser
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": SCHEMA_VERSION, "id": self.id}
        for key in ("text", "content", "uri", "name"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.metadata:
            d["metadata"] = self.metadata
        return d

    @classmethod
    def from_dict(cls, d: Any) -> SourceDoc:
        """Validate one message (from the inbox, a JSONL line or a claim-check payload)."""
        if not isinstance(d, dict):
            raise DecodeError(f"a document must be an object, got {type(d).__name__}")
        version = d.get("v", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise DecodeError(f"unsupported schema version {version!r} (this build reads v{SCHEMA_VERSION})")
        doc_id = d.get("id")
        _check_id(doc_id)
        bodies = [k for k in ("text", "content", "uri") if d.get(k) is not None]
        if len(bodies) != 1:
            raise DecodeError(f"document {doc_id!r} needs exactly one of 'text', 'content', 'uri'")
        expected = {"text": str, "content": bytes, "uri": str, "name": str, "metadata": dict}
        for key, kind in expected.items():
            if d.get(key) is not None and not isinstance(d[key], kind):
                raise DecodeError(f"document {doc_id!r}: {key!r} must be {kind.__name__}")
        unknown = set(d) - set(expected) - {"v", "id"}
        if unknown:
            raise DecodeError(f"document {doc_id!r}: unknown fields {sorted(map(str, unknown))[:10]}")
        for key in ("text", "uri", "name"):
            if d.get(key) is not None:
                _check_unicode(d[key], f"document {doc_id!r}: {key!r}")
        metadata = d.get("metadata") or {}
        _check_metadata(metadata, doc_id)
        if len(json.dumps(metadata, ensure_ascii=False).encode()) > MAX_METADATA_BYTES:
            raise DecodeError(f"document {doc_id!r}: metadata over {MAX_METADATA_BYTES} bytes as JSON")
        return cls(
            id=doc_id,
            text=d.get("text"),
            content=d.get("content"),
            uri=d.get("uri"),
            name=d.get("name"),
            metadata=metadata,
        )


def batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    """itertools.batched, which Python 3.11 lacks."""
    it = iter(items)
    while group := list(islice(it, n)):
        yield group


def batched_by_size(items: Iterable[Any], n: int, max_bytes: int) -> Iterator[list[Any]]:
    """Submitted documents grouped into load batches: at most n items and about max_bytes of document
    bodies (at least one item each). Both runtimes and every producer group the same way."""
    group: list[Any] = []
    size = 0
    for item in items:
        body = getattr(item, "text", None) or getattr(item, "content", None) or b""
        if group and (len(group) == n or size + len(body) > max_bytes):
            yield group
            group, size = [], 0
        group.append(item)
        size += len(body)
    if group:
        yield group


@dataclass(frozen=True)
class Document:
    """A loaded, cleaned document."""

    id: str
    text: str
    content_hash: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Chunk:
    """A piece of a document that fits the model; `text == document.text[char_start:char_end]`."""

    chunk_id: str
    doc_id: str
    index: int
    text: str
    tokens: int
    char_start: int
    char_end: int
    metadata: dict[str, Any] = field(default_factory=dict)
    # The model's token IDs of the text, special tokens excluded, as little-endian uint32 bytes (local
    # models; empty for API models, which read the text): the embed stage feeds them to the model as is.
    token_ids: bytes = b""
    # EMBEDPIPE_CHUNK_TEMPLATE rendered for this chunk (its title, heading path...): the model reads
    # header + text; the store keeps the text. Its tokens are counted in `tokens`.
    header: str = ""

    def model_text(self, prefix: str = "") -> str:
        """The text the model reads: the spec's document prefix, the header, the chunk."""
        return prefix + self.header + self.text


@dataclass(frozen=True)
class BatchPlan:
    """What the chunker planned for a batch: how many embed parts, the embedding spec's fingerprint, each
    chunked document's chunk IDs, and the documents skipped because the store holds them unchanged.
    Distributed, it is a Redis hash (keys.batch_plan) that every later stage reads, only through here."""

    parts: int
    spec: str
    chunks: dict[str, list[str]]  # doc_id -> its chunk IDs, in order
    unchanged: list[str] = field(default_factory=list)  # doc_ids not chunked: stored already, unchanged

    HEADER = ("parts", "spec")  # the fields every job reads, without the chunk lists

    def to_hash(self) -> dict[str, Any]:
        return {
            "parts": self.parts,
            "spec": self.spec,
            "chunks": msgpack.packb(self.chunks, use_bin_type=True),
            "unchanged": msgpack.packb(self.unchanged, use_bin_type=True),
        }

    @classmethod
    def from_hash(cls, fields: dict[bytes, bytes]) -> BatchPlan:
        """The plan from HGETALL; a missing or malformed one is a DecodeError."""
        parts, spec = cls.header_from([fields.get(b"parts"), fields.get(b"spec")]) or (None, None)
        if parts is None or spec is None or b"chunks" not in fields:
            raise DecodeError("batch plan is missing (expired, or the batch is not chunked yet)")
        try:
            chunks = msgpack.unpackb(fields[b"chunks"], raw=False)
            unchanged = msgpack.unpackb(fields[b"unchanged"], raw=False) if b"unchanged" in fields else []
        except ValueError as e:  # msgpack's errors are ValueErrors
            raise DecodeError(f"batch plan is malformed: {type(e).__name__}: {e}") from e
        if not isinstance(chunks, dict) or not all(
            isinstance(d, str) and isinstance(ids, list) and all(isinstance(i, str) for i in ids)
            for d, ids in chunks.items()
        ):
            raise DecodeError("batch plan: the chunk lists are not {document ID: [chunk IDs]}")
        if not isinstance(unchanged, list) or not all(isinstance(d, str) for d in unchanged):
            raise DecodeError("batch plan: the unchanged documents are not a list of IDs")
        return cls(parts, spec, chunks, unchanged)

    @staticmethod
    def header_from(values: list[bytes | None]) -> tuple[int, str] | None:
        """(parts, spec) from the HEADER fields (HMGET); None while there is no plan."""
        raw_parts, raw_spec = values
        if raw_parts is None or raw_spec is None:
            return None
        try:
            return int(raw_parts), raw_spec.decode()
        except (ValueError, UnicodeDecodeError) as e:
            raise DecodeError(f"batch plan is malformed: {type(e).__name__}: {e}") from e

    @property
    def expected_chunks(self) -> int:
        """Chunks of the documents the plan chunked."""
        return sum(map(len, self.chunks.values()))


@dataclass(frozen=True)
class PruneRequest:
    """A sync's prune (`enqueue --prune`): how many document IDs the sources list now (`listed`: they are
    in the Redis set keys.kept_set), the ID prefix it is limited to, the guard's share and whether it is
    overridden. The claim check of a prune job (keys.kept_ids), which only the `worker` and `admin` Redis
    users may write. A client before the set sent the IDs themselves in `kept` (`listed` None)."""

    kept: list[str] = dataclasses.field(default_factory=list)
    scope: str = ""
    max_fraction: float = 0.1
    force: bool = False
    listed: int | None = None

    def encode(self) -> bytes:
        return msgpack.packb(dataclasses.asdict(self), use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes | str | None) -> PruneRequest:
        try:
            d = msgpack.unpackb(raw, raw=False) if raw is not None else None
        except Exception as e:  # msgpack raises several types on garbage
            raise DecodeError(f"prune request is not valid msgpack: {type(e).__name__}: {e}") from e
        if isinstance(d, list):  # the bare ID list an older CLI sent: no scope, the default guard
            d = {"kept": d}
        if not isinstance(d, dict) or set(d) - {f.name for f in dataclasses.fields(cls)}:
            raise DecodeError("prune request is missing or not a map of kept, scope, max_fraction, force, listed")
        request = cls(**d)
        kinds = (
            isinstance(request.kept, list)
            and all(isinstance(i, str) for i in request.kept)
            and isinstance(request.scope, str)
            and type(request.max_fraction) in (int, float)
            and 0 <= request.max_fraction <= 1
            and type(request.force) is bool
            and (request.listed is None or (type(request.listed) is int and request.listed >= 0))
        )
        if not kinds:
            raise DecodeError(
                "prune request: kept must be a list of IDs, scope a string, max_fraction in [0, 1], listed a count"
            )
        return request


@dataclass(frozen=True)
class DeadLetter:
    """A document that failed for good, with what is needed to understand and redrive it."""

    doc_id: str
    stage: str
    reason: str
    message: str
    attempts: int = 1
    at: float = 0.0
    source: dict[str, Any] | None = None  # the SourceDoc as submitted, when small enough to keep
    spec: str = ""  # with several models (EMBEDPIPE_MODELS): the lane of the model that failed it


def pack(items: list[Any]) -> bytes:
    """Encode a list of message dataclasses (or plain dicts) as msgpack. Fields are read shallowly
    (dataclasses.asdict deep-copies every metadata dict: a third of the chunk stage's cost)."""
    return msgpack.packb([_fields(i) if dataclasses.is_dataclass(i) else i for i in items], use_bin_type=True)


def _fields(item: Any) -> dict[str, Any]:
    return {name: getattr(item, name) for name in _names(type(item))}


@functools.cache
def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _unpack_list(raw: bytes | None, what: str) -> list[Any]:
    if raw is None:
        raise DecodeError(f"{what} payload is missing (expired or never written)")
    try:
        items = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types
        raise DecodeError(f"{what} payload is not valid msgpack: {e}") from e
    if not isinstance(items, list):
        raise DecodeError(f"{what} payload must be a list")
    return items


def _build(cls: type, items: list[Any], what: str) -> list[Any]:
    names = set(_names(cls))
    types = _FIELD_TYPES.get(cls, {})
    try:
        out = []
        for item in items:
            if not isinstance(item, dict) or not set(item) <= names:
                raise DecodeError(f"{what} item has unexpected shape")
            for key, kind in types.items():
                if key in item and not isinstance(item[key], kind):
                    raise DecodeError(f"{what} item: {key!r} must be {kind.__name__}")
            out.append(cls(**item))
        return out
    except TypeError as e:
        raise DecodeError(f"{what} item is incomplete: {e}") from e


# Fields whose type a payload from Redis must have (the rest are checked where they are used).
_FIELD_TYPES: dict[type, dict[str, type]] = {
    Document: {"id": str, "text": str, "content_hash": str, "metadata": dict},
    Chunk: {
        "chunk_id": str,
        "doc_id": str,
        "text": str,
        "tokens": int,
        "metadata": dict,
        "token_ids": bytes,
        "header": str,
    },
}


def decode_documents(raw: bytes | None) -> list[Document]:
    return _build(Document, _unpack_list(raw, "documents"), "documents")


def decode_chunks(raw: bytes | None) -> list[Chunk]:
    return _build(Chunk, _unpack_list(raw, "chunks"), "chunks")


def decode_sources(raw: bytes | None) -> list[dict[str, Any]]:
    """Source payloads stay dicts here: each is validated one by one, so one bad item only
    fails its own document."""
    return _unpack_list(raw, "sources")


def decode_inbox_message(raw: bytes) -> SourceDoc:
    """An inbox message is a JSON object or a msgpack map (see the README for the schema)."""
    data: Any
    if raw[:1] in (b"{", b"[", b" ", b"\n", b"\r", b"\t"):  # msgpack maps never start so
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
            raise DecodeError(f"inbox message is not valid JSON: {str(e)[:200]}") from None
    else:
        try:
            data = msgpack.unpackb(raw, raw=False)
        except Exception as e:
            raise DecodeError(f"inbox message is neither JSON nor msgpack: {str(e)[:200]}") from None
    return SourceDoc.from_dict(data)


def encode_dead_letter(letter: DeadLetter) -> bytes:
    return msgpack.packb(dataclasses.asdict(letter), use_bin_type=True)


def decode_dead_letter(raw: bytes) -> DeadLetter:
    try:
        return DeadLetter(**msgpack.unpackb(raw, raw=False))
    except Exception as e:
        raise DecodeError(f"dead letter is not valid: {e}") from e
