"""Attention rollout and Chefer et al.'s relevance against their authors' code, re-derived in
``references/`` (Chefer's Transformer-MM-Explainability ViT notebook and Transformer-
Explainability rollout, jacobgil's vit-explain), on models with eager and with SDPA attention:
the library recomputes the attention from Q and K and must not drift from what the authors read
out of an eager model."""

from __future__ import annotations

import pytest
import torch

from captum_gradmask.methods import AttentionRollout, CheferGAE
from references.attention import attention_maps
from references.chefer import relevance
from references.rollout import chefer_rollout, vit_explain_rollout

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, TIMM_VIT_TINY, needs_shared
from .models import tiny_hf_deit, tiny_hf_vit, tiny_timm_distilled, tiny_timm_vit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 2, seed: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "hf-vit-eager": (lambda: tiny_hf_vit(attn_implementation="eager"), 1),
    "hf-vit-sdpa": (lambda: tiny_hf_vit(attn_implementation="sdpa"), 1),
    "hf-deit-sdpa": (lambda: tiny_hf_deit(attn_implementation="sdpa"), 2),
    "timm-vit-fused": (tiny_timm_vit, 1),
    "timm-distilled": (tiny_timm_distilled, 2),
}


def _check(model, images, targets, prefix, grid, tolerance):
    rollout = AttentionRollout(model).attribute_grid(images)
    chefer = CheferGAE(model).attribute_grid(images, target=targets)
    for i, target in enumerate(targets):
        attentions, gradients = attention_maps(model, images[i], target)
        expected = chefer_rollout(attentions, prefix).reshape(grid)
        torch.testing.assert_close(rollout[i], expected, **tolerance)
        # vit-explain: the same rollout divided by its maximum (mean fusion, no discarding)
        explain = vit_explain_rollout(attentions, 0.0, "mean", prefix).reshape(grid)
        torch.testing.assert_close(rollout[i] / rollout[i].max(), explain, **tolerance)
        expected = relevance(attentions, gradients, prefix).reshape(grid)
        torch.testing.assert_close(chefer[i], expected, **tolerance)


@pytest.mark.parametrize("name", list(MODELS))
def test_rollout_and_chefer_equal_authors_code(name: str) -> None:
    build, prefix = MODELS[name]
    _check(build(), _images(), [2, 6], prefix, (4, 4), dict(atol=1e-6, rtol=1e-5))


def test_references_see_the_target() -> None:
    """Chefer's relevance depends on the target, rollout does not: the references are not
    trivially equal to anything."""
    model = tiny_hf_vit()
    image = _images(1)[0]
    first, grads_first = attention_maps(model, image, 1)
    second, grads_second = attention_maps(model, image, 4)
    assert not torch.allclose(relevance(first, grads_first), relevance(second, grads_second))
    torch.testing.assert_close(chefer_rollout(first), chefer_rollout(second))


@pytest.mark.slow
@needs_shared
@pytest.mark.parametrize("attention", ["eager", "sdpa", "timm"])
def test_equal_authors_code_on_real_vit_tiny(attention: str) -> None:
    import timm
    from transformers import ViTForImageClassification

    from captum_gradmask.data import load_imagenet_sample, preprocess_image

    records = load_imagenet_sample(IMAGENET_SAMPLE, limit=2)
    images = torch.stack([preprocess_image(r.path) for r in records])
    if attention == "timm":
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=True,
            pretrained_cfg_overlay=dict(file=TIMM_VIT_TINY),
        ).eval()
    else:
        model = ViTForImageClassification.from_pretrained(
            HF_VIT_TINY, attn_implementation=attention
        ).eval()
    targets = [r.label for r in records]
    _check(model, images, targets, 1, (14, 14), dict(atol=2e-6, rtol=1e-5))
