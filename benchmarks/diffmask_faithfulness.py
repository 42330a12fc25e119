"""Does a trained Vision DiffMask gate keep the prediction, and do other maps do as well with the
same number of patches?

On the validation images (by default files 401-500 of the shared sample, the gate's held-out
split), the gate's hard mask (``map >= 0.5``) keeps ``k`` patches of an image; every other patch
is replaced by the gate's own filler (the zero-image embedding plus the learned placeholder, as
in training). The same ``k`` patches per image are then chosen as the top-``k`` of other maps
(GradMask ``gradmask-m4``, Chefer ``chefer-gae``, and uniformly random scores) and masked the same
way. For each row: top-1 kept (masked argmax = original argmax) and ``KL(p || p_masked)`` in
nats, means over images with percentile-bootstrap 95% intervals (``captum_gradmask.stats``),
and the paired differences from the gate's row on the same images.
Maps are computed for the model's predicted class. Example::

    python -m benchmarks.diffmask_faithfulness --count 100 --threads 2 \\
        --out docs/diffmask/faithfulness-val.json

prints a markdown table and writes the per-image values and the table to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks._common import DEFAULT_DATA, DEFAULT_GATE, DEFAULT_MODEL, masked_kl_top1
from captum_gradmask.adapters import get_adapter
from captum_gradmask.data import load_imagenet_sample, preprocess_image
from captum_gradmask.methods.diffmask import DiffMaskGate, baseline_tokens
from captum_gradmask.registry import build_method
from captum_gradmask.stats import bootstrap_ci

__all__ = [
    "add_arguments",
    "faithfulness",
    "format_table",
    "load_inputs",
    "top_k_keep",
]

COMPARED = ("gradmask-m4", "chefer-gae")


def top_k_keep(scores: Tensor, counts: Tensor) -> Tensor:
    """``(B, N)`` 0/1 masks keeping the ``counts[b]`` highest-scoring patches of each row
    (ties broken by patch index, lowest first)."""
    order = torch.sort(scores.flatten(1).float(), dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return (ranks < counts.reshape(-1, 1)).float()


def faithfulness(
    model: torch.nn.Module,
    gate: DiffMaskGate,
    images: Tensor,
    methods: Sequence[str] = COMPARED,
    batch_size: int = 4,
    seed: int = 0,
    show_progress: bool = False,
) -> dict[str, dict[str, list[float]]]:
    """Per-image ``top1`` (0/1), ``kl`` (nats) and ``kept`` (fraction) for every row: the
    gate's hard mask (``diffmask``), the top-``k`` patches of each registry method in
    ``methods`` and of random scores (``random``), and all patches masked (``none kept``)."""
    adapter = get_adapter(model)
    tokens = adapter.require_tokens("the faithfulness check")
    prefix = adapter.prefix_tokens
    explainers = {name: build_method(name, model) for name in methods}
    generator = torch.Generator().manual_seed(seed)
    rows = ["diffmask", *methods, "random", "none kept"]
    results: dict[str, dict[str, list[float]]] = {
        row: {"top1": [], "kl": [], "kept": []} for row in rows
    }
    for start in tqdm(range(0, len(images), batch_size), disable=not show_progress):
        batch = images[start : start + batch_size]
        with torch.no_grad():
            states, logits = tokens.states(batch)
            baseline = baseline_tokens(tokens, batch, prefix)
            keep_prob = gate.keep_probability([s[:, prefix:] for s in states])
        hard = (keep_prob >= 0.5).float()
        counts = hard.sum(-1).long()
        predicted = logits.argmax(-1)
        keeps = {"diffmask": hard}
        for name, explainer in explainers.items():
            scores = explainer.attribute_grid(batch, target=predicted.tolist())
            keeps[name] = top_k_keep(scores, counts)
        random_scores = torch.rand(hard.shape, generator=generator)
        keeps["random"] = top_k_keep(random_scores, counts)
        keeps["none kept"] = torch.zeros_like(hard)
        for row, keep in keeps.items():
            with torch.no_grad():
                kl, top1 = masked_kl_top1(tokens, gate, states[0], baseline, prefix, keep, logits)
            results[row]["top1"] += top1.tolist()
            results[row]["kl"] += kl.tolist()
            results[row]["kept"] += keep.mean(-1).tolist()
    return results


def format_table(results: dict[str, dict[str, list[float]]], seed: int = 0) -> str:
    """A markdown table: kept fraction, top-1 kept % and mean KL with bootstrap 95% CIs, and
    each row's paired difference from the first row (the gate's own mask) on the same images:
    the mean of the per-image ``top1`` and ``KL`` differences with their bootstrap 95% CIs (an
    interval below 0 for KL means that row's patches move the output less than the gate's)."""
    lines = [
        "| patches chosen by | patches kept | top-1 kept, % [95% CI] | KL, nats [95% CI] | "
        "top-1 minus the gate's, points [95% CI] | KL minus the gate's, nats [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    reference = next(iter(results.values()), None)
    for row, values in results.items():
        top1, low, high = (100 * v for v in bootstrap_ci(values["top1"], seed=seed))
        kl, kl_low, kl_high = bootstrap_ci(values["kl"], seed=seed)
        kept = sum(values["kept"]) / max(len(values["kept"]), 1)
        cells = [f"{row}", f"{kept:.1%}", f"{top1:.1f} [{low:.1f}, {high:.1f}]",
                 f"{kl:.3f} [{kl_low:.3f}, {kl_high:.3f}]"]  # fmt: skip
        if values is reference:
            cells += ["", ""]
        else:
            assert reference is not None
            for name, scale, digits in (("top1", 100.0, 1), ("kl", 1.0, 3)):
                difference = [a - b for a, b in zip(values[name], reference[name], strict=True)]
                mean, low, high = (scale * v for v in bootstrap_ci(difference, seed=seed))
                cells.append(f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, count: int) -> None:
    """Model, data, gate, the image range (``--first``, ``--count``), compared methods,
    batching, seed, threads, output."""
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face ViT folder")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="ImageNet sample folder")
    parser.add_argument("--gate", default=str(DEFAULT_GATE), help="trained gate folder")
    parser.add_argument("--first", type=int, default=400, help="first file index (0-based)")
    parser.add_argument("--count", type=int, default=count, help="images")
    parser.add_argument("--methods", nargs="*", default=list(COMPARED), help="registry names")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="JSON file for per-image values and tables")
    parser.add_argument("--no-progress", action="store_true")


def load_inputs(args: argparse.Namespace) -> tuple[torch.nn.Module, DiffMaskGate, list, Tensor]:
    """The model, the gate, the image records and the preprocessed images the arguments name
    (sets torch's thread count)."""
    torch.set_num_threads(args.threads)
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(args.model).eval()
    gate = DiffMaskGate.load(args.gate)
    records = load_imagenet_sample(args.data, limit=args.first + args.count)[args.first :]
    images = torch.stack([preprocess_image(r.path) for r in records])
    return model, gate, records, images


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, count=100)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    model, gate, records, images = load_inputs(args)
    results = faithfulness(
        model, gate, images, args.methods, args.batch_size, args.seed, not args.no_progress
    )
    table = format_table(results, args.seed)
    print(table)
    if args.out:
        document = {
            "gate": args.gate,
            "files": [Path(r.path).name for r in records],
            "table": table,
            "per_image": results,
        }
        Path(args.out).write_text(json.dumps(document, indent=2))
    return table


if __name__ == "__main__":
    main()
