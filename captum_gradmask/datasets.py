"""Image folders and CSV lists of images as torch Datasets, and the batches dataset runs read.

:class:`ImageFiles` turns image files into model inputs with a model's preprocessing (item
``i`` is ``(pixels, label)``, as torchvision's ``ImageFolder`` gives); :func:`open_source`
builds one from a folder (flat or one sub-folder per class, searched recursively) or from a CSV
with a ``file`` column and an optional ``label`` column (and, optionally, boxes
``xmin,ymin,xmax,ymax`` in original-image pixels, one row per box, as the shared ImageNet
sample's ``annotations.csv``).

:class:`SafeItems` wraps any map-style dataset so that an image that cannot be read becomes a
reason string instead of an exception, and :func:`collate_items` stacks the readable images of
a batch; :func:`captum_gradmask.explain_dataset.explain_dataset` reads datasets through them,
in DataLoader workers.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> from captum_gradmask.datasets import SafeItems, collate_items, open_source
    >>> from captum_gradmask.models import PreprocessConfig
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("cat", "dog"):
    ...     (folder / name).mkdir()
    ...     Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / name / "a.png")
    >>> _ = (folder / "dog" / "broken.png").write_bytes(b"not an image")
    >>> images = open_source(folder, PreprocessConfig((16, 16), (0.5,) * 3, (0.5,) * 3))
    >>> images.files, images.labels, images.classes
    (['cat/a.png', 'dog/a.png', 'dog/broken.png'], [0, 1, 1], ['cat', 'dog'])
    >>> batch = collate_items([SafeItems(images)[i] for i in range(3)])
    >>> batch.pixels.shape, batch.readable.tolist()
    (torch.Size([2, 3, 16, 16]), [True, True, False])
    >>> batch.errors[2].startswith("UnidentifiedImageError")
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from captum_gradmask._utils import check_positive_int
from captum_gradmask.data import BOX_COLUMNS, read_annotations

if TYPE_CHECKING:
    from captum_gradmask.models import PreprocessConfig

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "IMAGE_SUFFIXES",
    "ImageFiles",
    "Item",
    "ItemBatch",
    "SafeItems",
    "collate_items",
    "file_names",
    "input_shape",
    "loader",
    "loader_settings",
    "open_source",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
NO_LABEL = -1
DEFAULT_BATCH_SIZE = 8  # images per method call in dataset runs


class ImageFiles(Dataset):
    """Image files as model inputs.

    Item ``i`` is ``(pixels, label)``: the ``(3, H, W)`` float32 input of ``files[i]`` from
    ``preprocess.preprocess`` and its class (``-1`` when there are no labels). An unreadable
    file raises (:class:`SafeItems` turns that into a reason string).

    Args:
        files: image paths, relative to ``root`` (or absolute).
        preprocess: the model's preprocessing (``load_model``'s second result).
        labels: one class index per file, or ``None``.
        root: the folder ``files`` are relative to (default: the current folder).
        boxes: per file, ``(K, 4)`` boxes ``(xmin, ymin, xmax, ymax)`` in original-image
            pixels (for the pointing game), or ``None``.
        classes: class names in label order, when known.
        source: the folder or CSV the list came from (recorded in stores).

    Example::

        >>> from captum_gradmask.datasets import ImageFiles
        >>> from captum_gradmask.models import PreprocessConfig
        >>> images = ImageFiles(["a.jpg", "b.jpg"], PreprocessConfig((224, 224), (0.5,) * 3,
        ...     (0.5,) * 3), labels=[3, 5], root="/data")
        >>> len(images), str(images.path(1)), images.image_size
        (2, '/data/b.jpg', (224, 224))
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        preprocess: PreprocessConfig,
        labels: Sequence[int] | None = None,
        root: str | Path | None = None,
        *,
        boxes: Sequence[Tensor] | None = None,
        classes: Sequence[str] | None = None,
        source: str | Path | None = None,
    ) -> None:
        self.files = [Path(f).as_posix() for f in files]
        for name, values in (("labels", labels), ("boxes", boxes)):
            if values is not None and len(values) != len(self.files):
                raise ValueError(
                    f"`{name}` has {len(values)} entries for {len(self.files)} files; give one "
                    "per file or None"
                )
        self.preprocess = preprocess
        self.labels = None if labels is None else [int(label) for label in labels]
        self.root = Path(root) if root is not None else Path()
        self.boxes = None if boxes is None else list(boxes)
        self.classes = None if classes is None else list(classes)
        self.source = str(source) if source is not None else str(self.root.resolve())

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the model inputs."""
        return tuple(self.preprocess.size)  # type: ignore[return-value]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(3, height, width)``: the shape of every item's pixels (RGB)."""
        return (3, *self.image_size)

    def path(self, index: int) -> Path:
        """The file of item ``index``."""
        return self.root / self.files[index]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        label = NO_LABEL if self.labels is None else self.labels[index]
        return self.preprocess.preprocess(self.path(index)), label


