"""The GradMask paper's own analyses on the shared ViT-Tiny, through the dataset pipeline: a
hyperparameter sweep and an ablation study.

- ``masks_per_layer`` m in {1, 2, 3, 4, 6, 8, 12, 16, 24, 48} (all divide ViT-Tiny's hidden
  size 192), every layer but the last;
- layer subsets at m = 4: all but the last (the default), the first half, the last half, all;
- ablations at m = 4: the summed clamped Q/K/V gradient scores as the map (no masking), the
  binary masks weighted equally, random binary masks of the same sparsity weighted by their
  confidence, no clamp, and full GradMask.

Each configuration is a method: the registry's GradMask with settings, or
:class:`GradMaskAblation` for the three ablations that are not GradMask settings. Like
``benchmarks.run`` (and into the same ``--output`` folder, whose stores it shares: the GradMask
m = 1 and m = 4 stores of a benchmark run are this sweep's), it explains the chosen images of
the sample with each configuration into ``OUTPUT/stores/<configuration>.zarr``
(``explain_dataset``, target = the label), scores each store with the ``notebook`` and
``pointing`` metric groups (``evaluate_store``, every tie policy) and compares the stores of
each analysis (``compare_stores``) into ``OUTPUT/paper/<analysis>/``: ``table.md``,
``paired.md`` (each configuration minus GradMask m = 4, paired over images), ``ties.md``,
``results.csv`` and, with ``--time-images K``, ``cost.md`` (passes and seconds per image,
measured in one process). The figures go to ``--figures`` (default ``OUTPUT/paper``).

Everything resumes: the same command again computes only what is missing; configurations run
cheapest first, each over all images. ``--reference-store STORE`` pairs the sweep with a
GradMask m = 4 store made elsewhere (e.g. a benchmark run over more images, which holds the
sweep's: the same maps and scores, since every image is explained and scored on its own)
instead of making the sweep's own.

Example (from the repository root, with ``../shared`` present)::

    python -m benchmarks.paper_analyses --first-image 401 --images 100 --threads 1 \\
        --time-images 5 --output runs/validation-100 --figures docs/paper
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks._common import DEFAULT_DATA, DEFAULT_MODEL, explain_and_score
from benchmarks.run import write_source
from captum_gradmask import GradMaskAttribution
from captum_gradmask._utils import TargetType
from captum_gradmask.cli import _recorded_spec
from captum_gradmask.compare import Comparison, compare_stores, store_label
from captum_gradmask.datasets import file_names, open_source
from captum_gradmask.models import load_model
from captum_gradmask.registry import ConfiguredMethod, build_method, method_label
from captum_gradmask.store import open_maps

MASKS_PER_LAYER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 48)
METRIC_GROUPS = ("notebook", "pointing")
#: The registry name of :class:`GradMaskAblation`'s configurations.
ABLATION = "gradmask-ablation"
VARIANTS = ("gradients alone", "masks alone", "random masks")
ANALYSES = {
    "masks-per-layer": "Masks per layer (every layer but the last)",
    "layers": "Layer subsets (m = 4)",
    "ablation": "Ablations (m = 4, every layer but the last)",
}
#: The table columns the figures show: (compare's key, panel title).
PANELS = (
    ("insertion_notebook", "insertion AUC (%) ↑"),
    ("deletion_notebook", "deletion AUC (%) ↓"),
    ("pointing_15", "pointing game 15 px (%) ↑"),
)


class GradMaskAblation(GradMaskAttribution):
    """GradMask with one of its parts taken away (the paper's ablation study), m = 4, every
    layer but the last:

    - ``"gradients alone"``: the summed clamped Q/K/V channel-group scores of every mask
      (:meth:`binary_masks`'s ``scores``) as the map; no masking, no forward pass of a masked
      image;
    - ``"masks alone"``: the binary masks, each weighted 1;
    - ``"random masks"``: each binary mask replaced by a uniformly random one keeping as many
      patches, weighted by the target's softmax on the masked image
      (:meth:`mask_confidences`). Each image draws from a generator seeded by ``seed`` and the
      image's bytes, so a map does not depend on which images share a call.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> GradMaskAblation(model).attribute_grid(torch.randn(2, 3, 32, 32), target=1,
        ...     variant="masks alone").shape
        torch.Size([2, 4, 4])
    """

    method_name = "GradMask ablation"

    def attribute_grid(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        variant: str = "gradients alone",
        seed: int = 0,
        perturbations_per_eval: int = 32,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        """The ablated map ``(B, h, w)`` of each image (``variant``: one of
        :data:`VARIANTS`)."""
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
        found = self.binary_masks(
            inputs, target, additional_forward_args, internal_batch_size=internal_batch_size
        )
        batch, count, height, width = found.masks.shape
        if variant == "gradients alone":
            return found.scores.sum(1).reshape(batch, height, width)
        if variant == "masks alone":
            return found.masks.float().sum(1)
        images = inputs[0] if isinstance(inputs, tuple) else inputs
        kept = found.masks.flatten(2).sum(-1).cpu()  # (B, M) patches each mask keeps
        ranks = torch.stack([_image_ranks(image, count, height * width, seed) for image in images])
        masks = (ranks < kept[..., None]).reshape(found.masks.shape).to(images.device)
        confidences = self.mask_confidences(
            inputs, masks, found.targets, additional_forward_args,
            perturbations_per_eval=perturbations_per_eval, show_progress=show_progress,
        )  # fmt: skip
        return torch.einsum("bm,bmhw->bhw", confidences, masks.to(confidences.dtype))


def _image_ranks(image: Tensor, count: int, patches: int, seed: int) -> Tensor:
    """``(count, patches)`` random ranks of the patches, one row per mask, seeded by ``seed``
    and the image's bytes."""
    digest = hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).digest()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + int.from_bytes(digest[:6], "big"))
    return torch.rand(count, patches, generator=generator).argsort(-1).argsort(-1)


