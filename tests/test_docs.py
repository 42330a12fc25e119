"""The code in README.md and docs/usage.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import pytest

from .conftest import needs_shared

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_custom_adapter_example_runs(capsys) -> None:
    exec(compile(_python_blocks(ROOT / "docs" / "usage.md")[0], "usage.md", "exec"), {})
    assert "torch.Size([2, 3, 16, 16])" in capsys.readouterr().out


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize(("doc", "index"), [("README.md", 0), ("docs/usage.md", 1)])
def test_real_model_examples_run(doc: str, index: int, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the examples use ../shared relative to the checkout
    code = _python_blocks(ROOT / doc)[index].replace('"overlay.png"', repr(str(tmp_path / "o.png")))
    code = code.replace("mode=", "mode=").replace("n_perturb_samples=4", "n_perturb_samples=2")
    namespace: dict = {}
    exec(compile(code, doc, "exec"), namespace)
    assert namespace["attr"].shape == namespace.get("pixel_values", namespace.get("x")).shape


def test_methods_doc_holds_the_registry_settings_table() -> None:
    from captum_gradmask.registry import settings_table

    text = (ROOT / "docs" / "methods.md").read_text()
    block = re.search(
        r"<!-- registry-settings:start -->\n(.*?)<!-- registry-settings:end -->", text, re.S
    )
    assert block is not None, "docs/methods.md lost its generated settings table"
    assert block.group(1) == settings_table(), (
        "docs/methods.md's settings table is out of date: paste "
        "captum_gradmask.registry.settings_table() between its markers"
    )


def test_models_doc_holds_the_families_table() -> None:
    import captum_gradmask.zero_shot  # noqa: F401  (registers its adapter)
    from captum_gradmask.adapters import _REGISTRY, FAMILY_NOTES, families_table

    registered = {name for name, _, _ in _REGISTRY}
    assert registered == set(FAMILY_NOTES), (
        "every registered adapter needs a row in FAMILY_NOTES (docs/models.md's table)"
    )
    text = (ROOT / "docs" / "models.md").read_text()
    block = re.search(r"<!-- families:start -->\n(.*?)\n<!-- families:end -->", text, re.S)
    assert block is not None, "docs/models.md lost its generated families table"
    assert block.group(1) == families_table(), (
        "docs/models.md's families table is out of date: paste "
        "captum_gradmask.adapters.families_table() between its markers"
    )


def test_published_tables_in_the_docs_are_the_files_the_runs_wrote(tmp_path) -> None:
    from benchmarks.sync_docs import blocks, sync

    pasted = {doc.name: blocks(doc) for doc in sorted((ROOT / "docs").glob("*.md"))}
    assert pasted["reproducing-the-paper.md"], "the paper's tables are include blocks"
    for doc, found in pasted.items():
        for path, text in found:
            assert path.is_file(), f"docs/{doc} includes {path}, which is missing"
            assert text == path.read_text(), (
                f"docs/{doc}'s copy of {path.relative_to(ROOT)} is out of date: run "
                f"python -m benchmarks.sync_docs docs/{doc}"
            )
    # the tool puts a changed file's text back into its block, and names a missing file
    (tmp_path / "t.md").write_text("new\n")
    doc = tmp_path / "page.md"
    doc.write_text("a\n<!-- include: t.md -->\nold\n<!-- end include -->\nb\n")
    assert sync(doc) == 1 and blocks(doc) == [(tmp_path / "t.md", "new\n")]
    assert doc.read_text() == "a\n<!-- include: t.md -->\nnew\n<!-- end include -->\nb\n"
    assert sync(doc) == 0
    doc.write_text("<!-- include: gone.md -->\nx\n<!-- end include -->\n")
    with pytest.raises(FileNotFoundError, match=r"gone\.md"):
        sync(doc)
