"""The benchmark runner end to end on a tiny random model and two synthetic images."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import report
from benchmarks.run import main, parse_args

from .models import tiny_hf_vit

METHODS = "gradmask-m1,saliency,layer-gradcam,no-such-module"


def _tiny_dataset(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [("file", "label", "synset", "xmin", "ymin", "xmax", "ymax")]
    for i, (label, box) in enumerate([(2, (4, 6, 30, 40)), (5, (20, 10, 47, 35))]):
        name = f"images/img_{i}.png"
        pixels = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / name)
        rows.append((name, label, f"n0000000{label}", *box))
    with (root / "annotations.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    (root / "synsets.txt").write_text("\n".join(f"n0000000{i} class{i}" for i in range(7)))
    return root


def _tiny_model(root: Path) -> Path:
    from transformers import ViTImageProcessor

    tiny_hf_vit().save_pretrained(root)
    ViTImageProcessor(size={"height": 32, "width": 32}, resample=3).save_pretrained(root)
    return root


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    return _tiny_dataset(tmp_path / "data"), _tiny_model(tmp_path / "model")


def _argv(data: Path, model: Path, output: Path, methods: str = METHODS) -> list[str]:
    return [
        "--model", str(model), "--data", str(data), "--output", str(output),
        "--images", "2", "--methods", methods, "--metrics", "all",
        "--captum-metrics-images", "1", "--sensitivity-samples", "2",
        "--batch-size", "16", "--bootstrap", "200", "--quiet", "--device", "cpu",
    ]  # fmt: skip


def test_runner_end_to_end_and_resume(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from captum_gradmask import registry

    # A registered method whose module is missing is skipped with a message, not fatal.
    missing = registry.MethodSpec("no-such-module", "captum_gradmask.methods.not_there", "Nothing")
    monkeypatch.setitem(registry.METHODS, "no-such-module", missing)
    data, model = setup
    output = tmp_path / "out"
    main(_argv(data, model, output))
    assert "skipping no-such-module" in capsys.readouterr().err

    rows = report.load_rows(output / "results.jsonl")
    methods = ["gradmask-m1", "saliency", "layer-gradcam"]
    assert sorted((r["image"], r["method"]) for r in rows) == sorted(
        (f"img_{i}.png", m) for i in range(2) for m in methods
    )
    for row in rows:
        assert row["target"] == row["label"]  # ground truth by default
        # The first call of each method is timed apart (warm-up), the others count.
        timed = "warmup_seconds" if row["index"] == 0 else "seconds"
        assert row[timed] > 0 and row["seconds" if row["index"] == 0 else "warmup_seconds"] is None
        for key in ("insertion_rise", "deletion_rise", "insertion_notebook", "adcc"):
            assert 0.0 <= row[key] <= 100.0
        assert row["pointing_0"] in (0.0, 1.0) and row["pointing_15"] >= row["pointing_0"]
        # Each curve under every tie policy; the spread covers the stable and reference AUCs.
        for key in ("insertion_rise", "deletion_rise", "insertion_notebook", "deletion_notebook"):
            gap = abs(row[f"{key}_stable"] - row[f"{key}_reference"])
            assert row[f"{key}_tie_spread"] >= gap - 1e-9
        # Captum metrics only on the first image.
        assert ("infidelity" in row) == (row["index"] == 0)
        assert ("sensitivity" in row) == (row["index"] == 0)
    config = json.loads((output / "config.json").read_text())
    assert "no-such-module" in config["skipped"]

    # The table: one row per method, each cell "mean [low, high]" with low <= mean <= high.
    table = (output / "table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [line.split("|")[1].strip() for line in lines[1:]] == methods
    cells = re.findall(r"(-?[\d.e+-]+) \[(-?[\d.e+-]+), (-?[\d.e+-]+)\]", table)
    assert len(cells) >= 3 * 10
    for mean, low, high in cells:
        assert float(low) <= float(mean) + 1e-9 and float(mean) <= float(high) + 1e-9
    ties = (output / "ties.md").read_text()
    assert "Ins. AUC (RISE) stable ties" in ties and "Ins. AUC (RISE) reference ties" in ties
    assert "Del. AUC (GM nb, %) tie spread" in table and "stable ties" not in table
    saliency = [r["insertion_notebook"] for r in rows if r["method"] == "saliency"]
    summary = report.summarize(rows, methods)
    assert summary["saliency"]["insertion_notebook"][0] == pytest.approx(np.mean(saliency))
    with (output / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    grid = Image.open(output / "grid.png")
    assert grid.size[0] > grid.size[1] > 50  # 2 rows, 4 columns

    # Resume: the same command computes nothing new; a new method only adds its rows.
    before = (output / "results.jsonl").read_text()
    main(_argv(data, model, output))
    assert (output / "results.jsonl").read_text() == before
    argv = _argv(data, model, output, methods="saliency,input-x-gradient")
    argv[argv.index("--metrics") + 1] = "pointing"
    main(argv)
    rows = report.load_rows(output / "results.jsonl")
    assert len(rows) == 8 and sum(r["method"] == "input-x-gradient" for r in rows) == 2


def test_predicted_target_and_truncated_line(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = setup
    output = tmp_path / "out"
    output.mkdir()
    # A line cut by a crash is ignored, and its pair is computed again.
    (output / "results.jsonl").write_text('{"image": "img_0.png", "method": "sali')
    argv = [*_argv(data, model, output, methods="saliency"), "--target", "predicted"]
    argv[argv.index("--metrics") + 1] = "pointing"
    main(argv)
    rows = report.load_rows(output / "results.jsonl")
    assert len(rows) == 2
    assert all(r["target"] == r["predicted"] for r in rows)
    assert all("adcc" not in r and "pointing_15" in r for r in rows)


def test_parse_args_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--data", str(tmp_path), "--model", "x", "--images", "0"])


def test_bootstrap_ci_is_seeded_and_covers_the_mean() -> None:
    values = [0.1, 0.5, 0.2, 0.9, 0.4]
    first = report.bootstrap_ci(values, n_resamples=500, seed=3)
    assert first == report.bootstrap_ci(values, n_resamples=500, seed=3)
    mean, low, high = first
    assert mean == pytest.approx(np.mean(values)) and low < mean < high
    assert min(values) <= low and high <= max(values)


def test_resume_refuses_a_folder_made_with_other_settings(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    data, model = setup
    output = tmp_path / "out"
    argv = _argv(data, model, output, methods="saliency")
    argv[argv.index("--metrics") + 1] = "pointing"
    main(argv)
    before = (output / "results.jsonl").read_text(), (output / "config.json").read_text()
    for change in (["--target", "predicted"], ["--tie-samples", "3"], ["--seed", "1"]):
        with pytest.raises(SystemExit, match=change[0].strip("-").replace("-", "_")):
            main([*argv, *change])
        # Nothing was added or overwritten.
        assert ((output / "results.jsonl").read_text(), (output / "config.json").read_text()) == (
            before
        )
    # A folder with results but no recorded settings (made by an older runner) is refused too.
    config = json.loads(before[1])
    del config["experiment"]
    (output / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="no recorded settings"):
        main(argv)


def test_amp_dtype_reaches_gradmask_and_is_recorded(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    from benchmarks.run import _overrides, experiment_settings

    data, model = setup
    argv = _argv(data, model, tmp_path / "out", methods="gradmask-m1")
    plain = parse_args(argv)
    amp = parse_args([*argv, "--amp-dtype", "bf16"])
    assert _overrides("gradmask-m1", amp)["amp_dtype"] is torch.bfloat16
    assert "amp_dtype" not in _overrides("saliency", amp)  # not a GradMask setting
    recorded = experiment_settings(amp, {"gradmask-m1": None})["methods"]["gradmask-m1"]
    assert recorded["amp_dtype"] == "torch.bfloat16" and "compile" not in recorded
    # the default is left out, so folders written before the option existed still resume
    assert (
        "amp_dtype"
        not in experiment_settings(plain, {"gradmask-m1": None})["methods"]["gradmask-m1"]
    )
    argv[argv.index("--metrics") + 1] = "pointing"
    main(argv)
    with pytest.raises(SystemExit, match="settings of gradmask-m1"):
        main([*argv, "--amp-dtype", "fp16"])


def test_a_runner_row_equals_direct_library_calls(setup: tuple[Path, Path], tmp_path: Path) -> None:
    import torch

    from benchmarks.run import model_probabilities
    from captum_gradmask.data import load_imagenet_sample
    from captum_gradmask.metrics import adcc, gradmask_notebook_deletion, pointing_game
    from captum_gradmask.models import load_model
    from captum_gradmask.registry import build_method

    data, model_dir = setup
    output = tmp_path / "out"
    argv = _argv(data, model_dir, output, methods="gradmask-m1")
    argv[argv.index("--metrics") + 1] = "notebook,pointing,adcc"
    main([*argv, "--tie-samples", "4"])
    row = next(r for r in report.load_rows(output / "results.jsonl") if r["index"] == 1)

    model, preprocess = load_model(str(model_dir))
    record = load_imagenet_sample(data, limit=2)[1]
    image = preprocess.preprocess(record.path)[None]
    method = build_method("gradmask-m1", model)
    maps = method.attribute(image, target=record.label)
    assert row["target"] == record.label
    with torch.no_grad():
        probability = float(model_probabilities(model, image)[record.label])
    assert row["target_probability"] == pytest.approx(probability, rel=1e-6)
    options = dict(perturbations_per_eval=16)
    curves = {
        ties: gradmask_notebook_deletion(model, image, maps, record.label, ties=ties, **options)
        for ties in ("stable", "reference")
    }
    random = gradmask_notebook_deletion(
        model, image, maps, record.label, ties="random", tie_samples=4, seed=0, **options
    )
    assert row["deletion_notebook"] == pytest.approx(float(random.auc[0]), rel=1e-6)
    for ties, curve in curves.items():
        assert row[f"deletion_notebook_{ties}"] == pytest.approx(float(curve.auc[0]), rel=1e-6)
    every_order = [float(c.auc[0]) for c in curves.values()] + random.tie_auc[0].tolist()
    assert row["deletion_notebook_tie_spread"] == pytest.approx(
        max(every_order) - min(every_order), abs=1e-6
    )
    game = pointing_game(
        maps,
        [record.boxes],
        [record.label],
        original_sizes=[record.original_size],
        input_size=(32, 32),
        tolerance=15,
    )
    assert row["pointing_15"] == float(game.hits[0])

    def explain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return method.attribute(x, target=t)

    scores = adcc(
        model, image, maps, record.label, explanation_func=explain, internal_batch_size=16
    )
    assert row["adcc"] == pytest.approx(scores.summary()["adcc"], rel=1e-5)
    assert row["average_drop"] == pytest.approx(scores.summary()["average_drop"], rel=1e-5)


def test_runner_takes_a_zero_shot_classifier(tmp_path: Path) -> None:
    """A CLIP checkpoint with one prompt per dataset class (class i = line i) and a template."""
    from .models import save_zero_shot_checkpoint

    data = _tiny_dataset(tmp_path / "data")
    model = save_zero_shot_checkpoint(tmp_path / "clip")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {'abcdefg'[i]}" for i in range(7)))
    argv = _argv(data, model, tmp_path / "out", methods="gradmask-m1,rollout")
    argv = [a for a in argv if a not in ("all",)]
    argv[argv.index("--metrics") + 1 : argv.index("--metrics") + 1] = ["notebook"]
    main([*argv, "--labels-file", str(labels), "--template", "a photo of a {}."])
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()]
    assert {row["method"] for row in rows} == {"gradmask-m1", "rollout"}
    assert {row["label"] for row in rows} == {2, 5}


def test_first_image_selects_later_files(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """``--first-image 2`` starts at the sample's second file (1-based); 0 is refused."""
    data, model = setup
    output = tmp_path / "second"
    argv = _argv(data, model, output, methods="saliency")
    argv[argv.index("--images") + 1] = "1"
    main([*argv, "--first-image", "2", "--metrics", "pointing"])
    rows = report.load_rows(output / "results.jsonl")
    assert [(r["image"], r["index"], r["label"]) for r in rows] == [("img_1.png", 0, 5)]
    with pytest.raises(SystemExit):
        parse_args([*argv, "--first-image", "0"])
