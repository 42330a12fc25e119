"""Command line: ``captum-gradmask explain IMAGE --model MODEL --out map.png``.

Loads a Hugging Face image-classification checkpoint (hub id or local folder) or a timm model
(``timm:<architecture>`` with ``--weights FILE``), preprocesses the image with the checkpoint's
own settings, prints the top predictions (with class names: the checkpoint's labels, or timm's
ImageNet names) and explains one class with any registered method (GradMask m = 4 by default):
it writes the heatmap over the image and, with ``--save-map``, the raw map as ``.npy`` (the
patch grid for grid methods, the pixel map otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from ._ops import upsample_grid
from ._utils import extract_logits
from .viz import STYLES, save_heatmap

__all__ = ["build_parser", "class_names", "explain", "main", "parse_options"]

DEFAULT_METHOD = "gradmask-m4"


def class_names(model: torch.nn.Module) -> dict[int, str]:
    """Readable class names: a Hugging Face config's ``id2label``, else timm's ImageNet names
    when the model has an ImageNet head, else none."""
    labels = getattr(model, "labels", None)  # a zero-shot classifier's prompts
    if isinstance(labels, list) and all(isinstance(label, str) for label in labels):
        return dict(enumerate(labels))
    config = getattr(model, "config", None)
    id2label = getattr(config, "id2label", None) or {}
    if id2label:
        return {int(k): str(v) for k, v in id2label.items()}
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:
        return {}
    subset = infer_imagenet_subset(model) if hasattr(model, "pretrained_cfg") else None
    if not subset:
        return {}
    info = ImageNetInfo(subset)
    return {i: info.index_to_description(i) for i in range(info.num_classes())}


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["k=v", ...]`` to settings; values are read as int, float, bool, None, JSON lists
    and objects, or text.

    Example::

        >>> from captum_gradmask.cli import parse_options
        >>> parse_options(["n_masks=100", "p=0.25", "gaussian=true", "layer=None", "mode=fast"])
        {'n_masks': 100, 'p': 0.25, 'gaussian': True, 'layer': None, 'mode': 'fast'}
        >>> parse_options(["layers=[0, 2]"])
        {'layers': [0, 2]}
    """
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"`--method-option` {pair!r} must look like name=value")
        options[key.strip().replace("-", "_")] = _value(text.strip())
    return options


def _value(text: str) -> Any:
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _method_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The method's settings from the command line (unknown ones are refused by the registry)."""
    from .registry import method_settings

    settings = _with_amp_dtype(parse_options(args.method_option), args.amp_dtype)
    known = method_settings(args.method)
    for name in ("masks_per_layer", "mode", "gate"):
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    if args.perturbations_per_eval is not None:
        if "perturbations_per_eval" not in known:
            raise ValueError(
                f"--perturbations-per-eval: method {args.method!r} does not batch perturbed "
                f"copies (its settings: {', '.join(sorted(known)) or 'none'})"
            )
        settings["perturbations_per_eval"] = args.perturbations_per_eval
    return settings


