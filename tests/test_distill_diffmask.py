"""The shipped DiffMask gate's recipe: per-image solutions as targets, probes fitted to them,
the refinement, and the script's checkpoints (trainer folders at step 0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import distill_diffmask
from benchmarks._common import DEFAULT_GATE, load_split
from captum_gradmask.adapters import get_adapter
from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig, VisionDiffMaskTrainer

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared
from .models import tiny_hf_vit


def test_fitted_probes_reproduce_a_mask_the_states_determine() -> None:
    """Targets that a probe can read off the states (keep a token where its first channel of
    the last state is positive): the fitted gate's hard mask agrees with them on held-out
    images, far above the untrained gate, and the gate ends at the best held-out epoch."""
    torch.manual_seed(0)
    gate = DiffMaskGate(GateConfig(hidden_size=8, num_states=3, gate_hidden=8))
    states = torch.randn(3, 40, 16, 8)
    targets = (states[-1, ..., 0] > 0).float()
    with torch.no_grad():
        _, before = distill_diffmask._cross_entropy(gate, states[:, 36:], targets[36:])
    start = ((before >= 0.5) == (targets[36:] >= 0.5)).float().mean()
    history = distill_diffmask.fit_probes(gate, states, targets, epochs=40, lr=1e-2, holdout=0.1)
    assert len(history) == 40
    best = min(history, key=lambda row: row["holdout_bce"])
    assert best["holdout_agreement"] > 0.9 and best["holdout_agreement"] > start + 0.2
    with torch.no_grad():
        loss, keep = distill_diffmask._cross_entropy(gate, states[:, 36:], targets[36:])
    assert float(loss) == pytest.approx(best["holdout_bce"], rel=1e-5)  # the best epoch's weights
    assert ((keep >= 0.5) == (targets[36:] >= 0.5)).float().mean() == best["holdout_agreement"]


def test_views_of_the_training_images_are_trained_on_and_held_out_ones_are_not() -> None:
    """The training images alone carry no information (every target 1); their views carry the
    rule (keep a token where its first channel of the last state is positive). Fitted with the
    views, the held-out images follow the rule; without them, they do not. A view of a held-out
    image that contradicts the rule changes nothing (it is never trained on)."""
    torch.manual_seed(0)
    states = torch.randn(3, 40, 16, 8)
    states[-1, :36, :, 0] = states[-1, :36, :, 0].abs()  # training images: all positive
    targets = (states[-1, ..., 0] > 0).float()
    view_states = torch.randn(3, 40, 16, 8)
    view_targets = (view_states[-1, ..., 0] > 0).float()
    view_targets[36:] = 1 - view_targets[36:]  # held-out views: the opposite rule

    def fitted(views):  # held-out agreement with the rule at the best epoch
        torch.manual_seed(1)
        gate = DiffMaskGate(GateConfig(hidden_size=8, num_states=3, gate_hidden=8))
        history = distill_diffmask.fit_probes(
            gate, states, targets, epochs=40, lr=1e-2, holdout=0.1, views=views
        )
        return history

    alone, viewed = fitted(()), fitted([(view_states, view_targets)])
    assert alone[0]["train_pairs"] == 36 and viewed[0]["train_pairs"] == 72
    assert max(row["holdout_agreement"] for row in alone) < 0.75
    assert min(viewed, key=lambda row: row["holdout_bce"])["holdout_agreement"] > 0.9
    with pytest.raises(ValueError, match=r"`views\[0\]`"):
        distill_diffmask.fit_probes(
            DiffMaskGate(GateConfig(hidden_size=8, num_states=3, gate_hidden=8)),
            states, targets, views=[(view_states[:, :5], view_targets[:5])],
        )  # fmt: skip


def test_mirrored_targets_follow_the_mirrored_image() -> None:
    """A patch's target moves to the mirrored column of its row; mirroring twice is the
    identity; a grid of the wrong size is refused by name."""
    targets = torch.zeros(2, 12)
    targets[0, 1 * 4 + 0] = 1  # row 1, column 0 of a 3 x 4 grid
    targets[1, 2 * 4 + 1] = 0.7  # row 2, column 1
    mirrored = distill_diffmask.mirror_targets(targets, (3, 4))
    assert mirrored[0].nonzero().flatten().tolist() == [1 * 4 + 3]
    assert mirrored[1].nonzero().flatten().tolist() == [2 * 4 + 2]
    assert mirrored[1, 2 * 4 + 2] == pytest.approx(0.7)
    assert torch.equal(distill_diffmask.mirror_targets(mirrored, (3, 4)), targets)
    with pytest.raises(ValueError, match="`grid`"):
        distill_diffmask.mirror_targets(targets, (4, 4))


def test_locations_and_their_scores_agree_and_targets_follow_the_gate() -> None:
    torch.manual_seed(0)
    model = tiny_hf_vit().eval()
    gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))
    images = torch.randn(3, 3, 32, 32)
    locations, scores = distill_diffmask.optimise_locations(
        model, gate, images, steps=5, batch_size=2
    )
    assert locations.shape == (3, 16) and not locations.requires_grad
    targets = distill_diffmask.keep_targets(gate, locations)
    assert targets.min() >= 0 and targets.max() <= 1
    assert (targets >= 0.5).float().mean(-1).tolist() == scores["kept"]
    states = distill_diffmask.patch_states(model, images, batch_size=2)
    assert states.shape == (gate.config.num_states, 3, 16, gate.config.hidden_size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_teacher_and_states_run_on_cuda_and_return_cpu_locations() -> None:
    """The per-image optimisation on CUDA images: locations come back on the CPU (a shard),
    scores agree with them, and the states the probes read are the model's, on its device."""
    torch.manual_seed(0)
    model = tiny_hf_vit().eval().cuda()
    gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model))).cuda()
    images = torch.randn(3, 3, 32, 32)
    locations, scores = distill_diffmask.optimise_locations(
        model, gate, images.cuda(), steps=5, batch_size=2
    )
    assert locations.device.type == "cpu" and locations.shape == (3, 16)
    targets = distill_diffmask.keep_targets(gate.cpu(), locations)
    assert (targets >= 0.5).float().mean(-1).tolist() == scores["kept"]
    states = distill_diffmask.patch_states(model, images, batch_size=2)  # moved a batch at a time
    assert states.device.type == "cuda"
    torch.testing.assert_close(
        states.cpu(), distill_diffmask.patch_states(model.cpu(), images), atol=1e-4, rtol=1e-4
    )


