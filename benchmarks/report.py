"""Tables and pictures from a benchmark's per-image results (``results.jsonl``).

``python -m benchmarks.report OUTPUT_DIR`` rewrites ``results.csv``, ``table.md`` and
``ties.md`` from what a run (or several resumed runs) wrote there.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from captum_gradmask.stats import bootstrap_ci

__all__ = [
    "HEADLINE_KEYS",
    "METRICS",
    "TIE_KEYS",
    "MetricInfo",
    "bootstrap_ci",
    "load_rows",
    "markdown_table",
    "plot_grid",
    "summarize",
    "write_csv",
    "write_reports",
]


@dataclass(frozen=True)
class MetricInfo:
    """A column of the results: its key in the rows, a header and which way is better."""

    key: str
    header: str
    higher_is_better: bool | None
    scale: float = 1.0  # multiply per-image values by this in the table (e.g. hits -> %)


def _tie_columns(key: str, header: str, higher_is_better: bool) -> tuple[MetricInfo, ...]:
    """A curve's headline column (random ties) and its tie columns."""
    return (
        MetricInfo(key, f"{header} ↑" if higher_is_better else f"{header} ↓", higher_is_better),
        MetricInfo(f"{key}_tie_spread", f"{header} tie spread", None),
        MetricInfo(f"{key}_stable", f"{header} stable ties", higher_is_better),
        MetricInfo(f"{key}_reference", f"{header} reference ties", higher_is_better),
    )


# Insertion/deletion: the headline is the mean over random tie orders (docs/metrics.md).
_CURVES = (
    *_tie_columns("insertion_rise", "Ins. AUC (RISE)", True),
    *_tie_columns("deletion_rise", "Del. AUC (RISE)", False),
    *_tie_columns("insertion_notebook", "Ins. AUC (GM nb, %)", True),
    *_tie_columns("deletion_notebook", "Del. AUC (GM nb, %)", False),
)

METRICS: tuple[MetricInfo, ...] = (
    *_CURVES,
    MetricInfo("pointing_0", "Pointing 0 px (%) ↑", True, 100.0),
    MetricInfo("pointing_15", "Pointing 15 px (%) ↑", True, 100.0),
    MetricInfo("average_drop", "Avg drop (%) ↓", False),
    MetricInfo("increase_in_confidence", "Incr. conf. (%) ↑", True),
    MetricInfo("coherence", "Coherence (%) ↑", True),
    MetricInfo("complexity", "Complexity (%) ↓", False),
    MetricInfo("adcc", "ADCC (%) ↑", True),
    MetricInfo("infidelity", "Infidelity ↓", False),
    MetricInfo("sensitivity", "Max-sens. ↓", False),
    MetricInfo("seconds", "s / image ↓", False),
)

