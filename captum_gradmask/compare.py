"""Compare evaluated map stores over the images they share: tables with CIs, paired
differences, tie policies, per-image rows, cost and a picture grid.

:func:`compare_stores` takes stores made by :func:`~captum_gradmask.explain_dataset.
explain_dataset` (one method each) and evaluated by :func:`~captum_gradmask.evaluation.
evaluate_store`, checks that they can be compared (same model, target policy, preprocessing
and evaluation settings; the first difference found is named), keeps the images every store
has evaluated (matched by file, so a 500-image store and a 100-image store are compared over
the 100 they share), and writes into a folder:

- ``table.md``: per method and metric, the mean over images with a 95 % percentile-bootstrap
  CI (:func:`captum_gradmask.stats.bootstrap_ci`);
- ``paired.md``: per method and metric, the mean paired difference to a reference method with a
  95 % bootstrap CI that resamples images jointly for every method and metric, marked where
  it excludes 0;
- ``standing.md`` (with a reference): per metric, the reference's rank and the methods it is
  ahead of, tied with and behind by the paired CIs; per method, those metrics and (with
  ``cost.md``) the cost relative to the reference;
- ``ties.md``: insertion/deletion under each tie policy and their spread;
- ``results.csv``: one row per image and method;
- ``grid.png``: the stored maps of the first images, one column per method;
- ``cost.md`` (with ``time_images``): forward and backward passes and seconds per image,
  measured here by explaining the first images again with each store's method.

Images a method was fitted on (``fitted``, e.g. a DiffMask gate's training files) are marked
in ``results.csv`` and left out of that method's numbers.

Example::

    >>> import tempfile
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.compare import compare_stores
    >>> from captum_gradmask.evaluation import evaluate_store
    >>> from captum_gradmask.explain_dataset import explain_dataset
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...     num_labels=5)).eval()
    >>> images = torch.utils.data.TensorDataset(torch.rand(4, 3, 32, 32))
    >>> folder = tempfile.mkdtemp()
    >>> stores = []
    >>> for method in ("gradmask-m1", "rollout"):
    ...     path = f"{folder}/{method}.zarr"
    ...     _ = explain_dataset(images, model, path, method=method, show_progress=False)
    ...     _ = evaluate_store(path, images, model, tie_samples=2, show_progress=False)
    ...     stores.append(path)
    >>> result = compare_stores(stores, f"{folder}/compare", reference="rollout",
    ...     grid_images=0)
    >>> result.methods, result.images
    (['gradmask-m1', 'rollout'], 4)
    >>> sorted(p.name for p in result.written)
    ['paired.md', 'results.csv', 'standing.md', 'table.md', 'ties.md']
"""

from __future__ import annotations

import csv
import math
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from captum_gradmask.stats import bootstrap_ci
from captum_gradmask.store import StoredMaps, StoreMismatch, open_maps

__all__ = [
    "DEFAULT_REFERENCE",
    "METRICS",
    "Comparison",
    "MetricInfo",
    "PassCounter",
    "compare_stores",
    "markdown_table",
    "measure_cost",
    "store_label",
    "stored_source",
]

#: The reference of ``paired.md`` when no other is named and a store holds it.
DEFAULT_REFERENCE = "gradmask-m4"


@dataclass(frozen=True)
class MetricInfo:
    """A metric column: its key in the rows, its table header, which way is better (``None``:
    neither) and the factor from per-image values to table units."""

    key: str
    header: str
    higher_is_better: bool | None
    scale: float = 1.0

    @property
    def title(self) -> str:
        """The header with an arrow for the better direction."""
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]
        return self.header + arrow


def _curve(key: str, header: str, higher_is_better: bool) -> tuple[MetricInfo, ...]:
    return (
        MetricInfo(key, header, higher_is_better),
        MetricInfo(f"{key}_tie_spread", f"{header} tie spread", None),
        MetricInfo(f"{key}_stable", f"{header} stable ties", higher_is_better),
        MetricInfo(f"{key}_reference", f"{header} reference ties", higher_is_better),
    )


_CURVES = (
    *_curve("insertion_notebook", "Ins. AUC (GM nb, %)", True),
    *_curve("deletion_notebook", "Del. AUC (GM nb, %)", False),
    *_curve("insertion_rise", "Ins. AUC (RISE)", True),
    *_curve("deletion_rise", "Del. AUC (RISE)", False),
)

