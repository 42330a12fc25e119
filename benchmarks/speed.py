"""Seconds per image and peak memory of GradMask and its competitors, measured in one run.

Every number is reported as a ratio to GradMask exact (m = 4, default settings) measured in the
same run on the same images, so the table survives a noisy machine better than raw seconds.

    python -m benchmarks.speed                       # shared ViT-Tiny + random ViT-B/16, CPU
    python -m benchmarks.speed --models base --device cuda --masks 4 12

What is timed (median of ``--repeats`` runs after one warm-up, per image):

* ``floor``: one forward+backward of the plain model plus forwards over the masked images at the
  best batch size found among 16, 32, 64 and all (the images are built beforehand, not timed);
* ``naive``: the authors' algorithm written plainly (one image, Python loops over masks, all masks
  in one batch, eager attention) -- ``references/gradmask.py``;
* ``gradmask exact`` / ``gradmask fast group`` (masks grouped by kept count) / ``gradmask fast pad``
  (padded passes with an attention mask) at each ``--masks`` value and batch size;
* comparison methods from :mod:`captum_gradmask.registry` at their registry settings;
* with ``--precisions``, the floor and GradMask exact / fast pad again at each ``--masks`` value
  and the first batch size in each other precision: ``tf32`` (TF32 matmuls, CUDA only: the global
  ``torch.backends`` flags are set for those rows and restored), ``bf16`` and ``fp16`` (the masked
  passes under ``torch.autocast``: GradMask's ``amp_dtype``). ``--compile`` adds GradMask exact
  with ``compile=True`` in each precision (its warm-up call compiles; keep the warm-up on).

    python -m benchmarks.speed --models base --device cuda --precisions fp32 tf32 bf16 fp16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import DEFAULT_SHARED, synchronize
from captum_gradmask import GradMaskAttribution
from captum_gradmask._utils import extract_logits
from captum_gradmask.gradmask import AMP_DTYPES

COMPARISONS = ("occlusion", "integrated-gradients", "rise", "vit-reciprocam", "chefer-gae")
LABELS = {"tiny": "ViT-Ti/16 (shared)", "base": "ViT-B/16 (random)"}
# GradMask variants timed at every setting: exact, and fast with both ways of batching.
VARIANTS = {
    "exact": dict(mode="exact"),
    "fast group": dict(mode="fast", fast_batching="group"),
    "fast pad": dict(mode="fast", fast_batching="pad"),
}
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@contextlib.contextmanager
def precision(name: str) -> Iterator[torch.dtype | None]:
    """Run a block in a precision of :data:`PRECISIONS`; yields GradMask's ``amp_dtype``.

    ``tf32`` sets PyTorch's global TF32 flags for the block and restores them (GradMask itself
    never changes them); ``bf16``/``fp16`` yield the autocast dtype.
    """
    if name != "tf32":
        yield AMP_DTYPES.get(name)
        return
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield None
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``amp_dtype`` (nothing for ``None``), as GradMask's masked passes."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


class PeakMemory:
    """Peak memory above the starting point: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    @contextlib.contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
            yield
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - start) / 2**20
            return
        start = self._rss_mb()
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], self._rss_mb())
                time.sleep(0.005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.peak_mb = max(peak[0], self._rss_mb()) - start


def timed(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: bool = True
) -> tuple[float, float]:
    """Median seconds of ``fn`` over ``repeats`` runs (after an untimed call unless not
    ``warmup``), and its peak memory (MB)."""
    if warmup:
        fn()
        synchronize(device)
    seconds, memory = [], PeakMemory(device)
    for _ in range(repeats):
        with memory.measure():
            start = time.perf_counter()
            fn()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), memory.peak_mb


def masked_batch(images: torch.Tensor, count: int, patch: int, keep: float = 0.24) -> torch.Tensor:
    """``count`` zero-filled masked copies of each image, about ``keep`` of the patches kept."""
    n, _, height, width = images.shape
    generator = torch.Generator().manual_seed(0)
    grid = torch.rand(n * count, height // patch, width // patch, generator=generator) < keep
    pixels = grid.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None]
    return images.repeat_interleave(count, 0) * pixels.to(images.device, images.dtype)


def floor_passes(
    model: torch.nn.Module,
    images: torch.Tensor,
    masked: torch.Tensor,
    amp_dtype: torch.dtype | None = None,
) -> tuple[Callable[[], None], Callable[[int], None]]:
    """The floor's two parts: one forward+backward over ``images``, and plain forwards over
    ``masked`` in batches of a given size (under autocast to ``amp_dtype``, if given)."""
    leaf = images.clone().requires_grad_(True)

    def gradient_pass() -> None:
        logits = extract_logits(model(leaf))
        torch.autograd.grad(logits.max(-1).values.sum(), leaf)

    def forwards(size: int) -> None:
        with torch.inference_mode(), autocast(masked.device, amp_dtype):
            for start in range(0, masked.shape[0], size):
                model(masked[start : start + size])

    return gradient_pass, forwards


