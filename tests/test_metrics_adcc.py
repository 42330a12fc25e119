"""ADCC and its components pinned to hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from captum.attr import Saliency

from captum_gradmask.metrics import adcc, adcc_score, normalize_map, pearson


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


A = 3.0


class MeanModel(torch.nn.Module):
    """Logits [a * mean(x), 0]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean((1, 2, 3))
        return torch.stack([A * m, torch.zeros_like(m)], dim=1)


# Raw map of a 2x2 image: min 2, max 6 -> s = [[0, 1], [0.5, 0.25]] (min-max per image).
RAW = torch.tensor([[2.0, 6.0], [4.0, 3.0]])
S = [0.0, 1.0, 0.5, 0.25]


def test_adcc_of_a_known_map() -> None:
    # Image 0: x = 1, target 0: Y = sig(a), O = sig(a * mean(s)) < Y, a drop.
    # Image 1: x = -1, target 0: Y = sig(-a), O = sig(-a * mean(s)) > Y, an increase.
    images = torch.stack([torch.ones(1, 2, 2), -torch.ones(1, 2, 2)])
    maps = RAW.expand(2, 2, 2)
    sign = torch.tensor([1.0, -1.0])

    def explain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long
        # On x * s this returns s for both images (image 1's x * s = -s, times -1).
        return x[:, 0] * sign[:, None, None]

    result = adcc(MeanModel(), images, maps, target=[0, 0], explanation_func=explain)
    mean_s = sum(S) / 4
    y0, o0 = sig(A), sig(A * mean_s)
    y1, o1 = sig(-A), sig(-A * mean_s)
    assert result.base_probability.tolist() == pytest.approx([y0, y1])
    assert result.explanation_probability.tolist() == pytest.approx([o0, o1])
    assert result.average_drop.tolist() == pytest.approx([(y0 - o0) / y0, 0.0])
    assert result.increase_in_confidence.tolist() == [False, True]
    assert result.complexity.tolist() == pytest.approx([mean_s, mean_s])
    assert result.coherence.tolist() == pytest.approx([1.0, 1.0])
    ad0 = (y0 - o0) / y0
    expected0 = 3 / (1 / 1.0 + 1 / (1 - mean_s) + 1 / (1 - ad0))
    expected1 = 3 / (1 / 1.0 + 1 / (1 - mean_s) + 1 / 1.0)
    assert result.adcc.tolist() == pytest.approx([expected0, expected1], rel=1e-6)
    summary = result.summary()
    assert summary["average_drop"] == pytest.approx(100 * ad0 / 2)
    assert summary["increase_in_confidence"] == pytest.approx(50.0)
    assert summary["adcc"] == pytest.approx(100 * (expected0 + expected1) / 2, rel=1e-6)
    of_means = 3 / (1 / 1.0 + 1 / (1 - mean_s) + 1 / (1 - ad0 / 2))
    assert summary["adcc_of_means"] == pytest.approx(100 * of_means, rel=1e-6)
    assert result.summary(percent=False)["coherence"] == pytest.approx(1.0)


def test_anticorrelated_recomputed_map_gives_zero_coherence_and_adcc() -> None:
    images = torch.ones(1, 1, 2, 2)
    result = adcc(MeanModel(), images, RAW[None], target=0, explanation_func=lambda x, t: -x[:, 0])
    assert result.coherence.tolist() == pytest.approx([0.0])
    assert result.adcc.tolist() == [0.0]


def test_coherence_rescales_pearson_to_unit_interval() -> None:
    # Recomputed map = s with one value changed: coherence = (1 + r) / 2, r from numpy.
    recomputed = torch.tensor([[0.0, 1.0], [0.0, 0.25]])
    result = adcc(
        MeanModel(),
        torch.ones(1, 1, 2, 2),
        RAW[None],
        target=0,
        explanation_func=lambda x, t: recomputed[None].expand(x.shape[0], 2, 2),
    )
    r = np.corrcoef(np.array(S), recomputed.flatten().numpy())[0, 1]
    assert float(result.coherence[0]) == pytest.approx((1 + r) / 2, rel=1e-6)


def test_attributions_none_uses_explanation_func_and_gradients_work() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    saliency = Saliency(model)
    calls: list[int] = []

    def explain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return saliency.attribute(x, target=t)

    images = torch.rand(3, 3, 4, 4)
    result = adcc(model, images, None, explanation_func=explain, internal_batch_size=2)
    assert calls == [2, 1, 2, 1]  # the maps on x, then on x * s, in batches of 2
    # A linear model's saliency does not depend on the input: coherence is exactly 1.
    assert result.coherence.tolist() == pytest.approx([1.0, 1.0, 1.0])
    for value in (result.average_drop, result.complexity, result.adcc):
        assert bool(((value >= 0) & (value <= 1)).all())


def test_helpers() -> None:
    assert normalize_map(RAW[None]).flatten().tolist() == S
    assert normalize_map(torch.full((1, 2, 2), 3.0)).flatten().tolist() == [0.0] * 4
    a, b = torch.rand(2, 10), torch.rand(2, 10)
    for i in range(2):
        expected = np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1]
        assert float(pearson(a, b)[i]) == pytest.approx(expected, rel=1e-6)
    assert float(pearson(torch.ones(1, 5), torch.rand(1, 5))[0]) == 0.0
    assert adcc_score(1.0, 0.0, 0.0) == pytest.approx(1.0)
    assert adcc_score(0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert adcc_score(0.0, 0.2, 0.2) == 0.0
    assert adcc_score(0.9, 1.0, 0.2) == 0.0


def test_errors() -> None:
    images = torch.ones(1, 1, 2, 2)
    with pytest.raises(TypeError, match="explanation_func"):
        adcc(MeanModel(), images, RAW[None], target=0, explanation_func=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="explanation_func"):
        adcc(MeanModel(), images, RAW[None], target=0, explanation_func=lambda x, t: [1])
    with pytest.raises(ValueError, match="internal_batch_size"):
        adcc(MeanModel(), images, RAW[None], explanation_func=lambda x, t: x, internal_batch_size=0)
