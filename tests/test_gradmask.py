"""GradMask against an independent reference implementation, on tiny and real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from captum_gradmask import GradMaskAttribution, ViTAdapter, get_adapter
from references.gradmask import reference_gradmask

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, TIMM_VIT_TINY, needs_shared
from .models import (
    HF_KIND,
    TRANSFORMERS_MAJOR,
    LegacyViT,
    needs_transformers_5,
    tiny_hf_deit,
    tiny_hf_vit,
    tiny_timm_distilled,
    tiny_timm_vit,
)

ATOL = 1e-5  # float32 sums of up to a few hundred confidences


def _images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


CASES = {
    "hf-vit": (tiny_hf_vit, HF_KIND, 1),
    "hf-deit": (lambda: tiny_hf_deit(teacher=False), HF_KIND, 2),
    "hf-deit-teacher": (lambda: tiny_hf_deit(teacher=True), HF_KIND, 2),
    "hf4-vit": (lambda: LegacyViT(tiny_hf_vit()), "hf4", 1),  # 5.x only
    "timm-vit": (tiny_timm_vit, "timm", 1),
    "timm-distilled": (tiny_timm_distilled, "timm", 2),
    "timm-registers": (lambda: tiny_timm_vit(reg_tokens=4), "timm", 5),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("masks_per_layer", [1, 3, 4])
def test_matches_reference_on_tiny_models(name: str, masks_per_layer: int) -> None:
    if name == "hf4-vit" and TRANSFORMERS_MAJOR < 5:
        pytest.skip("LegacyViT wraps a transformers 5.x model; 4.x builds this layout itself")
    build, kind, prefix = CASES[name]
    model = build()
    adapter = get_adapter(model)
    assert adapter.prefix_tokens == prefix
    images = _images()
    ours = GradMaskAttribution(model).attribute_grid(images, masks_per_layer=masks_per_layer)
    for i in range(images.shape[0]):
        ref = reference_gradmask(model, images[i], kind, masks_per_layer, prefix=prefix, patch=8)
        torch.testing.assert_close(ours[i], ref, atol=ATOL, rtol=0)


@needs_transformers_5
def test_legacy_and_current_layouts_give_the_same_map() -> None:
    model = tiny_hf_vit()
    images = _images()
    current = GradMaskAttribution(model).attribute_grid(images)
    legacy = GradMaskAttribution(LegacyViT(model)).attribute_grid(images)
    assert (
        get_adapter(LegacyViT(model)).layers[0].query.module is model.vit.layers[0].attention.q_proj
    )
    torch.testing.assert_close(current, legacy, atol=ATOL, rtol=0)


def test_attribute_shape_and_upsampling_follow_the_grid() -> None:
    model = tiny_hf_vit()
    images = _images()
    gm = GradMaskAttribution(model)
    grid = gm.attribute_grid(images, target=[1, 2])
    attr = gm.attribute(images, target=[1, 2])
    assert attr.shape == images.shape
    expected = grid.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(images)
    torch.testing.assert_close(attr, expected)
    (as_tuple,) = gm.attribute((images,), target=[1, 2])
    torch.testing.assert_close(as_tuple, attr)


def test_targets_int_list_tensor_and_default() -> None:
    model = tiny_hf_vit()
    images = _images(3)
    gm = GradMaskAttribution(model)
    predicted = model(images).logits.argmax(-1)
    default = gm.attribute_grid(images)
    torch.testing.assert_close(default, gm.attribute_grid(images, target=predicted))
    torch.testing.assert_close(default, gm.attribute_grid(images, target=predicted.tolist()))
    same = gm.attribute_grid(images, target=4)
    for i in range(3):
        ref = reference_gradmask(model, images[i], HF_KIND, 4, patch=8, target=4)
        torch.testing.assert_close(same[i], ref, atol=ATOL, rtol=0)


def test_batch_equals_one_at_a_time_and_chunking_is_invisible() -> None:
    model = tiny_timm_vit()
    images = _images(4)
    gm = GradMaskAttribution(model)
    together = gm.attribute_grid(images, target=[0, 1, 2, 3], perturbations_per_eval=1000)
    small_chunks = gm.attribute_grid(images, target=[0, 1, 2, 3], perturbations_per_eval=5)
    single = torch.cat([gm.attribute_grid(images[i : i + 1], target=i) for i in range(4)])
    torch.testing.assert_close(together, single, atol=ATOL, rtol=0)
    torch.testing.assert_close(together, small_chunks, atol=ATOL, rtol=0)


OPTIONS = {
    "layers=all": dict(layers="all"),
    "layers=[0, 2]": dict(layers=[0, 2]),
    "layers=[-1]": dict(layers=[-1]),
    "layers=[2, 0] m=1": dict(layers=[2, 0], masks_per_layer=1),
    "clamp=False": dict(clamp=False),
    "fill_value=-1": dict(fill_value=-1.0),
    "fill_value=0.7 layers=all clamp=False": dict(fill_value=0.7, layers="all", clamp=False),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_beyond_the_paper_match_the_reference(name: str) -> None:
    options = OPTIONS[name]
    model = tiny_hf_vit()  # 3 layers
    images = _images()
    gm = GradMaskAttribution(model)
    ours = gm.attribute_grid(images, target=[0, 3], **options)
    default = gm.attribute_grid(images, target=[0, 3])
    m = options.get("masks_per_layer", 4)
    rest = {k: v for k, v in options.items() if k != "masks_per_layer"}
    for i, target in enumerate([0, 3]):
        ref = reference_gradmask(model, images[i], HF_KIND, m, patch=8, target=target, **rest)
        torch.testing.assert_close(ours[i], ref, atol=ATOL, rtol=0)
    # each option changes the map, so the comparison above is not the default's twice
    assert not torch.allclose(ours, default, atol=1e-3)


def test_default_layers_are_all_but_the_last_or_the_only_one() -> None:
    model = tiny_hf_vit()  # 3 layers
    images = _images(1)
    gm = GradMaskAttribution(model)
    torch.testing.assert_close(
        gm.attribute_grid(images, target=0), gm.attribute_grid(images, target=0, layers=[0, 1])
    )
    one_layer = tiny_hf_vit(num_hidden_layers=1)
    only = GradMaskAttribution(one_layer).attribute_grid(images, target=0, masks_per_layer=1)
    reference = reference_gradmask(one_layer, images[0], HF_KIND, 1, patch=8, target=0)
    torch.testing.assert_close(only[0], reference, atol=ATOL, rtol=0)
    # one layer, m = 1: each patch is in at most 3 masks, weighted by confidences <= 1
    assert 0 < only.max() <= 3 + 1e-6


def test_non_square_and_resized_inputs_hf_and_timm() -> None:
    hf = tiny_hf_vit()
    images = torch.randn(2, 3, 48, 24)
    out = GradMaskAttribution(hf).attribute_grid(images)
    assert out.shape == (2, 6, 3)
    timm_model = tiny_timm_vit(img_size=(48, 24))
    out = GradMaskAttribution(timm_model).attribute_grid(images)
    assert out.shape == (2, 6, 3)
    for i in range(2):
        ref = reference_gradmask(timm_model, images[i], "timm", patch=8)
        torch.testing.assert_close(out[i], ref, atol=ATOL, rtol=0)


def test_user_supplied_adapter_for_an_unknown_model() -> None:
    inner = tiny_timm_vit()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = inner

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.net(x)}

    wrapped = Wrapped().eval()
    with pytest.raises(ValueError, match="no recognisable attention layers"):
        GradMaskAttribution(wrapped)
    adapter = ViTAdapter.from_modules(
        wrapped,
        num_heads=3,
        patch_size=8,
        prefix_tokens=1,
        fused_qkv=[block.attn.qkv for block in inner.blocks],
        model=wrapped,
    )
    images = _images()
    ours = GradMaskAttribution(wrapped, adapter=adapter).attribute_grid(images)
    builtin = GradMaskAttribution(inner).attribute_grid(images)
    torch.testing.assert_close(ours, builtin, atol=ATOL, rtol=0)


# --- real model --------------------------------------------------------------------------------


def load_real_images(size: int = 224, files: tuple[int, ...] = (1, 2, 3)) -> torch.Tensor:
    """transformers 4.x preprocessing: PIL bicubic resize, then (x/255 - 0.5) / 0.5."""
    batch = []
    for i in files:
        path = IMAGENET_SAMPLE / "images" / f"ILSVRC2012_val_{i:08d}.JPEG"
        img = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        batch.append((arr / 255.0 - 0.5) / 0.5)
    return torch.stack(batch)


@pytest.fixture(scope="module")
def real_vit():
    if not HF_VIT_TINY.is_dir():
        pytest.skip("shared ViT-Tiny not found (set CAPTUM_GRADMASK_SHARED)")
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("masks_per_layer", [1, 3, 4, 12])
def test_matches_reference_on_real_vit_tiny(real_vit, masks_per_layer: int) -> None:
    # two images, one for m = 12 (396 masked images each for the library and the reference)
    images = load_real_images(files=(1,) if masks_per_layer == 12 else (1, 2))
    ours = GradMaskAttribution(real_vit).attribute_grid(images, masks_per_layer=masks_per_layer)
    for i in range(images.shape[0]):
        ref = reference_gradmask(real_vit, images[i], HF_KIND, masks_per_layer)
        # At m = 12 the map sums 396 confidences into values near 40, where float32 sums in
        # another order differ by a few ulp (1.1e-5 = 2.9e-7 relative, seen on an Intel Xeon;
        # under 1e-5 on AMD EPYC): rtol 1e-6 is about 8 ulp, far below one mask's weight.
        torch.testing.assert_close(ours[i], ref, atol=ATOL, rtol=1e-6)


@needs_shared
@pytest.mark.slow
def test_real_batch_equals_single_images(real_vit) -> None:
    images = load_real_images(files=(3, 4, 5))
    gm = GradMaskAttribution(real_vit)
    together = gm.attribute_grid(images)
    single = torch.cat([gm.attribute_grid(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, single, atol=ATOL, rtol=0)


@needs_shared
@pytest.mark.slow
def test_hf_and_timm_copies_of_the_same_weights_give_the_same_map(real_vit) -> None:
    timm = pytest.importorskip("timm")
    timm_model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(TIMM_VIT_TINY)),
    ).eval()
    images = load_real_images(files=(1, 2, 3))
    hf_map = GradMaskAttribution(real_vit).attribute_grid(images)
    timm_map = GradMaskAttribution(timm_model).attribute_grid(images)
    # logits agree to ~4e-6; a mask bit could flip on an exact tie, so allow 0.1 % of the scale
    torch.testing.assert_close(hf_map, timm_map, atol=1e-3 * float(hf_map.abs().max()), rtol=0)
