"""Refresh the published tables pasted into the docs from the files a run wrote.

A doc pastes a file (a ``table.md``, ``paired.md``, ``standing.md`` or ``cost.md`` that
``compare`` wrote under ``docs/``) between two markers, the path relative to the doc::

    <!-- include: benchmarks/files-1-500/table.md -->
    (the file's text)
    <!-- end include -->

This tool rewrites every such block with the file's current text, so a re-published run
reaches the pages without hand copying; ``tests/test_docs.py`` fails while a block differs
from its file. Example (from the repository root)::

    python -m benchmarks.sync_docs docs/benchmarks.md docs/reproducing-the-paper.md
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

BLOCK = re.compile(r"(<!-- include: (\S+) -->\n)(.*?)(<!-- end include -->)", re.S)


def blocks(doc: str | Path) -> list[tuple[Path, str]]:
    """Each include block of ``doc``: the file it names (resolved from the doc's folder) and
    the text the doc holds for it."""
    doc = Path(doc)
    return [(doc.parent / m.group(2), m.group(3)) for m in BLOCK.finditer(doc.read_text())]


def sync(doc: str | Path) -> int:
    """Rewrite ``doc``'s include blocks with their files' text; returns how many changed.

    Raises:
        FileNotFoundError: a block names a file that does not exist (the path is named).
    """
    doc = Path(doc)
    changed = 0

    def fill(match: re.Match[str]) -> str:
        nonlocal changed
        path = doc.parent / match.group(2)
        if not path.is_file():
            raise FileNotFoundError(f"{doc}: the include block names {path}, which is missing")
        text = path.read_text()
        changed += text != match.group(3)
        return match.group(1) + text + match.group(4)

    text = BLOCK.sub(fill, doc.read_text())
    if changed:
        doc.write_text(text)
    return changed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sync_docs")
    parser.add_argument("docs", nargs="+", help="markdown files with include blocks")
    for doc in parser.parse_args(argv).docs:
        print(f"{doc}: {sync(doc)} include blocks refreshed")


if __name__ == "__main__":
    main()
