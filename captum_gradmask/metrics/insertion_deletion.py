"""Insertion and deletion curves (Petsiuk et al., "RISE", BMVC 2018) and their AUC.

Deletion starts from the image and replaces the most important pixels (or patches) with a
baseline, step by step; insertion starts from the baseline and puts the most important pixels
back. At every step the model's probability of the target class is recorded. A good map makes
the deletion curve fall fast (low AUC) and the insertion curve rise fast (high AUC).

Two published protocols have presets: :func:`rise_insertion` / :func:`rise_deletion` and
:func:`gradmask_notebook_insertion` / :func:`gradmask_notebook_deletion`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_gradmask._ops import gaussian_blur
from captum_gradmask._utils import (
    TargetType,
    check_positive_int,
    chunks,
    forward_logits,
    preserved_model_state,
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
    select_args,
    target_probabilities,
)

BaselineType = Literal["zeros", "blur", "mean"] | float | Tensor
AUCRule = Literal["trapezoid", "rise", "trapezoid_percent"]
_AUC_RULES = ("trapezoid", "rise", "trapezoid_percent")
_LEVELS = ("pixel", "patch")

#: Fractions of the GradMask authors' notebook: 1 %, 5 %, 10 %, 20 %, ..., 100 %.
GRADMASK_NOTEBOOK_FRACTIONS: tuple[float, ...] = (0.01, 0.05, *(k / 10 for k in range(1, 11)))


@dataclass(frozen=True)
class PerturbationCurve:
    """An insertion or deletion curve for a batch of images.

    Attributes:
        mode: ``"insertion"`` or ``"deletion"``.
        fractions: ``(n_points,)`` share of pixels/patches inserted or deleted at each point
            (x axis, in [0, 1]).
        probabilities: ``(B, n_points)`` target-class probability at each point.
        auc: ``(B,)`` area under each curve (see ``auc_rule``).
        targets: ``(B,)`` class whose probability was tracked.
        auc_rule: how ``auc`` was integrated.
        protocol: name of the preset used, or ``"custom"``.
    """

    mode: str
    fractions: Tensor
    probabilities: Tensor
    auc: Tensor
    targets: Tensor
    auc_rule: str
    protocol: str = "custom"

    @property
    def mean_auc(self) -> float:
        """AUC averaged over the batch."""
        return float(self.auc.mean())


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
    n_units: int,
    n_steps: int | None = None,
    step_size: int | None = None,
    fractions: Sequence[float] | None = None,
) -> Tensor:
    """How many units (pixels or patches) are inserted/deleted at each point of a curve.

    Exactly one of the schedules may be given; with none, ``n_steps = min(100, n_units)``.

    - ``n_steps = n``: ``n + 1`` points, ``k_i = floor(i * n_units / n)`` for ``i = 0..n``;
    - ``step_size = s`` (RISE): ``k_i = min(i * s, n_units)`` for ``i = 0..ceil(n_units / s)``;
    - ``fractions = f``: ``k_j = floor(f_j * n_units + 0.5)`` (round half up), ``f`` ascending
      in [0, 1]; no point is added, so include 0 if the curve should start untouched.

    Examples::

        >>> from captum_gradmask.metrics import step_counts
        >>> step_counts(10, step_size=4).tolist()
        [0, 4, 8, 10]
    """
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
        return torch.tensor([math.floor(f * n_units + 0.5) for f in values], dtype=torch.long)
    if step_size is not None:
        step_size = check_positive_int(step_size, "step_size")
        n_points = -(-n_units // step_size) + 1
        return (torch.arange(n_points) * step_size).clamp(max=n_units)
    n_steps = min(100, n_units) if n_steps is None else check_positive_int(n_steps, "n_steps")
    if n_steps > n_units:
        raise ValueError(f"`n_steps` = {n_steps} is more than the {n_units} units to perturb")
    return torch.arange(n_steps + 1) * n_units // n_steps


def _auc(x: Tensor, p: Tensor, rule: str) -> Tensor:
    if p.shape[-1] < 2:
        raise ValueError("an AUC needs a curve of at least 2 points; use more steps or fractions")
    if rule == "rise":
        n = p.shape[-1]
        return (p.sum(-1) - p[..., 0] / 2 - p[..., -1] / 2) / (n - 1)
    scale = 100.0 if rule == "trapezoid_percent" else 1.0
    return torch.trapezoid(p, x.to(p) * scale, dim=-1)


def _unit_scores(
    saliency: Tensor, level: str, patch_size: int | tuple[int, int]
) -> tuple[Tensor, int, int]:
    """Scores of the ranked units ``(B, gh * gw)`` and the unit size ``(ph, pw)``."""
    if level == "pixel":
        return saliency.flatten(1), 1, 1
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    check_positive_int(ph, "patch_size")
    check_positive_int(pw, "patch_size")
    height, width = saliency.shape[-2:]
    if height % ph or width % pw:
        raise ValueError(
            f"`patch_size` {(ph, pw)} must divide the input size {(height, width)} for "
            "patch-level ranking"
        )
    pooled = F.avg_pool2d(saliency[:, None], kernel_size=(ph, pw))
    return pooled.flatten(1), ph, pw


def perturbation_curve(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    *,
    mode: Literal["insertion", "deletion"],
    level: Literal["pixel", "patch"] = "pixel",
    patch_size: int | tuple[int, int] = 16,
    n_steps: int | None = None,
    step_size: int | None = None,
    fractions: Sequence[float] | None = None,
    baseline: BaselineType = "zeros",
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    probability_fn: ProbabilityFn | None = None,
    auc_rule: AUCRule = "trapezoid",
    prepend_zero_point: bool = False,
    batch_size: int = 64,
    additional_forward_args: Any = None,
    channel_reduction: ChannelReduction = "sum",
    show_progress: bool = False,
    protocol: str = "custom",
) -> PerturbationCurve:
    r"""Insertion or deletion curve of each image and its AUC.

    Units (pixels, or ``patch_size`` patches scored by the mean of the map inside them) are
    ranked by the map in descending order; ties keep their row-major order (a stable sort),
    so the result does not depend on the sorting algorithm or device. At a point inserting or
    deleting ``k`` units, the first ``k`` units of that order are taken from the image
    (insertion, the rest from the baseline) or from the baseline (deletion, the rest from the
    image). All perturbed images of all curves are evaluated ``batch_size`` at a time.

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
        n_steps, step_size, fractions: the schedule, see :func:`step_counts` (at most one).
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
        batch_size: perturbed images per forward call.
        additional_forward_args: extra arguments to ``forward_func``; tensors whose first
            dimension is the batch are indexed per image.
        channel_reduction: ``"sum"`` or ``"abs_sum"`` over channels of the attributions.
        show_progress: show a tqdm bar over the forward batches.
        protocol: name stored in the result.

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
    """
    check_choice(mode, "mode", ("insertion", "deletion"))
    check_choice(level, "level", _LEVELS)
    check_choice(auc_rule, "auc_rule", _AUC_RULES)
    batch_size = check_batch_size(batch_size)
    images, _ = unpack_inputs(inputs)
    batch, _, height, width = images.shape
    device = images.device

    saliency = attribution_map(attributions, images, channel_reduction)
    scores, ph, pw = _unit_scores(saliency, level, patch_size)
    n_units = scores.shape[1]
    grid_h, grid_w = height // ph, width // pw
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_units, device=device).expand(batch, -1))

    counts = step_counts(n_units, n_steps, step_size, fractions).to(device)
    n_points = counts.numel()
    base = _make_baseline(baseline, images, blur_kernel_size, blur_sigma)
    targets, _ = target_probabilities(
        forward_func, images, target, additional_forward_args, batch_size, probability_fn
    )

    probabilities = torch.empty(batch * n_points, device=device)
    slices = list(chunks(batch * n_points, batch_size))
    model = forward_func if isinstance(forward_func, torch.nn.Module) else None
    with torch.no_grad(), preserved_model_state(model):
        for sl in progress(slices, show_progress, f"{mode} curves", len(slices)):
            flat = torch.arange(batch * n_points, device=device)[sl]
            image_idx, point_idx = flat // n_points, flat % n_points
            chosen = rank[image_idx] < counts[point_idx][:, None]
            chosen = chosen.view(-1, 1, grid_h, grid_w)
            if ph > 1 or pw > 1:
                chosen = chosen.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)
            if mode == "insertion":
                perturbed = torch.where(chosen, images[image_idx], base[image_idx])
            else:
                perturbed = torch.where(chosen, base[image_idx], images[image_idx])
            extra = select_args(additional_forward_args, image_idx, batch)
            logits = forward_logits(forward_func, perturbed, extra or None)
            probs = class_probabilities(logits, probability_fn)
            probabilities[sl] = probs.gather(1, targets[image_idx][:, None])[:, 0].float()

    probabilities = probabilities.view(batch, n_points)
    x = counts.double() / n_units
    if prepend_zero_point:
        x = torch.cat([x.new_zeros(1), x])
        probabilities = torch.cat([probabilities.new_zeros(batch, 1), probabilities], dim=1)
    auc = _auc(x, probabilities.double(), auc_rule).float()
    return PerturbationCurve(
        mode=mode,
        fractions=x.float(),
        probabilities=probabilities,
        auc=auc,
        targets=targets,
        auc_rule=auc_rule,
        protocol=protocol,
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
    the default baseline is the RISE blur (kernel 11, sigma 5).

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import insertion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
        >>> images, saliency = torch.rand(2, 3, 32, 32), torch.rand(2, 32, 32)
        >>> curve = insertion(model, images, saliency, target=1, n_steps=8, batch_size=9)
        >>> curve.probabilities.shape
        torch.Size([2, 9])
    """
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
    the default baseline is zeros.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import deletion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
        >>> images, saliency = torch.rand(2, 3, 32, 32), torch.rand(2, 2, 2)
        >>> curve = deletion(model, images, saliency, level="patch", patch_size=16, n_steps=4)
        >>> curve.fractions.tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    return perturbation_curve(
        forward_func, inputs, attributions, target, mode="deletion", baseline=baseline, **kwargs
    )


