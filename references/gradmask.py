"""An independent, plain, single-image GradMask, written from the algorithm doc step by step.

It uses none of the library's code: module lookup, hooks, grouping and masking are written out
here with loops, so that the library's vectorised, batched version is checked against it (by
``tests/test_gradmask.py``) and timed as the naive baseline (by ``benchmarks/speed.py``).

Beyond the paper's algorithm it takes the library's options, each written out plainly:
``layers`` (``None``: all layers but the last, or the only one of a one-layer model; ``"all"``;
or a list of indices, negative ones counting from the end), ``clamp`` (step 5 on or off) and
``fill_value`` (the value of masked-out pixels in step 8).

The Q, K and V of step 2 are the outputs of each layer's query, key and value projections as
the model runs them: forward hooks where the projections are modules that run, the outputs of
the ``F.linear`` calls on the ``qkv`` weights for timm EVA and BEiT (which add a bias they
assemble instead of calling their ``qkv`` module), and a head-by-head rewrite of
``nn.MultiheadAttention`` (torchvision, OpenCLIP), whose packed in-projection runs inside one
functional kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

KINDS = ("hf5", "hf4", "timm", "hf-clip", "timm-eva", "timm-beit", "torchvision", "open-clip")


def qkv_outputs_hooks(model: nn.Module, kind: str) -> tuple[list[tuple[nn.Module, int]], int]:
    """(module, third) pairs in layer order Q, K, V; third = -1 for separate projections.

    For the kinds whose projections are modules that run: Hugging Face ViT/DeiT/Dinov2 in the
    5.x (``hf5``) and 4.x (``hf4``) layouts, timm ``VisionTransformer`` (``timm``) and the
    vision tower of Hugging Face CLIP/SigLIP (``hf-clip``).
    """
    if kind == "hf5":
        base = getattr(model, model.base_model_prefix)
        # ViT/DeiT keep their layers at the top of the base model, Dinov2 in its encoder
        layers = base.layers if hasattr(base, "layers") else base.encoder.layer
        sites = []
        for layer in layers:
            a = layer.attention
            sites += [(a.q_proj, -1), (a.k_proj, -1), (a.v_proj, -1)]
        return sites, len(layers)
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
    if kind == "hf-clip":
        tower = getattr(model, "vision_model", model)
        sites = []
        for layer in tower.encoder.layers:
            a = layer.self_attn
            sites += [(a.q_proj, -1), (a.k_proj, -1), (a.v_proj, -1)]
        return sites, len(tower.encoder.layers)
    raise ValueError(kind)


class _LinearOutputs(TorchFunctionMode):
    """Records the output of every ``F.linear`` call whose weight is one of ``weights``: the
    projections exactly as the model runs them (timm EVA and BEiT call ``F.linear`` with a
    bias they assemble, so their ``qkv`` module never runs)."""

    def __init__(self, weights: list[torch.Tensor], outputs: dict) -> None:
        super().__init__()
        self.watched = {id(w) for w in weights}
        self.outputs = outputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            weight = kwargs["weight"] if "weight" in kwargs else args[1]
            if id(weight) in self.watched:
                self.outputs[id(weight)] = out
        return out


def _timm_linear_sites(model: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """(weight, third) in layer order Q, K, V for timm EVA / BEiT attention."""
    sites = []
    for block in model.blocks:
        a = block.attn
        if getattr(a, "qkv", None) is not None:
            sites += [(a.qkv.weight, 0), (a.qkv.weight, 1), (a.qkv.weight, 2)]
        else:
            sites += [(a.q_proj.weight, -1), (a.k_proj.weight, -1), (a.v_proj.weight, -1)]
    return sites


def _mha_modules(model: nn.Module, kind: str) -> list[nn.MultiheadAttention]:
    if kind == "torchvision":
        return [layer.self_attention for layer in model.encoder.layers]
    visual = getattr(model, "visual", model)  # open-clip: a CLIP model or its visual tower
    return [block.attn for block in visual.transformer.resblocks]


def _plain_self_attention(attn: nn.MultiheadAttention, index: int, outputs: dict):
    """nn.MultiheadAttention's self-attention written out head by head; records Q, K, V."""

    def forward(
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        assert key_padding_mask is None and attn_mask is None and not is_causal
        x = query if attn.batch_first else query.transpose(0, 1)  # (B, T, D)
        d = attn.embed_dim
        w, b = attn.in_proj_weight, attn.in_proj_bias
        q = x @ w[:d].T + b[:d]
        k = x @ w[d : 2 * d].T + b[d : 2 * d]
        v = x @ w[2 * d :].T + b[2 * d :]
        outputs[(index, 0)], outputs[(index, 1)], outputs[(index, 2)] = q, k, v
        size = d // attn.num_heads
        heads = []
        for h in range(attn.num_heads):
            part = slice(h * size, (h + 1) * size)
            scores = q[..., part] @ k[..., part].transpose(1, 2) / size**0.5
            heads.append(torch.softmax(scores, dim=-1) @ v[..., part])
        out = torch.cat(heads, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
        return (out if attn.batch_first else out.transpose(0, 1)), None

    return forward


@contextlib.contextmanager
def _recording(model: nn.Module, kind: str, outputs: dict):
    """Record the Q/K/V tensors of one forward pass into ``outputs``; yields the site list
    ``[(key, third), ...]`` in layer order Q, K, V and the number of layers."""
    if kind in ("timm-eva", "timm-beit"):
        sites = _timm_linear_sites(model)
        with _LinearOutputs([w for w, _ in sites], outputs):
            yield [(id(w), third) for w, third in sites], len(sites) // 3
        return
    if kind in ("torchvision", "open-clip"):
        modules = _mha_modules(model, kind)
        for i, attn in enumerate(modules):
            attn.forward = _plain_self_attention(attn, i, outputs)
        try:
            yield [((i, j), -1) for i in range(len(modules)) for j in range(3)], len(modules)
        finally:
            for attn in modules:
                del attn.forward
        return
    module_sites, num_layers = qkv_outputs_hooks(model, kind)
    handles = []
    for module in {id(m): m for m, _ in module_sites}.values():
        handles.append(module.register_forward_hook(_store_in(outputs, id(module))))
    try:
        yield [(id(m), third) for m, third in module_sites], num_layers
    finally:
        for h in handles:
            h.remove()


def _store_in(outputs: dict, key: int):
    def hook(module, inputs, output):
        outputs[key] = output

    return hook


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise TypeError(type(out))


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
    tower: nn.Module | None = None,
) -> tuple[list[torch.Tensor], int]:
    """Steps 1-7: the binary (h, w) masks of one normalised image ``(3, H, W)`` and the target.

    ``kind`` (one of :data:`KINDS`) says where ``tower`` (default: ``model``) keeps its
    attention layers; ``model(x)`` gives the logits (a tensor or an output with ``logits``,
    ``image_embeds`` or ``pooler_output``).
    """
    outputs: dict = {}
    with _recording(model if tower is None else tower, kind, outputs) as (sites, num_layers):
        x = image[None].clone().requires_grad_(True)
        logits = logits_of(model, x)[0]
    t = int(logits.argmax()) if target is None else target
    keys = list(dict.fromkeys(key for key, _ in sites))
    grads_unique = torch.autograd.grad(logits[t], [outputs[k] for k in keys])
    grad_of = dict(zip(keys, grads_unique, strict=True))

    height, width = image.shape[1] // patch, image.shape[2] // patch
    masks = []
    for layer in chosen_layers(layers, num_layers):
        for key, third in sites[3 * layer : 3 * layer + 3]:
            g = grad_of[key][0]  # (T, D or 3D)
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
    tower: nn.Module | None = None,
) -> torch.Tensor:
    """The (h, w) GradMask map of one normalised image ``(3, H, W)``."""
    masks, t = reference_masks(
        model, image, kind, masks_per_layer, prefix, patch, target, layers, clamp, tower
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
