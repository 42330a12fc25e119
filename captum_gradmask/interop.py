"""Bridges to other explainability toolkits.

:func:`quantus_explain` is an ``explain_func`` for `Quantus <https://github.com/
understandable-machine-intelligence-lab/Quantus>`_: any metric of Quantus can score GradMask or
any method of :mod:`captum_gradmask.registry`. Quantus calls it as
``explain_func(model=..., inputs=x_batch, targets=y_batch, **explain_func_kwargs)`` with numpy
arrays and expects a numpy array back; the method is chosen by name (``method=``) and its
settings come in one dict (``method_settings=``), so that the keywords Quantus adds on its own
(``device``, ``channel_first``, ``softmax``...) never mix with them.

Quantus's ``PyTorchModel`` calls the model it is given on a tensor and needs a tensor back (and
treats Hugging Face models as text models); wrap a Hugging Face model in :class:`LogitsModel`
before handing it to a Quantus metric. This module does not import Quantus: it only takes and
returns numpy arrays (install the extra with ``pip install captum-gradmask[quantus]``).

Example::

    >>> import numpy as np
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.interop import LogitsModel, quantus_explain
    >>> vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...     num_labels=5)).eval()
    >>> model = LogitsModel(vit)  # what a Quantus metric is given
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    >>> a = quantus_explain(model=model, inputs=x, targets=np.array([1, 3]), device="cpu")
    >>> a.shape, a.dtype
    ((2, 1, 32, 32), dtype('float32'))
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from captum_gradmask._ops import ChannelReduction, check_channel_reduction, reduce_channels
from captum_gradmask._utils import extract_logits, format_target
from captum_gradmask.adapters import ViTAdapter
from captum_gradmask.registry import AttributionMethod, build_method

__all__ = ["LogitsModel", "clear_quantus_cache", "quantus_explain"]


#: Keywords that Quantus metrics or Quantus's own explain functions pass or accept; they mean
#: nothing here and are ignored without a warning.
QUANTUS_KEYWORDS = frozenset(
    {
        "channel_first",
        "softmax",
        "reduce_axes",
        "keepdims",
        "xai_lib",
        "xai_lib_kwargs",
        "model_predict_kwargs",
        "normalise",
        "abs",
    }
)

# Built methods, most recently used last. A built method holds its model, so a weak-keyed cache
# could never release it; a small bounded cache keeps at most this many models alive instead.
_CACHE_SIZE = 4
_cache: OrderedDict[tuple[Any, ...], tuple[weakref.ref[Any], AttributionMethod]] = OrderedDict()


class LogitsModel(nn.Module):
    """A model that returns the logits tensor of a wrapped model (what Quantus can call).

    Quantus's ``PyTorchModel`` needs ``model(x)`` to be a tensor of logits and refuses Hugging
    Face models (it reads them as text models); this wrapper returns ``logits`` of a Hugging
    Face output, the first element of a tuple, or a tensor as it is. It starts in the wrapped
    model's train/eval mode, and :func:`quantus_explain` explains the wrapped model itself.

    Args:
        model: the classifier to wrap (e.g. a ``ViTForImageClassification``).

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.interop import LogitsModel
        >>> vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> wrapped = LogitsModel(vit)
        >>> wrapped(torch.zeros(1, 3, 32, 32)).shape, wrapped.training
        (torch.Size([1, 5]), False)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.train(model.training)

    def forward(self, images: Tensor, *args: Any) -> Tensor:
        """Logits ``(B, classes)`` of ``images``."""
        return extract_logits(self.model(images, *args))


