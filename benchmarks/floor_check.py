"""GradMask exact against its floor, interleaved, to separate the ratio from machine drift.

``benchmarks/speed.py`` measures the floor and GradMask minutes apart; on a shared machine whose
speed drifts by tens of percent over that time, their ratio drifts too. Here each round times,
back to back at each batch size, the floor (one forward+backward plus plain forwards over
``3 (L-1) m`` zero-filled masked images) and GradMask exact on the same images, and reports the
ratio per round.

    python -m benchmarks.floor_check --model tiny --rounds 3 --batch-sizes 32 64
    python -m benchmarks.floor_check --model base --rounds 1 --batch-sizes 32 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from captum_gradmask import GradMaskAttribution

from ._common import DEFAULT_SHARED
from .speed import LABELS, floor_passes, load_models, masked_batch, real_images


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(LABELS), default="tiny")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--masks", type=int, default=4, help="m, masks per layer")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    (label, model), *_ = load_models([args.model], args.shared, torch.device("cpu")).items()
    images = real_images(args.shared, args.images)
    count = 3 * (model.config.num_hidden_layers - 1) * args.masks
    masked = masked_batch(images, count, model.config.patch_size)
    gradmask = GradMaskAttribution(model)
    gradient_pass, forwards = floor_passes(model, images, masked)

    def floor(size: int) -> None:
        gradient_pass()
        forwards(size)

    def exact(size: int) -> None:
        gradmask.attribute_grid(images, masks_per_layer=args.masks, perturbations_per_eval=size)

    with torch.inference_mode():
        model(images)  # warm-up
    ratios: dict[int, list[float]] = {size: [] for size in args.batch_sizes}
    for round_ in range(args.rounds):
        for size in args.batch_sizes:
            f, e = seconds(lambda size=size: floor(size)), seconds(lambda size=size: exact(size))
            ratios[size].append(e / f)
            row = dict(
                model=label,
                round=round_,
                m=args.masks,
                masked_images=count,
                batch=size,
                floor_s_per_image=f / args.images,
                exact_s_per_image=e / args.images,
                exact_over_floor=e / f,
            )
            print(json.dumps(row), flush=True)
    for size, values in ratios.items():
        print(
            f"batch {size}: exact / floor median {statistics.median(values):.3f} over "
            f"{len(values)} rounds (min {min(values):.3f}, max {max(values):.3f})"
        )


if __name__ == "__main__":
    main()
