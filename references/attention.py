"""Attention probabilities and their gradients, read from a model that computes them eagerly.

The attention-based methods' authors read the attention maps from inside the model: Chefer et
al.'s ViT (``baselines/ViT/ViT_new.py`` of Transformer-Explainability, used by the
Transformer-MM-Explainability ViT notebook) saves each block's attention after ``attn_drop`` and
registers a tensor hook for its gradient; jacobgil's ``vit-explain`` hooks the output of every
``attn_drop`` module. The same is done here, on a copy of the model switched to eager attention:
timm's non-fused path (``attn.fused_attn = False``), or a Hugging Face model with
``attn_implementation="eager"`` and ``output_attentions=True``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def attention_maps(
    model: nn.Module, image: Tensor, target: int | None = None
) -> tuple[list[Tensor], list[Tensor] | None]:
    """Each layer's attention ``(heads, T, T)`` for one image ``(C, H, W)``, and, when ``target``
    is given, the gradient of the target's logit with respect to each of them."""
    eager = copy.deepcopy(model).eval()
    maps: list[Tensor] = []
    gradients: dict[int, Tensor] = {}

    def keep(index: int, attention: Tensor) -> None:
        maps.append(attention)
        if target is not None:
            attention.register_hook(lambda grad: gradients.__setitem__(index, grad))

    if hasattr(eager, "blocks"):  # timm
        handles = []
        for block in eager.blocks:
            block.attn.fused_attn = False
            handles.append(
                block.attn.attn_drop.register_forward_hook(
                    lambda _m, _a, output: keep(len(maps), output)
                )
            )
        logits = eager(image[None])
        for handle in handles:
            handle.remove()
    else:  # Hugging Face
        eager.config._attn_implementation = "eager"
        output = eager(image[None], output_attentions=True)
        for attention in output.attentions:
            keep(len(maps), attention)
        logits = output.logits
    if target is None:
        return [m[0].detach() for m in maps], None
    one_hot = torch.zeros_like(logits)
    one_hot[0, target] = 1
    (one_hot * logits).sum().backward()
    return [m[0].detach() for m in maps], [gradients[i][0] for i in range(len(maps))]
