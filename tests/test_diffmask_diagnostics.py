"""The DiffMask diagnostics (keep-fraction sweep, per-image optimisation) and the trainer
script's gate offset, on a tiny random ViT."""

from __future__ import annotations

import pytest
import torch

from benchmarks import diffmask_diagnostics as diagnostics
from benchmarks.train_diffmask import gate_config
from captum_gradmask.adapters import get_adapter
from captum_gradmask.data import load_imagenet_sample, preprocess_image
from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared
from .models import tiny_hf_vit


@pytest.fixture
def model_and_gate() -> tuple[torch.nn.Module, DiffMaskGate]:
    torch.manual_seed(0)
    model = tiny_hf_vit().eval()
    return model, DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))


def test_sweep_keeps_the_requested_fraction_of_each_score(model_and_gate) -> None:
    model, gate = model_and_gate
    images = torch.randn(3, 3, 32, 32)
    rows = diagnostics.keep_fraction_sweep(
        model, gate, images, methods=["chefer-gae"], fractions=[0.5, 1.0], batch_size=2
    )
    assert list(rows) == ["chefer-gae", "random", "gate", "gate reversed"]
    for by_fraction in rows.values():
        everything = by_fraction[1.0]
        assert everything["kl"] == pytest.approx([0.0] * 3, abs=1e-5)  # nothing masked
        assert everything["top1"] == [1.0] * 3
        assert len(by_fraction[0.5]["kl"]) == 3 and min(by_fraction[0.5]["kl"]) > 0
    table = diagnostics.format_sweep(rows)
    assert table.splitlines()[0] == "| patches kept by | 50% kept | 100% kept |"
    assert len(table.splitlines()) == 2 + 4


def test_per_image_optimisation_closes_gates_without_the_kl_term(model_and_gate) -> None:
    model, gate = model_and_gate
    images = torch.randn(2, 3, 32, 32)
    grads = [p.requires_grad for p in (*model.parameters(), *gate.parameters())]
    _, closed = diagnostics.optimise_locations(
        model, gate, images, steps=30, multiplier=0.0, lr=0.5, init=1.0, batch_size=2
    )
    assert closed["kept"] == [0.0, 0.0]  # only the sparsity term acts
    assert [p.requires_grad for p in (*model.parameters(), *gate.parameters())] == grads
    assert all(p.grad is None for p in (*model.parameters(), *gate.parameters()))
    assert "| 2 images |" in diagnostics.format_optimised(closed)


@pytest.mark.slow
@needs_shared
def test_per_image_optimisation_keeps_the_prediction_on_real_images() -> None:
    """On the shared ViT-Tiny the objective alone (no probes) finds masks that drop patches and
    keep the output distribution: what a working gate must approach."""
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))
    records = load_imagenet_sample(IMAGENET_SAMPLE, limit=402)[400:]
    images = torch.stack([preprocess_image(r.path) for r in records])
    _, result = diagnostics.optimise_locations(model, gate, images, steps=60, batch_size=2)
    assert max(result["kept"]) < 0.95 and max(result["kl"]) < 0.1
    _, closed = diagnostics.optimise_locations(
        model, gate, images, steps=30, multiplier=0.0, lr=0.5
    )
    assert closed["kept"] == [0.0, 0.0] and min(closed["kl"]) > 10 * max(result["kl"])


def test_gate_offset_and_uniform_init_options() -> None:
    model = tiny_hf_vit()
    assert gate_config(model, None) is None  # the trainer's default (authors: 8)
    config = gate_config(model, 5.0)
    assert config is not None and config.add_activation == 5.0
    gate = DiffMaskGate(config)
    assert {probe.offset.item() for probe in gate.probes} == {5.0}
    states = [torch.randn(2, 16, 24) for _ in range(config.num_states)]
    assert gate(states).std() > 0.5  # the authors' init: a random MLP output on top
    uniform = gate_config(model, None, uniform=True)
    assert uniform is not None and uniform.uniform_init and uniform.add_activation == 8.0
    locations = DiffMaskGate(uniform)(states)
    assert torch.equal(locations, torch.full_like(locations, 8.0))  # every gate at the offset
