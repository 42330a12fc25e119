"""RISE (Petsiuk, Das & Saenko, BMVC 2018) as its authors' code computes it (eclique/RISE,
``explanations.py`` and the notebooks), re-derived.

Masks: ``N`` grids of ``s x s`` cells, each kept with probability ``p1``
(``rand(N, s, s) < p1``); each grid is resized with linear interpolation (scikit-image's
``resize(order=1, mode="reflect", anti_aliasing=False)``) to ``(s + 1) * ceil(H / s)`` by
``(s + 1) * ceil(W / s)`` pixels, then cropped to ``H x W`` at a random shift drawn from
``[0, ceil(H / s))`` rows and ``[0, ceil(W / s))`` columns. Saliency: the model's class
probabilities on every masked image ``I * M_i``, weighted by the masks:
``sal = P^T M / N / p1`` for every class.

scikit-image's ``resize`` of a float image calls ``scipy.ndimage.zoom(..., order=1,
mode="mirror", grid_mode=True)`` (its ``"reflect"`` is ndimage's ``"mirror"``); that call is
used here so that the references need only SciPy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor


def cell_size(input_size: tuple[int, int], s: int) -> tuple[int, int]:
    """``ceil(input_size / s)``: the largest shift plus one, per axis."""
    return int(np.ceil(input_size[0] / s)), int(np.ceil(input_size[1] / s))


def masks_from(grids: np.ndarray, shifts: np.ndarray, input_size: tuple[int, int]) -> np.ndarray:
    """The authors' masks ``(N, H, W)`` for binary ``grids`` ``(N, s, s)`` and ``shifts``
    ``(N, 2)`` (row, column)."""
    s = grids.shape[-1]
    cell = cell_size(input_size, s)
    up_size = ((s + 1) * cell[0], (s + 1) * cell[1])
    masks = np.empty((len(grids), *input_size))
    for i, grid in enumerate(grids.astype("float32")):
        upsampled = ndimage.zoom(
            grid, (up_size[0] / s, up_size[1] / s), order=1, mode="mirror", grid_mode=True
        )
        x, y = int(shifts[i, 0]), int(shifts[i, 1])
        masks[i] = upsampled[x : x + input_size[0], y : y + input_size[1]]
    return masks


def generate_masks(
    n: int, s: int, p1: float, input_size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """The authors' random draw (grids, then one shift pair per mask) and masks."""
    grids = rng.random((n, s, s)) < p1
    cell = cell_size(input_size, s)
    shifts = np.array([[rng.integers(0, cell[0]), rng.integers(0, cell[1])] for _ in range(n)])
    return masks_from(grids, shifts, input_size)


def saliency(
    probabilities: Callable[[Tensor], Tensor], image: Tensor, masks: Tensor, p1: float
) -> Tensor:
    """``(classes, H, W)`` saliency of one image ``(C, H, W)`` for masks ``(N, H, W)``."""
    n, height, width = masks.shape
    with torch.no_grad():
        scores = torch.cat([probabilities(masks[i : i + 1, None] * image[None]) for i in range(n)])
    return (scores.T @ masks.reshape(n, height * width)).reshape(-1, height, width) / n / p1
