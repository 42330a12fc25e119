"""An independent, plain, single-image GradMask, written from the algorithm doc step by step.

It uses none of the library's code: module lookup, hooks, grouping and masking are written out
here with loops, so that the library's vectorised, batched version is checked against it (by
``tests/test_gradmask.py``) and timed as the naive baseline (by ``benchmarks/speed.py``).

Beyond the paper's algorithm it takes the library's options, each written out plainly:
``layers`` (``None``: all layers but the last, or the only one of a one-layer model; ``"all"``;
or a list of indices, negative ones counting from the end), ``clamp`` (step 5 on or off) and
``fill_value`` (the value of masked-out pixels in step 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def qkv_outputs_hooks(model: nn.Module, kind: str) -> tuple[list[tuple[nn.Module, int]], int]:
    """(module, third) pairs in layer order Q, K, V; third = -1 for separate projections."""
    if kind == "hf5":
        base = model.vit if hasattr(model, "vit") else model.deit
        sites = []
        for layer in base.layers:
            a = layer.attention
            sites += [(a.q_proj, -1), (a.k_proj, -1), (a.v_proj, -1)]
        return sites, len(base.layers)
    if kind == "hf4":
        base = model.vit if hasattr(model, "vit") else model.deit
        sites = []
        for layer in base.encoder.layer:
            a = layer.attention.attention
            sites += [(a.query, -1), (a.key, -1), (a.value, -1)]
        return sites, len(base.encoder.layer)
    if kind == "timm":
        sites = []
        for block in model.blocks:
            sites += [(block.attn.qkv, 0), (block.attn.qkv, 1), (block.attn.qkv, 2)]
        return sites, len(model.blocks)
    raise ValueError(kind)


def _store_in(outputs: dict, key: int):
    def hook(module, inputs, output):
        outputs[key] = output

    return hook


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def chosen_layers(layers: Sequence[int] | str | None, num_layers: int) -> list[int]:
    """The indices of the layers that produce masks, in the order given."""
    if layers is None:  # step 3: the last layer is dropped (unless it is the only one)
        return list(range(num_layers - 1)) if num_layers > 1 else [0]
    if layers == "all":
        return list(range(num_layers))
    return [i + num_layers if i < 0 else i for i in layers]


def reference_masks(
    model: nn.Module,
    image: torch.Tensor,
    kind: str,
    masks_per_layer: int = 4,
    prefix: int = 1,
    patch: int = 16,
    target: int | None = None,
    layers: Sequence[int] | str | None = None,
    clamp: bool = True,
) -> tuple[list[torch.Tensor], int]:
    """Steps 1-7: the binary (h, w) masks of one normalised image ``(3, H, W)`` and the target."""
    sites, num_layers = qkv_outputs_hooks(model, kind)
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for module, _ in sites:
        if id(module) not in outputs:
            outputs[id(module)] = None  # type: ignore[assignment]
            handles.append(module.register_forward_hook(_store_in(outputs, id(module))))
    x = image[None].clone().requires_grad_(True)
    logits = logits_of(model, x)[0]
    for h in handles:
        h.remove()
    t = int(logits.argmax()) if target is None else target
    unique = list(outputs.values())
    grads_unique = torch.autograd.grad(logits[t], unique)
    grad_of = {k: g for k, g in zip(outputs.keys(), grads_unique, strict=True)}

    height, width = image.shape[1] // patch, image.shape[2] // patch
    masks = []
    for layer in chosen_layers(layers, num_layers):
        for module, third in sites[3 * layer : 3 * layer + 3]:
            g = grad_of[id(module)][0]  # (T, D or 3D)
            if third >= 0:
                d3 = g.shape[1] // 3
                g = g[:, third * d3 : (third + 1) * d3]
            dim = g.shape[1]
            size = dim // masks_per_layer
            for group in range(masks_per_layer):
                score = g[:, group * size : (group + 1) * size].sum(dim=1)  # step 4
                if clamp:
                    score = torch.clamp(score, min=0)  # step 5
                score = score[prefix:]  # step 6
                mask = (score >= score.mean()).float()  # step 7
                masks.append(mask.reshape(height, width))
    return masks, t


def reference_gradmask(
    model: nn.Module,
    image: torch.Tensor,
    kind: str,
    masks_per_layer: int = 4,
    prefix: int = 1,
    patch: int = 16,
    target: int | None = None,
    layers: Sequence[int] | str | None = None,
    clamp: bool = True,
    fill_value: float = 0.0,
) -> torch.Tensor:
    """The (h, w) GradMask map of one normalised image ``(3, H, W)``."""
    masks, t = reference_masks(
        model, image, kind, masks_per_layer, prefix, patch, target, layers, clamp
    )
    masked_images = []
    for mask in masks:  # step 8
        pixel_mask = mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        masked_images.append(image * pixel_mask + fill_value * (1 - pixel_mask))
    with torch.no_grad():  # step 9
        probs = torch.softmax(logits_of(model, torch.stack(masked_images)), dim=-1)[:, t]
    heat = torch.zeros(masks[0].shape, device=image.device)
    for c, mask in zip(probs, masks, strict=True):  # step 10
        heat += c * mask
    return heat
