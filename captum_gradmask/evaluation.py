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
    >>> result = evaluate_store(path, images, model, metrics=["notebook"], tie_samples=3,
    ...     show_progress=False)
    >>> result.columns[:4], result.evaluated
    (['insertion_notebook', 'insertion_notebook_stable', 'insertion_notebook_reference', \
'insertion_notebook_tie_spread'], 4)
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
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
from captum_gradmask.explain_dataset import (
    attribution_grid,
    model_fingerprint,
    record_session,
    versions,
)
from captum_gradmask.metrics import (
    PerturbationCurve,
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
    "TIE_SUFFIXES",
    "EvaluationSummary",
    "evaluate_store",
    "save_stored_map",
    "tie_scores",
    "write_evaluation",
]

# Insertion/deletion presets, each scored under every tie policy (docs/metrics.md, "Ties"):
# the headline column is the mean AUC over `tie_samples` random tie orders; `_stable` and
# `_reference` keep the other two policies and `_tie_spread` the largest minus the smallest
# AUC over all the orders scored.
_CURVE_PRESETS = {
    "insertion_notebook": gradmask_notebook_insertion,
    "deletion_notebook": gradmask_notebook_deletion,
    "insertion_rise": rise_insertion,
    "deletion_rise": rise_deletion,
}
TIE_SUFFIXES = ("_stable", "_reference", "_tie_spread")


def _tie_columns(*keys: str) -> tuple[str, ...]:
    return tuple(column for key in keys for column in (key, *(key + s for s in TIE_SUFFIXES)))


