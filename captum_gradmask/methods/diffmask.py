"""Vision DiffMask (Nalmpantis et al., CVPR-W XAI4CV 2023, arXiv 2304.06391) as a Captum
attribution, with the code that trains its gate.

A small gate network reads the hidden states of the frozen ViT on the unmasked image and, for
every patch, predicts whether the patch can be replaced by a baseline without changing the
model's output distribution. It is trained once per model (not per image) to keep as few patches
as possible subject to ``KL(p(y | x) || p(y | masked x)) <= eps``; afterwards one forward pass of
the ViT plus the gate gives a map: the probability that the patch is kept.

How this implementation follows the paper and the authors' code (AngelosNal/Vision-DiffMask,
``code/models/gates.py`` and ``code/models/interpretation.py``), and where it departs:

* **Hidden states.** ``S = L + 1`` states: the token embeddings (the adapter's ``embed``,
  positions added) and the output of each of the ``L`` blocks, obtained by running ``embed``
  and the ``blocks`` one by one. The authors' code keeps one more state, the patch projection
  before positions are added (its gate reads that state twice); the adapter interface does not
  expose it, so here the first gate reads the embeddings with positions.
* **Gates.** One probe per state ``l`` reads ``[h_0 ; h_l]`` for each token (the embeddings
  next to the layer's state): weight-normalised ``Linear(2D, D/4)``, ``tanh``, weight-normalised
  ``Linear(D/4, 1)``, ``tanh``, times 15 plus a learnable offset initialised at 8 (the authors'
  ``MLPMaxGate`` with their command-line defaults ``mul_activation=15``, ``add_activation=8``).
  The probe's output is the location ``log alpha`` of a hard-concrete gate (temperature 0.2,
  stretch ``(-0.2, 1.0)``, as in the authors' code).
* **Combining layers.** A patch is kept only if the gates of every state ``0..l`` keep it: the
  sampled gates are multiplied, and the log probabilities that each gate is open are summed
  (authors: ``cumprod`` of samples, ``cumsum`` of log expected L0). The map is the product over
  all ``S`` states of ``P(gate open)`` (authors' ``get_mask`` with ``idx=-1``).
* **Masking.** Patch tokens of the embedding are replaced, prefix tokens (CLS, distillation,
  registers) never are: ``z * e + (1 - z) * (b + p)`` with ``e`` the embedded patch, ``b`` the
  embedding of a zero (grey, for mean = std = 0.5 models) image at that position and ``p`` a
  learned vector shared by all positions, initialised at 0. For a linear patch projection with
  additive positions (HF ViT/DeiT, timm ViT) this is exactly the authors' learned placeholder
  inserted *before* positions are added (``b`` carries the position and the projection's bias);
  the zero initialisation starts from the same grey-patch baseline GradMask and the perturbation
  metrics use (the authors initialise with Xavier noise).
* **Objective.** Per training step one state ``l`` is drawn uniformly; the mask is the product
  of the gates ``0..l``; the loss is ``lambda_l * (KL - eps) + mean over patches of
  log P(patch kept)``, averaged over the batch; ``KL = KL(p_original || p_masked)`` over the
  whole distribution. The gates (and ``p``) minimise it, each multiplier ``lambda_l`` maximises
  it (gradient ascent, clipped to ``[0, 200]``), so ``lambda_l`` grows while the constraint is
  violated and shrinks to 0 when it holds. The sparsity term is the log of the expected number
  of kept patches per patch, as in the authors' code (the paper writes the expected L0 norm).
* **Optimisers.** Adam for the gates (lr ``2e-5`` with 1200 warmup steps), the placeholder
  (``1e-3``) and the multipliers (``0.3``, initial value 20), the authors' command-line
  defaults. The authors wrap Adam in Lookahead (k = 6, alpha = 0.5); plain Adam is used here.

The target class does not enter: the gate is conditioned on the hidden states of the unmasked
forward pass and trained to keep the whole output distribution, so the map is the same for every
``target`` (it explains the prediction, dominated by the predicted class). ``target`` is accepted
and validated for the Captum contract.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import Attribution
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm
from tqdm.auto import tqdm

from .._ops import upsample_grid
from .._utils import (
    TargetType,
    check_positive_int,
    chunks,
    extract_logits,
    format_target,
    preserved_model_state,
    unpack_inputs,
)
from ..adapters import ViTAdapter, get_adapter, managed_module
from ._hard_concrete import log_prob_open, sample_gates

__all__ = [
    "DiffMaskGate",
    "DiffMaskTrainingConfig",
    "GateConfig",
    "VisionDiffMask",
    "VisionDiffMaskTrainer",
    "fit",
]

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate.json"
TRAINER_STATE = "trainer.safetensors"
TRAINER_CONFIG = "trainer.json"
HISTORY_CSV = "history.csv"
_FORMAT = "captum-gradmask/vision-diffmask"


# --- the gate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateConfig:
    """Shape and distribution parameters of a :class:`DiffMaskGate`.

    Args:
        hidden_size: ``D``, the ViT's token width.
        num_states: ``L + 1`` hidden states read (embeddings and every block's output).
        gate_hidden: width of each probe's hidden layer (authors: ``D // 4``).
        temperature: hard-concrete temperature (authors: 0.2).
        stretch_left, stretch_right: hard-concrete stretch interval (authors: -0.2, 1.0).
        mul_activation: scale of the probe's final ``tanh`` (authors: 15).
        add_activation: initial value of the probe's learnable offset (authors: 8), so that at
            initialisation every gate is open.
    """

    hidden_size: int
    num_states: int
    gate_hidden: int
    temperature: float = 0.2
    stretch_left: float = -0.2
    stretch_right: float = 1.0
    mul_activation: float = 15.0
    add_activation: float = 8.0

    @classmethod
    def for_adapter(cls, adapter: ViTAdapter, **overrides: Any) -> GateConfig:
        """The default configuration for the model behind ``adapter``."""
        adapter.require_tokens("Vision DiffMask")
        hidden = overrides.pop("hidden_size", None) or adapter.hidden_size
        if hidden is None:
            raise ValueError(
                f"adapter {adapter.name!r} does not report the hidden size; pass "
                "`GateConfig(hidden_size=..., ...)` explicitly"
            )
        assert adapter.blocks is not None
        defaults = dict(
            hidden_size=int(hidden),
            num_states=len(adapter.blocks) + 1,
            gate_hidden=max(1, int(hidden) // 4),
        )
        return cls(**{**defaults, **overrides})


class _Probe(nn.Module):
    """One state's gate: ``tanh(MLP([h_0; h_l])) * scale + offset`` per token."""

    def __init__(self, hidden_size: int, gate_hidden: int, scale: float, offset: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            weight_norm(nn.Linear(2 * hidden_size, gate_hidden)),
            nn.Tanh(),
            weight_norm(nn.Linear(gate_hidden, 1)),
            nn.Tanh(),
        )
        self.scale = scale
        self.offset = nn.Parameter(torch.tensor(float(offset)))

    def forward(self, embedded: Tensor, state: Tensor) -> Tensor:
        return self.mlp(torch.cat((embedded, state), dim=-1)).squeeze(-1) * self.scale + self.offset


class DiffMaskGate(nn.Module):
    """The Vision DiffMask gate network: one probe per hidden state and a learned placeholder.

    Args:
        config: see :class:`GateConfig`; ``GateConfig.for_adapter(get_adapter(model))`` gives
            the defaults for a model.

    Example::

        >>> import torch
        >>> from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig
        >>> gate = DiffMaskGate(GateConfig(hidden_size=8, num_states=3, gate_hidden=2))
        >>> states = [torch.randn(2, 5, 8) for _ in range(3)]
        >>> gate.keep_probability(states).shape  # (batch, tokens)
        torch.Size([2, 5])
    """

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        check_positive_int(config.hidden_size, "hidden_size")
        check_positive_int(config.num_states, "num_states")
        check_positive_int(config.gate_hidden, "gate_hidden")
        self.config = config
        self.probes = nn.ModuleList(
            _Probe(
                config.hidden_size,
                config.gate_hidden,
                config.mul_activation,
                config.add_activation,
            )
            for _ in range(config.num_states)
        )
        self.placeholder = nn.Parameter(torch.zeros(config.hidden_size))

    @property
    def probe_parameters(self) -> list[nn.Parameter]:
        return list(self.probes.parameters())

    def _check_states(self, states: Sequence[Tensor]) -> None:
        if len(states) != self.config.num_states:
            raise ValueError(
                f"the gate reads {self.config.num_states} hidden states (embeddings + "
                f"{self.config.num_states - 1} blocks) but got {len(states)}; was it trained "
                "for a model of another depth?"
            )
        width = states[0].shape[-1]
        if width != self.config.hidden_size:
            raise ValueError(
                f"the gate was built for hidden size {self.config.hidden_size} but the model's "
                f"tokens have {width} channels; was it trained for another model?"
            )

    def forward(self, states: Sequence[Tensor], upto: int | None = None) -> Tensor:
        """Gate locations ``log alpha`` of shape ``(B, T, l + 1)`` for the states ``0..upto``.

        ``states`` are ``(B, T, D)`` tensors of the same tokens (callers pass patch tokens
        only); ``upto`` defaults to the last state.
        """
        self._check_states(states)
        last = self.config.num_states - 1 if upto is None else upto
        embedded = states[0].to(self.placeholder.dtype)
        return torch.stack(
            [
                self.probes[i](embedded, states[i].to(self.placeholder.dtype))
                for i in range(last + 1)
            ],
            dim=-1,
        )

    def log_keep(self, logits: Tensor) -> Tensor:
        """Cumulative ``log P(kept)`` per state from the gate locations: ``(B, T, l + 1)``."""
        c = self.config
        return log_prob_open(logits, c.temperature, c.stretch_left, c.stretch_right).cumsum(-1)

    def sample_keep(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A sampled mask: the product of the hard-concrete gates of all given states ``(B, T)``."""
        c = self.config
        gates = sample_gates(logits, c.temperature, c.stretch_left, c.stretch_right, generator)
        return gates.prod(-1)

    def keep_probability(self, states: Sequence[Tensor], layer: int = -1) -> Tensor:
        """``P(token kept)`` ``(B, T)`` using the gates of states ``0..layer`` (default: all)."""
        count = self.config.num_states
        if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
            raise ValueError(
                f"`layer` must be an int in -{count}..{count - 1} (the gate reads {count} "
                f"hidden states), got {layer!r}"
            )
        upto = layer % count
        return self.log_keep(self.forward(states, upto))[..., upto].exp()

    def mask_tokens(self, tokens: Tensor, keep: Tensor, baseline: Tensor, prefix: int) -> Tensor:
        """Replace patch tokens by ``baseline + placeholder`` where ``keep`` is 0.

        Args:
            tokens: embedded tokens ``(B, prefix + N, D)``.
            keep: ``(B, N)`` gates in ``[0, 1]``.
            baseline: ``(1 or B, N, D)`` embeddings of the zero image.
            prefix: prefix tokens, left untouched.
        """
        keep = keep.to(tokens.dtype).unsqueeze(-1)
        filler = baseline + self.placeholder.to(tokens.dtype)
        patches = keep * tokens[:, prefix:] + (1 - keep) * filler
        return torch.cat((tokens[:, :prefix], patches), dim=1)

    # --- persistence ---------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str], **metadata: Any) -> None:
        """Write ``gate.safetensors`` and ``gate.json`` (config plus ``metadata``) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        _atomic(folder / GATE_WEIGHTS, lambda p: save_file(tensors, str(p)))
        payload = {"format": _FORMAT, "version": 1, "config": asdict(self.config), **metadata}
        _atomic(folder / GATE_CONFIG, lambda p: p.write_text(json.dumps(payload, indent=2)))

    @classmethod
    def load(
        cls, folder: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> DiffMaskGate:
        """Load a gate written by :meth:`save` (or by :class:`VisionDiffMaskTrainer`).

        Example::

            >>> import tempfile, torch
            >>> from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig
            >>> gate = DiffMaskGate(GateConfig(hidden_size=8, num_states=3, gate_hidden=2))
            >>> folder = tempfile.mkdtemp()
            >>> gate.save(folder)
            >>> DiffMaskGate.load(folder).config == gate.config
            True
        """
        folder = Path(folder)
        config_path, weights_path = folder / GATE_CONFIG, folder / GATE_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"no trained Vision DiffMask gate in {str(folder)!r}: expected {GATE_CONFIG} and "
                f"{GATE_WEIGHTS} (train one with `fit` or benchmarks/train_diffmask.py)"
            )
        payload = json.loads(config_path.read_text())
        if payload.get("format") != _FORMAT:
            raise ValueError(f"{config_path} is not a Vision DiffMask gate config")
        gate = cls(GateConfig(**payload["config"]))
        gate.load_state_dict(load_file(str(weights_path), device=str(map_location)))
        return gate.to(map_location)


# --- running the model on tokens -----------------------------------------------------------


def hidden_states(adapter: ViTAdapter, images: Tensor) -> tuple[list[Tensor], Tensor]:
    """The ``L + 1`` token states (embeddings, then each block's output) and the logits."""
    adapter.require_tokens("Vision DiffMask")
    assert adapter.embed is not None and adapter.blocks is not None and adapter.head is not None
    tokens = adapter.embed(images)
    states = [tokens]
    for block in adapter.blocks:
        tokens = block(tokens)
        states.append(tokens)
    return states, extract_logits(adapter.head(tokens))


def baseline_tokens(adapter: ViTAdapter, images: Tensor, prefix: int) -> Tensor:
    """Embedded patch tokens of an all-zero image of the inputs' size: ``(1, N, D)``."""
    assert adapter.embed is not None
    with torch.no_grad():
        return adapter.embed(torch.zeros_like(images[:1]))[:, prefix:]


def _kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """``KL(softmax(p) || softmax(q))`` per row."""
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# --- the attribution -----------------------------------------------------------------------


class VisionDiffMask(Attribution):
    r"""Vision DiffMask attributions: the probability, predicted by a trained gate, that each
    patch must be kept for the model's output distribution to stay the same.

    Args:
        model: a Hugging Face ViT/DeiT or timm ``VisionTransformer`` (any model whose adapter
            provides ``embed``, ``blocks`` and ``head``).
        gate: a trained :class:`DiffMaskGate` or the folder it was saved to (see
            :class:`VisionDiffMaskTrainer`, ``benchmarks/train_diffmask.py``).
        adapter: the model's adapter; found with :func:`~captum_gradmask.adapters.get_adapter`
            by default.

    Example::

        >>> import torch
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from captum_gradmask.adapters import get_adapter
        >>> from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig, VisionDiffMask
        >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
        ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...     intermediate_size=64, num_labels=5)).eval()
        >>> gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))  # untrained
        >>> explainer = VisionDiffMask(model, gate)
        >>> explainer.attribute(torch.randn(2, 3, 32, 32), target=[1, 3]).shape
        torch.Size([2, 3, 32, 32])
        >>> explainer.attribute_grid(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 4, 4])
    """

    def __init__(
        self,
        model: nn.Module | ViTAdapter,
        gate: DiffMaskGate | str | os.PathLike[str],
        adapter: ViTAdapter | None = None,
    ) -> None:
        self.adapter = get_adapter(model) if adapter is None else adapter
        self.adapter.require_tokens("Vision DiffMask")
        if not isinstance(gate, DiffMaskGate):
            gate = DiffMaskGate.load(gate)
        assert self.adapter.blocks is not None
        if gate.config.num_states != len(self.adapter.blocks) + 1:
            raise ValueError(
                f"`gate` reads {gate.config.num_states} hidden states but the model has "
                f"{len(self.adapter.blocks)} blocks (needs {len(self.adapter.blocks) + 1}); the "
                "gate was trained for another model"
            )
        self.gate = gate
        self.model = managed_module(self.adapter, model)
        super().__init__(self.adapter.forward)

    def attribute(  # type: ignore[override]
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        layer: int = -1,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor | tuple[Tensor]:
        r"""Attribute the model's prediction to the input patches.

        Args:
            inputs: normalised images ``(B, C, H, W)`` (or a one-element tuple of them); ``H`` and
                ``W`` must be multiples of the patch size.
            target: accepted for the Captum contract and validated (an int, or one class per
                image), but **not used**: the gate reads the hidden states of the unmasked image
                and was trained to keep the whole output distribution, so the map explains the
                prediction whatever the target.
            additional_forward_args: must be ``None``: the token-level interface the gate reads
                (``embed``, ``blocks``) takes no extra arguments.
            layer: use the gates of hidden states ``0..layer`` (``-1``, the default and the
                authors' choice: all of them). Lower values give the masks the earlier layers
                alone predict.
            internal_batch_size: images per forward pass (``None``: all at once).
            show_progress: show a progress bar over the batches.

        Returns:
            ``P(patch kept)`` in ``[0, 1]``, repeated over each patch's pixels and the channels:
            the shape (and tensor-or-tuple form) of ``inputs``. Higher = more important.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.adapters import get_adapter
            >>> from captum_gradmask.methods.diffmask import (DiffMaskGate, GateConfig,
            ...     VisionDiffMask)
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))
            >>> attr = VisionDiffMask(model, gate).attribute(torch.randn(1, 3, 32, 32), target=2)
            >>> attr.shape, bool(((attr >= 0) & (attr <= 1)).all())
            (torch.Size([1, 3, 32, 32]), True)
        """
        images, is_tuple = unpack_inputs(inputs)
        grid_map = self.attribute_grid(
            images,
            target,
            additional_forward_args,
            layer=layer,
            internal_batch_size=internal_batch_size,
            show_progress=show_progress,
        )
        attributions = upsample_grid(grid_map, tuple(images.shape[-2:]), images.shape[1])
        return (attributions,) if is_tuple else attributions

    def attribute_grid(
        self,
        inputs: Tensor | tuple[Tensor],
        target: TargetType = None,
        additional_forward_args: Any = None,
        *,
        layer: int = -1,
        internal_batch_size: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        """The patch-grid map ``(B, h, w)``; arguments as in :meth:`attribute`.

        Example::

            >>> import torch
            >>> from transformers import ViTConfig, ViTForImageClassification
            >>> from captum_gradmask.adapters import get_adapter
            >>> from captum_gradmask.methods.diffmask import (DiffMaskGate, GateConfig,
            ...     VisionDiffMask)
            >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8,
            ...     hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            ...     intermediate_size=64, num_labels=5)).eval()
            >>> gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))
            >>> VisionDiffMask(model, gate).attribute_grid(torch.randn(1, 3, 32, 32)).shape
            torch.Size([1, 4, 4])
        """
        images, _ = unpack_inputs(inputs)
        grid = self.adapter.grid(tuple(images.shape[-2:]))
        if additional_forward_args is not None:
            raise ValueError(
                "`additional_forward_args` must be None for VisionDiffMask: the gate reads the "
                "model's token states through the adapter's `embed`/`blocks`, which take no "
                f"extra arguments (got {type(additional_forward_args).__name__})"
            )
        batch_size = images.shape[0] if internal_batch_size is None else internal_batch_size
        check_positive_int(batch_size, "internal_batch_size")
        count = self.gate.config.num_states
        if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
            raise ValueError(
                f"`layer` must be an int in -{count}..{count - 1} (the gate reads {count} "
                f"hidden states), got {layer!r}"
            )
        prefix = self.adapter.prefix_tokens
        self.gate.to(images.device)
        maps = []
        batches = list(chunks(images.shape[0], batch_size))
        with preserved_model_state(self.model), torch.no_grad():
            for batch in tqdm(batches, desc="Vision DiffMask", disable=not show_progress):
                states, logits = hidden_states(self.adapter, images[batch])
                if target is not None and batch.start == 0:
                    format_target(target, images.shape[0], logits.shape[-1], logits.device)
                patch_states = [s[:, prefix:] for s in states]
                maps.append(self.gate.keep_probability(patch_states, layer))
        keep = torch.cat(maps).to(images.dtype)
        return keep.reshape(images.shape[0], *grid)


# --- training --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffMaskTrainingConfig:
    """Hyperparameters of :class:`VisionDiffMaskTrainer`; defaults are the authors'.

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
    """

    eps: float = 0.1
    lr: float = 2e-5
    lr_placeholder: float = 1e-3
    lr_alpha: float = 0.3
    alpha_init: float = 20.0
    alpha_max: float = 200.0
    warmup_steps: int = 1200
    seed: int = 0

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


def _atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Write through a temporary file so an interrupted save never leaves a broken file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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
        self.adapter = get_adapter(model) if adapter is None else adapter
        self.adapter.require_tokens("Vision DiffMask")
        self.model = managed_module(self.adapter, model)
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

        resume = (
            self.checkpoint_dir is not None and (self.checkpoint_dir / TRAINER_CONFIG).is_file()
        )
        if resume:
            assert self.checkpoint_dir is not None
            self.gate = DiffMaskGate.load(self.checkpoint_dir)
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
        assert self.adapter.blocks is not None
        if self.gate.config.num_states != len(self.adapter.blocks) + 1:
            raise ValueError(
                f"the gate reads {self.gate.config.num_states} states but the model has "
                f"{len(self.adapter.blocks)} blocks"
            )
        self.alphas = nn.ParameterList(
            nn.Parameter(torch.tensor(float(self.config.alpha_init)))
            for _ in range(self.gate.config.num_states)
        )
        self.gate_optimizer = torch.optim.Adam(
            [
                {"params": self.gate.probe_parameters, "lr": self.config.lr},
                {"params": [self.gate.placeholder], "lr": self.config.lr_placeholder},
            ]
        )
        # Each multiplier gets a gradient only on the steps its layer is drawn (Adam skips
        # parameters whose .grad is None), as with the authors' list of scalar parameters.
        self.alpha_optimizer = torch.optim.Adam(self.alphas.parameters(), lr=self.config.lr_alpha)
        if resume:
            self._load_trainer_state()

    # --- one step ------------------------------------------------------------------------

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
        num_states = self.gate.config.num_states
        layer = int(torch.randint(num_states, (), generator=self.generator))
        with preserved_model_state(self.model):
            if self.model is not None:
                for p in self.model.parameters():
                    p.requires_grad_(False)
            with torch.no_grad():
                states, logits_orig = hidden_states(self.adapter, images)
                baseline = baseline_tokens(self.adapter, images, prefix)
            patch_states = [s[:, prefix:] for s in states]
            with torch.enable_grad():
                locations = self.gate(patch_states, upto=layer)
                keep = self.gate.sample_keep(locations, self._noise_generator(images))
                log_keep = self.gate.log_keep(locations)[..., layer]
                masked = self.gate.mask_tokens(states[0], keep, baseline, prefix)
                assert self.adapter.head is not None
                logits_masked = self.adapter.run_tokens(masked)
                kl = _kl(logits_orig, logits_masked)
                constraint = (kl - self.config.eps).mean()
                sparsity = log_keep.mean(-1).mean()
                alpha = self.alphas[layer]
                loss = alpha * constraint + sparsity
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
        # d loss / d alpha = mean(KL - eps); ascend: the multiplier grows while KL > eps.
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
                states, logits_orig = hidden_states(self.adapter, images)
                baseline = baseline_tokens(self.adapter, images, prefix)
                locations = self.gate([s[:, prefix:] for s in states])
                keep_prob = self.gate.log_keep(locations)[..., -1].exp()
                noise = generator if images.device.type == "cpu" else None
                sampled = self.gate.sample_keep(locations, noise)
                hard = (keep_prob >= 0.5).to(keep_prob.dtype)
                target = logits_orig.argmax(-1)
                metrics: dict[str, float] = {"kept": float(keep_prob.mean())}
                for name, keep in (("", sampled), ("_hard", hard)):
                    masked = self.gate.mask_tokens(states[0], keep, baseline, prefix)
                    logits = self.adapter.run_tokens(masked)
                    metrics[f"kl{name}"] = float(_kl(logits_orig, logits).mean())
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
    ) -> list[dict[str, float]]:
        """Train until ``epochs`` epochs are done in total (a resumed trainer continues).

        After every epoch the history gets a row (train means; ``val_*`` from
        :meth:`evaluate` when ``val_dataloader`` is given) and, with a ``checkpoint_dir``, a
        checkpoint is written. Returns the history (one dict per epoch).
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
            if val_dataloader is not None:
                started = time.perf_counter()
                row.update(
                    {f"val_{k}": v for k, v in self.evaluate(val_dataloader, show_progress).items()}
                )
                row["val_seconds"] = time.perf_counter() - started
            row["alphas_mean"] = float(torch.stack([a.detach() for a in self.alphas]).mean())
            self.history.append(row)
            self.epoch = epoch + 1
            if self.checkpoint_dir is not None:
                self.save(self.checkpoint_dir)
        return self.history

    # --- checkpoints -----------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> None:
        """Write the gate, optimiser states, multipliers, counters and history to ``folder``."""
        folder = Path(folder)
        self.gate.save(folder, **self.metadata)
        tensors: dict[str, Tensor] = {
            "alphas": torch.stack([a.detach().cpu() for a in self.alphas])
        }
        groups: dict[str, Any] = {}
        for name, optimizer in (
            ("gate_optimizer", self.gate_optimizer),
            ("alpha_optimizer", self.alpha_optimizer),
        ):
            state = optimizer.state_dict()
            for index, values in state["state"].items():
                for key, value in values.items():
                    tensors[f"{name}.{index}.{key}"] = (
                        torch.as_tensor(value).detach().cpu().contiguous()
                    )
            groups[name] = state["param_groups"]
        tensors["generator"] = self.generator.get_state()
        _atomic(folder / TRAINER_STATE, lambda p: save_file(tensors, str(p)))
        payload = {
            "format": _FORMAT,
            "version": 1,
            "step": self.step,
            "epoch": self.epoch,
            "alphas": [float(a.detach()) for a in self.alphas],
            "config": asdict(self.config),
            "param_groups": groups,
            "history": self.history,
        }
        _atomic(folder / TRAINER_CONFIG, lambda p: p.write_text(json.dumps(payload, indent=2)))
        if self.history:
            keys = list(dict.fromkeys(k for row in self.history for k in row))

            def write_csv(path: Path) -> None:
                with path.open("w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=keys)
                    writer.writeheader()
                    writer.writerows(self.history)

            _atomic(folder / HISTORY_CSV, write_csv)

    def _load_trainer_state(self) -> None:
        assert self.checkpoint_dir is not None
        payload = json.loads((self.checkpoint_dir / TRAINER_CONFIG).read_text())
        tensors = load_file(str(self.checkpoint_dir / TRAINER_STATE))
        self.step, self.epoch = int(payload["step"]), int(payload["epoch"])
        self.history = list(payload.get("history", []))
        with torch.no_grad():
            for alpha, value in zip(self.alphas, tensors["alphas"], strict=True):
                alpha.copy_(value)
        for name, optimizer in (
            ("gate_optimizer", self.gate_optimizer),
            ("alpha_optimizer", self.alpha_optimizer),
        ):
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
    trainer.fit(dataloader, val_dataloader, epochs=epochs, show_progress=show_progress)
    return trainer.gate
