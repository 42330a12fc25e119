"""Explain a whole dataset into a map store, resumably, and evaluate the stored maps.

:func:`explain_dataset` runs a registry method over every image of a torch ``Dataset`` (or the
dataset of a ``DataLoader``) and writes the maps to a zarr store (:mod:`captum_gradmask.store`).
Images are decoded in DataLoader workers and explained several per method call; each chunk of
the store (``chunk_size`` images) is written by one process only, so:

- an interrupted run (Ctrl-C, ``kill -9``, a crash) loses only the images in flight: calling it
  again with the same arguments explains what is not ``done`` and writes nothing twice;
- an image that cannot be read is recorded with its reason (``store.failed()``) and skipped;
- a store made with other settings (model weights, method, settings, target policy, input
  shape, preprocessing, file list) is refused with a :class:`~captum_gradmask.store.StoreMismatch`;
- launched by ``torchrun --nproc-per-node N`` (or with a process group already initialised),
  the ranks share the pending chunks (rank ``r`` takes every ``N``-th), rank 0 creates the store,
  and all ranks wait for each other at the end; a restarted job resumes.

:func:`evaluate_store` runs the project's metrics over the stored maps with the same sharding
and resumption, into per-image columns of the store, and returns means with bootstrap CIs.

Example::

    >>> import tempfile
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.explain_dataset import explain_dataset
    >>> from captum_gradmask.store import open_maps
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...     num_labels=5)).eval()
    >>> images = torch.utils.data.TensorDataset(torch.randn(6, 3, 32, 32))
    >>> path = tempfile.mkdtemp() + "/maps.zarr"
    >>> run = explain_dataset(images, model, path, method="gradmask-m1", batch_size=2,
    ...     chunk_size=4, show_progress=False)
    >>> run.written, open_maps(path).maps.shape
    (6, (6, 4, 4))
    >>> explain_dataset(images, model, path, method="gradmask-m1", batch_size=2,
    ...     chunk_size=4, show_progress=False).written  # resumed: nothing left to do
    0
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captum_gradmask import __version__
from captum_gradmask._utils import check_positive_int, forward_logits, preserved_model_state
from captum_gradmask.datasets import ItemBatch, SafeItems, collate_items
from captum_gradmask.registry import AttributionMethod, build_method
from captum_gradmask.stats import bootstrap_ci
from captum_gradmask.store import (
    StoredMaps,
    StoreMismatch,
    create_store,
    files_digest,
    open_maps,
    require_zarr,
)

__all__ = [
    "METRIC_COLUMNS",
    "EvaluationSummary",
    "RunSummary",
    "attribution_grid",
    "evaluate_store",
    "explain_dataset",
    "model_fingerprint",
    "save_stored_map",
    "write_evaluation",
]

DEFAULT_BATCH_SIZE = 8
DEFAULT_CHUNK_SIZE = 32
# Settings that change speed or memory, never the maps: recorded, but a resumed run may differ.
# (GradMask's `compile` changes the maps by float rounding only, ~1e-6.)
PERFORMANCE_SETTINGS = frozenset(
    {"perturbations_per_eval", "internal_batch_size", "show_progress", "compile"}
)
# Settings added after stores were first written, with the default that gives the maps of
# before: left out of the identity at that default, so older stores still resume.
LATER_SETTINGS: dict[str, Any] = {"amp_dtype": None}
# Metric groups of evaluate_store and the per-image columns each writes (units of the
# benchmark's rows: AUCs as the metric returns them, pointing hits 0/1, ADCC parts in percent).
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "notebook": ("insertion_notebook", "deletion_notebook"),
    "rise": ("insertion_rise", "deletion_rise"),
    "pointing": ("pointing_0", "pointing_15"),
    "adcc": ("average_drop", "increase_in_confidence", "coherence", "complexity", "adcc"),
}
_SUMMARY_SCALE = {"pointing_0": 100.0, "pointing_15": 100.0}  # hit rates in percent
_REPORTED_FAILURES = 10  # unreadable images named on the console per process


@dataclass(frozen=True)
class RunSummary:
    """What a call of :func:`explain_dataset` (on one rank) did.

    Attributes:
        store: the store's path.
        total: images in the store.
        done: rows done in the store after the run (all ranks).
        written: rows this rank wrote (explained and unreadable).
        failed: of those, images that could not be read or had no usable target.
        chunks: the chunks this rank worked on.
        seconds: wall-clock seconds of this rank's loop.
        rank, world_size: this process's rank and the number of processes.
    """

    store: Path
    total: int
    done: int
    written: int
    failed: int
    chunks: list[int]
    seconds: float
    rank: int
    world_size: int


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


def attribution_grid(method: Any, inputs: Tensor, target: Tensor) -> Tensor:
    """One map per image from a registry method: ``(B, h, w)`` when the method has an
    ``attribute_grid`` (patch-grid methods, with the registered settings), else its pixel
    attributions ``(B, C, H, W)`` summed over channels, ``(B, H, W)``.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.explain_dataset import attribution_grid
        >>> from captum_gradmask.registry import build_method
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> images, target = torch.randn(2, 3, 32, 32), torch.tensor([1, 4])
        >>> attribution_grid(build_method("gradmask-m1", model), images, target).shape
        torch.Size([2, 4, 4])
        >>> attribution_grid(build_method("saliency", model), images, target).shape
        torch.Size([2, 32, 32])
    """
    inner = getattr(method, "method", method)
    if hasattr(inner, "attribute_grid"):
        return inner.attribute_grid(inputs, target=target, **getattr(method, "settings", {}))
    attributions = method.attribute(inputs, target=target)
    if isinstance(attributions, tuple):
        attributions = attributions[0]
    return attributions.sum(dim=1)


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's class and state dict (names, shapes, dtypes and bytes): two
    models give the same fingerprint exactly when they hold the same weights."""
    digest = hashlib.blake2b(type(model).__qualname__.encode(), digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()


def explain_dataset(
    dataset: Dataset | DataLoader,
    model: nn.Module,
    out: str | Path,
    *,
    method: str | AttributionMethod = "gradmask-m4",
    method_options: Mapping[str, Any] | None = None,
    target: str | int = "predicted",
    batch_size: int | None = None,
    chunk_size: int | None = None,
    num_workers: int | None = None,
    model_info: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> RunSummary:
    """Explain every image of ``dataset`` into the map store ``out`` (created, or resumed).

    Args:
        dataset: a map-style dataset whose items are an image tensor ``(C, H, W)``, a tuple
            ``(tensor, label, ...)`` or ``{"pixel_values": ..., "label": ...}``, e.g.
            :class:`captum_gradmask.datasets.ImageFiles`; or a ``DataLoader``, of which the
            dataset, ``batch_size``, ``num_workers`` and ``pin_memory`` are used (its sampler
            and collate function are replaced: the store decides the order). A ``files``
            attribute names the rows (else ``"0"``, ``"1"``, ...); ``preprocess`` and
            ``source`` attributes are recorded.
        model: the classifier, on the device to run on (inputs follow it).
        out: the store's folder (``.zarr`` by convention).
        method: a registry name (:func:`captum_gradmask.registry.method_names`) or a built
            method (an object with ``attribute(inputs, target)``).
        method_options: settings for :func:`~captum_gradmask.registry.build_method` (with a
            name only).
        target: ``"predicted"`` (the top-1 class), ``"label"`` (the dataset's labels) or a
            class index for every image.
        batch_size: images per method call (default: the DataLoader's, else 8).
        chunk_size: images per store chunk, the unit of writing and of work sharing (a new
            store only; default 32; an existing store keeps its own).
        num_workers: DataLoader processes decoding images (default: the DataLoader's, else 0).
        model_info: more about the model to record (e.g. ``{"spec": ..., "weights": ...}``,
            what the CLI passes and ``evaluate`` reloads).
        show_progress: a progress bar (images/s) on rank 0.

    Returns:
        A :class:`RunSummary` of this rank's work.

    Raises:
        StoreMismatch: ``out`` holds a store made with other settings.
        ValueError: bad arguments (named in the message).
        ImportError: zarr>=3 is missing (``pip install 'captum-gradmask[datasets]'``).
    """
    require_zarr()
    dataset, batch_size, num_workers, pin_memory = _loader_settings(
        dataset, batch_size, num_workers
    )
    policy = _check_target(target)
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    if policy == "label" and getattr(dataset, "labels", ()) is None:
        raise ValueError(
            "`target`='label' needs labels, and this dataset has none (a flat folder, or a CSV "
            "without a 'label' column); use 'predicted' or a class index"
        )
    device = _model_device(model)
    if not isinstance(method, str) and method_options:
        raise ValueError("`method_options` apply to a registry name; configure a built method")
    built = (
        build_method(method, model, **dict(method_options or {}))
        if isinstance(method, str)
        else method
    )
    method_name = (
        method if isinstance(method, str) else getattr(built, "name", type(built).__name__)
    )
    settings = dict(getattr(built, "settings", {}))
    input_shape = _input_shape(dataset)
    if isinstance(policy, int):
        with torch.no_grad(), preserved_model_state(model):
            classes = forward_logits(model, torch.zeros(1, *input_shape, device=device)).shape[1]
        if policy >= classes:
            raise ValueError(
                f"`target` {policy} is out of range: the model has {classes} classes "
                f"(0..{classes - 1})"
            )
    map_shape = _map_shape(built, input_shape)
    files = _file_names(dataset)
    preprocess = getattr(dataset, "preprocess", None)
    preprocess = dataclasses.asdict(preprocess) if dataclasses.is_dataclass(preprocess) else None
    fingerprint = model_fingerprint(model)
    identity = {
        "model": {"class": type(model).__name__, "fingerprint": fingerprint},
        "method": method_name,
        "settings": _identity_settings(settings),
        "target": policy,
        "input_shape": list(input_shape),
        "preprocess": preprocess,
    }
    attrs = {
        "model": {"class": type(model).__name__, **dict(model_info or {})},
        "method": method_name,
        "settings": settings,
        "target": policy,
        "source": getattr(dataset, "source", None),
        "preprocess": preprocess,
        "classes": getattr(dataset, "classes", None),
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    with _process_group(device) as (rank, world):
        store = _rank0_first(
            rank,
            world,
            device,
            lambda: _create_or_resume(out, files, map_shape, chunk_size, identity, attrs),
            lambda: open_maps(out, mode="r+"),
        )
        chunks, batches = _shard(store.done[:], store.chunk_size, batch_size, rank, world)
        _barrier(world, device)  # every rank has read `done` before any writes
        loader = _loader(dataset, batches, input_shape, num_workers, pin_memory)
        total = sum(len(b) for b in batches)
        bar = tqdm(
            total=total,
            unit="img",
            desc="explain" if world == 1 else f"explain (rank 0 of {world})",
            disable=not show_progress or rank != 0,
            dynamic_ncols=True,
        )
        written = failed = 0
        start = time.perf_counter()
        with bar, preserved_model_state(model):
            for batch in loader:
                rows = _explain_batch(built, model, batch, policy, map_shape, device)
                store.write(batch.indices.numpy(), **rows)
                for i, error in zip(batch.indices.tolist(), rows["errors"], strict=True):
                    if error:
                        failed += 1
                        if failed <= _REPORTED_FAILURES:
                            tqdm.write(f"skipped {files[i]}: {error}", file=sys.stderr)
                written += len(batch.indices)
                bar.update(len(batch.indices))
                if failed:
                    bar.set_postfix(skipped=failed, refresh=False)
        seconds = time.perf_counter() - start
        _barrier(world, device)
        done = int(np.count_nonzero(store.done[:]))
    if failed > _REPORTED_FAILURES:
        print(f"... {failed} images skipped in all; see open_maps(...).failed()", file=sys.stderr)
    return RunSummary(Path(out), len(store), done, written, failed, chunks, seconds, rank, world)


def _create_or_resume(
    out: str | Path,
    files: list[str],
    map_shape: tuple[int, ...],
    chunk_size: int | None,
    identity: dict[str, Any],
    attrs: dict[str, Any],
) -> StoredMaps:
    if chunk_size is None:  # resuming keeps the store's chunks; a new store gets the default
        existing = Path(out) / "zarr.json"
        chunk_size = open_maps(out).chunk_size if existing.is_file() else DEFAULT_CHUNK_SIZE
    return create_store(
        out, files, map_shape, chunk_size=chunk_size, identity=identity, attrs=attrs
    )


def _explain_batch(
    method: Any,
    model: nn.Module,
    batch: ItemBatch,
    policy: str | int,
    map_shape: tuple[int, ...],
    device: torch.device,
) -> dict[str, Any]:
    """The store rows of one batch: maps of the readable images with a usable target."""
    n = len(batch.indices)
    maps = np.full((n, *map_shape), np.nan, dtype=np.float32)
    targets = np.full(n, -1, dtype=np.int64)
    predicted = np.full(n, -1, dtype=np.int64)
    probability = np.full(n, np.nan, dtype=np.float32)
    errors = list(batch.errors)
    positions = batch.readable.nonzero().flatten()  # batch positions of the pixel rows
    if len(positions):
        pixels = batch.pixels.to(device, non_blocking=True)
        with torch.no_grad():
            probabilities = torch.softmax(forward_logits(model, pixels).float(), dim=-1)
        classes = probabilities.shape[1]
        top = probabilities.argmax(dim=1)
        if policy == "predicted":
            wanted = top
        elif policy == "label":
            wanted = batch.labels[positions].to(device)
        else:  # a class index, checked against the model's classes before the run
            wanted = torch.full_like(top, policy)
        usable = (wanted >= 0) & (wanted < classes)
        for row in (~usable).nonzero().flatten().tolist():
            label = int(wanted[row])
            errors[int(positions[row])] = (
                "no label"
                if label < 0
                else f"label {label} is not a class of the model (0..{classes - 1})"
            )
        keep = usable.nonzero().flatten()
        if len(keep):
            grid = attribution_grid(method, pixels[keep], wanted[keep])
            if tuple(grid.shape[1:]) != map_shape:
                raise RuntimeError(
                    f"the method returned maps of shape {tuple(grid.shape[1:])}, the store "
                    f"holds {map_shape}"
                )
            rows = positions[keep.cpu()].numpy()
            maps[rows] = grid.detach().float().cpu().numpy()
            targets[rows] = wanted[keep].cpu().numpy()
            probability[rows] = probabilities[keep, wanted[keep]].cpu().numpy()
        predicted[positions.numpy()] = top.cpu().numpy()
    return {
        "maps": maps,
        "targets": targets,
        "predicted": predicted,
        "probability": probability,
        "errors": errors,
    }


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
    metric_batch_size: int = 64,
    n_resamples: int = 1000,
    seed: int = 0,
    show_progress: bool = True,
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
        metric_batch_size: forward passes per batch inside the metrics.
        n_resamples, seed: the bootstrap of the summary.
        show_progress: a progress bar on rank 0.

    Returns:
        An :class:`EvaluationSummary` (means with 95 % CIs over all evaluated rows).

    Raises:
        StoreMismatch: the dataset or model is not the store's, or the evaluation ``name``
            exists with other metric groups.
        ValueError: unknown metric groups, or ``"pointing"`` without boxes.
    """
    require_zarr()
    dataset, batch_size, num_workers, pin_memory = _loader_settings(
        dataset, batch_size, num_workers
    )
    groups = _check_metrics(metrics)
    check_positive_int(metric_batch_size, "metric_batch_size")
    if name in ("maps", "files", "targets", "predicted", "probability", "done", "errors"):
        raise ValueError(f"`name` {name!r} is one of the store's arrays; choose another name")
    maps = open_maps(store)
    identity = maps.attrs["identity"]
    files = _file_names(dataset)
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
    device = _model_device(model)

    with _process_group(device) as (rank, world):
        maps = _rank0_first(
            rank,
            world,
            device,
            lambda: _create_evaluation(store, name, groups, columns),
            lambda: open_maps(store, mode="r+"),
        )
        results = maps.group[name]
        pending = np.asarray(maps.done[:]) & ~maps.skipped() & ~np.asarray(results["done"][:])
        _, batches = _shard(~pending, maps.chunk_size, batch_size, rank, world)
        _barrier(world, device)
        loader = _loader(dataset, batches, input_shape, num_workers, pin_memory)
        bar = tqdm(
            total=sum(len(b) for b in batches),
            unit="img",
            desc="evaluate" if world == 1 else f"evaluate (rank 0 of {world})",
            disable=not show_progress or rank != 0,
            dynamic_ncols=True,
        )
        arrays = {column: results[column] for column in [*columns, "done"]}
        evaluated = 0
        with bar, preserved_model_state(model):
            for batch in loader:
                values = _evaluate_batch(
                    maps, dataset, model, explainer, batch, groups, device, metric_batch_size
                )
                where = batch.indices.numpy()
                for column in columns:
                    arrays[column].oindex[where] = values[column]
                arrays["done"].oindex[where] = True
                evaluated += len(where)
                bar.update(len(where))
        _barrier(world, device)
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
    results.attrs.update({"metrics": groups, "columns": columns, "versions": _versions()})
    return maps


def _evaluate_batch(
    store: StoredMaps,
    dataset: Any,
    model: nn.Module,
    explainer: Any,
    batch: ItemBatch,
    groups: list[str],
    device: torch.device,
    batch_size: int,
) -> dict[str, np.ndarray]:
    from captum_gradmask.metrics import (
        adcc,
        gradmask_notebook_deletion,
        gradmask_notebook_insertion,
        pointing_game,
        rise_deletion,
        rise_insertion,
    )

    n = len(batch.indices)
    out = {c: np.full(n, np.nan, dtype=np.float32) for g in groups for c in METRIC_COLUMNS[g]}
    positions = batch.readable.nonzero().flatten()
    if not len(positions):
        return out
    indices = batch.indices[positions].numpy()
    images = batch.pixels.to(device, non_blocking=True)
    saliency = torch.from_numpy(np.asarray(store.maps.oindex[indices])).to(device)
    targets = torch.from_numpy(np.asarray(store.targets.oindex[indices])).to(device)
    rows = positions.numpy()

    def put(column: str, values: Tensor) -> None:
        out[column][rows] = values.detach().float().cpu().numpy()

    if "notebook" in groups:
        for column, metric in (
            ("insertion_notebook", gradmask_notebook_insertion),
            ("deletion_notebook", gradmask_notebook_deletion),
        ):
            put(column, metric(model, images, saliency, targets, batch_size=batch_size).auc)
    if "rise" in groups:
        for column, metric in (
            ("insertion_rise", rise_insertion),
            ("deletion_rise", rise_deletion),
        ):
            put(column, metric(model, images, saliency, targets, batch_size=batch_size).auc)
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
            model, images, saliency, targets, explanation_func=explain, batch_size=batch_size
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
        ValueError: the row has no map (not done yet, or skipped: the message says why).
    """
    from captum_gradmask._ops import upsample_grid
    from captum_gradmask.models import PreprocessConfig
    from captum_gradmask.viz import save_heatmap_overlay

    maps = open_maps(store)
    row = maps[index]
    if row["error"]:
        raise ValueError(f"image {index} ({row['file']}) was skipped: {row['error']}")
    if not row["done"]:
        raise ValueError(f"image {index} ({row['file']}) has no map yet; resume the run")
    title = f"{maps.attrs.get('method')}: {row['file']} (class {row['target']})"
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


# --- plumbing shared by explain_dataset and evaluate_store ---------------------------------


def _loader_settings(
    data: Dataset | DataLoader, batch_size: int | None, num_workers: int | None
) -> tuple[Dataset, int, int, bool]:
    pin_memory = False
    if isinstance(data, DataLoader):
        batch_size = data.batch_size if batch_size is None else batch_size
        num_workers = data.num_workers if num_workers is None else num_workers
        pin_memory = data.pin_memory
        data = data.dataset
    if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise TypeError(
            f"`dataset` must be a map-style torch Dataset (with __len__ and __getitem__) or a "
            f"DataLoader over one, got {type(data).__name__}"
        )
    if len(data) == 0:  # type: ignore[arg-type]
        raise ValueError("`dataset` is empty")
    batch_size = check_positive_int(
        DEFAULT_BATCH_SIZE if batch_size is None else batch_size, "batch_size"
    )
    num_workers = 0 if num_workers is None else num_workers
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}")
    return data, batch_size, num_workers, pin_memory


def _identity_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must match: neither performance knobs nor later-added
    settings at their old behaviour."""
    return {
        k: v
        for k, v in settings.items()
        if k not in PERFORMANCE_SETTINGS and not (k in LATER_SETTINGS and v is LATER_SETTINGS[k])
    }


def _check_target(target: Any) -> str | int:
    if target in ("predicted", "label"):
        return target
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(
            f"`target` must be 'predicted', 'label' or a class index >= 0, got {target!r}"
        )
    return target


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


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if parameter is None:
        raise TypeError(f"`model` must be a torch nn.Module with parameters, got {model!r}")
    return parameter.device


def _input_shape(dataset: Any) -> tuple[int, ...]:
    shape = getattr(dataset, "input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    safe = SafeItems(dataset)
    for index in range(min(len(safe), 64)):
        item = safe[index]
        if item.pixels is not None:
            return tuple(item.pixels.shape)
    raise ValueError(
        "none of the dataset's first items could be read, so its input shape is unknown: "
        f"{safe[0].error}"
    )


def _map_shape(method: Any, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    inner = getattr(method, "method", method)
    adapter = getattr(inner, "adapter", None)
    if hasattr(inner, "attribute_grid") and adapter is not None:
        return tuple(adapter.grid(tuple(input_shape[1:])))
    return tuple(input_shape[1:])


def _file_names(dataset: Any) -> list[str]:
    files = getattr(dataset, "files", None)
    if files is None:
        return [str(i) for i in range(len(dataset))]
    files = [str(f) for f in files]
    if len(files) != len(dataset):
        raise ValueError(
            f"`dataset.files` has {len(files)} names for {len(dataset)} items; give one per item"
        )
    return files


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"captum-gradmask": __version__}
    for package in ("torch", "captum", "transformers", "timm", "zarr", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["python"] = sys.version.split()[0]
    return versions


def _shard(
    done: np.ndarray, chunk_size: int, batch_size: int, rank: int, world: int
) -> tuple[list[int], list[list[int]]]:
    """This rank's chunks (every ``world``-th chunk with rows not done) and its batches of
    pending rows; a batch never spans two chunks, so one process writes each chunk."""
    done = np.asarray(done, dtype=bool)
    starts = range(0, len(done), chunk_size)
    pending = [c for c, s in enumerate(starts) if not done[s : s + chunk_size].all()]
    mine = pending[rank::world]
    batches = []
    for chunk in mine:
        start = chunk * chunk_size
        rows = (np.flatnonzero(~done[start : start + chunk_size]) + start).tolist()
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return mine, batches


def _loader(
    dataset: Dataset,
    batches: list[list[int]],
    input_shape: Sequence[int],
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    return DataLoader(
        SafeItems(dataset, input_shape),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_items,
        pin_memory=pin_memory,
    )


@contextlib.contextmanager
def _process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """``(rank, world_size)``: of the process group in place, or of one started here from
    torchrun's environment (gloo on CPU, nccl on CUDA) and ended on the way out."""
    import torch.distributed as dist

    if not dist.is_available():
        yield 0, 1
        return
    if dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0, 1
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Ranks wait for the slowest at the end; a long dataset can leave them minutes apart.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=6))
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _barrier(world: int, device: torch.device) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index or 0])
        else:
            dist.barrier()


def _rank0_first(
    rank: int, world: int, device: torch.device, create: Any, reopen: Any
) -> StoredMaps:
    """Rank 0 runs ``create``; then the other ranks ``reopen``. An error on rank 0 is raised on
    every rank (instead of leaving the others waiting)."""
    result, error = None, None
    if rank == 0:
        try:
            result = create()
        except Exception as caught:
            error = caught
    if world > 1:
        import torch.distributed as dist

        message = [error]
        dist.broadcast_object_list(message, src=0, device=device if device.type == "cuda" else None)
        error = message[0]
    if error is not None:
        raise error
    return result if rank == 0 else reopen()
