"""Chefer, Gur & Wolf's relevance for ViTs (ICCV 2021), as their Transformer-MM-Explainability
ViT notebook computes it (``generate_relevance``), re-derived for one image.

Per block, first to last: the attention map times its gradient, clamped at zero and averaged
over the heads ("rule 5"), then ``R = R + Ā R`` starting from the identity ("rule 6"). The map is
the CLS row of ``R`` over the patch tokens (the authors' ``R[0, 1:]``; here the columns after
``prefix_tokens`` prefix tokens). Feed it :func:`references.attention.attention_maps`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def average_heads(attention: Tensor, gradient: Tensor) -> Tensor:
    """Rule 5: ``E_h[(grad * A)^+]`` of one layer's ``(heads, T, T)`` maps."""
    return (gradient * attention).clamp(min=0).mean(dim=0)


def relevance(attentions: list[Tensor], gradients: list[Tensor], prefix_tokens: int = 1) -> Tensor:
    """The patch relevance ``(N,)`` of one image from its per-layer maps and gradients."""
    tokens = attentions[0].shape[-1]
    rows = torch.eye(tokens)
    for attention, gradient in zip(attentions, gradients, strict=True):
        rows = rows + average_heads(attention, gradient) @ rows
    return rows[0, prefix_tokens:]
