"""LibraGrad: its backward rules (forward unchanged, model restored, completeness, each rule
against the re-derivation in ``references/libragrad.py``) and its registered methods."""

from __future__ import annotations

import contextlib
import dataclasses
from functools import partial

import pytest
import torch
from captum.attr import Saliency
from torch import Tensor, nn

from captum_gradmask import GradMaskAttribution, get_adapter
from captum_gradmask.adapters import ViTAdapter
from captum_gradmask.methods import LibraGrad
from captum_gradmask.registry import build_method
from captum_gradmask.rules import (
    UnsupportedModel,
    activation_rule,
    backward_rules,
    gated_mlp_rule,
    libragrad,
    normalization_rule,
)
from references import libragrad as reference

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared
from .models import LegacyViT, tiny_hf_deit, tiny_hf_vit, tiny_timm_vit
from .test_errors_leave_model_alone import Boom, assert_same_state, model_state


def _swiglu_vit() -> nn.Module:
    from timm.layers import SwiGLU

    return tiny_timm_vit(mlp_layer=SwiGLU)


def _packed_swiglu_vit() -> nn.Module:  # EVA-02's packed SwiGLU: SiLU gate first
    from timm.layers import GluMlp

    return tiny_timm_vit(mlp_layer=partial(GluMlp, act_layer=nn.SiLU, gate_last=False))


MODELS = {
    "hf-vit": tiny_hf_vit,
    "hf-vit-4.x-layout": lambda: LegacyViT(tiny_hf_vit()),
    "hf-deit-teacher": lambda: tiny_hf_deit(teacher=True),
    "timm-vit": tiny_timm_vit,
    "timm-swiglu": _swiglu_vit,
    "timm-glu-silu": _packed_swiglu_vit,
    "timm-avg-registers-qknorm-layerscale": lambda: tiny_timm_vit(
        global_pool="avg", fc_norm=True, reg_tokens=2, qk_norm=True, init_values=0.5
    ),
    "timm-attention-pool": lambda: tiny_timm_vit(global_pool="map", class_token=False),
}
#: Parameters that enter the network additively (FullGrad's "biases"), besides every bias
#: (``bias``, ``q_bias``/``v_bias`` of EVA/BEiT, ``in_proj_bias`` of nn.MultiheadAttention).
ADDITIVE = ("cls_token", "pos_embed", "position_embeddings", "reg_token", "register_tokens")
ADDITIVE += ("dist_token", "distillation_token", "class_token", "pos_embedding")
ADDITIVE += ("class_embedding", "positional_embedding", "position_embedding.weight")


def _additive_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [
        p
        for n, p in model.named_parameters()
        if n.endswith("bias") or n.split(".")[-1] in ADDITIVE or n.endswith(ADDITIVE[-1])
    ]


def _completeness(
    model: nn.Module, images: Tensor, target: int, rules: bool
) -> tuple[float, float]:
    """(target logit, sum of input x gradient and additive parameter x gradient)."""
    parameters = _additive_parameters(model)
    images = images.clone().requires_grad_(True)
    adapter = get_adapter(model)  # one adapter: the taps its forward installs are the ruled ones
    with libragrad(model, adapter) if rules else contextlib.nullcontext():
        logit = adapter.logits(images)[:, target].sum()
        gradients = torch.autograd.grad(logit, [images, *parameters], allow_unused=True)
    total = (images * gradients[0]).sum()
    for parameter, gradient in zip(parameters, gradients[1:], strict=True):
        if gradient is not None:
            total = total + (parameter * gradient).sum()
    return logit.item(), total.item()


@pytest.mark.parametrize("name", list(MODELS))
def test_completeness_holds_with_the_rules_and_fails_without(name: str) -> None:
    model = MODELS[name]().double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    logit, total = _completeness(model, images, target=3, rules=True)
    assert total == pytest.approx(logit, rel=1e-9, abs=1e-12)
    plain_logit, plain_total = _completeness(model, images, target=3, rules=False)
    assert plain_logit == logit  # the rules change no forward value
    assert abs(plain_total - plain_logit) > 1e-3 * abs(plain_logit) + 1e-6


