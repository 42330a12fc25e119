"""Today's ViT families through the one way in: prefix counts, the adapter's forward equal to the
model's, GradMask equal to the independent reference at 1e-5, the attention methods on the
model's own attention probabilities, fast mode correct or refused, the model left as it was."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from captum_gradmask import GradMaskAttribution, get_adapter
from captum_gradmask.methods import AttentionRollout, CheferGAE
from captum_gradmask.methods._attention import attention_pass
from captum_gradmask.methods.captum_baselines import integrated_gradients
from references.gradmask import reference_gradmask

from .models import (
    tiny_hf_beit,
    tiny_hf_clip_vision,
    tiny_hf_dinov2,
    tiny_open_clip,
    tiny_timm_beit,
    tiny_timm_eva,
    tiny_torchvision_vit,
)

needs_open_clip = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason="open_clip_torch is not installed (pip install captum-gradmask[open-clip])",
)

needs_torchvision = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed"
)


def _open_clip_visual() -> nn.Module:
    return tiny_open_clip().visual


# name: (build, reference kind, prefix tokens, patch, image size, token interface)
FAMILIES = {
    "hf-clip-vision": (lambda: tiny_hf_clip_vision("tower"), "hf-clip", 1, 14, 28, True),
    "hf-clip-projection": (lambda: tiny_hf_clip_vision("projection"), "hf-clip", 1, 14, 28, True),
    "hf-clip-classifier": (tiny_hf_clip_vision, "hf-clip", 1, 14, 28, True),
    "hf-siglip-vision": (lambda: tiny_hf_clip_vision("tower", True), "hf-clip", 0, 14, 28, True),
    "hf-siglip-classifier": (
        lambda: tiny_hf_clip_vision(siglip=True),
        "hf-clip",
        0,
        14,
        28,
        True,
    ),
    "hf-dinov2-registers": (tiny_hf_dinov2, "hf5", 5, 14, 28, True),
    "hf-dinov2": (lambda: tiny_hf_dinov2(registers=0), "hf5", 1, 14, 28, True),
    "hf-beit-mean-pool": (tiny_hf_beit, "hf5", 1, 14, 28, True),
    "timm-eva02-fused": (tiny_timm_eva, "timm-eva", 1, 14, 28, False),
    "timm-eva02-separate": (lambda: tiny_timm_eva(fused=False), "timm-eva", 1, 14, 28, False),
    "timm-eva-no-rope": (lambda: tiny_timm_eva(rope=False), "timm-eva", 1, 14, 28, True),
    "timm-beit": (tiny_timm_beit, "timm-beit", 1, 16, 32, False),
    "torchvision-vit": (
        pytest.param(tiny_torchvision_vit, marks=needs_torchvision),
        "torchvision",
        1,
        14,
        28,
        True,
    ),
    "open-clip-visual": (
        pytest.param(_open_clip_visual, marks=needs_open_clip),
        "open-clip",
        1,
        14,
        28,
        True,
    ),
}


def _family_params() -> list:
    params = []
    for name, (build, *_rest) in FAMILIES.items():
        marks = build.marks if hasattr(build, "marks") else ()
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def _build(name: str) -> nn.Module:
    build = FAMILIES[name][0]
    return (build.values[0] if hasattr(build, "values") else build)()


def _images(size: int, n: int = 2, seed: int = 1, width: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size if width is None else width, generator=generator)


def _outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise TypeError(type(out))


def _replaced_forwards(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


@pytest.mark.parametrize("name", _family_params())
def test_adapter_counts_and_forward(name: str) -> None:
    _, _, prefix, patch, size, has_tokens = FAMILIES[name]
    model = _build(name)
    adapter = get_adapter(model)
    assert adapter.prefix_tokens == prefix
    assert adapter.patch_size == (patch, patch)
    assert adapter.supports_tokens == has_tokens
    images = _images(size)
    with torch.no_grad():
        expected = _outputs(model, images)
        torch.testing.assert_close(adapter.logits(images), expected, atol=1e-5, rtol=1e-5)
        if has_tokens:
            states, logits = adapter.tokens.states(images)
            assert states[0].shape[1] == prefix + (size // patch) ** 2
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert _replaced_forwards(model) == []  # the adapter's attention is installed only in a call


@pytest.mark.parametrize("name", _family_params())
def test_gradmask_matches_reference(name: str) -> None:
    _, kind, prefix, patch, size, _ = FAMILIES[name]
    model = _build(name)
    images = _images(size)
    ours = GradMaskAttribution(model).attribute_grid(images, masks_per_layer=4, layers="all")
    assert ours.abs().sum() > 0
    for i in range(images.shape[0]):
        ref = reference_gradmask(
            model, images[i], kind, 4, prefix=prefix, patch=patch, layers="all"
        )
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-6)
    assert _replaced_forwards(model) == []


@pytest.mark.parametrize("name", _family_params())
def test_fast_mode_runs_or_is_refused_with_the_reason(name: str) -> None:
    _, _, _, _, size, has_tokens = FAMILIES[name]
    model = _build(name)
    gradmask = GradMaskAttribution(model)
    images = _images(size)
    if has_tokens:
        fast = gradmask.attribute_grid(images, mode="fast")
        assert fast.shape == gradmask.attribute_grid(images).shape
        assert torch.isfinite(fast).all()
    else:
        with pytest.raises(ValueError, match="cannot run apart from their positions"):
            gradmask.attribute_grid(images, mode="fast")


def _model_probabilities(model: nn.Module, name: str, images: torch.Tensor) -> list:
    """Each layer's attention probabilities as the model itself computes them (its eager path
    or the module's own weights output), to check the adapter's taps against."""
    recorded: list[torch.Tensor] = []
    if name.startswith("timm"):
        handles = []
        for block in model.blocks:
            block.attn.fused_attn = False
            handles.append(
                block.attn.attn_drop.register_forward_hook(
                    lambda m, args, out: recorded.append(out)
                )
            )
        try:
            model(images)
        finally:
            for block, handle in zip(model.blocks, handles, strict=True):
                handle.remove()
                block.attn.fused_attn = True
        return recorded
    if name == "torchvision-vit":
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + model.encoder.pos_embedding
        for block in model.encoder.layers:
            normed = block.ln_1(x)
            _, weights = block.self_attention(
                normed, normed, normed, need_weights=True, average_attn_weights=False
            )
            recorded.append(weights)
            x = block(x)
        return recorded
    raise ValueError(name)


@pytest.mark.parametrize(
    "name",
    [
        "timm-eva02-fused",
        "timm-eva02-separate",
        "timm-beit",
        pytest.param("torchvision-vit", marks=needs_torchvision),
    ],
)
def test_tapped_probabilities_are_the_models_own(name: str) -> None:
    """Rotary and relative position terms included: rollout and Chefer read these."""
    model = _build(name)
    images = _images(FAMILIES[name][4])
    with torch.no_grad():
        expected = _model_probabilities(model, name, images)
    passed = attention_pass(get_adapter(model), images, ())
    assert len(passed.probabilities) == len(expected)
    for ours, theirs in zip(passed.probabilities, expected, strict=True):
        torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", _family_params())
def test_attention_methods_and_captum_run(name: str) -> None:
    _, _, prefix, patch, size, _ = FAMILIES[name]
    model = _build(name)
    images = _images(size)
    grid = (size // patch, size // patch)
    row = "cls" if prefix else "mean"
    rollout = AttentionRollout(model).attribute_grid(images, row=row)
    chefer = CheferGAE(model).attribute_grid(images, target=0, row=row)
    assert rollout.shape == chefer.shape == (2, *grid)
    assert torch.isfinite(chefer).all() and (rollout > 0).all()
    if not prefix:
        with pytest.raises(ValueError, match="row='mean'"):
            AttentionRollout(model).attribute_grid(images)
    ig = integrated_gradients(model).attribute(images, target=0)
    assert ig.shape[0] == 2 and torch.isfinite(ig).all()
    assert _replaced_forwards(model) == []


def test_non_square_images_through_position_interpolation() -> None:
    model = tiny_hf_clip_vision()
    images = _images(28, width=42)
    ours = GradMaskAttribution(model).attribute_grid(images, layers="all")
    assert ours.shape == (2, 2, 3)
    for i in range(2):
        ref = reference_gradmask(
            lambda x: model(x, interpolate_pos_encoding=True).logits,
            images[i],
            "hf-clip",
            4,
            prefix=1,
            patch=14,
            layers="all",
            tower=model,
        )
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-6)


def test_registers_are_prefix_tokens_of_the_dinov2_head() -> None:
    """The head reads CLS and the mean of the patch tokens, registers excluded: with the
    registers counted as patches the fast-mode head would differ from the model."""
    model = tiny_hf_dinov2(registers=4)
    adapter = get_adapter(model)
    images = _images(28)
    with torch.no_grad():
        tokens = adapter.tokens.embed(images)
        assert tokens.shape[1] == 1 + 4 + 4
        logits = adapter.run_tokens(tokens)
        torch.testing.assert_close(logits, model(images).logits, atol=1e-5, rtol=1e-5)


def test_attention_is_restored_after_an_error() -> None:
    model = tiny_timm_eva()
    adapter = get_adapter(model)
    with pytest.raises(RuntimeError, match="boom"), adapter.attention_context():
        assert len(_replaced_forwards(model)) == len(model.blocks)
        raise RuntimeError("boom")
    assert _replaced_forwards(model) == []
    gradmask = GradMaskAttribution(model)
    with pytest.raises(ValueError, match="target"):
        gradmask.attribute_grid(_images(28), target=99)
    assert _replaced_forwards(model) == []


@needs_torchvision
def test_replacement_forward_runs_inside_the_attention_context() -> None:
    """A callable beside the adapter is what is explained, with the taps still installed."""
    model = tiny_torchvision_vit()
    adapter = get_adapter(model)
    images = _images(28)

    def explained(x: torch.Tensor) -> torch.Tensor:
        return model(x) * 2

    doubled = GradMaskAttribution(explained, adapter=adapter).attribute_grid(images, target=1)
    assert doubled.shape == (2, 2, 2)


@pytest.mark.parametrize("family", ["swin", "convnext"])
def test_windowed_and_hierarchical_backbones_are_refused(family: str) -> None:
    import timm

    name = {"swin": "swin_tiny_patch4_window7_224", "convnext": "convnext_atto"}[family]
    model = timm.create_model(name, pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match="global self-attention"):
        get_adapter(model)


def test_image_text_models_point_to_zero_shot() -> None:
    from transformers import CLIPConfig, CLIPModel

    from .models import FAMILY_TEXT, FAMILY_VISION

    model = CLIPModel(CLIPConfig(vision_config=FAMILY_VISION, text_config=FAMILY_TEXT))
    with pytest.raises(ValueError, match="ZeroShotClassifier"):
        get_adapter(model)


def test_mean_row_is_the_mean_of_all_token_rows() -> None:
    from captum_gradmask.methods._attention import patch_row

    matrix = torch.rand(2, 5, 5)
    torch.testing.assert_close(
        patch_row(matrix, 1, "mean", (2, 2)), matrix.mean(1)[:, 1:].reshape(2, 2, 2)
    )
    torch.testing.assert_close(
        patch_row(matrix[:, 1:, 1:], 0, "mean", (2, 2)),
        matrix[:, 1:, 1:].mean(1).reshape(2, 2, 2),
    )


def test_eva02_non_square_images_with_dynamic_size() -> None:
    """Rotary embeddings for a 2 x 3 grid, as the model computes them for that size."""
    model = tiny_timm_eva(dynamic_img_size=True)
    images = torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(2))
    ours = GradMaskAttribution(model).attribute_grid(images, layers="all")
    assert ours.shape == (2, 2, 3)
    for i in range(2):
        ref = reference_gradmask(model, images[i], "timm-eva", 4, prefix=1, patch=14, layers="all")
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-6)
