"""Load stage: submitted sources (inline text, file bytes, URLs) -> clean Documents.

The bytes of a file or URL become text in workers/extract.py (formats, encodings) and the modules
it calls (extract_html.py, extract_office.py); here that text is cleaned and bounded.

`load_batch` is pure; `load_job` is the rq job around it. A document that cannot be loaded becomes
a dead letter; the rest of its batch goes on.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from shared.errors import DecodeError, DocumentError
from shared.messages import DeadLetter, Document, SourceDoc, content_hash, safe_id
from workers.batch_redis import RedisBatch
from workers.context import JobReport, WorkerContext, stage_job
from workers.extract import to_text
from workers.fetch import FetchPolicy, fetch

STAGE = "load"

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


MAX_RUN_CHARS = 65_536  # a "word" this long is not text the model can read (base64, minified data)
# Only from the start of a run: \S{N} alone retries at every character of a shorter run, quadratic in
# the run (a 262 KB text took 24.6 s); anchored, one pass (19.7 MB in 0.34 s).
_LONG_RUN = re.compile(r"(?<!\S)\S{" + str(MAX_RUN_CHARS) + "}")


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
