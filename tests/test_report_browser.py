"""The report in a real browser (headless Chromium driven by Selenium): it loads from disk
without console errors, every picture loads, a table sorts on a click, and a screenshot of it
is not blank. CI installs Debian's ``chromium`` and ``chromium-driver``; elsewhere the tests
skip, saying what is missing."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("zarr", reason="reports read zarr stores: the 'datasets' extra (zarr>=3)")
pytest.importorskip("selenium", reason="browser tests need selenium: pip install -e '.[test]'")

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from captum_gradmask.report import make_report

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared
from .test_report import make_tiny_stores

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get(
    "CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver"
)
ARTIFACTS = Path(os.environ.get("REPORT_SCREENSHOTS", tempfile.gettempdir()))


def _missing(reason: str) -> None:
    """Skip, or fail where the environment says the browser must be there (CI)."""
    if os.environ.get("CAPTUM_GRADMASK_REQUIRE_BROWSER"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        _missing(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    if not Path(CHROMEDRIVER).is_file():
        _missing(
            f"no chromedriver at {CHROMEDRIVER} (apt-get install chromium-driver, or set "
            "CHROMEDRIVER)"
        )
    profile = tempfile.mkdtemp(prefix="report-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # headless, and quiet: this machine (and CI) may have no network to reach
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, path: Path) -> list[dict]:
    """Load ``path`` from disk, load every picture (lazy ones too), return the console's
    errors."""
    driver.get_log("browser")  # drop earlier pages' messages
    driver.get(path.resolve().as_uri())
    driver.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager');")
    driver.set_script_timeout(30)
    driver.execute_async_script(
        """const done = arguments[arguments.length - 1];
        Promise.all(Array.from(document.images).map(i => i.complete ? null :
            new Promise(r => { i.onload = r; i.onerror = r; }))).then(() => done());"""
    )
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def broken_images(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.getAttribute('src'));"
    )


def column_values(driver, table_id: str, column: int) -> list[float]:
    return driver.execute_script(
        f"return Array.from(document.querySelectorAll('#{table_id} tbody tr'))"
        f".map(r => r.cells[{column}].getAttribute('data-value'))"
        ".map(v => v === null ? null : Number(v));"
    )


def check_report(driver, index: Path, screenshot: Path) -> None:
    """Every page loads without console errors and with every picture; the per-image table
    sorts by probability both ways; the overview's screenshot is not blank."""
    out = index.parent
    pages = [index, *sorted(out.glob("rows/*.html"))[:2], *sorted(out.glob("compare/*.html"))]
    pages += sorted(out.glob("view/*/*.html"))[:3]
    images = 0
    for page in pages:
        assert open_page(driver, page) == [], page
        assert broken_images(driver) == [], page
        images += driver.execute_script("return document.images.length;")
    assert images > 10

    open_page(driver, sorted(out.glob("rows/*.html"))[0])
    header = driver.find_elements("css selector", "#rows thead th")
    column = [h.text.strip(" \u2195\u2191\u2193") for h in header].index("probability")
    before = column_values(driver, "rows", column)
    header[column].click()
    ascending = column_values(driver, "rows", column)
    known = [v for v in ascending if v is not None]
    assert len(known) >= 2 and known == sorted(known)
    assert sorted(v for v in before if v is not None) == known  # the same rows, reordered
    assert header[column].get_attribute("aria-sort") == "ascending"
    header[column].click()
    descending = [v for v in column_values(driver, "rows", column) if v is not None]
    assert descending == sorted(known, reverse=True)

    open_page(driver, index)
    png = driver.get_screenshot_as_png()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(png)
    with Image.open(io.BytesIO(png)) as shot:
        pixels = np.asarray(shot.convert("L"), dtype=float)
    assert pixels.shape[0] > 500 and pixels.std() > 20  # text, tables and pictures, not blank


def test_report_of_a_tiny_store_in_chromium(browser, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    stores = make_tiny_stores(tmp_path)
    summary = make_report(stores, tmp_path / "report", gallery_size=4, show_progress=False)
    check_report(browser, summary.index, ARTIFACTS / "report-tiny.png")


@pytest.mark.slow
@needs_shared
def test_report_of_real_stores_in_chromium(browser, tmp_path: Path) -> None:
    """Two methods on 8 shared ImageNet images with the shared ViT-Tiny, evaluated with the
    notebook's insertion/deletion and the pointing game."""
    from captum_gradmask.datasets import open_source
    from captum_gradmask.evaluation import evaluate_store
    from captum_gradmask.explain_dataset import explain_dataset
    from captum_gradmask.models import load_model

    torch.set_num_threads(1)
    model, preprocess = load_model(HF_VIT_TINY)
    images = open_source(IMAGENET_SAMPLE / "annotations.csv", preprocess, limit=8)
    stores = []
    for method in ("gradmask-fast", "rollout"):
        out = tmp_path / f"{method}.zarr"
        explain_dataset(
            images, model, out, method=method, target="label", batch_size=4, chunk_size=4,
            num_workers=0, model_info={"spec": str(HF_VIT_TINY)}, show_progress=False,
        )  # fmt: skip
        evaluate_store(
            out, images, model, metrics=["notebook", "pointing"], batch_size=4, num_workers=0,
            show_progress=False,
        )  # fmt: skip
        stores.append(out)
    summary = make_report(stores, tmp_path / "report", gallery_size=6, show_progress=False)
    html = summary.index.read_text()
    assert "paired" in html and "figures/curves.png" in html
    assert "65: sea snake" in html  # classes named from the model's id2label (image 1's label)
    check_report(browser, summary.index, ARTIFACTS / "report-real.png")
