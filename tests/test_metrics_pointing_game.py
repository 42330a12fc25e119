"""Pointing game pinned to hand-placed maxima, tolerances and box mappings."""

from __future__ import annotations

import pytest
import torch

from captum_gradmask.metrics import (
    TORCHRAY_TOLERANCE,
    boxes_to_mask,
    max_point,
    pointing_game,
    resize_boxes,
)


def peak_map(row: int, col: int, size: int = 32) -> torch.Tensor:
    saliency = torch.zeros(1, size, size)
    saliency[0, row, col] = 1.0
    return saliency


def single_pixel_object(row: int = 10, col: int = 10, size: int = 32) -> torch.Tensor:
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, row, col] = True
    return mask


@pytest.mark.parametrize(
    ("row", "col", "hit"),
    [
        (10, 24, True),  # distance 14
        (10, 25, False),  # distance 15: on the disc's edge, outside TorchRay's open disc
        (19, 22, False),  # sqrt(9^2 + 12^2) = 15
        (18, 22, True),  # sqrt(8^2 + 12^2) = 14.4
        (20, 22, False),  # sqrt(10^2 + 12^2) = 15.6
    ],
)
def test_torchray_tolerance_just_inside_and_outside(row: int, col: int, hit: bool) -> None:
    result = pointing_game(
        peak_map(row, col), masks=single_pixel_object(), tolerance=TORCHRAY_TOLERANCE
    )
    assert result.hits.tolist() == [hit]
    assert result.points.tolist() == [[row, col]]


def test_zero_tolerance_needs_the_object_pixel() -> None:
    assert pointing_game(peak_map(10, 10), masks=single_pixel_object(), tolerance=0).hit_rate == 1
    assert pointing_game(peak_map(10, 11), masks=single_pixel_object(), tolerance=0).hit_rate == 0
    # Distance 1 is outside the open disc of radius 1 and inside that of radius 2.
    assert pointing_game(peak_map(10, 11), masks=single_pixel_object(), tolerance=1).hit_rate == 0
    assert pointing_game(peak_map(10, 11), masks=single_pixel_object(), tolerance=2).hit_rate == 1


def torchray_hit(point: tuple[int, int], mask: torch.Tensor, tolerance: int) -> bool:
    """TorchRay's rule written out: a (2t+1)-wide stencil of the offsets with
    ``dx^2 + dy^2 < t^2``, centred on the point, must overlap the object."""
    height, width = mask.shape
    for dy in range(-tolerance, tolerance + 1):
        for dx in range(-tolerance, tolerance + 1):
            if dx * dx + dy * dy >= tolerance * tolerance:
                continue
            y, x = point[0] + dy, point[1] + dx
            if 0 <= y < height and 0 <= x < width and bool(mask[y, x]):
                return True
    return False


def test_torchray_rule_on_every_position_of_the_map() -> None:
    obj = single_pixel_object(12, 9, size=32)
    obj[0, 20:23, 25:27] = True
    for row in range(32):
        maps = torch.stack([peak_map(row, col)[0] for col in range(32)])
        result = pointing_game(maps, masks=obj.expand(32, -1, -1), tolerance=TORCHRAY_TOLERANCE)
        expected = [torchray_hit((row, col), obj[0], TORCHRAY_TOLERANCE) for col in range(32)]
        assert result.hits.tolist() == expected


def test_resize_boxes_and_mask_by_hand() -> None:
    # Original 100 rows x 200 columns, model input 50 x 100: both axes halve.
    mapped = resize_boxes([[10, 20, 29, 39]], original_size=(100, 200), new_size=(50, 100))
    assert mapped.tolist() == [[5.0, 10.0, 15.0, 20.0]]  # [xmin, ymin, xmax + 1, ymax + 1) / 2
    mask = boxes_to_mask(mapped, (50, 100))
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert sorted(set(rows.tolist())) == list(range(10, 20))
    assert sorted(set(cols.tolist())) == list(range(5, 15))
    # Anisotropic: 375 x 500 -> 224 x 224.
    mapped = resize_boxes(torch.tensor([[111, 108, 441, 193]]), (375, 500), (224, 224))
    expected = [111 * 224 / 500, 108 * 224 / 375, 442 * 224 / 500, 194 * 224 / 375]
    assert mapped[0].tolist() == pytest.approx(expected)


