"""RISE: Randomized Input Sampling for Explanation (Petsiuk, Das & Saenko, BMVC 2018).

Black-box and pixel-level: any forward function that returns logits will do. ``N`` random binary
grids of ``s x s`` cells (each cell kept with probability ``p``) are upsampled bilinearly to
``(s + 1) * ceil(H / s)`` by ``(s + 1) * ceil(W / s)`` pixels (as the authors' scikit-image
``resize(order=1, mode="reflect")``) and cropped to ``H x W`` at a random shift of up to one
cell, giving smooth masks ``M_i`` in ``[0, 1]``. With ``P_t`` the target's
softmax probability, the saliency is the Monte-Carlo estimate of ``E[P_t(I ⊙ M) M] / E[M]``:

    S = 1 / (N p) * sum_i P_t(I ⊙ M_i) M_i

(``E[M(x)] = p`` for every pixel, the paper's normalisation; the authors' code divides by
``N * p`` too).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from captum.attr import PerturbationAttribution
from torch import Tensor
from tqdm.auto import tqdm

from .._utils import (
    TargetType,
    check_number,
    check_positive_int,
    chunks,
    forward_logits,
    preserved_model_state,
    resolve_targets,
    select_args,
)
from ..base import PatchAttribution

__all__ = ["RISE", "generate_masks"]


class _MaskSampler:
    """The random part of RISE's masks (grids and shifts), drawn once; masks built on demand.

    Holding only the ``N x s x s`` grids and ``N`` shifts keeps memory small: 4000 full
    224x224 masks would take 800 MB.
    """

    def __init__(
        self,
        n_masks: int,
        image_size: tuple[int, int],
        grid_size: int,
        p: float,
        seed: int | None,
    ) -> None:
        check_positive_int(n_masks, "n_masks")
        check_positive_int(grid_size, "grid_size")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"`p` must be a probability in (0, 1], got {p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an int or None, got {seed!r}")
        self.height, self.width = int(image_size[0]), int(image_size[1])
        self.grid_size = grid_size
        self.cell = (math.ceil(self.height / grid_size), math.ceil(self.width / grid_size))
        generator = torch.Generator()
        generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed)
        # One row of uniforms per mask (grid cells, then the two shifts), drawn on the CPU: a
        # seed gives the same masks on every device, and mask i does not depend on n_masks.
        uniforms = torch.rand(
            n_masks, grid_size * grid_size + 2, generator=generator, dtype=torch.float64
        )
        self.grids = (uniforms[:, :-2] < p).reshape(n_masks, grid_size, grid_size)
        self.shift_y = (uniforms[:, -2] * self.cell[0]).long().clamp(max=self.cell[0] - 1)
        self.shift_x = (uniforms[:, -1] * self.cell[1]).long().clamp(max=self.cell[1] - 1)
        # Bilinear upsampling is separable: one interpolation matrix per axis.
        self.up_rows = _linear_upsampling(grid_size, (grid_size + 1) * self.cell[0])
        self.up_cols = _linear_upsampling(grid_size, (grid_size + 1) * self.cell[1])

    def masks(self, index: slice, device: torch.device | None = None) -> Tensor:
        """Masks ``index`` as a float32 tensor ``(n, H, W)`` in ``[0, 1]``."""
        grids = self.grids[index].to(device=device, dtype=torch.float32)
        rows = self.shift_y[index].to(device)[:, None] + torch.arange(self.height, device=device)
        cols = self.shift_x[index].to(device)[:, None] + torch.arange(self.width, device=device)
        # The crop keeps the rows of each axis' interpolation matrix that the shift selects.
        up_rows = self.up_rows.to(device=device, dtype=torch.float32)
        up_cols = self.up_cols.to(device=device, dtype=torch.float32)
        masks = torch.einsum("nhs,nst,nwt->nhw", up_rows[rows], grids, up_cols[cols])
        return masks.clamp(0, 1)


def _linear_upsampling(size: int, out_size: int) -> Tensor:
    """``(out_size, size)`` weights of linear interpolation from ``size`` to ``out_size`` samples
    as scikit-image's ``resize(order=1, mode="reflect")``, which RISE's authors use: pixel
    centres aligned (``x = (o + 0.5) * size / out_size - 0.5``) and coordinates outside
    ``[0, size - 1]`` mirrored about the edge samples."""
    coords = (torch.arange(out_size, dtype=torch.float64) + 0.5) * size / out_size - 0.5
    if size == 1:
        return torch.ones(out_size, 1, dtype=torch.float64)
    coords = coords.abs()
    coords = torch.where(coords > size - 1, 2 * (size - 1) - coords, coords)
    low = coords.floor().long().clamp(max=size - 2)
    high_weight = coords - low
    weights = torch.zeros(out_size, size, dtype=torch.float64)
    weights[torch.arange(out_size), low] = 1 - high_weight
    weights[torch.arange(out_size), low + 1] = high_weight
    return weights


def generate_masks(
    n_masks: int,
    image_size: tuple[int, int],
    grid_size: int = 7,
    p: float = 0.5,
    seed: int | None = 0,
    device: torch.device | str | None = None,
) -> Tensor:
    """The masks :class:`RISE` uses for these parameters, as ``(n_masks, H, W)`` in ``[0, 1]``.

    Equal arguments give the masks of ``RISE.attribute`` (useful to inspect them or to
    recompute the saliency). Memory is ``n_masks * H * W`` floats.

    Example::

        >>> from captum_gradmask.methods import generate_masks
        >>> masks = generate_masks(100, (32, 32), grid_size=4, p=0.5, seed=0)
        >>> masks.shape, bool(masks.min() >= 0), bool(masks.max() <= 1)
        (torch.Size([100, 32, 32]), True, True)
    """
    sampler = _MaskSampler(n_masks, image_size, grid_size, p, seed)
    return sampler.masks(slice(0, n_masks), torch.device(device) if device else None)


class RISE(PatchAttribution, PerturbationAttribution):
    r"""RISE saliency maps (pixel level, model-agnostic).

    Cost: ``n_masks`` forward passes per image (batched), plus one to find the predicted class
    when no target is given; no backward pass.

    Args:
        model: any callable ``model(images, *additional_forward_args)`` returning logits (a
            tensor, a Hugging Face output with ``.logits``, or a tuple). ``nn.Module`` models are
            put in eval mode for the call and restored afterwards.
        adapter: optional (no patch grid or attention layers are needed); resolved like every
            method's (:func:`~captum_gradmask.adapters.resolve_model`): beside the module it
            wraps, its ``forward`` is used (e.g. Hugging Face models at non-default image
            sizes); beside another callable, that callable is explained.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods import RISE
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> rise = RISE(model)
        >>> rise.attribute(torch.randn(2, 3, 32, 32), target=[1, 2], n_masks=50,
        ...     grid_size=4).shape
        torch.Size([2, 3, 32, 32])
    """

    method_name = "RISE"
    needs_adapter = False
    pixel_level = True

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        n_masks: int = 4000,
        grid_size: int = 7,
        p: float = 0.5,
        seed: int | None = 0,
        fill_value: float = 0.0,
        perturbations_per_eval: int = 32,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Attribute the target class to the input pixels with RISE.

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them).
            target: class per image: an int for all, a list or 1-D tensor with one per image;
                ``None`` (default) uses each image's predicted class.
            additional_forward_args: extra positional arguments for the forward function;
                tensors whose first dimension is the batch follow their image.
            n_masks: ``N``, random masks (default 4000, the paper's ImageNet/ResNet50
                setting); smaller values are faster and noisier.
            grid_size: ``s``, cells per side of the random grid (the paper: 7 for 224x224).
            p: probability that a cell is kept (the paper: 0.5).
            seed: seed of the masks (the same masks are used for every image of the call);
                ``None`` draws one from PyTorch's global generator.
            fill_value: value of masked-out pixels in normalised space,
                ``I ⊙ M + fill_value (1 - M)``. The default 0 is the paper's ``I ⊙ M`` (and
                GradMask's grey/mean-colour fill).
            perturbations_per_eval: masked images per forward pass; bounds memory.
            show_progress: show a progress bar over the batches of masked images.

        Returns:
            The ``(B, H, W)`` saliency (pixel level).

        Example::

            >>> import torch
            >>> from captum_gradmask.methods import RISE
            >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
            >>> RISE(model).attribute_grid(torch.randn(1, 3, 16, 16), n_masks=20, grid_size=4).shape
            torch.Size([1, 16, 16])
        """
        images, _ = self._prepare(inputs, target)
        check_positive_int(perturbations_per_eval, "perturbations_per_eval")
        check_number(fill_value, "fill_value")
        count, _, height, width = images.shape
        sampler = _MaskSampler(n_masks, (height, width), grid_size, p, seed)
        device = images.device
        extra = select_args(additional_forward_args, slice(None), count)
        fill = torch.as_tensor(fill_value, dtype=images.dtype, device=device)
        saliency = torch.zeros(count, height * width, dtype=torch.float32, device=device)

        with preserved_model_state(self.model), torch.inference_mode():
            logits = forward_logits(self.forward_func, images, extra)
            targets = resolve_targets(target, logits)
            # Pairs (mask i, image b) in mask-major order, so each batch needs few masks.
            batches = list(chunks(n_masks * count, perturbations_per_eval))
            for batch in tqdm(batches, desc="RISE masked passes", disable=not show_progress):
                first_mask, last_mask = batch.start // count, (batch.stop - 1) // count
                masks = sampler.masks(slice(first_mask, last_mask + 1), device)
                pair = torch.arange(batch.start, batch.stop, device=device)
                mask_index, owner = pair // count - first_mask, pair % count
                pair_masks = masks[mask_index][:, None].to(images.dtype)
                masked = images[owner] * pair_masks + fill * (1 - pair_masks)
                batch_extra = select_args(extra, owner, count)
                probs = torch.softmax(
                    forward_logits(self.forward_func, masked, batch_extra).float(), dim=-1
                )
                confidence = probs.gather(1, targets[owner][:, None])
                saliency.index_add_(0, owner, confidence * masks[mask_index].flatten(1))
            saliency = saliency / (n_masks * p)
        return saliency.reshape(count, height, width).to(images.dtype).clone()
