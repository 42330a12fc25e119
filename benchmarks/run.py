"""Benchmark GradMask against Captum's and ViT-specific attribution methods.

Every method explains the same model, images and targets; every metric comes from
:mod:`captum_gradmask.metrics`; seconds per image are measured in the same run. Results go to
``OUTPUT/results.jsonl`` one line per (image, method), appended and flushed as soon as they are
computed, so an interrupted run loses nothing and a re-run with the same ``--output`` skips
what is done. The settings that decide a row's values (model, data, target, seeds, tie samples,
each method's settings) are recorded in ``config.json``; resuming a folder made with other
settings is refused, naming them. Insertion/deletion are scored under three tie orders (see
``docs/metrics.md``): the headline columns use random ties averaged over ``--tie-samples``
orders; ``*_stable`` and ``*_reference`` keep the other two and ``*_tie_spread`` the range
of the AUC over all orders scored. At the end ``table.md`` (means with 95 % bootstrap CIs),
``ties.md`` (insertion/deletion under each tie policy), ``results.csv`` and ``grid.png``
(heatmaps of the first ``--grid-images`` images) are written.

Example (from the repository root, with ``../shared`` present)::

    python -m benchmarks.run --images 20 --output benchmarks/results/vit-tiny

The runner only composes library calls: methods come from :mod:`captum_gradmask.registry`,
models from :mod:`captum_gradmask.models`, data from :mod:`captum_gradmask.data`.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from benchmarks import report
from benchmarks._common import DEFAULT_DATA, DEFAULT_GATE, DEFAULT_MODEL, REPO, synchronize
from captum_gradmask.cli import add_zero_shot_arguments, zero_shot_labels
from captum_gradmask.data import class_names, load_imagenet_sample
from captum_gradmask.gradmask import AMP_DTYPES
from captum_gradmask.metrics import (
    PerturbationCurve,
    adcc,
    gradmask_notebook_deletion,
    gradmask_notebook_insertion,
    patch_infidelity,
    pointing_game,
    rise_deletion,
    rise_insertion,
    sensitivity,
)
from captum_gradmask.models import load_model
from captum_gradmask.registry import MethodUnavailable, build_method, method_names

# Metric groups selectable with --metrics; "rise" and "captum" run on the first
# --rise-metrics-images / --captum-metrics-images images only (they cost the most).
METRIC_GROUPS = ("notebook", "pointing", "adcc", "rise", "captum")


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
        "--images",
        type=int,
        default=5,
        help="N images of the sample, from --first-image on (default 5: all methods and metrics "
        "in about an hour on 2 CPU cores)",
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
        "--rise-metrics-images",
        type=int,
        default=None,
        help="RISE-preset insertion/deletion (225 forward passes per curve) on the first N "
        "images only (default: all)",
    )
    parser.add_argument(
        "--captum-metrics-images",
        type=int,
        default=2,
        help="Captum infidelity and max-sensitivity on the first N images only",
    )
    parser.add_argument(
        "--sensitivity-samples", type=int, default=5, help="max-sensitivity perturbations"
    )
    parser.add_argument(
        "--tie-samples",
        type=int,
        default=10,
        help="random tie orders averaged for the headline insertion/deletion (default 10; "
        "costs one forward pass per order at each point inside a tie)",
    )
    parser.add_argument("--target", choices=("label", "predicted"), default="label")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="metric forward batch")
    parser.add_argument(
        "--perturbations-per-eval",
        type=int,
        default=None,
        help="override the methods' perturbations_per_eval (masked images per forward pass)",
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--grid-images", type=int, default=4, help="rows of grid.png")
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
    for name in ("images", "first_image", "batch_size", "bootstrap", "tie_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _split(value: str, valid: Sequence[str], what: str) -> list[str]:
    if value.strip() == "all":
        return list(valid)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; valid: {', '.join(valid)}")
    return names


def _timed(
    explain: Callable[[Tensor, Any], Tensor], image: Tensor, target: int, device: torch.device
) -> tuple[Tensor, float]:
    """``explain(image, target)`` and its wall-clock seconds (CUDA work included)."""
    synchronize(device)
    start = time.perf_counter()
    result = explain(image, target)
    synchronize(device)
    return result, time.perf_counter() - start


def _as_tensor(attributions: Any) -> Tensor:
    if isinstance(attributions, tuple):
        attributions = attributions[0]
    return attributions.detach()


def _build_methods(
    names: Sequence[str], model: torch.nn.Module, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, str]]:
    methods, skipped = {}, {}
    for name in names:
        try:
            methods[name] = build_method(name, model, **_overrides(name, args))
        except MethodUnavailable as error:
            skipped[name] = str(error)
            print(f"skipping {name}: {error}", file=sys.stderr)
    return methods, skipped


def _overrides(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """This run's changes to a method's registry settings."""
    from captum_gradmask.registry import METHODS

    overrides: dict[str, Any] = {}
    if name == "diffmask":
        overrides["gate"] = args.diffmask_gate if Path(args.diffmask_gate).is_dir() else None
    if args.perturbations_per_eval is not None and "perturbations_per_eval" in (
        METHODS[name].settings
    ):
        overrides["perturbations_per_eval"] = args.perturbations_per_eval
    if args.amp_dtype is not None and "amp_dtype" in METHODS[name].settings:
        overrides["amp_dtype"] = AMP_DTYPES[args.amp_dtype]
    return overrides


def _recorded_methods(config: Path) -> dict[str, Any]:
    if not config.is_file():
        return {}
    return json.loads(config.read_text()).get("experiment", {}).get("methods", {})


def _image_metrics(
    groups: Sequence[str],
    model: torch.nn.Module,
    image: Tensor,
    attributions: Tensor,
    target: int,
    record: Any,
    explain: Callable[[Tensor, Tensor], Tensor],
    index: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Every selected metric of one map (library calls only)."""
    out: dict[str, float] = {}
    batch = args.batch_size
    curve_args = (model, image, attributions, target, args)
    if "notebook" in groups:
        out.update(tie_scores(gradmask_notebook_insertion, "insertion_notebook", *curve_args))
        out.update(tie_scores(gradmask_notebook_deletion, "deletion_notebook", *curve_args))
    if "rise" in groups and (args.rise_metrics_images is None or index < args.rise_metrics_images):
        out.update(tie_scores(rise_insertion, "insertion_rise", *curve_args))
        out.update(tie_scores(rise_deletion, "deletion_rise", *curve_args))
    if "pointing" in groups:
        for tolerance in (0, 15):
            game = pointing_game(
                attributions,
                [record.boxes],
                [target],
                original_sizes=[record.original_size],
                input_size=tuple(image.shape[-2:]),
                tolerance=tolerance,
            )
            out[f"pointing_{tolerance}"] = float(game.hits[0])
    if "adcc" in groups:
        summary = adcc(
            model, image, attributions, target, explanation_func=explain, internal_batch_size=batch
        ).summary()
        for key in ("average_drop", "increase_in_confidence", "coherence", "complexity", "adcc"):
            out[key] = summary[key]
    if "captum" in groups and index < args.captum_metrics_images:
        out["infidelity"] = float(
            patch_infidelity(
                model,
                image,
                attributions,
                target,
                seed=args.seed,
            ).values[0]
        )
        out["sensitivity"] = float(
            sensitivity(
                model,
                image,
                target,
                explanation_func=explain,
                n_perturb_samples=args.sensitivity_samples,
                seed=args.seed,
            ).values[0]
        )
    return out


