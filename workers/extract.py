"""Bytes of a file or an HTTP response -> text: the format from the file suffix, the content type or
the first bytes; the encoding of text from a byte-order mark, valid UTF-8, a declared charset, or
charset-normalizer's detection when it is sure (never a guess that would store mojibake).
"""

from __future__ import annotations

import codecs
import io
import re
from pathlib import PurePosixPath
from typing import Any

from charset_normalizer import from_bytes
from pypdf import PdfReader
from pypdf.errors import PdfReadError

from shared.errors import DocumentError
from workers.extract_html import html_to_text

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".tsv", ".log", ".json", ""}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
OFFICE_SUFFIXES = {".docx", ".pptx", ".xlsx"}
_OFFICE_TYPES = {
    "wordprocessingml.document": ".docx",
    "presentationml.presentation": ".pptx",
    "spreadsheetml.sheet": ".xlsx",
}
_BINARY_SUFFIXES = {
    ".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".ico", ".zip", ".gz", ".tar", ".7z", ".exe", ".bin", ".so",
    ".dll", ".mp3", ".mp4", ".wav", ".avi", ".mov", ".doc", ".xls", ".ppt", ".parquet", ".pkl", ".npy", ".pt",
    ".safetensors", ".woff", ".woff2", ".ttf",
}  # fmt: skip

# The HTML parser keeps every tag as an object: 2 MB of tiny tags took BeautifulSoup to 326 MB;
# trafilatura (lxml) to 117 MB at 99,000 tags (bench/html_extract.py).
MAX_HTML_TAGS = 100_000
MAX_PDF_PAGES = 10_000

