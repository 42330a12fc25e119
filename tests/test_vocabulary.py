"""One vocabulary: registry names, the one type ``build_method`` returns, keyword options in
signatures and the errors a misspelled keyword gives."""

from __future__ import annotations

import inspect

import pytest
import torch

from captum_gradmask import GradMaskAttribution
from captum_gradmask.registry import ConfiguredMethod, build_method, method_names

from .models import tiny_hf_vit


def test_registry_names_are_lowercase_words_joined_by_hyphens() -> None:
    for name in method_names():
        assert name == name.lower() and " " not in name and "_" not in name, name
    assert "input-x-gradient" in method_names() and "inputxgradient" not in method_names()


def test_a_former_name_still_builds_with_a_deprecation_warning() -> None:
    model = tiny_hf_vit()
    with pytest.warns(DeprecationWarning, match="'input-x-gradient'"):
        method = build_method("inputxgradient", model)
    assert method.name == "input-x-gradient"


@pytest.mark.parametrize("name", [n for n in method_names() if n != "diffmask"])
def test_build_method_returns_one_type_with_attribute_and_attribute_grid(name: str) -> None:
    model = tiny_hf_vit()
    small = {"rise": {"n_masks": 4}, "kernel-shap": {"n_samples": 8}, "tis": {"n_masks": 8}}.get(
        name, {}
    )
    method = build_method(name, model, **small)
    assert type(method) is ConfiguredMethod
    images = torch.randn(2, 3, 32, 32)
    grid = method.attribute_grid(images, target=[1, 2])
    assert grid.shape == (2, *method.grid_size((32, 32)))
    expected = (32, 32) if method.pixel_level else (4, 4)
    assert tuple(grid.shape[1:]) == expected
    assert method.attribute(images, target=[1, 2]).shape == images.shape


def test_pixel_level_grid_is_the_channel_sum_of_the_attributions() -> None:
    method = build_method("saliency", tiny_hf_vit())
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        method.attribute_grid(images, target=3), method.attribute(images, target=3).sum(1)
    )


def test_attribute_lists_the_methods_keyword_options() -> None:
    parameters = inspect.signature(GradMaskAttribution.attribute).parameters
    assert list(parameters)[:4] == ["self", "inputs", "target", "additional_forward_args"]
    for option in ("masks_per_layer", "fill_value", "perturbations_per_eval",
                   "internal_batch_size", "show_progress"):  # fmt: skip
        assert parameters[option].kind is inspect.Parameter.KEYWORD_ONLY
    assert "options" not in parameters


@pytest.mark.parametrize("call", ["attribute", "attribute_grid"])
def test_a_misspelled_keyword_names_the_method_and_the_valid_keywords(call: str) -> None:
    gradmask = GradMaskAttribution(tiny_hf_vit())
    with pytest.raises(TypeError) as error:
        getattr(gradmask, call)(torch.randn(1, 3, 32, 32), mask_per_layer=2)
    message = str(error.value)
    assert f"GradMaskAttribution.{call}()" in message and "'mask_per_layer'" in message
    assert "did you mean 'masks_per_layer'" in message and "perturbations_per_eval" in message


