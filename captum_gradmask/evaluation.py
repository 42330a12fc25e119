"""Evaluate the maps of a store made by :func:`captum_gradmask.explain_dataset.explain_dataset`
with the project's metrics (resumably, sharded over torch.distributed ranks like the run that
made it), write the per-image rows and a summary with bootstrap CIs, and draw one stored map.

Example::

    >>> import tempfile
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.evaluation import evaluate_store
    >>> from captum_gradmask.explain_dataset import explain_dataset
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...     num_labels=5)).eval()
    >>> images = torch.utils.data.TensorDataset(torch.rand(4, 3, 32, 32))
    >>> path = tempfile.mkdtemp() + "/maps.zarr"
    >>> _ = explain_dataset(images, model, path, method="gradmask-m1", show_progress=False)
    >>> result = evaluate_store(path, images, model, metrics=["rise"], show_progress=False)
    >>> result.columns, result.evaluated
    (['insertion_rise', 'deletion_rise'], 4)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captum_gradmask import _sharding, datasets
from captum_gradmask._utils import (
    check_positive_int,
    model_device,
    preserved_model_state,
    renamed_keyword,
)
from captum_gradmask.datasets import ItemBatch
from captum_gradmask.explain_dataset import attribution_grid, model_fingerprint, versions
from captum_gradmask.metrics import (
    gradmask_notebook_deletion,
    gradmask_notebook_insertion,
    rise_deletion,
    rise_insertion,
)
from captum_gradmask.registry import AttributionMethod, build_method, method_label
from captum_gradmask.stats import bootstrap_ci
from captum_gradmask.store import StoredMaps, StoreMismatch, files_digest, open_maps, require_zarr

__all__ = [
    "METRIC_COLUMNS",
    "EvaluationSummary",
    "evaluate_store",
    "save_stored_map",
    "write_evaluation",
]

# Metric groups of evaluate_store and the per-image columns each writes (units of the
# benchmark's rows: AUCs as the metric returns them, pointing hits 0/1, ADCC parts in percent).
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "notebook": ("insertion_notebook", "deletion_notebook"),
    "rise": ("insertion_rise", "deletion_rise"),
    "pointing": ("pointing_0", "pointing_15"),
    "adcc": ("average_drop", "increase_in_confidence", "coherence", "complexity", "adcc"),
}
_SUMMARY_SCALE = {"pointing_0": 100.0, "pointing_15": 100.0}  # hit rates in percent
# Columns whose per-image curves are kept too (``curve_<column>``, images x points; the x
# axis, the fraction inserted or deleted, is in the evaluation's attribute ``curves``).
_CURVE_COLUMNS = {
    "insertion_notebook": gradmask_notebook_insertion,
    "deletion_notebook": gradmask_notebook_deletion,
    "insertion_rise": rise_insertion,
    "deletion_rise": rise_deletion,
}


@dataclass(frozen=True)
class EvaluationSummary:
    """What :func:`evaluate_store` computed.

    Attributes:
        store: the store's path.
        name: the evaluation's sub-group.
        columns: the per-image columns.
        summary: per column ``(mean, low, high, n)`` over the evaluated images (95 % percentile
            bootstrap CI; pointing-game hit rates in percent).
        evaluated: rows this rank evaluated in this call.
        rank, world_size: as in :class:`RunSummary`.
    """

    store: Path
    name: str
    columns: list[str]
    summary: dict[str, tuple[float, float, float, int]]
    evaluated: int
    rank: int
    world_size: int

    def markdown(self) -> str:
        """The summary as a markdown table (one row per column)."""
        lines = ["| metric | mean | 95 % CI | n |", "|---|---:|---:|---:|"]
        for column, (mean, low, high, n) in self.summary.items():
            lines.append(f"| {column} | {mean:.4g} | [{low:.4g}, {high:.4g}] | {n} |")
        return "\n".join(lines)


def evaluate_store(
    store: str | Path,
    dataset: Dataset | DataLoader,
    model: nn.Module,
    *,
    metrics: Sequence[str] = ("notebook",),
    method: str | AttributionMethod | None = None,
    name: str = "metrics",
    batch_size: int | None = None,
    num_workers: int | None = None,
    perturbations_per_eval: int = 64,
    n_resamples: int = 1000,
    seed: int = 0,
    show_progress: bool = True,
    metric_batch_size: int | None = None,
) -> EvaluationSummary:
    """Run the project's metrics over the maps of a store, resumably and sharded like
    :func:`explain_dataset`, into per-image columns of the store's sub-group ``name``.

    Metric groups (:data:`METRIC_COLUMNS`): ``"notebook"`` (the GradMask authors' insertion
    and deletion), ``"rise"`` (RISE's), ``"pointing"`` (pointing game at 0 and 15 px; needs
    boxes, e.g. a CSV source with ``xmin,ymin,xmax,ymax``) and ``"adcc"`` (re-explains each
    image's explanation with the store's method). Only rows whose map is done and that were
    not skipped are evaluated; rows evaluated before are not evaluated again.

    Args:
        store: the store's path.
        dataset: the dataset the store was made from (same files, same preprocessing).
        model: the model the store was made with (checked by fingerprint).
        metrics: metric groups.
        method: for ``"adcc"``: the method to re-explain with (default: the store's registry
            method and settings).
        name: the sub-group holding the columns (another name keeps another evaluation).
        batch_size, num_workers: images per step and decoding processes, as in
            :func:`explain_dataset`.
        perturbations_per_eval: perturbed images per forward pass inside the metrics.
        n_resamples, seed: the bootstrap of the summary.
        show_progress: a progress bar on rank 0.
        metric_batch_size: deprecated name of ``perturbations_per_eval``.

    Returns:
        An :class:`EvaluationSummary` (means with 95 % CIs over all evaluated rows).

    Raises:
        StoreMismatch: the dataset or model is not the store's, or the evaluation ``name``
            exists with other metric groups.
        ValueError: unknown metric groups, or ``"pointing"`` without boxes.
    """
    require_zarr()
    dataset, batch_size, num_workers, pin_memory = datasets.loader_settings(
        dataset, batch_size, num_workers
    )
    groups = _check_metrics(metrics)
    per_eval = renamed_keyword(
        perturbations_per_eval, 64, metric_batch_size, "perturbations_per_eval", "metric_batch_size"
    )
    check_positive_int(per_eval, "perturbations_per_eval")
    if name in ("maps", "files", "targets", "predicted", "probability", "done", "errors"):
        raise ValueError(f"`name` {name!r} is one of the store's arrays; choose another name")
    maps = open_maps(store)
    identity = maps.attrs["identity"]
    files = datasets.file_names(dataset)
    if files_digest(files) != identity["files_sha256"]:
        raise StoreMismatch(
            f"the dataset's {len(files)} files are not the {len(maps)} files the store "
            f"{str(store)!r} was made from; pass the same source (and --limit)"
        )
    if model_fingerprint(model) != identity["model"]["fingerprint"]:
        raise StoreMismatch(
            f"the model is not the one the store {str(store)!r} was made with (its weights "
            f"differ); its maps must be evaluated with the model that made them"
        )
    if "pointing" in groups and getattr(dataset, "boxes", None) is None:
        raise ValueError(
            "metric 'pointing' needs object boxes: use a CSV source with xmin,ymin,xmax,ymax "
            "columns (e.g. the ImageNet sample's annotations.csv)"
        )
    explainer = None
    if "adcc" in groups:
        explainer = method or build_method(maps.attrs["method"], model, **maps.attrs["settings"])
    columns = [column for group in groups for column in METRIC_COLUMNS[group]]
    input_shape = tuple(identity["input_shape"])
    device = model_device(model)

    with _sharding.process_group(device) as (rank, world):
        maps = _sharding.rank0_first(
            rank,
            world,
            device,
            lambda: _create_evaluation(store, name, groups, columns),
            lambda: open_maps(store, mode="r+"),
        )
        results = maps.group[name]
        pending = np.asarray(maps.done[:]) & ~maps.skipped() & ~np.asarray(results["done"][:])
        _, batches = _sharding.shard(~pending, maps.chunk_size, batch_size, rank, world)
        _sharding.barrier(world, device)
        loader = datasets.loader(dataset, batches, input_shape, num_workers, pin_memory)
        bar = tqdm(
            total=sum(len(b) for b in batches),
            unit="img",
            desc="evaluate" if world == 1 else f"evaluate (rank 0 of {world})",
            disable=not show_progress or rank != 0,
            dynamic_ncols=True,
        )
        # Curves are recorded when the evaluation was created with them (older ones have none).
        curves = [f"curve_{c}" for c in _CURVE_COLUMNS if c in columns and f"curve_{c}" in results]
        arrays = {column: results[column] for column in [*columns, *curves, "done"]}
        evaluated = 0
        with bar, preserved_model_state(model):
            for batch in loader:
                values = _evaluate_batch(
                    maps, dataset, model, explainer, batch, groups, device, per_eval
                )
                where = batch.indices.numpy()
                for column in [*columns, *curves]:
                    if column in values:  # (no curve when no image of the batch was read)
                        arrays[column].oindex[where] = values[column]
                arrays["done"].oindex[where] = True
                evaluated += len(where)
                bar.update(len(where))
        _sharding.barrier(world, device)
        summary = {
            column: (
                *bootstrap_ci(
                    np.asarray(arrays[column][:], dtype=float) * _SUMMARY_SCALE.get(column, 1.0),
                    n_resamples,
                    seed=seed,
                ),
                int(np.count_nonzero(~np.isnan(np.asarray(arrays[column][:], dtype=float)))),
            )
            for column in columns
        }
    return EvaluationSummary(Path(store), name, columns, summary, evaluated, rank, world)


def _create_evaluation(
    store: str | Path, name: str, groups: list[str], columns: list[str]
) -> StoredMaps:
    maps = open_maps(store, mode="r+")
    if name in maps.group:
        existing = maps.group[name].attrs.get("metrics")
        if existing != groups:
            raise StoreMismatch(
                f"the store's evaluation {name!r} holds the metric groups {existing}, not "
                f"{groups}; evaluate with those to resume it, or pass another name (--name)"
            )
        return maps
    results = maps.group.create_group(name)
    for column in [*columns, "done"]:
        results.create_array(
            column,
            shape=(len(maps),),
            chunks=(maps.chunk_size,),
            dtype="bool" if column == "done" else "float32",
            fill_value=False if column == "done" else np.nan,
            dimension_names=("image",),
        )
    curves = {}
    for column in (c for c in columns if c in _CURVE_COLUMNS):
        fractions = _curve_fractions(column, maps)
        curves[column] = fractions
        results.create_array(
            f"curve_{column}",
            shape=(len(maps), len(fractions)),
            chunks=(maps.chunk_size, len(fractions)),
            dtype="float32",
            fill_value=np.nan,
            dimension_names=("image", "step"),
        )
    results.attrs.update(
        {
            "metrics": groups,
            "columns": columns,
            "curves": curves,
            "versions": versions(),
        }
    )
    return maps


def _curve_fractions(column: str, maps: StoredMaps) -> list[float]:
    """The x axis of a curve column: the metric run once on a blank image with a constant
    stand-in model (its fractions depend only on the input and map shapes, and the patch
    size)."""
    input_shape = tuple(maps.attrs["identity"]["input_shape"])
    saliency = torch.zeros(1, *maps.map_shape)
    result = _CURVE_COLUMNS[column](
        lambda x: torch.zeros(x.shape[0], 2), torch.zeros(1, *input_shape), saliency, 0
    )
    return [round(float(f), 6) for f in result.fractions]


def _evaluate_batch(
    store: StoredMaps,
    dataset: Any,
    model: nn.Module,
    explainer: Any,
    batch: ItemBatch,
    groups: list[str],
    device: torch.device,
    per_eval: int,
) -> dict[str, np.ndarray]:
    from captum_gradmask.metrics import adcc, pointing_game

    n = len(batch.indices)
    out = {c: np.full(n, np.nan, dtype=np.float32) for g in groups for c in METRIC_COLUMNS[g]}
    curves = [c for c in out if c in _CURVE_COLUMNS]
    positions = batch.readable.nonzero().flatten()
    if not len(positions):
        return out
    indices = batch.indices[positions].numpy()
    images = batch.pixels.to(device, non_blocking=True)
    saliency = torch.from_numpy(np.asarray(store.maps.oindex[indices])).to(device)
    targets = torch.from_numpy(np.asarray(store.targets.oindex[indices])).to(device)
    rows = positions.numpy()

    batching = {"perturbations_per_eval": per_eval}

    def put(column: str, values: Tensor) -> None:
        if column not in out:  # a curve: (B, points), created at the first one
            out[column] = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
        out[column][rows] = values.detach().float().cpu().numpy()

    for column in curves:
        curve = _CURVE_COLUMNS[column](model, images, saliency, targets, **batching)
        put(column, curve.auc)
        put(f"curve_{column}", curve.probabilities)
    if "pointing" in groups:
        from PIL import Image

        paths = [dataset.path(int(i)) for i in indices]
        sizes = []
        for path in paths:
            with Image.open(path) as image:
                sizes.append((image.height, image.width))
        for tolerance in (0, 15):
            game = pointing_game(
                saliency,
                [dataset.boxes[int(i)] for i in indices],
                targets.cpu(),
                original_sizes=sizes,
                input_size=tuple(images.shape[-2:]),
                tolerance=tolerance,
            )
            put(f"pointing_{tolerance}", game.hits)
    if "adcc" in groups:

        def explain(inputs: Tensor, target: Tensor) -> Tensor:
            return attribution_grid(explainer, inputs, target)

        result = adcc(
            model, images, saliency, targets, explanation_func=explain, internal_batch_size=per_eval
        )
        for column in METRIC_COLUMNS["adcc"]:
            put(column, 100.0 * getattr(result, column).float())
    return out


def write_evaluation(store: str | Path, summary: EvaluationSummary, out: str | Path) -> Path:
    """Write ``rows.csv`` (one row per image: file, target, predicted, probability and the
    metric columns; empty where not evaluated) and ``summary.json`` / ``summary.md`` into the
    folder ``out``; returns it."""
    maps = open_maps(store)
    columns = maps.evaluation(summary.name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = maps.files[:].tolist()
    targets, predicted = maps.targets[:], maps.predicted[:]
    probability = maps.probability[:]
    with (out / "rows.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "file", "target", "predicted", "probability", *summary.columns])
        for i in range(len(maps)):
            if not columns["done"][i]:
                continue
            values = [columns[c][i] for c in summary.columns]
            writer.writerow(
                [i, files[i], int(targets[i]), int(predicted[i]), f"{probability[i]:.6g}"]
                + ["" if np.isnan(v) else f"{v:.6g}" for v in values]
            )
    (out / "summary.json").write_text(
        json.dumps(
            {
                "store": str(store),
                "evaluation": summary.name,
                "confidence": 0.95,
                "metrics": {
                    c: dict(zip(("mean", "low", "high", "n"), v, strict=True))
                    for c, v in summary.summary.items()
                },
            },
            indent=2,
        )
    )
    (out / "summary.md").write_text(summary.markdown() + "\n")
    return out


def save_stored_map(store: str | Path, index: int, out: str | Path) -> Path:
    """Save the map of row ``index`` of a store as a PNG: blended over its image when the
    store's source and preprocessing are known and the file is there, else the map alone.

    Raises:
        ValueError: ``index`` is not a row of the store, or the row has no map (not done yet,
            or skipped: the message says why).
    """
    from captum_gradmask._ops import upsample_grid
    from captum_gradmask.models import PreprocessConfig
    from captum_gradmask.viz import save_heatmap_overlay

    maps = open_maps(store)
    count = len(maps)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
        raise ValueError(
            f"`index` {index!r} is not a row of {str(store)!r}: it holds {count} images, rows "
            f"0..{count - 1}"
        )
    row = maps[index]
    if row["error"]:
        raise ValueError(f"image {index} ({row['file']}) was skipped: {row['error']}")
    if not row["done"]:
        raise ValueError(f"image {index} ({row['file']}) has no map yet; resume the run")
    identity = maps.attrs.get("identity", {})
    method = method_label(str(maps.attrs.get("method")), identity.get("settings", {}))
    title = f"{method}: {row['file']} (class {row['target']})"
    saliency = torch.from_numpy(row["map"])
    image_path = _source_file(maps.attrs.get("source"), row["file"])
    preprocess = maps.attrs.get("preprocess")
    if image_path is None or preprocess is None:
        return _save_map_only(row["map"], out, title)
    config = PreprocessConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in preprocess.items()}
    )
    pixels = config.preprocess(image_path)
    attribution = upsample_grid(saliency[None], tuple(pixels.shape[-2:]), 1)[0, 0]
    return save_heatmap_overlay(
        pixels, attribution, out, mean=config.mean, std=config.std, title=title
    )


def _source_file(source: str | None, file: str) -> Path | None:
    if not source:
        return None
    root = Path(source)
    path = (root.parent if root.is_file() else root) / file
    return path if path.is_file() else None


def _save_map_only(saliency: np.ndarray, out: str | Path, title: str) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4, 4))
    axes = figure.subplots()
    shown = axes.imshow(saliency, cmap="viridis")
    figure.colorbar(shown, ax=axes)
    axes.set_title(title, fontsize=8)
    axes.set_axis_off()
    out = Path(out)
    figure.savefig(out, bbox_inches="tight", dpi=120)
    return out


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    groups = list(dict.fromkeys(metrics))
    unknown = [m for m in groups if m not in METRIC_COLUMNS]
    if unknown or not groups:
        raise ValueError(
            f"`metrics` {list(metrics)!r} is not valid: give one or more of "
            f"{', '.join(METRIC_COLUMNS)}"
        )
    return groups
