"""Train a Vision DiffMask gate for a Hugging Face ViT on the shared ImageNet sample.

The first ``--train`` images of the sample (in file order, ILSVRC2012_val_00000001 onwards) are
the training set, the next ``--val`` the validation set. Training images are augmented without
labels (random resized crop, flip, colour jitter: the gate preserves the model's own output, so
any augmented image is a training image); the augmentation of an image depends only on the seed,
the epoch and the image, so a resumed run sees the same images as an uninterrupted one.
Checkpoints, the per-epoch curve (``history.csv``; also inside ``trainer.json``) and a
``run.json`` summary (command, split, wall time, machine) go to ``--out``; re-running with the
same ``--out`` resumes from the last completed epoch up to ``--epochs`` in total. Each epoch also
evaluates the whole gate stack on validation and on the first ``--train-eval`` training images
(un-augmented). ``python -m benchmarks.plot_diffmask_history`` draws the curves.

Example (the run behind ``benchmarks/checkpoints/diffmask-vit-tiny``; see docs/diffmask.md)::

    python -m benchmarks.train_diffmask \\
        --model ../shared/models/vit-tiny-patch16-224-augreg-in1k \\
        --data ../shared/data/imagenet-val-sample --out runs/gate-v2 \\
        --train 400 --val 100 --epochs 24 --threads 1
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

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from tqdm.auto import tqdm

from captum_gradmask.adapters import get_adapter
from captum_gradmask.data import load_image, load_imagenet_sample, preprocess_image
from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig, VisionDiffMaskTrainer
from captum_gradmask.methods.diffmask.checkpoint import has_trainer_state


class EpochShuffle(Sampler[int]):
    """A random order per epoch that depends only on ``seed`` and the epoch, so a resumed run
    sees the same order as an uninterrupted one (the trainer calls ``set_epoch``).

    Yields ``epoch * size + i``: the dataset (:class:`AugmentedImages`) learns the epoch from
    the index, to draw that epoch's augmentation."""

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


class AugmentedImages(Dataset):
    """Label-free augmentation of ``uint8`` images ``(N, 3, H, W)`` into normalised model inputs.

    Index ``epoch * N + i`` gives image ``i`` under the augmentation drawn from ``(seed, epoch,
    first + i)`` only (the global random state is left as it was). ``augment=False``: the plain
    resize.

    Args:
        images: ``uint8`` images, e.g. resized to a little more than ``size``.
        size: output side.
        mean, std: normalisation of the model (the shared ViT-Tiny: 0.5, 0.5).
        min_scale: smallest area fraction of a random crop.
        first: the file index of ``images[0]``, so that the images of a file range draw what
            they would draw in a larger set that starts earlier.
    """

    def __init__(
        self,
        images: torch.Tensor,
        size: int = 224,
        seed: int = 0,
        augment: bool = True,
        mean: float = 0.5,
        std: float = 0.5,
        min_scale: float = 0.35,
        first: int = 0,
    ) -> None:
        from torchvision.transforms import v2

        self.images, self.seed, self.augment, self.first = images, seed, augment, first
        self.mean, self.std = mean, std
        self.resize = v2.Resize((size, size), antialias=True)
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        epoch, item = divmod(int(index), len(self.images))
        image = self.images[item]
        if self.augment:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + self.first + item)
                image = self.transform(image)
        else:
            image = self.resize(image)
        return (image.float() / 255 - self.mean) / self.std


