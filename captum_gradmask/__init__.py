"""GradMask attributions for Vision Transformers, as a Captum method."""

from .adapters import (
    AttentionLayer,
    Projection,
    ResolvedModel,
    TokenInterface,
    ViTAdapter,
    get_adapter,
    register_adapter,
    resolve_model,
)
from .base import PatchAttribution
from .gradmask import GradMaskAttribution, GradMaskMasks

__version__ = "0.3.0"

__all__ = [
    "AttentionLayer",
    "GradMaskAttribution",
    "GradMaskMasks",
    "PatchAttribution",
    "Projection",
    "ResolvedModel",
    "TokenInterface",
    "ViTAdapter",
    "__version__",
    "get_adapter",
    "register_adapter",
    "resolve_model",
]
