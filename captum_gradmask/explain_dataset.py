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

:func:`captum_gradmask.evaluation.evaluate_store` runs the project's metrics over the stored
maps with the same sharding and resumption.

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

import dataclasses
import datetime
import os
import platform
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from captum_gradmask import __version__, _sharding, datasets
from captum_gradmask._ops import reduce_channels
from captum_gradmask._utils import (
    check_positive_int,
    forward_logits,
    model_device,
    model_fingerprint,
    preserved_model_state,
)
from captum_gradmask.datasets import ItemBatch
from captum_gradmask.registry import (
    LOCATION_SETTINGS,
    PERFORMANCE_SETTINGS,
    AttributionMethod,
    build_method,
)
from captum_gradmask.store import StoredMaps, create_store, open_maps, require_zarr

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "RunSummary",
    "attribution_grid",
    "explain_dataset",
    "machine",
    "model_fingerprint",
    "record_session",
    "versions",
]

DEFAULT_CHUNK_SIZE = 32
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
        run_written, run_seconds: rows written by all processes and the slowest process's
            seconds (``run_written / run_seconds`` is the run's images per second).
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
    run_written: int = 0
    run_seconds: float = 0.0


def attribution_grid(method: Any, inputs: Tensor, target: Tensor) -> Tensor:
    """One map per image: ``method.attribute_grid`` (a registry method, or any of the
    library's methods: the patch grid ``(B, h, w)``, or ``(B, H, W)`` for pixel-level
    methods); a Captum attribution object built by the user gives its attributions summed
    over the channels.

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
    if hasattr(method, "attribute_grid"):
        return method.attribute_grid(inputs, target)
    attributions = method.attribute(inputs, target=target)
    if isinstance(attributions, tuple):
        attributions = attributions[0]
    return reduce_channels(attributions, "sum")[:, 0]


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
    max_images: int | None = None,
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
        max_images: explain at most this many of the images not yet done (per process) and
            return; a later call goes on. A caller alternates explaining and scoring this way,
            so that a killed run leaves few explained images unscored (default: all).

    Returns:
        A :class:`RunSummary` of this rank's work.

    Raises:
        StoreMismatch: ``out`` holds a store made with other settings.
        ValueError: bad arguments (named in the message).
        ImportError: zarr>=3 is missing (``pip install 'captum-gradmask[datasets]'``).
    """
    require_zarr()
    dataset, batch_size, num_workers, pin_memory = datasets.loader_settings(
        dataset, batch_size, num_workers
    )
    policy = _check_target(target)
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    if max_images is not None:
        check_positive_int(max_images, "max_images")
    if policy == "label" and getattr(dataset, "labels", ()) is None:
        raise ValueError(
            "`target`='label' needs labels, and this dataset has none (a flat folder, or a CSV "
            "without a 'label' column); use 'predicted' or a class index"
        )
    device = model_device(model)
    if not isinstance(method, str) and method_options:
        raise ValueError("`method_options` apply to a registry name; configure a built method")
    built = (
        build_method(method, model, **dict(method_options or {}))
        if isinstance(method, str)
        else method
    )
    method_name = getattr(built, "name", type(built).__name__)
    settings = dict(getattr(built, "settings", {}))
    input_shape = datasets.input_shape(dataset)
    if isinstance(policy, int):
        with torch.no_grad(), preserved_model_state(model):
            classes = forward_logits(model, torch.zeros(1, *input_shape, device=device)).shape[1]
        if policy >= classes:
            raise ValueError(
                f"`target` {policy} is out of range: the model has {classes} classes "
                f"(0..{classes - 1})"
            )
    map_shape = _map_shape(built, input_shape)
    files = datasets.file_names(dataset)
    preprocess = getattr(dataset, "preprocess", None)
    preprocess = dataclasses.asdict(preprocess) if dataclasses.is_dataclass(preprocess) else None
    fingerprint = model_fingerprint(model)
    identity = {
        "model": {"class": type(model).__name__, "fingerprint": fingerprint},
        "method": method_name,
        "settings": {
            k: v
            for k, v in settings.items()
            if k not in PERFORMANCE_SETTINGS and k not in LOCATION_SETTINGS
        },
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
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    with _sharding.process_group(device) as (rank, world):
        store = _sharding.rank0_first(
            rank,
            world,
            device,
            lambda: _create_or_resume(out, files, map_shape, chunk_size, identity, attrs),
            lambda: open_maps(out, mode="r+"),
        )
        chunks, batches = _sharding.shard(
            store.done[:], store.chunk_size, batch_size, rank, world, limit=max_images
        )
        explained = int(np.count_nonzero(store.done[:]))
        if rank == 0 and explained < len(store):
            record_session(
                store.group, done=explained, pending=len(store) - explained, device=device,
                world=world,
            )  # fmt: skip
        _sharding.barrier(world, device)  # every rank has read `done` before any writes
        loader = datasets.loader(dataset, batches, input_shape, num_workers, pin_memory)
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
        run_written, run_seconds = _sharding.run_totals(world, device, written, seconds)
        _sharding.barrier(world, device)
        done = int(np.count_nonzero(store.done[:]))
    if failed > _REPORTED_FAILURES:
        print(f"... {failed} images skipped in all; see open_maps(...).failed()", file=sys.stderr)
    return RunSummary(
        Path(out),
        len(store),
        done,
        written,
        failed,
        chunks,
        seconds,
        rank,
        world,
        run_written,
        run_seconds,
    )


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


def _check_target(target: Any) -> str | int:
    if target in ("predicted", "label"):
        return target
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(
            f"`target` must be 'predicted', 'label' or a class index >= 0, got {target!r}"
        )
    return target


def _map_shape(method: Any, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    size = (int(input_shape[-2]), int(input_shape[-1]))
    return tuple(method.grid_size(size)) if hasattr(method, "grid_size") else size


def versions() -> dict[str, str | None]:
    """The versions a store records: this package, its main dependencies and Python."""
    found: dict[str, str | None] = {"captum-gradmask": __version__}
    for package in ("torch", "captum", "transformers", "timm", "zarr", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["python"] = sys.version.split()[0]
    return found


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """Where this process computes: the platform, the CPU (its model name, its cores and the
    SIMD targets numpy dispatches to, which decide the order numpy's default sort gives tied
    values: the reference tie order of insertion/deletion) and, on CUDA, the GPU."""
    found: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "numpy_simd": _numpy_simd(),
    }
    if device is not None and torch.device(device).type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return found


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _numpy_simd() -> list[str] | None:
    """numpy's baseline SIMD targets and the dispatched ones this CPU has."""
    try:
        from numpy._core._multiarray_umath import (  # type: ignore[attr-defined]
            __cpu_baseline__,
            __cpu_dispatch__,
            __cpu_features__,
        )
    except ImportError:
        return None
    return list(__cpu_baseline__) + [f for f in __cpu_dispatch__ if __cpu_features__.get(f)]


def record_session(
    group: Any, *, done: int, pending: int, device: torch.device | str, world: int
) -> None:
    """Append a session to ``group.attrs["sessions"]`` (``group``: a store's zarr group or one
    of its evaluations): when it started, how many images were done before it and were still
    to do, the device, the number of processes, :func:`machine` and :func:`versions`. A run
    resumed on other machines keeps one entry per session, so its numbers can say where they
    were computed (``compare`` does)."""
    sessions = list(group.attrs.get("sessions", []))
    sessions.append(
        {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "done_before": int(done),
            "pending": int(pending),
            "device": str(device),
            "processes": int(world),
            "machine": machine(device),
            "versions": versions(),
        }
    )
    group.attrs["sessions"] = sessions
