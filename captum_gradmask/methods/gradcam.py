"""Grad-CAM for Vision Transformers: Captum's ``LayerGradCam`` on a token layer seen as a
``(B, D, h, w)`` feature map.

The layer is the adapter's ``cam_layer`` by default (the first LayerNorm of the last encoder
block, the layer pytorch-grad-cam recommends for ViTs): the block's output patch tokens get no
gradient (only CLS reaches the head) but the LayerNorm output feeds the keys and values the CLS
query attends to. Prefix tokens are dropped and token ``k`` goes to grid cell ``(k // w, k % w)``
(:func:`~captum_gradmask._ops.tokens_to_grid`), ReLU, then bilinear upsampling to the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from captum.attr import LayerGradCam
from torch import Tensor, nn

from .._ops import grid_to_tokens, tokens_to_grid
from ..adapters import ViTAdapter
from .captum_baselines import CaptumBaseline, _setup

__all__ = ["ViTLayerGradCam", "default_gradcam_layer", "layer_gradcam"]


def default_gradcam_layer(adapter: ViTAdapter) -> nn.Module:
    """The adapter's ``cam_layer``: the first LayerNorm of the last encoder block for the
    built-in adapters (pytorch-grad-cam's choice for ViTs: timm ``blocks[-1].norm1``, Hugging
    Face ``layernorm_before`` of the last layer).

    Raises:
        ValueError: when the adapter names none; pass ``layer=`` to :func:`layer_gradcam` then.
    """
    if adapter.cam_layer is None:
        raise ValueError(
            f"adapter {adapter.name!r} names no `cam_layer` (the default Grad-CAM layer): pass "
            "`layer=` (a module whose output is the (B, tokens, D) sequence of a late encoder "
            "block) or build the adapter with `cam_layer=`"
        )
    return adapter.cam_layer


class _TokenGrid(nn.Module):
    """Identity on the ``(B, D, h, w)`` view of a token sequence: Captum hooks its output."""

    def forward(self, grid_map: Tensor) -> Tensor:
        return grid_map


class ViTLayerGradCam(CaptumBaseline):
    """Captum ``LayerGradCam`` on a ViT token layer seen as a ``(B, D, h, w)`` feature map.

    Captum's Grad-CAM averages gradients over the dimensions after the second, so it needs a
    channels-first spatial map. During :meth:`attribute`, a forward hook on ``layer`` rewrites
    its output ``(B, P + h*w, D)`` as the prefix tokens followed by :func:`tokens_to_grid`
    passed through an identity module (and flattened back), and Grad-CAM is taken on that
    module's output. The ReLU'd ``(h, w)`` map is upsampled (``interpolate_mode``) to the input
    size and repeated over the channels. Build it with :func:`layer_gradcam`.
    """

    def __init__(
        self,
        forward: Callable[..., Tensor],
        adapter: ViTAdapter,
        layer: nn.Module,
        *,
        model: nn.Module | None,
        interpolate_mode: str,
    ) -> None:
        self.grid_view = _TokenGrid()
        super().__init__(
            "layer-gradcam",
            LayerGradCam(forward, self.grid_view),
            {"relu_attributions": True},
            model=model,
        )
        self.adapter = adapter
        self.layer = layer
        self.interpolate_mode = interpolate_mode

    def _attribute(self, images: Tensor, targets: Tensor, args: tuple[Any, ...]) -> Tensor:
        grid = self.adapter.grid(tuple(images.shape[-2:]))
        prefix = self.adapter.prefix_tokens

        def reshape_hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            grid_map = self.grid_view(tokens_to_grid(output, prefix, grid))
            return grid_to_tokens(grid_map, output[:, :prefix])

        handle = self.layer.register_forward_hook(reshape_hook)
        try:
            cam = self.attribution.attribute(
                images, target=targets, additional_forward_args=args or None, **self.settings
            )
        finally:
            handle.remove()
        extra = {"align_corners": False} if self.interpolate_mode == "bilinear" else {}
        up = F.interpolate(cam, size=tuple(images.shape[-2:]), mode=self.interpolate_mode, **extra)
        return up.expand(-1, images.shape[1], -1, -1).contiguous()


def layer_gradcam(
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    layer: nn.Module | None = None,
    interpolate_mode: str = "bilinear",
) -> ViTLayerGradCam:
    """Grad-CAM for ViTs (:class:`ViTLayerGradCam`) on ``layer``.

    Args:
        layer: a module whose output is the ``(B, P + h*w, D)`` token sequence of a late
            encoder block; default :func:`default_gradcam_layer`.
        interpolate_mode: ``"bilinear"`` (pytorch-grad-cam's upsampling) or ``"nearest"``.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods.gradcam import layer_gradcam
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> layer_gradcam(model).attribute(torch.randn(2, 3, 32, 32), target=3).shape
        torch.Size([2, 3, 32, 32])
    """
    adapter, forward, module = _setup(model, adapter)
    target_layer = default_gradcam_layer(adapter) if layer is None else layer
    if interpolate_mode not in ("bilinear", "nearest"):
        raise ValueError(
            f"`interpolate_mode` must be 'bilinear' or 'nearest', got {interpolate_mode!r}"
        )
    return ViTLayerGradCam(
        forward,
        adapter,
        target_layer,
        model=module,
        interpolate_mode=interpolate_mode,
    )
