"""Display helpers: undo the model's normalisation and draw attributions over the image.

Nothing here touches matplotlib's global state (no backend switch, no pyplot figures): every
function builds a :class:`matplotlib.figure.Figure` object, which the caller shows or saves.

Two styles:

- ``"blended"``: Captum's ``visualize_image_attr(method="blended_heat_map")``, the map blended
  over a grey version of the image with a colour bar;
- ``"side-by-side"``: the original image next to the map drawn over it with a perceptual
  colormap (``inferno``), scaled by its 99th percentile as Captum does: the figure papers and
  pytorch-grad-cam users expect.

Example::

    >>> import torch
    >>> from captum_gradmask.viz import heatmap_figure, to_display_image
    >>> image = to_display_image(torch.zeros(3, 4, 4), mean=0.5, std=0.5)
    >>> image.shape, float(image.max())
    ((4, 4, 3), 0.5)
    >>> figure = heatmap_figure(torch.zeros(3, 8, 8), torch.rand(3, 8, 8), style="side-by-side")
    >>> [axis.get_title() for axis in figure.axes[:2]]
    ['image', 'attribution']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "STYLES",
    "attribution_to_hwc",
    "heatmap_figure",
    "save_heatmap",
    "save_heatmap_overlay",
    "scaled_map",
    "to_display_image",
]

Stat = float | Sequence[float]
Style = Literal["blended", "side-by-side"]
Sign = Literal["positive", "absolute_value"]
#: The figure styles of :func:`heatmap_figure`.
STYLES: tuple[str, ...] = ("blended", "side-by-side")


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


def scaled_map(
    attribution: Tensor, sign: Sign = "positive", percentile: float = 99.0
) -> np.ndarray:
    """One ``(H, W)`` map in ``[0, 1]``: channels summed, ``sign`` applied, divided by its
    ``percentile`` (Captum's visualiser scaling) and clipped.

    Example::

        >>> import torch
        >>> from captum_gradmask.viz import scaled_map
        >>> scaled_map(torch.tensor([[0.0, 1.0], [2.0, -4.0]]), percentile=100).tolist()
        [[0.0, 0.5], [1.0, 0.0]]
    """
    values = attribution_to_hwc(attribution).sum(axis=2)
    if sign == "positive":
        values = np.clip(values, 0, None)
    elif sign == "absolute_value":
        values = np.abs(values)
    else:
        raise ValueError(f"`sign` must be 'positive' or 'absolute_value', got {sign!r}")
    top = float(np.percentile(values, percentile))
    return np.clip(values / top, 0, 1) if top > 0 else np.zeros_like(values)


def heatmap_figure(
    image: Tensor,
    attribution: Tensor,
    *,
    style: Style = "blended",
    mean: Stat = 0.5,
    std: Stat = 0.5,
    title: str | None = None,
    sign: Sign = "positive",
    alpha_overlay: float = 0.5,
    cmap: str = "inferno",
    **visualize_kwargs: Any,
) -> Any:
    """A :class:`matplotlib.figure.Figure` of ``attribution`` over ``image``.

    Args:
        image: one normalised model input ``(C, H, W)``.
        attribution: its attribution, same shape (or ``(H, W)``).
        style: ``"blended"`` (Captum's blended heat map) or ``"side-by-side"`` (original |
            overlay with ``cmap``).
        mean, std: the model's normalisation, to show the image in its own colours.
        title: optional figure title.
        sign: ``"positive"`` (GradMask maps are non-negative) or ``"absolute_value"``.
        alpha_overlay: heatmap opacity.
        cmap: the side-by-side colormap (a perceptually uniform one by default).
        visualize_kwargs: passed on to Captum's ``visualize_image_attr`` (blended style).
    """
    if style not in STYLES:
        raise ValueError(f"`style` must be one of {STYLES}, got {style!r}")
    picture = to_display_image(image, mean, std)
    if style == "blended":
        from captum.attr import visualization as viz

        figure, _ = viz.visualize_image_attr(
            attribution_to_hwc(attribution),
            picture,
            method="blended_heat_map",
            sign=sign,
            alpha_overlay=alpha_overlay,
            show_colorbar=True,
            title=title,
            use_pyplot=False,
            **visualize_kwargs,
        )
        return figure
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.2))
    original, overlay = figure.subplots(1, 2)
    original.imshow(picture)
    original.set_title("image")
    overlay.imshow(picture)
    shown = overlay.imshow(scaled_map(attribution, sign), cmap=cmap, alpha=alpha_overlay)
    overlay.set_title("attribution")
    figure.colorbar(shown, ax=overlay, fraction=0.046, pad=0.04)
    for axis in (original, overlay):
        axis.set_axis_off()
    if title:
        figure.suptitle(title)
    return figure


def save_heatmap(image: Tensor, attribution: Tensor, path: str | Path, **options: Any) -> Path:
    """Draw :func:`heatmap_figure` (same keyword options) and write it as a PNG at ``path``."""
    figure = heatmap_figure(image, attribution, **options)
    path = Path(path)
    figure.savefig(path, bbox_inches="tight", dpi=120)
    return path


def save_heatmap_overlay(
    image: Tensor, attribution: Tensor, path: str | Path, **options: Any
) -> Path:
    """:func:`save_heatmap` in the ``"blended"`` style (Captum's blended heat map)."""
    return save_heatmap(image, attribution, path, style="blended", **options)
