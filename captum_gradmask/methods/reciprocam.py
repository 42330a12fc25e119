"""ViT-ReciproCAM (Byun & Lee, "ViT-ReciproCAM: Gradient and Attention-Free Visual Explanations
for Vision Transformer", arXiv 2310.02588, 2023), computed as its authors' code computes it
(``TorchViTReciproCAM`` of Intel's ``openvino-xai`` 1.1.0).

Gradient- and attention-free. In the target encoder block (by default the last), the output of
the block's first LayerNorm (the attention's input) is computed once; then, for every patch
``j``, a new token set keeps the prefix tokens (CLS, distillation, registers) and the 3x3
neighbourhood of ``j`` weighted by the kernel ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16`` (cut at
the grid border, not renormalised; ``gaussian=False``: only patch token ``j``), all other patch
tokens set to zero. The block's residual keeps the unmasked block input. Each token set runs
through the rest of the block, the blocks after it and the head; the target's logit on token
set ``j`` is the score of patch ``j``, and the map is min-max normalised to ``[0, 1]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

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
_SITES = ("norm-output", "block-input")
_SCORES = ("logit", "probability")


class ViTReciproCAM(PatchAttribution, PerturbationAttribution):
    r"""ViT-ReciproCAM maps for Vision Transformers.

    Needs the adapter's token interface (``embed``, ``blocks``, ``head``) and, for the default
    masking site, each block's attention LayerNorm (``attention_norms``); the built-in adapters
    provide both for every pre-norm family with a token interface (Hugging Face ViT/DeiT,
    Dinov2, BEiT, CLIP/SigLIP towers; timm ViT and EVA without rotary embeddings;
    torchvision; OpenCLIP). Cost per image: one forward pass up to the
    target block, then ``N = h * w`` passes (one per patch, batched) through the target block,
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
        >>> cam.attribute_grid(torch.randn(2, 3, 32, 32), gaussian=False).shape
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
        gaussian: bool = True,
        site: Literal["norm-output", "block-input"] = "norm-output",
        score: Literal["logit", "probability"] = "logit",
        normalize: bool = True,
        perturbations_per_eval: int = 32,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Attribute the target class to the input patches with ViT-ReciproCAM.

        The defaults are those of the authors' code (``TorchViTReciproCAM`` in
        ``openvino-xai`` 1.1.0): last block, 3x3 Gaussian kernel, prefix tokens kept, the
        first LayerNorm's output masked, the logit as score, min-max normalisation.

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them); ``H``
                and ``W`` must be multiples of the patch size.
            target: class per image: an int for all, a list or 1-D tensor with one per image;
                ``None`` (default) uses each image's predicted class.
            additional_forward_args: must be ``None``: the masked token sets run through the
                adapter's token interface, which takes no extra arguments.
            layer: index of the target encoder block whose tokens are masked (negative
                indices count from the end). Default ``-1``: the last block, as the authors'
                ``openvino-xai`` code (their stand-alone script uses ``-2``).
            gaussian: ``True`` (default, the authors' default): token set ``j`` keeps the 3x3
                neighbourhood of ``j`` weighted by the Gaussian kernel
                ``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16``; ``False``: only patch ``j``.
            site: where the tokens are masked. ``"norm-output"`` (default, the authors'): the
                output of the target block's first LayerNorm, i.e. the attention's input,
                while the block's residual keeps the unmasked block input (a masked token is
                zero there). Needs the adapter's ``attention_norms``. ``"block-input"``: the
                tokens entering the target block (the residual stream); they then pass through
                the LayerNorm (a masked token becomes its bias) and the residual carries only
                the kept tokens. Needs only ``embed``, ``blocks`` and ``head``, so it works
                with any adapter that has a token interface.
            score: ``"logit"`` (default, the authors'): the target's logit on each token set;
                ``"probability"``: its softmax probability.
            normalize: min-max normalise each map to ``[0, 1]`` (a constant map becomes all
                zeros). The authors' code scales the same map to ``0..255`` and truncates it to
                ``uint8`` for display. ``False`` returns the raw scores.
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
            >>> cam = ViTReciproCAM(model)
            >>> cam.attribute_grid(torch.randn(1, 3, 32, 32), target=1).shape
            torch.Size([1, 4, 4])
            >>> raw = cam.attribute_grid(torch.randn(1, 3, 32, 32), target=1,
            ...     site="block-input", score="probability", normalize=False)
            >>> bool(((raw > 0) & (raw < 1)).all())
            True
        """
        images, grid = self._prepare(inputs, target)
        check_positive_int(perturbations_per_eval, "perturbations_per_eval")
        check_no_args(additional_forward_args, self.method_name)
        if site not in _SITES:
            raise ValueError(f"`site` must be one of {_SITES}, got {site!r}")
        if score not in _SCORES:
            raise ValueError(f"`score` must be one of {_SCORES}, got {score!r}")
        interface = self.adapter.require_tokens(self.method_name)
        start = check_index(layer, len(interface.blocks), "layer", "encoder blocks")
        norm = None
        if site == "norm-output":
            if interface.attention_norms is None:
                raise ValueError(
                    f"{self.method_name} with `site='norm-output'` needs the adapter's "
                    f"`attention_norms` (each block's LayerNorm before attention); adapter "
                    f"{self.adapter.name!r} has none: give them to the adapter, or pass "
                    "`site='block-input'`"
                )
            norm = interface.attention_norms[start]

        def compute(batch: Tensor, batch_target: TargetType, _args: tuple[Any, ...]) -> Tensor:
            return self._scores(
                batch,
                batch_target,
                grid,
                start,
                gaussian,
                norm,
                score == "probability",
                perturbations_per_eval,
                show_progress,
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
        norm: nn.Module | None,
        probability: bool,
        batch_size: int,
        show_progress: bool,
    ) -> Tensor:
        """The target's score on each patch's token set: ``(B, h, w)`` raw scores.

        ``norm`` is the target block's attention LayerNorm whose output is masked; ``None``
        masks the block's input instead.
        """
        interface = self.adapter.require_tokens(self.method_name)
        prefix = self.adapter.prefix_tokens
        count, patches = images.shape[0], grid[0] * grid[1]
        tokens = interface.embed(images)
        check_token_count(tokens.shape[1], prefix, grid)
        for block in interface.blocks[:start]:
            tokens = block(tokens)
        targets = resolve_targets(target, interface.run(tokens, start))
        # Row j: the weight of every token (prefix tokens kept) in token set j.
        weights = spatial_weights(grid, gaussian, device=tokens.device).to(tokens.dtype)
        weights = torch.cat([weights.new_ones(patches, prefix), weights], dim=1)
        scores = torch.empty(count * patches, dtype=torch.float32, device=tokens.device)
        batches = list(chunks(count * patches, batch_size))
        for batch in tqdm(batches, desc=self.method_name, disable=not show_progress):
            pair = torch.arange(batch.start, batch.stop, device=tokens.device)
            owner, patch = pair // patches, pair % patches
            scale = weights[patch][:, :, None]
            if norm is None:
                logits = interface.run(tokens[owner] * scale, start)
            else:
                with _scaled_output(norm, scale):
                    hidden = interface.blocks[start](tokens[owner])
                logits = interface.run(hidden, start + 1)
            logits = logits.float()
            if probability:
                logits = torch.softmax(logits, dim=-1)
            scores[batch] = logits.gather(1, targets[owner][:, None]).squeeze(1)
        return scores.reshape(count, *grid)


@contextlib.contextmanager
def _scaled_output(module: nn.Module, scale: Tensor) -> Iterator[None]:
    """Multiply ``module``'s output by ``scale`` while the block runs; the module must run once."""
    calls = []

    def hook(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
        calls.append(output.shape)
        return output * scale

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if len(calls) != 1:
        raise RuntimeError(
            f"the adapter's attention LayerNorm of the target block ran {len(calls)} times in "
            "the block's forward pass (expected once): its `attention_norms` do not name the "
            "modules the blocks call"
        )


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
