"""Sharding of a store's chunks over torch.distributed ranks, shared by the dataset runs
(:mod:`captum_gradmask.explain_dataset` and :mod:`captum_gradmask.evaluation`): which rows a rank
takes, the process group, barriers, and rank 0 going first. Imports nothing of the package."""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch

__all__ = ["barrier", "process_group", "rank0_first", "shard"]

T = TypeVar("T")


def shard(
    done: np.ndarray,
    chunk_size: int,
    batch_size: int,
    rank: int,
    world: int,
    limit: int | None = None,
) -> tuple[list[int], list[list[int]]]:
    """This rank's chunks (every ``world``-th chunk with rows not done) and its batches of
    pending rows; a batch never spans two chunks, so one process writes each chunk. With
    ``limit``, only the first ``limit`` of those rows (the last batch cut) and their chunks."""
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
    mine, batches = [], []
    for chunk in pending[rank::world]:
        if limit is not None and limit <= 0:
            break
        start = chunk * chunk_size
        rows = (np.flatnonzero(~done[start : start + chunk_size]) + start).tolist()
        if limit is not None:
            rows, limit = rows[:limit], limit - len(rows[:limit])
        mine.append(chunk)
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return mine, batches


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
    rank: int, world: int, device: torch.device, create: Callable[[], T], reopen: Callable[[], T]
) -> T:
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
    return result if rank == 0 else reopen()  # type: ignore[return-value]
