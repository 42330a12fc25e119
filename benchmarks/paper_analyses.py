"""The GradMask paper's own analyses on the shared ViT-Tiny: a hyperparameter sweep and an
ablation study.

- ``masks_per_layer`` m in {1, 2, 3, 4, 6, 8, 12, 16, 24, 48} (all divide ViT-Tiny's hidden
  size 192), every layer but the last;
- layer subsets at m = 4: all but the last (the default), the last 6, the first 6, all;
- ablations at m = 4: the summed clamped Q/K/V gradient scores as the map (no masking), the
  binary masks weighted equally, random binary masks of the same sparsity weighted by their
  confidence, no clamp, and full GradMask.

For every (configuration, image): seconds to compute the map, the authors' notebook insertion
and deletion AUC (``gradmask_notebook_insertion`` / ``_deletion``, divided by 100 so they lie in
[0, 0.99]) and the pointing game at TorchRay's tolerance (15 px), the target being the image's
ground-truth label. Rows go to ``OUTPUT/results.jsonl`` as soon as they are computed (a re-run
skips what is done); configurations run cheapest first, each over all images, so a run cut
short still has complete rows for the cheap ones. ``--report`` writes the tables
(``OUTPUT/tables.md``, means with 95 % bootstrap CIs) and the figures (``FIGURES/*.png``).

Example (from the repository root, with ``../shared`` present)::

    python -m benchmarks.paper_analyses --images 8 --threads 1 --output docs/paper
    python -m benchmarks.paper_analyses --report --output docs/paper

Seconds per image are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks._common import DEFAULT_DATA, DEFAULT_MODEL, REPO, load_rows, synchronize
from captum_gradmask import GradMaskAttribution
from captum_gradmask.data import load_imagenet_sample
from captum_gradmask.metrics import (
    TORCHRAY_TOLERANCE,
    gradmask_notebook_deletion,
    gradmask_notebook_insertion,
    pointing_game,
)
from captum_gradmask.models import load_model
from captum_gradmask.stats import bootstrap_ci

MASKS_PER_LAYER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 48)
METRICS = ("insertion", "deletion", "pointing_game", "seconds")
PANELS = ("seconds", "insertion", "deletion", "pointing_game")
Explain = Callable[[GradMaskAttribution, Tensor, Tensor, int], Tensor]


@dataclass(frozen=True)
class Config:
    """One configuration: ``explain(gradmask, image, target, seed) -> (1, h, w)`` map."""

    name: str
    explain: Explain
    analyses: tuple[str, ...]  # which tables it appears in
    forwards: int  # masked forward passes per image on ViT-Tiny (for the cost order)
    params: dict[str, Any] = field(default_factory=dict)


def _gradmask(masks_per_layer: int = 4, layers: Any = None, clamp: bool = True) -> Explain:
    def explain(gm: GradMaskAttribution, image: Tensor, target: Tensor, seed: int) -> Tensor:
        return gm.attribute_grid(
            image, target, masks_per_layer=masks_per_layer, layers=layers, clamp=clamp
        )

    return explain


def _gradients_alone(gm: GradMaskAttribution, image: Tensor, target: Tensor, seed: int) -> Tensor:
    found = gm.binary_masks(image, target, masks_per_layer=4)
    return found.scores.sum(1).reshape(found.masks.shape[0], *found.masks.shape[2:])


def _masks_alone(gm: GradMaskAttribution, image: Tensor, target: Tensor, seed: int) -> Tensor:
    return gm.binary_masks(image, target, masks_per_layer=4).masks.float().sum(1)


def _random_masks(gm: GradMaskAttribution, image: Tensor, target: Tensor, seed: int) -> Tensor:
    """Each GradMask mask replaced by a uniformly random one keeping as many patches."""
    found = gm.binary_masks(image, target, masks_per_layer=4)
    batch, count, height, width = found.masks.shape
    kept = found.masks.flatten(2).sum(-1)  # (B, M)
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.rand(batch, count, height * width, generator=generator).argsort(-1).argsort(-1)
    masks = (ranks < kept[..., None].cpu()).reshape(found.masks.shape).to(image.device)
    confidences = gm.mask_confidences(image, masks, found.targets)
    return torch.einsum("bm,bmhw->bhw", confidences, masks.float())


def configs(layer_count: int = 12) -> list[Config]:
    """Every configuration, cheapest first (masked forward passes on a ``layer_count`` ViT)."""
    half = layer_count // 2
    default = ("masks_per_layer", "layers", "ablation")
    out = [
        Config("gradients alone", _gradients_alone, ("ablation",), 0),
        Config("masks alone", _masks_alone, ("ablation",), 0),
    ]
    for m in MASKS_PER_LAYER:
        analyses = default if m == 4 else ("masks_per_layer",)
        name = "GradMask m=4" if m == 4 else f"m={m}"
        out.append(Config(name, _gradmask(m), analyses, 3 * (layer_count - 1) * m, {"m": m}))
    layer_sets = {
        f"first {half}": list(range(half)),
        f"last {half}": list(range(layer_count - half, layer_count)),
        "all": "all",
    }
    for name, layers in layer_sets.items():
        count = layer_count if layers == "all" else len(layers)
        out.append(Config(name, _gradmask(4, layers), ("layers",), 3 * count * 4))
    out.append(Config("random masks", _random_masks, ("ablation",), 3 * (layer_count - 1) * 4))
    out.append(
        Config("no clamp", _gradmask(4, clamp=False), ("ablation",), 3 * (layer_count - 1) * 4)
    )
    return sorted(out, key=lambda c: c.forwards)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_analyses")
    parser.add_argument("--images", type=int, default=8, help="first N images of the sample")
    parser.add_argument("--output", default=str(REPO / "docs" / "paper"))
    parser.add_argument("--figures", default=None, help="folder of the PNGs (default OUTPUT)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0, help="random masks and bootstrap")
    parser.add_argument("--only", default=None, help="comma-separated configuration names")
    parser.add_argument("--report", action="store_true", help="only write tables and figures")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    """Compute the missing (configuration, image) rows; returns the results file."""
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    results = output / "results.jsonl"
    done = {(r["config"], r["image"]) for r in load_rows(results)}
    model, preprocess = load_model(args.model)
    model = model.to(args.device)
    gm = GradMaskAttribution(model)
    records = load_imagenet_sample(args.data, limit=args.images)
    images = [preprocess.preprocess(r.path)[None].to(args.device) for r in records]
    selected = configs(len(gm.adapter.layers))
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        selected = [c for c in selected if c.name in wanted]
    gm.attribute_grid(images[0], int(records[0].label))  # warm-up, not timed
    todo = [
        (c, i)
        for c in selected
        for i in range(len(records))
        if (c.name, records[i].path.name) not in done
    ]
    with results.open("a") as sink:
        for config, index in tqdm(todo, desc="configuration x image"):
            record, image = records[index], images[index]
            target = torch.tensor([record.label], device=image.device)
            synchronize(image.device)
            start = time.perf_counter()
            grid = config.explain(gm, image, target, args.seed + index).detach()
            synchronize(image.device)
            seconds = time.perf_counter() - start
            row = {
                "config": config.name,
                "analyses": list(config.analyses),
                "image": record.path.name,
                "label": record.label,
                "seconds": seconds,
                **config.params,
                **_scores(model, image, grid, record),
            }
            sink.write(json.dumps(row) + "\n")
            sink.flush()
    return results


def _scores(model: Any, image: Tensor, grid: Tensor, record: Any) -> dict[str, float]:
    target = int(record.label)
    insertion = gradmask_notebook_insertion(model, image, grid, target).auc[0]
    deletion = gradmask_notebook_deletion(model, image, grid, target).auc[0]
    game = pointing_game(
        grid,
        [record.boxes],
        [target],
        original_sizes=[record.original_size],
        input_size=tuple(image.shape[-2:]),
        tolerance=TORCHRAY_TOLERANCE,
    )
    return {
        "insertion": float(insertion) / 100,
        "deletion": float(deletion) / 100,
        "pointing_game": float(game.hits[0]),
    }


# --- report -----------------------------------------------------------------------------------


def summarize(rows: Sequence[dict[str, Any]], seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per configuration: ``(mean, low, high)`` of each metric and the image count."""
    summary: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        own = [r for r in rows if r["config"] == name]
        entry: dict[str, Any] = {"images": len(own), "analyses": own[0]["analyses"]}
        for metric in METRICS:
            entry[metric] = bootstrap_ci([r[metric] for r in own], seed=seed)
        if "m" in own[0]:
            entry["m"] = own[0]["m"]
        summary[name] = entry
    return summary


