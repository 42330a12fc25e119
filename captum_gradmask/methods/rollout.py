"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

Per layer, the attention of the heads is fused (mean by default), the identity is added for the
residual connection and the rows are renormalised: ``Â = (A + I) / rowsum``, which equals the
paper's ``0.5 A + 0.5 I`` for head-averaged attention. The layers are multiplied from the first
to the last, ``R = Â_L ··· Â_2 Â_1``, and the map is the CLS row of ``R`` over the patch tokens.
The map does not depend on the target class.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .._utils import TargetType
from ._attention import AttentionMapAttribution, AttentionPass, RowChoice

__all__ = ["AttentionRollout"]

HeadFusion = Literal["mean", "max", "min"]


class AttentionRollout(AttentionMapAttribution):
    r"""Attention rollout maps for Vision Transformers (class-agnostic).

    Attention probabilities are recomputed from the hooked query and key projections, so the
    model's attention implementation (SDPA or eager) is left as it is. Cost: one forward pass per
    image, no backward pass.

    Args:
        model: a Hugging Face ViT/DeiT, a timm ``VisionTransformer``, or any callable returning
            logits when ``adapter`` is given.
        adapter: where the model keeps its attention projections and patch grid; by default
            found with :func:`captum_gradmask.adapters.get_adapter`.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods import AttentionRollout
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> rollout = AttentionRollout(model)
        >>> rollout.attribute(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
        >>> rollout.attribute_grid(torch.randn(2, 3, 32, 32), head_fusion="max").shape
        torch.Size([2, 4, 4])
    """

    method_name = "AttentionRollout"
    needs_gradients = False

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        head_fusion: HeadFusion = "mean",
        discard_ratio: float = 0.0,
        row: RowChoice = "cls",
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Attribute the model's prediction to the input patches by attention rollout.

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them); ``H``
                and ``W`` must be multiples of the patch size.
            target: accepted for Captum compatibility and ignored: rollout is class-agnostic
                (the same map for every class). Per-image targets are still checked for length.
            additional_forward_args: extra positional arguments for the model's forward.
            head_fusion: how the heads of a layer are fused: ``"mean"`` (the paper),
                ``"max"`` or ``"min"`` (element-wise over heads).
            discard_ratio: fraction in ``[0, 1)`` of the lowest fused attention weights of each
                layer (per image, over all ``T x T`` entries, ties in row-major order) set to
                zero before the identity is added. ``0`` (default) is the paper's rollout; the
                option follows the popular ``vit-explain`` variant.
            row: which query row of the rollout matrix is the map: ``"cls"`` (default, the
                CLS token, row 0) or ``"prefix_mean"`` (the mean of the rows of all prefix
                tokens: CLS and distillation for DeiT distilled, plus registers if any) or
                ``"mean"`` (the mean of all token rows, for models without a CLS token such
                as SigLIP).
            internal_batch_size: images per forward pass (``None``: all at once); bounds the
                memory taken by the ``layers x heads x T x T`` attention tensors.
            show_progress: show a progress bar over the batches.

        Returns:
            The ``(B, h, w)`` map: each patch's rollout weight, in ``[0, 1]``.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.methods import AttentionRollout
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> AttentionRollout(model).attribute_grid(torch.randn(1, 3, 32, 32)).shape
            torch.Size([1, 4, 4])
        """
        if head_fusion not in ("mean", "max", "min"):
            raise ValueError(f"`head_fusion` must be 'mean', 'max' or 'min', got {head_fusion!r}")
        if (
            isinstance(discard_ratio, bool)
            or not isinstance(discard_ratio, (int, float))
            or not 0 <= discard_ratio < 1
        ):
            raise ValueError(f"`discard_ratio` must be a number in [0, 1), got {discard_ratio!r}")

        def combine(recorded: AttentionPass) -> Tensor:
            return rollout_matrix(recorded.probabilities, head_fusion, float(discard_ratio))

        # The target only matters for checking; rollout ignores it.
        return self._patch_maps(
            inputs,
            target,
            additional_forward_args,
            internal_batch_size,
            row,
            show_progress,
            combine,
        )


def rollout_matrix(
    probabilities: list[Tensor], head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0
) -> Tensor:
    """The rollout ``Â_L ··· Â_1`` of per-layer attention ``(B, heads, T, T)``, as ``(B, T, T)``."""
    first = probabilities[0]
    batch, _, tokens, _ = first.shape
    identity = torch.eye(tokens, dtype=first.dtype, device=first.device).expand(batch, -1, -1)
    joint = identity
    for probs in probabilities:
        if head_fusion == "mean":
            fused = probs.mean(dim=1)
        elif head_fusion == "max":
            fused = probs.amax(dim=1)
        else:
            fused = probs.amin(dim=1)
        if discard_ratio > 0:
            fused = _discard_lowest(fused, discard_ratio)
        augmented = fused + identity
        augmented = augmented / augmented.sum(dim=-1, keepdim=True)
        joint = augmented @ joint
    return joint


def _discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    """Zero the ``floor(ratio * T * T)`` lowest entries of each ``(T, T)`` matrix."""
    batch = fused.shape[0]
    flat = fused.reshape(batch, -1)
    count = int(ratio * flat.shape[1])
    if count == 0:
        return fused
    order = torch.sort(flat, dim=1, stable=True).indices[:, :count]
    return flat.scatter(1, order, 0.0).reshape_as(fused)
