"""Score GradMask and Captum methods with Quantus's metrics on the shared ImageNet images.

Each method's maps come from :func:`captum_gradmask.interop.quantus_explain` (once per batch)
and are scored by Quantus's ``PointingGame``, ``PixelFlipping`` and ``RegionPerturbation``;
the target of every image is its ground-truth label (the pointing game needs that class's
boxes). Writes ``OUTPUT`` (JSON: settings, per-image scores, means with 95 % bootstrap CIs)
and prints a Markdown table.

Example (from the repository root, with ``../shared`` present and quantus installed)::

    python -m benchmarks.quantus_scores --images 8 --threads 1 \\
        --output docs/quantus/scores-vit-tiny.json

The script only composes library calls (the bridge, the data loader, the model loader) with
Quantus's metrics.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from benchmarks._common import DEFAULT_DATA, DEFAULT_MODEL, REPO
from captum_gradmask.data import load_imagenet_sample
from captum_gradmask.interop import LogitsModel, quantus_explain
from captum_gradmask.metrics import boxes_to_mask, resize_boxes
from captum_gradmask.models import load_model
from captum_gradmask.stats import bootstrap_ci

DEFAULT_METHODS = "gradmask-m4,saliency,integrated-gradients"
# Quantus needs features_in_step to divide H * W; it flips (channel, row, column) values, so
# 6272 values a step is 24 steps on a 3 x 224 x 224 image.
PIXEL_FLIPPING_STEP = 6272
REGION_PATCH = 16  # one ViT patch per region
REGIONS = 49  # a quarter of the 196 patches


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantus_scores")
    parser.add_argument("--images", type=int, default=8, help="first N images of the sample")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="registry names, comma-sep.")
    parser.add_argument(
        "--settings",
        default='{"integrated-gradients": {"n_steps": 20, "internal_batch_size": 20}}',
        help="JSON: method name -> method_settings for quantus_explain",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per Quantus batch")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "docs" / "quantus" / "scores.json"))
    return parser.parse_args(argv)


def _object_masks(records: Sequence[Any], size: tuple[int, int]) -> np.ndarray:
    """``(B, 1, H, W)`` bool: the ground-truth boxes of each image in model-input pixels."""
    masks = [
        boxes_to_mask(resize_boxes(r.boxes, r.original_size, size), size).numpy() for r in records
    ]
    return np.stack(masks)[:, None]


def _metrics(quantus: Any) -> dict[str, Any]:
    return {
        "pointing_game": quantus.PointingGame(disable_warnings=True),
        "pixel_flipping_auc": quantus.PixelFlipping(
            features_in_step=PIXEL_FLIPPING_STEP, disable_warnings=True
        ),
        "region_perturbation_aopc": quantus.RegionPerturbation(
            patch_size=REGION_PATCH, regions_evaluation=REGIONS, disable_warnings=True
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Score every method; returns what is written to ``args.output``."""
    import quantus

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # Quantus draws from numpy's global generator (random order only)
    model, preprocess = load_model(args.model)
    model = model.to(args.device)
    wrapped = LogitsModel(model)
    records = load_imagenet_sample(args.data, limit=args.images)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    metrics = _metrics(quantus)
    settings = json.loads(args.settings)
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = dict.fromkeys(methods, 0.0)
    starts = range(0, len(records), args.batch_size)
    bar = tqdm(total=len(records) * len(methods), desc="images x methods")
    for start in starts:
        batch = records[start : start + args.batch_size]
        x = np.stack([preprocess.preprocess(r.path).numpy() for r in batch])
        y = np.array([r.label for r in batch])
        s = _object_masks(batch, tuple(x.shape[-2:]))
        for method in methods:
            began = time.perf_counter()
            a = quantus_explain(
                wrapped,
                x,
                y,
                method=method,
                method_settings=settings.get(method),
                device=args.device,
            )
            seconds[method] += time.perf_counter() - began
            scores = {
                name: metric(
                    model=wrapped,
                    x_batch=x,
                    y_batch=y,
                    a_batch=a,
                    s_batch=s,
                    device=args.device,
                    batch_size=len(batch),
                )
                for name, metric in metrics.items()
            }
            for i, record in enumerate(batch):
                flipped = np.asarray(scores["pixel_flipping_auc"][i], dtype=float)
                drops = np.asarray(scores["region_perturbation_aopc"][i], dtype=float)
                rows.append(
                    {
                        "image": record.path.name,
                        "method": method,
                        "label": int(record.label),
                        "pointing_game": float(scores["pointing_game"][i]),
                        # Quantus's own AUC (return_auc_per_sample) calls np.trapz, gone in
                        # numpy 2.4: the curve's area here, divided by its length (so in [0, 1]).
                        "pixel_flipping_auc": float(
                            np.trapezoid(flipped) / max(len(flipped) - 1, 1)
                        ),
                        # Mean drop of the label's probability over the 49 steps (AOPC).
                        "region_perturbation_aopc": float(drops.mean()),
                    }
                )
            bar.update(len(batch))
    bar.close()
    summary = {
        method: {
            key: dict(
                zip(
                    ("mean", "low", "high"),
                    bootstrap_ci([r[key] for r in rows if r["method"] == method], seed=args.seed),
                    strict=True,
                )
            )
            for key in metrics
        }
        for method in methods
    }
    result = {
        "settings": {
            **vars(args),
            "quantus": quantus.__version__,
            "torch": torch.__version__,
            "pixel_flipping": {"features_in_step": PIXEL_FLIPPING_STEP, "baseline": "black"},
            "region_perturbation": {"patch_size": REGION_PATCH, "regions": REGIONS},
            "explain_seconds_per_image": {m: seconds[m] / len(records) for m in methods},
        },
        "summary": summary,
        "rows": rows,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """One row per method: each metric's mean [95 % CI]."""
    lines = [
        "| method | PointingGame (hit rate) ↑ | PixelFlipping AUC ↓ | RegionPerturbation AOPC ↑ |",
        "|---|---|---|---|",
    ]
    for method, entry in result["summary"].items():
        cells = [
            f"{e['mean']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"
            for e in (
                entry[k]
                for k in ("pointing_game", "pixel_flipping_auc", "region_perturbation_aopc")
            )
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    result = run(parse_args(argv))
    print(markdown_table(result))


if __name__ == "__main__":
    main()