def test_shards_of_other_seeds_are_averaged_and_mixed_settings_refused() -> None:
    torch.manual_seed(0)
    gate = DiffMaskGate(GateConfig(hidden_size=8, num_states=2, gate_hidden=4))
    settings = {"filler_gate": "FILLER", "steps": "3", "seed": "0"}

    def shard(first: int, count: int, seed: str, **changed: str) -> dict:
        return {
            "first": first,
            "locations": torch.randn(count, 5),
            "settings": {**settings, "seed": seed, **changed},
        }

    a, b, c = shard(4, 3, "0"), shard(4, 3, "1"), shard(0, 2, "0")
    firsts, counts, targets = distill_diffmask.combine_shards([a, b, c], gate)
    assert firsts == [0, 4] and counts == [2, 3] and targets.shape == (5, 5)
    expected = (
        distill_diffmask.keep_targets(gate, a["locations"])
        + distill_diffmask.keep_targets(gate, b["locations"])
    ) / 2
    torch.testing.assert_close(targets[2:], expected)
    torch.testing.assert_close(targets[:2], distill_diffmask.keep_targets(gate, c["locations"]))
    with pytest.raises(SystemExit, match="different settings"):
        distill_diffmask.combine_shards([a, shard(4, 3, "1", steps="4")], gate)
    with pytest.raises(SystemExit, match="same seed twice"):
        distill_diffmask.combine_shards([a, shard(4, 3, "0")], gate)
    with pytest.raises(SystemExit, match="different image counts"):
        distill_diffmask.combine_shards([a, shard(4, 2, "1")], gate)

    # Shards that record the earlier script's options at their neutral values, or made on
    # another machine (another path to the same model and filler gate), combine with new ones;
    # another model does not, nor a shard of an option this script no longer has.
    new = {"model": "/a/shared/vit-tiny", "filler_gate": "/a/ckpt/gate", "steps": "3", "seed": "0"}
    old = {**new, **distill_diffmask.NEUTRAL_SETTINGS, "seed": "1"}
    old.update(model="/b/vit-tiny", filler_gate="ckpt/gate")
    distill_diffmask.check_settings([{"settings": new}, {"settings": old}])
    with pytest.raises(SystemExit, match="different settings"):
        distill_diffmask.check_settings([{"settings": new}, {"settings": {**old, "model": "/b"}}])
    with pytest.raises(SystemExit, match="method='rise'"):
        distill_diffmask.check_settings([{"settings": {**old, "method": "rise"}}])


