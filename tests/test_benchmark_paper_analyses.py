"""The paper-analyses benchmark: its configurations compute what they claim, and the report
writes tables and figures."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import paper_analyses
from captum_gradmask import GradMaskAttribution

from .models import tiny_hf_vit

needs_mask_api = pytest.mark.skipif(
    not hasattr(GradMaskAttribution, "binary_masks"),
    reason="GradMaskAttribution.binary_masks / mask_confidences are not in this checkout yet",
)


def _config(name: str, layer_count: int = 3) -> paper_analyses.Config:
    return next(c for c in paper_analyses.configs(layer_count) if c.name == name)


def test_configurations_are_ordered_by_cost_and_cover_the_paper() -> None:
    names = [c.name for c in paper_analyses.configs(12)]
    costs = [c.forwards for c in paper_analyses.configs(12)]
    assert costs == sorted(costs)
    assert {f"m={m}" for m in (1, 2, 3, 6, 8, 12, 16, 24, 48)} <= set(names)
    assert {"GradMask m=4", "first 6", "last 6", "all", "gradients alone", "masks alone",
            "random masks", "no clamp"} <= set(names)  # fmt: skip


def test_gradmask_configuration_is_the_library_map() -> None:
    model, image = tiny_hf_vit(), torch.randn(1, 3, 32, 32)
    gm = GradMaskAttribution(model)
    target = torch.tensor([3])
    grid = _config("m=2").explain(gm, image, target, 0)
    torch.testing.assert_close(grid, gm.attribute_grid(image, target, masks_per_layer=2))
    last = _config("last 1").explain(gm, image, target, 0)
    torch.testing.assert_close(last, gm.attribute_grid(image, target, layers=[2]))


@needs_mask_api
def test_ablation_configurations() -> None:
    model, image = tiny_hf_vit(), torch.randn(1, 3, 32, 32)
    gm = GradMaskAttribution(model)
    target = torch.tensor([3])
    found = gm.binary_masks(image, target, masks_per_layer=4)
    masks_alone = _config("masks alone").explain(gm, image, target, 0)
    torch.testing.assert_close(masks_alone, found.masks.float().sum(1))
    gradients = _config("gradients alone").explain(gm, image, target, 0)
    assert gradients.shape == (1, 4, 4) and bool((gradients >= 0).all())  # clamped scores
    random_a = _config("random masks").explain(gm, image, target, 0)
    random_b = _config("random masks").explain(gm, image, target, 0)
    torch.testing.assert_close(random_a, random_b)  # seeded
    full = gm.attribute_grid(image, target)
    assert not torch.allclose(random_a, full)
    # Each random mask keeps as many patches as its GradMask mask: the sums of mask sizes agree
    # when every confidence is replaced by 1.
    gm_ones = GradMaskAttribution(model)
    gm_ones.mask_confidences = lambda images, masks, targets: torch.ones(masks.shape[:2])
    sizes = _config("random masks").explain(gm_ones, image, target, 0)
    assert float(sizes.sum()) == float(found.masks.sum())


def test_report_writes_tables_and_figures(tmp_path) -> None:
    rows = []
    for config in paper_analyses.configs(12):
        for image in range(3):
            rows.append(
                {
                    "config": config.name,
                    "analyses": list(config.analyses),
                    "image": f"im{image}",
                    "seconds": 0.1 * (1 + config.forwards) + image,
                    "insertion": 0.5 + 0.01 * image,
                    "deletion": 0.1,
                    "pointing_game": float(image % 2),
                    **config.params,
                }
            )
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = paper_analyses.parse_args(["--report", "--output", str(tmp_path)])
    tables = paper_analyses.report(args)
    assert "| m=48 | 3 |" in tables and "| random masks | 3 |" in tables
    assert tables.count("| GradMask m=4 |") == 3  # in each analysis
    for name in ("masks_per_layer.png", "layers.png", "ablation.png"):
        assert (tmp_path / name).stat().st_size > 1000
