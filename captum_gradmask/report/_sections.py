"""The overview's sections: run cards, metric summary, per-class table, galleries, paired
comparison and curves."""

from __future__ import annotations

import itertools
import math
from html import escape

import numpy as np

from captum_gradmask.report._html import Cell, number, table, text
from captum_gradmask.report._images import curve_figure
from captum_gradmask.report._layout import (
    Gallery,
    Layout,
    evaluate_hint,
    picture,
    primary,
    value_of,
)
from captum_gradmask.report._runs import LOWER_IS_BETTER, METRIC_GROUPS, PERCENT, Run
from captum_gradmask.stats import bootstrap_ci


def run_card(run: Run) -> str:
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


def summary(runs: list[Run], layout: Layout) -> str:
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
            hints = "; ".join(evaluate_hint(run, g) for g in missing)
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


def per_class(run: Run) -> str:
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


def gallery_html(run: Run, layout: Layout, gallery: Gallery) -> str:
    head = f"<h3>{escape(gallery.title)}</h3>"
    if gallery.missing:
        return head + f'<p class="missing">{gallery.missing}</p>'
    if not gallery.indices:
        return head + f'<p class="note">{escape(gallery.note)}: none.</p>'
    figures = []
    for i in gallery.indices:
        value = value_of(run, gallery.caption, i)
        predicted = escape(run.class_name(int(run.predicted[i])))
        caption = f"<figcaption>#{i}: {value:.3g}<br>{predicted}</figcaption>"
        figures.append(f"<figure>{picture(run, layout, i, layout.out, caption)}</figure>")
    pictures = f'<div class="gallery">{"".join(figures)}</div>'
    return head + f'<p class="note">{escape(gallery.note)}.</p>' + pictures


def groups(runs: list[Run]) -> list[list[Run]]:
    """Stores over the same files (compared image by image), in the order given."""
    by_files: dict[str, list[Run]] = {}
    for run in runs:
        by_files.setdefault(run.attrs.get("identity", {}).get("files_sha256", run.key), []).append(
            run
        )
    return [group for group in by_files.values() if len(group) > 1]


def paired(group: list[Run], layout: Layout) -> str:
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


def curves(runs: list[Run], layout: Layout) -> str:
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
        hint = "; ".join(evaluate_hint(r, "notebook") for r in runs)
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
