"""AttnLRP: relevance conserved through each rule, agreement with the hand-written LRP pass of
``references/lrp.py`` on a one-layer ViT, forward values unchanged, the model restored, argument
errors, the supported families and (optional) parity with the authors' ``lxt``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import Tensor, nn

from captum_gradmask import get_adapter
from captum_gradmask.methods import AttnLRP
from captum_gradmask.registry import build_method
from captum_gradmask.rules import (
    UnsupportedModel,
    activation_rule,
    attnlrp_rules,
    backward_rules,
    constant_attention_rule,
    gamma_rule,
    gated_mlp_rule,
    libragrad,
    normalization_rule,
)
from references import lrp as reference

from .models import (
    hf_layers,
    tiny_hf_deit,
    tiny_hf_vit,
    tiny_timm_beit,
    tiny_timm_eva,
    tiny_timm_vit,
)
from .test_errors_leave_model_alone import (
    Boom,
    Tripwire,
    a_users_model,
    assert_same_state,
    model_state,
)


def _relevance_in_out(module: nn.Module, rules: list, x: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance entering ``module`` (its output times a random upstream gradient) and leaving
    it at the input (input times the rule's gradient)."""
    x = x.detach().requires_grad_(True)
    with backward_rules(rules):
        y = module(x)
        y = y[0] if isinstance(y, tuple) else y
        upstream = torch.randn_like(y)
        (gradient,) = torch.autograd.grad(y, x, upstream)
    return (y * upstream).sum(), (x * gradient).sum()


# --- conservation: sum of relevance in == out, rule by rule ----------------------------------


def test_layer_norm_identity_rule_conserves_relevance() -> None:
    norm = nn.LayerNorm(6, elementwise_affine=True).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.zero_()  # a bias absorbs relevance by design
    rule = normalization_rule([norm])
    x = torch.randn(4, 6, dtype=torch.float64)
    out, into = _relevance_in_out(norm, [rule], x)
    assert torch.allclose(into, out, rtol=1e-10)
    # The plain gradient of a LayerNorm (scale invariant up to eps) hands down almost nothing.
    torch.manual_seed(0)
    out, plain = _relevance_in_out(norm, [], x)
    assert plain.abs() < 1e-3 * out.abs()


def test_gelu_identity_rule_passes_relevance_elementwise() -> None:
    gelu = nn.GELU()
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    with backward_rules([activation_rule([gelu])]):
        y = gelu(x)
        upstream = torch.randn_like(y)
        (gradient,) = torch.autograd.grad(y, x, upstream)
    assert torch.allclose(x * gradient, y * upstream, rtol=1e-10, atol=1e-12)


def test_constant_attention_conserves_relevance_through_the_values() -> None:
    model = tiny_hf_vit(num_hidden_layers=1).double()
    attention = hf_layers(model)[0].attention
    with torch.no_grad():
        for m in attention.modules():
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    rule = constant_attention_rule(get_adapter(model), model)
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    out, into = _relevance_in_out(attention, [rule], x)
    assert torch.allclose(into, out, rtol=1e-9)
    # Through the softmax (no rule) relevance is not conserved.
    out, into = _relevance_in_out(attention, [], x)
    assert not torch.allclose(into, out, rtol=1e-3)


def test_matmul_uniform_rule_conserves_relevance_of_a_product() -> None:
    from timm.layers import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(6, 10, bias=False).double().eval()
    rules = [activation_rule([mlp.act]), gated_mlp_rule([mlp])]
    x = torch.randn(3, 6, dtype=torch.float64)
    out, into = _relevance_in_out(mlp, rules, x)
    assert torch.allclose(into, out, rtol=1e-9)
    # Without halving, the product (degree 2 in x) hands down twice its relevance.
    out, into = _relevance_in_out(mlp, rules[:1], x)
    assert torch.allclose(into, 2 * out, rtol=1e-9)


@pytest.mark.parametrize("gamma", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gamma_rule_conserves_relevance_without_bias(kind: str, gamma: float) -> None:
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(8, 5, bias=False), torch.randn(4, 8)
    else:
        layer, x = nn.Conv2d(3, 4, 2, stride=2, bias=False), torch.randn(2, 3, 4, 4)
    layer, x = layer.double(), x.double()
    out, into = _relevance_in_out(layer, [gamma_rule([layer], gamma)], x)
    assert torch.allclose(into, out, rtol=1e-4)  # up to zennit's stabiliser


def test_gamma_rule_changes_the_gradient_only_when_gamma_is_positive() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 5).double()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)

    def gradient(gamma: float | None) -> Tensor:
        with backward_rules([] if gamma is None else [gamma_rule([layer], gamma)]):
            y = layer(x)
            return torch.autograd.grad(y.sum(), x)[0]

    assert torch.allclose(gradient(0.0), gradient(None), rtol=1e-3, atol=1e-6)
    assert not torch.allclose(gradient(0.5), gradient(None), atol=1e-3)


# --- the whole pass against the hand-written reference --------------------------------------