def _rise(mode: str, inputs: Any, **kwargs: Any) -> PerturbationCurve:
    images, _ = unpack_inputs(inputs)
    settings: dict[str, Any] = dict(
        level="pixel",
        step_size=images.shape[-1],
        auc_rule="rise",
        baseline="blur" if mode == "insertion" else "zeros",
        blur_kernel_size=11,
        blur_sigma=5.0,
        protocol=f"rise_{mode}",
    )
    return perturbation_curve(mode=mode, inputs=inputs, **settings, **kwargs)


def rise_insertion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    *,
    batch_size: int = 64,
    additional_forward_args: Any = None,
    channel_reduction: ChannelReduction = "sum",
    show_progress: bool = False,
) -> PerturbationCurve:
    """Insertion as in RISE (Petsiuk et al. 2018): pixel ranking, one image row of pixels per
    step (224 pixels, 224 steps on 224x224), baseline = :func:`gaussian_blur` (kernel 11,
    sigma 5), softmax probability, AUC ``(sum(p) - p[0]/2 - p[-1]/2) / (n - 1)``.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import rise_insertion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        >>> curve = rise_insertion(model, torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16))
        >>> curve.probabilities.shape  # 16 pixels per step on 16x16: 16 steps + start
        torch.Size([1, 17])
    """
    return _rise(
        "insertion",
        inputs,
        forward_func=forward_func,
        attributions=attributions,
        target=target,
        batch_size=batch_size,
        additional_forward_args=additional_forward_args,
        channel_reduction=channel_reduction,
        show_progress=show_progress,
    )


