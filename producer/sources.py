"""Source connectors on the client side: files, directories, globs, JSONL files and stdin, URLs.

Local files travel by content (workers may not see the client's disk); URLs travel as references and
the loader fetches them. What cannot be submitted becomes a DeadLetter here, before anything is enqueued.

A file's document ID is its path relative to its root, however the path was typed (`docs/a.md`,
`./docs/a.md` and `/abs/docs/a.md` are one document), with `id_prefix` before it. The root is the
nearest directory at or above the path given that holds a `.embedpipeignore` (it marks a corpus,
like a repository's `.git`); without one, the directory given (a file's: its directory; a glob's:
the part before its first wildcard). The root's `.embedpipeignore` (gitignore syntax: `*.log`,
`build/`, `!keep.log`, `/top-only`) applies to every directory walked and glob matched under it; a
file named on its own is always taken. A JSONL record's ID is its own.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pathspec

from shared.errors import ConfigError, DecodeError
from shared.messages import DeadLetter, SourceDoc

STAGE = "submit"
IGNORE_FILE = ".embedpipeignore"
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class Input:
    """One resolved input: a file with its document ID, a URL, or a JSONL stream."""

    kind: str  # "file", "url", "stdin"
    location: str
    doc_id: str
    root: str = ""  # a file's root directory, absolute (recorded in its metadata)


def resolve(paths: list[str], exclude: tuple[str, ...] = (), id_prefix: str = "") -> list[Input]:
    """Expand files, directories and globs; fail on a path that matches nothing, before any work.
    `exclude` globs are matched against paths relative to the root and against file names."""
    inputs: list[Input] = []
    for raw in paths:
        if raw == "-":
            inputs.append(Input("stdin", "-", "<stdin>"))
        elif raw.startswith(("http://", "https://")):
            inputs.append(Input("url", raw, raw))
        elif Path(raw).is_dir():
            root = corpus_root(raw)
            ignored = _ignore_spec(root)
            inputs += [_file(f, root, id_prefix) for f in _walk(Path(os.path.abspath(raw)), root, ignored)]
        elif Path(raw).is_file():
            inputs.append(_file(raw, corpus_root(os.path.dirname(raw) or "."), id_prefix))
        elif _GLOB_CHARS & set(raw):
            root = corpus_root(_static_prefix(raw))
            ignored = _ignore_spec(root)
            matches = [m for m in sorted(glob.glob(raw, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise ConfigError(f"no file matches {raw!r}")
            inputs += [_file(m, root, id_prefix) for m in matches if not ignored(_relative(m, root))]
        else:
            raise ConfigError(f"no such file or directory: {raw!r}")
    return [i for i in inputs if not _excluded(i, exclude, id_prefix)]


def corpus_root(directory: str) -> str:
    """The absolute root of the files under `directory`: the nearest directory at or above it that
    holds a .embedpipeignore, else `directory` itself."""
    start = Path(os.path.abspath(directory))
    return str(next((d for d in (start, *start.parents) if (d / IGNORE_FILE).is_file()), start))


def _file(path: str | Path, root: str, id_prefix: str) -> Input:
    return Input("file", str(path), id_prefix + _relative(path, root), root)


def _relative(path: str | Path, root: str) -> str:
    """The path relative to root, with "/" (lexically: "..", "." and "//" resolved, links not followed)."""
    return Path(os.path.relpath(os.path.abspath(path), root)).as_posix()


def _excluded(item: Input, patterns: tuple[str, ...], id_prefix: str) -> bool:
    if not patterns:
        return False
    path = item.doc_id.removeprefix(id_prefix) if item.kind == "file" else item.doc_id
    name = path.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _ignore_spec(root: str) -> Callable[[str], bool]:
    """A test of paths relative to root against root/.embedpipeignore (gitignore semantics)."""
    ignore_file = Path(root) / IGNORE_FILE
    if not ignore_file.is_file():
        return lambda path: False
    try:
        lines = ignore_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {ignore_file}: {e}") from e
    return pathspec.GitIgnoreSpec.from_lines(lines).match_file


def _walk(directory: Path, root: str, ignored: Callable[[str], bool]) -> list[Path]:
    """Files under directory, sorted, skipping hidden ones and those the root's .embedpipeignore
    names (a directory it names is not entered)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        here = _relative(dirpath, root)
        prefix = "" if here == "." else here + "/"
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not ignored(f"{prefix}{d}/"))
        found += [
            Path(dirpath) / name
            for name in sorted(filenames)
            if not name.startswith(".") and not ignored(prefix + name)
        ]
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


def count_documents(inputs: list[Input]) -> int | None:
    """How many items `iter_sources` yields for `inputs` (documents and dead letters), counted cheaply
    up front for a progress bar's total: a file or URL is one, a JSONL file its non-blank lines; None
    with stdin, which can be read only once."""
    count = 0
    for item in inputs:
        if item.kind == "stdin":
            return None
        if item.kind == "file" and item.location.endswith(".jsonl"):
            with open(item.location, "rb") as f:
                count += sum(1 for line in f if line.strip())
        else:
            count += 1
    return count


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
            metadata={"path": _relative(item.location, item.root), "root": item.root},
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
