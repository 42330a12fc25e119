"""Captum metric recipes: patch perturbation, infidelity and sensitivity on models with known
answers."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Saliency

from captum_gradmask.metrics import patch_infidelity, patch_perturbation, sensitivity


def test_patch_perturbation_resets_whole_patches() -> None:
    inputs = torch.rand(4, 3, 8, 8) + 1.0
    perturbation, perturbed = patch_perturbation(patch_size=4, drop_probability=0.5)(inputs)
    torch.testing.assert_close(perturbed, inputs - perturbation)
    dropped = perturbed == 0.0
    # Each 4x4 patch is either all reset (to the 0 baseline) or untouched, in every channel.
    patches = dropped.view(4, 3, 2, 4, 2, 4).permute(0, 2, 4, 1, 3, 5).flatten(3)
    assert bool((patches.all(-1) | ~patches.any(-1)).all())
    assert bool(torch.equal(perturbed[~dropped], inputs[~dropped]))
    assert 0 < int(dropped.sum()) < dropped.numel()
    none, kept = patch_perturbation(4, drop_probability=0.0)(inputs)
    assert bool((none == 0).all()) and torch.equal(kept, inputs)
    with pytest.raises(ValueError, match="drop_probability"):
        patch_perturbation(4, drop_probability=1.5)


def test_infidelity_is_zero_for_the_exact_linear_map() -> None:
    # f(x) = w . x: f(x) - f(x - I) = w . I, so attributions = w (up to scale) are exact.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2, bias=False))
    weights = model[1].weight[0].detach().view(1, 4, 4)
    images = torch.rand(2, 1, 4, 4)
    exact = patch_infidelity(
        model, images, 5.0 * weights.expand(2, 4, 4), target=0, patch_size=2, seed=0
    ).values
    assert exact.shape == (2,)
    assert float(exact.max()) < 1e-8
    wrong = patch_infidelity(
        model, images, torch.rand(2, 4, 4), target=0, patch_size=2, seed=0
    ).values
    assert float(wrong.min()) > 1e-4


def test_infidelity_seed_is_reproducible_and_leaves_global_rng() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    images, saliency = torch.rand(2, 3, 4, 4), torch.rand(2, 2, 2)
    state = torch.random.get_rng_state()
    first = patch_infidelity(model, images, saliency, target=1, patch_size=2, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    second = patch_infidelity(model, images, saliency, target=1, patch_size=2, seed=3)
    assert torch.equal(first.values, second.values)


def test_sensitivity_zero_for_input_independent_saliency() -> None:
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    saliency = Saliency(linear)
    images = torch.rand(2, 3, 4, 4)
    flat = sensitivity(
        linear,
        images,
        target=[0, 2],
        explanation_func=lambda x, t: saliency.attribute(x, target=t),
        n_perturb_samples=4,
        seed=0,
    ).values
    assert flat.shape == (2,) and float(flat.max()) == pytest.approx(0.0, abs=1e-6)

    class Square(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = (x**2).flatten(1).sum(1)
            return torch.stack([s, -s], dim=1)

    square_saliency = Saliency(Square())
    varying = sensitivity(
        Square(),
        images,
        target=0,
        explanation_func=lambda x, t: square_saliency.attribute(x, target=t, abs=False),
        n_perturb_samples=4,
        perturb_radius=0.1,
        seed=0,
    )
    assert float(varying.values.min()) > 1e-3
    assert varying.summary() == {"sensitivity": pytest.approx(float(varying.values.mean()))}
    assert (varying.perturb_radius, varying.n_perturb_samples) == (0.1, 4)


def test_infidelity_three_channels_unnormalized_by_hand() -> None:
    # Every patch dropped (probability 1, baseline 0): the perturbation is the image itself in
    # every sample, so infidelity = (sum_c,h,w s[h, w] / C * x[c, h, w] - (f(x) - f(0)))^2.
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    images = torch.rand(2, 3, 4, 4, generator=generator)
    saliency = torch.rand(2, 4, 4, generator=generator)
    result = patch_infidelity(
        model,
        images,
        saliency,
        target=1,
        patch_size=2,
        drop_probability=1.0,
        normalize=False,
        n_perturb_samples=3,
        seed=0,
    )
    weights = model[1].weight[1].detach().view(3, 4, 4)
    expected = []
    for image, map_ in zip(images, saliency, strict=True):
        explained = float((map_[None] / 3 * image).sum())
        change = float((weights * image).sum())  # f(x) - f(x - x), the bias cancels
        expected.append((explained - change) ** 2)
    assert result.values.tolist() == pytest.approx(expected, rel=1e-4)
    assert result.normalize is False and result.n_perturb_samples == 3
    # Nothing dropped: no perturbation, nothing to explain.
    none = patch_infidelity(
        model, images, saliency, target=1, patch_size=2, drop_probability=0.0, normalize=False
    )
    assert none.values.tolist() == pytest.approx([0.0, 0.0], abs=1e-10)


def test_perturbations_per_eval_replaces_batch_size_and_max_examples_per_batch() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    images, saliency = torch.rand(2, 3, 4, 4), torch.rand(2, 2, 2)
    kwargs = dict(target=1, patch_size=2, seed=3, n_perturb_samples=4)
    batched = patch_infidelity(model, images, saliency, perturbations_per_eval=2, **kwargs)
    for old_name in ("batch_size", "max_examples_per_batch"):
        with pytest.warns(DeprecationWarning, match=f"`{old_name}`.*`perturbations_per_eval`"):
            old = patch_infidelity(model, images, saliency, **{old_name: 2}, **kwargs)
        torch.testing.assert_close(batched.values, old.values)
    with pytest.raises(ValueError, match="perturbations_per_eval"):
        patch_infidelity(model, images, saliency, perturbations_per_eval=0, **kwargs)


def test_sensitivity_takes_the_model_first_and_still_accepts_the_old_order() -> None:
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    saliency = Saliency(linear)
    images = torch.rand(2, 3, 4, 4)
    seen: list[torch.Tensor] = []

    def explain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        return saliency.attribute(x, target=t)

    options = dict(n_perturb_samples=2, seed=0)
    new = sensitivity(linear, images, None, explanation_func=explain, **options)
    predicted = linear(images).argmax(1)
    # a None target is each image's prediction on the clean image, for every perturbed copy
    assert seen[-1].tolist() == predicted.repeat_interleave(2).tolist()
    with pytest.warns(DeprecationWarning, match="model first"):
        old = sensitivity(explain, images, predicted.tolist(), **options)
    torch.testing.assert_close(new.values, old.values)


def test_infidelity_evaluates_a_model_in_eval_mode_and_leaves_its_mode() -> None:
    """A model in train mode with dropout: infidelity equals the eval-mode model's score (as
    insertion, deletion and ADCC), and the model is back in train mode afterwards."""
    from .models import tiny_hf_vit

    model = tiny_hf_vit(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(1))
    options = {"target": [1, 3], "patch_size": 8, "seed": 0, "n_perturb_samples": 4}
    evaluated = patch_infidelity(model.eval(), images, maps, **options).values
    trained = patch_infidelity(model.train(), images, maps, **options).values
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(trained, evaluated)
