"""ViT-ReciproCAM (Byun & Lee, "ViT-ReciproCAM: Gradient and Attention-Free Visual Explanations
for Vision Transformer", arXiv 2310.02588, 2023).

Gradient- and attention-free. The tokens entering a target encoder block are computed once; then,
for every patch ``j``, a new token set keeps the prefix tokens (CLS, distillation, registers) and
only patch token ``j`` (all other patch tokens set to zero) or, with ``gaussian=True``, the 3x3
neighbourhood of ``j`` weighted by the kernel ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16`` (cut at
the grid border, not renormalised). Each token set runs through the target block, the blocks
after it and the head; the target's softmax probability on token set ``j`` is the score of patch
``j``, and the map is min-max normalised to ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from captum.attr import PerturbationAttribution
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._utils import (
    TargetType,
    check_index,
    check_no_args,
    check_positive_int,
    check_token_count,
    chunks,
    resolve_targets,
)
from ..adapters import ViTAdapter
from ..base import PatchAttribution

__all__ = ["ViTReciproCAM", "spatial_weights"]

_GAUSSIAN_3X3 = ((1 / 16, 1 / 8, 1 / 16), (1 / 8, 1 / 4, 1 / 8), (1 / 16, 1 / 8, 1 / 16))


class ViTReciproCAM(PatchAttribution, PerturbationAttribution):
    r"""ViT-ReciproCAM maps for Vision Transformers.

    Needs the adapter's token interface (``embed``, ``blocks``, ``head``), which the built-in
    adapters for Hugging Face ViT/DeiT and timm provide. Cost per image: one forward pass up to
    the target block, then ``N = h * w`` passes (one per patch, batched) through the target block,
    the blocks after it and the head; no backward pass.

    Args:
        model: a Hugging Face ViT/DeiT, a timm ``VisionTransformer``, or any callable returning
            logits when ``adapter`` is given.
        adapter: the model's adapter with the token interface; by default found with
            :func:`captum_gradmask.adapters.get_adapter`.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods import ViTReciproCAM
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> cam = ViTReciproCAM(model)
        >>> cam.attribute(torch.randn(2, 3, 32, 32), target=[0, 2]).shape
        torch.Size([2, 3, 32, 32])
        >>> cam.attribute_grid(torch.randn(2, 3, 32, 32), gaussian=True).shape
        torch.Size([2, 4, 4])
    """

    method_name = "ViT-ReciproCAM"

    def __init__(
        self, model: nn.Module | Callable[..., Any], adapter: ViTAdapter | None = None
    ) -> None:
        super().__init__(model, adapter)
        self.adapter.require_tokens(self.method_name)

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        layer: int = -1,
        gaussian: bool = False,
        normalize: bool = True,
        perturbations_per_eval: int = 32,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Attribute the target class to the input patches with ViT-ReciproCAM.

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them); ``H``
                and ``W`` must be multiples of the patch size.
            target: class per image: an int for all, a list or 1-D tensor with one per image;
                ``None`` (default) uses each image's predicted class.
            additional_forward_args: must be ``None``: the masked token sets run through the
                adapter's token interface, which takes no extra arguments.
            layer: index of the target encoder block whose input tokens are masked (negative
                indices count from the end). Default ``-1``: the last block, the default of the
                authors' OpenVINO/OTX implementation (their stand-alone script uses ``-2``).
            gaussian: ``False`` (default): token set ``j`` keeps only patch ``j`` ("ViT-
                ReciproCAM"); ``True``: it keeps the 3x3 neighbourhood of ``j`` weighted by the
                Gaussian kernel ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16`` ("ViT-ReciproCAM
                3x3", the paper's better-scoring variant).
            normalize: min-max normalise each map to ``[0, 1]`` as the paper does (a constant
                map becomes all zeros). ``False`` returns the raw softmax probabilities.
            perturbations_per_eval: token sets per forward pass; bounds memory.
            internal_batch_size: images per batch (``None``: all at once).
            show_progress: show a progress bar over the batches of token sets.

        Returns:
            The ``(B, h, w)`` map: each patch's score.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.methods import ViTReciproCAM
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> ViTReciproCAM(model).attribute_grid(torch.randn(1, 3, 32, 32), target=1).shape
            torch.Size([1, 4, 4])
        """
        images, grid = self._prepare(inputs, target)
        check_positive_int(perturbations_per_eval, "perturbations_per_eval")
        check_no_args(additional_forward_args, self.method_name)
        interface = self.adapter.require_tokens(self.method_name)
        start = check_index(layer, len(interface.blocks), "layer", "encoder blocks")

        def compute(batch: Tensor, batch_target: TargetType, _args: tuple[Any, ...]) -> Tensor:
            return self._scores(
                batch, batch_target, grid, start, gaussian, perturbations_per_eval, show_progress
            )

        with torch.inference_mode():
            maps = self._batched(images, target, None, internal_batch_size, compute)
            if normalize:
                low = maps.amin(dim=(1, 2), keepdim=True)
                span = maps.amax(dim=(1, 2), keepdim=True) - low
                maps = torch.where(span > 0, (maps - low) / span.clamp(min=1e-30), 0.0)
        return maps.to(images.dtype).clone()

    def _scores(
        self,
        images: Tensor,
        target: TargetType,
        grid: tuple[int, int],
        start: int,
        gaussian: bool,
        batch_size: int,
        show_progress: bool,
    ) -> Tensor:
        """The target's softmax on each patch's token set: ``(B, h, w)`` raw scores."""
        interface = self.adapter.require_tokens(self.method_name)
        prefix = self.adapter.prefix_tokens
        count, patches = images.shape[0], grid[0] * grid[1]
        tokens = interface.embed(images)
        check_token_count(tokens.shape[1], prefix, grid)
        for block in interface.blocks[:start]:
            tokens = block(tokens)
        targets = resolve_targets(target, interface.run(tokens, start))
        weights = spatial_weights(grid, gaussian, device=tokens.device).to(tokens.dtype)
        scores = torch.empty(count * patches, dtype=torch.float32, device=tokens.device)
        batches = list(chunks(count * patches, batch_size))
        for batch in tqdm(batches, desc=self.method_name, disable=not show_progress):
            pair = torch.arange(batch.start, batch.stop, device=tokens.device)
            owner, patch = pair // patches, pair % patches
            source = tokens[owner]
            masked = torch.cat(
                [source[:, :prefix], source[:, prefix:] * weights[patch][:, :, None]], dim=1
            )
            probs = torch.softmax(interface.run(masked, start).float(), dim=-1)
            scores[batch] = probs.gather(1, targets[owner][:, None]).squeeze(1)
        return scores.reshape(count, *grid)


