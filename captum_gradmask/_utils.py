"""Small helpers shared by every attribution method and metric.

Nothing here knows about a particular architecture: model-specific knowledge lives in
:mod:`captum_gradmask.adapters`.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "TargetType",
    "check_finite",
    "check_index",
    "check_keywords",
    "check_no_args",
    "check_number",
    "check_positive_int",
    "check_recorded",
    "check_target",
    "check_token_count",
    "chunks",
    "expand_additional_args",
    "extract_logits",
    "format_target",
    "forward_logits",
    "model_fingerprint",
    "preserved_model_state",
    "recorded",
    "renamed_keyword",
    "resolve_targets",
    "select_args",
    "slice_target",
    "unique_modules",
    "unpack_inputs",
]

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
    if inputs.shape[1] not in (1, 3) and inputs.shape[-1] in (1, 3):
        raise ValueError(
            f"`{name}` of shape {tuple(inputs.shape)} looks channels-last (batch, height, width, "
            f"channels); give (batch, channels, height, width): `{name}.permute(0, 3, 1, 2)`"
        )
    if not inputs.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point tensor, got dtype {inputs.dtype}")
    if inputs.shape[0] == 0:
        raise ValueError(
            f"`{name}` is an empty batch (shape {tuple(inputs.shape)}); give at least one image"
        )
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
    target: TargetType,
    batch_size: int,
    num_classes: int | None,
    device: torch.device | None = None,
    name: str = "target",
) -> Tensor:
    """Turn Captum-style targets into a ``(batch,)`` long tensor, checking the range (when
    ``num_classes`` is known).

    ``target`` may be an int (same class for every example), a sequence or 1-D tensor with one
    class per example, or a 0-d tensor; ``name`` is the argument named in errors.
    """
    if isinstance(target, Tensor):
        if target.dim() == 0:
            target = int(target.item())
        elif target.dim() == 1:
            target = target.tolist()
        else:
            raise ValueError(
                f"`{name}` must be an int, a list or a 1-D tensor of class indices; got a tensor "
                f"of shape {tuple(target.shape)}"
            )
    if isinstance(target, bool) or not isinstance(target, (int, Sequence)):
        raise TypeError(
            f"`{name}` must be an int, a list or a 1-D tensor of class indices; got {target!r}"
        )
    targets = [target] * batch_size if isinstance(target, int) else list(target)
    if len(targets) != batch_size:
        raise ValueError(
            f"`{name}` has {len(targets)} entries but the batch has {batch_size} images; "
            "give one class per image or a single int"
        )
    for t in targets:
        if num_classes is None and (isinstance(t, bool) or not isinstance(t, int) or t < 0):
            raise ValueError(f"`{name}` value {t!r} is not a class index (an int >= 0)")
        if num_classes is not None and (
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_classes
        ):
            raise ValueError(
                f"`{name}` value {t!r} is out of range: the model has {num_classes} classes, "
                f"valid targets are 0..{num_classes - 1}"
            )
    return torch.tensor(targets, dtype=torch.long, device=device)


def check_target(target: TargetType, batch_size: int) -> None:
    """Raise early, naming ``target``, when it is not a valid Captum-style target for the batch.

    Valid: ``None``, an int, a sequence of ints or an integer tensor (0-d, or 1-d with one entry
    per image). The class range is checked later, against the model's logits.
    """
    if target is None:
        return
    if isinstance(target, Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"`target` must hold integer class indices, got a tensor of dtype {target.dtype}"
            )
        if target.dim() > 1:
            raise ValueError(
                f"`target` must be an int, a list or a 1-D tensor of class indices; got a tensor "
                f"of shape {tuple(target.shape)}"
            )
        entries = None if target.dim() == 0 else target.shape[0]
    elif (
        isinstance(target, bool)
        or not isinstance(target, (int, Sequence))
        or isinstance(target, str)
    ):
        raise TypeError(
            "`target` must be an int, a list or a 1-D tensor of class indices (or None for the "
            f"predicted class); got {target!r}"
        )
    elif isinstance(target, int):
        entries = None
    else:
        bad = [t for t in target if isinstance(t, bool) or not isinstance(t, int)]
        if bad:
            raise TypeError(
                f"`target` entries must be int class indices; got {bad[0]!r} in {list(target)!r}"
            )
        entries = len(target)
    if entries is not None and entries != batch_size:
        raise ValueError(
            f"`target` has {entries} entries but the batch has {batch_size} images; "
            "give one class per image or a single int"
        )


def slice_target(target: TargetType, batch: slice) -> TargetType:
    """The part of a Captum-style ``target`` that belongs to the images in ``batch``."""
    if target is None or isinstance(target, int):
        return target
    if isinstance(target, Tensor) and target.dim() == 0:
        return int(target.item())
    return target[batch]


def select_args(
    additional_forward_args: Any, rows: slice | Tensor, batch_size: int
) -> tuple[Any, ...]:
    """Extra forward arguments for the images ``rows`` (a slice or an index tensor) of a batch
    of ``batch_size``: tensors whose first dimension is the batch follow their images, the
    other arguments are passed as they are.

    Example::

        >>> import torch
        >>> from captum_gradmask._utils import select_args
        >>> scale, flag = torch.tensor([1.0, 2.0, 3.0]), True
        >>> select_args((scale, flag), torch.tensor([2, 0]), 3)
        (tensor([3., 1.]), True)
    """

    def pick(arg: Any) -> Any:
        if isinstance(arg, Tensor) and arg.dim() > 0 and arg.shape[0] == batch_size:
            return arg[rows.to(arg.device) if isinstance(rows, Tensor) else rows]
        return arg

    return tuple(pick(a) for a in _as_args(additional_forward_args))


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


def check_number(value: Any, name: str) -> float:
    """Return ``value`` if it is a real number (not a bool), else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {value!r}")
    return value


