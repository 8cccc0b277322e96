"""Faithful extraction: HTML as paragraphs without its boilerplate, legacy encodings detected (or refused,
never mojibake), DOCX/PPTX/XLSX through the office extra. Asserted on load_batch's documents, and once
on the chunks `embedpipe run` stores."""

import io
import json
import random
import shutil
import sys
import zipfile

import numpy as np
import pytest

from shared.messages import SourceDoc
from shared.store import open_store
from workers.load import load_batch

from .helpers import EXAMPLES, cli_env, embedpipe

LIMIT = 1_000_000
RUSSIAN = (
    "Векторные представления текста позволяют искать документы по смыслу, а не по совпадению слов. "
    "Модель превращает каждый абзац в точку пространства, и близкие по смыслу абзацы оказываются рядом."
)
CHINESE = (
    "向量检索根据语义查找文档，而不是依靠关键词匹配。模型把每一段文字变成高维空间中的一个点，相近的意思落在相近的位置。"
)


def load(name: str, data: bytes, limit: int = LIMIT):
    docs, dead = load_batch([SourceDoc(id=name, content=data, name=name).to_dict()], limit)
    return (docs[0] if docs else None), (dead[0] if dead else None)


def loaded(name: str, data: bytes) -> str:
    doc, letter = load(name, data)
    assert letter is None, f"{letter.reason}: {letter.message}"
    return doc.text


# --- HTML -----------------------------------------------------------------------------------------
def test_html_keeps_inline_text_on_its_line_paragraphs_apart_and_headings_marked():
    text = loaded("tls.html", (EXAMPLES / "web" / "tls-certificates.html").read_bytes())
    lines = text.split("\n")
    # <strong>certificate</strong> inside its sentence: the old get_text("\n") made three lines of it
    assert any("presents a certificate: a signed document that binds a domain name" in line for line in lines)
    paragraphs = text.split("\n\n")
    assert paragraphs[0] == "# TLS Certificates and Chains of Trust"
    assert "## The chain of trust" in paragraphs and "## Common errors" in paragraphs  # the chunker cuts there
    first = next(p for p in paragraphs if p.startswith("Encryption alone"))
    assert first.endswith("decides whether to trust it.") and "\n" not in first  # one <p>, one paragraph
    items = next(p for p in paragraphs if p.startswith("- The subject public key"))
    assert len(items.split("\n")) == 5 and all(line.startswith("- ") for line in items.split("\n"))
    # navigation, table of contents script, styles and footer are gone
    assert "Home" not in lines and "font-family" not in text and "DOMContentLoaded" not in text
    assert "Privacy" not in text and "©" not in text


def test_html_boilerplate_without_semantic_tags_is_dropped():
    """A blog page with no <main>/<article>: sidebar, comments, share and related-post blocks, a cookie bar."""
    content = "".join(
        f"<p>Paragraph {n} on descaling: dissolve <strong>citric acid</strong> in half a kettle of water, boil it, "
        f"wait a while and rinse the kettle <em>twice</em> with fresh water before use.</p>"
        for n in range(6)
    )
    html = f"""<html><head><title>Descaling | Kitchen Notes</title></head><body>
      <div class="cookie-bar">We use cookies to show personalised adverts. Accept all cookies</div>
      <div class="site-header"><a href="/">Kitchen Notes</a>
        <ul class="menu"><li>Recipes</li><li>Cleaning</li></ul></div>
      <div id="content"><div class="post"><h1 class="entry-title">How to descale a kettle</h1>
        <div class="entry-content">{content}
          <div class="sharedaddy"><h3>Share this:</h3><ul><li>Share on Facebook</li><li>Email a friend</li></ul></div>
          <div class="jp-relatedposts"><h3>Related posts</h3><ul><li>The lazy way to clean oven racks</li></ul></div>
        </div></div>
        <div id="comments" class="comments-area"><ol class="comment-list"><li class="comment">
          <p>Tried the citric acid tonight and it fizzed like mad, thanks!</p></li></ol></div>
      </div>
      <div id="secondary" class="widget-area"><h2 class="widget-title">Recent Posts</h2>
        <ul><li>One-pan gnocchi with peas and lemon</li></ul></div>
      <div class="site-footer">© 2024 Kitchen Notes. All rights reserved.</div></body></html>"""
    text = loaded("post.html", html.encode())
    assert text.count("dissolve citric acid in half a kettle") == 6
    assert all(p.startswith(("# ", "Paragraph ")) for p in text.split("\n\n"))
    for boilerplate in (
        "cookies",
        "Share on Facebook",
        "oven racks",
        "fizzed",
        "gnocchi",
        "rights reserved",
        "Recipes",
    ):
        assert boilerplate not in text


