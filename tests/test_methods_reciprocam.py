"""ViT-ReciproCAM against its authors' computation re-derived in ``references/reciprocam.py``
(the default), and its block-input variant against a plain loop over patches that calls the
models' own modules. ``tests/test_parity_openvino_xai.py`` compares it with the authors' code."""

from __future__ import annotations

import pytest
import torch

from captum_gradmask import ViTAdapter
from captum_gradmask.methods import ViTReciproCAM
from captum_gradmask.methods.reciprocam import spatial_weights
from references.reciprocam import vit_reciprocam

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared
from .models import (
    LegacyViT,
    hf_layers,
    tiny_hf_deit,
    tiny_hf_vit,
    tiny_timm_distilled,
    tiny_timm_vit,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: on a shared 2-core machine, intra-op threads only contend (100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


GAUSSIAN = [[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]]


def _hf_parts(model):
    base = model.deit if hasattr(model, "deit") else model.vit

    def block(layer):
        def run(h):
            out = layer(h)
            return out[0] if isinstance(out, tuple) else out

        return run

    def head(h):
        h = base.layernorm(h)
        if hasattr(model, "distillation_classifier"):
            return (model.cls_classifier(h[:, 0]) + model.distillation_classifier(h[:, 1])) / 2
        return model.classifier(h[:, 0])

    return base.embeddings, [block(layer) for layer in base.layers], head


def _timm_parts(model):
    def embed(x):
        return model._pos_embed(model.patch_embed(x))

    return embed, list(model.blocks), lambda h: model.head(model.norm(h)[:, 0])


def plain_reciprocam(parts, image, target, prefix, layer, gaussian, normalize=True):
    """The block-input variant: one token set per patch, built token by token from the block's
    input, run through the remaining blocks; the target's softmax probability."""
    embed, blocks, head = parts
    start = layer % len(blocks)
    with torch.no_grad():
        tokens = embed(image[None])
        for block in blocks[:start]:
            tokens = block(tokens)
        scores = []
        for r in range(4):
            for c in range(4):
                masked = torch.zeros_like(tokens)
                masked[:, :prefix] = tokens[:, :prefix]
                if gaussian:
                    for dr in (-1, 0, 1):
                        for dc in (-1, 0, 1):
                            if 0 <= r + dr < 4 and 0 <= c + dc < 4:
                                k = prefix + (r + dr) * 4 + (c + dc)
                                masked[:, k] = tokens[:, k] * GAUSSIAN[dr + 1][dc + 1]
                else:
                    k = prefix + r * 4 + c
                    masked[:, k] = tokens[:, k]
                for block in blocks[start:]:
                    masked = block(masked)
                scores.append(torch.softmax(head(masked), dim=-1)[0, target])
    scores = torch.stack(scores).reshape(4, 4)
    if normalize:
        scores = (scores - scores.min()) / (scores.max() - scores.min())
    return scores


CASES = {
    "hf-vit": (tiny_hf_vit, _hf_parts, 1),
    "hf-deit-teacher": (lambda: tiny_hf_deit(teacher=True), _hf_parts, 2),
    "timm-vit": (tiny_timm_vit, _timm_parts, 1),
}


def _logits(model):
    def run(images):
        output = model(images)
        return getattr(output, "logits", output)

    return run


def _hf_norm(model, layer):
    return hf_layers(model)[layer].layernorm_before


def _timm_norm(model, layer):
    return model.blocks[layer].norm1


AUTHORS_CASES = {
    "hf-vit": (tiny_hf_vit, _hf_norm, 1),
    "hf-vit-4.x-layout": (
        lambda: LegacyViT(tiny_hf_vit()),
        lambda m, i: m.vit.encoder.layer[i].layernorm_before,
        1,
    ),
    "hf-deit": (tiny_hf_deit, _hf_norm, 2),
    "hf-deit-teacher": (lambda: tiny_hf_deit(teacher=True), _hf_norm, 2),
    "timm-vit": (tiny_timm_vit, _timm_norm, 1),
    "timm-distilled": (tiny_timm_distilled, _timm_norm, 2),
}


@pytest.mark.parametrize("gaussian", [True, False])
@pytest.mark.parametrize("layer", [-1, 0])
@pytest.mark.parametrize("name", list(AUTHORS_CASES))
def test_default_matches_authors_computation(name: str, layer: int, gaussian: bool) -> None:
    """The default (norm-output site, logit score, prefix kept) against the re-derived
    ``TorchViTReciproCAM``: the LayerNorm's output masked, the residual unmasked."""
    build, norm, prefix = AUTHORS_CASES[name]
    model = build()
    images = _images()
    target = [1, 5]
    cam = ViTReciproCAM(model)
    options = dict(target=target, layer=layer, gaussian=gaussian, perturbations_per_eval=5)
    raw = cam.attribute_grid(images, normalize=False, **options)
    ours = cam.attribute_grid(images, **options)
    for i in range(2):
        expected = vit_reciprocam(
            _logits(model), norm(model, layer), images[i], (4, 4), prefix, gaussian
        )[target[i]]
        torch.testing.assert_close(raw[i], expected, atol=1e-5, rtol=1e-5)
        low, high = expected.min(), expected.max()
        torch.testing.assert_close(ours[i], (expected - low) / (high - low), atol=1e-5, rtol=0)
    if gaussian:  # the default kernel is the authors' default
        torch.testing.assert_close(cam.attribute_grid(images, target=target, layer=layer), ours)
    assert not norm(model, layer)._forward_hooks


def _family_cases() -> dict:
    """Today's families whose blocks are pre-norm: (model, its attention LayerNorm of block
    ``i``, prefix tokens, image size)."""
    import importlib.util

    from .models import tiny_hf_clip_vision, tiny_hf_dinov2, tiny_open_clip, tiny_timm_eva

    cases = {
        "hf-clip-vision": (
            lambda: tiny_hf_clip_vision("tower"),
            lambda m, i: getattr(m, "vision_model", m).encoder.layers[i].layer_norm1,
            1,
            56,
        ),
        "hf-siglip-classifier": (
            lambda: tiny_hf_clip_vision(siglip=True),
            lambda m, i: getattr(m, "vision_model", m).encoder.layers[i].layer_norm1,
            0,
            56,
        ),
        "hf-dinov2-registers": (
            tiny_hf_dinov2,
            lambda m, i: m.dinov2_with_registers.encoder.layer[i].norm1,
            5,
            56,
        ),
        "timm-eva-no-rope": (lambda: tiny_timm_eva(rope=False), _timm_norm, 1, 28),
    }
    if importlib.util.find_spec("torchvision") is not None:
        from .models import tiny_torchvision_vit

        cases["torchvision-vit"] = (
            lambda: tiny_torchvision_vit(image_size=56),
            lambda m, i: m.encoder.layers[i].ln_1,
            1,
            56,
        )
    if importlib.util.find_spec("open_clip") is not None:
        cases["open-clip-visual"] = (
            lambda: tiny_open_clip().visual,
            lambda m, i: m.transformer.resblocks[i].ln_1,
            1,
            28,
        )
    return cases


FAMILY_CASES = _family_cases()


@pytest.mark.parametrize("layer", [-1, 0])
@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_default_matches_authors_computation_on_todays_families(name: str, layer: int) -> None:
    """The authors' masking site on the pre-norm blocks of CLIP/SigLIP, Dinov2 with registers,
    EVA, torchvision and OpenCLIP: each adapter names the LayerNorm before attention."""
    from captum_gradmask import get_adapter

    build, norm, prefix, size = FAMILY_CASES[name]
    model = build()
    adapter = get_adapter(model)
    assert adapter.tokens.attention_norms[layer] is norm(model, layer)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    grid = (size // 14, size // 14)
    target = [1, 2]
    raw = ViTReciproCAM(model).attribute_grid(
        images, target=target, layer=layer, normalize=False, perturbations_per_eval=3
    )
    for i in range(2):
        # the adapter's forward: the model's own call (interpolated positions, taps installed)
        expected = vit_reciprocam(adapter.logits, norm(model, layer), images[i], grid, prefix)
        torch.testing.assert_close(raw[i], expected[target[i]], atol=1e-5, rtol=1e-5)
    assert not norm(model, layer)._forward_hooks


def test_sites_and_scores_differ_as_documented() -> None:
    """The block-input site passes masked tokens through the LayerNorm (a zero token becomes
    its bias), so its maps differ from the authors'; the probability is the softmax of the
    logits the default scores."""
    model = tiny_timm_vit()
    images = _images(1)
    cam = ViTReciproCAM(model)
    default = cam.attribute_grid(images, target=2, normalize=False)
    block_input = cam.attribute_grid(images, target=2, normalize=False, site="block-input")
    assert (default - block_input).abs().max() > 1e-3
    probability = cam.attribute_grid(images, target=2, normalize=False, score="probability")
    assert probability.min() > 0 and probability.max() < 1
    assert (default - probability).abs().max() > 1e-3


def test_norm_output_site_needs_attention_norms() -> None:
    model = tiny_timm_vit()
    blocks = list(model.blocks)
    parts = dict(
        embed=lambda x: model._pos_embed(model.patch_embed(x)),
        blocks=blocks,
        head=lambda h: model.head(model.norm(h)[:, 0]),
    )
    adapter = ViTAdapter.from_modules(
        model,
        num_heads=3,
        patch_size=8,
        prefix_tokens=1,
        fused_qkv=[b.attn.qkv for b in blocks],
        **parts,
    )
    cam = ViTReciproCAM(model, adapter=adapter)
    with pytest.raises(ValueError, match=r"attention_norms.*site='block-input'"):
        cam.attribute_grid(_images(1))
    assert cam.attribute_grid(_images(1), site="block-input").shape == (1, 4, 4)
    # the same adapter naming the blocks' norm1: the built-in adapter's maps
    named = ViTAdapter.from_modules(
        model,
        num_heads=3,
        patch_size=8,
        prefix_tokens=1,
        fused_qkv=[b.attn.qkv for b in blocks],
        attention_norms=[b.norm1 for b in blocks],
        **parts,
    )
    torch.testing.assert_close(
        ViTReciproCAM(model, adapter=named).attribute_grid(_images(1), target=2),
        ViTReciproCAM(model).attribute_grid(_images(1), target=2),
    )
    # norms the blocks never call: refused instead of an unmasked map
    stray = [torch.nn.LayerNorm(24) for _ in blocks]
    adapter = ViTAdapter.from_modules(
        model,
        num_heads=3,
        patch_size=8,
        prefix_tokens=1,
        fused_qkv=[b.attn.qkv for b in blocks],
        attention_norms=stray,
        **parts,
    )
    with pytest.raises(RuntimeError, match="ran 0 times"):
        ViTReciproCAM(model, adapter=adapter).attribute_grid(_images(1))
    assert not stray[-1]._forward_hooks
    with pytest.raises(ValueError, match=r"`site`.*'block'"):
        cam.attribute_grid(_images(1), site="block")
    with pytest.raises(ValueError, match=r"`score`.*'softmax'"):
        cam.attribute_grid(_images(1), score="softmax")


@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("layer", [-1, 0])
@pytest.mark.parametrize("name", list(CASES))
def test_block_input_variant_matches_plain_loop(name: str, layer: int, gaussian: bool) -> None:
    build, parts, prefix = CASES[name]
    model = build()
    images = _images()
    target = [1, 5]
    cam = ViTReciproCAM(model)
    options = dict(
        target=target,
        layer=layer,
        gaussian=gaussian,
        site="block-input",
        score="probability",
        perturbations_per_eval=7,
    )
    raw = cam.attribute_grid(images, normalize=False, **options)
    ours = cam.attribute_grid(images, **options)
    for i in range(2):
        expected = plain_reciprocam(
            parts(model), images[i], target[i], prefix, layer, gaussian, normalize=False
        )
        torch.testing.assert_close(raw[i], expected, atol=1e-6, rtol=1e-5)
        # the paper's min-max normalisation of the same scores
        low, high = raw[i].min(), raw[i].max()
        torch.testing.assert_close(ours[i], (raw[i] - low) / (high - low))
    assert ours.amin(dim=(1, 2)).tolist() == [0.0, 0.0]
    assert ours.amax(dim=(1, 2)).tolist() == [1.0, 1.0]


def test_probability_scores_are_softmax_probabilities() -> None:
    model = tiny_timm_vit()
    images = _images(1)
    raw = ViTReciproCAM(model).attribute_grid(
        images,
        target=3,
        normalize=False,
        layer=1,
        gaussian=False,
        site="block-input",
        score="probability",
    )
    expected = plain_reciprocam(_timm_parts(model), images[0], 3, 1, 1, False, normalize=False)
    torch.testing.assert_close(raw[0], expected, atol=1e-6, rtol=0)
    assert raw.min() > 0 and raw.max() < 1


def test_spatial_weights_by_hand() -> None:
    one_hot = spatial_weights((2, 3))
    torch.testing.assert_close(one_hot, torch.eye(6))
    corner = spatial_weights((3, 3), gaussian=True)[0].reshape(3, 3)
    expected = torch.tensor([[1 / 4, 1 / 8, 0], [1 / 8, 1 / 16, 0], [0, 0, 0]])
    torch.testing.assert_close(corner, expected)


def test_targets_batches_and_layouts() -> None:
    model = tiny_hf_vit()
    images = _images(3)
    cam = ViTReciproCAM(model)
    predicted = model(images).logits.argmax(-1)
    default = cam.attribute_grid(images)
    torch.testing.assert_close(default, cam.attribute_grid(images, target=predicted))
    per_image = cam.attribute_grid(images, target=[0, 2, 4], perturbations_per_eval=100)
    single = torch.cat([cam.attribute_grid(images[i : i + 1], target=2 * i) for i in range(3)])
    torch.testing.assert_close(per_image, single, atol=1e-6, rtol=0)
    # raw probabilities: min-max normalisation would amplify float noise between the layouts
    legacy = ViTReciproCAM(LegacyViT(model)).attribute_grid(
        images, target=[0, 2, 4], normalize=False
    )
    current = cam.attribute_grid(images, target=[0, 2, 4], normalize=False)
    torch.testing.assert_close(current, legacy, atol=1e-6, rtol=1e-5)
    attr = cam.attribute((images,), target=[0, 2, 4])[0]
    expected = per_image.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    torch.testing.assert_close(attr, expected.expand_as(images))


def test_model_mode_restored_and_errors_named() -> None:
    model = tiny_timm_vit().train()
    cam = ViTReciproCAM(model)
    images = _images()
    cam.attribute_grid(images, target=0)
    assert model.training
    with pytest.raises(ValueError, match="layer"):
        cam.attribute_grid(images, layer=3)
    with pytest.raises(ValueError, match="additional_forward_args"):
        cam.attribute_grid(images, additional_forward_args=(1,))
    with pytest.raises(ValueError, match="perturbations_per_eval"):
        cam.attribute_grid(images, perturbations_per_eval=0)
    with pytest.raises(ValueError, match="out of range"):
        cam.attribute_grid(images, target=7)
    adapter = ViTAdapter.from_modules(
        model,
        num_heads=3,
        patch_size=8,
        prefix_tokens=1,
        fused_qkv=[b.attn.qkv for b in model.blocks],
    )
    with pytest.raises(ValueError, match="embed"):
        ViTReciproCAM(model, adapter=adapter)


@pytest.mark.slow
@needs_shared
def test_default_matches_authors_computation_on_real_vit_tiny() -> None:
    """The shared ImageNet ViT-Tiny on real images (no openvino-xai needed)."""
    from transformers import ViTForImageClassification

    from captum_gradmask.data import load_imagenet_sample, preprocess_image

    records = load_imagenet_sample(IMAGENET_SAMPLE, limit=2)
    images = torch.stack([preprocess_image(r.path) for r in records])
    targets = [r.label for r in records]
    model = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    raw = ViTReciproCAM(model).attribute_grid(images, target=targets, normalize=False)
    for i, target in enumerate(targets):
        expected = vit_reciprocam(
            _logits(model), _hf_norm(model, -1), images[i], (14, 14), 1, gaussian=True
        )[target]
        torch.testing.assert_close(raw[i], expected, atol=1e-5, rtol=1e-5)