def _cell(value: tuple[float, float, float], digits: int = 3) -> str:
    mean, low, high = value
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_tables(summary: dict[str, dict[str, Any]], order: Sequence[str]) -> str:
    """One table per analysis, rows in ``order``."""
    titles = {
        "masks_per_layer": "Masks per layer (every layer but the last)",
        "layers": "Layer subsets (m = 4)",
        "ablation": "Ablations (m = 4, every layer but the last)",
    }
    parts = []
    for analysis, title in titles.items():
        parts += [
            f"### {title}",
            "",
            "| configuration | images | s / image | insertion ↑ | deletion ↓ | pointing game ↑ |",
            "|---|---|---|---|---|---|",
        ]
        for name in order:
            entry = summary.get(name)
            if entry is None or analysis not in entry["analyses"]:
                continue
            parts.append(
                f"| {name} | {entry['images']} | {_cell(entry['seconds'], 2)} | "
                f"{_cell(entry['insertion'])} | {_cell(entry['deletion'])} | "
                f"{_cell(entry['pointing_game'], 2)} |"
            )
        parts.append("")
    return "\n".join(parts)


def _error_bars(
    values: Sequence[tuple[float, float, float]],
) -> tuple[list[float], list[list[float]]]:
    means = [v[0] for v in values]
    return means, [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]


