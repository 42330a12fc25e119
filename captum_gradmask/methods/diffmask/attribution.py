"""Vision DiffMask as a Captum attribution: the probability, predicted by a trained gate, that
each patch must be kept for the model's output distribution to stay the same."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from captum.attr import Attribution
from torch import Tensor, nn

from ..._utils import TargetType, check_index, check_no_args, format_target
from ...adapters import TokenInterface, ViTAdapter
from ...base import PatchAttribution
from .gate import DiffMaskGate

__all__ = ["VisionDiffMask", "baseline_tokens"]


def baseline_tokens(tokens: TokenInterface, images: Tensor, prefix: int) -> Tensor:
    """Embedded patch tokens of an all-zero image of the inputs' size: ``(1, N, D)``."""
    with torch.no_grad():
        return tokens.embed(torch.zeros_like(images[:1]))[:, prefix:]


class VisionDiffMask(PatchAttribution, Attribution):
    r"""Vision DiffMask attributions: the probability, predicted by a trained gate, that each
    patch must be kept for the model's output distribution to stay the same.

    Args:
        model: a Hugging Face ViT/DeiT or timm ``VisionTransformer`` (any model whose adapter
            provides ``embed``, ``blocks`` and ``head``).
        gate: a trained :class:`DiffMaskGate` or the folder it was saved to (see
            :class:`VisionDiffMaskTrainer`, ``benchmarks/train_diffmask.py``).
        adapter: the model's adapter; found with :func:`~captum_gradmask.adapters.get_adapter`
            by default.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.adapters import get_adapter
        >>> from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig, VisionDiffMask
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))  # untrained
        >>> explainer = VisionDiffMask(model, gate)
        >>> explainer.attribute(torch.randn(2, 3, 32, 32), target=[1, 3]).shape
        torch.Size([2, 3, 32, 32])
        >>> explainer.attribute_grid(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 4, 4])
    """

    method_name = "Vision DiffMask"

    def __init__(
        self,
        model: nn.Module | Callable[..., Any],
        gate: DiffMaskGate | str | os.PathLike[str],
        adapter: ViTAdapter | None = None,
    ) -> None:
        super().__init__(model, adapter)
        interface = self.adapter.require_tokens(self.method_name)
        if not isinstance(gate, DiffMaskGate):
            gate = DiffMaskGate.load(gate)
        blocks = len(interface.blocks)
        if gate.config.num_states != blocks + 1:
            raise ValueError(
                f"`gate` reads {gate.config.num_states} hidden states but the model has "
                f"{blocks} blocks (needs {blocks + 1}); the gate was trained for another model"
            )
        self.gate = gate

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        layer: int = -1,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Attribute the model's prediction to the input patches.

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them); ``H`` and
                ``W`` must be multiples of the patch size.
            target: accepted for the Captum contract and validated (an int, or one class per
                image), but **not used**: the gate reads the hidden states of the unmasked image
                and was trained to keep the whole output distribution, so the map explains the
                prediction whatever the target.
            additional_forward_args: must be ``None``: the token-level interface the gate reads
                (``embed``, ``blocks``) takes no extra arguments.
            layer: use the gates of hidden states ``0..layer`` (``-1``, the default and the
                authors' choice: all of them). Lower values give the masks the earlier layers
                alone predict.
            internal_batch_size: images per forward pass (``None``: all at once).
            show_progress: show a progress bar over the batches.

        Returns:
            The ``(B, h, w)`` map of ``P(patch kept)`` in ``[0, 1]``. Higher = more important.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.adapters import get_adapter
            >>> from captum_gradmask.methods.diffmask import (DiffMaskGate, GateConfig,
            ...     VisionDiffMask)
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))
            >>> explainer = VisionDiffMask(model, gate)
            >>> attr = explainer.attribute_grid(torch.randn(1, 3, 32, 32), target=2)
            >>> attr.shape, bool(((attr >= 0) & (attr <= 1)).all())
            (torch.Size([1, 4, 4]), True)
        """
        images, grid = self._prepare(inputs, target)
        check_no_args(additional_forward_args, self.method_name)
        interface = self.adapter.require_tokens(self.method_name)
        check_index(layer, self.gate.config.num_states, "layer", "hidden states in the gate")
        prefix = self.adapter.prefix_tokens
        self.gate.to(images.device)

        def compute(batch: Tensor, batch_target: TargetType, _args: tuple[Any, ...]) -> Tensor:
            states, logits = interface.states(batch)
            if batch_target is not None:
                format_target(batch_target, batch.shape[0], logits.shape[-1], logits.device)
            patch_states = [s[:, prefix:] for s in states]
            return self.gate.keep_probability(patch_states, layer).reshape(-1, *grid)

        with torch.no_grad():
            maps = self._batched(images, target, None, internal_batch_size, compute, show_progress)
        return maps.to(images.dtype)
