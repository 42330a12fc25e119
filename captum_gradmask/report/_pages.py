"""The report's pages: the overview (``index.html``), the per-image pages of each store, the
larger view of each gallery image and the side-by-side pages of stores over the same images."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np

from captum_gradmask.report._html import (
    Cell,
    number,
    page,
    relative,
    table,
    text,
    write_if_changed,
)
from captum_gradmask.report._images import curve_figure
from captum_gradmask.report._runs import LOWER_IS_BETTER, METRIC_GROUPS, PERCENT, Run
from captum_gradmask.stats import bootstrap_ci


@dataclass
class Layout:
    """Where everything goes in the report's folder, and its settings."""

    out: Path
    gallery_size: int
    rows_per_page: int
    n_resamples: int
    seed: int
    views: dict[str, set[int]] = field(default_factory=dict)  # rows with a larger view

    def thumb(self, run: Run, index: int) -> Path:
        return self.out / "thumbs" / run.key / str(index // run.store.chunk_size) / f"{index}.jpg"

    def large(self, run: Run, index: int) -> Path:
        return self.out / "large" / run.key / f"{index}.jpg"

    def view(self, run: Run, index: int) -> Path:
        return self.out / "view" / run.key / f"{index}.html"

    def rows(self, run: Run, page_number: int) -> Path:
        return self.out / "rows" / f"{run.key}-{page_number}.html"

    def row_link(self, run: Run, index: int, start: Path) -> str:
        target = self.rows(run, index // self.rows_per_page + 1)
        return f"{relative(target, start)}#r{index}"

    def compare(self, group: int, page_number: int) -> Path:
        return self.out / "compare" / f"group{group}-{page_number}.html"


@dataclass(frozen=True)
class Gallery:
    title: str
    note: str
    indices: list[int]
    caption: str  # the column shown under each picture
    missing: str = ""  # why the gallery is empty, with the command that fills it


def primary(run: Run, kind: str) -> str | None:
    """The insertion or deletion column the report leads with (the notebook's, else RISE's)."""
    for column in (f"{kind}_notebook", f"{kind}_rise"):
        if column in run.metrics:
            return column
    return None


def _evaluate_hint(run: Run, group: str) -> str:
    command = f"captum-gradmask evaluate {run.path} --metrics {group} --name {group}"
    return f"<code>{escape(command)}</code>"


def galleries(run: Run, k: int) -> list[Gallery]:
    """The store's galleries, each at most ``k`` pictures."""
    ok = run.explained
    found = []
    correct = run.correct
    if np.isnan(correct[ok]).all():
        found.append(
            Gallery(
                "Misclassified",
                "",
                [],
                "probability",
                "the store's source has no labels, so mistakes are unknown",
            )
        )
    else:
        wrong = np.flatnonzero(ok & (correct == 0))
        found.append(
            Gallery(
                "Misclassified",
                f"top-1 class is not the label: {len(wrong)} images; the first {k} in store order",
                wrong[:k].tolist(),
                "probability",
            )
        )
    if "pointing_0" in run.metrics:
        miss = np.flatnonzero(ok & (run.metrics["pointing_0"] == 0))
        found.append(
            Gallery(
                "Pointing-game misses",
                f"the map's maximum (white ring) lies outside every box: {len(miss)} images; "
                f"the first {k} in store order",
                miss[:k].tolist(),
                "pointing_0",
            )
        )
    else:
        found.append(
            Gallery(
                "Pointing-game misses",
                "",
                [],
                "pointing_0",
                "not evaluated: "
                + _evaluate_hint(run, "pointing")
                + " (needs a source with boxes)",
            )
        )
    insertion = primary(run, "insertion")
    if insertion:
        values = run.metrics[insertion]
        rated = np.flatnonzero(ok & ~np.isnan(values))
        order = rated[np.argsort(values[rated], kind="stable")]
        found.append(
            Gallery(
                "Lowest insertion",
                f"{insertion}: the {k} lowest of {len(rated)}",
                order[:k].tolist(),
                insertion,
            )
        )
        found.append(
            Gallery(
                "Highest insertion",
                f"{insertion}: the {k} highest of {len(rated)}",
                order[::-1][:k].tolist(),
                insertion,
            )
        )
    else:
        for title in ("Lowest insertion", "Highest insertion"):
            found.append(
                Gallery(title, "", [], "", "not evaluated: " + _evaluate_hint(run, "notebook"))
            )
    rows = np.flatnonzero(ok & ~np.isnan(run.probability))
    order = rows[np.argsort(run.probability[rows], kind="stable")]
    found.append(
        Gallery(
            "Least confident",
            f"lowest probability of the explained class: the {k} lowest of {len(rows)}",
            order[:k].tolist(),
            "probability",
        )
    )
    found.append(
        Gallery(
            "Most confident",
            f"highest probability of the explained class: the {k} highest of {len(rows)}",
            order[::-1][:k].tolist(),
            "probability",
        )
    )
    return found


def _value(run: Run, column: str, index: int) -> float:
    if column == "probability":
        return float(run.probability[index])
    return float(run.metrics[column][index]) if column in run.metrics else math.nan


def _picture(run: Run, layout: Layout, index: int, start: Path, caption: str = "") -> str:
    """A thumbnail linking to the image's larger view (or its row when it has none)."""
    if not run.explained[index]:
        return ""
    src = relative(layout.thumb(run, index), start)
    if index in layout.views.get(run.key, ()):
        href = relative(layout.view(run, index), start)
    else:
        href = layout.row_link(run, index, start)
    alt = escape(f"{run.name}: {run.files[index]}")
    img = f'<img class="thumb" src="{src}" alt="{alt}" title="{alt}" loading="lazy">'
    return f'<a href="{href}">{img}</a>{caption}'


# --- the overview -------------------------------------------------------------------------


def _run_card(run: Run) -> str:
    attrs = run.attrs
    model = attrs.get("model") or {}
    settings = ", ".join(f"{k}={v}" for k, v in sorted((attrs.get("settings") or {}).items()))
    versions = ", ".join(f"{k} {v}" for k, v in (attrs.get("versions") or {}).items() if v)
    identity = attrs.get("identity") or {}
    not_done = len(run) - int(np.asarray(run.store.done[:]).sum())
    fingerprint = (identity.get("model") or {}).get("fingerprint", "")
    items = [
        ("store", escape(str(run.path))),
        ("model", escape(f"{model.get('class', '?')} {model.get('spec') or ''}")),
        ("weights", escape(f"{model.get('weights') or '-'} (fingerprint {str(fingerprint)[:12]})")),
        ("method", f"<code>{escape(str(attrs.get('method')))}</code>"),
        ("settings", escape(settings or "-")),
        ("target", escape(str(attrs.get("target")))),
        ("input", escape(" x ".join(str(v) for v in identity.get("input_shape", [])))),
        ("maps", escape(" x ".join(str(v) for v in run.store.map_shape))),
        (
            "images",
            f"{len(run)} ({int(run.explained.sum())} explained, "
            f"{int((run.errors != '').sum())} skipped, {not_done} not done)",
        ),
        ("source", escape(str(attrs.get("source") or "-"))),
        ("evaluations", escape(", ".join(run.evaluations) or "none")),
        ("created", escape(str(attrs.get("created", "-")))),
        ("versions", escape(versions)),
    ]
    rows = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    title = f'<h3><a href="#{run.key}">{escape(run.name)}</a></h3>'
    return f'<div class="card">{title}<dl>{rows}</dl></div>'


def _ci(values: np.ndarray, layout: Layout) -> tuple[Cell, int]:
    mean, low, high = bootstrap_ci(values.tolist(), layout.n_resamples, seed=layout.seed)
    n = int(np.count_nonzero(~np.isnan(values)))
    if math.isnan(mean):
        return Cell("-"), 0
    return Cell(f"{mean:.4g} <small>[{low:.4g}, {high:.4g}]</small>", mean), n


def _summary(runs: list[Run], layout: Layout) -> str:
    columns = [c for g in METRIC_GROUPS.values() for c in g if any(c in r.metrics for r in runs)]
    headers = ["metric"] + [f"{r.name}" for r in runs]
    rows = []
    named = {"accuracy": "top-1 accuracy (%)", "probability": "probability of the explained class"}
    for column in ["accuracy", "probability", *columns]:
        cells = [text(named.get(column, column + (" (%)" if column in PERCENT else "")))]
        for run in runs:
            if column == "accuracy":
                values = 100.0 * run.correct[run.explained]
            elif column == "probability":
                values = run.probability[run.explained]
            else:
                values = run.metrics.get(column, np.full(len(run), np.nan))[run.explained]
            cell, n = _ci(values, layout)
            cell.html += f" <small>n={n}</small>" if n else ""
            cells.append(cell)
        rows.append(cells)
    notes = []
    for run in runs:
        missing = [
            g for g, cols in METRIC_GROUPS.items() if not any(c in run.metrics for c in cols)
        ]
        if missing:
            hints = "; ".join(_evaluate_hint(run, g) for g in missing)
            notes.append(
                f'<p class="missing"><b>{escape(run.name)}</b> has no {", ".join(missing)} '
                f"metrics. Add them with {hints} (one evaluation per group; pointing needs a "
                "source with boxes), then run the report again.</p>"
            )
    intro = (
        '<p class="note">Means over the explained images with 95 % percentile-bootstrap '
        f"intervals ({layout.n_resamples} resamples); insertion and deletion are areas under the "
        "curves of their protocol (higher insertion and lower deletion are better), pointing-game "
        "hit rates are in percent.</p>"
    )
    return intro + table(headers, rows, sortable=False, table_id="summary") + "".join(notes)


def _per_class(run: Run) -> str:
    ok = run.explained
    classes = np.where(run.labels >= 0, run.labels, run.targets)
    keys = classes[ok]
    if not len(keys):
        return '<p class="note">No explained images.</p>'
    size = int(keys.max()) + 1
    counts = np.bincount(keys, minlength=size)

    def mean(values: np.ndarray) -> np.ndarray:
        values = values[ok]
        rated = ~np.isnan(values)
        total = np.bincount(keys[rated], weights=values[rated], minlength=size)
        n = np.bincount(keys[rated], minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, total / np.maximum(n, 1), np.nan)

    columns = [("accuracy (%)", 100.0 * run.correct)]
    if "pointing_0" in run.metrics:
        columns.append(("pointing hit (%)", run.metrics["pointing_0"]))
    for kind in ("insertion", "deletion"):
        column = primary(run, kind)
        if column:
            columns.append((column, run.metrics[column]))
    columns.append(("probability", run.probability))
    means = [(name, mean(values)) for name, values in columns]
    rows = []
    for c in np.flatnonzero(counts):
        cells = [text(f"{c}: {run.class_name(int(c))}"), number(int(counts[c]))]
        cells += [number(values[c]) for _, values in means]
        rows.append(cells)
    label = "label" if (run.labels >= 0).any() else "explained class"
    note = f'<p class="note">One row per {label} ({len(rows)} classes); click a header to sort.</p>'
    headers = ["class", "images", *[name for name, _ in means]]
    return note + table(headers, rows, table_id=f"classes-{run.key}", scroll=True)


def _gallery_html(run: Run, layout: Layout, gallery: Gallery) -> str:
    head = f"<h3>{escape(gallery.title)}</h3>"
    if gallery.missing:
        return head + f'<p class="missing">{gallery.missing}</p>'
    if not gallery.indices:
        return head + f'<p class="note">{escape(gallery.note)}: none.</p>'
    figures = []
    for i in gallery.indices:
        value = _value(run, gallery.caption, i)
        predicted = escape(run.class_name(int(run.predicted[i])))
        caption = f"<figcaption>#{i}: {value:.3g}<br>{predicted}</figcaption>"
        figures.append(f"<figure>{_picture(run, layout, i, layout.out, caption)}</figure>")
    pictures = f'<div class="gallery">{"".join(figures)}</div>'
    return head + f'<p class="note">{escape(gallery.note)}.</p>' + pictures


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


def _groups(runs: list[Run]) -> list[list[Run]]:
    """Stores over the same files (compared image by image), in the order given."""
    by_files: dict[str, list[Run]] = {}
    for run in runs:
        by_files.setdefault(run.attrs.get("identity", {}).get("files_sha256", run.key), []).append(
            run
        )
    return [group for group in by_files.values() if len(group) > 1]


def _paired(group: list[Run], layout: Layout) -> str:
    columns = [
        c for g in METRIC_GROUPS.values() for c in g if sum(c in r.metrics for r in group) > 1
    ]
    if not columns:
        return (
            '<p class="missing">No metric is evaluated in two of these stores: evaluate them '
            "(see above) to compare them.</p>"
        )
    rows = []
    for column in columns:
        for a, b in itertools.combinations([r for r in group if column in r.metrics], 2):
            both = a.explained & b.explained
            x, y = a.metrics[column][both], b.metrics[column][both]
            paired = ~np.isnan(x) & ~np.isnan(y)
            x, y = x[paired], y[paired]
            if not len(x):
                continue
            diff, low, high = bootstrap_ci((x - y).tolist(), layout.n_resamples, seed=layout.seed)
            better = "lower" if column in LOWER_IS_BETTER else "higher"
            rows.append(
                [
                    text(column),
                    text(a.name),
                    text(b.name),
                    number(len(x)),
                    number(float(x.mean()), 4),
                    number(float(y.mean()), 4),
                    Cell(f"{diff:+.4g} <small>[{low:+.4g}, {high:+.4g}]</small>", diff),
                    number(100.0 * float(np.mean(x > y)), 3),
                    number(100.0 * float(np.mean(x < y)), 3),
                    text(better),
                ]
            )
    note = (
        '<p class="note">Each pair of stores on the images both explained and rated: the mean '
        "difference A - B with its 95 % paired bootstrap interval (resampling images), and the "
        "share of images where A is above or below B. An interval that excludes 0 is a "
        "difference these images support.</p>"
    )
    headers = [
        "metric",
        "A",
        "B",
        "images",
        "mean A",
        "mean B",
        "A - B [95 % CI]",
        "A > B (%)",
        "A < B (%)",
        "better",
    ]
    return note + table(headers, rows, table_id="paired")


def _curves(runs: list[Run], layout: Layout) -> str:
    found: dict[str, list] = {}
    for run in runs:
        for column, (fractions, curves) in run.curves.items():
            rated = run.explained & ~np.isnan(run.metrics.get(column, np.full(len(run), np.nan)))
            if not rated.any():
                continue
            values = np.asarray(curves[:], dtype=float)[rated]
            found.setdefault(column, []).append(
                (run.name, fractions, values.mean(axis=0), int(rated.sum()))
            )
    if not found:
        hint = "; ".join(_evaluate_hint(r, "notebook") for r in runs)
        return (
            '<p class="missing">No per-image curves in these stores (evaluations record them): '
            f"{hint}.</p>"
        )
    out = layout.out / "figures" / "curves.png"
    digest_text = repr(
        [
            (c, [(n, f.tolist(), np.round(m, 6).tolist(), k) for n, f, m, k in v])
            for c, v in found.items()
        ]
    )
    stamp = out.with_suffix(".txt")
    if not (out.is_file() and stamp.is_file() and stamp.read_text() == digest_text):
        curve_figure(found, out)
        stamp.write_text(digest_text)
    note = (
        '<p class="note">Mean probability of the explained class over the rated images as the '
        "most important pixels are inserted into a blurred image (insertion) or deleted from "
        "the image (deletion), one line per store.</p>"
    )
    image = '<img src="figures/curves.png" alt="mean insertion and deletion curves">'
    return note + f'<p class="figure">{image}</p>'


# --- page writers -------------------------------------------------------------------------


def write_pages(
    runs: list[Run], galleries: dict[str, list[Gallery]], layout: Layout
) -> tuple[int, int]:
    """Write every page; returns ``(pages written, pages)``."""
    pages: dict[Path, str] = {}
    groups = _groups(runs)
    nav = [("overview", "#top")] + [(r.name, f"#{r.key}") for r in runs] + [("curves", "#curves")]
    nav += [("comparison", "#comparison")] if groups else []
    body = [
        '<a id="top"></a><h2>Runs</h2><div class="cards">'
        + "".join(_run_card(r) for r in runs)
        + "</div>"
    ]
    body.append("<h2>Metrics</h2>" + _summary(runs, layout))
    body.append('<h2 id="curves">Insertion and deletion curves</h2>' + _curves(runs, layout))
    if groups:
        body.append('<h2 id="comparison">Comparison</h2>')
        for number_, group in enumerate(groups):
            names = ", ".join(escape(r.name) for r in group)
            count = math.ceil(len(group[0]) / layout.rows_per_page)
            link = relative(layout.compare(number_, 1), layout.out)
            body.append(
                f"<h3>{names} (the same {len(group[0])} images)</h3>" + _paired(group, layout)
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
        body.append("<h3>Per class</h3>" + _per_class(run))
        body.append(
            f'<p class="note">Galleries show at most k = {layout.gallery_size} images each: the '
            "map over the image (cyan: object boxes; white ring: the map's maximum). Click a "
            "picture for a larger view and the image's numbers.</p>"
        )
        body.extend(_gallery_html(run, layout, g) for g in galleries[run.key])
        pages.update(_row_pages(run, layout))
        pages.update(_view_pages(run, runs, layout))
    pages[layout.out / "index.html"] = page("captum-gradmask report", "\n".join(body), nav)
    written = sum(write_if_changed(path, html) for path, html in pages.items())
    return written, len(pages)


def _row_cells(run: Run, index: int, layout: Layout, start: Path) -> list[Cell]:
    cells = [
        text("", _picture(run, layout, index, start)),
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
        *run.metrics,
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
                    _picture(
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
