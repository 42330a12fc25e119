"""Thin recipes around Captum's own metrics for image attributions of Vision Transformers.

- :func:`patch_infidelity` calls :func:`captum.metrics.infidelity` with a patch-wise
  perturbation (:func:`patch_perturbation`) and ``normalize=True``, so maps of any scale (and
  ``(B, h, w)`` patch grids) can be compared.
- :func:`sensitivity` calls :func:`captum.metrics.sensitivity_max`, which runs the explanation
  inside ``torch.no_grad()``: the wrapper re-enables gradients around the explanation function.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from captum.metrics import infidelity, sensitivity_max
from torch import Tensor

from captum_gradmask._utils import (
    TargetType,
    check_positive_int,
    extract_logits,
    preserved_model_state,
    renamed_keyword,
    resolve_targets,
    unpack_inputs,
)
from captum_gradmask.metrics._common import (
    ChannelReduction,
    attribution_map,
    batched_logits,
    check_explanation_func,
    resolve_patch_size,
)

__all__ = [
    "InfidelityResult",
    "PerturbFunc",
    "SensitivityResult",
    "patch_infidelity",
    "patch_perturbation",
    "sensitivity",
]

PerturbFunc = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class InfidelityResult:
    """Infidelity of a batch of maps (lower is better).

    Attributes:
        values: ``(B,)`` infidelity per image.
        normalize: whether the map's scale was fitted first (Captum's ``normalize``).
        n_perturb_samples: perturbations averaged per image.
    """

    values: Tensor
    normalize: bool
    n_perturb_samples: int

    def summary(self) -> dict[str, float]:
        """``{"infidelity": mean over the batch}``."""
        return {"infidelity": float(self.values.mean())}


@dataclass(frozen=True)
class SensitivityResult:
    """Max-sensitivity of an explanation on a batch (lower is better).

    Attributes:
        values: ``(B,)`` largest relative change of each image's explanation.
        perturb_radius: radius of the L-inf ball the inputs were perturbed in.
        n_perturb_samples: perturbations per image.
    """

    values: Tensor
    perturb_radius: float
    n_perturb_samples: int

    def summary(self) -> dict[str, float]:
        """``{"sensitivity": mean over the batch}``."""
        return {"sensitivity": float(self.values.mean())}


def _per_eval(
    perturbations_per_eval: int | None, batch_size: int | None, max_examples_per_batch: int | None
) -> int | None:
    """``perturbations_per_eval``, or one of its deprecated names."""
    value = renamed_keyword(
        perturbations_per_eval, None, batch_size, "perturbations_per_eval", "batch_size"
    )
    value = renamed_keyword(
        value, None, max_examples_per_batch, "perturbations_per_eval", "max_examples_per_batch"
    )
    return None if value is None else check_positive_int(value, "perturbations_per_eval")


def patch_perturbation(
    patch_size: int | tuple[int, int], drop_probability: float = 0.5, baseline: float = 0.0
) -> PerturbFunc:
    """A ``perturb_func`` for :func:`captum.metrics.infidelity` that resets random patches.

    Each ``patch_size`` patch (a side, or ``(ph, pw)``: the model's patch size) of each copy
    is set to ``baseline`` with probability ``drop_probability`` (independently, with torch's
    global generator). Returns, as Captum expects, ``(perturbation, perturbed_inputs)`` with
    ``perturbed = inputs - perturbation``.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import patch_perturbation
        >>> perturb = patch_perturbation(patch_size=4, drop_probability=0.5)
        >>> noise, perturbed = perturb(torch.ones(2, 3, 8, 8))
        >>> bool(((perturbed == 0) | (perturbed == 1)).all())
        True
    """
    ph, pw = resolve_patch_size(None, patch_size)
    if not 0.0 <= drop_probability <= 1.0:
        raise ValueError(f"`drop_probability` must be in [0, 1], got {drop_probability!r}")

    def perturb(inputs: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, height, width = inputs.shape
        if height % ph or width % pw:
            raise ValueError(
                f"`patch_size` {(ph, pw)} must divide the input size {(height, width)}"
            )
        grid = (batch, 1, height // ph, width // pw)
        dropped = torch.rand(grid, device=inputs.device) < drop_probability
        dropped = dropped.repeat_interleave(ph, 2).repeat_interleave(pw, 3)
        perturbation = dropped * (inputs - baseline)
        return perturbation, inputs - perturbation

    return perturb


def _logits_func(forward_func: Callable[..., Any]) -> Callable[..., Tensor]:
    def forward(*args: Any) -> Tensor:
        return extract_logits(forward_func(*args))

    return forward


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def patch_infidelity(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    *,
    patch_size: int | tuple[int, int] | None = None,
    drop_probability: float = 0.5,
    baseline: float = 0.0,
    n_perturb_samples: int = 10,
    perturbations_per_eval: int | None = None,
    normalize: bool = True,
    additional_forward_args: Any = None,
    channel_reduction: ChannelReduction = "sum",
    seed: int | None = None,
    batch_size: int | None = None,
    max_examples_per_batch: int | None = None,
) -> InfidelityResult:
    r"""Infidelity (Yeh et al. 2019) under random patch removal, via Captum.

    The map (patch grids upsampled nearest, channels reduced) is spread over the input's
    channels divided by their number, so ``sum(attr * perturbation)`` weighs each pixel once
    whatever the channel count. ``normalize=True`` fits the best scale of the map first, so
    the score compares shapes, not magnitudes. Lower is better. A model (``nn.Module``) is
    evaluated in eval mode, as by the other metrics, and left in its own mode afterwards.

    Args:
        forward_func: model or function returning logits (Hugging Face outputs accepted).
        inputs: ``(B, C, H, W)`` model inputs.
        attributions: maps in any shape the other metrics accept.
        target: class per image (Captum's forms); needed for multi-class outputs.
        patch_size: the side (or ``(ph, pw)``) of the removed patches; default: the patch
            size of ``forward_func``'s adapter (a Hugging Face or timm ViT); a function the
            library does not recognise needs it.
        drop_probability, baseline: see :func:`patch_perturbation`.
        n_perturb_samples, normalize: passed to Captum.
        perturbations_per_eval: perturbed images per forward call (Captum's
            ``max_examples_per_batch``; ``None``: all at once).
        additional_forward_args: extra arguments to ``forward_func``.
        channel_reduction: ``"sum"`` or ``"abs_sum"``.
        seed: seed for the perturbations (the global RNG state is restored afterwards).
        batch_size, max_examples_per_batch: deprecated names of ``perturbations_per_eval``.

    Returns:
        An :class:`InfidelityResult`; ``values`` is ``(B,)``.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import patch_infidelity
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        >>> scores = patch_infidelity(model, torch.rand(2, 3, 8, 8), torch.rand(2, 2, 2),
        ...     target=1, patch_size=4, seed=0)
        >>> scores.values.shape
        torch.Size([2])
    """
    per_eval = _per_eval(perturbations_per_eval, batch_size, max_examples_per_batch)
    n_perturb_samples = check_positive_int(n_perturb_samples, "n_perturb_samples")
    patch = resolve_patch_size(forward_func, patch_size)
    images, _ = unpack_inputs(inputs)
    channels = images.shape[1]
    saliency = attribution_map(attributions, images, channel_reduction)
    spread = (saliency[:, None] / channels).expand_as(images).contiguous()
    module = forward_func if isinstance(forward_func, torch.nn.Module) else None
    with _seeded(seed, images.device), preserved_model_state(module):
        values = infidelity(
            _logits_func(forward_func),
            patch_perturbation(patch, drop_probability, baseline),
            images,
            spread,
            additional_forward_args=additional_forward_args,
            target=target,
            n_perturb_samples=n_perturb_samples,
            max_examples_per_batch=per_eval,
            normalize=normalize,
        )
    return InfidelityResult(values, normalize, n_perturb_samples)


def sensitivity(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    target: TargetType = None,
    *,
    explanation_func: Callable[[Tensor, Tensor], Tensor] | None = None,
    perturb_radius: float = 0.02,
    n_perturb_samples: int = 10,
    norm_ord: str = "fro",
    perturbations_per_eval: int | None = None,
    additional_forward_args: Any = None,
    seed: int | None = None,
    batch_size: int | None = None,
    max_examples_per_batch: int | None = None,
) -> SensitivityResult:
    r"""Max-sensitivity (Yeh et al. 2019) of an explanation, via Captum's ``sensitivity_max``.

    Captum perturbs the inputs uniformly in an L-inf ball of ``perturb_radius`` and reports
    the largest relative change of the explanation. It calls the explanation inside
    ``torch.no_grad()`` on batches of ``n_perturb_samples`` copies per image, with ``target``
    repeated accordingly; this wrapper turns gradients back on so gradient methods work.
    Every perturbed copy is explained for the same class: ``target``, or the model's
    prediction on the unperturbed image. Lower is better.

    Args:
        forward_func: the model (or function returning logits); it resolves a ``None``
            target to each image's predicted class.
        inputs: ``(B, C, H, W)`` model inputs.
        target: class per image (int, list or tensor), or ``None`` for the predicted class.
        explanation_func: ``(inputs, target) -> attributions``, accepting batches.
        perturb_radius, n_perturb_samples, norm_ord: Captum's.
        perturbations_per_eval: perturbed images per explanation call (Captum's
            ``max_examples_per_batch``; ``None``: all at once).
        additional_forward_args: extra arguments to ``forward_func`` (for the prediction).
        seed: seed for the perturbations (global RNG state restored afterwards).
        batch_size, max_examples_per_batch: deprecated names of ``perturbations_per_eval``.

    Returns:
        A :class:`SensitivityResult`; ``values`` is ``(B,)``.

    The former call ``sensitivity(explanation_func, inputs, target)`` (the explanation first,
    no model) still works for one release, with a ``DeprecationWarning``.

    Examples::

        >>> import torch
        >>> from captum.attr import Saliency
        >>> from captum_gradmask.metrics import sensitivity
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        >>> saliency = Saliency(model)
        >>> scores = sensitivity(model, torch.rand(2, 3, 8, 8), target=[0, 1],
        ...     explanation_func=lambda x, t: saliency.attribute(x, target=t),
        ...     n_perturb_samples=3, seed=0)
        >>> scores.values.shape
        torch.Size([2])
    """
    per_eval = _per_eval(perturbations_per_eval, batch_size, max_examples_per_batch)
    n_perturb_samples = check_positive_int(n_perturb_samples, "n_perturb_samples")
    images, _ = unpack_inputs(inputs)
    if explanation_func is None:
        warnings.warn(
            "sensitivity(explanation_func, inputs, target) is deprecated: pass the model first, "
            "sensitivity(model, inputs, target, explanation_func=...), as every metric takes it",
            DeprecationWarning,
            stacklevel=2,
        )
        explanation_func, forward_func = forward_func, None
    check_explanation_func(explanation_func)
    if forward_func is not None:
        logits = batched_logits(
            forward_func, images, additional_forward_args, per_eval or images.shape[0]
        )
        targets = resolve_targets(target, logits)
        # Captum repeats a tensor target per perturbed copy only when it has several entries.
        target = int(targets[0]) if targets.numel() == 1 else targets
    elif isinstance(target, (list, tuple)):
        target = torch.as_tensor(target, dtype=torch.long, device=images.device)

    def explain(perturbed: Tensor | tuple[Tensor, ...], target: TargetType = None) -> Any:
        # Captum hands the inputs over as a tuple; our explanation functions take a tensor.
        as_tuple = isinstance(perturbed, tuple)
        images = perturbed[0] if as_tuple else perturbed
        with torch.enable_grad():
            out = explanation_func(images, target)
        out = out[0] if isinstance(out, tuple) else out
        return (out.detach(),) if as_tuple else out.detach()

    with _seeded(seed, images.device):
        values = sensitivity_max(
            explain,
            images,
            perturb_radius=perturb_radius,
            n_perturb_samples=n_perturb_samples,
            norm_ord=norm_ord,
            max_examples_per_batch=per_eval,
            target=target,
        )
    return SensitivityResult(values, perturb_radius, n_perturb_samples)
