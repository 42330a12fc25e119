"""compare_stores on stores built by hand (known per-image values) and the compare command."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captum_gradmask.cli import main
from captum_gradmask.compare import PassCounter, compare_stores, measure_cost
from captum_gradmask.store import StoreMismatch, create_store, open_maps

FILES = [f"img{i}.png" for i in range(12)]
COLUMNS = ["insertion_notebook", "insertion_notebook_tie_spread", "pointing_0"]


def _store(
    path: Path,
    method: str,
    insertion: np.ndarray,
    *,
    files: list[str] = FILES,
    fingerprint: str = "f",
    target: str = "label",
    settings: dict | None = None,
    evaluated: np.ndarray | None = None,
) -> Path:
    """A store of 2x2 maps with an evaluation whose insertion column is ``insertion``."""
    n = len(files)
    identity = {
        "model": {"class": "Tiny", "fingerprint": fingerprint},
        "method": method,
        "settings": {},
        "target": target,
        "input_shape": [3, 8, 8],
        "preprocess": None,
    }
    store = create_store(
        path, files, (2, 2), chunk_size=4, identity=identity,
        attrs={"method": method, "settings": {}},
    )  # fmt: skip
    rng = np.random.default_rng(len(method))
    store.write(
        np.arange(n), maps=rng.random((n, 2, 2)), targets=np.arange(n) % 3,
        predicted=np.arange(n) % 3, probability=np.full(n, 0.5), errors=[""] * n,
    )  # fmt: skip
    group = store.group.create_group("metrics")
    values = {
        "insertion_notebook": insertion,
        "insertion_notebook_tie_spread": np.full(n, 1.0),
        "pointing_0": (np.arange(n) % 2).astype(float),
    }
    done = np.ones(n, dtype=bool) if evaluated is None else evaluated
    for column, data in values.items():
        group.create_array(column, shape=(n,), dtype="float32", fill_value=np.nan)
        group[column][:] = np.where(done, data, np.nan).astype(np.float32)
    group.create_array("done", shape=(n,), dtype="bool", fill_value=False)
    group["done"][:] = done
    group.attrs.update(
        {
            "metrics": ["notebook", "pointing"],
            "columns": COLUMNS,
            "settings": settings or {"tie_samples": 10, "seed": 0},
        }
    )
    return path


@pytest.fixture
def base() -> np.ndarray:
    return np.linspace(40.0, 70.0, len(FILES))


def test_paired_differences_have_the_sign_and_ci_of_the_data(
    base: np.ndarray, tmp_path: Path
) -> None:
    noise = np.random.default_rng(0).normal(0, 1, len(FILES))
    stores = [
        _store(tmp_path / "ref.zarr", "gradmask-m4", base),
        _store(tmp_path / "better.zarr", "rollout", base + 5 + noise),
        _store(tmp_path / "same.zarr", "saliency", base + np.tile([-8.0, 8.0], 6)),
    ]
    result = compare_stores(stores, tmp_path / "out", grid_images=0)
    assert result.reference == "gradmask-m4"  # the default reference, when compared
    mean, low, high, n = result.paired["rollout"]["insertion_notebook"]
    assert mean == pytest.approx(5 + noise.mean(), abs=1e-4) and 0 < low < mean < high
    assert n == len(FILES)
    mean, low, high, _ = result.paired["saliency"]["insertion_notebook"]
    assert mean == pytest.approx(0.0, abs=1e-4) and low < 0 < high
    paired = (tmp_path / "out" / "paired.md").read_text()
    rollout = next(line for line in paired.splitlines() if line.startswith("| rollout"))
    saliency = next(line for line in paired.splitlines() if line.startswith("| saliency"))
    assert "**+" in rollout.split("|")[2] and "**" not in saliency.split("|")[2]
    assert "Ins. AUC (GM nb, %) ↑" in paired and "tie spread" not in paired
    # table.md: rows are methods, arrowed headers, "mean [low, high]" cells; pointing in %
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| method | images | Ins. AUC (GM nb, %) ↑ |" in table
    assert [line.split("|")[1].strip() for line in table.splitlines() if "| 12 |" in line] == [
        "gradmask-m4",
        "rollout",
        "saliency",
    ]
    assert result.summary["rollout"]["pointing_0"][0] == pytest.approx(50.0)
    assert "tie_samples=10" in table and "12 images evaluated by every store" in table
    with (tmp_path / "out" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * len(FILES) and rows[0]["image"] == "img0.png"
    assert float(rows[1]["pointing_0"]) == 1.0  # per-image rows in the evaluation's units


def test_standing_sorts_each_peer_by_its_paired_ci(base: np.ndarray, tmp_path: Path) -> None:
    noise = np.random.default_rng(1).normal(0, 1, len(FILES))
    stores = [
        _store(tmp_path / "ref.zarr", "gradmask-m4", base),
        _store(tmp_path / "b.zarr", "rollout", base + 5 + noise),  # better insertion
        _store(tmp_path / "c.zarr", "saliency", base - 3 + noise),  # worse
        _store(tmp_path / "d.zarr", "occlusion", base + np.tile([-8.0, 8.0], 6)),  # tied
    ]
    result = compare_stores(stores, tmp_path / "out", grid_images=0)
    assert tmp_path / "out" / "standing.md" in result.written
    lines = (tmp_path / "out" / "standing.md").read_text().splitlines()
    insertion = next(line for line in lines if line.startswith("| Ins. AUC"))
    cells = [cell.strip() for cell in insertion.split("|")[1:-1]]
    # the reference's mean, its rank among the four means, the best, ahead / tied / behind
    assert cells[1:] == [
        f"{base.mean():.1f}", "3 of 4", f"rollout {(base + 5 + noise).mean():.1f}",
        "saliency", "occlusion", "rollout",
    ]  # fmt: skip
    pointing = next(line for line in lines if line.startswith("| Pointing 0 px"))
    assert pointing.split("|")[6].strip() == "rollout, saliency, occlusion"  # equal: all tied
    per_method = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert per_method["rollout"].split("|")[4].strip() == "Ins. AUC (GM nb, %) ↑"
    assert per_method["saliency"].split("|")[2].strip() == "Ins. AUC (GM nb, %) ↑"
    assert "s / image" not in "".join(lines)  # no cost measured: no cost columns
    # the reverse direction: lower is better (deletion), and the cost ratio to the reference
    from captum_gradmask.compare import _standing_markdown

    summary = {"gradmask-m4": {"deletion_notebook": (20.0, 18.0, 22.0, 9)},
               "tis": {"deletion_notebook": (12.0, 10.0, 14.0, 9)}}  # fmt: skip
    paired = {"tis": {"deletion_notebook": (-8.0, -10.0, -6.0, 9)}}
    cost = {"gradmask-m4": {"seconds": 2.0, "forward": 133.0, "backward": 1.0},
            "tis": {"seconds": 5.0, "forward": 1025.0, "backward": 0.0}}  # fmt: skip
    text = _standing_markdown(summary, paired, cost, "gradmask-m4", 9)
    row = next(line for line in text.splitlines() if line.startswith("| Del."))
    assert [c.strip() for c in row.split("|")[3:8]] == ["2 of 2", "tis 12.0", "–", "–", "tis"]
    tis = next(line for line in text.splitlines() if line.startswith("| tis"))
    assert [c.strip() for c in tis.split("|")[4:8]] == ["Del. AUC (GM nb, %) ↓", "2.50", "1025.0",
                                                         "0.0"]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"fingerprint": "other"}, "model"),
        ({"target": "predicted"}, "target policy"),
        ({"settings": {"tie_samples": 3, "seed": 0}}, "tie_samples"),
    ],
)
def test_stores_that_cannot_be_compared_are_refused_naming_the_field(
    change: dict, named: str, base: np.ndarray, tmp_path: Path
) -> None:
    first = _store(tmp_path / "a.zarr", "gradmask-m4", base)
    second = _store(tmp_path / "b.zarr", "rollout", base, **change)
    with pytest.raises(StoreMismatch, match=named):
        compare_stores([first, second], tmp_path / "out")
    assert not (tmp_path / "out" / "table.md").exists()


def test_stores_of_other_image_lists_are_compared_over_the_files_they_share(
    base: np.ndarray, tmp_path: Path, capsys
) -> None:
    # the second store: files img3..img11 (its rows 0-8) and three files the first lacks
    files = [*FILES[3:], "new0.png", "new1.png", "new2.png"]
    other = np.linspace(10.0, 20.0, len(files))
    stores = [
        _store(tmp_path / "a.zarr", "gradmask-m4", base),
        _store(tmp_path / "b.zarr", "rollout", other, files=files),
    ]
    result = compare_stores(stores, tmp_path / "out", grid_images=0)
    assert (result.images, result.left_out, result.not_shared) == (9, 0, 6)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "9 images evaluated by every store; 6 more are in some stores' image lists only" in table
    argv = ["compare", *map(str, stores), "--out", str(tmp_path / "cli"), "--grid-images", "0"]
    assert main(argv) == 0
    assert "over 9 images, 6 in some stores' image lists only;" in capsys.readouterr().out
    assert result.summary["gradmask-m4"]["insertion_notebook"][0] == pytest.approx(
        base[3:].mean(), rel=1e-6
    )
    assert result.summary["rollout"]["insertion_notebook"][0] == pytest.approx(
        other[:9].mean(), rel=1e-6
    )
    assert result.paired["rollout"]["insertion_notebook"][0] == pytest.approx(
        (other[:9] - base[3:]).mean(), rel=1e-5
    )
    with (tmp_path / "out" / "results.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["method"] == "rollout"]
    assert [r["image"] for r in rows] == FILES[3:]
    assert [int(r["index"]) for r in rows] == list(range(3, 12))  # the first store's rows
    assert [float(r["insertion_notebook"]) for r in rows] == pytest.approx(other[:9], rel=1e-6)
    # no file in common: nothing to compare
    elsewhere = _store(
        tmp_path / "c.zarr", "saliency", base, files=[f"x{i}.png" for i in range(12)]
    )
    with pytest.raises(ValueError, match="matched by file"):
        compare_stores([stores[0], elsewhere], tmp_path / "out2")
    # one file explained for two targets (here: the list reversed, targets by row)
    reversed_ = _store(tmp_path / "d.zarr", "saliency", base, files=FILES[::-1])
    with pytest.raises(StoreMismatch, match="different targets"):
        compare_stores([stores[0], reversed_], tmp_path / "out3")


def test_unevaluated_store_and_one_method_twice_are_refused(
    base: np.ndarray, tmp_path: Path
) -> None:
    first = _store(tmp_path / "a.zarr", "gradmask-m4", base)
    twice = _store(tmp_path / "b.zarr", "gradmask-m4", base)
    with pytest.raises(StoreMismatch, match="same method"):
        compare_stores([first, twice], tmp_path / "out")
    with pytest.raises(StoreMismatch, match="no evaluation 'other'"):
        compare_stores([first], tmp_path / "out", evaluation="other")


def test_images_not_evaluated_by_every_store_are_left_out_and_reported(
    base: np.ndarray, tmp_path: Path
) -> None:
    partial = np.arange(len(FILES)) < 9
    stores = [
        _store(tmp_path / "a.zarr", "gradmask-m4", base),
        _store(tmp_path / "b.zarr", "rollout", base + 1, evaluated=partial),
    ]
    result = compare_stores(stores, tmp_path / "out", grid_images=0)
    assert (result.images, result.left_out) == (9, 3)
    assert result.summary["gradmask-m4"]["insertion_notebook"][0] == pytest.approx(
        base[:9].mean(), rel=1e-6
    )
    table = (tmp_path / "out" / "table.md").read_text()
    assert "9 images evaluated by every store (3 evaluated by some stores only" in table


def test_fitted_rows_are_marked_and_left_out_of_that_method(
    base: np.ndarray, tmp_path: Path
) -> None:
    stores = [
        _store(tmp_path / "a.zarr", "gradmask-m4", base),
        _store(tmp_path / "b.zarr", "diffmask", base + 1),
    ]
    result = compare_stores(
        stores, tmp_path / "out", fitted={"diffmask": ["img0.png", "img1.png"]}, grid_images=0
    )
    mean, _, _, n = result.summary["diffmask"]["insertion_notebook"]
    assert n == 10 and mean == pytest.approx(base[2:].mean() + 1, rel=1e-6)
    assert result.summary["gradmask-m4"]["insertion_notebook"][3] == 12  # not the others
    assert result.paired["diffmask"]["insertion_notebook"][3] == 10
    with (tmp_path / "out" / "results.csv").open() as handle:
        marked = [(r["method"], r["image"]) for r in csv.DictReader(handle) if r["fitted"] == "1"]
    assert marked == [("diffmask", "img0.png"), ("diffmask", "img1.png")]
    with pytest.raises(ValueError, match="not among the methods"):
        compare_stores(stores, tmp_path / "out", fitted={"rise": ["img0.png"]})


def test_grid_is_drawn_from_the_stored_maps(base: np.ndarray, tmp_path: Path) -> None:
    stores = [
        _store(tmp_path / "a.zarr", "gradmask-m4", base),
        _store(tmp_path / "b.zarr", "rollout", base),
    ]
    images = torch.utils.data.TensorDataset(torch.rand(len(FILES), 3, 8, 8))
    result = compare_stores(
        stores, tmp_path / "out", grid_images=2, model=torch.nn.Identity(), dataset=images
    )
    assert tmp_path / "out" / "grid.png" in result.written
    with Image.open(tmp_path / "out" / "grid.png") as grid:
        width, height = grid.size
        assert width > height > 50  # 2 rows, 3 columns
        assert np.asarray(grid.convert("L")).std() > 10
    # ten methods wrap into two bands of at most eight beside the images: 4 rows, 9 columns
    names = ["saliency", "occlusion", "rise", "tis", "libragrad", "attnlrp", "chefer-gae",
             "diffmask"]  # fmt: skip
    more = stores + [_store(tmp_path / f"{n}.zarr", n, base) for n in names]
    compare_stores(more, tmp_path / "ten", grid_images=2, model=torch.nn.Identity(), dataset=images)
    with Image.open(tmp_path / "ten" / "grid.png") as wide:
        assert wide.size[0] / width == pytest.approx(9 / 3, rel=0.1)
        assert wide.size[1] / height == pytest.approx(2, rel=0.1)


def test_grid_titles_wrap_long_labels_over_their_panel() -> None:
    from captum_gradmask.compare import _panel_title

    label = "gradmask-ablation (variant=random masks, seed=0)"
    lines = _panel_title(label).split("\n")
    assert len(lines) > 1 and max(map(len, lines)) <= 18
    assert " ".join(lines) == label  # nothing lost
    assert _panel_title("gradmask-m4") == "gradmask-m4"
    assert _panel_title("integrated-gradients") == "integrated-gradients"  # a name is not cut


def test_cost_counts_forward_and_backward_passes() -> None:
    from captum_gradmask.registry import build_method

    from .models import tiny_hf_vit

    model = tiny_hf_vit().eval()  # 3 layers, hidden size 24, 4 x 4 patches
    images = torch.utils.data.TensorDataset(torch.rand(3, 3, 32, 32))
    saliency = measure_cost(build_method("saliency", model), model, images, [0, 1], [0, 1])
    assert saliency["backward"] == 1.0 and saliency["forward"] >= 1.0
    assert saliency["seconds"] > 0
    rollout = measure_cost(build_method("rollout", model), model, images, [0], [0])
    assert (rollout["forward"], rollout["backward"]) == (1.0, 0.0)
    # Each method's passes by its definition, also where it runs the blocks itself rather
    # than the model's forward: GradMask m = 4 = 1 gradient pass + 3 (Q/K/V) x 2 layers x 4
    # masked passes (fast mode: token-dropped); ViT-ReciproCAM: 1 + one pass of the last
    # block per patch; TIS: 1 + one token-subset pass per mask; backward-rule methods: 1 + 1.
    expected = {
        ("gradmask-m4", ()): (25, 1),
        ("gradmask-fast", ()): (25, 1),
        ("vit-reciprocam", ()): (17, 0),
        ("tis", (("n_masks", 8),)): (9, 0),
        ("libragrad", ()): (1, 1),
        ("attnlrp", ()): (1, 1),
        # Captum's methods: their own passes and no other (the target is checked on them)
        ("saliency", ()): (1, 1),
        ("layer-gradcam", ()): (1, 0),  # its gradient starts after the last attention layer
        ("integrated-gradients", (("n_steps", 4),)): (4, 4),
        ("occlusion", ()): (17, 0),  # the unperturbed image and one pass per patch
    }
    for (name, options), (forward, backward) in expected.items():
        method = build_method(name, model, **dict(options))
        cost = measure_cost(method, model, images, [0], [0])
        assert (cost["forward"], cost["backward"]) == (forward, backward), name
    # Families whose adapter taps an attention it runs itself (torchvision, timm EVA): the
    # taps are the method's adapter's, so the cost is counted there.
    from captum_gradmask.adapters import get_adapter

    from .models import tiny_timm_eva, tiny_torchvision_vit

    data = torch.utils.data.TensorDataset(torch.rand(1, 3, 28, 28))  # both take 28 x 28
    for other in (tiny_torchvision_vit(), tiny_timm_eva()):
        masks = 3 * (len(get_adapter(other).layers) - 1) * 4
        cost = measure_cost(build_method("gradmask-m4", other), other, data, [0], [0])
        assert (cost["forward"], cost["backward"]) == (1 + masks, 1), type(other).__name__
    tv = tiny_torchvision_vit()
    reciprocam = build_method("vit-reciprocam", tv)
    h, w = reciprocam.grid_size((28, 28))
    assert measure_cost(reciprocam, tv, data, [0], [0])["forward"] == 1 + h * w
    with PassCounter(model) as passes:
        model(torch.rand(2, 3, 32, 32))
    assert passes.forward == 2
    assert not any(m._forward_pre_hooks for m in model.modules())  # the hook is gone
    linear = torch.nn.Linear(4, 2)  # no adapter: the model's own forward and output
    with PassCounter(linear) as passes:
        linear(torch.rand(3, 4, requires_grad=True)).sum().backward()
    assert (passes.forward, passes.backward) == (3, 3) and not linear._forward_hooks


def test_compare_command_errors_are_one_line(base: np.ndarray, tmp_path: Path, capsys) -> None:
    first = _store(tmp_path / "a.zarr", "gradmask-m4", base)
    second = _store(tmp_path / "b.zarr", "rollout", base, target="predicted")
    out = tmp_path / "out"
    assert main(["compare", str(first), str(second), "--out", str(out)]) == 2
    assert "differ in target policy" in capsys.readouterr().err
    code = main(["compare", str(first), "--out", str(out), "--fitted", "x", "--grid-images", "0"])
    assert code == 2 and "METHOD=FILE" in capsys.readouterr().err
    assert main(["compare", str(first), "--out", str(out), "--grid-images", "0"]) == 0
    assert "1 methods over 12 images" in capsys.readouterr().out
    # several evaluations, comma-separated: their columns side by side
    extra = open_maps(first, mode="r+").group.create_group("extra")
    for column, value in (("adcc", 55.0), ("done", True)):
        extra.create_array(column, shape=(12,), dtype=type(value).__name__)
        extra[column][:] = value
    extra.attrs.update({"metrics": ["adcc"], "columns": ["adcc"], "settings": {}})
    argv = ["compare", str(first), "--out", str(out), "--grid-images", "0"]
    assert main([*argv, "--name", "metrics, extra"]) == 0
    table = (out / "table.md").read_text()
    assert "ADCC (%) ↑" in table and "55.0 [55.0, 55.0]" in table and "Ins. AUC" in table
    assert open_maps(first).done[:].all()  # compare reads, never writes, the stores
