"""Generic attention-model explainability (Chefer, Gur & Wolf, ICCV 2021), self-attention case.

"Generic Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder
Transformers" (arXiv 2103.15679), rule (5)-(6) for a self-attention-only encoder: start from the
identity ``R = I`` and, layer by layer from the first to the last,

    Ā = E_h[(∇A ⊙ A)^+]        R = R + Ā · R

where ``A`` are a layer's attention probabilities (one ``T x T`` matrix per head), ``∇A`` the
gradient of the target class's logit with respect to them, ``⊙`` the element-wise product,
``(·)^+`` clamping at zero and ``E_h`` the mean over heads. The map is the CLS row of ``R`` over
the patch tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import GradientAttribution
from torch import Tensor

from .._utils import TargetType
from ._attention import AttentionMapAttribution, AttentionPass, RowChoice

__all__ = ["CheferGAE"]


class CheferGAE(AttentionMapAttribution, GradientAttribution):
    r"""Chefer et al.'s gradient-weighted attention relevance (GAE) for Vision Transformers.

    The attention probabilities are recomputed from the hooked query and key projections and
    their gradients are obtained exactly from the gradient of the attention context (the input
    of each layer's output projection), so the model's attention implementation (SDPA or
    eager) is left as it is. Cost: one forward and one backward pass per image.

    Args:
        model: a Hugging Face ViT/DeiT, a timm ``VisionTransformer``, or any callable returning
            logits when ``adapter`` is given.
        adapter: where the model keeps its attention projections, output projections and patch
            grid; by default found with :func:`captum_gradmask.adapters.get_adapter`.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods import CheferGAE
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> chefer = CheferGAE(model)
        >>> chefer.attribute(torch.randn(2, 3, 32, 32), target=[1, 4]).shape
        torch.Size([2, 3, 32, 32])
        >>> chefer.attribute_grid(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 4, 4])
    """

    method_name = "CheferGAE"
    needs_gradients = True

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        row: RowChoice = "cls",
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Attribute the target class to the input patches with Chefer et al.'s relevance.

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them); ``H``
                and ``W`` must be multiples of the patch size.
            target: class per image: an int for all, a list or 1-D tensor with one per image;
                ``None`` (default) uses each image's predicted class. The gradient is taken of
                the target's logit (before softmax), as in the authors' code.
            additional_forward_args: extra positional arguments for the model's forward.
            row: which query row of the relevance matrix is the map: ``"cls"`` (default, the
                paper: the CLS token) or ``"prefix_mean"`` (the mean of the rows of all prefix
                tokens, e.g. CLS and distillation for DeiT distilled) or ``"mean"`` (the mean
                of all token rows, for models without a CLS token such as SigLIP).
            internal_batch_size: images per forward/backward pass (``None``: all at once).
            show_progress: show a progress bar over the batches.

        Returns:
            The ``(B, h, w)`` map: each patch's relevance (>= 0).

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.methods import CheferGAE
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> CheferGAE(model).attribute_grid(torch.randn(1, 3, 32, 32), target=3).shape
            torch.Size([1, 4, 4])
        """

        def combine(recorded: AttentionPass) -> Tensor:
            assert recorded.gradients is not None
            return relevance_matrix(recorded.probabilities, recorded.gradients)

        return self._patch_maps(
            inputs,
            target,
            additional_forward_args,
            internal_batch_size,
            row,
            show_progress,
            combine,
        )


def relevance_matrix(probabilities: list[Tensor], gradients: list[Tensor]) -> Tensor:
    """``R`` after all layers, from per-layer ``A`` and ``∇A`` of shape ``(B, heads, T, T)``."""
    first = probabilities[0]
    batch, _, tokens, _ = first.shape
    relevance = torch.eye(tokens, dtype=first.dtype, device=first.device).repeat(batch, 1, 1)
    for probs, grads in zip(probabilities, gradients, strict=True):
        weighted = (grads * probs).clamp(min=0).mean(dim=1)
        relevance = relevance + weighted @ relevance
    return relevance