def open_source(
    source: str | Path, preprocess: PreprocessConfig, limit: int | None = None
) -> ImageFiles:
    """An :class:`ImageFiles` from an image folder or a CSV list of images.

    - A folder: every image file under it (suffixes :data:`IMAGE_SUFFIXES`, any case),
      recursively, sorted by relative path. When every image lies in a sub-folder, the first
      sub-folder is its class and labels are indices into the sorted class names
      (torchvision's ``ImageFolder`` convention; ImageNet's synset folders give the standard
      class order); a flat folder has no labels.
    - A ``.csv`` file: column ``file`` (paths relative to the CSV's folder, or absolute),
      optional ``label`` (blank: no label, ``-1``), optional boxes ``xmin,ymin,xmax,ymax``.
      Several rows of one file are one image (in the order of its first row) whose boxes are
      all its rows' boxes.

    Args:
        source: the folder or the CSV file.
        preprocess: the model's preprocessing (``load_model``'s second result).
        limit: keep the first ``limit`` images (``None``: all).

    Returns:
        The images, with ``labels`` (or ``None``), ``boxes`` (CSV with box columns) and
        ``source`` set.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no images, a CSV without a ``file`` column, labels that disagree for one
            file, or a bad ``limit``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive int or None, got {limit!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        images = _from_folder(path, preprocess, limit)
    elif path.is_file() and path.suffix.lower() == ".csv":
        images = _from_csv(path, preprocess, limit)
    elif path.exists():
        raise ValueError(
            f"`source` {str(source)!r} is neither a folder of images nor a .csv list of images"
        )
    else:
        raise FileNotFoundError(f"`source` {str(source)!r} does not exist")
    if not images.files:
        raise ValueError(
            f"`source` {str(source)!r} has no images (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return images


def _from_folder(root: Path, preprocess: PreprocessConfig, limit: int | None) -> ImageFiles:
    files = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )[:limit]
    labels = classes = None
    if files and all("/" in f for f in files):
        folders = [f.split("/", 1)[0] for f in files]
        classes = sorted(set(folders))
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[name] for name in folders]
    return ImageFiles(files, preprocess, labels, root, classes=classes, source=root.resolve())


def _from_csv(path: Path, preprocess: PreprocessConfig, limit: int | None) -> ImageFiles:
    rows, columns = read_annotations(path, limit=limit)
    has_label = "label" in columns
    has_boxes = set(BOX_COLUMNS) <= columns
    files = list(rows)
    labels = [NO_LABEL if rows[f].label is None else rows[f].label for f in files]
    boxes = [torch.tensor(rows[f].boxes, dtype=torch.long) for f in files]
    return ImageFiles(
        files,
        preprocess,
        labels if has_label else None,
        path.parent,
        boxes=boxes if has_boxes else None,
        source=path.resolve(),
    )


@dataclass(frozen=True)
class Item:
    """One item of :class:`SafeItems`: its index, its input (``None`` when unreadable), its
    label (``-1`` when none) and why it could not be read (``""`` when it could)."""

    index: int
    pixels: Tensor | None
    label: int
    error: str


class SafeItems(Dataset):
    """Any map-style dataset, with unreadable items turned into reasons instead of errors.

    The wrapped dataset's item may be a tensor, or a tuple/list whose first element is the
    tensor and second (optional) the label, or a mapping with ``"pixel_values"`` (and
    ``"label"``/``"labels"``). An item that raises, or whose tensor does not have the shape
    ``input_shape``, becomes an :class:`Item` with ``pixels=None`` and the reason.

    Args:
        dataset: the dataset.
        input_shape: the expected ``(C, H, W)`` of every input, or ``None`` to accept any
            3-D tensor.
    """

    def __init__(self, dataset: Dataset, input_shape: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Item:
        try:
            pixels, label = _split_item(self.dataset[index])
        except Exception as error:  # an unreadable image must not stop a dataset run
            return Item(index, None, NO_LABEL, f"{type(error).__name__}: {error}")
        expected = self.input_shape or ("C", "H", "W")
        if pixels.dim() != 3 or (self.input_shape and tuple(pixels.shape) != self.input_shape):
            return Item(
                index, None, label, f"input of shape {tuple(pixels.shape)}, expected {expected}"
            )
        return Item(index, pixels, label, "")


def _split_item(item: Any) -> tuple[Tensor, int]:
    label: Any = NO_LABEL
    if isinstance(item, dict):
        pixels = item.get("pixel_values")
        label = item.get("label", item.get("labels", NO_LABEL))
    elif isinstance(item, (tuple, list)):
        pixels = item[0] if item else None
        label = item[1] if len(item) > 1 else NO_LABEL
    else:
        pixels = item
    if not isinstance(pixels, Tensor):
        raise TypeError(
            f"dataset item holds {type(pixels).__name__}, not an image tensor; items must be a "
            "tensor, (tensor, label) or {'pixel_values': tensor, 'label': int}"
        )
    if pixels.dim() == 4 and pixels.shape[0] == 1:
        pixels = pixels[0]  # a processor's (1, C, H, W) output
    label = int(label) if isinstance(label, (int, Tensor)) and not isinstance(label, bool) else -1
    return pixels.float(), label


@dataclass
class ItemBatch:
    """A batch of :class:`Item` s.

    Attributes:
        indices: ``(n,)`` dataset indices of all items.
        pixels: ``(k, C, H, W)`` inputs of the ``k`` readable items, in order.
        readable: ``(n,)`` bool, which items have pixels.
        labels: ``(n,)`` long labels (``-1``: none).
        errors: ``n`` reasons (``""`` for readable items).
    """

    indices: Tensor
    pixels: Tensor
    readable: Tensor
    labels: Tensor
    errors: list[str]

    def pin_memory(self) -> ItemBatch:
        """Page-locked copy of the pixels (DataLoader ``pin_memory=True``)."""
        self.pixels = self.pixels.pin_memory()
        return self


def collate_items(items: Sequence[Item]) -> ItemBatch:
    """Stack a list of :class:`Item` into an :class:`ItemBatch` (a DataLoader ``collate_fn``)."""
    readable = [item.pixels for item in items if item.pixels is not None]
    return ItemBatch(
        indices=torch.tensor([item.index for item in items], dtype=torch.long),
        pixels=torch.stack(readable) if readable else torch.empty(0),
        readable=torch.tensor([item.pixels is not None for item in items], dtype=torch.bool),
        labels=torch.tensor([item.label for item in items], dtype=torch.long),
        errors=[item.error for item in items],
    )


def loader_settings(
    data: Dataset | DataLoader, batch_size: int | None, num_workers: int | None
) -> tuple[Dataset, int, int, bool]:
    """``(dataset, batch_size, num_workers, pin_memory)`` of a dataset run: a DataLoader's own
    settings where the arguments leave them ``None``, checked."""
    pin_memory = False
    if isinstance(data, DataLoader):
        batch_size = data.batch_size if batch_size is None else batch_size
        num_workers = data.num_workers if num_workers is None else num_workers
        pin_memory = data.pin_memory
        data = data.dataset
    if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise TypeError(
            f"`dataset` must be a map-style torch Dataset (with __len__ and __getitem__) or a "
            f"DataLoader over one, got {type(data).__name__}"
        )
    if len(data) == 0:  # type: ignore[arg-type]
        raise ValueError("`dataset` is empty")
    batch_size = check_positive_int(
        DEFAULT_BATCH_SIZE if batch_size is None else batch_size, "batch_size"
    )
    num_workers = 0 if num_workers is None else num_workers
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}")
    return data, batch_size, num_workers, pin_memory


def input_shape(dataset: Any) -> tuple[int, ...]:
    """The shape of one input: ``dataset.input_shape`` or the first readable item's."""
    shape = getattr(dataset, "input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    safe = SafeItems(dataset)
    for index in range(min(len(safe), 64)):
        item = safe[index]
        if item.pixels is not None:
            return tuple(item.pixels.shape)
    raise ValueError(
        "none of the dataset's first items could be read, so its input shape is unknown: "
        f"{safe[0].error}"
    )


def file_names(dataset: Any) -> list[str]:
    """One name per item: ``dataset.files`` or the item indices."""
    files = getattr(dataset, "files", None)
    if files is None:
        return [str(i) for i in range(len(dataset))]
    files = [str(f) for f in files]
    if len(files) != len(dataset):
        raise ValueError(
            f"`dataset.files` has {len(files)} names for {len(dataset)} items; give one per item"
        )
    return files


def loader(
    dataset: Dataset,
    batches: list[list[int]],
    input_shape: Sequence[int],
    num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    """A DataLoader over ``batches`` of item indices, unreadable items as reasons
    (:class:`SafeItems`, :func:`collate_items`)."""
    return DataLoader(
        SafeItems(dataset, input_shape),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_items,
        pin_memory=pin_memory,
    )
