"""Every registered method on every model family of ``tests/models.py``: the map has the input's
shape and is finite, or the method refuses the family with the library's own error (a
``ValueError`` whose message names the family or module and the reason), as
:data:`REFUSED` declares. ``docs/models.md``'s "Methods by family" table is tested against it."""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from captum_gradmask import get_adapter
from captum_gradmask.methods.diffmask import DiffMaskGate, GateConfig
from captum_gradmask.registry import _GRADIENT_METHODS, build_method, method_names
from captum_gradmask.rules import UnsupportedModel

from . import models
from .test_one_way_in import SMALL

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


def _zero_shot(build: Callable[[], nn.Module], width: int) -> nn.Module:
    from captum_gradmask.zero_shot import ZeroShotClassifier

    embeddings = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
    return ZeroShotClassifier.from_text_embeddings(build(), embeddings)


#: family: (builder, image size, the package it needs or None)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], int, str | None]] = {
    "hf-vit": (models.tiny_hf_vit, 32, None),
    "hf-vit-4.x-layout": (lambda: models.LegacyViT(models.tiny_hf_vit()), 32, None),
    "hf-deit-teacher": (lambda: models.tiny_hf_deit(teacher=True), 32, None),
    "timm-vit": (models.tiny_timm_vit, 32, None),
    "timm-deit-distilled": (models.tiny_timm_distilled, 32, None),
    "hf-clip-vision": (lambda: models.tiny_hf_clip_vision("tower"), 28, None),
    "hf-clip-projection": (lambda: models.tiny_hf_clip_vision("projection"), 28, None),
    "hf-clip-classifier": (models.tiny_hf_clip_vision, 28, None),
    "hf-siglip-vision": (lambda: models.tiny_hf_clip_vision("tower", siglip=True), 28, None),
    "hf-siglip-classifier": (lambda: models.tiny_hf_clip_vision(siglip=True), 28, None),
    "hf-dinov2": (lambda: models.tiny_hf_dinov2(registers=0), 28, None),
    "hf-dinov2-registers": (models.tiny_hf_dinov2, 28, None),
    "hf-beit": (models.tiny_hf_beit, 28, None),
    "hf-beit-relative": (lambda: models.tiny_hf_beit(relative=True), 28, None),
    "timm-eva02": (models.tiny_timm_eva, 28, None),
    "timm-eva02-separate": (lambda: models.tiny_timm_eva(fused=False), 28, None),
    "timm-eva-no-rope": (lambda: models.tiny_timm_eva(rope=False), 28, None),
    "timm-beit": (models.tiny_timm_beit, 32, None),
    "torchvision-vit": (models.tiny_torchvision_vit, 28, "torchvision"),
    "open-clip-visual": (lambda: models.tiny_open_clip().visual, 28, "open_clip"),
    "zero-shot-hf-clip": (lambda: _zero_shot(models.tiny_clip_model, 8), 28, None),
    "zero-shot-hf-siglip": (lambda: _zero_shot(lambda: models.tiny_clip_model(True), 24), 28, None),
    "zero-shot-open-clip": (lambda: _zero_shot(models.tiny_open_clip, 8), 28, "open_clip"),
}

TOKEN_METHODS = (
    "gradmask-fast",
    "vit-reciprocam",
    "vit-reciprocam-1x1",
    "libragrad",
    "libragrad-ixg",
    "libragrad-ig",
    "libragrad-fullgrad",
    "tis",
    "diffmask",
)
LIBRAGRAD = ("libragrad", "libragrad-ixg", "libragrad-ig", "libragrad-fullgrad")
_NO_TOKENS = r"needs the adapter's token interface .*adapter '{}' does not provide it: {}"
_ROTARY = _NO_TOKENS.format("timm-Eva", "its rotary position embeddings")
_RELATIVE = "its relative position bias is indexed over the whole patch grid"
_NO_CLS = r"`row`='cls' reads the row of a prefix \(CLS\) token, and this model has none"
_POOLING_MHA = r"`(model/)?(vision_model\.)?head\.attention` is an nn\.MultiheadAttention"

