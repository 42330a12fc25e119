"""Architecture adapters: where a Vision Transformer keeps its Q/K/V projections, prefix tokens
and patch grid.

The attribution methods know nothing about Hugging Face or timm; everything model-specific is
here. An adapter is a plain :class:`ViTAdapter` value. :func:`get_adapter` builds one for a known
model through a small registry (Hugging Face ViT and DeiT in the transformers 4.x and 5.x
layouts, timm ``VisionTransformer`` and its distilled/register-token variants); for anything
else, build one with :meth:`ViTAdapter.from_modules` or register a builder with
:func:`register_adapter`.

Example::

    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.adapters import get_adapter
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5))
    >>> adapter = get_adapter(model)
    >>> adapter.name, len(adapter.layers), adapter.prefix_tokens, adapter.grid((32, 32))
    ('hf-vit', 2, 1, (4, 4))
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import extract_logits

__all__ = [
    "FAMILY_NOTES",
    "AttentionLayer",
    "FamilyNote",
    "Projection",
    "ResolvedModel",
    "Tap",
    "TokenInterface",
    "ViTAdapter",
    "families_table",
    "get_adapter",
    "image_feature_adapter",
    "register_adapter",
    "resolve_model",
]


@dataclass(frozen=True)
class Projection:
    """One of the query, key or value projections: a module's output, or one chunk of it.

    Args:
        module: the module whose forward output holds the projection, shape ``(B, T, chunks*D)``.
        index: which of the ``chunks`` equal parts of the last dimension is this projection
            (timm's fused ``qkv`` Linear: query 0, key 1, value 2).
        chunks: into how many equal parts the module's output splits (1 for separate Q/K/V).
    """

    module: nn.Module
    index: int = 0
    chunks: int = 1

    def select(self, output: Tensor) -> Tensor:
        """The part of ``output`` (the module's output or its gradient) that is this projection."""
        if self.chunks == 1:
            return output
        return output.chunk(self.chunks, dim=-1)[self.index]

    @property
    def width(self) -> int | None:
        """Channels of this projection, when the module says (``out_features``)."""
        out = getattr(self.module, "out_features", None)
        return None if out is None else out // self.chunks


@dataclass(frozen=True)
class AttentionLayer:
    """The projections of one self-attention layer.

    Args:
        query, key, value: where Q, K and V come out.
        num_heads: attention heads of the layer.
        output: the output projection, whose *input* is the attention context ``A @ V`` with
            heads concatenated (used by the gradient-weighted attention methods; optional).
        qk_normalized: True when Q and K are normalised after the projection (timm ``qk_norm``),
            so attention cannot be recomputed from the projection outputs alone.
        probabilities: optional module whose output is the layer's attention probabilities
            ``(B, heads, T, T)`` as the model uses them (rotary or relative position terms
            included); the attention methods read them there instead of recomputing
            ``softmax(Q K^T / sqrt(d))``. Set by adapters that run their own equivalent of the
            model's attention (:class:`Tap`).
        attention: optional, the model's attention module that the adapter runs as its own
            equivalent with the projections tapped (set with ``probabilities`` by the
            adapters of timm EVA/BEiT and ``nn.MultiheadAttention``); backward rules know
            by it that this module's query and key run through the taps.
    """

    query: Projection
    key: Projection
    value: Projection
    num_heads: int
    output: nn.Module | None = None
    qk_normalized: bool = False
    probabilities: nn.Module | None = None
    attention: nn.Module | None = None


@dataclass(frozen=True)
class TokenInterface:
    """How to run a ViT from its token sequence (for token-level methods).

    Fast GradMask, ViT-ReciproCAM and Vision DiffMask change the token sequence between the
    embedding and the blocks; they need the model cut into these three pieces.

    Args:
        embed: ``embed(images) -> tokens`` of shape ``(B, prefix + N, D)``, position
            embeddings added.
        blocks: the encoder blocks, each ``block(tokens) -> tokens`` (and
            ``block(tokens, mask)`` when ``padding_mask`` is set).
        head: ``head(tokens) -> logits``, final norm and classifier included; it must read only
            what the blocks give it.
        padding_mask: optional ``padding_mask(tokens, keep) -> mask``: the attention mask that
            the blocks take as a second argument, so that no token attends to a token where
            ``keep`` (``(B, T)`` bool) is False. Set it only when, in addition, ``head`` reads
            the prefix tokens alone (CLS pooling), so padding tokens never reach the logits.
            Lets fast GradMask batch token sets of different lengths.
        attention_norms: optional, one module per block: the LayerNorm whose output is the
            block's attention input (timm ``norm1``, Hugging Face ``layernorm_before``), called
            once per block forward. ViT-ReciproCAM masks its output, as its authors do.
    """

    embed: Callable[[Tensor], Tensor]
    blocks: Sequence[Callable[..., Tensor]]
    head: Callable[[Tensor], Any]
    padding_mask: Callable[[Tensor, Tensor], Any] | None = None
    attention_norms: Sequence[nn.Module] | None = None

    def run(self, tokens: Tensor, start: int = 0, keep: Tensor | None = None) -> Tensor:
        """Run blocks ``start..end`` and the head on ``tokens``; returns logits.

        ``keep`` (``(B, T)`` bool) marks the real tokens of a padded batch; padding tokens are
        not attended to (needs :attr:`padding_mask`).
        """
        if keep is None:
            for block in self.blocks[start:]:
                tokens = block(tokens)
        else:
            if self.padding_mask is None:
                raise ValueError(
                    "this token interface has no `padding_mask`: it cannot run padded tokens"
                )
            mask = self.padding_mask(tokens, keep)
            for block in self.blocks[start:]:
                tokens = block(tokens, mask)
        return extract_logits(self.head(tokens))

    def states(self, images: Tensor) -> tuple[list[Tensor], Tensor]:
        """The ``L + 1`` token states (embeddings, then each block's output) and the logits."""
        tokens = self.embed(images)
        states = [tokens]
        for block in self.blocks:
            tokens = block(tokens)
            states.append(tokens)
        return states, extract_logits(self.head(tokens))


@dataclass
class ViTAdapter:
    """What the attribution methods need to know about a Vision Transformer.

    Library code never changes an adapter: :func:`resolve_model` returns a new one when it
    needs another forward function.

    Args:
        forward: ``forward(images, *args) -> logits`` (any output :func:`extract_logits` reads).
        layers: the attention layers in order of depth.
        patch_size: ``(ph, pw)`` pixels per patch.
        prefix_tokens: tokens before the patch tokens (CLS, distillation, registers).
        tokens: optional :class:`TokenInterface` (``embed``, ``blocks``, ``head``,
            ``padding_mask``); needed by token-level methods (fast GradMask, ViT-ReciproCAM,
            Vision DiffMask).
        cam_layer: optional module whose output is the ``(B, prefix + N, D)`` token sequence a
            CAM method should read (pytorch-grad-cam's choice for ViTs: the first LayerNorm of
            the last block); Grad-CAM's default layer.
        model: the wrapped module, if any (its mode is managed during attribution).
        name: a label for messages.
        attention_context: optional ``attention_context()`` returning a context manager under
            which the model's attention runs the adapter's taps (:class:`Tap`): for models
            whose attention has no Q/K/V modules to hook (``nn.MultiheadAttention``, timm EVA
            and BEiT). ``forward`` already enters it; :func:`resolve_model` wraps a
            replacement forward in it.
        no_tokens_reason: why ``tokens`` is ``None`` (shown by :meth:`require_tokens`).
        image_size: the one ``(H, W)`` the model accepts (a timm model built without
            ``dynamic_img_size``), or ``None`` when any multiple of the patch size works.
        forward_modules: optional, the modules ``forward`` runs through when ``model`` also
            holds modules it never runs (an image-text model's text tower); backward rules
            (:mod:`captum_gradmask.rules`) look for the modules they cover there. ``None``:
            all of ``model``.
    """

    forward: Callable[..., Any]
    layers: Sequence[AttentionLayer]
    patch_size: tuple[int, int]
    prefix_tokens: int
    tokens: TokenInterface | None = None
    cam_layer: nn.Module | None = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False)
    name: str = "custom"
    attention_context: Callable[[], contextlib.AbstractContextManager[Any]] | None = field(
        default=None, repr=False
    )
    no_tokens_reason: str | None = None
    image_size: tuple[int, int] | None = None
    forward_modules: Sequence[nn.Module] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError(f"adapter {self.name!r} has no attention layers")
        if isinstance(self.patch_size, int):
            self.patch_size = (self.patch_size, self.patch_size)
        self.patch_size = (int(self.patch_size[0]), int(self.patch_size[1]))
        if self.prefix_tokens < 0:
            raise ValueError(f"`prefix_tokens` must be >= 0, got {self.prefix_tokens}")

    @property
    def hidden_size(self) -> int | None:
        """Width of the query projection (``D``), when the module reports it."""
        return self.layers[0].query.width

    @property
    def supports_tokens(self) -> bool:
        """Whether the token interface (``embed``, ``blocks``, ``head``) is available."""
        return self.tokens is not None

    @property
    def supports_padding(self) -> bool:
        """Whether :meth:`run_tokens` accepts ``keep`` (padded token sets)."""
        return self.tokens is not None and self.tokens.padding_mask is not None

    def require_tokens(self, what: str) -> TokenInterface:
        """The token interface, or a clear error naming ``what`` needs it."""
        if self.tokens is None:
            reason = self.no_tokens_reason or (
                "built-in adapters for Hugging Face ViT/DeiT and timm ViTs provide it"
            )
            raise ValueError(
                f"{what} needs the adapter's token interface (`embed`, `blocks` and `head`); "
                f"adapter {self.name!r} does not provide it: {reason}"
            )
        return self.tokens

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image of ``image_size = (H, W)``; checks divisibility."""
        height, width = int(image_size[0]), int(image_size[1])
        if self.image_size is not None and (height, width) != tuple(self.image_size):
            fixed_h, fixed_w = self.image_size
            raise ValueError(
                f"`inputs` image size {height}x{width} is not the {fixed_h}x{fixed_w} the model "
                "was built for; resize the images, or build the model for any size (timm: "
                "timm.create_model(..., dynamic_img_size=True))"
            )
        ph, pw = self.patch_size
        if height % ph or width % pw or height < ph or width < pw:
            raise ValueError(
                f"`inputs` image size {height}x{width} does not fit the model's {ph}x{pw} patch "
                f"grid: height must be a multiple of {ph} and width a multiple of {pw}"
            )
        return height // ph, width // pw

    def logits(self, images: Tensor, *args: Any) -> Tensor:
        """Run ``forward`` and return its logits."""
        return extract_logits(self.forward(images, *args))

    def run_tokens(self, tokens: Tensor, start: int = 0, keep: Tensor | None = None) -> Tensor:
        """Run blocks ``start..end`` and the head on ``tokens``; returns logits.

        See :meth:`TokenInterface.run`; ``keep`` needs a ``padding_mask``.
        """
        interface = self.require_tokens("running from tokens")
        if keep is not None and interface.padding_mask is None:
            raise ValueError(
                f"adapter {self.name!r} has no `padding_mask`, so it cannot run padded tokens"
            )
        return interface.run(tokens, start, keep)

    @classmethod
    def from_modules(
        cls,
        forward: Callable[..., Any],
        *,
        num_heads: int,
        patch_size: int | tuple[int, int],
        prefix_tokens: int,
        queries: Sequence[nn.Module] | None = None,
        keys: Sequence[nn.Module] | None = None,
        values: Sequence[nn.Module] | None = None,
        fused_qkv: Sequence[nn.Module] | None = None,
        outputs: Sequence[nn.Module] | None = None,
        model: nn.Module | None = None,
        cam_layer: nn.Module | None = None,
        **token_interface: Any,
    ) -> ViTAdapter:
        """Build an adapter for any ViT by naming its projection modules.

        Give either ``queries``/``keys``/``values`` (one module per layer each) or
        ``fused_qkv`` (one module per layer whose output is ``Q | K | V`` along the last
        dimension). ``token_interface`` may hold ``embed``, ``blocks`` and ``head`` (all three),
        ``padding_mask`` and ``attention_norms`` (see :class:`TokenInterface`).

        Example::

            >>> import torch
            >>> from torch import nn
            >>> from captum_gradmask.adapters import ViTAdapter
            >>> qkv = [nn.Linear(8, 24) for _ in range(2)]
            >>> adapter = ViTAdapter.from_modules(lambda x: x.flatten(1)[:, :3], num_heads=2,
            ...     patch_size=4, prefix_tokens=1, fused_qkv=qkv)
            >>> len(adapter.layers), adapter.hidden_size
            (2, 8)
        """
        if fused_qkv is not None:
            if queries is not None or keys is not None or values is not None:
                raise ValueError("give either `fused_qkv` or `queries`/`keys`/`values`, not both")
            triples = [
                (Projection(m, 0, 3), Projection(m, 1, 3), Projection(m, 2, 3)) for m in fused_qkv
            ]
        else:
            if queries is None or keys is None or values is None:
                raise ValueError("`queries`, `keys` and `values` are all needed (or `fused_qkv`)")
            if not len(queries) == len(keys) == len(values):
                raise ValueError(
                    f"`queries`, `keys` and `values` must have one module per layer; got "
                    f"{len(queries)}, {len(keys)} and {len(values)}"
                )
            triples = [
                (Projection(q), Projection(k), Projection(v))
                for q, k, v in zip(queries, keys, values, strict=True)
            ]
        if outputs is not None and len(outputs) != len(triples):
            raise ValueError(f"`outputs` must have {len(triples)} modules, got {len(outputs)}")
        layers = [
            AttentionLayer(q, k, v, num_heads, outputs[i] if outputs is not None else None)
            for i, (q, k, v) in enumerate(triples)
        ]
        if isinstance(patch_size, int):
            patch_size = (patch_size, patch_size)
        tokens = None
        if token_interface:
            unknown = set(token_interface) - {f.name for f in dataclasses.fields(TokenInterface)}
            missing = {"embed", "blocks", "head"} - set(token_interface)
            if unknown or missing:
                raise ValueError(
                    "the token interface takes `embed`, `blocks` and `head` (all three) and "
                    "optionally `padding_mask` and `attention_norms`; got unknown "
                    f"{sorted(unknown)}, missing {sorted(missing)}"
                )
            tokens = TokenInterface(**token_interface)
        return cls(
            forward=forward,
            layers=layers,
            patch_size=patch_size,
            prefix_tokens=prefix_tokens,
            tokens=tokens,
            cam_layer=cam_layer,
            model=model,
        )


@dataclass(frozen=True)
class ResolvedModel:
    """What an attribution method explains and what it protects.

    Attributes:
        adapter: the model's adapter (never the caller's object changed); ``None`` only for a
            plain callable resolved with ``required=False``.
        forward: the function explained, ``forward(images, *args) -> logits``
            (``adapter.forward``).
        module: the module whose train/eval mode and ``requires_grad`` flags are restored after
            each call (``None`` for a plain function).
    """

    adapter: ViTAdapter | None
    forward: Callable[..., Any]
    module: nn.Module | None


def resolve_model(
    model: Any, adapter: ViTAdapter | None = None, *, required: bool = True
) -> ResolvedModel:
    """The one way from ``(model, adapter)`` to what to run and what to protect.

    - no ``adapter``: :func:`get_adapter` finds it (``model`` may itself be an adapter);
    - an ``adapter`` beside the module it wraps (``model is adapter.model``): the adapter as
      it is (its forward already knows how to call that module);
    - an ``adapter`` beside any other callable: a *new* adapter whose forward is ``model``
      (``dataclasses.replace``), so every method explains ``model`` itself (run inside the
      adapter's ``attention_context`` when it has one, so its taps still record).

    With ``required=False`` (black-box methods such as RISE), a callable that no registered
    adapter recognises resolves to itself with no adapter. Neither argument is changed.

    Example::

        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.adapters import get_adapter, resolve_model
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5))
        >>> adapter = get_adapter(model)
        >>> def explained(images):
        ...     return model(images).logits
        >>> resolved = resolve_model(explained, adapter)
        >>> resolved.forward is explained, adapter.forward is explained, resolved.module is model
        (True, False, True)
    """
    if isinstance(model, ViTAdapter):
        if adapter is not None and adapter is not model:
            raise ValueError("`model` is an adapter already: do not pass another `adapter`")
        adapter = model
    elif adapter is None:
        if not required and not any(matches(model) for _, matches, _ in _REGISTRY):
            if not callable(model):
                raise TypeError(f"`model` must be callable, got {type(model).__name__}")
            module = model if isinstance(model, nn.Module) else None
            return ResolvedModel(None, model, module)
        adapter = get_adapter(model)
    elif not isinstance(adapter, ViTAdapter):
        raise TypeError(f"`adapter` must be a ViTAdapter, got {type(adapter).__name__}")
    elif model is not adapter.model and model is not adapter.forward:
        if not callable(model):
            raise TypeError(f"`model` must be callable, got {type(model).__name__}")
        forward = model
        if adapter.attention_context is not None:
            forward = _within(adapter.attention_context, model)
        adapter = dataclasses.replace(adapter, forward=forward)
    module = adapter.model
    if module is None and isinstance(model, nn.Module):
        module = model
    return ResolvedModel(adapter, adapter.forward, module)


AdapterBuilder = Callable[[Any], ViTAdapter]
_REGISTRY: list[tuple[str, Callable[[Any], bool], AdapterBuilder]] = []


def register_adapter(name: str, matches: Callable[[Any], bool], build: AdapterBuilder) -> None:
    """Add an adapter builder; the most recently registered matching builder wins.

    Args:
        name: a label for the architecture.
        matches: ``matches(model) -> bool``.
        build: ``build(model) -> ViTAdapter``.
    """
    _REGISTRY.append((name, matches, build))


def get_adapter(model: Any) -> ViTAdapter:
    """Return the adapter for ``model`` (an adapter is returned as it is).

    Raises:
        ValueError: when no registered adapter recognises the model.
    """
    if isinstance(model, ViTAdapter):
        return model
    for _name, matches, build in reversed(_REGISTRY):
        if matches(model):
            return build(model)
    raise ValueError(
        f"`model` of type {type(model).__name__} has no recognisable attention layers: supported "
        "are Hugging Face ViTForImageClassification / DeiTForImageClassification(WithTeacher) "
        "and timm VisionTransformer models; for anything else pass "
        "`adapter=ViTAdapter.from_modules(...)` naming the query/key/value modules"
    )


# --- Hugging Face transformers (4.x and 5.x layouts) -------------------------------------------


def _hf_base(model: Any) -> Any:
    prefix = getattr(model, "base_model_prefix", None)
    return getattr(model, prefix, None) if prefix else None


def _hf_layers(base: Any) -> Any:
    if hasattr(base, "layers"):  # transformers 5.x
        return base.layers
    encoder = getattr(base, "encoder", None)
    return getattr(encoder, "layer", None)  # transformers 4.x


def _is_hf_vit(model: Any) -> bool:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        return False
    base = _hf_base(model)
    return (
        base is not None
        and hasattr(base, "embeddings")
        and hasattr(base.embeddings, "patch_embeddings")
        and _hf_layers(base) is not None
    )


def _hf_attention_layer(layer: nn.Module, num_heads: int) -> AttentionLayer:
    attention = layer.attention
    if hasattr(attention, "q_proj"):  # 5.x: attention.{q,k,v,o}_proj
        return AttentionLayer(
            Projection(attention.q_proj),
            Projection(attention.k_proj),
            Projection(attention.v_proj),
            num_heads,
            attention.o_proj,
        )
    inner = (
        attention.attention
    )  # 4.x: attention.attention.{query,key,value}, attention.output.dense
    return AttentionLayer(
        Projection(inner.query),
        Projection(inner.key),
        Projection(inner.value),
        num_heads,
        attention.output.dense,
    )


def _attention_norms(blocks: Sequence[nn.Module], name: str) -> list[nn.Module] | None:
    """Each block's ``name`` module when every block is pre-norm and has one, else ``None``
    (timm's ``ResPostBlock`` applies ``norm1`` after attention)."""
    norms = [getattr(block, name, None) for block in blocks]
    if any(not isinstance(norm, nn.Module) for norm in norms) or any(
        type(block).__name__.startswith("ResPost") or "PostNorm" in type(block).__name__
        for block in blocks
    ):
        return None
    return norms


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _hf_padding_mask(config: Any, layers: Sequence[nn.Module]) -> Callable[..., Any] | None:
    """The 5.x layers take an attention mask in the format of the configured attention kernel;
    the 4.x layers take none (their second argument is a head mask)."""
    if not all("attention_mask" in inspect.signature(layer.forward).parameters for layer in layers):
        return None
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # pragma: no cover - transformers releases before the masking utilities
        return None

    def padding_mask(tokens: Tensor, keep: Tensor) -> Any:
        return create_bidirectional_mask(config=config, inputs_embeds=tokens, attention_mask=keep)

    return padding_mask


def _build_hf(model: Any) -> ViTAdapter:
    base = _hf_base(model)
    config = model.config
    embeddings = base.embeddings
    trained_size = tuple(embeddings.patch_embeddings.image_size)
    prefix = (
        1
        + int(getattr(embeddings, "distillation_token", None) is not None)
        + int(getattr(config, "num_register_tokens", 0) or 0)
    )

    # Dinov2 embeddings always interpolate their positions and take no such argument.
    optional = "interpolate_pos_encoding" in inspect.signature(embeddings.forward).parameters

    def needs_interpolation(images: Tensor) -> bool:
        return optional and tuple(images.shape[-2:]) != trained_size

    def forward(images: Tensor, *args: Any) -> Any:
        if needs_interpolation(images):
            return model(images, *args, interpolate_pos_encoding=True)
        return model(images, *args)

    def embed(images: Tensor) -> Tensor:
        if not optional:
            return _first(embeddings(images))
        # BEiT-style embeddings also return the patch grid
        return _first(embeddings(images, interpolate_pos_encoding=needs_interpolation(images)))

    pooler = getattr(base, "pooler", None)
    mean_pooled = getattr(pooler, "layernorm", None) is not None  # BEiT / Data2Vec mean pooling

    def head(tokens: Tensor) -> Tensor:
        tokens = base.layernorm(tokens)
        if mean_pooled:
            return model.classifier(pooler(tokens))
        if hasattr(model, "distillation_classifier"):  # DeiT with teacher: mean of both heads
            return (
                model.cls_classifier(tokens[:, 0]) + model.distillation_classifier(tokens[:, 1])
            ) / 2
        if config.model_type.startswith("dinov2"):  # CLS beside the mean of the patch tokens
            pooled = torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=1)
            return model.classifier(pooled)
        return model.classifier(tokens[:, 0])

    layers = list(_hf_layers(base))
    blocks = [
        (lambda h, mask=None, block=block: _first(block(h) if mask is None else block(h, mask)))
        for block in layers
    ]
    patch = config.patch_size
    # Padded token sets need a head that reads the prefix tokens alone (Dinov2 averages patches).
    padding_mask = None
    if not config.model_type.startswith("dinov2") and not mean_pooled:
        padding_mask = _hf_padding_mask(config, layers)
    # ViT/DeiT/BEiT name the attention LayerNorm `layernorm_before`, Dinov2 `norm1`
    norm_name = "layernorm_before" if hasattr(layers[0], "layernorm_before") else "norm1"
    tokens = TokenInterface(embed, blocks, head, padding_mask, _attention_norms(layers, norm_name))
    reason = None
    if getattr(config, "use_relative_position_bias", False) or getattr(
        config, "use_shared_relative_position_bias", False
    ):
        tokens = None
        reason = (
            "its relative position bias is indexed over the whole patch grid, so patch tokens "
            "cannot run apart from their positions (use mode='exact')"
        )
    return ViTAdapter(
        forward=forward,
        layers=[_hf_attention_layer(layer, config.num_attention_heads) for layer in layers],
        patch_size=(patch, patch) if isinstance(patch, int) else tuple(patch),
        prefix_tokens=prefix,
        tokens=tokens,
        no_tokens_reason=reason,
        cam_layer=getattr(layers[-1], norm_name, None),
        model=model,
        name=f"hf-{config.model_type}",
    )


