"""The Vision DiffMask gate's forward pass as its authors' code computes it
(AngelosNal/Vision-DiffMask: ``code/models/gates.py``, ``code/utils/distributions.py``,
``code/models/interpretation.py``), re-derived with explicit weights.

- **Probes** (``MLPMaxGate``): for state ``i``, ``tanh(W2 tanh(W1 [h_0; h_i] + b1) + b2) * mul
  + add`` per token, where ``W1`` and ``W2`` are weight-normalised (``nn.utils.weight_norm``,
  ``dim=0``: ``W = g * v / ||v||`` row by row) and ``add`` is learned.
- **Gates** (``RectifiedStreched(BinaryConcrete(0.2, logits), -0.2, 1.0)``): a relaxed
  Bernoulli sample (``torch.distributions.RelaxedBernoulli``, temperature 0.2) stretched to
  ``(-0.2, 1.0)`` and clipped to ``[0, 1]``; ``log E[L0] = -softplus(logit(1/6) * 0.2 -
  logits)``, the log probability that the gate is not closed. Over the states, the samples are
  multiplied (``cumprod``) and the log expectations summed (``cumsum``); the last entry
  combines all.
- **Evaluation** (``get_mask``): the map is ``exp`` of the summed log expectations (no
  sampling); the masked forward that gives the reported KL uses sampled gates.
- **Placeholder**: the masked patch projection is ``z * proj(x) + (1 - z) * P`` with ``P`` a
  learned ``(D,)`` vector, replacing the output of the patch embedding (before the CLS token
  and the position embeddings are added).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributions as distributions
import torch.nn.functional as F
from torch import Tensor

TEMPERATURE, LEFT, RIGHT = 0.2, -0.2, 1.0


@dataclass
class Probe:
    """One ``MLPMaxGate``'s weights: weight-norm ``(g, v)`` and bias per linear layer."""

    g1: Tensor
    v1: Tensor
    b1: Tensor
    g2: Tensor
    v2: Tensor
    b2: Tensor
    add: Tensor
    mul: float = 15.0

    def __call__(self, first: Tensor, state: Tensor) -> Tensor:
        w1 = self.g1 * self.v1 / self.v1.norm(dim=1, keepdim=True)
        w2 = self.g2 * self.v2 / self.v2.norm(dim=1, keepdim=True)
        hidden = torch.tanh(torch.cat([first, state], -1) @ w1.T + self.b1)
        return torch.tanh(hidden @ w2.T + self.b2) * self.mul + self.add


def hard_concrete(logits: Tensor) -> distributions.TransformedDistribution:
    """The authors' gate distribution (before clipping)."""
    return distributions.TransformedDistribution(
        distributions.RelaxedBernoulli(torch.full_like(logits, TEMPERATURE), logits=logits),
        distributions.AffineTransform(loc=LEFT, scale=RIGHT - LEFT),
    )


def log_expected_l0(logits: Tensor) -> Tensor:
    """Their ``Streched.log_expected_L0``: the point 0 mapped back through the stretch, then the
    binary concrete's ``-softplus((log v - log(1 - v)) * T - logits)``."""
    value = torch.tensor((0.0 - LEFT) / (RIGHT - LEFT))
    return -F.softplus((torch.log(value) - torch.log(1 - value)) * TEMPERATURE - logits)


def gate_forward(
    probes: Sequence[Probe], hidden_states: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``DiffMaskGateInput.forward`` with every state (``layer_pred=None``): the sampled gates
    and the log expected L0 of all states combined ``(B, T)``, and per state ``(B, T, S)``."""
    logits = torch.cat(
        [probes[i](hidden_states[0], hidden_states[i]) for i in range(len(hidden_states))], -1
    )
    gates_full = hard_concrete(logits).rsample().clamp(0, 1).cumprod(-1)
    expected_l0_full = log_expected_l0(logits).cumsum(-1)
    return gates_full[..., -1], expected_l0_full[..., -1], gates_full, expected_l0_full


def mask(gate_states: Tensor) -> Tensor:
    """``get_mask``'s map: the probability that every gate keeps the token."""
    return gate_states.exp()


def masked_projection(projection: Tensor, gates: Tensor, placeholder: Tensor) -> Tensor:
    """The patch projection with the placeholder where the gates close: ``(B, N, D)``."""
    return projection * gates[..., None] + placeholder * (1 - gates[..., None])
