"""Display helpers: undo the model's normalisation and render attributions with Captum.

Example::

    >>> import torch
    >>> from captum_gradmask.viz import to_display_image
    >>> image = to_display_image(torch.zeros(3, 4, 4), mean=0.5, std=0.5)
    >>> image.shape, float(image.max())
    ((4, 4, 3), 0.5)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["attribution_to_hwc", "save_heatmap_overlay", "to_display_image"]

Stat = float | Sequence[float]


def to_display_image(image: Tensor, mean: Stat = 0.5, std: Stat = 0.5) -> np.ndarray:
    """Turn one normalised ``(C, H, W)`` image back into an ``(H, W, C)`` array in ``[0, 1]``.

    Args:
        image: the model input of one image (a batch of one is accepted too).
        mean, std: the normalisation the model's processor applied (per channel or scalar).

    Returns:
        A float array ready for ``matplotlib`` and Captum's ``visualize_image_attr``.
    """
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise ValueError(f"`image` must have shape (C, H, W); got {tuple(image.shape)}")
    channels = image.shape[0]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1).expand(channels, 1, 1)
    restored = image.detach().float().cpu() * std_t + mean_t
    return restored.clamp(0, 1).permute(1, 2, 0).numpy()


def attribution_to_hwc(attribution: Tensor) -> np.ndarray:
    """One attribution ``(C, H, W)`` (or ``(H, W)``) as an ``(H, W, C)`` array for Captum's
    visualizers."""
    if attribution.dim() == 4 and attribution.shape[0] == 1:
        attribution = attribution[0]
    if attribution.dim() == 2:
        attribution = attribution[None]
    return attribution.detach().float().cpu().permute(1, 2, 0).numpy()


def save_heatmap_overlay(
    image: Tensor,
    attribution: Tensor,
    path: str | Path,
    *,
    mean: Stat = 0.5,
    std: Stat = 0.5,
    title: str | None = None,
    sign: str = "positive",
    alpha_overlay: float = 0.5,
    **visualize_kwargs: Any,
) -> Path:
    """Blend ``attribution`` over ``image`` with Captum's ``visualize_image_attr`` and save a PNG.

    Args:
        image: one normalised model input ``(C, H, W)``.
        attribution: its attribution, same shape (or ``(H, W)``).
        path: where to write the picture.
        mean, std: the model's normalisation, to show the image in its own colours.
        title: optional figure title.
        sign: Captum's ``sign`` argument (GradMask maps are non-negative: ``"positive"``).
        alpha_overlay: heatmap opacity.
        visualize_kwargs: passed on to ``visualize_image_attr``.
    """
    from captum.attr import visualization as viz

    figure, _ = viz.visualize_image_attr(
        attribution_to_hwc(attribution),
        to_display_image(image, mean, std),
        method="blended_heat_map",
        sign=sign,
        alpha_overlay=alpha_overlay,
        show_colorbar=True,
        title=title,
        use_pyplot=False,
        **visualize_kwargs,
    )
    # use_pyplot=False: a plain Figure, so neither pyplot's figure list nor its backend is touched.
    path = Path(path)
    figure.savefig(path, bbox_inches="tight", dpi=120)
    return path
