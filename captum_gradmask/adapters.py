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

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ._utils import extract_logits

__all__ = [
    "AttentionLayer",
    "Projection",
    "ViTAdapter",
    "get_adapter",
    "register_adapter",
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


@dataclass
class ViTAdapter:
    """What the attribution methods need to know about a Vision Transformer.

    Args:
        forward: ``forward(images, *args) -> logits`` (any output :func:`extract_logits` reads).
        layers: the attention layers in order of depth.
        patch_size: ``(ph, pw)`` pixels per patch.
        prefix_tokens: tokens before the patch tokens (CLS, distillation, registers).
        embed: optional ``embed(images) -> tokens`` of shape ``(B, prefix + N, D)`` with position
            embeddings added; needed by token-level methods (fast GradMask, ViT-ReciproCAM,
            Vision DiffMask).
        blocks: optional encoder blocks, each ``block(tokens) -> tokens``.
        head: optional ``head(tokens) -> logits``, final norm and classifier included; it
            must read only what the blocks give it.
        padding_mask: optional ``padding_mask(tokens, keep) -> mask``: the attention mask that
            the ``blocks`` take as a second argument, ``block(tokens, mask)``, so that no token
            attends to a token where ``keep`` (``(B, T)`` bool) is False. Set it only when, in
            addition, ``head`` reads the prefix tokens alone (CLS pooling), so padding tokens
            never reach the logits. Lets fast GradMask batch token sets of different lengths.
        model: the wrapped module, if any (its mode is managed during attribution).
        name: a label for messages.
    """

    forward: Callable[..., Any]
    layers: Sequence[AttentionLayer]
    patch_size: tuple[int, int]
    prefix_tokens: int
    embed: Callable[[Tensor], Tensor] | None = None
    blocks: Sequence[Callable[..., Tensor]] | None = None
    head: Callable[[Tensor], Tensor] | None = None
    padding_mask: Callable[[Tensor, Tensor], Any] | None = None
    model: nn.Module | None = field(default=None, repr=False)
    name: str = "custom"

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
        """Whether ``embed``, ``blocks`` and ``head`` are all available."""
        return self.embed is not None and self.blocks is not None and self.head is not None

    def require_tokens(self, what: str) -> None:
        """Raise a clear error if the token-level interface is missing."""
        if not self.supports_tokens:
            raise ValueError(
                f"{what} needs the adapter's `embed`, `blocks` and `head`; adapter {self.name!r} "
                "does not provide them (built-in adapters for Hugging Face ViT/DeiT and timm do)"
            )

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of an image of ``image_size = (H, W)``; checks divisibility."""
        height, width = int(image_size[0]), int(image_size[1])
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

    @property
    def supports_padding(self) -> bool:
        """Whether :meth:`run_tokens` accepts ``keep`` (padded token sets)."""
        return self.supports_tokens and self.padding_mask is not None

    def run_tokens(self, tokens: Tensor, start: int = 0, keep: Tensor | None = None) -> Tensor:
        """Run blocks ``start..end`` and the head on ``tokens``; returns logits.

        ``keep`` (``(B, T)`` bool) marks the real tokens of a padded batch; padding tokens are
        not attended to (needs :attr:`padding_mask`).
        """
        self.require_tokens("running from tokens")
        assert self.blocks is not None and self.head is not None
        if keep is None:
            for block in self.blocks[start:]:
                tokens = block(tokens)
        else:
            if self.padding_mask is None:
                raise ValueError(
                    f"adapter {self.name!r} has no `padding_mask`, so it cannot run padded tokens"
                )
            mask = self.padding_mask(tokens, keep)
            for block in self.blocks[start:]:
                tokens = block(tokens, mask)
        return extract_logits(self.head(tokens))

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
        **token_interface: Any,
    ) -> ViTAdapter:
        """Build an adapter for any ViT by naming its projection modules.

        Give either ``queries``/``keys``/``values`` (one module per layer each) or
        ``fused_qkv`` (one module per layer whose output is ``Q | K | V`` along the last
        dimension). ``token_interface`` may hold ``embed``, ``blocks`` and ``head``.

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
        return cls(
            forward=forward,
            layers=layers,
            patch_size=patch_size,
            prefix_tokens=prefix_tokens,
            model=model,
            **token_interface,
        )


def managed_module(adapter: ViTAdapter, model: Any) -> nn.Module | None:
    """The module whose mode and flags an attribution manages: the adapter's, else ``model``."""
    if adapter.model is not None:
        return adapter.model
    return model if isinstance(model, nn.Module) else None


def resolve_adapter(
    model: Any, adapter: ViTAdapter | None = None
) -> tuple[ViTAdapter, nn.Module | None]:
    """The adapter of ``model`` and the module to manage, as every attribution class needs them.

    Without ``adapter`` it is :func:`get_adapter`'s; a callable given beside an explicit
    adapter becomes that adapter's forward function (the function to explain).
    """
    if adapter is None:
        adapter = get_adapter(model)
    elif not isinstance(model, ViTAdapter):
        adapter.forward = model
    return adapter, managed_module(adapter, model)


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
        embed=embed,
        blocks=blocks,
        head=head,
        padding_mask=_hf_padding_mask(config, layers),
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
    return ViTAdapter(
        forward=model,
        layers=[_timm_attention_layer(block) for block in model.blocks],
        patch_size=(patch, patch) if isinstance(patch, int) else tuple(patch),
        prefix_tokens=int(model.num_prefix_tokens),
        embed=embed,
        blocks=blocks,
        head=head,
        padding_mask=padding_mask if maskable else None,
        model=model,
        name=f"timm-{type(model).__name__}",
    )


register_adapter("timm-vit", _is_timm_vit, _build_timm)
register_adapter("hf-vit", _is_hf_vit, _build_hf)