@pytest.mark.slow
@needs_shared
def test_teacher_and_fit_write_a_resumable_checkpoint(tmp_path: Path) -> None:
    shard = tmp_path / "teacher.pt"
    common = ["--model", str(HF_VIT_TINY), "--data", str(IMAGENET_SAMPLE), "--no-progress"]
    distill_diffmask.main(["teacher", *common, "--count", "2", "--steps", "3", "--out", str(shard)])
    saved = torch.load(shard, weights_only=True)
    assert saved["first"] == 0 and saved["locations"].shape == (2, 196)
    assert saved["settings"]["steps"] == "3"
    out = tmp_path / "gate"
    fit_args = ["fit", *common, "--teachers", str(shard), "--epochs", "2", "--holdout", "0.5"]
    distill_diffmask.main(
        [*fit_args, "--mirror", "--val-first", "450", "--val", "2", "--out", str(out)]
    )
    run = json.loads((out / "run.json").read_text())
    assert run["teacher_images"] == 2 and len(run["fit"]["history"]) == 2
    # --mirror: the one training image and its mirror image
    assert run["fit"]["mirror"] and run["fit"]["history"][0]["train_pairs"] == 2
    assert {"val_kl_hard", "val_kept_hard", "val_agreement_hard"} <= set(run["validation"])
    filler = DiffMaskGate.load(saved["settings"]["filler_gate"])
    gate = DiffMaskGate.load(out)
    assert torch.equal(gate.placeholder, filler.placeholder)  # the teacher's filler
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    trainer = VisionDiffMaskTrainer(model, out)  # resumes: step 0, the fitted probes
    assert (
        trainer.step == 0 and trainer.history[-1]["val_kl_hard"] == run["validation"]["val_kl_hard"]
    )
    for name, value in gate.state_dict().items():
        assert torch.equal(trainer.gate.state_dict()[name], value), name
    with pytest.raises(SystemExit, match="already holds"):
        distill_diffmask.main([*fit_args, "--out", str(out)])
    other = tmp_path / "other.pt"
    distill_diffmask.main(["teacher", *common, "--count", "2", "--steps", "2", "--out", str(other)])
    with pytest.raises(SystemExit, match="different settings"):
        distill_diffmask.main(["fit", *common, "--teachers", str(shard), str(other), "--out", "x"])


