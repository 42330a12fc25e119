"""Zero-shot classifiers: a CLIP-like image-text model as a classifier over given prompts.

The question asked of a CLIP-like model is "why does it match this image to *this prompt*?".
:class:`ZeroShotClassifier` turns the model into an ``nn.Module`` whose logits are the model's
own image-text scores (``logits_per_image``: its logit scale, and its logit bias for SigLIP)
against a fixed set of text embeddings, one per label. Every attribution method, metric and
command takes it as a model: its adapter is the image tower's, with the scores as the head.

Supported: Hugging Face ``CLIPModel`` and ``SiglipModel``, and OpenCLIP ``CLIP`` models with a
ViT image tower (``pip install captum-gradmask[open-clip]``).

Example::

    >>> import torch
    >>> from transformers import CLIPConfig, CLIPModel
    >>> from captum_gradmask import GradMaskAttribution
    >>> from captum_gradmask.zero_shot import ZeroShotClassifier
    >>> vision = dict(image_size=28, patch_size=14, hidden_size=24, intermediate_size=48,
    ...     num_hidden_layers=2, num_attention_heads=3)
    >>> text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
    ...     num_attention_heads=3)
    >>> model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text,
    ...     projection_dim=16)).eval()
    >>> prompts = torch.randn(3, 16)  # e.g. get_text_features of "a dog", "a cat", "a car"
    >>> classifier = ZeroShotClassifier.from_text_embeddings(
    ...     model, prompts, labels=["a dog", "a cat", "a car"])
    >>> images = torch.randn(2, 3, 28, 28)
    >>> classifier(images).shape
    torch.Size([2, 3])
    >>> GradMaskAttribution(classifier).attribute_grid(images, target=1).shape
    torch.Size([2, 2, 2])
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .adapters import ViTAdapter, image_feature_adapter, register_adapter
from .rules import L2Normalize

__all__ = ["CLIP_IMAGENET_TEMPLATES", "ZeroShotClassifier"]

#: A few of the prompt templates of CLIP's ImageNet zero-shot recipe (Radford et al. 2021);
#: pass your own list (``"{}"`` stands for the label) for the full set of 80.
CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a rendering of a {}.",
    "a cropped photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "itap of a {}.",
    "art of the {}.",
)


def _family(model: nn.Module) -> str:
    """``"hf-clip"``, ``"hf-siglip"`` or ``"open-clip"``; a clear error for anything else."""
    if hasattr(model, "text_model") and hasattr(model, "vision_model"):
        if hasattr(model, "logit_bias"):
            return "hf-siglip"
        if hasattr(model, "visual_projection"):
            return "hf-clip"
    if hasattr(model, "encode_image") and hasattr(model, "encode_text"):
        return "open-clip"
    raise ValueError(
        f"`model` {type(model).__name__} is not a supported image-text model: expected a "
        "Hugging Face CLIPModel or SiglipModel, or an OpenCLIP CLIP model"
    )


class ZeroShotClassifier(nn.Module):
    r"""A CLIP-like model as a classifier over labels given as prompts or text embeddings.

    ``forward(images)`` returns ``(B, K)`` logits: the model's ``logits_per_image`` against
    the ``K`` label embeddings, ``scale * <image, text>`` (CLIP) or
    ``scale * <image, text> + bias`` (SigLIP) with both embeddings L2-normalised and ``scale``
    the model's ``exp(logit_scale)``. Attribution methods that use a softmax over classes
    (GradMask's confidences) then read a softmax over the given labels.

    Args:
        model: a Hugging Face ``CLIPModel`` / ``SiglipModel`` or an OpenCLIP ``CLIP`` model.
        labels: the class names, in logit order.
        processor: turns text into model inputs: a Hugging Face processor or tokenizer
            (``processor(text=[...], return_tensors="pt", padding=..., truncation=True)``) or
            an OpenCLIP
            tokenizer (``processor([...]) -> token ids``).
        templates: prompt templates with ``"{}"`` for the label; each label's embedding is the
            normalised mean of its normalised template embeddings (CLIP's ImageNet recipe,
            e.g. :data:`CLIP_IMAGENET_TEMPLATES`). ``None``: the labels are the prompts.

    Use :meth:`from_text_embeddings` when the text embeddings are already computed.

    Attributes:
        model: the wrapped image-text model.
        labels: the label of each logit.
        text_embeddings: ``(K, D)`` L2-normalised label embeddings (a buffer: moves with
            ``.to(device)``).

    Example::

        >>> import torch
        >>> from transformers import SiglipConfig, SiglipModel
        >>> from captum_gradmask.zero_shot import ZeroShotClassifier
        >>> vision = dict(image_size=28, patch_size=14, hidden_size=24, intermediate_size=48,
        ...     num_hidden_layers=2, num_attention_heads=3)
        >>> text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
        ...     num_attention_heads=3)
        >>> model = SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).eval()
        >>> classifier = ZeroShotClassifier.from_text_embeddings(model, torch.randn(4, 24))
        >>> classifier.labels
        ['0', '1', '2', '3']
        >>> classifier(torch.randn(1, 3, 28, 28)).shape
        torch.Size([1, 4])
    """

    text_embeddings: Tensor

    def __init__(
        self,
        model: nn.Module,
        labels: Sequence[str],
        processor: Any = None,
        *,
        templates: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.family = _family(model)
        labels = _check_labels(labels)
        if processor is None:
            raise ValueError(
                "`processor` is needed to embed the label prompts (a Hugging Face processor "
                "or tokenizer, or an OpenCLIP tokenizer); with precomputed text embeddings use "
                "ZeroShotClassifier.from_text_embeddings(model, embeddings, labels)"
            )
        if templates is not None:
            templates = list(templates)
            bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
            if not templates or bad:
                raise ValueError(
                    f"`templates` must be a non-empty list of strings with '{{}}' for the "
                    f"label; got {bad or templates!r}"
                )
        self.model = model
        self.normalize = L2Normalize()
        self.labels = labels
        with torch.no_grad():
            embeddings = _label_embeddings(model, self.family, processor, labels, templates)
        self.register_buffer("text_embeddings", embeddings, persistent=False)

    @classmethod
    def from_text_embeddings(
        cls,
        model: nn.Module,
        embeddings: Tensor,
        labels: Sequence[str] | None = None,
    ) -> ZeroShotClassifier:
        """A classifier over precomputed text embeddings ``(K, D)`` (normalised here).

        Args:
            model: as in the class.
            embeddings: one text embedding per label, in the model's joint space (e.g.
                ``get_text_features`` of the prompts).
            labels: ``K`` label names; ``None``: ``"0"``, ``"1"``, ...
        """
        classifier = cls.__new__(cls)
        nn.Module.__init__(classifier)
        classifier.family = _family(model)
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or not len(embeddings):
            shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else embeddings
            raise ValueError(f"`embeddings` must be a (labels, dim) tensor, got {shape!r}")
        if labels is None:
            labels = [str(i) for i in range(embeddings.shape[0])]
        labels = _check_labels(labels)
        if len(labels) != embeddings.shape[0]:
            raise ValueError(
                f"`labels` has {len(labels)} names for {embeddings.shape[0]} text embeddings"
            )
        classifier.model = model
        classifier.normalize = L2Normalize()
        classifier.labels = labels
        classifier.register_buffer(
            "text_embeddings", _normalised(embeddings.detach().float()), persistent=False
        )
        return classifier

    def image_features(self, images: Tensor, **kwargs: Any) -> Tensor:
        """The model's image embedding (before normalisation), ``(B, D)``."""
        model = self.model
        if self.family == "open-clip":
            return model.encode_image(images)
        pooled = model.vision_model(pixel_values=images, **kwargs).pooler_output
        return model.visual_projection(pooled) if self.family == "hf-clip" else pooled

    def scores(self, image_features: Tensor) -> Tensor:
        """``(B, K)`` logits of image embeddings: the model's scaled (and biased) cosines."""
        image = self.normalize(image_features)
        text = self.text_embeddings.to(image.dtype)
        logits = image @ text.T * self.model.logit_scale.exp()
        bias = getattr(self.model, "logit_bias", None)
        return logits if bias is None else logits + bias

    def forward(self, images: Tensor, **kwargs: Any) -> Tensor:
        """``(B, K)`` logits of ``images``, normalised as the model expects."""
        return self.scores(self.image_features(images, **kwargs))

    def extra_repr(self) -> str:
        return f"family={self.family!r}, labels={self.labels!r}"


