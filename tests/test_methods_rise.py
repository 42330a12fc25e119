"""RISE against its formula ``S = 1/(N p) sum_i P_t(I ⊙ M_i) M_i`` on the same masks, and on a
model whose output depends only on a known region."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_gradmask.methods import RISE, generate_masks

from .models import tiny_hf_vit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: on a shared 2-core machine, intra-op threads only contend (100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def plain_rise(model, image, target, masks, p, fill_value=0.0):
    """The formula, one mask at a time."""
    saliency = torch.zeros(image.shape[-2:])
    with torch.no_grad():
        for mask in masks:
            masked = image * mask + fill_value * (1 - mask)
            logits = model(masked[None])
            logits = getattr(logits, "logits", logits)
            saliency += torch.softmax(logits, dim=-1)[0, target] * mask
    return saliency / (len(masks) * p)


@pytest.mark.parametrize("fill_value", [0.0, -1.0])
def test_matches_plain_formula_on_the_same_masks(fill_value: float) -> None:
    model = tiny_hf_vit()
    images = _images()
    options = dict(n_masks=30, grid_size=4, p=0.4, seed=3)
    ours = RISE(model).attribute_grid(
        images, target=[2, 5], fill_value=fill_value, perturbations_per_eval=7, **options
    )
    masks = generate_masks(30, (32, 32), grid_size=4, p=0.4, seed=3)
    for i, t in enumerate([2, 5]):
        expected = plain_rise(model, images[i], t, masks, 0.4, fill_value)
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=1e-5)


def test_masks_are_seeded_smooth_and_keep_p_on_average() -> None:
    masks = generate_masks(2000, (32, 40), grid_size=4, p=0.3, seed=0)
    assert masks.shape == (2000, 32, 40)
    assert masks.min() >= 0 and masks.max() <= 1
    # bilinear upsampling gives intermediate values, not only 0 and 1
    assert ((masks > 0.05) & (masks < 0.95)).float().mean() > 0.2
    assert abs(float(masks.mean()) - 0.3) < 0.02  # E[M] = p, the normalisation
    torch.testing.assert_close(masks[:5], generate_masks(5, (32, 40), 4, 0.3, seed=0))
    assert not torch.equal(masks[:5], generate_masks(5, (32, 40), 4, 0.3, seed=1))


def test_p_one_keeps_the_whole_image() -> None:
    # every mask is all ones, so S = P_t(I) at every pixel
    model = tiny_hf_vit()
    images = _images()
    saliency = RISE(model).attribute_grid(images, target=[0, 1], n_masks=3, p=1.0, grid_size=2)
    probs = torch.softmax(model(images).logits, -1)[[0, 1], [0, 1]]
    torch.testing.assert_close(saliency, probs[:, None, None].expand(-1, 32, 32))


def test_region_that_drives_the_output_ranks_highest() -> None:
    def forward(x: torch.Tensor) -> torch.Tensor:
        # the target's probability is a sigmoid of how much of the region is visible
        evidence = 12 * (x[:, :, 20:28, 4:12].mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)

    images = torch.ones(1, 3, 32, 32)
    saliency = RISE(forward).attribute_grid(
        images, target=0, n_masks=200, grid_size=4, perturbations_per_eval=200
    )[0]
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[20:28, 4:12] = True
    assert region.flatten()[saliency.flatten().argmax()]
    assert saliency[region].mean() > saliency[~region].mean() + 0.1
    # the lowest-ranked pixels are far from the region
    far = torch.zeros(32, 32, dtype=torch.bool)
    far[:8, 20:] = True
    assert saliency[far].max() < saliency[region].min()


def test_any_callable_batches_and_per_image_arguments() -> None:
    linear = nn.Linear(3 * 16 * 16, 4)

    def forward(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return linear(x.flatten(1)) * scale[:, None]

    images = torch.randn(3, 3, 16, 16)
    scales = torch.tensor([1.0, 2.0, 3.0])
    rise = RISE(forward)
    options = dict(n_masks=20, grid_size=3, target=[0, 1, 3])
    together = rise.attribute_grid(images, additional_forward_args=(scales,), **options)
    chunked = rise.attribute_grid(
        images, additional_forward_args=(scales,), perturbations_per_eval=5, **options
    )
    torch.testing.assert_close(together, chunked, atol=1e-6, rtol=1e-5)
    for i, t in enumerate([0, 1, 3]):
        single = rise.attribute_grid(
            images[i : i + 1],
            additional_forward_args=(scales[i : i + 1],),
            n_masks=20,
            grid_size=3,
            target=t,
        )
        torch.testing.assert_close(together[i : i + 1], single, atol=1e-6, rtol=1e-5)
    attr = rise.attribute((images,), additional_forward_args=(scales,), **options)[0]
    torch.testing.assert_close(attr, together[:, None].expand(-1, 3, -1, -1))


def test_default_target_and_model_state() -> None:
    model = tiny_hf_vit().train()
    images = _images()
    rise = RISE(model)
    predicted = model.eval()(images).logits.argmax(-1)
    model.train()
    default = rise.attribute_grid(images, n_masks=10, grid_size=2)
    torch.testing.assert_close(
        default, rise.attribute_grid(images, target=predicted, n_masks=10, grid_size=2)
    )
    assert model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"p": 0.0}, "`p`"),
        ({"p": 1.5}, "`p`"),
        ({"n_masks": 0}, "n_masks"),
        ({"grid_size": 0}, "grid_size"),
        ({"seed": 1.5}, "seed"),
        ({"perturbations_per_eval": 0}, "perturbations_per_eval"),
        ({"fill_value": "grey"}, "fill_value"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RISE(tiny_hf_vit()).attribute_grid(_images(1), **{"n_masks": 4, **kwargs})
