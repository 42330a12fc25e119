"""LibraGrad's backward rules, re-derived from the authors' timm fork, as plain functions.

The authors (Mehri, Baghshah & Pilehvar, CVPR 2025; GitHub
``NightMachinery/pytorch-image-models-libragrad-v1``, ``timm/night/decomposition.py``, preset
"LibraGrad" in ``NightMachinery/decompv-libragrad-v1``, ``decompv/x/gbrand.py``) replace timm's
layers by subclasses whose forward returns the original value while its gradient is that of a
rewritten expression ("swap backward"). The preset switches on:

- LayerNorm "LineX_1": the variance is detached; centring and the affine part keep their
  gradient;
- GELU/SiLU "LineX_ZO": ``x * gate(x)`` with the gate (``Phi(x)``, ``sigmoid(x)``) detached;
- attention "LineX_1": the query and key are detached right after the ``qkv`` projection (before
  any ``q_norm``/``k_norm``), so the attention weights are constants;
- gated MLP "DU": the product of the two branches is divided by 2 in the backward pass;
- the head: the target's softmax probability is differentiated ("S1"), the logit for CLIP.

This module writes each rule out as a function and a timm ``VisionTransformer`` forward built
from them, reading only the model's parameters. It imports nothing from ``captum_gradmask``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def swap_backward(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` forward, ``surrogate``'s gradient backward (the authors' idiom)."""
    return value.detach() + (surrogate - surrogate.detach())


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last axis with the variance a constant of the backward pass."""
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    variance = centred.pow(2).mean(-1, keepdim=True).detach()
    surrogate = torch.div(centred, (variance + eps) ** 0.5)
    if weight is not None:
        surrogate = torch.einsum("...d,d->...d", surrogate, weight)
    if bias is not None:
        surrogate = surrogate + bias
    return swap_backward(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), surrogate)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last axis with the mean square a constant of the backward pass."""
    mean_square = x.pow(2).mean(-1, keepdim=True)
    value = x * torch.rsqrt(mean_square + eps)
    surrogate = x / (mean_square.detach() + eps) ** 0.5
    if weight is not None:
        value, surrogate = value * weight, surrogate * weight
    return swap_backward(value, surrogate)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU as ``x * Phi(x)`` with ``Phi`` constant (tanh approximation: its own ``Phi``)."""
    with torch.no_grad():
        if approximate == "none":
            gate = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        else:
            inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
            gate = 0.5 * (1.0 + torch.tanh(inner))
    return swap_backward(F.gelu(x, approximate=approximate), x * gate)


def silu(x: Tensor) -> Tensor:
    """SiLU as ``x * sigmoid(x)`` with the sigmoid constant."""
    return swap_backward(F.silu(x), x * torch.sigmoid(x).detach())


def gated_product(activated: Tensor, linear: Tensor) -> Tensor:
    """The two branches of a gated MLP multiplied; the product's gradient is halved."""
    product = activated * linear
    return swap_backward(product, product / 2)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Softmax attention ``(B, H, T, d)`` with the query and key detached."""
    weights = torch.softmax((q.detach() * scale) @ k.detach().transpose(-2, -1), dim=-1)
    return weights @ v


def _activation(module: nn.Module, x: Tensor) -> Tensor:
    name = type(module).__name__
    if name in ("SiLU", "Swish"):
        return silu(x)
    if name in ("GELU", "GELUTanh"):
        approximate = getattr(module, "approximate", "tanh" if name == "GELUTanh" else "none")
        return gelu(x, approximate)
    raise NotImplementedError(f"no LibraGrad rule for activation {name}")


def _norm(module: nn.Module, x: Tensor) -> Tensor:
    if isinstance(module, nn.Identity):
        return x
    if isinstance(module, nn.LayerNorm):
        return layer_norm(x, module.weight, module.bias, module.eps)
    if type(module).__name__ in ("RmsNorm", "RMSNorm"):
        return rms_norm(x, module.weight, module.eps or torch.finfo(x.dtype).eps)
    raise NotImplementedError(f"no LibraGrad rule for norm {type(module).__name__}")


def _linear(module: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, module.weight, module.bias)


def _mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    name = type(mlp).__name__
    if name == "Mlp":
        hidden = _activation(mlp.act, _linear(mlp.fc1, x))
    elif name == "SwiGLU":
        hidden = gated_product(_activation(mlp.act, _linear(mlp.fc1_g, x)), _linear(mlp.fc1_x, x))
    elif name == "GluMlp":
        first, second = _linear(mlp.fc1, x).chunk(2, dim=-1)
        if mlp.gate_last:
            hidden = gated_product(_activation(mlp.act, second), first)
        else:
            hidden = gated_product(_activation(mlp.act, first), second)
    else:
        raise NotImplementedError(f"no reference for MLP {name}")
    return _linear(mlp.fc2, _norm(mlp.norm, hidden))


def _layer_scale(module: nn.Module, x: Tensor) -> Tensor:
    gamma = getattr(module, "gamma", None)
    return x if gamma is None else x * gamma


def _attention_block(attn: nn.Module, x: Tensor) -> Tensor:
    batch, tokens, _ = x.shape
    heads = attn.num_heads
    qkv = _linear(attn.qkv, x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    # Detached before the query/key norms, as in the authors' attention.
    q, k = attn.q_norm(q.detach()), attn.k_norm(k.detach())
    context = attention(q, k, v, q.shape[-1] ** -0.5)
    context = context.transpose(1, 2).reshape(batch, tokens, -1)
    return _linear(attn.proj, _norm(attn.norm, context))


def timm_vit_from_tokens(model: nn.Module, tokens: Tensor) -> Tensor:
    """Logits of a timm ``VisionTransformer`` (token pooling or average pooling) from the token
    sequence that enters its first block, every layer written with LibraGrad's rules."""
    x = tokens
    for block in model.blocks:
        x = x + _layer_scale(block.ls1, _attention_block(block.attn, _norm(block.norm1, x)))
        x = x + _layer_scale(block.ls2, _mlp(block.mlp, _norm(block.norm2, x)))
    x = _norm(model.norm, x)
    if model.global_pool == "token":
        pooled = x[:, 0]
    elif model.global_pool == "avg":
        pooled = x[:, model.num_prefix_tokens :].mean(1)
    else:
        raise NotImplementedError(f"no reference for global_pool={model.global_pool!r}")
    return _linear(model.head, _norm(model.fc_norm, pooled))


def timm_vit_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """The token sequence entering the first block (the authors' "patches": patch embedding,
    prefix tokens and position embeddings, then ``norm_pre``)."""
    return model.norm_pre(model._pos_embed(model.patch_embed(images)))


def token_input_x_gradient(model: nn.Module, images: Tensor, target: int) -> Tensor:
    """``(B, T)``: the authors' token-level Input x Gradient of the target logit under the rules
    (their ``blocks__0__CAT_s:sum``), prefix tokens included."""
    with torch.no_grad():
        tokens = timm_vit_tokens(model, images)
    tokens = tokens.detach().requires_grad_(True)
    logits = timm_vit_from_tokens(model, tokens)
    (gradient,) = torch.autograd.grad(logits[:, target].sum(), tokens)
    return (tokens * gradient).sum(-1).detach()