#: Every column an evaluation can hold, in table order.
METRICS: tuple[MetricInfo, ...] = (
    *_CURVES,
    MetricInfo("pointing_0", "Pointing 0 px (%)", True, 100.0),
    MetricInfo("pointing_15", "Pointing 15 px (%)", True, 100.0),
    MetricInfo("average_drop", "Avg drop (%)", False),
    MetricInfo("increase_in_confidence", "Incr. conf. (%)", True),
    MetricInfo("coherence", "Coherence (%)", True),
    MetricInfo("complexity", "Complexity (%)", False),
    MetricInfo("adcc", "ADCC (%)", True),
    MetricInfo("infidelity", "Infidelity", False),
    MetricInfo("sensitivity", "Max-sens.", False),
)
_BY_KEY = {metric.key: metric for metric in METRICS}
# table.md: headline columns and spreads; ties.md: the curves under each policy.
_HEADLINE = [m for m in METRICS if not m.key.endswith(("_stable", "_reference"))]
_TIES = list(_CURVES)
# paired.md: the quality columns (a spread is no quality).
_PAIRED = [m for m in _HEADLINE if m.higher_is_better is not None]


@dataclass
class Comparison:
    """What :func:`compare_stores` found and wrote.

    Attributes:
        methods: one label per store, in the order given.
        images: images every store has evaluated (the rows compared).
        left_out: images in every store's list that some store has evaluated and another
            has not (not compared).
        reference: the method of ``paired.md`` (``None``: not written).
        summary: per method, per metric key ``(mean, low, high, n)`` in table units.
        paired: per method, per metric key ``(mean, low, high, n)`` of method minus reference.
        cost: per method ``{"forward": ..., "backward": ..., "seconds": ...}`` per image.
        written: the files written.
        not_shared: images evaluated by a store but absent from another store's list (not
            compared; e.g. files 1-400 of a 500-image store beside 100-image stores).
    """

    methods: list[str]
    images: int
    left_out: int
    reference: str | None
    summary: dict[str, dict[str, tuple[float, float, float, int]]]
    paired: dict[str, dict[str, tuple[float, float, float, int]]]
    cost: dict[str, dict[str, float]] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    not_shared: int = 0


@dataclass
class _Entry:
    """One store over the compared images: its label, its rows of those images (``rows``),
    per-image values as stored (``raw``) and in table units with the fitted rows left out
    (``columns``), and which rows it was fitted on."""

    label: str
    store: StoredMaps
    rows: np.ndarray
    raw: dict[str, np.ndarray]
    columns: dict[str, np.ndarray]
    fitted: np.ndarray


