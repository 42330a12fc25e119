"""The hard-concrete distribution (Louizos et al., ICLR 2018, "Learning Sparse Neural Networks
through L0 Regularization"), as Vision DiffMask uses it for its patch gates.

A binary-concrete sample ``s = sigmoid((logits + log u - log(1 - u)) / temperature)`` with
``u ~ Uniform(0, 1)`` is stretched to ``(left, right)`` and clipped to ``[0, 1]``:
``z = clamp(left + (right - left) * s, 0, 1)``. With ``left < 0`` a gate is exactly 0 with
positive probability, and the probability that it is *not* 0 (its expected L0 norm) has a closed
form that is differentiable in ``logits``:

``P(z > 0) = sigmoid(logits - temperature * log(-left / right))``.

Here ``temperature`` divides the logistic logit, as in ``torch.distributions.RelaxedBernoulli``
(Louizos et al. write ``beta``; Vision DiffMask uses 0.2, with ``left = -0.2`` and ``right = 1.0``,
so a gate is exactly closed with positive probability and reaches 1 only in the limit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["log_prob_open", "logits_for_prob_open", "sample_gates"]


def _check(temperature: float, left: float, right: float) -> None:
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
    if not (left < 0 and right > 0):
        raise ValueError(
            f"the stretch interval must contain 0 and reach above it: need left < 0 < right, "
            f"got left={left!r}, right={right!r}"
        )


def sample_gates(
    logits: Tensor,
    temperature: float = 0.2,
    left: float = -0.2,
    right: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw hard-concrete gates in ``[0, 1]``, differentiable in ``logits`` (reparametrised).

    Args:
        logits: location parameters ``log alpha``, any shape.
        temperature: binary-concrete temperature.
        left, right: the stretch interval, ``left < 0 < right``.
        generator: random generator for reproducible draws.

    Returns:
        Gates of the shape of ``logits``.

    Example::

        >>> import torch
        >>> from captum_gradmask.methods.diffmask.hard_concrete import sample_gates
        >>> gates = sample_gates(torch.tensor([-20.0, 0.0, 20.0]))
        >>> gates[0].item(), gates[2].item() > 0.99
        (0.0, True)
    """
    _check(temperature, left, right)
    tiny = torch.finfo(logits.dtype).tiny
    uniform = torch.rand(
        logits.shape, generator=generator, dtype=logits.dtype, device=logits.device
    ).clamp(tiny, 1.0 - 1e-7)
    noise = torch.log(uniform) - torch.log1p(-uniform)
    relaxed = torch.sigmoid((logits + noise) / temperature)
    return (left + (right - left) * relaxed).clamp(0.0, 1.0)


def log_prob_open(
    logits: Tensor, temperature: float = 0.2, left: float = -0.2, right: float = 1.0
) -> Tensor:
    """``log P(gate > 0)``: the log of each gate's expected L0 norm.

    Example::

        >>> import torch
        >>> from captum_gradmask.methods.diffmask.hard_concrete import log_prob_open
        >>> round(log_prob_open(torch.tensor(0.0)).exp().item(), 4)  # sigmoid(0.2 * log 5)
        0.5798
    """
    _check(temperature, left, right)
    # z > 0  <=>  s > -left / (right - left)  <=>  logits + noise > temperature * log(-left/right)
    return -F.softplus(_open_shift(temperature, left, right) - logits)


def logits_for_prob_open(
    probability: Tensor, temperature: float = 0.2, left: float = -0.2, right: float = 1.0
) -> Tensor:
    """The logits whose ``P(gate > 0)`` is ``probability`` (in ``(0, 1)``): the inverse of
    :func:`log_prob_open`'s exponential.

    Example::

        >>> import torch
        >>> from captum_gradmask.methods.diffmask.hard_concrete import (
        ...     log_prob_open, logits_for_prob_open)
        >>> logits = logits_for_prob_open(torch.tensor([0.1, 0.5, 0.9]))
        >>> [round(p, 4) for p in log_prob_open(logits).exp().tolist()]
        [0.1, 0.5, 0.9]
    """
    _check(temperature, left, right)
    return torch.logit(probability) + _open_shift(temperature, left, right)


def _open_shift(temperature: float, left: float, right: float) -> float:
    return temperature * math.log(-left / right)