@dataclass(frozen=True)
class Config:
    """One configuration: a registry method with settings (``method``, ``options``)."""

    name: str  # the row's name in the tables and figures
    store: str  # OUTPUT/stores/<store>.zarr
    method: str
    analyses: tuple[str, ...]
    forwards: int  # masked forward passes per image on the model (the cost order)
    options: dict[str, Any] = field(default_factory=dict)
    m: int | None = None

    def build(self, model: Any) -> ConfiguredMethod:
        """The configuration's method on ``model``."""
        if self.method == ABLATION:
            return ConfiguredMethod(ABLATION, GradMaskAblation(model), dict(self.options))
        return build_method(self.method, model, **self.options)

    def label(self, model: Any) -> str:
        """The label ``compare_stores`` gives the configuration's store."""
        return method_label(self.method, self.build(model).settings)


def configs(layer_count: int = 12) -> list[Config]:
    """Every configuration for a ``layer_count``-layer ViT, cheapest first."""
    half = layer_count // 2
    default = tuple(ANALYSES)
    masked = 3 * (layer_count - 1)  # Q/K/V x every layer but the last
    out = [
        Config("gradients alone", "ablation-gradients-alone", ABLATION, ("ablation",), 0,
               {"variant": "gradients alone"}),
        Config("masks alone", "ablation-masks-alone", ABLATION, ("ablation",), 0,
               {"variant": "masks alone"}),
        Config("random masks", "ablation-random-masks", ABLATION, ("ablation",), masked * 4,
               {"variant": "random masks", "seed": 0}),
        Config("no clamp", "gradmask-m4-no-clamp", "gradmask-m4", ("ablation",), masked * 4,
               {"clamp": False}),
    ]  # fmt: skip
    for m in MASKS_PER_LAYER:
        if m in (1, 4):  # the registry's own GradMask rows
            out.append(Config(
                "GradMask m=4" if m == 4 else "m=1", f"gradmask-m{m}", f"gradmask-m{m}",
                default if m == 4 else ("masks-per-layer",), masked * m, m=m,
            ))  # fmt: skip
        else:
            out.append(Config(
                f"m={m}", f"gradmask-m{m}", "gradmask-m4", ("masks-per-layer",), masked * m,
                {"masks_per_layer": m}, m=m,
            ))  # fmt: skip
    subsets = {
        f"first {half}": list(range(half)),
        f"last {half}": list(range(layer_count - half, layer_count)),
        "all": "all",
    }
    for name, layers in subsets.items():
        count = layer_count if layers == "all" else len(layers)
        out.append(Config(
            name, f"gradmask-m4-layers-{name.replace(' ', '')}", "gradmask-m4", ("layers",),
            3 * count * 4, {"layers": layers},
        ))  # fmt: skip
    return sorted(out, key=lambda c: c.forwards)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_analyses")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=8, help="N images of the sample")
    parser.add_argument(
        "--first-image", type=int, default=1, help="1-based position of the first image"
    )
    parser.add_argument("--output", required=True, help="results folder (resumable)")
    parser.add_argument("--figures", default=None, help="folder of the PNGs (OUTPUT/paper)")
    parser.add_argument("--only", default=None, help="comma-separated configuration names")
    parser.add_argument(
        "--time-images", type=int, default=0, help="cost.md: passes and seconds on K images"
    )
    parser.add_argument(
        "--reference-store", default=None,
        help="a GradMask m = 4 store to pair with instead of making one (same model; its "
        "images include the sweep's, scored by the notebook and pointing groups)",
    )  # fmt: skip
    parser.add_argument("--tie-samples", type=int, default=10)
    parser.add_argument("--metric-perturbations-per-eval", type=int, default=64)
    parser.add_argument("--images-per-call", type=int, default=8)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="images per store chunk (default 32)"
    )
    parser.add_argument(
        "--score-every", type=int, default=32, help="images explained, then scored, at a time"
    )
    parser.add_argument("--seed", type=int, default=0, help="tie orders and bootstraps")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in (
        "images", "first_image", "tie_samples", "images_per_call", "bootstrap", "score_every",
    ):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Comparison]:
    """Explain, score and compare what is missing; returns each analysis's comparison."""
    if args.threads:
        torch.set_num_threads(args.threads)
    output = Path(args.output)
    (output / "stores").mkdir(parents=True, exist_ok=True)
    model, preprocess = load_model(args.model)
    model = model.to(args.device)
    source = write_source(args.data, args.first_image, args.images, output / "source.csv")
    images = open_source(source, preprocess)
    model_info = {"spec": _recorded_spec(args.model), "weights": None}
    everything = configs(len(GradMaskAttribution(model).adapter.layers))
    reference = next(c for c in everything if c.name == "GradMask m=4")
    external = _reference_store(args.reference_store, reference, model, images)
    selected = everything
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        unknown = wanted - {c.name for c in selected}
        if unknown:
            raise SystemExit(f"--only names unknown configurations: {sorted(unknown)}")
        selected = [c for c in selected if c.name in wanted]
    for config in selected:
        if config is reference and external is not None:
            continue  # scored already, in another run
        store = output / "stores" / f"{config.store}.zarr"
        method: Any = config.method
        options: dict[str, Any] | None = dict(config.options)
        if config.method == ABLATION:
            method, options = config.build(model), None
        explain = dict(
            method=method, method_options=options, target="label",
            batch_size=args.images_per_call, chunk_size=args.chunk_size, num_workers=0,
            model_info=model_info, show_progress=not args.quiet,
        )  # fmt: skip
        score = dict(
            batch_size=args.images_per_call, num_workers=0,
            perturbations_per_eval=args.metric_perturbations_per_eval,
            tie_samples=args.tie_samples, seed=args.seed, n_resamples=args.bootstrap,
            show_progress=not args.quiet,
        )  # fmt: skip
        explain_and_score(
            images, model, store, groups=METRIC_GROUPS, score_every=args.score_every,
            explain=explain, score=score,
        )  # fmt: skip
    return compare(args, selected, reference, model, images, external)