@pytest.mark.parametrize(
    "html, expected",
    [
        # too little for trafilatura's main-content rules: the page's own text, less its navigation
        (
            "<html><head><title>T</title></head><body><nav>menu</nav><main><p>Body text.</p></main></body></html>",
            "# T\n\nBody text.",
        ),
        ("<html><body>Line one<br>Line two<br><br>Para two</body></html>", "Line one\nLine two\n\nPara two"),
        ("<html><body><div>Only a div, with <b>bold</b> text.</div></body></html>", "Only a div, with bold text."),
        (
            "<html><body><table><tr><th>Fault</th><th>Motion</th></tr><tr><td>Normal</td><td>apart</td></tr></table>"
            "</body></html>",
            "Fault | Motion\nNormal | apart",
        ),
    ],
)
def test_short_html_is_kept_not_dropped(html, expected):
    assert loaded("short.html", html.encode()) == expected


def test_html_in_a_declared_legacy_charset():
    html = f'<html><head><meta charset="windows-1251"></head><body><p>{RUSSIAN}</p></body></html>'
    assert RUSSIAN in loaded("ru.html", html.encode("cp1251"))


# --- encodings ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "encoding, text",
    [
        ("cp1251", RUSSIAN),  # became cp1252 mojibake ("Âåêòîðíûå") before
        ("gbk", CHINESE),  # was refused as "mixed encodings"
        ("utf-16-le", CHINESE),  # BOM-less UTF-16: was refused as binary
        ("utf-16-le", "Plain English text, saved as UTF-16 without a byte-order mark.\n" * 3),
        ("utf-16-be", RUSSIAN),
        ("cp1252", "Grüße aus Köln"),  # short cp1252 text keeps working
        ("cp1252", "Le café est prêt."),
        ("cp1252", "It\u2019s done \u2013 isn\u2019t it?"),
    ],
)
def test_legacy_encodings_are_detected(encoding, text):
    assert loaded("doc.txt", text.encode(encoding)) == text.strip()


@pytest.mark.parametrize(
    "name, data",
    [
        (
            "noise.txt",
            bytes(random.Random(1).choices(range(128, 256), k=20)),
        ),  # "decodes" as GB18030 (chaos 0.1, no language)
        ("noise-long.txt", bytes(random.Random(2).choices(range(128, 256), k=400))),
        ("mixed.txt", "Déjà vu in UTF-8, ".encode() + "then Latin-1: déjà".encode("latin-1")),
    ],
)
def test_bytes_whose_encoding_is_unsure_are_decode_errors(name, data):
    doc, letter = load(name, data)
    assert doc is None and letter.reason == "decode_error", doc and doc.text


def test_a_short_legacy_text_is_read_right_or_refused_never_mojibake():
    """Five Chinese or Russian words are too few to tell GBK from cp949, cp1251 from cp1253: either
    the right text or a decode_error naming the candidates."""
    for text, encoding in (("你好，世界。今天天气很好。", "gbk"), ("Привет, мир! Как дела?", "cp1251")):
        doc, letter = load("short.txt", text.encode(encoding))
        assert (doc is not None and doc.text == text) or (letter.reason == "decode_error" and "?" in letter.message)


def test_nul_bytes_that_are_not_utf16_are_binary():
    doc, letter = load("nul.txt", b"text with a NUL\x00 byte in it!")
    assert doc is None and letter.reason == "unsupported_type"