# --- timm -------------------------------------------------------------------------------------


def _is_timm_vit(model: Any) -> bool:
    return (
        isinstance(model, nn.Module)
        and hasattr(model, "blocks")
        and hasattr(model, "patch_embed")
        and hasattr(model, "num_prefix_tokens")
        and hasattr(model, "forward_head")
        and all(hasattr(block, "attn") for block in model.blocks)
    )


def _timm_attention_layer(block: nn.Module) -> AttentionLayer:
    attn = block.attn
    qk_normalized = not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity)
    if getattr(attn, "qkv", None) is not None:
        qkv = attn.qkv
        projections = (Projection(qkv, 0, 3), Projection(qkv, 1, 3), Projection(qkv, 2, 3))
    else:
        projections = (Projection(attn.q_proj), Projection(attn.k_proj), Projection(attn.v_proj))
    return AttentionLayer(*projections, attn.num_heads, attn.proj, qk_normalized)


def _build_timm(model: Any) -> ViTAdapter:
    def embed(images: Tensor) -> Tensor:
        tokens = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(model.patch_drop(tokens))

    def head(tokens: Tensor) -> Tensor:
        return model.forward_head(model.norm(tokens))

    # Padded token sets need blocks that take `attn_mask` and a head that pools the CLS token
    # (average or attention pooling would read the padding).
    maskable = getattr(model, "global_pool", None) == "token" and all(
        "attn_mask" in inspect.signature(block.forward).parameters for block in model.blocks
    )

    def padding_mask(tokens: Tensor, keep: Tensor) -> Tensor:
        return keep[:, None, None, :]

    blocks = [
        (lambda x, mask=None, block=block: block(x) if mask is None else block(x, attn_mask=mask))
        for block in model.blocks
    ]
    patch = model.patch_embed.patch_size
    strict = getattr(model.patch_embed, "strict_img_size", False)
    fixed = getattr(model.patch_embed, "img_size", None) if strict else None
    return ViTAdapter(
        forward=model,
        layers=[_timm_attention_layer(block) for block in model.blocks],
        patch_size=(patch, patch) if isinstance(patch, int) else tuple(patch),
        prefix_tokens=int(model.num_prefix_tokens),
        tokens=TokenInterface(
            embed,
            blocks,
            head,
            padding_mask if maskable else None,
            _attention_norms(model.blocks, "norm1"),
        ),
        cam_layer=getattr(model.blocks[-1], "norm1", None),
        model=model,
        name=f"timm-{type(model).__name__}",
        image_size=None if fixed is None else (int(fixed[0]), int(fixed[1])),
    )


