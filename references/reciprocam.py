"""ViT-ReciproCAM as its authors' code computes it, re-derived for one image.

The authors' pure-PyTorch implementation (``TorchViTReciproCAM`` in Intel's ``openvino-xai``
1.1.0) hooks the first LayerNorm of the last encoder block. The hook returns the LayerNorm's
output followed by ``h * w`` "mosaic" copies of it along the batch dimension: copy ``j`` keeps
the CLS token and the patch tokens weighted by a kernel centred on patch ``j`` (3x3 Gaussian
``[[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 16`` cut at the border, or one-hot), every other token
zero. The block adds its attention output to its *unmasked* input, which broadcasts over the
grown batch, so the residual of every copy is the original token sequence. The model's output
(logits) on copy ``j`` is patch ``j``'s score for every class.

Written out here with loops and with that same batch-growing hook, so that the library's
batched, per-token-set implementation is checked against an independent one. Beyond the
authors' code (one prefix token, square grid) it keeps ``prefix_tokens`` prefix tokens and takes
any ``grid``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

GAUSSIAN_3X3 = [[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]]


def mosaic(
    normed: Tensor, grid: tuple[int, int], prefix_tokens: int, gaussian: bool, keep_prefix: bool
) -> Tensor:
    """The ``h * w`` masked copies of one image's LayerNorm output ``normed`` ``(T, D)``."""
    height, width = grid
    copies = torch.zeros(height * width, *normed.shape, dtype=normed.dtype)
    for row in range(height):
        for col in range(width):
            j = row * width + col
            if keep_prefix:
                copies[j, :prefix_tokens] = normed[:prefix_tokens]
            if not gaussian:
                copies[j, prefix_tokens + j] = normed[prefix_tokens + j]
                continue
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    r, c = row + dr, col + dc
                    if 0 <= r < height and 0 <= c < width:
                        k = prefix_tokens + r * width + c
                        copies[j, k] = normed[k] * GAUSSIAN_3X3[dr + 1][dc + 1]
    return copies


def vit_reciprocam(
    logits: Callable[[Tensor], Tensor],
    norm: nn.Module,
    image: Tensor,
    grid: tuple[int, int],
    prefix_tokens: int = 1,
    gaussian: bool = True,
    keep_prefix: bool = True,
) -> Tensor:
    """Raw scores ``(classes, h, w)`` of one image ``(C, H, W)``.

    Args:
        logits: the model, ``logits(images) -> (B, classes)``.
        norm: the LayerNorm whose output is masked (the authors': the last block's first).
        image: one normalised image.
        grid: the patch grid ``(h, w)``.
        prefix_tokens: tokens before the patch tokens.
        gaussian: 3x3 Gaussian kernel (the authors' default) or one patch per copy.
        keep_prefix: keep the prefix tokens in every copy (the authors' default).
    """

    def grow_batch(_module: nn.Module, _args: object, output: Tensor) -> Tensor:
        assert output.shape[0] == 1, "the authors' hook explains one image at a time"
        copies = mosaic(output[0], grid, prefix_tokens, gaussian, keep_prefix)
        return torch.cat([output, copies.to(output.device)])

    handle = norm.register_forward_hook(grow_batch)
    try:
        with torch.no_grad():
            output = logits(image[None])
    finally:
        handle.remove()
    return output[1:].T.reshape(-1, *grid)
