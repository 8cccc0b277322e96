"""The chunk template: context the model reads before each chunk (EMBEDPIPE_CHUNK_TEMPLATE).

A chunk cut from the middle of a long document often does not say what it is about ("It must be
renewed every 90 days"). A template such as "{title} > {heading}\n{chunk}" puts the document's title and
the chunk's heading path before its text, for the model only: the store keeps the chunk as cut, and
search shows that. The template is part of the embedding spec (other text, other vectors).

Fields: any document metadata key, `title` (metadata "title", else the document's first Markdown
heading, else its file name), `heading` (the path of Markdown headings above the chunk, " > " between
levels) and `chunk`, which must end the template. A field a document lacks renders empty; "\n" is a line break.
"""

from __future__ import annotations

import bisect
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from shared.errors import ConfigError

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
MAX_FIELD_CHARS = 300  # a metadata value is context, not content: long ones are cut


@dataclass(frozen=True)
class ChunkTemplate:
    text: str  # the whole template, "\\n" read as a line break; "" = none

    @classmethod
    def parse(cls, template: str, name: str = "EMBEDPIPE_CHUNK_TEMPLATE") -> ChunkTemplate:
        """The template, checked: named fields only (no attributes, indexes or format specs), and
        "{chunk}" once, at the end."""
        template = template.replace("\\n", "\n")  # "\n" as typed in a shell or an .env file: a line break
        if not template:
            return cls("")
        try:
            parts = list(string.Formatter().parse(template))
        except ValueError as e:
            raise ConfigError(f"{name} is not a valid template: {e}") from None
        fields = [(f, spec, conv) for _, f, spec, conv in parts if f is not None]
        for field, spec, conversion in fields:
            if not field.isidentifier() or spec or conversion:
                raise ConfigError(f"{name}: {{{field}}} must be a plain field name like {{title}}")
        if [f for f, _, _ in fields].count("chunk") != 1 or not template.endswith("{chunk}"):
            raise ConfigError(f"{name} must end with {{chunk}} (and name it once), got {template!r}")
        return cls(template)

    @property
    def head(self) -> str:
        """What the model reads before the chunk, unrendered."""
        return self.text.removesuffix("{chunk}")

    def __bool__(self) -> bool:
        return bool(self.text)

    def all_headers(self, text: str, metadata: Mapping[str, Any]) -> list[str]:
        """Every distinct head a chunk of this document can get (one per heading it passes)."""
        return sorted(set(self.headers(text, metadata, [0, *(m.start() for m in _HEADING.finditer(text))])))

    def headers(self, text: str, metadata: Mapping[str, Any], starts: list[int]) -> list[str]:
        """The rendered head for chunks of a document starting at these character offsets."""
        if not self.head:
            return [""] * len(starts)
        headings = [(m.start(), len(m.group(1)), m.group(2)) for m in _HEADING.finditer(text)]
        fields = {k: _short(v) for k, v in metadata.items() if isinstance(k, str)}
        fields.setdefault("title", _short(_title(metadata, headings)))
        positions = [h[0] for h in headings]
        out = []
        for start in starts:
            fields["heading"] = _short(_path(headings[: bisect.bisect_right(positions, start)]))
            out.append(self.head.format_map(_Blank(fields)))
        return out


NO_TEMPLATE = ChunkTemplate("")


class _Blank(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def _short(value: Any) -> str:
    text = " ".join(str(value).split())  # one line: a header never adds paragraph breaks
    return text[:MAX_FIELD_CHARS]


def _title(metadata: Mapping[str, Any], headings: list[tuple[int, int, str]]) -> str:
    if metadata.get("title"):
        return str(metadata["title"])
    if headings:
        return min(headings, key=lambda h: (h[1], h[0]))[2]  # the highest level, first of them
    name = metadata.get("path") or metadata.get("source") or ""
    return PurePosixPath(str(name)).stem if name else ""


def _path(headings: list[tuple[int, int, str]]) -> str:
    """The heading path at the end of `headings`: each level's latest heading, deeper ones reset."""
    stack: list[tuple[int, str]] = []
    for _, level, title in headings:
        while stack and stack[-1][0] >= level:
            stack.pop()
        stack.append((level, title))
    return " > ".join(title for _, title in stack)