@pytest.mark.slow
@needs_shared
def test_training_script_trains_the_filler_gate_with_the_authors_objective(tmp_path: Path) -> None:
    """``train_diffmask`` (the recipe's first step) writes a trainer checkpoint that resumes:
    one epoch, then the same command with ``--epochs 2`` continues to the second."""
    from benchmarks import train_diffmask

    args = [
        "--model", str(HF_VIT_TINY), "--data", str(IMAGENET_SAMPLE), "--train", "4",
        "--val", "2", "--batch-size", "2", "--threads", "1", "--no-progress",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    train_diffmask.main([*args, "--epochs", "1"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["steps"] == 2 and run["config"]["alpha_init"] == 20.0
    assert run["config"]["warmup_steps"] == 10 and run["config"]["lookahead_k"] == 0
    train_diffmask.main([*args, "--epochs", "2"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["epochs"] == 2 and run["steps"] == 4
    assert {"val_kl_hard", "val_kept_hard"} <= set(run["last_epoch"])


def test_calibration_sets_the_kept_fraction_of_the_hard_mask() -> None:
    torch.manual_seed(0)
    gate = DiffMaskGate(GateConfig(hidden_size=8, num_states=3, gate_hidden=4))
    states = torch.randn(3, 12, 50, 8)
    before = [float(p.offset.detach()) for p in gate.probes]
    for fraction in (0.3, 0.55, 0.8):
        shift = distill_diffmask.calibrate_keep_fraction(gate, states, fraction)
        kept = (gate.keep_probability(list(states)) >= 0.5).float().mean()
        assert float(kept) == pytest.approx(fraction, abs=1 / 600)  # within one patch
        after = [float(p.offset.detach()) for p in gate.probes]
        assert after == pytest.approx([b + shift for b in before])  # one shift for all
        before = after
    with pytest.raises(ValueError, match="fraction"):
        distill_diffmask.calibrate_keep_fraction(gate, states, 1.0)


def test_placeholder_fit_lowers_the_kl_of_the_gates_masks_and_changes_nothing_else() -> None:
    """A placeholder started far from any patch embedding: fitting it lowers the KL of the
    gate's hard and sampled masks on the held-out images (never trained on); the probes, the
    model and every ``requires_grad`` flag are left as they were."""
    model = tiny_hf_vit()
    with torch.no_grad():  # a random model's output hardly depends on its input: sharpen it
        model.classifier.weight.mul_(100.0)
    gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))
    images = torch.randn(24, 3, 32, 32)
    distill_diffmask.calibrate_keep_fraction(
        gate, distill_diffmask.patch_states(model, images), 0.5
    )
    with torch.no_grad():
        gate.placeholder.normal_(0, 3.0)
    probes = {k: v.clone() for k, v in gate.state_dict().items() if k != "placeholder"}
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    start = gate.placeholder.detach().clone()
    history = distill_diffmask.fit_placeholder(model, gate, images, epochs=8, lr=0.1, holdout=0.25)
    before = history[0]  # the scores before fitting
    assert [row["epoch"] for row in history] == list(range(9))
    assert 0.1 < history[-1]["holdout_kept"] < 0.9
    assert history[-1]["holdout_kl"] < 0.6 * before["holdout_kl"]
    assert history[-1]["holdout_kl_sampled"] < 0.5 * before["holdout_kl_sampled"]
    assert history[-1]["train_kl_hard"] < history[1]["train_kl_hard"]
    assert not torch.equal(gate.placeholder, start)
    for name, value in probes.items():
        assert torch.equal(gate.state_dict()[name], value), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert all(p.requires_grad for p in gate.parameters())
    assert all(p.grad is None for p in (*gate.parameters(), *model.parameters()))


@pytest.mark.slow
@needs_shared
def test_refine_calibrates_sharpens_and_fits_the_placeholder_into_a_checkpoint(
    tmp_path: Path,
) -> None:
    from transformers import ViTForImageClassification

    common = ["--model", str(HF_VIT_TINY), "--data", str(IMAGENET_SAMPLE), "--no-progress"]
    small = [*common, "--count", "4", "--holdout", "0.25", "--val-first", "450", "--val", "2"]
    source = DiffMaskGate.load(DEFAULT_GATE)
    out = tmp_path / "refined"
    distill_diffmask.main(
        ["refine", *small, "--keep-fraction", "0.5", "--sharpen-epochs", "2", "--epochs", "1",
         "--out", str(out)]
    )  # fmt: skip
    run = json.loads((out / "run.json").read_text())
    assert len(run["sharpen"]["history"]) == 2 and len(run["placeholder"]["history"]) == 2
    assert len(run["calibration"]["offset_shifts"]) == 2  # before and after sharpening
    row = run["placeholder"]["history"][1]
    assert {"holdout_kl", "holdout_kl_sampled", "val_kl", "val_top1", "val_kept"} <= set(row)
    model = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    gate = DiffMaskGate.load(out)
    states = distill_diffmask.patch_states(model, load_split(
        str(IMAGENET_SAMPLE), 0, 4))  # fmt: skip
    kept = float((gate.keep_probability(list(states)) >= 0.5).float().mean())
    assert kept == pytest.approx(0.5, abs=1 / 784)  # calibrated on the 4 training images
    assert not torch.equal(gate.placeholder, source.placeholder)
    trainer = VisionDiffMaskTrainer(model, out)  # a trainer checkpoint at step 0
    assert trainer.step == 0 and trainer.history[-1]["val_kl_hard"] == pytest.approx(
        run["validation"]["val_kl_hard"]
    )
    with pytest.raises(SystemExit, match="already holds"):
        distill_diffmask.main(["refine", *small, "--out", str(out)])
    # Without calibration or sharpening only the placeholder moves.
    plain = tmp_path / "plain"
    distill_diffmask.main(["refine", *small, "--epochs", "1", "--out", str(plain)])
    fitted = DiffMaskGate.load(plain).state_dict()
    for name, value in source.state_dict().items():
        assert torch.equal(fitted[name], value) != (name == "placeholder"), name
