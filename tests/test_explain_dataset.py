"""Dataset runs: sources, the zarr store, resuming, refusal, evaluate, show and torchrun."""

from __future__ import annotations

import ast
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("zarr", reason="dataset runs need the 'datasets' extra (zarr>=3)")

from captum_gradmask import GradMaskAttribution
from captum_gradmask import explain_dataset as runner
from captum_gradmask.cli import main
from captum_gradmask.datasets import ImageFiles, open_source
from captum_gradmask.evaluation import evaluate_store
from captum_gradmask.explain_dataset import explain_dataset
from captum_gradmask.metrics import gradmask_notebook_insertion, pointing_game
from captum_gradmask.models import load_model
from captum_gradmask.registry import build_method
from captum_gradmask.store import StoredMaps, StoreMismatch, open_maps

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared
from .models import tiny_hf_vit

ROOT = Path(__file__).resolve().parents[1]
CORRUPT = "b/9.png"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine run tens of times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViT saved with its processor, 6 small PNGs in two class folders, one
    corrupt file, and a CSV (with boxes) listing them."""
    from transformers import ViTImageProcessor

    root = tmp_path_factory.mktemp("dataset")
    tiny_hf_vit().save_pretrained(root / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    rows = []
    for label, folder in enumerate(("a", "b")):
        (root / "images" / folder).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (30 + 2 * i, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / folder / f"{i}.png")
            rows += [[f"images/{folder}/{i}.png", label, 2, 3, 20, 25]]
            rows += [[f"images/{folder}/{i}.png", label, 30, 1, 39, 9]]  # a second box
    (root / "images" / CORRUPT).write_bytes(b"not a png")
    rows.append([f"images/{CORRUPT}", 1, 0, 0, 5, 5])
    with (root / "list.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "xmin", "ymin", "xmax", "ymax"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def model_and_images(assets: Path) -> tuple[torch.nn.Module, ImageFiles]:
    model, preprocess = load_model(assets / "model")
    return model, open_source(assets / "images", preprocess)


def _run(images, model, out, **kwargs):
    kwargs = {"batch_size": 2, "chunk_size": 3, "show_progress": False, **kwargs}
    return explain_dataset(images, model, out, **kwargs)


def test_sources_list_files_labels_and_boxes(assets: Path) -> None:
    _, preprocess = load_model(assets / "model")
    folder = open_source(assets / "images", preprocess)
    assert folder.files == [
        "a/0.png",
        "a/1.png",
        "a/2.png",
        "b/0.png",
        "b/1.png",
        "b/2.png",
        CORRUPT,
    ]
    assert folder.labels == [0, 0, 0, 1, 1, 1, 1] and folder.classes == ["a", "b"]
    listed = open_source(assets / "list.csv", preprocess, limit=4)
    assert listed.files == [f"images/{f}" for f in folder.files[:4]]  # one image per file
    assert listed.labels == [0, 0, 0, 1]
    assert listed.boxes[0].tolist() == [[2, 3, 20, 25], [30, 1, 39, 9]]
    pixels, label = listed[3]
    assert label == 1 and torch.equal(pixels, preprocess.preprocess(assets / "images/b/0.png"))
    with pytest.raises(FileNotFoundError, match="`source`"):
        open_source(assets / "missing", preprocess)
    with pytest.raises(ValueError, match="`limit`"):
        open_source(assets / "images", preprocess, limit=0)


def test_maps_equal_attribute_grid_on_the_same_pixels(model_and_images, tmp_path: Path) -> None:
    model, images = model_and_images
    run = _run(images, model, tmp_path / "maps.zarr", target="label")
    assert (run.total, run.done, run.written, run.failed) == (7, 7, 7, 1)
    store = open_maps(tmp_path / "maps.zarr")
    assert store.files[:].tolist() == images.files and store.done[:].all()
    gradmask = GradMaskAttribution(model)
    for i in range(6):
        pixels = images[i][0][None]
        expected = gradmask.attribute_grid(pixels, target=images.labels[i], masks_per_layer=4)
        torch.testing.assert_close(
            torch.from_numpy(store.maps[i][None]), expected, atol=1e-5, rtol=0
        )
        with torch.no_grad():
            probabilities = torch.softmax(model(pixels).logits, dim=-1)[0]
        assert store.targets[i] == images.labels[i]
        assert store.predicted[i] == int(probabilities.argmax())
        assert store.probability[i] == pytest.approx(
            float(probabilities[images.labels[i]]), abs=1e-6
        )
    # the corrupt file: recorded with its reason, done, no map
    row = store[6]
    assert store.failed() == [(6, CORRUPT, row["error"])]
    assert row["error"].startswith("UnidentifiedImageError") and CORRUPT in row["error"]
    assert np.isnan(row["map"]).all() and row["target"] == -1 and row["done"]
    assert (
        store.attrs["method"] == "gradmask-m4" and store.attrs["settings"]["masks_per_layer"] == 4
    )
    assert store.attrs["versions"]["torch"] and store.maps.metadata.dimension_names == (
        "image",
        "y",
        "x",
    )


def test_resume_after_an_interruption_writes_each_row_once(
    model_and_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, images = model_and_images
    written: list[list[int]] = []
    original_write, original_grid = StoredMaps.write, runner.attribution_grid
    calls = {"n": 0}

    def spy_write(self, indices, **rows):
        written.append([int(i) for i in indices])
        return original_write(self, indices, **rows)

    def interrupted_grid(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # Ctrl-C while the fourth batch is being explained
        return original_grid(*args, **kwargs)

    monkeypatch.setattr(StoredMaps, "write", spy_write)
    monkeypatch.setattr(runner, "attribution_grid", interrupted_grid)
    out = tmp_path / "maps.zarr"
    with pytest.raises(KeyboardInterrupt):
        _run(images, model, out)
    first = [i for batch in written for i in batch]
    assert first == [0, 1, 2, 3, 4]  # batches [0, 1], [2] (chunk 0), [3, 4]; [5] was in flight
    assert open_maps(out).done[:].tolist() == [True] * 5 + [False] * 2
    kept = np.asarray(open_maps(out).maps[:5])

    written.clear()
    monkeypatch.setattr(runner, "attribution_grid", original_grid)
    run = _run(images, model, out)
    assert [i for batch in written for i in batch] == [5, 6] and run.written == 2
    store = open_maps(out)
    assert store.done[:].all()
    np.testing.assert_array_equal(np.asarray(store.maps[:5]), kept)
    uninterrupted = _run(images, model, tmp_path / "whole.zarr")
    assert uninterrupted.written == 7
    np.testing.assert_allclose(store.maps[:], open_maps(tmp_path / "whole.zarr").maps[:], atol=1e-6)

    written.clear()
    assert _run(images, model, out).written == 0 and written == []  # nothing left: no writes


def test_a_store_with_other_settings_is_refused(model_and_images, tmp_path: Path) -> None:
    model, images = model_and_images
    out = tmp_path / "maps.zarr"
    _run(images, model, out, method="gradmask-m1")
    with pytest.raises(StoreMismatch, match=r"method: store has \"gradmask-m1\""):
        _run(images, model, out, method="gradmask-m4")
    with pytest.raises(StoreMismatch, match="settings"):
        _run(images, model, out, method="gradmask-m1", method_options={"clamp": False})
    with pytest.raises(StoreMismatch, match="target"):
        _run(images, model, out, method="gradmask-m1", target="label")
    with pytest.raises(StoreMismatch, match="files_sha256"):
        _run(ImageFiles(images.files[:5], images.preprocess, root=images.root), model, out)
    other = tiny_hf_vit(num_labels=5)
    with pytest.raises(StoreMismatch, match="fingerprint"):
        _run(images, other, out, method="gradmask-m1")
    # batching knobs change no map: a resume with another perturbations_per_eval is accepted
    resumed = _run(
        images, model, out, method="gradmask-m1", method_options={"perturbations_per_eval": 5}
    )
    assert resumed.written == 0


def test_amp_dtype_is_part_of_a_stores_identity(
    model_and_images, assets: Path, tmp_path: Path
) -> None:
    model, images = model_and_images
    plain, amp = tmp_path / "plain.zarr", tmp_path / "bf16.zarr"
    _run(images, model, plain, method="gradmask-m1")
    assert open_maps(plain).attrs["identity"]["settings"]["amp_dtype"] is None
    options = ["--method", "gradmask-m1", "--amp-dtype", "bf16", "--chunk-size", "3"]
    command = ["explain-dataset", str(assets / "images"), "--model", str(assets / "model")]
    assert main([*command, "--out", str(amp), *options, "--workers", "0", "--quiet"]) == 0
    stored = open_maps(amp)
    assert stored.attrs["settings"]["amp_dtype"] == "torch.bfloat16"
    assert stored.attrs["identity"]["settings"]["amp_dtype"] == "torch.bfloat16"
    with pytest.raises(StoreMismatch, match="amp_dtype"):
        _run(images, model, amp, method="gradmask-m1")
    resumed = _run(
        images,
        model,
        amp,
        method="gradmask-m1",
        method_options={"amp_dtype": torch.bfloat16, "perturbations_per_eval": 7},
    )
    assert resumed.written == 0
    bf16_maps, fp32_maps = stored.maps[:], open_maps(plain).maps[:]
    explained = ~np.isnan(fp32_maps).any(axis=(1, 2))  # the corrupt file has no map
    difference = np.abs(bf16_maps - fp32_maps)[explained]
    assert explained.sum() == 6 and difference.max() <= 0.05 * fp32_maps[explained].max()


def test_a_diffmask_store_records_its_gate_for_resuming_and_for_adcc(
    model_and_images, tmp_path: Path
) -> None:
    """ADCC explains the masked image again with the store's method: a DiffMask store keeps
    its gate's folder (to rebuild it) and the digest of its weights (its identity)."""
    from captum_gradmask.adapters import get_adapter
    from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig

    model, images = model_and_images
    config = GateConfig.for_adapter(get_adapter(model))
    torch.manual_seed(1)
    DiffMaskGate(config).save(tmp_path / "gate")
    torch.manual_seed(2)
    DiffMaskGate(config).save(tmp_path / "other")
    out = tmp_path / "maps.zarr"
    _run(images, model, out, method="diffmask", method_options={"gate": tmp_path / "gate"})
    stored = open_maps(out)
    assert stored.attrs["settings"]["gate"] == str((tmp_path / "gate").resolve())
    assert "gate" not in stored.attrs["identity"]["settings"]
    fingerprint = stored.attrs["identity"]["settings"]["gate_fingerprint"]
    summary = evaluate_store(out, images, model, metrics=["adcc"], name="adcc", show_progress=False)
    assert summary.evaluated == 6
    coherence = np.asarray(open_maps(out).evaluation("adcc")["coherence"][:])
    assert np.isfinite(coherence).sum() == 6
    # another gate's weights are another experiment; the same gate moved elsewhere resumes
    with pytest.raises(StoreMismatch, match="gate_fingerprint"):
        _run(images, model, out, method="diffmask", method_options={"gate": tmp_path / "other"})
    (tmp_path / "gate").rename(tmp_path / "moved")
    moved = _run(images, model, out, method="diffmask", method_options={"gate": tmp_path / "moved"})
    assert moved.written == 0
    with pytest.raises(ValueError, match="not the gate the maps were made with"):
        build_method("diffmask", model, gate=tmp_path / "other", gate_fingerprint=fingerprint)