def _tiny_eva(**overrides) -> nn.Module:
    from timm.models.eva import Eva

    torch.manual_seed(0)
    settings = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=7)
    return Eva(**{**settings, **overrides}).eval()


def test_completeness_on_an_eva02_style_vit() -> None:
    """EVA-02's block: SwiGLU with a norm before its output projection, rotary position
    embeddings on Q and K, LayerScale (query/key/value without biases: see the refusal below)."""
    model = _tiny_eva(
        qkv_bias=False, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
        ref_feat_shape=(4, 4), init_values=0.3,
    ).double()  # fmt: skip
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    logit, total = _completeness(model, images, target=2, rules=True)
    assert total == pytest.approx(logit, rel=1e-9, abs=1e-12)
    plain_logit, plain_total = _completeness(model, images, target=2, rules=False)
    assert abs(plain_total - plain_logit) > 1e-3 * abs(plain_logit)


def test_eva_attention_with_separate_biases_runs_through_the_adapters_taps() -> None:
    """EVA's attention with query/value biases calls its qkv weights functionally: the rules
    hook the adapter's taps, which ``libragrad(model)`` installs, so the model's own call
    inside the block is ruled (complete); a second adapter's forward installs other taps,
    and the block says the rule did not apply instead of returning plain gradients."""
    model = _tiny_eva(qkv_bias=True).double()
    parameters = _additive_parameters(model)
    images = torch.randn(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    with libragrad(model):
        logit = model(images)[0, 3]
        gradients = torch.autograd.grad(logit, [images, *parameters], allow_unused=True)
    total = sum(
        (value * gradient).sum()
        for value, gradient in zip([images, *parameters], gradients, strict=True)
        if gradient is not None
    )
    assert total.item() == pytest.approx(logit.item(), rel=1e-9, abs=1e-12)
    with pytest.raises(UnsupportedModel, match="did not run in the forward pass"), libragrad(model):
        get_adapter(model).logits(images)
    assert not any(m._forward_hooks for m in model.modules())
    assert "forward" not in model.blocks[0].attn.__dict__  # the model's attention restored


def _open_clip_visual() -> nn.Module:
    from .models import tiny_open_clip

    return tiny_open_clip().visual


def _family(name: str):
    """Today's families (tests/models.py), built lazily: torchvision and OpenCLIP are optional."""
    from . import models

    families = {
        "hf-clip-vision": lambda: models.tiny_hf_clip_vision("tower"),
        "hf-clip-projection": lambda: models.tiny_hf_clip_vision("projection"),
        "hf-clip-classifier": models.tiny_hf_clip_vision,
        "hf-dinov2-registers": models.tiny_hf_dinov2,
        "hf-beit-mean-pool": models.tiny_hf_beit,
        "timm-eva02-fused": models.tiny_timm_eva,
        "timm-eva02-separate": lambda: models.tiny_timm_eva(fused=False),
        "timm-eva-no-rope": lambda: models.tiny_timm_eva(rope=False),
        "timm-beit": models.tiny_timm_beit,
        "torchvision-vit": models.tiny_torchvision_vit,
        "open-clip-visual": _open_clip_visual,
    }
    if name == "torchvision-vit":
        pytest.importorskip("torchvision", reason="torchvision is not installed")
    if name == "open-clip-visual":
        pytest.importorskip("open_clip", reason="open_clip_torch is not installed")
    return families[name]()


FAMILY_SIZES = {"timm-beit": 32}
FAMILIES = [
    "hf-clip-vision",
    "hf-clip-projection",
    "hf-clip-classifier",
    "hf-dinov2-registers",
    "hf-beit-mean-pool",
    "timm-eva02-fused",
    "timm-eva02-separate",
    "timm-beit",
    "torchvision-vit",
    "open-clip-visual",
]


@pytest.mark.parametrize("name", FAMILIES)
def test_completeness_on_todays_families(name: str) -> None:
    """CLIP/SigLIP-style towers (QuickGELU, pre-norm), Dinov2 with registers (LayerScale),
    EVA-02 (rotary embeddings, SwiGLU, q/v biases through the adapter's taps), BEiT (relative
    position bias), torchvision and OpenCLIP (nn.MultiheadAttention through the taps)."""
    model = _family(name).double()
    size = FAMILY_SIZES.get(name, 28)
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    logit, total = _completeness(model, images, target=1, rules=True)
    assert total == pytest.approx(logit, rel=1e-9, abs=1e-12)
    plain_logit, plain_total = _completeness(model, images, target=1, rules=False)
    assert plain_logit == logit
    assert abs(plain_total - plain_logit) > 1e-3 * abs(plain_logit) + 1e-6


@pytest.mark.parametrize(
    "name",
    [
        "hf-clip-vision",
        "hf-dinov2-registers",
        "timm-eva-no-rope",
        "torchvision-vit",
        "open-clip-visual",
    ],
)
def test_fullgrad_of_the_method_is_complete_on_todays_families(name: str) -> None:
    """The method's own terms, biases of functional projections (read from the taps)
    included."""
    model = _family(name).double()
    terms = LibraGrad(model).token_contributions(
        torch.randn(2, 3, 28, 28, dtype=torch.float64), target=[2, 5]
    )
    total = terms.block_inputs[:, 0].sum(-1) + terms.biases.sum(-1) + terms.pooled_biases
    torch.testing.assert_close(total, terms.scores, rtol=1e-9, atol=1e-12)
    assert not any(m._forward_hooks for m in model.modules())


def test_families_libragrad_does_not_cover_are_refused_by_name() -> None:
    from .models import tiny_hf_clip_vision

    siglip = tiny_hf_clip_vision(siglip=True)  # attention-pooling head: an untapped MHA
    with pytest.raises(
        UnsupportedModel, match=r"vision_model\.head\.attention.*MultiheadAttention"
    ):
        LibraGrad(siglip).attribute(torch.randn(1, 3, 28, 28), target=0)
    eva = _family("timm-eva02-fused")  # rotary embeddings: no token interface
    with pytest.raises(ValueError, match=r"LibraGrad needs the adapter's token interface.*rotary"):
        LibraGrad(eva)


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_outputs_are_bitwise_unchanged(name: str) -> None:
    model = MODELS[name]()
    images = torch.randn(3, 3, 32, 32)
    adapter = get_adapter(model)
    plain = adapter.logits(images)
    with libragrad(model):
        ruled = adapter.logits(images)
        with torch.no_grad():
            ruled_no_grad = adapter.logits(images)
    assert torch.equal(plain, ruled) and torch.equal(plain, ruled_no_grad)


def test_the_model_is_restored_after_success_and_after_an_error() -> None:
    model = tiny_hf_vit().train()
    model.vit.embeddings.requires_grad_(False)
    before = model_state(model)
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    with libragrad(model):
        torch.autograd.grad(model(images).logits[0, 1], images)
    assert_same_state(model, before, "after a success")
    with pytest.raises(Boom), libragrad(model):
        model(images)
        raise Boom("inside the block")
    assert_same_state(model, before, "after an error in the block")

    def fail(*_):
        raise Boom("in a forward hook")

    failing = model.vit.layers[1].mlp.register_forward_hook(fail)
    before = model_state(model)
    with pytest.raises(Boom), libragrad(model):
        model(images)
    failing.remove()
    before["hooks"]["vit.layers.1.mlp"]["_forward_hooks"] -= 1
    assert_same_state(model, before, "after an error in the forward pass")


# --- each rule against the re-derivation -------------------------------------------------------


def _gradient(function, x: Tensor, weights: Tensor) -> Tensor:
    x = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad((function(x) * weights).sum(), x)
    return gradient


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_normalization_rule_matches_the_reference(kind: str) -> None:
    torch.manual_seed(1)
    norm = nn.LayerNorm(6) if kind == "layer" else nn.RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        if kind == "layer":
            norm.bias.normal_()
    x, weights = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    norm = norm.double()
    with backward_rules([normalization_rule([norm])]):
        ours = _gradient(norm, x, weights)
    if kind == "layer":
        expected = _gradient(
            lambda v: reference.layer_norm(v, norm.weight, norm.bias, 1e-5), x, weights
        )
    else:
        expected = _gradient(lambda v: reference.rms_norm(v, norm.weight, 1e-6), x, weights)
    torch.testing.assert_close(ours, expected)
    assert not torch.allclose(ours, _gradient(norm, x, weights))  # the plain gradient differs


@pytest.mark.parametrize(
    "module, expected",
    [
        (nn.GELU(), partial(reference.gelu, approximate="none")),
        (nn.GELU(approximate="tanh"), partial(reference.gelu, approximate="tanh")),
        (nn.SiLU(), reference.silu),
    ],
)
def test_activation_rule_matches_the_reference(module: nn.Module, expected) -> None:
    x, weights = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    with backward_rules([activation_rule([module])]):
        ours = _gradient(module, x, weights)
    torch.testing.assert_close(ours, _gradient(expected, x, weights))
    assert not torch.allclose(ours, _gradient(module, x, weights))


def test_transformers_gelu_module_gets_the_exact_erf_rule() -> None:
    from transformers.activations import ACT2FN

    module = ACT2FN["gelu"]
    x, weights = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    with backward_rules([activation_rule([module])]):
        ours = _gradient(module, x, weights)
    torch.testing.assert_close(ours, _gradient(reference.gelu, x, weights))


def test_gated_mlp_rule_matches_the_reference() -> None:
    from timm.layers import SwiGLU

    torch.manual_seed(2)
    mlp = SwiGLU(6, 8).double()
    x, weights = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)

    def by_reference(v: Tensor) -> Tensor:
        gate = reference.silu(nn.functional.linear(v, mlp.fc1_g.weight, mlp.fc1_g.bias))
        value = nn.functional.linear(v, mlp.fc1_x.weight, mlp.fc1_x.bias)
        hidden = reference.gated_product(gate, value)
        return nn.functional.linear(hidden, mlp.fc2.weight, mlp.fc2.bias)

    with backward_rules([gated_mlp_rule([mlp]), activation_rule([mlp.act])]):
        ours = _gradient(mlp, x, weights)
    torch.testing.assert_close(ours, _gradient(by_reference, x, weights))


