"""Attribution methods by name, with the settings the benchmark uses.

``build_method(name, model)`` returns a :class:`ConfiguredMethod` whose
``attribute(inputs, target)`` gives attributions of the inputs' shape and whose
``attribute_grid(inputs, target)`` gives one map per image (the patch grid, or the pixel grid
for pixel-level methods); the benchmark runner and the CLI only go through here. Names are
lowercase words joined by hyphens; a former spelling (``inputxgradient``) still works for one
release, with a ``DeprecationWarning``. The
comparison methods of :mod:`captum_gradmask.methods` are imported when first built, so a
missing one raises :class:`MethodUnavailable` (an ``ImportError``) naming its module instead
of breaking the others.

Settings have one source: the implementations' own defaults (keyword defaults of a class's
``attribute_grid`` or of a Captum factory), read by :func:`method_settings`, plus the few
deliberate overrides registered here, each with its reason. The table in ``docs/methods.md``
is generated from this module (:func:`settings_table`) and a test keeps it equal. The overrides
bound each method's cost (at most about 500 forward passes per image) so that the benchmark's
default run fits about an hour on two CPU cores: RISE runs 500 masks instead of the paper's
4000.

Example::

    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.registry import build_method, method_names
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...     num_labels=5)).eval()
    >>> "gradmask-m4" in method_names()
    True
    >>> method = build_method("gradmask-m4", model)
    >>> method.attribute(torch.randn(1, 3, 32, 32), target=2).shape
    torch.Size([1, 3, 32, 32])
    >>> occlusion = build_method("occlusion", model, perturbations_per_eval=8)
    >>> occlusion.settings["perturbations_per_eval"]
    8
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from captum_gradmask._utils import TargetType
from captum_gradmask.adapters import ViTAdapter, get_adapter

__all__ = [
    "DEPRECATED_NAMES",
    "LOCATION_SETTINGS",
    "METHODS",
    "PERFORMANCE_SETTINGS",
    "AttributionMethod",
    "ConfiguredMethod",
    "MethodSpec",
    "MethodUnavailable",
    "build_method",
    "canonical_name",
    "method_label",
    "method_names",
    "method_settings",
    "settings_table",
]

#: Arguments of ``attribute_grid`` that are per call, not settings.
_CALL_ARGUMENTS = {"self", "inputs", "target", "additional_forward_args", "show_progress"}


class AttributionMethod(Protocol):
    """What the runner needs: ``attribute(inputs, target)`` -> attributions."""

    def attribute(self, inputs: Tensor, target: TargetType = None) -> Any: ...


class MethodUnavailable(ImportError):
    """The module implementing a registered method cannot be imported (not installed yet)."""


class ConfiguredMethod:
    """A registered method with its settings: the one type :func:`build_method` returns.

    Every registry method answers the same two calls with its fixed settings:

    - ``attribute(inputs, target, additional_forward_args)``: attributions of the inputs'
      shape (and tensor-or-tuple form), as Captum's metrics and visualisers take them;
    - ``attribute_grid(inputs, target, additional_forward_args)``: one ``(B, h, w)`` map per
      image. For patch-grid methods (GradMask, rollout, Chefer, ViT-ReciproCAM, DiffMask) it
      is the patch grid; for pixel-level methods (Captum's gradient and perturbation methods,
      Grad-CAM, RISE) it is the pixel grid ``(B, H, W)``, the attributions summed over the
      channels. :meth:`grid_size` says which ``(h, w)`` an image size gives.

    Args:
        name: the registry name.
        method: the implementation, with ``attribute``, ``attribute_grid`` and ``grid_size``.
        settings: the method's settings (shown in tables and records).
        call_settings: the keyword arguments passed on every call (default ``settings``;
            empty for Captum factories, which took their settings when built).
        context: optional ``context()`` returning a context manager every call runs inside
            (e.g. backward rules that change the gradients the method reads).
    """

    def __init__(
        self,
        name: str,
        method: Any,
        settings: dict[str, Any] | None = None,
        *,
        call_settings: dict[str, Any] | None = None,
        context: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.name = name
        self.method = method
        self.settings = dict(settings or {})
        self._call_settings = self.settings if call_settings is None else dict(call_settings)
        self._context = context or contextlib.nullcontext

    @property
    def adapter(self) -> ViTAdapter | None:
        """The model's adapter the method uses (``None`` for a method on a plain function)."""
        return getattr(self.method, "adapter", None)

    @property
    def pixel_level(self) -> bool:
        """Whether :meth:`attribute_grid` gives pixel maps rather than patch-grid maps."""
        return bool(self.method.pixel_level)

    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor | tuple[Tensor]:
        """Attributions of ``inputs`` for ``target`` with the fixed settings, in the inputs'
        shape and form."""
        with self._context():
            return self.method.attribute(
                inputs, target, additional_forward_args, **self._call_settings
            )

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """The ``(B, h, w)`` map of each image with the fixed settings: the patch grid, or
        the pixel grid (channels summed) for pixel-level methods."""
        with self._context():
            return self.method.attribute_grid(
                inputs, target, additional_forward_args, **self._call_settings
            )

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The ``(h, w)`` of :meth:`attribute_grid`'s maps for images of ``image_size``."""
        return self.method.grid_size(image_size)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"ConfiguredMethod({self.name!r}, {type(self.method).__name__}, {settings})"


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry name.
        module: the module that implements it (named in :class:`MethodUnavailable`).
        attribute: the class (with the GradMask contract ``Class(model, adapter)``) or the
            Captum factory (``factory(model, adapter, **settings)``) in ``module``.
        overrides: settings that differ from the implementation's defaults, on purpose.
        description: one line for tables and ``--help``.
        is_class: ``attribute`` is a class (settings go to each call) rather than a factory
            (settings go to the factory).
    """

    name: str
    module: str
    attribute: str
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    is_class: bool = True

    def implementation(self) -> Any:
        """The class or factory, imported on first use."""
        try:
            return getattr(importlib.import_module(self.module), self.attribute)
        except ImportError as error:
            raise MethodUnavailable(
                f"{self.attribute} cannot be imported from {self.module} ({error}); the method "
                "is not available in this installation"
            ) from error
        except AttributeError as error:
            raise MethodUnavailable(f"{self.module} has no {self.attribute}") from error

    @property
    def defaults(self) -> dict[str, Any]:
        """The implementation's own keyword defaults (the settings a call may change)."""
        target = self.implementation()
        function = target.attribute_grid if self.is_class else target
        return {
            name: parameter.default
            for name, parameter in inspect.signature(function).parameters.items()
            if name not in _CALL_ARGUMENTS
            and parameter.kind == parameter.KEYWORD_ONLY
            and parameter.default is not parameter.empty
        }

    @property
    def settings(self) -> dict[str, Any]:
        """The settings the registry uses: the defaults with the overrides applied."""
        return {**self.defaults, **self.overrides}


