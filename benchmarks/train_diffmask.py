"""Train a Vision DiffMask gate for a Hugging Face ViT on the shared ImageNet sample.

The first ``--train`` images of the sample (in file order, ILSVRC2012_val_00000001 onwards) are
the training set, the next ``--val`` the validation set. Checkpoints, the per-epoch curve
(``history.csv``; also inside ``trainer.json``) and a ``run.json`` summary (command, split,
wall time, machine) go to ``--out``; re-running with the same ``--out`` resumes from the last
completed epoch up to ``--epochs`` in total.

Example (the run behind ``benchmarks/checkpoints/diffmask-vit-tiny``)::

    python -m benchmarks.train_diffmask \\
        --model ../shared/models/vit-tiny-patch16-224-augreg-in1k \\
        --data ../shared/data/imagenet-val-sample \\
        --out benchmarks/checkpoints/diffmask-vit-tiny --train 400 --val 100 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset
from tqdm.auto import tqdm

from captum_gradmask.data import load_imagenet_sample, preprocess_image
from captum_gradmask.methods.diffmask import VisionDiffMaskTrainer


class EpochShuffle(Sampler[int]):
    """A random order per epoch that depends only on ``seed`` and the epoch, so a resumed run
    sees the same order as an uninterrupted one (the trainer calls ``set_epoch``)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face ViT/DeiT folder")
    parser.add_argument("--data", required=True, help="ImageNet sample folder (annotations.csv)")
    parser.add_argument("--out", required=True, help="checkpoint folder (resumed if it exists)")
    parser.add_argument("--train", type=int, default=400, help="training images (first N files)")
    parser.add_argument("--val", type=int, default=100, help="validation images (the next N)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs in total")
    parser.add_argument("--batch-size", type=int, default=8)
    # Defaults scaled to a few hundred CPU steps; the authors' values are in
    # DiffMaskTrainingConfig (lr 2e-5 with 1200 warmup steps over 25 ImageNet epochs).
    parser.add_argument("--lr", type=float, default=2e-3, help="gate probes' Adam lr")
    parser.add_argument("--lr-placeholder", type=float, default=1e-3)
    parser.add_argument("--lr-alpha", type=float, default=0.3)
    parser.add_argument("--alpha-init", type=float, default=20.0)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=0.1, help="KL bound in nats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def load_split(data: str, first: int, count: int) -> torch.Tensor:
    records = load_imagenet_sample(data, limit=first + count)[first:]
    if len(records) < count:
        raise SystemExit(f"--data {data!r} has only {first + len(records)} images")
    return torch.stack([preprocess_image(r.path) for r in tqdm(records, desc="preprocessing")])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(args.model).eval()
    train = load_split(args.data, 0, args.train)
    val = load_split(args.data, args.train, args.val)
    train_loader = DataLoader(
        TensorDataset(train),
        batch_size=args.batch_size,
        sampler=EpochShuffle(len(train), args.seed),
    )
    val_loader = DataLoader(TensorDataset(val), batch_size=args.batch_size)
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
        seed=args.seed,
        metadata={"model": Path(args.model).name, **split},
    )
    if trainer.epoch:
        print(f"resuming from {args.out}: epoch {trainer.epoch}, step {trainer.step}")
    started = time.perf_counter()
    history = trainer.fit(
        train_loader, val_loader, epochs=args.epochs, show_progress=not args.no_progress
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
