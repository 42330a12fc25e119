"""Pieces shared by the evaluators: turning attributions into one map per image, target
probabilities in batches, and argument checks.

Kept private: the public API is what :mod:`captum_gradmask.metrics` exports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from captum_gradmask._ops import ChannelReduction, check_channel_reduction, reduce_channels
from captum_gradmask._utils import (
    check_finite,
    check_positive_int,
    chunks,
    forward_logits,
    preserved_model_state,
    resolve_targets,
    select_args,
)
from captum_gradmask.adapters import get_adapter

__all__ = [
    "ChannelReduction",
    "ProbabilityFn",
    "attribution_map",
    "batched_logits",
    "check_batch_size",
    "check_choice",
    "check_explanation_func",
    "class_probabilities",
    "progress",
    "resolve_patch_size",
    "target_probabilities",
]

ProbabilityFn = Callable[[Tensor], Tensor]
_REDUCTIONS = ("sum", "abs_sum")


def attribution_map(
    attributions: Tensor,
    inputs: Tensor,
    channel_reduction: ChannelReduction = "sum",
    name: str = "attributions",
) -> Tensor:
    """One ``(B, H, W)`` map per image at the input's resolution.

    Accepted shapes (``inputs`` is ``(B, C, H, W)``):

    - 4-D ``(B or 1, C or 1, h, w)``: anything that broadcasts to the input; a smaller spatial
      size ``(h, w)`` is a patch grid and is upsampled nearest to ``(H, W)``;
    - 3-D ``(B or 1, h, w)``: one map per image (a patch grid when ``(h, w) != (H, W)``);
      a 3-D tensor is always read as maps, never as ``(C, H, W)``;
    - 2-D ``(h, w)``: the same map for every image.

    Several channels are reduced by ``channel_reduction``: ``"sum"`` (signed) or
    ``"abs_sum"`` (sum of absolute values).
    """
    if not isinstance(attributions, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(attributions).__name__}")
    check_channel_reduction(channel_reduction, _REDUCTIONS)
    batch, channels, height, width = inputs.shape
    shape = tuple(attributions.shape)
    if attributions.dim() == 2:
        attr = attributions[None, None]
    elif attributions.dim() == 3:
        attr = attributions[:, None]
    elif attributions.dim() == 4:
        attr = attributions
    else:
        raise ValueError(
            f"`{name}` must have 2, 3 or 4 dimensions ((h, w), (B, h, w) or (B, C, h, w)); "
            f"got shape {shape}"
        )
    if attr.shape[0] not in (1, batch) or attr.shape[1] not in (1, channels):
        raise ValueError(
            f"`{name}` of shape {shape} does not broadcast to the inputs of shape "
            f"{tuple(inputs.shape)}: the batch dimension must be 1 or {batch} and the channel "
            f"dimension 1 or {channels}"
        )
    grid_h, grid_w = attr.shape[-2:]
    if grid_h > height or grid_w > width or grid_h < 1 or grid_w < 1:
        raise ValueError(
            f"`{name}` has spatial size {(grid_h, grid_w)}, larger than the input's "
            f"{(height, width)} (or empty); give a map at the input's size or a smaller patch grid"
        )
    attr = attr.detach().to(device=inputs.device)
    attr = attr.float() if not attr.is_floating_point() else attr
    check_finite(attr, name)
    attr = reduce_channels(attr, channel_reduction, _REDUCTIONS)
    if (grid_h, grid_w) != (height, width):
        attr = F.interpolate(attr, size=(height, width), mode="nearest")
    return attr[:, 0].expand(batch, height, width)


def check_explanation_func(explanation_func: Any) -> None:
    """Raise ``TypeError`` unless ``explanation_func`` is a callable."""
    if not callable(explanation_func):
        raise TypeError(
            "`explanation_func` must be a callable (inputs, target) -> attributions, got "
            f"{type(explanation_func).__name__}"
        )


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}")
    return value


def class_probabilities(logits: Tensor, probability_fn: ProbabilityFn | None) -> Tensor:
    """Softmax over classes, or ``probability_fn(logits)`` with the same ``(N, classes)`` shape."""
    if probability_fn is None:
        return torch.softmax(logits.float(), dim=-1)
    probs = probability_fn(logits)
    if not isinstance(probs, Tensor) or probs.shape != logits.shape:
        got = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(
            f"`probability_fn` must map logits of shape {tuple(logits.shape)} to a tensor of the "
            f"same shape (one score per class); got {got}"
        )
    return probs


@torch.no_grad()
def batched_logits(
    forward_func: Callable[..., Any],
    inputs: Tensor,
    additional_forward_args: Any,
    batch_size: int,
) -> Tensor:
    """Logits of ``inputs`` computed ``batch_size`` images at a time."""
    batch = inputs.shape[0]
    out = []
    with preserved_model_state(forward_func if isinstance(forward_func, torch.nn.Module) else None):
        for sl in chunks(batch, batch_size):
            index = torch.arange(batch, device=inputs.device)[sl]
            extra = select_args(additional_forward_args, index, batch)
            out.append(forward_logits(forward_func, inputs[sl], extra or None))
    return torch.cat(out)


def target_probabilities(
    forward_func: Callable[..., Any],
    inputs: Tensor,
    target: Any,
    additional_forward_args: Any,
    batch_size: int,
    probability_fn: ProbabilityFn | None,
) -> tuple[Tensor, Tensor]:
    """``(targets, p_target(inputs))``; a ``None`` target means each image's predicted class."""
    logits = batched_logits(forward_func, inputs, additional_forward_args, batch_size)
    targets = resolve_targets(target, logits)
    probs = class_probabilities(logits, probability_fn)
    return targets, probs.gather(1, targets[:, None])[:, 0]


def progress(iterable: Iterator[Any] | list[Any], show: bool, desc: str, total: int) -> Any:
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total)


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    return check_positive_int(batch_size, name)


def resolve_patch_size(
    forward_func: Any, patch_size: int | tuple[int, int] | None
) -> tuple[int, int]:
    """``(ph, pw)``: ``patch_size`` when given, else the patch size of ``forward_func``'s
    adapter (:func:`~captum_gradmask.adapters.get_adapter`); never a default that fits one
    architecture.

    Raises:
        ValueError: ``patch_size`` is not positive, or is ``None`` and ``forward_func`` is not a
            model an adapter recognises.
    """
    if patch_size is None:
        try:
            return get_adapter(forward_func).patch_size
        except ValueError:
            raise ValueError(
                f"`patch_size` is needed: `forward_func` (a {type(forward_func).__name__}) is not "
                "a ViT the library recognises, so its patch size is unknown; pass "
                "patch_size=<the model's patch side> (e.g. 16 for ViT-B/16, 14 for DINOv2)"
            ) from None
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    return check_positive_int(ph, "patch_size"), check_positive_int(pw, "patch_size")
