"""A static HTML report of one or more map stores: look at a dataset run instead of reading it.

:func:`make_report` turns stores made by
:func:`~captum_gradmask.explain_dataset.explain_dataset` (and scored by
:func:`~captum_gradmask.evaluation.evaluate_store`) into a folder of plain HTML pages and
pictures that opens from disk (``index.html``; no server, no network: CSS and JavaScript are
inline). It shows, per store, a run card, the metric summary with 95 % bootstrap intervals, a
sortable per-class table, capped galleries (misclassified images, pointing-game misses, lowest
and highest insertion, least and most confident), each picture linking to a larger view with
the image's numbers, and every image in pages of bounded size; for stores over the same
images, the paired comparison of their metrics and one row per image with every method side by
side; and the mean insertion/deletion curves of every store.

Pictures are drawn in chunks of the store (one progress bar), optionally in worker processes;
a re-run redraws only the chunks whose maps, files, boxes or settings changed and rewrites only
pages whose content changed.

Example::

    >>> import tempfile
    >>> import torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from captum_gradmask.explain_dataset import explain_dataset
    >>> from captum_gradmask.report import make_report
    >>> model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32,
    ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    ...     num_labels=5)).eval()
    >>> images = torch.utils.data.TensorDataset(torch.rand(4, 3, 32, 32))
    >>> folder = tempfile.mkdtemp()
    >>> _ = explain_dataset(images, model, folder + "/maps.zarr", method="gradmask-m1",
    ...     show_progress=False)
    >>> report = make_report([folder + "/maps.zarr"], folder + "/report", show_progress=False)
    >>> report.index.name, report.pictures_drawn  # 4 thumbnails, 4 larger views
    ('index.html', 8)
    >>> make_report([folder + "/maps.zarr"], folder + "/report",
    ...     show_progress=False).pictures_drawn  # nothing changed: nothing redrawn
    0
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from captum_gradmask._utils import check_positive_int
from captum_gradmask.report import _layout, _pages
from captum_gradmask.report._html import write_if_changed
from captum_gradmask.report._images import Job, run_jobs
from captum_gradmask.report._runs import Run, load_run, unique_names

__all__ = ["ReportSummary", "make_report"]

_CACHE = "report-cache.json"


@dataclass(frozen=True)
class ReportSummary:
    """What :func:`make_report` did.

    Attributes:
        index: the report's ``index.html``.
        pictures_drawn: thumbnails and large views drawn in this call.
        pictures_kept: those kept from an earlier call (nothing they show changed).
        pages_written: HTML pages written (pages whose content is unchanged are not).
        pages: all the report's pages.
    """

    index: Path
    pictures_drawn: int
    pictures_kept: int
    pages_written: int
    pages: int


def make_report(
    stores: Sequence[str | Path],
    out: str | Path,
    *,
    gallery_size: int = 24,
    rows_per_page: int = 250,
    thumbnail_size: int = 112,
    large_size: int = 320,
    workers: int = 0,
    n_resamples: int = 1000,
    seed: int = 0,
    show_progress: bool = True,
) -> ReportSummary:
    """Write a static HTML report of map stores into the folder ``out``.

    Args:
        stores: one or more stores made by ``explain-dataset`` (evaluated or not: the report
            says which metrics are missing and the command that adds them). Stores over the
            same files are compared image by image.
        out: the report's folder (created; a report already there is updated in place).
        gallery_size: pictures per gallery (the ``k`` of each top-k gallery).
        rows_per_page: images per page of the per-image and side-by-side tables.
        thumbnail_size: the longer side of a thumbnail, in pixels.
        large_size: the longer side of each half of a larger view, in pixels.
        workers: processes drawing pictures (0: this process).
        n_resamples, seed: the bootstrap of the intervals.
        show_progress: a progress bar while drawing.

    Returns:
        A :class:`ReportSummary`; open ``summary.index`` in a browser.

    Raises:
        ValueError: no stores, a bad setting (the message names it).
        FileNotFoundError: a store is not there.
        captum_gradmask.store.StoreMismatch: a path is not a map store.
    """
    paths = [Path(s) for s in ([stores] if isinstance(stores, (str, Path)) else stores)]
    if not paths:
        raise ValueError("`stores` is empty: give one or more stores made by explain-dataset")
    for value, name in (
        (gallery_size, "gallery_size"),
        (rows_per_page, "rows_per_page"),
        (thumbnail_size, "thumbnail_size"),
        (large_size, "large_size"),
        (n_resamples, "n_resamples"),
    ):
        check_positive_int(value, name)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"`workers` must be an int >= 0, got {workers!r}")
    out = Path(out)
    runs = [load_run(p, name) for p, name in zip(paths, unique_names(paths), strict=True)]
    keys: set[str] = set()
    for run in runs:
        while run.key in keys:
            run.key += "-2"
        keys.add(run.key)
    layout = _layout.Layout(out, gallery_size, rows_per_page, n_resamples, seed)
    galleries = {run.key: _layout.galleries(run, gallery_size) for run in runs}

    cache_path = out / _CACHE
    cache = _read_cache(cache_path)
    jobs, kept, new_cache = [], 0, {}
    for run in runs:
        size = _picture_size(run, thumbnail_size)
        for job in _thumbnail_jobs(run, layout, size):
            kept += _plan(job, cache, new_cache, jobs)
        shown = sorted({int(i) for g in galleries[run.key] for i in g.indices})
        layout.views[run.key] = set(shown)
        for job in _large_jobs(run, layout, shown, _picture_size(run, large_size)):
            kept += _plan(job, cache, new_cache, jobs)
    total = sum(len(job.indices) for job in jobs)
    with tqdm(total=total, unit="img", desc="report pictures", disable=not show_progress) as bar:
        run_jobs(jobs, workers, bar)

    written, pages = _pages.write_pages(runs, galleries, layout)
    _pages.remove_stale(runs, layout)
    out.mkdir(parents=True, exist_ok=True)
    write_if_changed(cache_path, json.dumps(new_cache, indent=0, sort_keys=True))
    return ReportSummary(out / "index.html", total, kept, written, pages)


def _picture_size(run: Run, longer: int) -> tuple[int, int]:
    """``(height, width)`` with the model input's aspect ratio and ``longer`` as its longer
    side."""
    height, width = (run.attrs.get("identity", {}).get("input_shape") or [3, 1, 1])[-2:]
    if width >= height:
        return max(1, round(longer * height / width)), longer
    return longer, max(1, round(longer * width / height))


def _thumbnail_jobs(run: Run, layout: _layout.Layout, size: tuple[int, int]) -> list[Job]:
    """One job per chunk of the store: its explained rows."""
    jobs = []
    chunk = run.store.chunk_size
    for start in range(0, len(run), chunk):
        stop = min(start + chunk, len(run))
        local = np.flatnonzero(run.explained[start:stop])
        if not len(local):
            continue
        indices = [int(start + i) for i in local]
        maps = np.asarray(run.store.maps[start:stop])[local]
        jobs.append(_job(run, indices, maps, [layout.thumb(run, i) for i in indices], size))
    return jobs


def _large_jobs(
    run: Run, layout: _layout.Layout, indices: list[int], size: tuple[int, int]
) -> list[Job]:
    jobs = []
    for start in range(0, len(indices), 32):
        part = indices[start : start + 32]
        maps = np.asarray(run.store.maps.oindex[np.asarray(part, dtype=np.int64)])
        outputs = [layout.large(run, i) for i in part]
        jobs.append(_job(run, part, maps, outputs, size, large=True))
    return jobs


def _job(
    run: Run,
    indices: list[int],
    maps: np.ndarray,
    outputs: list[Path],
    size: tuple[int, int],
    large: bool = False,
) -> Job:
    return Job(
        indices=indices,
        maps=maps,
        image_paths=[run.image_paths[i] for i in indices],
        boxes=[None if run.boxes is None else run.boxes[i] for i in indices],
        outputs=outputs,
        size=size,
        large=large,
    )


def _plan(job: Job, cache: dict[str, str], new_cache: dict[str, str], jobs: list[Job]) -> int:
    """Queue ``job`` unless the cache says its pictures are on disk as they would be drawn;
    returns the number of pictures kept."""
    name = job.outputs[0].parent.as_posix() + "/" + job.outputs[0].name
    digest = job.digest()
    new_cache[name] = digest
    if cache.get(name) == digest and all(path.is_file() for path in job.outputs):
        return len(job.indices)
    jobs.append(job)
    return 0


def _read_cache(path: Path) -> dict[str, str]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}
