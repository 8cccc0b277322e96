"""The load stage's batch function, with plain lists."""

import re
from pathlib import Path

import pytest

from shared.messages import SourceDoc
from workers.load import clean_text, load_batch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LIMIT = 1_000_000


def load(*sources: SourceDoc):
    return load_batch([s.to_dict() for s in sources], LIMIT)


def test_text_is_normalised_and_paragraphs_kept():
    assert clean_text("Cafe\u0301  au\tlait\x07\r\n\r\n\r\n\r\nNext   para ") == "Café au lait\n\nNext para"


def test_html_loses_scripts_styles_and_boilerplate():
    html = (
        b"<html><head><title>T</title><style>p{}</style><script>alert(1)</script></head>"
        b"<body><nav>menu</nav><main><p>Body text.</p></main></body></html>"
    )
    [doc], dead = load(SourceDoc(id="p.html", content=html, name="p.html"))
    assert dead == []
    assert "Body text." in doc.text and "alert" not in doc.text and "menu" not in doc.text


def test_pdf_text_is_extracted():
    pdf = EXAMPLES / "pdf" / "houseplant-repotting.pdf"
    [doc], dead = load(SourceDoc(id="r.pdf", content=pdf.read_bytes(), name="r.pdf"))
    assert dead == [] and len(doc.text.split()) > 200


def test_bad_documents_become_dead_letters_and_the_batch_goes_on():
    good = SourceDoc(id="good", text="Plenty of words here.")
    docs, dead = load_batch(
        [
            SourceDoc(id="empty", content=b"  \n\t ", name="empty.txt").to_dict(),
            SourceDoc(id="binary", content=b"\x00\x01\x02PK" * 100, name="blob").to_dict(),
            SourceDoc(id="image", content=b"\x89PNG....", name="x.png").to_dict(),
            SourceDoc(id="pdf", content=b"%PDF-1.4 this is not really a pdf", name="bad.pdf").to_dict(),
            SourceDoc(id="big", text="x" * (LIMIT + 1)).to_dict(),
            {"v": 1, "text": "no id"},
            good.to_dict(),
        ],
        LIMIT,
    )
    assert [d.id for d in docs] == ["good"]
    assert {(d.doc_id, d.stage, d.reason) for d in dead} == {
        ("empty", "load", "empty"),
        ("binary", "load", "unsupported_type"),
        ("image", "load", "unsupported_type"),
        ("pdf", "load", "decode_error"),
        ("big", "load", "too_large"),
    } | {(d.doc_id, "load", "decode_error") for d in dead if d.doc_id.startswith("<no id>:")}
    assert sum(d.doc_id.startswith("<no id>:") for d in dead) == 1  # a stand-in ID of its own
    assert all(d.message for d in dead)


def test_legacy_encodings_are_decoded():
    text = "Le café est prêt à être servi, même très chaud. " * 5
    [doc], dead = load(SourceDoc(id="latin1.txt", content=text.encode("cp1252"), name="latin1.txt"))
    assert dead == [] and "café" in doc.text and "prêt" in doc.text


def test_content_hash_follows_the_clean_text_and_the_metadata():
    [a], _ = load(SourceDoc(id="a", text="Same  text", name="note.txt"))
    [b], _ = load(SourceDoc(id="b", text="Same text ", name="note.txt"))
    [c], _ = load(SourceDoc(id="c", text="Other text", name="note.txt"))
    [d], _ = load(SourceDoc(id="d", text="Same text", name="note.txt", metadata={"acl": "team-b"}))
    assert a.content_hash == b.content_hash != c.content_hash
    assert d.content_hash != a.content_hash  # a metadata-only change is a change: every chunk carries it


def test_the_newest_copy_of_a_document_in_a_batch_wins():
    docs, dead = load_batch(
        [{"id": "a", "text": "first version"}, {"id": "b", "text": "other"}, {"id": "a", "text": "second version"}],
        LIMIT,
    )
    assert [(d.id, d.text) for d in docs] == [("b", "other"), ("a", "second version")] and not dead


@pytest.mark.parametrize(
    "message, complaint",
    [
        ({"id": "a\x00b", "text": "x"}, "control characters"),
        ({"id": "lone \ud800", "text": "x"}, "not valid Unicode"),
        ({"id": "t", "text": "hi \ud800 there"}, "not valid Unicode"),
        ({"id": "m", "text": "x", "metadata": {"k": b"bytes"}}, "only JSON values"),
        ({"id": "n", "text": "x", "metadata": {"k": float("nan")}}, "no such number"),
        ({"id": "z", "text": "x", "metadata": {"k": "a\x00b"}}, "NUL"),
        ({"id": "d", "text": "x", "metadata": {"k": [[[[[[[[[[1]]]]]]]]]]}}, "deeper"),
        ({"id": "s", "text": "x", "metadata": {"k": "x" * 20000}}, "bytes as JSON"),
        ({"id": "i", "text": "x", "metadata": {1: "int key"}}, "keys must be strings"),
    ],
)
def test_bad_ids_text_and_metadata_are_dead_letters_of_their_own(message, complaint):
    docs, dead = load_batch([message, {"id": "good", "text": "fine"}], LIMIT)
    assert [d.id for d in docs] == ["good"]
    [letter] = dead
    assert letter.reason == "decode_error" and complaint in letter.message
    letter.doc_id.encode("utf-8")  # the dead letter's own ID is storable
    assert not re.search(r"[\x00-\x1f]", letter.doc_id)


def test_one_hostile_document_is_bounded_and_dead_alone(tmp_path):
    """Each is a dead letter of its own (too_large or decode_error), cheaply, and the batch goes on."""
    import io

    from pypdf import PdfReader, PdfWriter

    # one page listed 3,000 times: a small file, megabytes of text
    page = PdfReader(EXAMPLES / "pdf" / "houseplant-repotting.pdf").pages[0]
    writer = PdfWriter()
    for _ in range(3000):
        writer.add_page(page)
    repeated = io.BytesIO()
    writer.write(repeated)
    # 2.6 MB of 65,535-character "words": the unanchored check took 16 s for a tenth of this, and grows
    # with the square (the suite's per-test timeout would end it); anchored it is one pass
    runs = ("x" * 65_535 + " ") * 40
    docs, dead = load_batch(
        [
            SourceDoc(id="pdf", content=repeated.getvalue(), name="repeated.pdf").to_dict(),
            SourceDoc(id="tags", content=b"<html><body>" + b"<b>" * 200_000, name="tags.html").to_dict(),
            SourceDoc(id="runs", text=runs).to_dict(),
            SourceDoc(id="long-word", text="x" * 70_000).to_dict(),
            SourceDoc(id="good", text="Plenty of words here.").to_dict(),
        ],
        3_000_000,
    )
    assert len(repeated.getvalue()) < 3_000_000 < 3000 * len(page.extract_text())
    assert [d.id for d in docs] == ["runs", "good"]
    assert {(d.doc_id, d.reason) for d in dead} == {
        ("pdf", "too_large"),
        ("tags", "too_large"),
        ("long-word", "decode_error"),
    }
