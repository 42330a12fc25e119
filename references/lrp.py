"""A plain LRP pass through a one-layer ViT, written rule by rule (no autograd, no hooks).

An independent re-derivation of AttnLRP as the authors' ``lxt`` runs it on ViTs (Achtibat et
al., ICML 2024), used to check :class:`captum_gradmask.methods.AttnLRP`. Relevance starts at
the target logit and is handed down layer by layer:

- Linear layers (and the patch embedding, a linear map of each flattened patch): the
  generalised Gamma rule of zennit (``gamma = 0`` is LRP-0);
- sums (residual connections, class token + position embedding): LRP-0, each term gets the
  share it contributes;
- LayerNorm: the identity rule on the normalisation (the standard deviation is a constant, so
  the LayerNorm is the linear map ``(x - mean(x)) / s * w + b``), LRP-0 through that map;
- GELU: the identity rule (relevance passes unchanged);
- attention: CP-LRP, the attention probabilities are constants, so ``A @ V`` is linear in the
  values and the relevance goes to them alone (LRP-0).

The model is the Hugging Face ``ViTForImageClassification`` layout with one block; its weights
are a plain dictionary (:func:`hf_vit_weights` reads them from such a model). Float64
advised: LRP-0 divides by pre-activations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attnlrp_relevance", "hf_vit_weights", "one_layer_vit"]

_STABILISER = 1e-6


def hf_vit_weights(model: torch.nn.Module) -> dict[str, Tensor]:
    """The parameters of a one-layer Hugging Face ViT classifier under plain names (the
    transformers 5.x layout, ``vit.layers``, or the 4.x one, ``vit.encoder.layer``)."""
    vit = model.vit
    if hasattr(vit, "layers"):
        layer = vit.layers[0]
        attention = layer.attention
        query, key, value, out = (
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
        )
        fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
    else:
        layer = vit.encoder.layer[0]
        inner = layer.attention.attention
        query, key, value = inner.query, inner.key, inner.value
        out = layer.attention.output.dense
        fc1, fc2 = layer.intermediate.dense, layer.output.dense
    modules = {
        "patch": vit.embeddings.patch_embeddings.projection,
        "norm1": layer.layernorm_before,
        "query": query,
        "key": key,
        "value": value,
        "out": out,
        "norm2": layer.layernorm_after,
        "fc1": fc1,
        "fc2": fc2,
        "norm": vit.layernorm,
        "head": model.classifier,
    }
    weights = {
        f"{name}.{kind}": getattr(module, kind).detach().clone()
        for name, module in modules.items()
        for kind in ("weight", "bias")
    }
    weights["cls"] = vit.embeddings.cls_token.detach()[0, 0].clone()
    weights["position"] = vit.embeddings.position_embeddings.detach()[0].clone()
    weights["heads"] = torch.tensor(model.config.num_attention_heads)
    weights["eps"] = torch.tensor(layer.layernorm_before.eps, dtype=torch.float64)
    return weights


def _patches(image: Tensor, size: int) -> Tensor:
    """``(C, H, W)`` -> ``(tokens, C * size * size)``, row-major patches, channel-major inside."""
    channels, height, width = image.shape
    grid = image.reshape(channels, height // size, size, width // size, size)
    return grid.permute(1, 3, 0, 2, 4).reshape(-1, channels * size * size)


def _unpatch(patches: Tensor, shape: tuple[int, int, int], size: int) -> Tensor:
    channels, height, width = shape
    grid = patches.reshape(height // size, width // size, channels, size, size)
    return grid.permute(2, 0, 3, 1, 4).reshape(channels, height, width)


def _norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return centred / scale * weight + bias, scale


def _gelu(x: Tensor) -> Tensor:
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def one_layer_vit(weights: dict[str, Tensor], image: Tensor) -> dict[str, Tensor]:
    """Every intermediate of the forward pass of one ``(C, H, W)`` image (logits included)."""
    w = weights
    eps = float(w["eps"])
    size = w["patch.weight"].shape[-1]
    values: dict[str, Tensor] = {"pixels": _patches(image, size)}
    values["embedded"] = values["pixels"] @ w["patch.weight"].flatten(1).T + w["patch.bias"]
    values["tokens"] = torch.cat([w["cls"][None], values["embedded"]]) + w["position"]
    values["normed1"], values["scale1"] = _norm(
        values["tokens"], w["norm1.weight"], w["norm1.bias"], eps
    )
    heads = int(w["heads"])
    tokens, width = values["normed1"].shape
    split = lambda t: t.reshape(tokens, heads, width // heads).transpose(0, 1)  # noqa: E731
    query = split(values["normed1"] @ w["query.weight"].T + w["query.bias"])
    key = split(values["normed1"] @ w["key.weight"].T + w["key.bias"])
    values["value"] = values["normed1"] @ w["value.weight"].T + w["value.bias"]
    scores = query @ key.transpose(-1, -2) / math.sqrt(width // heads)
    values["probabilities"] = scores.softmax(-1)
    context = values["probabilities"] @ split(values["value"])
    values["context"] = context.transpose(0, 1).reshape(tokens, width)
    values["attended"] = values["context"] @ w["out.weight"].T + w["out.bias"]
    values["residual1"] = values["tokens"] + values["attended"]
    values["normed2"], values["scale2"] = _norm(
        values["residual1"], w["norm2.weight"], w["norm2.bias"], eps
    )
    values["hidden"] = values["normed2"] @ w["fc1.weight"].T + w["fc1.bias"]
    values["activated"] = _gelu(values["hidden"])
    values["mlp"] = values["activated"] @ w["fc2.weight"].T + w["fc2.bias"]
    values["residual2"] = values["residual1"] + values["mlp"]
    values["pooled"], values["scale3"] = _norm(
        values["residual2"][0], w["norm.weight"], w["norm.bias"], eps
    )
    values["logits"] = values["pooled"] @ w["head.weight"].T + w["head.bias"]
    return values


# --- rules: each takes the relevance of a layer's output and returns that of its input ------


def _stabilised(z: Tensor) -> Tensor:
    return z + ((z == 0).to(z) + z.sign()) * _STABILISER


def gamma_rule(
    x: Tensor, weight: Tensor, bias: Tensor, output: Tensor, relevance: Tensor, gamma: float
) -> Tensor:
    """zennit's generalised Gamma rule for ``output = x @ weight.T + bias``.

    An output ``> 0`` shares its relevance among the inputs in proportion to their
    contributions with positive ones amplified by ``1 + gamma`` (``x+ (w + gamma w+)``,
    ``x- (w + gamma w-)``, bias ``b + gamma b+``); an output ``< 0`` with negative ones
    amplified; an output of 0 passes nothing.
    """
    positive, negative = x.clamp(min=0), x.clamp(max=0)
    w_up = weight + gamma * weight.clamp(min=0)
    w_down = weight + gamma * weight.clamp(max=0)
    z_up = positive @ w_up.T + negative @ w_down.T + bias + gamma * bias.clamp(min=0)
    z_down = positive @ w_down.T + negative @ w_up.T + bias + gamma * bias.clamp(max=0)
    r_up = torch.where(output > 0, relevance / _stabilised(z_up), 0.0)
    r_down = torch.where(output < 0, relevance / _stabilised(z_down), 0.0)
    return positive * (r_up @ w_up + r_down @ w_down) + negative * (r_up @ w_down + r_down @ w_up)


def sum_rule(term: Tensor, total: Tensor, relevance: Tensor) -> Tensor:
    """LRP-0 for a sum: ``term``'s share of ``total``'s relevance."""
    return term * relevance / total


def layer_norm_rule(
    x: Tensor, scale: Tensor, weight: Tensor, output: Tensor, relevance: Tensor
) -> Tensor:
    """LRP-0 through the LayerNorm with its standard deviation ``scale`` held constant:
    ``output_j = sum_i x_i w_j (delta_ij - 1/D) / s + b_j``."""
    share = weight * relevance / output
    return x / scale * (share - share.mean(-1, keepdim=True))


def attention_rule(
    probabilities: Tensor, value: Tensor, context: Tensor, relevance: Tensor
) -> Tensor:
    """CP-LRP: ``context = A @ V`` per head with ``A`` constant, LRP-0 to the values.

    ``probabilities`` ``(heads, T, T)``; ``value``, ``context`` and ``relevance`` ``(T, D)``.
    """
    heads, tokens, _ = probabilities.shape
    split = lambda t: t.reshape(tokens, heads, -1).transpose(0, 1)  # noqa: E731
    share = split(relevance / context)  # (heads, T, d)
    to_values = split(value) * (probabilities.transpose(-1, -2) @ share)
    return to_values.transpose(0, 1).reshape(tokens, -1)


def attnlrp_relevance(
    weights: dict[str, Tensor],
    image: Tensor,
    target: int,
    *,
    conv_gamma: float,
    linear_gamma: float,
) -> Tensor:
    """AttnLRP relevance ``(C, H, W)`` of each input value of one image for ``target``'s
    logit, computed backwards from the logit rule by rule."""
    w = weights
    v = one_layer_vit(w, image)
    gamma = linear_gamma

    relevance = torch.zeros_like(v["logits"])
    relevance[target] = v["logits"][target]
    relevance = gamma_rule(
        v["pooled"], w["head.weight"], w["head.bias"], v["logits"], relevance, gamma
    )
    relevance = layer_norm_rule(
        v["residual2"][0], v["scale3"], w["norm.weight"], v["pooled"], relevance
    )
    top = torch.zeros_like(v["residual2"])
    top[0] = relevance  # the classifier reads the class token only

    # Second residual: residual2 = residual1 + fc2(gelu(fc1(norm2(residual1)))).
    to_mlp = sum_rule(v["mlp"], v["residual2"], top)
    residual1 = sum_rule(v["residual1"], v["residual2"], top)
    r = gamma_rule(v["activated"], w["fc2.weight"], w["fc2.bias"], v["mlp"], to_mlp, gamma)
    r = gamma_rule(v["normed2"], w["fc1.weight"], w["fc1.bias"], v["hidden"], r, gamma)
    residual1 = residual1 + layer_norm_rule(
        v["residual1"], v["scale2"], w["norm2.weight"], v["normed2"], r
    )

    # First residual: residual1 = tokens + out(A @ value(norm1(tokens))).
    to_attention = sum_rule(v["attended"], v["residual1"], residual1)
    tokens = sum_rule(v["tokens"], v["residual1"], residual1)
    r = gamma_rule(v["context"], w["out.weight"], w["out.bias"], v["attended"], to_attention, gamma)
    r = attention_rule(v["probabilities"], v["value"], v["context"], r)
    r = gamma_rule(v["normed1"], w["value.weight"], w["value.bias"], v["value"], r, gamma)
    tokens = tokens + layer_norm_rule(v["tokens"], v["scale1"], w["norm1.weight"], v["normed1"], r)

    # Embedding: tokens = [cls; patches @ W + b] + position; the class token keeps its share.
    embedded = sum_rule(v["embedded"], v["tokens"][1:], tokens[1:])
    weight = w["patch.weight"].flatten(1)
    pixels = gamma_rule(v["pixels"], weight, w["patch.bias"], v["embedded"], embedded, conv_gamma)
    return _unpatch(pixels, tuple(image.shape), w["patch.weight"].shape[-1])
