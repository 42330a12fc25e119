"""Captum methods configured for ViTs, checked against their definitions on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_gradmask.adapters import ViTAdapter, get_adapter
from captum_gradmask.methods import captum_baselines as cb
from captum_gradmask.methods import gradcam
from captum_gradmask.registry import METHODS, ConfiguredMethod, build_method, method_names

from .models import tiny_hf_vit, tiny_timm_vit

# Small settings: the point here is shapes and definitions, not quality.
FACTORIES = {
    "saliency": (cb.saliency, {}),
    "input-x-gradient": (cb.input_x_gradient, {}),
    "integrated-gradients": (cb.integrated_gradients, {"n_steps": 4}),
    "gradient-shap": (cb.gradient_shap, {"n_samples": 3, "blur_kernel_size": 3}),
    "smoothgrad": (cb.smoothgrad, {"nt_samples": 3}),
    "occlusion": (cb.occlusion, {}),
    "feature-ablation": (cb.feature_ablation, {}),
    "kernel-shap": (cb.kernel_shap, {"n_samples": 40}),
    "layer-gradcam": (gradcam.layer_gradcam, {}),
}


def _patch_only_model(row: int, col: int, patch: int = 8) -> tuple[nn.Module, ViTAdapter]:
    """Logits depend on the pixels of patch (row, col) only (2 classes)."""

    class PatchModel(nn.Module):
        def forward(self, images: Tensor) -> Tensor:
            block = images[:, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
            score = (block**2).sum(dim=(1, 2, 3)) + block.sum(dim=(1, 2, 3))
            return torch.stack([score, -score], dim=1)

    model = PatchModel()
    adapter = ViTAdapter.from_modules(
        model, num_heads=1, patch_size=patch, prefix_tokens=1, fused_qkv=[nn.Linear(3, 9)]
    )
    return model, adapter


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("build_model", [tiny_hf_vit, tiny_timm_vit], ids=["hf", "timm"])
def test_each_method_gives_input_shaped_finite_maps(name: str, build_model) -> None:
    model = build_model()
    factory, settings = FACTORIES[name]
    method = factory(model, **settings)
    images = torch.randn(2, 3, 32, 32)
    was_training = model.training
    attributions = method.attribute(images, target=[1, 4])
    assert attributions.shape == images.shape
    assert torch.isfinite(attributions).all() and attributions.abs().sum() > 0
    assert model.training == was_training
    assert all(p.grad is None for p in model.parameters())
    # The tuple form is kept, and None targets use the predicted class.
    assert method.attribute((images[:1],), target=None)[0].shape == (1, 3, 32, 32)


def test_patch_feature_mask_has_one_row_major_id_per_patch() -> None:
    mask = cb.patch_feature_mask((16, 24), (8, 8))[0, 0]
    assert mask.shape == (16, 24)
    assert sorted(mask.unique().tolist()) == list(range(6))
    for r in range(2):
        for c in range(3):
            block = mask[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8]
            assert (block == r * 3 + c).all()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        cb.patch_feature_mask((20, 24), (8, 8))


@pytest.mark.parametrize("factory", [cb.occlusion, cb.feature_ablation])
def test_occlusion_windows_are_patch_aligned(factory) -> None:
    model, adapter = _patch_only_model(row=1, col=2)
    images = torch.rand(1, 3, 32, 32) + 0.5
    attributions = factory(model, adapter).attribute(images, target=0)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:16, 16:24] = True
    assert (attributions[0, :, inside] != 0).all()
    assert (attributions[0, :, ~inside] == 0).all()
    # Removing the patch (baseline 0) costs its whole score, spread uniformly over the patch.
    score = float(model(images)[0, 0])
    torch.testing.assert_close(attributions[0, :, inside], torch.full((3, 64), score))


def test_kernel_shap_recovers_a_linear_model_per_patch() -> None:
    # For a model linear in the patch sums, Shapley values are w_i * (sum_i - baseline_i).
    torch.manual_seed(0)
    weights = torch.randn(16)

    def forward(images: Tensor) -> Tensor:
        sums = images.reshape(-1, 3, 4, 8, 4, 8).sum(dim=(1, 3, 5)).flatten(1)
        return torch.stack([sums @ weights, -(sums @ weights)], dim=1)

    adapter = ViTAdapter.from_modules(
        forward, num_heads=1, patch_size=8, prefix_tokens=1, fused_qkv=[nn.Linear(3, 9)]
    )
    images = torch.randn(1, 3, 32, 32)
    attributions = cb.kernel_shap(forward, adapter, n_samples=80).attribute(images, target=0)
    expected = images.reshape(1, 3, 4, 8, 4, 8).sum(dim=(1, 3, 5)).flatten() * weights
    torch.testing.assert_close(
        attributions[0, 0, ::8, ::8].flatten(), expected, atol=1e-3, rtol=1e-3
    )


def test_integrated_gradients_completeness() -> None:
    model = tiny_hf_vit()
    images = torch.randn(1, 3, 32, 32)
    attributions = cb.integrated_gradients(model, n_steps=64).attribute(images, target=3)
    with torch.no_grad():
        gap = model(images).logits[0, 3] - model(torch.zeros_like(images)).logits[0, 3]
    assert float(attributions.sum()) == pytest.approx(float(gap), rel=0.05, abs=0.02)


def test_saliency_is_the_absolute_logit_gradient() -> None:
    model = tiny_timm_vit()
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(model(images)[:, 2].sum(), images)
    attributions = cb.saliency(model).attribute(images.detach(), target=2)
    torch.testing.assert_close(attributions, grad.abs())


def test_tokens_to_grid_places_token_k_at_row_k_div_w() -> None:
    rows, cols, prefix = 3, 4, 2
    tokens = torch.arange(prefix + rows * cols, dtype=torch.float32)[None, :, None].repeat(2, 1, 5)
    grid = cb.tokens_to_grid(tokens, prefix, (rows, cols))
    assert grid.shape == (2, 5, rows, cols)
    for k in range(rows * cols):
        assert (grid[:, :, k // cols, k % cols] == prefix + k).all()
    torch.testing.assert_close(cb.grid_to_tokens(grid, tokens[:, :prefix]), tokens)
    with pytest.raises(ValueError, match="prefix"):
        cb.tokens_to_grid(tokens, prefix, (4, 4))


@pytest.mark.parametrize("build_model", [tiny_hf_vit, tiny_timm_vit], ids=["hf", "timm"])
def test_layer_gradcam_matches_a_plain_grad_cam(build_model) -> None:
    model = build_model()
    layer = gradcam.default_gradcam_layer(get_adapter(model))
    adapter = get_adapter(model)
    images = torch.randn(2, 3, 32, 32)
    targets = [1, 5]

    # Grad-CAM by hand: activations A and gradients G of the layer's patch tokens.
    saved = {}
    handle = layer.register_forward_hook(lambda m, a, out: saved.setdefault("tokens", out))
    try:
        logits = adapter.logits(images)
    finally:
        handle.remove()
    tokens = saved["tokens"]
    (grads,) = torch.autograd.grad(logits[[0, 1], targets].sum(), tokens)
    patches, patch_grads = tokens[:, 1:].detach(), grads[:, 1:]
    weights = patch_grads.mean(dim=1, keepdim=True)  # mean over the 4x4 positions
    cam = F.relu((weights * patches).sum(-1)).reshape(2, 1, 4, 4)
    expected = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)

    attributions = gradcam.layer_gradcam(model).attribute(images, target=targets)
    torch.testing.assert_close(attributions, expected.expand(-1, 3, -1, -1), atol=1e-5, rtol=1e-4)
    # The hook is gone: the model's outputs are untouched afterwards.
    torch.testing.assert_close(adapter.logits(images), logits.detach())


def test_default_gradcam_layer_choices_and_error() -> None:
    timm_model = tiny_timm_vit()
    assert gradcam.default_gradcam_layer(get_adapter(timm_model)) is timm_model.blocks[-1].norm1
    hf_model = tiny_hf_vit()
    hf_layer = hf_model.vit.layers[-1].layernorm_before
    assert gradcam.default_gradcam_layer(get_adapter(hf_model)) is hf_layer
    custom = ViTAdapter.from_modules(
        nn.Linear(2, 2), num_heads=1, patch_size=8, prefix_tokens=1, fused_qkv=[nn.Linear(4, 12)]
    )
    with pytest.raises(ValueError, match="layer="):
        gradcam.default_gradcam_layer(custom)


def test_registry_names_and_overrides() -> None:
    expected = {
        "gradmask-m1", "gradmask-m4", "gradmask-mheads", "gradmask-fast", "saliency",
        "input-x-gradient", "integrated-gradients", "gradient-shap", "smoothgrad", "occlusion",
        "feature-ablation", "kernel-shap", "layer-gradcam", "rollout", "chefer-gae",
        "vit-reciprocam", "vit-reciprocam-1x1", "rise", "diffmask", "gradmask-libragrad",
        "libragrad", "libragrad-ixg", "libragrad-ig", "libragrad-fullgrad", "tis", "attnlrp",
    }  # fmt: skip
    assert set(method_names()) == expected
    model = tiny_hf_vit()
    heads = build_method("gradmask-mheads", model)
    assert isinstance(heads, ConfiguredMethod) and heads.settings["masks_per_layer"] == 3
    assert build_method("gradmask-fast", model).settings["mode"] == "fast"
    assert build_method("integrated-gradients", model, n_steps=7).settings["n_steps"] == 7
    assert METHODS["integrated-gradients"].settings["n_steps"] == 50  # defaults untouched
    with pytest.raises(ValueError, match="registered methods are"):
        build_method("gradcam", model)


def test_registry_gradmask_matches_the_class() -> None:
    from captum_gradmask import GradMaskAttribution

    model = tiny_timm_vit()
    images = torch.randn(1, 3, 32, 32)
    built = build_method("gradmask-m1", model).attribute(images, target=2)
    direct = GradMaskAttribution(model).attribute(images, target=2, masks_per_layer=1)
    torch.testing.assert_close(built, direct)


def _spy_on_captum(method: cb.CaptumBaseline) -> list[dict]:
    """Record what each call hands to the Captum object (and skip Captum's own work)."""
    calls: list[dict] = []

    def attribute(inputs: Tensor, **kwargs) -> Tensor:
        calls.append({"inputs": inputs.clone(), **kwargs})
        return torch.zeros_like(inputs)

    method.attribution.attribute = attribute  # type: ignore[method-assign]
    return calls


def _two_images_of_different_ranges() -> Tensor:
    first = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return torch.cat([first, 3 * first + 1])  # the second spans three times the range


def test_gradient_shap_baselines_are_zeros_and_each_images_own_blur() -> None:
    from captum_gradmask._ops import gaussian_blur

    images = _two_images_of_different_ranges()
    method = cb.gradient_shap(tiny_hf_vit())  # documented defaults: kernel 11, sigma 5
    calls = _spy_on_captum(method)
    method.attribute(images, target=[1, 2])
    assert len(calls) == 2  # image by image: each image's blur is its own baseline
    for i, call in enumerate(calls):
        torch.testing.assert_close(call["inputs"], images[i : i + 1], atol=0, rtol=0)
        assert call["target"].tolist() == [[1, 2][i]]
        assert call["n_samples"] == 20 and call["stdevs"] == 0.1
        zeros, blurred = call["baselines"].split(1)
        assert torch.equal(zeros, torch.zeros_like(zeros))
        expected = gaussian_blur(images[i : i + 1], kernel_size=11, sigma=5.0)
        torch.testing.assert_close(blurred, expected, atol=0, rtol=0)
        # a blur: smoother than the image, same mean inside the zero-padded border
        inner = (slice(None), slice(None), slice(5, -5), slice(5, -5))
        assert blurred[inner].std() < 0.5 * images[i : i + 1][inner].std()
    assert not torch.allclose(calls[0]["baselines"][1], calls[1]["baselines"][1])


def test_smoothgrad_noise_is_a_fraction_of_each_images_own_range() -> None:
    images = _two_images_of_different_ranges()
    method = cb.smoothgrad(tiny_hf_vit())  # documented default: 0.15 of the range
    calls = _spy_on_captum(method)
    method.attribute(images, target=3)
    assert len(calls) == 2
    for i, call in enumerate(calls):
        torch.testing.assert_close(call["inputs"], images[i : i + 1], atol=0, rtol=0)
        value_range = float(images[i].max() - images[i].min())
        assert call["stdevs"] == pytest.approx(0.15 * value_range, rel=1e-6)
        assert call["nt_type"] == "smoothgrad" and call["abs"] is True
        assert call["nt_samples"] == 25
    # the second image spans three times the range, so gets three times the noise
    assert calls[1]["stdevs"] == pytest.approx(3 * calls[0]["stdevs"], rel=1e-5)


@pytest.mark.parametrize("name", ["gradient-shap", "smoothgrad", "kernel-shap"])
def test_sampling_methods_are_seeded_per_image_and_leave_the_generators_alone(name: str) -> None:
    import numpy as np

    factory, settings = FACTORIES[name]
    model = tiny_hf_vit()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    method = factory(model, **settings)  # seed 0 by default
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    batch = method.attribute(images, target=[1, 2, 3])
    torch.manual_seed(123)  # what ran before does not matter, nor the batch around an image
    alone = method.attribute(images[1:2], target=2)
    assert torch.equal(batch[1:2], alone)
    torch.set_rng_state(torch_state)
    method.attribute(images[:1], target=1)
    assert torch.equal(torch.get_rng_state(), torch_state)  # the global generators are
    assert (np.random.get_state()[1] == numpy_state).all()  # as the call found them
    other = factory(model, **settings, seed=1).attribute(images[1:2], target=2)
    assert not torch.equal(other, alone)  # the seed decides the draws
    unseeded = factory(model, **settings, seed=None)
    first = unseeded.attribute(images[1:2], target=2)
    assert not torch.equal(first, unseeded.attribute(images[1:2], target=2))  # global draws
    with pytest.raises(ValueError, match="`seed` needs `per_image=True`"):
        cb.CaptumBaseline("x", method.attribution, seed=0)
