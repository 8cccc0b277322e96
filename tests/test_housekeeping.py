"""The janitor's decisions with plain lists: the inbox's messages decoded one by one, and a job that
failed for good turned into a dead letter for each of its documents."""

from __future__ import annotations

import json

import msgpack

from shared.errors import DecodeError
from shared.messages import Chunk, Document
from workers.inbox import decode_all
from workers.janitor import failed_job_letters


def test_each_inbox_message_is_decoded_on_its_own_and_a_bad_one_is_a_dead_letter_of_its_own():
    raw = [
        json.dumps({"v": 1, "id": "json", "text": "green tea"}).encode(),
        msgpack.packb({"v": 1, "id": "msgpack", "content": b"bytes", "name": "a.txt"}),
        b"{not json",
        json.dumps({"v": 1, "id": "no-body"}).encode(),
        json.dumps({"v": 1, "id": "surrogate", "text": "\ud83d"}).encode(),  # a lone surrogate
        b"[" * 5000 + b"]" * 5000,  # nested deeper than the parser goes
        json.dumps({"v": 2, "id": "future", "text": "x"}).encode(),
    ]
    sources, dead = decode_all(raw)
    assert [s.id for s in sources] == ["json", "msgpack"]
    assert sources[1].content == b"bytes" and sources[1].name == "a.txt"
    assert [d.doc_id for d in dead][1:3] == ["no-body", "surrogate"] and dead[4].doc_id == "future"  # in order
    by_id = {d.doc_id: d for d in dead}
    assert len(dead) == 5 and all(d.stage == "inbox" and d.reason == "decode_error" for d in dead)
    assert "exactly one of" in by_id["no-body"].message and "Unicode" in by_id["surrogate"].message
    assert "schema version" in by_id["future"].message
    unreadable = [d for d in dead if d.doc_id.startswith("inbox:")]  # no usable ID: one named by its bytes
    assert len(unreadable) == 2 and unreadable[0].doc_id != unreadable[1].doc_id
    assert unreadable[0].source == {"raw": b"{not json"}  # kept (bounded) for whoever looks into it


class Payloads:
    """What a failed job's batch still holds, as plain lists; None: expired (RedisBatch raises then)."""

    def __init__(self, sources=None, documents=None, chunks=None, doc_ids=()):
        self._sources, self._documents, self._chunks, self._doc_ids = sources, documents, chunks, list(doc_ids)

    def sources(self):
        return self._need(self._sources)

    def documents(self):
        return self._need(self._documents)

    def chunks(self, part):
        return self._need(self._chunks)[part]

    def doc_ids(self):
        return self._doc_ids

    @staticmethod
    def _need(value):
        if value is None:
            raise DecodeError("payload is missing (expired or never written)")
        return value


SOURCES = [{"id": "a", "text": "A"}, {"id": "b", "text": "B"}, {"id": "c", "uri": "https://example.org/c"}]
DOCS = [Document(i, i.upper(), i) for i in "abc"]
PARTS = [[Chunk("a-0", "a", 0, "A", 1, 0, 1), Chunk("b-0", "b", 0, "B", 1, 0, 1)], [Chunk("c-0", "c", 0, "C", 1, 0, 1)]]


def test_a_failed_job_becomes_a_dead_letter_for_each_of_its_documents_with_its_source():
    batch = Payloads(SOURCES, DOCS, PARTS, doc_ids="abc")
    letters, part = failed_job_letters("embed", "embed_b1_1", "workers.embed.embed_job", ["b1", 1], "boom", batch)
    assert [(d.doc_id, d.stage, d.reason, d.message) for d in letters] == [("c", "embed", "job_failed", "boom")]
    assert letters[0].source == SOURCES[2] and part == 1  # the part failed: the batch's finalisation removes c

    letters, part = failed_job_letters("load", "load_b1", "workers.load.load_job", ["b1"], "boom", batch)
    assert [d.doc_id for d in letters] == ["a", "b", "c"] and part is None
    letters, part = failed_job_letters("chunk", "chunk_b1", "workers.chunk.chunk_job", ["b1"], "boom", batch)
    assert [d.doc_id for d in letters] == ["a", "b", "c"] and [d.source for d in letters] == SOURCES


def test_a_failed_job_whose_payloads_expired_still_names_each_document():
    expired = Payloads(doc_ids=["a", "b"])
    letters, part = failed_job_letters("write", "write_b1_0", "workers.write.write_job", ["b1", 0], "boom", expired)
    assert [d.doc_id for d in letters] == ["a", "b"] and part is None
    assert all("boom" in d.message and "missing" in d.message for d in letters)
    letters, _ = failed_job_letters("write", "write_b1_0", "workers.write.write_job", ["b1", 0], "boom", Payloads())
    assert [d.doc_id for d in letters] == ["batch:b1"]  # not even the IDs: one letter for the batch


def test_a_foreign_or_unreadable_job_is_one_dead_letter_named_after_the_job():
    letters, part = failed_job_letters("load", "evil", "os.system", ["touch /tmp/x"], "refused", Payloads(SOURCES))
    assert [(d.doc_id, d.message) for d in letters] == [("job:evil", "os.system: refused")] and part is None
    letters, _ = failed_job_letters("load", "gone", "", [], "unreadable job", None)
    assert [(d.doc_id, d.message) for d in letters] == [("job:gone", "unknown function: unreadable job")]
