"""GradMask attributions for Vision Transformers, as a Captum method."""

from .adapters import AttentionLayer, Projection, ViTAdapter, get_adapter, register_adapter
from .gradmask import GradMaskAttribution

__version__ = "0.1.0"

__all__ = [
    "AttentionLayer",
    "GradMaskAttribution",
    "Projection",
    "ViTAdapter",
    "get_adapter",
    "register_adapter",
]