def tie_scores(
    preset: Callable[..., PerturbationCurve],
    key: str,
    model: torch.nn.Module,
    image: Tensor,
    attributions: Tensor,
    target: int,
    args: argparse.Namespace,
) -> dict[str, float]:
    """One preset's AUC under each tie policy: ``key`` (random ties, mean over
    ``args.tie_samples`` orders), ``key_stable``, ``key_reference``, and ``key_tie_spread``
    (largest minus smallest AUC over the stable, reference and sampled orders)."""
    options = dict(perturbations_per_eval=args.batch_size)
    stable = preset(model, image, attributions, target, ties="stable", **options)
    reference = preset(model, image, attributions, target, ties="reference", **options)
    random = preset(
        model,
        image,
        attributions,
        target,
        ties="random",
        tie_samples=args.tie_samples,
        seed=args.seed,
        **options,
    )
    aucs = [float(stable.auc[0]), float(reference.auc[0]), *random.tie_auc[0].tolist()]
    return {
        key: float(random.auc[0]),
        f"{key}_stable": aucs[0],
        f"{key}_reference": aucs[1],
        f"{key}_tie_spread": max(aucs) - min(aucs),
    }


# The arguments that change the value of a row: a folder's rows must share them.
EXPERIMENT_ARGS = (
    "model",
    "weights",
    "data",
    "target",
    "seed",
    "sensitivity_samples",
    "tie_samples",
    "diffmask_gate",
)


