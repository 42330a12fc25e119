"""The benchmark runner end to end on a tiny random model and two synthetic images."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
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
    argv = _argv(data, model, output, methods="saliency,inputxgradient")
    argv[argv.index("--metrics") + 1] = "pointing"
    main(argv)
    rows = report.load_rows(output / "results.jsonl")
    assert len(rows) == 8 and sum(r["method"] == "inputxgradient" for r in rows) == 2


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