def _check_labels(labels: Any) -> list[str]:
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
        raise ValueError(f"`labels` must be a non-empty list of strings, got {labels!r}")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError(f"`labels` must be non-empty strings, got {list(labels)!r}")
    return list(labels)


def _normalised(tensor: Tensor) -> Tensor:
    return tensor / tensor.norm(dim=-1, keepdim=True)


def _label_embeddings(
    model: nn.Module,
    family: str,
    processor: Any,
    labels: list[str],
    templates: list[str] | None,
) -> Tensor:
    """``(K, D)`` normalised label embeddings (template means renormalised)."""
    embed = _text_encoder(model, family, processor)
    if templates is None:
        return _normalised(embed(labels).float())
    rows = []
    for label in labels:
        each = _normalised(embed([t.format(label) for t in templates]).float())
        rows.append(_normalised(each.mean(dim=0)))
    return torch.stack(rows)


def _text_encoder(model: nn.Module, family: str, processor: Any) -> Callable[[list[str]], Tensor]:
    device = next(model.parameters()).device
    if family == "open-clip":
        return lambda prompts: model.encode_text(processor(prompts).to(device))
    # SigLIP was trained on prompts padded to the maximum length (its processor's advice)
    padding = "max_length" if family == "hf-siglip" else True

    def embed(prompts: list[str]) -> Tensor:
        inputs = processor(text=prompts, return_tensors="pt", padding=padding, truncation=True)
        inputs = {k: v.to(device) for k, v in inputs.items() if k != "pixel_values"}
        out = model.get_text_features(**inputs)
        return out if isinstance(out, Tensor) else out.pooler_output

    return embed


