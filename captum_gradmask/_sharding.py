"""Plumbing shared by the dataset runs (:mod:`captum_gradmask.explain_dataset` and
:mod:`captum_gradmask.evaluation`): loader settings, sharding of a store's chunks over
torch.distributed ranks, the process group, and what a store records about the environment."""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from captum_gradmask import __version__
from captum_gradmask._utils import check_positive_int
from captum_gradmask.datasets import SafeItems, collate_items
from captum_gradmask.store import StoredMaps

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "barrier",
    "file_names",
    "input_shape",
    "loader",
    "loader_settings",
    "model_device",
    "process_group",
    "rank0_first",
    "shard",
    "versions",
]

DEFAULT_BATCH_SIZE = 8


def loader_settings(
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


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if parameter is None:
        raise TypeError(f"`model` must be a torch nn.Module with parameters, got {model!r}")
    return parameter.device


def input_shape(dataset: Any) -> tuple[int, ...]:
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


def file_names(dataset: Any) -> list[str]:
    files = getattr(dataset, "files", None)
    if files is None:
        return [str(i) for i in range(len(dataset))]
    files = [str(f) for f in files]
    if len(files) != len(dataset):
        raise ValueError(
            f"`dataset.files` has {len(files)} names for {len(dataset)} items; give one per item"
        )
    return files


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"captum-gradmask": __version__}
    for package in ("torch", "captum", "transformers", "timm", "zarr", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    found["python"] = sys.version.split()[0]
    return found


def shard(
    done: np.ndarray, chunk_size: int, batch_size: int, rank: int, world: int
) -> tuple[list[int], list[list[int]]]:
    """This rank's chunks (every ``world``-th chunk with rows not done) and its batches of
    pending rows; a batch never spans two chunks, so one process writes each chunk."""
    done = np.asarray(done, dtype=bool)
    starts = range(0, len(done), chunk_size)
    pending = [c for c, s in enumerate(starts) if not done[s : s + chunk_size].all()]
    if rank == 0 and 0 < len(pending) < world:
        warnings.warn(
            f"{len(pending)} chunk(s) of {chunk_size} images left for {world} processes: "
            f"{world - len(pending)} process(es) will have nothing to do; a smaller "
            "--chunk-size (chunk_size=) spreads the images over more processes",
            UserWarning,
            stacklevel=2,
        )
    mine = pending[rank::world]
    batches = []
    for chunk in mine:
        start = chunk * chunk_size
        rows = (np.flatnonzero(~done[start : start + chunk_size]) + start).tolist()
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return mine, batches


def loader(
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
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
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


def barrier(world: int, device: torch.device) -> None:
    if world > 1:
        import torch.distributed as dist

        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[device.index or 0])
        else:
            dist.barrier()


def run_totals(world: int, device: torch.device, written: int, seconds: float) -> tuple[int, float]:
    """``(rows written by all ranks, the slowest rank's seconds)``: the run's throughput, not
    one process's."""
    if world == 1:
        return written, seconds
    import torch.distributed as dist

    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    count = torch.tensor([float(written)], device=on)
    longest = torch.tensor([float(seconds)], device=on)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return int(count.item()), float(longest.item())


def rank0_first(
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
