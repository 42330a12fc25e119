"""Insertion/deletion pinned to hand-computed curves on a model whose output is a known
function of a known region: logits = [a * mean(x over the region), 0], so with x = 1 and a
zero baseline p(target 0) = sigmoid(a * share of the region still present)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from captum_gradmask.metrics import (
    GRADMASK_NOTEBOOK_FRACTIONS,
    deletion,
    gaussian_blur,
    gradmask_notebook_deletion,
    gradmask_notebook_insertion,
    insertion,
    perturbation_curve,
    rise_deletion,
    rise_insertion,
    step_counts,
)

A = 4.0


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


class RegionModel(torch.nn.Module):
    """Logits [a * mean of x over `region` (a boolean HxW mask), 0]; counts its forward calls."""

    def __init__(self, region: torch.Tensor, a: float = A) -> None:
        super().__init__()
        self.register_buffer("region", region.float())
        self.a = a
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        region_mean = (x.sum(1) * self.region).sum((1, 2)) / self.region.sum()
        return torch.stack([self.a * region_mean, torch.zeros_like(region_mean)], dim=1)


def top_row_model(size: int = 4) -> RegionModel:
    region = torch.zeros(size, size, dtype=torch.bool)
    region[0] = True
    return RegionModel(region)


def trapezoid(xs: list[float], ys: list[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


PERFECT = torch.arange(16, 0, -1, dtype=torch.float32).view(1, 4, 4)  # top row ranked first
INVERTED = -PERFECT  # top row ranked last
X_AXIS = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_deletion_perfect_random_inverted_order_and_values() -> None:
    model, image = top_row_model(), torch.ones(1, 1, 4, 4)
    s = sig(A)
    # 4 pixels per step: the perfect map removes the whole region at the first step.
    perfect = deletion(model, image, PERFECT, target=0, step_size=4)
    inverted = deletion(model, image, INVERTED, target=0, step_size=4)
    random = deletion(model, image, torch.rand(1, 4, 4), target=0, step_size=4)
    assert perfect.probabilities[0].tolist() == pytest.approx([s, 0.5, 0.5, 0.5, 0.5])
    assert inverted.probabilities[0].tolist() == pytest.approx([s, s, s, s, 0.5])
    assert float(perfect.auc) == pytest.approx(trapezoid(X_AXIS, [s, 0.5, 0.5, 0.5, 0.5]))
    assert float(perfect.auc) == pytest.approx(0.25 * ((s + 0.5) / 2 + 1.5))
    assert float(inverted.auc) == pytest.approx(0.25 * (3 * s + (s + 0.5) / 2))
    assert float(perfect.auc) <= float(random.auc) <= float(inverted.auc)
    assert perfect.fractions.tolist() == X_AXIS


def test_insertion_perfect_beats_inverted_with_known_values() -> None:
    model, image = top_row_model(), torch.ones(1, 1, 4, 4)
    s = sig(A)
    perfect = insertion(model, image, PERFECT, target=0, step_size=4, baseline="zeros")
    inverted = insertion(model, image, INVERTED, target=0, step_size=4, baseline="zeros")
    assert perfect.probabilities[0].tolist() == pytest.approx([0.5, s, s, s, s])
    assert inverted.probabilities[0].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5, s])
    assert float(perfect.auc) == pytest.approx(0.25 * ((0.5 + s) / 2 + 3 * s))
    assert float(inverted.auc) == pytest.approx(0.25 * (1.5 + (0.5 + s) / 2))
    assert perfect.mean_auc > inverted.mean_auc


def test_one_pixel_steps_follow_region_share() -> None:
    model, image = top_row_model(), torch.ones(1, 1, 4, 4)
    curve = deletion(model, image, PERFECT, target=0, n_steps=16)
    expected = [sig(A * max(0, 4 - k) / 4) for k in range(17)]
    assert curve.probabilities[0].tolist() == pytest.approx(expected)


def test_ties_keep_row_major_order() -> None:
    # A constant map ranks pixels in row-major order: the top row goes first, like PERFECT.
    model, image = top_row_model(), torch.ones(1, 1, 4, 4)
    tied = deletion(model, image, torch.zeros(1, 4, 4), target=0, step_size=4)
    assert tied.probabilities[0].tolist() == pytest.approx([sig(A), 0.5, 0.5, 0.5, 0.5])
    # Ties inside the top row must not let bottom-row pixels in front of later top-row ones.
    partial = torch.zeros(1, 4, 4)
    partial[0, 3] = 1.0  # bottom row first, then the tied rest in row-major order
    curve = deletion(model, image, partial, target=0, step_size=4)
    assert curve.probabilities[0].tolist() == pytest.approx([sig(A), sig(A), 0.5, 0.5, 0.5])


def test_patch_level_ranks_patch_means() -> None:
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, 2:] = True  # the top-right 2x2 patch
    model, image = RegionModel(region), torch.ones(1, 1, 4, 4)
    grid = torch.tensor([[[0.0, 5.0], [1.0, 2.0]]])  # top-right patch first
    curve = deletion(model, image, grid, target=0, level="patch", patch_size=2, n_steps=4)
    assert curve.probabilities[0].tolist() == pytest.approx([sig(A), 0.5, 0.5, 0.5, 0.5])
    # A pixel map whose patch mean is highest on the same patch gives the same curve.
    pixel_map = grid.repeat_interleave(2, 1).repeat_interleave(2, 2) + 0.1 * torch.rand(1, 4, 4)
    same = deletion(model, image, pixel_map, target=0, level="patch", patch_size=2, n_steps=4)
    torch.testing.assert_close(same.probabilities, curve.probabilities)
    with pytest.raises(ValueError, match="patch_size"):
        deletion(model, image, grid, target=0, level="patch", patch_size=3)


def test_attribution_shapes_broadcast_to_the_same_curve() -> None:
    model, image = top_row_model(), torch.ones(2, 3, 4, 4)
    reference = deletion(model, image, PERFECT.expand(2, 4, 4), target=0, step_size=4)
    for attr in (
        PERFECT[0],  # (H, W)
        PERFECT.expand(2, 4, 4)[:, None],  # (B, 1, H, W)
        PERFECT.expand(2, 4, 4)[:, None].expand(2, 3, 4, 4) / 3,  # (B, C, H, W)
    ):
        curve = deletion(model, image, attr, target=0, step_size=4)
        torch.testing.assert_close(curve.probabilities, reference.probabilities)
    # A (B, h, w) patch grid is upsampled nearest: a 2x2 grid with the top half first.
    grid = torch.tensor([[[2.0, 2.0], [1.0, 1.0]]]).expand(2, 2, 2)
    curve = deletion(model, image, grid, target=0, step_size=4)
    torch.testing.assert_close(curve.probabilities, reference.probabilities)
    with pytest.raises(ValueError, match="attributions"):
        deletion(model, image, torch.rand(3, 4, 4), target=0)
    with pytest.raises(ValueError, match="attributions"):
        deletion(model, image, torch.rand(2, 8, 8), target=0)


def test_batched_forwards_and_several_images() -> None:
    model = top_row_model()
    images = torch.stack([torch.ones(1, 4, 4), -torch.ones(1, 4, 4)])
    maps = torch.stack([PERFECT[0], INVERTED[0]])
    curve = deletion(model, images, maps, target=[0, 1], step_size=4, perturbations_per_eval=3)
    # One pass for the targets (2 images), then 2 x 5 perturbed images in batches of 3.
    assert model.batch_sizes == [2, 3, 3, 3, 1]
    s = sig(A)
    assert curve.probabilities[0].tolist() == pytest.approx([s, 0.5, 0.5, 0.5, 0.5])
    # Image 2 is -1 everywhere and tracks class 1: p1 = sigmoid(a * region share).
    assert curve.probabilities[1].tolist() == pytest.approx([s, s, s, s, 0.5])
    single = deletion(model, images[1:], maps[1:], target=1, step_size=4, perturbations_per_eval=64)
    torch.testing.assert_close(single.probabilities, curve.probabilities[1:])
    assert curve.targets.tolist() == [0, 1]


def test_default_target_is_predicted_class() -> None:
    model = top_row_model()
    images = torch.stack([torch.ones(1, 4, 4), -torch.ones(1, 4, 4)])
    curve = deletion(model, images, PERFECT.expand(2, 4, 4), step_size=4)
    assert curve.targets.tolist() == [0, 1]


def test_probability_fn_and_hugging_face_outputs() -> None:
    model, image = top_row_model(), torch.ones(1, 1, 4, 4)

    def hf_like(x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=model(x))

    curve = deletion(
        hf_like, image, PERFECT, target=0, n_steps=4, probability_fn=lambda logits: logits
    )
    assert curve.probabilities[0].tolist() == pytest.approx([A, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="probability_fn"):
        deletion(model, image, PERFECT, target=0, probability_fn=lambda z: z[:, 0])


def test_additional_forward_args_follow_their_image() -> None:
    base = top_row_model()

    def forward(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return base(x) * scale[:, None]

    images = torch.ones(2, 1, 4, 4)
    scale = torch.tensor([1.0, 0.5])
    curve = deletion(
        forward,
        images,
        PERFECT.expand(2, 4, 4),
        target=0,
        step_size=4,
        perturbations_per_eval=3,
        additional_forward_args=(scale,),
    )
    assert float(curve.probabilities[0, 0]) == pytest.approx(sig(A))
    assert float(curve.probabilities[1, 0]) == pytest.approx(sig(A / 2))


def test_baselines() -> None:
    region = torch.ones(4, 4, dtype=torch.bool)
    model = RegionModel(region, a=1.0)
    image = torch.arange(16.0).view(1, 1, 4, 4)
    everything = deletion  # at the last point every pixel is the baseline
    mean = float(image.mean())
    for baseline, expected_mean in (("zeros", 0.0), ("mean", mean), (2.5, 2.5)):
        curve = everything(model, image, PERFECT, target=0, n_steps=2, baseline=baseline)
        assert float(curve.probabilities[0, -1]) == pytest.approx(sig(expected_mean))
    user = torch.full((1, 1, 1, 1), -1.0)
    curve = everything(model, image, PERFECT, target=0, n_steps=2, baseline=user)
    assert float(curve.probabilities[0, -1]) == pytest.approx(sig(-1.0))
    with pytest.raises(ValueError, match="baseline"):
        deletion(model, image, PERFECT, target=0, baseline="noise")
    with pytest.raises(ValueError, match="baseline"):
        deletion(model, image, PERFECT, target=0, baseline=torch.zeros(3, 3))


def test_rise_blur_kernel_matches_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    import numpy as np

    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1.0
    rise_kernel = ndimage.gaussian_filter(impulse, 5)
    image = torch.zeros(1, 2, 21, 21)
    image[:, :, 10, 10] = 1.0
    blurred = gaussian_blur(image, 11, 5.0)
    # Blurring an impulse reproduces the (symmetric) kernel around it, in every channel.
    for channel in range(2):
        got = blurred[0, channel, 5:16, 5:16].double().numpy()
        np.testing.assert_allclose(got, rise_kernel, atol=1e-7)
    # Zero padding at the border: mass leaks out of a constant image's edges.
    ones = gaussian_blur(torch.ones(1, 1, 12, 12))
    assert float(ones[0, 0, 6, 6]) == pytest.approx(1.0, abs=1e-6)
    assert float(ones[0, 0, 0, 0]) < 0.5
    with pytest.raises(ValueError, match="blur_kernel_size"):
        gaussian_blur(ones, kernel_size=4)


def test_step_counts_schedules() -> None:
    assert step_counts(16, step_size=5).tolist() == [0, 5, 10, 15, 16]
    assert step_counts(10, n_steps=4).tolist() == [0, 2, 5, 7, 10]
    assert step_counts(200).tolist()[:3] == [0, 2, 4]  # default: 100 steps
    assert step_counts(100, fractions=GRADMASK_NOTEBOOK_FRACTIONS).tolist() == [
        1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100,
    ]  # fmt: skip
    assert step_counts(50176, fractions=[0.01]).tolist() == [502]  # round half up
    with pytest.raises(ValueError, match="at most one"):
        step_counts(16, n_steps=4, step_size=4)
    with pytest.raises(ValueError, match="ascending"):
        step_counts(16, fractions=[0.5, 0.1])
    with pytest.raises(ValueError, match="n_steps"):
        step_counts(16, n_steps=0)


def test_rise_auc_rule_versus_trapezoid_on_uneven_steps() -> None:
    model, image = top_row_model(), torch.ones(1, 1, 4, 4)
    kwargs = dict(target=0, step_size=5, baseline="zeros")
    rise_rule = insertion(model, image, PERFECT, auc_rule="rise", **kwargs)
    trapezoid_rule = insertion(model, image, PERFECT, auc_rule="trapezoid", **kwargs)
    s = sig(A)
    p = [0.5, s, s, s, s]  # inserted 0, 5, 10, 15, 16 pixels: the region is in from step 1
    assert rise_rule.probabilities[0].tolist() == pytest.approx(p)
    assert float(rise_rule.auc) == pytest.approx((sum(p) - p[0] / 2 - p[-1] / 2) / 4)
    xs = [0.0, 5 / 16, 10 / 16, 15 / 16, 1.0]
    assert float(trapezoid_rule.auc) == pytest.approx(trapezoid(xs, p))


def test_rise_presets() -> None:
    model, image = top_row_model(), torch.ones(1, 1, 4, 4)
    s = sig(A)
    curve = rise_deletion(model, image, PERFECT, target=0)
    # One image row (4 pixels) per step on a 4x4 image, zero baseline, RISE's AUC formula.
    assert curve.probabilities[0].tolist() == pytest.approx([s, 0.5, 0.5, 0.5, 0.5])
    assert float(curve.auc) == pytest.approx((s + 0.5 * 4 - s / 2 - 0.25) / 4)
    assert curve.protocol == "rise_deletion"
    ins = rise_insertion(model, image, PERFECT, target=0)
    # Blur baseline (kernel 11, sigma 5) of an all-ones image, zero padded.
    blurred = gaussian_blur(image, 11, 5.0)
    start = sig(A * float(blurred[0, 0, 0].mean()))
    assert float(ins.probabilities[0, 0]) == pytest.approx(start, rel=1e-5)
    assert float(ins.probabilities[0, -1]) == pytest.approx(s)


def test_gradmask_notebook_presets() -> None:
    # 10x10 image, the region is the top row (10 pixels): k pixels = 1, 5, 10, 20, ..., 100.
    model, image = top_row_model(10), torch.ones(1, 1, 10, 10)
    ranking = torch.arange(100, 0, -1, dtype=torch.float32).view(1, 10, 10)
    percents = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    ins = gradmask_notebook_insertion(model, image, ranking, target=0)
    expected_ins = [sig(A * min(k, 10) / 10) for k in percents]
    assert ins.probabilities[0].tolist() == pytest.approx(expected_ins)
    assert float(ins.auc) == pytest.approx(trapezoid([float(k) for k in percents], expected_ins))
    dele = gradmask_notebook_deletion(model, image, ranking, target=0)
    expected_del = [0.0] + [sig(A * max(0, 10 - k) / 10) for k in percents]
    assert dele.probabilities[0].tolist() == pytest.approx(expected_del)
    assert dele.fractions[0] == 0.0
    assert float(dele.auc) == pytest.approx(
        trapezoid([0.0] + [float(k) for k in percents], expected_del)
    )


def test_argument_errors_name_the_argument() -> None:
    model, image = top_row_model(), torch.ones(1, 1, 4, 4)
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(model, image, PERFECT, 0, mode="insert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        deletion(model, image, PERFECT, 0, level="token")
    with pytest.raises(ValueError, match="perturbations_per_eval"):
        deletion(model, image, PERFECT, 0, perturbations_per_eval=0)
    with pytest.raises(ValueError, match="auc_rule"):
        deletion(model, image, PERFECT, 0, auc_rule="simpson")
    with pytest.raises(ValueError, match="target"):
        deletion(model, image, PERFECT, target=5)
    with pytest.raises(ValueError, match="attributions"):
        deletion(model, image, torch.tensor([[float("nan")] * 4] * 4), 0)


def test_deterministic_and_model_mode_restored() -> None:
    model, image = top_row_model(), torch.rand(2, 1, 4, 4)
    saliency = torch.rand(2, 4, 4)
    model.train()
    first = deletion(model, image, saliency, 0, n_steps=8)
    second = deletion(model, image, saliency, 0, n_steps=8)
    assert torch.equal(first.probabilities, second.probabilities)
    assert model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda() -> None:
    model, image = top_row_model().cuda(), torch.ones(1, 1, 4, 4, device="cuda")
    curve = insertion(model, image, PERFECT, target=0, step_size=4)
    assert curve.probabilities.device.type == "cuda"
    cpu = insertion(top_row_model(), image.cpu(), PERFECT, target=0, step_size=4)
    torch.testing.assert_close(curve.probabilities.cpu(), cpu.probabilities)
