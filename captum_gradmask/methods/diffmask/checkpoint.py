"""Vision DiffMask files: the trained gate and the trainer's state, written atomically.

A gate is ``gate.safetensors`` (weights) and ``gate.json`` (format, version, configuration and
free metadata); a trainer checkpoint adds ``trainer.safetensors`` (optimiser moments,
multipliers, random state), ``trainer.json`` (counters, hyperparameters, optimiser groups,
history) and ``history.csv``. Every file goes through a temporary file and ``os.replace``, so
an interrupted save never leaves a broken checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "FORMAT",
    "GATE_CONFIG",
    "GATE_WEIGHTS",
    "HISTORY_CSV",
    "TRAINER_CONFIG",
    "TRAINER_STATE",
    "has_trainer_state",
    "read_gate",
    "read_trainer_state",
    "write_gate",
    "write_trainer_state",
]

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate.json"
TRAINER_STATE = "trainer.safetensors"
TRAINER_CONFIG = "trainer.json"
HISTORY_CSV = "history.csv"
FORMAT = "captum-gradmask/vision-diffmask"


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file so an interrupted save never leaves a broken file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_gate(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    config: Mapping[str, Any],
    metadata: Mapping[str, Any],
) -> None:
    """Write a gate's weights and its ``config`` (plus ``metadata``) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(folder / GATE_WEIGHTS, lambda p: save_file(weights, str(p)))
    payload = {"format": FORMAT, "version": 1, "config": dict(config), **metadata}
    _atomic(folder / GATE_CONFIG, lambda p: p.write_text(json.dumps(payload, indent=2)))


def read_gate(
    folder: str | os.PathLike[str], device: str = "cpu"
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The configuration and the weights of the gate saved in ``folder``."""
    folder = Path(folder)
    config_path, weights_path = folder / GATE_CONFIG, folder / GATE_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"no trained Vision DiffMask gate in {str(folder)!r}: expected {GATE_CONFIG} and "
            f"{GATE_WEIGHTS} (train one with `fit` or benchmarks/train_diffmask.py)"
        )
    payload = json.loads(config_path.read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{config_path} is not a Vision DiffMask gate config")
    return payload["config"], load_file(str(weights_path), device=device)


def has_trainer_state(folder: str | os.PathLike[str] | None) -> bool:
    """Whether ``folder`` holds a trainer checkpoint to resume from."""
    return folder is not None and (Path(folder) / TRAINER_CONFIG).is_file()


def write_trainer_state(
    folder: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    payload: Mapping[str, Any],
    history: Sequence[Mapping[str, float]],
) -> None:
    """Write the trainer's tensors, its JSON ``payload`` and the history table."""
    folder = Path(folder)
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic(folder / TRAINER_STATE, lambda p: save_file(state, str(p)))
    document = {"format": FORMAT, "version": 1, **payload, "history": list(history)}
    _atomic(folder / TRAINER_CONFIG, lambda p: p.write_text(json.dumps(document, indent=2)))
    if history:
        keys = list(dict.fromkeys(k for row in history for k in row))

        def write_csv(path: Path) -> None:
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=keys)
                writer.writeheader()
                writer.writerows(history)

        _atomic(folder / HISTORY_CSV, write_csv)


def read_trainer_state(
    folder: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The JSON payload and the tensors of the trainer checkpoint in ``folder``."""
    folder = Path(folder)
    payload = json.loads((folder / TRAINER_CONFIG).read_text())
    return payload, load_file(str(folder / TRAINER_STATE))
