"""Throughput and memory of ``captum-gradmask explain-dataset``: one process against
``torchrun --nproc-per-node N``, on the same images, with the resident memory of the whole
process tree (ranks, torchrun and DataLoader workers) sampled over the run.

Each configuration writes a fresh store; images/s is the number of images over the command's
wall time (start-up and model loading included, as a user waits for them), and the store's own
per-rank loop time is reported beside it. Memory is read from ``/proc`` (Linux).

    python -m benchmarks.dataset_scaling --images 500 --processes 1 --memory-only \
        --output docs/datasets
    python -m benchmarks.dataset_scaling --images 96 --processes 1 2 --output docs/datasets

The first line is the flat-memory check over the 500 shared images; the second the 1- vs
2-process throughput (each process gets ``--threads`` CPU threads: by default the machine's
cores divided by the processes, so both rows use the whole CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks._common import DEFAULT_DATA, DEFAULT_MODEL, REPO

__all__ = ["run_configuration", "tree_rss_mib"]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def tree_rss_mib(pid: int) -> float:
    """Resident memory (MiB) of ``pid`` and all its descendants."""
    tree, total, stack = _children(), 0, [pid]
    while stack:
        current = stack.pop()
        stack += tree.get(current, [])
        try:
            with open(f"/proc/{current}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def run_configuration(
    processes: int,
    images: int,
    *,
    model: Path,
    source: Path,
    method: str,
    threads: int,
    batch_size: int,
    workers: int,
    chunk_size: int = 8,
    interval: float = 1.0,
) -> dict:
    """Run explain-dataset once into a temporary store; returns timing and memory samples."""
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "maps.zarr"
        options = ["explain-dataset", str(source), "--model", str(model), "--out", str(store)]
        options += ["--limit", str(images), "--method", method, "--device", "cpu", "--quiet"]
        options += ["--threads", str(threads), "--batch-size", str(batch_size)]
        options += ["--workers", str(workers), "--chunk-size", str(chunk_size)]
        if processes == 1:
            command = [sys.executable, "-m", "captum_gradmask", *options]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            command += ["--nproc-per-node", str(processes), "-m", "captum_gradmask", *options]
        environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
        samples: list[tuple[float, float]] = []
        start = time.perf_counter()
        child = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True)

        def sample() -> None:
            while child.poll() is None:
                samples.append((time.perf_counter() - start, tree_rss_mib(child.pid)))
                time.sleep(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output, _ = child.communicate()
        seconds = time.perf_counter() - start
        sampler.join()
        if child.returncode:
            raise RuntimeError(f"{command} failed with exit code {child.returncode}")
    loop = [
        float(line.split(" in ")[-1].split(" s ")[0])
        for line in output.splitlines()
        if " images done in " in line
    ]
    return {
        "processes": processes,
        "threads_per_process": threads,
        "images": images,
        "method": method,
        "batch_size": batch_size,
        "workers": workers,
        "chunk_size": chunk_size,
        "seconds": seconds,
        "images_per_second": images / seconds,
        "rank0_loop_seconds": loop[0] if loop else None,
        "memory_mib": samples,
        "output": output.strip().splitlines(),
    }


def _memory_figure(results: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.2))
    axes = figure.subplots()
    for row in results:
        times, rss = zip(*row["memory_mib"], strict=True)
        axes.plot(times, rss, label=f"{row['processes']} process(es), {row['images']} images")
    axes.set_xlabel("seconds")
    axes.set_ylabel("resident memory of the process tree (MiB)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.savefig(path, bbox_inches="tight", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--source", type=Path, default=DEFAULT_DATA / "annotations.csv")
    parser.add_argument("--method", default="gradmask-m4")
    parser.add_argument("--threads", type=int, default=None, help="per process")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--chunk-size", type=int, default=8, help="images per chunk, the unit ranks share"
    )
    parser.add_argument("--memory-only", action="store_true", help="name the output memory-*")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "datasets")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    results = []
    for processes in args.processes:
        threads = args.threads or max(1, cores // processes)
        row = run_configuration(
            processes,
            args.images,
            model=args.model,
            source=args.source,
            method=args.method,
            threads=threads,
            batch_size=args.batch_size,
            workers=args.workers,
            chunk_size=args.chunk_size,
        )
        # After start-up (the first quarter of the run), memory should not grow: compare the
        # mean of the first and the last third of the rest.
        rss = np.array([m for _, m in row["memory_mib"]])
        rest = rss[len(rss) // 4 :] if len(rss) >= 8 else rss
        third = max(1, len(rest) // 3)
        row["memory_summary"] = {
            "peak_mib": float(rss.max()),
            "early_mean_mib": float(rest[:third].mean()),
            "late_mean_mib": float(rest[-third:].mean()),
        }
        print(
            f"{processes} process(es) x {threads} thread(s): {row['images_per_second']:.3f} "
            f"images/s over {row['seconds']:.0f} s; memory {row['memory_summary']}",
            flush=True,
        )
        results.append(row)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = "memory" if args.memory_only else "scaling"
    stem += f"-{args.images}"
    (args.output / f"{stem}.json").write_text(
        json.dumps({"machine_cores": cores, "results": results}, indent=1)
    )
    _memory_figure(results, args.output / f"{stem}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