# --- taps: the adapter's own, equivalent attention for models without Q/K/V modules ------------


class Tap(nn.Module):
    """An identity module that marks a tensor inside an attention computation for hooks.

    Some attention modules compute Q/K/V without a submodule to hook (timm EVA and BEiT call
    ``F.linear`` with a bias they assemble; ``nn.MultiheadAttention`` projects inside a
    functional kernel) or never materialise their attention probabilities (rotary and
    relative position terms inside a fused kernel). Their adapters run an equivalent attention
    written out step by step, pass each intermediate through a ``Tap`` (the adapter's, never
    added to the model), and install it only while the adapter's forward runs.

    Args:
        out_features: width of the tapped tensor's last dimension, when known (reported as a
            projection's width).
        bias: optional ``bias() -> tensor``: the bias the model added to the tapped tensor
            (a functional projection's, e.g. ``nn.MultiheadAttention.in_proj_bias``), read by
            attributions that credit biases (LibraGrad's FullGrad+).
    """

    def __init__(
        self, out_features: int | None = None, bias: Callable[[], Tensor | None] | None = None
    ) -> None:
        super().__init__()
        self.out_features = out_features
        self._bias = bias

    @property
    def bias(self) -> Tensor | None:
        """The bias added to the tapped tensor, when the adapter knows it."""
        return None if self._bias is None else self._bias()

    def forward(self, tensor: Tensor) -> Tensor:
        return tensor


