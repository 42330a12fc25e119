"""The recipe of the shipped Vision DiffMask gate (``benchmarks/checkpoints/diffmask-vit-tiny``):
probes fitted to per-image solutions of the DiffMask objective, then refined.

Trained with the DiffMask objective directly on 400 images for a few hundred steps, the gate's
probes do not learn which patches matter; optimised per image, with one free gate location per
patch, the same objective finds masks that keep the prediction with about half of the patches.
This script amortises those solutions (a departure from the paper's training; see
docs/diffmask.md, "How the shipped gate is made"):

1. ``teacher``: per-image optimisation (:func:`optimise_locations`: the gate's hard-concrete
   settings and filler, ``multiplier * (KL - eps) + mean log P(kept)``, Adam on the locations)
   of the training images, saved as a shard of locations.
2. ``fit``: a fresh gate (the authors' initialisation) whose probes are fitted to the
   teacher's keep probabilities ``P(kept)`` of the whole stack by binary cross-entropy on the
   model's hidden states of the training images (``--mirror``: and of their mirror images,
   with the teacher's masks mirrored); the filler (placeholder) is the teacher's. The last
   ``--holdout`` of the teacher images pick the epoch (lowest cross-entropy).
   ``--keep-fraction`` then calibrates the kept fraction of the hard mask.
3. ``refine``: calibrate a fitted gate's kept fraction, sharpen its probes on their own hard
   masks, and fit its placeholder to the KL term with the probes frozen.

``fit`` and ``refine`` write a :class:`VisionDiffMaskTrainer` checkpoint at step 0 with the
validation scores of :meth:`~VisionDiffMaskTrainer.evaluate` in its history and a ``run.json``
(the command, settings, curves, validation row and machine). ``--device cuda`` runs any step on
a GPU.

Example (the shipped gate's commands, in order)::

    python -m benchmarks.distill_diffmask teacher --filler-gate runs/gate-filler \\
        --first 0 --count 200 --out runs/distill/shard-0.pt
    python -m benchmarks.distill_diffmask teacher --filler-gate runs/gate-filler \\
        --first 200 --count 200 --out runs/distill/shard-200.pt
    python -m benchmarks.distill_diffmask fit --teachers runs/distill/shard-0.pt \\
        runs/distill/shard-200.pt --mirror --keep-fraction 0.58 --seed 1 --threads 2 \\
        --out runs/gate-fitted
    python -m benchmarks.distill_diffmask refine --gate runs/gate-fitted --keep-fraction 0.60 \\
        --sharpen-epochs 6 --epochs 5 --threads 2 --out runs/gate-refined
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from benchmarks._common import (
    DEFAULT_DATA,
    DEFAULT_GATE,
    DEFAULT_MODEL,
    load_split,
    masked_kl_top1,
)
from captum_gradmask._utils import preserved_model_state
from captum_gradmask.adapters import get_adapter
from captum_gradmask.methods.diffmask import (
    DiffMaskGate,
    GateConfig,
    VisionDiffMaskTrainer,
    baseline_tokens,
)
from captum_gradmask.methods.diffmask.checkpoint import has_trainer_state
from captum_gradmask.methods.diffmask.hard_concrete import log_prob_open, sample_gates

__all__ = [
    "calibrate_keep_fraction",
    "combine_shards",
    "fit_placeholder",
    "fit_probes",
    "keep_targets",
    "mirror_targets",
    "optimise_locations",
    "patch_states",
]

# The per-image optimisation's settings: a shard records them, `fit` refuses mixed shards.
TEACHER_SETTINGS = ("model", "filler_gate", "steps", "multiplier", "eps", "lr", "init", "seed")


def keep_targets(gate: DiffMaskGate, locations: Tensor) -> Tensor:
    """``P(kept)`` of free gate locations ``(N, patches)`` under ``gate``'s hard concrete."""
    c = gate.config
    return log_prob_open(locations, c.temperature, c.stretch_left, c.stretch_right).exp()