def _build_zero_shot(classifier: ZeroShotClassifier) -> ViTAdapter:
    """The image tower's adapter with the classifier as forward and its scores as head."""
    tower = image_feature_adapter(classifier.model)
    trained = None
    if classifier.family != "open-clip":  # other sizes through position interpolation
        size = classifier.model.vision_model.config.image_size
        trained = (size, size) if isinstance(size, int) else tuple(size)

    def forward(images: Tensor, *args: Any) -> Tensor:
        options = {}
        if trained is not None and tuple(images.shape[-2:]) != trained:
            options["interpolate_pos_encoding"] = True
        context = tower.attention_context
        with context() if context is not None else contextlib.nullcontext():
            return classifier(images, *args, **options)

    tokens = tower.tokens
    if tokens is not None:
        features = tokens.head
        tokens = dataclasses.replace(tokens, head=lambda t: classifier.scores(features(t)))
    model = classifier.model
    if classifier.family == "open-clip":
        image_tower = [model.visual]
    else:
        image_tower = [model.vision_model, getattr(model, "visual_projection", None)]
    return dataclasses.replace(
        tower,
        forward=forward,
        tokens=tokens,
        model=classifier,
        name=f"zero-shot-{tower.name}",
        forward_modules=[m for m in (*image_tower, classifier.normalize) if m is not None],
    )


register_adapter("zero-shot", lambda model: isinstance(model, ZeroShotClassifier), _build_zero_shot)
