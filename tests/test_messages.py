import json

import msgpack
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
    json.dumps({"doc_id": letter.doc_id})  # listings never include the raw source
