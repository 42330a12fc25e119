"""Training curves of a Vision DiffMask gate from its per-epoch history.

Reads ``history.json`` (or ``trainer.json``) of a folder written by
``benchmarks/train_diffmask.py`` and draws four panels against the training step: KL, kept
fraction, top-1 agreement and the Lagrange multipliers, with the issue's targets as dashed
lines. A gate fitted by ``benchmarks/distill_diffmask.py`` has no trainer history: ``--fit``
reads the probe fit's per-epoch rows from its ``run.json`` instead and draws its cross-entropy
and held-out mask agreement, with the epoch whose weights were kept; for a gate refined by
``distill_diffmask refine`` (its ``run.json`` has a ``placeholder`` stage) it draws the
sharpening fit and the placeholder's epochs (KL, top-1 kept and kept fraction on the training,
held-out and validation images). Example::

    python -m benchmarks.plot_diffmask_history runs/gate-v2 --out docs/diffmask/training-curves.png
    python -m benchmarks.plot_diffmask_history benchmarks/checkpoints/diffmask-vit-tiny --fit \\
        --out docs/diffmask/fit-curves.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_history", "plot_fit", "plot_history", "plot_refine"]

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


def plot_fit(history: Sequence[Mapping[str, float]]) -> Any:
    """A matplotlib ``Figure`` (1 x 2 panels) of a probe fit's per-epoch ``history`` (the rows
    of :func:`benchmarks.distill_diffmask.fit_probes`): training and held-out cross-entropy,
    and the held-out hard masks' agreement with the teacher's and kept fraction; a vertical
    line marks the epoch of lowest held-out cross-entropy, whose weights the gate keeps."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    best = min(history, key=lambda row: row["holdout_bce"])["epoch"]
    figure = Figure(figsize=(11, 4), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.plot(epochs, [r["train_bce"] for r in history], "-", color="C0", marker=".",
              label="training pairs")  # fmt: skip
    left.plot(epochs, [r["holdout_bce"] for r in history], "-", color="C3", marker=".",
              label="held-out images")  # fmt: skip
    left.set_title("binary cross-entropy to the teacher's P(kept)", fontsize=10)
    for column, label, colour in (
        ("holdout_agreement", "held-out: agreement with the teacher's mask", "C3"),
        ("holdout_kept", "held-out: kept, map >= 0.5", "C4"),
        ("holdout_teacher_kept", "held-out: kept by the teacher", "C7"),
    ):
        right.plot(epochs, [r[column] for r in history], "-", color=colour, marker=".",
                   label=label)  # fmt: skip
    right.set_title("held-out hard masks (before calibration)", fontsize=10)
    for ax in (left, right):
        ax.axvline(best, color="grey", linewidth=0.8, linestyle=(0, (4, 4)))
        ax.annotate(f"kept: epoch {best}", (best, ax.get_ylim()[1]), fontsize=7, color="grey")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure


def plot_refine(run: Mapping[str, Any], eps: float = 0.1) -> Any:
    """A matplotlib ``Figure`` (1 x 3 panels) of a refinement's ``run.json``
    (:func:`benchmarks.distill_diffmask.refine`): the sharpening fit's cross-entropy to the
    gate's own hard masks (if it ran; the kept epoch marked), then per placeholder epoch the KL
    of the hard and sampled masks and the top-1 kept and kept fraction of the hard masks, on
    the training pairs, the held-out training images and the validation images, with the
    issue's targets dashed (epoch 0: before fitting)."""
    from matplotlib.figure import Figure

    nan = float("nan")

    figure = Figure(figsize=(15, 4.2), layout="constrained")
    sharp, kl, top = figure.subplots(1, 3)
    if run.get("sharpen"):
        rows = run["sharpen"]["history"]
        epochs = [r["epoch"] for r in rows]
        for column, label, colour in (("train_bce", "training pairs", "C0"),
                                      ("holdout_bce", "held-out images", "C3")):  # fmt: skip
            sharp.plot(epochs, [r[column] for r in rows], "-", color=colour, marker=".",
                       label=label)  # fmt: skip
        best = min(rows, key=lambda r: r["holdout_bce"])["epoch"]
        sharp.axvline(best, color="grey", linewidth=0.8, linestyle=(0, (4, 4)))
        sharp.annotate(f"kept: epoch {best}", (best, sharp.get_ylim()[1]), fontsize=7,
                       color="grey")  # fmt: skip
        sharp.legend(fontsize=7)
    sharp.set_title("sharpening: cross-entropy to the gate's own hard mask", fontsize=10)
    rows = run["placeholder"]["history"]
    epochs = [r["epoch"] for r in rows]
    splits = (("train", "training pairs", "C0"), ("holdout", "held-out", "C3"),
              ("val", "validation", "C4"))  # fmt: skip
    for split, label, colour in splits:
        for suffix, kind, style in (("", "map >= 0.5", "-"), ("_sampled", "sampled", "--")):
            column = f"{split}_kl{suffix}" if split != "train" else f"train_kl{suffix or '_hard'}"
            if column in rows[-1]:
                values = [r.get(column, nan) for r in rows]
                kl.plot(epochs, values, style, color=colour, marker=".", label=f"{label}, {kind}")
        for column, style, what in ((f"{split}_top1", "-", "top-1 kept"),
                                    (f"{split}_kept", ":", "kept")):  # fmt: skip
            if column in rows[-1]:
                values = [r.get(column, nan) for r in rows]
                top.plot(epochs, values, style, color=colour, marker=".", label=f"{label}: {what}")
    for ax, lines in ((kl, (("eps", eps), ("target", 0.2))),
                      (top, (("top-1 target", 0.85), ("kept bound", 0.6)))):  # fmt: skip
        for name, value in lines:
            ax.axhline(value, color="grey", linewidth=0.8, linestyle=(0, (4, 4)))
            ax.annotate(f"{name} {value:g}", (epochs[0], value), fontsize=7, color="grey")
        ax.legend(fontsize=7)
    kl.set_title("placeholder: KL(p || p_masked), nats", fontsize=10)
    top.set_title("placeholder: hard masks (map >= 0.5)", fontsize=10)
    for ax in (sharp, kl, top):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return figure


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("history", help="history.json / trainer.json, or the checkpoint folder")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--eps", type=float, default=None, help="default: the run's own eps")
    parser.add_argument(
        "--fit",
        action="store_true",
        help="the probe fit (or refinement) in run.json of a distilled gate",
    )
    args = parser.parse_args(argv)
    if args.fit:
        run = Path(args.history)
        run = run / "run.json" if run.is_dir() else run
        document = json.loads(run.read_text())
        if "placeholder" in document:
            figure = plot_refine(document)
        elif "fit" in document:
            figure = plot_fit(document["fit"]["history"])
        else:
            raise SystemExit(f"{str(run)!r} records no probe fit (not a distill_diffmask gate)")
    else:
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
