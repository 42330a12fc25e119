"""The speed benchmark end to end on the shared ViT-Tiny, at its smallest settings."""

from __future__ import annotations

import pytest

from benchmarks import speed

from .conftest import SHARED, needs_shared


@needs_shared
def test_speed_run_reports_every_variant_as_a_ratio_to_exact() -> None:
    args = speed.build_parser().parse_args(
        [
            "--models", "tiny", "--shared", str(SHARED), "--images", "1",
            "--images-per-call", "--masks", "4", "--batch-sizes", "64",
            "--floor-batches", "64", "--no-warmup", "--no-naive", "--compare", "chefer-gae",
        ]
    )  # fmt: skip
    rows = speed.run(args)
    methods = [(row["method"], row["settings"]) for row in rows]
    assert ("floor", "m=3, 99 masked images, best batch 64") in methods  # the head count
    for variant in ("exact", "fast group", "fast pad"):
        assert (f"gradmask {variant}", "m=4, batch 64") in methods
    exact = next(r for r in rows if r["method"] == "gradmask exact" and "m=4" in r["settings"])
    assert exact["ratio_to_exact"] == 1.0
    assert all(r["seconds_per_image"] > 0 for r in rows)
    assert "chefer-gae" in {r["method"] for r in rows}
    assert speed.to_markdown(rows).count("\n") == len(rows) + 1


def test_unknown_model_is_refused() -> None:
    with pytest.raises(SystemExit):
        speed.build_parser().parse_args(["--models", "huge"])
