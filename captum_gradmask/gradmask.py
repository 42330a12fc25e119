"""GradMask (Marchetti et al., IJCNN 2025) as a Captum attribution method.

One forward and one backward pass give the gradients of the target logit with respect to the
query, key and value projections of every attention layer. Each layer's gradients are summed over
``masks_per_layer`` contiguous channel groups, clamped at zero, and binarised against their mean
over the patch tokens: ``3 * layers * masks_per_layer`` binary patch masks. The image is masked
with each (masked pixels set to ``fill_value`` in normalised space), the target's softmax
confidence on every masked image weighs its mask, and the weighted masks are summed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from captum.attr import GradientAttribution
from torch import Tensor
from tqdm.auto import tqdm

from ._ops import pixel_masks
from ._utils import (
    TargetType,
    check_no_args,
    check_number,
    check_positive_int,
    check_recorded,
    check_token_count,
    chunks,
    expand_additional_args,
    preserved_model_state,
    recorded,
    resolve_targets,
    select_args,
    unique_modules,
    unpack_inputs,
)
from .adapters import AttentionLayer, ViTAdapter
from .base import PatchAttribution
from .rules import BackwardRule, backward_rules, libragrad_rules

__all__ = ["AMP_DTYPES", "GradMaskAttribution", "GradMaskMasks"]

LayerSelection = Sequence[int] | Literal["all"] | None
Mode = Literal["exact", "fast"]
FastBatching = Literal["auto", "pad", "group"]
GradientRules = Literal["libragrad"] | None

#: The dtypes ``amp_dtype`` accepts, by the short names the command line and benchmarks use.
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Keyword arguments of ``torch.compile`` for ``compile=True``: static shapes, so each batch
#: shape compiles once.
COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False}


@dataclass(frozen=True)
class GradMaskMasks:
    """The binary masks of GradMask (steps 2-7 of the algorithm) for a batch of images.

    Attributes:
        masks: ``(B, M, h, w)`` bool, ``M = 3 * layers * masks_per_layer`` masks per image in
            the order layer, then Q/K/V, then channel group.
        scores: ``(B, M, h * w)`` float32, each mask's per-patch gradient scores (summed over
            the group's channels, clamped at 0 when ``clamp``) before binarisation: a mask keeps
            the patches whose score is at least its row mean.
        targets: ``(B,)`` the class explained for each image.
    """

    masks: Tensor
    scores: Tensor
    targets: Tensor


class GradMaskAttribution(PatchAttribution, GradientAttribution):
    r"""GradMask attributions for Vision Transformers.

    Args:
        model: a Hugging Face ``ViTForImageClassification`` / ``DeiTForImageClassification``
            / ``DeiTForImageClassificationWithTeacher``, a timm ``VisionTransformer``, or any
            callable returning logits when ``adapter`` is given.
        adapter: where the model keeps its Q/K/V projections, prefix tokens and patch grid; by
            default found with :func:`captum_gradmask.adapters.get_adapter`.

    :meth:`attribute` (inherited from :class:`~captum_gradmask.base.PatchAttribution`) takes
    the arguments of :meth:`attribute_grid` and returns the map upsampled to the inputs' shape.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask import GradMaskAttribution
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> gradmask = GradMaskAttribution(model)
        >>> images = torch.randn(2, 3, 32, 32)
        >>> gradmask.attribute(images, target=[1, 3]).shape
        torch.Size([2, 3, 32, 32])
        >>> gradmask.attribute_grid(images, target=1).shape
        torch.Size([2, 4, 4])
    """

    method_name = "GradMask"

    def attribute_grid(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        masks_per_layer: int = 4,
        layers: LayerSelection = None,
        clamp: bool = True,
        fill_value: float = 0.0,
        mode: Mode = "exact",
        fast_batching: FastBatching = "auto",
        amp_dtype: torch.dtype | None = None,
        compile: bool = False,
        gradient_rules: GradientRules = None,
        perturbations_per_eval: int = 32,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""The GradMask patch-grid map ``(B, h, w)`` of each image.

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them); ``H``
                and ``W`` must be multiples of the patch size.
            target: class per image: an int for all, a list or 1-D tensor with one per image;
                ``None`` (default) uses each image's predicted class.
            additional_forward_args: extra positional arguments for the model's forward;
                tensors whose first dimension is the batch are repeated for the masked images.
                Exact mode only (fast mode runs the model from its tokens).
            masks_per_layer: ``m``, channel groups per projection (the authors use 4); must
                divide the hidden size. With ``m`` = number of heads, a group is a head.
            layers: indices of the attention layers that produce masks. ``None`` (default,
                the reference) uses all but the last; ``"all"`` uses every layer.
            clamp: clamp the group scores at 0 before binarising (reference: ``True``).
            fill_value: value of masked-out pixels in normalised space (reference: 0, which is
                grey for mean = std = 0.5 models, the mean colour for ImageNet-normalised ones).
                Exact mode only.
            mode: ``"exact"`` (default) masks pixels as the reference does; ``"fast"`` drops the
                masked patch tokens instead of filling their pixels (a documented
                approximation: an absent patch is not a grey patch).
            fast_batching: how fast mode batches masks that keep different numbers of
                patches: ``"pad"`` pads them to the longest in the pass (at most 10 % more
                tokens) and hides the padding with an attention mask (few large passes);
                ``"group"`` runs masks with equal counts together (no attention mask, many
                small passes); ``"auto"`` (default) pads when the adapter has a
                ``padding_mask``, else groups.
            amp_dtype: ``None`` (default) runs the masked passes in the model's dtype;
                ``torch.bfloat16`` or ``torch.float16`` runs them (both modes) under
                ``torch.autocast`` on the inputs' device. The gradient pass, and so the binary
                masks, stay in the model's dtype; the confidences are computed and summed in
                float32. Faster on GPUs (bf16/fp16 tensor cores), slower on most CPUs; the map
                changes slightly (see docs/performance.md, "Precision").
            compile: run the masked forward through ``torch.compile`` (exact mode only). The
                last batch is padded to ``perturbations_per_eval`` masked images so every pass
                has one shape, and the compiled function is kept on this object: later calls
                with the same image size and batch size do not compile again. The first call
                pays the compilation (tens of seconds).
            gradient_rules: ``None`` (default) takes the Q/K/V gradients as autograd gives
                them; ``"libragrad"`` takes them under LibraGrad's LayerNorm, activation and
                gated-MLP rules (:func:`captum_gradmask.rules.libragrad` with
                ``attention=False``: the attention keeps its gradient, so the query and key
                gradients stay defined). The forward values, and so the confidences, are
                unchanged.
            perturbations_per_eval: masked images per forward pass; bounds memory. 16-64 suits
                CPUs, larger batches suit GPUs.
            internal_batch_size: images per gradient pass (``None``: ``perturbations_per_eval``).
            show_progress: show a progress bar over the masked-image batches.

        Returns:
            ``S = sum_i c_i mask_i`` on the patch grid, ``(B, h, w)``.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask import GradMaskAttribution
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> GradMaskAttribution(model).attribute_grid(torch.randn(1, 3, 32, 32)).shape
            torch.Size([1, 4, 4])
        """
        check_positive_int(perturbations_per_eval, "perturbations_per_eval")
        fast_batching = self._check_mode(mode, fast_batching, additional_forward_args, fill_value)
        _check_precision(amp_dtype, compile, mode, unpack_inputs(inputs)[0].device)
        found = self.binary_masks(
            inputs,
            target,
            additional_forward_args,
            masks_per_layer=masks_per_layer,
            layers=layers,
            clamp=clamp,
            gradient_rules=gradient_rules,
            internal_batch_size=(
                perturbations_per_eval if internal_batch_size is None else internal_batch_size
            ),
        )
        confidences = self.mask_confidences(
            inputs,
            found.masks,
            found.targets,
            additional_forward_args,
            fill_value=fill_value,
            mode=mode,
            fast_batching=fast_batching,
            amp_dtype=amp_dtype,
            compile=compile,
            perturbations_per_eval=perturbations_per_eval,
            show_progress=show_progress,
        )
        # S = sum_i c_i * mask_i
        return torch.einsum("bm,bmhw->bhw", confidences, found.masks.to(confidences.dtype))

    def binary_masks(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        masks_per_layer: int = 4,
        layers: LayerSelection = None,
        clamp: bool = True,
        gradient_rules: GradientRules = None,
        internal_batch_size: int | None = 32,
    ) -> GradMaskMasks:
        """Steps 1-7 of the algorithm: one forward and one backward pass per batch of images.

        Arguments as in :meth:`attribute_grid`; ``internal_batch_size`` images per gradient
        pass (``None``: all at once).

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask import GradMaskAttribution
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> found = GradMaskAttribution(model).binary_masks(torch.randn(2, 3, 32, 32))
            >>> found.masks.shape, found.scores.shape  # 3 (Q/K/V) x 2 layers x 4 groups
            (torch.Size([2, 24, 4, 4]), torch.Size([2, 24, 16]))
        """
        images, grid = self._prepare(inputs, target)
        _check_masks_per_layer(masks_per_layer, self.adapter.hidden_size)
        selected = self._select_layers(layers)
        rules = _gradient_rules(gradient_rules, self.model, self.adapter)

        def compute(
            batch: Tensor, batch_target: TargetType, args: tuple[Any, ...]
        ) -> tuple[Tensor, Tensor]:
            with backward_rules(rules):
                gradients, targets = self._projection_gradients(batch, batch_target, args, selected)
            prefix = self.adapter.prefix_tokens
            return _group_scores(gradients, masks_per_layer, clamp, prefix, grid), targets

        scores, targets = self._batched(
            images, target, additional_forward_args, internal_batch_size, compute
        )
        masks = scores >= scores.mean(dim=-1, keepdim=True)
        return GradMaskMasks(masks.reshape(*scores.shape[:2], *grid), scores, targets)

    def mask_confidences(
        self,
        inputs: Tensor | tuple[Tensor],
        masks: Tensor,
        targets: Tensor,
        additional_forward_args: Any = None,
        *,
        fill_value: float = 0.0,
        mode: Mode = "exact",
        fast_batching: FastBatching = "auto",
        amp_dtype: torch.dtype | None = None,
        compile: bool = False,
        perturbations_per_eval: int = 32,
        show_progress: bool = False,
    ) -> Tensor:
        """Steps 8-9: the target's softmax on each masked image, ``(B, M)`` float32.

        Args:
            inputs: the images ``(B, C, H, W)``.
            masks: ``(B, M, h, w)`` binary patch masks (e.g. :meth:`binary_masks`'s, or any
                others: ablations use random ones).
            targets: ``(B,)`` class per image.
            additional_forward_args, fill_value, mode, fast_batching, amp_dtype, compile,
            perturbations_per_eval, show_progress: as in :meth:`attribute_grid`.
        """
        images, grid = self._prepare(inputs, None)
        check_positive_int(perturbations_per_eval, "perturbations_per_eval")
        fast_batching = self._check_mode(mode, fast_batching, additional_forward_args, fill_value)
        _check_precision(amp_dtype, compile, mode, images.device)
        if masks.dim() != 4 or masks.shape[0] != images.shape[0] or tuple(masks.shape[2:]) != grid:
            raise ValueError(
                f"`masks` must have shape (B={images.shape[0]}, M, {grid[0]}, {grid[1]}); got "
                f"{tuple(masks.shape)}"
            )
        targets = targets.to(images.device).long()
        count, per_image = masks.shape[0], masks.shape[1]
        flat_masks = masks.to(images.device).bool().reshape(count * per_image, *grid)
        owners = torch.arange(count, device=images.device).repeat_interleave(per_image)
        flat_targets = targets[owners]
        confidences = torch.empty(flat_masks.shape[0], device=images.device)
        batches: Iterator[tuple[Any, Tensor]]
        if mode == "fast":
            plan = _token_plan(
                flat_masks.flatten(1).sum(1).tolist(),
                self.adapter.prefix_tokens,
                self.adapter.prefix_tokens + flat_masks[0].numel(),
                perturbations_per_eval,
                pad=fast_batching == "pad",
            )
            batches = self._token_dropped_batches(images, flat_masks, owners, plan, amp_dtype)
            total = len(plan)
        else:
            batches = self._pixel_masked_batches(
                images,
                flat_masks,
                owners,
                additional_forward_args,
                fill_value,
                perturbations_per_eval,
                amp_dtype,
                compile,
            )
            total = -(-flat_masks.shape[0] // perturbations_per_eval)
        with preserved_model_state(self.model), torch.inference_mode():
            for rows, logits in tqdm(
                batches, desc="GradMask masked passes", total=total, disable=not show_progress
            ):
                probs = torch.softmax(logits.float(), dim=-1)
                confidences[rows] = probs.gather(1, flat_targets[rows][:, None]).squeeze(1)
        return confidences.reshape(count, per_image).clone()

    # --- steps ----------------------------------------------------------------------------

    def _check_mode(
        self, mode: Mode, fast_batching: FastBatching, additional_forward_args: Any, fill_value: Any
    ) -> FastBatching:
        """Validate the masked-pass options; returns the batching fast mode will use."""
        if mode not in ("exact", "fast"):
            raise ValueError(f"`mode` must be 'exact' or 'fast', got {mode!r}")
        if fast_batching not in ("auto", "pad", "group"):
            raise ValueError(
                f"`fast_batching` must be 'auto', 'pad' or 'group', got {fast_batching!r}"
            )
        check_number(fill_value, "fill_value")
        if mode == "exact":
            return fast_batching
        self.adapter.require_tokens("mode='fast'")
        check_no_args(additional_forward_args, "GradMask's mode='fast' (masked passes)")
        if fill_value != 0.0:
            raise ValueError(
                f"`fill_value`={fill_value!r} has no effect in mode='fast', which drops masked "
                "patch tokens instead of filling their pixels; leave it at 0.0 or use "
                "mode='exact'"
            )
        if fast_batching == "pad" and not self.adapter.supports_padding:
            raise ValueError(
                f"`fast_batching`='pad' needs an adapter with a `padding_mask`; adapter "
                f"{self.adapter.name!r} has none (its blocks take no attention mask, or its "
                "head pools over patch tokens): use 'group' or 'auto'"
            )
        if fast_batching == "auto":
            return "pad" if self.adapter.supports_padding else "group"
        return fast_batching

    def _select_layers(self, layers: LayerSelection) -> list[AttentionLayer]:
        available = list(self.adapter.layers)
        count = len(available)
        if layers is None:
            return available[:-1] if count > 1 else available
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"`layers` must be None, 'all' or a list of ints, got {layers!r}")
            return available
        indices = list(layers)
        if not indices or any(
            isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count
            for i in indices
        ):
            raise ValueError(
                f"`layers`={layers!r} is not valid: give layer indices in -{count}..{count - 1} "
                f"(the model has {count} attention layers), None or 'all'"
            )
        return [available[i] for i in indices]

    def _projection_gradients(
        self,
        images: Tensor,
        target: TargetType,
        additional_forward_args: tuple[Any, ...],
        layers: list[AttentionLayer],
    ) -> tuple[list[Tensor], Tensor]:
        """Gradients of the target logits w.r.t. Q, K, V of each layer, in that order."""
        modules = unique_modules(
            p.module for layer in layers for p in (layer.query, layer.key, layer.value)
        )
        with recorded(modules) as captured, torch.enable_grad():
            # A fresh leaf: the user's tensor and the parameters' .grad stay untouched.
            leaf = images.detach().requires_grad_(True)
            logits = self.adapter.logits(leaf, *additional_forward_args)
            targets = resolve_targets(target, logits)
            check_recorded(modules, captured)
            outputs = [captured[id(m)] for m in modules]
            score = logits.gather(1, targets[:, None]).sum()
            grads = torch.autograd.grad(score, outputs, allow_unused=True)
        by_module = {
            id(m): torch.zeros_like(o) if g is None else g
            for m, o, g in zip(modules, outputs, grads, strict=True)
        }
        gradients = [
            projection.select(by_module[id(projection.module)])
            for layer in layers
            for projection in (layer.query, layer.key, layer.value)
        ]
        return gradients, targets.detach()

    def _pixel_masked_batches(
        self,
        images: Tensor,
        flat_masks: Tensor,
        owners: Tensor,
        additional_forward_args: Any,
        fill_value: float,
        batch_size: int,
        amp_dtype: torch.dtype | None = None,
        compile: bool = False,
    ) -> Iterator[tuple[slice, Tensor]]:
        """Exact mode: masked-out pixels set to ``fill_value``, ``batch_size`` images a pass
        (with ``compile``, a shorter last pass is padded to ``batch_size`` and the padding's
        logits dropped, so the compiled forward sees one shape)."""
        per_image = flat_masks.shape[0] // images.shape[0]
        extra_all = expand_additional_args(additional_forward_args, per_image)
        fill = torch.as_tensor(fill_value, dtype=images.dtype, device=images.device)
        forward = self._masked_forward(compile)
        for rows in chunks(flat_masks.shape[0], batch_size):
            with torch.inference_mode():
                keep = pixel_masks(flat_masks[rows], self.adapter.patch_size)
                masked = torch.where(keep, images[owners[rows]], fill)
                extra = select_args(extra_all, rows, flat_masks.shape[0])
                count = masked.shape[0]
                if compile and count < batch_size:
                    masked, extra = _pad_batch(masked, extra, batch_size)
                with _autocast(images.device, amp_dtype):
                    logits = forward(masked, *extra)
            yield rows, logits[:count]

    def _masked_forward(self, compile: bool) -> Callable[..., Tensor]:
        """The masked passes' forward: the adapter's, or its compiled version, made once per
        object so that later calls reuse its compiled graphs."""
        if not compile:
            return self.adapter.logits
        compiled = self.__dict__.get("_compiled_logits")
        if compiled is None:
            compiled = torch.compile(self.adapter.logits, **COMPILE_OPTIONS)
            self._compiled_logits = compiled
        return compiled

    def _token_dropped_batches(
        self,
        images: Tensor,
        flat_masks: Tensor,
        owners: Tensor,
        plan: list[tuple[list[int], int, bool]],
        amp_dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Fast mode: each masked image is its prefix tokens plus its kept patch tokens.

        ``plan`` (from :func:`_token_plan`) lists the masks of each pass, the longest kept
        count among them, and whether their counts differ; masks with fewer kept patches are
        padded with some of their dropped patch tokens, which the attention mask hides.
        """
        adapter = self.adapter
        interface = adapter.require_tokens("mode='fast'")
        prefix = adapter.prefix_tokens
        with torch.inference_mode():
            with _autocast(images.device, amp_dtype):
                tokens = interface.embed(images)
            flat = flat_masks.flatten(1)
            prefix_index = torch.arange(prefix, device=tokens.device)
            for members, longest, padded in plan:
                rows = torch.tensor(members, device=tokens.device)
                # A stable sort puts each mask's kept patches first, in grid order; its sorted
                # values say which of the first `longest` are kept and which are padding.
                order = torch.sort(flat[rows].to(torch.uint8), dim=1, descending=True, stable=True)
                patches = order.indices[:, :longest] + prefix
                index = torch.cat([prefix_index.expand(len(members), -1), patches], dim=1)
                selected = tokens[owners[rows][:, None], index]
                keep = None
                if padded:
                    kept = order.values[:, :longest].bool()
                    keep = torch.cat([kept.new_ones(len(members), prefix), kept], dim=1)
                with _autocast(images.device, amp_dtype):
                    logits = adapter.run_tokens(selected, keep=keep)
                yield rows, logits


PAD_SLACK = 1.1  # a padded pass holds at most 10 % more tokens than its masks keep


def _token_plan(
    counts: list[int], prefix: int, tokens_per_image: int, batch_size: int, pad: bool
) -> list[tuple[list[int], int, bool]]:
    """The passes of fast mode: ``(masks, longest kept count, padded)`` for each.

    Masks are taken in order of their kept count; a pass holds at most as many tokens as
    ``batch_size`` full images. Without ``pad`` a pass holds masks of one count only (no
    attention mask needed, but many small passes); with it, neighbouring counts share a pass
    as long as padding adds at most ``PAD_SLACK - 1`` to its tokens.
    """
    order = sorted(range(len(counts)), key=counts.__getitem__)
    budget = batch_size * tokens_per_image
    plan, start, real = [], 0, 0
    for end in range(1, len(order) + 1):
        real += prefix + counts[order[end - 1]]
        if end < len(order):
            size, longest = end + 1 - start, prefix + counts[order[end]]
            fits = size * longest <= budget
            if pad and fits and size * longest <= PAD_SLACK * (real + longest):
                continue
            if not pad and fits and counts[order[end]] == counts[order[start]]:
                continue
        members = order[start:end]
        longest_count = counts[members[-1]]
        plan.append((members, longest_count, counts[members[0]] != longest_count))
        start, real = end, 0
    return plan


def _group_scores(
    gradients: list[Tensor],
    masks_per_layer: int,
    clamp: bool,
    prefix_tokens: int,
    grid: tuple[int, int],
) -> Tensor:
    """Steps 4-6 of the algorithm: channel-group sums, clamp, prefix dropped: ``(B, M, N)``."""
    stacked = torch.stack(gradients, dim=1)  # (B, S, T, D)
    batch, sources, tokens, hidden = stacked.shape
    _check_masks_per_layer(masks_per_layer, hidden)
    check_token_count(tokens, prefix_tokens, grid)
    scores = stacked.reshape(
        batch, sources, tokens, masks_per_layer, hidden // masks_per_layer
    ).sum(-1)
    if clamp:
        scores = scores.clamp(min=0)
    scores = scores[:, :, prefix_tokens:, :].transpose(2, 3)  # (B, S, m, N)
    return scores.reshape(batch, sources * masks_per_layer, -1)


def _check_masks_per_layer(masks_per_layer: Any, hidden: int | None) -> None:
    """``m`` must be a positive int dividing the projections' width (when known)."""
    check_positive_int(masks_per_layer, "masks_per_layer")
    if hidden is not None and hidden % masks_per_layer:
        raise ValueError(
            f"`masks_per_layer`={masks_per_layer} does not divide the hidden size {hidden}; "
            f"valid values are the divisors of {hidden}"
        )


def _pad_batch(masked: Tensor, extra: tuple[Any, ...], size: int) -> tuple[Tensor, tuple[Any, ...]]:
    """``masked`` and the batch-first tensors of ``extra`` padded to ``size`` rows with copies
    of their last row (rows of a ViT never mix, so the padding changes no other row)."""

    def pad(tensor: Tensor) -> Tensor:
        missing = size - tensor.shape[0]
        return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])

    return pad(masked), tuple(pad(a) if isinstance(a, Tensor) and a.dim() > 0 else a for a in extra)


