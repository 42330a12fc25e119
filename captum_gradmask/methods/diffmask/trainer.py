"""Training a Vision DiffMask gate for a frozen ViT (the authors' Lagrangian objective), with
checkpoints and bit-exact resuming."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..._utils import check_positive_int, preserved_model_state, unpack_inputs
from ...adapters import ViTAdapter, resolve_model
from .attribution import baseline_tokens
from .checkpoint import has_trainer_state, read_trainer_state, write_trainer_state
from .gate import DiffMaskGate, GateConfig
from .lookahead import Lookahead

__all__ = ["DiffMaskTrainingConfig", "VisionDiffMaskTrainer", "fit", "kl_divergence"]


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(softmax(p) || softmax(q))`` per row."""
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass(frozen=True)
class DiffMaskTrainingConfig:
    """Hyperparameters of :class:`VisionDiffMaskTrainer`; defaults are the authors' (except
    Lookahead, off by default so that a step is one plain Adam step).

    Args:
        eps: the KL bound (nats) the masked prediction must stay within (authors: 0.1).
        lr: Adam learning rate of the gate probes (authors' default 2e-5; 1e-5 for ImageNet).
        lr_placeholder: learning rate of the placeholder vector (authors: 1e-3).
        lr_alpha: learning rate of the Lagrange multipliers, gradient ascent (authors: 0.3).
        alpha_init: initial value of every multiplier (authors: 20).
        alpha_max: multipliers are clipped to ``[0, alpha_max]`` (authors: 200).
        warmup_steps: linear warmup of the probes' and placeholder's learning rates (authors:
            1200 steps); 0 disables it.
        seed: seed of the trainer's own generator (layer draws and gate noise).
        lookahead_k: wrap both Adam optimisers (gates and multipliers) in
            :class:`~.lookahead.Lookahead` with this period; 0 = plain Adam (authors: 6).
        lookahead_alpha: Lookahead's slow-weight step (authors: 0.5).
        sparsity: ``"log"``: the mean over patches of ``log P(kept)``, as in the authors' code;
            ``"l0"``: the mean of ``P(kept)``, the expected L0 norm as the paper writes it. Their
            gradients differ for closed gates: ``log`` keeps pushing a closed gate further
            closed (gradient ~1 per patch), ``l0`` stops (gradient ``P(1 - P)``), so with the
            probes' shared weights ``l0`` lets the KL term, not the gates already closed, decide
            what the probes learn.
    """

    eps: float = 0.1
    lr: float = 2e-5
    lr_placeholder: float = 1e-3
    lr_alpha: float = 0.3
    alpha_init: float = 20.0
    alpha_max: float = 200.0
    warmup_steps: int = 1200
    seed: int = 0
    lookahead_k: int = 0
    lookahead_alpha: float = 0.5
    sparsity: str = "log"

    def __post_init__(self) -> None:
        for name in ("eps", "lr", "lr_placeholder", "lr_alpha", "alpha_max"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a positive number, got {value!r}")
        if not 0 <= self.alpha_init <= self.alpha_max:
            raise ValueError(
                f"`alpha_init` must be in [0, alpha_max={self.alpha_max}], got {self.alpha_init!r}"
            )
        if isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0, got {self.warmup_steps!r}")
        if isinstance(self.lookahead_k, bool) or self.lookahead_k < 0:
            raise ValueError(
                f"`lookahead_k` must be an int >= 0 (0 = no Lookahead), got {self.lookahead_k!r}"
            )
        if not 0 < self.lookahead_alpha <= 1:
            raise ValueError(f"`lookahead_alpha` must be in (0, 1], got {self.lookahead_alpha!r}")
        if self.sparsity not in ("log", "l0"):
            raise ValueError(f"`sparsity` must be 'log' or 'l0', got {self.sparsity!r}")


@dataclass
class _Running:
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, values: Mapping[str, float], weight: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * weight
        self.count += weight

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def _images_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping) and isinstance(batch.get("pixel_values"), Tensor):
        return batch["pixel_values"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        "each batch of the dataloader must be an image tensor, a tuple/list whose first element "
        f"is the images, or a dict with 'pixel_values'; got {type(batch).__name__}"
    )


