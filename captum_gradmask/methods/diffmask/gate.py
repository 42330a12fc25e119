"""The Vision DiffMask gate: one probe per hidden state and a learned placeholder.

See :mod:`captum_gradmask.methods.diffmask` for how it follows the paper and the authors' code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ..._utils import check_index, check_positive_int
from ...adapters import ViTAdapter
from .checkpoint import read_gate, write_gate
from .hard_concrete import log_prob_open, sample_gates

__all__ = ["DiffMaskGate", "GateConfig"]


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
        uniform_init: start the probes' last layer at zero (weight-norm gain and bias), so that
            every gate starts at exactly ``add_activation`` instead of ``add_activation`` plus
            the random initial MLP's output (a spread of several units per token: a random
            initial ranking of the patches). ``False``: the authors' initialisation.
    """

    hidden_size: int
    num_states: int
    gate_hidden: int
    temperature: float = 0.2
    stretch_left: float = -0.2
    stretch_right: float = 1.0
    mul_activation: float = 15.0
    add_activation: float = 8.0
    uniform_init: bool = False

    @classmethod
    def for_adapter(cls, adapter: ViTAdapter, **overrides: Any) -> GateConfig:
        """The default configuration for the model behind ``adapter``."""
        interface = adapter.require_tokens("Vision DiffMask")
        hidden = overrides.pop("hidden_size", None) or adapter.hidden_size
        if hidden is None:
            raise ValueError(
                f"adapter {adapter.name!r} does not report the hidden size; pass "
                "`GateConfig(hidden_size=..., ...)` explicitly"
            )
        defaults = dict(
            hidden_size=int(hidden),
            num_states=len(interface.blocks) + 1,
            gate_hidden=max(1, int(hidden) // 4),
        )
        return cls(**{**defaults, **overrides})


class _Probe(nn.Module):
    """One state's gate: ``tanh(MLP([h_0; h_l])) * scale + offset`` per token."""

    def __init__(
        self, hidden_size: int, gate_hidden: int, scale: float, offset: float, uniform: bool
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            weight_norm(nn.Linear(2 * hidden_size, gate_hidden)),
            nn.Tanh(),
            weight_norm(nn.Linear(gate_hidden, 1)),
            nn.Tanh(),
        )
        self.scale = scale
        self.offset = nn.Parameter(torch.tensor(float(offset)))
        if uniform:
            last = self.mlp[2]
            with torch.no_grad():
                last.parametrizations.weight.original0.zero_()
                last.bias.zero_()

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
                config.uniform_init,
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
        upto = check_index(layer, self.config.num_states, "layer", "hidden states in the gate")
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
        write_gate(folder, self.state_dict(), asdict(self.config), metadata)

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
        config, weights = read_gate(folder, device=str(map_location))
        gate = cls(GateConfig(**config))
        gate.load_state_dict(weights)
        return gate.to(map_location)