@pytest.mark.parametrize(
    "name", ["timm-vit", "timm-swiglu", "timm-glu-silu", "timm-avg-registers-qknorm-layerscale"]
)
def test_whole_model_gradients_match_the_reference_vit(name: str) -> None:
    """Every rule at once, attention included: the gradient of a logit with respect to the
    tokens equals the one of the re-derived ViT written with the authors' rules."""
    model = MODELS[name]().double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        tokens = reference.timm_vit_tokens(model, images)
    adapter = get_adapter(model)
    leaf = tokens.clone().requires_grad_(True)
    with libragrad(model):
        logits = adapter.run_tokens(leaf)
        (ours,) = torch.autograd.grad(logits[:, 4].sum(), leaf)
    expected_leaf = tokens.clone().requires_grad_(True)
    expected_logits = reference.timm_vit_from_tokens(model, expected_leaf)
    (expected,) = torch.autograd.grad(expected_logits[:, 4].sum(), expected_leaf)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(ours, expected)
    plain_leaf = tokens.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(adapter.run_tokens(plain_leaf)[:, 4].sum(), plain_leaf)
    assert not torch.allclose(plain, expected)


# --- refusals ----------------------------------------------------------------------------------


def test_an_activation_called_as_a_function_is_refused_by_name() -> None:
    model = tiny_hf_vit()
    mlp = model.vit.layers[0].mlp
    del mlp.activation_fn
    mlp.activation_fn = nn.functional.gelu  # a plain function, not a module
    with pytest.raises(UnsupportedModel, match=r"layers\.0\.mlp\.activation_fn` is a plain"):
        libragrad(model)


