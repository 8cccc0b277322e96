"""Load stage: submitted sources (inline text, file bytes, URLs) -> clean Documents.

`load_batch` is pure; `load_job` is the rq job around it. A document that cannot be loaded becomes
a dead letter; the rest of its batch goes on.
"""

from __future__ import annotations

import io
import logging
import re
import unicodedata
from pathlib import PurePosixPath
from typing import Any

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_random_exponential

from shared.errors import DecodeError, DocumentError
from shared.messages import DeadLetter, Document, SourceDoc, content_hash, safe_id
from shared.metrics import DOCUMENTS, count_retry

log = logging.getLogger(__name__)

STAGE = "load"
TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".tsv", ".log", ".json", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
FETCH_TIMEOUT_S = 30.0

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u3000]+")
_ODD_SPACES = re.compile(r"[\t\f\v\u00a0\u2000-\u200a\u3000]")  # spaces other than " "
_BLANK_LINES = re.compile(r"\n{3,}")


def load_batch(sources: list[Any], max_doc_bytes: int) -> tuple[list[Document], list[DeadLetter]]:
    """Turn raw source dicts into clean documents; bad ones into dead letters."""
    docs: list[Document] = []
    dead: list[DeadLetter] = []
    newest = {r.get("id"): i for i, r in enumerate(sources) if isinstance(r, dict) and isinstance(r.get("id"), str)}
    for i, raw in enumerate(sources):
        doc_id = safe_id(raw.get("id") if isinstance(raw, dict) else None, raw)
        if isinstance(raw, dict) and newest.get(raw.get("id"), i) != i:
            continue  # the same ID later in the batch: that newer copy wins
        try:
            source = SourceDoc.from_dict(raw)
            docs.append(load_document(source, max_doc_bytes))
        except DecodeError as e:
            dead.append(DeadLetter(doc_id, STAGE, "decode_error", str(e), source=_keepable(raw)))
        except DocumentError as e:
            dead.append(DeadLetter(doc_id, STAGE, e.reason, e.message, source=_keepable(raw)))
    return docs, dead


def load_document(source: SourceDoc, max_doc_bytes: int) -> Document:
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
            (source.content, "") if source.content is not None else fetch(source.uri or "", max_doc_bytes)
        )
        assert data is not None
        if len(data) > max_doc_bytes:
            raise DocumentError("too_large", f"{len(data)} bytes is over the limit of {max_doc_bytes}")
        text = to_text(data, name, content_type)
    text = clean_text(text)
    if not text:
        raise DocumentError("empty", "no text left after cleaning")
    if run := _LONG_RUN.search(text):
        raise DocumentError("decode_error", f"{MAX_RUN_CHARS}+ characters without a space at {run.start()}: not prose")
    return Document(id=source.id, text=text, content_hash=content_hash(text, metadata), metadata=metadata)


def to_text(data: bytes, name: str, content_type: str = "") -> str:
    """Bytes of a file or HTTP response -> text, by file suffix, content type, or content sniffing."""
    suffix = PurePosixPath(name.split("?")[0]).suffix.lower()
    head = data[:1024].lstrip().lower()
    if suffix in PDF_SUFFIXES or "pdf" in content_type or data.startswith(b"%PDF"):
        return pdf_to_text(data)
    if suffix in HTML_SUFFIXES or "html" in content_type or head.startswith((b"<!doctype html", b"<html")):
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
_LONG_RUN = re.compile(r"\S{" + str(MAX_RUN_CHARS) + "}")


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
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "svg", "nav", "footer", "header", "form"]):
        tag.decompose()
    main = soup.find("main") or soup.find("article") or soup.body or soup
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    body = main.get_text("\n", strip=True)
    return f"{title}\n\n{body}" if title and not body.startswith(title) else body


def pdf_to_text(data: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError("decode_error", "encrypted PDF")
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
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


class _Transient(Exception):
    pass


@retry(
    retry=retry_if_exception_type(_Transient),
    wait=wait_random_exponential(multiplier=0.5, max=10),
    stop=stop_after_attempt(4) | stop_after_delay(60),
    before_sleep=count_retry(STAGE, "io"),
    reraise=True,
)
def _get(uri: str, max_doc_bytes: int) -> tuple[bytes, str]:
    try:
        with httpx.stream("GET", uri, timeout=FETCH_TIMEOUT_S, follow_redirects=True) as response:
            if response.status_code >= 500 or response.status_code == 429:
                raise _Transient(f"HTTP {response.status_code}")
            if response.status_code >= 400:
                raise DocumentError("source_error", f"HTTP {response.status_code} from {uri}")
            body = bytearray()
            for piece in response.iter_bytes():
                body += piece
                if len(body) > max_doc_bytes:
                    raise DocumentError("too_large", f"response from {uri} is over {max_doc_bytes} bytes")
            return bytes(body), response.headers.get("content-type", "")
    except httpx.TransportError as e:
        raise _Transient(f"{type(e).__name__}: {e}") from e


def fetch(uri: str, max_doc_bytes: int) -> tuple[bytes, str]:
    if not uri.startswith(("http://", "https://")):
        raise DocumentError("unsupported_type", f"cannot fetch {uri!r}: only http(s) URLs travel as references")
    try:
        return _get(uri, max_doc_bytes)
    except _Transient as e:
        raise DocumentError("source_error", f"cannot fetch {uri}: {e}") from e


def _keepable(raw: Any) -> dict[str, Any] | None:
    return raw if isinstance(raw, dict) else None


def load_job(batch_id: str) -> dict[str, int]:
    """rq job: load a submitted batch and hand its documents to the chunk stage."""
    from shared import keys
    from shared.messages import decode_sources, pack
    from workers.runtime import context, enqueue_next

    ctx = context()
    if ctx.batch_finalized(batch_id):
        return {"skipped": 1}  # a redelivered job of a batch that is already complete
    sources = decode_sources(ctx.redis.get(keys.sources(batch_id)))
    docs, dead = load_batch(sources, ctx.settings.max_doc_bytes)
    with ctx.redis.pipeline() as pipe:
        ctx.ledger.add_dead(dead, pipe=pipe)
        if docs:
            pipe.set(keys.documents(batch_id), pack(docs), ex=ctx.settings.payload_ttl_s)
            enqueue_next(ctx, "chunk", [(batch_id,)], pipe)
        pipe.execute()
    DOCUMENTS.labels(STAGE, "ok").inc(len(docs))
    DOCUMENTS.labels(STAGE, "failed").inc(len(dead))
    log.info("load %s: %d documents, %d dead letters", batch_id, len(docs), len(dead))
    return {"documents": len(docs), "dead": len(dead)}