def compare_stores(
    stores: Sequence[str | Path],
    out: str | Path,
    *,
    evaluation: str | Sequence[str] = "metrics",
    reference: str | None = None,
    fitted: Mapping[str, Iterable[str]] | None = None,
    grid_images: int = 4,
    time_images: int = 0,
    model: nn.Module | None = None,
    dataset: Any = None,
    methods: Mapping[str, Any] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> Comparison:
    """Compare evaluated stores over the images they all evaluated; write the tables to ``out``.

    Args:
        stores: stores made by ``explain_dataset`` with the same model and target policy,
            each evaluated (``evaluate_store``) with the same settings. Their images are
            matched by file (as the stores record it); the compared images are those every
            store has evaluated, in the first store's order.
        out: the folder to write (created).
        evaluation: the evaluation sub-group to read (``evaluate --name``), or several whose
            columns are put together (an image counts when every one has evaluated it).
        reference: the method the others are paired with in ``paired.md`` (default
            :data:`DEFAULT_REFERENCE` when a store holds it, else no ``paired.md``).
        fitted: per method label, files it was fitted on (matched against the stores' files
            or their names): those rows are marked and left out of that method's numbers.
        grid_images: images in ``grid.png`` (0: none).
        time_images: re-explain the first K compared images with each store's method, in this
            process, to count passes and seconds per image (``cost.md``); 0: no cost table.
        model, dataset: for ``time_images`` and ``grid_images``: the model and the dataset of
            the stores (default: rebuilt from what the stores record).
        methods: for ``time_images``, built methods by label, for stores whose method the
            registry cannot rebuild (made from Python with a method object); the others are
            rebuilt from the name and settings their store records.
        n_resamples, seed: the bootstraps.

    Returns:
        A :class:`Comparison`.

    Raises:
        StoreMismatch: stores that differ in model, target policy, preprocessing or
            evaluation settings (the message names the field and the two stores), that explain
            one file for different targets, a store without the evaluation, or two stores of
            one method with the same settings.
        ValueError: bad arguments (named), or no image evaluated by every store.
    """
    if not stores:
        raise ValueError("`stores` is empty: give at least one evaluated store")
    for name, value in (("grid_images", grid_images), ("time_images", time_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{name}` must be an int >= 0, got {value!r}")
    names = [evaluation] if isinstance(evaluation, str) else list(evaluation)
    if not names:
        raise ValueError("`evaluation` is empty: name at least one evaluation")
    opened = [open_maps(path) for path in stores]
    for name in names:
        _check_comparable(opened, name)
    labels = _labels(opened)
    fitted = {str(k): set(map(str, v)) for k, v in (fitted or {}).items()}
    unknown = sorted(set(fitted) - set(labels))
    if unknown:
        raise ValueError(f"`fitted` names {unknown}, which are not among the methods {labels}")

    first = opened[0]
    files = [str(f) for f in first.files[:]]
    aligned, left_out, not_shared = _shared_rows(opened, names)
    if not len(aligned[0]):
        raise ValueError(
            f"no image has been evaluated ({', '.join(names)}) in every store; run evaluate on "
            "each (the stores' images are matched by file)"
        )
    rows = aligned[0]  # the first store's rows: its order, its files, its dataset
    entries = []
    for label, store, own in zip(labels, opened, aligned, strict=True):
        wanted = fitted.get(label, set())
        marks = np.array([files[r] in wanted or Path(files[r]).name in wanted for r in rows])
        raw = {}
        for name in names:
            sub = store.group[name]
            for key in sub.attrs["columns"]:
                raw.setdefault(key, np.asarray(sub[key][:], dtype=float)[own])
        columns = {}
        for key, values in raw.items():
            columns[key] = np.where(marks, np.nan, values * _BY_KEY[key].scale)
        entries.append(_Entry(label, store, own, raw, columns, marks))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        e.label: {
            key: (*bootstrap_ci(values, n_resamples, seed=seed), _count(values))
            for key, values in e.columns.items()
        }
        for e in entries
    }
    header = _header(len(rows), left_out, not_shared, entries, opened, names)
    written = [out / "table.md", out / "ties.md", out / "results.csv"]
    (out / "table.md").write_text(header + markdown_table(summary, _HEADLINE))
    (out / "ties.md").write_text(header + markdown_table(summary, _TIES))
    _write_rows(out / "results.csv", entries, rows, files)

    if reference is None and DEFAULT_REFERENCE in labels:
        reference = DEFAULT_REFERENCE
    if reference is not None and reference not in labels:
        raise ValueError(f"`reference` {reference!r} is not among the methods {labels}")
    paired: dict[str, dict[str, tuple[float, float, float, int]]] = {}
    if reference is not None:
        paired = _paired(entries, reference, n_resamples, seed)
        (out / "paired.md").write_text(_paired_markdown(paired, reference, len(rows), n_resamples))
        written.append(out / "paired.md")

    source = None
    if grid_images or time_images:
        source = _source(first, model, dataset)
    if grid_images:
        _write_grid(out / "grid.png", entries, grid_images, source[1], files)
        written.append(out / "grid.png")
    cost: dict[str, dict[str, float]] = {}
    if time_images:
        cost_model, cost_data = source
        built = dict(methods or {})
        for entry in entries:
            method = built.get(entry.label) or _method_of(entry.store, cost_model)
            cost[entry.label] = measure_cost(
                method, cost_model, cost_data, rows[:time_images],
                entry.store.targets.oindex[entry.rows[:time_images]],
            )  # fmt: skip
        (out / "cost.md").write_text(_cost_markdown(cost, reference, min(time_images, len(rows))))
        written.append(out / "cost.md")
    if reference is not None:
        text = _standing_markdown(summary, paired, cost, reference, len(rows))
        (out / "standing.md").write_text(text)
        written.append(out / "standing.md")
    return Comparison(
        labels, len(rows), left_out, reference, summary, paired, cost, sorted(written),
        not_shared,
    )  # fmt: skip


# --- checks --------------------------------------------------------------------------------


def _check_comparable(stores: list[StoredMaps], evaluation: str) -> None:
    """Refuse stores whose numbers cannot be set side by side, naming the first difference."""
    for store in stores:
        if evaluation not in store.group:
            raise StoreMismatch(
                f"the store {str(store.path)!r} has no evaluation {evaluation!r}; run "
                f"`captum-gradmask evaluate {store.path} --name {evaluation}` first"
            )
    first = stores[0]
    checks: list[tuple[str, Callable[[StoredMaps], Any]]] = [
        ("model (weights fingerprint)", lambda s: s.attrs["identity"]["model"]),
        ("target policy", lambda s: s.attrs["identity"]["target"]),
        ("input shape", lambda s: s.attrs["identity"].get("input_shape")),
        ("preprocessing", lambda s: s.attrs["identity"].get("preprocess")),
    ]
    for what, read in checks:
        for store in stores[1:]:
            if read(store) != read(first):
                raise StoreMismatch(
                    f"the stores differ in {what}: {str(first.path)!r} has {read(first)!r}, "
                    f"{str(store.path)!r} has {read(store)!r}; compare stores of one model, "
                    "one target policy"
                )
    base = first.group[evaluation].attrs.asdict().get("settings", {})
    for store in stores[1:]:
        settings = store.group[evaluation].attrs.asdict().get("settings", {})
        for key in sorted(set(base) & set(settings)):
            if base[key] != settings[key]:
                raise StoreMismatch(
                    f"the stores' evaluations {evaluation!r} differ in {key}: "
                    f"{str(first.path)!r} has {base[key]!r}, {str(store.path)!r} has "
                    f"{settings[key]!r}; evaluate every store with the same settings"
                )


def _shared_rows(stores: list[StoredMaps], names: list[str]) -> tuple[list[np.ndarray], int, int]:
    """Each store's rows of the images every store has evaluated (under every evaluation in
    ``names``), matched by file and in the first store's order; how many images of every
    store's list some store has evaluated and another has not; and how many evaluated images
    are missing from some store's list.

    Raises:
        StoreMismatch: two stores explained one image for different targets (the file named).
    """
    evaluated, listed = [], []
    for store in stores:
        done = store.evaluated(names)
        files = [str(f) for f in store.files[:]]
        evaluated.append({files[row]: int(row) for row in np.flatnonzero(done)})
        listed.append(set(files))
    common = [f for f in evaluated[0] if all(f in e for e in evaluated[1:])]
    every = set().union(*evaluated)
    shared = every.intersection(*listed)
    aligned = [np.array([e[f] for f in common], dtype=np.int64) for e in evaluated]
    first_targets = stores[0].targets.oindex[aligned[0]]
    for store, rows in zip(stores[1:], aligned[1:], strict=True):
        differ = np.flatnonzero(store.targets.oindex[rows] != first_targets)
        if len(differ):
            file = common[int(differ[0])]
            raise StoreMismatch(
                f"the stores {str(stores[0].path)!r} and {str(store.path)!r} explain {file!r} "
                f"for different targets ({int(first_targets[differ[0]])} and "
                f"{int(store.targets.oindex[rows][differ[0]])}); compare stores of one target "
                "policy"
            )
    return aligned, len(shared) - len(common), len(every) - len(shared)


def store_label(store: StoredMaps) -> str:
    """The label of a store's method and settings in the tables (``method_label``)."""
    from captum_gradmask.registry import method_label

    return method_label(str(store.attrs.get("method")), store.attrs["identity"].get("settings", {}))


def _labels(stores: list[StoredMaps]) -> list[str]:
    labels = [store_label(s) for s in stores]
    for i, label in enumerate(labels):
        if labels.index(label) != i:
            raise StoreMismatch(
                f"the stores {str(stores[labels.index(label)].path)!r} and "
                f"{str(stores[i].path)!r} hold the same method with the same settings "
                f"({label}); give each method once"
            )
    return labels


def _count(values: np.ndarray) -> int:
    return int(np.count_nonzero(~np.isnan(values)))


# --- tables --------------------------------------------------------------------------------


def _format(value: float, signed: bool = False) -> str:
    if math.isnan(value):
        return "–"
    sign = "+" if signed and value > 0 else ""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{sign}{value:.0f}"
    if magnitude >= 10:
        return f"{sign}{value:.1f}"
    if magnitude >= 0.01 or value == 0:
        return f"{sign}{value:.3f}" if magnitude < 1 else f"{sign}{value:.2f}"
    return f"{sign}{value:.2e}"


def markdown_table(
    summary: Mapping[str, Mapping[str, tuple[float, float, float, int]]],
    metrics: Sequence[MetricInfo] = _HEADLINE,
) -> str:
    """One row per method, one column per metric that any method has: ``mean [low, high]``;
    a cell counted on fewer images than the row's most shows ``(n=...)``.

    Example::

        >>> from captum_gradmask.compare import METRICS, markdown_table
        >>> print(markdown_table({"a": {"adcc": (70.0, 60.0, 80.0, 3)}}, METRICS), end="")
        | method | images | ADCC (%) ↑ |
        |---|---:|---:|
        | a | 3 | 70.0 [60.0, 80.0] |
    """
    shown = [m for m in metrics if any(e.get(m.key, (0, 0, 0, 0))[3] for e in summary.values())]
    lines = [
        "| method | images | " + " | ".join(m.title for m in shown) + " |",
        "|---|---:|" + "---:|" * len(shown),
    ]
    for method, entry in summary.items():
        counts = [entry[m.key][3] for m in shown if m.key in entry]
        images = max(counts, default=0)
        cells = []
        for metric in shown:
            mean, low, high, n = entry.get(metric.key, (math.nan, math.nan, math.nan, 0))
            cell = "–" if n == 0 else f"{_format(mean)} [{_format(low)}, {_format(high)}]"
            if 0 < n < images:
                cell += f" (n={n})"
            cells.append(cell)
        lines.append(f"| {method} | {images} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _header(
    images: int,
    left_out: int,
    not_shared: int,
    entries: list[_Entry],
    stores: list[StoredMaps],
    names: list[str],
) -> str:
    settings: dict[str, Any] = {}
    for name in names:
        settings.update(stores[0].group[name].attrs.asdict().get("settings", {}))
    text = f"{images} images evaluated by every store"
    if left_out:
        text += f" ({left_out} evaluated by some stores only are left out)"
    if not_shared:
        text += f"; {not_shared} more are in some stores' image lists only"
    fitted = [f"{e.label}: {int(e.fitted.sum())}" for e in entries if e.fitted.any()]
    if fitted:
        text += "; images a method was fitted on are left out of its row (" + ", ".join(fitted)
        text += ")"
    text += f". Target: {stores[0].attrs['identity']['target']}"
    if settings:
        text += "; evaluation settings: " + ", ".join(f"{k}={v}" for k, v in settings.items())
    text += ". " + _machines(stores, names)
    return text + " Cells: mean over images [95 % percentile-bootstrap CI of the mean].\n\n"


def _machines(stores: list[StoredMaps], names: list[str]) -> str:
    """Where the maps and scores were computed, from the sessions the stores and their
    evaluations record (``explain_dataset.record_session``)."""
    seen: dict[str, None] = {}
    dates = []
    unrecorded = 0
    parts = [s.group for s in stores] + [s.group[n] for s in stores for n in names]
    for group in parts:
        sessions = group.attrs.asdict().get("sessions") or []
        if not sessions or sessions[0].get("done_before", 0) > 0:
            unrecorded += 1
        for session in sessions:
            found = session.get("machine", {})
            where = f"{found.get('cpu', '?')} ({found.get('cores', '?')} cores"
            if found.get("numpy_simd"):
                where += ", numpy SIMD " + "/".join(found["numpy_simd"])
            where += ")"
            if found.get("gpu"):
                where += f" with {found['gpu']}"
            where += f", {session.get('device', '?')}, torch {session['versions'].get('torch')}"
            seen[where] = None
            dates.append(session["started"][:10])
    if not seen:
        return "Machines: not recorded (stores made before sessions were recorded)."
    text = f"Computed on {'; '.join(seen)}, from {min(dates)} to {max(dates)}"
    if unrecorded:
        text += (
            f"; {unrecorded} of the {len(parts)} stores and evaluations also hold work from "
            "before sessions were recorded"
        )
    return text + "."


def _write_rows(path: Path, entries: list[_Entry], rows: np.ndarray, files: list[str]) -> None:
    keys = [m.key for m in METRICS if any(m.key in e.columns for e in entries)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["image", "index", "method", "target", "predicted", "probability", "fitted", *keys]
        )
        for entry in entries:
            store, own = entry.store, entry.rows
            targets, predicted = store.targets.oindex[own], store.predicted.oindex[own]
            probability = store.probability.oindex[own]
            for position, row in enumerate(rows):
                values = [
                    float(entry.raw[key][position]) if key in entry.raw else math.nan
                    for key in keys
                ]
                writer.writerow(
                    [
                        Path(files[row]).name, int(row), entry.label, int(targets[position]),
                        int(predicted[position]), f"{float(probability[position]):.6g}",
                        int(entry.fitted[position]),
                        *("" if math.isnan(v) else f"{v:.8g}" for v in values),
                    ]
                )  # fmt: skip


def _paired(
    entries: list[_Entry], reference: str, n_resamples: int, seed: int
) -> dict[str, dict[str, tuple[float, float, float, int]]]:
    """Method minus reference per image; one set of resampled images for every method and
    metric (a joint bootstrap over images)."""
    base = next(e for e in entries if e.label == reference)
    count = len(base.fitted)
    picks = np.random.default_rng(seed).integers(0, count, size=(n_resamples, count))
    paired = {}
    for entry in entries:
        if entry.label == reference:
            continue
        cells = {}
        for metric in _PAIRED:
            if metric.key not in entry.columns or metric.key not in base.columns:
                continue
            difference = entry.columns[metric.key] - base.columns[metric.key]
            n = _count(difference)
            if n == 0:
                continue
            with np.errstate(invalid="ignore"):
                means = _nanmean_rows(difference[picks])
            low, high = np.nanquantile(means, [0.025, 0.975]) if n > 1 else (math.nan,) * 2
            cells[metric.key] = (float(np.nanmean(difference)), float(low), float(high), n)
        paired[entry.label] = cells
    return paired


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    counts = (~np.isnan(values)).sum(axis=1)
    sums = np.nansum(values, axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _paired_markdown(
    paired: dict[str, dict[str, tuple[float, float, float, int]]],
    reference: str,
    images: int,
    n_resamples: int,
) -> str:
    shown = [m for m in _PAIRED if any(m.key in cells for cells in paired.values())]
    lines = [
        f"Method minus {reference}, per image, over {images} images: mean paired difference "
        f"[95 % bootstrap CI, {n_resamples} resamples of the images, drawn once for every "
        "method and metric]. **Bold**: the CI excludes 0. The arrow says which sign is better.",
        "",
        "| method | " + " | ".join(m.title for m in shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for method, cells in paired.items():
        row = []
        for metric in shown:
            if metric.key not in cells:
                row.append("–")
                continue
            mean, low, high, n = cells[metric.key]
            text = _format(mean, signed=True)
            if low > 0 or high < 0:
                text = f"**{text}**"
            text += f" [{_format(low, signed=True)}, {_format(high, signed=True)}]"
            if n < images:
                text += f" (n={n})"
            row.append(text)
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _verdict(cells: tuple[float, float, float, int], better_higher: bool) -> str:
    """``ahead``/``behind`` (the reference, when the paired CI excludes 0) or ``tied``."""
    _, low, high, _ = cells
    if not (low > 0 or high < 0):  # includes 0, or NaN (one image)
        return "tied"
    method_better = low > 0 if better_higher else high < 0
    return "behind" if method_better else "ahead"


def _standing_markdown(
    summary: dict[str, dict[str, tuple[float, float, float, int]]],
    paired: dict[str, dict[str, tuple[float, float, float, int]]],
    cost: dict[str, dict[str, float]],
    reference: str,
    images: int,
) -> str:
    """Where the reference stands: per metric, its rank and the methods it is ahead of, tied
    with and behind (paired CIs); per method, the metrics of each kind and the cost ratio."""
    shown = [m for m in _PAIRED if any(m.key in cells for cells in paired.values())]
    lines = [
        f"Where {reference} stands, over {images} images. *Ahead of* / *behind*: the 95 % "
        f"bootstrap CI of the paired difference (`paired.md`) excludes 0; *tied*: it does not. "
        "Rank: of the methods' means, 1 = best.",
        "",
        f"| metric | {reference} | rank | best mean | {reference} ahead of | tied with | "
        f"{reference} behind |",
        "|---|---:|---:|---|---|---|---|",
    ]
    per_method: dict[str, dict[str, list[str]]] = {
        method: {"ahead": [], "tied": [], "behind": []} for method in paired
    }
    for metric in shown:
        sign = 1.0 if metric.higher_is_better else -1.0
        means = {
            method: cells[metric.key][0]
            for method, cells in summary.items()
            if metric.key in cells and not math.isnan(cells[metric.key][0])
        }
        if reference not in means:
            continue
        order = sorted(means, key=lambda method: -sign * means[method])
        rank = 1 + sum(sign * means[m] > sign * means[reference] for m in means)
        kinds: dict[str, list[str]] = {"ahead": [], "tied": [], "behind": []}
        for method, cells in paired.items():
            if metric.key in cells:
                kind = _verdict(cells[metric.key], bool(metric.higher_is_better))
                kinds[kind].append(method)
                per_method[method][kind].append(metric.title)
        lines.append(
            f"| {metric.title} | {_format(means[reference])} | {rank} of {len(means)} | "
            f"{order[0]} {_format(means[order[0]])} | "
            + " | ".join(", ".join(kinds[k]) or "–" for k in ("ahead", "tied", "behind"))
            + " |"
        )
    base = cost.get(reference)
    lines += [
        "",
        f"| method | {reference} ahead on | tied on | {reference} behind on |"
        + (f" s / image ÷ {reference}'s | forward passes | backward passes |" if base else ""),
        "|---|---|---|---|" + ("---:|---:|---:|" if base else ""),
    ]
    for method, kinds in per_method.items():
        line = f"| {method} | " + " | ".join(", ".join(kinds[k]) or "–" for k in kinds) + " |"
        if base:
            spent = cost.get(method)
            line += (
                f" {spent['seconds'] / base['seconds']:.2f} | {spent['forward']:.1f} | "
                f"{spent['backward']:.1f} |"
                if spent
                else " – | – | – |"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


# --- cost ----------------------------------------------------------------------------------


class PassCounter:
    """Count the images that go through a ViT and back.

    ``forward``: images through the model's last attention layer (the input of its
    LayerNorm, else of its value projection), whatever runs them: the model's ``forward``, or
    a method that runs the blocks itself (fast GradMask's and TIS's token-dropped passes,
    ViT-ReciproCAM's passes through the last block, backward-rule methods); a batch of ``n``
    counts ``n``. ``backward``: images whose gradient flows back through that layer. Give the
    ``adapter`` the counted method runs (its ``adapter``) for models whose adapter taps an
    attention it runs itself (timm EVA and BEiT, torchvision, OpenCLIP): those taps are the
    adapter's, not the model's. Without one, a model whose counted module is not one of its
    modules, or that no adapter recognises, is counted at its own forward and output. Hooks
    are removed on exit.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.compare import PassCounter
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> with PassCounter(model) as passes:
        ...     x = torch.rand(3, 3, 32, 32, requires_grad=True)
        ...     _ = model(x[:1])
        ...     model(x).logits.sum().backward()
        >>> passes.forward, passes.backward
        (4, 3)
    """

    def __init__(self, model: nn.Module, adapter: Any = None) -> None:
        from captum_gradmask.adapters import get_adapter

        self.model = model
        self.forward = 0
        self.backward = 0
        self._handle: Any = None
        self._counted: nn.Module = model
        if adapter is None:
            try:
                adapter = get_adapter(model)
            except ValueError:
                return
            counted = _last_layer_module(adapter)
            # A fresh adapter's own taps (attention it runs step by step) never run when a
            # method runs another adapter: count at the model's forward then.
            if any(module is counted for module in model.modules()):
                self._counted = counted
        else:
            self._counted = _last_layer_module(adapter)

    def __enter__(self) -> PassCounter:
        if self._counted is self.model:
            self._handle = self.model.register_forward_hook(self._hook)
        else:  # the input: methods with backward rules may replace the module's output
            self._handle = self._counted.register_forward_pre_hook(
                lambda module, args: self._count(args[0])
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        from captum_gradmask._utils import extract_logits

        self._count(extract_logits(output))

    def _count(self, tensor: Tensor) -> None:
        self.forward += int(tensor.shape[0])
        if tensor.requires_grad:
            tensor.register_hook(self._backward_hook)

    def _backward_hook(self, grad: Tensor) -> None:
        self.backward += int(grad.shape[0])


def _last_layer_module(adapter: Any) -> nn.Module:
    """A module every pass of the adapter's model runs once per image in its last layer: the
    last block's attention LayerNorm (token-level methods run it too), else the last layer's
    value projection."""
    norms = adapter.tokens.attention_norms if adapter.tokens is not None else None
    return norms[-1] if norms else adapter.layers[-1].value.module


def measure_cost(
    method: Any, model: nn.Module, dataset: Any, indices: Sequence[int], targets: Sequence[int]
) -> dict[str, float]:
    """Passes and seconds per image of ``method`` on the dataset items ``indices`` (one image a
    call, each explaining its ``targets`` entry), after one untimed warm-up call on the first.

    Returns:
        ``{"forward": ..., "backward": ..., "seconds": ...}``, means per image
        (:class:`PassCounter`; wall-clock seconds, CUDA work included).
    """
    from captum_gradmask._utils import model_device
    from captum_gradmask.explain_dataset import attribution_grid

    device = model_device(model)

    def explain(index: int, target: int) -> None:
        image = dataset[int(index)]
        pixels = (image[0] if isinstance(image, (tuple, list)) else image)[None].to(device)
        attribution_grid(method, pixels, torch.tensor([int(target)], device=device))

    explain(indices[0], targets[0])  # warm-up: allocations, lazy set-up, kernel choice
    forward = backward = 0
    seconds = 0.0
    for index, target in zip(indices, targets, strict=True):
        with PassCounter(model, getattr(method, "adapter", None)) as passes:
            _synchronize(device)
            start = time.perf_counter()
            explain(index, target)
            _synchronize(device)
            seconds += time.perf_counter() - start
        forward += passes.forward
        backward += passes.backward
    n = len(indices)
    return {"forward": forward / n, "backward": backward / n, "seconds": seconds / n}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cost_markdown(cost: dict[str, dict[str, float]], reference: str | None, images: int) -> str:
    base = cost.get(reference) if reference else None
    lines = [
        f"Per image, over the first {images} compared images, each explained again in one "
        "process after an untimed warm-up call per method. Forward: images through the "
        "model's last attention layer (passes through the last block alone included); "
        "backward: images whose gradient flowed back through it. Seconds "
        "compare methods only within this table (one machine, one run).",
        "",
        "| method | forward passes ↓ | backward passes ↓ | s / image ↓ |"
        + (f" s / {reference}'s ↓ |" if base else ""),
        "|---|---:|---:|---:|" + ("---:|" if base else ""),
    ]
    for method, values in cost.items():
        line = (
            f"| {method} | {values['forward']:.1f} | {values['backward']:.1f} | "
            f"{_format(values['seconds'])} |"
        )
        if base:
            line += f" {values['seconds'] / base['seconds']:.2f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


# --- what the stores record: model, images, methods ----------------------------------------


def _source(store: StoredMaps, model: nn.Module | None, dataset: Any) -> tuple[nn.Module, Any]:
    """The model and dataset of a store: the ones given, else rebuilt from its records."""
    if model is not None and dataset is not None:
        return model, dataset
    loaded, images = stored_source(store)
    return model or loaded, images if dataset is None else dataset


def stored_source(store: str | Path | StoredMaps) -> tuple[nn.Module, Any]:
    """The model (on the CPU, in eval mode) and the images a store was made from, rebuilt
    from what it records (``model.spec``, ``model.weights``, zero-shot labels, ``source``).

    Raises:
        ValueError: the store does not record them (made from Python with a dataset object).
    """
    from captum_gradmask.datasets import open_source
    from captum_gradmask.models import load_model

    store = store if isinstance(store, StoredMaps) else open_maps(store)
    recorded = store.attrs.get("model", {})
    source = store.attrs.get("source")
    if recorded.get("spec") is None or source is None:
        raise ValueError(
            f"the store {str(store.path)!r} does not record its model or source; pass `model` "
            "and `dataset`"
        )
    labels = recorded.get("labels")
    model, preprocess = load_model(
        recorded["spec"],
        weights=recorded.get("weights"),
        labels=labels,
        templates=recorded.get("templates") if labels else None,
    )
    return model, open_source(source, preprocess, limit=len(store))


def _method_of(store: StoredMaps, model: nn.Module) -> Any:
    from captum_gradmask.registry import build_method

    return build_method(store.attrs["method"], model, **store.attrs["settings"])


#: Methods side by side in one band of ``grid.png``; more methods wrap into further bands.
GRID_METHODS_PER_BAND = 8


def _write_grid(
    path: Path, entries: list[_Entry], count: int, dataset: Any, files: list[str]
) -> None:
    """The first ``count`` compared images (un-normalised) and each method's stored map over
    them, one row per image; beyond :data:`GRID_METHODS_PER_BAND` methods the columns wrap into
    bands of rows (each band repeats the images), so every panel stays legible."""
    from matplotlib.figure import Figure

    from captum_gradmask._ops import upsample_grid

    preprocess = getattr(dataset, "preprocess", None)
    rows = entries[0].rows[:count]
    bands = [
        entries[start : start + GRID_METHODS_PER_BAND]
        for start in range(0, len(entries), GRID_METHODS_PER_BAND)
    ]
    width = len(bands[0]) + 1
    figure = Figure(figsize=(1.3 * width, 1.5 * len(rows) * len(bands)))
    axes = figure.subplots(len(rows) * len(bands), width, squeeze=False)
    for r, row in enumerate(rows):
        item = dataset[int(row)]
        pixels = item[0] if isinstance(item, (tuple, list)) else item
        if preprocess is not None:
            mean = torch.tensor(preprocess.mean)[:, None, None]
            std = torch.tensor(preprocess.std)[:, None, None]
            pixels = pixels * std + mean
        else:
            pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp(min=1e-12)
        image = pixels.clamp(0, 1).permute(1, 2, 0).numpy()
        target = int(entries[0].store.targets[int(row)])
        grey = image.mean(axis=2)
        for b, band in enumerate(bands):
            line = axes[b * len(rows) + r]
            line[0].imshow(image)
            line[0].set_title(f"{Path(files[row]).stem[-8:]} ({target})", fontsize=7)
            for c, entry in enumerate(band, start=1):
                line[c].imshow(grey, cmap="gray", vmin=0, vmax=1)
                stored = entry.store.maps[int(entry.rows[r])]
                saliency = torch.from_numpy(np.asarray(stored, dtype=np.float32))
                if not torch.isnan(saliency).any():
                    up = upsample_grid(saliency[None], tuple(image.shape[:2]), 1)[0, 0].numpy()
                    line[c].imshow(_display(up), cmap="jet", alpha=0.5, vmin=0, vmax=1)
                if r == 0:
                    line[c].set_title(_panel_title(entry.label), fontsize=7)
            for c in range(len(band) + 1, width):  # the last band's empty places
                line[c].set_axis_off()
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    figure.tight_layout(pad=0.2)
    figure.savefig(path, dpi=72)


def _panel_title(label: str, width: int = 18) -> str:
    """``label`` broken at spaces into lines of at most ``width`` characters, so a long label
    (``gradmask-ablation (variant=random masks, seed=0)``) stays over its own panel of the grid
    instead of running into its neighbours'. A single longer word (``integrated-gradients``)
    stays whole: the panel fits a few more characters, and a name cut in two reads wrong."""
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False, break_long_words=False))


def _display(values: np.ndarray) -> np.ndarray:
    """A map in [0, 1] for display, as Captum's ``visualize_image_attr`` with
    ``sign="absolute_value"``: ``|map|`` over its 99th percentile, clipped; a non-negative map
    has its minimum subtracted first (RISE's maps sit on a large offset)."""
    magnitude = values - values.min() if values.min() >= 0 else np.abs(values)
    scale = float(np.quantile(magnitude, 0.99))
    return np.clip(magnitude / scale, 0, 1) if scale > 0 else magnitude * 0
