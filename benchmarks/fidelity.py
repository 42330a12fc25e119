"""How close is GradMask's fast mode (token dropping) to exact mode, on real images?

For each image of the shared ImageNet sample (target: its ground-truth label) both maps are
computed, and compared by Spearman rank correlation of the patch maps; each map is also scored
by RISE insertion/deletion AUC and the pointing game (0 and 15 px), and the time of both modes is
measured in the same run.

    python -m benchmarks.fidelity --images 500 --device cuda --out fidelity.jsonl
    python -m benchmarks.fidelity --summarize fidelity.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from benchmarks._common import DEFAULT_SHARED, synchronize
from captum_gradmask import GradMaskAttribution
from captum_gradmask.data import load_imagenet_sample, preprocess_image
from captum_gradmask.metrics import pointing_game, rise_deletion, rise_insertion


def measure(args: argparse.Namespace) -> None:
    from transformers import ViTForImageClassification

    device = torch.device(args.device)
    model = ViTForImageClassification.from_pretrained(args.model).eval().to(device)
    gradmask = GradMaskAttribution(model)
    records = load_imagenet_sample(args.data, limit=args.images, offset=args.start)
    out = open(args.out, "a")  # noqa: SIM115 - appended to image by image
    for first in range(0, len(records), args.batch):
        batch = records[first : first + args.batch]
        images = torch.stack([preprocess_image(r.path) for r in batch]).to(device)
        targets = [r.label for r in batch]
        maps, seconds = {}, {}
        for mode in ("exact", "fast"):
            synchronize(device)
            start = time.perf_counter()
            maps[mode] = gradmask.attribute_grid(
                images, target=targets, mode=mode, perturbations_per_eval=args.per_eval
            )
            synchronize(device)
            seconds[mode] = (time.perf_counter() - start) / len(batch)
        scores: dict[str, Any] = {}
        for mode, grid in maps.items():
            scores[f"{mode}_insertion"] = rise_insertion(
                model, images, grid, targets, perturbations_per_eval=args.metric_batch
            ).auc.tolist()
            scores[f"{mode}_deletion"] = rise_deletion(
                model, images, grid, targets, perturbations_per_eval=args.metric_batch
            ).auc.tolist()
            for tolerance in (0, 15):
                result = pointing_game(
                    grid.cpu(),
                    [r.boxes for r in batch],
                    targets,
                    input_size=(224, 224),
                    original_sizes=[r.original_size for r in batch],
                    tolerance=tolerance,
                )
                scores[f"{mode}_pointing_{tolerance}"] = result.hits.float().tolist()
        for i, record in enumerate(batch):
            exact, fast = maps["exact"][i].flatten().cpu(), maps["fast"][i].flatten().cpu()
            row = dict(
                file=record.path.name,
                label=record.label,
                spearman=float(spearmanr(exact.numpy(), fast.numpy()).statistic),
                exact_seconds=seconds["exact"],
                fast_seconds=seconds["fast"],
                **{k: v[i] for k, v in scores.items()},
            )
            out.write(json.dumps(row) + "\n")
        out.flush()
        print(f"{first + len(batch)}/{len(records)} images", flush=True)
    out.close()


def summarize(paths: list[Path]) -> str:
    rows = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line]
    rho = np.array([r["spearman"] for r in rows])
    rho = rho[np.isfinite(rho)]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("file", "label")}
    lines = [
        f"images: {len(rows)}",
        f"Spearman(exact, fast) per image: mean {rho.mean():.3f}, 5th percentile "
        f"{np.percentile(rho, 5):.3f}, median {np.median(rho):.3f}",
        f"seconds per image: exact {mean['exact_seconds']:.4f}, fast {mean['fast_seconds']:.4f}"
        f" (fast is {mean['exact_seconds'] / mean['fast_seconds']:.2f}x faster)",
        "",
        "| mode | insertion AUC (RISE) | deletion AUC (RISE) | pointing game 0 px | 15 px |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("exact", "fast"):
        lines.append(
            f"| {mode} | {mean[f'{mode}_insertion']:.4f} | {mean[f'{mode}_deletion']:.4f} | "
            f"{mean[f'{mode}_pointing_0']:.3f} | {mean[f'{mode}_pointing_15']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fast vs exact GradMask on the shared images")
    parser.add_argument(
        "--model", default=str(DEFAULT_SHARED / "models" / "vit-tiny-patch16-224-augreg-in1k")
    )
    parser.add_argument("--data", default=str(DEFAULT_SHARED / "data" / "imagenet-val-sample"))
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--batch", type=int, default=8, help="images per GradMask call")
    parser.add_argument("--per-eval", type=int, default=32, help="perturbations_per_eval")
    parser.add_argument("--metric-batch", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("fidelity.jsonl"))
    parser.add_argument("--summarize", type=Path, nargs="*", help="summarize these JSONL files")
    args = parser.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return
    measure(args)
    print(summarize([args.out]))


if __name__ == "__main__":
    main()
