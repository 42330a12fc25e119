"""The ``captum-gradmask explain`` command end to end on a tiny saved checkpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor

from captum_gradmask import GradMaskAttribution
from captum_gradmask.cli import class_names, main, parse_options
from captum_gradmask.methods import RISE
from captum_gradmask.models import load_model

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared
from .models import tiny_hf_vit


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "tiny-vit"
    model = tiny_hf_vit()
    model.config.id2label = {i: f"class-{i}" for i in range(7)}
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
        image
    )
    return folder, image


def test_explain_writes_heatmap_and_map(checkpoint, tmp_path, capsys) -> None:
    folder, image = checkpoint
    out, grid = tmp_path / "map.png", tmp_path / "map.npy"
    code = main(
        [
            "explain",
            str(image),
            "--model",
            str(folder),
            "--target",
            "3",
            "--out",
            str(out),
            "--save-map",
            str(grid),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "top predictions" in printed and "class-" in printed
    assert "explained class 3 (class-3)" in printed
    assert out.stat().st_size > 1000
    # The saved map is GradMask's grid on the very pixels the command fed the model.
    model, preprocess = load_model(folder)
    pixels = preprocess.preprocess(image)[None]
    expected = GradMaskAttribution(model).attribute_grid(pixels, target=3)[0]
    np.testing.assert_allclose(np.load(grid), expected.numpy(), atol=1e-5)


def _console_script() -> str:
    """The installed ``captum-gradmask`` next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name("captum-gradmask")
    found = str(beside) if beside.exists() else shutil.which("captum-gradmask")
    if found is None:
        pytest.skip("the captum-gradmask console script is not installed (pip install -e .)")
    return found


def test_console_script_any_method_side_by_side(checkpoint, tmp_path) -> None:
    folder, image = checkpoint
    out, saved = tmp_path / "rise.png", tmp_path / "rise.npy"
    command = [_console_script(), "explain", str(image), "--model", str(folder)]
    command += ["--method", "rise", "--method-option", "n_masks=40", "--method-option", "seed=3"]
    command += ["--style", "side-by-side", "--target", "2", "--out", str(out)]
    command += ["--save-map", str(saved), "--quiet"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "with rise" in run.stdout and out.stat().st_size > 1000
    model, preprocess = load_model(folder)
    pixels = preprocess.preprocess(image)[None]
    expected = RISE(model).attribute_grid(pixels, target=2, n_masks=40, seed=3)[0]
    np.testing.assert_allclose(np.load(saved), expected.numpy(), atol=1e-5)


def test_method_options_are_checked(checkpoint, capsys) -> None:
    folder, image = checkpoint
    code = main(["explain", str(image), "--model", str(folder), "--method-option", "n_mask=3"])
    assert code == 2 and "unknown setting(s) ['n_mask']" in capsys.readouterr().err
    code = main(["explain", str(image), "--model", str(folder), "--method", "rollout",
                 "--perturbations-per-eval", "8"])  # fmt: skip
    assert code == 2 and "--perturbations-per-eval" in capsys.readouterr().err
    with pytest.raises(ValueError, match="name=value"):
        parse_options(["n_masks"])


def test_class_names_from_hf_labels_and_timm_imagenet() -> None:
    import timm

    timm_model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    names = class_names(timm_model)
    assert len(names) == 1000 and names[65] == "sea snake"
    assert class_names(timm.create_model("vit_tiny_patch16_224", num_classes=7)) == {}
    labelled = torch.nn.Module()
    labelled.config = type("Config", (), {"id2label": {0: "cat", 1: "dog"}})()
    assert class_names(labelled) == {0: "cat", 1: "dog"}


def test_explain_rejects_bad_target_and_missing_files(checkpoint, tmp_path, capsys) -> None:
    folder, image = checkpoint
    assert main(["explain", str(image), "--model", str(folder), "--target", "9", "--quiet"]) == 2
    assert "--target 9 is out of range: the model has 7 classes" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "none.jpg"), "--model", str(folder)]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["explain", str(image), "--model", str(tmp_path / "no-model")]) == 2
    assert "not a Hugging Face checkpoint folder" in capsys.readouterr().err


@needs_shared
@pytest.mark.slow
def test_explain_real_image_with_shared_vit_tiny(tmp_path, capsys) -> None:
    image = IMAGENET_SAMPLE / "images" / "ILSVRC2012_val_00000001.JPEG"
    out = tmp_path / "snake.png"
    code = main(
        [
            "explain",
            str(image),
            "--model",
            str(HF_VIT_TINY),
            "--out",
            str(out),
            "--mode",
            "fast",
            "--quiet",
        ]
    )
    assert code == 0
    assert "sea snake" in capsys.readouterr().out  # label 65 of this image, the model's top-1
    assert out.stat().st_size > 10_000


def test_amp_dtype_from_the_command_line(checkpoint, tmp_path, capsys) -> None:
    folder, image = checkpoint
    base = ["explain", str(image), "--model", str(folder), "--quiet", "--device", "cpu"]
    maps = {}
    for name, extra in {
        "fp32": [],
        "bf16": ["--amp-dtype", "bf16"],
        "option": ["--method-option", "amp_dtype=fp16"],
    }.items():
        out = tmp_path / f"{name}.npy"
        code = main([*base, "--out", str(tmp_path / f"{name}.png"), "--save-map", str(out), *extra])
        assert code == 0
        maps[name] = np.load(out)
    assert np.abs(maps["bf16"] - maps["fp32"]).max() <= 0.05 * maps["fp32"].max()
    assert np.abs(maps["option"] - maps["fp32"]).max() <= 0.01 * maps["fp32"].max()
    capsys.readouterr()
    assert main([*base, "--method-option", "amp_dtype=fp32"]) == 2
    assert "amp_dtype 'fp32' is not valid: use bf16 or fp16" in capsys.readouterr().err
    assert main([*base, "--method", "rollout", "--amp-dtype", "bf16"]) == 2
    assert "unknown setting(s) ['amp_dtype']" in capsys.readouterr().err