def test_max_images_explains_that_many_pending_images_a_call(
    model_and_images, tmp_path: Path
) -> None:
    """Calls of ``max_images=3`` take the pending rows in order, 3 at a time (a batch cut at
    the limit), and end with the maps of one call over everything."""
    model, images = model_and_images
    out = tmp_path / "maps.zarr"
    steps = []
    for _ in range(4):
        run = _run(images, model, out, max_images=3)
        steps.append((run.written, open_maps(out).done[:].tolist()))
    assert [written for written, _ in steps] == [3, 3, 1, 0]
    assert steps[0][1] == [True] * 3 + [False] * 4
    assert steps[1][1] == [True] * 6 + [False]
    assert steps[2][1] == [True] * 7
    whole = _run(images, model, tmp_path / "whole.zarr")
    np.testing.assert_allclose(open_maps(out).maps[:], open_maps(whole.store).maps[:], atol=1e-6)
    with pytest.raises(ValueError, match="`max_images`"):
        _run(images, model, tmp_path / "c.zarr", max_images=0)


def test_evaluated_rows_are_those_every_named_evaluation_scored(
    model_and_images, tmp_path: Path
) -> None:
    """``StoredMaps.evaluated``: rows scored by all the named evaluations, skipped rows and
    rows explained after an evaluation left out, nothing for an evaluation the store lacks."""
    model, images = model_and_images
    out = tmp_path / "maps.zarr"
    _run(images, model, out, max_images=3)
    evaluate_store(out, images, model, metrics=["notebook"], name="early", show_progress=False)
    _run(images, model, out)
    evaluate_store(out, images, model, metrics=["notebook"], name="late", show_progress=False)
    maps = open_maps(out)
    assert maps.skipped().tolist() == [False] * 6 + [True]  # the corrupt file
    assert maps.evaluated(["early"]).tolist() == [True] * 3 + [False] * 4
    assert maps.evaluated(["late"]).tolist() == [True] * 6 + [False]
    assert maps.evaluated(["early", "late"]).tolist() == [True] * 3 + [False] * 4
    assert not maps.evaluated(["late", "absent"]).any()