class _LayerTaps(nn.Module):
    """The taps of one attention layer: fused ``qkv`` (or separate ``query``/``key``/``value``),
    ``probabilities`` (``(B, heads, T, T)``) and ``context`` (``A @ V``, heads concatenated)."""

    def __init__(
        self, width: int, fused: bool, bias: Callable[[], Tensor | None] | None = None
    ) -> None:
        super().__init__()
        if fused:
            self.qkv = Tap(3 * width, bias)
        else:
            self.query, self.key, self.value = Tap(width), Tap(width), Tap(width)
        self.probabilities = Tap()
        self.context = Tap(width)

    def layer(
        self, num_heads: int, output: nn.Module | None = None, attention: nn.Module | None = None
    ) -> AttentionLayer:
        if hasattr(self, "qkv"):
            projections = [Projection(self.qkv, index, 3) for index in range(3)]
        else:
            projections = [Projection(self.query), Projection(self.key), Projection(self.value)]
        return AttentionLayer(
            *projections,
            num_heads,
            self.context if output is None else output,
            probabilities=self.probabilities,
            attention=attention,
        )


def _attend(
    query: Tensor, key: Tensor, value: Tensor, taps: _LayerTaps, scale: float, bias: Any = None
) -> tuple[Tensor, Tensor]:
    """``softmax(scale * Q K^T + bias) V`` with the probabilities and the context tapped;
    ``(B, heads, T, d)`` in; the context ``(B, T, heads * d)`` and the probabilities out."""
    scores = (query * scale) @ key.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    probabilities = taps.probabilities(scores.softmax(dim=-1))
    context = probabilities @ value
    batch, heads, tokens, width = context.shape
    context = taps.context(context.transpose(1, 2).reshape(batch, tokens, heads * width))
    return context, probabilities