def _reference_store(path: str | None, reference: Config, model: Any, images: Any) -> Path | None:
    """``--reference-store`` checked: GradMask m = 4's store, with every image of the sweep
    explained and scored by every metric group of the analyses (``None`` without one)."""
    if path is None:
        return None
    maps = open_maps(path)
    label = store_label(maps)
    if label != reference.label(model):
        raise SystemExit(
            f"--reference-store {path!r} holds {label!r} maps; it must hold the reference's, "
            f"{reference.label(model)!r}"
        )
    rows = {str(f): i for i, f in enumerate(maps.files[:])}
    done = maps.evaluated(METRIC_GROUPS)
    missing = [f for f in file_names(images) if f not in rows or not done[rows[f]]]
    if missing:
        raise SystemExit(
            f"--reference-store {path!r} has not explained, or not scored with "
            f"{', '.join(METRIC_GROUPS)}, {len(missing)} of the sweep's {len(images)} images "
            f"(first: {missing[0]}); it must hold every one"
        )
    return Path(path)


def compare(
    args: argparse.Namespace, selected: Sequence[Config], reference: Config, model: Any,
    images: Any, external: Path | None = None,
) -> dict[str, Comparison]:  # fmt: skip
    """Compare each analysis's stores (those present) with ``reference``'s (from
    ``external`` when given) and draw the figures."""
    output = Path(args.output)

    def path(config: Config) -> Path:
        if config is reference and external is not None:
            return external
        return output / "stores" / f"{config.store}.zarr"

    figures = Path(args.figures) if args.figures else output / "paper"
    figures.mkdir(parents=True, exist_ok=True)
    results: dict[str, Comparison] = {}
    for analysis in ANALYSES:
        members = [c for c in selected if analysis in c.analyses]
        if reference not in members:
            members.insert(0, reference)
        present = [c for c in members if path(c).is_dir()]
        if len(present) < 2:
            continue
        if present[0] is reference and external is not None:
            # the first store's rows index `images`: one of the sweep's stores leads
            present.append(present.pop(0))
        names = {c.label(model): c for c in present}
        built = {label: c.build(model) for label, c in names.items() if c.method == ABLATION}
        results[analysis] = compare_stores(
            [path(c) for c in present],
            output / "paper" / analysis, evaluation=list(METRIC_GROUPS),
            reference=reference.label(model), grid_images=4 if analysis == "ablation" else 0,
            time_images=args.time_images, model=model, dataset=images, methods=built,
            n_resamples=args.bootstrap, seed=args.seed,
        )  # fmt: skip
        if analysis == "masks-per-layer":
            plot_masks_per_layer(results[analysis], names, figures / "masks_per_layer.png")
        else:
            plot_bars(results[analysis], names, ANALYSES[analysis], figures / f"{analysis}.png")
    return results