def test_each_session_records_where_it_ran_and_compare_names_the_machines(
    model_and_images, tmp_path: Path, monkeypatch
) -> None:
    from captum_gradmask.compare import compare_stores

    model, images = model_and_images
    first = tmp_path / "first.zarr"
    for _ in range(3):  # 4 images, the other 3, then nothing left: no session
        _run(images, model, first, method="rollout", max_images=4)
    sessions = open_maps(first).attrs["sessions"]
    assert [(s["done_before"], s["pending"]) for s in sessions] == [(0, 7), (4, 3)]
    here = runner.machine("cpu")
    assert sessions[0]["machine"] == here and here["cores"] == os.cpu_count()
    assert (sessions[0]["device"], sessions[0]["processes"]) == ("cpu", 1)
    assert sessions[0]["versions"] == runner.versions()
    for _ in range(2):  # the second evaluation finds nothing to score: no session
        evaluate_store(first, images, model, metrics=["notebook"], tie_samples=1,
                       show_progress=False)  # fmt: skip
    scored = open_maps(first).group["metrics"].attrs["sessions"]
    assert [(s["done_before"], s["pending"]) for s in scored] == [(0, 6)]  # 1 file unreadable
    # another store made on "another machine": compare names both machines
    other = dict(here, cpu="Other CPU", cores=64, numpy_simd=["X86_V4"])
    monkeypatch.setattr(runner, "machine", lambda device=None: other)
    second = tmp_path / "second.zarr"
    _run(images, model, second, method="gradmask-m1")
    evaluate_store(second, images, model, metrics=["notebook"], tie_samples=1,
                   show_progress=False)  # fmt: skip
    compare_stores([first, second], tmp_path / "out", grid_images=0)
    header = (tmp_path / "out" / "table.md").read_text().splitlines()[0]
    simd = "/".join(here["numpy_simd"] or [])
    assert f"Computed on {here['cpu']} ({here['cores']} cores, numpy SIMD {simd}), cpu" in header
    assert "; Other CPU (64 cores, numpy SIMD X86_V4), cpu, torch" in header
    assert "before sessions were recorded" not in header
    # a store whose first rows were made before sessions were recorded is said to be
    group = open_maps(second, mode="r+").group
    group.attrs["sessions"] = [dict(group.attrs["sessions"][0], done_before=3)]
    compare_stores([first, second], tmp_path / "out", grid_images=0)
    header = (tmp_path / "out" / "table.md").read_text().splitlines()[0]
    assert "1 of the 4 stores and evaluations also hold work from before sessions" in header


