"""Tie policies of the insertion/deletion curves, and the presets against the reference codes.

The references are re-derived here from reading the reference repositories (the GradMask
authors' ``modify_image`` and ``sklearn.metrics.auc`` in their notebook; RISE's
``CausalMetric.single_run`` and ``auc`` in ``evaluation.py``): plain numpy and loops, one
forward pass per point, nothing from the library's curve code.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from captum_gradmask.metrics import (
    deletion,
    gaussian_blur,
    gradmask_notebook_deletion,
    gradmask_notebook_insertion,
    insertion,
    rank_units,
    rise_deletion,
    rise_insertion,
    step_counts,
)

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared

NOTEBOOK_PERCENTS = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def _probabilities(model: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        output = model(torch.from_numpy(image)[None])
    logits = output.logits if hasattr(output, "logits") else output
    return torch.softmax(logits.float(), dim=-1)[0].numpy()


def _probability(model: torch.nn.Module, image: np.ndarray, target: int) -> float:
    return float(_probabilities(model, image)[target])


def notebook_reference(
    model: torch.nn.Module, image: np.ndarray, heatmap: np.ndarray, target: int, mode: str
) -> tuple[list[float], float]:
    """The notebook's curve and AUC: the top ``int(f * H * W)`` pixels are the last ones of
    numpy's ascending argsort; black (0) baseline; x in percent; deletion prepends (0, 0)."""
    height, width = heatmap.shape
    scores = []
    for percent in NOTEBOOK_PERCENTS:
        count = int(percent / 100 * height * width)
        top = np.argsort(heatmap.ravel())[-count:]
        keep = np.zeros(height * width, dtype=bool)
        keep[top] = True
        keep = keep.reshape(height, width)
        if mode == "insertion":
            modified = np.where(keep, image, np.float32(0))
        else:
            modified = np.where(keep, np.float32(0), image)
        scores.append(_probability(model, modified.astype(np.float32), target))
    xs = [float(p) for p in NOTEBOOK_PERCENTS]
    if mode == "deletion":
        xs, scores = [0.0, *xs], [0.0, *scores]
    area = 0.0
    for i in range(len(xs) - 1):
        area += (xs[i + 1] - xs[i]) * (scores[i] + scores[i + 1]) / 2
    return scores, area


def rise_reference(
    model: torch.nn.Module,
    image: np.ndarray,
    heatmap: np.ndarray,
    mode: str,
    substrate: np.ndarray,
) -> tuple[list[float], float]:
    """RISE's single_run: the predicted class, a row of pixels per step taken from the flipped
    ascending argsort, copied in place from ``finish`` into ``start``; RISE's AUC formula."""
    channels, height, width = image.shape
    area, step = height * width, width
    n_steps = (area + step - 1) // step
    target = int(np.argmax(_probabilities(model, image)))
    order = np.flip(np.argsort(heatmap.reshape(-1, area), axis=1), axis=-1)[0]
    start = image.copy() if mode == "deletion" else substrate.copy()
    finish = substrate if mode == "deletion" else image
    scores = []
    for i in range(n_steps + 1):
        scores.append(_probability(model, start, target))
        if i < n_steps:
            coords = order[step * i : step * (i + 1)]
            start.reshape(channels, area)[:, coords] = finish.reshape(channels, area)[:, coords]
    values = np.array(scores)
    return scores, float((values.sum() - values[0] / 2 - values[-1] / 2) / (len(values) - 1))


def tiny_model() -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(5, 3 * 32 * 32, generator=generator) * 0.05)
        model[1].bias.zero_()
    return model.eval()


