"""Load an image classifier and the preprocessing it expects, from Hugging Face or timm.

One spelling for every source (the benchmark runner and the CLI use it as ``--model``):

===============================================  ==============================================
``model``                                        loads
===============================================  ==============================================
``path/to/folder`` (has ``config.json``)         a saved Hugging Face checkpoint, with
                                                 ``AutoModelForImageClassification`` and the
                                                 folder's ``AutoImageProcessor`` settings
``google/vit-base-patch16-224`` (a hub id)       the same from the Hugging Face hub (downloads
                                                 on first use)
``timm:vit_tiny_patch16_224``                    a timm architecture with its pretrained
                                                 weights (timm downloads them on first use)
``timm:vit_tiny_patch16_224`` + ``weights=F``    the architecture with weights from a local
                                                 ``.safetensors`` / ``.pth`` / ``.bin`` file
                                                 (nothing is downloaded)
``path/or/hub-id`` + ``labels=[...]``             a Hugging Face ``CLIPModel`` / ``SiglipModel``
                                                 (``AutoModel``, ``AutoProcessor``) as a
                                                 :class:`~captum_gradmask.zero_shot.
                                                 ZeroShotClassifier` over the labels
``open_clip:ViT-B-32`` + ``labels=[...]``        an OpenCLIP model (``weights``: a pretrained
                                                 tag such as ``laion2b_s34b_b79k`` or a local
                                                 file) as a zero-shot classifier; needs the
                                                 ``open-clip`` extra
===============================================  ==============================================

A ``.safetensors`` / ``.pth`` path given as ``model`` is an error that says to name the timm
architecture: the file alone does not say which network it belongs to.

The model comes back in eval mode with a :class:`PreprocessConfig` (input size, mean, std,
resample); ``config.preprocess(path)`` turns an image file into a model input.

Example::

    >>> import tempfile
    >>> from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    >>> from captum_gradmask.models import load_model
    >>> folder = tempfile.mkdtemp()
    >>> ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    ...     num_labels=5)).save_pretrained(folder)
    >>> _ = ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    >>> model, config = load_model(folder)
    >>> model.training, config.size, config.mean
    (False, (32, 32), (0.5, 0.5, 0.5))
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor, nn

from captum_gradmask.data import preprocess_image

__all__ = ["PreprocessConfig", "load_model"]

TIMM_PREFIX = "timm:"
OPEN_CLIP_PREFIX = "open_clip:"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_PIL_RESAMPLE = {
    int(Image.Resampling.NEAREST): "nearest",
    int(Image.Resampling.LANCZOS): "lanczos",
    int(Image.Resampling.BILINEAR): "bilinear",
    int(Image.Resampling.BICUBIC): "bicubic",
    int(Image.Resampling.BOX): "box",
    int(Image.Resampling.HAMMING): "hamming",
}


@dataclass(frozen=True)
class PreprocessConfig:
    """What a model expects of its inputs.

    Attributes:
        size: ``(height, width)`` of the model input.
        mean, std: per-channel normalisation ``(x / 255 - mean) / std``.
        resample: the resize filter the model was trained with (``"bicubic"``, ...).
        crop_pct: timm's centre-crop fraction at evaluation, if any (informational: the
            benchmark resizes the whole image, without a crop, so that boxes map simply).
        source: ``"huggingface"`` or ``"timm"``.
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"
    crop_pct: float | None = None
    source: str = "huggingface"

    def preprocess(self, image: Image.Image | str | Path) -> Tensor:
        """``(3, H, W)`` model input of one image: resize to :attr:`size` (PIL bicubic, as
        :func:`captum_gradmask.data.preprocess_image`), then normalise."""
        return preprocess_image(image, size=self.size, mean=self.mean, std=self.std)