def test_a_sigmoid_gate_is_refused() -> None:
    from timm.layers import GluMlp

    model = tiny_timm_vit(mlp_layer=GluMlp)
    for block in model.blocks:
        block.mlp.act = nn.Sigmoid()  # GluMlp's own default gate
    with pytest.raises(UnsupportedModel, match="Sigmoid"):
        libragrad(model)


def test_fused_multihead_attention_is_refused() -> None:
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.act = nn.GELU()

        def forward(self, x: Tensor) -> Tensor:
            return self.act(self.attention(x, x, x)[0]).flatten(1)

    model = Fused()
    adapter = ViTAdapter.from_modules(
        model, num_heads=2, patch_size=4, prefix_tokens=0, fused_qkv=[nn.Linear(8, 24)], model=model
    )
    with pytest.raises(UnsupportedModel, match="MultiheadAttention"):
        libragrad(model, adapter)
    with libragrad(model, adapter, attention=False):  # the other rules still apply
        model(torch.randn(1, 3, 8))


def test_a_projection_that_never_runs_is_reported() -> None:
    """An attention that computes its projection functionally (as EVA's does with its
    separate query/value biases) bypasses the module the adapter names: the attention rule
    cannot apply, and the block says so instead of returning plain gradients."""
    model = tiny_timm_vit()
    attn = model.blocks[0].attn

    def functional_attention(x: Tensor, attn_mask=None, is_causal=False) -> Tensor:
        batch, tokens, width = x.shape
        qkv = nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        context = nn.functional.scaled_dot_product_attention(q, k, v)
        return attn.proj(context.transpose(1, 2).reshape(batch, tokens, width))

    attn.forward = functional_attention
    with pytest.raises(UnsupportedModel, match="did not run in the forward pass"), libragrad(model):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(UnsupportedModel, match="did not run in the forward pass"):
        LibraGrad(model).attribute(torch.randn(1, 3, 32, 32), target=0)
    assert not any(m._forward_hooks for m in model.modules())