def tie_heavy_grid(seed: int) -> torch.Tensor:
    """An 8x8 patch grid with 3 values: upsampled to 32x32, every pixel ties with hundreds."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (1, 8, 8), generator=generator).float()


def upsampled(grid: torch.Tensor, size: int) -> np.ndarray:
    factor = size // grid.shape[-1]
    values = grid[0].numpy().astype(np.float32)
    return np.repeat(np.repeat(values, factor, axis=0), factor, axis=1)


@pytest.mark.parametrize("seed", [0, 1])
def test_notebook_presets_equal_the_reference_on_tie_heavy_maps(seed: int) -> None:
    model = tiny_model()
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    grid = tie_heavy_grid(seed)
    heatmap = upsampled(grid, 32)
    for preset, mode in (
        (gradmask_notebook_insertion, "insertion"),
        (gradmask_notebook_deletion, "deletion"),
    ):
        curve = preset(model, image, grid, target=2)
        scores, area = notebook_reference(model, image[0].numpy(), heatmap, 2, mode)
        assert curve.probabilities[0].tolist() == pytest.approx(scores, abs=1e-6)
        assert float(curve.auc[0]) == pytest.approx(area, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_rise_presets_equal_the_reference_on_tie_heavy_maps(seed: int) -> None:
    model = tiny_model()
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    grid = tie_heavy_grid(seed)
    heatmap = upsampled(grid, 32)
    # RISE's substrate for insertion is its blur; gaussian_blur is checked against RISE's
    # scipy-built kernel in test_metrics_insertion_deletion.py.
    substrates = {
        "insertion": gaussian_blur(image, 11, 5.0)[0].numpy(),
        "deletion": np.zeros((3, 32, 32), dtype=np.float32),
    }
    for preset, mode in ((rise_insertion, "insertion"), (rise_deletion, "deletion")):
        curve = preset(model, image, grid)
        scores, area = rise_reference(model, image[0].numpy(), heatmap, mode, substrates[mode])
        assert curve.probabilities[0].tolist() == pytest.approx(scores, abs=1e-6)
        assert float(curve.auc[0]) == pytest.approx(area, rel=1e-6)


def test_notebook_counts_truncate() -> None:
    # int(0.01 * 224 * 224) = 501, where rounding half up gives 502.
    counts = step_counts((224, 224), fractions=[0.01, 0.05, 0.3], rounding="down")
    assert counts.tolist() == [int(f * 224 * 224) for f in (0.01, 0.05, 0.3)]
    assert counts[0] == 501
    assert step_counts(224 * 224, fractions=[0.01]).tolist() == [502]


def test_reference_order_is_numpy_argsort_of_a_float32_copy_read_backwards() -> None:
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (2, 1000), generator=generator).double()
    scores[0, 5] += 1e-12  # distinct in float64, tied in float32
    order = rank_units(scores, "reference")
    expected = np.argsort(scores.float().numpy(), axis=1)[:, ::-1]
    assert order.shape == (1, 2, 1000)
    assert np.array_equal(order[0].numpy(), expected)


def test_random_orders_keep_scores_descending_and_are_seeded() -> None:
    scores = torch.tensor([[2.0, 1.0, 2.0, 1.0, 2.0, 0.0]])
    orders = rank_units(scores, "random", tie_samples=20, seed=5)
    assert orders.shape == (20, 1, 6)
    for order in orders[:, 0]:
        assert scores[0, order].tolist() == [2.0, 2.0, 2.0, 1.0, 1.0, 0.0]
    assert len({tuple(o) for o in orders[:, 0].tolist()}) > 1  # ties broken differently
    assert torch.equal(orders, rank_units(scores, "random", tie_samples=20, seed=5))
    assert not torch.equal(orders, rank_units(scores, "random", tie_samples=20, seed=6))


def test_random_ties_average_the_curves_of_the_sampled_orders() -> None:
    model = tiny_model()
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grid = torch.cat([tie_heavy_grid(0), tie_heavy_grid(1)])
    kwargs = dict(target=[1, 3], n_steps=10, baseline="zeros")
    curve = deletion(model, image, grid, ties="random", tie_samples=4, seed=7, **kwargs)
    pixel_scores = torch.from_numpy(np.stack([upsampled(g[None], 32) for g in grid])).flatten(1)
    orders = rank_units(pixel_scores, "random", tie_samples=4, seed=7)
    per_order = []
    for order in orders:
        # The same order as a map without ties, so that any policy follows it.
        strict = torch.empty(2, 32 * 32)
        strict.scatter_(1, order, torch.arange(32 * 32, 0, -1).float().expand(2, -1))
        per_order.append(deletion(model, image, strict.view(2, 32, 32), **kwargs))
    mean = torch.stack([c.probabilities for c in per_order]).mean(0)
    torch.testing.assert_close(curve.probabilities, mean)
    torch.testing.assert_close(curve.tie_auc, torch.stack([c.auc for c in per_order], dim=1))
    torch.testing.assert_close(curve.auc, curve.tie_auc.mean(1))
    assert bool((curve.tie_spread > 0).all())
    assert curve.ties == "random"


class Counting(torch.nn.Module):
    """The tiny model, recording the batch size of every forward call in ``calls``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_model()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.inner(x)


def test_random_ties_cost_nothing_and_change_nothing_on_maps_without_ties() -> None:
    model = Counting()
    calls = model.calls
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    distinct = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(0)).float()
    saliency = distinct.view(1, 32, 32)
    stable = insertion(model, image, saliency, target=0, n_steps=16)
    stable_images = sum(calls)
    calls.clear()
    random = insertion(model, image, saliency, target=0, n_steps=16, ties="random", tie_samples=8)
    assert sum(calls) == stable_images
    assert torch.equal(random.probabilities, stable.probabilities)
    assert float(random.tie_spread[0]) == 0.0
    # A tie-heavy map needs one forward pass per order at the points inside a tie.
    calls.clear()
    insertion(model, image, tie_heavy_grid(0), target=0, n_steps=16, ties="random", tie_samples=8)
    assert sum(calls) > stable_images


