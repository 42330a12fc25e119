"""One way in for every method: ``resolve_model`` and the shared checks of the base class."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from captum_gradmask import GradMaskAttribution, get_adapter, resolve_model
from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig
from captum_gradmask.registry import build_method, method_names

from .models import tiny_hf_vit

# Small settings: the point is who is called, not the maps' quality.
SMALL = {
    "integrated-gradients": {"n_steps": 2},
    "gradient-shap": {"n_samples": 2},
    "smoothgrad": {"nt_samples": 2},
    "kernel-shap": {"n_samples": 8},
    "rise": {"n_masks": 8},
    "libragrad-ig": {"n_steps": 2},
    "tis": {"n_masks": 8},
}
# Methods that run the model from its tokens (the adapter's token interface) and never call
# the forward function; fast GradMask calls it in its gradient pass only.
TOKEN_ONLY = {
    "vit-reciprocam",
    "vit-reciprocam-1x1",
    "diffmask",
    "libragrad",
    "libragrad-ixg",
    "libragrad-ig",
    "libragrad-fullgrad",
    "tis",
}


def _build(name: str, model, adapter, explained):
    settings = dict(SMALL.get(name, {}))
    if name == "diffmask":
        settings["gate"] = DiffMaskGate(GateConfig.for_adapter(adapter))
    return build_method(name, explained, adapter, **settings)


def test_resolve_model_returns_new_objects_and_never_writes_to_its_arguments() -> None:
    model = tiny_hf_vit()
    adapter = get_adapter(model)
    before = {f.name: getattr(adapter, f.name) for f in dataclasses.fields(adapter)}

    def explained(images: Tensor) -> Tensor:
        return model(images).logits

    resolved = resolve_model(explained, adapter)
    assert resolved.forward is explained and resolved.adapter is not adapter
    assert resolved.module is model
    # The caller's adapter is untouched: every field is the very object it was.
    assert all(getattr(adapter, name) is value for name, value in before.items())
    same = resolve_model(model, adapter)  # beside its own module: the adapter as it is
    assert same.adapter is adapter and same.forward is adapter.forward
    with pytest.raises(TypeError, match="must be callable"):
        resolve_model(42, adapter)


@pytest.mark.parametrize("name", method_names())
def test_every_method_explains_the_callable_given_beside_an_adapter(name: str) -> None:
    model = tiny_hf_vit()
    adapter = get_adapter(model)
    original_forward = adapter.forward
    calls: list[int] = []

    def explained(images: Tensor, *args) -> Tensor:
        calls.append(images.shape[0])
        return model(images).logits

    method = _build(name, model, adapter, explained)
    attributions = method.attribute(torch.randn(2, 3, 32, 32), target=1)
    attributions = attributions[0] if isinstance(attributions, tuple) else attributions
    assert attributions.shape == (2, 3, 32, 32)
    assert adapter.forward is original_forward  # one adapter can serve several methods
    if name in TOKEN_ONLY:
        assert calls == []
    else:
        assert calls, f"{name} did not call the function it was asked to explain"


@pytest.mark.parametrize("name", method_names())
def test_every_method_names_empty_batches_and_non_integer_targets(name: str) -> None:
    model = tiny_hf_vit()
    method = _build(name, model, get_adapter(model), model)
    with pytest.raises(ValueError, match=r"`inputs` is an empty batch"):
        method.attribute(torch.randn(0, 3, 32, 32), target=1)
    with pytest.raises(TypeError, match=r"`target` must be an int.*got 1\.5"):
        method.attribute(torch.randn(1, 3, 32, 32), target=1.5)


@pytest.mark.parametrize("name", method_names())
def test_every_method_names_an_out_of_range_target(name: str) -> None:
    model = tiny_hf_vit()  # 7 classes
    method = _build(name, model, get_adapter(model), model)
    images = torch.randn(2, 3, 32, 32)
    for target in (7, [0, 9]):
        with pytest.raises(ValueError, match=r"`target` value (7|9) is out of range.* 0\.\.6"):
            method.attribute(images, target=target)
    assert not images.requires_grad  # the caller's tensor is left as it was


def test_target_checks_name_the_argument() -> None:
    gradmask = GradMaskAttribution(tiny_hf_vit())
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(TypeError, match=r"dtype torch\.float32"):
        gradmask.attribute(images, target=torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="entries must be int"):
        gradmask.attribute(images, target=[1, 2.5])
    with pytest.raises(ValueError, match="has 3 entries but the batch has 2"):
        gradmask.attribute(images, target=[1, 2, 3])
    with pytest.raises(ValueError, match="out of range"):
        gradmask.attribute(images, target=7)