# Metric groups of evaluate_store and the per-image columns each writes (units of the
# benchmark's rows: AUCs as the metric returns them, pointing hits 0/1, ADCC parts in percent).
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "notebook": _tie_columns("insertion_notebook", "deletion_notebook"),
    "rise": _tie_columns("insertion_rise", "deletion_rise"),
    "pointing": ("pointing_0", "pointing_15"),
    "adcc": ("average_drop", "increase_in_confidence", "coherence", "complexity", "adcc"),
    "captum": ("infidelity", "sensitivity"),
}
# The evaluation settings each metric group depends on (recorded; a resumed evaluation must
# have the same).
_GROUP_SETTINGS = {
    "notebook": ("tie_samples", "seed"),
    "rise": ("tie_samples", "seed"),
    "captum": ("seed", "sensitivity_samples"),
}
_SUMMARY_SCALE = {"pointing_0": 100.0, "pointing_15": 100.0}  # hit rates in percent
# Columns whose per-image curves are kept too (``curve_<column>``, images x points, the mean
# curve over the random tie orders; the x axis, the fraction inserted or deleted, is in the
# evaluation's attribute ``curves``).
_CURVE_COLUMNS = _CURVE_PRESETS
_PRESET_COLUMNS = {preset: column for column, preset in _CURVE_PRESETS.items()}


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
    tie_samples: int = 10,
    sensitivity_samples: int = 5,
    seed: int = 0,
    n_resamples: int = 1000,
    show_progress: bool = True,
    metric_batch_size: int | None = None,
) -> EvaluationSummary:
    """Run the project's metrics over the maps of a store, resumably and sharded like
    :func:`explain_dataset`, into per-image columns of the store's sub-group ``name``.

    Metric groups (:data:`METRIC_COLUMNS`): ``"notebook"`` (the GradMask authors' insertion
    and deletion), ``"rise"`` (RISE's), ``"pointing"`` (pointing game at 0 and 15 px; needs
    boxes, e.g. a CSV source with ``xmin,ymin,xmax,ymax``), ``"adcc"`` (re-explains each
    image's explanation with the store's method) and ``"captum"`` (Captum's infidelity under
    patch removal and max-sensitivity, which re-explains perturbed copies). Only rows whose
    map is done and that were not skipped are evaluated; rows evaluated before are not
    evaluated again.

    Each insertion/deletion curve is scored under every tie policy (``docs/metrics.md``):
    the column itself (e.g. ``insertion_notebook``) is the mean AUC over ``tie_samples``
    random tie orders drawn with ``seed``, ``<column>_stable`` and ``<column>_reference`` the
    AUC under the other two policies, and ``<column>_tie_spread`` the largest minus the
    smallest AUC over the stable, reference and random orders. Every image is scored on its
    own with the same seed, so a row does not depend on batching or on the number of
    processes. The settings a group depends on (``tie_samples``, ``seed``,
    ``sensitivity_samples``) are recorded with the evaluation, and resuming it with others
    is refused.

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
        tie_samples: random tie orders averaged for the insertion/deletion columns.
        sensitivity_samples: perturbed copies per image for max-sensitivity (``"captum"``).
        seed: seed of the random tie orders and of Captum's perturbations (each image's
            draws start from it), and of the summary's bootstrap.
        n_resamples: bootstrap resamples of the summary.
        show_progress: a progress bar on rank 0.
        metric_batch_size: deprecated name of ``perturbations_per_eval``.

    Returns:
        An :class:`EvaluationSummary` (means with 95 % CIs over all evaluated rows).

    Raises:
        StoreMismatch: the dataset or model is not the store's, or the evaluation ``name``
            exists with other metric groups or settings (the message names them).
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
    check_positive_int(tie_samples, "tie_samples")
    check_positive_int(sensitivity_samples, "sensitivity_samples")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"`seed` must be an int, got {seed!r}")
    given = {"tie_samples": tie_samples, "seed": seed, "sensitivity_samples": sensitivity_samples}
    settings = {key: given[key] for group in groups for key in _GROUP_SETTINGS.get(group, ())}
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
    if "adcc" in groups or "captum" in groups:
        explainer = method or build_method(maps.attrs["method"], model, **maps.attrs["settings"])
    columns = [column for group in groups for column in METRIC_COLUMNS[group]]
    input_shape = tuple(identity["input_shape"])
    device = model_device(model)

    with _sharding.process_group(device) as (rank, world):
        maps = _sharding.rank0_first(
            rank,
            world,
            device,
            lambda: _create_evaluation(store, name, groups, columns, settings),
            lambda: open_maps(store, mode="r+"),
        )
        results = maps.group[name]
        pending = np.asarray(maps.done[:]) & ~maps.skipped() & ~np.asarray(results["done"][:])
        _, batches = _sharding.shard(~pending, maps.chunk_size, batch_size, rank, world)
        if rank == 0 and pending.any():
            record_session(
                results, done=int(np.count_nonzero(results["done"][:])),
                pending=int(np.count_nonzero(pending)), device=device, world=world,
            )  # fmt: skip
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
                    maps, dataset, model, explainer, batch, groups, device, per_eval, given
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
    store: str | Path,
    name: str,
    groups: list[str],
    columns: list[str],
    settings: dict[str, Any],
) -> StoredMaps:
    maps = open_maps(store, mode="r+")
    if name in maps.group:
        recorded = maps.group[name].attrs.asdict()
        existing = recorded.get("metrics")
        if existing != groups:
            raise StoreMismatch(
                f"the store's evaluation {name!r} holds the metric groups {existing}, not "
                f"{groups}; evaluate with those to resume it, or pass another name (--name)"
            )
        if recorded.get("columns") != columns:
            raise StoreMismatch(
                f"the store's evaluation {name!r} was made by an older version (columns "
                f"{recorded.get('columns')}, without the tie-order columns); evaluate into "
                "another name (--name)"
            )
        old = recorded.get("settings", {})
        differences = [
            f"{key}: {old.get(key)!r} there, {value!r} now"
            for key, value in settings.items()
            if old.get(key) != value
        ]
        if differences:
            raise StoreMismatch(
                f"the store's evaluation {name!r} was made with other settings, which this "
                f"run would mix with its own: {'; '.join(differences)}; use those settings to "
                "resume it, or pass another name (--name)"
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
            "settings": settings,
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
    settings: dict[str, int],
) -> dict[str, np.ndarray]:
    from captum_gradmask.metrics import adcc, patch_infidelity, pointing_game, sensitivity

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

    def put(column: str, values: Tensor) -> None:
        if column not in out:  # a curve: (B, points), created at the first one
            out[column] = np.full((n, values.shape[1]), np.nan, dtype=np.float32)
        out[column][rows] = values.detach().float().cpu().numpy()

    def explain(inputs: Tensor, target: Tensor) -> Tensor:
        return attribution_grid(explainer, inputs, target)

    for column in curves:
        scores = [
            tie_scores(
                _CURVE_COLUMNS[column],
                model,
                images[i : i + 1],
                saliency[i : i + 1],
                targets[i : i + 1],
                tie_samples=settings["tie_samples"],
                seed=settings["seed"],
                perturbations_per_eval=per_eval,
            )
            for i in range(len(rows))
        ]
        for key in (column, *(column + suffix for suffix in TIE_SUFFIXES)):
            put(key, torch.tensor([score[key] for score in scores]))
        put(f"curve_{column}", torch.stack([score["curve"] for score in scores]))
    if "captum" in groups:
        infidelity, max_sensitivity = [], []
        for i in range(len(rows)):
            image, target = images[i : i + 1], targets[i : i + 1]
            infidelity.append(
                patch_infidelity(model, image, saliency[i : i + 1], target, seed=settings["seed"])
                .values[0]
                .item()
            )
            max_sensitivity.append(
                sensitivity(
                    model,
                    image,
                    target,
                    explanation_func=explain,
                    n_perturb_samples=settings["sensitivity_samples"],
                    seed=settings["seed"],
                )
                .values[0]
                .item()
            )
        put("infidelity", torch.tensor(infidelity))
        put("sensitivity", torch.tensor(max_sensitivity))
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
        result = adcc(
            model, images, saliency, targets, explanation_func=explain, internal_batch_size=per_eval
        )
        for column in METRIC_COLUMNS["adcc"]:
            put(column, 100.0 * getattr(result, column).float())
    return out


def tie_scores(
    preset: Callable[..., PerturbationCurve],
    model: nn.Module,
    image: Tensor,
    saliency: Tensor,
    target: Tensor | int,
    *,
    tie_samples: int = 10,
    seed: int = 0,
    perturbations_per_eval: int = 64,
) -> dict[str, Any]:
    """One insertion/deletion preset's AUC of one image under every tie policy.

    Args:
        preset: e.g. :func:`~captum_gradmask.metrics.gradmask_notebook_insertion`.
        model: the classifier.
        image: ``(1, C, H, W)`` model input.
        saliency: its map (any shape the presets take).
        target: the class explained.
        tie_samples, seed: the random tie orders averaged for the headline.
        perturbations_per_eval: perturbed images per forward pass.

    Returns:
        ``{key: ...}`` with ``key`` the preset's column (e.g. ``"insertion_notebook"``): the
        mean AUC over the random orders, ``key_stable``, ``key_reference``, ``key_tie_spread``
        (largest minus smallest AUC over the stable, reference and random orders), and
        ``"curve"``: the mean curve over the random orders, ``(points,)``.

    Example::

        >>> import torch
        >>> from captum_gradmask.evaluation import tie_scores
        >>> from captum_gradmask.metrics import gradmask_notebook_deletion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
        >>> image, tied = torch.rand(1, 3, 8, 8), torch.ones(1, 8, 8)  # every pixel ties
        >>> scores = tie_scores(gradmask_notebook_deletion, model, image, tied, 0,
        ...     tie_samples=4)
        >>> scores["deletion_notebook_tie_spread"] >= 0, scores["curve"].shape
        (True, torch.Size([13]))
    """
    key = _PRESET_COLUMNS[preset]
    # one pass: the three policies share every perturbed image their cuts do not split
    random = preset(
        model, image, saliency, target, ties="random", tie_samples=tie_samples, seed=seed,
        with_fixed_orders=True, perturbations_per_eval=perturbations_per_eval,
    )  # fmt: skip
    assert random.stable_auc is not None and random.reference_auc is not None
    assert random.tie_auc is not None
    aucs = [float(random.stable_auc[0]), float(random.reference_auc[0])]
    aucs += random.tie_auc[0].tolist()
    return {
        key: float(random.auc[0]),
        f"{key}_stable": aucs[0],
        f"{key}_reference": aucs[1],
        f"{key}_tie_spread": max(aucs) - min(aucs),
        "curve": random.probabilities[0],
    }


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
