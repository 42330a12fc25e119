"""Training curves of a Vision DiffMask gate from its per-epoch history.

Reads ``history.json`` (or ``trainer.json``) of a folder written by
``benchmarks/train_diffmask.py`` and draws four panels against the training step: KL, kept
fraction, top-1 agreement and the Lagrange multipliers, with the issue's targets as dashed
lines. Example::

    python -m benchmarks.plot_diffmask_history runs/gate-v2 --out docs/diffmask/training-curves.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_history", "plot_history"]

# (column, label, line style) per panel; columns absent from a history are skipped.
_PANELS: dict[str, list[tuple[str, str, str]]] = {
    "KL(p || p_masked), nats": [
        ("train_kl", "train, drawn state (sampled, augmented)", ":"),
        ("train_eval_kl", "train images, all gates (sampled)", "--"),
        ("train_eval_kl_hard", "train images, map >= 0.5", "-"),
        ("val_kl", "validation, all gates (sampled)", "--"),
        ("val_kl_hard", "validation, map >= 0.5", "-"),
    ],
    "fraction of patches kept": [
        ("train_kept", "train, drawn state (expected)", ":"),
        ("train_kept_all_layers", "train, all gates (expected)", "-."),
        ("train_eval_kept_hard", "train images, map >= 0.5", "-"),
        ("val_kept", "validation, map mean", "--"),
        ("val_kept_hard", "validation, map >= 0.5", "-"),
    ],
    "top-1 kept (masked argmax = original)": [
        ("train_agreement", "train, drawn state (sampled)", ":"),
        ("train_eval_agreement_hard", "train images, map >= 0.5", "-"),
        ("val_agreement", "validation, all gates (sampled)", "--"),
        ("val_agreement_hard", "validation, map >= 0.5", "-"),
    ],
}


def _colour(column: str) -> str:
    """One colour per split and mask, the same in every panel."""
    split = "val" if column.startswith("val_") else "eval" if "train_eval" in column else "train"
    key = split + ("_hard" if column.endswith("_hard") else "")
    key += "_all" if column.endswith("all_layers") else ""
    colours = {"train": "C0", "train_all": "C5", "eval": "C1", "eval_hard": "C2", "val": "C3",
               "val_hard": "C4"}  # fmt: skip
    return colours.get(key, "C7")


def load_history(path: str | Path) -> list[dict[str, Any]]:
    """The per-epoch rows of a history file or of the checkpoint folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "history.json" if (path / "history.json").is_file() else path
        path = path / "trainer.json" if path.is_dir() else path
    document = json.loads(path.read_text())
    return document["history"] if isinstance(document, dict) else document


def plot_history(
    history: Sequence[Mapping[str, float]],
    eps: float = 0.1,
    targets: Mapping[str, float] | None = None,
) -> Any:
    """A matplotlib ``Figure`` (2 x 2 panels) of the per-epoch ``history`` against the step.

    Args:
        history: rows with ``step`` and the trainer's columns (``train_*``, ``val_*``,
            ``train_eval_*``, ``alpha_<l>``).
        eps: the KL bound, drawn in the KL panel.
        targets: dashed reference lines: ``kl``, ``kept`` and ``agreement`` (default: the
            issue's 0.2 nats, 60% of patches, 85% top-1).
    """
    from matplotlib.figure import Figure

    targets = {"kl": 0.2, "kept": 0.6, "agreement": 0.85, **(targets or {})}
    steps = [row["step"] for row in history]
    figure = Figure(figsize=(11, 8), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    references = (
        [("eps", eps), ("target", targets["kl"])],
        [("target", targets["kept"])],
        [("target", targets["agreement"])],
    )
    for ax, (title, columns), lines in zip(axes, _PANELS.items(), references, strict=False):
        for column, label, style in columns:
            if any(column in row for row in history):
                values = [row.get(column, float("nan")) for row in history]
                ax.plot(steps, values, style, color=_colour(column), marker=".", label=label)
        for name, value in lines:
            ax.axhline(value, color="grey", linewidth=0.8, linestyle=(0, (4, 4)))
            ax.annotate(f"{name} {value:g}", (steps[-1], value), fontsize=7, color="grey")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[3]
    layers = sorted(int(k.split("_")[1]) for k in history[-1] if k.startswith("alpha_"))
    for layer in layers:
        values = [row.get(f"alpha_{layer}", float("nan")) for row in history]
        if layer == layers[-1]:
            ax.plot(steps, values, "r-", linewidth=2, label=f"state {layer} (whole stack)")
        else:
            ax.plot(steps, values, linewidth=0.8, alpha=0.6)
    if "alphas_mean" in history[-1]:
        ax.plot(steps, [row["alphas_mean"] for row in history], "k-", linewidth=2, label="mean")
        ax.legend(fontsize=7)
    ax.set_title("Lagrange multipliers (one line per state; last = whole stack)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return figure


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("history", help="history.json / trainer.json, or the checkpoint folder")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--eps", type=float, default=None, help="default: the run's own eps")
    args = parser.parse_args(argv)
    eps = args.eps
    trainer_json = Path(args.history) / "trainer.json"
    if eps is None and trainer_json.is_file():
        eps = json.loads(trainer_json.read_text())["config"]["eps"]
    figure = plot_history(load_history(args.history), eps=0.1 if eps is None else eps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