def optimise_locations(
    model: torch.nn.Module,
    gate: DiffMaskGate,
    images: Tensor,
    steps: int = 150,
    multiplier: float = 5.0,
    eps: float = 0.1,
    lr: float = 0.1,
    init: float = 3.0,
    batch_size: int = 8,
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[Tensor, dict[str, list[float]]]:
    """Optimise one gate location per patch and image for ``multiplier * (KL - eps) + mean
    log P(kept)`` (the gate's hard-concrete settings and filler; Adam, a fresh optimiser per
    batch, one noise generator seeded with ``seed`` for the whole run), every location starting
    at ``init``.

    Returns the locations ``(N, patches)`` and the scores of the hard mask ``P(kept) >= 0.5``:
    per-image ``kept`` fraction, ``kl`` and ``top1``."""
    adapter = get_adapter(model)
    tokens = adapter.require_tokens("the per-image optimisation")
    prefix = adapter.prefix_tokens
    c = gate.config
    hard_concrete = dict(temperature=c.temperature, left=c.stretch_left, right=c.stretch_right)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    scores: dict[str, list[float]] = {"kept": [], "kl": [], "top1": []}
    found = []
    with preserved_model_state(model), preserved_model_state(gate):
        for p in (*model.parameters(), *gate.parameters()):
            p.requires_grad_(False)
        for start in tqdm(range(0, len(images), batch_size), disable=not show_progress):
            batch = images[start : start + batch_size]
            with torch.no_grad():
                states, logits = tokens.states(batch)
                baseline = baseline_tokens(tokens, batch, prefix)
            shape = (len(batch), states[0].shape[1] - prefix)
            locations = torch.full(shape, float(init), device=images.device, requires_grad=True)
            optimizer = torch.optim.Adam([locations], lr=lr)
            for _ in range(steps):
                keep = sample_gates(locations, generator=generator, **hard_concrete)
                kl, _ = masked_kl_top1(tokens, gate, states[0], baseline, prefix, keep, logits)
                sparsity = log_prob_open(locations, **hard_concrete).mean(-1)
                loss = (multiplier * (kl - eps) + sparsity).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                hard = (log_prob_open(locations, **hard_concrete).exp() >= 0.5).float()
                kl, top1 = masked_kl_top1(tokens, gate, states[0], baseline, prefix, hard, logits)
            found.append(locations.detach().cpu())
            scores["kept"] += hard.mean(-1).tolist()
            scores["kl"] += kl.tolist()
            scores["top1"] += top1.tolist()
    return torch.cat(found), scores


def patch_states(model: torch.nn.Module, images: Tensor, batch_size: int = 16) -> Tensor:
    """The patch tokens of every hidden state the gate reads: ``(L + 1, N, patches, D)``, on
    the model's device (``images`` are moved there a batch at a time)."""
    adapter = get_adapter(model)
    tokens = adapter.require_tokens("the distillation")
    prefix = adapter.prefix_tokens
    device = next(model.parameters()).device
    chunks = []
    with preserved_model_state(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            states, _ = tokens.states(images[start : start + batch_size].to(device))
            chunks.append(torch.stack([s[:, prefix:] for s in states]))
    return torch.cat(chunks, dim=1)


def mirror_targets(targets: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per-patch ``targets`` ``(N, rows * cols)`` of images mirrored left to right: the
    targets of the mirrored images, if the teacher's mask mirrors with the image.

    Example::

        >>> import torch
        >>> from benchmarks.distill_diffmask import mirror_targets
        >>> mirror_targets(torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 1.0]]), (2, 3))
        tensor([[0., 0., 1., 1., 0., 0.]])
    """
    rows, cols = grid
    if targets.shape[-1] != rows * cols:
        raise ValueError(
            f"`targets` have {targets.shape[-1]} patches per image; `grid` {grid} has {rows * cols}"
        )
    return targets.reshape(-1, rows, cols).flip(-1).reshape(targets.shape)


def _cross_entropy(gate: DiffMaskGate, states: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Binary cross-entropy of the whole stack's ``P(kept)`` against ``targets``, and ``P``."""
    log_keep = gate.log_keep(gate(list(states)))[..., -1]
    log_drop = torch.log(-torch.expm1(log_keep.clamp(max=-1e-6)))
    loss = -(targets * log_keep + (1 - targets) * log_drop).mean()
    return loss, log_keep.exp()