def _split_heads(tensor: Tensor, num_heads: int) -> Tensor:
    batch, tokens, _ = tensor.shape
    return tensor.reshape(batch, tokens, num_heads, -1).transpose(1, 2)


def _no_mask(module: nn.Module, **masks: Any) -> None:
    given = [name for name, value in masks.items() if value is not None and value is not False]
    if given:
        raise ValueError(
            f"the adapter's equivalent of {type(module).__name__} runs unmasked self-attention "
            f"(a ViT's); it was given {given}"
        )


_ABSENT = object()


@contextlib.contextmanager
def _replaced_forwards(
    replacements: Sequence[tuple[nn.Module, Callable[..., Any]]],
) -> Any:
    """Each module's ``forward`` replaced by its equivalent for the block, restored afterwards
    (errors included); nested entries leave an installed replacement as it is."""
    installed = []
    try:
        for module, forward in replacements:
            current = module.__dict__.get("forward", _ABSENT)
            if current is forward:
                continue
            installed.append((module, current))
            module.forward = forward
        yield
    finally:
        for module, previous in reversed(installed):
            if previous is _ABSENT:
                del module.forward
            else:
                module.forward = previous


def _within(
    context: Callable[[], contextlib.AbstractContextManager[Any]], function: Callable[..., Any]
) -> Callable[..., Any]:
    """``function`` run inside ``context()``."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with context():
            return function(*args, **kwargs)

    return run


def _tapped(
    replacements: list[tuple[nn.Module, Callable[..., Any]]],
) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    def context() -> contextlib.AbstractContextManager[Any]:
        return _replaced_forwards(replacements)

    return context


def _eva_forward(attn: nn.Module, taps: _LayerTaps) -> Callable[..., Tensor]:
    """timm ``EvaAttention`` as it computes (fused or separate projections, the constant
    zero key bias, q/k norms, rotary embedding of the patch tokens, scale norm, gate), with
    Q/K/V, the probabilities and the context tapped."""
    from timm.layers import apply_rot_embed_cat

    def forward(
        x: Tensor, rope: Tensor | None = None, attn_mask: Any = None, is_causal: bool = False
    ) -> Tensor:
        _no_mask(attn, attn_mask=attn_mask, is_causal=is_causal)
        gate = attn.gate(x).sigmoid() if attn.gate is not None else None
        if attn.qkv is not None:
            bias = None
            if attn.q_bias is not None:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = taps.qkv(F.linear(x, attn.qkv.weight, bias))
            query, key, value = (_split_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))
        else:
            query = _split_heads(attn.q_proj(x), attn.num_heads)
            key = _split_heads(attn.k_proj(x), attn.num_heads)
            value = _split_heads(attn.v_proj(x), attn.num_heads)
        query, key = attn.q_norm(query), attn.k_norm(key)
        if rope is not None:
            prefix = attn.num_prefix_tokens
            half = getattr(attn, "rotate_half", False)
            query, key = (
                torch.cat(
                    [t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)],
                    dim=2,
                ).type_as(value)
                for t in (query, key)
            )
        context = attn.norm(_attend(query, key, value, taps, attn.scale)[0])
        if gate is not None:
            context = context * gate
        return attn.proj_drop(attn.proj(context))

    return forward


def _beit_forward(attn: nn.Module, taps: _LayerTaps) -> Callable[..., Tensor]:
    """timm BEiT ``Attention`` as it computes (the zero key bias, the layer's and the shared
    relative position bias), with Q/K/V, the probabilities and the context tapped."""

    def forward(x: Tensor, shared_rel_pos_bias: Tensor | None = None) -> Tensor:
        bias = None
        if attn.q_bias is not None:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = taps.qkv(F.linear(x, attn.qkv.weight, bias))
        query, key, value = (_split_heads(t, attn.num_heads) for t in qkv.chunk(3, dim=-1))
        position_bias = None
        if attn.relative_position_bias_table is not None:
            position_bias = attn._get_rel_pos_bias()
        if shared_rel_pos_bias is not None:
            if position_bias is None:
                position_bias = shared_rel_pos_bias
            else:
                position_bias = position_bias + shared_rel_pos_bias
        context = _attend(query, key, value, taps, attn.scale, position_bias)[0]
        return attn.proj_drop(attn.proj(context))

    return forward


def _mha_forward(attn: nn.MultiheadAttention, taps: _LayerTaps) -> Callable[..., Any]:
    """``nn.MultiheadAttention`` used as self-attention, computed step by step: the packed
    in-projection (tapped as Q | K | V), softmax attention (probabilities and context tapped)
    and the output projection; same return values as the module."""
    heads = attn.num_heads

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        _no_mask(attn, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal)
        if not (query is key and key is value):
            raise ValueError(
                "the adapter's equivalent of nn.MultiheadAttention runs self-attention only "
                "(query, key and value the same tensor)"
            )
        x = query if attn.batch_first else query.transpose(0, 1)
        qkv = taps.qkv(F.linear(x, attn.in_proj_weight, attn.in_proj_bias))
        queries, keys, values = (_split_heads(t, heads) for t in qkv.chunk(3, dim=-1))
        scale = 1.0 / math.sqrt(queries.shape[-1])
        context, probabilities = _attend(queries, keys, values, taps, scale)
        output = attn.out_proj(context)
        if not attn.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        return output, probabilities.mean(1) if average_attn_weights else probabilities

    return forward


def _instance_of(model: Any, module_name: str, *class_names: str) -> bool:
    """``isinstance(model, module_name.<class>)`` for any of ``class_names``, without importing
    ``module_name`` (a model of a library not yet imported cannot be an instance)."""
    module = sys.modules.get(module_name)
    if module is None:
        return False
    classes = tuple(getattr(module, name) for name in class_names if hasattr(module, name))
    return bool(classes) and isinstance(model, classes)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


ZERO_SHOT_HINT = (
    "wrap it in captum_gradmask.zero_shot.ZeroShotClassifier(model, labels=[...], "
    "processor=...) (or ZeroShotClassifier.from_text_embeddings(model, embeddings)) to explain "
    "which prompt it matches an image to"
)


# --- timm EVA / EVA-02 and BEiT -----------------------------------------------------------------


def _is_timm_eva(model: Any) -> bool:
    return _instance_of(model, "timm.models.eva", "Eva")


def _is_timm_beit(model: Any) -> bool:
    return _instance_of(model, "timm.models.beit", "Beit")


def _qkv_bias(attn: nn.Module) -> Callable[[], Tensor | None]:
    """The bias timm EVA/BEiT attention adds to its fused ``qkv`` output (query, zero key and
    value biases), or none."""

    def bias() -> Tensor | None:
        if getattr(attn, "q_bias", None) is None:
            return getattr(getattr(attn, "qkv", None), "bias", None)
        return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))

    return bias


def _build_timm_eva(model: Any) -> ViTAdapter:
    from timm.models.eva import EvaAttention

    taps, replacements, layers = nn.ModuleList(), [], []
    for index, block in enumerate(model.blocks):
        attn = block.attn
        if type(attn) is not EvaAttention:
            raise ValueError(
                f"block {index} of the timm Eva model uses {type(attn).__name__}; the EVA "
                "adapter supports timm's EvaAttention (fused or separate projections)"
            )
        width = attn.head_dim * attn.num_heads
        layer_taps = _LayerTaps(width, fused=attn.qkv is not None, bias=_qkv_bias(attn))
        layer = layer_taps.layer(attn.num_heads, attention=attn)
        if attn.qkv is None:  # separate projections are modules: hook them directly
            layer = dataclasses.replace(
                layer,
                query=Projection(attn.q_proj),
                key=Projection(attn.k_proj),
                value=Projection(attn.v_proj),
            )
        taps.append(layer_taps)
        layers.append(layer)
        replacements.append((attn, _eva_forward(attn, layer_taps)))
    context = _tapped(replacements)
    tokens, reason = None, None
    if model.rope is None:

        def embed(images: Tensor) -> Tensor:
            tokens, _ = model._pos_embed(model.patch_embed(images))
            return model.norm_pre(tokens)

        blocks = [(lambda x, block=block: block(x)) for block in model.blocks]
        tokens = TokenInterface(
            embed,
            blocks,
            lambda x: model.forward_head(model.norm(x)),
            attention_norms=_attention_norms(model.blocks, "norm1"),
        )
    else:
        reason = (
            "its rotary position embeddings are computed for the whole patch grid, so patch "
            "tokens cannot run apart from their positions (use mode='exact')"
        )
    return ViTAdapter(
        forward=_within(context, model),
        layers=layers,
        patch_size=_pair(model.patch_embed.patch_size),
        prefix_tokens=int(model.num_prefix_tokens),
        tokens=tokens,
        cam_layer=getattr(model.blocks[-1], "norm1", None),
        model=model,
        name="timm-Eva",
        attention_context=context,
        no_tokens_reason=reason,
    )


def _build_timm_beit(model: Any) -> ViTAdapter:
    taps, replacements, layers = nn.ModuleList(), [], []
    for block in model.blocks:
        attn = block.attn
        layer_taps = _LayerTaps(attn.proj.in_features, fused=True, bias=_qkv_bias(attn))
        taps.append(layer_taps)
        layers.append(layer_taps.layer(attn.num_heads, attention=attn))
        replacements.append((attn, _beit_forward(attn, layer_taps)))
    context = _tapped(replacements)
    relative = model.rel_pos_bias is not None or any(
        block.attn.relative_position_bias_table is not None for block in model.blocks
    )
    tokens, reason = None, None
    if relative:
        reason = (
            "its relative position bias is indexed over the whole patch grid, so patch tokens "
            "cannot run apart from their positions (use mode='exact')"
        )
    else:

        def embed(images: Tensor) -> Tensor:
            x = model.patch_embed(images)
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            if model.pos_embed is not None:
                x = x + model.pos_embed
            return model.pos_drop(x)

        blocks = [(lambda x, block=block: block(x)) for block in model.blocks]
        tokens = TokenInterface(
            embed,
            blocks,
            lambda x: model.forward_head(model.norm(x)),
            attention_norms=_attention_norms(model.blocks, "norm1"),
        )
    return ViTAdapter(
        forward=_within(context, model),
        layers=layers,
        patch_size=_pair(model.patch_embed.patch_size),
        prefix_tokens=int(model.num_prefix_tokens),
        tokens=tokens,
        cam_layer=getattr(model.blocks[-1], "norm1", None),
        model=model,
        name="timm-Beit",
        attention_context=context,
        no_tokens_reason=reason,
    )


# --- Hugging Face CLIP and SigLIP vision towers ------------------------------------------------


def _hf_tower(model: Any) -> Any:
    return getattr(model, "vision_model", model)


def _is_hf_clip_like(model: Any) -> bool:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        return False
    tower = _hf_tower(model)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    return (
        hasattr(getattr(tower, "embeddings", None), "patch_embedding")
        and layers is not None
        and all(hasattr(layer, "self_attn") for layer in layers)
    )


def _hf_clip_like_parts(model: Any) -> tuple[Any, int, Callable[[Tensor], Tensor]]:
    """The vision tower, its prefix count and ``features(tokens)``: the tower's pooled output
    (CLIP: post-norm CLS; SigLIP: post-norm, then the attention-pooling head)."""
    tower = _hf_tower(model)
    if hasattr(tower.embeddings, "class_embedding"):

        def features(tokens: Tensor) -> Tensor:
            return tower.post_layernorm(tokens[:, 0])

        return tower, 1, features
    if not getattr(tower, "use_head", False):
        raise ValueError(
            f"`model` {type(model).__name__} has no pooling head (vision_use_head=False), so it "
            "has no image output to explain"
        )

    def pooled(tokens: Tensor) -> Tensor:
        return tower.head(tower.post_layernorm(tokens))

    return tower, 0, pooled


def _hf_clip_like_adapter(
    model: nn.Module,
    output: Callable[[Any], Tensor],
    head: Callable[[Tensor], Tensor],
    cls_pooled: bool,
    name: str,
    forward_model: Callable[..., Any] | None = None,
) -> ViTAdapter:
    """An adapter for a Hugging Face CLIP/SigLIP vision tower inside ``model``: ``forward``
    calls ``model`` (or ``forward_model``) and reads ``output`` of its result; ``head`` maps
    the tower's last tokens to the same output."""
    tower = _hf_tower(model)
    config = tower.config
    pre_norm = getattr(tower, "pre_layrnorm", None)
    trained_size = _pair(config.image_size)
    prefix = 1 if hasattr(tower.embeddings, "class_embedding") else 0
    call = model if forward_model is None else forward_model

    def needs_interpolation(images: Tensor) -> bool:
        return tuple(images.shape[-2:]) != trained_size

    def forward(images: Tensor, *args: Any) -> Tensor:
        if needs_interpolation(images):
            return output(call(images, *args, interpolate_pos_encoding=True))
        return output(call(images, *args))

    def embed(images: Tensor) -> Tensor:
        tokens = tower.embeddings(images, interpolate_pos_encoding=needs_interpolation(images))
        return tokens if pre_norm is None else pre_norm(tokens)

    layers = list(tower.encoder.layers)
    blocks = [(lambda h, mask=None, block=block: _first(block(h, mask))) for block in layers]
    padding_mask = _hf_padding_mask(config, layers) if cls_pooled else None
    heads = config.num_attention_heads
    attention = [
        AttentionLayer(
            Projection(layer.self_attn.q_proj),
            Projection(layer.self_attn.k_proj),
            Projection(layer.self_attn.v_proj),
            heads,
            layer.self_attn.out_proj,
        )
        for layer in layers
    ]
    return ViTAdapter(
        forward=forward,
        layers=attention,
        patch_size=_pair(config.patch_size),
        prefix_tokens=prefix,
        tokens=TokenInterface(
            embed, blocks, head, padding_mask, _attention_norms(layers, "layer_norm1")
        ),
        cam_layer=layers[-1].layer_norm1,
        model=model,
        name=name,
    )