@pytest.mark.parametrize("gammas", [(0.0, 0.0), (0.25, 0.05), (100.0, 1.0)])
def test_equals_hand_written_lrp_on_a_one_layer_vit(gammas: tuple[float, float]) -> None:
    conv_gamma, linear_gamma = gammas
    model = tiny_hf_vit(num_hidden_layers=1).double()
    with torch.no_grad():  # non-zero embeddings exercise their share of relevance
        model.vit.embeddings.cls_token.normal_()
        model.vit.embeddings.position_embeddings.normal_(0, 0.5)
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                m.bias.normal_(0, 0.1)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0, 0.2)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = [3, 5]
    relevance = AttnLRP(model).attribute(
        images, target=targets, conv_gamma=conv_gamma, linear_gamma=linear_gamma
    )
    weights = reference.hf_vit_weights(model)
    for image, target, ours in zip(images, targets, relevance, strict=True):
        logits = reference.one_layer_vit(weights, image)["logits"]
        assert torch.allclose(logits, model(image[None]).logits[0], atol=1e-10)
        expected = reference.attnlrp_relevance(
            weights, image, target, conv_gamma=conv_gamma, linear_gamma=linear_gamma
        )
        assert torch.allclose(ours, expected, rtol=1e-7, atol=1e-10 * expected.abs().max())


def test_grid_is_the_pixel_relevance_summed_per_patch() -> None:
    model = tiny_hf_vit()
    images = torch.randn(2, 3, 32, 32)
    method = AttnLRP(model)
    pixels = method.attribute(images, target=1).sum(1)
    grid = method.attribute_grid(images, target=1)
    assert grid.shape == (2, 4, 4)
    expected = pixels.reshape(2, 4, 8, 4, 8).sum((2, 4))
    assert torch.allclose(grid, expected, atol=1e-6)


def test_lrp_zero_is_input_x_gradient_under_libragrad_rules() -> None:
    """With gamma 0 the rules are LibraGrad's (identity rules, constant attention), up to
    zennit's stabiliser (1e-6 added to each denominator)."""
    model = tiny_timm_vit().double()
    with torch.no_grad():  # weights large enough that the stabiliser is negligible
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0, 0.2)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    ours = AttnLRP(model).attribute(images, target=2, conv_gamma=0.0, linear_gamma=0.0)
    with libragrad(model):
        (gradient,) = torch.autograd.grad(model(images)[:, 2].sum(), images)
    expected = images * gradient
    assert (ours - expected).abs().max() < 1e-3 * expected.abs().max()


# --- the model: forward unchanged, restored, also on errors ---------------------------------


def test_forward_values_unchanged_under_the_rules() -> None:
    model = tiny_timm_vit()
    images = torch.randn(2, 3, 32, 32)
    plain = model(images)
    with backward_rules(attnlrp_rules(model)), torch.enable_grad():
        ruled = model(images.requires_grad_(True))
    assert torch.equal(plain, ruled)


def test_model_restored_after_a_call_and_after_an_error() -> None:
    model = tiny_hf_vit()
    before = model_state(model)
    method = AttnLRP(model)
    method.attribute(torch.randn(1, 3, 32, 32), target=0)
    assert_same_state(model, before, "after a call")

    def explode(*_: object) -> None:
        raise Boom

    hook = model.classifier.register_forward_hook(explode)
    try:
        with pytest.raises(Boom):
            method.attribute(torch.randn(1, 3, 32, 32), target=0)
    finally:
        hook.remove()
    assert_same_state(model, before, "after an error")


def test_model_restored_after_an_error_in_the_backward_pass() -> None:
    model = a_users_model()
    method = AttnLRP(model)
    # The embeddings' output is on the backward path (no rule replaces it).
    wire = Tripwire(model.vit.embeddings)
    try:
        before = model_state(model)
        method.attribute(torch.randn(1, 3, 32, 32), target=1)
        assert wire.backwards == 1
        wire.fail_backward = True
        with pytest.raises(Boom, match="backward"):
            method.attribute(torch.randn(1, 3, 32, 32), target=1)
        assert_same_state(model, before, "after an error in the backward pass")
    finally:
        wire.handle.remove()


# --- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["conv_gamma", "linear_gamma"])
@pytest.mark.parametrize("value", [-0.1, "0.25", float("nan"), True])
def test_bad_gamma_names_the_argument(name: str, value: object) -> None:
    method = AttnLRP(tiny_hf_vit())
    with pytest.raises(ValueError, match=name):
        method.attribute(torch.randn(1, 3, 32, 32), target=0, **{name: value})


def test_bad_target_and_input_are_refused() -> None:
    method = AttnLRP(tiny_hf_vit())
    with pytest.raises(ValueError, match="target"):
        method.attribute(torch.randn(2, 3, 32, 32), target=[1, 2, 3])
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        method.attribute(torch.randn(1, 3, 32, 32), target=99)


def test_unsupported_activation_is_refused_with_its_name() -> None:
    model = tiny_timm_vit(act_layer=nn.Tanh)
    with pytest.raises(UnsupportedModel, match=r"AttnLRP.*Tanh"):
        AttnLRP(model)


# --- families -------------------------------------------------------------------------------


