"""What a new user's mistakes give on the command line: one line naming the problem and the fix
(or a warning), never a traceback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import ViTImageProcessor

from captum_gradmask.cli import build_parser, main
from captum_gradmask.data import preprocess_image

from .models import tiny_hf_vit, tiny_timm_vit


@pytest.fixture
def checkpoint(tmp_path):
    folder = tmp_path / "tiny-vit"
    tiny_hf_vit().save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    image = tmp_path / "image.png"
    pixels = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    return folder, image


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1, error
    return error


def test_cuda_without_a_gpu_is_a_one_line_error(checkpoint, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder, image = checkpoint
    out = str(tmp_path / "x.png")
    assert (
        main(["explain", str(image), "--model", str(folder), "--device", "cuda", "--out", out]) == 2
    )
    assert "no CUDA GPU" in _one_line_error(capsys)
    command = ["explain-dataset", str(tmp_path), "--model", str(folder), "--device", "cuda"]
    assert main([*command, "--out", str(tmp_path / "s.zarr")]) == 2
    assert "--device cpu" in _one_line_error(capsys)


def test_unknown_timm_architecture_and_unreachable_hub_are_one_line_errors(
    checkpoint, tmp_path, monkeypatch, capsys
) -> None:
    _, image = checkpoint
    out = ["--out", str(tmp_path / "x.png")]
    assert main(["explain", str(image), "--model", "timm:vit_tiny_patch16", *out]) == 2
    error = _one_line_error(capsys)
    assert "not a timm architecture" in error and "vit_tiny_patch16_224" in error

    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", offline)
    assert main(["explain", str(image), "--model", "google/vit-base-patch16-224", *out]) == 2
    error = _one_line_error(capsys)
    assert "'google/vit-base-patch16-224' could not be loaded" in error and "hub" in error


def test_out_into_a_missing_folder_fails_before_the_work(checkpoint, tmp_path, capsys) -> None:
    _, image = checkpoint
    out = tmp_path / "missing" / "map.png"
    # a model that cannot load: the --out check must come first
    assert main(["explain", str(image), "--model", "timm:nope", "--out", str(out)]) == 2
    assert "does not exist" in _one_line_error(capsys)


def test_label_names_the_changed_settings_and_batch_size_is_deprecated(
    checkpoint, tmp_path, capsys
) -> None:
    folder, image = checkpoint
    command = ["explain", str(image), "--model", str(folder), "--quiet"]
    command += ["--out", str(tmp_path / "x.png"), "--method-option", "mode=fast"]
    assert main([*command, "--batch-size", "8"]) == 0
    captured = capsys.readouterr()
    assert "with gradmask-m4 (mode=fast)" in captured.out
    assert "--perturbations-per-eval" in captured.err and "deprecated" in captured.err
    assert main([*command, "--method", "rollout", "--perturbations-per-eval", "8"]) == 2
    assert "does not batch perturbed copies" in _one_line_error(capsys)


def test_help_says_where_the_figure_goes() -> None:
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "gradmask.png in the current folder" in commands["explain"].format_help()
    assert "map.png in the current folder" in commands["show"].format_help()
    for name in ("explain", "explain-dataset", "evaluate"):
        assert "--perturbations-per-eval" in commands[name].format_help()


def test_transparency_and_tiny_images_warn(tmp_path) -> None:
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))
    with pytest.warns(UserWarning, match="alpha channel"):
        preprocess_image(rgba, size=32)
    with pytest.warns(UserWarning, match="20x20 pixels, less than half the model's 224x224"):
        preprocess_image(Image.new("RGB", (20, 20)), size=224)


def test_timm_at_another_size_and_channels_last_name_the_fix() -> None:
    from captum_gradmask import GradMaskAttribution

    gradmask = GradMaskAttribution(tiny_timm_vit())  # built for 32x32, strict size
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        gradmask.attribute(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\)"):
        gradmask.attribute(torch.randn(1, 32, 32, 3))


def test_a_former_method_name_runs_and_says_the_new_one(checkpoint, tmp_path, capsys) -> None:
    folder, image = checkpoint
    command = ["explain", str(image), "--model", str(folder), "--quiet"]
    assert main([*command, "--out", str(tmp_path / "x.png"), "--method", "inputxgradient"]) == 0
    captured = capsys.readouterr()
    assert "with input-x-gradient" in captured.out
    assert "warning: method name 'inputxgradient' is deprecated; use 'input-x-gradient'" in (
        captured.err
    )
