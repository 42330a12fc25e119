"""Image and token operations shared by the attribution methods and the metrics.

Private: methods and metrics import from here (neither imports the other); the public names
are re-exported where users meet them (:mod:`captum_gradmask.metrics` for the blur and the
boxes, :mod:`captum_gradmask.methods.captum_baselines` for the patch feature mask and the
token/grid reshapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_gradmask._utils import check_positive_int

__all__ = [
    "CHANNEL_REDUCTIONS",
    "ChannelReduction",
    "boxes_to_mask",
    "check_channel_reduction",
    "gaussian_blur",
    "grid_to_tokens",
    "patch_feature_mask",
    "pixel_masks",
    "reduce_channels",
    "resize_boxes",
    "tokens_to_grid",
    "upsample_grid",
]

#: How attributions ``(B, C, H, W)`` become one map per image: ``"sum"`` (signed),
#: ``"abs_sum"`` (sum of absolute values), or ``"none"`` (channels kept).
ChannelReduction = Literal["sum", "abs_sum", "none"]
CHANNEL_REDUCTIONS: tuple[str, ...] = ("sum", "abs_sum", "none")


def check_channel_reduction(
    reduction: Any, allowed: Sequence[str] = CHANNEL_REDUCTIONS
) -> ChannelReduction:
    """``reduction`` if it is one of ``allowed``, else a ``ValueError`` naming them."""
    if reduction not in allowed:
        raise ValueError(f"`channel_reduction` must be one of {tuple(allowed)}, got {reduction!r}")
    return reduction


def reduce_channels(
    attributions: Tensor,
    reduction: ChannelReduction = "sum",
    allowed: Sequence[str] = CHANNEL_REDUCTIONS,
) -> Tensor:
    """``(B, C, H, W)`` attributions to ``(B, 1, H, W)`` by ``reduction`` (``"none"``: as they
    are); ``allowed`` names the reductions the caller accepts.

    Example::

        >>> import torch
        >>> from captum_gradmask._ops import reduce_channels
        >>> reduce_channels(torch.tensor([[[[1.0]], [[-3.0]]]]), "abs_sum").flatten().tolist()
        [4.0]
    """
    check_channel_reduction(reduction, allowed)
    if reduction == "none":
        return attributions
    if reduction == "abs_sum":
        attributions = attributions.abs()
    return attributions.sum(dim=1, keepdim=True)


BoxesLike = Tensor | Sequence[Sequence[float]]
SizeLike = tuple[int, int]


# --- blur ---------------------------------------------------------------------------------


def gaussian_blur(inputs: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Blur each channel with the Gaussian kernel RISE uses for its insertion baseline.

    The kernel is what RISE builds: a centred unit impulse on a ``kernel_size`` square filtered
    by a Gaussian of standard deviation ``sigma`` (truncated at 4 sigma, borders reflected, as
    ``scipy.ndimage.gaussian_filter`` does), so it sums to 1 but is flatter than a sampled
    Gaussian when ``sigma`` is large for the kernel. It is applied with zero padding of
    ``kernel_size // 2`` (``same`` size for odd kernels).

    Args:
        inputs: ``(B, C, H, W)`` images.
        kernel_size: side of the square kernel (positive, odd).
        sigma: standard deviation in pixels (positive).

    Returns:
        The blurred images, same shape, dtype and device.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import gaussian_blur
        >>> blurred = gaussian_blur(torch.rand(2, 3, 32, 32), kernel_size=11, sigma=5.0)
        >>> blurred.shape
        torch.Size([2, 3, 32, 32])
    """
    kernel_size = check_positive_int(kernel_size, "blur_kernel_size")
    if kernel_size % 2 == 0:
        raise ValueError(f"`blur_kernel_size` must be odd, got {kernel_size}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma > 0:
        raise ValueError(f"`blur_sigma` must be a positive number, got {sigma!r}")
    kernel_1d = _reflected_gaussian_impulse(kernel_size, float(sigma))
    kernel = torch.outer(kernel_1d, kernel_1d).to(device=inputs.device, dtype=inputs.dtype)
    channels = inputs.shape[1]
    weight = kernel.expand(channels, 1, kernel_size, kernel_size)
    return F.conv2d(inputs, weight, padding=kernel_size // 2, groups=channels)


def _reflected_gaussian_impulse(size: int, sigma: float) -> Tensor:
    """1-D Gaussian filter (radius ``round(4 sigma)``, mirrored borders) of a centred impulse."""
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = weights / weights.sum()
    out = torch.zeros(size, dtype=torch.float64)
    centre = size // 2
    for i in range(size):
        for offset, weight in zip(range(-radius, radius + 1), weights.tolist(), strict=True):
            j = i + offset
            # Half-sample symmetric extension (d c b a | a b c d | d c b a), repeated as needed.
            period = 2 * size
            j %= period
            if j >= size:
                j = period - 1 - j
            if j == centre:
                out[i] += weight
    return out.float()


# --- patch grids and tokens -----------------------------------------------------------


def upsample_grid(grid_map: Tensor, size: tuple[int, int], channels: int) -> Tensor:
    """Nearest-neighbour upsampling of ``(B, h, w)`` patch maps to ``(B, channels, H, W)``."""
    up = F.interpolate(grid_map.unsqueeze(1), size=size, mode="nearest")
    return up.expand(-1, channels, -1, -1).contiguous()


def pixel_masks(masks: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """Nearest upsampling of ``(n, h, w)`` patch masks to ``(n, 1, H, W)`` pixel masks."""
    return masks.repeat_interleave(patch_size[0], dim=1).repeat_interleave(patch_size[1], dim=2)[
        :, None
    ]


def patch_feature_mask(
    image_size: tuple[int, int], patch_size: tuple[int, int], device: torch.device | None = None
) -> Tensor:
    """A ``(1, 1, H, W)`` long mask giving each pixel the id of its patch, row-major.

    Patch ``(r, c)`` of an ``h x w`` grid has id ``r * w + c``; the mask broadcasts over the
    batch and the channels, so Captum treats each patch as one feature.

    Example::

        >>> from captum_gradmask.methods.captum_baselines import patch_feature_mask
        >>> patch_feature_mask((4, 6), (2, 2))[0, 0]
        tensor([[0, 0, 1, 1, 2, 2],
                [0, 0, 1, 1, 2, 2],
                [3, 3, 4, 4, 5, 5],
                [3, 3, 4, 4, 5, 5]])
    """
    height, width = int(image_size[0]), int(image_size[1])
    ph, pw = int(patch_size[0]), int(patch_size[1])
    if height % ph or width % pw:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}"
        )
    rows, cols = height // ph, width // pw
    ids = torch.arange(rows * cols, device=device).reshape(1, 1, rows, cols)
    return ids.repeat_interleave(ph, dim=2).repeat_interleave(pw, dim=3)


def tokens_to_grid(tokens: Tensor, prefix_tokens: int, grid: tuple[int, int]) -> Tensor:
    """ViT tokens ``(B, P + h*w, D)`` to a feature map ``(B, D, h, w)``, prefix tokens dropped.

    Patch token ``k`` (counting after the prefix) lands at row ``k // w``, column ``k % w``:
    the row-major order of the patch embedding. This is the ``reshape_transform`` that
    pytorch-grad-cam documents for ViTs.

    Example::

        >>> import torch
        >>> from captum_gradmask.methods.captum_baselines import tokens_to_grid
        >>> tokens = torch.arange(7.0).reshape(1, 7, 1)  # CLS + a 2x3 grid, D = 1
        >>> tokens_to_grid(tokens, prefix_tokens=1, grid=(2, 3))[0, 0]
        tensor([[1., 2., 3.],
                [4., 5., 6.]])
    """
    rows, cols = grid
    batch, count, dim = tokens.shape
    if count != prefix_tokens + rows * cols:
        raise ValueError(
            f"expected {prefix_tokens} prefix + {rows}x{cols} patch tokens, got {count} tokens"
        )
    return tokens[:, prefix_tokens:].reshape(batch, rows, cols, dim).permute(0, 3, 1, 2)


def grid_to_tokens(grid_map: Tensor, prefix: Tensor) -> Tensor:
    """Inverse of :func:`tokens_to_grid`: ``(B, D, h, w)`` and prefix ``(B, P, D)`` to tokens."""
    patches = grid_map.flatten(2).transpose(1, 2)
    return torch.cat([prefix, patches], dim=1)


# --- boxes ---------------------------------------------------------------------------


def resize_boxes(boxes: BoxesLike, original_size: SizeLike, new_size: SizeLike) -> Tensor:
    """Map boxes from original-image pixels to a resized image (a plain resize, no crop).

    Boxes are ``(xmin, ymin, xmax, ymax)`` with inclusive integer pixel indices (ImageNet's
    convention: ``xmax`` is the last pixel column of the object), so a box covers the
    continuous region ``[xmin, xmax + 1) x [ymin, ymax + 1)``. That region is scaled by
    ``new / original`` per axis and returned as continuous ``[x0, y0, x1, y1)`` float boxes in
    the new image; a pixel of the new image belongs to the box when its centre
    ``(col + 0.5, row + 0.5)`` lies inside (see :func:`boxes_to_mask`). This is what a
    nearest-neighbour resize of the box mask gives.

    Args:
        boxes: ``(K, 4)`` boxes in original pixels.
        original_size: ``(height, width)`` of the original image.
        new_size: ``(height, width)`` of the resized image (the model input).

    Returns:
        ``(K, 4)`` float64 tensor of continuous boxes in the resized image.

    Examples::

        >>> from captum_gradmask.metrics import resize_boxes
        >>> resize_boxes([[0, 10, 99, 49]], original_size=(100, 200), new_size=(50, 100)).tolist()
        [[0.0, 5.0, 50.0, 25.0]]
    """
    box_tensor = as_boxes(boxes)
    (orig_h, orig_w), (new_h, new_w) = (
        check_size(original_size, "original_size"),
        check_size(new_size, "new_size"),
    )
    scale = torch.tensor(
        [new_w / orig_w, new_h / orig_h, new_w / orig_w, new_h / orig_h], dtype=torch.float64
    )
    region = box_tensor.clone()
    region[:, 2:] += 1
    return region * scale


def boxes_to_mask(boxes: Tensor, size: SizeLike, device: torch.device | None = None) -> Tensor:
    """Boolean ``(height, width)`` mask of the pixels whose centres lie in any continuous box.

    ``boxes`` are ``[x0, y0, x1, y1)`` as returned by :func:`resize_boxes`.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import boxes_to_mask
        >>> boxes_to_mask(torch.tensor([[1.0, 0.0, 3.0, 1.0]]), (2, 4)).int().tolist()
        [[0, 1, 1, 0], [0, 0, 0, 0]]
    """
    height, width = check_size(size, "size")
    rows = torch.arange(height, dtype=torch.float64, device=device)[:, None] + 0.5
    cols = torch.arange(width, dtype=torch.float64, device=device)[None, :] + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    for x0, y0, x1, y1 in boxes.to(device=device, dtype=torch.float64).tolist():
        mask |= (cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)
    return mask


def as_boxes(boxes: Any) -> Tensor:
    box_tensor = torch.as_tensor(boxes, dtype=torch.float64)
    if box_tensor.dim() == 1 and box_tensor.numel() == 4:
        box_tensor = box_tensor[None]
    if box_tensor.dim() != 2 or box_tensor.shape[1] != 4:
        raise ValueError(
            f"boxes must have shape (K, 4) as (xmin, ymin, xmax, ymax); got shape "
            f"{tuple(box_tensor.shape)}"
        )
    if ((box_tensor[:, 2] < box_tensor[:, 0]) | (box_tensor[:, 3] < box_tensor[:, 1])).any():
        raise ValueError(
            f"boxes must have xmax >= xmin and ymax >= ymin; got {box_tensor.tolist()}"
        )
    return box_tensor


def check_size(size: Any, name: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a (height, width) pair, got {size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"`{name}` must be positive, got {size!r}")
    return height, width
