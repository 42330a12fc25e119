"""Lookahead for the Vision DiffMask trainer: the slow-weight rule, its state dict, and exact
resuming of a trainer that uses it; the last-state draw option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from captum_gradmask.methods.diffmask import VisionDiffMaskTrainer
from captum_gradmask.methods.diffmask.lookahead import Lookahead

from .models import tiny_hf_vit


def _images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_after_k_steps_the_slow_weights_move_alpha_of_the_way() -> None:
    """SGD with lr 1 and a constant gradient -g moves the fast weight by g a step: after k
    steps it is at w0 + k g, and Lookahead puts both weights at w0 + alpha k g; in between the
    fast weight moves freely and the slow one stays."""
    start = torch.tensor([1.0, -2.0])
    weight = torch.nn.Parameter(start.clone())
    k, alpha, g = 3, 0.25, torch.tensor([0.5, 1.0])
    optimizer = Lookahead(torch.optim.SGD([weight], lr=1.0), k=k, alpha=alpha)
    for step in range(1, k):
        weight.grad = -g
        optimizer.step()
        torch.testing.assert_close(weight.detach(), start + step * g)
        torch.testing.assert_close(optimizer.slow[weight], start)
    weight.grad = -g
    optimizer.step()
    expected = start + alpha * k * g
    torch.testing.assert_close(weight.detach(), expected)
    torch.testing.assert_close(optimizer.slow[weight], expected)


def test_state_dict_round_trip_continues_identically() -> None:
    def run(split: bool) -> torch.Tensor:
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4))
        optimizer = Lookahead(torch.optim.Adam([weight], lr=0.1), k=4, alpha=0.5)
        for step in range(10):
            if split and step == 5:  # a fresh wrapper over a fresh Adam, loaded from the dict
                state = optimizer.state_dict()
                optimizer = Lookahead(torch.optim.Adam([weight], lr=0.1), k=4, alpha=0.5)
                optimizer.load_state_dict(state)
            weight.grad = torch.sin(weight.detach() * (step + 1))
            optimizer.step()
        return weight.detach().clone()

    torch.testing.assert_close(run(split=True), run(split=False), atol=0, rtol=0)


def test_lookahead_errors() -> None:
    weight = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="`k`"):
        Lookahead(torch.optim.SGD([weight], lr=1.0), k=0)
    with pytest.raises(ValueError, match="`alpha`"):
        Lookahead(torch.optim.SGD([weight], lr=1.0), alpha=1.5)
    with pytest.raises(ValueError, match="`lookahead_k`"):
        VisionDiffMaskTrainer(tiny_hf_vit(), lookahead_k=-1)


def test_trainer_with_lookahead_resumes_exactly(tmp_path: Path) -> None:
    """1 + 1 resumed epochs equal 2 straight ones, with a Lookahead sync falling inside an epoch
    (k = 2, 3 steps an epoch), and the trainer differs from plain Adam."""
    model = tiny_hf_vit()
    loader = DataLoader(_images(6), batch_size=2)
    options = dict(lr=1e-2, warmup_steps=0, lr_alpha=0.5, lookahead_k=2, lookahead_alpha=0.5)

    straight = VisionDiffMaskTrainer(model, tmp_path / "straight", **options)
    straight.fit(loader, epochs=2, show_progress=False)
    VisionDiffMaskTrainer(model, tmp_path / "resumed", **options).fit(
        loader, epochs=1, show_progress=False
    )
    resumed = VisionDiffMaskTrainer(model, tmp_path / "resumed", **options)
    assert resumed.gate_optimizer.steps == 3
    resumed.fit(loader, epochs=2, show_progress=False)
    for key, value in straight.gate.state_dict().items():
        torch.testing.assert_close(resumed.gate.state_dict()[key], value, atol=0, rtol=0)
    assert torch.equal(torch.stack(list(resumed.alphas)), torch.stack(list(straight.alphas)))
    assert {f"alpha_{i}" for i in range(3)} <= set(resumed.history[-1])

    plain = VisionDiffMaskTrainer(model, **{**options, "lookahead_k": 0})
    plain.fit(loader, epochs=2, show_progress=False)
    assert not torch.equal(plain.gate.placeholder, straight.gate.placeholder)


def test_every_state_is_drawn() -> None:
    """Each step trains one state's gate stack, drawn uniformly (the authors' schedule)."""
    uniform = VisionDiffMaskTrainer(tiny_hf_vit(), lr=1e-3, warmup_steps=0)
    assert len({uniform.train_step(_images(2))["layer"] for _ in range(12)}) > 1


def test_train_eval_columns_in_the_history() -> None:
    trainer = VisionDiffMaskTrainer(tiny_hf_vit(), lr=1e-3, warmup_steps=0)
    loader = DataLoader(_images(2), batch_size=2)
    row = trainer.fit(loader, loader, epochs=1, show_progress=False, train_eval_dataloader=loader)[
        0
    ]
    assert {"val_kl", "val_kl_hard", "train_eval_kl", "train_eval_agreement_hard"} <= set(row)


def test_a_plain_adam_checkpoint_resumes_under_lookahead(tmp_path: Path) -> None:
    """Switching Lookahead on when resuming a plain-Adam run: the Adam moments are kept and the
    slow weights start at the resumed gate."""
    model = tiny_hf_vit()
    loader = DataLoader(_images(4), batch_size=2)
    VisionDiffMaskTrainer(model, tmp_path, lr=1e-2, warmup_steps=0).fit(
        loader, epochs=1, show_progress=False
    )
    resumed = VisionDiffMaskTrainer(model, tmp_path, lr=1e-2, warmup_steps=0, lookahead_k=3)
    optimizer = resumed.gate_optimizer
    assert isinstance(optimizer, Lookahead) and optimizer.steps == 0
    placeholder = resumed.gate.placeholder
    assert torch.equal(optimizer.slow[placeholder], placeholder.detach())
    assert optimizer.optimizer.state[placeholder]["step"] == 2
    resumed.fit(loader, epochs=2, show_progress=False)
    assert resumed.step == 4
