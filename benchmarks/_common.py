"""Paths and small helpers shared by the benchmark scripts (one copy, not one per script).

The scripts read the project's shared assets at ``../shared`` next to the checkout by default;
each takes ``--model``/``--data`` (or ``--shared``) to point elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_DATA",
    "DEFAULT_GATE",
    "DEFAULT_MODEL",
    "DEFAULT_SHARED",
    "REPO",
    "explain_and_score",
    "load_rows",
    "load_split",
    "masked_kl_top1",
    "synchronize",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"
DEFAULT_DATA = DEFAULT_SHARED / "data" / "imagenet-val-sample"
DEFAULT_MODEL = DEFAULT_SHARED / "models" / "vit-tiny-patch16-224-augreg-in1k"
DEFAULT_GATE = REPO / "benchmarks" / "checkpoints" / "diffmask-vit-tiny"


def explain_and_score(
    images: Any,
    model: torch.nn.Module,
    store: Path,
    *,
    groups: Sequence[str],
    score_every: int,
    explain: Mapping[str, Any],
    score: Mapping[str, Any],
) -> None:
    """Explain ``images`` into ``store`` (``explain_dataset`` with the options ``explain``)
    and score it with each metric group in ``groups`` (an ``evaluate_store`` evaluation of
    that name each, with the options ``score``), ``score_every`` images at a time: a killed
    run leaves at most one block explained and not scored. Resumes like the calls it makes."""
    from captum_gradmask.evaluation import evaluate_store
    from captum_gradmask.explain_dataset import explain_dataset

    while True:
        block = explain_dataset(images, model, store, max_images=score_every, **explain)
        for group in groups:
            evaluate_store(store, images, model, metrics=[group], name=group, **score)
        if block.written < score_every:
            return


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a timer reads finished work."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.jsonl`` written line by line by a benchmark script; a truncated
    last line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def load_split(data: str | Path, first: int, count: int) -> Tensor:
    """Normalised model inputs (the shared ViT-Tiny's resize and normalisation) of ``count``
    files of an ImageNet sample folder from index ``first`` (0-based, file order)."""
    from tqdm.auto import tqdm

    from captum_gradmask.data import load_imagenet_sample, preprocess_image

    records = load_imagenet_sample(data, limit=count, offset=first)
    if len(records) < count:
        raise SystemExit(f"--data {str(data)!r} has only {first + len(records)} images")
    return torch.stack([preprocess_image(r.path) for r in tqdm(records, desc="preprocessing")])


def masked_kl_top1(
    tokens: Any, gate: Any, states0: Tensor, baseline: Tensor, prefix: int,
    keep: Tensor, logits: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per image, ``KL(p || p_masked)`` and top-1 agreement (0/1) of the model run on the
    embedded tokens ``states0`` with the patches where ``keep`` is 0 replaced by the Vision
    DiffMask ``gate``'s filler; differentiable in ``keep``."""
    from captum_gradmask.methods.diffmask import kl_divergence

    masked = tokens.run(gate.mask_tokens(states0, keep, baseline, prefix))
    return kl_divergence(logits, masked), (masked.argmax(-1) == logits.argmax(-1)).float()
