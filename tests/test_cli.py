"""The ``captum-gradmask explain`` command end to end on a tiny saved checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import ViTImageProcessor

from captum_gradmask.cli import main

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
    saved = np.load(grid)
    assert saved.shape == (4, 4) and saved.max() > 0


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