_SIGLIP = {
    "rollout": _NO_CLS,
    "chefer-gae": _NO_CLS,
    **dict.fromkeys((*LIBRAGRAD, "attnlrp"), _POOLING_MHA),
}

#: family: {method: what its refusal says}. Every pair not listed must run.
REFUSED: dict[str, dict[str, str]] = {
    "hf-beit-relative": {m: _NO_TOKENS.format("hf-beit", _RELATIVE) for m in TOKEN_METHODS},
    "timm-eva02": {m: _ROTARY for m in TOKEN_METHODS},
    "timm-eva02-separate": {m: _ROTARY for m in TOKEN_METHODS},
    "timm-beit": {m: _NO_TOKENS.format("timm-Beit", _RELATIVE) for m in TOKEN_METHODS},
    **dict.fromkeys(("hf-siglip-vision", "hf-siglip-classifier", "zero-shot-hf-siglip"), _SIGLIP),
}


@functools.cache
def _model(family: str) -> nn.Module:
    build, _, package = FAMILIES[family]
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")
    return build()


def _attribute(name: str, model: nn.Module, size: int) -> torch.Tensor:
    adapter = get_adapter(model)
    settings = dict(SMALL.get(name, {}))
    if name == "diffmask":
        settings["gate"] = DiffMaskGate(GateConfig.for_adapter(adapter))
    method = build_method(name, model, adapter, **settings)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    attributions = method.attribute(images, target=1)
    return attributions[0] if isinstance(attributions, tuple) else attributions


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("family", list(FAMILIES))
def test_method_runs_on_family_or_refuses_it_clearly(family: str, name: str) -> None:
    model = _model(family)
    size = FAMILIES[family][1]
    refusal = REFUSED.get(family, {}).get(name)
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal):
            _attribute(name, model, size)
    else:
        attributions = _attribute(name, model, size)
        assert attributions.shape == (2, 3, size, size)
        assert torch.isfinite(attributions).all()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())  # taps uninstalled


@pytest.mark.parametrize("name", sorted(_GRADIENT_METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_methods_under_libragrad_run_on_family_or_refuse_it(family: str, name: str):
    """``build_method(..., gradient_rules="libragrad")``: the rules hook the taps of the
    method's own adapter (EVA/BEiT, torchvision, OpenCLIP), and the refusal comes at build
    time."""
    model = _model(family)
    size = FAMILIES[family][1]
    settings = dict(SMALL.get(name, {}))
    refusal = REFUSED.get(family, {}).get("libragrad-ixg")
    if refusal is not None and "token interface" not in refusal:
        with pytest.raises(UnsupportedModel, match=refusal):
            build_method(name, model, gradient_rules="libragrad", **settings)
        return
    method = build_method(name, model, gradient_rules="libragrad", **settings)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    attributions = method.attribute(images, target=1)
    attributions = attributions[0] if isinstance(attributions, tuple) else attributions
    assert attributions.shape == (2, 3, size, size)
    assert torch.isfinite(attributions).all()
    assert not any(m._forward_hooks for m in model.modules())


def _docs_table() -> dict[str, set[str]]:
    """``docs/models.md``'s "Methods by family": family -> methods it refuses."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    section = text.split("## Methods by family", 1)[1].split("\n## ", 1)[0]
    refused: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        refused[cells[0].strip("`")] = set(re.findall(r"`([a-z0-9-]+)`", cells[2]))
    return refused


def test_docs_table_lists_each_familys_refusals() -> None:
    table = _docs_table()
    assert set(table) == set(FAMILIES)
    for family in FAMILIES:
        assert table[family] == set(REFUSED.get(family, {})), family
    assert set().union(*table.values()) <= set(method_names())
