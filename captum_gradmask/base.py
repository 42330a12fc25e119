"""The shared base of every attribution method that gives one map per image on a grid.

:class:`PatchAttribution` does the plumbing once, in the spirit of pytorch-grad-cam's
``BaseCAM`` and Captum's ``_core`` classes: it resolves ``(model, adapter)`` with
:func:`~captum_gradmask.adapters.resolve_model`, validates the inputs, the patch grid and the
target, batches the images, guards the model's state (eval mode during the call; modes and
``requires_grad`` flags restored afterwards, errors included), and turns ``attribute_grid``'s
``(B, h, w)`` map into Captum's input-shaped attribution. A method implements only its grid
computation:

Example::

    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.base import PatchAttribution
    >>> class PatchNorm(PatchAttribution):
    ...     '''Toy method: the L2 norm of each patch's pixels.'''
    ...     method_name = "PatchNorm"
    ...     def attribute_grid(self, inputs, target=None, additional_forward_args=None, *,
    ...                        internal_batch_size=None, show_progress=False):
    ...         images, grid = self._prepare(inputs, target)
    ...         def compute(batch, target, args):
    ...             patches = torch.nn.functional.unfold(batch, self.adapter.patch_size,
    ...                                                  stride=self.adapter.patch_size)
    ...             return patches.norm(dim=1).reshape(-1, *grid)
    ...         return self._batched(images, target, additional_forward_args,
    ...                              internal_batch_size, compute, show_progress)
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
    ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...     intermediate_size=64, num_labels=5))
    >>> PatchNorm(model).attribute(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from captum.attr import Attribution
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._ops import upsample_grid
from ._utils import (
    TargetType,
    check_keywords,
    check_positive_int,
    check_target,
    chunks,
    preserved_model_state,
    select_args,
    slice_target,
    unpack_inputs,
)
from .adapters import ViTAdapter, resolve_model

__all__ = ["GridFn", "PatchAttribution"]

#: ``compute(images, target, additional_forward_args)`` for one batch of images: a tensor, or
#: a tuple of tensors, with the batch first.
GridFn = Callable[[Tensor, TargetType, tuple[Any, ...]], Any]


class PatchAttribution(Attribution):
    """Base class of the methods that map each image to a ``(h, w)`` grid of scores.

    Subclasses implement :meth:`attribute_grid` with their own keyword options, using
    :meth:`_prepare` (validation) and :meth:`_batched` (batching under the model-state guard);
    :meth:`attribute` is inherited.

    Args:
        model: a Hugging Face ViT/DeiT, a timm ``VisionTransformer``, or any callable returning
            logits when ``adapter`` is given (that callable is then what is explained).
        adapter: where the model keeps its attention projections, prefix tokens and patch grid;
            by default found with :func:`captum_gradmask.adapters.get_adapter`.

    Attributes:
        adapter: the resolved adapter (a new object when ``model`` replaced its forward).
        model: the module whose state is guarded (``None`` for a plain function).
        forward_func: the function explained (Captum's attribute).
    """

    #: Shown in progress bars and messages.
    method_name: ClassVar[str] = "attribution"
    #: Whether the method needs an adapter (RISE works on any callable).
    needs_adapter: ClassVar[bool] = True
    #: Whether the "grid" is the input's pixel grid (RISE) rather than the patch grid.
    pixel_level: ClassVar[bool] = False

    def __init__(
        self, model: nn.Module | Callable[..., Any], adapter: ViTAdapter | None = None
    ) -> None:
        resolved = resolve_model(model, adapter, required=self.needs_adapter)
        self.adapter: ViTAdapter = resolved.adapter  # type: ignore[assignment]
        self.model = resolved.module
        super().__init__(resolved.forward)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each method writes one ``attribute_grid`` with its options as keyword parameters;
        # ``attribute`` gets the same signature (so ``help()`` lists them) and both refuse a
        # misspelled keyword naming the method and its valid keywords.
        super().__init_subclass__(**kwargs)
        grid_fn = cls.__dict__.get("attribute_grid")
        if grid_fn is None or hasattr(grid_fn, "__wrapped__"):
            return
        cls.attribute_grid = _keywords_checked(grid_fn)  # type: ignore[method-assign]
        if "attribute" not in cls.__dict__:
            cls.attribute = _input_shaped(grid_fn)  # type: ignore[method-assign]

    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        **options: Any,
    ) -> Tensor | tuple[Tensor]:
        """Attributions with the shape (and tensor-or-tuple form) of ``inputs``.

        The map of :meth:`attribute_grid` (same arguments and keyword options), each grid
        cell's score repeated over its pixels (nearest upsampling) and the channels, so
        Captum's metrics and visualisers take it as it is. Each method's own ``attribute``
        lists its keyword options in its signature.
        """
        images, is_tuple = unpack_inputs(inputs)
        grid_map = self.attribute_grid(images, target, additional_forward_args, **options)
        attributions = upsample_grid(grid_map, tuple(images.shape[-2:]), images.shape[1])
        return (attributions,) if is_tuple else attributions

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        **options: Any,
    ) -> Tensor:
        """The ``(B, h, w)`` map of each image; implemented by each method."""
        raise NotImplementedError

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The ``(h, w)`` of :meth:`attribute_grid`'s maps for images of ``image_size``: the
        patch grid, or the image size itself for pixel-level methods (RISE)."""
        size = (int(image_size[0]), int(image_size[1]))
        if self.pixel_level or self.adapter is None:
            return size
        return self.adapter.grid(size)

    # --- plumbing for subclasses ---------------------------------------------------------

    def _prepare(
        self, inputs: Tensor | tuple[Tensor], target: TargetType
    ) -> tuple[Tensor, tuple[int, int]]:
        """Checked images and their grid (the patch grid; the image size for pixel-level
        methods)."""
        images, _ = unpack_inputs(inputs)
        grid = self.grid_size(tuple(images.shape[-2:]))
        check_target(target, images.shape[0])
        return images, grid

    def _batched(
        self,
        images: Tensor,
        target: TargetType,
        additional_forward_args: Any,
        internal_batch_size: int | None,
        compute: GridFn,
        show_progress: bool = False,
    ) -> Any:
        """``compute`` on ``internal_batch_size`` images at a time (``None``: all at once),
        under the model-state guard; the results (a tensor, or each tensor of a tuple) are
        concatenated along the batch."""
        count = images.shape[0]
        size = (
            count
            if internal_batch_size is None
            else check_positive_int(internal_batch_size, "internal_batch_size")
        )
        parts = []
        with preserved_model_state(self.model):
            batches = list(chunks(count, size))
            for batch in tqdm(batches, desc=self.method_name, disable=not show_progress):
                parts.append(
                    compute(
                        images[batch],
                        slice_target(target, batch),
                        select_args(additional_forward_args, batch, count),
                    )
                )
        if isinstance(parts[0], tuple):
            return tuple(torch.cat(column) for column in zip(*parts, strict=True))
        return torch.cat(parts)


def _keywords_checked(grid_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``attribute_grid`` refusing unknown keywords with :func:`check_keywords`'s message."""

    @functools.wraps(grid_fn)
    def attribute_grid(self: PatchAttribution, *args: Any, **options: Any) -> Any:
        check_keywords(f"{type(self).__name__}.attribute_grid", grid_fn, options, skip=1)
        return grid_fn(self, *args, **options)

    return attribute_grid


def _input_shaped(grid_fn: Callable[..., Any]) -> Callable[..., Any]:
    """A method's ``attribute``: its ``attribute_grid`` map upsampled to the inputs' shape,
    with ``attribute_grid``'s signature."""

    def attribute(
        self: PatchAttribution,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        **options: Any,
    ) -> Tensor | tuple[Tensor]:
        check_keywords(f"{type(self).__name__}.attribute", grid_fn, options, skip=1)
        return PatchAttribution.attribute(self, inputs, target, additional_forward_args, **options)

    signature = inspect.signature(grid_fn)
    attribute.__signature__ = signature.replace(  # type: ignore[attr-defined]
        return_annotation="Tensor | tuple[Tensor]"
    )
    attribute.__doc__ = (
        "Attributions with the shape (and tensor-or-tuple form) of ``inputs``: the map of "
        ":meth:`attribute_grid` (same arguments and keyword options), each grid cell's score "
        "repeated over its pixels (nearest upsampling) and the channels, so Captum's metrics "
        "and visualisers take it as it is."
    )
    attribute.__qualname__ = grid_fn.__qualname__.rsplit(".", 1)[0] + ".attribute"
    attribute.__module__ = grid_fn.__module__
    return attribute