def _build_hf_clip_like(model: Any) -> ViTAdapter:
    kind = type(model).__name__
    if hasattr(model, "text_model"):
        raise ValueError(
            f"`model` {kind} is an image-text model, not a classifier: {ZERO_SHOT_HINT}"
        )
    tower, prefix, features = _hf_clip_like_parts(model)
    name = f"hf-{tower.config.model_type}"
    if hasattr(model, "classifier"):  # *ForImageClassification: mean of the patch tokens
        if prefix:  # CLIP: the last hidden state as it is, CLS excluded

            def pooled(tokens: Tensor) -> Tensor:
                return tokens[:, 1:].mean(dim=1)
        else:  # SigLIP: the post-norm last hidden state, every token

            def pooled(tokens: Tensor) -> Tensor:
                return tower.post_layernorm(tokens).mean(dim=1)

        return _hf_clip_like_adapter(
            model,
            lambda out: out.logits,
            lambda tokens: model.classifier(pooled(tokens)),
            cls_pooled=False,
            name=name,
        )
    if hasattr(model, "visual_projection"):  # *VisionModelWithProjection
        return _hf_clip_like_adapter(
            model,
            lambda out: out.image_embeds,
            lambda tokens: model.visual_projection(features(tokens)),
            cls_pooled=bool(prefix),
            name=name,
        )
    return _hf_clip_like_adapter(
        model, lambda out: out.pooler_output, features, cls_pooled=bool(prefix), name=name
    )


