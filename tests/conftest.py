"""Shared fixtures: tiny random models for fast tests, the shared ViT-Tiny for real-model checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(
    os.environ.get("CAPTUM_GRADMASK_SHARED", Path(__file__).resolve().parents[2] / "shared")
)
HF_VIT_TINY = SHARED / "models" / "vit-tiny-patch16-224-augreg-in1k"
TIMM_VIT_TINY = SHARED / "models" / "timm" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-val-sample"

needs_shared = pytest.mark.skipif(
    not HF_VIT_TINY.is_dir(),
    reason=f"shared assets not found at {SHARED} (set CAPTUM_GRADMASK_SHARED to shared/)",
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not HF_VIT_TINY.is_dir():
        pytest.skip(f"shared assets not found at {SHARED} (set CAPTUM_GRADMASK_SHARED)")
    return SHARED