def test_bad_arguments_are_named(model_and_images, tmp_path: Path, monkeypatch) -> None:
    model, images = model_and_images
    with pytest.raises(ValueError, match="`target`"):
        _run(images, model, tmp_path / "a.zarr", target="top")
    with pytest.raises(ValueError, match="`target` 7 is out of range"):
        _run(images, model, tmp_path / "a.zarr", target=7)
    flat = ImageFiles(images.files, images.preprocess, root=images.root)
    with pytest.raises(ValueError, match="'label' needs labels"):
        _run(flat, model, tmp_path / "a.zarr", target="label")
    with pytest.raises(ValueError, match="`batch_size`"):
        _run(images, model, tmp_path / "a.zarr", batch_size=0)
    with pytest.raises(ValueError, match="unknown method"):
        _run(images, model, tmp_path / "a.zarr", method="gradmask-m5")
    (tmp_path / "file.zarr").write_text("")
    with pytest.raises(StoreMismatch, match="not a zarr store"):
        _run(images, model, tmp_path / "file.zarr")
    monkeypatch.setitem(sys.modules, "zarr", None)
    with pytest.raises(ImportError, match=r"captum-gradmask\[datasets\]"):
        _run(images, model, tmp_path / "b.zarr")


def test_any_dataset_and_dataloader(tmp_path: Path) -> None:
    model = tiny_hf_vit()

    class Pictures(torch.utils.data.Dataset):
        files = ("first", "second", "third")

        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int):
            if index == 1:
                raise OSError("disk error")
            return {"pixel_values": torch.full((3, 32, 32), float(index)), "label": index}

    loader = torch.utils.data.DataLoader(Pictures(), batch_size=2)
    run = explain_dataset(
        loader, model, tmp_path / "m.zarr", method="saliency", target="label", show_progress=False
    )
    store = open_maps(tmp_path / "m.zarr")
    assert run.written == 3 and store.maps.shape == (3, 32, 32)  # a pixel method: (N, H, W)
    assert store.failed() == [(1, "second", "OSError: disk error")]
    assert store.targets[:].tolist() == [0, -1, 2]


