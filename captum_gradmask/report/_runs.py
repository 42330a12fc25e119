"""What a report reads from a map store: its rows, labels and boxes, evaluations and curves."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from captum_gradmask.store import StoredMaps, open_maps

# Metric columns a report knows, grouped as `evaluate --metrics` names them; percent columns
# are shown x 100. Lower is better for deletion, average drop and complexity.
METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "notebook": ("insertion_notebook", "deletion_notebook"),
    "rise": ("insertion_rise", "deletion_rise"),
    "pointing": ("pointing_0", "pointing_15"),
    "adcc": ("average_drop", "increase_in_confidence", "coherence", "complexity", "adcc"),
}
PERCENT = frozenset({"pointing_0", "pointing_15"})
LOWER_IS_BETTER = frozenset({"deletion_notebook", "deletion_rise", "average_drop", "complexity"})


@dataclass
class Run:
    """One store as the report sees it (arrays of length N, one entry per row).

    Attributes:
        path: the store's folder.
        name: its display name (the folder's name, made unique among the report's stores).
        key: a short folder-safe name for its files in the report.
        store: the opened store.
        attrs: the store's attributes.
        files: each row's file.
        targets, predicted, probability: as stored.
        explained: rows with a map (done and not skipped).
        errors: why a row was skipped ("" otherwise).
        labels: the true class of each row (-1: unknown).
        boxes: per row, ``(K, 4)`` boxes in original-image pixels, or ``None``.
        image_paths: per row, the image file on disk, or ``None``.
        class_names: class index to name.
        metrics: per-image metric columns found in the store's evaluations (NaN: not rated).
        evaluations: the evaluation sub-groups read.
        curves: per curve column, ``(fractions, (N, points) probabilities)``.
    """

    path: Path
    name: str
    key: str
    store: StoredMaps
    attrs: dict[str, Any]
    files: list[str]
    targets: np.ndarray
    predicted: np.ndarray
    probability: np.ndarray
    explained: np.ndarray
    errors: np.ndarray
    labels: np.ndarray
    boxes: list[np.ndarray] | None
    image_paths: list[Path | None]
    class_names: dict[int, str]
    metrics: dict[str, np.ndarray] = field(default_factory=dict)
    evaluations: list[str] = field(default_factory=list)
    curves: dict[str, tuple[np.ndarray, Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def correct(self) -> np.ndarray:
        """``(N,)`` float: 1 where the top-1 class is the label, 0 where not, NaN unknown."""
        known = (self.labels >= 0) & (self.predicted >= 0)
        return np.where(known, (self.predicted == self.labels).astype(float), np.nan)

    def class_name(self, index: int) -> str:
        if index < 0:
            return "-"
        return self.class_names.get(int(index), str(index))

    def identity_digest(self) -> str:
        """16 hex digits of the store's identity (model, method, settings, files)."""
        text = json.dumps(self.attrs.get("identity", {}), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read everything a report needs from the store at ``path`` except the maps."""
    path = Path(path)
    store = open_maps(path)
    attrs = store.attrs
    files = [str(f) for f in store.files[:].tolist()]
    errors = np.asarray([str(e) for e in store.errors[:].tolist()], dtype=object)
    done = np.asarray(store.done[:], dtype=bool)
    targets = np.asarray(store.targets[:], dtype=np.int64)
    labels, boxes, image_paths = _source_rows(attrs, files)
    if attrs.get("target") == "label":
        labels = np.where(labels >= 0, labels, targets)  # the explained class is the label
    name = name or path.name
    run = Run(
        path=path,
        name=name,
        key=_slug(name),
        store=store,
        attrs=attrs,
        files=files,
        targets=targets,
        predicted=np.asarray(store.predicted[:], dtype=np.int64),
        probability=np.asarray(store.probability[:], dtype=float),
        explained=done & (errors == ""),
        errors=errors,
        labels=labels,
        boxes=boxes,
        image_paths=image_paths,
        class_names=_class_names(attrs),
    )
    _read_evaluations(run)
    return run


def _read_evaluations(run: Run) -> None:
    """Merge the metric columns of every evaluation sub-group (the first one that has a column
    gives it) and keep the per-image curves they recorded."""
    group = run.store.group
    for name in sorted(k for k, _ in group.groups()):
        sub = group[name]
        columns = sub.attrs.get("columns")
        if not columns:
            continue
        run.evaluations.append(name)
        rated = np.asarray(sub["done"][:], dtype=bool)
        for column in columns:
            if column in run.metrics:
                continue
            values = np.asarray(sub[column][:], dtype=float)
            values[~rated] = np.nan
            run.metrics[column] = values * (100.0 if column in PERCENT else 1.0)
        for column, fractions in (sub.attrs.get("curves") or {}).items():
            if column not in run.curves and f"curve_{column}" in sub:
                run.curves[column] = (np.asarray(fractions, dtype=float), sub[f"curve_{column}"])


def _source_rows(
    attrs: dict[str, Any], files: list[str]
) -> tuple[np.ndarray, list[np.ndarray] | None, list[Path | None]]:
    """Labels, boxes and image paths from the store's recorded source, when it is still there
    and lists the same files; unknown (-1, ``None``) otherwise."""
    unknown = np.full(len(files), -1, dtype=np.int64)
    source = attrs.get("source")
    if not source or not Path(source).exists():
        return unknown, None, [None] * len(files)
    from captum_gradmask.datasets import open_source
    from captum_gradmask.models import PreprocessConfig

    shape = attrs.get("identity", {}).get("input_shape", [3, 224, 224])
    config = PreprocessConfig(tuple(shape[-2:]), (0.5,) * 3, (0.5,) * 3)
    try:
        images = open_source(source, config, limit=len(files))
    except (OSError, ValueError):
        return unknown, None, [None] * len(files)
    if list(images.files) != files:
        return unknown, None, [None] * len(files)
    labels = unknown if images.labels is None else np.asarray(images.labels, dtype=np.int64)
    boxes = None
    if images.boxes is not None:
        boxes = [np.asarray(b, dtype=float).reshape(-1, 4) for b in images.boxes]
    paths = [images.path(i) for i in range(len(files))]
    return labels, boxes, [p if p.is_file() else None for p in paths]


def _class_names(attrs: dict[str, Any]) -> dict[int, str]:
    """The store's class names, else the ``id2label`` of a local Hugging Face model folder it
    records, else none (classes are shown by index)."""
    if attrs.get("classes"):
        return {i: str(name) for i, name in enumerate(attrs["classes"])}
    spec = (attrs.get("model") or {}).get("spec")
    config = Path(spec) / "config.json" if spec and not spec.startswith("timm:") else None
    if config is not None and config.is_file():
        try:
            id2label = json.loads(config.read_text()).get("id2label") or {}
        except (OSError, json.JSONDecodeError):
            id2label = {}
        return {int(k): str(v) for k, v in id2label.items()}
    return {}


def _slug(name: str) -> str:
    text = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
    return text[:40] or "store"


def unique_names(paths: list[Path]) -> list[str]:
    """Display names of the stores: their folder names, with the parent folder prepended (and
    then a number) where two would be the same."""
    names = [p.name for p in paths]
    for i, path in enumerate(paths):
        if names.count(names[i]) > 1:
            names[i] = f"{path.parent.name}/{path.name}"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name} ({seen[name]})"
    return names
