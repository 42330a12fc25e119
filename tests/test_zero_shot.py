"""Zero-shot classifiers: the model's own image-text scores, prompts and templates, and every
kind of method on them (prompts as token ids or text embeddings: no tokenizer files here)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from captum_gradmask import GradMaskAttribution, get_adapter
from captum_gradmask.methods import AttentionRollout, CheferGAE
from captum_gradmask.methods.captum_baselines import integrated_gradients
from captum_gradmask.zero_shot import ZeroShotClassifier
from references.gradmask import reference_gradmask

from .models import tiny_clip_model, tiny_open_clip

needs_open_clip = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None,
    reason="open_clip_torch is not installed (pip install captum-gradmask[open-clip])",
)
LABELS = ["a dog", "a cat", "a car"]


class TokenIds:
    """A stand-in for a Hugging Face processor: each prompt's characters as token ids."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(
        self, text: list[str], return_tensors: str, padding: object, truncation: bool = False
    ) -> dict:
        assert return_tensors == "pt"
        self.calls.append(list(text))
        ids = torch.ones(len(text), 12, dtype=torch.long)  # 1 pads
        for row, prompt in enumerate(text):
            codes = [3 + ord(c) % 45 for c in prompt][:8]  # short prompts: padding
            ids[row, 0] = 0
            ids[row, 1 : 1 + len(codes)] = torch.tensor(codes)
            ids[row, 1 + len(codes)] = 2  # end of text
        return {"input_ids": ids, "attention_mask": (ids != 1).long()}


def _text_features(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model.get_text_features(**inputs)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _images(n: int = 2, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=[False, True], ids=["clip", "siglip"])
def hf_model(request: pytest.FixtureRequest) -> nn.Module:
    return tiny_clip_model(siglip=request.param)


def test_logits_are_the_models_logits_per_image(hf_model: nn.Module) -> None:
    inputs = TokenIds()(LABELS, "pt", True)
    with torch.no_grad():
        classifier = ZeroShotClassifier.from_text_embeddings(
            hf_model, _text_features(hf_model, inputs), LABELS
        )
        images = _images()
        expected = hf_model(**inputs, pixel_values=images).logits_per_image
        torch.testing.assert_close(classifier(images), expected, atol=1e-5, rtol=1e-5)
    assert classifier.labels == LABELS
    assert get_adapter(classifier).prefix_tokens == (0 if hasattr(hf_model, "logit_bias") else 1)


def test_prompts_with_templates_average_normalised_embeddings(hf_model: nn.Module) -> None:
    processor = TokenIds()
    templates = ["a photo of {}.", "art of {}."]
    classifier = ZeroShotClassifier(hf_model, LABELS, processor, templates=templates)
    assert processor.calls == [[t.format(label) for t in templates] for label in LABELS]
    with torch.no_grad():
        rows = []
        for label in LABELS:
            inputs = TokenIds()([t.format(label) for t in templates], "pt", True)
            each = _text_features(hf_model, inputs)
            each = each / each.norm(dim=-1, keepdim=True)
            mean = each.mean(0)
            rows.append(mean / mean.norm())
    torch.testing.assert_close(classifier.text_embeddings, torch.stack(rows))
    plain = ZeroShotClassifier(hf_model, LABELS, TokenIds())
    inputs = TokenIds()(LABELS, "pt", True)
    with torch.no_grad():
        direct = ZeroShotClassifier.from_text_embeddings(hf_model, _text_features(hf_model, inputs))
    torch.testing.assert_close(plain.text_embeddings, direct.text_embeddings)


def test_gradmask_matches_reference_and_methods_run(hf_model: nn.Module) -> None:
    classifier = ZeroShotClassifier.from_text_embeddings(
        hf_model,
        torch.randn(
            3, hf_model.config.projection_dim if hasattr(hf_model, "visual_projection") else 24
        ),
    )
    prefix = 0 if hasattr(hf_model, "logit_bias") else 1
    images = _images()
    ours = GradMaskAttribution(classifier).attribute_grid(images, layers="all")
    for i in range(2):
        ref = reference_gradmask(
            classifier,
            images[i],
            "hf-clip",
            4,
            prefix=prefix,
            patch=14,
            layers="all",
            tower=hf_model,
        )
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-6)
    fast = GradMaskAttribution(classifier).attribute_grid(images, mode="fast")
    assert fast.shape == (2, 2, 2) and torch.isfinite(fast).all()
    _, logits = get_adapter(classifier).tokens.states(images)
    torch.testing.assert_close(logits, classifier(images), atol=1e-5, rtol=1e-5)
    if prefix:
        assert CheferGAE(classifier).attribute_grid(images, target=2).shape == (2, 2, 2)
        assert AttentionRollout(classifier).attribute_grid(images).shape == (2, 2, 2)
    ig = integrated_gradients(classifier).attribute(images, target=[0, 2])
    assert ig.shape == images.shape and torch.isfinite(ig).all()