def rise_deletion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    *,
    batch_size: int = 64,
    additional_forward_args: Any = None,
    channel_reduction: ChannelReduction = "sum",
    show_progress: bool = False,
) -> PerturbationCurve:
    """Deletion as in RISE: like :func:`rise_insertion` with a baseline of zeros.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import rise_deletion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        >>> curve = rise_deletion(model, torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16))
        >>> float(curve.fractions[-1])
        1.0
    """
    return _rise(
        "deletion",
        inputs,
        forward_func=forward_func,
        attributions=attributions,
        target=target,
        batch_size=batch_size,
        additional_forward_args=additional_forward_args,
        channel_reduction=channel_reduction,
        show_progress=show_progress,
    )


def _gradmask_notebook(mode: str, **kwargs: Any) -> PerturbationCurve:
    return perturbation_curve(
        mode=mode,
        level="pixel",
        fractions=GRADMASK_NOTEBOOK_FRACTIONS,
        baseline="zeros",
        auc_rule="trapezoid_percent",
        prepend_zero_point=mode == "deletion",
        protocol=f"gradmask_notebook_{mode}",
        **kwargs,
    )


def gradmask_notebook_insertion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    *,
    batch_size: int = 64,
    additional_forward_args: Any = None,
    channel_reduction: ChannelReduction = "sum",
    show_progress: bool = False,
) -> PerturbationCurve:
    """Insertion as in the GradMask authors' notebook.

    Pixel ranking of the map (patch grids upsampled nearest); points at 1, 5, 10, 20, ..., 100
    % of the pixels (``k = floor(f * H * W + 0.5)``); the top-k pixels are kept and the rest set
    to 0 in the model's (normalized) input space; softmax probability of the target; AUC by the
    trapezoid rule with x in percent, so it lies in [0, 99] (the curve starts at 1 %); divide
    by 100 for a fraction-axis value.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import gradmask_notebook_insertion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        >>> images, saliency = torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16)
        >>> curve = gradmask_notebook_insertion(model, images, saliency)
        >>> [round(100 * f) for f in curve.fractions.tolist()][:3]
        [1, 5, 10]
    """
    return _gradmask_notebook(
        "insertion",
        forward_func=forward_func,
        inputs=inputs,
        attributions=attributions,
        target=target,
        batch_size=batch_size,
        additional_forward_args=additional_forward_args,
        channel_reduction=channel_reduction,
        show_progress=show_progress,
    )


def gradmask_notebook_deletion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    *,
    batch_size: int = 64,
    additional_forward_args: Any = None,
    channel_reduction: ChannelReduction = "sum",
    show_progress: bool = False,
) -> PerturbationCurve:
    """Deletion as in the GradMask authors' notebook.

    As :func:`gradmask_notebook_insertion`, but the top-k % pixels are set to 0 and the point
    (0 %, p = 0) is prepended to the curve before the trapezoid (a quirk of the notebook that
    we reproduce: it lowers the AUC by ``p(1 %) / 2``). AUC in [0, 100], x in percent.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import gradmask_notebook_deletion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        >>> images, saliency = torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16)
        >>> curve = gradmask_notebook_deletion(model, images, saliency)
        >>> float(curve.fractions[0]), float(curve.probabilities[0, 0])
        (0.0, 0.0)
    """
    return _gradmask_notebook(
        "deletion",
        forward_func=forward_func,
        inputs=inputs,
        attributions=attributions,
        target=target,
        batch_size=batch_size,
        additional_forward_args=additional_forward_args,
        channel_reduction=channel_reduction,
        show_progress=show_progress,
    )
