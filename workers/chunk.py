"""Chunk stage: Documents -> token-bounded Chunks, packed into embed parts.

Chunks are counted with the embedding model's own tokenizer, so none exceeds what the model reads
(256 - 2 special = 254 tokens for all-MiniLM-L6-v2; a longer input is silently truncated by the
model). Cuts prefer paragraph, then sentence, then word boundaries; consecutive chunks overlap.
"""

from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from shared.messages import Chunk, Document, chunk_id
from shared.metrics import CHUNK_TOKENS, CHUNKS, DOCUMENTS

log = logging.getLogger(__name__)

STAGE = "chunk"

# Boundaries in the text, with their strength: a paragraph beats a line beats a sentence.
_BOUNDARIES = ((re.compile(r"\n\s*\n"), 3), (re.compile(r"\n"), 2), (re.compile(r"(?<=[.!?;:])\s+"), 1))


class Tokenizer(Protocol):
    def offsets(self, text: str) -> list[tuple[int, int]]: ...
    def count(self, texts: list[str]) -> list[int]: ...


@dataclass(frozen=True)
class ChunkPolicy:
    max_tokens: int  # content tokens per chunk, special tokens excluded
    overlap_tokens: int

    @classmethod
    def for_model(cls, max_content_tokens: int, chunk_tokens: int, overlap: float) -> ChunkPolicy:
        size = min(chunk_tokens or max_content_tokens, max_content_tokens)
        return cls(max_tokens=size, overlap_tokens=int(size * overlap))


def chunk_batch(docs: list[Document], tokenizer: Tokenizer, policy: ChunkPolicy) -> list[Chunk]:
    """All chunks of all documents, in document order."""
    out: list[Chunk] = []
    for doc in docs:
        out.extend(chunk_document(doc, tokenizer, policy))
    return out


def chunk_document(doc: Document, tokenizer: Tokenizer, policy: ChunkPolicy) -> list[Chunk]:
    spans = _fit(doc.text, _spans(doc.text, tokenizer.offsets(doc.text), policy), tokenizer, policy.max_tokens)
    texts = [doc.text[s:e] for s, e in spans]
    counts = tokenizer.count(texts)
    seen: dict[str, int] = {}
    chunks = []
    for index, ((start, end), text, tokens) in enumerate(zip(spans, texts, counts, strict=True)):
        occurrence = seen.get(text, 0)
        seen[text] = occurrence + 1
        chunks.append(
            Chunk(
                chunk_id=chunk_id(doc.id, text, occurrence),
                doc_id=doc.id,
                index=index,
                text=text,
                tokens=tokens,
                char_start=start,
                char_end=end,
                metadata=doc.metadata,
            )
        )
    return chunks