def test_cli_show_and_evaluate(assets: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "maps.zarr"
    args = ["explain-dataset", str(assets / "list.csv"), "--model", str(assets / "model")]
    args += ["--out", str(out), "--method", "gradmask-m1", "--method-option", "mode=fast"]
    args += ["--batch-size", "3", "--chunk-size", "4", "--workers", "1", "--quiet"]
    assert main(args) == 0
    assert "7 of 7 images done" in capsys.readouterr().out
    store = open_maps(out)
    assert store.attrs["settings"]["mode"] == "fast" and store.attrs["model"]["spec"] == str(
        assets / "model"
    )
    assert main(["show", str(out), "2", "--out", str(tmp_path / "map.png")]) == 0
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["show", str(out), "6", "--out", str(tmp_path / "x.png")]) == 2
    assert "was skipped: UnidentifiedImageError" in capsys.readouterr().err

    report = tmp_path / "report"
    evaluate = ["evaluate", str(out), "--metrics", "notebook,pointing", "--batch-size", "4"]
    assert main([*evaluate, "--workers", "0", "--quiet", "--out", str(report)]) == 0
    columns = open_maps(out).evaluation("metrics")
    assert columns["done"].tolist() == [True] * 6 + [False]  # the unreadable image is not rated
    assert set(np.unique(columns["pointing_15"][:6])) <= {0.0, 1.0}
    model, preprocess = load_model(assets / "model")
    images = open_source(assets / "list.csv", preprocess)
    pixels, saliency = images[4][0][None], torch.from_numpy(store.maps[4][None])
    target = int(store.targets[4])
    # the headline is the mean over 10 random tie orders (seed 0), scored image by image
    expected = gradmask_notebook_insertion(
        model, pixels, saliency, target, ties="random", tie_samples=10, seed=0
    )
    assert columns["insertion_notebook"][4] == pytest.approx(float(expected.auc[0]), abs=1e-5)
    reference = gradmask_notebook_insertion(model, pixels, saliency, target, ties="reference")
    assert columns["insertion_notebook_reference"][4] == pytest.approx(
        float(reference.auc[0]), abs=1e-5
    )
    every = [float(reference.auc[0]), float(columns["insertion_notebook_stable"][4])]
    every += expected.tie_auc[0].tolist()
    assert columns["insertion_notebook_tie_spread"][4] == pytest.approx(
        max(every) - min(every), abs=1e-5
    )
    with Image.open(images.path(4)) as image:
        size = (image.height, image.width)
    hit = pointing_game(
        saliency,
        [images.boxes[4]],
        [target],
        original_sizes=[size],
        input_size=(32, 32),
        tolerance=15,
    ).hits[0]
    assert columns["pointing_15"][4] == float(hit)
    lines = (report / "rows.csv").read_text().splitlines()
    assert len(lines) == 7 and lines[0].startswith("index,file,target,predicted,probability")
    assert "insertion_notebook" in (report / "summary.md").read_text()
    # a second evaluate finds nothing left; other metric groups under the same name are refused
    again = evaluate_store(
        out, images, model, metrics=["notebook", "pointing"], show_progress=False
    )
    assert again.evaluated == 0 and again.summary["pointing_0"][3] == 6
    with pytest.raises(StoreMismatch, match="--name"):
        evaluate_store(out, images, model, metrics=["rise"], show_progress=False)
    # ... and so are other tie settings, naming them
    for change in ({"tie_samples": 3}, {"seed": 1}):
        with pytest.raises(StoreMismatch, match=next(iter(change))):
            evaluate_store(
                out, images, model, metrics=["notebook", "pointing"], show_progress=False,
                **change,
            )  # fmt: skip


