"""Chunk stage: Documents -> token-bounded Chunks, packed into embed parts.

Chunks are counted with the embedding model's own tokenizer, so none exceeds what the model reads
(256 - 2 special = 254 tokens for all-MiniLM-L6-v2; a longer input is silently truncated by the
model). Cuts prefer paragraph, then sentence, then word boundaries; consecutive chunks overlap.

Each document is tokenised once. For a local model the chunk's token IDs are a slice of the
document's and travel with the chunk (`Chunk.token_ids`): the embed stage feeds them to the model
as they are and never tokenises again. The cut search runs on numpy arrays: no Python loop per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from shared.lanes import share_id
from shared.messages import BatchPlan, Chunk, Document, chunk_id
from shared.metrics import CHUNK_TOKENS, CHUNKS
from shared.models import Tokens
from shared.settings import Settings
from shared.spec import ChunkPolicy
from shared.store import open_store
from shared.store_types import Store
from shared.tokenizers import Tokenizer
from shared.vectors import pack_token_ids
from workers.batch import make_plan
from workers.batch_redis import RedisBatch
from workers.context import JobReport, WorkerContext, stage_job
from workers.write import finalize_batch

STAGE = "chunk"

# Boundaries in the text, with their strength: a paragraph beats a line beats a sentence (a word: 0.5).
# (Only where each match ends counts; a leading character class scans faster than a lookbehind.)
_BOUNDARIES = ((re.compile(r"\n\s*\n"), 3), (re.compile(r"\n"), 2), (re.compile(r"[.!?;:]\s+"), 1))
_WORD = 0.5


def chunk_batch(docs: list[Document], tokenizer: Tokenizer, policy: ChunkPolicy) -> list[Chunk]:
    """All chunks of all documents, in document order (the batch tokenised in one call)."""
    out: list[Chunk] = []
    for doc, tokens in zip(docs, tokenizer.encode_batch([d.text for d in docs]), strict=True):
        out.extend(_chunks(doc, tokens, tokenizer, policy))
    return out


def chunk_document(doc: Document, tokenizer: Tokenizer, policy: ChunkPolicy) -> list[Chunk]:
    return chunk_batch([doc], tokenizer, policy)


def _chunks(doc: Document, tokens: Tokens, tokenizer: Tokenizer, policy: ChunkPolicy) -> list[Chunk]:
    template = policy.template
    room = policy.max_tokens - (_header_tokens(doc, tokenizer, policy) if template else 0)
    cuts = _cuts(doc.text, tokens, replace(policy, max_tokens=room))
    spans = [tokens.span(a, b) for a, b in cuts]
    headers = _fit_headers(template.headers(doc.text, doc.metadata, [s for s, _ in spans]), tokenizer, policy)
    if tokenizer.ids_are_model_inputs and not template:  # the model reads the slice itself: never over
        ids = [pack_token_ids(tokens.ids[a:b]) for a, b in cuts]
        counts = [b - a for a, b in cuts]
    else:  # the model tokenises header + text, which can come out a few tokens longer than the slice
        spans = _fit(doc.text, spans, headers, tokenizer, policy.max_tokens)
        ids = [b""] * len(spans)
        counts = tokenizer.count([h + doc.text[s:e] for h, (s, e) in zip(headers, spans, strict=True)])
    seen: dict[str, int] = {}
    chunks = []
    for index, ((start, end), token_ids, count, header) in enumerate(zip(spans, ids, counts, headers, strict=True)):
        text = doc.text[start:end]
        occurrence = seen.get(text, 0)
        seen[text] = occurrence + 1
        chunks.append(
            Chunk(
                chunk_id=chunk_id(doc.id, text, occurrence),
                doc_id=doc.id,
                index=index,
                text=text,
                tokens=count,
                char_start=start,
                char_end=end,
                metadata=doc.metadata,
                token_ids=token_ids,
                header=header,
            )
        )
    return chunks


def _strength(text: str, tokens: Tokens) -> np.ndarray:
    """strength[i]: how good it is to start a chunk at token i (0: inside a word, never cut there if
    anything better is in reach)."""
    n = len(tokens)
    strength = np.zeros(n + 1, dtype=np.float32)
    strength[:n][tokens.word_start] = _WORD
    for pattern, value in _BOUNDARIES:  # strongest first, so a plain assignment never lowers one
        ends = [m.end() for m in pattern.finditer(text)]
        if ends:
            at = tokens.first_at(ends)  # the first token starting at or after the boundary
            at = at[(at > 0) & (at < n)]
            strength[at] = np.maximum(strength[at], value)
    return strength


def _cuts(text: str, tokens: Tokens, policy: ChunkPolicy) -> list[tuple[int, int]]:
    """Token ranges [start, end) of windows of at most max_tokens tokens, each cut at the strongest
    boundary in its second half (the latest of equals); the next window starts at the strongest
    boundary within the overlap before the cut (the earliest of equals)."""
    n = len(tokens)
    if n == 0:
        return []
    strength = _strength(text, tokens)
    cuts = []
    start, size, overlap = 0, policy.max_tokens, policy.overlap_tokens
    while True:
        if start + size >= n:
            end = n
        else:
            lo, hi = start + max(size // 2, 1) + 1, start + size
            end = hi - int(np.argmax(strength[lo : hi + 1][::-1])) if lo <= hi else hi
        cuts.append((start, end))
        if end >= n:
            return cuts
        back = max(end - overlap, start + 1)
        start = back + int(np.argmax(strength[back:end])) if overlap and back < end else end


def _fit(
    text: str, spans: list[tuple[int, int]], headers: list[str], tokenizer: Tokenizer, max_tokens: int
) -> list[tuple[int, int]]:
    """Tokenising a chunk (after its header) on its own can give a few more tokens than its slice of
    the document (word pieces at the edges): shrink any chunk that ends up over the limit."""
    counts = tokenizer.count([h + text[s:e] for h, (s, e) in zip(headers, spans, strict=True)])
    fitted = []
    for (start, end), header, count in zip(spans, headers, counts, strict=True):
        while count > max_tokens:
            offsets = tokenizer.offsets(text[start:end])
            keep = max(len(offsets) - (count - max_tokens), 1)
            end = start + offsets[keep - 1][1]
            count = tokenizer.count([header + text[start:end]])[0]
            if keep == 1:
                break
        fitted.append((start, end))
    return fitted


def _header_tokens(doc: Document, tokenizer: Tokenizer, policy: ChunkPolicy) -> int:
    """The tokens to keep free in each chunk of `doc` for its header: its longest one (at most a quarter
    of a chunk; _fit_headers cuts longer ones)."""
    longest = max(tokenizer.count(policy.template.all_headers(doc.text, doc.metadata)), default=0)
    return min(longest + 1, policy.max_tokens // 4)  # +1: a header and a chunk can tokenise into one more


def _fit_headers(headers: list[str], tokenizer: Tokenizer, policy: ChunkPolicy) -> list[str]:
    """Headers cut to a quarter of a chunk's tokens at most (a title of a thousand words is no context)."""
    if not policy.template:
        return headers
    limit = policy.max_tokens // 4 - 1
    counts = tokenizer.count(headers)
    cut = {h: h[: tokenizer.offsets(h)[limit - 1][1]] + "\n" for h, n in zip(headers, counts, strict=True) if n > limit}
    return [cut.get(h, h) for h in headers]


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


