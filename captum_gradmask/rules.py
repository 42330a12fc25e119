"""Backward-pass rules: change how gradients flow through a model, never its forward values.

A :class:`BackwardRule` names modules and a *surrogate*: an expression of the module's input
and output whose gradient is the gradient the rule wants. While :func:`backward_rules` is
active, a forward hook on each module returns ``output.detach() + (surrogate -
surrogate.detach())``: the forward value is the module's own output (bit for bit), the backward
pass differentiates the surrogate. Hooks are removed when the block ends, errors included; no
parameter, buffer, mode or flag of the model is touched.

:func:`libragrad` applies the rules of LibraGrad (Mehri, Baghshah & Pilehvar, CVPR 2025) to a
Vision Transformer found through its adapter:

- **attention**: the query and key projections are detached, so the attention weights are
  constants of the backward pass and gradient reaches a block's input through the values only;
- **LayerNorm / RMSNorm**: the variance (RMS) in the denominator is a constant; mean-centring
  and the affine part keep their gradient; likewise the L2 norm of CLIP-like embeddings
  (:class:`L2Normalize`, as :class:`~captum_gradmask.zero_shot.ZeroShotClassifier` normalises
  image embeddings);
- **GELU / SiLU / QuickGELU**: written as ``x * gate(x)`` with the gate a constant (GELU's
  gate is ``Phi(x)``, exact erf or its tanh approximation; SiLU's is ``sigmoid(x)``);
- **gated MLPs** (SwiGLU, as in EVA-02): the gradient of the product of the two branches is
  halved (the product is of degree two in the block's input).

Residual connections, linear layers and LayerScale keep their gradient. Under these rules a
ViT is linear in its input and its additive parameters (biases, LayerNorm shifts, class token,
position embeddings), so Input x Gradient plus every additive parameter times its gradient
sums to the target logit (FullGrad completeness).

:func:`attnlrp_rules` gives AttnLRP's rules (Achtibat et al., ICML 2024) as the authors' ``lxt``
applies them to ViTs: the same identity rules on norms and activations, constant attention
probabilities (CP-LRP) and zennit's Gamma rule on Linear and Conv2d layers (:func:`gamma_rule`).

Example::

    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.rules import libragrad
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
    ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...     intermediate_size=64, num_labels=5)).eval()
    >>> images = torch.randn(1, 3, 32, 32, requires_grad=True)
    >>> plain = model(images).logits
    >>> with libragrad(model):
    ...     ruled = model(images).logits
    ...     gradient, = torch.autograd.grad(ruled[0, 2], images)
    >>> torch.equal(plain, ruled), gradient.shape
    (True, torch.Size([1, 3, 32, 32]))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import Tap, ViTAdapter, get_adapter

__all__ = [
    "BackwardRule",
    "L2Normalize",
    "RulesHandle",
    "UnsupportedModel",
    "activation_rule",
    "attnlrp_rules",
    "backward_rules",
    "constant_attention_rule",
    "detached_projections",
    "gamma_rule",
    "gated_mlp_rule",
    "libragrad",
    "libragrad_rules",
    "normalization_rule",
    "rules_scope",
    "swap_gradient",
]

#: ``surrogate(module, input, output) -> tensor`` with the output's shape whose gradient is the
#: rule's gradient.
Surrogate = Callable[[nn.Module, Tensor, Tensor], Tensor]


class UnsupportedModel(ValueError):
    """A model (or one of its modules) that a backward rule cannot be applied to."""


def swap_gradient(value: Tensor, surrogate: Tensor) -> Tensor:
    """``value`` in the forward pass, ``surrogate``'s gradient in the backward pass.

    Example::

        >>> import torch
        >>> x = torch.tensor([3.0], requires_grad=True)
        >>> y = swap_gradient(x**2, 2 * x)  # value 9, gradient 2 instead of 6
        >>> y.item(), torch.autograd.grad(y, x)[0].item()
        (9.0, 2.0)
    """
    return value.detach() + (surrogate - surrogate.detach())


@dataclass(frozen=True)
class BackwardRule:
    """One backward rule: the modules it applies to and its surrogate.

    Attributes:
        name: a label for messages (``"layer-norm"``, ``"attention"``, ...).
        modules: the modules whose output the rule replaces (in the forward pass by itself).
        surrogate: ``surrogate(module, input, output)``, a tensor of the output's shape whose
            gradient with respect to the module's input and parameters is the rule's.
        required: the rule must fire on each of its modules in every forward pass that fires
            any rule (checked by :meth:`RulesHandle.check`); attention rules set it, because a
            projection that does not run means the attention was computed elsewhere.
    """

    name: str
    modules: Sequence[nn.Module]
    surrogate: Surrogate
    required: bool = False


class RulesHandle:
    """What :func:`backward_rules` yields: which rule modules have run since the last check."""

    def __init__(self, rules: Sequence[BackwardRule]) -> None:
        self.rules = list(rules)
        self._fired: set[int] = set()

    def _record(self, module: nn.Module) -> None:
        self._fired.add(id(module))

    def check(self) -> None:
        """Raise when a forward pass ran some rules but skipped a required module.

        A required module that did not run (e.g. an attention whose projection module is
        bypassed by a functional call) would leave its rule silently unapplied.
        """
        if not self._fired:
            return
        for rule in self.rules:
            missing = [m for m in rule.modules if rule.required and id(m) not in self._fired]
            if missing:
                raise UnsupportedModel(
                    f"the {rule.name} rule did not apply: {len(missing)} of its modules (e.g. "
                    f"{type(missing[0]).__name__}) did not run in the forward pass, so this "
                    "model computes them another way (a functional call or a fused kernel) "
                    "and its gradients cannot be re-routed (a model whose adapter runs its "
                    "attention through taps must run inside the adapter's attention_context, "
                    "as libragrad(model) does)"
                )
        self._fired.clear()


@contextlib.contextmanager
def backward_rules(rules: Sequence[BackwardRule]) -> Iterator[RulesHandle]:
    """Apply ``rules`` while the block runs; every hook is removed afterwards, errors included.

    Yields a :class:`RulesHandle`; on a normal exit its :meth:`~RulesHandle.check` runs.
    """
    handle = RulesHandle(rules)
    hooks = []
    try:
        for rule in rules:
            for module in rule.modules:
                hooks.append(module.register_forward_hook(_hook(rule.surrogate, handle)))
        yield handle
        handle.check()
    finally:
        for hook in hooks:
            hook.remove()


def _hook(surrogate: Surrogate, handle: RulesHandle) -> Callable[..., Any]:
    def apply(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        handle._record(module)
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return None
        return swap_gradient(output, surrogate(module, args[0], output))

    return apply


# --- LibraGrad ---------------------------------------------------------------------------------


def libragrad(
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    attention: bool = True,
) -> contextlib.AbstractContextManager[RulesHandle]:
    """LibraGrad's backward rules on ``model`` while the block runs (see the module docstring).

    Args:
        model: a ViT the adapters support (see ``docs/models.md``, "Methods by family"), or
            any module with ``adapter``. Where the adapter runs the model's attention itself
            (timm EVA/BEiT, ``nn.MultiheadAttention``), the block installs that attention, so
            ``model(x)`` and ``adapter.forward`` inside it are both covered.
        adapter: where the model keeps its Q/K/V projections; by default
            :func:`~captum_gradmask.adapters.get_adapter`.
        attention: detach the query and key projections (the attention rule). ``False``
            keeps the attention's own gradient, so gradients of Q and K stay defined (what
            GradMask reads); the LayerNorm, activation and gated-MLP rules still apply.

    Raises:
        UnsupportedModel: a module the rules cannot cover (an activation applied as a plain
            function, an in-place activation, a gate that is not ``x * gate(x)``, a fused
            attention module with no query/key hook point), named in the message.

    Any Captum gradient method gets LibraGrad's gradients inside the block::

        >>> import torch
        >>> from captum.attr import InputXGradient
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.rules import libragrad
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> explainer = InputXGradient(lambda x: model(x).logits)
        >>> with libragrad(model):
        ...     attributions = explainer.attribute(torch.randn(2, 3, 32, 32), target=1)
        >>> attributions.shape
        torch.Size([2, 3, 32, 32])
    """
    adapter = get_adapter(model) if adapter is None else adapter
    return _tapped_rules(adapter, libragrad_rules(model, adapter, attention=attention))


@contextlib.contextmanager
def _tapped_rules(adapter: ViTAdapter, rules: Sequence[BackwardRule]) -> Iterator[RulesHandle]:
    """``backward_rules(rules)`` with the adapter's own attention installed (timm EVA/BEiT,
    ``nn.MultiheadAttention``), so that the model's forward runs through the taps the rules
    hook."""
    taps = adapter.attention_context() if adapter.attention_context else contextlib.nullcontext()
    with taps, backward_rules(rules) as handle:
        yield handle


def libragrad_rules(
    model: Any, adapter: ViTAdapter | None = None, *, attention: bool = True
) -> list[BackwardRule]:
    """The :class:`BackwardRule` list of :func:`libragrad` (checked, nothing applied yet)."""
    adapter = get_adapter(model) if adapter is None else adapter
    module = rules_scope(adapter, model)
    norms = [m for m in module.modules() if _norm_kind(m) is not None]
    activations = [m for m in module.modules() if _gate_kind(m) is not None]
    _check_activations(module, activations, len(adapter.layers))
    gated = [m for m in module.modules() if _is_gated_mlp(m)]
    rules = [normalization_rule(norms), activation_rule(activations), gated_mlp_rule(gated)]
    if attention:
        rules.append(_attention_rule(adapter, module))
    return [rule for rule in rules if rule.modules]


def rules_scope(adapter: ViTAdapter, model: Any = None) -> nn.Module:
    """The module whose submodules the rules cover: the adapter's ``forward_modules`` (an
    image-text model's image tower and classifier head, not its text tower), else its
    ``model``, else ``model``."""
    if adapter.forward_modules:
        # a container of references (no module is changed), named as in the adapter's model
        names = {}
        if isinstance(adapter.model, nn.Module):
            names = {id(m): n for n, m in adapter.model.named_modules()}
        return nn.ModuleDict(
            {
                names.get(id(m), f"module{i}").replace(".", "/") or "model": m
                for i, m in enumerate(adapter.forward_modules)
            }
        )
    module = adapter.model if adapter.model is not None else model
    if not isinstance(module, nn.Module):
        raise UnsupportedModel(
            "LibraGrad's rules find LayerNorms and activations among the model's modules: pass "
            f"the nn.Module (or an adapter whose `model` is set), got {type(module).__name__}"
        )
    return module


class L2Normalize(nn.Module):
    """``x / ||x||`` over the last dimension: the normalisation of CLIP-like embeddings as a
    module, so that LibraGrad's rule (the norm is a constant) can hook it.

    Example::

        >>> import torch
        >>> L2Normalize()(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """

    def forward(self, tensor: Tensor) -> Tensor:
        return tensor / tensor.norm(dim=-1, keepdim=True)


def normalization_rule(modules: Sequence[nn.Module]) -> BackwardRule:
    """LayerNorm / RMSNorm modules with their denominator (variance or mean square) a constant.

    Example::

        >>> import torch
        >>> norm = torch.nn.LayerNorm(4)
        >>> x = torch.randn(2, 4, requires_grad=True)
        >>> with backward_rules([normalization_rule([norm])]):
        ...     y = norm(x)
        >>> torch.equal(y, norm(x))  # the forward value is the module's own
        True
    """
    for module in modules:
        if _norm_kind(module) is None:
            raise UnsupportedModel(f"{type(module).__name__} is not a LayerNorm or RMSNorm")
    return BackwardRule("layer-norm", list(modules), _norm_surrogate)


def activation_rule(modules: Sequence[nn.Module]) -> BackwardRule:
    """Activation modules ``x * gate(x)`` (GELU, SiLU, QuickGELU) with the gate a constant."""
    for module in modules:
        if _gate_kind(module) is None:
            raise UnsupportedModel(
                f"{type(module).__name__} is not an activation of the form x * gate(x) "
                "(GELU, SiLU, QuickGELU)"
            )
    return BackwardRule("activation", list(modules), _gate_surrogate)


def gated_mlp_rule(modules: Sequence[nn.Module]) -> BackwardRule:
    """Gated MLPs (timm ``SwiGLU``, ``GluMlp``): the branches' product has its gradient halved.

    The product is hooked where it leaves the MLP's first dropout (``drop1``), before any norm
    and the output projection.
    """
    for module in modules:
        _is_gated_mlp(module)
    return BackwardRule("gated-mlp", [module.drop1 for module in modules], _half_surrogate)


# Normalisation: the denominator is a constant.


def _norm_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if isinstance(module, L2Normalize):
        return "l2"
    if isinstance(module, getattr(nn, "RMSNorm", ())) or type(module).__name__ in _RMS_NORMS:
        return "rms"
    return None


_RMS_NORMS = {"RmsNorm", "RMSNorm", "LlamaRMSNorm"}


def _norm_surrogate(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    if _norm_kind(module) == "l2":
        return x / x.norm(dim=-1, keepdim=True).detach()
    shape = module.normalized_shape
    dims = tuple(range(-len(shape if isinstance(shape, (tuple, list)) else (shape,)), 0))
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    if _norm_kind(module) == "layer":
        centred = x - x.mean(dims, keepdim=True)
        scale = centred.pow(2).mean(dims, keepdim=True)
    else:
        centred = x
        scale = x.pow(2).mean(dims, keepdim=True)
    normalised = centred / torch.sqrt(scale.detach() + eps)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if weight is not None:
        normalised = normalised * weight
    if bias is not None:
        normalised = normalised + bias
    return normalised


# Activations of the form x * gate(x): the gate is a constant.

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf_gate(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _tanh_gate(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x.pow(3))))


_GATES: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": _erf_gate,
    "gelu-tanh": _tanh_gate,
    "quick-gelu": lambda x: torch.sigmoid(1.702 * x),
    "silu": torch.sigmoid,
}
# Activation classes of transformers and timm by name (neither library is imported here).
_NAMED_GATES = {
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "NewGELUActivation": "gelu-tanh",
    "FastGELUActivation": "gelu-tanh",
    "GELUTanh": "gelu-tanh",
    "PytorchGELUTanh": "gelu-tanh",
    "QuickGELUActivation": "quick-gelu",
    "QuickGELU": "quick-gelu",
    "SiLUActivation": "silu",
    "Swish": "silu",
}


def _gate_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else "gelu-tanh"
    if isinstance(module, nn.SiLU):
        return "silu"
    library = type(module).__module__.split(".")[0]
    if library in ("timm", "transformers"):
        return _NAMED_GATES.get(type(module).__name__)
    return None


def _gate_surrogate(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    gate = _GATES[_gate_kind(module)]  # type: ignore[index]
    return x * gate(x).detach()


# Activations LibraGrad has no rule for (not x * gate(x)); ReLU is one already (gate 1[x > 0]).
_REFUSED_ACTIVATIONS = (
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GLU,
)
_REFUSED_NAMES = {"Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Mish", "HardMish", "PReLU"}
_ACTIVATION_ATTRIBUTES = ("act", "act_fn", "activation", "activation_fn", "intermediate_act_fn")


def _check_activations(module: nn.Module, activations: list[nn.Module], blocks: int) -> None:
    for name, child in module.named_modules():
        # A recognised activation module may keep its implementation as a function attribute.
        for attribute in () if _gate_kind(child) else _ACTIVATION_ATTRIBUTES:
            value = child.__dict__.get(attribute)
            if callable(value) and not isinstance(value, nn.Module):
                raise UnsupportedModel(
                    f"`{name}.{attribute}` is a plain function ({getattr(value, '__name__', value)}"
                    "), not a module: LibraGrad's activation rule hooks activation modules "
                    "(nn.GELU, nn.SiLU, transformers' GELUActivation, ...); build the model "
                    "with an activation module"
                )
        library = type(child).__module__.split(".")[0]
        if isinstance(child, _REFUSED_ACTIVATIONS) or (
            library in ("timm", "transformers") and type(child).__name__ in _REFUSED_NAMES
        ):
            raise UnsupportedModel(
                f"`{name}` is a {type(child).__name__} activation, which is not x * gate(x): "
                "LibraGrad's rules cover GELU, SiLU and QuickGELU (ReLU needs none)"
            )
        if getattr(child, "inplace", False) and child in activations:
            raise UnsupportedModel(
                f"`{name}` ({type(child).__name__}) works in place, so its input is lost before "
                "the rule can read it; build the model with inplace=False"
            )
    relus = sum(isinstance(m, nn.ReLU) for m in module.modules())
    if len(activations) + relus < blocks:
        raise UnsupportedModel(
            f"found {len(activations)} activation modules for {blocks} blocks: some MLP applies "
            "its activation as a plain function, which LibraGrad's activation rule cannot hook "
            "(supported: nn.GELU, nn.SiLU and the GELU/SiLU/QuickGELU modules of timm and "
            "transformers)"
        )


# Gated MLPs: the product of the two branches has its gradient halved.


def _is_gated_mlp(module: nn.Module) -> bool:
    name = type(module).__name__
    if "glu" not in name.lower() or isinstance(module, nn.GLU):
        return False
    supported = name in ("SwiGLU", "GluMlp") and type(module).__module__.startswith("timm.")
    if not supported:
        raise UnsupportedModel(
            f"gated MLP {name} is not supported by LibraGrad's gated-MLP rule: supported are "
            "timm's SwiGLU and GluMlp (an activation module times a linear branch)"
        )
    if _gate_kind(module.act) is None:
        raise UnsupportedModel(
            f"{name} gates with {type(module.act).__name__}, which is not x * gate(x): "
            "LibraGrad's rules cover SiLU, GELU and QuickGELU gates"
        )
    return True


def _half_surrogate(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
    # The hooked module is the gated MLP's first dropout: its output is the branches' product.
    return 0.5 * output


# Attention: queries and keys are constants.


def detached_projections(
    adapter: ViTAdapter, module: nn.Module
) -> dict[int, tuple[nn.Module, int, frozenset[int]]]:
    """The attention rule's modules: ``id(module) -> (module, chunks, detached chunk indices)``.

    The query and key projections of every layer the adapter names, and those of timm's
    attention-pooling head (``AttentionPoolLatent``: ``q`` and the first half of ``kv``).

    Raises:
        UnsupportedModel: an ``nn.MultiheadAttention`` (fused projections, no hook point) or
            an attention-like module the adapter does not name; an attention module that the
            adapter runs as its own equivalent with taps (``AttentionLayer.attention``) is
            covered through its taps.
    """
    tapped = {id(layer.attention) for layer in adapter.layers if layer.attention is not None}
    fused = [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.MultiheadAttention) and id(m) not in tapped
    ]
    if fused:
        raise UnsupportedModel(
            f"`{fused[0]}` is an nn.MultiheadAttention: its query and key projections run "
            "inside one fused call with no hook point, so LibraGrad's attention rule cannot "
            "detach them"
        )
    projections: list[Any] = [p for layer in adapter.layers for p in (layer.query, layer.key)]
    for name, child in module.named_modules():
        if isinstance(getattr(child, "gate", None), nn.Module) and hasattr(child, "qkv"):
            raise UnsupportedModel(
                f"`{name}` ({type(child).__name__}) multiplies its output by a sigmoid gate of "
                "its input, which LibraGrad's rules do not cover"
            )
        if type(child).__name__ == "AttentionPoolLatent":  # timm's attention-pooling head
            projections += [_Chunk(child.q, 0, 1), _Chunk(child.kv, 0, 2)]
        elif id(child) not in tapped and _is_unknown_attention(child, adapter):
            raise UnsupportedModel(
                f"`{name}` ({type(child).__name__}) looks like an attention module the adapter "
                "does not name; LibraGrad's attention rule would miss it"
            )
    detached: dict[int, tuple[nn.Module, int, set[int]]] = {}
    for projection in projections:
        entry = detached.setdefault(
            id(projection.module), (projection.module, projection.chunks, set())
        )
        if entry[1] != projection.chunks:
            raise UnsupportedModel(
                f"{type(projection.module).__name__} is split into {entry[1]} and "
                f"{projection.chunks} chunks by different projections"
            )
        entry[2].add(projection.index)
    return {key: (m, chunks, frozenset(indices)) for key, (m, chunks, indices) in detached.items()}


def _attention_rule(adapter: ViTAdapter, module: nn.Module) -> BackwardRule:
    detached = detached_projections(adapter, module)

    def keep_values(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
        _, chunks, indices = detached[id(module)]
        if chunks == 1:
            return output.detach()
        parts = list(output.chunk(chunks, dim=-1))
        return torch.cat([p.detach() if i in indices else p for i, p in enumerate(parts)], -1)

    return BackwardRule(
        "attention", [m for m, _, _ in detached.values()], keep_values, required=True
    )


@dataclass(frozen=True)
class _Chunk:
    module: nn.Module
    index: int
    chunks: int


def _is_unknown_attention(module: nn.Module, adapter: ViTAdapter) -> bool:
    """An attention-like module (it owns a fused ``qkv`` or separate ``q_proj``/``query``
    projections) whose projections the adapter does not name."""
    known = {id(p.module) for layer in adapter.layers for p in (layer.query, layer.key)}
    for attribute in ("qkv", "q_proj", "query"):
        child = getattr(module, attribute, None)
        if isinstance(child, nn.Module) and id(child) not in known:
            return True
    return False


# --- AttnLRP ------------------------------------------------------------------------------------


def attnlrp_rules(
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    conv_gamma: float = 0.25,
    linear_gamma: float = 0.05,
) -> list[BackwardRule]:
    """AttnLRP's rules (Achtibat et al., ICML 2024) as ``lxt`` applies them to ViTs.

    Under these rules the gradient times the input is the LRP relevance:

    - **LayerNorm / RMSNorm** and **GELU / SiLU**: AttnLRP's identity rule, the same gradient
      as LibraGrad's (:func:`normalization_rule`, :func:`activation_rule`);
    - **gated MLPs**: the uniform rule, the product's gradient halved (:func:`gated_mlp_rule`);
    - **attention**: CP-LRP, the attention probabilities are constants
      (:func:`constant_attention_rule`), as ``lxt`` does for torchvision ViTs;
    - **Linear** and **Conv2d** layers: zennit's generalised Gamma rule (:func:`gamma_rule`),
      ``linear_gamma`` and ``conv_gamma``; ``0`` gives LRP-0 (the plain gradient).

    Rules are listed in the order their hooks must run: the Gamma rule before the attention
    rule, so a query or key projection is still detached.

    Raises:
        UnsupportedModel: a module the rules cannot cover, named in the message.
    """
    adapter = get_adapter(model) if adapter is None else adapter
    module = adapter.model if adapter.model is not None else model
    if not isinstance(module, nn.Module):
        raise UnsupportedModel(
            "AttnLRP's rules find layers among the model's modules: pass the nn.Module (or an "
            f"adapter whose `model` is set), got {type(module).__name__}"
        )
    module = rules_scope(adapter, module)  # an image-text model's text tower never runs
    try:
        rules = libragrad_rules(module, adapter, attention=False)
    except UnsupportedModel as error:
        raise UnsupportedModel(f"AttnLRP (same rules as LibraGrad here): {error}") from None
    # Gamma goes where zennit's module hooks reach: the Linear and Conv2d modules the model
    # calls. nn.MultiheadAttention applies its output projection as a function, so it keeps
    # its gradient (as under lxt), even where the adapter's equivalent attention calls it.
    skipped = {id(m) for m in _adapter_taps(adapter)}
    skipped |= {id(m.out_proj) for m in module.modules() if isinstance(m, nn.MultiheadAttention)}
    convolutions = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) and id(m) not in skipped]
    gammas = [gamma_rule(convolutions, conv_gamma, "conv_gamma")]
    gammas.append(gamma_rule(linears, linear_gamma, "linear_gamma"))
    rules = [rule for rule in gammas if rule.modules] + rules
    rules.append(constant_attention_rule(adapter, module))
    return rules


def _adapter_taps(adapter: ViTAdapter) -> list[nn.Module]:
    modules = []
    for layer in adapter.layers:
        for projection in (layer.query, layer.key, layer.value):
            modules.append(projection.module)
        modules += [m for m in (layer.output, layer.probabilities) if m is not None]
    return [m for m in modules if isinstance(m, Tap)]


def constant_attention_rule(adapter: ViTAdapter, module: nn.Module) -> BackwardRule:
    """The attention probabilities are constants of the backward pass (CP-LRP).

    Where the adapter taps the probabilities (models whose attention it runs step by step),
    the tap's output is detached; elsewhere the query and key projections are
    (:func:`detached_projections`), which leaves the same gradient: through the values only.
    """
    probabilities = [layer.probabilities for layer in adapter.layers]
    if probabilities and all(p is not None for p in probabilities):
        return BackwardRule(
            "attention", probabilities, lambda m, x, output: output.detach(), required=True
        )
    return _attention_rule(adapter, module)


def gamma_rule(modules: Sequence[nn.Module], gamma: float, name: str = "gamma") -> BackwardRule:
    """zennit's generalised LRP Gamma rule on ``nn.Linear`` / ``nn.Conv2d`` modules, in
    gradient form (the relevance is the input times the gradient).

    For an output ``y_j > 0`` the relevance ``R_j = y_j g_j`` (``g`` the output's gradient) is
    shared among the inputs in proportion to ``x_i^+ (w_ji + gamma w_ji^+) + x_i^- (w_ji +
    gamma w_ji^-)`` (positive contributions amplified), normalised by their sum ``z_j`` (the
    bias enters as ``b_j + gamma b_j^+``); for ``y_j < 0`` the signs swap; ``y_j = 0`` passes
    nothing. The input's gradient is that relevance divided by the input. ``gamma = 0`` is
    LRP-0: the module's own gradient but for zennit's stabiliser (``z`` moved ``1e-6`` away
    from zero in the denominators), kept so the rule equals zennit's at every gamma.

    Example::

        >>> import torch
        >>> layer = torch.nn.Linear(3, 2, bias=False)
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> with backward_rules([gamma_rule([layer], 0.5)]):
        ...     y = layer(x)
        ...     gradient, = torch.autograd.grad(y.sum(), x)
        >>> torch.allclose((x * gradient).sum(), y.sum(), atol=1e-5)  # conservation
        True
    """
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not gamma >= 0:
        raise ValueError(f"`{name}` must be a number >= 0, got {gamma!r}")
    for module in modules:
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise UnsupportedModel(
                f"the Gamma rule covers nn.Linear and nn.Conv2d, got {type(module).__name__}"
            )
    return BackwardRule(f"gamma ({name}={gamma})", list(modules), _gamma_surrogate(float(gamma)))


def _gamma_surrogate(gamma: float) -> Surrogate:
    def surrogate(module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
        weight, bias = module.weight.detach(), module.bias
        bias = None if bias is None else bias.detach()
        amplify_positive = weight + gamma * weight.clamp(min=0)
        amplify_negative = weight + gamma * weight.clamp(max=0)
        positive = x * (x > 0)  # the mask, not clamp: an input of exactly 0 passes nothing
        negative = x * (x < 0)

        def shifted(b: Tensor | None, sign: float) -> Tensor | None:
            return (
                None if b is None else b + gamma * (b.clamp(min=0) if sign > 0 else b.clamp(max=0))
            )

        # Outputs > 0: positive contributions (x+ w+ and x- w-) amplified; outputs < 0: negative.
        up = _layer(module, positive, amplify_positive, shifted(bias, 1.0)) + _layer(
            module, negative, amplify_negative, None
        )
        down = _layer(module, positive, amplify_negative, shifted(bias, -1.0)) + _layer(
            module, negative, amplify_positive, None
        )
        y = output.detach()
        up_scale = torch.where(y > 0, y / _stabilised(up.detach()), 0.0)
        down_scale = torch.where(y < 0, y / _stabilised(down.detach()), 0.0)
        # The forward value does not matter (it is swapped for the output); the gradient does.
        return up_scale * (up - up.detach()) + down_scale * (down - down.detach())

    return surrogate


def _layer(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(module, nn.Linear):
        return torch.nn.functional.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)  # type: ignore[operator]


def _stabilised(z: Tensor, epsilon: float = 1e-6) -> Tensor:
    """zennit's stabiliser: ``z`` moved ``epsilon`` away from zero, in its own direction."""
    return z + ((z == 0).to(z) + z.sign()) * epsilon
