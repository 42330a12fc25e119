"""TIS against a plain re-derivation of the authors' procedure (``references/tis.py``) on the
same token sets, its k-means against the reference's from the same start, and the definition's
properties on models whose answer is known."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from captum_gradmask.adapters import ViTAdapter
from captum_gradmask.methods import TransformerInputSampling
from references import tis as reference

from .conftest import HF_VIT_TINY, needs_shared
from .models import tiny_hf_deit, tiny_hf_vit, tiny_timm_distilled, tiny_timm_vit
from .test_errors_leave_model_alone import assert_same_state, model_state
from .test_gradmask import load_real_images

MODELS = {
    "hf-vit": tiny_hf_vit,
    "hf-deit-teacher": lambda: tiny_hf_deit(teacher=True),
    "timm-vit": tiny_timm_vit,
    "timm-distilled": tiny_timm_distilled,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: on a shared 2-core machine, intra-op threads only contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 2, seed: int = 1, size: int = 32) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_on_the_same_token_sets(name: str, normalize: bool) -> None:
    model = MODELS[name]()
    tis = TransformerInputSampling(model)
    images, targets = _images(), [2, 5]
    options = dict(n_masks=12, tokens_ratio=0.4, seed=3)
    ours = tis.attribute_grid(
        images, target=targets, normalize=normalize, perturbations_per_eval=5, **options
    )
    subsets = tis.token_subsets(images, **options)
    assert subsets.shape == (2, 12, 6)  # floor(0.4 * 16) patches per set
    for i, target in enumerate(targets):
        expected = reference.tis_saliency(
            model, images[i], target, list(subsets[i]), tis.adapter.prefix_tokens, normalize
        )
        # scores agree to float32 precision (1e-6); normalising divides by the map's span
        raw = reference.tis_saliency(
            model, images[i], target, list(subsets[i]), tis.adapter.prefix_tokens, False
        )
        atol = 1e-6 / float(raw.max() - raw.min()) if normalize else 1e-6
        torch.testing.assert_close(ours[i].flatten().double(), expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name", ["hf-vit", "timm-distilled"])
def test_token_sets_are_the_authors_kmeans_from_the_same_start(name: str) -> None:
    # float64 so that no near-tie of distances can flip an assignment between the two
    model = MODELS[name]().double()
    images = _images(2).double()
    tis = TransformerInputSampling(model)
    prefix, n_masks, seed = tis.adapter.prefix_tokens, 20, 7
    ours = tis.token_subsets(images, n_masks=n_masks, tokens_ratio=0.5, seed=seed)
    for i, image in enumerate(images):
        activations = reference.block_activations(model, image)[0][prefix:]
        channels = activations.shape[1]  # 3 blocks x 24
        # the library's documented start: distinct channels from a CPU generator seeded `seed`
        start = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))[:n_masks]
        expected = reference.token_subsets(activations, n_masks, 0.5, start)
        assert torch.equal(ours[i], torch.stack(expected))


def test_one_seed_gives_one_map_whatever_the_batching() -> None:
    tis = TransformerInputSampling(tiny_hf_vit())
    images = _images(3)
    options = dict(target=[0, 1, 2], n_masks=16, seed=5)
    whole = tis.attribute_grid(images, **options)
    torch.testing.assert_close(
        tis.attribute_grid(images, internal_batch_size=1, perturbations_per_eval=3, **options),
        whole,
    )
    torch.testing.assert_close(tis.attribute_grid(images[1:2], **{**options, "target": 1}),
                               whole[1:2])  # fmt: skip
    assert not torch.equal(
        tis.token_subsets(images, n_masks=16, seed=5), tis.token_subsets(images, n_masks=16, seed=6)
    )


def test_keeping_every_token_scores_the_full_image_everywhere() -> None:
    # tokens_ratio = 1: each set is the whole sequence, so every patch's mean score is P_t(I)
    model = tiny_timm_vit()
    images = _images()
    saliency = TransformerInputSampling(model).attribute_grid(
        images, target=[3, 4], n_masks=8, tokens_ratio=1.0, normalize=False
    )
    probs = torch.softmax(model(images), dim=-1)[[0, 1], [3, 4]]
    torch.testing.assert_close(saliency, probs[:, None, None].expand(-1, 4, 4))
    normalised = TransformerInputSampling(model).attribute_grid(
        images, target=[3, 4], n_masks=8, tokens_ratio=1.0
    )
    assert torch.equal(normalised, torch.zeros_like(normalised))  # a constant map


class _PatchModel(nn.Module):
    """A toy ViT on 16x16 images, 4x4 patches (a 4x4 grid): a patch token is a linear map of its
    pixels (``weight``), plus with ``marker`` a last channel that is 1 on that patch only; two
    element-wise increasing blocks; the head, given by the test, reads the tokens present."""

    def __init__(self, head, weight: Tensor, marker: int | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.head, self.marker = head, marker

    def embed(self, images: Tensor) -> Tensor:
        patches = nn.functional.unfold(images, 4, stride=4).transpose(1, 2)  # (B, 16, 48)
        tokens = patches @ self.weight
        if self.marker is not None:
            marked = torch.zeros_like(tokens[:, :, :1])
            marked[:, self.marker] = 1.0
            tokens = torch.cat([tokens, marked], dim=-1)
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)  # a CLS of zeros

    @staticmethod
    def block(tokens: Tensor) -> Tensor:
        return tokens + 0.1 * torch.tanh(tokens)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.block(self.block(self.embed(images))))

    def adapter(self) -> ViTAdapter:
        fake_qkv = [nn.Linear(24, 72), nn.Linear(24, 72)]  # only the token interface is used
        return ViTAdapter.from_modules(
            self, num_heads=1, patch_size=4, prefix_tokens=1, fused_qkv=fake_qkv, model=self,
            embed=self.embed, blocks=[self.block, self.block], head=self.head,
        )  # fmt: skip


def test_the_patch_that_drives_the_output_ranks_first() -> None:
    driver = 9

    def head(tokens: Tensor) -> Tensor:
        # evidence: the marker channel summed over the tokens present (1.15 if patch 9 is)
        evidence = 4 * tokens[:, :, -1].sum(dim=1)
        return torch.stack([evidence, torch.zeros_like(evidence)], dim=1)

    weight = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    model = _PatchModel(head, weight, marker=driver)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tis = TransformerInputSampling(model, model.adapter())
    saliency = tis.attribute_grid(images, target=0, n_masks=24, normalize=False).flatten(1)
    # every set that keeps patch 9 scores sigmoid(4.6) = 0.99; every other set 1/2
    assert (saliency.argmax(dim=1) == driver).all()
    assert (saliency[:, driver] > 0.98).all()
    others = torch.cat([saliency[:, :driver], saliency[:, driver + 1 :]], dim=1)
    assert (others < saliency[:, driver : driver + 1] - 0.05).all()


def test_a_patch_that_no_set_keeps_gets_no_credit() -> None:
    # Positive pixel weights and a patch of very negative pixels: that patch is the smallest
    # token in every feature channel, so no centroid of those channels puts it in its top half.
    def head(tokens: Tensor) -> Tensor:
        pooled = tokens[:, 1:].mean(dim=1)
        return torch.stack([pooled[:, :8].sum(dim=1) / 50, torch.zeros(len(tokens))], dim=1)

    weight = torch.rand(48, 8, generator=torch.Generator().manual_seed(0))
    model = _PatchModel(head, weight)
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    images[:, :, 4:8, 8:12] = -100.0  # patch 6 (row 1, column 2)
    tis = TransformerInputSampling(model, model.adapter())
    subsets = tis.token_subsets(images, n_masks=8, tokens_ratio=0.5)
    assert not (subsets == 6).any()
    saliency = tis.attribute_grid(images, target=0, n_masks=8, normalize=False).flatten(1)
    kept = torch.zeros(16, dtype=torch.bool)
    kept[subsets.flatten()] = True
    assert saliency[0, 6] == 0
    # the same holds for every patch: no credit exactly where no set keeps it
    assert torch.equal(saliency[0] > 0, kept)


def test_model_is_left_as_it_was() -> None:
    model = tiny_hf_vit().train()
    model.vit.embeddings.requires_grad_(False)
    before = model_state(model)
    TransformerInputSampling(model).attribute(_images(), target=1, n_masks=8)
    assert_same_state(model, before)


def test_arguments_are_checked_with_their_names() -> None:
    tis = TransformerInputSampling(tiny_hf_vit())  # 3 blocks x 24 channels, a 4x4 grid
    images = _images(1)
    cases = {
        "`n_masks`": dict(n_masks=0),
        r"`n_masks`=73 exceeds the 72 activation channels": dict(n_masks=73),
        r"`tokens_ratio` must be a number in \(0, 1\], got 0": dict(tokens_ratio=0),
        r"got 1\.5": dict(tokens_ratio=1.5),
        "got True": dict(tokens_ratio=True),
        r"`tokens_ratio`=0\.05 keeps no patch of the 16-patch grid": dict(tokens_ratio=0.05),
        "`kmeans_max_iter`": dict(kmeans_max_iter=0),
        "`kmeans_tol` must be a number >= 0": dict(kmeans_tol=-1.0),
        "`seed` must be an int or None": dict(seed="0"),
        "`perturbations_per_eval`": dict(perturbations_per_eval=0),
        "`additional_forward_args` must be None": dict(additional_forward_args=images),
    }
    for message, options in cases.items():
        with pytest.raises(ValueError, match=message):
            tis.attribute_grid(images, target=0, n_masks=options.pop("n_masks", 8), **options)
    with pytest.raises(ValueError, match="does not fit the model's 8x8 patch grid"):
        tis.attribute_grid(_images(1, size=36), target=0, n_masks=8)


def test_a_model_without_token_interface_is_refused_by_name() -> None:
    class Opaque(nn.Module):
        def forward(self, images: Tensor) -> Tensor:
            return images.flatten(1)[:, :3]

    model = Opaque()
    adapter = ViTAdapter.from_modules(
        model, num_heads=2, patch_size=4, prefix_tokens=1, fused_qkv=[nn.Linear(8, 24)]
    )
    with pytest.raises(ValueError, match=r"TIS \(Transformer Input Sampling\) on Opaque needs"):
        TransformerInputSampling(model, adapter)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model = tiny_timm_vit()
    images = _images()
    options = dict(target=[1, 2], n_masks=16, seed=2)
    cpu = TransformerInputSampling(model).attribute_grid(images, **options)
    subsets = TransformerInputSampling(model).token_subsets(images, n_masks=16, seed=2)
    gpu_model = tiny_timm_vit().cuda()
    gpu = TransformerInputSampling(gpu_model)
    assert torch.equal(gpu.token_subsets(images.cuda(), n_masks=16, seed=2).cpu(), subsets)
    torch.testing.assert_close(gpu.attribute_grid(images.cuda(), **options).cpu(), cpu,
                               atol=1e-5, rtol=1e-4)  # fmt: skip


@needs_shared
@pytest.mark.slow
def test_matches_reference_on_real_vit_tiny() -> None:
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(HF_VIT_TINY).eval()
    image = load_real_images(files=(1,))
    tis = TransformerInputSampling(model)
    # the map from 64 sets (the reference runs them one by one), k-means with the authors' 1024
    ours = tis.attribute_grid(image, target=65, n_masks=64, normalize=False)  # file 1: label 65
    subsets = tis.token_subsets(image, n_masks=64)
    assert subsets.shape == (1, 64, 98)
    expected = reference.tis_saliency(model, image[0], 65, list(subsets[0]), 1, False)
    torch.testing.assert_close(ours[0].flatten().double(), expected, atol=1e-6, rtol=1e-5)
    # k-means from the same start, in float64 so that no near-tie flips an assignment
    double = model.double()
    activations = reference.block_activations(double, image[0].double())[0][1:]
    start = torch.randperm(2304, generator=torch.Generator().manual_seed(0))[:1024]
    expected_sets = torch.stack(reference.token_subsets(activations, 1024, 0.5, start))
    assert torch.equal(tis.token_subsets(image.double()), expected_sets[None])
