"""Attention probabilities and their gradients, recomputed from hooked projections.

The attention-based methods (:class:`~captum_gradmask.methods.AttentionRollout`,
:class:`~captum_gradmask.methods.CheferGAE`) need, for every layer, the attention probabilities
``A_h = softmax(Q_h K_h^T / sqrt(d_head))`` of each head and, for Chefer et al., the gradient
``dA_h`` of the target logit with respect to them. Models often compute attention with a fused
kernel (PyTorch SDPA) that never materialises ``A``; switching them to an "eager" implementation
would change the user's model. Instead:

- forward hooks on the query, key and value projections record ``Q``, ``K`` and ``V``; ``A`` is
  recomputed from ``Q`` and ``K`` per head (layers whose ``qk_normalized`` is True are refused:
  their attention does not follow from the projection outputs), or read where the adapter
  taps it (``AttentionLayer.probabilities``: adapters that run an equivalent of the model's
  attention, rotary or relative position terms included);
- a forward pre-hook on the output projection records its input, the attention context
  ``C_h = A_h V_h`` with the heads concatenated. Since ``C_h = A_h V_h`` is linear in ``A_h``,
  the gradient of the target logit ``y`` with respect to ``A_h`` is exactly
  ``dy/dA_h = (dy/dC_h) V_h^T`` (no dropout in eval mode), and one backward pass to the contexts
  gives every layer's ``dA``;
- each layer's recorded context is checked against ``A V``: a mismatch (relative attention
  biases, gated or normalised contexts, masks) raises instead of returning a wrong map.

Nothing is changed on the model: hooks are removed when the pass ends, errors included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._utils import (
    TargetType,
    check_recorded,
    check_token_count,
    recorded,
    resolve_targets,
    unique_modules,
)
from ..adapters import ViTAdapter
from ..base import PatchAttribution

__all__ = [
    "AttentionMapAttribution",
    "AttentionPass",
    "attention_pass",
    "check_attention_layers",
    "check_row",
    "patch_row",
]


@dataclass
class AttentionPass:
    """What one forward (and optional backward) pass recorded.

    Attributes:
        probabilities: one ``(B, heads, T, T)`` float32 tensor per layer, rows summing to 1.
        gradients: ``dy/dA`` of the target logits, same shapes, or ``None`` when not requested.
        logits: the model's logits ``(B, classes)``, detached.
        targets: the resolved targets ``(B,)`` (predicted class where none was given).
    """

    probabilities: list[Tensor]
    gradients: list[Tensor] | None
    logits: Tensor
    targets: Tensor


def check_attention_layers(adapter: ViTAdapter, what: str, need_output: bool) -> None:
    """Raise a clear error when attention cannot be recomputed for ``adapter``'s layers."""
    for index, layer in enumerate(adapter.layers):
        if layer.qk_normalized and layer.probabilities is None:
            raise ValueError(
                f"{what} recomputes attention as softmax(Q K^T / sqrt(d)) from the query and key "
                f"projections, but layer {index} of adapter {adapter.name!r} normalises Q and K "
                "after projecting them (qk_normalized=True); models with qk_norm are not supported"
            )
        if need_output and layer.output is None:
            raise ValueError(
                f"{what} needs each layer's output projection (whose input is the attention "
                f"context A @ V); layer {index} of adapter {adapter.name!r} has `output=None`"
            )


def attention_pass(
    adapter: ViTAdapter,
    images: Tensor,
    additional_forward_args: tuple[Any, ...],
    target: TargetType = None,
    *,
    with_gradients: bool = False,
) -> AttentionPass:
    """Run the model once on ``images`` and recompute every layer's attention probabilities.

    Args:
        adapter: the model's adapter (its ``layers`` name the projections).
        images: a batch ``(B, C, H, W)``.
        additional_forward_args: extra positional arguments for the forward function.
        target: Captum-style targets for this batch; ``None`` = predicted class.
        with_gradients: also compute ``dy/dA`` for the target logits ``y`` (one backward pass).

    Returns:
        An :class:`AttentionPass`.
    """
    layers = list(adapter.layers)
    projection_modules = unique_modules(
        p.module for layer in layers for p in (layer.query, layer.key, layer.value)
    )
    output_modules = [layer.output for layer in layers if layer.output is not None]
    probability_modules = [
        layer.probabilities for layer in layers if layer.probabilities is not None
    ]
    with (
        recorded(projection_modules + probability_modules) as outputs,
        recorded(output_modules, inputs=True) as contexts,
        torch.set_grad_enabled(with_gradients),
    ):
        # A fresh leaf keeps the graph alive even for frozen models; the user's tensor and
        # the parameters' .grad stay untouched (gradients come from torch.autograd.grad).
        leaf = images.detach().requires_grad_(with_gradients)
        logits = adapter.logits(leaf, *additional_forward_args)
        if logits.dim() != 2:
            raise ValueError(
                f"the model must return logits of shape (batch, classes); got shape "
                f"{tuple(logits.shape)}"
            )
        targets = resolve_targets(target, logits)
        check_recorded(projection_modules + probability_modules, outputs)
        check_recorded(output_modules, contexts)
        context_list = [
            contexts[id(layer.output)] if layer.output is not None else None for layer in layers
        ]
        context_grads: dict[int, Tensor] = {}
        if with_gradients:
            score = logits.gather(1, targets[:, None]).sum()
            used = {i: c for i, c in enumerate(context_list) if c is not None}
            grads = torch.autograd.grad(score, list(used.values()), allow_unused=True)
            for (i, context), g in zip(used.items(), grads, strict=True):
                context_grads[i] = torch.zeros_like(context) if g is None else g

    probabilities: list[Tensor] = []
    gradients: list[Tensor] = []
    for index, layer in enumerate(layers):
        query = _heads(layer.query.select(outputs[id(layer.query.module)]), layer.num_heads)
        key = _heads(layer.key.select(outputs[id(layer.key.module)]), layer.num_heads)
        value = _heads(layer.value.select(outputs[id(layer.value.module)]), layer.num_heads)
        if layer.probabilities is not None:  # the model's own (position terms included)
            probs = outputs[id(layer.probabilities)].detach().float()
        else:
            scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
            probs = torch.softmax(scores, dim=-1)
        context = context_list[index]
        if context is not None:
            _check_context(probs, value, context.detach(), index, adapter.name)
        probabilities.append(probs)
        if index in context_grads:
            context_grad = _heads(context_grads[index], layer.num_heads)
            # C_h = A_h V_h  =>  dy/dA_h = (dy/dC_h) V_h^T
            gradients.append(context_grad @ value.transpose(-1, -2))
    return AttentionPass(
        probabilities,
        gradients if with_gradients else None,
        logits.detach(),
        targets.detach(),
    )