def spatial_weights(
    grid: tuple[int, int], gaussian: bool = False, device: torch.device | str | None = None
) -> Tensor:
    """Per-patch token weights ``(N, N)``: row ``j`` weighs the patch tokens of token set ``j``.

    Without ``gaussian`` the rows are one-hot (token set ``j`` keeps only patch ``j``). With it,
    row ``j`` holds the 3x3 Gaussian kernel centred on ``j`` on the ``h x w`` grid, cut at the
    border (weights that fall outside are dropped, the rest is not renormalised).

    Example::

        >>> from captum_gradmask.methods.reciprocam import spatial_weights
        >>> spatial_weights((3, 3), gaussian=True)[4].reshape(3, 3)
        tensor([[0.0625, 0.1250, 0.0625],
                [0.1250, 0.2500, 0.1250],
                [0.0625, 0.1250, 0.0625]])
    """
    height, width = grid
    patches = height * width
    if not gaussian:
        return torch.eye(patches, device=device)
    kernel = torch.tensor(_GAUSSIAN_3X3, device=device)
    padded = torch.zeros(patches, height + 2, width + 2, device=device)
    for j in range(patches):
        row, col = divmod(j, width)
        padded[j, row : row + 3, col : col + 3] = kernel
    return padded[:, 1:-1, 1:-1].reshape(patches, patches)
