"""Comparison attribution methods for Vision Transformers, with GradMask's Captum-style API.

The patch-map methods subclass :class:`captum_gradmask.base.PatchAttribution`; Captum's own
methods, configured for ViTs, are in :mod:`.captum_baselines` and :mod:`.gradcam`.
"""

from .attnlrp import AttnLRP
from .chefer import CheferGAE
from .diffmask import DiffMaskGate, GateConfig, VisionDiffMask, VisionDiffMaskTrainer
from .libragrad import LibraGrad
from .reciprocam import ViTReciproCAM
from .rise import RISE, generate_masks
from .rollout import AttentionRollout
from .tis import TransformerInputSampling

__all__ = [
    "RISE",
    "AttentionRollout",
    "AttnLRP",
    "CheferGAE",
    "DiffMaskGate",
    "GateConfig",
    "LibraGrad",
    "TransformerInputSampling",
    "ViTReciproCAM",
    "VisionDiffMask",
    "VisionDiffMaskTrainer",
    "generate_masks",
]
