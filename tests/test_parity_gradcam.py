"""``layer-gradcam`` against the authors' code for ViTs: jacobgil's pytorch-grad-cam
(``pytorch_grad_cam.GradCAM``), called as its ViT tutorial does: target layer the last block's
first LayerNorm, the tutorial's ``reshape_transform`` (drop the CLS token, reshape the patch
tokens to ``(B, h, w, D)``, channels first) and ``ClassifierOutputTarget``.

pytorch-grad-cam min-max normalises each map and resizes it with OpenCV, so the exact comparison
is at the patch grid, before any scaling:

- theirs: the raw per-layer map ``get_cam_image(...)`` returns (channel weights = gradients
  averaged over the grid, weighted sum of the activations), read by wrapping that method in a
  subclass while ``GradCAM.__call__`` runs unchanged, then ``np.maximum(cam, 0)`` as their
  ``compute_cam_per_layer`` does next;
- ours: the registry's ``layer-gradcam`` with ``interpolate_mode="nearest"``. The grid is
  32 / 8 = 4 patches a side, so nearest upsampling to 32 x 32 repeats every cell over an
  8 x 8 block and average pooling with an 8 x 8 kernel gives the ``(h, w)`` map back exactly
  (up to float rounding of the mean of 64 equal values).

The end-to-end maps are compared too: their returned ``(B, H, W)`` map against our default
map (bilinear, ``align_corners=False``: OpenCV's ``INTER_LINEAR``, the same half-pixel
upsampling) min-max normalised as their ``scale_cam_image`` does (``x - min``, divided by
``1e-7 + max``), twice: they normalise once per target layer (before resizing; bilinear
upsampling keeps the min and max, so before or after is the same) and again after averaging
the layers. With raw maxima of a few 1e-3 on these random models the ``1e-7`` moves the map
by up to 5e-5, so it is applied as they do. Tolerances: 1e-5 of the largest raw value at the
grid (observed 5e-7), 1e-5 absolute on the normalised maps (observed 3e-7).

Optional: skips where pytorch-grad-cam (PyPI ``grad-cam``) is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_gradmask.adapters import get_adapter
from captum_gradmask.registry import build_method

from .models import tiny_hf_vit, tiny_timm_vit

pytorch_grad_cam = pytest.importorskip(
    "pytorch_grad_cam",
    reason="pytorch-grad-cam (PyPI `grad-cam`, the authors' Grad-CAM for ViTs) is not installed",
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

GRID = 4  # 32 x 32 images, patch 8
PATCH = 8


class _Logits(nn.Module):
    """The tutorial's wrapper for Hugging Face models: the output tensor is the logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def reshape_transform(tensor: torch.Tensor, height: int = GRID, width: int = GRID):
    """pytorch-grad-cam's ViT ``reshape_transform`` (its docs and ``vit_example.py``)."""
    result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
    return result.transpose(2, 3).transpose(1, 2)


class _RawGradCAM(pytorch_grad_cam.GradCAM):
    """``GradCAM`` that keeps the raw map of each target layer before it is scaled."""

    def get_cam_image(self, *args, **kwargs):
        cam = super().get_cam_image(*args, **kwargs)
        self.raw_cams.append(cam)
        return cam


def _theirs(model: nn.Module, images: torch.Tensor, targets: list[int]):
    layer = get_adapter(model).cam_layer
    wrapped = _Logits(model) if hasattr(model, "config") else model
    with _RawGradCAM(wrapped, [layer], reshape_transform=reshape_transform) as cam:
        cam.raw_cams = []
        final = cam(images, targets=[ClassifierOutputTarget(t) for t in targets])
        (raw,) = cam.raw_cams
    return np.maximum(raw, 0), final


def _min_max(maps: np.ndarray) -> np.ndarray:
    """``scale_cam_image``'s normalisation of each map, without its resizing."""
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    return maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))


@pytest.mark.parametrize("build_model", [tiny_hf_vit, tiny_timm_vit], ids=["hf", "timm"])
def test_layer_gradcam_equals_pytorch_grad_cam(build_model) -> None:
    model = build_model()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = [1, 5, 2]
    raw, final = _theirs(model, images, targets)
    assert raw.shape == (3, GRID, GRID) and final.shape == (3, 32, 32)
    assert raw.max() > 0  # a map with something in it, not all zeros after ReLU

    nearest = build_method("layer-gradcam", model, interpolate_mode="nearest")
    upsampled = nearest.attribute(images, target=targets)
    grid = F.avg_pool2d(upsampled[:, :1], PATCH)[:, 0]
    # the raw maps are ~1e-3 here: the tolerance is 1e-5 of each batch's largest value
    np.testing.assert_allclose(grid.detach().numpy(), raw, atol=1e-5 * raw.max(), rtol=0)

    ours = build_method("layer-gradcam", model).attribute(images, target=targets)[:, 0]
    ours = _min_max(_min_max(ours.detach().double().numpy()))
    np.testing.assert_allclose(ours, final, atol=1e-5, rtol=0)