# --- methods -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_fullgrad_of_the_method_is_complete(name: str) -> None:
    """Block 0's Input x Gradient plus the bias maps sums to the logit (FullGrad completeness)
    under the rules: the method's own terms, on every family."""
    model = MODELS[name]().double()
    terms = LibraGrad(model).token_contributions(
        torch.randn(2, 3, 32, 32, dtype=torch.float64), target=[2, 5]
    )
    total = terms.block_inputs[:, 0].sum(-1) + terms.biases.sum(-1) + terms.pooled_biases
    torch.testing.assert_close(total, terms.scores, rtol=1e-9, atol=1e-12)
    assert terms.targets.tolist() == [2, 5]


def test_input_x_gradient_matches_the_authors_token_level_readout() -> None:
    model = tiny_timm_vit().double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ours = LibraGrad(model).attribute_grid(
        images, target=4, readout="input-x-gradient", target_output="logit"
    )
    expected = reference.token_input_x_gradient(model, images, target=4)[:, 1:].reshape(2, 4, 4)
    torch.testing.assert_close(ours, expected)


def test_readouts_relate_as_defined() -> None:
    model = tiny_hf_vit().double()
    method = LibraGrad(model)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ixg = method.attribute_grid(images, target=1, readout="input-x-gradient")
    # One Riemann step at alpha = 1 is Input x Gradient itself.
    ig1 = method.attribute_grid(images, target=1, readout="integrated-gradients", n_steps=1)
    torch.testing.assert_close(ig1, ixg)
    ig8 = method.attribute_grid(images, target=1, readout="integrated-gradients", n_steps=8)
    assert not torch.allclose(ig8, ixg)
    terms = method.token_contributions(images, target=1, target_output="probability")
    fullgrad = method.attribute_grid(images, target=1)
    expected = (terms.block_inputs.sum(1) + terms.biases)[:, 1:].reshape(2, 4, 4)
    torch.testing.assert_close(fullgrad, expected)
    probabilities = torch.softmax(model(images).logits, -1)[:, 1]
    torch.testing.assert_close(terms.scores, probabilities)


