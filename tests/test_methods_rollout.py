"""Attention rollout against Abnar & Zuidema's definition, computed plainly from the eager
attention a model returns (``output_attentions=True``)."""

from __future__ import annotations

import pytest
import torch

from captum_gradmask.methods import AttentionRollout

from .models import tiny_hf_deit, tiny_hf_vit, tiny_timm_vit
from .test_methods_attention import hf_eager_attention, timm_eager_attention


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: on a shared 2-core machine, intra-op threads only contend (100x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def plain_rollout(
    attentions: list[torch.Tensor],
    image: int,
    fusion: str = "mean",
    discard_ratio: float = 0.0,
    rows: tuple[int, ...] = (0,),
    prefix: int = 1,
) -> torch.Tensor:
    """Rollout of one image, head by head and layer by layer."""
    tokens = attentions[0].shape[-1]
    identity = torch.eye(tokens)
    joint = identity
    for layer in attentions:
        heads = [layer[image, h] for h in range(layer.shape[1])]
        fused = heads[0].clone()
        for head in heads[1:]:
            if fusion == "mean":
                fused = fused + head
            elif fusion == "max":
                fused = torch.maximum(fused, head)
            else:
                fused = torch.minimum(fused, head)
        if fusion == "mean":
            fused = fused / len(heads)
        if discard_ratio:
            flat = fused.flatten().tolist()
            ranked = sorted(range(len(flat)), key=lambda i: (flat[i], i))
            for i in ranked[: int(discard_ratio * len(flat))]:
                flat[i] = 0.0
            fused = torch.tensor(flat).reshape(tokens, tokens)
        if fusion == "mean" and not discard_ratio:
            augmented = 0.5 * fused + 0.5 * identity  # the paper's form
        else:
            augmented = fused + identity
            augmented = augmented / augmented.sum(dim=1, keepdim=True)
        joint = augmented @ joint
    row = torch.stack([joint[r] for r in rows]).mean(0)
    return row[prefix:].reshape(4, 4)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize(
    "build, eager_attention",
    [(tiny_hf_vit, hf_eager_attention), (tiny_timm_vit, timm_eager_attention)],
    ids=["hf-vit", "timm-vit"],
)
def test_matches_plain_rollout(build, eager_attention, fusion: str) -> None:
    model = build()
    images = _images()
    attentions, _ = eager_attention(model, images, [0, 0])
    ours = AttentionRollout(model).attribute_grid(images, head_fusion=fusion)
    for i in range(2):
        torch.testing.assert_close(ours[i], plain_rollout(attentions, i, fusion), atol=1e-6, rtol=0)


def test_discard_ratio_matches_plain_rollout() -> None:
    model = tiny_hf_vit()
    images = _images()
    attentions, _ = hf_eager_attention(model, images, [0, 0])
    ours = AttentionRollout(model).attribute_grid(images, discard_ratio=0.9, head_fusion="max")
    for i in range(2):
        expected = plain_rollout(attentions, i, "max", discard_ratio=0.9)
        torch.testing.assert_close(ours[i], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(ours, AttentionRollout(model).attribute_grid(images))


def test_two_prefix_tokens_cls_row_and_prefix_mean() -> None:
    model = tiny_hf_deit(teacher=True)
    images = _images()
    attentions, _ = hf_eager_attention(model, images, [0, 0])
    rollout = AttentionRollout(model)
    cls_map = rollout.attribute_grid(images)
    both = rollout.attribute_grid(images, row="prefix_mean")
    for i in range(2):
        torch.testing.assert_close(
            cls_map[i], plain_rollout(attentions, i, prefix=2), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            both[i], plain_rollout(attentions, i, rows=(0, 1), prefix=2), atol=1e-6, rtol=0
        )


def test_target_independent_shapes_batches_and_tuple_form() -> None:
    model = tiny_timm_vit()
    images = _images(3)
    rollout = AttentionRollout(model)
    grid = rollout.attribute_grid(images)
    torch.testing.assert_close(grid, rollout.attribute_grid(images, target=[4, 1, 2]))
    torch.testing.assert_close(grid, rollout.attribute_grid(images, internal_batch_size=2))
    single = torch.cat([rollout.attribute_grid(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(grid, single, atol=1e-6, rtol=0)
    attr = rollout.attribute(images)
    expected = grid.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(images)
    torch.testing.assert_close(attr, expected)
    (as_tuple,) = rollout.attribute((images,))
    torch.testing.assert_close(as_tuple, attr)
    # rows of the rollout are probability distributions: patch weights in [0, 1] summing below 1
    assert grid.min() >= 0 and (grid.flatten(1).sum(1) < 1).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"head_fusion": "median"}, "head_fusion"),
        ({"discard_ratio": 1.0}, "discard_ratio"),
        ({"discard_ratio": -0.1}, "discard_ratio"),
        ({"row": "dist"}, "row"),
        ({"internal_batch_size": 0}, "internal_batch_size"),
        ({"target": [1, 2, 3]}, "target"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AttentionRollout(tiny_hf_vit()).attribute_grid(_images(), **kwargs)


def test_image_size_must_fit_the_patch_grid() -> None:
    with pytest.raises(ValueError, match="patch"):
        AttentionRollout(tiny_hf_vit()).attribute(torch.randn(1, 3, 30, 32))