def floor_time(
    model: torch.nn.Module,
    images: torch.Tensor,
    masks: int,
    device: torch.device,
    repeats: int,
    sizes: list[int] | None = None,
    warmup: bool = True,
    amp_dtype: torch.dtype | None = None,
) -> tuple[float, int]:
    """Forward+backward plus plain forwards over the masked images at the best batch size."""
    batch = masked_batch(images, masks, 16)
    gradient_pass, forwards = floor_passes(model, images, batch, amp_dtype)
    grad_seconds, _ = timed(gradient_pass, device, repeats, warmup)
    best, best_size = float("inf"), 0
    candidates = sizes or [16, 32, 64, batch.shape[0]]
    for size in sorted({min(size, batch.shape[0]) for size in candidates}):
        seconds, _ = timed(lambda size=size: forwards(size), device, repeats, warmup)
        if seconds < best:
            best, best_size = seconds, size
    return grad_seconds + best, best_size


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Hugging Face eager attention for the block (the authors' transformers 4.x default)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous is None:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def load_models(names: list[str], shared: Path, device: torch.device) -> dict[str, torch.nn.Module]:
    from transformers import ViTConfig, ViTForImageClassification

    models = {}
    for name in names:
        if name == "tiny":
            path = shared / "models" / "vit-tiny-patch16-224-augreg-in1k"
            if not path.is_dir():
                print(f"skipping the shared ViT-Tiny: {path} not found")
                continue
            models[LABELS[name]] = ViTForImageClassification.from_pretrained(path)
        elif name == "base":
            torch.manual_seed(0)  # google/vit-base-patch16-224's config, random weights
            models[LABELS[name]] = ViTForImageClassification(ViTConfig(num_labels=1000))
        else:
            raise SystemExit(f"unknown model {name!r}: use tiny and/or base")
    return {k: v.eval().to(device) for k, v in models.items()}


def real_images(shared: Path, count: int, size: int = 224) -> torch.Tensor:
    from captum_gradmask.data import load_imagenet_sample, preprocess_image

    root = shared / "data" / "imagenet-val-sample"
    if not root.is_dir():
        return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(0))
    records = load_imagenet_sample(root, limit=count)
    return torch.stack([preprocess_image(r.path, size=size) for r in records])


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:  # the user's global choice; GradMask itself never changes it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows: list[dict[str, Any]] = []
    images_all = real_images(args.shared, max([args.images, *args.images_per_call])).to(device)
    scaling_labels = {LABELS[name] for name in args.scaling_models or args.models}
    for model_name, model in load_models(args.models, args.shared, device).items():
        scaling = model_name in scaling_labels
        rows += measure_model(model_name, model, images_all, args, device, scaling)
    return rows


