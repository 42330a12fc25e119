"""GradMask output goes straight into Captum's metrics and visualizers."""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from captum.attr import visualization as viz
from captum.metrics import infidelity, sensitivity_max

from captum_gradmask import GradMaskAttribution
from captum_gradmask.viz import attribution_to_hwc, save_heatmap_overlay, to_display_image

from .models import tiny_hf_vit


@pytest.fixture
def setup():
    model = tiny_hf_vit()
    images = torch.randn(2, 3, 32, 32)
    return model, images, GradMaskAttribution(model)


def test_infidelity_accepts_the_map(setup) -> None:
    model, images, gm = setup
    attr = gm.attribute(images, target=[1, 2])

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.1
        return noise, inputs - noise

    def forward(x):
        return model(x).logits

    score = infidelity(forward, perturb, images, attr, target=torch.tensor([1, 2]), normalize=True)
    assert score.shape == (2,) and torch.isfinite(score).all() and (score >= 0).all()


def test_sensitivity_max_calls_attribute_under_no_grad_with_noisy_batches(setup) -> None:
    _, images, gm = setup
    calls = []

    def explain(inputs, target):
        calls.append((torch.is_grad_enabled(), inputs[0].shape[0]))  # Captum passes a tuple
        return gm.attribute(inputs, target=target)

    score = sensitivity_max(explain, images, target=torch.tensor([1, 2]), n_perturb_samples=3)
    assert score.shape == (2,) and torch.isfinite(score).all() and (score >= 0).all()
    assert calls[0][0] is False  # Captum switched grad off around the call
    assert max(n for _, n in calls) == 6  # 3 noisy copies of 2 images in one batch


def test_visualizers_render_the_map(setup, tmp_path) -> None:
    _, images, gm = setup
    attr = gm.attribute(images, target=1)
    image = to_display_image(images[0])
    assert image.shape == (32, 32, 3) and image.min() >= 0 and image.max() <= 1
    fig, _ = viz.visualize_image_attr(
        attribution_to_hwc(attr[0]), image, "blended_heat_map", sign="positive", use_pyplot=False
    )
    assert fig is not None
    fig, axes = viz.visualize_image_attr_multiple(
        attr[0].permute(1, 2, 0).numpy(),
        image,
        ["original_image", "heat_map", "blended_heat_map"],
        ["all", "positive", "positive"],
        use_pyplot=False,
    )
    assert len(axes) == 3
    out = save_heatmap_overlay(images[0], attr[0], tmp_path / "map.png", title="t")
    assert out.stat().st_size > 1000


def test_to_display_image_inverts_normalisation() -> None:
    raw = torch.rand(3, 5, 5)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalized = (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    np.testing.assert_allclose(
        to_display_image(normalized, mean, std), raw.permute(1, 2, 0).numpy(), atol=1e-6
    )


def test_figures_leave_matplotlib_global_state_alone(tmp_path) -> None:
    import matplotlib

    from captum_gradmask.viz import save_heatmap

    backend = matplotlib.get_backend()
    image, attribution = torch.zeros(3, 16, 16), torch.rand(3, 16, 16)
    for style in ("blended", "side-by-side"):
        path = save_heatmap(image, attribution, tmp_path / f"{style}.png", style=style)
        assert path.stat().st_size > 1000
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:  # no pyplot figure was left open
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
