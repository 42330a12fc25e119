"""Published insertion/deletion protocols, reproduced with their reference code's choices.

- :func:`rise_insertion` / :func:`rise_deletion`: RISE (Petsiuk et al., BMVC 2018), as its
  ``evaluation.py`` (``CausalMetric``) computes them.
- :func:`gradmask_notebook_insertion` / :func:`gradmask_notebook_deletion`: the GradMask
  authors' notebook (``modify_image`` and ``sklearn.metrics.auc``).

By default (``ties="reference"``) the presets rank pixels as the reference code does, so they
give its numbers on any map, tie-heavy patch maps included; ``ties="random"`` with
``tie_samples=n`` gives the expected score under an arbitrary tie order instead (see
``docs/metrics.md``). The curve engine is :mod:`captum_gradmask.metrics.curves`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypedDict

from torch import Tensor

from captum_gradmask._utils import TargetType, check_keywords, unpack_inputs
from captum_gradmask.metrics._common import ChannelReduction
from captum_gradmask.metrics.curves import (
    PerturbationCurve,
    TiePolicy,
    deletion,
    insertion,
    perturbation_curve,
    step_counts,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "GRADMASK_NOTEBOOK_FRACTIONS",
    "PerturbationCurve",
    "PresetOptions",
    "deletion",
    "gradmask_notebook_deletion",
    "gradmask_notebook_insertion",
    "insertion",
    "perturbation_curve",
    "rise_deletion",
    "rise_insertion",
    "step_counts",
]

#: Fractions of the GradMask authors' notebook: 1 %, 5 %, 10 %, 20 %, ..., 100 %.
GRADMASK_NOTEBOOK_FRACTIONS: tuple[float, ...] = (0.01, 0.05, *(k / 10 for k in range(1, 11)))


class PresetOptions(TypedDict, total=False):
    """Keywords every preset takes (all optional); see :func:`perturbation_curve`.

    - ``ties``: ``"reference"`` (default: the reference code's order), ``"stable"`` or
      ``"random"`` (see :func:`rank_units`);
    - ``tie_samples``, ``seed``: random tie orders averaged with ``ties="random"``;
    - ``with_fixed_orders``: with ``ties="random"``, also the stable and reference orders'
      AUCs, in the same pass (:func:`~captum_gradmask.metrics.perturbation_curve`);
    - ``perturbations_per_eval``: perturbed images per forward call (default 64;
      ``batch_size`` is its deprecated name);
    - ``additional_forward_args``, ``channel_reduction``, ``show_progress``.
    """

    ties: TiePolicy
    tie_samples: int
    seed: int
    with_fixed_orders: bool
    perturbations_per_eval: int
    batch_size: int
    additional_forward_args: Any
    channel_reduction: ChannelReduction
    show_progress: bool


def _protocol_settings(protocol: str, mode: str, width: int) -> dict[str, Any]:
    if protocol == "rise":
        # One image row of pixels per step; RISE's blur (kernel 11, sigma 5) for insertion.
        return dict(
            step_size=width,
            auc_rule="rise",
            baseline="blur" if mode == "insertion" else "zeros",
            blur_kernel_size=11,
            blur_sigma=5.0,
        )
    # The notebook: int(f * H * W) pixels at the nominal percentages, x in percent; its
    # deletion curve starts with the point (0 %, 0).
    return dict(
        fractions=GRADMASK_NOTEBOOK_FRACTIONS,
        fraction_rounding="down",
        baseline="zeros",
        auc_rule="trapezoid_percent",
        prepend_zero_point=mode == "deletion",
    )


def _preset(
    protocol: str,
    mode: str,
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType,
    options: dict[str, Any],
) -> PerturbationCurve:
    # the protocol fixes the other keywords; perturbation_curve changes them
    check_keywords(f"{protocol}_{mode}", list(PresetOptions.__annotations__), options)
    images, _ = unpack_inputs(inputs)
    return perturbation_curve(
        forward_func,
        inputs,
        attributions,
        target,
        mode=mode,  # type: ignore[arg-type]
        level="pixel",
        protocol=f"{protocol}_{mode}",
        **_protocol_settings(protocol, mode, images.shape[-1]),
        **{"ties": "reference", **options},
    )


def rise_insertion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    **options: Unpack[PresetOptions],
) -> PerturbationCurve:
    """Insertion as in RISE (Petsiuk et al. 2018) and its ``CausalMetric``.

    Pixel ranking, one image row of pixels per step (224 pixels, 224 steps on 224x224),
    baseline = :func:`gaussian_blur` (kernel 11, sigma 5), softmax probability, AUC
    ``(sum(p) - p[0]/2 - p[-1]/2) / (n - 1)``. Ties as RISE orders them (``ties="reference"``:
    numpy's ascending argsort of the map, flipped), unless ``options`` say otherwise.

    Args:
        forward_func, inputs, attributions, target: as in :func:`perturbation_curve`.
        **options: :class:`PresetOptions` (``ties``, ``tie_samples``, ``seed``,
            ``perturbations_per_eval``, ``additional_forward_args``, ``channel_reduction``,
            ``show_progress``).

    Returns:
        A :class:`PerturbationCurve` (protocol ``"rise_insertion"``).

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import rise_insertion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        >>> curve = rise_insertion(model, torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16))
        >>> curve.probabilities.shape  # 16 pixels per step on 16x16: 16 steps + start
        torch.Size([1, 17])
    """
    return _preset("rise", "insertion", forward_func, inputs, attributions, target, options)


def rise_deletion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    **options: Unpack[PresetOptions],
) -> PerturbationCurve:
    """Deletion as in RISE: like :func:`rise_insertion` with a baseline of zeros.

    Args:
        forward_func, inputs, attributions, target: as in :func:`perturbation_curve`.
        **options: :class:`PresetOptions`.

    Returns:
        A :class:`PerturbationCurve` (protocol ``"rise_deletion"``).

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import rise_deletion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        >>> curve = rise_deletion(model, torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16))
        >>> float(curve.fractions[-1])
        1.0
    """
    return _preset("rise", "deletion", forward_func, inputs, attributions, target, options)


def gradmask_notebook_insertion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    **options: Unpack[PresetOptions],
) -> PerturbationCurve:
    """Insertion as in the GradMask authors' notebook.

    Pixel ranking of the map (patch grids upsampled nearest); points at 1, 5, 10, 20, ..., 100
    % of the pixels with ``k = int(f * H * W)`` (501 pixels at 1 % of 224x224); the top-k
    pixels are kept and the rest set to 0 in the model's (normalized) input space; softmax
    probability of the target; AUC by the trapezoid rule over the nominal percentages, so it
    lies in [0, 99] (the curve starts at 1 %); divide by 100 for a fraction-axis value. Ties
    as the notebook orders them (``ties="reference"``: the last k of numpy's ascending
    argsort), unless ``options`` say otherwise.

    Args:
        forward_func, inputs, attributions, target: as in :func:`perturbation_curve`.
        **options: :class:`PresetOptions`.

    Returns:
        A :class:`PerturbationCurve` (protocol ``"gradmask_notebook_insertion"``).

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import gradmask_notebook_insertion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        >>> images, saliency = torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16)
        >>> curve = gradmask_notebook_insertion(model, images, saliency)
        >>> [round(100 * f) for f in curve.fractions.tolist()][:3]
        [1, 5, 10]
    """
    return _preset(
        "gradmask_notebook", "insertion", forward_func, inputs, attributions, target, options
    )


def gradmask_notebook_deletion(
    forward_func: Callable[..., Any],
    inputs: Tensor | tuple[Tensor, ...],
    attributions: Tensor,
    target: TargetType = None,
    **options: Unpack[PresetOptions],
) -> PerturbationCurve:
    """Deletion as in the GradMask authors' notebook.

    As :func:`gradmask_notebook_insertion`, but the top-k % pixels are set to 0 and the point
    (0 %, p = 0) is prepended to the curve before the trapezoid (a quirk of the notebook that
    we reproduce: it lowers the AUC by ``p(1 %) / 2``). AUC in [0, 100], x in percent.

    Args:
        forward_func, inputs, attributions, target: as in :func:`perturbation_curve`.
        **options: :class:`PresetOptions`.

    Returns:
        A :class:`PerturbationCurve` (protocol ``"gradmask_notebook_deletion"``).

    Examples::

        >>> import torch
        >>> from captum_gradmask.metrics import gradmask_notebook_deletion
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 5))
        >>> images, saliency = torch.rand(1, 3, 16, 16), torch.rand(1, 16, 16)
        >>> curve = gradmask_notebook_deletion(model, images, saliency)
        >>> float(curve.fractions[0]), float(curve.probabilities[0, 0])
        (0.0, 0.0)
    """
    return _preset(
        "gradmask_notebook", "deletion", forward_func, inputs, attributions, target, options
    )