def test_boxes_in_original_pixels_edges_after_resize() -> None:
    # 400 x 400 original, 200 x 200 input: box columns 100..149 map to input columns 50..74.
    boxes = [[[100, 0, 149, 399]]]
    kwargs = dict(original_sizes=[(400, 400)], input_size=(200, 200), tolerance=0)
    for col, hit in ((49, False), (50, True), (74, True), (75, False)):
        result = pointing_game(peak_map(100, col, 200), boxes, **kwargs)
        assert result.hits.tolist() == [hit], col
    # Without original sizes the boxes are already in input pixels (inclusive).
    inside = pointing_game(peak_map(5, 149, 200), boxes, input_size=(200, 200), tolerance=0)
    outside = pointing_game(peak_map(5, 150, 200), boxes, input_size=(200, 200), tolerance=0)
    assert inside.hit_rate == 1.0 and outside.hit_rate == 0.0


def test_ties_first_in_row_major_or_any() -> None:
    saliency = torch.zeros(1, 32, 32)
    saliency[0, 0, 31] = 1.0  # first maximum in row-major order, far from the object
    saliency[0, 10, 10] = 1.0  # second maximum, on the object
    first = pointing_game(saliency, masks=single_pixel_object(), tolerance=0)
    assert first.points.tolist() == [[0, 31]] and first.hit_rate == 0.0
    anywhere = pointing_game(saliency, masks=single_pixel_object(), tolerance=0, ties="any")
    assert anywhere.hit_rate == 1.0
    peaks = max_point(torch.zeros(2, 3, 3))
    assert peaks.points.tolist() == [[0, 0], [0, 0]]
    assert peaks.n_maxima.tolist() == [9, 9] and peaks.values.tolist() == [0.0, 0.0]


def test_overall_and_mean_class_hit_rates() -> None:
    maps = torch.cat([peak_map(10, 10), peak_map(10, 10), peak_map(30, 30), peak_map(30, 30)])
    masks = single_pixel_object().expand(4, -1, -1)
    result = pointing_game(maps, masks=masks, labels=[0, 0, 1, 0], tolerance=0)
    assert result.hits.tolist() == [True, True, False, False]
    assert result.hit_rate == pytest.approx(0.5)
    assert result.per_class_hit_rate == pytest.approx({0: 2 / 3, 1: 0.0})
    assert result.mean_class_hit_rate == pytest.approx(1 / 3)


def test_patch_grid_maps_are_upsampled_and_multi_box() -> None:
    grid = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])  # bottom-right 16x16 patch of 32x32
    boxes = [[[0, 0, 3, 3], [16, 16, 20, 20]]]  # second box holds the patch's first pixel
    result = pointing_game(grid, boxes, input_size=(32, 32), tolerance=0)
    assert result.points.tolist() == [[16, 16]] and result.hit_rate == 1.0
    channels = grid[:, None].expand(1, 3, 2, 2)
    assert pointing_game(channels, boxes, input_size=(32, 32), tolerance=0).hit_rate == 1.0


def test_errors_name_the_argument() -> None:
    saliency = peak_map(1, 1)
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(saliency, masks=single_pixel_object(), tolerance=-1)
    with pytest.raises(ValueError, match="exactly one"):
        pointing_game(saliency)
    with pytest.raises(ValueError, match="boxes"):
        pointing_game(saliency, [[[5, 5, 1, 1]]])
    with pytest.raises(ValueError, match="labels"):
        pointing_game(saliency, masks=single_pixel_object(), labels=[1, 2])
    with pytest.raises(ValueError, match="ties"):
        pointing_game(saliency, masks=single_pixel_object(), ties="centre")
    with pytest.raises(ValueError, match="original_sizes"):
        pointing_game(saliency, [[[1, 1, 2, 2]]], original_sizes=[(4, 4), (4, 4)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda() -> None:
    result = pointing_game(peak_map(10, 25).cuda(), masks=single_pixel_object().cuda())
    assert result.hits.device.type == "cuda" and result.hit_rate == 1.0