def test_evaluation_rows_do_not_depend_on_batching(model_and_images, tmp_path: Path) -> None:
    """Random tie orders are drawn image by image: batch size 1 and 3 give the same rows."""
    model, images = model_and_images
    out = tmp_path / "maps.zarr"
    explain_dataset(images, model, out, method="gradmask-m1", show_progress=False)
    columns = {}
    for batch_size in (1, 3):
        name = f"b{batch_size}"
        evaluate_store(
            out, images, model, metrics=["notebook"], name=name, batch_size=batch_size,
            tie_samples=4, show_progress=False,
        )  # fmt: skip
        columns[batch_size] = open_maps(out).evaluation(name)
    for column in ("insertion_notebook", "deletion_notebook_tie_spread"):
        np.testing.assert_allclose(columns[1][column], columns[3][column], atol=1e-6)
    assert np.nanmax(columns[1]["insertion_notebook_tie_spread"]) > 0  # patch maps tie


def _rank_chunks(stdout: str) -> dict[int, list[int]]:
    """The chunks each rank reports (found anywhere in the output: the ranks share one pipe)."""
    found = re.findall(r"rank (\d+) of \d+: .*?chunks (\[[\d, ]*\])", stdout)
    return {int(rank): ast.literal_eval(chunks) for rank, chunks in found}


