"""The Quantus bridge: same maps as the library, the explain_func contract, and agreement of
the project's pointing game with Quantus's PointingGame."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from captum_gradmask import GradMaskAttribution, interop
from captum_gradmask.interop import LogitsModel, clear_quantus_cache, quantus_explain
from captum_gradmask.metrics import pointing_game
from captum_gradmask.registry import method_names

from .models import tiny_hf_vit, tiny_timm_vit

# Cheap settings so that every registered method runs in about a second on the tiny model.
CHEAP = {
    "integrated-gradients": {"n_steps": 4, "internal_batch_size": 8},
    "gradient-shap": {"n_samples": 3},
    "smoothgrad": {"nt_samples": 3},
    "kernel-shap": {"n_samples": 12},
    "rise": {"n_masks": 16},
    "tis": {"n_masks": 16},
}


def _images(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, 3, 32, 32)).astype(np.float32)


def test_gradmask_m4_equals_the_library_on_the_same_pixels() -> None:
    vit = tiny_hf_vit()
    x = _images()
    targets = np.array([1, 5])
    expected = GradMaskAttribution(vit).attribute(
        torch.from_numpy(x), target=torch.from_numpy(targets), masks_per_layer=4
    )
    summed = quantus_explain(LogitsModel(vit), x, targets, device="cpu")
    full = quantus_explain(LogitsModel(vit), x, targets, channel_reduction="none")
    assert summed.shape == (2, 1, 32, 32) and summed.dtype == np.float32
    np.testing.assert_allclose(full, expected.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(summed, expected.sum(1, keepdim=True).numpy(), rtol=1e-5)


def test_method_settings_reach_the_method() -> None:
    vit = tiny_hf_vit()
    x, targets = _images(1), np.array([2])
    m2 = quantus_explain(vit, x, targets, method_settings={"masks_per_layer": 2})
    expected = GradMaskAttribution(vit).attribute(torch.from_numpy(x), target=2, masks_per_layer=2)
    np.testing.assert_allclose(m2, expected.sum(1, keepdim=True).numpy(), rtol=1e-5)
    assert not np.allclose(m2, quantus_explain(vit, x, targets))  # m=4 differs


@pytest.mark.parametrize("name", [n for n in method_names() if n != "diffmask"])
def test_every_registry_method_fits_the_contract(name: str) -> None:
    vit = tiny_hf_vit()
    x = _images(3)
    out = quantus_explain(
        model=LogitsModel(vit),
        inputs=x,
        targets=np.array([0, 3, 6]),
        method=name,
        method_settings=CHEAP.get(name),
        device="cpu",
        channel_first=True,  # what Quantus adds on its own
        softmax=False,
    )
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert out.shape == (3, 1, 32, 32)
    assert np.isfinite(out).all()
    assert not np.allclose(out[0], out[0].flat[0])  # a map, not a constant


def test_timm_model_needs_no_wrapper_and_state_is_kept() -> None:
    vit = tiny_timm_vit()
    flags = [p.requires_grad for p in vit.parameters()]
    out = quantus_explain(vit, _images(2), np.array([1, 1]))
    assert out.shape == (2, 1, 32, 32)
    assert not vit.training
    assert [p.requires_grad for p in vit.parameters()] == flags
    assert all(p.grad is None for p in vit.parameters())


def test_built_method_is_reused_across_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_quantus_cache()
    calls = []
    real = interop.build_method

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(interop, "build_method", counting)
    vit, x = tiny_hf_vit(), _images(1)
    for _ in range(3):
        quantus_explain(vit, x, np.array([0]))
    quantus_explain(vit, x, np.array([0]), method_settings={"masks_per_layer": 2})
    quantus_explain(vit, x, np.array([0]), method="saliency")
    assert calls == ["gradmask-m4", "gradmask-m4", "saliency"]
    clear_quantus_cache()
    assert not interop._cache


def test_cache_is_bounded_so_models_are_released() -> None:
    clear_quantus_cache()
    x = _images(1)
    for _ in range(interop._CACHE_SIZE + 3):
        quantus_explain(tiny_hf_vit(num_hidden_layers=1), x, np.array([0]), method="saliency")
    assert len(interop._cache) == interop._CACHE_SIZE
    clear_quantus_cache()


def test_bad_arguments_are_named() -> None:
    vit, x = tiny_hf_vit(), _images(2)
    with pytest.raises(ValueError, match="unknown method 'gradmask'"):
        quantus_explain(vit, x, np.array([0, 1]), method="gradmask")
    with pytest.raises(ValueError, match="`targets` has 3 entries but the batch has 2 images"):
        quantus_explain(vit, x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="`channel_reduction` must be one of"):
        quantus_explain(vit, x, np.array([0, 1]), channel_reduction="mean")
    with pytest.raises(ValueError, match=r"`inputs` must be a batch of images"):
        quantus_explain(vit, x[0], np.array([0]))
    with pytest.raises(TypeError, match="`method_settings` must be a dict"):
        quantus_explain(vit, x, np.array([0, 1]), method_settings=4)


def test_unknown_keyword_warns_but_quantus_keywords_do_not() -> None:
    vit, x = tiny_hf_vit(), _images(1)
    with pytest.warns(UserWarning, match=r"ignores the keyword\(s\) \['masks_per_layer'\]"):
        quantus_explain(vit, x, np.array([0]), masks_per_layer=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantus_explain(vit, x, np.array([0]), channel_first=True, softmax=True, device="cpu")


def test_logits_model_follows_the_wrapped_mode() -> None:
    vit = tiny_hf_vit()
    assert LogitsModel(vit).training is False
    assert LogitsModel(vit.train()).training is True
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module"):
        LogitsModel(lambda x: x)


# --- inside Quantus -------------------------------------------------------------------------


def _quantus():
    return pytest.importorskip(
        "quantus", reason="quantus is not installed (pip install .[quantus])"
    )


def _object_masks(batch: int, seed: int = 0) -> np.ndarray:
    """(B, 1, 32, 32) random boxes, never empty."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((batch, 1, 32, 32), dtype=bool)
    for i in range(batch):
        top, left = rng.integers(0, 20, size=2)
        height, width = rng.integers(4, 12, size=2)
        masks[i, 0, top : top + height, left : left + width] = True
    return masks