def load_model(
    model: str | Path,
    *,
    weights: str | Path | None = None,
    local_files_only: bool = False,
    labels: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    **model_kwargs: Any,
) -> tuple[nn.Module, PreprocessConfig]:
    """Load an image classifier in eval mode and its preprocessing settings.

    Args:
        model: a Hugging Face checkpoint folder or hub id, or ``"timm:<architecture>"``
            (a timm model name, optionally with a pretrained tag:
            ``"timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k"``). See the module docstring.
        weights: for timm, a local ``.safetensors`` / ``.pth`` / ``.bin`` file with the
            state dict (then nothing is downloaded). Not used for Hugging Face.
        local_files_only: Hugging Face: never reach the hub.
        labels: class names for a zero-shot classifier: ``model`` is then an image-text
            model (Hugging Face CLIP/SigLIP, or ``"open_clip:<architecture>"``) wrapped in a
            :class:`~captum_gradmask.zero_shot.ZeroShotClassifier` over these prompts.
        templates: prompt templates with ``"{}"`` for the label, averaged per label (zero-shot
            only; ``None``: the labels are the prompts).
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``num_classes``)
            or to ``from_pretrained``.

    Returns:
        ``(model, preprocess_config)``.

    Raises:
        FileNotFoundError: a path-like ``model`` or ``weights`` that does not exist.
        ValueError: a weights file given as ``model`` (name the timm architecture),
            ``weights`` given for a Hugging Face model, an unknown timm architecture, or a
            checkpoint that cannot be fetched (hub unreachable).
    """
    spec = str(model)
    if templates is not None and labels is None:
        raise ValueError("`templates` are for zero-shot classifiers: give `labels` too")
    if spec.startswith(OPEN_CLIP_PREFIX):
        if labels is None:
            raise ValueError(
                f"`model` {spec!r} is an OpenCLIP image-text model: give `labels` (command line: "
                "--labels or --labels-file) to explain it as a zero-shot classifier"
            )
        return _load_open_clip(spec[len(OPEN_CLIP_PREFIX) :], weights, labels, templates)
    if labels is not None:
        if spec.startswith(TIMM_PREFIX) or weights is not None:
            raise ValueError(
                "`labels` make a zero-shot classifier of a Hugging Face CLIP/SigLIP checkpoint "
                "or an 'open_clip:<architecture>' model; a timm classifier has its own classes"
            )
        return _load_zero_shot_huggingface(spec, local_files_only, labels, templates)
    if spec.startswith(TIMM_PREFIX):
        name = spec[len(TIMM_PREFIX) :]
        if not name:
            raise ValueError(
                "`model` 'timm:' needs an architecture, e.g. 'timm:vit_tiny_patch16_224'"
            )
        return _load_timm(name, weights, **model_kwargs)
    if spec.lower().endswith(_WEIGHT_SUFFIXES):
        raise ValueError(
            f"`model` {spec!r} is a weights file; name its timm architecture and pass the file "
            f"as weights: load_model('timm:<architecture>', weights={spec!r}) "
            "(command line: --model timm:<architecture> --weights FILE)"
        )
    if weights is not None:
        raise ValueError(
            f"`weights` ({str(weights)!r}) is only for timm models ('timm:<architecture>'); a "
            "Hugging Face checkpoint is a folder or a hub id"
        )
    path = Path(spec)
    looks_local = path.is_absolute() or spec.startswith((".", "~")) or path.exists()
    if looks_local and not (path.expanduser() / "config.json").is_file():
        raise FileNotFoundError(
            f"`model` {spec!r} is not a Hugging Face checkpoint folder (no config.json there); "
            "pass a folder saved with save_pretrained, a hub id, or 'timm:<architecture>'"
        )
    return _load_huggingface(
        str(path.expanduser()) if looks_local else spec, local_files_only, **model_kwargs
    )


def _load_huggingface(
    spec: str, local_files_only: bool, **kwargs: Any
) -> tuple[nn.Module, PreprocessConfig]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        network = AutoModelForImageClassification.from_pretrained(
            spec, local_files_only=local_files_only, **kwargs
        ).eval()
    except OSError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"`model` {spec!r} could not be loaded ({reason}); a hub id needs the hub to be "
            "reachable (or the checkpoint in the local cache), a local checkpoint is a folder "
            "with config.json"
        ) from error
    try:
        processor = AutoImageProcessor.from_pretrained(spec, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        image_size = getattr(network.config, "image_size", 224)
        warnings.warn(
            f"no image processor settings for {spec!r} ({error}); using size {image_size}, "
            "mean = std = 0.5, bicubic (ViTImageProcessor's defaults)",
            stacklevel=3,
        )
        side = _pair(image_size)
        return network, PreprocessConfig(side, (0.5,) * 3, (0.5,) * 3, "bicubic")
    size = _processor_size(processor, network)
    return network, PreprocessConfig(
        size=size,
        mean=_triple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5)),
        std=_triple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5)),
        resample=_resample_name(getattr(processor, "resample", None)),
        source="huggingface",
    )