def test_torchrun_two_processes_give_the_one_process_store(
    assets: Path, model_and_images, tmp_path: Path
) -> None:
    model, images = model_and_images
    _run(images, model, tmp_path / "one.zarr", batch_size=3, chunk_size=2)
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "captum_gradmask", "explain-dataset"]
    command += [str(assets / "images"), "--model", str(assets / "model")]
    command += ["--out", str(tmp_path / "two.zarr"), "--chunk-size", "2", "--batch-size", "2"]
    command += ["--workers", "0", "--threads", "1", "--device", "cpu", "--quiet"]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = _rank_chunks(result.stdout)
    chunks = sorted(c for taken in ranks.values() for c in taken)
    assert sorted(ranks) == [0, 1] and chunks == [0, 1, 2, 3]  # every chunk written by one rank
    one, two = open_maps(tmp_path / "one.zarr"), open_maps(tmp_path / "two.zarr")
    assert two.done[:].all() and two.failed() == one.failed()
    np.testing.assert_allclose(two.maps[:], one.maps[:], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(two.targets[:], one.targets[:])


@needs_shared
@pytest.mark.slow
def test_real_images_killed_half_way_resume_under_torchrun(tmp_path: Path) -> None:
    """The shared ViT-Tiny on 6 real images: a run killed (SIGKILL) after its first chunks,
    resumed by torchrun with 2 processes, gives each image once, equal to attribute_grid."""
    out = tmp_path / "real.zarr"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    options = [str(IMAGENET_SAMPLE / "annotations.csv"), "--model", str(HF_VIT_TINY)]
    options += ["--out", str(out), "--limit", "6", "--method", "gradmask-m1", "--target"]
    options += ["label", "--chunk-size", "2", "--batch-size", "2", "--workers", "1"]
    options += ["--threads", "1", "--device", "cpu", "--quiet"]
    first = subprocess.Popen(
        [sys.executable, "-m", "captum_gradmask", "explain-dataset", *options],
        env=environment,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline, done = time.monotonic() + 300, 0
    while time.monotonic() < deadline and first.poll() is None and done < 2:
        time.sleep(0.2)
        if (out / "zarr.json").is_file():
            done = int(open_maps(out).done[:].sum())
    os.killpg(first.pid, signal.SIGKILL)  # the run and its DataLoader worker
    first.wait()
    stopped = open_maps(out).done[:]
    assert 2 <= stopped.sum() < 6, "the first run was not stopped half way"

    resume = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    resume += ["--nproc-per-node", "2", "-m", "captum_gradmask", "explain-dataset", *options]
    result = subprocess.run(resume, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    chunks = [c for taken in _rank_chunks(result.stdout).values() for c in taken]
    left = [c for c in range(3) if not stopped[2 * c : 2 * c + 2].all()]
    assert sorted(chunks) == left  # only unfinished chunks, each taken by one rank

    store = open_maps(out)
    model, preprocess = load_model(HF_VIT_TINY)
    images = open_source(IMAGENET_SAMPLE / "annotations.csv", preprocess, limit=6)
    assert store.files[:].tolist() == images.files and len(set(images.files)) == 6
    assert store.done[:].all() and store.failed() == []
    gradmask = GradMaskAttribution(model)
    for i in range(6):
        pixels, label = images[i]
        expected = gradmask.attribute_grid(pixels[None], target=label, masks_per_layer=1)
        assert int(store.targets[i]) == label
        torch.testing.assert_close(
            torch.from_numpy(np.asarray(store.maps[i : i + 1])), expected, atol=1e-5, rtol=0
        )


def test_show_a_row_past_the_end_and_a_missing_out_folder_are_one_line_errors(
    model_and_images, tmp_path: Path, capsys
) -> None:
    model, images = model_and_images
    out = tmp_path / "store.zarr"
    _run(images, model, out)
    capsys.readouterr()
    assert main(["show", str(out), "17", "--out", str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds 7 images, rows 0..6" in error
    missing = tmp_path / "no" / "such" / "x.png"
    assert main(["show", str(out), "1", "--out", str(missing)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "does not exist" in error and not missing.parent.exists()


def test_explain_dataset_says_where_processes_would_idle_and_reports_the_runs_rate(
    model_and_images, tmp_path: Path, capsys
) -> None:
    from captum_gradmask import _sharding

    with pytest.warns(UserWarning, match="2 process\\(es\\) will have nothing to do"):
        _sharding.shard(np.zeros(4, dtype=bool), 2, 2, rank=0, world=4)
    model, images = model_and_images
    summary = _run(images, model, tmp_path / "rate.zarr")
    assert summary.run_written == summary.written == 7
    assert summary.run_seconds == summary.seconds > 0