def _error_bars(values: Sequence[tuple[float, ...]]) -> tuple[list[float], list[list[float]]]:
    means = [v[0] for v in values]
    return means, [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]


def plot_masks_per_layer(result: Comparison, names: Mapping[str, Config], path: Path) -> None:
    """Insertion, deletion and pointing game (95 % CIs) and, when measured, seconds per
    image against m (log axis)."""
    from matplotlib.figure import Figure

    entries = sorted(
        (names[label].m, label) for label in result.methods if names[label].m is not None
    )
    ms = [m for m, _ in entries]
    panels = list(PANELS) + ([("seconds", "s / image ↓")] if result.cost else [])
    figure = Figure(figsize=(3.3 * len(panels), 3.2), layout="constrained")
    for ax, (key, title) in zip(figure.subplots(1, len(panels)), panels, strict=True):
        if key == "seconds":
            ax.plot(ms, [result.cost[label]["seconds"] for _, label in entries], marker="o")
        else:
            means, errors = _error_bars([result.summary[label][key] for _, label in entries])
            ax.errorbar(ms, means, yerr=errors, marker="o", capsize=3)
        ax.set_xscale("log")
        ax.set_xticks(ms, [str(m) for m in ms], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("masks per layer m")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    figure.suptitle(f"GradMask on ViT-Tiny: masks per layer ({result.images} images)")
    figure.savefig(path, dpi=110)


def plot_bars(result: Comparison, names: Mapping[str, Config], title: str, path: Path) -> None:
    """One panel per metric, one bar per configuration, 95 % CIs."""
    from matplotlib.figure import Figure

    labels = list(result.methods)
    figure = Figure(figsize=(11, 3.4), layout="constrained")
    for ax, (key, panel) in zip(figure.subplots(1, len(PANELS)), PANELS, strict=True):
        means, errors = _error_bars([result.summary[label][key] for label in labels])
        ax.bar(range(len(labels)), means, yerr=errors, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(
            range(len(labels)), [names[label].name for label in labels], rotation=35,
            ha="right", fontsize=8,
        )  # fmt: skip
        ax.set_title(panel, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"GradMask on ViT-Tiny: {title.lower()} ({result.images} images)")
    figure.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    results = run(parse_args(argv))
    for analysis, result in results.items():
        print(f"## {ANALYSES[analysis]}\n")
        print((result.written[0].parent / "paired.md").read_text())


if __name__ == "__main__":
    main()
