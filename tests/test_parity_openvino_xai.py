"""ViT-ReciproCAM against its authors' code: ``TorchViTReciproCAM`` of ``openvino-xai`` 1.1.0.

The authors' package pins ``numpy==1.*`` and OpenVINO 2024.4, so CI installs it in a second
venv (``.ci/run``) and runs only this file there; elsewhere it skips.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from captum_gradmask.methods import ViTReciproCAM
from captum_gradmask.registry import build_method

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, TIMM_VIT_TINY, needs_shared
from .models import tiny_hf_vit, tiny_timm_vit

openvino_xai_torch = pytest.importorskip(
    "openvino_xai.methods.white_box.torch",
    reason="openvino-xai (the authors' ViT-ReciproCAM) is not installed; CI installs it",
)


class _Logits(nn.Module):
    """The authors' code hooks the model's output tensor: a Hugging Face model's logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images).logits


def _authors_maps(model: nn.Module, images: torch.Tensor, **options) -> torch.Tensor:
    """``TorchViTReciproCAM``'s maps ``(B, classes, h, w)``, one image at a time (their hook
    explains one image per call)."""
    size = tuple(images.shape[-2:])
    method = openvino_xai_torch.TorchViTReciproCAM(model, input_size=size, **options)
    maps = [method.generate_saliency_map(image[None].numpy()) for image in images]
    return torch.from_numpy(np.concatenate(maps))


def _check(
    model: nn.Module,
    wrapped: nn.Module,
    images: torch.Tensor,
    targets: list[int],
    kernels: tuple[bool, ...] = (True, False),
    display: bool = True,
) -> None:
    """The registry's maps (raw and normalised) equal the authors' for each kernel."""
    for gaussian in kernels:
        name = "vit-reciprocam" if gaussian else "vit-reciprocam-1x1"
        theirs = _authors_maps(wrapped, images, use_gaussian=gaussian, embed_scaling=False)
        method = build_method(name, model)
        raw = method.method.attribute_grid(
            images, target=targets, **{**method.settings, "normalize": False}
        )
        rows = torch.arange(len(targets))
        torch.testing.assert_close(raw, theirs[rows, targets], atol=1e-5, rtol=1e-5)
        if not display:
            continue
        # Their display normalisation: min-max to 0..255, truncated to uint8.
        shown = _authors_maps(wrapped, images, use_gaussian=gaussian)[rows, targets].float()
        ours = method.attribute_grid(images, target=targets) * 255
        assert ((ours - shown) > -1e-3).all() and ((ours - shown) < 1 + 1e-3).all()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def test_registry_equals_authors_on_random_hf_vit() -> None:
    model = tiny_hf_vit()
    _check(model, _Logits(model), _images(2), [1, 6])


def test_registry_equals_authors_on_random_timm_vit() -> None:
    model = tiny_timm_vit()
    _check(model, model, _images(2), [0, 3])


def test_block_input_site_differs_from_authors() -> None:
    """The documented departure is a real one: the authors' maps are not the block-input ones."""
    model = tiny_timm_vit()
    images = _images(1)
    theirs = _authors_maps(model, images, embed_scaling=False)[0, 2]
    variant = ViTReciproCAM(model).attribute_grid(
        images, target=2, normalize=False, site="block-input"
    )[0]
    assert (variant - theirs).abs().max() > 1e-3


@pytest.mark.slow
@needs_shared
def test_registry_equals_authors_on_real_vit_tiny() -> None:
    """The shared ImageNet ViT-Tiny on real images, in both formats (Hugging Face and timm)."""
    import timm
    from transformers import ViTForImageClassification

    from captum_gradmask.data import load_imagenet_sample, preprocess_image

    records = load_imagenet_sample(IMAGENET_SAMPLE, limit=2)
    images = torch.stack([preprocess_image(r.path) for r in records])
    targets = [r.label for r in records]
    hf = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    _check(hf, _Logits(hf), images, targets, display=False)
    timm_model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=TIMM_VIT_TINY)
    ).eval()
    _check(timm_model, timm_model, images, targets, kernels=(True,), display=False)
