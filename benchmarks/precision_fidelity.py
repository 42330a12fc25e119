"""How far do bf16 / fp16 masked passes move GradMask's maps from fp32, on real images?

For each image of the shared ImageNet sample (target: its ground-truth label), the shared
ViT-Tiny explains it with GradMask exact (m = 4) three times: in the model's fp32, and with
``amp_dtype=torch.bfloat16`` / ``torch.float16`` (masked passes under ``torch.autocast`` on the
same device). Per image and low precision it records

* whether the binary masks are identical to the fp32 run's (``binary_masks``, called before each
  map: the gradient pass never runs in low precision, so only a non-deterministic kernel could
  flip a bit) and the fraction of equal mask bits;
* the Spearman rank correlation of the patch map with the fp32 map, and the largest absolute
  difference relative to the fp32 map's maximum;

and, for every precision, the benchmark's headline insertion / deletion AUC (the GradMask
notebook preset with random tie orders, as ``benchmarks/run.py``; ``--preset rise`` for RISE's),
the pointing game at 0 and 15 px, and the seconds of the ``attribute_grid`` call. Metrics run
the model in fp32: they score the maps, not the precision.

Rows are appended to ``--out`` (JSONL) image by image; a re-run skips the images already there
(and refuses a file made with other settings). ``--report`` summarises one or more JSONL files
into a markdown table and a JSON file (means with 95 % bootstrap CIs of the score changes).

    python -m benchmarks.precision_fidelity --images 3 --threads 2
    python -m benchmarks.precision_fidelity --report
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
from scipy.stats import spearmanr

from benchmarks._common import DEFAULT_DATA, DEFAULT_MODEL, REPO, load_rows, synchronize
from captum_gradmask import GradMaskAttribution
from captum_gradmask.data import load_imagenet_sample
from captum_gradmask.gradmask import AMP_DTYPES
from captum_gradmask.metrics import (
    gradmask_notebook_deletion,
    gradmask_notebook_insertion,
    pointing_game,
    rise_deletion,
    rise_insertion,
)
from captum_gradmask.models import load_model
from captum_gradmask.stats import bootstrap_ci

PRECISIONS = ("fp32", "bf16", "fp16")
LOW = PRECISIONS[1:]
PRESETS = {
    "notebook": (gradmask_notebook_insertion, gradmask_notebook_deletion),
    "rise": (rise_insertion, rise_deletion),
}
SCORES = ("insertion", "deletion", "pointing_0", "pointing_15")
DEFAULT_OUT = REPO / "docs" / "performance" / "precision-fidelity.jsonl"
DEFAULT_REPORT = REPO / "docs" / "performance" / "precision-fidelity.md"
# The settings that decide a row's values: a JSONL file's rows must share them.
SETTINGS = ("model", "data", "masks_per_layer", "preset", "tie_samples", "seed")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    return {name: str(getattr(args, name)) for name in SETTINGS}


def done_files(path: Path, settings: dict[str, Any]) -> set[str]:
    """The images already in ``path``; refuses a file whose rows were made otherwise."""
    rows = load_rows(path)
    for row in rows:
        if row.get("settings") != settings:
            raise SystemExit(
                f"{path} holds rows made with other settings ({row.get('settings')}, now "
                f"{settings}); use another --out or the same settings"
            )
    return {row["file"] for row in rows}


def image_row(
    gradmask: GradMaskAttribution,
    model: torch.nn.Module,
    image: torch.Tensor,
    record: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every measurement of one image (``image``: ``(1, C, H, W)`` on the device)."""
    device = image.device
    target = [record.label]
    maps: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    row: dict[str, Any] = {"file": record.path.name, "label": record.label}
    for name in PRECISIONS:
        masks[name] = gradmask.binary_masks(image, target, masks_per_layer=args.masks_per_layer)
        synchronize(device)
        start = time.perf_counter()
        maps[name] = gradmask.attribute_grid(
            image,
            target,
            masks_per_layer=args.masks_per_layer,
            amp_dtype=AMP_DTYPES.get(name),
            perturbations_per_eval=args.per_eval,
        )
        synchronize(device)
        row[f"{name}_seconds"] = time.perf_counter() - start
    reference = maps["fp32"][0].flatten().double().cpu()
    scale = float(reference.abs().max())
    for name in LOW:
        grid = maps[name][0].flatten().double().cpu()
        same_bits = masks[name].masks == masks["fp32"].masks
        row[f"{name}_masks_identical"] = bool(same_bits.all())
        row[f"{name}_mask_agreement"] = float(same_bits.float().mean())
        row[f"{name}_finite"] = bool(torch.isfinite(grid).all())
        row[f"{name}_spearman"] = float(spearmanr(reference.numpy(), grid.numpy()).statistic)
        row[f"{name}_max_rel_error"] = float((grid - reference).abs().max()) / scale
    insertion, deletion = PRESETS[args.preset]
    options = dict(
        ties="random",
        tie_samples=args.tie_samples,
        seed=args.seed,
        perturbations_per_eval=args.metric_batch,
    )
    for name, grid in maps.items():
        row[f"{name}_insertion"] = float(insertion(model, image, grid, target, **options).auc[0])
        row[f"{name}_deletion"] = float(deletion(model, image, grid, target, **options).auc[0])
        for tolerance in (0, 15):
            game = pointing_game(
                grid.cpu(),
                [record.boxes],
                target,
                input_size=tuple(image.shape[-2:]),
                original_sizes=[record.original_size],
                tolerance=tolerance,
            )
            row[f"{name}_pointing_{tolerance}"] = float(game.hits[0])
    return row


