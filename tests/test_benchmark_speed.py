"""The speed benchmark end to end on the shared ViT-Tiny, at its smallest settings."""

from __future__ import annotations

import pytest
import torch

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


def test_precision_rows_on_a_tiny_model(capsys) -> None:
    from .models import tiny_hf_vit

    args = speed.build_parser().parse_args(
        [
            "--images", "1", "--images-per-call", "--masks", "1", "--batch-sizes", "16",
            "--floor-batches", "16", "--no-warmup", "--no-naive", "--compare",
            "--precisions", "fp32", "tf32", "bf16", "fp16",
        ]
    )  # fmt: skip
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = speed.measure_model("tiny", tiny_hf_vit(), images, args, torch.device("cpu"))
    methods = [(row["method"], row["settings"]) for row in rows]
    for name in ("bf16", "fp16"):
        assert ("floor", f"m=1, 6 masked images, best batch 6, {name}") in methods
        assert ("gradmask exact", f"m=1, batch 16, {name}") in methods
        assert ("gradmask fast pad", f"m=1, batch 16, {name}") in methods
    assert not any("tf32" in settings for _, settings in methods)  # CUDA only
    assert "skipping tf32" in capsys.readouterr().out
    assert torch.backends.cuda.matmul.allow_tf32 is False  # the global flag is left alone


def test_tf32_rows_restore_the_global_flags() -> None:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with speed.precision("tf32") as amp_dtype:
        assert amp_dtype is None and torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    with speed.precision("bf16") as amp_dtype:
        assert amp_dtype is torch.bfloat16
