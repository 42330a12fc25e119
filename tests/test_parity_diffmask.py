"""The Vision DiffMask gate's forward pass against its authors' code (AngelosNal/Vision-DiffMask),
re-derived in ``references/diffmask.py``, on the same weights: the probes, the gate
distribution (sampling and expected L0), the map, and the placeholder's masking."""

from __future__ import annotations

import torch

from captum_gradmask.adapters import get_adapter
from captum_gradmask.methods.diffmask import (
    DiffMaskGate,
    GateConfig,
    VisionDiffMask,
    baseline_tokens,
)
from references import diffmask as reference

from .models import tiny_hf_vit


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _trained_looking_gate(model) -> DiffMaskGate:
    """A gate whose probes disagree across tokens (a fresh one keeps everything)."""
    torch.manual_seed(0)
    gate = DiffMaskGate(GateConfig.for_adapter(get_adapter(model)))
    with torch.no_grad():
        for probe in gate.probes:
            for parameter in probe.mlp.parameters():
                parameter.normal_(0, 0.5)
            probe.offset.fill_(4.0)
        gate.placeholder.normal_(0, 0.5)
    return gate


def _reference_probes(gate: DiffMaskGate) -> list[reference.Probe]:
    """The library gate's weights in the authors' ``MLPMaxGate`` form (weight-norm g, v, bias)."""
    probes = []
    for probe in gate.probes:
        first, last = probe.mlp[0], probe.mlp[2]
        probes.append(
            reference.Probe(
                first.parametrizations.weight.original0.detach(),
                first.parametrizations.weight.original1.detach(),
                first.bias.detach(),
                last.parametrizations.weight.original0.detach(),
                last.parametrizations.weight.original1.detach(),
                last.bias.detach(),
                probe.offset.detach(),
                probe.scale,
            )
        )
    return probes


def test_gate_and_map_equal_authors_on_the_same_weights() -> None:
    model = tiny_hf_vit()
    gate = _trained_looking_gate(model)
    images = _images()
    interface = get_adapter(model).tokens
    with torch.no_grad():
        states, _ = interface.states(images)
        patch_states = [s[:, 1:] for s in states]
        locations = gate(patch_states)
        _, log_keep, _, log_keep_full = reference.gate_forward(
            _reference_probes(gate), patch_states
        )
    torch.testing.assert_close(gate.log_keep(locations), log_keep_full, atol=1e-5, rtol=1e-5)
    expected_map = reference.mask(log_keep).reshape(2, 4, 4)
    assert expected_map.max() - expected_map.min() > 0.1  # the gates disagree: a real map
    ours = VisionDiffMask(model, gate).attribute_grid(images)
    torch.testing.assert_close(ours, expected_map, atol=1e-6, rtol=1e-5)
    # the gates of states 0..l alone (the authors' `get_mask(idx=l)`)
    torch.testing.assert_close(
        VisionDiffMask(model, gate).attribute_grid(images, layer=1),
        reference.mask(log_keep_full[..., 1]).reshape(2, 4, 4),
        atol=1e-6,
        rtol=1e-5,
    )


def test_gate_sampling_equals_authors_for_the_same_noise() -> None:
    """Hard-concrete samples from the same uniforms, multiplied over the states. In float64:
    the authors' ``RelaxedBernoulli`` turns logits into probabilities and back, which in float32
    moves unsaturated samples by up to ~1e-3."""
    locations = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(3)).double() * 6
    gate = DiffMaskGate(GateConfig(hidden_size=8, num_states=4, gate_hidden=2))
    ours = gate.sample_keep(locations, torch.Generator().manual_seed(11))
    torch.manual_seed(11)  # RelaxedBernoulli draws from the global generator
    gates_full = reference.hard_concrete(locations).rsample().clamp(0, 1).cumprod(-1)
    torch.testing.assert_close(ours, gates_full[..., -1], atol=1e-9, rtol=0)
    assert 0 < (ours == 0).float().mean() < 1  # some tokens closed exactly, some not


def test_placeholder_masking_equals_authors() -> None:
    """The authors replace the patch projection by ``z proj(x) + (1 - z) P`` before positions
    are added; the library's ``z e + (1 - z)(b + p)`` on embedded tokens (``b``: the zero
    image's embedding) is the same with ``p = P - bias`` of the projection."""
    model = tiny_hf_vit()
    gate = _trained_looking_gate(model)
    images = _images()
    keep = torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    keep[:, :3] = 0.0
    keep[:, 3:6] = 1.0
    authors_placeholder = torch.randn(model.config.hidden_size)
    patch_embeddings = model.vit.embeddings.patch_embeddings

    def replace(_module, _args, projection):
        return reference.masked_projection(projection, keep, authors_placeholder)

    handle = patch_embeddings.register_forward_hook(replace)
    try:
        with torch.no_grad():
            expected = model(images).logits
    finally:
        handle.remove()
    interface = get_adapter(model).tokens
    with torch.no_grad():
        gate.placeholder.copy_(authors_placeholder - patch_embeddings.projection.bias)
        tokens = interface.embed(images)
        masked = gate.mask_tokens(tokens, keep, baseline_tokens(interface, images, 1), 1)
        ours = interface.run(masked)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, model(images).logits, atol=1e-3)  # masking mattered