class PlainImages(Dataset):
    """Preprocessed images under :class:`EpochShuffle`'s indices: ``epoch * N + i`` gives image
    ``i`` unchanged (``--no-augment``)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[int(index) % len(self.images)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face ViT/DeiT folder")
    parser.add_argument("--data", required=True, help="ImageNet sample folder (annotations.csv)")
    parser.add_argument("--out", required=True, help="checkpoint folder (resumed if it exists)")
    parser.add_argument("--train", type=int, default=400, help="training images (first N files)")
    parser.add_argument("--val", type=int, default=100, help="validation images (the next N)")
    parser.add_argument("--train-eval", type=int, default=48, help="training images evaluated")
    parser.add_argument("--epochs", type=int, default=24, help="epochs in total")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--no-augment", action="store_true", help="train on the plain resized images"
    )
    # Defaults scaled to about a thousand CPU steps; the authors' values are in
    # DiffMaskTrainingConfig (lr 2e-5 with 1200 warmup steps over 25 ImageNet epochs).
    parser.add_argument("--lr", type=float, default=2e-3, help="gate probes' Adam lr")
    parser.add_argument("--lr-placeholder", type=float, default=1e-3)
    parser.add_argument("--lr-alpha", type=float, default=1.0, help="multipliers' Adam lr")
    parser.add_argument("--alpha-init", type=float, default=5.0, help="initial multipliers")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.1, help="KL bound in nats")
    parser.add_argument(
        "--lookahead-k", type=int, default=6, help="Lookahead period; 0 = plain Adam"
    )
    parser.add_argument("--lookahead-alpha", type=float, default=0.5)
    parser.add_argument(
        "--last-state-probability",
        type=float,
        default=0.5,
        help="probability of training the whole gate stack in a step; -1 = uniform (authors)",
    )
    parser.add_argument(
        "--sparsity",
        choices=("log", "l0"),
        default="log",
        help="sparsity term: mean log P(kept) (authors' code) or mean P(kept) (paper)",
    )
    parser.add_argument(
        "--constraint",
        choices=("kl", "kept"),
        default="kl",
        help="what the multipliers enforce: KL <= eps (the paper) or mean P(kept) <= --budget "
        "(a budgeted variant: minimise the KL at that kept fraction)",
    )
    parser.add_argument(
        "--budget", type=float, default=0.5, help="kept fraction allowed by --constraint kept"
    )
    parser.add_argument(
        "--gate-offset",
        type=float,
        default=None,
        help="initial offset of every probe's gate location (authors: 8, every gate open)",
    )
    parser.add_argument(
        "--uniform-init",
        action="store_true",
        help="start every gate at the offset exactly (no random initial ranking of patches)",
    )
    parser.add_argument(
        "--init-gate",
        default=None,
        help="start a new run from this gate's weights (e.g. a distill_diffmask fit), not the "
        "authors' initialisation; ignored when --out resumes",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def load_split(data: str, first: int, count: int) -> torch.Tensor:
    """Normalised model inputs of ``count`` files from index ``first`` (the model's resize)."""
    records = load_imagenet_sample(data, limit=count, offset=first)
    if len(records) < count:
        raise SystemExit(f"--data {data!r} has only {first + len(records)} images")
    return torch.stack([preprocess_image(r.path) for r in tqdm(records, desc="preprocessing")])


def load_uint8(data: str, first: int, count: int, size: int = 256) -> torch.Tensor:
    """``uint8`` images ``(count, 3, size, size)`` (bicubic resize, no crop) to augment."""
    records = load_imagenet_sample(data, limit=count, offset=first)
    if len(records) < count:
        raise SystemExit(f"--data {data!r} has only {first + len(records)} images")
    images = []
    for record in tqdm(records, desc="loading"):
        resized = load_image(record.path).resize((size, size), Image.Resampling.BICUBIC)
        images.append(torch.from_numpy(np.asarray(resized).transpose(2, 0, 1).copy()))
    return torch.stack(images)


def gate_config(
    model: torch.nn.Module, offset: float | None, uniform: bool = False
) -> GateConfig | None:
    """The gate's configuration for ``--gate-offset`` and ``--uniform-init`` (``None``: the
    trainer's default, the authors' initialisation with offset 8)."""
    if offset is None and not uniform:
        return None
    overrides: dict[str, object] = {"uniform_init": uniform}
    if offset is not None:
        overrides["add_activation"] = offset
    return GateConfig.for_adapter(get_adapter(model), **overrides)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(args.model).eval()
    if args.no_augment:
        plain = load_split(args.data, 0, args.train)
        train_set: Dataset = PlainImages(plain)
        train_eval = plain[: args.train_eval]
    else:
        train_set = AugmentedImages(load_uint8(args.data, 0, args.train), seed=args.seed)
        # Checked on the model's own preprocessing, as validation is.
        count = min(args.train_eval, args.train)
        train_eval = load_split(args.data, 0, count) if count > 0 else torch.empty(0)
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
    p_last = None if args.last_state_probability < 0 else args.last_state_probability
    split = {
        "train_files": f"first {args.train} files in annotations.csv order "
        f"(indices 0..{args.train - 1})",
        "val_files": f"next {args.val} files (indices {args.train}..{args.train + args.val - 1})",
    }
    initial = None if args.init_gate is None else DiffMaskGate.load(args.init_gate)
    if initial is not None and (args.gate_offset is not None or args.uniform_init):
        raise SystemExit("--init-gate gives the gate's weights: drop --gate-offset/--uniform-init")
    init_note = {} if initial is None else {"init_gate": str(args.init_gate)}
    resuming = has_trainer_state(args.out)
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
        last_state_probability=p_last,
        sparsity=args.sparsity,
        constraint=args.constraint,
        budget=args.budget,
        seed=args.seed,
        gate_config=initial.config
        if initial is not None
        else gate_config(model, args.gate_offset, args.uniform_init),
        metadata={"model": Path(args.model).name, **split, **init_note},
    )
    if initial is not None and not resuming:
        trainer.gate.load_state_dict(initial.state_dict())
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
        "augment": not args.no_augment,
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
