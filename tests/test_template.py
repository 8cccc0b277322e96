"""EMBEDPIPE_CHUNK_TEMPLATE: the title and heading path the model reads before each chunk."""

import hashlib
import json

import msgpack
import numpy as np
import pytest

from shared.errors import ConfigError, DecodeError
from shared.messages import Chunk, Document, SourceDoc, content_hash, decode_chunks, pack
from shared.settings import Settings
from shared.spec import chunk_policy, spec_for
from shared.store import open_store
from shared.template import ChunkTemplate
from workers.chunk import chunk_batch
from workers.embedded import run_embedded
from workers.load import load_batch

TEMPLATE = "{title} > {heading}\\n{chunk}"  # as typed in a shell: backslash, n
SENTENCE = "The kettle's element is covered in limescale after months of hard water. "
GUIDE = (
    "# Kettle care\n\nA short guide to keeping an electric kettle clean.\n\n"
    "## Descaling\n\n" + SENTENCE * 30 + "\n\n"
    "### With vinegar\n\n" + "Fill it halfway with white vinegar, boil, and leave it for an hour. " * 12 + "\n\n"
    "## Cleaning the outside\n\nWipe it with a damp cloth and dry it."
)


def doc(text: str, metadata: dict | None = None) -> Document:
    return Document("guide.md", text, content_hash(text), metadata or {"path": "care/guide.md"})


@pytest.mark.parametrize(
    "template, complaint",
    [
        ("{chunk}\n{title}", "must end with"),
        ("{title}\n", "must end with"),
        ("{chunk}{chunk}", "once"),
        ("{title.__class__}\n{chunk}", "plain field name"),
        ("{0}\n{chunk}", "plain field name"),
        ("{title!r}\n{chunk}", "plain field name"),
        ("{title:>300}\n{chunk}", "plain field name"),
        ("{title\n{chunk}", "not a valid template"),
    ],
)
def test_a_bad_template_is_a_config_error(template, complaint):
    with pytest.raises(ConfigError, match=complaint):
        Settings.from_env({"EMBEDPIPE_CHUNK_TEMPLATE": template})


def test_headers_carry_the_title_and_the_heading_path():
    template = ChunkTemplate.parse(TEMPLATE)
    assert template.head == "{title} > {heading}\n"  # the typed \n is a line break
    starts = [0, GUIDE.index("A short"), GUIDE.index("The kettle"), GUIDE.index("Fill it"), GUIDE.index("Wipe")]
    assert template.headers(GUIDE, {"path": "care/guide.md"}, starts) == [
        "Kettle care > Kettle care\n",  # a chunk that starts with a heading is under it
        "Kettle care > Kettle care\n",
        "Kettle care > Kettle care > Descaling\n",
        "Kettle care > Kettle care > Descaling > With vinegar\n",
        "Kettle care > Kettle care > Cleaning the outside\n",  # a level-2 heading closes the level-3 one
    ]
    # metadata wins for the title; without headings the file name is the title; unknown fields are empty
    assert ChunkTemplate.parse("{title}|{author}|{heading}: {chunk}").headers(
        "plain text", {"path": "notes/tea-times.txt", "author": "  Ann\n Lee "}, [0]
    ) == ["tea-times|Ann Lee|: "]
    assert ChunkTemplate.parse("{heading}: {chunk}").headers("intro\n# Later", {}, [0]) == [": "]  # none above
    assert ChunkTemplate.parse("{title}: {chunk}").headers(GUIDE, {"title": "Manual"}, [0]) == ["Manual: "]


def test_the_chunker_counts_the_header_and_the_store_keeps_the_chunk_alone(tokenizer):
    policy = chunk_policy(Settings(chunk_template=TEMPLATE), tokenizer)
    chunks = chunk_batch([doc(GUIDE)], tokenizer, policy)
    assert len(chunks) >= 3
    for c in chunks:
        assert c.text == GUIDE[c.char_start : c.char_end] and c.header.startswith("Kettle care > ")
        assert c.tokens == tokenizer.count([c.model_text()])[0] <= policy.max_tokens
        assert c.token_ids == b""  # the model reads header + text: the embedder tokenises that
    vinegar = next(c for c in chunks if c.text.startswith("Fill it"))
    assert vinegar.header == "Kettle care > Kettle care > Descaling > With vinegar\n"

    plain = chunk_batch([doc(GUIDE)], tokenizer, chunk_policy(Settings(), tokenizer))
    assert all(c.header == "" and c.token_ids for c in plain)


def test_a_huge_title_is_cut_to_a_quarter_of_a_chunk(tokenizer):
    policy = chunk_policy(Settings(chunk_template="{title}\\n{chunk}"), tokenizer)
    chunks = chunk_batch([doc(SENTENCE * 40, {"title": "word " * 5000})], tokenizer, policy)
    assert len(chunks) >= 4
    assert all(tokenizer.count([c.header])[0] < policy.max_tokens // 4 for c in chunks)
    assert all(c.tokens <= policy.max_tokens for c in chunks)


def test_the_template_is_part_of_the_spec_and_no_template_keeps_old_collection_names():
    plain, templated = spec_for(Settings()), spec_for(Settings(chunk_template=TEMPLATE))
    assert templated.chunk_template == "{title} > {heading}\n{chunk}"
    assert templated.collection != plain.collection
    # the fingerprint of a spec without a template is what it was before the field existed
    fields = plain.to_dict()
    del fields["query_prefix"], fields["chunk_template"]
    old = hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=8).hexdigest()
    assert plain.fingerprint == old


def test_the_header_travels_with_the_chunk_and_is_checked():
    chunk = Chunk("c1", "d1", 0, "text", 3, 0, 4, header="Title\n")
    assert decode_chunks(pack([chunk])) == [chunk]
    bad = {**pack_fields(chunk), "header": 7}
    with pytest.raises(DecodeError, match="header"):
        decode_chunks(msgpack.packb([bad]))


def pack_fields(chunk: Chunk) -> dict:
    return msgpack.unpackb(pack([chunk]), raw=False)[0]


@pytest.mark.slow
def test_the_model_reads_the_header_and_search_shows_the_chunk(tmp_path, embedder, tokenizer):
    settings = Settings.from_env({"EMBEDPIPE_CHUNK_TEMPLATE": TEMPLATE}, store=str(tmp_path / "store"))
    source = SourceDoc(id="guide.md", text=GUIDE, metadata={"path": "care/guide.md"})
    summary = run_embedded(settings, [source], embedder=embedder)
    assert summary.failed == 0 and summary.chunks >= 3

    [loaded], _ = load_batch([source.to_dict()], settings.max_doc_bytes)  # cleaned as the run cleaned it
    expected = {c.chunk_id: c for c in chunk_batch([loaded], tokenizer, chunk_policy(settings, tokenizer))}
    store = open_store(settings.store)
    vectors = store.vectors()
    assert set(vectors) == set(expected)
    ids = sorted(expected)
    stored = np.stack([vectors[i] for i in ids])
    with_header = embedder.embed([expected[i].model_text() for i in ids])
    alone = embedder.embed([expected[i].text for i in ids])
    assert np.min(np.sum(stored * with_header, axis=1)) >= 0.9999
    assert np.max(np.sum(stored * alone, axis=1)) < 0.99
    [hit] = store.search(embedder.embed(["descaling a kettle with white vinegar"])[0], 1)
    assert hit.text == expected[hit.chunk_id].text and not hit.text.startswith("Kettle care >")