def _torchvision_vit() -> nn.Module:
    pytest.importorskip("torchvision", reason="torchvision is not installed")
    from .models import tiny_torchvision_vit

    return tiny_torchvision_vit()


FAMILIES = {
    "hf-deit-teacher": (lambda: tiny_hf_deit(teacher=True), 32),
    "timm-vit": (tiny_timm_vit, 32),
    "timm-eva": (tiny_timm_eva, 28),
    "timm-beit": (tiny_timm_beit, 32),
    "torchvision-vit": (_torchvision_vit, 28),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_families_explained_with_forward_unchanged(family: str) -> None:
    build, size = FAMILIES[family]
    model = build()
    images = torch.randn(2, 3, size, size)
    before = model_state(model)
    method = AttnLRP(model)
    grid = method.attribute_grid(images, target=1)
    assert grid.shape == (2, *method.adapter.grid((size, size)))
    assert torch.isfinite(grid).all() and grid.abs().sum() > 0
    assert_same_state(model, before, family)


def test_registered_with_a_gamma_from_the_authors_grid() -> None:
    method = build_method("attnlrp", tiny_hf_vit())
    assert method.settings["conv_gamma"] in (0.1, 0.25, 100.0)
    assert method.settings["linear_gamma"] in (0.0, 0.01, 0.05, 0.1, 1.0)
    assert method.attribute_grid(torch.randn(1, 3, 32, 32), target=0).shape == (1, 4, 4)


# --- optional: parity with lxt on a torchvision ViT -----------------------------------------

_LXT_SCRIPT = textwrap.dedent(
    """
    import json, sys, types
    import torch
    import transformers.pytorch_utils as utils
    # lxt 2.1 imports its BERT patch, which needs a helper transformers 5 removed; it is not
    # used for ViTs, so a stand-in lets the package import.
    if not hasattr(utils, "find_pruneable_heads_and_indices"):
        utils.find_pruneable_heads_and_indices = lambda *a, **k: None
    import zennit.rules as z_rules
    from zennit.composites import LayerMapComposite
    from torchvision.models import vision_transformer
    from lxt.efficient import monkey_patch, monkey_patch_zennit

    monkey_patch(vision_transformer)
    monkey_patch_zennit()
    data = torch.load(sys.argv[1])
    model = vision_transformer.VisionTransformer(**data["config"]).double().eval()
    model.load_state_dict(data["state"])
    for p in model.parameters():
        p.requires_grad = False
    out = []
    for conv_gamma, linear_gamma in data["gammas"]:
        composite = LayerMapComposite([
            (torch.nn.Conv2d, z_rules.Gamma(conv_gamma)),
            (torch.nn.Linear, z_rules.Gamma(linear_gamma)),
        ])
        composite.register(model)
        images = data["images"].clone().requires_grad_(True)
        logits = model(images)
        logits[:, data["target"]].sum().backward()
        composite.remove()
        out.append((images * images.grad).tolist())
    print(json.dumps(out))
    """
)


def _missing(reason: str) -> None:
    """Skip, or fail where the environment says lxt must be there (CI)."""
    if os.environ.get("CAPTUM_GRADMASK_REQUIRE_LXT"):
        pytest.fail(reason)
    pytest.skip(reason)


def _lxt_python() -> str:
    probe = "import lxt, zennit, torchvision"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode:
        _missing(
            "lxt, zennit and torchvision are not installed (optional parity test: "
            "pip install lxt zennit torchvision)"
        )
    return sys.executable


def test_equals_lxt_on_a_torchvision_vit(tmp_path) -> None:
    python = _lxt_python()
    from torchvision.models import VisionTransformer

    config = dict(
        image_size=28,
        patch_size=14,
        num_layers=2,
        num_heads=3,
        hidden_dim=24,
        mlp_dim=48,
        num_classes=7,
    )
    torch.manual_seed(0)
    model = VisionTransformer(**config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    images = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    gammas = [(0.0, 0.0), (0.25, 0.05), (100.0, 1.0)]
    path = tmp_path / "case.pt"
    torch.save(
        {
            "config": config,
            "state": model.state_dict(),
            "images": images,
            "target": 4,
            "gammas": gammas,
        },
        path,
    )
    # lxt patches torch's classes for the whole process: run it in its own.
    run = subprocess.run(
        [python, "-c", _LXT_SCRIPT, str(path)], capture_output=True, text=True, timeout=300
    )
    if run.returncode:
        _missing(f"lxt could not run here: {run.stderr.strip().splitlines()[-1]}")
    expected = [torch.tensor(r, dtype=torch.float64) for r in json.loads(run.stdout)]
    method = AttnLRP(model)
    for (conv_gamma, linear_gamma), lxt_relevance in zip(gammas, expected, strict=True):
        ours = method.attribute(images, target=4, conv_gamma=conv_gamma, linear_gamma=linear_gamma)
        scale = lxt_relevance.abs().max()
        assert torch.allclose(ours, lxt_relevance, rtol=1e-6, atol=1e-8 * scale), (
            conv_gamma,
            linear_gamma,
        )
