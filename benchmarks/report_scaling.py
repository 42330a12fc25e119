"""How ``captum-gradmask report`` scales with the number of images: time of a first report and
of a re-run with nothing changed, and the size of its largest pages.

Without a model: the store is synthetic (random 14 x 14 maps, predictions, probabilities and
notebook/pointing metrics with curves, in an evaluation sub-group laid out as ``evaluate``
writes it), over real images: the files of ``--images-from`` (a CSV with boxes, e.g. the shared
``annotations.csv``) cycled through symbolic links, so that every thumbnail decodes a real JPEG.

    python -m benchmarks.report_scaling --images 5000 --workers 0 \
        --images-from ../shared/data/imagenet-val-sample/annotations.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from captum_gradmask.report import make_report
from captum_gradmask.store import create_store


def synthetic_store(root: Path, count: int, images_from: Path, seed: int = 0) -> Path:
    """A store of ``count`` rows over links to the images of the CSV ``images_from``."""
    rng = np.random.default_rng(seed)
    with images_from.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_file: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_file.setdefault(row["file"], []).append(row)
    sources = list(by_file)
    (root / "images").mkdir(parents=True)
    listed = []
    for i in range(count):
        source = sources[i % len(sources)]
        link = root / "images" / f"{i:06d}{Path(source).suffix}"
        link.symlink_to((images_from.parent / source).resolve())
        for row in by_file[source]:
            boxes = [row["xmin"], row["ymin"], row["xmax"], row["ymax"]]
            listed.append([f"images/{link.name}", row["label"], *boxes])
    csv_path = root / "list.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "xmin", "ymin", "xmax", "ymax"])
        writer.writerows(listed)
    files = [f"images/{i:06d}{Path(sources[i % len(sources)]).suffix}" for i in range(count)]
    labels = np.array([int(by_file[sources[i % len(sources)]][0]["label"]) for i in range(count)])
    store = create_store(
        root / "maps.zarr",
        files,
        (14, 14),
        chunk_size=32,
        identity={"method": "synthetic", "input_shape": [3, 224, 224]},
        attrs={"method": "synthetic", "source": str(csv_path.resolve()), "target": "label"},
    )
    predicted = np.where(rng.random(count) < 0.7, labels, rng.integers(0, 1000, count))
    for start in range(0, count, 4096):
        where = np.arange(start, min(start + 4096, count))
        store.write(
            where,
            maps=rng.random((len(where), 14, 14), dtype=np.float32),
            targets=labels[where],
            predicted=predicted[where],
            probability=rng.random(len(where)),
            errors=[""] * len(where),
        )
    metrics = store.group.create_group("metrics")
    fractions = np.linspace(0.0, 1.0, 11)
    columns = ["insertion_notebook", "deletion_notebook", "pointing_0", "pointing_15"]
    values = {
        "insertion_notebook": rng.random(count) * 99,
        "deletion_notebook": rng.random(count) * 40,
        "pointing_0": (rng.random(count) < 0.6).astype(float),
        "pointing_15": (rng.random(count) < 0.8).astype(float),
    }
    for column in [*columns, "done"]:
        array = metrics.create_array(column, shape=(count,), chunks=(32,), dtype="float32")
        array[:] = np.ones(count) if column == "done" else values[column]
    for column in columns[:2]:
        array = metrics.create_array(
            f"curve_{column}", shape=(count, len(fractions)), chunks=(32, len(fractions)),
            dtype="float32",
        )  # fmt: skip
        array[:] = rng.random((count, len(fractions)))
    metrics.attrs.update(
        {
            "metrics": ["notebook", "pointing"],
            "columns": columns,
            "curves": {c: fractions.tolist() for c in columns[:2]},
        }
    )
    return root / "maps.zarr"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--images-from", type=Path, required=True, help="a CSV with boxes")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder (default: a temporary one)")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="report-scaling-"))
    store = synthetic_store(root, args.images, args.images_from)
    timings = {}
    for label in ("first", "rerun"):
        start = time.perf_counter()
        summary = make_report([store], root / "report", workers=args.workers)
        timings[label] = round(time.perf_counter() - start, 1)
    pages = sorted((root / "report").rglob("*.html"), key=lambda p: p.stat().st_size)
    thumbs = list((root / "report" / "thumbs").rglob("*.jpg"))
    result = {
        "images": args.images,
        "workers": args.workers,
        "seconds": timings,
        "pictures": summary.pictures_kept,
        "pages": summary.pages,
        "index_kib": round((root / "report" / "index.html").stat().st_size / 1024, 1),
        "largest_page_kib": round(pages[-1].stat().st_size / 1024, 1),
        "mean_thumbnail_kib": round(sum(p.stat().st_size for p in thumbs) / len(thumbs) / 1024, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