def _heads(tensor: Tensor, num_heads: int) -> Tensor:
    """``(B, T, heads * d)`` -> ``(B, heads, T, d)`` in float32, detached."""
    batch, tokens, width = tensor.shape
    if width % num_heads:
        raise ValueError(
            f"a projection of width {width} cannot be split into {num_heads} attention heads; "
            "check the adapter's `num_heads`"
        )
    return (
        tensor.detach()
        .float()
        .reshape(batch, tokens, num_heads, width // num_heads)
        .transpose(1, 2)
    )


def _check_context(
    probs: Tensor, value: Tensor, context: Tensor, index: int, adapter_name: str
) -> None:
    """Raise unless the recorded context equals ``A V`` (so ``A`` and ``dA`` are the model's)."""
    batch, _, tokens, _ = probs.shape
    expected = (probs @ value).transpose(1, 2).reshape(batch, tokens, -1)
    if expected.shape != context.shape:
        raise RuntimeError(
            f"layer {index} of adapter {adapter_name!r}: the output projection's input has shape "
            f"{tuple(context.shape)}, expected the attention context {tuple(expected.shape)}"
        )
    tolerance = 1e-3 if context.dtype in (torch.float32, torch.float64) else 3e-2
    scale = float(context.float().abs().max()) + 1e-6
    error = float((expected - context.float()).abs().max())
    if error > tolerance * scale:
        raise RuntimeError(
            f"layer {index} of adapter {adapter_name!r}: softmax(Q K^T / sqrt(d)) V recomputed "
            f"from the projections differs from the attention context by {error:.3g} (relative "
            f"{error / scale:.3g}); this layer's attention has extra terms (relative position "
            "bias, masks, gating or a normalised context) that the recomputation cannot follow"
        )


RowChoice = Literal["cls", "prefix_mean", "mean"]


def patch_row(matrix: Tensor, prefix_tokens: int, row: RowChoice, grid: tuple[int, int]) -> Tensor:
    """The relevance of the patch tokens for the chosen query row, as ``(B, h, w)`` maps.

    ``matrix`` is ``(B, T, T)`` (rollout or relevance matrix). ``row="cls"`` takes row 0 (the
    CLS token); ``row="prefix_mean"`` averages the rows of all prefix tokens (CLS and
    distillation for DeiT); ``row="mean"`` averages the rows of all tokens (models without a
    CLS token, whose head pools every token: SigLIP). The prefix columns are dropped.
    """
    check_row(row)
    check_token_count(matrix.shape[-1], prefix_tokens, grid)
    if row == "mean":
        return matrix.mean(1)[:, prefix_tokens:].reshape(-1, *grid)
    if prefix_tokens < 1:
        raise ValueError(
            f"`row`={row!r} reads the row of a prefix (CLS) token, and this model has none; "
            "use row='mean' (the mean of all token rows) for models that pool every token"
        )
    rows = matrix[:, :1] if row == "cls" else matrix[:, :prefix_tokens]
    return rows.mean(1)[:, prefix_tokens:].reshape(-1, *grid)


def check_row(row: Any) -> None:
    """Raise unless ``row`` is a :data:`RowChoice`."""
    if row not in ("cls", "prefix_mean", "mean"):
        raise ValueError(f"`row` must be 'cls', 'prefix_mean' or 'mean', got {row!r}")


class AttentionMapAttribution(PatchAttribution):
    """Shared part of the attention-based methods: one recorded pass per batch of images, a
    ``(B, T, T)`` matrix from it, and the chosen query row over the patch tokens."""

    method_name = "attention method"
    needs_gradients = False

    def __init__(
        self, model: nn.Module | Callable[..., Any], adapter: ViTAdapter | None = None
    ) -> None:
        super().__init__(model, adapter)
        check_attention_layers(self.adapter, self.method_name, need_output=self.needs_gradients)

    def _patch_maps(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType,
        additional_forward_args: Any,
        internal_batch_size: int | None,
        row: RowChoice,
        show_progress: bool,
        combine: Callable[[AttentionPass], Tensor],
    ) -> Tensor:
        """Run :func:`attention_pass` per batch; ``combine`` turns each pass into ``(B, T, T)``."""
        images, grid = self._prepare(inputs, target)
        check_row(row)

        def compute(batch: Tensor, batch_target: TargetType, args: tuple[Any, ...]) -> Tensor:
            passed = attention_pass(
                self.adapter, batch, args, batch_target, with_gradients=self.needs_gradients
            )
            return patch_row(combine(passed), self.adapter.prefix_tokens, row, grid)

        maps = self._batched(
            images, target, additional_forward_args, internal_batch_size, compute, show_progress
        )
        return maps.to(images.dtype)
