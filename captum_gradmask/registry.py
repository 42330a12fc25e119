"""Attribution methods by name, with the settings the benchmark uses.

``build_method(name, model)`` returns an object whose ``attribute(inputs, target)`` gives
attributions of the inputs' shape; the benchmark runner and the CLI only go through here. The
comparison methods of :mod:`captum_gradmask.methods` are imported when first built, so a
missing one raises :class:`MethodUnavailable` (an ``ImportError``) naming its module instead
of breaking the others.

Defaults bound each method's cost (at most about 500 forward passes per image) so that the
benchmark's default run (every method and metric, 5 images of the shared ViT-Tiny) takes about
an hour on two CPU cores; ``docs/benchmarks.md`` lists the measured seconds per image.

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

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from captum_gradmask._utils import TargetType
from captum_gradmask.adapters import ViTAdapter

__all__ = [
    "METHODS",
    "AttributionMethod",
    "ConfiguredMethod",
    "MethodSpec",
    "MethodUnavailable",
    "build_method",
    "method_names",
]


class AttributionMethod(Protocol):
    """What the runner needs: ``attribute(inputs, target)`` -> attributions."""

    def attribute(self, inputs: Tensor, target: TargetType = None) -> Any: ...


class MethodUnavailable(ImportError):
    """The module implementing a registered method cannot be imported (not installed yet)."""


class ConfiguredMethod:
    """A Captum-style attribution object with fixed keyword settings.

    ``attribute(inputs, target)`` calls ``method.attribute(inputs, target=target, **settings)``.

    Args:
        name: the registry name.
        method: an object with ``attribute(inputs, target=..., **settings)``.
        settings: keyword arguments for every call.
    """

    def __init__(self, name: str, method: Any, settings: dict[str, Any] | None = None) -> None:
        self.name = name
        self.method = method
        self.settings = dict(settings or {})

    def attribute(self, inputs: Tensor, target: TargetType = None) -> Any:
        """Attributions of ``inputs`` for ``target`` with the fixed settings."""
        return self.method.attribute(inputs, target=target, **self.settings)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"ConfiguredMethod({self.name!r}, {type(self.method).__name__}, {settings})"


Factory = Callable[..., AttributionMethod]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: registry name.
        factory: ``factory(model, adapter, **settings) -> method``.
        settings: default settings (overridable in :func:`build_method`).
        description: one line for tables and ``--help``.
        module: the module that implements it (named in :class:`MethodUnavailable`).
    """

    name: str
    factory: Factory
    settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    module: str = ""


def _import(module: str, attribute: str) -> Any:
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError as error:
        raise MethodUnavailable(
            f"{attribute} cannot be imported from {module} ({error}); the method is not "
            "available in this installation"
        ) from error
    except AttributeError as error:
        raise MethodUnavailable(f"{module} has no {attribute}") from error


def _class_method(module: str, class_name: str, name: str) -> Factory:
    """Factory for a class with the GradMask contract: ``Class(model, adapter).attribute``."""

    def build(model: Any, adapter: ViTAdapter | None = None, **settings: Any) -> ConfiguredMethod:
        cls = _import(module, class_name)
        return ConfiguredMethod(name, cls(model, adapter=adapter), settings)

    return build


def _diffmask(
    model: Any, adapter: ViTAdapter | None = None, *, gate: Any = None, **settings: Any
) -> ConfiguredMethod:
    cls = _import("captum_gradmask.methods.diffmask", "VisionDiffMask")
    if gate is None:
        raise MethodUnavailable(
            "diffmask needs a gate trained for this model: pass gate=<folder> (the benchmark "
            "runner: --diffmask-gate FOLDER)"
        )
    return ConfiguredMethod("diffmask", cls(model, gate, adapter=adapter), settings)


def _gradmask(name: str) -> Factory:
    def build(model: Any, adapter: ViTAdapter | None = None, **settings: Any) -> ConfiguredMethod:
        from captum_gradmask.gradmask import GradMaskAttribution

        method = GradMaskAttribution(model, adapter=adapter)
        if settings.get("masks_per_layer") == "heads":
            settings["masks_per_layer"] = method.adapter.layers[0].num_heads
        return ConfiguredMethod(name, method, settings)

    return build


def _captum(function: str) -> Factory:
    def build(model: Any, adapter: ViTAdapter | None = None, **settings: Any) -> Any:
        factory = _import("captum_gradmask.methods.captum_baselines", function)
        return factory(model, adapter, **settings)

    return build