def test_method_arguments_are_checked_by_name() -> None:
    method = LibraGrad(tiny_hf_vit())
    images = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="`readout` must be one of"):
        method.attribute_grid(images, readout="gradcam")
    with pytest.raises(ValueError, match="`target_output` must be"):
        method.attribute_grid(images, target_output="softmax")
    with pytest.raises(ValueError, match="`n_steps` must be a positive int"):
        method.attribute_grid(images, readout="integrated-gradients", n_steps=0)
    with pytest.raises(ValueError, match="`additional_forward_args` must be None"):
        method.attribute_grid(images, additional_forward_args=(1,))


def test_captum_methods_take_the_rules_from_the_context() -> None:
    model = tiny_hf_vit()
    images = torch.randn(2, 3, 32, 32)
    saliency = Saliency(lambda x: model(x).logits)
    plain = saliency.attribute(images, target=2, abs=False)
    with libragrad(model):
        ruled = saliency.attribute(images, target=2, abs=False)
        leaf = images.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(model(leaf).logits[:, 2].sum(), leaf)
    torch.testing.assert_close(ruled, expected)
    assert not torch.allclose(ruled, plain)


# --- GradMask with LibraGrad's gradients -------------------------------------------------------


def test_gradmask_libragrad_reads_qk_gradients_under_norm_and_activation_rules() -> None:
    model = tiny_hf_vit()
    images = torch.randn(2, 3, 32, 32)
    gradmask = GradMaskAttribution(model)
    ruled = gradmask.binary_masks(images, target=1, gradient_rules="libragrad")
    plain = gradmask.binary_masks(images, target=1)
    with libragrad(model, attention=False):
        expected = gradmask.binary_masks(images, target=1)
    torch.testing.assert_close(ruled.scores, expected.scores)
    assert not torch.allclose(ruled.scores, plain.scores)
    # Q and K gradients stay defined: their masks' scores are not all zero.
    per_source = ruled.scores.reshape(2, -1, 3, 4, 16)  # layers, Q/K/V, groups, patches
    assert per_source[:, :, 0].abs().sum() > 0 and per_source[:, :, 1].abs().sum() > 0
    with pytest.raises(ValueError, match="`gradient_rules` must be None or 'libragrad'"):
        gradmask.attribute_grid(images, gradient_rules="lrp")


def test_registry_builds_every_libragrad_variant() -> None:
    model = tiny_hf_vit()
    images = torch.randn(1, 3, 32, 32)
    readouts = {
        "libragrad": "fullgrad+",
        "libragrad-fullgrad": "fullgrad+",
        "libragrad-ixg": "input-x-gradient",
        "libragrad-ig": "integrated-gradients",
    }
    for name, readout in readouts.items():
        method = build_method(name, model, n_steps=2)
        assert method.settings["readout"] == readout
        grid = method.attribute_grid(images, target=0)
        expected = LibraGrad(model).attribute_grid(images, target=0, readout=readout, n_steps=2)
        torch.testing.assert_close(grid, expected)
    gradmask = build_method("gradmask-libragrad", model)
    assert gradmask.settings["gradient_rules"] == "libragrad"
    assert gradmask.attribute(images, target=0).shape == (1, 3, 32, 32)


# --- the shared ViT-Tiny ----------------------------------------------------------------------


@needs_shared
@pytest.mark.slow
def test_completeness_on_the_shared_vit_tiny() -> None:
    """Docs' numbers: relative completeness error on the first 4 sample images, predicted class's
    logit, with and without the rules, float32 and float64."""
    from captum_gradmask.data import load_image, load_imagenet_sample, preprocess_image
    from captum_gradmask.models import load_model

    model, _ = load_model(HF_VIT_TINY, local_files_only=True)
    records = load_imagenet_sample(IMAGENET_SAMPLE, limit=4)
    images = torch.cat(
        [preprocess_image(load_image(r.path)).reshape(1, 3, 224, 224) for r in records]
    )
    for dtype, bound in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = model.to(dtype)
        for image in images.to(dtype):
            logit = model(image[None]).logits.max().item()
            target = int(model(image[None]).logits.argmax())
            ruled = _completeness(model, image[None], target, rules=True)
            plain = _completeness(model, image[None], target, rules=False)
            assert ruled[0] == pytest.approx(logit)
            assert abs(ruled[1] - ruled[0]) < bound * abs(ruled[0])
            assert abs(plain[1] - plain[0]) > 0.1 * abs(plain[0])


