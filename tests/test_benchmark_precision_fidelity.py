"""The precision fidelity script end to end on one shared image, at its smallest settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import precision_fidelity

from .conftest import HF_VIT_TINY, IMAGENET_SAMPLE, needs_shared


@needs_shared
@pytest.mark.slow
def test_one_image_resumes_and_reports(tmp_path: Path, capsys) -> None:
    rows = tmp_path / "rows.jsonl"
    argv = [
        "--model", str(HF_VIT_TINY), "--data", str(IMAGENET_SAMPLE), "--images", "1",
        "--masks-per-layer", "1", "--tie-samples", "2", "--threads", "1", "--out", str(rows),
    ]  # fmt: skip
    precision_fidelity.main(argv)
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    for name in ("bf16", "fp16"):
        assert row[f"{name}_masks_identical"] and row[f"{name}_mask_agreement"] == 1.0
        assert row[f"{name}_finite"] and row[f"{name}_spearman"] >= 0.95
        assert 0 <= row[f"{name}_max_rel_error"] < 0.1
    for name in precision_fidelity.PRECISIONS:
        assert row[f"{name}_seconds"] > 0 and row[f"{name}_pointing_15"] in (0.0, 1.0)
        assert 0 <= row[f"{name}_deletion"] <= 99 and 0 <= row[f"{name}_insertion"] <= 99
    assert row["settings"]["masks_per_layer"] == "1" and row["index"] == 0

    precision_fidelity.main(argv)  # resumed: the image is done, nothing is appended
    assert len(rows.read_text().splitlines()) == 1
    with pytest.raises(SystemExit, match="other settings"):
        precision_fidelity.main([*argv, "--seed", "1"])

    report = tmp_path / "precision.md"
    precision_fidelity.main(["--report", str(rows), "--report-out", str(report)])
    text = report.read_text()
    assert "| bf16 |" in text and "| fp16 |" in text and "insertion" in text
    summary = json.loads(report.with_suffix(".json").read_text())
    assert summary["images"] == 1
    assert summary["precisions"]["bf16"]["masks_identical"] == 1.0
    assert "| fp16 |" in capsys.readouterr().out

    # a row whose timing was void (a paused process) counts for fidelity, not for the seconds
    void = {**row, "file": "void.JPEG", "bf16_seconds": None}
    rows.write_text(rows.read_text() + json.dumps(void) + "\n")
    precision_fidelity.main(["--report", str(rows), "--report-out", str(report)])
    summary = json.loads(report.with_suffix(".json").read_text())
    assert summary["images"] == 2
    assert summary["precisions"]["bf16"]["seconds_per_image"] == pytest.approx(row["bf16_seconds"])
