"""The Vision DiffMask benchmarks: the faithfulness table on real images, the top-k masks, and
the training script's epoch order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks import diffmask_faithfulness
from benchmarks.train_diffmask import EpochShuffle, PlainImages

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared

CHECKPOINT = (
    Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoints" / "diffmask-vit-tiny"
)


def test_top_k_keep_keeps_each_rows_highest_scores() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 1.0, 3.0, 2.0]])
    keep = diffmask_faithfulness.top_k_keep(scores, torch.tensor([2, 1]))
    assert keep.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    assert diffmask_faithfulness.top_k_keep(scores, torch.tensor([0, 4])).sum().item() == 4


def test_faithfulness_table_pairs_every_row_with_the_gates_row_image_by_image() -> None:
    """The difference columns are means of per-image differences from the first row (so a
    constant shift has a zero-width interval), not differences of the rows' means."""
    results = {
        "diffmask": {"top1": [1.0, 0.0, 1.0, 0.0], "kl": [1.0, 2.0, 3.0, 9.0], "kept": [0.5] * 4},
        "other": {"top1": [1.0, 1.0, 1.0, 1.0], "kl": [0.5, 1.5, 2.5, 8.5], "kept": [0.5] * 4},
    }
    header, rule, gate, other = diffmask_faithfulness.format_table(results).split("\n")
    assert header.count("|") == rule.count("|") == gate.count("|") == other.count("|") == 7
    # The gate's own row has no difference.
    assert [c.strip() for c in gate.split("|")[5:7]] == ["", ""]
    top1, kl = (cell.strip() for cell in other.split("|")[5:7])
    assert kl == "-0.500 [-0.500, -0.500]"
    assert top1.startswith("+50.0 [")


def test_epoch_order_depends_on_seed_and_epoch_only_and_indexes_the_plain_images() -> None:
    sampler = EpochShuffle(3, seed=0)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == [6, 7, 8]
    torch.manual_seed(123)  # the global random state does not matter
    assert list(sampler) == order
    sampler.set_epoch(3)
    assert sorted(sampler) == [9, 10, 11]
    tensors = torch.randn(3, 3, 8, 8)
    loader = DataLoader(PlainImages(tensors), batch_size=3, sampler=sampler)
    (batch,) = list(loader)
    assert sorted(batch.sum((1, 2, 3)).tolist()) == sorted(tensors.sum((1, 2, 3)).tolist())


@pytest.mark.slow
@needs_shared
@pytest.mark.skipif(not (CHECKPOINT / "gate.json").is_file(), reason="no committed checkpoint")
def test_faithfulness_table_on_two_validation_images(tmp_path: Path) -> None:
    out = tmp_path / "faithfulness.json"
    table = diffmask_faithfulness.main(
        [
            "--model", str(HF_VIT_TINY), "--data", str(IMAGENET_SAMPLE), "--gate",
            str(CHECKPOINT), "--first", "450", "--count", "2", "--batch-size", "2",
            "--out", str(out), "--no-progress",
        ]
    )  # fmt: skip
    rows = json.loads(out.read_text())["per_image"]
    assert list(rows) == ["diffmask", "gradmask-m4", "chefer-gae", "random", "none kept"]
    kept = rows["diffmask"]["kept"]
    for name in ("gradmask-m4", "chefer-gae", "random"):  # the same number of patches
        assert rows[name]["kept"] == pytest.approx(kept)
        assert len(rows[name]["kl"]) == 2 and min(rows[name]["kl"]) >= 0
    assert rows["none kept"]["kept"] == [0.0, 0.0]
    assert table.count("\n") == 6  # header, rule and 5 rows
