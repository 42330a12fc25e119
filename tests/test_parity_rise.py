"""RISE against its authors' code (eclique/RISE), re-derived in ``references/rise.py``: the same
mask construction (upsampling and crop) from the same random grids and shifts, and the same
saliency from the same masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_gradmask.methods import RISE, generate_masks
from captum_gradmask.methods.rise import _MaskSampler
from references import rise as reference

from .models import tiny_hf_vit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("size, grid_size", [((224, 224), 7), ((32, 32), 4), ((30, 40), 5)])
def test_masks_equal_authors_for_the_same_grids_and_shifts(size, grid_size) -> None:
    sampler = _MaskSampler(40, size, grid_size, 0.5, seed=3)
    shifts = torch.stack([sampler.shift_y, sampler.shift_x], dim=1).numpy()
    expected = reference.masks_from(sampler.grids.numpy(), shifts, size)
    ours = generate_masks(40, size, grid_size=grid_size, p=0.5, seed=3)
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6, rtol=0)
    # the random part has the authors' distribution: shifts cover 0..cell-1, grids keep ~p
    cell = reference.cell_size(size, grid_size)
    assert shifts[:, 0].max() < cell[0] and shifts[:, 1].max() < cell[1]


def test_reference_upsampling_is_scikit_image_resize() -> None:
    """The authors' line, ``resize(grid, up_size, order=1, mode="reflect",
    anti_aliasing=False)[x:x + H, y:y + W]``, with scikit-image itself."""
    transform = pytest.importorskip("skimage.transform", reason="scikit-image not installed")
    rng = np.random.default_rng(0)
    grids = rng.random((5, 7, 7)) < 0.5
    shifts = rng.integers(0, 32, (5, 2))
    ours = reference.masks_from(grids, shifts, (224, 224))
    for i, grid in enumerate(grids.astype("float32")):
        upsampled = transform.resize(grid, (256, 256), order=1, mode="reflect", anti_aliasing=False)
        x, y = shifts[i]
        np.testing.assert_allclose(ours[i], upsampled[x : x + 224, y : y + 224], atol=1e-6)


def test_saliency_equals_authors_on_the_same_masks() -> None:
    model = tiny_hf_vit()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = [3, 5]
    settings = dict(n_masks=60, grid_size=4, p=0.5, seed=1)
    ours = RISE(model).attribute_grid(images, target=target, perturbations_per_eval=7, **settings)
    masks = generate_masks(60, (32, 32), grid_size=4, p=0.5, seed=1)

    def probabilities(batch: torch.Tensor) -> torch.Tensor:  # the authors' model + Softmax
        return torch.softmax(model(batch).logits, dim=1)

    for i in range(2):
        expected = reference.saliency(probabilities, images[i], masks, 0.5)[target[i]]
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=1e-5)


def test_reference_draw_matches_its_description() -> None:
    """The authors' draw: binary grids kept with probability p1, masks in [0, 1] that are
    exactly 1 inside kept cells far from any dropped one."""
    masks = reference.generate_masks(200, 4, 0.5, (32, 32), np.random.default_rng(0))
    assert masks.shape == (200, 32, 32) and masks.min() >= 0 and masks.max() <= 1
    assert abs(masks.mean() - 0.5) < 0.05
