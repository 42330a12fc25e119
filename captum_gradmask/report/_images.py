"""The report's pictures: maps over their images (thumbnails and large views) and the mean
insertion/deletion curves.

A picture is the model's input geometry (the whole image resized to the input size, as the
preprocessing does), the map upsampled over it with ``inferno`` (its positive part, or its
magnitude for signed maps, scaled by its 99th percentile as
:func:`captum_gradmask.viz.scaled_map` does; more opaque where it is higher), the object boxes in
cyan and the map's maximum as a white ring. Pictures are drawn with numpy and Pillow
(matplotlib only builds the colour table), so thousands take seconds.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Bump when pictures change, so that a re-run redraws them.
RENDER_VERSION = 2
_ALPHA_LOW, _ALPHA_HIGH = 0.25, 0.75  # the map's opacity where it is 0 and at its top
_BOX = (0, 255, 255)


@dataclass(frozen=True)
class Job:
    """Pictures of some rows of one store (picklable, for worker processes).

    Attributes:
        indices: the rows.
        maps: their maps, ``(n, h, w)``.
        image_paths: their image files (``None``: the map over grey).
        boxes: their boxes in original-image pixels (``None``: none).
        outputs: the file each picture is written to.
        size: ``(height, width)`` of the picture (of each half for large views).
        large: the image beside the map over it, instead of the overlay alone.
    """

    indices: Sequence[int]
    maps: np.ndarray
    image_paths: Sequence[Path | None]
    boxes: Sequence[np.ndarray | None]
    outputs: Sequence[Path]
    size: tuple[int, int]
    large: bool = False

    def digest(self) -> str:
        """What the pictures depend on: a re-run redraws only jobs whose digest changed."""
        h = hashlib.sha256(f"{RENDER_VERSION}|{self.size}|{self.large}".encode())
        h.update(np.ascontiguousarray(self.maps, dtype=np.float32).tobytes())
        for i, path, boxes, out in zip(
            self.indices, self.image_paths, self.boxes, self.outputs, strict=True
        ):
            h.update(f"|{i}|{path}|{out.name}|".encode())
            if boxes is not None:
                h.update(np.asarray(boxes, dtype=np.float64).tobytes())
        return h.hexdigest()


def run_jobs(jobs: list[Job], workers: int, bar: Any) -> None:
    """Draw ``jobs`` (in ``workers`` processes when more than 0), advancing ``bar`` by each
    job's pictures."""
    if workers > 0 and len(jobs) > 1:
        # spawned, not forked: the caller may hold threads (torch's) that a fork would copy
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for job in pool.map(_draw_job_counted, jobs):
                bar.update(job)
        return
    for job in jobs:
        bar.update(_draw_job_counted(job))


def _draw_job_counted(job: Job) -> int:
    draw_job(job)
    return len(job.indices)


def draw_job(job: Job) -> None:
    """Write one picture per row of ``job``."""
    colours = _colour_table()
    for saliency, path, boxes, out in zip(
        job.maps, job.image_paths, job.boxes, job.outputs, strict=True
    ):
        image, original = _load_image(path, job.size)
        overlay = _overlay(image, saliency, colours)
        scaled = (
            None if boxes is None or original is None else _scale_boxes(boxes, original, job.size)
        )
        picture = Image.fromarray(overlay)
        _draw_marks(picture, scaled, saliency, job.size, width=2 if job.large else 1)
        if job.large:
            plain = Image.fromarray(image)
            _draw_marks(plain, scaled, None, job.size, width=2)
            both = Image.new("RGB", (2 * job.size[1] + 8, job.size[0]), (255, 255, 255))
            both.paste(plain, (0, 0))
            both.paste(picture, (job.size[1] + 8, 0))
            picture = both
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        picture.save(partial, format="JPEG", quality=85, subsampling=0)  # sharp box lines
        partial.replace(out)


def _colour_table() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def _load_image(path: Path | None, size: tuple[int, int]) -> tuple[np.ndarray, Any]:
    """The image at ``size`` (``(H, W)``) as uint8 RGB and its original ``(height, width)``;
    a grey canvas and ``None`` when there is no readable file."""
    if path is not None:
        try:
            with Image.open(path) as image:
                original = (image.height, image.width)
                image.draft("RGB", (size[1], size[0]))  # JPEG: decode at a reduced scale
                rgb = image.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                return np.asarray(rgb), original
        except OSError:
            pass
    return np.full((*size, 3), 128, dtype=np.uint8), None


def _scaled(saliency: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(np.asarray(saliency, dtype=np.float32))
    values = np.abs(values) if values.min() < 0 else values
    top = float(np.percentile(values, 99.0))
    return np.clip(values / top, 0.0, 1.0) if top > 0 else np.zeros_like(values)


def _overlay(image: np.ndarray, saliency: np.ndarray, colours: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    grid = Image.fromarray(_scaled(saliency).astype(np.float32), mode="F")
    upsampled = np.asarray(grid.resize((width, height), Image.BILINEAR))
    heat = colours[np.clip((upsampled * 255).round(), 0, 255).astype(np.uint8)]
    # Opacity grows with the map, so the image stays visible where the map is low.
    alpha = (_ALPHA_LOW + (_ALPHA_HIGH - _ALPHA_LOW) * upsampled)[..., None]
    blended = (1 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return blended.round().astype(np.uint8)


def _scale_boxes(boxes: np.ndarray, original: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    scale = np.array([size[1] / original[1], size[0] / original[0]] * 2)
    return np.asarray(boxes, dtype=float).reshape(-1, 4) * scale


def _draw_marks(
    picture: Image.Image,
    boxes: np.ndarray | None,
    saliency: np.ndarray | None,
    size: tuple[int, int],
    width: int,
) -> None:
    draw = ImageDraw.Draw(picture)
    for x0, y0, x1, y1 in [] if boxes is None else boxes:
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=_BOX, width=width)
    if saliency is None:
        return
    values = np.nan_to_num(np.asarray(saliency, dtype=np.float32))
    values = np.abs(values) if values.min() < 0 else values
    row, col = np.unravel_index(int(np.argmax(values)), values.shape)
    y = (row + 0.5) * size[0] / values.shape[0]
    x = (col + 0.5) * size[1] / values.shape[1]
    radius = max(3.0, size[1] / 28)
    for colour, grow in (((0, 0, 0), 1.0), ((255, 255, 255), 0.0)):
        r = radius + grow
        draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=width)


def curve_figure(
    curves: dict[str, list[tuple[str, np.ndarray, np.ndarray, int]]], out: Path
) -> Path:
    """A PNG with one panel per curve column: each store's mean curve (label, fractions, mean
    probabilities, images) over the fraction of the image inserted or deleted."""
    from matplotlib.figure import Figure

    columns = list(curves)
    figure = Figure(figsize=(4.2 * len(columns), 3.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(columns)))
    for axis, column in zip(axes, columns, strict=True):
        for label, fractions, mean, count in curves[column]:
            axis.plot(fractions, mean, label=f"{label} (n={count})")
        axis.set_title(column.replace("_", " "))
        axis.set_xlabel(
            "fraction inserted" if column.startswith("insertion") else "fraction deleted"
        )
        axis.set_ylabel("mean target probability")
        axis.set_xlim(0, 1)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    return out