def _gradient_rules(gradient_rules: Any, model: Any, adapter: ViTAdapter) -> list[BackwardRule]:
    """The backward rules of the gradient pass (none by default)."""
    if gradient_rules is None:
        return []
    if gradient_rules != "libragrad":
        raise ValueError(f"`gradient_rules` must be None or 'libragrad', got {gradient_rules!r}")
    # GradMask reads the query and key gradients: the attention keeps its own gradient.
    return libragrad_rules(model, adapter, attention=False)


def _check_precision(amp_dtype: Any, compile: Any, mode: Mode, device: torch.device) -> None:
    """Validate ``amp_dtype`` and ``compile`` (before the gradient pass)."""
    if amp_dtype is not None and not (
        isinstance(amp_dtype, torch.dtype) and amp_dtype in AMP_DTYPES.values()
    ):
        raise ValueError(
            f"`amp_dtype` must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}"
        )
    if amp_dtype is not None and not torch.amp.is_autocast_available(device.type):
        raise ValueError(
            f"`amp_dtype`={amp_dtype} needs torch.autocast, which is not available for device "
            f"type {device.type!r}; use amp_dtype=None"
        )
    if not isinstance(compile, bool):
        raise ValueError(f"`compile` must be True or False, got {compile!r}")
    if compile and mode != "exact":
        raise ValueError(
            "`compile`=True supports mode='exact' only: fast mode's passes each keep a "
            "different number of tokens, so a compiled forward would recompile for most of "
            "them; use compile=False with mode='fast'"
        )


def _autocast(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``amp_dtype`` on ``device``'s type; nothing for ``None``."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)
