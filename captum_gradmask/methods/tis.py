"""TIS: Transformer Input Sampling (Englebert et al., "Explaining through Transformer Input
Sampling", ICCV Workshops 2023; code: ``aenglebert/Transformer_Input_Sampling``).

RISE's idea with the transformer's own input: instead of masking pixels, TIS runs the model on
subsets of its patch tokens (dropped from the sequence, not filled), and the subsets come from
the model's view of the image rather than from random grids. For one image with ``N`` patch
tokens, ``P`` prefix tokens (CLS, distillation, registers) and ``L`` encoder blocks of width
``D``:

1. one forward pass records every block's output; the patch tokens' activations form ``L * D``
   channels, each a vector over the ``N`` tokens;
2. k-means (Lloyd's algorithm, Euclidean) groups the channels into ``M`` clusters; the initial
   centroids are ``M`` distinct channels drawn with the seed;
3. mask ``i`` keeps the ``K = floor(r * N)`` tokens where centroid ``i`` is largest;
4. each token set (the prefix tokens plus the ``K`` kept patch tokens, position embeddings
   added before the selection) runs through the blocks and the head; its score ``s_i`` is the
   target's softmax probability;
5. the saliency of patch ``j`` is the mean score of the masks that keep it,
   ``S_j = sum_i s_i m_ij / sum_i m_ij``, min-max normalised to ``[0, 1]``.
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
    check_no_args,
    check_positive_int,
    check_token_count,
    chunks,
    resolve_targets,
)
from ..adapters import TokenInterface, ViTAdapter
from ..base import PatchAttribution

__all__ = ["TransformerInputSampling"]


class TransformerInputSampling(PatchAttribution, PerturbationAttribution):
    r"""Transformer Input Sampling (TIS) maps for Vision Transformers.

    Needs the adapter's token interface (``embed``, ``blocks``, ``head``), which the built-in
    adapters for Hugging Face ViT/DeiT and timm provide; no attention mask is needed, since
    every token set of a call has the same length. Cost per image: one full forward pass (the
    activations, and the predicted class when no target is given), k-means on its ``L * D``
    activation channels, then ``n_masks`` forward passes of the prefix tokens plus
    ``floor(tokens_ratio * N)`` patch tokens (batched); no backward pass.

    Args:
        model: a Hugging Face ViT/DeiT, a timm ``VisionTransformer``, or any callable with an
            ``adapter`` that has a token interface.
        adapter: the model's adapter; by default found with
            :func:`captum_gradmask.adapters.get_adapter`.

    Raises:
        ValueError: the adapter has no token interface (the error names the model).

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods import TransformerInputSampling
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> tis = TransformerInputSampling(model)
        >>> tis.attribute(torch.randn(2, 3, 32, 32), target=[0, 2], n_masks=16).shape
        torch.Size([2, 3, 32, 32])
    """

    method_name = "TIS"

    def __init__(
        self, model: nn.Module | Callable[..., Any], adapter: ViTAdapter | None = None
    ) -> None:
        super().__init__(model, adapter)
        described = type(self.model).__name__ if self.model is not None else "this model"
        self.adapter.require_tokens(f"TIS (Transformer Input Sampling) on {described}")

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        n_masks: int = 1024,
        tokens_ratio: float = 0.5,
        normalize: bool = True,
        kmeans_max_iter: int = 100,
        kmeans_tol: float = 1e-4,
        seed: int | None = 0,
        perturbations_per_eval: int = 128,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Attribute the target class to the input patches with TIS.

        The defaults are the authors' (``aenglebert/Transformer_Input_Sampling``,
        ``config/method/tis.yaml`` and ``tis/tis.py``; k-means settings from the
        ``fast-pytorch-kmeans`` 0.1.6 release their code uses).

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them); ``H``
                and ``W`` must be multiples of the patch size.
            target: class per image: an int for all, a list or 1-D tensor with one per image;
                ``None`` (default) uses each image's predicted class.
            additional_forward_args: must be ``None``: the token sets run through the
                adapter's token interface, which takes no extra arguments.
            n_masks: ``M``, k-means clusters and so token sets per image (the authors' 1024).
                At most the number of activation channels ``L * D`` (2304 for ViT-Ti/16).
            tokens_ratio: ``r``, the share of patch tokens each set keeps,
                ``floor(r * N)`` of them (the authors' 0.5).
            normalize: min-max normalise each map to ``[0, 1]`` (the authors' default; a
                constant map becomes all zeros). ``False`` returns the mean scores.
            kmeans_max_iter: at most this many k-means iterations (fast-pytorch-kmeans: 100).
            kmeans_tol: k-means stops when the centroids move less than this in summed
                squared distance (fast-pytorch-kmeans: 1e-4).
            seed: seed of the initial centroids (the same channels for every image of the
                call, so an image's map does not depend on its batch); ``None`` draws one from
                PyTorch's global generator.
            perturbations_per_eval: token sets per forward pass (the authors' batch of 128);
                bounds memory.
            internal_batch_size: images per batch (``None``: all at once).
            show_progress: show a progress bar over the batches of token sets.

        Returns:
            The ``(B, h, w)`` map: each patch's score.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.methods import TransformerInputSampling
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> saliency = TransformerInputSampling(model).attribute_grid(
            ...     torch.randn(1, 3, 32, 32), target=1, n_masks=16)
            >>> saliency.shape, float(saliency.min()), float(saliency.max())
            (torch.Size([1, 4, 4]), 0.0, 1.0)
        """
        images, grid = self._prepare(inputs, target)
        check_no_args(additional_forward_args, self.method_name)
        sampling = _Sampling.checked(n_masks, tokens_ratio, kmeans_max_iter, kmeans_tol, seed)
        check_positive_int(perturbations_per_eval, "perturbations_per_eval")
        interface = self.adapter.require_tokens(self.method_name)
        prefix = self.adapter.prefix_tokens

        def compute(batch: Tensor, batch_target: TargetType, _args: tuple[Any, ...]) -> Tensor:
            tokens, activations, logits = _activations(interface, batch, prefix, grid)
            targets = resolve_targets(batch_target, logits)
            subsets = sampling.subsets(activations)
            scores = self._scores(
                tokens, targets, subsets, prefix, perturbations_per_eval, show_progress
            )
            return _mean_score_per_token(scores, subsets, grid[0] * grid[1]).reshape(-1, *grid)

        with torch.inference_mode():
            maps = self._batched(images, target, None, internal_batch_size, compute)
            if normalize:
                low = maps.amin(dim=(1, 2), keepdim=True)
                span = maps.amax(dim=(1, 2), keepdim=True) - low
                maps = torch.where(span > 0, (maps - low) / span.clamp(min=1e-30), 0.0)
        return maps.to(images.dtype).clone()

    def token_subsets(
        self,
        inputs: Tensor | tuple[Tensor],
        *,
        n_masks: int = 1024,
        tokens_ratio: float = 0.5,
        kmeans_max_iter: int = 100,
        kmeans_tol: float = 1e-4,
        seed: int | None = 0,
        internal_batch_size: int | None = None,
    ) -> Tensor:
        """The patch tokens each of :meth:`attribute_grid`'s token sets keeps.

        Equal arguments give the sets ``attribute_grid`` runs (useful to inspect them or to
        recompute the saliency).

        Returns:
            ``(B, n_masks, floor(tokens_ratio * N))`` indices of the kept patches (``0..N-1``,
            in the grid's row-major order; prefix tokens not counted), largest centroid
            value first.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.methods import TransformerInputSampling
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> TransformerInputSampling(model).token_subsets(torch.randn(2, 3, 32, 32),
            ...     n_masks=16).shape
            torch.Size([2, 16, 8])
        """
        images, grid = self._prepare(inputs, None)
        sampling = _Sampling.checked(n_masks, tokens_ratio, kmeans_max_iter, kmeans_tol, seed)
        interface = self.adapter.require_tokens(self.method_name)
        prefix = self.adapter.prefix_tokens

        def compute(batch: Tensor, _target: TargetType, _args: tuple[Any, ...]) -> Tensor:
            return sampling.subsets(_activations(interface, batch, prefix, grid)[1])

        with torch.inference_mode():
            return self._batched(images, None, None, internal_batch_size, compute).clone()

    def _scores(
        self,
        tokens: Tensor,
        targets: Tensor,
        subsets: Tensor,
        prefix: int,
        batch_size: int,
        show_progress: bool,
    ) -> Tensor:
        """The target's softmax probability on each token set: ``(B, M)``."""
        interface = self.adapter.require_tokens(self.method_name)
        count, masks, _kept = subsets.shape
        scores = torch.empty(count * masks, dtype=torch.float32, device=tokens.device)
        batches = list(chunks(count * masks, batch_size))
        for batch in tqdm(batches, desc=self.method_name, disable=not show_progress):
            pair = torch.arange(batch.start, batch.stop, device=tokens.device)
            owner, mask = pair // masks, pair % masks
            patches = subsets[owner, mask] + prefix
            selected = torch.cat([tokens[owner, :prefix], tokens[owner[:, None], patches]], dim=1)
            probs = torch.softmax(interface.run(selected).float(), dim=-1)
            scores[batch] = probs.gather(1, targets[owner][:, None]).squeeze(1)
        return scores.reshape(count, masks)