def skip_unchanged(docs: list[Document], store: Store) -> tuple[list[Document], list[Document]]:
    """(changed or new, unchanged): a document whose text the store already holds under this
    embedding spec is not chunked, embedded or written again."""
    known = store.doc_hashes([d.id for d in docs])
    unchanged = [d for d in docs if known.get(d.id) == d.content_hash]
    return [d for d in docs if known.get(d.id) != d.content_hash], unchanged


def without_metadata(chunks: list[Chunk]) -> list[Chunk]:
    """Chunks as they travel: their document's metadata stays in the batch's documents payload, where
    the writer takes it back (a copy in every chunk made 100 KB of metadata on a 1 MB document into
    101 MB of Redis)."""
    return [replace(c, metadata={}) if c.metadata else c for c in chunks]


@dataclass(frozen=True)
class PlannedBatch:
    plan: BatchPlan
    docs: list[Document]  # the documents chunked: new or changed
    parts: list[list[Chunk]]  # embed parts, in order

    @property
    def chunks(self) -> list[Chunk]:
        return [c for part in self.parts for c in part]


ChunkMemo = dict[tuple[int, ChunkPolicy], dict[str, list[Chunk]]]  # (tokenizer, policy) -> doc_id -> chunks


def plan_batch(
    docs: list[Document],
    store: Store,
    tokenizer: Tokenizer,
    policy: ChunkPolicy,
    settings: Settings,
    spec: str,
    memo: ChunkMemo | None = None,
) -> PlannedBatch:
    """The chunk stage of a batch, in both runtimes: skip what the store holds unchanged, chunk the rest,
    pack the chunks into embed parts (settings.part_max_chunks, part_max_tokens), and plan the batch.
    With a `memo`, a document is cut once for every lane with the same tokenizer and chunk policy."""
    changed, unchanged = skip_unchanged(docs, store)
    if memo is None:
        chunks = chunk_batch(changed, tokenizer, policy)
    else:
        cut = memo.setdefault((id(tokenizer), policy), {})
        todo = [d for d in changed if d.id not in cut]
        for c in chunk_batch(todo, tokenizer, policy):
            cut.setdefault(c.doc_id, []).append(c)
        chunks = [c for d in changed for c in cut.get(d.id, [])]
    parts = pack_parts(chunks, settings.part_max_chunks, settings.part_max_tokens)
    return PlannedBatch(make_plan(changed, unchanged, chunks, len(parts), spec), changed, parts)