#: Columns of ``table.md``: every metric, insertion/deletion with random ties and their spread.
HEADLINE_KEYS: tuple[str, ...] = tuple(
    m.key for m in METRICS if not m.key.endswith(("_stable", "_reference"))
)
#: Columns of ``ties.md``: insertion/deletion under each tie policy and the spread.
TIE_KEYS: tuple[str, ...] = tuple(m.key for m in _CURVES)


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl``; a truncated last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarize(
    rows: Iterable[dict[str, Any]],
    methods: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per method: for each metric ``(mean, low, high, n)`` in table units, and the image count.

    Methods keep the order of ``methods`` (default: first appearance in ``rows``).
    """
    rows = list(rows)
    order = list(methods) if methods is not None else list(dict.fromkeys(r["method"] for r in rows))
    summary: dict[str, dict[str, Any]] = {}
    for method in order:
        own = [r for r in rows if r["method"] == method]
        if not own:
            continue
        entry: dict[str, Any] = {"images": len(own)}
        for metric in METRICS:
            values = [
                float(r[metric.key]) * metric.scale
                for r in own
                if r.get(metric.key) is not None and not _is_nan(r[metric.key])
            ]
            mean, low, high = bootstrap_ci(values, n_resamples, seed=seed)
            entry[metric.key] = (mean, low, high, len(values))
        summary[method] = entry
    return summary


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _format(value: float) -> str:
    if math.isnan(value):
        return "–"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.01 or value == 0:
        return f"{value:.3f}" if magnitude < 1 else f"{value:.2f}"
    return f"{value:.2e}"


def markdown_table(summary: dict[str, dict[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """A markdown table: one row per method, ``mean [low, high]`` per metric (95 % bootstrap
    CI of the mean over images); a metric computed on fewer images than the method's total
    shows its count as ``(n=...)``. Columns with no value at all are left out."""
    keys = [m for m in METRICS if metrics is None or m.key in metrics]
    keys = [m for m in keys if any(e[m.key][3] for e in summary.values())]
    header = "| method | images | " + " | ".join(m.header for m in keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 2)]
    for method, entry in summary.items():
        cells = []
        for metric in keys:
            mean, low, high, count = entry[metric.key]
            if count == 0:
                cells.append("–")
                continue
            cell = f"{_format(mean)} [{_format(low)}, {_format(high)}]"
            if count != entry["images"]:
                cell += f" (n={count})"
            cells.append(cell)
        lines.append(f"| {method} | {entry['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """All rows as a CSV (columns = the union of the rows' keys, in first-seen order)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with Path(path).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def plot_grid(
    images: Sequence[np.ndarray],
    maps: Sequence[Sequence[np.ndarray | None]],
    methods: Sequence[str],
    path: str | Path,
    titles: Sequence[str] | None = None,
) -> None:
    """Save a picture grid: one row per image (the image, then each method's heatmap over it).

    Args:
        images: ``(H, W, 3)`` arrays in [0, 1].
        maps: per image, per method, an ``(H, W)`` map or ``None`` (drawn empty).
        methods: column titles.
        path: the PNG to write.
        titles: optional row labels (e.g. class names).

    Signed maps are shown as Captum's ``visualize_image_attr`` does with
    ``sign="absolute_value"``: ``|map|`` divided by its 99th percentile and clipped to [0, 1]
    (a few extreme pixels would otherwise flatten gradient maps); non-negative maps have their
    minimum subtracted first (RISE's maps sit on a large offset). Drawn with the ``jet``
    colormap at 50 % opacity over the greyed image. Colours show each map's own ranking, not
    its scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(images), len(methods) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
    for r, image in enumerate(images):
        axes[r][0].imshow(image)
        axes[r][0].set_title(titles[r] if titles else "image", fontsize=7)
        grey = image.mean(axis=2)
        for c, method in enumerate(methods, start=1):
            ax = axes[r][c]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            saliency = maps[r][c - 1]
            if saliency is not None:
                values = saliency.astype(np.float32)
                magnitude = values - values.min() if values.min() >= 0 else np.abs(values)
                scale = float(np.quantile(magnitude, 0.99))
                shown = np.clip(magnitude / scale, 0, 1) if scale > 0 else magnitude * 0
                ax.imshow(shown, cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                ax.set_title(method, fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=48)
    plt.close(fig)


def write_reports(
    output: str | Path,
    methods: Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Write ``results.csv``, ``table.md`` (:data:`HEADLINE_KEYS`) and ``ties.md``
    (:data:`TIE_KEYS`) in ``output`` from its ``results.jsonl``."""
    output = Path(output)
    rows = load_rows(output / "results.jsonl")
    summary = summarize(rows, methods, n_resamples, seed)
    if rows:
        write_csv(rows, output / "results.csv")
    (output / "table.md").write_text(markdown_table(summary, HEADLINE_KEYS))
    (output / "ties.md").write_text(markdown_table(summary, TIE_KEYS))
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", help="a benchmark output folder (with results.jsonl)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_reports(args.output, n_resamples=args.bootstrap, seed=args.seed)
    print((Path(args.output) / "table.md").read_text())


if __name__ == "__main__":
    main()
