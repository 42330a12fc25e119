"""Bad input gets clear errors; the user's model is left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from captum_gradmask import GradMaskAttribution

from .models import tiny_hf_vit, tiny_timm_vit


def _snapshot(model: nn.Module) -> dict:
    return {
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": sum(
            len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            for m in model.modules()
        ),
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for a, b in zip(after["grads"], before["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v)


def test_model_left_as_it_was_after_success() -> None:
    model = tiny_hf_vit()
    model.train()  # a user's model in train mode, some params frozen, some with .grad
    model.vit.embeddings.patch_embeddings.projection.weight.requires_grad_(False)
    model.classifier.weight.grad = torch.full_like(model.classifier.weight, 3.0)
    before = _snapshot(model)
    images = torch.randn(2, 3, 32, 32)
    gm = GradMaskAttribution(model)
    out = gm.attribute_grid(images)
    _assert_same(model, before)
    # it ran in eval mode (dropout off): the result matches an eval-mode model's
    model.eval()
    torch.testing.assert_close(out, gm.attribute_grid(images))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_runs_in_eval_mode_with_dropout_and_leaves_train_mode(mode: str) -> None:
    model = tiny_hf_vit(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5).train()
    model.vit.embeddings.patch_embeddings.projection.weight.requires_grad_(False)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # dropout is live in train mode: two forwards differ
        assert not torch.allclose(model(images).logits, model(images).logits)
    before = _snapshot(model)
    gm = GradMaskAttribution(model)
    first = gm.attribute_grid(images, mode=mode)
    second = gm.attribute_grid(images, mode=mode)
    _assert_same(model, before)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    # masks and confidences both come from eval mode: equal to the eval-mode model's map
    model.eval()
    torch.testing.assert_close(first, gm.attribute_grid(images, mode=mode), atol=1e-6, rtol=0)


def test_model_left_as_it_was_after_an_error_midway() -> None:
    model = tiny_timm_vit()
    model.train()
    before = _snapshot(model)
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] > 1:  # let the gradient pass run, fail in the masked passes
            raise RuntimeError("boom")

    handle = model.head.register_forward_hook(explode)
    before["hooks"] += 1
    with pytest.raises(RuntimeError, match="boom"):
        GradMaskAttribution(model).attribute(torch.randn(1, 3, 32, 32), target=0)
    _assert_same(model, before)
    handle.remove()


def test_inputs_are_not_modified_and_need_no_grad() -> None:
    model = tiny_hf_vit()
    images = torch.randn(2, 3, 32, 32)
    copy = images.clone()
    GradMaskAttribution(model).attribute(images)
    assert torch.equal(images, copy) and images.grad is None and not images.requires_grad


def test_works_under_no_grad_as_captum_sensitivity_calls_it() -> None:
    model = tiny_hf_vit()
    images = torch.randn(2, 3, 32, 32)
    gm = GradMaskAttribution(model)
    with torch.no_grad():
        inside = gm.attribute_grid(images)
    torch.testing.assert_close(inside, gm.attribute_grid(images))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(target=7),
            r"`target` value 7 is out of range: the model has 7 classes, valid targets are 0..6",
        ),
        (dict(target=-1), r"`target` value -1 is out of range"),
        (dict(target=[1, 2, 3]), r"`target` has 3 entries but the batch has 2 images"),
        (dict(masks_per_layer=5), r"`masks_per_layer`=5 does not divide the hidden size 24"),
        (dict(masks_per_layer=0), r"`masks_per_layer` must be a positive int, got 0"),
        (dict(perturbations_per_eval=0), r"`perturbations_per_eval` must be a positive int"),
        (dict(layers=[5]), r"`layers`=\[5\] is not valid"),
        (dict(layers="last"), r"`layers` must be None, 'all' or a list of ints"),
        (dict(mode="quick"), r"`mode` must be 'exact' or 'fast', got 'quick'"),
        (
            dict(mode="fast", fill_value=-1.0),
            r"`fill_value`=-1.0 has no effect in mode='fast', which drops masked patch tokens",
        ),
        (
            dict(mode="fast", additional_forward_args=(torch.zeros(2),)),
            r"`additional_forward_args` must be None for GradMask's mode='fast' \(masked passes\)",
        ),
        (dict(fill_value="grey"), r"`fill_value` must be a number, got 'grey'"),
        (
            dict(mode="fast", fast_batching="bucket"),
            r"`fast_batching` must be 'auto', 'pad' or 'group', got 'bucket'",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    gm = GradMaskAttribution(tiny_hf_vit())
    with pytest.raises(ValueError, match=message):
        gm.attribute(torch.randn(2, 3, 32, 32), **kwargs)


def test_bad_inputs_are_named() -> None:
    gm = GradMaskAttribution(tiny_hf_vit())
    nan = torch.randn(1, 3, 32, 32)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"`inputs` contains 1 NaN or infinite value"):
        gm.attribute(nan)
    with pytest.raises(ValueError, match=r"`inputs` image size 30x32 does not fit the model's 8x8"):
        gm.attribute(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"shape \(batch, channels, height, width\)"):
        gm.attribute(torch.randn(3, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        gm.attribute(torch.zeros(1, 3, 32, 32, dtype=torch.long))


def test_model_without_attention_layers_is_refused() -> None:
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    with pytest.raises(
        ValueError, match="`model` of type Sequential has no recognisable attention"
    ):
        GradMaskAttribution(cnn)


def test_wrong_prefix_tokens_in_a_custom_adapter_is_explained() -> None:
    from captum_gradmask import ViTAdapter

    model = tiny_timm_vit()
    adapter = ViTAdapter.from_modules(
        model,
        num_heads=3,
        patch_size=8,
        prefix_tokens=2,
        fused_qkv=[b.attn.qkv for b in model.blocks],
    )
    with pytest.raises(ValueError, match="produced 17 tokens but the adapter expects 2 prefix"):
        GradMaskAttribution(model, adapter=adapter).attribute(torch.randn(1, 3, 32, 32))


def test_progress_bar_on_request(capsys) -> None:
    gm = GradMaskAttribution(tiny_hf_vit())
    gm.attribute(torch.randn(1, 3, 32, 32), show_progress=True, perturbations_per_eval=4)
    assert "GradMask masked passes" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model = tiny_hf_vit()
    images = torch.randn(2, 3, 32, 32)
    cpu = GradMaskAttribution(model).attribute_grid(images)
    gpu = GradMaskAttribution(model.cuda()).attribute_grid(images.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