def without_stale(
    docs: list[Document], source: str, lanes: dict[str, WorkerContext], settings: Settings
) -> list[Document]:
    """A backfill (`reembed --enqueue`) carries texts read from collection `source` a while ago. A document
    that collection holds with another text by now (or no longer holds) was edited or deleted since: its
    newer copy, or its deletion, wins in every lane, so the backfill's copy is dropped."""
    if not source:
        return docs
    known = [lane.store for lane in lanes.values() if lane.store.collection == source]
    store = known[0] if known else open_store(settings.store, collection=source)
    try:
        held = store.doc_hashes([d.id for d in docs])
    finally:
        if not known:
            store.close()
    return [d for d in docs if held.get(d.id) == d.content_hash]


@stage_job(STAGE, check_spec=False)
def chunk_job(ctx: WorkerContext, batch: RedisBatch) -> JobReport:
    """rq job: chunk a loaded batch and enqueue one embed job per part, for each lane (several models:
    each lane's share of the batch goes to its own embed queue)."""
    lanes = ctx.lanes or {"": ctx}
    loaded = batch.documents()
    docs, memo = without_stale(loaded, batch.backfill_source(), lanes, ctx.settings), ChunkMemo()
    planned: dict[str, PlannedBatch] = {}
    with ctx.redis.pipeline() as pipe:
        if ctx.lanes:
            batch.put_lanes(list(lanes), pipe)
        for name, lane in lanes.items():
            share = lane.batch(share_id(batch.id, name))
            if share.finalized():  # a redelivered job: this lane is done already
                continue
            p = planned[name] = plan_batch(
                docs, lane.store, lane.tokenizer, lane.chunk_policy, lane.settings, lane.spec.fingerprint, memo
            )
            CHUNKS.inc(len(p.chunks))
            for c in p.chunks:
                CHUNK_TOKENS.observe(c.tokens)
            share.put_plan(p.plan, [without_metadata(part) for part in p.parts], pipe)
            tokens = [sum(c.tokens for c in part) for part in p.parts]
            lane.enqueue_next("embed", [(share.id, i) for i in range(len(p.parts))], pipe, tokens)
        pipe.execute()
    for name, p in planned.items():
        if not p.parts:  # nothing to embed in this lane: its share is complete now
            lane = lanes[name]
            finalize_batch(lane.batch(share_id(batch.id, name)), lane.store)
    changed = {d.id for p in planned.values() for d in p.docs}
    return {
        "documents_stale": len(loaded) - len(docs),
        "documents_ok": len(changed),
        "documents_skipped": len(docs) - len(changed) if planned else 0,
        "chunks": sum(len(p.chunks) for p in planned.values()),
        "parts": sum(len(p.parts) for p in planned.values()),
    }
