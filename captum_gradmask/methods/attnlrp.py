"""AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers", ICML 2024) for Vision Transformers, as the authors' ``lxt`` package runs it.

LRP relevance is computed as the input times a gradient whose backward pass follows LRP's
rules (:func:`captum_gradmask.rules.attnlrp_rules`): the identity rule on LayerNorm and GELU,
the uniform rule on gated products, CP-LRP in the attention (the attention probabilities are
constants, ``lxt``'s choice for ViTs, "easier to tune for gamma") and zennit's Gamma rule on
every Linear and Conv2d layer. The explained score is the target's logit. One forward and one
backward pass per image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import TargetType, extract_logits, resolve_targets, unpack_inputs
from ..adapters import ViTAdapter
from ..base import PatchAttribution
from ..rules import BackwardRule, attnlrp_rules, backward_rules

__all__ = ["AttnLRP"]


class AttnLRP(PatchAttribution):
    r"""AttnLRP relevance of each pixel (or patch) for a Vision Transformer's target logit.

    The model's forward values are unchanged (its modules' outputs are kept bit for bit; only
    their gradients are swapped) and every hook is removed after each call. Works on every
    family the adapters support whose layers the rules cover (LayerNorm/RMSNorm, GELU/SiLU/
    QuickGELU, timm's SwiGLU, Linear and Conv2d); others are refused with
    :class:`~captum_gradmask.rules.UnsupportedModel` naming the module.

    Args:
        model: a Hugging Face ViT/DeiT, a timm ViT, a torchvision ``VisionTransformer`` (any
            family :func:`~captum_gradmask.adapters.get_adapter` knows), or a callable with
            ``adapter``.
        adapter: the model's adapter; by default found with
            :func:`captum_gradmask.adapters.get_adapter`.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods import AttnLRP
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> lrp = AttnLRP(model)
        >>> lrp.attribute(torch.randn(2, 3, 32, 32), target=[1, 4]).shape
        torch.Size([2, 3, 32, 32])
        >>> lrp.attribute_grid(torch.randn(2, 3, 32, 32), target=1).shape
        torch.Size([2, 4, 4])
    """

    method_name = "AttnLRP"

    def __init__(
        self, model: nn.Module | Callable[..., Any], adapter: ViTAdapter | None = None
    ) -> None:
        super().__init__(model, adapter)
        # Refuse a model the rules cannot cover now, not at the first call.
        self._rules(0.25, 0.05)

    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        conv_gamma: float = 0.25,
        linear_gamma: float = 0.05,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor | tuple[Tensor]:
        r"""The relevance of every input value: input times its gradient under AttnLRP's rules.

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them).
            target: class per image: an int for all, a list or 1-D tensor with one per image;
                ``None`` (default) uses each image's predicted class. The score explained is
                the target's logit.
            additional_forward_args: extra arguments passed to the model after the images.
            conv_gamma: Gamma of the rule on Conv2d layers (the patch embedding); the authors'
                example sweeps 0.1, 0.25 and 100. Default 0.25.
            linear_gamma: Gamma of the rule on Linear layers; the authors' example sweeps 0,
                0.01, 0.05, 0.1 and 1. Default 0.05. ``0`` on both gives LRP-0 there.
            internal_batch_size: images per forward/backward pass (``None``: all at once).
            show_progress: show a progress bar over the batches.

        Returns:
            ``(B, C, H, W)`` relevance (same tensor-or-tuple form as ``inputs``); its sum over
            channels is the pixel heatmap.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.methods import AttnLRP
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> relevance = AttnLRP(model).attribute(torch.randn(1, 3, 32, 32), target=0,
            ...                                      conv_gamma=0.1, linear_gamma=0.0)
            >>> relevance.sum(1).shape  # the pixel heatmap
            torch.Size([1, 32, 32])
        """
        images, is_tuple = unpack_inputs(inputs)
        relevance = self._relevance(
            images,
            target,
            additional_forward_args,
            conv_gamma,
            linear_gamma,
            internal_batch_size,
            show_progress,
        )
        return (relevance,) if is_tuple else relevance

    def attribute_grid(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        conv_gamma: float = 0.25,
        linear_gamma: float = 0.05,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""The ``(B, h, w)`` relevance of each patch: the pixel relevance summed per patch.

        Same arguments as :meth:`attribute`.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.methods import AttnLRP
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> AttnLRP(model).attribute_grid(torch.randn(1, 3, 32, 16), target=2).shape
            torch.Size([1, 4, 2])
        """
        images, _ = unpack_inputs(inputs)
        relevance = self._relevance(
            images,
            target,
            additional_forward_args,
            conv_gamma,
            linear_gamma,
            internal_batch_size,
            show_progress,
        )
        _, grid = self._prepare(images, target)
        count, _, height, width = relevance.shape
        rows, columns = grid
        pixels = relevance.sum(1).reshape(count, rows, height // rows, columns, width // columns)
        return pixels.sum((2, 4))

    # --- the pass -------------------------------------------------------------------------

    def _rules(self, conv_gamma: float, linear_gamma: float) -> list[BackwardRule]:
        module = self.model if self.model is not None else self.adapter.model
        return attnlrp_rules(module, self.adapter, conv_gamma=conv_gamma, linear_gamma=linear_gamma)

    def _relevance(
        self,
        images: Tensor,
        target: TargetType,
        additional_forward_args: Any,
        conv_gamma: float,
        linear_gamma: float,
        internal_batch_size: int | None,
        show_progress: bool,
    ) -> Tensor:
        images, _ = self._prepare(images, target)
        rules = self._rules(conv_gamma, linear_gamma)

        def compute(batch: Tensor, batch_target: TargetType, args: tuple[Any, ...]) -> Tensor:
            with backward_rules(rules), torch.enable_grad():
                leaf = batch.detach().requires_grad_(True)
                logits = extract_logits(self.forward_func(leaf, *args))
                targets = resolve_targets(batch_target, logits)
                score = logits.gather(1, targets[:, None]).sum()
                (gradient,) = torch.autograd.grad(score, leaf)
            return (leaf * gradient).detach()

        return self._batched(
            images, target, additional_forward_args, internal_batch_size, compute, show_progress
        )