def _check_device(name: str) -> torch.device:
    """``--device`` as a torch device, or a one-line error when it is not usable here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def _check_out(path: str | None, flag: str) -> None:
    """Refuse an output file whose folder does not exist before any work is done."""
    if path is None:
        return
    folder = Path(path).expanduser().parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{flag} {path!r}: the folder {str(folder)!r} does not exist; create it first"
        )


def _with_amp_dtype(settings: dict[str, Any], flag: str | None) -> dict[str, Any]:
    """``settings`` with ``--amp-dtype`` (or an ``amp_dtype=bf16|fp16`` method option) as the
    torch dtype GradMask takes."""
    from .gradmask import AMP_DTYPES

    value = settings.get("amp_dtype") if flag is None else flag
    if isinstance(value, str):
        if value not in AMP_DTYPES:
            raise ValueError(
                f"amp_dtype {value!r} is not valid: use {' or '.join(AMP_DTYPES)} (or leave it "
                "out for the model's own dtype)"
            )
        settings["amp_dtype"] = AMP_DTYPES[value]
    return settings


def zero_shot_labels(args: argparse.Namespace) -> list[str] | None:
    """The labels of ``--labels`` (comma-separated) or ``--labels-file`` (one a line), or
    ``None`` when neither is given."""
    if args.labels is not None and args.labels_file is not None:
        raise ValueError("give --labels or --labels-file, not both")
    if args.labels is not None:
        labels = [label.strip() for label in args.labels.split(",")]
        source = f"--labels {args.labels!r}"
    elif args.labels_file is not None:
        path = Path(args.labels_file)
        if not path.is_file():
            raise ValueError(f"--labels-file {str(path)!r} is not a file")
        labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        labels = [label for label in labels if label]
        source = f"--labels-file {str(path)!r}"
    else:
        if args.template:
            raise ValueError("--template is for zero-shot models: give --labels or --labels-file")
        return None
    if not labels or not all(labels):
        raise ValueError(f"{source} must name at least one non-empty label")
    return labels


def add_zero_shot_arguments(parser: argparse.ArgumentParser) -> None:
    """``--labels``, ``--labels-file`` and ``--template`` (read by :func:`zero_shot_labels`)."""
    group = parser.add_argument_group(
        "zero-shot", "explain a CLIP-like model's match of the image to text prompts"
    )
    group.add_argument(
        "--labels", default=None, help='comma-separated prompts: "a dog,a cat,a car"'
    )
    group.add_argument("--labels-file", default=None, help="a text file with one prompt a line")
    group.add_argument(
        "--template",
        action="append",
        default=None,
        help='prompt template with {} for the label, e.g. "a photo of a {}." (repeat to '
        "average several, as CLIP's ImageNet recipe)",
    )


def _add_perturbations_per_eval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--perturbations-per-eval",
        type=int,
        default=None,
        metavar="N",
        help="masked or perturbed copies of an image per forward pass, for the methods that "
        "batch them (GradMask, ViT-ReciproCAM, occlusion, ...; default: the method's)",
    )


def _add_amp_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--amp-dtype",
        choices=("bf16", "fp16"),
        default=None,
        help="GradMask: run the masked passes under torch.autocast in this dtype (the masks "
        "stay exact; default: the model's dtype)",
    )


def explain(args: argparse.Namespace) -> int:
    """Run the ``explain`` command; returns the exit code."""
    from .models import load_model
    from .registry import build_method, method_label

    image_path = Path(args.image)
    if not image_path.is_file():
        print(f"error: IMAGE {str(image_path)!r} is not a file", file=sys.stderr)
        return 2
    if args.batch_size is not None:
        print(
            "warning: explain's --batch-size is deprecated (it set the perturbed copies per "
            "forward pass): use --perturbations-per-eval",
            file=sys.stderr,
        )
        if args.perturbations_per_eval is None:
            args.perturbations_per_eval = args.batch_size
    _check_out(args.out, "--out")
    _check_out(args.save_map, "--save-map")
    device = _check_device(args.device)
    settings = _method_settings(args)
    try:
        labels = zero_shot_labels(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model, preprocess = load_model(
        args.model, weights=args.weights, labels=labels, templates=args.template
    )
    model = model.to(device)
    images = preprocess.preprocess(image_path)[None].to(device)
    method = build_method(args.method, model, **settings)
    label_method = method_label(method.name, settings)

    with torch.no_grad():
        probabilities = torch.softmax(extract_logits(model(images)).float(), dim=-1)[0]
    classes = probabilities.shape[0]
    if args.target is not None and not 0 <= args.target < classes:
        print(
            f"error: --target {args.target} is out of range: the model has {classes} classes "
            f"(0..{classes - 1})",
            file=sys.stderr,
        )
        return 2
    names = class_names(model)
    top = probabilities.topk(min(args.top, classes))
    print(f"top predictions for {image_path.name}:")
    for p, c in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        print(f"  {c:5d}  {p:7.2%}  {names.get(c, '')}")
    target = int(top.indices[0]) if args.target is None else args.target

    saved = method.attribute_grid(images, target=target)
    attribution = upsample_grid(saved, tuple(images.shape[-2:]), 1)
    label = names.get(target, str(target))
    out = save_heatmap(
        images[0].cpu(),
        attribution[0].detach().cpu(),
        args.out,
        style=args.style,
        mean=preprocess.mean,
        std=preprocess.std,
        sign="positive" if float(attribution.min()) >= 0 else "absolute_value",
        title=f"{label_method}: {label} (class {target})",
    )
    print(f"explained class {target} ({label}) with {label_method}; heatmap written to {out}")
    if args.save_map:
        np.save(args.save_map, saved[0].detach().cpu().numpy())
        print(f"map {tuple(saved.shape[1:])} written to {args.save_map}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``captum-gradmask`` argument parser."""
    from .registry import DEPRECATED_NAMES, method_names

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
        help="Hugging Face hub id or checkpoint folder, timm:<architecture> (with --weights), "
        "or open_clip:<architecture> (with --labels; --weights: a pretrained tag or file)",
    )
    p.add_argument("--weights", default=None, help="timm: a local .safetensors/.pth weights file")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        choices=method_names() + list(DEPRECATED_NAMES),
        metavar="METHOD",
        help=f"a registered method (default {DEFAULT_METHOD}): {', '.join(method_names())}",
    )
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the method (repeatable), e.g. n_masks=1000",
    )
    p.add_argument("--gate", default=None, help="diffmask: the trained gate's folder")
    p.add_argument("--target", type=int, default=None, help="class to explain (default: top-1)")
    p.add_argument(
        "--out",
        default="gradmask.png",
        help="the PNG of the heatmap over the image (default: gradmask.png in the current folder)",
    )
    p.add_argument("--style", choices=STYLES, default="blended", help="figure style")
    p.add_argument("--save-map", default=None, help="also save the raw map as .npy")
    p.add_argument("--masks-per-layer", type=int, default=None, help="GradMask's m")
    p.add_argument("--mode", choices=("exact", "fast"), default=None, help="GradMask's mode")
    _add_amp_dtype(p)
    _add_perturbations_per_eval(p)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    p.add_argument("--top", type=int, default=5, help="how many predictions to print")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_zero_shot_arguments(p)
    p.set_defaults(handler=explain)
    _add_dataset_commands(commands)
    _add_compare_command(commands)
    _add_report_command(commands)
    return parser