def quantus_explain(
    model: nn.Module,
    inputs: np.ndarray | Tensor,
    targets: np.ndarray | Tensor | int,
    *,
    method: str = "gradmask-m4",
    method_settings: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    adapter: ViTAdapter | None = None,
    channel_reduction: ChannelReduction = "sum",
    **quantus_kwargs: Any,
) -> np.ndarray:
    """Attributions of a registered method, in Quantus's ``explain_func`` contract.

    Pass it as ``explain_func=quantus_explain`` to any Quantus metric, with this function's
    keywords in ``explain_func_kwargs``. The method is built once per (model, method,
    settings, adapter) and reused on Quantus's later calls (the last few built methods are
    kept; :func:`clear_quantus_cache` drops them).

    Args:
        model: the model Quantus was given: a :class:`LogitsModel` (its wrapped model is
            explained) or a model that :func:`~captum_gradmask.adapters.get_adapter` reads
            (timm ``VisionTransformer``, Hugging Face ViT/DeiT) or any model with ``adapter``.
            Its train/eval mode, flags and ``.grad`` are left as they were.
        inputs: images ``(B, C, H, W)``, channel first (what Quantus passes after its own
            reshaping), a numpy array or a tensor.
        targets: ``(B,)`` class per image (or one int for all).
        method: a name of :func:`captum_gradmask.registry.method_names`; default GradMask with
            four masks per layer.
        method_settings: settings of that method, overriding its registered ones (e.g.
            ``{"masks_per_layer": 8}`` or ``{"n_steps": 20}``).
        device: where to compute, as Quantus passes it (``"cpu"``, ``"cuda"``...); default the
            device of the model's parameters. The model is not moved: it must already be there.
        adapter: the model's adapter, for models :func:`get_adapter` does not know.
        channel_reduction: ``"sum"`` (default, as Quantus's own explain functions) or
            ``"abs_sum"`` over channels gives ``(B, 1, H, W)``; ``"none"`` keeps the inputs'
            shape (GradMask repeats its map over channels). Quantus's ``PointingGame`` needs
            one channel.
        **quantus_kwargs: other keywords (Quantus's ``channel_first``, ``softmax``...) are
            ignored; a keyword Quantus does not use either is ignored with a warning, since it
            is likely a method setting that belongs in ``method_settings``.

    Returns:
        A float32 numpy array ``(B, 1, H, W)`` (or ``(B, C, H, W)`` with ``"none"``).

    Raises:
        ValueError: unknown ``method`` or ``channel_reduction``, inputs that are not a batch
            of images, or targets that do not match the batch.

    Example::

        >>> import numpy as np
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.interop import LogitsModel, quantus_explain
        >>> vit = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> x = np.zeros((1, 3, 32, 32), dtype=np.float32)
        >>> quantus_explain(LogitsModel(vit), x, np.array([2]), method="saliency",
        ...     channel_reduction="none").shape
        (1, 3, 32, 32)
    """
    check_channel_reduction(channel_reduction)
    if method_settings is not None and not isinstance(method_settings, Mapping):
        raise TypeError(
            f"`method_settings` must be a dict of settings of {method!r}, got "
            f"{type(method_settings).__name__}"
        )
    unknown = sorted(set(quantus_kwargs) - QUANTUS_KEYWORDS)
    if unknown:
        warnings.warn(
            f"quantus_explain ignores the keyword(s) {unknown}; settings of the method go in "
            f"method_settings={{...}} (method={method!r})",
            stacklevel=2,
        )
    explained = model.model if isinstance(model, LogitsModel) else model
    run_on = _device(explained, device)
    images = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, Tensor) else inputs)
    if images.dim() != 4:
        raise ValueError(
            f"`inputs` must be a batch of images (B, C, H, W), channel first; got shape "
            f"{tuple(images.shape)}"
        )
    images = images.to(device=run_on, dtype=_float_dtype(explained))
    target = _targets(targets, images.shape[0], run_on)

    built = _method(explained, method, dict(method_settings or {}), adapter)
    attributions = built.attribute(images, target=target)
    if isinstance(attributions, tuple):
        attributions = attributions[0]
    attributions = reduce_channels(attributions.detach().float(), channel_reduction)
    return attributions.cpu().numpy().astype(np.float32, copy=False)


def clear_quantus_cache() -> None:
    """Forget the methods :func:`quantus_explain` built (and so release their models)."""
    _cache.clear()


def _device(model: Any, device: str | torch.device | None) -> torch.device:
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(
                f"`device` must name a torch device such as 'cpu' or 'cuda', got {device!r}"
            ) from error
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _float_dtype(model: Any) -> torch.dtype:
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if parameter is not None and parameter.is_floating_point():
        return parameter.dtype
    return torch.float32


def _targets(targets: Any, batch: int, device: torch.device) -> Tensor:
    target = torch.as_tensor(np.asarray(targets) if not isinstance(targets, Tensor) else targets)
    if target.is_floating_point() and not bool((target == target.round()).all()):
        raise ValueError(f"`targets` must be class indices, got {target.tolist()!r}")
    target = target.long().flatten()
    single = int(target[0]) if target.numel() == 1 else target
    return format_target(single, batch, None, device, name="targets")


def _method(
    model: Any, name: str, settings: dict[str, Any], adapter: ViTAdapter | None
) -> AttributionMethod:
    key = _cache_key(model, name, settings, adapter)
    if key is not None and key in _cache:
        model_ref, built = _cache[key]
        # id() can be reused by a new object after the old one died: check it is the same.
        if model_ref() is model:
            _cache.move_to_end(key)
            return built
        del _cache[key]
    built = build_method(name, model, adapter, **settings)
    if key is not None:
        _cache[key] = (weakref.ref(model), built)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return built


def _cache_key(
    model: Any, name: str, settings: dict[str, Any], adapter: ViTAdapter | None
) -> tuple[Any, ...] | None:
    """A hashable key, or None (no caching) when a setting is not hashable or the model cannot
    be weakly referenced."""
    items = tuple(sorted(settings.items()))
    if not all(isinstance(value, Hashable) for _, value in items):
        return None
    try:
        weakref.ref(model)
        hash(items)
    except TypeError:
        return None
    return (id(model), name, items, id(adapter) if adapter is not None else None)
