"""Load stage: submitted sources (inline text, file bytes, URLs) -> clean Documents.

`load_batch` is pure; `load_job` is the rq job around it. A document that cannot be loaded becomes
a dead letter; the rest of its batch goes on.
"""

from __future__ import annotations

import io
import re
import unicodedata
from pathlib import PurePosixPath
from typing import Any

from bs4 import BeautifulSoup
from pypdf import PdfReader
from pypdf.errors import PdfReadError

from shared.errors import DecodeError, DocumentError
from shared.messages import DeadLetter, Document, SourceDoc, content_hash, safe_id
from workers.batch_redis import RedisBatch
from workers.context import JobReport, WorkerContext, stage_job
from workers.fetch import FetchPolicy, fetch

STAGE = "load"
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".tsv", ".log", ".json", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u3000]+")
_ODD_SPACES = re.compile(r"[\t\f\v\u00a0\u2000-\u200a\u3000]")  # spaces other than " "
_BLANK_LINES = re.compile(r"\n{3,}")


def load_batch(
    sources: list[Any], max_doc_bytes: int, fetch_policy: FetchPolicy | None = None
) -> tuple[list[Document], list[DeadLetter]]:
    """Turn raw source dicts into clean documents; bad ones into dead letters. URLs are fetched under
    `fetch_policy` (default: public addresses only)."""
    docs: list[Document] = []
    dead: list[DeadLetter] = []
    newest = {r.get("id"): i for i, r in enumerate(sources) if isinstance(r, dict) and isinstance(r.get("id"), str)}
    for i, raw in enumerate(sources):
        doc_id = safe_id(raw.get("id") if isinstance(raw, dict) else None, raw)
        if isinstance(raw, dict) and newest.get(raw.get("id"), i) != i:
            continue  # the same ID later in the batch: that newer copy wins
        try:
            source = SourceDoc.from_dict(raw)
            docs.append(load_document(source, max_doc_bytes, fetch_policy))
        except DecodeError as e:
            dead.append(DeadLetter(doc_id, STAGE, "decode_error", str(e), source=_keepable(raw)))
        except DocumentError as e:
            dead.append(DeadLetter(doc_id, STAGE, e.reason, e.message, source=_keepable(raw)))
    return docs, dead


def load_document(source: SourceDoc, max_doc_bytes: int, fetch_policy: FetchPolicy | None = None) -> Document:
    name = source.name or source.uri or source.id
    metadata = dict(source.metadata)
    metadata.setdefault("source", name)
    if source.text is not None:
        if len(source.text) > max_doc_bytes:
            raise DocumentError(
                "too_large", f"text of {len(source.text)} characters is over the limit of {max_doc_bytes}"
            )
        text = source.text
    else:
        data, content_type = (
            (source.content, "") if source.content is not None else fetch(source.uri or "", max_doc_bytes, fetch_policy)
        )
        assert data is not None
        if len(data) > max_doc_bytes:
            raise DocumentError("too_large", f"{len(data)} bytes is over the limit of {max_doc_bytes}")
        text = to_text(data, name, content_type, max_doc_bytes)
        if len(text) > max_doc_bytes:  # a small file can hold a lot of text (a PDF repeating a page)
            raise DocumentError("too_large", f"{len(text)} characters of text is over the limit of {max_doc_bytes}")
    text = clean_text(text)
    if not text:
        raise DocumentError("empty", "no text left after cleaning")
    if run := _LONG_RUN.search(text):
        raise DocumentError("decode_error", f"{MAX_RUN_CHARS}+ characters without a space at {run.start()}: not prose")
    return Document(id=source.id, text=text, content_hash=content_hash(text, metadata), metadata=metadata)


def to_text(data: bytes, name: str, content_type: str = "", max_chars: int = 20_000_000) -> str:
    """Bytes of a file or HTTP response -> text, by file suffix, content type, or content sniffing;
    extraction stops once it passes max_chars (the caller refuses the document then)."""
    suffix = PurePosixPath(name.split("?")[0]).suffix.lower()
    head = data[:1024].lstrip().lower()
    if suffix in PDF_SUFFIXES or "pdf" in content_type or data.startswith(b"%PDF"):
        return pdf_to_text(data, max_chars)
    if suffix in HTML_SUFFIXES or "html" in content_type or head.startswith((b"<!doctype html", b"<html")):
        if (tags := data.count(b"<")) > MAX_HTML_TAGS:
            raise DocumentError("too_large", f"HTML of {tags} tags is over the limit of {MAX_HTML_TAGS}")
        return html_to_text(decode_bytes(data))
    if suffix in TEXT_SUFFIXES or content_type.startswith("text/") or suffix not in _BINARY_SUFFIXES:
        return decode_bytes(data)
    raise DocumentError("unsupported_type", f"cannot read files of type {suffix!r}")