def test_registry_runs_gradient_methods_under_the_rules() -> None:
    model = tiny_hf_vit()
    images = torch.randn(2, 3, 32, 32)
    ruled = build_method("integrated-gradients", model, gradient_rules="libragrad", n_steps=3)
    plain = build_method("integrated-gradients", model, n_steps=3)
    with libragrad(model):
        expected = plain.attribute(images, target=1)
    torch.testing.assert_close(ruled.attribute(images, target=1), expected)
    assert not torch.allclose(plain.attribute(images, target=1), expected)
    assert ruled.settings["n_steps"] == 3 and not any(m._forward_hooks for m in model.modules())
    gradmask = build_method("gradmask-m4", model, gradient_rules="libragrad")
    assert gradmask.settings["gradient_rules"] == "libragrad"  # GradMask's own option
    with pytest.raises(ValueError, match="applies to gradient methods; 'occlusion'"):
        build_method("occlusion", model, gradient_rules="libragrad")
    with pytest.raises(ValueError, match="`gradient_rules` must be None or 'libragrad'"):
        build_method("saliency", model, gradient_rules="lrp")


# --- zero-shot classifiers: CLIP's L2 normalisation ---------------------------------------------


def _zero_shot(family: str):
    from captum_gradmask.zero_shot import ZeroShotClassifier

    from .models import tiny_clip_model, tiny_open_clip

    if family == "open-clip":
        pytest.importorskip("open_clip", reason="open_clip_torch is not installed")
        model = tiny_open_clip()
    else:
        model = tiny_clip_model()
    embeddings = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    return ZeroShotClassifier.from_text_embeddings(model, embeddings).double()


@pytest.mark.parametrize("family", ["hf-clip", "open-clip"])
def test_completeness_on_a_zero_shot_classifier_needs_the_l2_rule(family: str) -> None:
    """The classifier divides the image embedding by its norm: under the rules that norm is
    a constant, so the score (scaled cosine) is complete in the image and the additive
    parameters; without the L2 rule (every other rule kept) it is not. The text tower is
    outside the rules' scope (it never runs)."""
    from captum_gradmask.rules import L2Normalize, libragrad_rules

    classifier = _zero_shot(family)
    images = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    logit, total = _completeness(classifier, images, target=1, rules=True)
    assert total == pytest.approx(logit, rel=1e-9, abs=1e-12)
    plain_logit, plain_total = _completeness(classifier, images, target=1, rules=False)
    assert plain_logit == logit
    assert abs(plain_total - plain_logit) > 1e-3 * abs(plain_logit)

    adapter = get_adapter(classifier)
    rules = libragrad_rules(classifier, adapter)
    without_l2 = [
        dataclasses.replace(
            rule, modules=[m for m in rule.modules if not isinstance(m, L2Normalize)]
        )
        for rule in rules
    ]
    assert sum(len(r.modules) for r in rules) == sum(len(r.modules) for r in without_l2) + 1
    parameters = _additive_parameters(classifier)
    x = images.clone().requires_grad_(True)
    with backward_rules(without_l2):
        score = adapter.logits(x)[:, 1].sum()
        gradients = torch.autograd.grad(score, [x, *parameters], allow_unused=True)
    partial_total = sum(
        (value * gradient).sum()
        for value, gradient in zip([x, *parameters], gradients, strict=True)
        if gradient is not None
    )
    assert abs(partial_total.item() - score.item()) > 1e-3 * abs(score.item())
    terms = LibraGrad(classifier).token_contributions(images, target=1)  # the method's terms
    total_terms = terms.block_inputs[:, 0].sum(-1) + terms.biases.sum(-1) + terms.pooled_biases
    torch.testing.assert_close(total_terms, terms.scores, rtol=1e-9, atol=1e-12)
