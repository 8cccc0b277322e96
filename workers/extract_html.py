"""HTML -> text the chunker can cut well: the page's main content, each block a paragraph of its own
(blank lines between), inline tags inside their line, headings as Markdown "# " lines, list items as
"- " lines, table rows as "a | b | c" lines, code blocks line by line.

trafilatura finds the main content and drops menus, footers, sidebars, comments, share and "related"
blocks, cookie banners (bench/html_extract.py measures it against BeautifulSoup and inscriptis). It
hands back its content as an XML tree (`head`, `p`, `list`/`item`, `table`/`row`/`cell`, `quote`,
`code`, inline `hi`/`ref`/`lb`), which we render ourselves: its Markdown output puts `**` and backticks
into the text the model reads, its plain text joins paragraphs with single newlines (the chunker's
paragraph boundary would never fire). Where it finds little (a short page, text outside any
paragraph), the whole page is rendered instead, less its script, navigation, header, footer, aside
and form elements: a short document is kept, never dropped.
"""

from __future__ import annotations

import html as html_lib
import re
from typing import Any

import trafilatura
from lxml import etree
from lxml import html as lxml_html

from shared.errors import DocumentError

# Below this many characters trafilatura's own fallbacks take the whole page's text, menus included;
# ours keeps the page's text without its navigation, header, footer and asides.
MIN_MAIN_CHARS = 250
# trafilatura's comparison with its fallback extractors grows with the square of a flood of inline
# tags (99,000 <b> tags: 2.4 GB, 9 s; with fast=True 0.16 GB, 1.4 s): a page with more tags than
# this gets its main rules only.
MAX_TAGS_FOR_FALLBACKS = 20_000

_WHITESPACE = re.compile(r"\s+")  # in HTML a newline is a space: only `br`/`lb` break a line
_HEADING = re.compile(r"h([1-6])")
_BLOCK = {
    # trafilatura's tree
    "head", "p", "list", "item", "table", "row", "cell", "quote", "graphic", "lb",
    # HTML
    "html", "body", "main", "article", "section", "div", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "dl",
    "li", "dt", "dd", "tr", "td", "th", "thead", "tbody", "tfoot", "caption", "pre", "blockquote", "figure",
    "figcaption", "hr", "address", "details", "summary", "fieldset", "center", "br", "img",
}  # fmt: skip
_DROP = (
    "script", "style", "noscript", "template", "svg", "iframe", "object", "canvas", "nav", "header", "footer",
    "aside", "form", "button", "select", "dialog",
)  # fmt: skip


def html_to_text(html: str) -> str:
    """The main content of an HTML page as paragraphs; '' when it holds no text."""
    try:
        doc = trafilatura.bare_extraction(
            html,
            fast=html.count("<") > MAX_TAGS_FOR_FALLBACKS,
            include_comments=False,
            include_tables=True,
            include_formatting=True,  # keeps `head rend="hN"` and multi-line `code` in the tree
            include_links=False,
            include_images=False,
            with_metadata=False,
        )
        blocks = _flow(doc.body) if doc is not None and doc.body is not None else []
        if sum(map(len, blocks)) < MIN_MAIN_CHARS and (whole := _whole_page(html)):
            blocks = whole
    except (etree.LxmlError, ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise DocumentError("decode_error", f"unreadable HTML: {type(e).__name__}: {e}") from e
    title = _title(html)
    if blocks and title and not blocks[0].startswith("#"):  # no heading of its own: the title first
        blocks.insert(0, f"# {title}")
    return "\n\n".join(blocks)


def _whole_page(html: str) -> list[str]:
    try:  # as bytes: lxml refuses a str that carries an XML encoding declaration
        root = lxml_html.document_fromstring(html.encode(), parser=lxml_html.HTMLParser(encoding="utf-8"))
    except lxml_html.etree.ParserError:  # nothing in it (whitespace, a comment)
        return []
    for element in root.xpath("|".join(f"//{tag}" for tag in _DROP)):
        element.drop_tree()
    main = next(iter(root.xpath("//main|//article")), None)
    return _flow(main if main is not None else root)


def _flow(element: Any) -> list[str]:
    """The paragraphs inside a container: each block child is one or more paragraphs of its own;
    text and inline children between them make one paragraph."""
    out: list[str] = []
    run: list[str] = [_space(element.text)]

    def flush() -> None:
        if text := _lines("".join(run)):
            out.append(text)
        run.clear()

    for child in element:
        tag = _tag(child)
        if tag in ("lb", "br"):
            run.append("\n")
        elif not tag:  # a comment or processing instruction: only its tail is text
            pass
        elif tag in _BLOCK or (tag == "code" and "\n" in "".join(child.itertext()).strip()):
            flush()
            out.extend(_block(child, tag))
        else:
            run.append(_inline(child))
        run.append(_space(child.tail))
    flush()
    return out


def _block(element: Any, tag: str) -> list[str]:
    heading = _HEADING.fullmatch(element.get("rend", "") if tag == "head" else tag)
    if tag == "head" or heading:
        text = " ".join(_inline(element).split())
        return [("#" * int(heading.group(1)) if heading else "##") + " " + text] if text else []
    if tag in ("list", "ul", "ol", "dl"):
        lines = _items(element)
        return ["\n".join(lines)] if lines else []
    if tag == "table":
        rows = [
            " | ".join(" ".join(_inline(c).split()) for c in row if _tag(c) in ("cell", "td", "th"))
            for row in element.iter("row", "tr")
        ]
        rows = [r for r in rows if r.strip(" |")]
        return ["\n".join(rows)] if rows else []
    if tag in ("pre", "code"):
        text = "".join(element.itertext()).strip("\n")
        return [text] if text.strip() else []
    if tag in ("graphic", "img", "hr"):
        return []
    return _flow(element)


def _items(element: Any) -> list[str]:
    """One "- " line per list item, a nested list's items after their parent's."""
    lines: list[str] = []
    for item in element:
        if _tag(item) not in ("item", "li", "dt", "dd"):
            continue
        nested = [n for n in item.iter("list", "ul", "ol", "dl") if n is not item]
        for n in nested:
            _detach(n)
        if text := " ".join(_inline(item).split()):
            lines.append("- " + text)
        for n in nested:
            lines += _items(n)
    return lines


def _detach(element: Any) -> None:
    """Take an element out of its tree, leaving its tail (the text after it) where it was."""
    parent, previous = element.getparent(), element.getprevious()
    if element.tail:
        if previous is not None:
            previous.tail = (previous.tail or "") + element.tail
        else:
            parent.text = (parent.text or "") + element.tail
    parent.remove(element)


def _inline(element: Any) -> str:
    """An element's text, with line breaks where it has `br`/`lb` elements."""
    parts: list[str] = [_space(element.text)]
    for child in element:
        tag = _tag(child)
        parts.append("\n" if tag in ("lb", "br") else _inline(child) if tag else "")
        parts.append(_space(child.tail))
    return "".join(parts)


def _space(text: str | None) -> str:
    return _WHITESPACE.sub(" ", text) if text else ""


def _lines(text: str) -> str:
    """Whitespace of HTML collapsed within each line (a line ends only at a line break element; two
    in a row leave a blank line, a paragraph break)."""
    return "\n".join(" ".join(line.split()) for line in text.split("\n")).strip()


def _tag(element: Any) -> str:
    return element.tag.lower() if isinstance(element.tag, str) else ""  # comments: their tag is a function


_TITLE = re.compile(r"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


def _title(html: str) -> str:
    match = _TITLE.search(html, 0, 65536)
    return " ".join(html_lib.unescape(match.group(1)).split()) if match else ""
