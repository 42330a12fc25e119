"""The insertion/deletion curve engine (Petsiuk et al., "RISE", BMVC 2018) and its AUC.

Deletion starts from the image and replaces the most important pixels (or patches) with a
baseline, step by step; insertion starts from the baseline and puts the most important pixels
back. At every step the model's probability of the target class is recorded. A good map makes
the deletion curve fall fast (low AUC) and the insertion curve rise fast (high AUC).

How units of equal score are ordered is a choice (``ties``), and it matters for maps that are
piecewise constant (patch grids upsampled nearest, such as GradMask's): see :func:`rank_units`.
The published protocols are in :mod:`captum_gradmask.metrics.insertion_deletion`.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from captum_gradmask._ops import gaussian_blur, pixel_masks
from captum_gradmask._utils import (
    TargetType,
    check_keywords,
    check_positive_int,
    chunks,
    forward_logits,
    preserved_model_state,
    renamed_keyword,
    select_args,
    unpack_inputs,
)
from captum_gradmask.metrics._common import (
    ChannelReduction,
    ProbabilityFn,
    attribution_map,
    check_batch_size,
    check_choice,
    class_probabilities,
    progress,
    resolve_patch_size,
    target_probabilities,
)

__all__ = [
    "AUCRule",
    "BaselineType",
    "FractionRounding",
    "PerturbationCurve",
    "TiePolicy",
    "deletion",
    "insertion",
    "perturbation_curve",
    "rank_units",
    "step_counts",
]

BaselineType = Literal["zeros", "blur", "mean"] | float | Tensor
AUCRule = Literal["trapezoid", "rise", "trapezoid_percent"]
TiePolicy = Literal["stable", "reference", "random"]
FractionRounding = Literal["half_up", "down"]
_AUC_RULES = ("trapezoid", "rise", "trapezoid_percent")
_LEVELS = ("pixel", "patch")
_TIE_POLICIES = ("stable", "reference", "random")
_ROUNDINGS = ("half_up", "down")


@dataclass(frozen=True)
class PerturbationCurve:
    """An insertion or deletion curve for a batch of images.

    Attributes:
        mode: ``"insertion"`` or ``"deletion"``.
        fractions: ``(n_points,)`` share of pixels/patches inserted or deleted at each point
            (x axis, in [0, 1]).
        probabilities: ``(B, n_points)`` target-class probability at each point (with
            ``ties="random"``, the mean over the sampled tie orders).
        auc: ``(B,)`` area under each curve (see ``auc_rule``).
        targets: ``(B,)`` class whose probability was tracked.
        auc_rule: how ``auc`` was integrated.
        protocol: name of the preset used, or ``"custom"``.
        ties: the tie policy that ordered units of equal score.
        tie_auc: ``(B, tie_samples)`` AUC under each sampled tie order (``ties="random"``
            only, else ``None``); ``auc`` is their mean.
        stable_auc, reference_auc: ``(B,)`` AUC under the ``"stable"`` and ``"reference"``
            orders, computed in the same pass (``with_fixed_orders=True`` only, else
            ``None``).
    """

    mode: str
    fractions: Tensor
    probabilities: Tensor
    auc: Tensor
    targets: Tensor
    auc_rule: str
    protocol: str = "custom"
    ties: str = "stable"
    tie_auc: Tensor | None = None
    stable_auc: Tensor | None = None
    reference_auc: Tensor | None = None

    @property
    def mean_auc(self) -> float:
        """AUC averaged over the batch."""
        return float(self.auc.mean())

    @property
    def tie_spread(self) -> Tensor:
        """``(B,)`` largest minus smallest AUC over the sampled tie orders (0 without them)."""
        if self.tie_auc is None:
            return torch.zeros_like(self.auc)
        return self.tie_auc.max(dim=1).values - self.tie_auc.min(dim=1).values

    def summary(self) -> dict[str, float]:
        """Batch means: ``auc`` and ``tie_spread`` (0 unless ``ties="random"``)."""
        return {"auc": self.mean_auc, "tie_spread": float(self.tie_spread.mean())}


def _make_baseline(baseline: Any, inputs: Tensor, kernel_size: int, sigma: float) -> Tensor:
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros_like(inputs)
        if baseline == "blur":
            return gaussian_blur(inputs, kernel_size, sigma)
        if baseline == "mean":
            return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
        raise ValueError(
            f"`baseline` must be 'zeros', 'blur', 'mean', a number or a tensor that broadcasts "
            f"to the inputs; got {baseline!r}"
        )
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.to(inputs), inputs.shape)
        except RuntimeError:
            raise ValueError(
                f"`baseline` tensor of shape {tuple(baseline.shape)} does not broadcast to the "
                f"inputs of shape {tuple(inputs.shape)}"
            ) from None
    raise TypeError(
        f"`baseline` must be 'zeros', 'blur', 'mean', a number or a tensor; "
        f"got {type(baseline).__name__}"
    )


def step_counts(
    n_units: int | tuple[int, int],
    n_steps: int | None = None,
    step_size: int | None = None,
    fractions: Sequence[float] | None = None,
    *,
    rounding: FractionRounding = "half_up",
) -> Tensor:
    """How many units (pixels or patches) are inserted/deleted at each point of a curve.

    Exactly one of the schedules may be given; with none, ``n_steps = min(100, n_units)``.

    - ``n_steps = n``: ``n + 1`` points, ``k_i = floor(i * n_units / n)`` for ``i = 0..n``;
    - ``step_size = s`` (RISE): ``k_i = min(i * s, n_units)`` for ``i = 0..ceil(n_units / s)``;
    - ``fractions = f``: ``f`` ascending in [0, 1], no point added (include 0 if the curve
      should start untouched); ``k_j = floor(f_j * n_units + 0.5)`` (``rounding="half_up"``)
      or ``int(f_j * n_units)`` (``rounding="down"``, the GradMask notebook's count).

    Args:
        n_units: the number of units, or the ``(rows, cols)`` of the unit grid; with a grid,
            ``f * rows * cols`` is evaluated left to right in floating point, as the GradMask
            notebook writes it (``int(f * H * W)``), which can differ from ``f * (rows * cols)``
            in the last bit.
        n_steps, step_size, fractions: the schedule (at most one).
        rounding: ``"half_up"`` or ``"down"``, for ``fractions`` only.

    Returns:
        ``(n_points,)`` long tensor of unit counts.

    Examples::

        >>> from captum_gradmask.metrics import step_counts
        >>> step_counts(10, step_size=4).tolist()
        [0, 4, 8, 10]
        >>> step_counts((224, 224), fractions=[0.01, 0.01], rounding="down").tolist()
        [501, 501]
    """
    check_choice(rounding, "rounding", _ROUNDINGS)
    grid = (n_units,) if isinstance(n_units, int) else tuple(n_units)
    for side in grid:
        check_positive_int(side, "n_units")
    total = math.prod(grid)
    given = [s for s in (n_steps, step_size, fractions) if s is not None]
    if len(given) > 1:
        raise ValueError(
            "give at most one of `n_steps`, `step_size` and `fractions`; got "
            f"n_steps={n_steps!r}, step_size={step_size!r}, fractions={fractions!r}"
        )
    if fractions is not None:
        values = [float(f) for f in fractions]
        if not values or any(not 0.0 <= f <= 1.0 for f in values):
            raise ValueError(
                f"`fractions` must be a non-empty list of values in [0, 1], got {fractions!r}"
            )
        if any(b < a for a, b in itertools.pairwise(values)):
            raise ValueError(f"`fractions` must be in ascending order, got {fractions!r}")
        scaled = [math.prod(grid, start=f) for f in values]  # f * rows * cols, left to right
        if rounding == "down":
            return torch.tensor([int(v) for v in scaled], dtype=torch.long)
        return torch.tensor([math.floor(v + 0.5) for v in scaled], dtype=torch.long)
    if step_size is not None:
        step_size = check_positive_int(step_size, "step_size")
        n_points = -(-total // step_size) + 1
        return (torch.arange(n_points) * step_size).clamp(max=total)
    n_steps = min(100, total) if n_steps is None else check_positive_int(n_steps, "n_steps")
    if n_steps > total:
        raise ValueError(f"`n_steps` = {n_steps} is more than the {total} units to perturb")
    return torch.arange(n_steps + 1) * total // n_steps


def rank_units(
    scores: Tensor,
    ties: TiePolicy = "stable",
    *,
    tie_samples: int = 1,
    seed: int = 0,
) -> Tensor:
    """Orders of the units of each row of ``scores``, highest score first, under a tie policy.

    - ``"stable"``: equal scores keep their index order (row-major for pixels): a stable
      descending sort, the same on every device.
    - ``"reference"``: the reference codes' order: ``numpy.argsort`` (default kind) of a CPU
      float32 copy of the scores, in ascending order, read from the end. RISE flips its
      ascending argsort and the GradMask notebook takes the last ``k`` of it, which select
      the same units at every ``k``. It is numpy's own call, not an emulation: numpy may pick
      another sorting routine on another CPU (SIMD sorts), exactly as the references would.
    - ``"random"``: ``tie_samples`` orders, each breaking ties uniformly at random (from a
      CPU generator seeded with ``seed``, so the orders are the same on every device); units
      of different scores stay in descending order.

    Args:
        scores: ``(B, U)`` unit scores.
        ties: ``"stable"``, ``"reference"`` or ``"random"``.
        tie_samples: how many random orders (``ties="random"`` only).
        seed: seed of the random orders.

    Returns:
        ``(S, B, U)`` long tensor of unit indices, on ``scores``' device; ``S = tie_samples``
        for ``"random"``, else 1.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import rank_units
        >>> scores = torch.tensor([[1.0, 3.0, 3.0, 2.0]])
        >>> rank_units(scores).tolist()
        [[[1, 2, 3, 0]]]
        >>> orders = rank_units(scores, "random", tie_samples=8, seed=0)
        >>> orders.shape, sorted({tuple(o[:2]) for o in orders[:, 0].tolist()})
        (torch.Size([8, 1, 4]), [(1, 2), (2, 1)])
    """
    check_choice(ties, "ties", _TIE_POLICIES)
    tie_samples = check_positive_int(tie_samples, "tie_samples")
    if tie_samples > 1 and ties != "random":
        raise ValueError(
            f"`tie_samples` = {tie_samples} needs ties='random' (the other policies give one "
            f"order), got ties={ties!r}"
        )
    if ties == "stable":
        return torch.argsort(scores, dim=1, descending=True, stable=True)[None]
    if ties == "reference":
        ascending = np.argsort(scores.detach().to("cpu", torch.float32).numpy(), axis=1)
        return torch.from_numpy(np.ascontiguousarray(ascending[:, ::-1])).to(scores.device)[None]
    generator = torch.Generator().manual_seed(seed)
    cpu_scores = scores.detach().cpu()
    orders = []
    for _ in range(tie_samples):
        shuffle = torch.rand(cpu_scores.shape, generator=generator).argsort(dim=1)
        shuffled_order = torch.argsort(
            cpu_scores.gather(1, shuffle), dim=1, descending=True, stable=True
        )
        orders.append(shuffle.gather(1, shuffled_order))
    return torch.stack(orders).to(scores.device)


def _auc(x: Tensor, p: Tensor, rule: str) -> Tensor:
    if p.shape[-1] < 2:
        raise ValueError("an AUC needs a curve of at least 2 points; use more steps or fractions")
    if rule == "rise":
        n = p.shape[-1]
        return (p.sum(-1) - p[..., 0] / 2 - p[..., -1] / 2) / (n - 1)
    scale = 100.0 if rule == "trapezoid_percent" else 1.0
    return torch.trapezoid(p, x.to(p) * scale, dim=-1)


def _unit_scores(
    saliency: Tensor, level: str, forward_func: Any, patch_size: int | tuple[int, int] | None
) -> tuple[Tensor, int, int]:
    """Scores of the ranked units ``(B, gh * gw)`` and the unit size ``(ph, pw)``."""
    if level == "pixel":
        return saliency.flatten(1), 1, 1
    ph, pw = resolve_patch_size(forward_func, patch_size)
    height, width = saliency.shape[-2:]
    if height % ph or width % pw:
        raise ValueError(
            f"`patch_size` {(ph, pw)} must divide the input size {(height, width)} for "
            "patch-level ranking"
        )
    pooled = F.avg_pool2d(saliency[:, None], kernel_size=(ph, pw))
    return pooled.flatten(1), ph, pw


def _orders_needed(scores: Tensor, order: Tensor, counts: Tensor, tie_samples: int) -> Tensor:
    """``(B, n_points)`` how many tie orders each point needs: ``tie_samples`` where the
    ``k``-th and ``(k+1)``-th units tie (the order decides which of them is taken), else 1."""
    n_units = scores.shape[1]
    if tie_samples == 1:
        return torch.ones(scores.shape[0], counts.numel(), dtype=torch.long, device=scores.device)
    ranked = scores.gather(1, order)
    inner = (counts > 0) & (counts < n_units)
    before = ranked[:, (counts - 1).clamp(min=0)]
    after = ranked[:, counts.clamp(max=n_units - 1)]
    split = inner & (before == after)
    return torch.where(split, tie_samples, 1)


def perturbation_curve(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    *,
    mode: Literal["insertion", "deletion"],
    level: Literal["pixel", "patch"] = "pixel",
    patch_size: int | tuple[int, int] | None = None,
    n_steps: int | None = None,
    step_size: int | None = None,
    fractions: Sequence[float] | None = None,
    fraction_rounding: FractionRounding = "half_up",
    ties: TiePolicy = "stable",
    tie_samples: int = 1,
    seed: int = 0,
    with_fixed_orders: bool = False,
    baseline: BaselineType = "zeros",
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    probability_fn: ProbabilityFn | None = None,
    auc_rule: AUCRule = "trapezoid",
    prepend_zero_point: bool = False,
    perturbations_per_eval: int = 64,
    additional_forward_args: Any = None,
    channel_reduction: ChannelReduction = "sum",
    show_progress: bool = False,
    protocol: str = "custom",
    batch_size: int | None = None,
) -> PerturbationCurve:
    r"""Insertion or deletion curve of each image and its AUC.

    Units (pixels, or ``patch_size`` patches scored by the mean of the map inside them) are
    ranked by the map in descending order, units of equal score by the ``ties`` policy (see
    :func:`rank_units`). At a point inserting or deleting ``k`` units, the first ``k`` units
    of that order are taken from the image (insertion, the rest from the baseline) or from the
    baseline (deletion, the rest from the image). All perturbed images of all curves are
    evaluated ``perturbations_per_eval`` at a time.

    With ``ties="random"`` the curve is the mean over ``tie_samples`` random tie orders: the
    expected score under an arbitrary order, the fair number for piecewise-constant maps.
    Only points whose ``k``-th and ``(k+1)``-th units tie depend on the order, so only those
    are evaluated once per order; a map without ties costs no more than with ``"stable"``.
    ``with_fixed_orders=True`` adds the ``"stable"`` and ``"reference"`` orders to the same
    pass (their AUCs in ``stable_auc`` and ``reference_auc``), which shares every other point:
    the three policies of a map without ties cost one curve.

    Args:
        forward_func: a model or function returning logits (a tensor or a Hugging Face output).
        inputs: ``(B, C, H, W)`` images in the model's input space (or a one-tuple of them).
        attributions: a map per image: any shape that broadcasts to ``inputs``, a ``(B, H, W)``
            map, or a ``(B, h, w)`` patch grid (upsampled nearest); channels are reduced with
            ``channel_reduction``.
        target: class per image (int, list or tensor), or ``None`` for each image's predicted
            class on the unperturbed input.
        mode: ``"insertion"`` or ``"deletion"``.
        level: ``"pixel"`` or ``"patch"`` ranking.
        patch_size: patch side (or ``(ph, pw)``) for ``level="patch"``; must divide H and W.
            Default: the patch size of ``forward_func``'s adapter (a Hugging Face or timm
            ViT); a function the library does not recognise needs it.
        n_steps, step_size, fractions: the schedule, see :func:`step_counts` (at most one).
            With ``fractions`` the x axis is the requested fractions, else ``k / n_units``.
        fraction_rounding: unit count of a fraction: ``"half_up"`` or ``"down"``
            (:func:`step_counts`).
        ties: ``"stable"``, ``"reference"`` or ``"random"``, see :func:`rank_units`.
        tie_samples: random tie orders averaged with ``ties="random"``.
        seed: seed of the random tie orders.
        with_fixed_orders: also score the ``"stable"`` and ``"reference"`` orders, in the same
            pass (``ties="random"`` only).
        baseline: what replaces (deletion) or precedes (insertion) the image: ``"zeros"``,
            ``"blur"`` (:func:`gaussian_blur` with ``blur_kernel_size``/``blur_sigma``),
            ``"mean"`` (per image and channel), a number, or a tensor broadcasting to inputs.
        blur_kernel_size, blur_sigma: parameters of the ``"blur"`` baseline.
        probability_fn: maps ``(N, classes)`` logits to per-class scores; default softmax.
        auc_rule: ``"trapezoid"`` (trapezoid over the fraction axis in [0, 1]), ``"rise"``
            (RISE's ``(sum(p) - p[0]/2 - p[-1]/2) / (n - 1)``, i.e. equally spaced points) or
            ``"trapezoid_percent"`` (trapezoid over the x axis in percent, 0..100).
        prepend_zero_point: add the point (x=0, p=0) before the curve (the GradMask notebook's
            deletion curve does this).
        perturbations_per_eval: perturbed images per forward call.
        additional_forward_args: extra arguments to ``forward_func``; tensors whose first
            dimension is the batch are indexed per image.
        channel_reduction: ``"sum"`` or ``"abs_sum"`` over channels of the attributions.
        show_progress: show a tqdm bar over the forward batches.
        protocol: name stored in the result.
        batch_size: deprecated name of ``perturbations_per_eval``.

    Returns:
        A :class:`PerturbationCurve` with ``probabilities`` of shape ``(B, n_points)``.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import perturbation_curve
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
        >>> images = torch.rand(2, 3, 32, 32)
        >>> saliency = torch.rand(2, 2, 2)  # a 2x2 patch grid per image
        >>> curve = perturbation_curve(model, images, saliency, target=[0, 3],
        ...     mode="deletion", level="patch", patch_size=16, n_steps=4)
        >>> curve.probabilities.shape, curve.auc.shape
        (torch.Size([2, 5]), torch.Size([2]))
        >>> tied = perturbation_curve(model, images, saliency.round(), target=[0, 3],
        ...     mode="deletion", ties="random", tie_samples=5)
        >>> tied.tie_auc.shape
        torch.Size([2, 5])
    """
    check_choice(mode, "mode", ("insertion", "deletion"))
    check_choice(level, "level", _LEVELS)
    check_choice(auc_rule, "auc_rule", _AUC_RULES)
    per_eval = renamed_keyword(
        perturbations_per_eval, 64, batch_size, "perturbations_per_eval", "batch_size"
    )
    per_eval = check_batch_size(per_eval, "perturbations_per_eval")
    images, _ = unpack_inputs(inputs)
    batch, _, height, width = images.shape
    device = images.device

    saliency = attribution_map(attributions, images, channel_reduction)
    scores, ph, pw = _unit_scores(saliency, level, forward_func, patch_size)
    n_units = scores.shape[1]
    grid_h, grid_w = height // ph, width // pw
    orders = rank_units(scores, ties, tie_samples=tie_samples, seed=seed)
    if with_fixed_orders:
        if ties != "random":
            raise ValueError(
                f"`with_fixed_orders` = True needs ties='random' (it adds the stable and "
                f"reference orders to the random ones), got ties={ties!r}"
            )
        fixed = [rank_units(scores, policy) for policy in ("stable", "reference")]
        orders = torch.cat([*fixed, orders])
    n_orders = orders.shape[0]
    ranks = torch.empty(orders.shape, dtype=torch.int32, device=device)
    positions = torch.arange(n_units, dtype=torch.int32, device=device)
    ranks.scatter_(2, orders, positions.expand_as(ranks))

    counts = step_counts(
        (grid_h, grid_w), n_steps, step_size, fractions, rounding=fraction_rounding
    ).to(device)
    n_points = counts.numel()
    base = _make_baseline(baseline, images, blur_kernel_size, blur_sigma)
    targets, _ = target_probabilities(
        forward_func, images, target, additional_forward_args, per_eval, probability_fn
    )

    # One job per (image, point, tie order) that can differ; points the order cannot change
    # are evaluated once and shared by all orders.
    needed = _orders_needed(scores, orders[0], counts, n_orders).flatten()
    first_job = needed.cumsum(0) - needed
    job_pair = torch.arange(batch * n_points, device=device).repeat_interleave(needed)
    job_order = torch.arange(job_pair.numel(), device=device) - first_job[job_pair]
    values = torch.empty(job_pair.numel(), device=device)
    slices = list(chunks(job_pair.numel(), per_eval))
    model = forward_func if isinstance(forward_func, torch.nn.Module) else None
    with torch.no_grad(), preserved_model_state(model):
        for sl in progress(slices, show_progress, f"{mode} curves", len(slices)):
            image_idx, point_idx = job_pair[sl] // n_points, job_pair[sl] % n_points
            chosen = ranks[job_order[sl], image_idx] < counts[point_idx][:, None]
            chosen = pixel_masks(chosen.view(-1, grid_h, grid_w), (ph, pw))
            if mode == "insertion":
                perturbed = torch.where(chosen, images[image_idx], base[image_idx])
            else:
                perturbed = torch.where(chosen, base[image_idx], images[image_idx])
            extra = select_args(additional_forward_args, image_idx, batch)
            logits = forward_logits(forward_func, perturbed, extra or None)
            probs = class_probabilities(logits, probability_fn)
            values[sl] = probs.gather(1, targets[image_idx][:, None])[:, 0].float()

    order_index = torch.arange(n_orders, device=device)[:, None]
    job_index = first_job + torch.where(needed > 1, order_index, 0)
    per_order = values[job_index].view(n_orders, batch, n_points)
    if fractions is not None:
        x = torch.tensor([float(f) for f in fractions], dtype=torch.float64, device=device)
    else:
        x = counts.double() / n_units
    if prepend_zero_point:
        x = torch.cat([x.new_zeros(1), x])
        per_order = torch.cat([per_order.new_zeros(n_orders, batch, 1), per_order], dim=2)
    fixed_auc: list[Tensor | None] = [None, None]
    if with_fixed_orders:
        fixed_auc = list(_auc(x, per_order[:2].double(), auc_rule).float())
        per_order = per_order[2:]
    probabilities = per_order.mean(0)
    auc = _auc(x, probabilities.double(), auc_rule).float()
    tie_auc = _auc(x, per_order.double(), auc_rule).float().T if ties == "random" else None
    return PerturbationCurve(
        mode=mode,
        fractions=x.float(),
        probabilities=probabilities,
        auc=auc,
        targets=targets,
        auc_rule=auc_rule,
        protocol=protocol,
        ties=ties,
        tie_auc=tie_auc,
        stable_auc=fixed_auc[0],
        reference_auc=fixed_auc[1],
    )


#: The keywords :func:`insertion` and :func:`deletion` pass on (all but ``mode``, theirs).
_CURVE_KEYWORDS = tuple(
    name
    for name, parameter in inspect.signature(perturbation_curve).parameters.items()
    if parameter.kind is parameter.KEYWORD_ONLY and name != "mode"
)


def insertion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    *,
    baseline: BaselineType = "blur",
    **kwargs: Any,
) -> PerturbationCurve:
    """Insertion curve: start from ``baseline`` and put back the most important units first.

    Higher AUC is better. Takes every keyword of :func:`perturbation_curve` except ``mode``;
    the default baseline is the RISE blur (kernel 11, sigma 5). A misspelled keyword names this
    function and the valid ones.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import insertion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
        >>> images, saliency = torch.rand(2, 3, 32, 32), torch.rand(2, 32, 32)
        >>> curve = insertion(model, images, saliency, target=1, n_steps=8,
        ...     perturbations_per_eval=9)
        >>> curve.probabilities.shape
        torch.Size([2, 9])
    """
    check_keywords("insertion", _CURVE_KEYWORDS, kwargs)
    return perturbation_curve(
        forward_func, inputs, attributions, target, mode="insertion", baseline=baseline, **kwargs
    )


def deletion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    *,
    baseline: BaselineType = "zeros",
    **kwargs: Any,
) -> PerturbationCurve:
    """Deletion curve: replace the most important units by ``baseline`` first.

    Lower AUC is better. Takes every keyword of :func:`perturbation_curve` except ``mode``;
    the default baseline is zeros. A misspelled keyword names this function and the valid ones.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import deletion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
        >>> images, saliency = torch.rand(2, 3, 32, 32), torch.rand(2, 2, 2)
        >>> curve = deletion(model, images, saliency, level="patch", patch_size=16, n_steps=4)
        >>> curve.fractions.tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    check_keywords("deletion", _CURVE_KEYWORDS, kwargs)
    return perturbation_curve(
        forward_func, inputs, attributions, target, mode="deletion", baseline=baseline, **kwargs
    )
