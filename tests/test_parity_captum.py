"""The Captum-configured methods against Captum itself: each registry method gives exactly what
a plain Captum call with the same settings gives (the configuration adds settings, never a
different computation). Random methods draw from PyTorch's and NumPy's global generators
(GradientSHAP picks baselines and interpolation points with NumPy), seeded alike."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import (
    FeatureAblation,
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    NoiseTunnel,
    Occlusion,
    Saliency,
)

from captum_gradmask._ops import gaussian_blur
from captum_gradmask.registry import build_method

from .models import tiny_hf_vit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MODEL = tiny_hf_vit()
IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
TARGET = torch.tensor([2, 5])


def logits(images: torch.Tensor) -> torch.Tensor:
    return MODEL(images).logits


def patch_ids() -> torch.Tensor:
    """One feature id per 8x8 patch, row-major, on every channel: ``(1, 3, 32, 32)``."""
    ids = torch.arange(16).reshape(4, 4).repeat_interleave(8, 0).repeat_interleave(8, 1)
    return ids.expand(1, 3, 32, 32)


def plain_saliency():
    return Saliency(logits).attribute(IMAGES, target=TARGET, abs=True)


def plain_input_x_gradient():
    return InputXGradient(logits).attribute(IMAGES, target=TARGET)


def plain_integrated_gradients():
    return IntegratedGradients(logits).attribute(
        IMAGES, baselines=0.0, target=TARGET, n_steps=6, internal_batch_size=25
    )


def seeded(seed: int = 0) -> bool:
    """Seed PyTorch's and NumPy's global generators, as the registry's sampling methods do
    before each image (``seed=0``); returns True to sit inside a comprehension's condition."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    return True


def plain_gradient_shap():
    explainer = GradientShap(logits)
    return torch.cat(
        [
            explainer.attribute(
                image[None],
                baselines=torch.cat([torch.zeros_like(image[None]), gaussian_blur(image[None])]),
                target=TARGET[i : i + 1],
                n_samples=4,
                stdevs=0.1,
            )
            for i, image in enumerate(IMAGES)
            if seeded()
        ]
    )


def plain_smoothgrad():
    explainer = NoiseTunnel(Saliency(logits))
    return torch.cat(
        [
            explainer.attribute(
                image[None],
                nt_type="smoothgrad",
                nt_samples=3,
                nt_samples_batch_size=25,
                stdevs=0.15 * float(image.max() - image.min()),
                abs=True,
                target=TARGET[i : i + 1],
            )
            for i, image in enumerate(IMAGES)
            if seeded()
        ]
    )


def plain_occlusion():
    return Occlusion(logits).attribute(
        IMAGES,
        sliding_window_shapes=(3, 8, 8),
        strides=(3, 8, 8),
        baselines=0.0,
        target=TARGET,
        perturbations_per_eval=32,
    )


def plain_feature_ablation():
    return FeatureAblation(logits).attribute(
        IMAGES, feature_mask=patch_ids(), baselines=0.0, target=TARGET, perturbations_per_eval=32
    )


def plain_kernel_shap():
    pytest.importorskip("sklearn", reason="Captum's default KernelShap surrogate needs sklearn")
    explainer = KernelShap(logits)  # Captum's own surrogate: scikit-learn's LinearRegression
    return torch.cat(
        [
            explainer.attribute(
                image[None],
                baselines=0.0,
                target=TARGET[i : i + 1],
                feature_mask=patch_ids(),
                n_samples=40,
                perturbations_per_eval=32,
            )
            for i, image in enumerate(IMAGES)
            if seeded()
        ]
    )


CASES = {
    "saliency": (plain_saliency, {}, 0.0),
    "input-x-gradient": (plain_input_x_gradient, {}, 0.0),
    "integrated-gradients": (plain_integrated_gradients, {"n_steps": 6}, 0.0),
    "gradient-shap": (plain_gradient_shap, {"n_samples": 4}, 0.0),
    "smoothgrad": (plain_smoothgrad, {"nt_samples": 3}, 0.0),
    "occlusion": (plain_occlusion, {}, 0.0),
    "feature-ablation": (plain_feature_ablation, {}, 0.0),
    # the surrogate is refitted in torch (float64 least squares) instead of scikit-learn
    "kernel-shap": (plain_kernel_shap, {"n_samples": 40}, 1e-5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_registry_method_equals_plain_captum(name: str) -> None:
    plain, settings, tolerance = CASES[name]
    method = build_method(name, MODEL, **settings)
    torch.manual_seed(0)
    np.random.seed(0)
    ours = method.attribute(IMAGES, target=TARGET)
    torch.manual_seed(0)
    np.random.seed(0)
    expected = plain()
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, atol=tolerance, rtol=tolerance)
