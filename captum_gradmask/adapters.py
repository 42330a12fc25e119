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

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ._utils import extract_logits

__all__ = [
    "AttentionLayer",
    "Projection",
    "ResolvedModel",
    "TokenInterface",
    "ViTAdapter",
    "get_adapter",
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
    """

    query: Projection
    key: Projection
    value: Projection
    num_heads: int
    output: nn.Module | None = None
    qk_normalized: bool = False


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
    """

    embed: Callable[[Tensor], Tensor]
    blocks: Sequence[Callable[..., Tensor]]
    head: Callable[[Tensor], Any]
    padding_mask: Callable[[Tensor, Tensor], Any] | None = None

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
        image_size: the one ``(H, W)`` the model accepts (a timm model built without
            ``dynamic_img_size``), or ``None`` when any multiple of the patch size works.
    """

    forward: Callable[..., Any]
    layers: Sequence[AttentionLayer]
    patch_size: tuple[int, int]
    prefix_tokens: int
    tokens: TokenInterface | None = None
    cam_layer: nn.Module | None = field(default=None, repr=False)
    model: nn.Module | None = field(default=None, repr=False)
    name: str = "custom"
    image_size: tuple[int, int] | None = None

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
            raise ValueError(
                f"{what} needs the adapter's token interface (`embed`, `blocks` and `head`); "
                f"adapter {self.name!r} does not provide it (built-in adapters for Hugging Face "
                "ViT/DeiT and timm do)"
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
        dimension). ``token_interface`` may hold ``embed``, ``blocks`` and ``head`` (all three)
        and ``padding_mask`` (see :class:`TokenInterface`).

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
            unknown = set(token_interface) - {"embed", "blocks", "head", "padding_mask"}
            missing = {"embed", "blocks", "head"} - set(token_interface)
            if unknown or missing:
                raise ValueError(
                    "the token interface takes `embed`, `blocks` and `head` (all three) and "
                    f"optionally `padding_mask`; got unknown {sorted(unknown)}, missing "
                    f"{sorted(missing)}"
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
      (``dataclasses.replace``), so every method explains ``model`` itself.

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
        adapter = dataclasses.replace(adapter, forward=model)
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
    prefix = 1 + int(getattr(embeddings, "distillation_token", None) is not None)

    def needs_interpolation(images: Tensor) -> bool:
        return tuple(images.shape[-2:]) != trained_size

    def forward(images: Tensor, *args: Any) -> Any:
        if needs_interpolation(images):
            return model(images, *args, interpolate_pos_encoding=True)
        return model(images, *args)

    def embed(images: Tensor) -> Tensor:
        return embeddings(images, interpolate_pos_encoding=needs_interpolation(images))

    def head(tokens: Tensor) -> Tensor:
        tokens = base.layernorm(tokens)
        if hasattr(model, "distillation_classifier"):  # DeiT with teacher: mean of both heads
            return (
                model.cls_classifier(tokens[:, 0]) + model.distillation_classifier(tokens[:, 1])
            ) / 2
        return model.classifier(tokens[:, 0])

    layers = list(_hf_layers(base))
    blocks = [
        (lambda h, mask=None, block=block: _first(block(h) if mask is None else block(h, mask)))
        for block in layers
    ]
    patch = config.patch_size
    return ViTAdapter(
        forward=forward,
        layers=[_hf_attention_layer(layer, config.num_attention_heads) for layer in layers],
        patch_size=(patch, patch) if isinstance(patch, int) else tuple(patch),
        prefix_tokens=prefix,
        tokens=TokenInterface(embed, blocks, head, _hf_padding_mask(config, layers)),
        cam_layer=getattr(layers[-1], "layernorm_before", None),
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
        tokens=TokenInterface(embed, blocks, head, padding_mask if maskable else None),
        cam_layer=getattr(model.blocks[-1], "norm1", None),
        model=model,
        name=f"timm-{type(model).__name__}",
        image_size=None if fixed is None else (int(fixed[0]), int(fixed[1])),
    )


register_adapter("timm-vit", _is_timm_vit, _build_timm)
register_adapter("hf-vit", _is_hf_vit, _build_hf)