_GRADMASK = ("captum_gradmask.gradmask", "GradMaskAttribution")
_CAPTUM = "captum_gradmask.methods.captum_baselines"
_LIBRAGRAD = "captum_gradmask.methods.libragrad"
_SPECS = [
    MethodSpec(
        "gradmask-m1",
        *_GRADMASK,
        {"masks_per_layer": 1},
        "GradMask, 1 mask per Q/K/V per layer (3(L-1) masks)",
    ),
    MethodSpec(
        "gradmask-m4",
        *_GRADMASK,
        {},
        "GradMask, 4 masks per Q/K/V per layer (the authors' setting)",
    ),
    MethodSpec(
        "gradmask-mheads",
        *_GRADMASK,
        {"masks_per_layer": "heads"},
        "GradMask, one mask per attention head",
    ),
    MethodSpec(
        "gradmask-fast",
        *_GRADMASK,
        {"mode": "fast"},
        "GradMask m=4, masked patch tokens dropped instead of filled",
    ),
    MethodSpec(
        "gradmask-libragrad",
        *_GRADMASK,
        {"gradient_rules": "libragrad"},
        "GradMask m=4, Q/K/V gradients under LibraGrad's LayerNorm, activation and MLP rules",
    ),
    MethodSpec(
        "saliency", _CAPTUM, "saliency", {}, "absolute gradient (Captum Saliency)", is_class=False
    ),
    MethodSpec(
        "input-x-gradient",
        _CAPTUM,
        "input_x_gradient",
        {},
        "input x gradient (Captum)",
        is_class=False,
    ),
    MethodSpec(
        "integrated-gradients",
        _CAPTUM,
        "integrated_gradients",
        {},
        "Integrated Gradients, baseline 0",
        is_class=False,
    ),
    MethodSpec(
        "gradient-shap",
        _CAPTUM,
        "gradient_shap",
        {},
        "GradientSHAP, baselines zeros + blurred image",
        is_class=False,
    ),
    MethodSpec(
        "smoothgrad",
        _CAPTUM,
        "smoothgrad",
        {},
        "SmoothGrad over the absolute gradient, noise scaled to each image's range",
        is_class=False,
    ),
    MethodSpec(
        "occlusion",
        _CAPTUM,
        "occlusion",
        {},
        "Occlusion, patch-aligned windows, baseline 0",
        is_class=False,
    ),
    MethodSpec(
        "feature-ablation",
        _CAPTUM,
        "feature_ablation",
        {},
        "Feature ablation, one feature per patch, baseline 0",
        is_class=False,
    ),
    MethodSpec(
        "kernel-shap",
        _CAPTUM,
        "kernel_shap",
        {},
        "KernelSHAP, one feature per patch",
        is_class=False,
    ),
    MethodSpec(
        "layer-gradcam",
        "captum_gradmask.methods.gradcam",
        "layer_gradcam",
        {},
        "Grad-CAM on the adapter's cam_layer (last block's first LayerNorm)",
        is_class=False,
    ),
    MethodSpec(
        "rollout",
        "captum_gradmask.methods.rollout",
        "AttentionRollout",
        {},
        "Attention rollout (mean over heads)",
    ),
    MethodSpec(
        "chefer-gae",
        "captum_gradmask.methods.chefer",
        "CheferGAE",
        {},
        "Chefer et al. gradient-weighted attention relevance",
    ),
    MethodSpec(
        "vit-reciprocam",
        "captum_gradmask.methods.reciprocam",
        "ViTReciproCAM",
        {},
        "ViT-ReciproCAM as its authors' code (openvino-xai): last block, 3x3 Gaussian masks",
    ),
    MethodSpec(
        "vit-reciprocam-1x1",
        "captum_gradmask.methods.reciprocam",
        "ViTReciproCAM",
        # The paper's other kernel, kept to compare the two (the authors' `use_gaussian=False`).
        {"gaussian": False},
        "ViT-ReciproCAM as its authors' code, 1x1 masks (one patch per token set)",
    ),
    MethodSpec(
        "libragrad",
        _LIBRAGRAD,
        "LibraGrad",
        {},
        "LibraGrad, FullGrad+ at token level (every block input x gradient + bias maps)",
    ),
    MethodSpec(
        "libragrad-ixg",
        _LIBRAGRAD,
        "LibraGrad",
        {"readout": "input-x-gradient"},
        "LibraGrad, Input x Gradient at the embedded tokens",
    ),
    MethodSpec(
        "libragrad-ig",
        _LIBRAGRAD,
        "LibraGrad",
        {"readout": "integrated-gradients"},
        "LibraGrad, Integrated Gradients at the embedded tokens (50 steps, zero tokens)",
    ),
    MethodSpec(
        "libragrad-fullgrad",
        _LIBRAGRAD,
        "LibraGrad",
        {"readout": "fullgrad+"},
        "LibraGrad, FullGrad+ at token level (block inputs x gradients + bias maps)",
    ),
    MethodSpec(
        "attnlrp",
        "captum_gradmask.methods.attnlrp",
        "AttnLRP",
        # Chosen from the authors' grid on files 1-20 of the sample (benchmarks/attnlrp_gamma.py:
        # best insertion minus deletion), which the benchmark does not score.
        {"conv_gamma": 0.1, "linear_gamma": 0.1},
        "AttnLRP as lxt runs ViTs: identity rules on LayerNorm/GELU, CP-LRP attention, "
        "Gamma rules (conv 0.1, linear 0.1), target logit",
    ),
    MethodSpec(
        "rise",
        "captum_gradmask.methods.rise",
        "RISE",
        # The paper's 4000 masks cost 8x the benchmark's per-method budget.
        {"n_masks": 500},
        "RISE, random 7x7-grid masks (p = 0.5), seed 0",
    ),
    MethodSpec(
        "tis",
        "captum_gradmask.methods.tis",
        "TransformerInputSampling",
        # The authors' 1024 token sets each hold half the patch tokens, so their cost is close
        # to 512 full forward passes: within the benchmark's per-method budget as it is.
        {},
        "Transformer Input Sampling: 1024 k-means token sets of half the patches; "
        "1 + 1024 forwards of half length",
    ),
    MethodSpec(
        "diffmask",
        "captum_gradmask.methods.diffmask",
        "VisionDiffMask",
        {},
        "Vision DiffMask with a trained gate (gate=FOLDER)",
    ),
]

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}

