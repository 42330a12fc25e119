"""The shared attention recomputation against the definition: eager attention probabilities and
autograd's gradient with respect to them (HF ``attn_implementation="eager"``, timm's non-fused
path), and the model left as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from captum_gradmask import get_adapter
from captum_gradmask.methods import AttentionRollout, CheferGAE
from captum_gradmask.methods._attention import attention_pass

from .conftest import HF_VIT_TINY, needs_shared
from .models import tiny_hf_deit, tiny_hf_vit, tiny_timm_vit


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: on a shared 2-core machine, intra-op threads only contend (100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hf_eager_attention(
    model: nn.Module, images: torch.Tensor, target: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Eager attention probabilities of a Hugging Face model and autograd's gradient of the
    summed target logits with respect to them."""
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    out = eager(images, output_attentions=True)
    for attention in out.attentions:
        attention.retain_grad()
    out.logits.gather(1, torch.tensor(target)[:, None]).sum().backward()
    return [a.detach() for a in out.attentions], [a.grad for a in out.attentions]


def timm_eager_attention(
    model: nn.Module, images: torch.Tensor, target: list[int]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The same through timm's non-fused attention (softmax, then ``attn_drop``, then ``@ v``)."""
    eager = copy.deepcopy(model)
    recorded: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: object, output: torch.Tensor) -> None:
        output.retain_grad()
        recorded.append(output)

    for block in eager.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(keep)
    logits = eager(images)
    logits.gather(1, torch.tensor(target)[:, None]).sum().backward()
    return [a.detach() for a in recorded], [a.grad for a in recorded]


EAGER = {
    "hf-vit": (tiny_hf_vit, hf_eager_attention),
    "hf-deit-teacher": (lambda: tiny_hf_deit(teacher=True), hf_eager_attention),
    "timm-vit": (tiny_timm_vit, timm_eager_attention),
    "timm-registers": (lambda: tiny_timm_vit(reg_tokens=2), timm_eager_attention),
}


@pytest.mark.parametrize("name", list(EAGER))
def test_probabilities_and_gradients_equal_eager_attention(name: str) -> None:
    build, eager_attention = EAGER[name]
    model = build()
    images = _images()
    target = [3, 5]
    expected_probs, expected_grads = eager_attention(model, images, target)
    recorded = attention_pass(get_adapter(model), images, (), target, with_gradients=True)
    assert recorded.gradients is not None
    assert len(recorded.probabilities) == len(expected_probs) == 3
    for ours, theirs in zip(recorded.probabilities, expected_probs, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    for ours, theirs in zip(recorded.gradients, expected_grads, strict=True):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-4)
    assert recorded.targets.tolist() == target


def test_default_target_is_the_predicted_class_and_gradients_are_optional() -> None:
    model = tiny_hf_vit()
    images = _images(3)
    recorded = attention_pass(get_adapter(model), images, ())
    assert recorded.gradients is None
    torch.testing.assert_close(recorded.targets, model(images).logits.argmax(-1))


def test_model_is_left_as_it_was_even_on_errors() -> None:
    model = tiny_hf_vit()
    model.train()  # a user's model in training mode stays in training mode
    images = _images()
    for method in (AttentionRollout(model), CheferGAE(model)):
        method.attribute_grid(images, target=[0, 1])
        with pytest.raises(ValueError, match="out of range"):
            method.attribute_grid(images, target=[0, 99])  # raised while hooks are registered
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_dropout_free_eval_pass_under_a_training_model() -> None:
    # Attention dropout would make A @ V differ from the context; eval mode is forced inside.
    model = tiny_hf_vit(attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.5).train()
    images = _images()
    first = CheferGAE(model).attribute_grid(images, target=1)
    second = CheferGAE(model).attribute_grid(images, target=1)
    torch.testing.assert_close(first, second)


def test_qk_norm_is_refused() -> None:
    model = tiny_timm_vit(qk_norm=True)
    for method in (AttentionRollout, CheferGAE):
        with pytest.raises(ValueError, match="qk_norm"):
            method(model)


def test_context_that_is_not_a_v_raises() -> None:
    # timm's scale_attn_norm normalises A @ V before the output projection.
    model = tiny_timm_vit(scale_attn_norm=True)
    with pytest.raises(RuntimeError, match="differs from the attention context"):
        CheferGAE(model).attribute_grid(_images(), target=0)


def test_chefer_needs_output_projections() -> None:
    model = tiny_hf_vit()
    adapter = get_adapter(model)
    adapter.layers = [
        type(layer)(layer.query, layer.key, layer.value, layer.num_heads)
        for layer in adapter.layers
    ]
    with pytest.raises(ValueError, match="output projection"):
        CheferGAE(model, adapter=adapter)
    # Rollout needs only Q and K.
    assert AttentionRollout(model, adapter=adapter).attribute_grid(_images()).shape == (2, 4, 4)


@pytest.mark.slow
@needs_shared
def test_real_vit_tiny_sdpa_attention_and_gradients_equal_eager() -> None:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    assert model.config._attn_implementation == "sdpa"
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected_probs, expected_grads = hf_eager_attention(model, images, [207])
    recorded = attention_pass(get_adapter(model), images, (), [207], with_gradients=True)
    assert recorded.gradients is not None and len(recorded.probabilities) == 12
    for ours, theirs in zip(recorded.probabilities, expected_probs, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    for ours, theirs in zip(recorded.gradients, expected_grads, strict=True):
        scale = float(theirs.abs().max())
        torch.testing.assert_close(ours, theirs, atol=1e-4 * scale, rtol=1e-3)
