"""Loader for a small ImageNet validation sample laid out as ``images/``, ``annotations.csv``
(``file,label,synset,xmin,ymin,xmax,ymax``, one row per box) and ``synsets.txt``, plus the
preprocessing that turns an image into a ViT input and maps its boxes through the resize.

The library bakes in no data path: pass the folder (benchmarks and tests pass the shared one).
"""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from captum_gradmask._ops import resize_boxes

__all__ = [
    "BOX_COLUMNS",
    "AnnotatedImage",
    "ImageRecord",
    "class_names",
    "load_image",
    "load_imagenet_sample",
    "preprocess_image",
    "read_annotations",
    "resize_boxes",
]

_COLUMNS = ("file", "label", "synset", "xmin", "ymin", "xmax", "ymax")


@dataclass(frozen=True)
class ImageRecord:
    """One image of the sample.

    Attributes:
        path: absolute path of the image file.
        label: class index 0..999 (standard ImageNet order).
        synset: WordNet id, e.g. ``"n01751748"``.
        boxes: ``(K, 4)`` long tensor ``(xmin, ymin, xmax, ymax)`` in original-image pixels,
            inclusive indices (``xmax`` is the object's last column).
        original_size: ``(height, width)`` of the image file.
    """

    path: Path
    label: int
    synset: str
    boxes: Tensor
    original_size: tuple[int, int]


BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class AnnotatedImage:
    """The rows of one image in an annotations CSV.

    Attributes:
        label: its class (``None`` when the CSV has no label for it).
        synset: its WordNet id (``""`` when the CSV has no ``synset`` column).
        boxes: its ``[xmin, ymin, xmax, ymax]`` boxes, one per row (empty without box columns).
    """

    label: int | None
    synset: str = ""
    boxes: list[list[int]] = field(default_factory=list)


def read_annotations(
    path: str | Path,
    *,
    required: Sequence[str] = ("file",),
    limit: int | None = None,
    offset: int = 0,
) -> tuple[dict[str, AnnotatedImage], set[str]]:
    """Read an annotations CSV (one row per box, as ImageNet's: ``file,label,synset,xmin,
    ymin,xmax,ymax``; only ``file`` is always needed) into one entry per image, in file order.

    Args:
        path: the CSV.
        required: columns that must be there.
        limit: at most this many images (``None``: all).
        offset: skip this many images first.

    Returns:
        ``(images, columns)``: ``{file: AnnotatedImage}`` and the CSV's column names.

    Raises:
        ValueError: a required column is missing, or one image has rows with two labels.

    Example::

        >>> import tempfile, pathlib
        >>> from captum_gradmask.data import read_annotations
        >>> csv_file = pathlib.Path(tempfile.mkdtemp()) / "boxes.csv"
        >>> _ = csv_file.write_text("file,label,xmin,ymin,xmax,ymax\\na.png,3,0,0,4,4\\n"
        ...                         "a.png,3,5,5,9,9\\nb.png,1,1,1,2,2\\n")
        >>> images, columns = read_annotations(csv_file, limit=1)
        >>> images
        {'a.png': AnnotatedImage(label=3, synset='', boxes=[[0, 0, 4, 4], [5, 5, 9, 9]])}
    """
    path = Path(path)
    images: dict[str, AnnotatedImage] = {}
    skipped: set[str] = set()
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(
                f"the CSV {str(path)!r} lacks the column(s) {missing} (columns: "
                f"{sorted(columns)}); it needs {list(required)}"
            )
        has_boxes = set(BOX_COLUMNS) <= columns
        for line, row in enumerate(reader, start=2):
            file = (row["file"] or "").strip()
            if not file:
                continue
            if file in skipped or (file not in images and len(skipped) < offset):
                skipped.add(file)
                continue
            text = (row.get("label") or "").strip()
            label = int(text) if text else None
            if file not in images:
                if limit is not None and len(images) == limit:
                    break
                images[file] = AnnotatedImage(label, (row.get("synset") or "").strip())
            elif images[file].label != label:
                raise ValueError(
                    f"{path}, line {line}: {file!r} has label {label}, but an earlier row gave "
                    f"{images[file].label}; one image has one label"
                )
            if has_boxes:
                images[file].boxes.append([int(row[k]) for k in BOX_COLUMNS])
    return images, columns


