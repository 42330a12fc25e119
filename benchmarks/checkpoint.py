"""Make a long benchmark run's folder small enough to commit, so a later machine resumes it.

A run of ``benchmarks.run`` or ``benchmarks.paper_analyses`` outlives the machine it started
on only through what is committed. Everything in a run folder is small except the maps of
pixel-level methods (224 x 224 floats per image; patch grids are kept). Once an image is
scored by every metric group the run asks for, its map is needed again only for ``grid.png``
(the first rows), so this tool lists in ``RUN/.gitignore`` the map chunks whose images are all
scored and lie beyond ``--keep-rows`` (a chunk with an explained image not yet scored is
committed: another machine scores it from there), and takes already committed ones out of
the index. A resumed run finds those images explained and scored and does no work for them;
``compare`` reads their scores, and the grid's rows keep their maps. Nothing is deleted from
this machine.

Example (from the repository root)::

    python -m benchmarks.checkpoint benchmarks/runs/validation-100 \\
        --groups notebook,pointing,adcc
    git add benchmarks/runs && git commit -m "benchmark runs: checkpoint"
"""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from captum_gradmask.store import open_maps

HEADER = "# written by python -m benchmarks.checkpoint: large maps git does not keep\n"


#: Maps of at most this many values an image (patch grids) are small and always kept.
SMALL_MAP = 64 * 64


def prunable_chunks(
    store: str | Path,
    groups: Sequence[str],
    keep_rows: int | Iterable[int],
    small: int = SMALL_MAP,
) -> list[Path]:
    """What of ``store`` (paths relative to it) stays out of git: nothing when its maps have at
    most ``small`` values an image (patch grids); else the ``maps`` chunk files holding none of
    ``keep_rows`` (a number: the first rows; else the rows) and no explained image that some
    group in ``groups`` has not scored yet (its map is needed to score it on another
    machine; ``benchmarks.run --score-every`` keeps such images few)."""
    maps = open_maps(store)
    if np.prod(maps.maps.shape[1:]) <= small:
        return []
    done = np.asarray(maps.done[:], dtype=bool)
    size = maps.chunk_size
    keep = range(keep_rows) if isinstance(keep_rows, int) else keep_rows
    # skipped rows are never scored, so they count as unscored here as before
    unscored = np.flatnonzero(done & ~maps.evaluated(groups))
    kept = {row // size for row in keep} | {int(row) // size for row in unscored}
    out = []
    for chunk in Path(store, "maps", "c").glob("*"):
        if int(chunk.name) not in kept:
            out += [path.relative_to(store) for path in chunk.rglob("*") if path.is_file()]
    return sorted(out)


def checkpoint(
    run: str | Path,
    groups: Sequence[str],
    keep_rows: int | Iterable[int] = 4,
    small: int = SMALL_MAP,
) -> list[Path]:
    """Write ``run/.gitignore`` listing every store's prunable map chunks
    (:func:`prunable_chunks`) and untrack those that are committed; returns the listed paths
    (relative to ``run``)."""
    run = Path(run)
    keep = keep_rows if isinstance(keep_rows, int) else list(keep_rows)
    listed = []
    for store in sorted(run.glob("stores/*.zarr")):
        found = prunable_chunks(store, groups, keep, small)
        listed += [store.relative_to(run) / p for p in found]
    (run / ".gitignore").write_text(HEADER + "".join(f"/{p.as_posix()}\n" for p in listed))
    if listed:
        subprocess.run(
            ["git", "rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", *map(str, listed)],
            cwd=run,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return listed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint")
    parser.add_argument("run", help="a run folder (with stores/)")
    parser.add_argument(
        "--groups", required=True, help="comma-separated metric groups the run scores"
    )
    parser.add_argument(
        "--keep-rows",
        default="0:4",
        help="rows whose maps stay, as START:STOP ranges, comma-separated: the rows grid.png "
        "shows (default 0:4)",
    )
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    rows = []
    for part in args.keep_rows.split(","):
        start, sep, stop = part.partition(":")
        if not sep or not start.strip().isdigit() or not stop.strip().isdigit():
            parser.error(f"--keep-rows {args.keep_rows!r}: give START:STOP ranges (0:4,400:404)")
        rows += range(int(start), int(stop))
    listed = checkpoint(args.run, groups, rows)
    print(f"{args.run}: {len(listed)} map chunk files left out of git")


if __name__ == "__main__":
    main()