class VisionDiffMaskTrainer:
    """Trains a :class:`DiffMaskGate` for a frozen ViT, with checkpoints and resuming.

    The model's parameters are never changed (nor their ``.grad``); it runs in eval mode and its
    modes and ``requires_grad`` flags are restored after each call.

    Args:
        model: the ViT to explain (Hugging Face ViT/DeiT, timm, or any model with an adapter
            providing ``embed``, ``blocks`` and ``head``).
        checkpoint_dir: folder for checkpoints. When it already holds one, training resumes from
            it (gate, optimiser states, multipliers, step, epoch, random state, history); the
            hyperparameters given now apply from there on. ``None``: no checkpoints.
        config: training hyperparameters (:class:`DiffMaskTrainingConfig`); keyword arguments
            override single fields, e.g. ``lr=1e-3``.
        gate_config: the gate's shape; defaults to :meth:`GateConfig.for_adapter`.
        adapter: the model's adapter (default: :func:`~captum_gradmask.adapters.get_adapter`).
        metadata: extra JSON-able facts stored beside the gate (e.g. the model's name).

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods.diffmask import VisionDiffMaskTrainer
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> loader = torch.utils.data.DataLoader(torch.randn(8, 3, 32, 32), batch_size=4)
        >>> trainer = VisionDiffMaskTrainer(model, lr=1e-3, warmup_steps=0)
        >>> history = trainer.fit(loader, epochs=2, show_progress=False)
        >>> len(history), trainer.step
        (2, 4)
    """

    def __init__(
        self,
        model: nn.Module | ViTAdapter,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        config: DiffMaskTrainingConfig | None = None,
        *,
        gate_config: GateConfig | None = None,
        adapter: ViTAdapter | None = None,
        metadata: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> None:
        resolved = resolve_model(model, adapter)
        self.adapter = resolved.adapter
        self.model = resolved.module
        self.tokens = self.adapter.require_tokens("Vision DiffMask")
        base = config or DiffMaskTrainingConfig()
        unknown = set(overrides) - set(asdict(base))
        if unknown:
            raise TypeError(
                f"unknown training option(s) {sorted(unknown)}; valid are {sorted(asdict(base))}"
            )
        self.config = DiffMaskTrainingConfig(**{**asdict(base), **overrides})
        self.metadata = dict(metadata or {})
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.generator = torch.Generator().manual_seed(self.config.seed)

        resume = has_trainer_state(self.checkpoint_dir)
        if resume:
            self.gate = DiffMaskGate.load(self.checkpoint_dir)  # type: ignore[arg-type]
            if gate_config is not None and gate_config != self.gate.config:
                raise ValueError(
                    f"`gate_config` {gate_config} differs from the checkpoint's "
                    f"{self.gate.config} in {str(self.checkpoint_dir)!r}; use another folder"
                )
        else:
            # The initial gate depends on `seed` only, not on the global random state.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                self.gate = DiffMaskGate(gate_config or GateConfig.for_adapter(self.adapter))
        if self.gate.config.num_states != len(self.tokens.blocks) + 1:
            raise ValueError(
                f"the gate reads {self.gate.config.num_states} states but the model has "
                f"{len(self.tokens.blocks)} blocks"
            )
        self.alphas = nn.ParameterList(
            nn.Parameter(torch.tensor(float(self.config.alpha_init)))
            for _ in range(self.gate.config.num_states)
        )
        self.gate_optimizer = self._wrap(
            torch.optim.Adam(
                [
                    {"params": self.gate.probe_parameters, "lr": self.config.lr},
                    {"params": [self.gate.placeholder], "lr": self.config.lr_placeholder},
                ]
            )
        )
        # Each multiplier gets a gradient only on the steps its layer is drawn (Adam skips
        # parameters whose .grad is None), as with the authors' list of scalar parameters.
        self.alpha_optimizer = self._wrap(
            torch.optim.Adam(self.alphas.parameters(), lr=self.config.lr_alpha)
        )
        if resume:
            self._load_trainer_state()

    def _wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | Lookahead:
        if not self.config.lookahead_k:
            return optimizer
        return Lookahead(optimizer, self.config.lookahead_k, self.config.lookahead_alpha)

    # --- one step ------------------------------------------------------------------------

    def _draw_state(self) -> int:
        """The state whose gate stack this step trains, every state equally likely."""
        return int(torch.randint(self.gate.config.num_states, (), generator=self.generator))

    def _learning_rate_factor(self) -> float:
        warmup = self.config.warmup_steps
        return 1.0 if warmup == 0 else min(1.0, (self.step + 1) / warmup)

    def _device(self, images: Tensor) -> None:
        self.gate.to(images.device)
        self.alphas.to(images.device)

    def train_step(self, images: Tensor) -> dict[str, float]:
        """One optimisation step on a batch of normalised images; returns its metrics."""
        images, _ = unpack_inputs(images)
        self._device(images)
        prefix = self.adapter.prefix_tokens
        layer = self._draw_state()
        with preserved_model_state(self.model):
            if self.model is not None:
                for p in self.model.parameters():
                    p.requires_grad_(False)
            with torch.no_grad():
                states, logits_orig = self.tokens.states(images)
                baseline = baseline_tokens(self.tokens, images, prefix)
            patch_states = [s[:, prefix:] for s in states]
            with torch.enable_grad():
                locations = self.gate(patch_states, upto=layer)
                keep = self.gate.sample_keep(locations, self._noise_generator(images))
                log_keep = self.gate.log_keep(locations)[..., layer]
                masked = self.gate.mask_tokens(states[0], keep, baseline, prefix)
                logits_masked = self.tokens.run(masked)
                kl = kl_divergence(logits_orig, logits_masked)
                alpha = self.alphas[layer]
                constraint = (kl - self.config.eps).mean()
                kept_term = log_keep if self.config.sparsity == "log" else log_keep.exp()
                loss = alpha * constraint + kept_term.mean(-1).mean()
                params = [*self.gate.probe_parameters, self.gate.placeholder]
                # Probes after `layer` are unused: their .grad stays None and Adam skips them.
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        factor = self._learning_rate_factor()
        base_lrs = (self.config.lr, self.config.lr_placeholder)
        for group, base_lr in zip(self.gate_optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base_lr * factor
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)
        # d loss / d alpha = the constraint's excess (KL - eps); ascend: the multiplier grows
        # while the constraint is violated.
        for group in self.alpha_optimizer.param_groups:
            group["lr"] = self.config.lr_alpha
        alpha.grad = -constraint.detach().reshape(alpha.shape)
        self.alpha_optimizer.step()
        self.alpha_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            alpha.clamp_(0.0, self.config.alpha_max)
            keep_all = self.gate.log_keep(self.gate(patch_states))[..., -1].exp()
        self.step += 1
        agree = (logits_masked.argmax(-1) == logits_orig.argmax(-1)).float().mean()
        return {
            "loss": float(loss.detach()),
            "kl": float(kl.detach().mean()),
            "kept": float(log_keep.detach().exp().mean()),
            "kept_all_layers": float(keep_all.mean()),
            "agreement": float(agree),
            "alpha": float(alpha.detach()),
            "layer": float(layer),
        }

    def _noise_generator(self, images: Tensor) -> torch.Generator | None:
        if images.device.type == "cpu":
            return self.generator
        # Gate noise on an accelerator is drawn there, seeded from the trainer's generator.
        seed = int(torch.randint(2**62, (), generator=self.generator))
        return torch.Generator(device=images.device).manual_seed(seed)

    @torch.no_grad()
    def evaluate(
        self, dataloader: Iterable[Any], show_progress: bool = False, seed: int = 0
    ) -> dict[str, float]:
        """Metrics of the full gate stack (all states, as the attribution uses it).

        Returns the means over images of: ``kept`` (expected kept fraction, i.e. the map's mean),
        ``kl`` and ``agreement`` with sampled gates (fixed ``seed``), and ``kept_hard``,
        ``kl_hard``, ``agreement_hard`` with the binary mask ``map >= 0.5``.
        """
        running = _Running()
        prefix = self.adapter.prefix_tokens
        generator = torch.Generator().manual_seed(seed)
        with preserved_model_state(self.model):
            for batch in tqdm(dataloader, desc="DiffMask eval", disable=not show_progress):
                images, _ = unpack_inputs(_images_of(batch))
                self._device(images)
                states, logits_orig = self.tokens.states(images)
                baseline = baseline_tokens(self.tokens, images, prefix)
                locations = self.gate([s[:, prefix:] for s in states])
                keep_prob = self.gate.log_keep(locations)[..., -1].exp()
                noise = generator if images.device.type == "cpu" else None
                sampled = self.gate.sample_keep(locations, noise)
                hard = (keep_prob >= 0.5).to(keep_prob.dtype)
                target = logits_orig.argmax(-1)
                metrics: dict[str, float] = {"kept": float(keep_prob.mean())}
                for name, keep in (("", sampled), ("_hard", hard)):
                    masked = self.gate.mask_tokens(states[0], keep, baseline, prefix)
                    logits = self.tokens.run(masked)
                    metrics[f"kl{name}"] = float(kl_divergence(logits_orig, logits).mean())
                    metrics[f"agreement{name}"] = float(
                        (logits.argmax(-1) == target).float().mean()
                    )
                metrics["kept_hard"] = float(hard.mean())
                running.add(metrics, images.shape[0])
        return running.means()

    # --- epochs ----------------------------------------------------------------------------

    def fit(
        self,
        dataloader: Iterable[Any],
        val_dataloader: Iterable[Any] | None = None,
        epochs: int = 1,
        show_progress: bool = True,
        train_eval_dataloader: Iterable[Any] | None = None,
    ) -> list[dict[str, float]]:
        """Train until ``epochs`` epochs are done in total (a resumed trainer continues).

        After every epoch the history gets a row (train means over the epoch's steps, under the
        drawn state's gates; ``val_*`` from :meth:`evaluate` when ``val_dataloader`` is given;
        ``train_eval_*`` likewise on ``train_eval_dataloader``, e.g. un-augmented training
        images, to compare with validation; ``alpha_<l>`` every multiplier) and, with a
        ``checkpoint_dir``, a checkpoint is written. Returns the history (one dict per epoch).
        """
        check_positive_int(epochs, "epochs")
        for epoch in range(self.epoch, epochs):
            sampler = getattr(dataloader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)  # type: ignore[union-attr]
            started = time.perf_counter()
            running = _Running()
            bar = tqdm(
                dataloader, desc=f"DiffMask epoch {epoch + 1}/{epochs}", disable=not show_progress
            )
            for batch in bar:
                images = _images_of(batch)
                metrics = self.train_step(images)
                running.add(metrics, images.shape[0])
                bar.set_postfix(
                    kl=f"{metrics['kl']:.3f}",
                    kept=f"{metrics['kept']:.2f}",
                    alpha=f"{metrics['alpha']:.1f}",
                )
            row = {"epoch": epoch + 1, "step": self.step}
            row.update({f"train_{k}": v for k, v in running.means().items() if k != "layer"})
            row["train_seconds"] = time.perf_counter() - started
            for name, loader in (("val", val_dataloader), ("train_eval", train_eval_dataloader)):
                if loader is None:
                    continue
                started = time.perf_counter()
                metrics = self.evaluate(loader, show_progress)
                row.update({f"{name}_{k}": v for k, v in metrics.items()})
                row[f"{name}_seconds"] = time.perf_counter() - started
            alphas = [float(a.detach()) for a in self.alphas]
            row["alphas_mean"] = sum(alphas) / len(alphas)
            row.update({f"alpha_{layer}": value for layer, value in enumerate(alphas)})
            self.history.append(row)
            self.epoch = epoch + 1
            if self.checkpoint_dir is not None:
                self.save(self.checkpoint_dir)
        return self.history

    # --- checkpoints -----------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the gate, optimiser states, multipliers, counters and history to ``folder``."""
        self.gate.save(folder, **self.metadata)
        tensors: dict[str, Tensor] = {
            "alphas": torch.stack([a.detach().cpu() for a in self.alphas]),
            "generator": self.generator.get_state(),
        }
        groups: dict[str, Any] = {}
        for name, optimizer in self._optimizers():
            state = optimizer.state_dict()
            for index, values in state["state"].items():
                for key, value in values.items():
                    tensors[f"{name}.{index}.{key}"] = torch.as_tensor(value)
            groups[name] = state["param_groups"]
        payload = {
            "step": self.step,
            "epoch": self.epoch,
            "alphas": [float(a.detach()) for a in self.alphas],
            "config": asdict(self.config),
            "param_groups": groups,
        }
        write_trainer_state(folder, tensors, payload, self.history)

    def _optimizers(self) -> tuple[tuple[str, torch.optim.Optimizer | Lookahead], ...]:
        return (("gate_optimizer", self.gate_optimizer), ("alpha_optimizer", self.alpha_optimizer))

    def _load_trainer_state(self) -> None:
        assert self.checkpoint_dir is not None
        payload, tensors = read_trainer_state(self.checkpoint_dir)
        self.step, self.epoch = int(payload["step"]), int(payload["epoch"])
        self.history = list(payload.get("history", []))
        with torch.no_grad():
            for alpha, value in zip(self.alphas, tensors["alphas"], strict=True):
                alpha.copy_(value)
        for name, optimizer in self._optimizers():
            state: dict[int, dict[str, Tensor]] = {}
            prefix = f"{name}."
            for key, value in tensors.items():
                if key.startswith(prefix):
                    index, entry = key[len(prefix) :].split(".", 1)
                    state.setdefault(int(index), {})[entry] = value
            optimizer.load_state_dict(
                {"state": state, "param_groups": payload["param_groups"][name]}
            )
        self.generator.set_state(tensors["generator"])


def fit(
    model: nn.Module | ViTAdapter,
    dataloader: Iterable[Any],
    *,
    val_dataloader: Iterable[Any] | None = None,
    train_eval_dataloader: Iterable[Any] | None = None,
    epochs: int = 1,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = True,
    **options: Any,
) -> DiffMaskGate:
    """Train (or resume training) a Vision DiffMask gate for ``model``; returns the gate.

    A thin wrapper over :class:`VisionDiffMaskTrainer`: ``options`` are its keyword arguments
    (training hyperparameters such as ``eps``, ``lr``, ``warmup_steps``, and ``gate_config``,
    ``adapter``, ``metadata``). Re-running with the same ``checkpoint_dir`` continues from the
    last checkpoint up to ``epochs`` epochs in total.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.methods.diffmask import VisionDiffMask, fit
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> images = torch.randn(8, 3, 32, 32)
        >>> loader = torch.utils.data.DataLoader(images, batch_size=4)
        >>> gate = fit(model, loader, epochs=1, show_progress=False, lr=1e-3, warmup_steps=0)
        >>> VisionDiffMask(model, gate).attribute_grid(images[:2]).shape
        torch.Size([2, 4, 4])
    """
    trainer = VisionDiffMaskTrainer(model, checkpoint_dir, **options)
    trainer.fit(
        dataloader,
        val_dataloader,
        epochs=epochs,
        show_progress=show_progress,
        train_eval_dataloader=train_eval_dataloader,
    )
    return trainer.gate
