"""The chunk stage's batch function, with the model's real tokenizer."""

import itertools

import pytest

from shared.messages import Document, content_hash
from shared.settings import Settings
from shared.spec import ChunkPolicy, chunk_policy
from workers.chunk import chunk_batch, chunk_document, pack_parts

PARAGRAPH = (
    "Sourdough bread rises thanks to wild yeast and lactic acid bacteria living in a starter. "
    "The baker feeds the starter with flour and water, waits for it to peak, and mixes the dough. "
    "Long fermentation develops flavour, strength and an open crumb."
)


def doc(text: str, doc_id: str = "d") -> Document:
    return Document(doc_id, text, content_hash(text), {"source": doc_id})


@pytest.fixture(scope="module")
def policy(tokenizer):
    return chunk_policy(Settings(), tokenizer)


def test_default_policy_is_the_model_limit_less_special_tokens(tokenizer, policy):
    assert tokenizer.info.max_seq_length == 256 and tokenizer.info.special_tokens == 2
    assert policy == ChunkPolicy(max_tokens=254, overlap_tokens=25)


def test_no_chunk_exceeds_the_limit_even_without_spaces(tokenizer, policy):
    # one 1 MB line of words with no sentence ends, then one "word" of 20k characters (WordPiece
    # reads a word over 100 characters as a single [UNK] token)
    text = "alpha beta gamma delta " * 45000 + "\n\n" + "x" * 20000
    chunks = chunk_document(doc(text), tokenizer, policy)
    assert len(chunks) > 700
    assert max(tokenizer.count([c.text for c in chunks])) <= 254
    assert [c.tokens for c in chunks] == tokenizer.count([c.text for c in chunks])


def test_chunks_are_spans_of_the_text_cut_at_paragraphs_and_overlapping(tokenizer, policy):
    text = "\n\n".join(f"Paragraph {i}. {PARAGRAPH}" for i in range(12))
    chunks = chunk_document(doc(text), tokenizer, policy)
    assert len(chunks) >= 3
    for c in chunks:
        assert text[c.char_start : c.char_end] == c.text
        assert c.metadata == {"source": "d"}
    assert [c.index for c in chunks] == list(range(len(chunks)))
    # every chunk but the last ends at the end of a sentence, and the next chunk starts before it ends
    assert all(c.text.endswith(".") for c in chunks[:-1])
    assert all(b.char_start < a.char_end for a, b in itertools.pairwise(chunks))
    assert chunks[-1].char_end == len(text) and chunks[0].char_start == 0


def test_short_document_is_one_chunk(tokenizer, policy):
    [c] = chunk_document(doc("A short note."), tokenizer, policy)
    assert (c.text, c.char_start, c.char_end) == ("A short note.", 0, 13)


def test_inserting_a_paragraph_keeps_the_ids_of_later_chunks(tokenizer, policy):
    paragraphs = [f"Section {i}. {PARAGRAPH}" for i in range(40)]
    before = chunk_document(doc("\n\n".join(paragraphs)), tokenizer, policy)
    after = chunk_document(doc("\n\n".join(["A new opening paragraph.", *paragraphs])), tokenizer, policy)
    kept = {c.chunk_id for c in before} & {c.chunk_id for c in after}
    assert len(kept) >= len(before) // 2  # positions shifted, most chunk texts (and so IDs) did not


def test_batch_keeps_document_order_and_parts_respect_budgets(tokenizer, policy):
    docs = [doc("\n\n".join([PARAGRAPH] * n), f"d{n}") for n in (1, 8, 3)]
    chunks = chunk_batch(docs, tokenizer, policy)
    assert [c.doc_id for c in chunks] == sorted((c.doc_id for c in chunks), key=["d1", "d8", "d3"].index)
    parts = pack_parts(chunks, max_chunks=3, max_tokens=400)
    assert [c for p in parts for c in p] == chunks
    assert all(len(p) <= 3 and (len(p) == 1 or sum(c.tokens for c in p) <= 400) for p in parts)