# --- torchvision VisionTransformer and OpenCLIP visual towers (nn.MultiheadAttention) ----------


def _mha_layers(
    modules: Sequence[nn.MultiheadAttention],
) -> tuple[list[AttentionLayer], Callable[[], contextlib.AbstractContextManager[Any]]]:
    """Tapped layers and the context that installs their equivalent attention."""
    layers, replacements, taps = [], [], nn.ModuleList()
    for index, attn in enumerate(modules):
        if not isinstance(attn, nn.MultiheadAttention):
            raise ValueError(
                f"attention layer {index} is {type(attn).__name__}, expected nn.MultiheadAttention"
            )
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise ValueError(
                f"attention layer {index}: the adapter supports nn.MultiheadAttention with a "
                "packed in-projection and without bias_k/bias_v or add_zero_attn"
            )
        layer_taps = _LayerTaps(
            attn.embed_dim, fused=True, bias=lambda attn=attn: attn.in_proj_bias
        )
        taps.append(layer_taps)
        layers.append(layer_taps.layer(attn.num_heads, attention=attn))
        replacements.append((attn, _mha_forward(attn, layer_taps)))
    return layers, _tapped(replacements)


def _is_torchvision_vit(model: Any) -> bool:
    return _instance_of(model, "torchvision.models.vision_transformer", "VisionTransformer")


def _build_torchvision_vit(model: Any) -> ViTAdapter:
    encoder = model.encoder
    layers, context = _mha_layers([block.self_attention for block in encoder.layers])

    def embed(images: Tensor) -> Tensor:
        x = model._process_input(images)
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return encoder.dropout(x + encoder.pos_embedding)

    def head(tokens: Tensor) -> Tensor:
        return model.heads(encoder.ln(tokens)[:, 0])

    blocks = [(lambda x, block=block: block(x)) for block in encoder.layers]
    return ViTAdapter(
        forward=_within(context, model),
        layers=layers,
        patch_size=_pair(model.patch_size),
        prefix_tokens=1,
        tokens=TokenInterface(
            embed, blocks, head, attention_norms=_attention_norms(encoder.layers, "ln_1")
        ),
        cam_layer=encoder.layers[-1].ln_1,
        model=model,
        name="torchvision-vit",
        attention_context=context,
    )


def _is_open_clip_visual(model: Any) -> bool:
    return _instance_of(model, "open_clip.transformer", "VisionTransformer")


def _is_open_clip_model(model: Any) -> bool:
    return _instance_of(model, "open_clip.model", "CLIP", "CustomTextCLIP")


def _build_open_clip_visual(
    visual: Any, model: nn.Module | None = None, forward: Callable[..., Any] | None = None
) -> ViTAdapter:
    """Adapter for an OpenCLIP ``VisionTransformer``; ``forward``/``model`` default to the
    tower itself (its output: the image embedding)."""
    transformer = visual.transformer
    resblocks = list(transformer.resblocks)
    layers, context = _mha_layers([block.attn for block in resblocks])
    batch_first = getattr(transformer, "batch_first", True)

    def block_runner(block: nn.Module) -> Callable[[Tensor], Tensor]:
        if batch_first:
            return lambda x: block(x)
        return lambda x: block(x.transpose(0, 1)).transpose(0, 1)

    def head(tokens: Tensor) -> Tensor:
        pooled, _ = visual._pool(tokens)
        return pooled if visual.proj is None else pooled @ visual.proj

    return ViTAdapter(
        forward=_within(context, visual if forward is None else forward),
        layers=layers,
        patch_size=_pair(visual.patch_size),
        prefix_tokens=1,
        tokens=TokenInterface(
            visual._embeds,
            [block_runner(b) for b in resblocks],
            head,
            attention_norms=_attention_norms(resblocks, "ln_1"),
        ),
        cam_layer=resblocks[-1].ln_1,
        model=visual if model is None else model,
        name="open-clip-vit",
        attention_context=context,
    )


def _refuse_open_clip_model(model: Any) -> ViTAdapter:
    raise ValueError(f"`model` is an OpenCLIP image-text model: {ZERO_SHOT_HINT}")


# --- image-text models: the image tower's embedding --------------------------------------------


