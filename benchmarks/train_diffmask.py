"""Train a Vision DiffMask gate with the authors' objective (the library's
:class:`~captum_gradmask.methods.diffmask.VisionDiffMaskTrainer`) on the shared ImageNet sample.

The first ``--train`` images of the sample (in file order, ILSVRC2012_val_00000001 onwards) are
the training set, the next ``--val`` the validation set; the training order of an epoch depends
only on the seed and the epoch, so a resumed run sees the same batches as an uninterrupted one.
Checkpoints, the per-epoch curve (``history.csv``; also inside ``trainer.json``) and a
``run.json`` summary (command, split, wall time, machine) go to ``--out``; re-running with the
same ``--out`` resumes from the last completed epoch up to ``--epochs`` in total. Each epoch also
evaluates the whole gate stack on validation and on the first ``--train-eval`` training images.

The defaults are the run whose placeholder is the filler of the shipped gate's per-image
teachers (``benchmarks.distill_diffmask``; docs/diffmask.md): 100 steps of 8 images, the
authors' hyperparameters with the probes' learning rate scaled up for so few steps::

    python -m benchmarks.train_diffmask --out runs/gate-filler
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from benchmarks._common import DEFAULT_DATA, DEFAULT_MODEL, load_split
from captum_gradmask.methods.diffmask import VisionDiffMaskTrainer


class EpochShuffle(Sampler[int]):
    """A random order per epoch that depends only on ``seed`` and the epoch, so a resumed run
    sees the same order as an uninterrupted one (the trainer calls ``set_epoch``).

    Yields ``epoch * size + i`` (:class:`PlainImages` maps it back to image ``i``)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.size, generator=generator) + self.epoch * self.size
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.size


class PlainImages(Dataset):
    """Preprocessed images under :class:`EpochShuffle`'s indices: ``epoch * N + i`` gives image
    ``i``."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[int(index) % len(self.images)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="Hugging Face ViT/DeiT folder")
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA), help="ImageNet sample folder (annotations.csv)"
    )
    parser.add_argument("--out", required=True, help="checkpoint folder (resumed if it exists)")
    parser.add_argument("--train", type=int, default=400, help="training images (first N files)")
    parser.add_argument("--val", type=int, default=100, help="validation images (the next N)")
    parser.add_argument("--train-eval", type=int, default=0, help="training images evaluated")
    parser.add_argument("--epochs", type=int, default=2, help="epochs in total")
    parser.add_argument("--batch-size", type=int, default=8)
    # The authors' values are DiffMaskTrainingConfig's defaults (lr 2e-5 with 1200 warmup steps
    # over 25 ImageNet epochs); in a hundred steps the probes need a larger lr.
    parser.add_argument("--lr", type=float, default=2e-3, help="gate probes' Adam lr")
    parser.add_argument("--lr-placeholder", type=float, default=1e-3)
    parser.add_argument("--lr-alpha", type=float, default=0.3, help="multipliers' Adam lr")
    parser.add_argument("--alpha-init", type=float, default=20.0, help="initial multipliers")
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.1, help="KL bound in nats")
    parser.add_argument(
        "--lookahead-k", type=int, default=0, help="Lookahead period (authors: 6); 0 = plain Adam"
    )
    parser.add_argument("--lookahead-alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(args.model).eval()
    plain = load_split(args.data, 0, args.train)
    train_set = PlainImages(plain)
    train_eval = plain[: args.train_eval]
    val = load_split(args.data, args.train, args.val)
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=EpochShuffle(args.train, args.seed),
    )
    val_loader = DataLoader(TensorDataset(val), batch_size=args.batch_size)
    train_eval_loader = (
        DataLoader(TensorDataset(train_eval), batch_size=args.batch_size)
        if args.train_eval
        else None
    )
    split = {
        "train_files": f"first {args.train} files in annotations.csv order "
        f"(indices 0..{args.train - 1})",
        "val_files": f"next {args.val} files (indices {args.train}..{args.train + args.val - 1})",
    }
    trainer = VisionDiffMaskTrainer(
        model,
        args.out,
        eps=args.eps,
        lr=args.lr,
        lr_placeholder=args.lr_placeholder,
        lr_alpha=args.lr_alpha,
        alpha_init=args.alpha_init,
        warmup_steps=args.warmup_steps,
        lookahead_k=args.lookahead_k,
        lookahead_alpha=args.lookahead_alpha,
        seed=args.seed,
        metadata={"model": Path(args.model).name, **split},
    )
    if trainer.epoch:
        print(f"resuming from {args.out}: epoch {trainer.epoch}, step {trainer.step}")
    started = time.perf_counter()
    history = trainer.fit(
        train_loader,
        val_loader,
        epochs=args.epochs,
        show_progress=not args.no_progress,
        train_eval_dataloader=train_eval_loader,
    )
    out = Path(args.out)
    (out / "history.json").write_text(json.dumps(history, indent=2))
    seconds = sum(row.get("train_seconds", 0) + row.get("val_seconds", 0) for row in history)
    summary = {
        "command": "python -m benchmarks.train_diffmask " + " ".join(sys.argv[1:]),
        **split,
        "epochs": trainer.epoch,
        "steps": trainer.step,
        "batch_size": args.batch_size,
        "config": dataclasses.asdict(trainer.config),
        "wall_seconds_all_epochs": round(seconds, 1),
        "wall_seconds_this_call": round(time.perf_counter() - started, 1),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "last_epoch": history[-1] if history else None,
    }
    (out / "run.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["last_epoch"], indent=2))


if __name__ == "__main__":
    main()