# --- office files ---------------------------------------------------------------------------------
def docx_bytes() -> bytes:
    docx = pytest.importorskip("docx", reason="the office extra is not installed: pip install -e '.[office]'")
    document = docx.Document()
    document.add_heading("Descaling a kettle", level=1)
    paragraph = document.add_paragraph("The crust is ")
    paragraph.add_run("limescale").bold = True
    paragraph.add_run(": calcium carbonate that hard water leaves behind.")
    document.add_heading("What you need", level=2)
    for item in ("Citric acid", "Water", "A soft cloth"):
        document.add_paragraph(item, style="List Bullet")
    table = document.add_table(rows=2, cols=2)
    for r, row in enumerate((("Method", "Time"), ("Citric acid", "20 minutes"))):
        for c, value in enumerate(row):
            table.cell(r, c).text = value
    document.add_paragraph("Rinse twice before the next cup.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_docx_keeps_headings_paragraphs_lists_and_tables():
    assert loaded("kettle.docx", docx_bytes()).split("\n\n") == [
        "# Descaling a kettle",
        "The crust is limescale: calcium carbonate that hard water leaves behind.",
        "## What you need",
        "- Citric acid\n- Water\n- A soft cloth",
        "Method | Time\nCitric acid | 20 minutes",
        "Rinse twice before the next cup.",
    ]


def test_pptx_gives_a_heading_per_slide_with_its_text_tables_and_notes():
    pptx = pytest.importorskip("pptx", reason="the office extra is not installed: pip install -e '.[office]'")
    from pptx.util import Inches

    deck = pptx.Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = "Why descale"
    body = slide.placeholders[1].text_frame
    body.text = "Scale slows the kettle"
    body.add_paragraph().text = "It insulates the element"
    slide.notes_slide.notes_text_frame.text = "Mention hard-water areas."
    second = deck.slides.add_slide(deck.slide_layouts[5])
    second.shapes.title.text = "Methods"
    table = second.shapes.add_table(2, 2, Inches(1), Inches(2), Inches(4), Inches(1)).table
    for (r, c), value in zip([(0, 0), (0, 1), (1, 0), (1, 1)], ["Method", "Time", "Vinegar", "1 hour"], strict=True):
        table.cell(r, c).text = value
    out = io.BytesIO()
    deck.save(out)
    assert loaded("deck.pptx", out.getvalue()).split("\n\n") == [
        "# Why descale",
        "Scale slows the kettle\nIt insulates the element",
        "Mention hard-water areas.",
        "# Methods",
        "Method | Time\nVinegar | 1 hour",
    ]


def test_xlsx_gives_a_heading_per_sheet_and_a_line_per_row():
    openpyxl = pytest.importorskip("openpyxl", reason="the office extra is not installed: pip install -e '.[office]'")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Methods"
    for row in (["Method", "Minutes"], ["Citric acid", 20], [], ["Vinegar", 60]):
        sheet.append(row)
    book.create_sheet("Empty")
    out = io.BytesIO()
    book.save(out)
    assert (
        loaded("methods.xlsx", out.getvalue())
        == "# Methods\n\nMethod | Minutes\nCitric acid | 20\nVinegar | 60\n\n# Empty"
    )


def test_office_files_are_bounded_and_a_damaged_one_is_a_decode_error():
    data = docx_bytes()
    bomb = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for item in src.infolist():
            out.writestr(item, src.read(item))
        out.writestr("word/media/padding.bin", b"\x00" * 4_000_000)  # 4 MB that packs into ~4 KB
    assert len(bomb.getvalue()) < 100_000
    docs, dead = load_batch(
        [
            SourceDoc(id="bomb", content=bomb.getvalue(), name="bomb.docx").to_dict(),
            SourceDoc(id="cut", content=data[: len(data) // 2], name="cut.docx").to_dict(),
            SourceDoc(id="fine", content=data, name="fine.docx").to_dict(),
        ],
        1_000_000,  # unpacked, at most 3x this
    )
    assert [d.id for d in docs] == ["fine"]
    assert {(d.doc_id, d.reason) for d in dead} == {("bomb", "too_large"), ("cut", "decode_error")}
    assert "unpacks to" in next(d.message for d in dead if d.doc_id == "bomb")


def test_office_files_without_the_extra_are_unsupported_type(monkeypatch):
    data = docx_bytes()
    monkeypatch.setitem(sys.modules, "docx", None)  # as if python-docx were not installed
    doc, letter = load("kettle.docx", data)
    assert doc is None and letter.reason == "unsupported_type" and "embedpipe[office]" in letter.message


# --- through `embedpipe run` ----------------------------------------------------------------------
@pytest.mark.slow
def test_stored_chunks_hold_the_faithful_text(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(EXAMPLES / "web" / "tls-certificates.html", corpus)
    (corpus / "vectors-ru.txt").write_bytes(RUSSIAN.encode("cp1251"))
    (corpus / "vectors-zh.txt").write_bytes(CHINESE.encode("gbk"))
    expected = {"tls-certificates.html", "vectors-ru.txt", "vectors-zh.txt"}
    try:
        (corpus / "kettle.docx").write_bytes(docx_bytes())
        expected.add("kettle.docx")
    except pytest.skip.Exception:
        pass  # without the office extra: the rest still runs
    env = cli_env(EMBEDPIPE_STORE=str(tmp_path / "store"))
    summary = json.loads(embedpipe("run", str(corpus), "--json", "--no-progress", env=env).stdout)
    assert summary["failed"] == 0 and summary["documents_stored"] == len(expected)

    store = open_store(str(tmp_path / "store"))
    any_vector = np.asarray(next(store.vectors())[1])
    chunks = {(h.doc_id, h.index): h.text for h in store.search(any_vector, store.count())}
    assert {doc_id for doc_id, _ in chunks} == expected
    tls = [text for (doc_id, _), text in sorted(chunks.items()) if doc_id == "tls-certificates.html"]
    assert tls[0].startswith("# TLS Certificates and Chains of Trust\n\nEncryption alone")
    assert any("presents a certificate: a signed document" in line for t in tls for line in t.split("\n"))
    assert chunks["vectors-ru.txt", 0] == RUSSIAN and chunks["vectors-zh.txt", 0] == CHINESE
    if "kettle.docx" in expected:
        assert "## What you need\n\n- Citric acid\n- Water\n- A soft cloth" in chunks["kettle.docx", 0]
