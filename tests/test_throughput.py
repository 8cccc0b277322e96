"""Throughput machinery: token-budget parts, token-budget micro-batches that keep the order, halving
on CUDA out-of-memory (the exception injected into the real model's forward pass, as a CPU cannot run
out of GPU memory), and the ONNX int8 and bf16 backends against torch on the sample corpus.

Speed itself is measured in bench/throughput.py, never asserted here."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from shared.errors import EmbedFailures
from shared.messages import Chunk, Document, SourceDoc, content_hash
from shared.metrics import EMBED_MICRO_BATCH_LIMIT, EMBED_OOM_HALVINGS, EMBED_PADDED_TOKENS, EMBED_TOKENS
from shared.spec import ChunkPolicy
from workers.chunk import chunk_batch, pack_parts
from workers.embedder import REGROW_AFTER, LocalEmbedder

from .helpers import EXAMPLES

MODEL = "all-MiniLM-L6-v2"


def chunk(doc: str, i: int, tokens: int) -> Chunk:
    return Chunk(f"{doc}-{i}", doc, i, f"text {doc} {i}", tokens, 0, 1)


def document(doc_id: str, text: str) -> Document:
    return Document(doc_id, text, content_hash(text))


def padded(part: list[Chunk]) -> int:
    return max(c.tokens for c in part) * len(part)


# --- parts: the transport unit ------------------------------------------------------------------


def test_parts_are_packed_by_padded_cost_and_keep_whole_documents():
    # a: 3 x 100, b: 1 x 250 + 2 x 10, c: 4 x 50
    chunks = [chunk("a", i, 100) for i in range(3)]
    chunks += [chunk("b", 0, 250), chunk("b", 1, 10), chunk("b", 2, 10)]
    chunks += [chunk("c", i, 50) for i in range(4)]
    parts = pack_parts(chunks, max_chunks=100, max_tokens=800)
    assert [c for p in parts for c in p] == chunks  # chunk order kept
    assert all(padded(p) <= 800 for p in parts)
    # a + b would be 6 chunks x 250 = 1500 padded (the sum of tokens, 570, would have fitted): b starts
    # a part of its own; c joins b (7 x 250 > 800, so no): every document stays whole.
    assert [[c.doc_id for c in p] for p in parts] == [["a"] * 3, ["b"] * 3, ["c"] * 4]


def test_a_document_larger_than_a_part_is_split_in_order_and_max_chunks_holds():
    chunks = [chunk("small", 0, 20), *[chunk("big", i, 200) for i in range(10)], chunk("tail", 0, 20)]
    parts = pack_parts(chunks, max_chunks=4, max_tokens=600)
    assert [c for p in parts for c in p] == chunks
    assert all(len(p) <= 4 and padded(p) <= 600 for p in parts)
    assert [c.chunk_id for c in parts[0]] == ["small-0"]  # big does not fit beside small
    assert sum(1 for p in parts if any(c.doc_id == "big" for c in p)) == 4  # 10 x 200 at <= 3 per part


def test_parts_of_real_chunks_hold_the_budget(tokenizer):
    docs = [
        document(f"d{i}", "\n\n".join(["A paragraph about tea and its many varieties."] * n))
        for i, n in enumerate((1, 40, 3, 120, 2))
    ]
    chunks = chunk_batch(docs, tokenizer, ChunkPolicy.for_model(254, 0, 0.1))
    parts = pack_parts(chunks, max_chunks=512, max_tokens=2048)
    assert [c for p in parts for c in p] == chunks
    assert all(padded(p) <= 2048 or len(p) == 1 for p in parts)
    for doc in docs:  # documents that fit in one part are in one part
        mine = [c for c in chunks if c.doc_id == doc.id]
        holding = [p for p in parts if any(c.doc_id == doc.id for c in p)]
        if padded(mine) <= 2048:
            assert len(holding) == 1


# --- micro-batches: the compute unit ------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_chunks(tokenizer) -> list[Chunk]:
    """Real chunks of very different lengths, in an order that is not sorted by length."""
    base = [
        "Short.",
        " ".join(["Green tea is steeped at eighty degrees for two minutes."] * 20),
        "A medium sentence about the key exchange between a client and a server.",
        " ".join(["Cytochrome c release regulates apoptosis in mitochondria."] * 8),
        "Another short one.",
        " ".join(["The quick brown fox jumps over the lazy dog again."] * 14),
    ]
    texts = [f"Copy {k}. {t}" for k in range(3) for t in base]  # all distinct
    docs = [document(f"m{i}", t) for i, t in enumerate(texts)]
    return chunk_batch(docs, tokenizer, ChunkPolicy.for_model(254, 0, 0.1))


@pytest.fixture(scope="module")
def reference(embedder, mixed_chunks) -> np.ndarray:
    """Each chunk encoded on its own by sentence-transformers: no batching, no padding."""
    return np.stack([embedder._model.encode([c.text], normalize_embeddings=True)[0] for c in mixed_chunks])


class RecordingForward:
    """Wraps the real model's forward pass: records the rows of each micro-batch (the token IDs the
    model reads, special tokens included) and, like a GPU of `capacity` padded tokens, raises CUDA's
    out-of-memory error for a forward pass larger than that."""

    def __init__(self, embedder: LocalEmbedder, capacity: int = 10**9) -> None:
        import torch

        self.real, self.capacity, self.calls, self.refused = embedder._model.forward, capacity, [], 0
        self.error = torch.cuda.OutOfMemoryError
        embedder._model.forward = self  # nn.Module.__call__ runs the instance's forward

    def __call__(self, features, **kwargs):
        ids, mask = features["input_ids"], features["attention_mask"]
        cost = ids.shape[0] * ids.shape[1]
        if cost > self.capacity:
            self.refused += 1
            raise self.error(f"CUDA out of memory (injected): {cost} padded tokens > {self.capacity}")
        self.calls.append([tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask, strict=True)])
        return self.real(features, **kwargs)


def model_rows(embedder: LocalEmbedder, chunks: list[Chunk]) -> dict[tuple[int, ...], int]:
    """What the model reads of each chunk ([CLS] IDs [SEP]) -> its length."""
    tok = embedder._tokenizer
    return {tuple([*tok.head_ids, *np.frombuffer(c.token_ids, "<u4"), *tok.tail_ids]): c.tokens + 2 for c in chunks}


@pytest.mark.slow
def test_micro_batches_follow_the_token_budget_and_vectors_come_back_in_order(mixed_chunks, reference):
    embedder = LocalEmbedder(MODEL, "cpu", batch_size=4, micro_batch_tokens=600).warm_up()
    forward = RecordingForward(embedder)
    tokens_before, padded_before = EMBED_TOKENS._value.get(), EMBED_PADDED_TOKENS._value.get()
    vectors = embedder.embed_chunks(mixed_chunks)
    by_row = model_rows(embedder, mixed_chunks)
    for rows in forward.calls:
        lengths = [by_row[r] for r in rows]
        assert lengths == sorted(lengths, reverse=True)  # each micro-batch is sorted, longest first
        assert len(rows) <= 4 and (len(rows) == 1 or max(lengths) * len(rows) <= 600)
    assert sorted(r for call in forward.calls for r in call) == sorted(by_row)  # each chunk's IDs, once
    assert vectors.shape == (len(mixed_chunks), 384)
    np.testing.assert_allclose((vectors * reference).sum(axis=1), 1.0, atol=2e-3)  # row i is chunk i
    # padding efficiency = real / padded tokens, both counted per micro-batch
    real = EMBED_TOKENS._value.get() - tokens_before
    assert len(by_row) == len(mixed_chunks) and real == sum(by_row.values())
    assert 0.5 < real / (EMBED_PADDED_TOKENS._value.get() - padded_before) <= 1.0


@pytest.mark.slow
def test_out_of_memory_halves_the_micro_batch_then_regrows(mixed_chunks, reference):
    embedder = LocalEmbedder(MODEL, "cpu", batch_size=64, micro_batch_tokens=4096).warm_up()
    forward = RecordingForward(embedder, capacity=1200)  # a "GPU" that holds 1200 padded tokens
    halvings = EMBED_OOM_HALVINGS._value.get()
    vectors = embedder.embed_chunks(mixed_chunks)
    np.testing.assert_allclose((vectors * reference).sum(axis=1), 1.0, atol=2e-3)  # nothing lost, in order
    assert forward.refused >= 1 and EMBED_OOM_HALVINGS._value.get() - halvings == forward.refused
    assert embedder.micro_batch_limit <= 1200 < 4096
    assert EMBED_MICRO_BATCH_LIMIT._value.get() == embedder.micro_batch_limit
    # the memory is back: after runs of successes the budget grows, slowly, back to what was configured
    forward.capacity = 10**9
    limits = [embedder.micro_batch_limit]
    short = [c for c in mixed_chunks if c.tokens < 30]
    while embedder.micro_batch_limit < 4096:
        for c in short:  # one micro-batch each
            embedder.embed_chunks([c])
        limits.append(embedder.micro_batch_limit)
        assert len(limits) < 50
    assert all(b <= a * 1.25 + 1 for a, b in itertools.pairwise(limits))  # slowly
    assert embedder.micro_batch_limit == 4096
    assert len(forward.calls) >= REGROW_AFTER


@pytest.mark.slow
def test_a_single_text_that_still_runs_out_of_memory_fails_alone(mixed_chunks, reference):
    embedder = LocalEmbedder(MODEL, "cpu", micro_batch_tokens=4096).warm_up()
    longest = max(c.tokens for c in mixed_chunks) + 2
    RecordingForward(embedder, capacity=longest - 1)  # the longest chunks cannot pass, even alone
    with pytest.raises(EmbedFailures) as caught:
        embedder.embed_chunks(mixed_chunks)
    failed = caught.value.failed
    assert set(failed) == {i for i, c in enumerate(mixed_chunks) if c.tokens + 2 == longest}
    assert all("out of memory" in m for m in failed.values())
    vectors = caught.value.vectors
    ok = [i for i in range(len(mixed_chunks)) if i not in failed]
    np.testing.assert_allclose((vectors[ok] * reference[ok]).sum(axis=1), 1.0, atol=2e-3)
    assert not vectors[list(failed)].any()  # rows of failed chunks are zeros


# --- ONNX Runtime, int8 --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_chunks(tokenizer) -> list[Chunk]:
    from producer.sources import iter_sources, resolve
    from workers.load import load_batch

    sources = [s.to_dict() for s in iter_sources(resolve([str(EXAMPLES)]), 10**8) if isinstance(s, SourceDoc)]
    docs, _ = load_batch(sources, 10**8)
    return chunk_batch(docs, tokenizer, ChunkPolicy.for_model(254, 0, 0.1))


@pytest.mark.slow
def test_onnx_int8_matches_torch_on_the_sample_corpus_and_is_cached(embedder, example_chunks, tmp_path):
    cache = tmp_path / "onnx"
    onnx = LocalEmbedder(MODEL, "cpu", backend="onnx-int8", cache_dir=cache).warm_up()  # exported offline, here
    [exported] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert (exported / "model.onnx").is_file() and (exported / "meta.json").is_file()
    assert len(example_chunks) > 20
    got, want = onnx.embed_chunks(example_chunks), embedder.embed_chunks(example_chunks)
    cosine = (got * want).sum(axis=1)
    assert cosine.min() >= 0.99, f"min cosine {cosine.min():.4f} (mean {cosine.mean():.4f})"
    # a second embedder reuses the file on disk: no new export
    stamp = os.stat(exported / "model.onnx").st_mtime_ns
    again = LocalEmbedder(MODEL, "cpu", backend="onnx-int8", cache_dir=cache).warm_up()
    assert again._model.file == exported / "model.onnx"
    assert os.stat(exported / "model.onnx").st_mtime_ns == stamp
    assert [p.name for p in cache.iterdir()] == [exported.name]
    np.testing.assert_allclose(again.embed(["a query"]), onnx.embed(["a query"]), atol=1e-6)


# --- torch bf16 on the CPU -----------------------------------------------------------------------


@pytest.mark.slow
def test_bf16_matches_float32_on_the_sample_corpus_and_names_its_own_collection(embedder, example_chunks):
    from shared.settings import Settings
    from shared.spec import spec_for

    bf16 = LocalEmbedder(MODEL, "cpu", backend="torch-bf16").warm_up()
    got, want = bf16.embed_chunks(example_chunks), embedder.embed_chunks(example_chunks)
    cosine = (got * want).sum(axis=1)
    assert cosine.min() >= 0.99, f"min cosine {cosine.min():.4f} (mean {cosine.mean():.4f})"
    assert cosine.min() < 0.99999  # the forward really ran in bfloat16
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # float32, normalised
    # its vectors differ from float32's, so they go to a collection of their own
    assert spec_for(Settings(backend="torch-bf16")).collection != spec_for(Settings()).collection