# --- dataset runs: explain-dataset, evaluate, show ------------------------------------------


def _add_dataset_commands(commands: Any) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = commands.add_parser(
        "explain-dataset",
        help="explain every image of a folder or CSV into a zarr map store (resumable; "
        "shards over torchrun processes)",
    )
    p.add_argument("source", help="an image folder (flat or class sub-folders) or a CSV")
    p.add_argument("--model", required=True, help="as for explain")
    p.add_argument("--weights", default=None, help="timm: a local weights file")
    p.add_argument("--out", required=True, help="the store to create or resume (STORE.zarr)")
    p.add_argument("--method", default="gradmask-m4", help="a registry method name")
    p.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method setting (repeatable), e.g. perturbations_per_eval=64 or mode=fast",
    )
    _add_amp_dtype(p)
    _add_perturbations_per_eval(p)
    p.add_argument(
        "--target", default="predicted", help="'predicted' (default), 'label' or a class index"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--batch-size", type=int, default=8, help="images per method call")
    p.add_argument("--chunk-size", type=int, default=None, help="images per store chunk (32)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding processes")
    p.add_argument("--device", default=device, help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_zero_shot_arguments(p)
    p.set_defaults(handler=_explain_dataset_command)

    p = commands.add_parser("evaluate", help="run metrics over the maps of a store")
    p.add_argument("store", help="a store made by explain-dataset")
    p.add_argument("--metrics", default="notebook", help="notebook, rise, pointing, adcc, captum")
    p.add_argument("--model", default=None, help="default: the model the store records")
    p.add_argument("--weights", default=None, help="default: the weights the store records")
    p.add_argument("--source", default=None, help="default: the source the store records")
    p.add_argument("--name", default="metrics", help="the store's sub-group for the columns")
    p.add_argument("--out", default=None, help="folder for rows.csv, summary.json/.md")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument(
        "--perturbations-per-eval",
        type=int,
        default=64,
        help="perturbed images per forward pass inside the metrics (default 64)",
    )
    p.add_argument(
        "--tie-samples",
        type=int,
        default=10,
        help="random tie orders averaged for the insertion/deletion columns (default 10)",
    )
    p.add_argument(
        "--sensitivity-samples",
        type=int,
        default=5,
        help="perturbed copies per image for max-sensitivity (metric group captum; default 5)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random tie orders, Captum's perturbations and the bootstrap (0)",
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding processes")
    p.add_argument("--device", default=device, help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_evaluate_command)

    p = commands.add_parser("show", help="write one stored map as a PNG")
    p.add_argument("store", help="a store made by explain-dataset")
    p.add_argument("index", type=int, help="the image's row in the store")
    p.add_argument(
        "--out", default="map.png", help="the PNG to write (default: map.png in the current folder)"
    )
    p.set_defaults(handler=_show_command)


def _target_policy(text: str) -> str | int:
    if text in ("predicted", "label"):
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"--target {text!r} is not valid: use 'predicted', 'label' or a class index")


def _run_device(name: str, threads: int | None) -> torch.device:
    """The device of this process (``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun)."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = _check_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _recorded_spec(spec: str | None) -> str | None:
    """A local model or weights path made absolute (so evaluate finds it from anywhere)."""
    if spec is None or spec.startswith("timm:") or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def _dataset_command(run: Any) -> int:
    """Run a dataset command; a missing extra, Ctrl-C and store mismatches end it cleanly."""
    try:
        return run()
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: what was done is kept; run the same command again to resume",
            file=sys.stderr,
        )
        return 130


def _explain_dataset_command(args: argparse.Namespace) -> int:
    from .datasets import open_source
    from .explain_dataset import explain_dataset
    from .models import load_model

    def run() -> int:
        device = _run_device(args.device, args.threads)
        options = _method_settings(args)
        target = _target_policy(args.target)
        labels = zero_shot_labels(args)
        model, preprocess = load_model(
            args.model, weights=args.weights, labels=labels, templates=args.template
        )
        images = open_source(args.source, preprocess, limit=args.limit)
        result = explain_dataset(
            images,
            model.to(device),
            args.out,
            method=args.method,
            method_options=options,
            target=target,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            num_workers=args.workers,
            model_info={
                "spec": _recorded_spec(args.model),
                "weights": _recorded_spec(args.weights),
                **({"labels": labels, "templates": args.template} if labels else {}),
            },
            show_progress=not args.quiet,
        )
        if result.world_size > 1:
            # one write per line: the ranks share the terminal (or pipe)
            sys.stdout.write(
                f"rank {result.rank} of {result.world_size}: wrote {result.written} rows "
                f"({result.failed} skipped), chunks {result.chunks}\n"
            )
            sys.stdout.flush()
        if result.rank == 0:
            seconds = result.run_seconds
            rate = result.run_written / seconds if seconds else 0.0
            many = result.world_size > 1
            by = f" by {result.world_size} processes" if many else ""
            skipped = "" if many else f", {result.failed} skipped"
            print(
                f"{result.done} of {result.total} images done in {args.out}; "
                f"{result.run_written} written{by} in {seconds:.1f} s ({rate:.2f} images/s"
                f"{skipped})"
            )
        return 0

    return _dataset_command(run)


def _evaluate_command(args: argparse.Namespace) -> int:
    from .datasets import open_source
    from .evaluation import evaluate_store, write_evaluation
    from .models import load_model
    from .store import open_maps

    def run() -> int:
        device = _run_device(args.device, args.threads)
        stored = open_maps(args.store)
        recorded = stored.attrs.get("model", {})
        spec = args.model or recorded.get("spec")
        source = args.source or stored.attrs.get("source")
        if spec is None or source is None:
            raise ValueError(
                f"the store {args.store!r} does not record its model or source; pass --model "
                "and --source"
            )
        weights = args.weights if args.model else args.weights or recorded.get("weights")
        labels = None if args.model else recorded.get("labels")  # a zero-shot store's prompts
        templates = recorded.get("templates") if labels else None
        model, preprocess = load_model(spec, weights=weights, labels=labels, templates=templates)
        images = open_source(source, preprocess, limit=len(stored))
        summary = evaluate_store(
            args.store,
            images,
            model.to(device),
            metrics=args.metrics,
            name=args.name,
            batch_size=args.batch_size,
            perturbations_per_eval=args.perturbations_per_eval,
            tie_samples=args.tie_samples,
            sensitivity_samples=args.sensitivity_samples,
            seed=args.seed,
            num_workers=args.workers,
            show_progress=not args.quiet,
        )
        if summary.rank == 0:
            out = args.out or f"{str(args.store).rstrip('/')}-{args.name}"
            write_evaluation(args.store, summary, out)
            print(summary.markdown())
            print(f"per-image rows and summary written to {out}")
        return 0

    return _dataset_command(run)


def _show_command(args: argparse.Namespace) -> int:
    from .evaluation import save_stored_map

    def run() -> int:
        _check_out(args.out, "--out")
        out = save_stored_map(args.store, args.index, args.out)
        print(f"map {args.index} of {args.store} written to {out}")
        return 0

    return _dataset_command(run)


# --- compare: tables of several evaluated stores ------------------------------------------


def _add_compare_command(commands: Any) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = commands.add_parser(
        "compare",
        help="compare evaluated stores over the images they share: table.md (CIs), paired.md, "
        "standing.md, ties.md, results.csv, grid.png, cost.md",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="evaluated stores, one per method")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument(
        "--name",
        default="metrics",
        help="the evaluation to read (evaluate --name), or several, comma-separated, whose "
        "columns are put together (default metrics)",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="the method of paired.md's differences (default gradmask-m4 when compared)",
    )
    p.add_argument(
        "--fitted",
        action="append",
        default=[],
        metavar="METHOD=FILE",
        help="a text file of the images METHOD was fitted on (one file name a line): those "
        "rows are marked and left out of its numbers (repeatable)",
    )
    p.add_argument("--grid-images", type=int, default=4, help="rows of grid.png (4; 0: none)")
    p.add_argument(
        "--time-images",
        type=int,
        default=0,
        help="re-explain the first K images with each method here to count passes and "
        "seconds per image (cost.md; default 0: no cost table)",
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstraps (0)")
    p.add_argument("--device", default=device, help="cpu or cuda, for --time-images")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(handler=_compare_command)


def _fitted_files(pairs: Sequence[str]) -> dict[str, list[str]]:
    fitted: dict[str, list[str]] = {}
    for pair in pairs:
        method, sep, path = pair.partition("=")
        if not sep or not method.strip() or not Path(path).is_file():
            raise ValueError(
                f"--fitted {pair!r} must be METHOD=FILE with FILE a text file of image names"
            )
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        fitted[method.strip()] = [line.strip() for line in lines if line.strip()]
    return fitted


def _compare_command(args: argparse.Namespace) -> int:
    from .compare import compare_stores, stored_source

    def run() -> int:
        device = _run_device(args.device, args.threads)
        model = dataset = None
        if args.time_images:  # (the grid alone reads the images after the stores are checked)
            model, dataset = stored_source(args.stores[0])
            model = model.to(device)
        result = compare_stores(
            args.stores,
            args.out,
            evaluation=[name.strip() for name in args.name.split(",") if name.strip()],
            reference=args.reference,
            fitted=_fitted_files(args.fitted),
            grid_images=args.grid_images,
            time_images=args.time_images,
            model=model,
            dataset=dataset,
            n_resamples=args.bootstrap,
            seed=args.seed,
        )
        print((Path(args.out) / "table.md").read_text())
        notes = []
        if result.left_out:
            notes.append(f"{result.left_out} left out (not evaluated by every store)")
        if result.not_shared:
            notes.append(f"{result.not_shared} in some stores' image lists only")
        print(
            f"{len(result.methods)} methods over {result.images} images"
            + "".join(f", {note}" for note in notes)
            + f"; written to {args.out}: "
            + ", ".join(p.name for p in result.written)
        )
        return 0

    return _dataset_command(run)


# --- report: a static HTML report of stores -----------------------------------------------


def _add_report_command(commands: Any) -> None:
    p = commands.add_parser(
        "report",
        help="a static HTML report of one or more stores (opens from disk): run cards, metrics "
        "with CIs, per-class table, galleries, side-by-side comparison, curves",
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="stores made by explain-dataset")
    p.add_argument("--out", required=True, help="the report's folder (updated in place)")
    p.add_argument("--gallery-size", type=int, default=24, help="pictures per gallery (24)")
    p.add_argument("--rows-per-page", type=int, default=250, help="images per per-image page (250)")
    p.add_argument(
        "--thumbnail-size", type=int, default=112, help="thumbnail's longer side, px (112)"
    )
    p.add_argument("--workers", type=int, default=0, help="processes drawing pictures (0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_report_command)


def _report_command(args: argparse.Namespace) -> int:
    from .report import make_report

    def run() -> int:
        summary = make_report(
            args.stores,
            args.out,
            gallery_size=args.gallery_size,
            rows_per_page=args.rows_per_page,
            thumbnail_size=args.thumbnail_size,
            workers=args.workers,
            show_progress=not args.quiet,
        )
        print(
            f"report written to {summary.index} ({summary.pictures_drawn} pictures drawn, "
            f"{summary.pictures_kept} kept; {summary.pages_written} of {summary.pages} pages "
            "written)"
        )
        return 0

    return _dataset_command(run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captum-gradmask`` console script."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        # this package's deprecations (old method names, old keywords) are shown to the user
        warnings.filterwarnings("default", category=DeprecationWarning, module="captum_gradmask")
        try:
            return args.handler(args)
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2


def _print_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    """A library warning as one line on stderr (no source line)."""
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
