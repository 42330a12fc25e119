"""Lookahead (Zhang et al., NeurIPS 2019, arXiv 1907.08610) around any torch optimiser.

The Vision DiffMask authors wrap Adam in it (k = 6, alpha = 0.5) for both the gates and the
Lagrange multipliers. torch has no Lookahead, hence this small wrapper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Lookahead"]

_SLOW = "lookahead_slow"


class Lookahead:
    """Every ``k`` steps of the inner ("fast") optimiser, move the slow weights ``alpha`` of the
    way towards the fast ones and restart the fast weights from there.

    The slow weights start at the parameters' values when the wrapper is built. ``state_dict``
    has the inner optimiser's layout (``state`` per parameter index, ``param_groups``), with the
    slow weights as one more per-parameter entry and the step count in every group, so any code
    that saves an optimiser's state dict saves this one too.

    Args:
        optimizer: the inner optimiser.
        k: synchronisation period in steps (authors: 6).
        alpha: slow-weight step size in ``(0, 1]`` (authors: 0.5).

    Example::

        >>> import torch
        >>> from captum_gradmask.methods.diffmask.lookahead import Lookahead
        >>> weight = torch.nn.Parameter(torch.zeros(1))
        >>> optimizer = Lookahead(torch.optim.SGD([weight], lr=1.0), k=2, alpha=0.5)
        >>> for _ in range(2):
        ...     weight.grad = torch.tensor([-1.0])
        ...     optimizer.step()
        >>> weight  # the fast weight went to 2, the slow one half way: 1
        Parameter containing:
        tensor([1.], requires_grad=True)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 6, alpha: float = 0.5) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be an int >= 1, got {k!r}")
        if not 0 < alpha <= 1:
            raise ValueError(f"`alpha` must be in (0, 1], got {alpha!r}")
        self.optimizer = optimizer
        self.k, self.alpha = k, alpha
        self.steps = 0
        self.slow: dict[Tensor, Tensor] = {
            p: p.detach().clone() for group in self.param_groups for p in group["params"]
        }

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.optimizer.step()
        self.steps += 1
        if self.steps % self.k:
            return
        for fast, slow in self.slow.items():
            if slow.device != fast.device:  # the parameters moved after the wrapper was built
                slow = self.slow[fast] = slow.to(fast.device)
            slow.add_(fast.detach() - slow, alpha=self.alpha)
            fast.copy_(slow)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        inner = self.optimizer.state_dict()
        state = {index: dict(values) for index, values in inner["state"].items()}
        for index, param in enumerate(self._params()):
            state.setdefault(index, {})[_SLOW] = self.slow[param].clone()
        groups = [{**group, "lookahead_steps": self.steps} for group in inner["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state written by :meth:`state_dict`; a plain optimiser's state (no slow
        weights) is accepted too: the slow weights then start at the current parameters."""
        state = {index: dict(values) for index, values in state_dict["state"].items()}
        params = self._params()
        with torch.no_grad():
            for index, param in enumerate(params):
                slow = state.get(index, {}).pop(_SLOW, None)
                self.slow[param] = (param if slow is None else slow.to(param)).detach().clone()
        groups = [dict(group) for group in state_dict["param_groups"]]
        self.steps = int(groups[0].pop("lookahead_steps", 0)) if groups else 0
        for group in groups[1:]:
            group.pop("lookahead_steps", None)
        state = {index: values for index, values in state.items() if values}
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