_GRADMASK = "captum_gradmask.gradmask"
_CAPTUM = "captum_gradmask.methods.captum_baselines"
_SPECS = [
    MethodSpec(
        "gradmask-m1",
        _gradmask("gradmask-m1"),
        {"masks_per_layer": 1, "perturbations_per_eval": 32},
        "GradMask, 1 mask per Q/K/V per layer (3(L-1) masks)",
        _GRADMASK,
    ),
    MethodSpec(
        "gradmask-m4",
        _gradmask("gradmask-m4"),
        {"masks_per_layer": 4, "perturbations_per_eval": 32},
        "GradMask, 4 masks per Q/K/V per layer (the authors' setting)",
        _GRADMASK,
    ),
    MethodSpec(
        "gradmask-mheads",
        _gradmask("gradmask-mheads"),
        {"masks_per_layer": "heads", "perturbations_per_eval": 32},
        "GradMask, one mask per attention head",
        _GRADMASK,
    ),
    MethodSpec(
        "gradmask-fast",
        _gradmask("gradmask-fast"),
        {"masks_per_layer": 4, "mode": "fast", "perturbations_per_eval": 32},
        "GradMask m=4, masked patch tokens dropped instead of filled",
        _GRADMASK,
    ),
    MethodSpec("saliency", _captum("saliency"), {}, "|gradient| (Captum Saliency)", _CAPTUM),
    MethodSpec(
        "inputxgradient", _captum("input_x_gradient"), {}, "input x gradient (Captum)", _CAPTUM
    ),
    MethodSpec(
        "integrated-gradients",
        _captum("integrated_gradients"),
        {"n_steps": 50, "internal_batch_size": 25},
        "Integrated Gradients, baseline 0, 50 steps",
        _CAPTUM,
    ),
    MethodSpec(
        "gradient-shap",
        _captum("gradient_shap"),
        {"n_samples": 20, "stdevs": 0.1},
        "GradientSHAP, baselines zeros + blurred image, 20 samples",
        _CAPTUM,
    ),
    MethodSpec(
        "smoothgrad",
        _captum("smoothgrad"),
        {"nt_samples": 25, "noise_level": 0.15},
        "SmoothGrad over |gradient|, 25 samples, sigma 15% of range",
        _CAPTUM,
    ),
    MethodSpec(
        "occlusion",
        _captum("occlusion"),
        {"perturbations_per_eval": 32},
        "Occlusion, patch-aligned windows, baseline 0",
        _CAPTUM,
    ),
    MethodSpec(
        "feature-ablation",
        _captum("feature_ablation"),
        {"perturbations_per_eval": 32},
        "Feature ablation, one feature per patch, baseline 0",
        _CAPTUM,
    ),
    MethodSpec(
        "kernel-shap",
        _captum("kernel_shap"),
        {"n_samples": 256, "perturbations_per_eval": 32},
        "KernelSHAP, one feature per patch, 256 coalitions",
        _CAPTUM,
    ),
    MethodSpec(
        "layer-gradcam",
        _captum("layer_gradcam"),
        {},
        "Grad-CAM on the last block's first LayerNorm (tokens -> grid)",
        _CAPTUM,
    ),
    MethodSpec(
        "rollout",
        _class_method("captum_gradmask.methods.rollout", "AttentionRollout", "rollout"),
        {},
        "Attention rollout (mean over heads)",
        "captum_gradmask.methods.rollout",
    ),
    MethodSpec(
        "chefer-gae",
        _class_method("captum_gradmask.methods.chefer", "CheferGAE", "chefer-gae"),
        {},
        "Chefer et al. gradient-weighted attention relevance",
        "captum_gradmask.methods.chefer",
    ),
    MethodSpec(
        "vit-reciprocam",
        _class_method("captum_gradmask.methods.reciprocam", "ViTReciproCAM", "vit-reciprocam"),
        {"perturbations_per_eval": 32},
        "ViT-ReciproCAM, last block, 1x1 masks",
        "captum_gradmask.methods.reciprocam",
    ),
    MethodSpec(
        "vit-reciprocam-3x3",
        _class_method("captum_gradmask.methods.reciprocam", "ViTReciproCAM", "vit-reciprocam-3x3"),
        {"gaussian": True, "perturbations_per_eval": 32},
        "ViT-ReciproCAM, last block, 3x3 Gaussian masks",
        "captum_gradmask.methods.reciprocam",
    ),
    MethodSpec(
        "rise",
        _class_method("captum_gradmask.methods.rise", "RISE", "rise"),
        {"n_masks": 500, "perturbations_per_eval": 32},
        "RISE, 500 random 7x7-grid masks (p = 0.5), seed 0",
        "captum_gradmask.methods.rise",
    ),
    MethodSpec(
        "diffmask",
        _diffmask,
        {"gate": None},
        "Vision DiffMask with the trained gate",
        "captum_gradmask.methods.diffmask",
    ),
]

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}


def method_names() -> list[str]:
    """All registered names, in the benchmark's column order."""
    return list(METHODS)


def build_method(
    name: str, model: Any, adapter: ViTAdapter | None = None, **overrides: Any
) -> AttributionMethod:
    """Build the method registered as ``name`` for ``model`` with its default settings.

    Args:
        name: a name from :func:`method_names`.
        model: a Hugging Face / timm ViT (or any model with ``adapter``).
        adapter: the model's adapter; default :func:`captum_gradmask.adapters.get_adapter`.
        **overrides: settings replacing the registered defaults.

    Returns:
        An object with ``attribute(inputs, target)`` returning attributions of the inputs'
        shape.

    Raises:
        ValueError: unknown ``name``.
        MethodUnavailable: the implementing module cannot be imported.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods are: {', '.join(METHODS)}")
    spec = METHODS[name]
    # Without an explicit adapter each method builds its own (some set their forward on it).
    return spec.factory(model, adapter, **{**spec.settings, **overrides})
