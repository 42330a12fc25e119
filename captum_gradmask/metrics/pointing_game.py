"""Pointing game (Zhang et al., ECCV 2016), with TorchRay's tolerance.

The map's maximum "points" at one pixel; it is a hit when the open disc of radius ``tolerance``
pixels around that pixel (TorchRay's ``PointingGame``: distance ``< tolerance``, strictly)
touches the ground-truth object of the target class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from captum_gradmask._ops import (
    BoxesLike,
    SizeLike,
    as_boxes,
    boxes_to_mask,
    check_size,
    resize_boxes,
)
from captum_gradmask.metrics._common import ChannelReduction, attribution_map, check_choice

__all__ = [
    "TORCHRAY_TOLERANCE",
    "MaxPointResult",
    "PointingGameResult",
    "max_point",
    "pointing_game",
]

#: TorchRay's tolerance radius in pixels.
TORCHRAY_TOLERANCE = 15


@dataclass(frozen=True)
class PointingGameResult:
    """Outcome of the pointing game on a batch.

    Attributes:
        hits: ``(B,)`` bool, whether each image's maximum hit its object.
        points: ``(B, 2)`` long, the ``(row, column)`` of each image's chosen maximum in the
            model-input grid.
        labels: ``(B,)`` long, the class of each image (``-1`` when not given).
    """

    hits: Tensor
    points: Tensor
    labels: Tensor

    @property
    def hit_rate(self) -> float:
        """Share of hits over all images."""
        return float(self.hits.float().mean())

    @property
    def per_class_hit_rate(self) -> dict[int, float]:
        """Hit rate of each class present."""
        return {
            int(c): float(self.hits[self.labels == c].float().mean())
            for c in torch.unique(self.labels).tolist()
        }

    @property
    def mean_class_hit_rate(self) -> float:
        """Mean of the per-class hit rates (TorchRay's headline number)."""
        rates = list(self.per_class_hit_rate.values())
        return sum(rates) / len(rates)

    def summary(self) -> dict[str, float]:
        """``hit_rate`` and ``mean_class_hit_rate``."""
        return {"hit_rate": self.hit_rate, "mean_class_hit_rate": self.mean_class_hit_rate}


@dataclass(frozen=True)
class MaxPointResult:
    """Where each map peaks.

    Attributes:
        points: ``(B, 2)`` long ``(row, column)`` of the first maximum in row-major order.
        values: ``(B,)`` the maximum of each map.
        n_maxima: ``(B,)`` how many pixels share that maximum (ties).
    """

    points: Tensor
    values: Tensor
    n_maxima: Tensor

    def summary(self) -> dict[str, float]:
        """Batch means of ``values`` (``max_value``) and ``n_maxima``."""
        return {
            "max_value": float(self.values.float().mean()),
            "n_maxima": float(self.n_maxima.float().mean()),
        }


def max_point(saliency: Tensor) -> MaxPointResult:
    """Each ``(B, H, W)`` map's maximum, ties broken by taking the first in row-major order
    (as ``numpy.argmax`` in TorchRay).

    Args:
        saliency: ``(B, H, W)`` maps.

    Returns:
        A :class:`MaxPointResult` with ``points`` ``(B, 2)``.

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import max_point
        >>> peak = max_point(torch.tensor([[[0.0, 2.0], [2.0, 1.0]]]))
        >>> peak.points.tolist(), peak.n_maxima.tolist()
        ([[0, 1]], [2])
    """
    if not isinstance(saliency, Tensor) or saliency.dim() != 3:
        got = tuple(saliency.shape) if isinstance(saliency, Tensor) else type(saliency).__name__
        raise ValueError(f"`saliency` must be a (B, H, W) tensor, got {got}")
    flat = saliency.flatten(1)
    maxima = flat.max(dim=1, keepdim=True).values
    is_max = flat == maxima
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(flat)
    # The smallest flat index among the maxima, computed without relying on argmax's tie rule.
    first = torch.where(is_max, positions, flat.shape[1]).min(dim=1).values
    width = saliency.shape[-1]
    points = torch.stack([first // width, first % width], dim=1)
    return MaxPointResult(points=points, values=maxima[:, 0], n_maxima=is_max.sum(dim=1))


def pointing_game(
    attributions: Tensor,
    boxes: Sequence[BoxesLike] | None = None,
    labels: Sequence[int] | Tensor | None = None,
    *,
    masks: Tensor | None = None,
    input_size: SizeLike | None = None,
    original_sizes: Sequence[SizeLike] | None = None,
    tolerance: float = TORCHRAY_TOLERANCE,
    ties: Literal["first", "any"] = "first",
    channel_reduction: ChannelReduction = "sum",
) -> PointingGameResult:
    """Pointing game: does each map's maximum fall on (or within ``tolerance`` of) the object?

    The maximum of each map (at the model-input resolution; patch grids are upsampled nearest)
    is taken; a hit when some object pixel lies at Euclidean distance strictly below
    ``tolerance`` from it in pixel-index units, as TorchRay's ``PointingGame.evaluate``
    (``< tolerance**2``; TorchRay uses 15, so a pixel at distance exactly 15 is a miss);
    ``tolerance=0`` means the maximum pixel itself must be on the object. Several maxima
    (ties): ``ties="first"`` (default) uses the first in row-major order, as ``numpy.argmax``
    does in TorchRay; ``ties="any"`` counts a hit if any maximum hits (kinder to patch maps,
    but a constant map then hits whenever an object exists).
    The pointing game needs no model: it reads only the map and the ground truth.

    Args:
        attributions: ``(B, C, H, W)``, ``(B, 1, H, W)``, ``(B, H, W)`` or a ``(B, h, w)`` patch
            grid (then ``input_size`` or ``masks`` gives ``(H, W)``).
        boxes: per image, the ``(K, 4)`` boxes ``(xmin, ymin, xmax, ymax)`` of the target class,
            inclusive pixel indices, in original-image pixels when ``original_sizes`` is given
            (mapped with :func:`resize_boxes`), else already in model-input pixels.
        labels: class of each image, for the per-class hit rates (default: all one class).
        masks: instead of ``boxes``, a ``(B, H, W)`` boolean object mask in model-input pixels.
        input_size: ``(height, width)`` of the model input; default the masks' size, else the
            attributions' spatial size.
        original_sizes: ``(height, width)`` of each original image.
        tolerance: radius in pixels (>= 0).
        ties: ``"first"`` or ``"any"``, see above.
        channel_reduction: ``"sum"`` or ``"abs_sum"`` over channels of the attributions.

    Returns:
        A :class:`PointingGameResult` (``hits``, ``hit_rate``, ``mean_class_hit_rate``, ...).

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import pointing_game
        >>> saliency = torch.zeros(1, 224, 224)
        >>> saliency[0, 100, 60] = 1.0  # maximum at row 100, column 60
        >>> result = pointing_game(saliency, boxes=[[[25, 45, 35, 55]]], labels=[7],
        ...     original_sizes=[(112, 112)], input_size=(224, 224), tolerance=0)
        >>> result.hit_rate, result.points.tolist()
        (1.0, [[100, 60]])
    """
    check_choice(ties, "ties", ("first", "any"))
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"`tolerance` must be a number >= 0 (pixels), got {tolerance!r}")
    if (boxes is None) == (masks is None):
        raise ValueError("give exactly one of `boxes` (per-image box lists) and `masks`")
    if not isinstance(attributions, Tensor):
        raise TypeError(f"`attributions` must be a torch.Tensor, got {type(attributions).__name__}")
    batch = attributions.shape[0] if attributions.dim() >= 3 else 1
    device = attributions.device

    if masks is not None:
        if not isinstance(masks, Tensor) or masks.dim() != 3 or masks.shape[0] != batch:
            got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"`masks` must be a (B={batch}, H, W) boolean tensor, got {got}")
        size = tuple(masks.shape[-2:])
        if input_size is not None and tuple(input_size) != size:
            raise ValueError(f"`input_size` {input_size} differs from the masks' size {size}")
        object_masks = masks.to(device=device, dtype=torch.bool)
    else:
        size = check_size(input_size or tuple(attributions.shape[-2:]), "input_size")
        if len(boxes) != batch:
            raise ValueError(f"`boxes` has {len(boxes)} entries but there are {batch} maps")
        if original_sizes is not None and len(original_sizes) != batch:
            raise ValueError(
                f"`original_sizes` has {len(original_sizes)} entries but there are {batch} maps"
            )
        per_image = []
        for i, image_boxes in enumerate(boxes):
            box_tensor = as_boxes(image_boxes)
            if original_sizes is not None:
                box_tensor = resize_boxes(box_tensor, original_sizes[i], size)
            else:
                box_tensor = box_tensor.clone()
                box_tensor[:, 2:] += 1
            per_image.append(boxes_to_mask(box_tensor, size, device))
        object_masks = torch.stack(per_image)

    # attribution_map only needs the inputs' shape and device.
    channels = attributions.shape[1] if attributions.dim() == 4 else 1
    shape_ref = torch.empty(batch, channels, *size, device=device)
    saliency = attribution_map(attributions, shape_ref, channel_reduction)

    height, width = size
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    flat = saliency.flatten(1)
    is_max = flat == flat.max(dim=1, keepdim=True).values
    points = max_point(saliency).points
    hits = torch.zeros(batch, dtype=torch.bool, device=device)
    for i in range(batch):
        candidates = points[i : i + 1] if ties == "first" else _positions(is_max[i], width)
        for row, col in candidates.tolist():
            squared = (rows[:, None] - row) ** 2 + (cols[None, :] - col) ** 2
            disc = squared < tolerance**2 if tolerance > 0 else squared == 0
            if bool((disc & object_masks[i]).any()):
                hits[i] = True
                break

    if labels is None:
        label_tensor = torch.full((batch,), -1, dtype=torch.long, device=device)
    else:
        label_tensor = torch.as_tensor(labels, dtype=torch.long, device=device).flatten()
        if label_tensor.numel() != batch:
            raise ValueError(
                f"`labels` has {label_tensor.numel()} entries but there are {batch} maps"
            )
    return PointingGameResult(hits=hits, points=points, labels=label_tensor)


def _positions(is_max: Tensor, width: int) -> Tensor:
    index = torch.nonzero(is_max).flatten()
    return torch.stack([index // width, index % width], dim=1)