# charset-normalizer scores each decoding by "chaos" (the share of characters out of place: symbols
# inside words, scripts mixed, accents piled up) and "coherence" (how well its letters fit a language).
# A decoding is plausible up to MAX_CHAOS; it is taken only when its language is recognised (or it
# has next to no chaos) and it leads every other plausible decoding by MIN_LEAD in coherence - chaos.
# Otherwise it could be either, and storing the wrong one is mojibake: a decode_error instead.
# cp1252 (the most common legacy encoding) wins a tie: short French or German text ties cp1252 and
# cp1250, and the loader has always read such files as cp1252.
MAX_CHAOS = 0.1
MIN_COHERENCE = 0.1
MAX_CHAOS_UNKNOWN_LANGUAGE = 0.02
MIN_LEAD = 0.1
_TIE = 0.01
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"))
_BOMS += ((codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_UTF8_CHAR = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}")
_HIGH = bytes(range(128, 256))
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([a-zA-Z0-9_.:-]{1,40})""", re.IGNORECASE)
_CONTENT_TYPE_CHARSET = re.compile(r"charset\s*=\s*[\"']?([a-zA-Z0-9_.:-]{1,40})", re.IGNORECASE)
# As browsers read them (WHATWG Encoding): pages labelled Latin-1 or ASCII are cp1252 in practice.
_LABEL_AS = {"iso-8859-1": "cp1252", "iso8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252"}
_LABEL_AS |= {"us-ascii": "cp1252", "ascii": "cp1252"}


def to_text(data: bytes, name: str, content_type: str = "", max_chars: int = 20_000_000) -> str:
    """Bytes of a file or HTTP response -> text, by file suffix, content type, or content sniffing;
    extraction stops once it passes max_chars (the caller refuses the document then)."""
    suffix = PurePosixPath(name.split("?")[0]).suffix.lower()
    head = data[:1024].lstrip().lower()
    declared = _declared(content_type)
    if suffix in PDF_SUFFIXES or "pdf" in content_type or data.startswith(b"%PDF"):
        return pdf_to_text(data, max_chars)
    office = (
        suffix if suffix in OFFICE_SUFFIXES else next((s for t, s in _OFFICE_TYPES.items() if t in content_type), "")
    )
    if office:
        from workers.extract_office import office_to_text  # the optional `office` extra

        return office_to_text(data, office, max_chars)
    if suffix in HTML_SUFFIXES or "html" in content_type or head.startswith((b"<!doctype html", b"<html")):
        if (tags := data.count(b"<")) > MAX_HTML_TAGS:
            raise DocumentError("too_large", f"HTML of {tags} tags is over the limit of {MAX_HTML_TAGS}")
        meta = _META_CHARSET.search(data[:4096])
        return html_to_text(decode_bytes(data, declared or (meta.group(1).decode("ascii") if meta else "")))
    if suffix in TEXT_SUFFIXES or content_type.startswith("text/") or suffix not in _BINARY_SUFFIXES:
        return decode_bytes(data, declared)
    raise DocumentError("unsupported_type", f"cannot read files of type {suffix!r}")


def decode_bytes(data: bytes, declared: str = "") -> str:
    """Text from bytes: by their byte-order mark; as UTF-8 when they are; in the `declared` charset
    (an HTML meta tag, an HTTP header) when they decode in it; else in the encoding charset-normalizer
    detects, when it is sure. UTF-8 mixed with other bytes, and bytes whose encoding it cannot tell,
    are decode_error; bytes that are no text (NUL bytes, not UTF-16/32) unsupported_type."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return _strict(data, encoding, "by its byte-order mark")
    if b"\x00" in data[:8192]:  # UTF-16 or UTF-32 without a byte-order mark, or not text
        return _detect(data, wide_only=True)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        utf8_error = e
    if _mostly_utf8(data):
        raise DocumentError(
            "decode_error",
            f"mixed encodings: UTF-8 text with invalid bytes ({utf8_error.reason} at byte {utf8_error.start})",
        )
    if encoding := _codec(declared):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass  # a wrong label is common: detect instead
    return _detect(data)


def _mostly_utf8(data: bytes) -> bool:
    """UTF-8 with some bytes of another encoding: at least as many valid UTF-8 characters as stray
    bytes. (Legacy text holds a few valid-looking pairs by chance: "Т»" in cp1251 is one.)"""
    chars = _UTF8_CHAR.findall(data)
    stray = len(data) - len(data.translate(None, _HIGH)) - sum(map(len, chars))
    return len(chars) >= max(stray, 1)


def _detect(data: bytes, wide_only: bool = False) -> str:
    matches = [m for m in from_bytes(data) if m.chaos <= MAX_CHAOS]
    if wide_only and not (matches and matches[0].encoding.startswith(("utf_16", "utf_32"))):
        raise DocumentError("unsupported_type", "binary content (NUL bytes)")
    if not matches:
        raise DocumentError("decode_error", "not text in any encoding (the bytes look binary or corrupt)")

    def score(m: Any) -> float:
        return float(m.coherence - m.chaos)

    best = max(matches, key=score)
    cp1252 = next((m for m in matches if "cp1252" in m.could_be_from_charset), None)
    if cp1252 is not None and score(cp1252) >= score(best) - _TIE:
        return str(cp1252)
    runner_up = max((m for m in matches if m is not best), key=score, default=None)
    recognised = best.coherence >= MIN_COHERENCE or best.chaos <= MAX_CHAOS_UNKNOWN_LANGUAGE
    if recognised and (runner_up is None or score(best) - score(runner_up) >= MIN_LEAD):
        return str(best)
    guesses = f"{best.encoding}? {runner_up.encoding}?" if runner_up else f"{best.encoding}?"
    raise DocumentError("decode_error", f"cannot tell the text's encoding ({guesses}): save it as UTF-8")


def _strict(data: bytes, encoding: str, how: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise DocumentError("decode_error", f"not {encoding} {how}: {e.reason} at byte {e.start}") from e


def _declared(content_type: str) -> str:
    match = _CONTENT_TYPE_CHARSET.search(content_type)
    return match.group(1) if match else ""


def _codec(label: str) -> str:
    """The Python codec of a charset label, or '' for none or an unknown one."""
    label = label.strip().lower()
    if not label:
        return ""
    try:
        return codecs.lookup(_LABEL_AS.get(label, label)).name
    except LookupError:
        return ""


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
