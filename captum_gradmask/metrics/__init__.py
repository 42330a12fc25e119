"""Evaluators for attribution maps: insertion/deletion, pointing game, ADCC and Captum recipes.

Every metric takes images ``(B, C, H, W)`` in the model's input space and attributions of any
shape that broadcasts to them (including ``(B, h, w)`` patch grids, upsampled nearest); the
device follows the inputs. See ``docs/metrics.md`` for the protocols.
"""

from captum_gradmask._ops import boxes_to_mask, gaussian_blur, resize_boxes
from captum_gradmask.metrics.adcc import ADCCResult, adcc, adcc_score, normalize_map, pearson
from captum_gradmask.metrics.captum_metrics import (
    InfidelityResult,
    SensitivityResult,
    patch_infidelity,
    patch_perturbation,
    sensitivity,
)
from captum_gradmask.metrics.curves import (
    PerturbationCurve,
    deletion,
    insertion,
    perturbation_curve,
    rank_units,
    step_counts,
)
from captum_gradmask.metrics.insertion_deletion import (
    GRADMASK_NOTEBOOK_FRACTIONS,
    PresetOptions,
    gradmask_notebook_deletion,
    gradmask_notebook_insertion,
    rise_deletion,
    rise_insertion,
)
from captum_gradmask.metrics.pointing_game import (
    TORCHRAY_TOLERANCE,
    MaxPointResult,
    PointingGameResult,
    max_point,
    pointing_game,
)

__all__ = [
    "GRADMASK_NOTEBOOK_FRACTIONS",
    "TORCHRAY_TOLERANCE",
    "ADCCResult",
    "InfidelityResult",
    "MaxPointResult",
    "PerturbationCurve",
    "PointingGameResult",
    "PresetOptions",
    "SensitivityResult",
    "adcc",
    "adcc_score",
    "boxes_to_mask",
    "deletion",
    "gaussian_blur",
    "gradmask_notebook_deletion",
    "gradmask_notebook_insertion",
    "insertion",
    "max_point",
    "normalize_map",
    "patch_infidelity",
    "patch_perturbation",
    "pearson",
    "perturbation_curve",
    "pointing_game",
    "rank_units",
    "resize_boxes",
    "rise_deletion",
    "rise_insertion",
    "sensitivity",
    "step_counts",
]