def _load_zero_shot_huggingface(
    spec: str, local_files_only: bool, labels: Sequence[str], templates: Sequence[str] | None
) -> tuple[nn.Module, PreprocessConfig]:
    from transformers import AutoModel, AutoProcessor

    from .zero_shot import ZeroShotClassifier

    path = Path(spec).expanduser()
    if (path.is_absolute() or spec.startswith((".", "~")) or path.exists()) and not (
        path / "config.json"
    ).is_file():
        raise FileNotFoundError(
            f"`model` {spec!r} is not a Hugging Face checkpoint folder (no config.json there)"
        )
    source = str(path) if path.exists() else spec
    network = AutoModel.from_pretrained(source, local_files_only=local_files_only).eval()
    processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
    classifier = ZeroShotClassifier(network, labels, processor, templates=templates).eval()
    images = getattr(processor, "image_processor", processor)
    vision = getattr(network.config, "vision_config", network.config)
    return classifier, PreprocessConfig(
        size=_processor_size(images, vision),
        mean=_triple(getattr(images, "image_mean", None) or (0.5, 0.5, 0.5)),
        std=_triple(getattr(images, "image_std", None) or (0.5, 0.5, 0.5)),
        resample=_resample_name(getattr(images, "resample", None)),
        source="huggingface",
    )


def _load_open_clip(
    name: str, weights: str | Path | None, labels: Sequence[str], templates: Sequence[str] | None
) -> tuple[nn.Module, PreprocessConfig]:
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "OpenCLIP models need open_clip_torch: pip install captum-gradmask[open-clip]"
        ) from error
    from .zero_shot import ZeroShotClassifier

    if not name:
        raise ValueError("`model` 'open_clip:' needs an architecture, e.g. 'open_clip:ViT-B-32'")
    network = open_clip.create_model(name, pretrained=None if weights is None else str(weights))
    network.eval()
    classifier = ZeroShotClassifier(
        network, labels, open_clip.get_tokenizer(name), templates=templates
    ).eval()
    config = getattr(network.visual, "preprocess_cfg", {}) or {}
    return classifier, PreprocessConfig(
        size=_pair(network.visual.image_size),
        mean=_triple(config.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=_triple(config.get("std", open_clip.OPENAI_DATASET_STD)),
        resample=str(config.get("interpolation", "bicubic")),
        source="open_clip",
    )


def _processor_size(processor: Any, network: Any) -> tuple[int, int]:
    size = getattr(processor, "size", None)
    get = size.get if hasattr(size, "get") else (lambda key, default=None: default)
    height, width = get("height"), get("width")
    if height and width:
        return int(height), int(width)
    side = get("shortest_edge")
    if side:
        return int(side), int(side)
    if isinstance(size, int):
        return size, size
    config = getattr(network, "config", network)
    return _pair(getattr(config, "image_size", 224))


def _load_timm(
    name: str, weights: str | Path | None, **kwargs: Any
) -> tuple[nn.Module, PreprocessConfig]:
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ValueError(
            f"`model` 'timm:{name}' is not a timm architecture{hint} (timm.list_models() lists "
            "them)"
        )
    if weights is None:
        try:
            network = timm.create_model(name, pretrained=True, **kwargs)
        except (OSError, RuntimeError) as error:
            raise ValueError(
                f"timm could not fetch the pretrained weights of {name!r} ({error}); pass a "
                "local weights file (weights=..., command line: --weights FILE)"
            ) from error
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"`weights` file {str(path)!r} does not exist")
        from timm.models import load_state_dict

        state = load_state_dict(str(path))
        head = state.get("head.weight")
        if "num_classes" not in kwargs and isinstance(head, Tensor):
            kwargs["num_classes"] = head.shape[0]
        network = timm.create_model(name, pretrained=False, **kwargs)
        network.load_state_dict(state, strict=True)
    network.eval()
    data = resolve_data_config({}, model=network)
    _, height, width = data["input_size"]
    # The pretrained config keeps its size when the model is built at another (img_size=...).
    built = getattr(getattr(network, "patch_embed", None), "img_size", None)
    if built is not None:
        height, width = _pair(built)
    return network, PreprocessConfig(
        size=(int(height), int(width)),
        mean=_triple(data["mean"]),
        std=_triple(data["std"]),
        resample=str(data.get("interpolation", "bicubic")),
        crop_pct=data.get("crop_pct"),
        source="timm",
    )


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, Sequence):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _triple(values: Any) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = (values,) * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {values}")
    return values  # type: ignore[return-value]


def _resample_name(resample: Any) -> str:
    if resample is None:
        return "bicubic"
    if isinstance(resample, str):
        return resample.lower()
    try:
        return _PIL_RESAMPLE.get(int(resample), str(resample))
    except (TypeError, ValueError):
        name = getattr(resample, "name", None) or getattr(resample, "value", None)
        return str(name or resample).lower()
