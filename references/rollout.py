"""Attention rollout (Abnar & Zuidema, ACL 2020) as two public implementations compute it,
re-derived for one image. Feed them :func:`references.attention.attention_maps`.

- Chefer et al.'s baseline (Transformer-Explainability, ``compute_rollout_attention`` and
  ``generate_rollout``): the heads averaged, the identity added, rows renormalised, the layers
  multiplied from the first, the CLS row over the patches.
- jacobgil's ``vit-explain`` (``vit_rollout.rollout``): the heads fused by mean, max or min,
  ``(A + I) / 2`` divided by ``a.sum(dim=-1)`` (which broadcasts over the *columns*: a row
  normalisation only while every row of ``A`` sums to one, i.e. with the mean and no
  discarding), the lowest ``discard_ratio`` fraction of the fused weights zeroed except the
  first entry, and the map divided by its maximum. Only ``discard_ratio = 0`` with the mean is
  compared with the library, whose discarding renormalises rows and protects no entry.
"""

from __future__ import annotations

import torch
from torch import Tensor


def chefer_rollout(attentions: list[Tensor], prefix_tokens: int = 1) -> Tensor:
    """Chefer's ``generate_rollout(start_layer=0)[0]``: ``(N,)``."""
    tokens = attentions[0].shape[-1]
    joint = None
    for attention in attentions:
        fused = attention.sum(dim=0) / attention.shape[0] + torch.eye(tokens)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        joint = fused if joint is None else fused @ joint
    return joint[0, prefix_tokens:]


def vit_explain_rollout(
    attentions: list[Tensor],
    discard_ratio: float = 0.0,
    head_fusion: str = "mean",
    prefix_tokens: int = 1,
) -> Tensor:
    """jacobgil's ``rollout(attentions, discard_ratio, head_fusion)``: ``(N,)``, max 1."""
    tokens = attentions[0].shape[-1]
    result = torch.eye(tokens)
    for attention in attentions:
        if head_fusion == "mean":
            fused = attention.mean(dim=0)
        elif head_fusion == "max":
            fused = attention.max(dim=0).values
        else:
            fused = attention.min(dim=0).values
        flat = fused.flatten()
        lowest = flat.topk(int(flat.numel() * discard_ratio), largest=False).indices
        flat[lowest[lowest != 0]] = 0
        fused = flat.reshape(tokens, tokens)
        halved = (fused + torch.eye(tokens)) / 2
        # their `a / a.sum(dim=-1)` on a (1, T, T) tensor: element (i, j) over the sum of row j
        halved = halved / halved.sum(dim=-1)[None, :]
        result = halved @ result
    mask = result[0, prefix_tokens:]
    return mask / mask.max()
