"""All evaluators on the shared ViT-Tiny with real images and Captum's Saliency (slow)."""

from __future__ import annotations

import pytest
import torch
from captum.attr import Saliency

from captum_gradmask.data import load_imagenet_sample, preprocess_image
from captum_gradmask.metrics import adcc, deletion, insertion, pointing_game

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared


@pytest.mark.slow
@needs_shared
def test_metrics_on_vit_tiny_with_saliency() -> None:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    # Images 4 and 9 of the sample: one clear object each, both classified correctly.
    records = [load_imagenet_sample(IMAGENET_SAMPLE, limit=9)[i] for i in (3, 8)]
    images = torch.stack([preprocess_image(r.path) for r in records])
    labels = [r.label for r in records]

    saliency = Saliency(lambda x: model(pixel_values=x).logits)
    maps = saliency.attribute(images, target=labels).sum(1)  # (B, 224, 224)

    # The map and its inverse in one call (4 curves batched together), 16x16 patches.
    patch_kwargs = dict(level="patch", patch_size=16, n_steps=4, perturbations_per_eval=24)
    both = insertion(
        model, images.repeat(2, 1, 1, 1), torch.cat([maps, -maps]), labels * 2, **patch_kwargs
    )
    dele = deletion(model, images, maps, labels, **patch_kwargs)
    for curve in (both, dele):
        assert curve.probabilities.shape[1] == 5
        assert bool(((curve.probabilities >= 0) & (curve.probabilities <= 1)).all())
        assert bool(((curve.auc >= 0) & (curve.auc <= 1)).all())
    ins_auc, inverted_auc = both.auc[:2], both.auc[2:]
    assert bool((ins_auc > inverted_auc).all())
    assert bool((dele.auc < ins_auc).all())
    # Fully inserted = nothing deleted = the untouched image.
    torch.testing.assert_close(both.probabilities[:2, -1], dele.probabilities[:, 0])

    game = pointing_game(
        maps,
        [r.boxes for r in records],
        labels,
        original_sizes=[r.original_size for r in records],
        input_size=(224, 224),
        tolerance=15,
    )
    assert game.hits.shape == (2,) and 0.0 <= game.mean_class_hit_rate <= 1.0

    # ADCC on the first image only: it recomputes the map, the costliest step here.
    result = adcc(
        model,
        images[:1],
        maps[:1],
        labels[:1],
        explanation_func=lambda x, t: saliency.attribute(x, target=t),
    )
    summary = result.summary()
    for key in ("average_drop", "increase_in_confidence", "coherence", "complexity", "adcc"):
        assert 0.0 <= summary[key] <= 100.0, key
    assert float(result.coherence.min()) > 0.5  # Saliency on x*s still resembles the map
