"""``explain`` and ``explain-dataset`` with ``--labels`` / ``--labels-file``: zero-shot
explanations of saved random-weight CLIP and SigLIP checkpoints."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from captum_gradmask.cli import main
from captum_gradmask.models import load_model
from captum_gradmask.store import open_maps
from captum_gradmask.zero_shot import ZeroShotClassifier

from .models import save_zero_shot_checkpoint


@pytest.fixture(params=[False, True], ids=["clip", "siglip"])
def checkpoint(request: pytest.FixtureRequest, tmp_path):
    folder = save_zero_shot_checkpoint(tmp_path / "model", siglip=request.param)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    return folder, images


def test_load_model_with_labels_is_a_zero_shot_classifier(checkpoint) -> None:
    folder, _ = checkpoint
    model, preprocess = load_model(folder, labels=["a dog", "a cat"], templates=["a {}."])
    assert isinstance(model, ZeroShotClassifier) and not model.training
    assert model.labels == ["a dog", "a cat"] and preprocess.size == (28, 28)
    assert model.text_embeddings.shape == (2, model.text_embeddings.shape[1])
    with pytest.raises(ValueError, match="`templates` are for zero-shot"):
        load_model(folder, templates=["a {}."])


def test_explain_with_labels(checkpoint, tmp_path, capsys) -> None:
    folder, images = checkpoint
    out, grid = tmp_path / "map.png", tmp_path / "map.npy"
    command = ["explain", str(images / "0.png"), "--model", str(folder), "--labels"]
    command += ["a dog, a cat,a car", "--target", "1", "--out", str(out)]
    assert main([*command, "--save-map", str(grid), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "a dog" in printed and "a car" in printed
    assert "explained class 1 (a cat)" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = np.load(grid)
    assert saved.shape == (2, 2) and saved.max() > 0

    model, preprocess = load_model(folder, labels=["a dog", "a cat", "a car"])
    image = preprocess.preprocess(images / "0.png")[None]
    from captum_gradmask import GradMaskAttribution

    expected = GradMaskAttribution(model).attribute_grid(image, target=1)[0]
    np.testing.assert_allclose(saved, expected.numpy(), atol=1e-5)


def test_labels_file_and_templates(checkpoint, tmp_path, capsys) -> None:
    folder, images = checkpoint
    labels = tmp_path / "labels.txt"
    labels.write_text("a dog\n\na cat\n")
    command = ["explain", str(images / "1.png"), "--model", str(folder), "--labels-file"]
    command += [str(labels), "--template", "a photo of {}.", "--template", "art of {}."]
    assert main([*command, "--out", str(tmp_path / "m.png"), "--quiet"]) == 0
    assert "a cat" in capsys.readouterr().out
    both = ["explain", str(images / "1.png"), "--model", str(folder), "--labels", "a,b"]
    assert main([*both, "--labels-file", str(labels)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["explain", str(images / "1.png"), "--model", str(folder), "--labels", " ,"]) == 2
    assert "non-empty label" in capsys.readouterr().err


def test_explain_dataset_with_labels_records_them(checkpoint, tmp_path, capsys) -> None:
    folder, images = checkpoint
    out = tmp_path / "maps.zarr"
    command = ["explain-dataset", str(images), "--model", str(folder), "--out", str(out)]
    command += ["--labels", "a dog,a cat", "--method", "gradmask-m1", "--workers", "0"]
    assert main([*command, "--quiet"]) == 0
    assert "3 of 3 images done" in capsys.readouterr().out
    stored = open_maps(out)
    assert stored.attrs["model"]["labels"] == ["a dog", "a cat"]
    maps = stored.maps[:]
    assert maps.shape == (3, 2, 2) and np.isfinite(maps).all() and maps.max() > 0


@pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason="open_clip_torch is not installed (pip install captum-gradmask[open-clip])",
)
def test_explain_open_clip_with_its_packaged_tokenizer(tmp_path, capsys) -> None:
    """A random ViT-B-32 (no weights can be fetched here) with OpenCLIP's own tokenizer."""
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 60, 3), dtype=np.uint8)).save(
        image
    )
    command = ["explain", str(image), "--model", "open_clip:ViT-B-32", "--labels", "a dog,a cat"]
    command += ["--method", "chefer-gae", "--target", "0", "--save-map", str(tmp_path / "m.npy")]
    assert main([*command, "--out", str(tmp_path / "m.png"), "--quiet"]) == 0
    assert "explained class 0 (a dog)" in capsys.readouterr().out
    assert np.load(tmp_path / "m.npy").shape == (7, 7)