#: Former spellings, accepted with a ``DeprecationWarning`` for one release.
DEPRECATED_NAMES: dict[str, str] = {"inputxgradient": "input-x-gradient"}


def method_names() -> list[str]:
    """All registered names, in the benchmark's column order."""
    return list(METHODS)


def canonical_name(name: str) -> str:
    """``name``, or the current name of a deprecated spelling (with a ``DeprecationWarning``).

    Raises:
        ValueError: an unknown name.

    Example::

        >>> import warnings
        >>> from captum_gradmask.registry import canonical_name
        >>> with warnings.catch_warnings(record=True):
        ...     warnings.simplefilter("always")
        ...     canonical_name("inputxgradient")
        'input-x-gradient'
    """
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        warnings.warn(
            f"method name {name!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3
        )
        return new
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods are: {', '.join(METHODS)}")
    return name


#: Settings that change speed or memory, never the maps: left out of labels, and a resumed
#: dataset run may change them (GradMask's ``compile`` changes the maps by float rounding
#: only, ~1e-6).
PERFORMANCE_SETTINGS = frozenset(
    {"perturbations_per_eval", "internal_batch_size", "show_progress", "compile"}
)

#: Settings that say where something is, not what it computes (DiffMask's ``gate`` folder;
#: the gate's weights are identified by ``gate_fingerprint``): left out of labels and of a
#: store's identity, so a store still resumes after its gate folder moves.
LOCATION_SETTINGS = frozenset({"gate"})


