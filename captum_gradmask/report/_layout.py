"""Where the report's files go, its galleries, and the picture links every page uses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np

from captum_gradmask.report._html import relative
from captum_gradmask.report._runs import Run


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
    """One gallery of a store: its pictures' rows, or why it has none."""

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


def evaluate_hint(run: Run, group: str) -> str:
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
                "not evaluated: " + evaluate_hint(run, "pointing") + " (needs a source with boxes)",
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
                Gallery(title, "", [], "", "not evaluated: " + evaluate_hint(run, "notebook"))
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


def value_of(run: Run, column: str, index: int) -> float:
    if column == "probability":
        return float(run.probability[index])
    return float(run.metrics[column][index]) if column in run.metrics else math.nan


def picture(run: Run, layout: Layout, index: int, start: Path, caption: str = "") -> str:
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
