"""The report's pages: the overview (``index.html``), the per-image pages of each store, the
larger view of each gallery image and the side-by-side pages of stores over the same images."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

from captum_gradmask.report import _sections as sections
from captum_gradmask.report._html import Cell, number, page, relative, table, text, write_if_changed
from captum_gradmask.report._layout import Gallery, Layout, picture, primary
from captum_gradmask.report._runs import PERCENT, Run


def _pages_links(count: int, current: int, link) -> str:
    parts = []
    for number_ in range(1, count + 1):
        if number_ == current:
            parts.append(f"<span>{number_}</span>")
        elif count <= 30 or abs(number_ - current) <= 5 or number_ in (1, count):
            parts.append(f'<a href="{link(number_)}">{number_}</a>')
        elif parts[-1] != "...":
            parts.append("...")
    return '<p class="pages">pages: ' + " ".join(parts) + "</p>"


def _pages_count(count: int, layout: Layout) -> str:
    return f"{count} page{'s' if count > 1 else ''} of at most {layout.rows_per_page}"


def write_pages(
    runs: list[Run], galleries: dict[str, list[Gallery]], layout: Layout
) -> tuple[int, int]:
    """Write every page; returns ``(pages written, pages)``."""
    pages: dict[Path, str] = {}
    groups = sections.groups(runs)
    nav = [("overview", "#top")] + [(r.name, f"#{r.key}") for r in runs] + [("curves", "#curves")]
    nav += [("comparison", "#comparison")] if groups else []
    body = [
        '<a id="top"></a><h2>Runs</h2><div class="cards">'
        + "".join(sections.run_card(r) for r in runs)
        + "</div>"
    ]
    body.append("<h2>Metrics</h2>" + sections.summary(runs, layout))
    body.append(
        '<h2 id="curves">Insertion and deletion curves</h2>' + sections.curves(runs, layout)
    )
    if groups:
        body.append('<h2 id="comparison">Comparison</h2>')
        for number_, group in enumerate(groups):
            names = ", ".join(escape(r.name) for r in group)
            count = math.ceil(len(group[0]) / layout.rows_per_page)
            link = relative(layout.compare(number_, 1), layout.out)
            body.append(
                f"<h3>{names} (the same {len(group[0])} images)</h3>"
                + sections.paired(group, layout)
            )
            body.append(
                f'<p><a href="{link}">Every image with every method side by side</a> '
                f"({_pages_count(count, layout)}).</p>"
            )
            pages.update(_compare_pages(group, number_, layout))
    for run in runs:
        count = math.ceil(len(run) / layout.rows_per_page)
        link = relative(layout.rows(run, 1), layout.out)
        body.append(f'<h2 id="{run.key}">{escape(run.name)}</h2>')
        body.append(
            f'<p><a href="{link}">All {len(run)} images with their numbers</a> '
            f"({_pages_count(count, layout)}).</p>"
        )
        body.append("<h3>Per class</h3>" + sections.per_class(run))
        body.append(
            f'<p class="note">Galleries show at most k = {layout.gallery_size} images each: the '
            "map over the image (cyan: object boxes; white ring: the map's maximum). Click a "
            "picture for a larger view and the image's numbers.</p>"
        )
        body.extend(sections.gallery_html(run, layout, g) for g in galleries[run.key])
        pages.update(_row_pages(run, layout))
        pages.update(_view_pages(run, runs, layout))
    pages[layout.out / "index.html"] = page("captum-gradmask report", "\n".join(body), nav)
    written = sum(write_if_changed(path, html) for path, html in pages.items())
    return written, len(pages)


def _row_cells(run: Run, index: int, layout: Layout, start: Path) -> list[Cell]:
    cells = [
        text("", picture(run, layout, index, start)),
        number(index),
        text(run.files[index]),
        text(run.class_name(int(run.labels[index]))),
        text(run.class_name(int(run.predicted[index]))),
        number(float(run.probability[index])),
    ]
    cells += [number(float(run.metrics[c][index])) for c in run.metrics]
    cells.append(text(run.errors[index]))
    return cells


def _row_pages(run: Run, layout: Layout) -> dict[Path, str]:
    pages = {}
    count = max(1, math.ceil(len(run) / layout.rows_per_page))
    headers = [
        "map",
        "row",
        "file",
        "label",
        "predicted",
        "probability",
        *(column + (" (%)" if column in PERCENT else "") for column in run.metrics),
        "skipped because",
    ]
    for number_ in range(1, count + 1):
        path = layout.rows(run, number_)
        start = path.parent
        indices = range(
            (number_ - 1) * layout.rows_per_page, min(number_ * layout.rows_per_page, len(run))
        )
        rows = [_row_cells(run, i, layout, start) for i in indices]
        html = table(headers, rows, table_id="rows", row_ids=[f"r{i}" for i in indices])
        links = _pages_links(count, number_, lambda n, s=start: relative(layout.rows(run, n), s))
        note = (
            '<p class="note">Click a header to sort this page; click a picture for the '
            "image's larger view (gallery images) or its row.</p>"
        )
        nav = [("overview", relative(layout.out / "index.html", start) + f"#{run.key}")]
        pages[path] = page(
            f"{run.name}: images {indices.start}-{indices.stop - 1}",
            note + links + html + links,
            nav,
        )
    return pages


def _view_pages(run: Run, runs: list[Run], layout: Layout) -> dict[Path, str]:
    pages = {}
    for index in sorted(layout.views.get(run.key, ())):
        path = layout.view(run, index)
        start = path.parent
        items = [
            ("file", escape(run.files[index])),
            ("label", escape(run.class_name(int(run.labels[index])))),
            ("predicted", escape(run.class_name(int(run.predicted[index])))),
            ("explained class", escape(run.class_name(int(run.targets[index])))),
            ("probability", f"{run.probability[index]:.4g}"),
        ]
        items += [(c, f"{v[index]:.4g}") for c, v in run.metrics.items()]
        others = [
            f'<a href="{layout.row_link(o, index, start)}">{escape(o.name)}</a>'
            for o in runs
            if o is not run and o.files == run.files
        ]
        if others:
            items.append(("in other stores", ", ".join(others)))
        dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
        src = relative(layout.large(run, index), start)
        body = (
            f'<img class="large" src="{src}" alt="{escape(run.files[index])}">'
            '<p class="note">Left: the image as the model sees it; right: the map over it '
            "(cyan: boxes; white ring: the maximum).</p>"
            f'<div class="card"><dl>{dl}</dl></div>'
        )
        nav = [
            ("overview", relative(layout.out / "index.html", start) + f"#{run.key}"),
            ("row", layout.row_link(run, index, start)),
        ]
        pages[path] = page(f"{run.name}: image {index}", body, nav)
    return pages


def _compare_pages(group: list[Run], group_number: int, layout: Layout) -> dict[Path, str]:
    pages = {}
    first = group[0]
    count = max(1, math.ceil(len(first) / layout.rows_per_page))
    shown = [(r, primary(r, "insertion"), primary(r, "deletion")) for r in group]
    headers = ["row", "file", "label"] + [f"{r.name}" for r in group]
    for run, insertion, deletion in shown:
        headers += [f"{run.name}: {c}" for c in (insertion, deletion) if c]
    for page_number in range(1, count + 1):
        path = layout.compare(group_number, page_number)
        start = path.parent
        indices = range(
            (page_number - 1) * layout.rows_per_page,
            min(page_number * layout.rows_per_page, len(first)),
        )
        rows = []
        for i in indices:
            cells = [
                number_cell(i),
                text(first.files[i]),
                text(first.class_name(int(first.labels[i]))),
            ]
            cells += [
                text(
                    "",
                    picture(
                        r,
                        layout,
                        i,
                        start,
                        f"<small>{escape(r.class_name(int(r.predicted[i])))}</small>",
                    ),
                )
                for r in group
            ]
            for run, insertion, deletion in shown:
                cells += [number(float(run.metrics[c][i])) for c in (insertion, deletion) if c]
            rows.append(cells)
        links = _pages_links(
            count, page_number, lambda n, s=start: relative(layout.compare(group_number, n), s)
        )
        nav = [("overview", relative(layout.out / "index.html", start) + "#comparison")]
        title = " vs ".join(r.name for r in group) + f": images {indices.start}-{indices.stop - 1}"
        pages[path] = page(title, links + table(headers, rows, table_id="compare") + links, nav)
    return pages


def number_cell(index: int) -> Cell:
    return Cell(str(index), float(index), text=True)


def remove_stale(runs: list[Run], layout: Layout) -> None:
    """Delete larger views and their pages of images no longer in a gallery."""
    for run in runs:
        keep = layout.views.get(run.key, set())
        for folder, suffix in (("large", ".jpg"), ("view", ".html")):
            for path in (layout.out / folder / run.key).glob(f"*{suffix}"):
                if path.stem.isdigit() and int(path.stem) not in keep:
                    path.unlink()