def test_bridge_runs_inside_quantus_pointing_game() -> None:
    quantus = _quantus()
    vit = tiny_hf_vit()
    x, y, s = _images(4), np.array([0, 1, 2, 3]), _object_masks(4)
    metric = quantus.PointingGame(disable_warnings=True)
    scores = metric(
        model=LogitsModel(vit),
        x_batch=x,
        y_batch=y,
        a_batch=None,
        s_batch=s,
        explain_func=quantus_explain,
        explain_func_kwargs={"method": "gradmask-m4"},
        device="cpu",
    )
    attributions = GradMaskAttribution(vit).attribute(torch.from_numpy(x), target=y.tolist())
    ours = pointing_game(
        attributions, masks=torch.from_numpy(s[:, 0]), tolerance=0, ties="any"
    ).hits
    assert len(scores) == 4
    assert [bool(v) for v in scores] == ours.tolist()


def test_bridge_runs_inside_quantus_pixel_flipping() -> None:
    quantus = _quantus()
    vit = tiny_hf_vit()
    x, y = _images(2), np.array([4, 6])
    metric = quantus.PixelFlipping(features_in_step=256, disable_warnings=True)
    curves = metric(
        model=LogitsModel(vit),
        x_batch=x,
        y_batch=y,
        explain_func=quantus_explain,
        explain_func_kwargs={"method": "saliency"},
        device="cpu",
    )
    # Quantus flips (channel, row, column) values of the map broadcast to the image's shape.
    assert np.asarray(curves).shape == (2, 3 * 32 * 32 // 256)
    # The first flip removes the most salient pixels: the target's probability changes.
    with torch.no_grad():
        original = torch.softmax(vit(torch.from_numpy(x)).logits, -1)[[0, 1], y]
    assert not np.allclose(np.asarray(curves)[:, 0], original.numpy())


def _random_patch_maps(batch: int, seed: int) -> np.ndarray:
    """(B, 1, 32, 32) maps constant on 8x8 patches: a maximum is a whole patch (many tied
    pixels), as GradMask's maps are."""
    grid = np.random.default_rng(seed).random((batch, 1, 4, 4)).astype(np.float32)
    return grid.repeat(8, axis=2).repeat(8, axis=3)


@pytest.mark.parametrize("kind", ["pixel", "patch"])
def test_pointing_game_equals_quantus_image_by_image(kind: str) -> None:
    quantus = _quantus()
    batch = 64
    rng = np.random.default_rng(1)
    if kind == "pixel":  # no ties: every tie rule agrees
        a = rng.normal(size=(batch, 1, 32, 32)).astype(np.float32)
    else:
        a = _random_patch_maps(batch, seed=2)
    s = _object_masks(batch, seed=3)
    theirs = quantus.PointingGame(disable_warnings=True)(
        model=None,
        x_batch=np.zeros((batch, 3, 32, 32), np.float32),
        y_batch=np.zeros(batch, int),
        a_batch=a,
        s_batch=s,
    )
    ours = pointing_game(
        torch.from_numpy(a), masks=torch.from_numpy(s[:, 0]), tolerance=0, ties="any"
    )
    assert [bool(v) for v in theirs] == ours.hits.tolist()
    assert 0 < ours.hit_rate < 1  # both outcomes occur, so the comparison means something


def test_quantus_counts_a_hit_when_any_tied_maximum_hits() -> None:
    """Two equal maxima, the first (row-major) off the object and the second on it: Quantus and
    ``ties="any"`` count a hit; ``ties="first"`` (TorchRay's argmax) a miss."""
    quantus = _quantus()
    a = np.zeros((1, 1, 32, 32), np.float32)
    a[0, 0, 2, 2] = a[0, 0, 20, 20] = 1.0
    s = np.zeros((1, 1, 32, 32), bool)
    s[0, 0, 18:24, 18:24] = True
    theirs = quantus.PointingGame(disable_warnings=True)(
        model=None,
        x_batch=np.zeros((1, 3, 32, 32), np.float32),
        y_batch=np.zeros(1, int),
        a_batch=a,
        s_batch=s,
    )
    mask = torch.from_numpy(s[:, 0])
    assert bool(theirs[0]) is True
    assert pointing_game(torch.from_numpy(a), masks=mask, tolerance=0, ties="any").hit_rate == 1
    assert pointing_game(torch.from_numpy(a), masks=mask, tolerance=0, ties="first").hit_rate == 0


def test_docs_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    _quantus()
    text = (Path(__file__).resolve().parents[1] / "docs" / "quantus.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    exec(compile(code, "quantus.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "4"