def _spans(text: str, offsets: list[tuple[int, int]], policy: ChunkPolicy) -> list[tuple[int, int]]:
    """Character spans of windows of at most max_tokens tokens, cut at the strongest boundary found
    in the second half of each window."""
    n = len(offsets)
    if n == 0:
        return []
    starts = [s for s, _ in offsets]
    strength = [0] * (n + 1)  # strength[i]: how good it is to start a chunk at token i
    for i in range(1, n):
        prev_end, start = offsets[i - 1][1], offsets[i][0]
        if start > prev_end or not (text[start - 1].isalnum() and text[start].isalnum()):
            strength[i] = 0.5  # a word boundary: never split a word into word pieces
    for pattern, value in _BOUNDARIES:
        for m in pattern.finditer(text):
            i = bisect.bisect_left(starts, m.end())
            if 0 < i < n:
                strength[i] = max(strength[i], value)
    spans = []
    start, size, overlap = 0, policy.max_tokens, policy.overlap_tokens
    while True:
        if start + size >= n:
            end = n
        else:
            window = range(start + size, start + max(size // 2, 1), -1)
            end = max(window, key=lambda i: (strength[i], i))
        spans.append((offsets[start][0], offsets[end - 1][1]))
        if end >= n:
            return spans
        # Step back by the overlap, then forward to the strongest boundary before the cut.
        back = max(end - overlap, start + 1)
        candidates = range(back, end) if overlap else range(end, end + 1)
        start = max(candidates, key=lambda i: (strength[i], -i))


def _fit(text: str, spans: list[tuple[int, int]], tokenizer: Tokenizer, max_tokens: int) -> list[tuple[int, int]]:
    """Re-tokenising a chunk on its own can give a few more tokens than its slice of the document
    (word pieces at the edges): shrink any chunk that ends up over the limit."""
    counts = tokenizer.count([text[s:e] for s, e in spans])
    fitted = []
    for (start, end), count in zip(spans, counts, strict=True):
        while count > max_tokens:
            offsets = tokenizer.offsets(text[start:end])
            end = start + offsets[max_tokens - (count - max_tokens) - 1][1]
            count = tokenizer.count([text[start:end]])[0]
        fitted.append((start, end))
    return fitted


def pack_parts(chunks: list[Chunk], max_chunks: int, max_tokens: int) -> list[list[Chunk]]:
    """Group chunks into embed parts, in order: at most max_chunks chunks and a padded cost of at most
    max_tokens, where padded cost = longest chunk x number of chunks (what a padded forward pass over
    the part would compute, as TEI counts its batches). A document's chunks stay in one part whenever
    they fit in one; only a document too large for a part of its own is split (in order)."""
    parts: list[list[Chunk]] = []
    current: list[Chunk] = []
    longest = 0

    def fits(n: int, tokens: int) -> bool:
        return len(current) + n <= max_chunks and max(longest, tokens) * (len(current) + n) <= max_tokens

    for doc in _runs_by_document(chunks):
        doc_longest = max(c.tokens for c in doc)
        if current and not fits(len(doc), doc_longest):
            parts.append(current)
            current, longest = [], 0
        for c in doc:  # the whole document fits now, unless it is too large for any part
            if current and not fits(1, c.tokens):
                parts.append(current)
                current, longest = [], 0
            current.append(c)
            longest = max(longest, c.tokens)
    if current:
        parts.append(current)
    return parts


def _runs_by_document(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Consecutive chunks of the same document, in order."""
    runs: list[list[Chunk]] = []
    for c in chunks:
        if runs and runs[-1][0].doc_id == c.doc_id:
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


def skip_unchanged(docs: list[Document], store: Any) -> tuple[list[Document], list[Document]]:
    """(changed or new, unchanged): a document whose text the store already holds under this
    embedding spec is not chunked, embedded or written again."""
    known = store.doc_hashes([d.id for d in docs])
    unchanged = [d for d in docs if known.get(d.id) == d.content_hash]
    DOCUMENTS.labels(STAGE, "skipped").inc(len(unchanged))
    return [d for d in docs if known.get(d.id) != d.content_hash], unchanged


def chunk_job(batch_id: str) -> dict[str, int]:
    """rq job: chunk a loaded batch and enqueue one embed job per part."""
    import msgpack

    from shared import keys
    from shared.messages import decode_documents, pack
    from workers.runtime import context, enqueue_next

    ctx = context()
    if ctx.batch_finalized(batch_id):
        return {"skipped": 1}  # a redelivered job of a batch that is already complete
    docs, unchanged = skip_unchanged(decode_documents(ctx.redis.get(keys.documents(batch_id))), ctx.store)
    chunks = chunk_batch(docs, ctx.tokenizer, ctx.chunk_policy)
    parts = pack_parts(chunks, ctx.settings.part_max_chunks, ctx.settings.part_max_tokens)
    CHUNKS.inc(len(chunks))
    for c in chunks:
        CHUNK_TOKENS.observe(c.tokens)
    DOCUMENTS.labels(STAGE, "ok").inc(len(docs))
    ttl = ctx.settings.payload_ttl_s
    plan: dict[str, bytes | int | str] = {"parts": len(parts), "spec": ctx.spec.fingerprint}
    by_doc: dict[str, list[str]] = {d.id: [] for d in docs}
    for c in chunks:
        by_doc[c.doc_id].append(c.chunk_id)
    plan.update({f"doc:{doc_id}": msgpack.packb(ids) for doc_id, ids in by_doc.items()})
    with ctx.redis.pipeline() as pipe:
        if unchanged:
            ctx.ledger.clear_dead([d.id for d in unchanged], pipe=pipe)
            ctx.ledger.incr(pipe=pipe, documents_skipped=len(unchanged))
        pipe.delete(keys.batch_plan(batch_id))
        pipe.hset(keys.batch_plan(batch_id), mapping=plan)
        pipe.expire(keys.batch_plan(batch_id), ttl)
        for p, part in enumerate(parts):
            pipe.set(keys.chunks(batch_id, p), pack(part), ex=ttl)
        tokens = [sum(c.tokens for c in part) for part in parts]
        enqueue_next(ctx, "embed", [(batch_id, p) for p in range(len(parts))], pipe, tokens)
        if not parts:  # nothing to embed: the batch is complete now
            pipe.set(keys.batch_finalized(batch_id), 1, ex=ttl)
            pipe.delete(*keys.batch_keys(batch_id, 0))
        pipe.execute()
    log.info(
        "chunk %s: %d documents -> %d chunks in %d parts; %d unchanged, skipped",
        batch_id,
        len(docs),
        len(chunks),
        len(parts),
        len(unchanged),
    )
    return {"chunks": len(chunks), "parts": len(parts), "unchanged": len(unchanged)}
