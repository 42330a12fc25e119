"""Is a Vision DiffMask gate's failure the objective's or the gate's? Two checks on held-out images.

1. **Keep-fraction sweep.** For each fraction ``f`` of the patches, keep the top ``f`` of a score
   and replace the rest by the gate's filler (zero-image embedding plus the learned placeholder,
   as in training); report top-1 kept and ``KL(p || p_masked)``. Scores: registry maps
   (``gradmask-m4``, ``chefer-gae`` by default, for the predicted class), random scores, the
   gate's own ``log P(kept)`` (``gate``) and its reverse (``gate reversed``). A gate that has
   learned which patches matter beats ``random`` at every fraction and ``gate reversed`` loses
   to it; the map rows show which (kept, KL) pairs the filler allows at all.
2. **Per-image optimisation.** The DiffMask objective with the probes replaced by one free
   location per patch and image: the same hard-concrete gates, filler, ``eps`` and sparsity
   term (mean ``log P(kept)``), a fixed multiplier, Adam on the locations. No amortisation, so
   it shows what the objective reaches on these images when nothing has to generalise.

Example (from the repository root; research code, see experiments/README.md)::

    python -m experiments.diffmask_diagnostics --gate benchmarks/checkpoints/diffmask-vit-tiny \\
        --count 40 --out runs/diagnostics.json

prints two markdown tables and writes them with the per-image values to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks._common import masked_kl_top1
from benchmarks.diffmask_faithfulness import COMPARED, add_arguments, load_inputs, top_k_keep
from benchmarks.distill_diffmask import optimise_locations
from captum_gradmask.adapters import get_adapter
from captum_gradmask.methods.diffmask import DiffMaskGate, baseline_tokens
from captum_gradmask.registry import build_method

__all__ = ["format_optimised", "format_sweep", "keep_fraction_sweep"]

FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9)
Rows = dict[str, dict[float, dict[str, list[float]]]]


def keep_fraction_sweep(
    model: torch.nn.Module,
    gate: DiffMaskGate,
    images: Tensor,
    methods: Sequence[str] = COMPARED,
    fractions: Sequence[float] = FRACTIONS,
    batch_size: int = 4,
    seed: int = 0,
    show_progress: bool = False,
) -> Rows:
    """Per-image ``top1`` and ``kl`` for every score row and fraction (see the module doc)."""
    adapter = get_adapter(model)
    tokens = adapter.require_tokens("the keep-fraction sweep")
    prefix = adapter.prefix_tokens
    explainers = {name: build_method(name, model) for name in methods}
    generator = torch.Generator().manual_seed(seed)
    rows = [*methods, "random", "gate", "gate reversed"]
    results: Rows = {row: {f: {"top1": [], "kl": []} for f in fractions} for row in rows}
    for start in tqdm(range(0, len(images), batch_size), disable=not show_progress):
        batch = images[start : start + batch_size]
        with torch.no_grad():
            states, logits = tokens.states(batch)
            baseline = baseline_tokens(tokens, batch, prefix)
            patch_states = [s[:, prefix:] for s in states]
            gate_score = gate.log_keep(gate(patch_states))[..., -1]
        predicted = logits.argmax(-1).tolist()
        scores = {name: e.attribute_grid(batch, target=predicted) for name, e in explainers.items()}
        scores["random"] = torch.rand(gate_score.shape, generator=generator)
        scores["gate"], scores["gate reversed"] = gate_score, -gate_score
        patches = gate_score.shape[1]
        for row, score in scores.items():
            for fraction in fractions:
                counts = torch.full((len(batch),), round(fraction * patches))
                keep = top_k_keep(score.reshape(len(batch), -1), counts)
                with torch.no_grad():
                    kl, top1 = masked_kl_top1(
                        tokens, gate, states[0], baseline, prefix, keep, logits
                    )
                results[row][fraction]["kl"] += kl.tolist()
                results[row][fraction]["top1"] += top1.tolist()
    return results


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(len(values), 1)


def format_sweep(results: Rows) -> str:
    """A markdown table: rows = scores, columns = fractions kept, cells = "KL / top-1 %"."""
    fractions = list(next(iter(results.values())))
    lines = [
        "| patches kept by | " + " | ".join(f"{f:.0%} kept" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for row, by_fraction in results.items():
        cells = [
            f"{_mean(v['kl']):.3f} / {100 * _mean(v['top1']):.0f}" for v in by_fraction.values()
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_optimised(values: dict[str, list[float]]) -> str:
    """One-row markdown table of the per-image optimisation."""
    return (
        "| per-image optimisation | patches kept | KL, nats | top-1 kept, % |\n|---|---|---|---|\n"
        f"| {len(values['kl'])} images | {_mean(values['kept']):.1%} | {_mean(values['kl']):.3f} "
        f"| {100 * _mean(values['top1']):.0f} |"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, count=40)
    parser.add_argument("--fractions", nargs="+", type=float, default=list(FRACTIONS))
    parser.add_argument("--steps", type=int, default=150, help="per-image optimisation steps")
    parser.add_argument("--multiplier", type=float, default=5.0, help="its fixed multiplier")
    parser.add_argument("--no-optimise", action="store_true", help="skip the optimisation")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    model, gate, records, images = load_inputs(args)
    progress = not args.no_progress
    sweep = keep_fraction_sweep(
        model, gate, images, args.methods, args.fractions, args.batch_size, args.seed, progress
    )
    text = format_sweep(sweep)
    document: dict[str, Any] = {
        "gate": args.gate,
        "files": [Path(r.path).name for r in records],
        "sweep_table": text,
        "sweep": {row: {str(f): v for f, v in by.items()} for row, by in sweep.items()},
    }
    if not args.no_optimise:
        _, optimised = optimise_locations(
            model, gate, images, args.steps, args.multiplier, seed=args.seed,
            batch_size=2 * args.batch_size, show_progress=progress,
        )  # fmt: skip
        document["optimised_table"] = format_optimised(optimised)
        document["optimised"] = optimised
        text += "\n\n" + document["optimised_table"]
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(document, indent=2))
    return text


if __name__ == "__main__":
    main()
