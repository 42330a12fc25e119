"""docs/architecture.md names every module, and the import rules it states hold."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "captum_gradmask"


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _imported(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth (lazy imports included), absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_architecture_names_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = []
    for path in _modules():
        relative = path.relative_to(PACKAGE).as_posix()
        if path.name == "__init__.py":
            relative = relative.removesuffix("__init__.py")  # the package folder, "methods/"
            if not relative:
                continue  # the package root
        if f"`{relative}`" not in text:
            missing.append(relative)
    assert not missing, f"docs/architecture.md does not name these modules: {missing}"


@pytest.mark.parametrize("module", ["_sharding.py", "_utils.py", "store.py", "stats.py"])
def test_bottom_modules_import_nothing_of_the_package(module: str) -> None:
    inside = {name for name in _imported(PACKAGE / module) if name.startswith("captum_gradmask")}
    assert not inside, f"{module} imports {sorted(inside)}"


def test_library_and_benchmarks_never_import_tests_or_each_other() -> None:
    for path in _modules():
        top = {name.split(".")[0] for name in _imported(path)}
        assert not top & {"benchmarks", "tests", "references"}, path
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        top = {name.split(".")[0] for name in _imported(path)}
        assert "tests" not in top, path


def test_shard_gives_each_pending_row_to_one_rank_in_batches_within_a_chunk() -> None:
    from captum_gradmask._sharding import shard

    done = np.zeros(23, dtype=bool)
    done[[0, 1, 2, 3, 9, 20]] = True
    done[4:8] = True  # chunk 1 (rows 4-7) is complete: no rank gets it
    chunk_size, world = 4, 3
    seen: list[int] = []
    for rank in range(world):
        chunks, batches = shard(done, chunk_size, 2, rank, world)
        assert 0 not in chunks and 1 not in chunks
        for batch in batches:
            assert 1 <= len(batch) <= 2
            assert len({row // chunk_size for row in batch}) == 1
            assert {row // chunk_size for row in batch} <= set(chunks)
            seen += batch
    assert sorted(seen) == np.flatnonzero(~done).tolist()
