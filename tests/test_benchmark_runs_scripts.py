"""The scripts of the long benchmark runs (benchmarks/runs/): what they run and publish."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from captum_gradmask.registry import method_names

RUNS = Path(__file__).resolve().parents[1] / "benchmarks" / "runs"
#: computes the same map as ``libragrad`` (its readout's name): not run twice
ALIASES = {"libragrad-fullgrad"}
SIX = ["gradmask-m4", "libragrad", "attnlrp", "tis", "vit-reciprocam", "chefer-gae"]


def _array(script: str, name: str) -> list[str]:
    """The entries of the bash array ``name=( ... )`` in ``script``, as store method names."""
    body = re.search(rf"^{name}=\((.*?)^\)", script, re.S | re.M)
    assert body, f"no array {name} in the script"
    return re.findall(r"/([a-z0-9-]+)\.zarr", body[1])


def test_publish_compares_every_registered_method_once_the_reference_first() -> None:
    script = (RUNS / "publish.sh").read_text()
    others = [name for name in method_names() if name not in ALIASES | {"gradmask-m4"}]
    expected = ["gradmask-m4", *others]
    assert _array(script, "every") == expected
    assert _array(script, "six") == SIX


def test_resume_runs_a_unit_for_every_method_publish_compares() -> None:
    script = (RUNS / "resume.sh").read_text()
    loops = re.findall(r"for method in (.*?); do", script, re.S)
    run = {
        "validation-100": set(loops[0].replace("\\", " ").split()),
        "bench-500-a": set(loops[1].split()),
        "bench-500-b": set(),
    }
    for folder, method in re.findall(r'"(bench-500-[ab])\.([a-z-]+)\|', script):
        run[folder].add(method)  # units listed one by one
    published = set(_array((RUNS / "publish.sh").read_text(), "every"))
    assert set().union(*run.values()) == published
    assert run["bench-500-a"] | run["bench-500-b"] == set(SIX)
    assert not run["validation-100"] & set(SIX)  # compare takes files 401-500 from the six


def test_publish_refuses_while_a_lane_runs(tmp_path: Path) -> None:
    """With a lane's lock held (a lane is running), nothing is compared or copied."""
    lock = RUNS / ".a.lock"
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"])
    try:
        for _ in range(50):  # until the lock is held
            if subprocess.run(["flock", "-n", str(lock), "true"]).returncode != 0:
                break
            subprocess.run(["sleep", "0.1"])
        result = subprocess.run(
            ["bash", str(RUNS / "publish.sh")], capture_output=True, text=True, timeout=60
        )
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert "lane a of resume.sh is still running" in result.stderr


def test_publish_names_its_parts() -> None:
    """publish.sh publishes all, the benchmark or the paper; another word is refused."""
    result = subprocess.run(
        ["bash", str(RUNS / "publish.sh"), "tables"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "unknown part 'tables' (all, benchmark or paper)" in result.stderr


def test_resume_runs_every_paper_configuration_but_the_shared_reference() -> None:
    """A unit per configuration of the paper's analyses (its store and --only name), except
    GradMask m = 4, which the sweep takes from the 500-image store (--reference-store)."""
    from benchmarks.paper_analyses import configs

    script = (RUNS / "resume.sh").read_text()
    body = re.search(r"^paper_configs=\((.*?)^\)", script, re.S | re.M)
    assert body
    units = dict(re.findall(r'"([a-z0-9-]+):([^"]+)"', body[1]))
    expected = {c.store: c.name for c in configs(12) if c.name != "GradMask m=4"}
    assert units == expected
    assert "--reference-store $runs/bench-500-a/stores/gradmask-m4.zarr" in script