def measure(args: argparse.Namespace) -> Path:
    """Explain and score the images not yet in ``args.out``; returns it."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    settings = settings_of(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_files(out, settings)
    model, preprocess = load_model(args.model)
    model = model.eval().to(device)
    gradmask = GradMaskAttribution(model)
    records = load_imagenet_sample(args.data, limit=args.images, offset=args.start)
    with out.open("a") as sink:
        if out.stat().st_size and not out.read_bytes().endswith(b"\n"):
            sink.write("\n")  # end a line cut by an interrupted run; load_rows skips it
        for position, record in enumerate(records, start=1):
            if record.path.name in done:
                continue
            image = preprocess.preprocess(record.path)[None].to(device)
            row = image_row(gradmask, model, image, record, args)
            row.update(index=args.start + position - 1, device=str(device), settings=settings)
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            seconds = ", ".join(f"{p} {row[f'{p}_seconds']:.1f} s" for p in PRECISIONS)
            spearman = ", ".join(f"{p} {row[f'{p}_spearman']:.4f}" for p in LOW)
            print(
                f"{position}/{len(records)} {record.path.name}: {seconds}; Spearman {spearman}",
                flush=True,
            )
    return out


def summarize(rows: Sequence[dict[str, Any]], resamples: int = 1000) -> dict[str, Any]:
    """Per low precision: fidelity of the maps to fp32's, and each score's change."""
    settings = rows[0]["settings"]
    summary: dict[str, Any] = {
        "images": len(rows),
        "model": Path(settings["model"]).name,
        "masks_per_layer": settings["masks_per_layer"],
        "preset": settings["preset"],
        "devices": sorted({r["device"] for r in rows}),
        "precisions": {},
    }
    for name in PRECISIONS:
        entry: dict[str, Any] = {
            # rows whose timing was void (a paused process) hold None there
            "seconds_per_image": float(
                np.median([r[f"{name}_seconds"] for r in rows if r[f"{name}_seconds"] is not None])
            ),
            "scores": {
                s: bootstrap_ci([r[f"{name}_{s}"] for r in rows], resamples) for s in SCORES
            },
        }
        if name in LOW:
            rho = np.array([r[f"{name}_spearman"] for r in rows], dtype=float)
            errors = np.array([r[f"{name}_max_rel_error"] for r in rows], dtype=float)
            entry.update(
                spearman_mean=float(np.nanmean(rho)),
                spearman_min=float(np.nanmin(rho)),
                spearman_at_least_0_99=float(np.mean(rho >= 0.99)),
                masks_identical=float(np.mean([r[f"{name}_masks_identical"] for r in rows])),
                mask_agreement=float(np.mean([r[f"{name}_mask_agreement"] for r in rows])),
                finite=float(np.mean([r[f"{name}_finite"] for r in rows])),
                max_rel_error_mean=float(np.mean(errors)),
                max_rel_error_max=float(np.max(errors)),
                changes={
                    s: bootstrap_ci([r[f"{name}_{s}"] - r[f"fp32_{s}"] for r in rows], resamples)
                    for s in SCORES
                },
            )
        summary["precisions"][name] = entry
    return summary


def to_markdown(summary: dict[str, Any]) -> str:
    precisions, preset = summary["precisions"], summary["preset"]
    lines = [
        f"{summary['images']} images, {summary['model']}, GradMask exact m = "
        f"{summary['masks_per_layer']}, target = label, on {', '.join(summary['devices'])}; "
        "bf16/fp16 = masked passes under torch.autocast (masks from the fp32 gradient pass). "
        "Seconds per image are one call each, on whatever else the machine was running.",
        "",
        "| precision | Spearman vs fp32: mean | min | images >= 0.99 | masks identical "
        "(bits equal) | max abs error / fp32 max: mean | max | median s / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| fp32 | | | | | | | {precisions['fp32']['seconds_per_image']:.2f} |",
    ]
    for name in LOW:
        p = precisions[name]
        lines.append(
            f"| {name} | {p['spearman_mean']:.4f} | {p['spearman_min']:.4f} | "
            f"{100 * p['spearman_at_least_0_99']:.1f} % | {100 * p['masks_identical']:.1f} % "
            f"({100 * p['mask_agreement']:.2f} %) | {p['max_rel_error_mean']:.2e} | "
            f"{p['max_rel_error_max']:.2e} | {p['seconds_per_image']:.2f} |"
        )
    lines += [
        "",
        f"Scores ({preset} insertion/deletion AUC with random tie orders; pointing game hit "
        "rate) and their change from fp32 (mean, 95 % bootstrap CI over images):",
        "",
        "| score | fp32 | " + " | ".join(f"{n} | {n} - fp32 [95 % CI]" for n in LOW) + " |",
        "|---|---:|" + "---:|---:|" * len(LOW),
    ]
    for score in SCORES:
        cells = [f"{precisions['fp32']['scores'][score][0]:.4f}"]
        for name in LOW:
            mean = precisions[name]["scores"][score][0]
            change, low, high = precisions[name]["changes"][score]
            cells += [f"{mean:.4f}", f"{change:+.5f} [{low:+.5f}, {high:+.5f}]"]
        lines.append(f"| {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(paths: Sequence[Path], out: Path, resamples: int) -> str:
    """Write ``out`` (markdown) and ``out`` with ``.json`` from the rows in ``paths``."""
    rows = {row["file"]: row for path in paths for row in load_rows(path)}  # one per image
    if not rows:
        raise SystemExit(f"no rows in {', '.join(map(str, paths))}")
    settings = {json.dumps(row["settings"], sort_keys=True) for row in rows.values()}
    if len(settings) != 1:
        raise SystemExit(f"rows made with different settings {sorted(settings)}: report each")
    summary = summarize(list(rows.values()), resamples)
    markdown = to_markdown(summary)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# GradMask in bf16 / fp16: fidelity to fp32\n\n" + markdown)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return markdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.precision_fidelity", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the shared ViT-Tiny")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared ImageNet sample")
    parser.add_argument("--images", type=int, default=500, help="images from --start on")
    parser.add_argument("--start", type=int, default=0, help="skip this many images first")
    parser.add_argument("--masks-per-layer", type=int, default=4)
    parser.add_argument("--per-eval", type=int, default=32, help="perturbations_per_eval")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="notebook")
    parser.add_argument("--tie-samples", type=int, default=10, help="random tie orders")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric-batch", type=int, default=64, help="metric forward batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSONL of rows")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="*",
        default=None,
        help="summarise these JSONL files (default: --out) instead of measuring",
    )
    parser.add_argument("--report-out", type=Path, default=DEFAULT_REPORT, help="markdown file")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.report is not None:
        print(report(args.report or [args.out], args.report_out, args.bootstrap))
        return
    measure(args)


if __name__ == "__main__":
    main()