def measure_model(
    model_name: str,
    model: torch.nn.Module,
    images_all: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
    scaling: bool = True,
) -> list[dict[str, Any]]:
    """All rows of one model; ratios are to GradMask exact, m = 4, first batch size.

    ``scaling`` adds the rows for images per call and 384x384 inputs.
    """
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():  # one warm-up forward per model, also with --no-warmup
        model(images_all[:1])

    def record(what: str, settings: Any, fn: Callable[[], Any], per: int) -> float:
        seconds, memory = timed(fn, device, args.repeats, args.warmup)
        row = dict(
            model=model_name,
            method=what,
            settings=str(settings),
            seconds_per_image=seconds / per,
            peak_mb=memory,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        return seconds / per

    images = images_all[: args.images]
    n = images.shape[0]
    heads = model.config.num_attention_heads
    layers = model.config.num_hidden_layers
    gradmask = GradMaskAttribution(model)
    reference = None
    for m in sorted({*args.masks, heads}):
        count = 3 * (layers - 1) * m
        seconds, best = floor_time(
            model, images, count, device, args.repeats, args.floor_batches, args.warmup
        )
        rows.append(
            dict(
                model=model_name,
                method="floor",
                settings=f"m={m}, {count} masked images, best batch {best}",
                seconds_per_image=seconds / n,
                peak_mb=float("nan"),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        for batch in args.batch_sizes:
            for variant, options in VARIANTS.items():
                seconds = record(
                    f"gradmask {variant}",
                    f"m={m}, batch {batch}",
                    lambda m=m, batch=batch, options=options: gradmask.attribute_grid(
                        images, masks_per_layer=m, perturbations_per_eval=batch, **options
                    ),
                    n,
                )
                if variant == "exact" and m == 4 and batch == args.batch_sizes[0]:
                    reference = seconds
    for name in args.precisions:
        if name == "fp32" and not args.compile:
            continue  # the rows above
        if name == "tf32" and device.type != "cuda":
            print("skipping tf32: TF32 matmuls exist on CUDA only")
            continue
        precision_rows(name, model_name, model, gradmask, images, args, device, rows, record)
    if args.naive:
        from references.gradmask import reference_gradmask

        with eager_attention(model):
            record(
                "naive reference",
                "m=4, one image, one batch, eager attention",
                lambda: reference_gradmask(model, images[0], "hf5", 4),
                1,
            )
    for per_call in args.images_per_call if scaling else []:
        for variant, options in VARIANTS.items():
            record(
                f"gradmask {variant}",
                f"m=4, {per_call} images per call",
                lambda b=images_all[:per_call], options=options: gradmask.attribute_grid(
                    b, perturbations_per_eval=args.batch_sizes[0], **options
                ),
                per_call,
            )
    if args.size_384 and scaling:
        big = torch.nn.functional.interpolate(images, size=(384, 384), mode="bilinear")
        for variant, options in VARIANTS.items():
            record(
                f"gradmask {variant}",
                "m=4, 384x384 (interpolated positions)",
                lambda options=options: gradmask.attribute_grid(
                    big, perturbations_per_eval=args.batch_sizes[0], **options
                ),
                n,
            )
    from captum_gradmask.registry import MethodUnavailable, build_method

    targets = extract_logits(model(images)).argmax(-1)
    for name in args.compare:
        try:
            method = build_method(name, model)
        except MethodUnavailable as error:
            print(f"skipping {name}: {error}")
            continue
        record(
            name,
            getattr(method, "settings", ""),
            lambda method=method: method.attribute(images, targets),
            n,
        )
    for row in rows:
        if reference:
            row["ratio_to_exact"] = row["seconds_per_image"] / reference
    return rows


def precision_rows(
    name: str,
    model_name: str,
    model: torch.nn.Module,
    gradmask: GradMaskAttribution,
    images: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
    rows: list[dict[str, Any]],
    record: Callable[[str, Any, Callable[[], Any], int], float],
) -> None:
    """The floor and GradMask exact / fast pad (and exact compiled, with ``--compile``) in
    precision ``name``, at each ``--masks`` value and the first batch size, added to ``rows``
    (the GradMask rows through ``record``)."""
    batch, n = args.batch_sizes[0], images.shape[0]
    layers = model.config.num_hidden_layers
    variants = {} if name == "fp32" else dict(VARIANTS)
    if "fast group" in variants:
        del variants["fast group"]
    if args.compile:
        variants["exact compiled"] = dict(mode="exact", compile=True)
    with precision(name) as amp_dtype:
        for m in args.masks:
            count = 3 * (layers - 1) * m
            if name != "fp32":
                seconds, best = floor_time(
                    model, images, count, device, args.repeats, args.floor_batches, args.warmup,
                    amp_dtype,
                )  # fmt: skip
                rows.append(
                    dict(
                        model=model_name,
                        method="floor",
                        settings=f"m={m}, {count} masked images, best batch {best}, {name}",
                        seconds_per_image=seconds / n,
                        peak_mb=float("nan"),
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
            for variant, options in variants.items():
                record(
                    f"gradmask {variant}",
                    f"m={m}, batch {batch}, {name}",
                    lambda m=m, options=options: gradmask.attribute_grid(
                        images,
                        masks_per_layer=m,
                        perturbations_per_eval=batch,
                        amp_dtype=amp_dtype,
                        **options,
                    ),
                    n,
                )


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | settings | s / image | x GradMask exact (m=4) | peak MB |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.get("ratio_to_exact")
        lines.append(
            f"| {r['model']} | {r['method']} | {r['settings']} | {r['seconds_per_image']:.3f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "base"], choices=sorted(LABELS))
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=2, help="images per timed call")
    parser.add_argument("--images-per-call", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--masks", type=int, nargs="+", default=[1, 4], help="plus the head count")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--floor-batches",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes tried for the floor (default 16 32 64 and all masked images)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed call before each timing (one warm-up forward per model stays)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-naive", dest="naive", action="store_false")
    parser.add_argument("--size-384", action="store_true")
    parser.add_argument(
        "--scaling-models",
        nargs="+",
        default=None,
        choices=sorted(LABELS),
        help="models that get the images-per-call and 384 rows (default: all)",
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32"],
        choices=PRECISIONS,
        help="precisions timed for the floor and GradMask exact / fast pad (tf32: CUDA only; "
        "bf16/fp16: masked passes under autocast); fp32 is the main table",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time GradMask exact with compile=True in each precision",
    )
    parser.add_argument("--compare", nargs="*", default=list(COMPARISONS))
    parser.add_argument("--out", type=Path, default=None, help="write rows as JSON here")
    return parser


def main(argv: list[str] | None = None) -> None:
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # A fixed mmap threshold makes glibc hand large blocks back to the OS when freed, so
        # the process's resident size tracks live CPU memory and its peak is measurable.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        args = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.speed", *args], env)
    args = build_parser().parse_args(argv)
    started = time.time()
    rows = run(args)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, threads {torch.get_num_threads()}"
    )
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name()}"
    print(f"\nmachine: {machine}; total {time.time() - started:.0f} s\n")
    print(to_markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(machine=machine, argv=argv, rows=rows), indent=1))


if __name__ == "__main__":
    main()
