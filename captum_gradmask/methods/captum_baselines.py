"""Captum's attribution methods, configured for Vision Transformers.

Each factory here returns a :class:`CaptumBaseline`: a Captum attribution object together with
the settings an expert would pick for a ViT, behind one call
``method.attribute(inputs, target) -> attributions`` of the inputs' shape. The model-specific
parts (patch size, prefix tokens, Hugging Face output objects) come from the
:class:`~captum_gradmask.adapters.ViTAdapter`, so the same factories serve Hugging Face and timm
models.

The settings, and why:

========================  ===================================================================
method                    settings
========================  ===================================================================
``saliency``              Simonyan et al. 2014: ``|d logit / d x|`` per channel (Captum's
                          ``abs=True``). The evaluators sum channels, i.e. the L1 norm of the
                          pixel's gradient, which Captum's visualisers also use (Simonyan
                          take the max over channels; the two rank pixels almost alike).
``input-x-gradient``      ``x * d logit / d x`` in the model's (normalised) input space, signed.
``integrated-gradients``  Baseline 0 in normalised space (the dataset-mean / grey image, the
                          same "absent" value the perturbation metrics use), ``n_steps=50``
                          (Gauss-Legendre, Captum's default), ``internal_batch_size=25``.
``gradient-shap``         Baselines = {zeros, the image blurred by the RISE Gaussian (kernel 11,
                          sigma 5)}, drawn per sample, ``n_samples=20``, input noise
                          ``stdevs=0.1`` (5 % of the [-1, 1] range of mean=std=0.5 inputs).
                          Computed image by image so each image's blur is its own baseline.
``smoothgrad``            ``NoiseTunnel(Saliency(abs=True))``, ``nt_samples=25``, noise
                          ``sigma = 0.15 * (max - min)`` of the image (Smilkov et al. recommend
                          10-20 % of the range), ``nt_samples_batch_size=25``.
``occlusion``             One window per ViT patch: ``sliding_window_shapes = strides =
                          (C, patch, patch)``, baseline 0, so each patch is removed on its own
                          and the map is constant on every patch.
``feature-ablation``      The same removal expressed as a feature mask with one id per patch
                          (row-major), baseline 0.
``kernel-shap``           One feature per patch, baseline 0, ``n_samples=256`` coalitions
                          (cost-bounded; Kernel SHAP converges slowly with 196 features).
``layer-gradcam``         Grad-CAM on the output of the *first LayerNorm of the last encoder
                          block* (timm ``blocks[-1].norm1``, Hugging Face
                          ``layers[-1].layernorm_before``), the layer pytorch-grad-cam
                          recommends for ViTs: the block's output patch tokens get no gradient
                          (only CLS reaches the head) but the LayerNorm output feeds the keys
                          and values the CLS query attends to. Prefix tokens are dropped and
                          token ``k`` goes to grid cell ``(k // w, k % w)`` (see
                          :func:`tokens_to_grid`), ReLU, then bilinear upsampling to the input.
========================  ===================================================================

The perturbation methods send ``perturbations_per_eval=32`` masked images per forward pass.
All wrappers put the model in eval mode for the call and restore its state afterwards; the
device follows the inputs.

Example::

    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.methods.captum_baselines import occlusion
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=5))
    >>> method = occlusion(model.eval())
    >>> method.attribute(torch.randn(2, 3, 32, 32), target=[1, 4]).shape
    torch.Size([2, 3, 32, 32])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from captum._utils.models.linear_model import LinearModel
from captum.attr import (
    Attribution,
    FeatureAblation,
    GradientShap,
    InputXGradient,
    IntegratedGradients,
    KernelShap,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from torch import Tensor, nn

from captum_gradmask._ops import (
    gaussian_blur,
    grid_to_tokens,
    patch_feature_mask,
    reduce_channels,
    tokens_to_grid,
)
from captum_gradmask._utils import (
    TargetType,
    _as_args,
    check_positive_int,
    chunks,
    extract_logits,
    format_target,
    preserved_model_state,
    resolve_targets,
    select_args,
    unpack_inputs,
)
from captum_gradmask.adapters import ViTAdapter, resolve_model

__all__ = [
    "CaptumBaseline",
    "feature_ablation",
    "gradient_shap",
    "grid_to_tokens",
    "input_x_gradient",
    "integrated_gradients",
    "kernel_shap",
    "occlusion",
    "patch_feature_mask",
    "saliency",
    "smoothgrad",
    "tokens_to_grid",
]

PrepareFn = Callable[[Tensor, Tensor], dict[str, Any]]
PostprocessFn = Callable[[Tensor, Tensor], Tensor]


class CaptumBaseline:
    """A Captum attribution object with fixed settings: ``attribute(inputs, target)``.

    Args:
        name: a label (the registry name).
        attribution: the Captum object (its forward function returns logits).
        settings: keyword arguments passed to ``attribution.attribute`` on every call.
        model: the module whose mode is managed during the call (may be ``None``).
        prepare: optional ``prepare(images, targets) -> extra kwargs`` computed per call
            (input-dependent settings such as feature masks or noise levels).
        postprocess: optional ``postprocess(attributions, images) -> attributions`` bringing
            the result to the inputs' shape (Grad-CAM's upsampling).
        per_image: call Captum one image at a time (for per-image baselines).
        seed: with ``per_image``, each image's call starts from PyTorch's and NumPy's global
            generators seeded with it (Captum's sampling methods draw from them), which are
            restored afterwards: every image gets the same draws, so a map depends neither on
            the batch nor on what ran before. ``None``: the generators as they are.

    Example::

        >>> import torch
        >>> from captum.attr import Saliency
        >>> from captum_gradmask.methods.captum_baselines import CaptumBaseline
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
        >>> method = CaptumBaseline("saliency", Saliency(model), {"abs": True})
        >>> method.attribute(torch.rand(1, 3, 4, 4), target=1).shape
        torch.Size([1, 3, 4, 4])
    """

    def __init__(
        self,
        name: str,
        attribution: Attribution,
        settings: dict[str, Any] | None = None,
        *,
        model: nn.Module | None = None,
        prepare: PrepareFn | None = None,
        postprocess: PostprocessFn | None = None,
        per_image: bool = False,
        seed: int | None = None,
    ) -> None:
        if seed is not None and not per_image:
            raise ValueError("`seed` needs `per_image=True` (each image's call is seeded)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"`seed` must be an int or None, got {seed!r}")
        self.name = name
        self.attribution = attribution
        self.settings = dict(settings or {})
        self.model = model
        self.prepare = prepare
        self.postprocess = postprocess
        self.per_image = per_image
        self.seed = seed

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        method = type(self.attribution).__name__
        return f"{type(self).__name__}({self.name!r}, {method}, {settings})"

    #: The map of :meth:`attribute_grid` is on the input's pixel grid.
    pixel_level = True

    def attribute(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor | tuple[Tensor]:
        """Attributions of ``inputs`` (normalised images ``(B, C, H, W)``) for ``target``.

        Args:
            inputs: a tensor or a one-element tuple of one.
            target: an int, one class per image (list or 1-D tensor), or ``None`` for each
                image's predicted class.
            additional_forward_args: extra positional arguments of the model's forward
                (tensors whose first dimension is the batch belong to the images).

        Returns:
            Attributions with the inputs' shape and form (tensor or one-element tuple).
        """
        images, is_tuple = unpack_inputs(inputs)
        forward = self.attribution.forward_func
        checking = (
            forward.checking(target, images.shape[0])
            if isinstance(forward, _CheckedForward)
            else contextlib.nullcontext()
        )
        with preserved_model_state(self.model), checking, _kept_requires_grad(images):
            targets = self._targets(images, target, additional_forward_args)
            if self.per_image:
                count = images.shape[0]
                parts = []
                for one in chunks(count, 1):
                    with _seeded(self.seed, images.device):
                        parts.append(
                            self._attribute(
                                images[one],
                                targets[one],
                                select_args(additional_forward_args, one, count),
                            )
                        )
                result = torch.cat(parts)
            else:
                result = self._attribute(images, targets, _as_args(additional_forward_args))
        result = result.detach()
        return (result,) if is_tuple else result

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
    ) -> Tensor:
        """One ``(B, H, W)`` map per image: :meth:`attribute` summed over the channels (the
        "grid" of a pixel-level method is the input's pixel grid)."""
        attributions = self.attribute(inputs, target, additional_forward_args)
        attributions = attributions[0] if isinstance(attributions, tuple) else attributions
        return reduce_channels(attributions, "sum")[:, 0]

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The ``(H, W)`` of :meth:`attribute_grid`'s maps: the image size."""
        return (int(image_size[0]), int(image_size[1]))

    def _targets(self, images: Tensor, target: TargetType, args: Any) -> Tensor:
        if target is not None and isinstance(self.attribution.forward_func, _CheckedForward):
            # the class range is checked on the logits of Captum's own first pass
            return format_target(target, images.shape[0], None, images.device)
        # One forward pass finds the predicted classes (or checks the targets against the
        # number of classes of a forward function that does not check them itself).
        with torch.no_grad():
            logits = self.attribution.forward_func(images, *_as_args(args))
        return resolve_targets(target, logits)

    def _attribute(self, images: Tensor, targets: Tensor, args: tuple[Any, ...]) -> Tensor:
        settings = dict(self.settings)
        if self.prepare is not None:
            settings.update(self.prepare(images, targets))
        result = self.attribution.attribute(
            images, target=targets, additional_forward_args=args or None, **settings
        )
        if self.postprocess is not None:
            result = self.postprocess(result, images)
        return result


class _CheckedForward:
    """The explained model's 2-D logits (Hugging Face outputs unwrapped); during a
    :meth:`CaptumBaseline.attribute` call with explicit targets, the first logits are checked
    against them, so an out-of-range class is named (the argument, its value, the valid range)
    before Captum indexes the logits with it, without a forward pass of its own."""

    def __init__(self, forward: Callable[..., Any]) -> None:
        self.forward = forward
        self.pending: tuple[TargetType, int] | None = None  # a call's (target, batch size)

    def __call__(self, images: Tensor, *args: Any) -> Tensor:
        logits = extract_logits(self.forward(images, *args))
        if self.pending is not None:
            (target, batch_size), self.pending = self.pending, None
            format_target(target, batch_size, logits.shape[-1])
        return logits

    @contextlib.contextmanager
    def checking(self, target: TargetType, batch_size: int) -> Iterator[None]:
        """Check ``target`` (for ``batch_size`` images) on the next logits of the block."""
        self.pending = None if target is None else (target, batch_size)
        try:
            yield
        finally:
            self.pending = None


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """PyTorch's (CPU, and ``device``'s when CUDA) and NumPy's global generators seeded with
    ``seed`` for the block, then put back as they were."""
    if seed is None:
        yield
        return
    cuda = [device] if device.type == "cuda" else []
    numpy_state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for one in cuda:
            with torch.cuda.device(one):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _kept_requires_grad(images: Tensor) -> Iterator[None]:
    """Give ``images`` back their ``requires_grad`` flag, which Captum's gradient methods set
    and undo only when they return (a target error in the forward pass stops them before)."""
    flag = images.requires_grad
    try:
        yield
    finally:
        if images.is_leaf and images.requires_grad != flag:
            images.requires_grad_(flag)


def _setup(model: Any, adapter: ViTAdapter | None) -> tuple[ViTAdapter, Callable[..., Tensor], Any]:
    """The resolved adapter, a forward function returning 2-D logits that checks a call's
    targets (:class:`_CheckedForward`) and the module whose state is guarded."""
    resolved = resolve_model(model, adapter)
    return resolved.adapter, _CheckedForward(resolved.forward), resolved.module


def saliency(model: Any, adapter: ViTAdapter | None = None, *, abs: bool = True) -> CaptumBaseline:
    """Captum ``Saliency``: the gradient of the target logit, absolute by default.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods.captum_baselines import saliency
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> saliency(model).attribute(torch.randn(1, 3, 32, 32), target=0).min() >= 0
        tensor(True)
    """
    adapter, forward, module = _setup(model, adapter)
    return CaptumBaseline("saliency", Saliency(forward), {"abs": abs}, model=module)


def input_x_gradient(model: Any, adapter: ViTAdapter | None = None) -> CaptumBaseline:
    """Captum ``InputXGradient`` in the normalised input space (signed)."""
    adapter, forward, module = _setup(model, adapter)
    return CaptumBaseline("input-x-gradient", InputXGradient(forward), {}, model=module)


def integrated_gradients(
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    n_steps: int = 50,
    baseline: float = 0.0,
    internal_batch_size: int = 25,
) -> CaptumBaseline:
    """Captum ``IntegratedGradients`` from a constant baseline (0 = the normalisation mean).

    Args:
        n_steps: integration points (Gauss-Legendre).
        baseline: the baseline value in normalised space.
        internal_batch_size: interpolated images per forward/backward pass.
    """
    adapter, forward, module = _setup(model, adapter)
    settings = {
        "baselines": float(baseline),
        "n_steps": check_positive_int(n_steps, "n_steps"),
        "internal_batch_size": check_positive_int(internal_batch_size, "internal_batch_size"),
    }
    return CaptumBaseline(
        "integrated-gradients",
        IntegratedGradients(forward),
        settings,
        model=module,
    )


def gradient_shap(
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    n_samples: int = 20,
    stdevs: float = 0.1,
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    seed: int | None = 0,
) -> CaptumBaseline:
    """Captum ``GradientShap`` with baselines {zeros, the blurred image}.

    Args:
        n_samples: random (baseline, interpolation point) draws per image.
        stdevs: standard deviation of the Gaussian noise added to the inputs.
        blur_kernel_size, blur_sigma: the blur of the second baseline
            (:func:`captum_gradmask.metrics.gaussian_blur`).
        seed: each image's random draws start from it (the same draws for every image, so
            a map does not depend on the batch or on what ran before); ``None``: PyTorch's
            and NumPy's global generators as they are (Captum's behaviour).
    """
    adapter, forward, module = _setup(model, adapter)
    check_positive_int(blur_kernel_size, "blur_kernel_size")

    def baselines(images: Tensor, targets: Tensor) -> dict[str, Any]:
        blurred = gaussian_blur(images, blur_kernel_size, blur_sigma)
        return {"baselines": torch.cat([torch.zeros_like(images), blurred])}

    return CaptumBaseline(
        "gradient-shap",
        GradientShap(forward),
        {"n_samples": check_positive_int(n_samples, "n_samples"), "stdevs": float(stdevs)},
        model=module,
        prepare=baselines,
        per_image=True,
        seed=seed,
    )


def smoothgrad(
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    nt_samples: int = 25,
    noise_level: float = 0.15,
    nt_samples_batch_size: int = 25,
    seed: int | None = 0,
) -> CaptumBaseline:
    """SmoothGrad: Captum ``NoiseTunnel`` over ``Saliency(abs=True)``.

    Args:
        nt_samples: noisy copies per image.
        noise_level: noise standard deviation as a fraction of the image's value range.
        nt_samples_batch_size: noisy copies per forward/backward pass.
        seed: each image's random draws start from it (the same draws for every image, so
            a map does not depend on the batch or on what ran before); ``None``: PyTorch's
            and NumPy's global generators as they are (Captum's behaviour).
    """
    adapter, forward, module = _setup(model, adapter)
    if not noise_level > 0:
        raise ValueError(f"`noise_level` must be positive, got {noise_level!r}")

    def noise(images: Tensor, targets: Tensor) -> dict[str, Any]:
        value_range = float(images.max() - images.min())
        return {"stdevs": noise_level * (value_range if value_range > 0 else 1.0)}

    return CaptumBaseline(
        "smoothgrad",
        NoiseTunnel(Saliency(forward)),
        {
            "nt_type": "smoothgrad",
            "nt_samples": check_positive_int(nt_samples, "nt_samples"),
            "nt_samples_batch_size": check_positive_int(
                nt_samples_batch_size, "nt_samples_batch_size"
            ),
            "abs": True,
        },
        model=module,
        prepare=noise,
        # The noise level follows each image's own range.
        per_image=True,
        seed=seed,
    )


def occlusion(
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    baseline: float = 0.0,
    perturbations_per_eval: int = 32,
) -> CaptumBaseline:
    """Captum ``Occlusion`` with one window per ViT patch (window = stride = patch).

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods.captum_baselines import occlusion
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> occlusion(model).settings["sliding_window_shapes"]
        (3, 8, 8)
    """
    adapter, forward, module = _setup(model, adapter)
    ph, pw = adapter.patch_size
    window = (3, ph, pw)

    def windows(images: Tensor, targets: Tensor) -> dict[str, Any]:
        adapter.grid(tuple(images.shape[-2:]))
        patch_window = (images.shape[1], ph, pw)
        return {"sliding_window_shapes": patch_window, "strides": patch_window}

    return CaptumBaseline(
        "occlusion",
        Occlusion(forward),
        {
            "sliding_window_shapes": window,
            "strides": window,
            "baselines": float(baseline),
            "perturbations_per_eval": check_positive_int(
                perturbations_per_eval, "perturbations_per_eval"
            ),
        },
        model=module,
        prepare=windows,
    )


def _patch_mask_prepare(adapter: ViTAdapter) -> PrepareFn:
    def prepare(images: Tensor, targets: Tensor) -> dict[str, Any]:
        adapter.grid(tuple(images.shape[-2:]))
        mask = patch_feature_mask(tuple(images.shape[-2:]), adapter.patch_size, images.device)
        return {"feature_mask": mask}

    return prepare


def feature_ablation(
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    baseline: float = 0.0,
    perturbations_per_eval: int = 32,
) -> CaptumBaseline:
    """Captum ``FeatureAblation`` with one feature per patch (:func:`patch_feature_mask`)."""
    adapter, forward, module = _setup(model, adapter)
    return CaptumBaseline(
        "feature-ablation",
        FeatureAblation(forward),
        {
            "baselines": float(baseline),
            "perturbations_per_eval": check_positive_int(
                perturbations_per_eval, "perturbations_per_eval"
            ),
        },
        model=module,
        prepare=_patch_mask_prepare(adapter),
    )


def _weighted_least_squares(
    model: LinearModel, dataloader: Any, construct_kwargs: Any = None, **kwargs: Any
) -> dict[str, float]:
    """Captum ``train_fn``: weighted ordinary least squares with an intercept, in closed form.

    It is what Captum's default ``SkLearnLinearRegression`` fits (``LinearRegression`` with
    ``sample_weight``), without needing scikit-learn. Solved on the CPU in float64 with the
    SVD-based ``gelsd`` driver, so rank-deficient designs get the minimum-norm solution.
    """
    features, outputs, weights = [], [], []
    for batch in dataloader:
        x, y = batch[0], batch[1]
        w = batch[2] if len(batch) == 3 else torch.ones(x.shape[0])
        features.append(x.detach().double().cpu().reshape(x.shape[0], -1))
        outputs.append(y.detach().double().cpu().reshape(x.shape[0], -1))
        weights.append(w.detach().double().cpu().reshape(-1))
    x, y, w = torch.cat(features), torch.cat(outputs), torch.cat(weights)
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    root = w.clamp_min(0).sqrt()[:, None]
    solution = torch.linalg.lstsq(design * root, y * root, driver="gelsd").solution
    coefficients, intercept = solution[:-1].T, solution[-1]
    model._construct_model_params(
        norm_type=None,
        weight_values=coefficients.float().contiguous(),
        bias_value=intercept.float(),
    )
    return {}


def kernel_shap(
    model: Any,
    adapter: ViTAdapter | None = None,
    *,
    n_samples: int = 256,
    baseline: float = 0.0,
    perturbations_per_eval: int = 32,
    seed: int | None = 0,
) -> CaptumBaseline:
    """Captum ``KernelShap`` with one feature per patch, baseline 0.

    Args:
        n_samples: sampled coalitions per image (forward passes).
        baseline: value of an absent patch in normalised space.
        perturbations_per_eval: coalitions per forward pass.
        seed: each image's random draws start from it (the same draws for every image, so
            a map does not depend on the batch or on what ran before); ``None``: PyTorch's
            and NumPy's global generators as they are (Captum's behaviour).
    """
    adapter, forward, module = _setup(model, adapter)
    explainer = KernelShap(forward)
    # Captum's default surrogate needs scikit-learn; the same weighted least squares in torch.
    explainer.interpretable_model = LinearModel(train_fn=_weighted_least_squares)
    return CaptumBaseline(
        "kernel-shap",
        explainer,
        {
            "baselines": float(baseline),
            "n_samples": check_positive_int(n_samples, "n_samples"),
            "perturbations_per_eval": check_positive_int(
                perturbations_per_eval, "perturbations_per_eval"
            ),
        },
        model=module,
        prepare=_patch_mask_prepare(adapter),
        # Captum's KernelShap fits one surrogate per example; a batch is one image at a time.
        per_image=True,
        seed=seed,
    )