@pytest.mark.parametrize("preset", [gradmask_notebook_deletion, rise_insertion])
def test_fixed_orders_in_the_random_pass_equal_their_own_curves_and_share_points(preset) -> None:
    model = Counting()
    calls = model.calls
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    distinct = torch.randperm(32 * 32, generator=torch.Generator().manual_seed(1)).float()
    for saliency in (tie_heavy_grid(0), distinct.view(1, 32, 32)):
        calls.clear()
        alone = {p: preset(model, image, saliency, 2, ties=p) for p in ("stable", "reference")}
        random = preset(model, image, saliency, 2, ties="random", tie_samples=4, seed=3)
        separate = sum(calls)
        calls.clear()
        joint = preset(model, image, saliency, 2, ties="random", tie_samples=4, seed=3,
                       with_fixed_orders=True)  # fmt: skip
        torch.testing.assert_close(joint.stable_auc, alone["stable"].auc)
        torch.testing.assert_close(joint.reference_auc, alone["reference"].auc)
        torch.testing.assert_close(joint.tie_auc, random.tie_auc)
        torch.testing.assert_close(joint.probabilities, random.probabilities)
        assert sum(calls) < separate  # the points no cut splits are evaluated once
    # without ties the three policies cost one curve: the random pass alone
    calls.clear()
    preset(model, image, saliency, 2, ties="random", tie_samples=4, seed=3)
    assert sum(calls) == separate // 3
    assert random.stable_auc is None and random.reference_auc is None
    with pytest.raises(ValueError, match="with_fixed_orders"):
        preset(model, image, saliency, 2, ties="stable", with_fixed_orders=True)


def test_tie_policy_errors_and_preset_options() -> None:
    model, image, grid = tiny_model(), torch.rand(1, 3, 32, 32), tie_heavy_grid(0)
    with pytest.raises(ValueError, match="ties"):
        deletion(model, image, grid, 0, ties="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tie_samples"):
        deletion(model, image, grid, 0, tie_samples=3)
    with pytest.raises(ValueError, match="tie_samples"):
        deletion(model, image, grid, 0, ties="random", tie_samples=0)
    with pytest.raises(TypeError, match="n_steps"):
        rise_deletion(model, image, grid, 0, n_steps=4)  # type: ignore[call-arg]
    stable = gradmask_notebook_deletion(model, image, grid, 0, ties="stable")
    reference = gradmask_notebook_deletion(model, image, grid, 0)
    assert (stable.ties, reference.ties) == ("stable", "reference")
    assert stable.protocol == reference.protocol == "gradmask_notebook_deletion"


@pytest.mark.slow
@needs_shared
def test_presets_equal_the_reference_code_on_gradmask_maps_of_real_images() -> None:
    from transformers import ViTForImageClassification

    from captum_gradmask import GradMaskAttribution
    from captum_gradmask.data import load_imagenet_sample, preprocess_image

    model = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    records = load_imagenet_sample(IMAGENET_SAMPLE, limit=2)
    images = torch.stack([preprocess_image(r.path) for r in records])
    labels = [r.label for r in records]
    grids = GradMaskAttribution(model).attribute_grid(images, target=labels)
    stable_gaps: list[float] = []
    for i in range(len(records)):
        image, grid = images[i : i + 1], grids[i : i + 1].float()
        heatmap = upsampled(grid, 224)
        assert len(np.unique(heatmap)) <= 196  # every pixel of a patch ties
        for preset, mode in (
            (gradmask_notebook_insertion, "insertion"),
            (gradmask_notebook_deletion, "deletion"),
        ):
            auc = float(preset(model, image, grid, labels[i]).auc[0])
            _, expected = notebook_reference(model, image[0].numpy(), heatmap, labels[i], mode)
            assert auc == pytest.approx(expected, rel=1e-4)
            stable_gaps.append(
                abs(float(preset(model, image, grid, labels[i], ties="stable").auc[0]) - expected)
            )
        if i > 0:
            continue  # RISE's 225-step curves: one image keeps the suite within CI's budget
        substrates = {
            "insertion": gaussian_blur(image, 11, 5.0)[0].numpy(),
            "deletion": np.zeros((3, 224, 224), dtype=np.float32),
        }
        for preset, mode in ((rise_insertion, "insertion"), (rise_deletion, "deletion")):
            auc = float(preset(model, image, grid).auc[0])
            _, expected = rise_reference(model, image[0].numpy(), heatmap, mode, substrates[mode])
            assert auc == pytest.approx(expected, rel=1e-4)
    # The row-major order is not the notebook's: the tie policy is what the presets fix.
    assert max(stable_gaps) > 1e-3
