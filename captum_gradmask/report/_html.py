"""HTML pieces of the report: the page template (CSS and JS inline), tables and numbers."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import cache
from html import escape
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from captum_gradmask import __version__


@cache
def _static(name: str) -> str:
    return resources.files("captum_gradmask.report").joinpath("static", name).read_text()


def page(title: str, body: str, nav: Sequence[tuple[str, str]], css_js: bool = True) -> str:
    """A whole page: ``nav`` is ``(text, href)`` links."""
    links = " ".join(f'<a href="{escape(href)}">{escape(text)}</a>' for text, href in nav)
    return Template(_static("page.html")).substitute(
        title=escape(title),
        nav=links,
        body=body,
        css=_static("report.css"),
        js=_static("report.js") if css_js else "",
        version=escape(__version__),
    )


class Cell:
    """A table cell: its HTML, its sort key (a number, or ``None`` to sort by its text) and
    whether it is text (left-aligned)."""

    __slots__ = ("html", "text", "value")

    def __init__(self, html: str, value: float | None = None, text: bool = False) -> None:
        self.html, self.value, self.text = html, value, text


def number(value: float | None, digits: int = 3) -> Cell:
    """A numeric cell (``-`` for NaN), sorting by its value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Cell("-")
    return Cell(f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.0f}", float(value))


def text(value: Any, html: str | None = None) -> Cell:
    return Cell(escape(str(value)) if html is None else html, text=True)


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    *,
    sortable: bool = True,
    table_id: str | None = None,
    scroll: bool = False,
    row_ids: Sequence[str] | None = None,
) -> str:
    """A table; ``sortable`` ones sort by a click on a header (see ``static/report.js``)."""
    attributes = f' id="{escape(table_id)}"' if table_id else ""
    attributes += ' class="sortable"' if sortable else ""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    lines = [f"<table{attributes}><thead><tr>{head}</tr></thead><tbody>"]
    for position, row in enumerate(rows):
        cells = []
        for cell in row:
            value = "" if cell.value is None else f' data-value="{cell.value:.9g}"'
            kind = ' class="text"' if cell.text else ""
            cells.append(f"<td{kind}{value}>{cell.html}</td>")
        row_id = f' id="{escape(row_ids[position])}"' if row_ids is not None else ""
        lines.append(f"<tr{row_id}>" + "".join(cells) + "</tr>")
    lines.append("</tbody></table>")
    html = "\n".join(lines)
    return f'<div class="scroll">{html}</div>' if scroll else html


def write_if_changed(path: Path, content: str) -> bool:
    """Write ``content`` to ``path`` unless it holds it already (so re-runs leave unchanged
    pages alone); atomically. Returns whether it wrote."""
    data = content.encode()
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(path)
    return True


def relative(target: Path, start: Path) -> str:
    """``target`` as a link from a page in the folder ``start`` (always with ``/``)."""
    return Path(os.path.relpath(target, start)).as_posix()
