"""The Vision DiffMask benchmarks: the faithfulness table on real images, the top-k masks, the
training curves and the label-free augmentation of the training script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks import diffmask_faithfulness, plot_diffmask_history
from benchmarks.train_diffmask import AugmentedImages, EpochShuffle, PlainImages

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


def test_augmentation_depends_on_seed_epoch_and_image_only() -> None:
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    data = AugmentedImages(images, size=32, seed=1)
    first = data[4]  # epoch 1, image 1
    torch.manual_seed(123)  # the global state does not matter, and is left alone
    state = torch.get_rng_state()
    assert torch.equal(data[4], first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(data[1], first)  # image 1 in epoch 0
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert first.min() >= -1 and first.max() <= 1
    plain = AugmentedImages(images, size=32, augment=False)
    assert torch.equal(plain[1], plain[4])
    sampler = EpochShuffle(3, seed=0)
    sampler.set_epoch(2)
    assert sorted(sampler) == [6, 7, 8]
    # --no-augment: the same sampler's indices give the plain images (every epoch).
    tensors = torch.randn(3, 3, 8, 8)
    loader = DataLoader(PlainImages(tensors), batch_size=3, sampler=sampler)
    (batch,) = list(loader)
    assert sorted(batch.sum((1, 2, 3)).tolist()) == sorted(tensors.sum((1, 2, 3)).tolist())


def test_training_curves_figure(tmp_path: Path) -> None:
    history = [
        {"step": 50 * e, "train_kl": 0.3 / e, "val_kl_hard": 0.5 / e, "val_kept_hard": 0.5,
         "val_agreement_hard": 0.8, "alpha_0": 20.0, "alpha_1": 20 + e, "alphas_mean": 20.5}
        for e in (1, 2, 3)
    ]  # fmt: skip
    (tmp_path / "history.json").write_text(json.dumps(history))
    figure = plot_diffmask_history.plot_history(plot_diffmask_history.load_history(tmp_path))
    assert len(figure.axes) == 4
    assert len(figure.axes[0].lines) >= 2  # train_kl and val_kl_hard (plus reference lines)
    plot_diffmask_history.main([str(tmp_path), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_fit_curves_figure_marks_the_kept_epoch(tmp_path: Path) -> None:
    """``--fit`` draws a distilled gate's probe fit from ``run.json``: both cross-entropies and
    the three held-out columns, with a vertical line at the epoch of lowest held-out loss;
    a run.json without a fit is refused."""
    rows = [
        {"epoch": e, "train_bce": 0.7 - 0.05 * e, "holdout_bce": abs(e - 3) + 0.5,
         "holdout_agreement": 0.6, "holdout_kept": 0.5, "holdout_teacher_kept": 0.5}
        for e in (1, 2, 3, 4, 5)
    ]  # fmt: skip
    figure = plot_diffmask_history.plot_fit(rows)
    left, right = figure.axes
    assert len(left.lines) == 3 and len(right.lines) == 4  # curves + the marker line
    assert list(left.lines[-1].get_xdata()) == [3, 3]  # the lowest held-out loss
    (tmp_path / "run.json").write_text(json.dumps({"fit": {"history": rows}}))
    plot_diffmask_history.main([str(tmp_path), "--fit", "--out", str(tmp_path / "fit.png")])
    assert (tmp_path / "fit.png").stat().st_size > 0
    (tmp_path / "run.json").write_text(json.dumps({"validation": {}}))
    with pytest.raises(SystemExit, match="no probe fit"):
        plot_diffmask_history.main([str(tmp_path), "--fit", "--out", str(tmp_path / "x.png")])


def test_refine_curves_figure_draws_every_split_and_the_kept_sharpening_epoch(
    tmp_path: Path,
) -> None:
    """A refined gate's ``run.json``: the sharpening fit (kept epoch marked) and, per
    placeholder epoch, the hard and sampled KL and the hard masks' top-1 and kept fraction of
    the training pairs, the held-out and the validation images."""
    sharpen = [{"epoch": e, "train_bce": 0.3 - 0.01 * e, "holdout_bce": abs(e - 2) + 0.2}
               for e in (1, 2, 3)]  # fmt: skip
    placeholder = [
        {"epoch": e, "train_kl_hard": 0.3, "train_kl_sampled": 0.4,
         **{f"{split}_{name}": 0.5 for split in ("holdout", "val")
            for name in ("kl", "kl_sampled", "top1", "kept")}}
        for e in (1, 2)
    ]  # fmt: skip
    before = {k: v for k, v in placeholder[0].items() if not k.startswith("train")}
    placeholder.insert(0, {**before, "epoch": 0})  # row 0: scores before fitting, no training
    run = {"sharpen": {"history": sharpen}, "placeholder": {"history": placeholder}}
    figure = plot_diffmask_history.plot_refine(run)
    sharp, kl, top = figure.axes
    assert list(sharp.lines[-1].get_xdata()) == [2, 2]  # the lowest held-out loss
    assert len(kl.lines) == 6 + 2 and len(top.lines) == 4 + 2  # curves + reference lines
    (tmp_path / "run.json").write_text(json.dumps(run))
    plot_diffmask_history.main([str(tmp_path), "--fit", "--out", str(tmp_path / "refine.png")])
    assert (tmp_path / "refine.png").stat().st_size > 0


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
