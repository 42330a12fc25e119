"""The paper's analyses through the pipeline: each configuration computes what it claims, the
stores are shared with a benchmark run, and the comparisons pair every configuration with
GradMask m = 4."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from benchmarks import paper_analyses
from benchmarks import run as driver
from captum_gradmask import GradMaskAttribution

from .models import tiny_hf_vit
from .test_benchmark_runner import _refuse_work, _tiny_dataset, _tiny_model


def _config(name: str, layer_count: int = 3) -> paper_analyses.Config:
    return next(c for c in paper_analyses.configs(layer_count) if c.name == name)


def test_configurations_are_ordered_by_cost_and_cover_the_paper() -> None:
    selected = paper_analyses.configs(12)
    names = [c.name for c in selected]
    assert [c.forwards for c in selected] == sorted(c.forwards for c in selected)
    assert {f"m={m}" for m in (1, 2, 3, 6, 8, 12, 16, 24, 48)} <= set(names)
    assert {"GradMask m=4", "first 6", "last 6", "all", "gradients alone", "masks alone",
            "random masks", "no clamp"} <= set(names)  # fmt: skip
    assert len({c.store for c in selected}) == len(selected)
    reference = _config("GradMask m=4", 12)
    assert set(reference.analyses) == set(paper_analyses.ANALYSES)
    # m = 1 and m = 4 are the registry's own methods: a benchmark run's stores serve here.
    assert (_config("m=1", 12).method, _config("m=1", 12).options) == ("gradmask-m1", {})
    assert (reference.method, reference.options) == ("gradmask-m4", {})


def test_gradmask_configurations_are_the_library_maps() -> None:
    model, image = tiny_hf_vit(), torch.randn(1, 3, 32, 32)
    gm = GradMaskAttribution(model)
    target = torch.tensor([3])
    for name, expected in [
        ("m=2", gm.attribute_grid(image, target, masks_per_layer=2)),
        ("last 1", gm.attribute_grid(image, target, layers=[2])),
        ("no clamp", gm.attribute_grid(image, target, clamp=False)),
        ("GradMask m=4", gm.attribute_grid(image, target)),
    ]:
        grid = _config(name).build(model).attribute_grid(image, target)
        torch.testing.assert_close(grid, expected)


def test_ablation_configurations() -> None:
    model, images = tiny_hf_vit(), torch.randn(2, 3, 32, 32)
    gm = GradMaskAttribution(model)
    target = torch.tensor([3, 1])
    found = gm.binary_masks(images, target, masks_per_layer=4)
    masks_alone = _config("masks alone").build(model).attribute_grid(images, target)
    torch.testing.assert_close(masks_alone, found.masks.float().sum(1))
    gradients = _config("gradients alone").build(model).attribute_grid(images, target)
    torch.testing.assert_close(gradients, found.scores.sum(1).reshape(2, 4, 4))
    assert bool((gradients >= 0).all())  # clamped scores

    random = _config("random masks").build(model)
    both = random.attribute_grid(images, target)
    # Seeded per image: the same maps whichever images share a call.
    torch.testing.assert_close(both[1:], random.attribute_grid(images[1:], target[1:]))
    torch.testing.assert_close(both, random.attribute_grid(images, target))
    assert not torch.allclose(both, gm.attribute_grid(images, target))
    # Each random mask keeps as many patches as its GradMask mask: with every confidence
    # replaced by 1, the maps sum to the masks' total size, image by image.
    ablation = paper_analyses.GradMaskAblation(model)
    ablation.mask_confidences = lambda inputs, masks, targets, *a, **k: torch.ones(masks.shape[:2])
    sizes = ablation.attribute_grid(images, target, variant="random masks")
    torch.testing.assert_close(sizes.sum((1, 2)), found.masks.flatten(1).sum(1).float())
    with pytest.raises(ValueError, match="`variant` must be one of"):
        ablation.attribute_grid(images, target, variant="no masks")


def test_analyses_share_a_benchmark_runs_stores_and_pair_with_m4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, model = _tiny_dataset(tmp_path / "data"), _tiny_model(tmp_path / "model")
    output = tmp_path / "out"
    common = ["--model", str(model), "--data", str(data), "--output", str(output),
              "--images", "2", "--tie-samples", "3", "--metric-perturbations-per-eval", "16",
              "--bootstrap", "200", "--quiet", "--device", "cpu"]  # fmt: skip
    driver.main([*common, "--methods", "gradmask-m4", "--metrics", "notebook,pointing"])
    benchmark = {r["image"]: r for r in csv.DictReader((output / "results.csv").open())}

    only = "GradMask m=4,m=1,m=2,masks alone,random masks,first 1"
    argv = [*common, "--only", only, "--time-images", "1"]
    with monkeypatch.context() as patched:  # the benchmark's m = 4 store is not redone
        from captum_gradmask import explain_dataset as explain_module

        calls: list[str] = []
        real = explain_module.explain_dataset

        def spy(dataset, model, store, **kwargs):
            calls.append(Path(store).name)
            return real(dataset, model, store, **kwargs)

        patched.setattr(explain_module, "explain_dataset", spy)
        results = paper_analyses.run(paper_analyses.parse_args(argv))
    assert "gradmask-m4.zarr" in calls  # visited, found complete
    assert sorted(results) == ["ablation", "layers", "masks-per-layer"]

    sweep = results["masks-per-layer"]
    assert sweep.methods == ["gradmask-m1", "gradmask-m4 (masks_per_layer=2)", "gradmask-m4"]
    assert sweep.reference == "gradmask-m4" and sweep.images == 2
    assert set(sweep.cost) == set(sweep.methods)  # passes and seconds per configuration
    assert sweep.cost["gradmask-m1"]["forward"] < sweep.cost["gradmask-m4"]["forward"]
    paired = (output / "paper" / "masks-per-layer" / "paired.md").read_text()
    assert "| gradmask-m1 |" in paired and "| gradmask-m4 (masks_per_layer=2) |" in paired
    ablation = results["ablation"]
    assert "gradmask-ablation (variant=masks alone)" in ablation.methods
    assert ablation.cost["gradmask-ablation (variant=masks alone)"]["forward"] == 1  # no masking
    # The m = 4 rows are the benchmark's own numbers (one store, one evaluation).
    rows = csv.DictReader((output / "paper" / "ablation" / "results.csv").open())
    m4 = {r["image"]: r for r in rows if r["method"] == "gradmask-m4"}
    for image, row in benchmark.items():
        assert m4[image]["insertion_notebook"] == row["insertion_notebook"]
    for name in ("masks_per_layer.png", "layers.png", "ablation.png"):
        assert (output / "paper" / name).stat().st_size > 1000

    # Resume: nothing is explained or evaluated again.
    with monkeypatch.context() as patched:
        _refuse_work(patched)
        paper_analyses.run(paper_analyses.parse_args(argv))


def test_reference_store_of_another_run_is_paired_with_and_not_remade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--reference-store: the sweep pairs with a GradMask m = 4 store of a larger run (here 2
    images against the sweep's 1) instead of making its own; a store of another method, or one
    without every image of the sweep, is refused with the option named."""
    data, model = _tiny_dataset(tmp_path / "data"), _tiny_model(tmp_path / "model")
    common = ["--model", str(model), "--data", str(data), "--tie-samples", "3",
              "--metric-perturbations-per-eval", "16", "--bootstrap", "200", "--quiet",
              "--device", "cpu"]  # fmt: skip
    bench = tmp_path / "bench"
    methods = ["--methods", "gradmask-m4,gradmask-m1", "--metrics", "notebook,pointing"]
    driver.main([*common, "--output", str(bench), "--images", "2", *methods])
    rows = csv.DictReader((bench / "results.csv").open())
    benchmark = {r["image"]: r for r in rows if r["method"] == "gradmask-m4"}
    store = bench / "stores" / "gradmask-m4.zarr"

    sweep = tmp_path / "sweep"
    argv = [*common, "--output", str(sweep), "--first-image", "2", "--images", "1",
            "--only", "m=2", "--reference-store", str(store)]  # fmt: skip
    results = paper_analyses.run(paper_analyses.parse_args(argv))
    assert not (sweep / "stores" / "gradmask-m4.zarr").exists()
    result = results["masks-per-layer"]
    assert result.methods == ["gradmask-m4 (masks_per_layer=2)", "gradmask-m4"]
    assert result.images == 1
    rows = csv.DictReader((sweep / "paper" / "masks-per-layer" / "results.csv").open())
    m4 = {r["image"]: r for r in rows if r["method"] == "gradmask-m4"}
    assert list(m4) == ["img_1.png"]  # the sweep's image, from the larger store
    assert m4["img_1.png"]["deletion_notebook"] == benchmark["img_1.png"]["deletion_notebook"]

    wrong = [*argv[:-1], str(bench / "stores" / "gradmask-m1.zarr")]
    with pytest.raises(SystemExit, match="holds 'gradmask-m1' maps; it must hold the reference's"):
        paper_analyses.run(paper_analyses.parse_args(wrong))
    small = tmp_path / "small"
    driver.main([*common, "--output", str(small), "--images", "1", "--methods", "gradmask-m4",
                 "--metrics", "notebook,pointing"])  # fmt: skip
    short = [*argv[:-1], str(small / "stores" / "gradmask-m4.zarr")]
    with pytest.raises(SystemExit, match=r"1 of the sweep's 1 images \(first: .*img_1.png\)"):
        paper_analyses.run(paper_analyses.parse_args(short))
