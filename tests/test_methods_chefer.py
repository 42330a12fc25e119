"""Chefer et al. (ICCV 2021) relevance against its definition, computed plainly from the eager
attention probabilities and autograd's gradient with respect to them."""

from __future__ import annotations

import pytest
import torch

from captum_gradmask import ViTAdapter
from captum_gradmask.methods import CheferGAE

from .models import tiny_hf_deit, tiny_hf_vit, tiny_timm_distilled, tiny_timm_vit
from .test_methods_attention import hf_eager_attention, timm_eager_attention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: on a shared 2-core machine, intra-op threads only contend (100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def plain_relevance(
    attentions: list[torch.Tensor],
    gradients: list[torch.Tensor],
    image: int,
    prefix: int = 1,
    rows: tuple[int, ...] = (0,),
) -> torch.Tensor:
    """R = I; per layer R += E_h[(grad * A)^+] R; the CLS row over the patches (one image)."""
    tokens = attentions[0].shape[-1]
    relevance = torch.eye(tokens)
    for attention, gradient in zip(attentions, gradients, strict=True):
        heads = attention.shape[1]
        weighted = torch.zeros(tokens, tokens)
        for h in range(heads):
            weighted += torch.clamp(gradient[image, h] * attention[image, h], min=0) / heads
        relevance = relevance + weighted @ relevance
    row = torch.stack([relevance[r] for r in rows]).mean(0)
    return row[prefix:].reshape(4, 4)


CASES = {
    "hf-vit": (tiny_hf_vit, hf_eager_attention, 1),
    "hf-deit": (lambda: tiny_hf_deit(teacher=False), hf_eager_attention, 2),
    "hf-deit-teacher": (lambda: tiny_hf_deit(teacher=True), hf_eager_attention, 2),
    "timm-vit": (tiny_timm_vit, timm_eager_attention, 1),
    "timm-distilled": (tiny_timm_distilled, timm_eager_attention, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_plain_relevance(name: str) -> None:
    build, eager_attention, prefix = CASES[name]
    model = build()
    images = _images()
    target = [2, 6]
    attentions, gradients = eager_attention(model, images, target)
    chefer = CheferGAE(model)
    ours = chefer.attribute_grid(images, target=target)
    for i in range(2):
        expected = plain_relevance(attentions, gradients, i, prefix=prefix)
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=1e-4)
    if prefix == 2:
        both = chefer.attribute_grid(images, target=target, row="prefix_mean")
        for i in range(2):
            expected = plain_relevance(attentions, gradients, i, prefix=2, rows=(0, 1))
            torch.testing.assert_close(both[i], expected, atol=1e-6, rtol=1e-4)


def test_targets_batches_and_upsampling() -> None:
    model = tiny_hf_vit()
    images = _images(3)
    chefer = CheferGAE(model)
    predicted = model(images).logits.argmax(-1)
    default = chefer.attribute_grid(images)
    torch.testing.assert_close(default, chefer.attribute_grid(images, target=predicted))
    per_image = chefer.attribute_grid(images, target=[0, 3, 6])
    single = torch.cat(
        [chefer.attribute_grid(images[i : i + 1], target=t) for i, t in enumerate([0, 3, 6])]
    )
    torch.testing.assert_close(per_image, single, atol=1e-6, rtol=1e-5)
    chunked = chefer.attribute_grid(images, target=[0, 3, 6], internal_batch_size=2)
    torch.testing.assert_close(per_image, chunked, atol=1e-6, rtol=1e-5)
    # the map depends on the target (unlike rollout)
    assert not torch.allclose(per_image, chefer.attribute_grid(images, target=1))
    attr = chefer.attribute((images,), target=[0, 3, 6])[0]
    expected = per_image.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    torch.testing.assert_close(attr, expected.expand_as(images))
    assert per_image.min() >= 0


def test_custom_adapter_from_modules() -> None:
    model = tiny_timm_vit()
    adapter = ViTAdapter.from_modules(
        model,
        num_heads=3,
        patch_size=8,
        prefix_tokens=1,
        fused_qkv=[b.attn.qkv for b in model.blocks],
        outputs=[b.attn.proj for b in model.blocks],
        model=model,
    )
    images = _images()
    torch.testing.assert_close(
        CheferGAE(model, adapter=adapter).attribute_grid(images, target=1),
        CheferGAE(model).attribute_grid(images, target=1),
    )


def test_inputs_and_params_are_untouched() -> None:
    model = tiny_hf_vit()
    images = _images().requires_grad_(True)
    CheferGAE(model).attribute(images, target=0)
    assert images.grad is None
    assert all(p.grad is None for p in model.parameters())
