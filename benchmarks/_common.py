"""Paths and small helpers shared by the benchmark scripts (one copy, not one per script).

The scripts read the project's shared assets at ``../shared`` next to the checkout by default;
each takes ``--model``/``--data`` (or ``--shared``) to point elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_GATE",
    "DEFAULT_MODEL",
    "DEFAULT_SHARED",
    "REPO",
    "synchronize",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"
DEFAULT_DATA = DEFAULT_SHARED / "data" / "imagenet-val-sample"
DEFAULT_MODEL = DEFAULT_SHARED / "models" / "vit-tiny-patch16-224-augreg-in1k"
DEFAULT_GATE = REPO / "benchmarks" / "checkpoints" / "diffmask-vit-tiny"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer reads finished work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
