"""Benchmark attribution methods on an ImageNet sample: explain-dataset, evaluate, compare.

A thin driver over the library (see ``docs/benchmarks.md``). For the chosen images it writes the
source list ``OUTPUT/source.csv``, explains the images with each method into
``OUTPUT/stores/<method>.zarr`` (:func:`~captum_gradmask.explain_dataset.explain_dataset`),
scores each store with each metric group into the store's evaluation of that name
(:func:`~captum_gradmask.evaluation.evaluate_store`; ``--score-every`` images at a time,
explaining and scoring in turn), and compares the stores into ``OUTPUT``
(:func:`~captum_gradmask.compare.compare_stores`: ``table.md``, ``paired.md``, ``ties.md``,
``results.csv``, ``grid.png`` and, with ``--time-images``, ``cost.md``).

Everything resumes: running the command again explains and scores only what is missing, and
a method or metric group added later only adds its work. A store or evaluation made with
other settings (model, images, target, method settings, tie samples, seed) is refused with
the setting named; use another ``--output``.

Example (from the repository root, with ``../shared`` present)::

    python -m benchmarks.run --first-image 401 --images 14 --methods gradmask-m4,rollout \\
        --output benchmarks/results/vit-tiny-401
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import (
    DEFAULT_DATA,
    DEFAULT_GATE,
    DEFAULT_MODEL,
    REPO,
    explain_and_score,
)
from captum_gradmask.cli import _recorded_spec, add_zero_shot_arguments, zero_shot_labels
from captum_gradmask.compare import compare_stores
from captum_gradmask.datasets import open_source
from captum_gradmask.evaluation import METRIC_COLUMNS
from captum_gradmask.gradmask import AMP_DTYPES
from captum_gradmask.models import load_model
from captum_gradmask.registry import METHODS, MethodUnavailable, method_names
from captum_gradmask.store import StoreMismatch

#: Metric groups selectable with --metrics (each is one evaluation of every store).
METRIC_GROUPS = tuple(METRIC_COLUMNS)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Benchmark attribution methods on an ImageNet sample (see docs/benchmarks.md).",
    )
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL) if DEFAULT_MODEL.is_dir() else None,
        help="Hugging Face folder or hub id, or timm:<architecture> (default: the shared "
        "ViT-Tiny at ../shared when present)",
    )
    parser.add_argument(
        "--weights", default=None, help="timm weights file (.safetensors/.pth) for timm:<arch>"
    )
    # a CLIP-like model as a zero-shot classifier: the 1000 ImageNet class names, in order
    add_zero_shot_arguments(parser)
    parser.add_argument(
        "--data",
        default=str(DEFAULT_DATA) if DEFAULT_DATA.is_dir() else None,
        help="folder with images/ and annotations.csv (default: ../shared's ImageNet sample)",
    )
    parser.add_argument(
        "--images", type=int, default=5, help="N images of the sample, from --first-image on"
    )
    parser.add_argument(
        "--first-image",
        type=int,
        default=1,
        help="1-based position in the sample's file order of the first image (default 1)",
    )
    parser.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated registry names or 'all' ({', '.join(method_names())})",
    )
    parser.add_argument(
        "--metrics",
        default="all",
        help=f"comma-separated metric groups or 'all' ({', '.join(METRIC_GROUPS)})",
    )
    parser.add_argument(
        "--tie-samples",
        type=int,
        default=10,
        help="random tie orders averaged for the headline insertion/deletion (default 10)",
    )
    parser.add_argument(
        "--sensitivity-samples", type=int, default=5, help="max-sensitivity perturbations (5)"
    )
    parser.add_argument("--target", choices=("label", "predicted"), default="label")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--metric-perturbations-per-eval",
        type=int,
        default=64,
        help="perturbed images per forward pass inside the metrics (default 64)",
    )
    parser.add_argument(
        "--perturbations-per-eval",
        type=int,
        default=None,
        help="override the methods' perturbations_per_eval (masked images per forward pass)",
    )
    parser.add_argument(
        "--images-per-call", type=int, default=8, help="images per method call (default 8)"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="images per store chunk, the unit a killed run loses (new stores only; default 32)",
    )
    parser.add_argument(
        "--score-every",
        type=int,
        default=32,
        help="explain this many images, score them with every metric group, and go on: a "
        "killed run keeps the scores of all but one block (default 32)",
    )
    parser.add_argument(
        "--amp-dtype",
        choices=sorted(AMP_DTYPES),
        default=None,
        help="GradMask methods: run the masked passes under torch.autocast in this dtype "
        "(masks stay exact; default: the model's dtype)",
    )
    parser.add_argument("--diffmask-gate", default=str(DEFAULT_GATE), help="DiffMask gate folder")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "default"))
    parser.add_argument(
        "--reference", default=None, help="paired.md's reference method (default gradmask-m4)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--grid-images", type=int, default=4, help="rows of grid.png")
    parser.add_argument(
        "--time-images",
        type=int,
        default=0,
        help="cost.md: re-explain the first K images with each method, counting passes and "
        "seconds (default 0: no cost table)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("no --model given and the shared ViT-Tiny is not at ../shared")
    if args.data is None:
        parser.error(
            f"no --data given and the shared ImageNet sample is not at {DEFAULT_DATA}; pass "
            "--data FOLDER (with images/ and annotations.csv)"
        )
    for name in (
        "images", "first_image", "metric_perturbations_per_eval", "images_per_call",
        "bootstrap", "tie_samples", "sensitivity_samples", "score_every",
    ):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error("--chunk-size must be >= 1")
    for name in ("grid_images", "time_images"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def _split(value: str, valid: Sequence[str], what: str) -> list[str]:
    if value.strip() == "all":
        return list(valid)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; valid: {', '.join(valid)}")
    return names


def write_source(data: str | Path, first_image: int, images: int, path: str | Path) -> Path:
    """Write the CSV source of ``images`` files of an ImageNet sample folder from the 1-based
    ``first_image`` (its ``annotations.csv`` rows, one per box, with absolute file paths), the
    list ``captum-gradmask explain-dataset`` and ``evaluate`` read; returns ``path``.

    Raises:
        SystemExit: the folder has fewer images.
    """
    from captum_gradmask.data import BOX_COLUMNS, read_annotations

    root = Path(data).resolve()
    annotated, _ = read_annotations(
        root / "annotations.csv", required=("file", "label"), limit=images, offset=first_image - 1
    )
    if len(annotated) < images:
        raise SystemExit(
            f"--data {str(data)!r} has {first_image - 1 + len(annotated)} images: files "
            f"{first_image}..{first_image + images - 1} are not all there"
        )
    path = Path(path)
    # written beside and renamed: a run started at the same moment in the same folder (another
    # method in another process) never reads a half-written list
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    with partial.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "synset", *BOX_COLUMNS])
        for file, entry in annotated.items():
            for box in entry.boxes or [["", "", "", ""]]:
                writer.writerow([str(root / file), entry.label, entry.synset, *box])
    os.replace(partial, path)
    return path


def method_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """This run's changes to a method's registry settings."""
    options: dict[str, Any] = {}
    settings = METHODS[name].settings
    if name == "diffmask":
        options["gate"] = args.diffmask_gate if Path(args.diffmask_gate).is_dir() else None
    if args.perturbations_per_eval is not None and "perturbations_per_eval" in settings:
        options["perturbations_per_eval"] = args.perturbations_per_eval
    if args.amp_dtype is not None and "amp_dtype" in settings:
        options["amp_dtype"] = AMP_DTYPES[args.amp_dtype]
    return options


def gate_training_files(gate: str | Path, data: str | Path) -> list[str]:
    """The files of the sample a DiffMask gate was fitted on, from its ``gate.json``
    (``"train_files": "indices A..B"``, 0-based positions in the sample's file order); none
    when the gate does not record them."""
    from captum_gradmask.data import read_annotations

    record = Path(gate) / "gate.json"
    if not record.is_file():
        return []
    recorded = str(json.loads(record.read_text()).get("train_files", ""))
    found = re.fullmatch(r"indices (\d+)\.\.(\d+)", recorded)
    if not found:
        return []
    first, last = int(found[1]), int(found[2])
    annotated, _ = read_annotations(
        Path(data) / "annotations.csv", limit=last - first + 1, offset=first
    )
    return [Path(file).name for file in annotated]


def run(args: argparse.Namespace) -> Path:
    """Run the benchmark described by ``args`` (see :func:`parse_args`); returns the output."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    output = Path(args.output)
    (output / "stores").mkdir(parents=True, exist_ok=True)
    names = _split(args.methods, method_names(), "methods")
    groups = _split(args.metrics, METRIC_GROUPS, "metric groups")

    labels = zero_shot_labels(args)
    model, preprocess = load_model(
        args.model, weights=args.weights, labels=labels, templates=args.template
    )
    model = model.to(device)
    source = write_source(args.data, args.first_image, args.images, output / "source.csv")
    images = open_source(source, preprocess)
    model_info = {
        "spec": _recorded_spec(args.model),
        "weights": _recorded_spec(args.weights),
        **({"labels": labels, "templates": args.template} if labels else {}),
    }
    stores, skipped = [], {}
    for name in names:
        store = output / "stores" / f"{name}.zarr"
        try:
            explain = dict(
                method=name, method_options=method_options(name, args), target=args.target,
                batch_size=args.images_per_call, chunk_size=args.chunk_size, num_workers=0,
                model_info=model_info, show_progress=not args.quiet,
            )  # fmt: skip
            score = dict(
                batch_size=args.images_per_call, num_workers=0,
                perturbations_per_eval=args.metric_perturbations_per_eval,
                tie_samples=args.tie_samples, sensitivity_samples=args.sensitivity_samples,
                seed=args.seed, n_resamples=args.bootstrap, show_progress=not args.quiet,
            )  # fmt: skip
            explain_and_score(
                images, model, store, groups=groups, score_every=args.score_every,
                explain=explain, score=score,
            )  # fmt: skip
        except MethodUnavailable as error:
            skipped[name] = str(error)
            print(f"skipping {name}: {error}", file=sys.stderr)
            continue
        stores.append(store)
    (output / "config.json").write_text(
        json.dumps(
            {**vars(args), "skipped": skipped, "torch": torch.__version__}, indent=2, default=repr
        )
    )
    if not stores:
        raise SystemExit(f"no method could run: {skipped}")
    fitted = {}
    if "diffmask" in names and "diffmask" not in skipped:
        fitted["diffmask"] = gate_training_files(args.diffmask_gate, args.data)
    compare_stores(
        stores, output, evaluation=groups, reference=args.reference, fitted=fitted,
        grid_images=args.grid_images, time_images=args.time_images, model=model,
        dataset=images, n_resamples=args.bootstrap, seed=args.seed,
    )  # fmt: skip
    return output


def main(argv: Sequence[str] | None = None) -> None:
    try:
        output = run(parse_args(argv))
    except StoreMismatch as error:
        raise SystemExit(f"error: {error}") from None
    print((output / "table.md").read_text())
    print(f"results in {output}")


if __name__ == "__main__":
    main()
