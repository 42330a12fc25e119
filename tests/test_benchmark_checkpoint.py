"""benchmarks.checkpoint: which map chunks a committed run folder leaves out."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zarr")

from benchmarks.checkpoint import checkpoint, main, prunable_chunks
from captum_gradmask.store import create_store, open_maps


def _store(path, explained, scored, groups=("notebook", "pointing")):
    """8 images in chunks of 2, rows ``explained`` written, rows ``scored`` done in every
    group (the last group left out of rows not in ``scored``)."""
    store = create_store(path, [f"{i}.png" for i in range(8)], (65, 65), chunk_size=2,
                         identity={"method": "demo"})  # fmt: skip
    rows = sorted(explained)
    store.write(rows, maps=np.ones((len(rows), 65, 65)), targets=[1] * len(rows),
                predicted=[1] * len(rows), probability=[0.5] * len(rows),
                errors=[""] * len(rows))  # fmt: skip
    group = open_maps(path, mode="r+").group
    for name in groups:
        done = group.create_group(name).create_array("done", shape=(8,), chunks=(2,), dtype="bool")
        done[:] = np.isin(np.arange(8), sorted(scored))
    return path


def _chunks(paths):
    return sorted({int(p.parts[2]) for p in paths})


def test_keeps_grid_rows_and_unscored_images(tmp_path):
    # chunks: 0 = rows 0-1 (grid), 1 = 2-3 scored, 2 = 4-5 (5 explained, not scored), 3 = 6-7
    # not explained
    path = _store(tmp_path / "a.zarr", explained={0, 1, 2, 3, 4}, scored={0, 1, 2, 3, 4})
    paths = prunable_chunks(path, ["notebook", "pointing"], keep_rows=2)
    assert _chunks(paths) == [1, 2]
    assert all(p.parts[:2] == ("maps", "c") for p in paths)
    assert _chunks(prunable_chunks(path, ["notebook", "pointing"], keep_rows=0)) == [0, 1, 2]
    assert _chunks(prunable_chunks(path, ["notebook", "pointing"], keep_rows=[3])) == [0, 2]
    # explained images not yet scored by every group: their chunks stay in
    assert prunable_chunks(path, ["notebook", "pointing", "adcc"], keep_rows=0) == []
    part = _store(tmp_path / "c.zarr", explained={0, 1, 2, 3, 4, 5}, scored={0, 1, 2, 4, 5})
    assert _chunks(prunable_chunks(part, ["notebook", "pointing"], keep_rows=0)) == [0, 2]
    patches = create_store(tmp_path / "b.zarr", ["0.png", "1.png"], (64, 64), chunk_size=1,
                           identity={"method": "demo"})  # fmt: skip
    patches.write([0, 1], maps=np.ones((2, 64, 64)), targets=[1, 1], predicted=[1, 1],
                  probability=[0.5, 0.5], errors=["", ""])  # fmt: skip
    assert prunable_chunks(tmp_path / "b.zarr", [], keep_rows=0) == []  # a patch grid: kept


def test_checkpoint_writes_gitignore_and_untracks(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    run = tmp_path / "run"
    _store(run / "stores" / "m.zarr", explained=set(range(6)), scored=set(range(6)))
    _store(run / "stores" / "p.zarr", explained=set(range(8)), scored=set(range(6)))
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    main([str(run), "--groups", "notebook,pointing", "--keep-rows", "0:2"])
    listed = [Path(line[1:]) for line in (run / ".gitignore").read_text().splitlines()[1:]]
    in_p = [p.relative_to("stores/p.zarr") for p in listed if p.parts[1] == "p.zarr"]
    assert _chunks(in_p) == [1, 2]  # chunk 3: images 6-7 explained, not scored
    in_m = [p.relative_to("stores/m.zarr") for p in listed if p.parts[1] == "m.zarr"]
    assert _chunks(in_m) == [1, 2] and len(in_m) + len(in_p) == len(listed)
    tracked = subprocess.run(["git", "ls-files"], cwd=tmp_path, capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    assert "m.zarr/maps/c/0/" in tracked and "m.zarr/done/" in tracked
    assert "m.zarr/maps/c/1/" not in tracked and "m.zarr/maps/c/2/" not in tracked
    assert "p.zarr/maps/c/3/" in tracked and "p.zarr/maps/c/2/" not in tracked
    ignored = (run / ".gitignore").read_text()
    assert "/stores/m.zarr/maps/c/1/0/0" in ignored
    assert (run / "stores/m.zarr/maps/c/1/0/0").is_file()  # nothing deleted
    assert open_maps(run / "stores" / "p.zarr").done[:].all()


def test_a_run_resumes_from_a_checkout_without_the_left_out_maps(
    tmp_path, monkeypatch: pytest.MonkeyPatch
):
    """Commit a run folder through the checkpoint, clone it (left-out maps gone): the driver
    explains and scores nothing again and writes the same results."""
    from benchmarks.run import main

    from .test_benchmark_runner import _argv, _refuse_work, _tiny_dataset, _tiny_model

    data, model = _tiny_dataset(tmp_path / "data"), _tiny_model(tmp_path / "model")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    run = repo / "run"
    argv = [*_argv(data, model, run, "saliency", "pointing"), "--chunk-size", "1"]
    argv += ["--grid-images", "1"]
    main(argv)
    before = (run / "results.csv").read_text()
    listed = checkpoint(run, ["pointing"], keep_rows=1, small=0)  # 32 x 32 maps
    assert listed == [Path("stores/saliency.zarr/maps/c/1/0/0")]  # image 2 of 2
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "run"], cwd=repo, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / "run" / listed[0]).exists()

    _refuse_work(monkeypatch)
    main([*argv[: argv.index("--output")], "--output", str(clone / "run"),
          *argv[argv.index("--output") + 2 :]])  # fmt: skip
    assert (clone / "run" / "results.csv").read_text() == before