def check_keywords(
    method: str, valid: Callable[..., Any] | Sequence[str], keywords: Any, skip: int = 0
) -> None:
    """Raise ``TypeError`` naming ``method`` and its valid keywords when ``keywords`` holds a
    name that is not valid (a close spelling is suggested). ``valid`` is the names, or a
    function whose keyword parameters they are (after the first ``skip`` parameters; ``self``
    and ``inputs`` are never keywords).

    Example::

        >>> from captum_gradmask._utils import check_keywords
        >>> def grid(inputs, *, masks=4): ...
        >>> check_keywords("f", grid, {"mask": 2})
        Traceback (most recent call last):
        TypeError: f() has no keyword 'mask' (did you mean 'masks'?); its keywords are: masks
    """
    if callable(valid):
        parameters = list(inspect.signature(valid).parameters.values())[skip:]
        if any(p.kind == p.VAR_KEYWORD for p in parameters):
            return
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in parameters if p.kind in kinds]
    else:
        names = list(valid)
    names = [name for name in names if name not in ("self", "inputs")]
    for name in keywords:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"{method}() has no keyword {name!r}{hint}; its keywords are: {', '.join(names)}"
            )


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` if it is a positive int, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return value


def renamed_keyword(value: Any, default: Any, old_value: Any, new: str, old: str) -> Any:
    """The value of keyword ``new``, accepting its former name ``old`` for one release.

    ``old_value`` (``None`` when not given) wins with a ``DeprecationWarning`` naming ``new``;
    giving both with different values is an error.

    Example::

        >>> import warnings
        >>> from captum_gradmask._utils import renamed_keyword
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed_keyword(64, 64, 8, "perturbations_per_eval", "batch_size")
        8
        >>> str(caught[0].message)
        '`batch_size` is deprecated; use `perturbations_per_eval` (the same meaning)'
    """
    if old_value is None:
        return value
    warnings.warn(
        f"`{old}` is deprecated; use `{new}` (the same meaning)", DeprecationWarning, stacklevel=3
    )
    if value is not None and value != default and value != old_value:
        raise ValueError(
            f"give `{new}` ({value!r}) or the deprecated `{old}` ({old_value!r}), not both"
        )
    return old_value


def check_index(value: Any, count: int, name: str, what: str) -> int:
    """``value`` as an index in ``0..count-1`` (negative counts from the end), else a clear error.

    ``what`` names the indexed things in the message (e.g. ``"encoder blocks"``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or not -count <= value < count:
        raise ValueError(
            f"`{name}`={value!r} is not valid: give an index in -{count}..{count - 1} "
            f"(the model has {count} {what})"
        )
    return value % count


def check_token_count(tokens: int, prefix_tokens: int, grid: tuple[int, int]) -> None:
    """Raise when a token sequence is not ``prefix_tokens`` + the ``grid``'s patches."""
    patches = grid[0] * grid[1]
    if tokens != prefix_tokens + patches:
        raise ValueError(
            f"the model produced {tokens} tokens but the adapter expects {prefix_tokens} prefix "
            f"tokens + {grid[0]}x{grid[1]} patches = {prefix_tokens + patches}; check the "
            "adapter's `prefix_tokens` and `patch_size` for this image size"
        )


def check_no_args(additional_forward_args: Any, what: str) -> None:
    """Refuse ``additional_forward_args`` for methods that run the model from its tokens."""
    if additional_forward_args is not None:
        raise ValueError(
            f"`additional_forward_args` must be None for {what}: it runs the model through the "
            "adapter's token interface (embed, blocks, head), which takes no extra arguments "
            f"(got {type(additional_forward_args).__name__})"
        )


def unique_modules(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """``modules`` without repeats (a fused ``qkv`` module serves Q, K and V), in order."""
    return list({id(m): m for m in modules}.values())


@contextlib.contextmanager
def recorded(modules: Sequence[nn.Module], *, inputs: bool = False) -> Iterator[dict[int, Tensor]]:
    """Record each module's output (``inputs=True``: its first input) while the block runs.

    Yields a dict keyed by ``id(module)``; the hooks are removed when the block ends, errors
    included. Tuple outputs are recorded by their first element.
    """
    values: dict[int, Tensor] = {}

    def record_output(module: nn.Module, _args: Any, output: Any) -> None:
        values[id(module)] = output[0] if isinstance(output, (tuple, list)) else output

    def record_input(module: nn.Module, args: Any) -> None:
        values[id(module)] = args[0]

    handles = [
        m.register_forward_pre_hook(record_input)
        if inputs
        else m.register_forward_hook(record_output)
        for m in modules
    ]
    try:
        yield values
    finally:
        for handle in handles:
            handle.remove()


def check_recorded(modules: Sequence[nn.Module], values: dict[int, Tensor]) -> None:
    """Raise when some of the adapter's ``modules`` did not run in the forward pass."""
    missing = [m for m in modules if id(m) not in values]
    if missing:
        raise RuntimeError(
            f"{len(missing)} of the adapter's attention modules did not run in the forward pass; "
            "check that the adapter names modules of this model"
        )


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (a clear error for a module without any)."""
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if parameter is None:
        raise TypeError(f"`model` must be a torch nn.Module with parameters, got {model!r}")
    return parameter.device


def model_fingerprint(model: nn.Module) -> str:
    """A digest of the model's class and state dict (names, shapes, dtypes and bytes): two
    models give the same fingerprint exactly when they hold the same weights."""
    digest = hashlib.blake2b(type(model).__qualname__.encode(), digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()