def fit_probes(
    gate: DiffMaskGate,
    states: Tensor,
    targets: Tensor,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 8,
    holdout: float = 0.1,
    seed: int = 0,
    show_progress: bool = False,
    views: Sequence[tuple[Tensor, Tensor]] = (),
) -> list[dict[str, float]]:
    """Fit ``gate``'s probes (not its placeholder) to keep probabilities ``targets`` ``(N, P)``.

    ``states`` are :func:`patch_states` of the same ``N`` images. Adam, minibatches of
    ``batch_size`` images in a seeded random order; after every epoch the cross-entropy and the
    agreement of the hard masks (``>= 0.5``) on the last ``holdout`` fraction of the images,
    which are not trained on. The gate ends with the weights of the epoch of lowest held-out
    cross-entropy. Returns one row per epoch.

    ``views``: more ``(states, targets)`` of the same ``N`` images under a transformation that
    moves the teacher's mask with the image (e.g. mirrored images with :func:`mirror_targets`);
    an epoch also trains on the views of the training images (never of the held-out ones).

    Example::

        >>> import torch
        >>> from benchmarks.distill_diffmask import fit_probes
        >>> from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig
        >>> gate = DiffMaskGate(GateConfig(hidden_size=8, num_states=2, gate_hidden=4))
        >>> states, targets = torch.randn(2, 10, 5, 8), torch.rand(10, 5)
        >>> len(fit_probes(gate, states, targets, epochs=2))
        2
    """
    count = states.shape[1]
    held = max(1, round(holdout * count)) if holdout > 0 else 0
    train, check = torch.arange(count - held), torch.arange(count - held, count)
    if held == 0:
        check = train
    sources = [(states, targets)]  # indexed per pair below: no copy of the states
    pairs = [torch.stack([torch.zeros_like(train), train], dim=1)]  # (source, row) to train on
    for index, (view_states, view_targets) in enumerate(views):
        if view_states.shape != states.shape or view_targets.shape != targets.shape:
            raise ValueError(
                f"`views[{index}]` has states {tuple(view_states.shape)} and targets "
                f"{tuple(view_targets.shape)}; they must match `states` {tuple(states.shape)} "
                f"and `targets` {tuple(targets.shape)}"
            )
        sources.append((view_states, view_targets))
        pairs.append(torch.stack([torch.full_like(train, index + 1), train], dim=1))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(gate.probe_parameters, lr=lr)
    history: list[dict[str, float]] = []
    best, best_state = float("inf"), None
    pairs = torch.cat(pairs)  # (view, row): 0 is the images themselves
    for epoch in tqdm(range(epochs), desc="fitting probes", disable=not show_progress):
        order = pairs[torch.randperm(len(pairs), generator=generator)]
        total = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size].tolist()
            batch_states = torch.stack([sources[v][0][:, i] for v, i in batch], dim=1)
            batch_targets = torch.stack([sources[v][1][i] for v, i in batch])
            loss, _ = _cross_entropy(gate, batch_states, batch_targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        with torch.no_grad():
            loss, keep = _cross_entropy(gate, states[:, check], targets[check])
        hard, wanted = keep >= 0.5, targets[check] >= 0.5
        row = {
            "epoch": epoch + 1,
            "train_bce": total / len(order),
            "train_pairs": len(order),
            "holdout_bce": float(loss),
            "holdout_agreement": float((hard == wanted).float().mean()),
            "holdout_kept": float(hard.float().mean()),
            "holdout_teacher_kept": float(wanted.float().mean()),
        }
        history.append(row)
        if row["holdout_bce"] < best:
            best = row["holdout_bce"]
            best_state = {k: v.detach().clone() for k, v in gate.state_dict().items()}
    if best_state is not None:
        gate.load_state_dict(best_state)
    return history


def fit_placeholder(
    model: torch.nn.Module,
    gate: DiffMaskGate,
    images: Tensor,
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 16,
    holdout: float = 0.1,
    seed: int = 0,
    mirror: bool = True,
    show_progress: bool = False,
    monitor: Tensor | None = None,
) -> list[dict[str, float]]:
    """Fit ``gate``'s placeholder (the filler of dropped patches), its probes frozen, to the
    DiffMask KL term: per batch, ``KL(p || p_masked)`` under a sampled mask of the gate (the
    objective's own term) plus the same under its hard mask (``map >= 0.5``, the map's own
    mask). Adam on the placeholder; ``mirror`` adds the training images mirrored left to right.

    The last ``holdout`` fraction of ``images`` is not trained on; after every epoch its
    scores are recorded (``holdout_``: the hard mask's ``kl``, ``top1``, ``kept`` and the
    sampled mask's ``kl_sampled``), and the same as ``val_`` for ``monitor`` images (e.g. the
    validation split: scored, never trained on or used to choose). The gate keeps the last
    epoch's placeholder. Returns a row 0 (the scores before fitting) and one row per epoch.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from benchmarks.distill_diffmask import fit_placeholder
        >>> from captum_gradmask.adapters import get_adapter
        >>> from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))
        >>> rows = fit_placeholder(model, gate, torch.randn(10, 3, 32, 32), epochs=2)
        >>> len(rows), sorted(rows[-1])[:3]
        (3, ['epoch', 'holdout_kept', 'holdout_kl'])
    """
    adapter = get_adapter(model)
    tokens = adapter.require_tokens("fitting the placeholder")
    prefix = adapter.prefix_tokens
    held = max(1, round(holdout * len(images))) if holdout > 0 else 0
    train = images[: len(images) - held]
    if mirror:
        train = torch.cat([train, train.flip(-1)])
    check = images[len(images) - held :] if held else images
    generator = torch.Generator(device=images.device).manual_seed(seed)

    def cached(batch_images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Embedded tokens, clean logits and gate locations, computed once."""
        parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
        for start in range(0, len(batch_images), batch_size):
            states, logits = tokens.states(batch_images[start : start + batch_size])
            for part, value in zip(
                parts, (states[0], logits, gate([s[:, prefix:] for s in states])), strict=True
            ):
                part.append(value)
        return tuple(torch.cat(part) for part in parts)  # type: ignore[return-value]

    history: list[dict[str, float]] = []
    with preserved_model_state(model), preserved_model_state(gate):
        for p in (*model.parameters(), *gate.parameters()):
            p.requires_grad_(False)
        with torch.no_grad():
            embedded, logits, locations = cached(train)
            scored = {"holdout": cached(check)}
            if monitor is not None:
                scored["val"] = cached(monitor)
            baseline = baseline_tokens(tokens, images, prefix)
        gate.placeholder.requires_grad_(True)
        optimizer = torch.optim.Adam([gate.placeholder], lr=lr)

        def hard(where: Tensor) -> Tensor:
            return (gate.log_keep(where)[..., -1].exp() >= 0.5).float()

        @torch.no_grad()
        def score(some: Tensor, clean: Tensor, where: Tensor) -> dict[str, float]:
            # The same gate noise every epoch, and none taken from the training's draws.
            noise = torch.Generator(device=images.device).manual_seed(seed + 1)
            keep, sampled = hard(where), gate.sample_keep(where, noise)
            kl, top1 = masked_kl_top1(tokens, gate, some, baseline, prefix, keep, clean)
            kl_sampled, _ = masked_kl_top1(tokens, gate, some, baseline, prefix, sampled, clean)
            return {"kl": float(kl.mean()), "top1": float(top1.mean()),
                    "kept": float(keep.mean()), "kl_sampled": float(kl_sampled.mean())}  # fmt: skip

        def scores() -> dict[str, float]:
            return {
                f"{split}_{name}": value
                for split, cache in scored.items()
                for name, value in score(*cache).items()
            }

        history.append({"epoch": 0, **scores()})
        for epoch in tqdm(range(epochs), desc="fitting the placeholder", disable=not show_progress):
            order = torch.randperm(len(train), generator=generator, device=images.device)
            sums = {"hard": 0.0, "sampled": 0.0}
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                where = locations[rows]
                losses = {
                    name: masked_kl_top1(
                        tokens, gate, embedded[rows], baseline, prefix, keep, logits[rows]
                    )[0].mean()
                    for name, keep in (
                        ("sampled", gate.sample_keep(where, generator)),
                        ("hard", hard(where)),
                    )
                }
                sum(losses.values()).backward()  # type: ignore[union-attr]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for name, value in losses.items():
                    sums[name] += float(value.detach()) * len(rows)
            row: dict[str, float] = {
                "epoch": epoch + 1,
                "train_kl_hard": sums["hard"] / len(train),
                "train_kl_sampled": sums["sampled"] / len(train),
            }
            row.update(scores())
            row["placeholder_norm"] = float(gate.placeholder.detach().norm())
            history.append(row)
    return history


# Settings that shards of earlier versions of this script record, at the value that gives this
# script's optimisation (such shards still combine with new ones).
NEUTRAL_SETTINGS = {
    "init_gate": "None", "init_clip": "2.0", "method": "None", "method_keep": "0.55",
}  # fmt: skip


def check_settings(shards: Sequence[dict[str, Any]]) -> None:
    """Refuse teacher shards made with different settings (other noise seeds are fine). The
    model and the filler gate are compared by folder name, so that shards made on another
    machine (another path to the same assets) combine."""

    def key(settings: dict[str, str]) -> str:
        settings = {**settings}
        for name, value in NEUTRAL_SETTINGS.items():
            recorded = settings.pop(name, value)
            if recorded != value:
                raise SystemExit(f"a teacher shard was made with {name}={recorded!r}")
        for name in ("model", "filler_gate"):
            if name in settings:
                settings[name] = Path(settings[name]).name
        return json.dumps({k: v for k, v in settings.items() if k != "seed"}, sort_keys=True)

    settings = {key(s["settings"]) for s in shards}
    if len(settings) != 1:
        raise SystemExit(f"--teachers were made with different settings: {sorted(settings)}")


def combine_shards(
    shards: Sequence[dict[str, Any]], filler: DiffMaskGate
) -> tuple[list[int], list[int], Tensor]:
    """The first image index and image count of each group of teacher shards, and their
    targets ``(N, patches)``: ``P(kept)`` under ``filler``'s hard concrete, averaged over
    the shards of the same images (other seeds). Refuses shards made with other settings,
    groups of different sizes and repeated seeds."""
    check_settings(shards)
    groups: dict[int, list[dict[str, Any]]] = {}
    for shard in shards:
        groups.setdefault(shard["first"], []).append(shard)
    for first, group in groups.items():
        if len({len(s["locations"]) for s in group}) != 1:
            raise SystemExit(f"--teachers from image {first} hold different image counts")
        if len({s["settings"]["seed"] for s in group}) != len(group):
            raise SystemExit(f"--teachers from image {first}: the same seed twice")
    firsts = sorted(groups)
    targets = [
        torch.stack([keep_targets(filler, s["locations"]) for s in groups[first]]).mean(0)
        for first in firsts
    ]
    return firsts, [len(t) for t in targets], torch.cat(targets)


def calibrate_keep_fraction(
    gate: DiffMaskGate, states: Tensor, fraction: float, iterations: int = 50
) -> float:
    """Shift every probe's offset by one amount so that the hard masks (``map >= 0.5``) of
    the images in ``states`` keep ``fraction`` of their patches (bisection; the kept fraction
    grows with the shift). Returns the shift added.

    Example::

        >>> import torch
        >>> from benchmarks.distill_diffmask import calibrate_keep_fraction
        >>> from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig
        >>> gate = DiffMaskGate(GateConfig(hidden_size=8, num_states=2, gate_hidden=4))
        >>> states = torch.randn(2, 10, 50, 8)
        >>> shift = calibrate_keep_fraction(gate, states, 0.5)
        >>> round(float((gate.keep_probability(list(states)) >= 0.5).float().mean()), 2)
        0.5
    """
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction}")
    with torch.no_grad():
        locations = gate(list(states))

        def kept(shift: float) -> float:
            keep = gate.log_keep(locations + shift)[..., -1].exp()
            return float((keep >= 0.5).float().mean())

        low, high = -100.0, 100.0
        reachable = (kept(low), kept(high))
        if not reachable[0] <= fraction <= reachable[1]:
            raise ValueError(
                f"`fraction` {fraction} is out of reach: shifting the gates lets the hard masks "
                f"keep {reachable[0]:.3f} to {reachable[1]:.3f} of these patches"
            )
        for _ in range(iterations):
            middle = (low + high) / 2
            low, high = (middle, high) if kept(middle) < fraction else (low, middle)
        for probe in gate.probes:
            probe.offset.add_(high)
    return high


def _load_model(path: str) -> torch.nn.Module:
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(path).eval()


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def teacher(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model = _load_model(args.model).to(args.device)
    gate = DiffMaskGate.load(args.filler_gate, map_location=args.device)
    images = load_split(args.data, args.first, args.count).to(args.device)
    started = time.perf_counter()
    locations, scores = optimise_locations(
        model, gate, images, args.steps, args.multiplier, args.eps, args.lr, args.init,
        args.batch_size, args.seed, not args.no_progress,
    )  # fmt: skip
    shard = {
        "first": args.first,
        "locations": locations.cpu(),
        "scores": scores,
        "settings": {name: str(getattr(args, name)) for name in TEACHER_SETTINGS},
        "seconds": time.perf_counter() - started,
        "device": _device_name(args.device),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(shard, out)
    means = {k: sum(v) / len(v) for k, v in scores.items()}
    print(json.dumps({"out": str(out), "images": len(locations), **means,
                      "seconds": shard["seconds"]}))  # fmt: skip


def fit(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    if has_trainer_state(args.out):
        raise SystemExit(f"--out {args.out!r} already holds a trained gate; use a new folder")
    shards = [torch.load(path, weights_only=True) for path in args.teachers]
    if any(shard.get("augment") is not None for shard in shards):
        raise SystemExit("--teachers holds shards of augmented images, which `fit` does not take")
    check_settings(shards)
    recorded = shards[0]["settings"]["filler_gate"]
    filler_gate = args.filler_gate or recorded
    if Path(filler_gate).name != Path(recorded).name:
        raise SystemExit(
            f"--filler-gate {filler_gate!r} is not the teachers' filler gate {recorded!r}"
        )
    filler = DiffMaskGate.load(filler_gate)
    firsts, counts, targets = combine_shards(shards, filler)
    targets = targets.to(args.device)
    model = _load_model(args.model).to(args.device)
    images = torch.cat(
        [load_split(args.data, first, count) for first, count in zip(firsts, counts, strict=True)]
    )
    states = patch_states(model, images)
    grid = get_adapter(model).grid(images.shape[-2:])
    views: list[tuple[Tensor, Tensor]] = []
    if args.mirror:
        views.append((patch_states(model, images.flip(-1)), mirror_targets(targets, grid)))
    # A fresh gate with the authors' initialisation, as the trainer builds it, and the
    # teacher's filler.
    last = firsts[-1] + counts[-1] - 1
    trainer = _new_trainer(
        args, model, filler.config, f"teacher images (indices {firsts[0]}..{last})",
        "probes fitted to per-image optimised masks (distill_diffmask)",
    )  # fmt: skip
    with torch.no_grad():
        trainer.gate.placeholder.copy_(filler.placeholder)
    trainer.gate.to(args.device)
    started = time.perf_counter()
    fit_history = fit_probes(
        trainer.gate, states, targets, args.epochs, args.lr, args.batch_size, args.holdout,
        args.seed, not args.no_progress, views,
    )  # fmt: skip
    fit_seconds = time.perf_counter() - started
    shift = None
    if args.keep_fraction is not None:
        shift = calibrate_keep_fraction(trainer.gate, states, args.keep_fraction)
    summary = {
        "command": "python -m benchmarks.distill_diffmask " + " ".join(sys.argv[1:]),
        "teacher_settings": shards[0]["settings"],
        "teacher_images": len(targets),
        "teacher_seeds": sorted({s["settings"]["seed"] for s in shards}),
        "teacher_scores": {  # means over every shard's images (each seed's own masks)
            key: sum(sum(s["scores"][key]) for s in shards)
            / sum(len(s["locations"]) for s in shards)
            for key in ("kept", "kl", "top1")
        },
        "teacher_seconds": sum(s["seconds"] for s in shards),
        "fit": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                "holdout": args.holdout, "mirror": args.mirror, "seconds": fit_seconds,
                "history": fit_history},
        "calibration": {"keep_fraction": args.keep_fraction, "offset_shift": shift},
    }  # fmt: skip
    return _validate_and_save(args, trainer, summary)


def _new_trainer(
    args: argparse.Namespace,
    model: torch.nn.Module,
    config: GateConfig,
    train_files: str,
    warm_start: str,
) -> VisionDiffMaskTrainer:
    """A trainer for ``--out`` at step 0 (seed ``--seed``), its metadata naming the model, the
    training and validation files and where the gate came from."""
    val_last = args.val_first + args.val - 1
    metadata = {"model": Path(args.model).name, "train_files": train_files,
                "val_files": f"next {args.val} files (indices {args.val_first}..{val_last})",
                "warm_start": warm_start}  # fmt: skip
    return VisionDiffMaskTrainer(
        model, args.out, seed=args.seed, gate_config=config, metadata=metadata
    )


def _validate_and_save(
    args: argparse.Namespace, trainer: VisionDiffMaskTrainer, summary: dict[str, Any]
) -> dict[str, Any]:
    """Score ``trainer``'s gate on the validation files (the trainer's ``evaluate``), add that
    row to its history, write the checkpoint to ``--out`` with ``history.json`` and
    ``run.json`` (``summary`` plus the command, the validation row and the machine)."""
    val = load_split(args.data, args.val_first, args.val).to(args.device)
    started = time.perf_counter()
    scores = trainer.evaluate(DataLoader(TensorDataset(val), batch_size=8))
    row = {"epoch": 0, "step": 0, **{f"val_{k}": v for k, v in scores.items()}}
    row["val_seconds"] = time.perf_counter() - started
    trainer.history.append(row)
    trainer.save(args.out)
    out = Path(args.out)
    (out / "history.json").write_text(json.dumps(trainer.history, indent=2))
    summary = {
        "command": "python -m benchmarks.distill_diffmask " + " ".join(sys.argv[1:]),
        **summary,
        "validation": row,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "device": _device_name(args.device)},
    }  # fmt: skip
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(row, indent=2))
    return summary


def refine(args: argparse.Namespace) -> dict[str, Any]:
    """A fitted gate's last steps: calibrate its kept fraction, sharpen its probes on their own
    hard masks, fit its placeholder."""
    torch.set_num_threads(args.threads)
    if has_trainer_state(args.out):
        raise SystemExit(f"--out {args.out!r} already holds a trained gate; use a new folder")
    model = _load_model(args.model).to(args.device)
    source = DiffMaskGate.load(args.gate)
    train_files = f"indices {args.first}..{args.first + args.count - 1}"
    trainer = _new_trainer(
        args, model, source.config, train_files,
        f"{Path(args.gate).name}, its placeholder fitted (distill_diffmask refine)",
    )  # fmt: skip
    gate = trainer.gate
    gate.load_state_dict(source.state_dict())
    gate.to(args.device)
    images = load_split(args.data, args.first, args.count).to(args.device)
    val = load_split(args.data, args.val_first, args.val).to(args.device)
    shifts, sharpen = [], None
    if args.keep_fraction is not None or args.sharpen_epochs:
        states = patch_states(model, images)
        if args.keep_fraction is not None:
            shifts.append(calibrate_keep_fraction(gate, states, args.keep_fraction))
        if args.sharpen_epochs:
            # The probes fitted to their own hard masks (and the mirrored ones): locations move
            # away from the threshold, so that sampled masks follow the hard mask.
            with torch.no_grad():
                targets = (gate.keep_probability(list(states)) >= 0.5).float()
            grid = get_adapter(model).grid(images.shape[-2:])
            mirrored = (patch_states(model, images.flip(-1)), mirror_targets(targets, grid))
            started = time.perf_counter()
            history = fit_probes(
                gate, states, targets, args.sharpen_epochs, args.sharpen_lr,
                holdout=args.holdout, seed=args.seed, show_progress=not args.no_progress,
                views=[mirrored],
            )  # fmt: skip
            sharpen = {"epochs": args.sharpen_epochs, "lr": args.sharpen_lr, "mirror": True,
                       "seconds": time.perf_counter() - started, "history": history}  # fmt: skip
            del mirrored
            if args.keep_fraction is not None:
                shifts.append(calibrate_keep_fraction(gate, states, args.keep_fraction))
        del states
    started = time.perf_counter()
    history = fit_placeholder(
        model, gate, images, args.epochs, args.lr, args.batch_size, args.holdout, args.seed,
        not args.no_mirror, not args.no_progress, monitor=val,
    )  # fmt: skip
    summary = {
        "source_gate": str(args.gate),
        "source_run": _source_run(args.gate),
        "calibration": {"keep_fraction": args.keep_fraction, "offset_shifts": shifts,
                        "images": train_files},
        "sharpen": sharpen,
        "placeholder": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                        "holdout": args.holdout, "mirror": not args.no_mirror,
                        "seconds": time.perf_counter() - started, "history": history},
    }  # fmt: skip
    return _validate_and_save(args, trainer, summary)


def _source_run(folder: str) -> dict[str, Any] | None:
    """The ``run.json`` of the gate a refinement starts from (how it was made), if any."""
    path = Path(folder) / "run.json"
    return json.loads(path.read_text()) if path.exists() else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face ViT folder")
    common.add_argument("--data", default=str(DEFAULT_DATA), help="the shared ImageNet sample")
    common.add_argument("--out", required=True, help="teacher: shard file; fit: gate folder")
    common.add_argument("--batch-size", type=int, default=8)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    common.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    common.add_argument("--no-progress", action="store_true", help="hide progress bars")
    one = commands.add_parser("teacher", parents=[common], help="per-image optimisation")
    one.add_argument("--first", type=int, default=0, help="first training file index")
    one.add_argument("--count", type=int, default=200, help="images in this shard")
    one.add_argument("--filler-gate", default=str(DEFAULT_GATE), help="gate whose filler is used")
    one.add_argument("--steps", type=int, default=60)
    one.add_argument("--multiplier", type=float, default=2.0, help="fixed KL multiplier")
    one.add_argument("--eps", type=float, default=0.1, help="KL bound in nats")
    one.add_argument("--lr", type=float, default=0.25, help="Adam lr on the locations")
    one.add_argument("--init", type=float, default=1.5, help="initial gate location")
    two = commands.add_parser("fit", parents=[common], help="fit a gate to teacher shards")
    two.add_argument("--teachers", nargs="+", required=True, help="teacher shard files")
    two.add_argument(
        "--filler-gate",
        default=None,
        help="the teachers' filler gate where it lies elsewhere on this machine (same folder "
        "name; default: the path the teachers recorded)",
    )
    two.add_argument("--epochs", type=int, default=30)
    two.add_argument("--lr", type=float, default=1e-3, help="probes' Adam lr")
    two.add_argument("--holdout", type=float, default=0.1, help="teacher images held out")
    two.add_argument(
        "--mirror",
        action="store_true",
        help="also train on the training images mirrored left to right, with the teacher's "
        "masks mirrored (twice the pairs, no new teacher runs)",
    )
    two.add_argument(
        "--keep-fraction",
        type=float,
        default=None,
        help="shift every gate's offset so that map >= 0.5 keeps this fraction of the "
        "teacher images' patches (default: no calibration)",
    )
    three = commands.add_parser(
        "refine", parents=[common], help="calibrate and sharpen a gate, fit its placeholder"
    )
    three.add_argument("--gate", default=str(DEFAULT_GATE), help="the gate to start from")
    three.add_argument("--first", type=int, default=0, help="first training file index")
    three.add_argument("--count", type=int, default=400, help="training images (last --holdout: "
                       "monitored, not trained on)")  # fmt: skip
    three.add_argument("--keep-fraction", type=float, default=None,
                       help="first calibrate map >= 0.5 to keep this fraction of the training "
                       "images' patches (default: no calibration)")  # fmt: skip
    three.add_argument("--sharpen-epochs", type=int, default=0,
                       help="then fit the probes to their own hard masks for up to this many "
                       "epochs (best held-out epoch kept) and calibrate again")  # fmt: skip
    three.add_argument("--sharpen-lr", type=float, default=1e-3, help="probes' Adam lr there")
    three.add_argument("--epochs", type=int, default=5, help="placeholder epochs")
    three.add_argument("--lr", type=float, default=0.05, help="placeholder's Adam lr")
    three.add_argument("--holdout", type=float, default=0.1, help="training images held out")
    three.add_argument("--no-mirror", action="store_true", help="no mirrored training images")
    for command in (two, three):
        command.add_argument("--val-first", type=int, default=400, help="first validation file")
        command.add_argument("--val", type=int, default=100, help="validation images")
    three.set_defaults(batch_size=16)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    {"teacher": teacher, "fit": fit, "refine": refine}[args.command](args)


if __name__ == "__main__":
    main()
