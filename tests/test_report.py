"""The HTML report of map stores: content, caps, pages, comparison, curves, re-runs, CLI."""

from __future__ import annotations

import csv
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("zarr", reason="reports read zarr stores: the 'datasets' extra (zarr>=3)")

from captum_gradmask.cli import main
from captum_gradmask.datasets import open_source
from captum_gradmask.evaluation import evaluate_store
from captum_gradmask.explain_dataset import explain_dataset
from captum_gradmask.metrics import gradmask_notebook_insertion
from captum_gradmask.models import load_model
from captum_gradmask.report import make_report
from captum_gradmask.report._images import Job, draw_job
from captum_gradmask.stats import bootstrap_ci
from captum_gradmask.store import open_maps

from .models import tiny_hf_vit

IMAGES = 10
CHUNK = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_tiny_stores(root: Path, methods=("gradmask-m1", "rollout"), evaluate=True) -> list[Path]:
    """A tiny random ViT (7 classes, 32 x 32), ``IMAGES`` random PNGs of several sizes listed in
    a CSV with labels and boxes, one unreadable file, and one store per method (evaluated with
    notebook and pointing when ``evaluate``)."""
    from transformers import ViTImageProcessor

    tiny_hf_vit().save_pretrained(root / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    rows = []
    for i in range(IMAGES):
        pixels = rng.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        rows.append([f"images/{i}.png", i % 3, 2, 3, 20, 25])
    (root / "images" / "bad.png").write_bytes(b"not a png")
    rows.append(["images/bad.png", 1, 0, 0, 5, 5])
    with (root / "list.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "xmin", "ymin", "xmax", "ymax"])
        writer.writerows(rows)
    model, preprocess = load_model(root / "model")
    images = open_source(root / "list.csv", preprocess)
    stores = []
    for method in methods:
        out = root / f"{method}.zarr"
        explain_dataset(
            images, model, out, method=method, batch_size=4, chunk_size=CHUNK,
            num_workers=0, show_progress=False,
        )  # fmt: skip
        if evaluate:
            evaluate_store(
                out, images, model, metrics=["notebook", "pointing"], batch_size=4,
                num_workers=0, show_progress=False,
            )  # fmt: skip
        stores.append(out)
    return stores


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_tiny_stores(tmp_path_factory.mktemp("report-stores"))


class _Page(HTMLParser):
    """The images, links and tables of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        elif tag == "table":
            self._table = attrs.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = [attrs.get("data-value") or ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            value, *text = self._cell
            self.tables[self._table][-1].append(value or "".join(text).strip())
            self._cell = None
        elif tag == "table":
            self._table = None


def parse(path: Path) -> _Page:
    parsed = _Page()
    parsed.feed(path.read_text())
    return parsed


def test_report_sections_caps_and_files(stores: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    summary = make_report(
        stores, out, gallery_size=2, rows_per_page=4, thumbnail_size=48, show_progress=False
    )
    index = parse(summary.index)
    html = summary.index.read_text()
    # every picture and link of every page is a file of the report (opens from disk)
    pages = sorted(out.rglob("*.html"))
    assert summary.pages == len(pages)
    for page in pages:
        parsed = parse(page)
        for src in parsed.images:
            assert (page.parent / src).is_file(), (page, src)
            assert not src.startswith(("http:", "https:", "//"))
        for href in parsed.links:
            target = href.split("#")[0]
            assert not target or (page.parent / target).is_file(), (page, href)
        assert "<script src" not in page.read_text() and 'rel="stylesheet"' not in page.read_text()
    # run cards name each store's method; the summary has each evaluated metric with an interval
    assert "<code>gradmask-m1</code>" in html and "<code>rollout</code>" in html
    rows = {row[0]: row[1:] for row in index.tables["summary"][1:]}
    maps = open_maps(stores[0])
    insertion = maps.evaluation()["insertion_notebook"]
    mean, low, high = bootstrap_ci(insertion[~np.isnan(insertion)].tolist(), 1000, seed=0)
    assert float(rows["insertion_notebook"][0]) == pytest.approx(mean, rel=1e-6)
    assert f"[{low:.4g}, {high:.4g}]" in html
    assert "pointing_0 (%)" in rows and "top-1 accuracy (%)" in rows
    # the stores lack rise and adcc: the report says so and gives the command
    assert "has no rise, adcc metrics" in html
    assert f"captum-gradmask evaluate {stores[0]} --metrics rise --name rise" in html
    # per-class table: one row per label (0, 1, 2), counts of explained images
    classes = index.tables["classes-gradmask-m1-zarr"]
    counts = {row[0].split(":")[0]: int(float(row[1])) for row in classes[1:]}
    assert counts == {"0": 4, "1": 3, "2": 3}
    # galleries are capped at k = 2; the pointing misses are the first misses in store order
    galleries = re.findall(r'<div class="gallery">(.*?)</div>', html, re.S)
    assert galleries and all(g.count("<figure>") <= 2 for g in galleries)
    misses = np.flatnonzero(maps.evaluation()["pointing_0"] == 0)[:2]
    section = html.split("<h3>Pointing-game misses</h3>")[1].split("<h3>")[0]
    shown = [int(i) for i in re.findall(r"<figcaption>#(\d+)", section)]
    assert shown == misses.tolist()
    # every image is on a page of at most 4 rows; the unreadable one says why
    row_pages = sorted((out / "rows").glob("gradmask-m1*.html"))
    assert len(row_pages) == math.ceil((IMAGES + 1) / 4)
    listed = [parse(p).tables["rows"][1:] for p in row_pages]
    assert all(len(rows) <= 4 for rows in listed)
    assert sorted(int(float(r[1])) for rows in listed for r in rows) == list(range(IMAGES + 1))
    assert "UnidentifiedImageError" in row_pages[-1].read_text()
    # the thumbnails are drawn at the requested size, one per explained image
    thumbs = sorted((out / "thumbs" / "gradmask-m1-zarr").rglob("*.jpg"))
    assert len(thumbs) == IMAGES
    with Image.open(thumbs[0]) as thumb:
        assert thumb.size == (48, 48)


def test_comparison_of_two_stores_is_paired(stores: list[Path], tmp_path: Path) -> None:
    summary = make_report(stores, tmp_path / "report", rows_per_page=6, show_progress=False)
    index = parse(summary.index)
    paired = index.tables["paired"]
    assert paired[0][:3] == ["metric", "A", "B"]
    row = next(r for r in paired[1:] if r[0] == "insertion_notebook")
    a = open_maps(stores[0]).evaluation()["insertion_notebook"]
    b = open_maps(stores[1]).evaluation()["insertion_notebook"]
    both = ~np.isnan(a) & ~np.isnan(b)
    assert int(float(row[3])) == both.sum() == IMAGES
    assert float(row[6]) == pytest.approx(float((a[both] - b[both]).mean()), rel=1e-5)
    assert float(row[7]) == pytest.approx(100 * np.mean(a[both] > b[both]), rel=1e-6)
    # side by side: one row per image, one picture per store in each explained row
    pages = sorted((tmp_path / "report" / "compare").glob("group0-*.html"))
    assert len(pages) == 2
    first = parse(pages[0])
    assert len(first.tables["compare"]) == 1 + 6
    assert len(first.images) == 2 * 6
    assert any("gradmask-m1-zarr" in s for s in first.images)
    assert any("rollout-zarr" in s for s in first.images)


def test_curves_recorded_by_evaluate_and_drawn(stores: list[Path], tmp_path: Path) -> None:
    maps = open_maps(stores[0])
    results = maps.group["metrics"]
    fractions = results.attrs["curves"]["insertion_notebook"]
    curves = np.asarray(results["curve_insertion_notebook"][:])
    model, preprocess = load_model(stores[0].parent / "model")
    images = open_source(stores[0].parent / "list.csv", preprocess)
    pixels, saliency = images[2][0][None], torch.from_numpy(maps.maps[2][None])
    expected = gradmask_notebook_insertion(
        model, pixels, saliency, int(maps.targets[2]), ties="random", tie_samples=10, seed=0
    )  # the mean curve over the headline's random tie orders
    assert fractions == pytest.approx(expected.fractions.tolist(), abs=1e-6)
    assert curves[2] == pytest.approx(expected.probabilities[0].numpy(), abs=1e-5)
    assert np.isnan(curves[IMAGES]).all()  # the unreadable image has none
    out = tmp_path / "report"
    make_report(stores, out, show_progress=False)
    assert 'src="figures/curves.png"' in (out / "index.html").read_text()
    with Image.open(out / "figures" / "curves.png") as figure:
        assert np.asarray(figure.convert("L")).std() > 10


def test_rerun_redraws_only_what_changed(tmp_path: Path) -> None:
    root = tmp_path / "stores"
    root.mkdir()
    (store,) = make_tiny_stores(root, methods=("gradmask-m1",), evaluate=False)
    out = tmp_path / "report"
    first = make_report([store], out, gallery_size=2, show_progress=False)
    assert first.pictures_drawn > 0 and first.pictures_kept == 0
    html = (out / "index.html").read_text()
    assert "has no notebook, rise, pointing, adcc metrics" in html  # nothing evaluated
    assert "--metrics pointing --name pointing" in html
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = make_report([store], out, gallery_size=2, show_progress=False)
    assert again.pictures_drawn == 0 and again.pages_written == 0
    assert again.pictures_kept == first.pictures_drawn
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # one map of the second chunk changes: only that chunk's thumbnails are redrawn
    changed = CHUNK + 1
    writable = open_maps(store, mode="r+")
    row = writable[changed]
    writable.write(
        [changed], maps=row["map"][None] * 0 + 1.0, targets=[row["target"]],
        predicted=[row["predicted"]], probability=[row["probability"]], errors=[""],
    )  # fmt: skip
    third = make_report([store], out, gallery_size=2, show_progress=False)
    thumbs = lambda chunk: sorted((out / "thumbs" / "gradmask-m1-zarr" / str(chunk)).glob("*"))  # noqa: E731
    assert third.pictures_drawn >= CHUNK  # the chunk (and larger views showing that row)
    assert third.pictures_drawn < first.pictures_drawn
    assert all(p.stat().st_mtime_ns == stamps[p] for p in thumbs(0) + thumbs(2))
    assert all(p.stat().st_mtime_ns != stamps[p] for p in thumbs(1))


def test_picture_shows_map_boxes_and_maximum(tmp_path: Path) -> None:
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((20, 40, 3), 100, dtype=np.uint8)).save(image)  # 40 wide, 20 high
    saliency = np.zeros((4, 4), dtype=np.float32)
    saliency[1, 3] = 5.0  # right column, second row
    out = tmp_path / "pic.jpg"
    job = Job([0], saliency[None], [image], [np.array([[0.0, 10.0, 20.0, 20.0]])], [out], (64, 64))
    draw_job(job)
    with Image.open(out) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    hot, cold = pixels[24, 56], pixels[56, 8]  # cell (1, 3) centre, inside the ring
    assert hot[0] > cold[0] + 60 and hot[1] > cold[1] + 60  # inferno's bright end over the hot cell
    # the box (x 0..20 of 40 -> 0..32, y 10..20 of 20 -> 32..64) in cyan on its top edge
    edge = pixels[32, 16]
    assert edge[1] > edge[0] + 60 and edge[2] > edge[0] + 60
    # the maximum is ringed in white
    assert (pixels[20:29, 52:61].min(axis=2) > 200).any()


def test_cli_report_and_bad_arguments(stores: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli-report"
    args = ["report", *map(str, stores), "--out", str(out), "--gallery-size", "3", "--quiet"]
    assert main(args) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    assert main(["report", str(stores[0]), "--out", str(out), "--gallery-size", "0"]) == 2
    assert "`gallery_size`" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none.zarr"), "--out", str(out)]) == 2
    assert "none.zarr" in capsys.readouterr().err
    with pytest.raises(ValueError, match="`stores` is empty"):
        make_report([], out)
    with pytest.raises(ValueError, match="`workers`"):
        make_report(stores, out, workers=-1)


def test_docs_list_every_report_option() -> None:
    from captum_gradmask.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    flags = {f for a in commands.choices["report"]._actions for f in a.option_strings}
    flags -= {"-h", "--help"}
    docs = (Path(__file__).resolve().parents[1] / "docs" / "report.md").read_text()
    assert flags and all(f"`{flag}`" in docs for flag in flags), flags


def test_worker_processes_draw_the_same_pictures(stores: list[Path], tmp_path: Path) -> None:
    alone = make_report(stores[:1], tmp_path / "alone", show_progress=False)
    pooled = make_report(stores[:1], tmp_path / "pooled", workers=2, show_progress=False)
    assert pooled.pictures_drawn == alone.pictures_drawn > IMAGES
    pictures = sorted(
        p.relative_to(tmp_path / "alone") for p in (tmp_path / "alone").rglob("*.jpg")
    )
    assert pictures == sorted(
        p.relative_to(tmp_path / "pooled") for p in (tmp_path / "pooled").rglob("*.jpg")
    )
    for path in pictures:
        assert (tmp_path / "alone" / path).read_bytes() == (tmp_path / "pooled" / path).read_bytes()


def test_pixel_level_maps_and_a_moved_source(tmp_path: Path) -> None:
    """Pixel maps (32 x 32, signed) are drawn like grids; without its source the report still
    draws every map (over grey) and says that mistakes are unknown."""
    root = tmp_path / "stores"
    root.mkdir()
    (store,) = make_tiny_stores(root, methods=("saliency",), evaluate=False)
    assert open_maps(store).map_shape == (32, 32)
    summary = make_report([store], tmp_path / "report", show_progress=False)
    assert len(list((tmp_path / "report" / "thumbs").rglob("*.jpg"))) == IMAGES
    assert "mistakes are unknown" not in summary.index.read_text()
    (root / "list.csv").rename(root / "moved.csv")
    moved = make_report([store], tmp_path / "moved", show_progress=False)
    assert "mistakes are unknown" in moved.index.read_text()
    assert len(list((tmp_path / "moved" / "thumbs").rglob("*.jpg"))) == IMAGES
