"""DOCX, PPTX and XLSX -> text, through python-docx, python-pptx and openpyxl (the `office` extra:
pip install 'embedpipe[office]'). Without it these files are `unsupported_type` dead letters.

The text follows the conventions of the HTML extraction: headings as "# " lines, each paragraph a
paragraph of its own, list items as "- " lines, table rows as "a | b | c" lines. A DOCX gives its
body in order (headers, footers and comments are left out); a PPTX one heading per slide (its title,
or "Slide N"), the text of its shapes and tables, then its speaker notes; an XLSX one heading per
sheet and a line per non-empty row (cell values as last saved; formulas are not evaluated).

An Office file is a zip archive: before any library opens it, the sizes its entries declare must
stay within bounds (a few KB can unpack to gigabytes). zipfile never returns more than an entry
declares (an entry that holds more fails its CRC check), so the declared sizes bound the memory.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from typing import Any

from shared.errors import DocumentError

KINDS = {".docx": "docx", ".pptx": "pptx", ".xlsx": "openpyxl"}  # suffix -> the module that reads it
MAX_ZIP_ENTRIES = 10_000
# Unpacked, a DOCX's XML is parsed into a tree of ~10x its size (10.8 MB of it: +100 MiB, 3.1 s), so
# an archive's entries may declare at most this many times the document size limit in all (images
# count too; they barely compress, so a DOCX of pictures stays well within it).
MAX_UNPACKED_RATIO = 3
MAX_SHEET_CELLS = 10_000_000  # cells read (empty ones included: rows are padded to their last cell)
ROWS_PER_BLOCK = 100  # a sheet's rows are lines, in paragraphs of this many


def office_to_text(data: bytes, suffix: str, max_chars: int = 20_000_000) -> str:
    """The text of a DOCX, PPTX or XLSX file; extraction stops once it passes max_chars."""
    module = KINDS[suffix]
    try:
        __import__(module)
    except ImportError as e:
        raise DocumentError(
            "unsupported_type", f"{suffix} files need the office extra: pip install 'embedpipe[office]'"
        ) from e
    _check_archive(data, suffix, max_chars * MAX_UNPACKED_RATIO)
    reader = {".docx": _docx, ".pptx": _pptx, ".xlsx": _xlsx}[suffix]
    blocks: list[str] = []
    size = 0
    try:
        for block in reader(data):
            if block := block.strip():
                blocks.append(block)
                size += len(block) + 2
                if size > max_chars:
                    break
    except DocumentError:
        raise
    except Exception as e:  # each library has its own errors for a damaged file (KeyError, lxml, zip, ...)
        raise DocumentError("decode_error", f"unreadable {suffix[1:].upper()} file: {type(e).__name__}: {e}") from e
    return "\n\n".join(blocks)


def _check_archive(data: bytes, suffix: str, max_unpacked: int) -> None:
    try:
        infos = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise DocumentError("decode_error", f"not a {suffix[1:].upper()} file: {e}") from e
    if len(infos) > MAX_ZIP_ENTRIES:
        raise DocumentError("too_large", f"{len(infos)} files in the archive, over the limit of {MAX_ZIP_ENTRIES}")
    unpacked = sum(i.file_size for i in infos)
    if unpacked > max_unpacked:
        raise DocumentError(
            "too_large", f"unpacks to {unpacked} bytes, over the limit of {max_unpacked} ({MAX_UNPACKED_RATIO}x)"
        )


def _docx(data: bytes) -> Iterator[str]:
    from docx import Document
    from docx.table import Table

    document = Document(io.BytesIO(data))
    # Paragraph.style looks its style up among all of them each time (1.4 ms a paragraph): once here
    names = {s.style_id: s.name or "" for s in document.styles}
    items: list[str] = []  # consecutive list paragraphs make one block, a line each
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            yield from _flush(items)
            yield _rows([cell.text for cell in row.cells] for row in block.rows)
            continue
        text = block.text.strip()
        style = names.get(block._p.style or "", "")
        level = _heading_level(style)
        numbered = block._p.pPr is not None and block._p.pPr.numPr is not None
        if text and (numbered or style.startswith("List")) and not level:
            items.append("- " + " ".join(text.split()))
            continue
        yield from _flush(items)
        if text:
            yield ("#" * level + " " + " ".join(text.split())) if level else text


def _heading_level(style: str) -> int:
    if style == "Title":
        return 1
    if style.startswith("Heading ") and style[8:].isdigit():
        return min(int(style[8:]), 6)
    return 0


def _flush(items: list[str]) -> Iterator[str]:
    if items:
        yield "\n".join(items)
        items.clear()


def _pptx(data: bytes) -> Iterator[str]:
    from pptx import Presentation

    for number, slide in enumerate(Presentation(io.BytesIO(data)).slides, 1):
        title = slide.shapes.title
        title_text = " ".join(title.text_frame.text.split()) if title is not None and title.has_text_frame else ""
        yield f"# {title_text or f'Slide {number}'}"
        for shape in _shapes(slide.shapes):
            if title is not None and shape.shape_id == title.shape_id:
                continue
            if shape.has_text_frame:
                yield "\n".join(p.text.strip() for p in shape.text_frame.paragraphs if p.text.strip())
            if getattr(shape, "has_table", False):
                yield _rows([cell.text for cell in row.cells] for row in shape.table.rows)
        if slide.has_notes_slide and (notes := slide.notes_slide.notes_text_frame) is not None:
            yield notes.text


def _shapes(shapes: Any) -> Iterator[Any]:
    """Every shape, those inside groups too."""
    for shape in shapes:
        if hasattr(shape, "shapes"):  # a group
            yield from _shapes(shape.shapes)
        else:
            yield shape


def _xlsx(data: bytes) -> Iterator[str]:
    from openpyxl import load_workbook

    book = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    cells = 0
    try:
        for sheet in book.worksheets:
            sheet.reset_dimensions()  # rows as long as their last cell, not as the sheet's stated width
            yield f"# {sheet.title}"
            lines: list[str] = []
            for row in sheet.iter_rows(values_only=True):
                cells += len(row)
                if cells > MAX_SHEET_CELLS:
                    raise DocumentError("too_large", f"over {MAX_SHEET_CELLS} spreadsheet cells")
                if line := " | ".join("" if v is None else str(v) for v in row).strip(" |"):
                    lines.append(line)
                if len(lines) == ROWS_PER_BLOCK:  # (so that the caller's size bound applies as it reads)
                    yield "\n".join(lines)
                    lines.clear()
            yield "\n".join(lines)
    finally:
        book.close()


def _rows(rows: Iterator[list[str]]) -> str:
    """Table rows as "a | b | c" lines; a merged cell, which the libraries repeat, once."""
    lines = []
    for cells in rows:
        kept = [" ".join(c.split()) for i, c in enumerate(cells) if i == 0 or c != cells[i - 1]]
        if line := " | ".join(kept).strip(" |"):
            lines.append(line)
    return "\n".join(lines)
