"""Average Drop, Increase in Confidence, Coherence, Complexity and ADCC (Poppi et al., CVPR-W
2021, "Revisiting The Evaluation of Class Activation Mapping for Explainability"), as used by
ViT-ReciproCAM.

With ``s`` the map min-max normalized to [0, 1] per image, ``Y = p_t(x)`` and the "explanation
map" input ``x * s`` (taken in the model's input space, i.e. on the normalized tensor, as the
reference code does):

- Average Drop: ``max(0, Y - p_t(x*s)) / Y`` (lower is better);
- Increase in Confidence: ``p_t(x*s) > Y`` (higher is better);
- Coherence: ``(1 + pearson(s, s')) / 2`` with ``s'`` the map recomputed on ``x*s``
  (higher is better);
- Complexity: ``||s||_1 / (H*W)``, the mean of ``s`` (lower is better);
- ADCC: ``3 / (1/Coherence + 1/(1 - Complexity) + 1/(1 - AverageDrop))`` (higher is better).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from captum_gradmask._utils import TargetType, chunks, renamed_keyword, unpack_inputs
from captum_gradmask.metrics._common import (
    ChannelReduction,
    ProbabilityFn,
    attribution_map,
    batched_logits,
    check_batch_size,
    check_explanation_func,
    class_probabilities,
    progress,
    target_probabilities,
)

__all__ = ["ADCCResult", "ExplanationFunc", "adcc", "adcc_score", "normalize_map", "pearson"]

ExplanationFunc = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ADCCResult:
    """Per-image components of ADCC (all tensors of shape ``(B,)``, fractions in [0, 1]).

    Attributes:
        average_drop: ``max(0, Y - O) / Y``.
        increase_in_confidence: ``O > Y`` (bool).
        coherence: ``(1 + pearson(s, s')) / 2``.
        complexity: mean of ``s``.
        adcc: per-image ADCC (Poppi et al.'s definition, averaged by :meth:`summary`).
        base_probability: ``Y = p_t(x)``.
        explanation_probability: ``O = p_t(x * s)``.
        targets: the classes used.
    """

    average_drop: Tensor
    increase_in_confidence: Tensor
    coherence: Tensor
    complexity: Tensor
    adcc: Tensor
    base_probability: Tensor
    explanation_probability: Tensor
    targets: Tensor

    def summary(self, percent: bool = True) -> dict[str, float]:
        """Batch means; ``adcc`` is the mean of per-image ADCC (Poppi et al.) and
        ``adcc_of_means`` the ADCC of the mean components (ViT-ReciproCAM's code). Scaled to
        0..100 when ``percent``."""
        scale = 100.0 if percent else 1.0
        drop = float(self.average_drop.mean())
        coherence = float(self.coherence.mean())
        complexity = float(self.complexity.mean())
        return {
            "average_drop": scale * drop,
            "increase_in_confidence": scale * float(self.increase_in_confidence.float().mean()),
            "coherence": scale * coherence,
            "complexity": scale * complexity,
            "adcc": scale * float(self.adcc.mean()),
            "adcc_of_means": scale * adcc_score(coherence, complexity, drop),
        }


def adcc_score(coherence: float, complexity: float, average_drop: float) -> float:
    """``3 / (1/coherence + 1/(1 - complexity) + 1/(1 - average_drop))``, inputs in [0, 1];
    0 when a term is degenerate (coherence 0, complexity 1 or average drop 1).

    Examples::

        >>> from captum_gradmask.metrics import adcc_score
        >>> round(adcc_score(0.5, 0.5, 0.5), 6)
        0.5
    """
    terms = torch.tensor([coherence, 1.0 - complexity, 1.0 - average_drop], dtype=torch.float64)
    return float(_harmonic3(terms[None])[0])


def _harmonic3(terms: Tensor) -> Tensor:
    """Harmonic mean of three non-negative columns; 0 if any is 0 (1/0 = inf)."""
    return 3.0 / (1.0 / terms.clamp_min(0)).sum(dim=1)


def normalize_map(saliency: Tensor) -> Tensor:
    """Min-max normalize each ``(B, ...)`` map to [0, 1]; a constant map becomes all zeros.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import normalize_map
        >>> normalize_map(torch.tensor([[[2.0, 4.0], [3.0, 2.0]]])).tolist()
        [[[0.0, 1.0], [0.5, 0.0]]]
    """
    flat = saliency.flatten(1).float()
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return ((flat - low) / safe * (span > 0)).view_as(saliency)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row pair of ``(B, ...)`` tensors; 0 when a row is constant
    (the Poppi et al. reference code scores an undefined correlation as 0)."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denom = a.norm(dim=1) * b.norm(dim=1)
    corr = (a * b).sum(dim=1) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, corr, torch.zeros_like(corr)).clamp(-1.0, 1.0)


def adcc(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor | None,
    target: TargetType = None,
    *,
    explanation_func: ExplanationFunc,
    probability_fn: ProbabilityFn | None = None,
    internal_batch_size: int = 32,
    additional_forward_args: Any = None,
    channel_reduction: ChannelReduction = "sum",
    show_progress: bool = False,
    batch_size: int | None = None,
) -> ADCCResult:
    r"""Average Drop, Increase in Confidence, Coherence, Complexity and ADCC of each image.

    ``s`` is each map (at the input resolution; patch grids upsampled nearest; channels reduced
    by ``channel_reduction``) min-max normalized to [0, 1] per image; a constant map gives
    ``s = 0``. The explanation input is ``inputs * s`` in the model's input space. Coherence
    uses the map that ``explanation_func`` computes on ``inputs * s`` for the same targets:
    ``(1 + pearson(s, s')) / 2``, the rescaling of Poppi et al.'s reference code
    (aimagelab/ADCC, ``(y + 1) / 2``) and of ViT-ReciproCAM (``0.5 * (1 + pearson)``). Pearson
    is invariant to the min-max rescaling, so ``s'`` is used as returned.

    Args:
        forward_func: model or function returning logits (tensor or Hugging Face output).
        inputs: ``(B, C, H, W)`` model inputs.
        attributions: the maps to evaluate (any shape accepted by the other metrics), or
            ``None`` to compute them with ``explanation_func(inputs, targets)``.
        target: class per image, or ``None`` for each image's predicted class.
        explanation_func: ``(inputs, target) -> attributions``, e.g.
            ``lambda x, t: method.attribute(x, target=t)``; ``t`` is a ``(n,)`` long tensor.
            It is called with gradients enabled.
        probability_fn: maps ``(N, classes)`` logits to class scores; default softmax.
        internal_batch_size: images per forward / explanation call.
        additional_forward_args: extra arguments to ``forward_func`` (not passed to
            ``explanation_func``).
        channel_reduction: ``"sum"`` or ``"abs_sum"`` over channels of the attributions.
        show_progress: tqdm bar over the explanation batches.
        batch_size: deprecated name of ``internal_batch_size``.

    Returns:
        An :class:`ADCCResult`; ``result.summary()`` gives the percentages papers report.

    Examples::

        >>> import torch
        >>> from captum.attr import Saliency
        >>> from captum_gradmask.metrics import adcc
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        >>> saliency = Saliency(model)
        >>> explain = lambda x, t: saliency.attribute(x, target=t)
        >>> images = torch.rand(2, 3, 8, 8)
        >>> result = adcc(model, images, None, target=[0, 1], explanation_func=explain)
        >>> summary = result.summary()  # percentages
        >>> 0.0 <= summary["adcc"] <= 100.0 and 0.0 <= summary["average_drop"] <= 100.0
        True
    """
    check_explanation_func(explanation_func)
    batch_size = renamed_keyword(
        internal_batch_size, 32, batch_size, "internal_batch_size", "batch_size"
    )
    batch_size = check_batch_size(batch_size, "internal_batch_size")
    images, _ = unpack_inputs(inputs)
    targets, base_prob = target_probabilities(
        forward_func, images, target, additional_forward_args, batch_size, probability_fn
    )

    if attributions is None:
        attributions = _explain(explanation_func, images, targets, batch_size, show_progress)
    scaled = normalize_map(attribution_map(attributions, images, channel_reduction))
    explanation_inputs = images * scaled[:, None]

    logits = batched_logits(forward_func, explanation_inputs, additional_forward_args, batch_size)
    explained_prob = class_probabilities(logits, probability_fn).gather(1, targets[:, None])[:, 0]
    recomputed = _explain(explanation_func, explanation_inputs, targets, batch_size, show_progress)
    recomputed_map = attribution_map(
        recomputed, images, channel_reduction, "explanation_func output"
    )

    base = base_prob.double()
    explained = explained_prob.double()
    average_drop = (base - explained).clamp_min(0) / base.clamp_min(torch.finfo(base.dtype).tiny)
    coherence = (1.0 + pearson(scaled, recomputed_map)) / 2.0
    complexity = scaled.flatten(1).double().abs().mean(dim=1)
    per_image = _harmonic3(torch.stack([coherence, 1.0 - complexity, 1.0 - average_drop], dim=1))
    return ADCCResult(
        average_drop=average_drop.float(),
        increase_in_confidence=explained > base,
        coherence=coherence.float(),
        complexity=complexity.float(),
        adcc=per_image.float(),
        base_probability=base_prob.float(),
        explanation_probability=explained_prob.float(),
        targets=targets,
    )


def _explain(
    explanation_func: ExplanationFunc,
    images: Tensor,
    targets: Tensor,
    batch_size: int,
    show_progress: bool,
) -> Tensor:
    slices = list(chunks(images.shape[0], batch_size))
    maps = []
    with torch.enable_grad():
        for sl in progress(slices, show_progress, "explanations", len(slices)):
            out = explanation_func(images[sl], targets[sl])
            if isinstance(out, tuple) and len(out) == 1:
                out = out[0]
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"`explanation_func` must return a tensor of attributions, got "
                    f"{type(out).__name__}"
                )
            maps.append(out.detach())
    return torch.cat(maps) if len(maps) > 1 else maps[0]