# Method settings that only split the work into batches (or, `compile`, change the maps by float
# rounding only); they may differ between resumed runs.
BATCHING_SETTINGS = ("perturbations_per_eval", "internal_batch_size", "compile")
# Settings added after folders were first written, with the default that gives the rows of
# before: left out at that default, so older folders still resume.
LATER_SETTINGS: dict[str, Any] = {"amp_dtype": None}


def experiment_settings(args: argparse.Namespace, methods: dict[str, Any]) -> dict[str, Any]:
    """What decides a row's values: the :data:`EXPERIMENT_ARGS` and each method's settings
    (its registry settings with this run's overrides, batching left out), JSON-ready."""
    from captum_gradmask.registry import METHODS

    settings: dict[str, Any] = {name: getattr(args, name) for name in EXPERIMENT_ARGS}
    settings["methods"] = {
        name: {
            key: value
            for key, value in {**METHODS[name].settings, **_overrides(name, args)}.items()
            if key not in BATCHING_SETTINGS
            and not (key in LATER_SETTINGS and value is LATER_SETTINGS[key])
        }
        for name in methods
    }
    return json.loads(json.dumps(settings, default=repr))


def check_resumable(output: Path, settings: dict[str, Any]) -> None:
    """Refuse to add rows to a folder whose rows were made with other settings.

    Raises:
        SystemExit: naming each differing setting with its recorded and its new value.
    """
    if not report.load_rows(output / "results.jsonl"):
        return
    config = output / "config.json"
    recorded = json.loads(config.read_text()).get("experiment") if config.is_file() else None
    if recorded is None:
        raise SystemExit(
            f"{output} holds results but no recorded settings (config.json 'experiment'), so "
            "they cannot be checked against this run's; use another --output"
        )
    differences = [
        f"{name}: {recorded.get(name)!r} there, {settings[name]!r} now"
        for name in EXPERIMENT_ARGS
        if recorded.get(name) != settings[name]
    ]
    old_methods = recorded.get("methods", {})
    differences += [
        f"settings of {name}: {old_methods[name]!r} there, {value!r} now"
        for name, value in settings["methods"].items()
        if name in old_methods and old_methods[name] != value
    ]
    if differences:
        raise SystemExit(
            f"{output} holds results made with other settings, which this run would mix with "
            "its own; use another --output or the same settings. Differences: "
            + "; ".join(differences)
        )


def _done_pairs(path: Path) -> set[tuple[str, str]]:
    return {(row["image"], row["method"]) for row in report.load_rows(path)}


