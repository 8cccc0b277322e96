import msgpack
import numpy as np
import pytest

from shared.errors import DecodeError
from shared.messages import (
    Chunk,
    DeadLetter,
    SourceDoc,
    chunk_id,
    decode_chunks,
    decode_dead_letter,
    decode_inbox_message,
    encode_dead_letter,
    pack,
)


def test_inbox_accepts_json_and_msgpack():
    as_json = decode_inbox_message(b'{"v":1,"id":"doc-1","text":"hello","metadata":{"lang":"en"}}')
    as_msgpack = decode_inbox_message(
        msgpack.packb({"v": 1, "id": "doc-1", "text": "hello", "metadata": {"lang": "en"}})
    )
    assert as_json == as_msgpack == SourceDoc(id="doc-1", text="hello", metadata={"lang": "en"})


@pytest.mark.parametrize(
    "raw, complaint",
    [
        (b"not json at all", "neither JSON nor msgpack"),
        (b'{"v":1,"text":"no id"}', "non-empty string 'id'"),
        (b'{"v":1,"id":5,"text":"x"}', "non-empty string 'id'"),
        (b'{"v":2,"id":"a","text":"x"}', "unsupported schema version 2"),
        (b'{"v":1,"id":"a","text":"x","uri":"http://h"}', "exactly one of"),
        (b'{"v":1,"id":"a","text":["x"]}', "'text' must be str"),
        (b'{"v":1,"id":"a","text":"x","extra":1}', "unknown fields"),
        (b"[1, 2]", "must be an object"),
    ],
)
def test_bad_inbox_messages_raise_one_decode_error(raw, complaint):
    with pytest.raises(DecodeError, match=complaint):
        decode_inbox_message(raw)


def test_chunks_round_trip_and_garbage_is_a_decode_error():
    chunk = Chunk("c1", "d1", 0, "text", 1, 0, 4, {"k": "v"})
    assert decode_chunks(pack([chunk])) == [chunk]
    with pytest.raises(DecodeError):
        decode_chunks(b"\xc1garbage")
    with pytest.raises(DecodeError):
        decode_chunks(msgpack.packb([{"chunk_id": "c1"}]))  # incomplete
    with pytest.raises(DecodeError, match="missing"):
        decode_chunks(None)


def test_chunk_ids_depend_on_document_text_and_occurrence_not_position():
    assert chunk_id("d", "same text", 0) == chunk_id("d", "same text", 0)
    assert chunk_id("d", "same text", 0) != chunk_id("d", "same text", 1)
    assert chunk_id("d", "same text", 0) != chunk_id("e", "same text", 0)


def test_dead_letters_keep_their_source_bytes():
    letter = DeadLetter("d", "load", "empty", "nothing", source={"id": "d", "content": b"\x00\x01"})
    assert decode_dead_letter(encode_dead_letter(letter)) == letter


def test_batch_plan_round_trips_and_refuses_what_it_cannot_trust():
    from shared.messages import BatchPlan

    plan = BatchPlan(2, "f00d", {"a": ["c1", "c2"], "b": []})
    fields = {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in plan.to_hash().items()}
    assert BatchPlan.from_hash(fields) == plan
    for broken in (
        {},  # expired
        {**fields, b"parts": b"many"},
        {**fields, b"chunks": b"\xc1"},  # not msgpack
        {**fields, b"chunks": msgpack.packb({"a": "c1"})},  # not a list of IDs
        {**fields, b"chunks": msgpack.packb({"a": [1]})},
    ):
        with pytest.raises(DecodeError):
            BatchPlan.from_hash(broken)


def test_chunk_payloads_are_type_checked_and_token_ids_match_their_count():
    from shared.vectors import pack_token_ids, unpack_token_ids

    good = Chunk("c", "d", 0, "two words", 2, 0, 9, {}, pack_token_ids([7, 8]))
    assert decode_chunks(pack([good])) == [good] and list(unpack_token_ids(good)) == [7, 8]
    [fields] = msgpack.unpackb(pack([good]))
    for field, value in (("text", 5), ("token_ids", "not bytes"), ("tokens", "2")):
        raw = msgpack.packb([{**fields, field: value}])
        with pytest.raises(DecodeError):
            decode_chunks(raw)
    with pytest.raises(DecodeError, match="token IDs"):
        unpack_token_ids(Chunk("c", "d", 0, "two words", 3, 0, 9, {}, pack_token_ids([7, 8])))


def test_vectors_travel_as_little_endian_bytes_of_their_dtype():
    from shared.vectors import pack_vectors, unpack_vectors

    v = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert len(pack_vectors(v)) == 3 * 8 * 4 and len(pack_vectors(v, "float16")) == 3 * 8 * 2
    np.testing.assert_array_equal(unpack_vectors(pack_vectors(v), 3), v)
    half = unpack_vectors(pack_vectors(v, "float16"), 3, "float16")
    assert half.dtype == np.float32 and np.abs(half - v).max() < 2e-3
    assert np.frombuffer(pack_vectors(v)[:4], "<f4")[0] == v[0, 0]  # little-endian on any host
    for raw, rows in ((None, 3), (pack_vectors(v)[:-1], 3), (pack_vectors(np.full((1, 2), np.nan)), 1)):
        with pytest.raises(DecodeError):
            unpack_vectors(raw, rows)
