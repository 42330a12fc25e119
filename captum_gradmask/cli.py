"""Command line: ``captum-gradmask explain IMAGE --model MODEL --out map.png``.

Loads a Hugging Face image-classification checkpoint (hub id or local folder) or a timm model
(``timm:<architecture>`` with ``--weights FILE``), preprocesses the image with the checkpoint's
own settings, prints the top predictions and writes the image with the GradMask heatmap blended
over it (and, with ``--save-map``, the raw patch-grid map as ``.npy``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import __version__
from ._ops import upsample_grid
from .gradmask import GradMaskAttribution
from .viz import save_heatmap_overlay


def _label_names(model: torch.nn.Module) -> dict[int, str]:
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    return {int(k): str(v) for k, v in id2label.items()}


def explain(args: argparse.Namespace) -> int:
    """Run the ``explain`` command; returns the exit code."""
    from .models import load_model

    image_path = Path(args.image)
    if not image_path.is_file():
        print(f"error: IMAGE {str(image_path)!r} is not a file", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model, preprocess = load_model(args.model, weights=args.weights)
    model = model.to(device)
    images = preprocess.preprocess(image_path)[None].to(device)

    gradmask = GradMaskAttribution(model)
    with torch.no_grad():
        probabilities = torch.softmax(gradmask.adapter.logits(images).float(), dim=-1)[0]
    classes = probabilities.shape[0]
    if args.target is not None and not 0 <= args.target < classes:
        print(
            f"error: --target {args.target} is out of range: the model has {classes} classes "
            f"(0..{classes - 1})",
            file=sys.stderr,
        )
        return 2
    names = _label_names(model)
    top = probabilities.topk(min(args.top, classes))
    print(f"top predictions for {image_path.name}:")
    for p, c in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        print(f"  {c:5d}  {p:7.2%}  {names.get(c, '')}")
    target = int(top.indices[0]) if args.target is None else args.target

    grid = gradmask.attribute_grid(
        images,
        target=target,
        masks_per_layer=args.masks_per_layer,
        mode=args.mode,
        perturbations_per_eval=args.batch_size,
        show_progress=not args.quiet,
    )
    attribution = upsample_grid(grid, tuple(images.shape[-2:]), images.shape[1])
    label = names.get(target, str(target))
    out = save_heatmap_overlay(
        images[0].cpu(),
        attribution[0].cpu(),
        args.out,
        mean=preprocess.mean,
        std=preprocess.std,
        title=f"GradMask: {label} (class {target})",
    )
    print(f"explained class {target} ({label}); heatmap written to {out}")
    if args.save_map:
        np.save(args.save_map, grid[0].cpu().numpy())
        print(f"patch-grid map {tuple(grid.shape[1:])} written to {args.save_map}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``captum-gradmask`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="captum-gradmask", description="GradMask explanations for Vision Transformers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("explain", help="explain one image and write a heatmap")
    p.add_argument("image", help="an image file (JPEG, PNG, ...)")
    p.add_argument(
        "--model",
        required=True,
        help="Hugging Face hub id or checkpoint folder, or timm:<architecture> (with --weights)",
    )
    p.add_argument("--weights", default=None, help="timm: a local .safetensors/.pth weights file")
    p.add_argument("--target", type=int, default=None, help="class to explain (default: top-1)")
    p.add_argument("--out", default="gradmask.png", help="PNG with the heatmap over the image")
    p.add_argument("--save-map", default=None, help="also save the (h, w) patch map as .npy")
    p.add_argument("--masks-per-layer", type=int, default=4)
    p.add_argument("--mode", choices=("exact", "fast"), default="exact")
    p.add_argument("--batch-size", type=int, default=32, help="masked images per forward pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=5, help="how many predictions to print")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captum-gradmask`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