class _Sampling:
    """The checked options of steps 2-3 (k-means of the channels, top tokens per centroid)."""

    def __init__(
        self, n_masks: int, tokens_ratio: float, max_iter: int, tol: float, seed: int
    ) -> None:
        self.n_masks, self.tokens_ratio = n_masks, tokens_ratio
        self.max_iter, self.tol, self.seed = max_iter, tol, seed

    @classmethod
    def checked(
        cls, n_masks: int, tokens_ratio: float, max_iter: int, tol: float, seed: int | None
    ) -> _Sampling:
        check_positive_int(n_masks, "n_masks")
        check_positive_int(max_iter, "kmeans_max_iter")
        if (
            isinstance(tokens_ratio, bool)
            or not isinstance(tokens_ratio, (int, float))
            or not 0 < tokens_ratio <= 1
        ):
            raise ValueError(f"`tokens_ratio` must be a number in (0, 1], got {tokens_ratio!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"`kmeans_tol` must be a number >= 0, got {tol!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an int or None, got {seed!r}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return cls(n_masks, float(tokens_ratio), max_iter, float(tol), seed)

    def subsets(self, activations: Tensor) -> Tensor:
        """``(B, N, C)`` patch-token activations -> ``(B, M, K)`` kept-patch indices."""
        _count, patches, channels = activations.shape
        if self.n_masks > channels:
            raise ValueError(
                f"`n_masks`={self.n_masks} exceeds the {channels} activation channels that "
                f"k-means clusters (blocks x hidden size); valid values are 1..{channels}"
            )
        kept = int(self.tokens_ratio * patches)
        if kept < 1:
            raise ValueError(
                f"`tokens_ratio`={self.tokens_ratio} keeps no patch of the {patches}-patch "
                f"grid; it must be at least 1/{patches}"
            )
        # fast-pytorch-kmeans 0.1.6 starts from distinct data points (here: channels); drawn
        # on the CPU so that a seed gives the same start on every device.
        generator = torch.Generator().manual_seed(self.seed)
        start = torch.randperm(channels, generator=generator)[: self.n_masks]
        # Channels are the points, tokens their coordinates; at least float32 for the
        # distances (the authors run k-means in the activations' float32).
        points = activations.transpose(1, 2).to(
            torch.promote_types(activations.dtype, torch.float32)
        )
        subsets = []
        for image_points in points:
            centroids = _kmeans(image_points, start.to(points.device), self.max_iter, self.tol)
            subsets.append(centroids.topk(kept, dim=-1).indices)
        return torch.stack(subsets)


def _activations(
    interface: TokenInterface, images: Tensor, prefix: int, grid: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 1: the embedded tokens ``(B, P + N, D)``, the patch tokens' activations of all
    blocks ``(B, N, L * D)`` and the logits of the full image."""
    states, logits = interface.states(images)
    check_token_count(states[0].shape[1], prefix, grid)
    return states[0], torch.cat(states[1:], dim=-1)[:, prefix:], logits


def _kmeans(points: Tensor, start: Tensor, max_iter: int, tol: float) -> Tensor:
    """Lloyd's k-means of ``points`` ``(C, N)`` from the points ``start``: centroids ``(M, N)``.

    As fast-pytorch-kmeans 0.1.6 (Euclidean mode, full batch): each point joins the centroid
    of largest ``2 x.c - |x|^2 - |c|^2``; each centroid moves to its members' mean; it stops
    after the iteration whose summed squared move is at most ``tol``. A cluster left empty
    keeps its centroid (that release zeroes it, whose top tokens are then an arbitrary
    tie-break).
    """
    centroids = points[start]
    squared = points.pow(2).sum(-1)[:, None]
    clusters = torch.arange(len(start), device=points.device)
    for _ in range(max_iter):
        similarity = 2 * points @ centroids.T - squared - centroids.pow(2).sum(-1)[None]
        members = (similarity.argmax(dim=-1)[None] == clusters[:, None]).to(points.dtype)
        counts = members.sum(-1, keepdim=True)
        means = torch.where(counts > 0, members @ points / counts.clamp(min=1), centroids)
        moved = (means - centroids).pow(2).sum()
        centroids = means
        if moved <= tol:
            break
    return centroids


def _mean_score_per_token(scores: Tensor, subsets: Tensor, patches: int) -> Tensor:
    """Step 5 before normalisation: ``(B, N)`` mean score of the sets that keep each patch; a
    patch that no set keeps gets 0 (no evidence for it)."""
    masks = torch.zeros(*scores.shape, patches, dtype=scores.dtype, device=scores.device)
    masks.scatter_(2, subsets, 1.0)
    coverage = masks.sum(1)
    total = torch.einsum("bm,bmn->bn", scores, masks)
    return torch.where(coverage > 0, total / coverage.clamp(min=1), 0.0)
