"""An independent, plain, single-image TIS (Transformer Input Sampling, Englebert et al., ICCV
Workshops 2023), written from the authors' procedure (``aenglebert/Transformer_Input_Sampling``,
``tis/tis.py``, with the ``fast-pytorch-kmeans`` 0.1.6 k-means it calls).

Like the authors' code it works on the model itself with forward hooks: one hook per encoder
block records the activations, and one hook where the position embeddings have been added
(timm: ``pos_drop``, as the authors; Hugging Face: the ``embeddings`` module) replaces the
token sequence by the prefix tokens plus one subset of the patch tokens. One token set runs at
a time; k-means loops over its clusters. Uses none of ``captum_gradmask``.

Beyond the authors' code (both choices the library makes too, so that the two can be compared):
a k-means cluster left empty keeps its centroid (fast-pytorch-kmeans zeroes it), a patch that
no token set keeps scores 0 (the authors' division gives NaN), a constant map normalises to
zeros, and every prefix token is kept (the authors keep token 0, the CLS token, only).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The encoder blocks of a timm ViT or a Hugging Face ViT/DeiT (4.x or 5.x layout)."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    base = model.vit if hasattr(model, "vit") else model.deit
    return list(base.layers if hasattr(base, "layers") else base.encoder.layer)


def sampling_site(model: nn.Module) -> nn.Module:
    """The module whose output is the token sequence with position embeddings added."""
    if hasattr(model, "pos_drop"):
        return model.pos_drop
    base = model.vit if hasattr(model, "vit") else model.deit
    return base.embeddings


def logits_of(output) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


def block_activations(model: nn.Module, image: Tensor) -> tuple[Tensor, Tensor]:
    """Every block's output for one image ``(C, H, W)``, concatenated along the channels:
    ``(T, L * D)``; and the logits ``(classes,)``."""
    outputs = []

    def record(_module, _inputs, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [block.register_forward_hook(record) for block in encoder_blocks(model)]
    try:
        with torch.no_grad():
            logits = logits_of(model(image[None]))[0]
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(outputs, dim=-1)[0], logits


def kmeans(points: Tensor, start: Tensor, max_iter: int = 100, tol: float = 1e-4) -> Tensor:
    """Lloyd's k-means of ``points`` ``(n, dims)`` from the points ``start``: centroids."""
    centroids = points[start].clone()
    for _ in range(max_iter):
        # fast-pytorch-kmeans' Euclidean similarity: larger is closer
        similarity = (
            2 * points @ centroids.T
            - (points**2).sum(dim=1)[:, None]
            - (centroids**2).sum(dim=1)[None, :]
        )
        closest = similarity.argmax(dim=1)
        means = centroids.clone()
        for cluster in range(len(centroids)):
            members = points[closest == cluster]
            if len(members):
                means[cluster] = members.sum(dim=0) / len(members)
        moved = ((means - centroids) ** 2).sum()
        centroids = means
        if moved <= tol:
            break
    return centroids


def token_subsets(
    activations: Tensor,
    n_masks: int,
    tokens_ratio: float,
    start: Tensor,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> list[Tensor]:
    """The kept patches of each token set, from the patch tokens' activations ``(N, C)``.

    The points are the ``C`` channels (each a vector over the ``N`` tokens); ``start`` indexes
    the channels that are the initial centroids. Set ``i`` keeps the ``floor(ratio * N)``
    tokens where centroid ``i`` is largest.
    """
    centroids = kmeans(activations.T, start, max_iter, tol)
    kept = int(tokens_ratio * activations.shape[0])
    return [centroid.topk(kept).indices for centroid in centroids]


def tis_saliency(
    model: nn.Module,
    image: Tensor,
    target: int,
    subsets: list[Tensor],
    prefix_tokens: int,
    normalise: bool = True,
) -> Tensor:
    """The saliency of each patch ``(N,)`` from the token sets ``subsets`` (patch indices)."""
    current = {}

    def sample(_module, _inputs, output):
        patches = output[:, prefix_tokens:][:, current["subset"]]
        return torch.cat([output[:, :prefix_tokens], patches], dim=1)

    scores = []
    handle = sampling_site(model).register_forward_hook(sample)
    try:
        with torch.no_grad():
            for subset in subsets:
                current["subset"] = subset
                logits = logits_of(model(image[None]))[0]
                scores.append(torch.softmax(logits.double(), dim=0)[target])
    finally:
        handle.remove()

    patches = model_patch_count(model, image)
    total = torch.zeros(patches, dtype=torch.float64)
    coverage = torch.zeros(patches, dtype=torch.float64)
    for score, subset in zip(scores, subsets, strict=True):
        mask = torch.zeros(patches, dtype=torch.float64)
        mask[subset] = 1
        total += score * mask
        coverage += mask
    saliency = torch.zeros(patches, dtype=torch.float64)
    covered = coverage > 0
    saliency[covered] = total[covered] / coverage[covered]
    if normalise:
        saliency = saliency - saliency.min()
        if saliency.max() > 0:
            saliency = saliency / saliency.max()
    return saliency


def model_patch_count(model: nn.Module, image: Tensor) -> int:
    """Patches of ``image`` for the model's patch size."""
    if hasattr(model, "patch_embed"):
        patch = model.patch_embed.patch_size
    else:
        patch = model.config.patch_size
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return (image.shape[-2] // patch[0]) * (image.shape[-1] // patch[1])
