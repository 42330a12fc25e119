"""load_model: Hugging Face folders and timm architectures with local weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from captum_gradmask.models import PreprocessConfig, load_model

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, TIMM_VIT_TINY, needs_shared
from .models import TINY, tiny_hf_vit, tiny_timm_vit

TIMM_TINY_ARGS = dict(img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3, mlp_ratio=2.0)


def test_huggingface_folder_with_processor(tmp_path: Path) -> None:
    from transformers import ViTImageProcessor

    original = tiny_hf_vit()
    original.save_pretrained(tmp_path)
    ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]
    ).save_pretrained(tmp_path)
    model, config = load_model(tmp_path)
    assert not model.training
    assert config == PreprocessConfig(
        (32, 32), (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), "bilinear", None, "huggingface"
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images).logits, original(images).logits)
    # preprocess: resize to the model size, then (x / 255 - mean) / std.
    pixel = Image.new("RGB", (50, 40), (255, 0, 51))
    tensor = config.preprocess(pixel)
    assert tensor.shape == (3, 32, 32)
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([3.0, -5.0 / 3, -1.0]))


def test_huggingface_folder_without_processor_warns(tmp_path: Path) -> None:
    tiny_hf_vit().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no image processor"):
        _, config = load_model(tmp_path)
    assert config.size == (TINY["image_size"],) * 2 and config.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_architecture_with_local_weights(tmp_path: Path, suffix: str) -> None:
    original = tiny_timm_vit()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(original.state_dict(), path)
    else:
        torch.save(original.state_dict(), path)
    model, config = load_model("timm:vit_tiny_patch16_224", weights=path, **TIMM_TINY_ARGS)
    assert not model.training
    assert model.num_classes == 7  # read from the file's head
    assert config.source == "timm" and config.size == (32, 32)
    assert config.mean == (0.5, 0.5, 0.5) and config.resample == "bicubic"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), original(images))


def test_errors_name_the_fix(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.touch()
    with pytest.raises(ValueError, match="timm:<architecture>"):
        load_model(weights)
    with pytest.raises(ValueError, match="only for timm"):
        load_model("google/vit-base-patch16-224", weights=weights)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("timm:vit_tiny_patch16_224", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="needs an architecture"):
        load_model("timm:")


@pytest.mark.slow
@needs_shared
def test_shared_vit_tiny_loads_the_same_from_both_sources() -> None:
    from captum_gradmask.data import load_imagenet_sample

    hf_model, hf_config = load_model(HF_VIT_TINY, local_files_only=True)
    timm_model, timm_config = load_model("timm:vit_tiny_patch16_224", weights=TIMM_VIT_TINY)
    assert hf_config.size == timm_config.size == (224, 224)
    assert hf_config.mean == timm_config.mean and hf_config.resample == "bicubic"
    record = load_imagenet_sample(IMAGENET_SAMPLE, limit=1)[0]
    image = hf_config.preprocess(record.path)[None]
    with torch.no_grad():
        torch.testing.assert_close(hf_model(image).logits, timm_model(image), atol=1e-4, rtol=0)