def method_label(name: str, settings: Mapping[str, Any]) -> str:
    """The method's name with the settings that differ from its registered ones (batching
    left out), for consoles, figures and tables.

    Example::

        >>> from captum_gradmask.registry import method_label
        >>> method_label("gradmask-m4", {"mode": "fast", "perturbations_per_eval": 64})
        'gradmask-m4 (mode=fast)'
        >>> method_label("gradmask-m4", {"masks_per_layer": 4})
        'gradmask-m4'
    """
    try:
        registered = METHODS[name].settings if name in METHODS else {}
    except MethodUnavailable:
        registered = {}
    missing = object()
    shown = [
        f"{key}={str(value).replace('torch.', '')}"
        for key, value in settings.items()
        if key not in PERFORMANCE_SETTINGS
        and key not in LOCATION_SETTINGS
        and key != "gate_fingerprint"
        and registered.get(key, missing) not in (value, "heads")
    ]
    return f"{name} ({', '.join(shown)})" if shown else name


def _spec(name: str) -> MethodSpec:
    return METHODS[canonical_name(name)]


def method_settings(name: str, **overrides: Any) -> dict[str, Any]:
    """The settings :func:`build_method` uses for ``name``, with ``overrides`` applied.

    Raises:
        ValueError: unknown ``name``, or an override that is not one of its settings.

    Example::

        >>> from captum_gradmask.registry import method_settings
        >>> method_settings("rise")["n_masks"], method_settings("rise", n_masks=8)["n_masks"]
        (500, 8)
    """
    name = canonical_name(name)
    settings = _spec(name).settings
    extra = {"gate", "gate_fingerprint"} if name == "diffmask" else set()
    unknown = sorted(set(overrides) - set(settings) - extra)
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} for method {name!r}; its settings are: "
            f"{', '.join(sorted(settings))}"
        )
    return {**settings, **overrides}


def build_method(
    name: str,
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    gradient_rules: str | None = None,
    **overrides: Any,
) -> ConfiguredMethod | Any:
    """Build the method registered as ``name`` for ``model`` with its settings.

    Args:
        name: a name from :func:`method_names`.
        model: a Hugging Face / timm ViT (or any callable with ``adapter``, which is then what
            is explained: see :func:`captum_gradmask.adapters.resolve_model`).
        adapter: the model's adapter; default :func:`captum_gradmask.adapters.get_adapter`.
        gradient_rules: ``"libragrad"`` runs a gradient method's every call under
            :func:`captum_gradmask.rules.libragrad` (the Captum gradient methods and
            ``chefer-gae``); for GradMask it is GradMask's own ``gradient_rules`` setting
            (LibraGrad's rules without the attention rule). ``None`` (default): plain
            gradients.
        **overrides: settings replacing the registered ones (``diffmask`` also takes
            ``gate=``, the trained gate or its folder).

    Returns:
        A :class:`ConfiguredMethod` (``attribute``, ``attribute_grid``, ``grid_size``), for
        every registered method.

    Raises:
        ValueError: unknown ``name`` or setting, or ``gradient_rules`` for a method that
            takes no gradient.
        MethodUnavailable: the implementing module cannot be imported, or ``diffmask`` has no
            gate.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.registry import build_method
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> ig = build_method("integrated-gradients", model, gradient_rules="libragrad", n_steps=4)
        >>> ig.attribute(torch.randn(1, 3, 32, 32), target=2).shape
        torch.Size([1, 3, 32, 32])
    """
    name = canonical_name(name)
    spec = _spec(name)
    if gradient_rules is not None and "gradient_rules" in spec.settings:
        overrides["gradient_rules"] = gradient_rules  # GradMask's own option
        gradient_rules = None
    if gradient_rules is not None and adapter is None:
        # one adapter for the method and the rules: where the adapter runs the model's attention
        # itself (taps), the rules hook the taps that the method's forward installs
        adapter = get_adapter(model)
    method = _build(spec, name, model, adapter, overrides)
    if gradient_rules is None:
        return method
    return _under_rules(name, method, model, adapter, gradient_rules)


