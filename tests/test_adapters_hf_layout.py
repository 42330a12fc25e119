"""The Hugging Face adapter finds the layout of the installed transformers, 4.x or 5.x.

CI runs this file and the GradMask tests twice: with the project's transformers (5.x) and
with transformers 4.x in a second environment (``.ci/run``), so both layouts are exercised on
models that transformers itself builds, not only on the ``LegacyViT`` re-creation of 4.x.
"""

from __future__ import annotations

import pytest
import torch

from captum_gradmask import GradMaskAttribution, get_adapter

from .models import TRANSFORMERS_MAJOR, hf_layers, tiny_hf_deit, tiny_hf_vit


def test_adapter_uses_the_installed_transformers_layout() -> None:
    for model in (tiny_hf_vit(), tiny_hf_deit(teacher=True)):
        adapter = get_adapter(model)
        layers = hf_layers(model)
        assert len(adapter.layers) == len(layers)
        for found, layer in zip(adapter.layers, layers, strict=True):
            if TRANSFORMERS_MAJOR >= 5:  # attention.{q,k,v,o}_proj; layers take a mask
                expected = (layer.attention.q_proj, layer.attention.k_proj, layer.attention.v_proj)
                output = layer.attention.o_proj
            else:  # attention.attention.{query,key,value}, attention.output.dense
                inner = layer.attention.attention
                expected = (inner.query, inner.key, inner.value)
                output = layer.attention.output.dense
            assert (found.query.module, found.key.module, found.value.module) == expected
            assert found.output is output
        # 5.x layers take an attention mask, so fast mode can pad; 4.x layers take none
        assert adapter.supports_padding == (TRANSFORMERS_MAJOR >= 5)


def test_fast_mode_runs_on_the_installed_layout() -> None:
    model = tiny_hf_vit()
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gradmask = GradMaskAttribution(model)
    exact = gradmask.attribute_grid(images, target=2)
    fast = gradmask.attribute_grid(images, target=2, mode="fast")
    assert fast.shape == exact.shape == (1, 4, 4)
    assert torch.isfinite(fast).all() and fast.sum() > 0
    if TRANSFORMERS_MAJOR < 5:  # no attention mask in the 4.x layers: padding is refused
        with pytest.raises(ValueError, match=r"`fast_batching`='pad' needs an adapter"):
            gradmask.attribute_grid(images, target=2, mode="fast", fast_batching="pad")
