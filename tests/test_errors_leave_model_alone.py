"""An error in the middle of any method or metric leaves the user's model as it was.

A tripwire on the classifier raises at a chosen moment: the first forward (GradMask's gradient
pass), the backward through the classifier's output (the gradient itself), or the last forward
(GradMask's masked passes, exact or fast; a comparison method's or metric's last batch). After
the error every module has the hooks, the train/eval flag it had, every parameter its
``requires_grad``, its ``.grad`` (``None``) and its values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from captum_gradmask import GradMaskAttribution, get_adapter
from captum_gradmask.metrics import adcc, deletion, insertion, patch_infidelity, sensitivity
from captum_gradmask.registry import method_names

from .models import tiny_hf_vit
from .test_one_way_in import _build

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


class Boom(RuntimeError):
    """The injected error."""


def model_state(model: nn.Module) -> dict[str, Any]:
    """What a method or metric could leave behind on a model, in comparable form."""
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    return {
        "hooks": {
            name: {kind: len(getattr(m, kind)) for kind in HOOK_DICTS}
            for name, m in modules.items()
        },
        "global hooks": {kind: len(getattr(torch_module, kind)) for kind in GLOBAL_HOOK_DICTS},
        "tensor hooks": {name: len(p._backward_hooks or {}) for name, p in parameters.items()},
        "training": {name: m.training for name, m in modules.items()},
        "requires_grad": {name: p.requires_grad for name, p in parameters.items()},
        "grad": {name: p.grad is None for name, p in parameters.items()},
        "values": {name: p.detach().clone() for name, p in parameters.items()},
    }


def assert_same_state(model: nn.Module, before: dict[str, Any], when: str = "") -> None:
    after = model_state(model)
    for key in ("hooks", "global hooks", "tensor hooks", "training", "requires_grad", "grad"):
        assert after[key] == before[key], f"{key} changed {when}"
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), f"{name} changed {when}"


class Tripwire:
    """A forward hook on ``module`` that raises :class:`Boom` when told to.

    It counts forwards and backwards through the module's output (a tensor hook on it), so a
    dry run says how many there are; then ``fail_forward_at`` or ``fail_backward`` arms it.
    """

    def __init__(self, module: nn.Module) -> None:
        self.forwards = self.backwards = 0
        self.fail_forward_at: int | None = None
        self.fail_backward = False
        self.handle = module.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.forwards += 1
        if self.forwards == self.fail_forward_at:
            raise Boom(f"forward {self.forwards}")
        if output.requires_grad:
            output.register_hook(self._backward)

    def _backward(self, grad: Tensor) -> None:
        self.backwards += 1
        if self.fail_backward:
            raise Boom("backward")

    def reset(self) -> None:
        self.forwards = self.backwards = 0


def a_users_model() -> nn.Module:
    """A model as a user may hand it over: in train mode, part of it frozen."""
    model = tiny_hf_vit().train()
    model.vit.embeddings.requires_grad_(False)
    model.vit.layers[0].eval()
    return model


def run_with_failures(model: nn.Module, run: Callable[[], Any]) -> list[str]:
    """Dry-run ``run``, then run it once with the classifier's tripwire armed at each moment.

    The moments are the first forward, the backward through the output (when there is one)
    and the last forward (when it is not the first); returns those tried. After the dry run
    and after each error the model's state must equal its state before.
    """
    wire = Tripwire(model.classifier)
    try:
        before = model_state(model)  # the tripwire's own hook is part of the state
        run()
        assert_same_state(model, before, "after a success")
        moments = {"first forward": (1, False)}
        if wire.backwards:
            moments["backward"] = (None, True)
        if wire.forwards > 1:
            moments["last forward"] = (wire.forwards, False)
        for moment, (fail_forward_at, fail_backward) in moments.items():
            wire.reset()
            wire.fail_forward_at, wire.fail_backward = fail_forward_at, fail_backward
            with pytest.raises(Boom):
                run()
            assert_same_state(model, before, f"after an error at the {moment}")
        return list(moments)
    finally:
        wire.handle.remove()


# methods that never backpropagate through the output, or run the model once
NO_BACKWARD = {
    "occlusion",
    "feature-ablation",
    "kernel-shap",
    "rollout",
    "vit-reciprocam",
    "vit-reciprocam-1x1",
    "rise",
    "diffmask",
    "tis",
}
# methods whose backward rules replace the classifier's output in the backward pass, so the
# tripwire's tensor hook on it sees no backward (tests/test_attnlrp.py fails theirs elsewhere)
RULED_CLASSIFIER = {"attnlrp"}
# methods that call the model once here: one forward, or one batch of all their perturbed or
# interpolated images (the registry's batch sizes exceed their counts on one image)
ONE_FORWARD = {
    "attnlrp",
    "rollout",
    "chefer-gae",
    "diffmask",
    "libragrad",
    "libragrad-ixg",
    "libragrad-fullgrad",
    "saliency",
    "input-x-gradient",
    "layer-gradcam",
    "integrated-gradients",
    "gradient-shap",
    "smoothgrad",
    "kernel-shap",
}


@pytest.mark.parametrize("name", method_names())
def test_registered_methods_restore_the_model_after_an_error(name: str) -> None:
    # gradmask-m4 covers the exact masked passes, gradmask-fast the token-dropped ones
    torch.manual_seed(0)
    model = a_users_model()
    method = _build(name, model, get_adapter(model), model)
    images = torch.randn(1, 3, 32, 32)
    tried = run_with_failures(model, lambda: method.attribute(images, target=1))
    # the moments tried are the ones this method has (a new method lands in one set or none)
    assert ("backward" in tried) == (name not in NO_BACKWARD | RULED_CLASSIFIER)
    assert ("last forward" in tried) == (name not in ONE_FORWARD)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_gradmask_masked_pass_error_midway(mode: str) -> None:
    """An error in the second of several masked passes (not the last, not the first)."""
    model = a_users_model()
    gradmask = GradMaskAttribution(model)
    images = torch.randn(2, 3, 32, 32)
    wire = Tripwire(model.classifier)
    before = model_state(model)
    wire.fail_forward_at = 3  # 1: gradient pass, 2: first masked pass, 3: second
    with pytest.raises(Boom, match="forward 3"):
        gradmask.attribute_grid(images, mode=mode, perturbations_per_eval=4)
    wire.handle.remove()
    before["hooks"]["classifier"]["_forward_hooks"] -= 1
    assert_same_state(model, before)


def _gradmask_explanation(model: nn.Module) -> Callable[[Tensor, Any], Tensor]:
    gradmask = GradMaskAttribution(model)
    return lambda images, target: gradmask.attribute_grid(images, target=target)


METRICS: dict[str, Callable[[nn.Module, Tensor, Tensor], Any]] = {
    "insertion": lambda model, images, maps: insertion(
        model, images, maps, target=1, patch_size=8, n_steps=4, perturbations_per_eval=3
    ),
    "deletion": lambda model, images, maps: deletion(
        model, images, maps, target=1, level="patch", n_steps=4, perturbations_per_eval=3
    ),
    "infidelity": lambda model, images, maps: patch_infidelity(
        model, images, maps, target=1, n_perturb_samples=4, perturbations_per_eval=2, seed=0
    ),
    "sensitivity": lambda model, images, maps: sensitivity(
        model,
        images,
        target=1,
        explanation_func=_gradmask_explanation(model),
        n_perturb_samples=2,
        perturbations_per_eval=2,
        seed=0,
    ),
    "adcc": lambda model, images, maps: adcc(
        model,
        images,
        None,
        target=1,
        explanation_func=_gradmask_explanation(model),
        internal_batch_size=1,
    ),
}


@pytest.mark.parametrize("metric", list(METRICS))
def test_metrics_restore_the_model_after_an_error(metric: str) -> None:
    model = a_users_model()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1))
    rng = torch.random.get_rng_state()
    tried = run_with_failures(model, lambda: METRICS[metric](model, images, maps))
    assert "last forward" in tried
    assert ("backward" in tried) == (metric in ("sensitivity", "adcc"))  # GradMask explains
    if metric in ("infidelity", "sensitivity"):  # seeded: the global generator is restored
        assert torch.equal(torch.random.get_rng_state(), rng)