def image_feature_adapter(model: nn.Module) -> ViTAdapter:
    """The adapter of an image-text model's image tower; its output is the image embedding
    (before normalisation) that the model compares with text embeddings.

    Supported: Hugging Face ``CLIPModel`` (projected CLS), ``SiglipModel`` (attention-pooled)
    and OpenCLIP ``CLIP`` models with a ``VisionTransformer`` image tower. Used by
    :class:`~captum_gradmask.zero_shot.ZeroShotClassifier`.

    Example::

        >>> import torch
        >>> from transformers import CLIPConfig, CLIPModel
        >>> from captum_gradmask.adapters import image_feature_adapter
        >>> vision = dict(image_size=28, patch_size=14, hidden_size=24, intermediate_size=48,
        ...     num_hidden_layers=2, num_attention_heads=3)
        >>> text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
        ...     num_attention_heads=3)
        >>> model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text,
        ...     projection_dim=16)).eval()
        >>> adapter = image_feature_adapter(model)
        >>> adapter.logits(torch.randn(2, 3, 28, 28)).shape, adapter.prefix_tokens
        (torch.Size([2, 16]), 1)
    """
    if _is_open_clip_model(model):
        visual = model.visual
        if not _is_open_clip_visual(visual):
            raise ValueError(
                f"the OpenCLIP model's image tower is {type(visual).__name__}; supported is "
                "open_clip's VisionTransformer (timm towers: explain `model.visual.trunk` "
                "with the timm adapter)"
            )
        return _build_open_clip_visual(visual, model, model.encode_image)
    if not (_is_hf_clip_like(model) and hasattr(model, "text_model")):
        raise ValueError(
            f"`model` {type(model).__name__} is not a supported image-text model: expected a "
            "Hugging Face CLIPModel or SiglipModel, or an OpenCLIP CLIP model"
        )
    tower, prefix, features = _hf_clip_like_parts(model)
    projection = getattr(model, "visual_projection", None)

    def embedding(tokens: Tensor) -> Tensor:
        pooled = features(tokens)
        return pooled if projection is None else projection(pooled)

    def image_features(images: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        pooled = tower(images, *args, **kwargs).pooler_output
        return pooled if projection is None else projection(pooled)

    return _hf_clip_like_adapter(
        model,
        lambda out: out,
        embedding,
        cls_pooled=bool(prefix),
        name=f"hf-{tower.config.model_type}",
        forward_model=image_features,
    )


# --- refused: windowed and hierarchical backbones ----------------------------------------------

_WINDOWED = ("swin", "convnext", "pvt", "pyramidvisiontransformer", "hiera", "mvit", "maxvit")


def _is_windowed(model: Any) -> bool:
    name = type(model).__name__.lower()
    return isinstance(model, nn.Module) and any(word in name for word in _WINDOWED)


def _refuse_windowed(model: Any) -> ViTAdapter:
    raise ValueError(
        f"`model` {type(model).__name__} is a windowed or hierarchical backbone: GradMask "
        "binarises each Q/K/V channel group's gradient over one patch grid seen by global "
        "self-attention in every layer; windowed attention (Swin), convolutions (ConvNeXt) and "
        "pooled, multi-scale token grids (PVT) have no such grid of tokens, so the masks would "
        "not be patch masks of the image. Supported are plain ViTs (see docs/models.md)"
    )


register_adapter("windowed", _is_windowed, _refuse_windowed)
register_adapter("timm-vit", _is_timm_vit, _build_timm)
register_adapter("timm-eva", _is_timm_eva, _build_timm_eva)
register_adapter("timm-beit", _is_timm_beit, _build_timm_beit)
register_adapter("hf-vit", _is_hf_vit, _build_hf)
register_adapter("hf-clip", _is_hf_clip_like, _build_hf_clip_like)
register_adapter("torchvision-vit", _is_torchvision_vit, _build_torchvision_vit)
register_adapter("open-clip-vit", _is_open_clip_visual, _build_open_clip_visual)
register_adapter("open-clip-model", _is_open_clip_model, _refuse_open_clip_model)


# --- the families table (docs/models.md is generated from it and tested against it) ------------


@dataclass(frozen=True)
class FamilyNote:
    """One registered adapter, as docs/models.md describes it."""

    classes: str
    prefix_tokens: str
    fast_mode: str
    verified: str


_REFERENCE = "GradMask = independent reference at 1e-5 (random weights)"
#: Every registered adapter name (``register_adapter``) with its row of the families table.
FAMILY_NOTES: dict[str, FamilyNote] = {
    "hf-vit": FamilyNote(
        "HF `ViTForImageClassification`, `DeiTForImageClassification(WithTeacher)`, "
        "`Dinov2ForImageClassification`, `Dinov2WithRegistersForImageClassification`, "
        "`BeitForImageClassification`, `Data2VecVisionForImageClassification` "
        "(4.x and 5.x layouts)",
        "CLS (+ distillation) (+ registers)",
        "yes (padded; grouped for patch-mean heads); refused with BEiT's relative position bias",
        f"{_REFERENCE}; real ViT-Tiny",
    ),
    "hf-clip": FamilyNote(
        "HF `CLIPVisionModel`, `CLIPVisionModelWithProjection`, `CLIPForImageClassification`, "
        "`SiglipVisionModel` (attention-pooling head), `SiglipForImageClassification`",
        "CLIP: 1 (CLS); SigLIP: 0",
        "yes (padded for CLS-pooled towers; grouped for pooling heads)",
        _REFERENCE,
    ),
    "timm-vit": FamilyNote(
        "timm `VisionTransformer` and its variants (DeiT, DeiT III, `*_dinov2`, "
        "`*_reg4_dinov2`, `*_clip_*`, `*_siglip_*`, global-average-pool), "
        "`VisionTransformerDistilled`",
        "`model.num_prefix_tokens`",
        "yes (padded with CLS pooling; grouped otherwise)",
        f"{_REFERENCE}; real ViT-Tiny",
    ),
    "timm-eva": FamilyNote(
        "timm `Eva` (`eva02_*`, `eva_*`): fused or separate projections, rotary embeddings",
        "`model.num_prefix_tokens`",
        "refused with rotary embeddings (computed for the whole grid); yes without",
        f"{_REFERENCE}; tapped attention = the model's eager attention",
    ),
    "timm-beit": FamilyNote(
        "timm `Beit` (`beit_*`, `beitv2_*`): relative position bias",
        "1 (CLS)",
        "refused with relative position bias (indexed over the whole grid); yes without",
        f"{_REFERENCE}; tapped attention = the model's eager attention",
    ),
    "torchvision-vit": FamilyNote(
        "torchvision `VisionTransformer` (`vit_b_16`, ...): `nn.MultiheadAttention`",
        "1 (CLS)",
        "yes (grouped)",
        f"{_REFERENCE}; tapped attention = the module's own weights",
    ),
    "open-clip-vit": FamilyNote(
        "OpenCLIP `VisionTransformer` (`model.visual`): `nn.MultiheadAttention`",
        "1 (CLS)",
        "yes (grouped)",
        _REFERENCE,
    ),
    "zero-shot": FamilyNote(
        "`ZeroShotClassifier` over HF `CLIPModel`, `SiglipModel` or an OpenCLIP `CLIP`",
        "as its image tower",
        "as its image tower",
        f"{_REFERENCE}; logits = the model's `logits_per_image`",
    ),
    "open-clip-model": FamilyNote(
        "OpenCLIP `CLIP` (image-text)", "-", "-", "refused: wrap it in `ZeroShotClassifier`"
    ),
    "windowed": FamilyNote(
        "Swin, ConvNeXt, PVT, Hiera, MViT, MaxViT (windowed or hierarchical)",
        "-",
        "-",
        "refused: no global attention over one patch grid",
    ),
}


def families_table() -> str:
    """The families table of docs/models.md: one row per built-in adapter of
    :data:`FAMILY_NOTES` (a test checks it names every registered adapter).

    Example::

        >>> from captum_gradmask.adapters import families_table
        >>> families_table().splitlines()[0]
        '| adapter | models | prefix tokens | fast mode | how verified |'
    """
    rows = ["| adapter | models | prefix tokens | fast mode | how verified |"]
    rows.append("|---|---|---|---|---|")
    for name, note in FAMILY_NOTES.items():
        cells = (f"`{name}`", note.classes, note.prefix_tokens, note.fast_mode, note.verified)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