#: Registered methods whose maps come from gradients of the model (LibraGrad's rules apply).
_GRADIENT_METHODS = {
    "saliency",
    "input-x-gradient",
    "integrated-gradients",
    "gradient-shap",
    "smoothgrad",
    "layer-gradcam",
    "chefer-gae",
}


def _under_rules(name: str, method: Any, model: Any, adapter: Any, gradient_rules: Any) -> Any:
    if gradient_rules != "libragrad":
        raise ValueError(f"`gradient_rules` must be None or 'libragrad', got {gradient_rules!r}")
    if name not in _GRADIENT_METHODS:
        raise ValueError(
            f"`gradient_rules` applies to gradient methods; {name!r} is not one (valid: "
            f"{', '.join(sorted(_GRADIENT_METHODS))}, and GradMask's own setting)"
        )
    from captum_gradmask.rules import libragrad, libragrad_rules

    libragrad_rules(model, adapter)  # refuse an unsupported model now, not at the first call
    return ConfiguredMethod(
        method.name,
        method.method,
        method.settings,
        call_settings=method._call_settings,
        context=lambda: libragrad(model, adapter),
    )


def _build(
    spec: MethodSpec, name: str, model: Any, adapter: ViTAdapter | None, overrides: dict
) -> Any:
    settings = method_settings(name, **overrides)
    implementation = spec.implementation()
    if not spec.is_class:
        method = implementation(model, adapter, **settings)
        return ConfiguredMethod(name, method, settings, call_settings={})
    if name == "diffmask":
        gate = _diffmask_gate(settings)
        method = implementation(model, gate, adapter=adapter)
        calls = {k: v for k, v in settings.items() if k not in ("gate", "gate_fingerprint")}
        return ConfiguredMethod(name, method, settings, call_settings=calls)
    method = implementation(model, adapter=adapter)
    if settings.get("masks_per_layer") == "heads":
        settings["masks_per_layer"] = method.adapter.layers[0].num_heads
    return ConfiguredMethod(name, method, settings)


def _diffmask_gate(settings: dict[str, Any]) -> Any:
    """Load DiffMask's ``gate`` and record it in ``settings``: ``gate`` becomes the folder's
    absolute path (``None`` for a gate object, which a store cannot reopen) and
    ``gate_fingerprint`` the digest of its weights, checked against a given one."""
    from captum_gradmask._utils import model_fingerprint
    from captum_gradmask.methods.diffmask import DiffMaskGate

    gate = settings.get("gate")
    if gate is None:
        raise MethodUnavailable(
            "diffmask needs a gate trained for this model: pass gate=<folder> (the benchmark "
            "runner: --diffmask-gate FOLDER)"
        )
    folder = None
    if not isinstance(gate, DiffMaskGate):
        folder = str(Path(gate).resolve())
        gate = DiffMaskGate.load(folder)
    fingerprint = model_fingerprint(gate)
    expected = settings.get("gate_fingerprint")
    if expected is not None and expected != fingerprint:
        raise ValueError(
            f"`gate_fingerprint` is {expected!r} but the gate {folder or '(object)'} has "
            f"{fingerprint!r}: it is not the gate the maps were made with"
        )
    settings.update(gate=folder, gate_fingerprint=fingerprint)
    return gate


def settings_table(names: Mapping[str, MethodSpec] | None = None) -> str:
    """A Markdown table of every registered method, its description and its settings.

    Generated from the implementations and the registry (docs/methods.md holds a copy that a
    test keeps equal).
    """
    specs = METHODS if names is None else names
    rows = [
        "| method | what | settings (registry) |",
        "|---|---|---|",
    ]
    for spec in specs.values():
        try:
            settings = spec.settings
        except MethodUnavailable:
            settings = {}
        shown = ", ".join(
            f"`{k}={v!r}`" + (" (override)" if k in spec.overrides else "")
            for k, v in settings.items()
        )
        rows.append(f"| `{spec.name}` | {spec.description} | {shown} |")
    return "\n".join(rows) + "\n"