def plot_masks_per_layer(summary: dict[str, dict[str, Any]], path: Path) -> None:
    """Seconds, insertion, deletion and pointing game against m (log axis), with 95 % CIs."""
    from matplotlib.figure import Figure

    entries = sorted((e for e in summary.values() if "m" in e), key=lambda e: e["m"])
    if not entries:
        return
    ms = [e["m"] for e in entries]
    figure = Figure(figsize=(13, 3.2), layout="constrained")
    axes = figure.subplots(1, 4)
    labels = {
        "seconds": "s / image",
        "insertion": "insertion AUC ↑",
        "deletion": "deletion AUC ↓",
        "pointing_game": "pointing game ↑",
    }
    for ax, metric in zip(axes, PANELS, strict=True):
        means, errors = _error_bars([e[metric] for e in entries])
        ax.errorbar(ms, means, yerr=errors, marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xticks(ms, [str(m) for m in ms], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("masks per layer m")
        ax.set_title(labels[metric])
        ax.grid(alpha=0.3)
    figure.suptitle(f"GradMask on ViT-Tiny: masks per layer ({entries[0]['images']}+ images)")
    figure.savefig(path, dpi=110)


def plot_bars(
    summary: dict[str, dict[str, Any]], names: Sequence[str], title: str, path: Path
) -> None:
    """One panel per metric, one bar per configuration, 95 % CIs."""
    from matplotlib.figure import Figure

    names = [n for n in names if n in summary]
    if not names:
        return
    figure = Figure(figsize=(13, 3.4), layout="constrained")
    axes = figure.subplots(1, 4)
    labels = ("s / image", "insertion AUC ↑", "deletion AUC ↓", "pointing game ↑")
    for ax, metric, label in zip(axes, PANELS, labels, strict=True):
        means, errors = _error_bars([summary[n][metric] for n in names])
        ax.bar(range(len(names)), means, yerr=errors, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.savefig(path, dpi=110)


def report(args: argparse.Namespace) -> str:
    """Write ``tables.md`` and the figures from ``results.jsonl``; returns the tables."""
    output = Path(args.output)
    figures = Path(args.figures) if args.figures else output
    figures.mkdir(parents=True, exist_ok=True)
    rows = load_rows(output / "results.jsonl")
    summary = summarize(rows, seed=args.seed)
    order = [c.name for c in configs()]
    order = sorted(order, key=lambda n: (summary.get(n, {}).get("m", 0), order.index(n)))
    tables = markdown_tables(summary, order)
    (output / "tables.md").write_text(tables)
    plot_masks_per_layer(summary, figures / "masks_per_layer.png")
    plot_bars(
        summary,
        ["GradMask m=4", "first 6", "last 6", "all"],
        "GradMask on ViT-Tiny: which layers (m = 4); 'GradMask m=4' = all but the last",
        figures / "layers.png",
    )
    plot_bars(
        summary,
        ["gradients alone", "masks alone", "random masks", "no clamp", "GradMask m=4"],
        "GradMask on ViT-Tiny: ablations (m = 4)",
        figures / "ablation.png",
    )
    return tables


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.report:
        run(args)
    print(report(args))


if __name__ == "__main__":
    main()