def load_imagenet_sample(
    root: str | Path, limit: int | None = None, offset: int = 0
) -> list[ImageRecord]:
    """Read ``annotations.csv`` under ``root`` and return one record per image, in file order.

    Only image headers are opened (for the original size). ``limit`` keeps the first images.

    Args:
        root: folder holding ``annotations.csv`` and ``images/``.
        limit: at most this many images (``None``: all).
        offset: skip this many images first (to split the sample into shards); the skipped
            images' files are not opened.

    Returns:
        A list of :class:`ImageRecord`.

    Examples::

        >>> from captum_gradmask.data import load_imagenet_sample
        >>> root = "../shared/data/imagenet-val-sample"
        >>> records = load_imagenet_sample(root, limit=2)  # doctest: +SKIP
        >>> records[0].label, records[0].boxes.tolist(), records[0].original_size  # doctest: +SKIP
        (65, [[111, 108, 441, 193]], (375, 500))
    """
    root = Path(root)
    csv_path = root / "annotations.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"`root` {str(root)!r} has no annotations.csv; pass the folder of the ImageNet "
            "sample (with images/, annotations.csv and synsets.txt)"
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive int or None, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"`offset` must be an int >= 0, got {offset!r}")
    annotated, _ = read_annotations(csv_path, required=_COLUMNS, limit=limit, offset=offset)
    records = []
    for file, image_rows in annotated.items():
        path = (root / file).resolve()
        with Image.open(path) as image:
            width, height = image.size
        records.append(
            ImageRecord(
                path=path,
                label=int(image_rows.label),  # type: ignore[arg-type]
                synset=image_rows.synset,
                boxes=torch.tensor(image_rows.boxes, dtype=torch.long),
                original_size=(height, width),
            )
        )
    return records


def class_names(root: str | Path, short: bool = True) -> list[str]:
    """Class names in class-index order from ``synsets.txt`` (``"n01440764 tench, Tinca tinca"``).

    ``short=True`` keeps the first name of each line (``"tench"``), else the whole list.

    Examples::

        >>> from captum_gradmask.data import class_names
        >>> class_names("../shared/data/imagenet-val-sample")[:2]  # doctest: +SKIP
        ['tench', 'goldfish']
    """
    path = Path(root)
    path = path / "synsets.txt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no synsets.txt at {str(path)!r}; pass the sample folder or file")
    names = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        _, _, text = line.partition(" ")
        names.append(text.split(",")[0].strip() if short else text.strip())
    return names


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB (grayscale and CMYK files are converted; an alpha channel is
    dropped with a warning)."""
    with Image.open(path) as image:
        return _rgb(image, str(path))


def _rgb(image: Image.Image, name: str) -> Image.Image:
    """``image`` as RGB; warns when transparency is dropped (transparent pixels keep the colour
    stored under them, which the model then sees)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        warnings.warn(
            f"{name} has an alpha channel (mode {image.mode}); it is dropped and transparent "
            "pixels keep the colour stored under them: flatten the image onto a background "
            "first if that matters",
            UserWarning,
            stacklevel=3,
        )
    return image.convert("RGB")


def preprocess_image(
    image: Image.Image | str | Path,
    size: int | tuple[int, int] = 224,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> Tensor:
    """Turn an image into a ``(3, H, W)`` float32 model input, as transformers 4.x's
    ``ViTImageProcessor`` does: PIL bicubic resize of the RGB image to ``size`` (no crop),
    then ``(x / 255 - mean) / std``. The defaults match the shared ViT-Tiny (mean = std = 0.5).

    Args:
        image: a PIL image or a path.
        size: output ``(height, width)`` or a side.
        mean, std: per-channel normalization.

    Returns:
        ``(3, height, width)`` float32 tensor; ``unsqueeze(0)`` for a batch.

    Examples::

        >>> from PIL import Image
        >>> from captum_gradmask.data import preprocess_image
        >>> preprocess_image(Image.new("RGB", (500, 375), (255, 0, 128))).shape
        torch.Size([3, 224, 224])
    """
    pil = load_image(image) if isinstance(image, (str, Path)) else _rgb(image, "the image")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ValueError(f"`size` must be positive, got {size!r}")
    if 2 * pil.height < height or 2 * pil.width < width:
        name = str(image) if isinstance(image, (str, Path)) else "the image"
        warnings.warn(
            f"{name} is {pil.width}x{pil.height} pixels, less than half the model's "
            f"{width}x{height} input: it is upscaled, and the prediction and its explanation "
            "may mean little",
            UserWarning,
            stacklevel=2,
        )
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(
            f"`mean` and `std` must have 3 values and `std` be positive; got {mean!r}, {std!r}"
        )
    resized = pil.resize((width, height), resample=Image.Resampling.BICUBIC)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
