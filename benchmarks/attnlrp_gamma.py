"""Pick AttnLRP's Gamma setting from the authors' grid on images the benchmark does not score.

The authors' ViT example (``lxt``, ``examples/vit_torch.py``) sweeps conv gamma in
{0.1, 0.25, 100} and linear gamma in {0, 0.01, 0.05, 0.1, 1}. This script scores each pair on
the first files of the shared ImageNet sample (files 1-20 by default; the benchmark scores
files 401-500) with patch-level insertion and deletion (blur baseline for insertion, zeros
for deletion, target = label, 14 patches per step) and prints a Markdown table ranked by
insertion minus deletion AUC.

    python -m benchmarks.attnlrp_gamma --images 20
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

from captum_gradmask.data import load_imagenet_sample, preprocess_image
from captum_gradmask.methods import AttnLRP
from captum_gradmask.metrics.curves import deletion, insertion
from captum_gradmask.models import load_model

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CONV_GAMMAS = (0.1, 0.25, 100.0)
LINEAR_GAMMAS = (0.0, 0.01, 0.05, 0.1, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20, help="first N files of the sample")
    parser.add_argument("--shared", type=Path, default=SHARED)
    args = parser.parse_args()
    model, config = load_model(
        args.shared / "models" / "vit-tiny-patch16-224-augreg-in1k", local_files_only=True
    )
    records = load_imagenet_sample(args.shared / "data" / "imagenet-val-sample", limit=args.images)
    images = torch.stack([preprocess_image(r.path) for r in records])
    labels = torch.tensor([r.label for r in records])
    method = AttnLRP(model)
    patch = images.shape[-1] // method.adapter.grid(tuple(images.shape[-2:]))[1]

    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(x).logits

    rows = []
    for conv_gamma, linear_gamma in itertools.product(CONV_GAMMAS, LINEAR_GAMMAS):
        grid = method.attribute_grid(
            images, labels, conv_gamma=conv_gamma, linear_gamma=linear_gamma,
            internal_batch_size=10,
        )  # fmt: skip
        common = dict(level="patch", patch_size=patch, step_size=14, batch_size=32)
        with torch.no_grad():
            ins = insertion(logits, images, grid, labels, baseline="blur", **common).auc.mean()
            dele = deletion(logits, images, grid, labels, baseline="zeros", **common).auc.mean()
        rows.append((float(ins - dele), conv_gamma, linear_gamma, float(ins), float(dele)))
        print(f"conv {conv_gamma} linear {linear_gamma}: ins {ins:.4f} del {dele:.4f}", flush=True)
    print(f"\n{config}\n\n| conv_gamma | linear_gamma | insertion | deletion | ins - del |")
    print("|---|---|---|---|---|")
    for score, conv_gamma, linear_gamma, ins, dele in sorted(rows, reverse=True):
        print(f"| {conv_gamma:g} | {linear_gamma:g} | {ins:.4f} | {dele:.4f} | {score:.4f} |")


if __name__ == "__main__":
    main()