_BINARY_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".bmp",
    ".ico",
    ".zip",
    ".gz",
    ".tar",
    ".7z",
    ".exe",
    ".bin",
    ".so",
    ".dll",
    ".mp3",
    ".mp4",
    ".wav",
    ".avi",
    ".mov",
    ".doc",
    ".docx",
    ".xls",
    ".xlsx",
    ".ppt",
    ".pptx",
    ".parquet",
    ".pkl",
    ".npy",
    ".pt",
    ".safetensors",
    ".woff",
    ".woff2",
    ".ttf",
}


_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xf4][\x80-\xbf]+")
MAX_RUN_CHARS = 65_536  # a "word" this long is not text the model can read (base64, minified data)
# Only from the start of a run: \S{N} alone retries at every character of a shorter run, quadratic in
# the run (a 262 KB text took 24.6 s); anchored, one pass (19.7 MB in 0.34 s).
_LONG_RUN = re.compile(r"(?<!\S)\S{" + str(MAX_RUN_CHARS) + "}")
# The HTML parser keeps every tag as an object (~500 bytes each): 2 MB of tiny tags took it to 326 MB.
MAX_HTML_TAGS = 100_000
MAX_PDF_PAGES = 10_000


def decode_bytes(data: bytes) -> str:
    """UTF-8 when it is; cp1252 (by far the most common legacy encoding of text files) when the
    bytes hold no UTF-8 at all; anything else, e.g. UTF-8 mixed with other bytes, is refused."""
    if b"\x00" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DocumentError("unsupported_type", "binary content (NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf8_error = e
    if _UTF8_MULTIBYTE.search(data):
        raise DocumentError(
            "decode_error",
            f"mixed encodings: UTF-8 text with invalid bytes ({utf8_error.reason} at byte {utf8_error.start})",
        )
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError as e:
        raise DecodeError(f"neither UTF-8 nor cp1252: {e.reason} at byte {e.start}") from e


def html_to_text(html: str) -> str:
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg", "nav", "footer", "header", "form"]):
        tag.decompose()
    main = soup.find("main") or soup.find("article") or soup.body or soup
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    body = main.get_text("\n", strip=True)
    return f"{title}\n\n{body}" if title and not body.startswith(title) else body


def pdf_to_text(data: bytes, max_chars: int = 20_000_000) -> str:
    """The text of every page, until it passes max_chars (a 30 KB PDF may list one page 3,000 times)."""
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError("decode_error", "encrypted PDF")
        if len(reader.pages) > MAX_PDF_PAGES:
            raise DocumentError("too_large", f"a PDF of {len(reader.pages)} pages is over the limit of {MAX_PDF_PAGES}")
        pages, size = [], 0
        for page in reader.pages:
            pages.append(page.extract_text() or "")
            size += len(pages[-1]) + 2
            if size > max_chars:
                break
        return "\n\n".join(pages)
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise DocumentError("decode_error", f"unreadable PDF: {type(e).__name__}: {e}") from e


def clean_text(text: str) -> str:
    """NFC, no control characters, runs of spaces collapsed, at most one blank line in a row.
    Paragraph breaks are kept: the chunker prefers to cut there."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text.replace("\t", " "))
    if "  " in text or _ODD_SPACES.search(text):  # most texts hold single " " only: nothing to collapse
        text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return (_BLANK_LINES.sub("\n\n", text) if "\n\n\n" in text else text).strip()


def _keepable(raw: Any) -> dict[str, Any] | None:
    return raw if isinstance(raw, dict) else None


@stage_job(STAGE, check_spec=False)
def load_job(ctx: WorkerContext, batch: RedisBatch) -> JobReport:
    """rq job: load a submitted batch and hand its documents to the chunk stage."""
    policy = FetchPolicy.parse(ctx.settings.fetch_allow)
    docs, dead = load_batch(batch.sources(), ctx.settings.max_doc_bytes, policy)
    with ctx.redis.pipeline() as pipe:
        ctx.ledger.add_dead(dead, pipe=pipe)
        if docs:
            batch.put_documents(docs, pipe)
            ctx.enqueue_next("chunk", [(batch.id,)], pipe)
        pipe.execute()
    return {"documents_ok": len(docs), "documents_failed": len(dead)}