def test_other_image_sizes_interpolate_positions() -> None:
    model = tiny_clip_model()
    classifier = ZeroShotClassifier.from_text_embeddings(model, torch.randn(3, 8))
    images = torch.randn(1, 3, 28, 42)
    grid = GradMaskAttribution(classifier).attribute_grid(images, target=0)
    assert grid.shape == (1, 2, 3)


@needs_open_clip
def test_open_clip_with_its_packaged_tokenizer() -> None:
    import open_clip

    model = tiny_open_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    templates = ["a photo of a {}.", "a drawing of a {}."]
    classifier = ZeroShotClassifier(model, LABELS, tokenizer, templates=templates)
    images = _images()
    with torch.no_grad():
        text = model.encode_text(tokenizer([templates[0].format(label) for label in LABELS]))
        single = ZeroShotClassifier.from_text_embeddings(model, text)
        image = model.encode_image(images)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        expected = model.logit_scale.exp() * image @ text.T
        torch.testing.assert_close(single(images), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(classifier.text_embeddings, single.text_embeddings)
    ours = GradMaskAttribution(classifier).attribute_grid(images, layers="all")
    for i in range(2):
        ref = reference_gradmask(
            classifier, images[i], "open-clip", 4, prefix=1, patch=14, layers="all", tower=model
        )
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=1e-6)
    assert CheferGAE(classifier).attribute_grid(images, target=1).shape == (2, 2, 2)
    assert GradMaskAttribution(classifier).attribute_grid(images, mode="fast").shape == (2, 2, 2)
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == []


def test_bad_arguments_are_refused_clearly() -> None:
    model = tiny_clip_model()
    with pytest.raises(ValueError, match="`processor` is needed"):
        ZeroShotClassifier(model, LABELS)
    with pytest.raises(ValueError, match="`labels` must be a non-empty list"):
        ZeroShotClassifier(model, "a dog", TokenIds())
    with pytest.raises(ValueError, match="`templates`"):
        ZeroShotClassifier(model, LABELS, TokenIds(), templates=["a photo"])
    with pytest.raises(ValueError, match="3 text embeddings"):
        ZeroShotClassifier.from_text_embeddings(model, torch.randn(3, 8), labels=["a", "b"])
    with pytest.raises(ValueError, match=r"\(labels, dim\)"):
        ZeroShotClassifier.from_text_embeddings(model, torch.randn(8))
    with pytest.raises(ValueError, match="not a supported image-text model"):
        ZeroShotClassifier.from_text_embeddings(nn.Linear(2, 2), torch.randn(3, 8))


def test_metrics_take_the_classifier_as_a_model() -> None:
    from captum_gradmask.metrics import rise_deletion

    model = tiny_clip_model()
    classifier = ZeroShotClassifier.from_text_embeddings(model, torch.randn(3, 8))
    images = _images()
    maps = GradMaskAttribution(classifier).attribute_grid(images, target=2)
    saliency = maps.repeat_interleave(14, 1).repeat_interleave(14, 2)
    curve = rise_deletion(classifier, images, saliency, target=2)
    probabilities = torch.softmax(classifier(images), dim=-1)[:, 2]
    torch.testing.assert_close(curve.probabilities[:, 0], probabilities, atol=1e-5, rtol=1e-5)
