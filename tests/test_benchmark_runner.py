"""The benchmark driver (explain-dataset, evaluate, compare) end to end on a tiny random model."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.run import gate_training_files, main, method_options, parse_args, write_source
from captum_gradmask.store import open_maps

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


def _argv(
    data: Path, model: Path, output: Path, methods: str = METHODS, metrics: str = "all"
) -> list[str]:
    return [
        "--model", str(model), "--data", str(data), "--output", str(output),
        "--images", "2", "--methods", methods, "--metrics", metrics,
        "--sensitivity-samples", "2", "--tie-samples", "3",
        "--metric-perturbations-per-eval", "16", "--bootstrap", "200", "--quiet",
        "--device", "cpu",
    ]  # fmt: skip


def _rows(output: Path) -> list[dict[str, str]]:
    with (output / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def _refuse_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make explaining or evaluating any image an error (a resumed run must do neither)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run explained or evaluated an image again")

    monkeypatch.setattr("captum_gradmask.explain_dataset._explain_batch", refuse)
    monkeypatch.setattr("captum_gradmask.evaluation._evaluate_batch", refuse)


def test_driver_end_to_end_and_resume(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from captum_gradmask import registry

    # A registered method whose module is missing is skipped with a message, not fatal.
    missing = registry.MethodSpec("no-such-module", "captum_gradmask.methods.not_there", "Nothing")
    monkeypatch.setitem(registry.METHODS, "no-such-module", missing)
    data, model = setup
    output = tmp_path / "out"
    argv = [*_argv(data, model, output), "--reference", "saliency", "--time-images", "1"]
    main(argv)
    assert "skipping no-such-module" in capsys.readouterr().err

    methods = ["gradmask-m1", "saliency", "layer-gradcam"]
    assert sorted(p.name for p in (output / "stores").iterdir()) == sorted(
        f"{m}.zarr" for m in methods
    )
    store = open_maps(output / "stores" / "saliency.zarr")
    assert sorted(k for k, _ in store.group.groups()) == sorted(
        ["notebook", "rise", "pointing", "adcc", "captum"]
    )  # one evaluation per metric group
    rows = _rows(output)
    assert sorted((r["image"], r["method"]) for r in rows) == sorted(
        (f"img_{i}.png", m) for i in range(2) for m in methods
    )
    for row in rows:
        assert int(row["target"]) == (2, 5)[int(row["index"])]  # ground truth by default
        for key in ("insertion_rise", "deletion_rise", "insertion_notebook", "adcc"):
            assert 0.0 <= float(row[key]) <= 100.0
        assert row["pointing_0"] in ("0", "1") and row["pointing_15"] >= row["pointing_0"]
        for key in ("insertion_rise", "deletion_rise", "insertion_notebook", "deletion_notebook"):
            gap = abs(float(row[f"{key}_stable"]) - float(row[f"{key}_reference"]))
            assert float(row[f"{key}_tie_spread"]) >= gap * (1 - 1e-5) - 1e-6
        assert float(row["infidelity"]) >= 0 and float(row["sensitivity"]) >= 0
    config = json.loads((output / "config.json").read_text())
    assert "no-such-module" in config["skipped"]

    # table.md: one row per method, "mean [low, high]" cells with low <= mean <= high
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
    saliency = [float(r["insertion_notebook"]) for r in rows if r["method"] == "saliency"]
    mean = next(line for line in lines if line.startswith("| saliency")).split("|")[3]
    assert float(mean.split("[")[0]) == pytest.approx(np.mean(saliency), rel=2e-3)
    assert "| gradmask-m1 |" in (output / "paired.md").read_text()
    cost = (output / "cost.md").read_text()
    assert all(f"| {m} |" in cost for m in methods)
    with Image.open(output / "grid.png") as grid:
        assert grid.size[0] > grid.size[1] > 50  # 2 rows, 4 columns

    # Resume: the same command explains and evaluates nothing again.
    before = (output / "results.csv").read_text()
    with monkeypatch.context() as patched:
        _refuse_work(patched)
        main(argv)
    assert (output / "results.csv").read_text() == before
    # A method added later only adds its store; the comparison covers this run's methods.
    main(_argv(data, model, output, methods="saliency,input-x-gradient", metrics="pointing"))
    assert {r["method"] for r in _rows(output)} == {"saliency", "input-x-gradient"}


def test_predicted_target(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, model = setup
    output = tmp_path / "out"
    main([*_argv(data, model, output, "saliency", "pointing"), "--target", "predicted",
          "--chunk-size", "1"])  # fmt: skip
    rows = _rows(output)
    assert len(rows) == 2 and all(r["target"] == r["predicted"] for r in rows)
    assert all("adcc" not in r and r["pointing_15"] in ("0", "1") for r in rows)
    assert open_maps(output / "stores" / "saliency.zarr").chunk_size == 1


def test_parse_args_errors(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--data", str(tmp_path), "--model", "x", "--images", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--data", str(tmp_path), "--model", "x", "--time-images", "-1"])
    with pytest.raises(SystemExit):
        parse_args(["--data", str(tmp_path), "--model", "x", "--chunk-size", "0"])


def test_resume_refuses_other_settings_naming_them(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    data, model = setup
    output = tmp_path / "out"
    argv = _argv(data, model, output, "saliency", "notebook")
    main(argv)
    store = output / "stores" / "saliency.zarr"
    before = np.asarray(open_maps(store).group["notebook"]["insertion_notebook"][:])
    for change, named in (
        (["--target", "predicted"], "target"),
        (["--tie-samples", "2"], "tie_samples"),
        (["--seed", "1"], "seed"),
    ):
        with pytest.raises(SystemExit, match=named):
            main([*argv, *change])
    after = np.asarray(open_maps(store).group["notebook"]["insertion_notebook"][:])
    np.testing.assert_array_equal(before, after)  # nothing was overwritten
    with pytest.raises(SystemExit, match="files"):  # another image list
        main([*argv, "--first-image", "2", "--images", "1"])


def test_amp_dtype_reaches_gradmask_and_is_guarded(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    data, model = setup
    argv = _argv(data, model, tmp_path / "out", "gradmask-m1", "pointing")
    amp = parse_args([*argv, "--amp-dtype", "bf16"])
    assert method_options("gradmask-m1", amp)["amp_dtype"] is torch.bfloat16
    assert "amp_dtype" not in method_options("saliency", amp)  # not a GradMask setting
    main(argv)
    with pytest.raises(SystemExit, match="settings"):
        main([*argv, "--amp-dtype", "fp16"])


def test_a_driver_row_equals_direct_library_calls(setup: tuple[Path, Path], tmp_path: Path) -> None:
    from captum_gradmask.data import load_imagenet_sample
    from captum_gradmask.metrics import gradmask_notebook_deletion, pointing_game
    from captum_gradmask.models import load_model
    from captum_gradmask.registry import build_method

    data, model_dir = setup
    output = tmp_path / "out"
    main(_argv(data, model_dir, output, "gradmask-m1", "notebook,pointing"))
    row = next(r for r in _rows(output) if r["index"] == "1")

    model, preprocess = load_model(str(model_dir))
    record = load_imagenet_sample(data, limit=2)[1]
    image = preprocess.preprocess(record.path)[None]
    maps = build_method("gradmask-m1", model).attribute_grid(image, record.label)
    assert int(row["target"]) == record.label
    random = gradmask_notebook_deletion(
        model, image, maps, record.label, ties="random", tie_samples=3, seed=0
    )
    assert float(row["deletion_notebook"]) == pytest.approx(float(random.auc[0]), rel=1e-5)
    stable = gradmask_notebook_deletion(model, image, maps, record.label, ties="stable")
    assert float(row["deletion_notebook_stable"]) == pytest.approx(float(stable.auc[0]), rel=1e-5)
    game = pointing_game(
        maps, [record.boxes], [record.label], original_sizes=[record.original_size],
        input_size=(32, 32), tolerance=15,
    )  # fmt: skip
    assert float(row["pointing_15"]) == float(game.hits[0])


def test_driver_takes_a_zero_shot_classifier(tmp_path: Path) -> None:
    """A CLIP checkpoint with one prompt per dataset class (class i = line i) and a template."""
    from .models import save_zero_shot_checkpoint

    data = _tiny_dataset(tmp_path / "data")
    model = save_zero_shot_checkpoint(tmp_path / "clip")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"thing {'abcdefg'[i]}" for i in range(7)))
    argv = _argv(data, model, tmp_path / "out", "gradmask-m1,rollout", "notebook")
    main([*argv, "--labels-file", str(labels), "--template", "a photo of a {}."])
    rows = _rows(tmp_path / "out")
    assert {row["method"] for row in rows} == {"gradmask-m1", "rollout"}
    assert {row["target"] for row in rows} == {"2", "5"}


def test_first_image_selects_later_files(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """``--first-image 2`` starts at the sample's second file (1-based); 0 is refused."""
    data, model = setup
    output = tmp_path / "second"
    argv = _argv(data, model, output, "saliency", "pointing")
    argv[argv.index("--images") + 1] = "1"
    main([*argv, "--first-image", "2"])
    assert [(r["image"], r["target"]) for r in _rows(output)] == [("img_1.png", "5")]
    with pytest.raises(SystemExit):
        parse_args([*argv, "--first-image", "0"])
    with pytest.raises(SystemExit, match="not all there"):
        main([*argv, "--first-image", "2", "--images", "5", "--output", str(tmp_path / "x")])


