"""Small helpers shared by every attribution method and metric.

Nothing here knows about a particular architecture: model-specific knowledge lives in
:mod:`captum_gradmask.adapters`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

TargetType = int | Sequence[int] | Tensor | None


def extract_logits(output: Any) -> Tensor:
    """Return the logits tensor of a model output.

    Accepts a plain tensor, a Hugging Face ``ModelOutput`` (its ``logits``), a mapping with a
    ``"logits"`` key, or a tuple/list whose first element is the logits.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, dict) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"could not find logits in the model output of type {type(output).__name__}; "
        "the forward function must return a tensor, a Hugging Face output with `.logits`, "
        "or a tuple whose first element is the logits"
    )


def forward_logits(
    forward_func: Callable[..., Any],
    inputs: Tensor,
    additional_forward_args: Any = None,
) -> Tensor:
    """Call ``forward_func(inputs, *additional_forward_args)`` and return 2-D logits."""
    extra = _as_args(additional_forward_args)
    logits = extract_logits(forward_func(inputs, *extra))
    if logits.dim() != 2:
        raise ValueError(
            f"the model must return logits of shape (batch, classes); got shape "
            f"{tuple(logits.shape)}"
        )
    return logits


def _as_args(additional_forward_args: Any) -> tuple[Any, ...]:
    if additional_forward_args is None:
        return ()
    if isinstance(additional_forward_args, tuple):
        return additional_forward_args
    return (additional_forward_args,)


def expand_additional_args(additional_forward_args: Any, repeats: int) -> tuple[Any, ...]:
    """Repeat tensor arguments whose first dimension is the batch (Captum's convention)."""
    return tuple(
        a.repeat_interleave(repeats, dim=0) if isinstance(a, Tensor) and a.dim() > 0 else a
        for a in _as_args(additional_forward_args)
    )


def unpack_inputs(inputs: Tensor | tuple[Tensor, ...], name: str = "inputs") -> tuple[Tensor, bool]:
    """Accept a tensor or a one-element tuple (Captum's forms); return it and if it was a tuple."""
    is_tuple = isinstance(inputs, tuple)
    if is_tuple:
        if len(inputs) != 1:
            raise ValueError(
                f"`{name}` must be a tensor or a one-element tuple of a tensor (images), "
                f"got a tuple of {len(inputs)} elements"
            )
        inputs = inputs[0]
    if not isinstance(inputs, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of images, got {type(inputs).__name__}")
    if inputs.dim() != 4:
        raise ValueError(
            f"`{name}` must have shape (batch, channels, height, width); got shape "
            f"{tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {inputs.dtype}")
    check_finite(inputs, name)
    return inputs, is_tuple


def check_finite(tensor: Tensor, name: str = "inputs") -> None:
    """Raise ``ValueError`` naming ``name`` if ``tensor`` holds NaN or infinite values."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"`{name}` contains {bad} NaN or infinite value(s); attributions need finite inputs"
        )


def format_target(
    target: TargetType, batch_size: int, num_classes: int, device: torch.device
) -> Tensor:
    """Turn Captum-style targets into a ``(batch,)`` long tensor, checking the range.

    ``target`` may be an int (same class for every example), a sequence or 1-D tensor with one
    class per example, or a 0-d tensor.
    """
    if isinstance(target, Tensor):
        if target.dim() == 0:
            target = int(target.item())
        elif target.dim() == 1:
            target = target.tolist()
        else:
            raise ValueError(
                f"`target` must be an int, a list or a 1-D tensor of class indices; got a tensor "
                f"of shape {tuple(target.shape)}"
            )
    if isinstance(target, bool) or not isinstance(target, (int, Sequence)):
        raise TypeError(
            f"`target` must be an int, a list or a 1-D tensor of class indices; got {target!r}"
        )
    targets = [target] * batch_size if isinstance(target, int) else list(target)
    if len(targets) != batch_size:
        raise ValueError(
            f"`target` has {len(targets)} entries but the batch has {batch_size} images; "
            "give one class per image or a single int"
        )
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_classes:
            raise ValueError(
                f"`target` value {t!r} is out of range: the model has {num_classes} classes, "
                f"valid targets are 0..{num_classes - 1}"
            )
    return torch.tensor(targets, dtype=torch.long, device=device)


def check_target_length(target: TargetType, batch_size: int) -> None:
    """Raise early when a per-example ``target`` does not have one entry per image."""
    per_example = (isinstance(target, Sequence) and not isinstance(target, str)) or (
        isinstance(target, Tensor) and target.dim() > 0
    )
    if per_example and len(target) != batch_size:
        raise ValueError(
            f"`target` has {len(target)} entries but the batch has {batch_size} images; "
            "give one class per image or a single int"
        )


def slice_target(target: TargetType, batch: slice) -> TargetType:
    """The part of a Captum-style ``target`` that belongs to the images in ``batch``."""
    if target is None or isinstance(target, int):
        return target
    if isinstance(target, Tensor) and target.dim() == 0:
        return int(target.item())
    return target[batch]


def slice_args(additional_forward_args: Any, batch: slice, batch_size: int) -> tuple[Any, ...]:
    """Extra forward arguments for the images in ``batch`` (batch-first tensors are sliced)."""
    args = expand_additional_args(additional_forward_args, 1)
    return tuple(
        a[batch] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch_size else a
        for a in args
    )


def resolve_targets(target: TargetType, logits: Tensor) -> Tensor:
    """Targets as a long tensor; ``None`` means each example's predicted class."""
    if target is None:
        return logits.argmax(dim=-1)
    return format_target(target, logits.shape[0], logits.shape[-1], logits.device)


@contextlib.contextmanager
def preserved_model_state(model: nn.Module | None, eval_mode: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore every module's mode afterwards.

    Also restores each parameter's ``requires_grad`` flag, so code inside may toggle them; both
    are restored on errors too.
    """
    if model is None or not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def chunks(total: int, size: int) -> Iterator[slice]:
    """Slices ``[0:size], [size:2*size], ...`` covering ``range(total)``."""
    if size < 1:
        raise ValueError(f"chunk size must be a positive int, got {size}")
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value