def test_captum_methods_take_additional_forward_args() -> None:
    model = tiny_hf_vit()
    calls: list[int] = []

    def forward(images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        calls.append(images.shape[0])
        return model(images).logits * scale[:, None]

    from captum_gradmask.adapters import get_adapter

    method = build_method("saliency", forward, adapter=get_adapter(model))
    images = torch.randn(2, 3, 32, 32)
    scale = torch.tensor([1.0, 2.0])
    single = method.attribute(images, target=1, additional_forward_args=(torch.ones(2),))
    doubled = method.attribute(images, target=1, additional_forward_args=(scale,))
    torch.testing.assert_close(doubled[1], 2 * single[1])
    torch.testing.assert_close(doubled[0], single[0])


def test_metrics_take_the_patch_size_from_the_models_adapter() -> None:
    from captum_gradmask.metrics import deletion, patch_infidelity

    model = tiny_hf_vit(image_size=112, patch_size=14)  # 8x8 patches; a 16 grid would be 7x7
    images = torch.randn(1, 3, 112, 112)
    grid = torch.rand(1, 8, 8)
    curve = deletion(model, images, grid, target=0, level="patch", perturbations_per_eval=65)
    assert curve.fractions.shape == (65,)  # one point per patch of the 8x8 grid, and 0
    torch.testing.assert_close(curve.fractions[1], torch.tensor(1 / 64))
    explicit = deletion(model, images, grid, target=0, level="patch", patch_size=14)
    torch.testing.assert_close(curve.auc, explicit.auc)
    assert patch_infidelity(model, images, grid, target=0, n_perturb_samples=2).values.shape == (1,)


def test_metrics_without_an_adapter_need_the_patch_size() -> None:
    from captum_gradmask.metrics import deletion, patch_infidelity

    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    images, grid = torch.rand(1, 3, 8, 8), torch.rand(1, 2, 2)
    with pytest.raises(ValueError, match="`patch_size` is needed"):
        deletion(linear, images, grid, target=0, level="patch")
    with pytest.raises(ValueError, match="`patch_size` is needed"):
        patch_infidelity(linear, images, grid, target=0)
    assert deletion(linear, images, grid, target=0, level="patch", patch_size=4).auc.shape == (1,)


def test_metric_batch_knobs_have_one_name_and_the_old_one_warns() -> None:
    from captum_gradmask.metrics import adcc, deletion

    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    images, maps = torch.rand(2, 3, 8, 8), torch.rand(2, 8, 8)
    new = deletion(linear, images, maps, target=0, perturbations_per_eval=5)
    with pytest.warns(DeprecationWarning, match="use `perturbations_per_eval`"):
        old = deletion(linear, images, maps, target=0, batch_size=5)
    torch.testing.assert_close(new.auc, old.auc)
    with pytest.raises(ValueError, match="not both"):
        deletion(linear, images, maps, target=0, batch_size=5, perturbations_per_eval=7)

    def explain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x.sum(1)

    new_adcc = adcc(linear, images, maps, 0, explanation_func=explain, internal_batch_size=1)
    with pytest.warns(DeprecationWarning, match="use `internal_batch_size`"):
        old_adcc = adcc(linear, images, maps, 0, explanation_func=explain, batch_size=1)
    torch.testing.assert_close(new_adcc.adcc, old_adcc.adcc)


def test_a_misspelled_metric_keyword_names_the_function_called() -> None:
    from captum_gradmask.metrics import deletion, insertion, rise_deletion

    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    images, maps = torch.rand(1, 3, 8, 8), torch.rand(1, 8, 8)
    for metric, name in ((insertion, "insertion"), (deletion, "deletion")):
        with pytest.raises(TypeError, match=rf"^{name}\(\) has no keyword 'n_step' "
                           r"\(did you mean 'n_steps'\?\); its keywords are: .*level"):  # fmt: skip
            metric(linear, images, maps, 0, n_step=4)
    with pytest.raises(TypeError, match=r"rise_deletion\(\) has no keyword 'n_steps'; its keyw"):
        rise_deletion(linear, images, maps, 0, n_steps=4)


def test_a_configured_method_can_run_every_call_inside_a_context() -> None:
    import contextlib

    entered: list[str] = []

    @contextlib.contextmanager
    def rules():
        entered.append("in")
        yield

    built = build_method("saliency", tiny_hf_vit())
    ruled = ConfiguredMethod(built.name, built.method, built.settings, call_settings={},
                             context=rules)  # fmt: skip
    images = torch.randn(1, 3, 32, 32)
    ruled.attribute(images, target=1)
    ruled.attribute_grid(images, target=1)
    assert entered == ["in", "in"]