def run(args: argparse.Namespace) -> Path:
    """Run the benchmark described by ``args`` (see :func:`parse_args`); returns the output."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    output = Path(args.output)
    (output / "maps").mkdir(parents=True, exist_ok=True)
    results = output / "results.jsonl"

    labels = zero_shot_labels(args)
    model, preprocess = load_model(
        args.model, weights=args.weights, labels=labels, templates=args.template
    )
    model = model.to(device)
    records = load_imagenet_sample(args.data, limit=args.images, offset=args.first_image - 1)
    names = _split(args.methods, method_names(), "methods")
    groups = _split(args.metrics, METRIC_GROUPS, "metric groups")
    methods, skipped = _build_methods(names, model, args)
    settings = experiment_settings(args, methods)
    check_resumable(output, settings)
    recorded_methods = _recorded_methods(output / "config.json")
    settings["methods"] = {**recorded_methods, **settings["methods"]}
    (output / "config.json").write_text(
        json.dumps(
            {
                **vars(args),
                "skipped": skipped,
                "torch": torch.__version__,
                "experiment": settings,
            },
            indent=2,
            default=repr,
        )
    )

    done = _done_pairs(results)
    warmed: set[str] = set()
    _warm_up_model(model, preprocess, device)
    bar = tqdm(records, desc="images", disable=args.quiet)
    with results.open("a") as sink:
        if results.stat().st_size and not results.read_bytes().endswith(b"\n"):
            sink.write("\n")  # end a line cut by an interrupted run; load_rows skips it
        for index, record in enumerate(bar):
            image = preprocess.preprocess(record.path)[None].to(device)
            with torch.no_grad():
                probabilities = model_probabilities(model, image)
            predicted = int(probabilities.argmax())
            target = record.label if args.target == "label" else predicted
            for name, method in methods.items():
                key = record.path.name
                if (key, name) in done:
                    continue
                bar.set_postfix_str(name)

                def explain(x: Tensor, t: Any, method: Any = method) -> Tensor:
                    return _as_tensor(method.attribute(x, target=t))

                attributions, seconds = _timed(explain, image, target, device)
                # A method's first call in a process carries one-off set-up (allocations, lazy
                # initialisation): it is kept as warmup_seconds, out of the s / image mean.
                first_call = name not in warmed
                warmed.add(name)
                row: dict[str, Any] = {
                    "image": key,
                    "index": index,
                    "method": name,
                    "label": record.label,
                    "target": target,
                    "predicted": predicted,
                    "target_probability": float(probabilities[target]),
                    "seconds": None if first_call else seconds,
                    "warmup_seconds": seconds if first_call else None,
                }
                row.update(
                    _image_metrics(
                        groups, model, image, attributions, target, record, explain, index, args
                    )
                )
                if index < args.grid_images:
                    np.save(
                        output / "maps" / f"{record.path.stem}__{name}.npy",
                        attributions[0].sum(0).float().cpu().numpy().astype(np.float16),
                    )
                sink.write(json.dumps(row) + "\n")
                sink.flush()
    report.write_reports(output, list(methods), args.bootstrap, args.seed)
    write_grid(output, records[: args.grid_images], list(methods), preprocess, args.data)
    return output


def _warm_up_model(model: torch.nn.Module, preprocess: Any, device: torch.device) -> None:
    """One forward and backward pass before anything is timed (kernel selection, allocator)."""
    height, width = preprocess.size
    image = torch.zeros(1, 3, height, width, device=device, requires_grad=True)
    torch.autograd.grad(model_probabilities(model, image).max(), image)
    synchronize(device)


def model_probabilities(model: torch.nn.Module, image: Tensor) -> Tensor:
    """Softmax of the model's logits for one image, ``(classes,)``."""
    from captum_gradmask._utils import extract_logits

    return torch.softmax(extract_logits(model(image)), dim=-1)[0]


def write_grid(
    output: Path, records: Sequence[Any], methods: Sequence[str], preprocess: Any, data: str
) -> None:
    """``grid.png`` from the maps saved under ``output/maps``."""
    if not records or not methods:
        return
    names = class_names(data) if (Path(data) / "synsets.txt").is_file() else None
    images, maps, titles = [], [], []
    for record in records:
        tensor = preprocess.preprocess(record.path)
        mean = torch.tensor(preprocess.mean)[:, None, None]
        std = torch.tensor(preprocess.std)[:, None, None]
        images.append((tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy())
        row = []
        for name in methods:
            path = output / "maps" / f"{record.path.stem}__{name}.npy"
            row.append(np.load(path) if path.is_file() else None)
        maps.append(row)
        titles.append(names[record.label] if names else str(record.label))
    report.plot_grid(images, maps, methods, output / "grid.png", titles)


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
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "synset", *BOX_COLUMNS])
        for file, entry in annotated.items():
            for box in entry.boxes or [["", "", "", ""]]:
                writer.writerow([str(root / file), entry.label, entry.synset, *box])
    return path


def main(argv: Sequence[str] | None = None) -> None:
    output = run(parse_args(argv))
    print((output / "table.md").read_text())
    print(f"results in {output}")


if __name__ == "__main__":
    main()
