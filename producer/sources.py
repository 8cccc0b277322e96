"""Source connectors on the client side: files, directories, globs, JSONL files and stdin, URLs.

Local files travel by content (workers may not see the client's disk); URLs travel as references and
the loader fetches them. Document IDs are stable: the path relative to the root given, or the
record's own id. What cannot be submitted becomes a DeadLetter here, before anything is enqueued.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shared.errors import ConfigError, DecodeError
from shared.messages import DeadLetter, SourceDoc

STAGE = "submit"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Input:
    """One resolved input: a file with its document ID, a URL, or a JSONL stream."""

    kind: str  # "file", "url", "stdin"
    location: str
    doc_id: str


def resolve(paths: list[str], exclude: tuple[str, ...] = ()) -> list[Input]:
    """Expand files, directories and globs; fail on a path that matches nothing, before any work.
    `exclude` globs are matched against document IDs and file names."""
    inputs: list[Input] = []
    for raw in paths:
        if raw == "-":
            inputs.append(Input("stdin", "-", "<stdin>"))
        elif raw.startswith(("http://", "https://")):
            inputs.append(Input("url", raw, raw))
        elif Path(raw).is_dir():
            root = Path(raw)
            inputs += [Input("file", str(f), f.relative_to(root).as_posix()) for f in _walk(root)]
        elif Path(raw).is_file():
            inputs.append(Input("file", raw, Path(raw).name))
        elif _GLOB_CHARS & set(raw):
            root = Path(_static_prefix(raw))
            matches = [Path(m) for m in sorted(glob.glob(raw, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise ConfigError(f"no file matches {raw!r}")
            inputs += [Input("file", str(m), m.relative_to(root).as_posix()) for m in matches]
        else:
            raise ConfigError(f"no such file or directory: {raw!r}")
    return [i for i in inputs if not _excluded(i.doc_id, exclude)]


def _excluded(doc_id: str, patterns: tuple[str, ...]) -> bool:
    name = doc_id.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(doc_id, p) or fnmatch.fnmatch(name, p) for p in patterns)


IGNORE_FILE = ".embedpipeignore"


def _walk(root: Path) -> list[Path]:
    """Files under root, sorted, skipping hidden ones and those matching the globs listed in
    root/.embedpipeignore (one per line, against the path relative to root or the file name)."""
    ignore_file = root / IGNORE_FILE
    ignored: tuple[str, ...] = ()
    if ignore_file.is_file():
        lines = (line.strip() for line in ignore_file.read_text().splitlines())
        ignored = tuple(line for line in lines if line and not line.startswith("#"))
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and not _excluded(path.relative_to(root).as_posix(), ignored):
                found.append(path)
    return found


def _static_prefix(pattern: str) -> str:
    parts = []
    for part in Path(pattern).parts:
        if _GLOB_CHARS & set(part):
            break
        parts.append(part)
    return str(Path(*parts)) if parts else "."


def iter_sources(
    inputs: list[Input], max_doc_bytes: int, stdin: IO[str] | None = None
) -> Iterator[SourceDoc | DeadLetter]:
    """Documents to submit, and dead letters for what cannot be (too large, malformed, duplicate)."""
    seen: dict[str, int] = {}
    for item in inputs:
        for out in _read(item, max_doc_bytes, stdin):
            if isinstance(out, SourceDoc):
                if out.id in seen:  # its own dead-letter ID: the first copy is submitted and may succeed
                    seen[out.id] += 1
                    message = f"duplicate id {out.id!r} in this submission ({item.location}); the first was kept"
                    yield DeadLetter(f"{out.id} (duplicate {seen[out.id]})", STAGE, "decode_error", message)
                    continue
                seen[out.id] = 1
            yield out


def _read(item: Input, max_doc_bytes: int, stdin: IO[str] | None) -> Iterator[SourceDoc | DeadLetter]:
    if item.kind == "url":
        yield SourceDoc(id=item.doc_id, uri=item.location)
    elif item.kind == "stdin":
        yield from read_jsonl(stdin or _stdin(), "<stdin>")
    elif item.location.endswith(".jsonl"):
        with open(item.location, encoding="utf-8", errors="replace") as f:
            yield from read_jsonl(f, item.doc_id)
    else:
        size = os.path.getsize(item.location)
        if size > max_doc_bytes:
            yield DeadLetter(
                item.doc_id,
                STAGE,
                "too_large",
                f"{size} bytes is over the limit of {max_doc_bytes}",
                source={"v": 1, "id": item.doc_id, "uri": Path(item.location).resolve().as_uri()},
            )
            return
        yield SourceDoc(
            id=item.doc_id,
            content=Path(item.location).read_bytes(),
            name=Path(item.location).name,
            metadata={"path": item.doc_id},
        )


def read_jsonl(lines: IO[str], name: str) -> Iterator[SourceDoc | DeadLetter]:
    """JSONL records {"id", "text", "metadata"}; a malformed line is reported with its number and
    the good lines still go through."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise DecodeError("a line must be a JSON object")
            yield SourceDoc.from_dict({"v": record.pop("v", 1), **record})
        except (ValueError, DecodeError) as e:
            yield DeadLetter(
                f"{name}:{lineno}", STAGE, "decode_error", f"{name} line {lineno}: {e}", source={"line": line[:4096]}
            )


def _stdin() -> IO[str]:
    return sys.stdin


class Listed:
    """Passes sources through and remembers their document IDs (for --prune). A document that is
    listed but cannot be read now (a dead letter) is kept: it still exists."""

    def __init__(self, items: Iterable[SourceDoc | DeadLetter]) -> None:
        self.items = items
        self.ids: set[str] = set()

    def __iter__(self) -> Iterator[SourceDoc | DeadLetter]:
        for item in self.items:
            self.ids.add(item.id if isinstance(item, SourceDoc) else item.doc_id)
            yield item