def test_source_list_is_replaced_whole(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """Rewriting ``source.csv`` (another method's run starting in the same folder) replaces the
    file by a rename: a reader that opened the old list still reads all of it, never a
    truncated one, and no partial file is left beside it."""
    data, _ = setup
    (tmp_path / "run").mkdir()
    path = write_source(data, 1, 2, tmp_path / "run" / "source.csv")
    with path.open() as reader:
        assert write_source(data, 2, 1, path) == path  # rewritten while `reader` is open
        assert len(list(csv.DictReader(reader))) == 2  # the whole first list
    with path.open() as handle:
        assert [Path(r["file"]).name for r in csv.DictReader(handle)] == ["img_1.png"]
    assert [p.name for p in path.parent.iterdir()] == ["source.csv"]


def test_score_every_alternates_explaining_and_scoring(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--score-every 1`` each image is scored by every group before the next one is
    explained (a run killed between them leaves no explained image unscored); the default
    explains both images first."""
    from captum_gradmask import evaluation, explain_dataset

    data, model = setup
    calls: list[tuple[str, int]] = []
    explain, evaluate = explain_dataset._explain_batch, evaluation._evaluate_batch

    def spy_explain(method, model, batch, *args, **kwargs):
        calls.extend(("explain", int(i)) for i in batch.indices)
        return explain(method, model, batch, *args, **kwargs)

    def spy_evaluate(store, dataset, model, explainer, batch, groups, *args, **kwargs):
        calls.extend((f"score {'+'.join(groups)}", int(i)) for i in batch.indices)
        return evaluate(store, dataset, model, explainer, batch, groups, *args, **kwargs)

    monkeypatch.setattr(explain_dataset, "_explain_batch", spy_explain)
    monkeypatch.setattr(evaluation, "_evaluate_batch", spy_evaluate)
    argv = _argv(data, model, tmp_path / "one", "saliency", "notebook,pointing")
    main([*argv, "--score-every", "1"])
    assert calls == [
        ("explain", 0), ("score notebook", 0), ("score pointing", 0),
        ("explain", 1), ("score notebook", 1), ("score pointing", 1),
    ]  # fmt: skip
    calls.clear()
    main(_argv(data, model, tmp_path / "all", "saliency", "notebook,pointing"))
    assert calls[:2] == [("explain", 0), ("explain", 1)]
    assert (tmp_path / "one" / "results.csv").read_text() == (
        tmp_path / "all" / "results.csv"
    ).read_text()


def test_runs_of_other_image_lists_compare_over_the_files_they_share(
    setup: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    """A 2-image run and a 1-image run of the second file: compare (the CLI) takes that file
    from both, with the grid and the cost table, and its rows equal each run's own."""
    from captum_gradmask.cli import main as cli

    data, model = setup
    both, second = tmp_path / "both", tmp_path / "second"
    main(_argv(data, model, both, "saliency", "pointing"))
    argv = _argv(data, model, second, "gradmask-m1", "pointing")
    argv[argv.index("--images") + 1] = "1"
    main([*argv, "--first-image", "2"])
    out = tmp_path / "compare"
    stores = [second / "stores" / "gradmask-m1.zarr", both / "stores" / "saliency.zarr"]
    argv = ["compare", *map(str, stores), "--name", "pointing", "--out", str(out)]
    assert cli([*argv, "--grid-images", "1", "--time-images", "1", "--device", "cpu"]) == 0
    assert "over 1 images, 1 in some stores' image lists only" in capsys.readouterr().out
    rows = _rows(out)
    assert [(r["image"], r["method"], r["index"]) for r in rows] == [
        ("img_1.png", "gradmask-m1", "0"),
        ("img_1.png", "saliency", "0"),
    ]
    own = {r["method"]: r for r in _rows(both) + _rows(second) if r["image"] == "img_1.png"}
    assert all(r["pointing_15"] == own[r["method"]]["pointing_15"] for r in rows)
    assert (out / "grid.png").is_file() and "| saliency |" in (out / "cost.md").read_text()


def test_gate_training_files_come_from_the_gate_record(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    data, _ = setup
    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "gate.json").write_text(json.dumps({"train_files": "indices 1..1"}))
    assert gate_training_files(gate, data) == ["img_1.png"]
    (gate / "gate.json").write_text(json.dumps({"train_files": "unknown"}))
    assert gate_training_files(gate, data) == []
