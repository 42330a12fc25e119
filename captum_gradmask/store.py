"""The map store of a dataset run: a zarr (v3) group, chunked along the images.

=================  ===============  =========================================================
array              shape / dtype    holds
=================  ===============  =========================================================
``maps``           (N, h, w) f4     the maps: patch grids, or (N, H, W) for pixel methods
                                    (channels summed); NaN until written or when unreadable
``files``          (N,) str         each image's file (relative to the source) or name
``targets``        (N,) i8          the class explained (-1: not explained)
``predicted``      (N,) i8          the model's top-1 class on the clean image (-1: none)
``probability``    (N,) f4          the target's softmax probability on the clean image
``done``           (N,) bool        the row is final: map written, or the image unreadable
``errors``         (N,) str         why an image was skipped (``""`` when it was explained)
=================  ===============  =========================================================

Every array is cut into chunks of ``chunk_size`` images (one file per chunk, written with an
atomic rename), so writers that own different chunks never touch the same file, and a killed
writer leaves each chunk either as it was or as it became. The group's attributes record the
model, method, settings, target policy, input shape, source and package versions; ``identity``
among them is what a resumed run must match. ``sessions`` lists each run that found work to
do: when it started, how many images were done before it, its device, processes, machine
(CPU, cores, numpy's SIMD targets, GPU) and package versions; each evaluation keeps its own.
Evaluations
(:func:`captum_gradmask.evaluation.evaluate_store`) add a sub-group of per-image metric
columns, ``metrics`` by default.

Readable without this package: ``zarr.open_group(path)["maps"][:10]``, ``numpy.asarray``,
``xarray.open_zarr(path, consolidated=False)`` (dimensions ``image, y, x``) or
``dask.array.from_zarr(path, component="maps")``.

Example::

    >>> import tempfile
    >>> import numpy as np
    >>> from captum_gradmask.store import create_store, open_maps
    >>> path = tempfile.mkdtemp() + "/maps.zarr"
    >>> store = create_store(path, ["a.png", "b.png", "c.png"], (2, 2), chunk_size=2,
    ...     identity={"method": "demo"})
    >>> store.write([1], maps=np.ones((1, 2, 2)), targets=[4], predicted=[4],
    ...     probability=[0.9], errors=[""])
    >>> maps = open_maps(path)
    >>> len(maps), maps.done[:].tolist(), maps[1]["map"].tolist(), maps[1]["target"]
    (3, [False, True, False], [[1.0, 1.0], [1.0, 1.0]], 4)
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT",
    "StoreMismatch",
    "StoredMaps",
    "create_store",
    "files_digest",
    "open_maps",
    "require_zarr",
]

FORMAT = "captum-gradmask/maps"
FORMAT_VERSION = 1
_ROWS = {  # per-image arrays besides maps: dtype and the value of a row never written
    "targets": ("int64", -1),
    "predicted": ("int64", -1),
    "probability": ("float32", np.nan),
    "done": ("bool", False),
    "errors": (str, ""),
}


class StoreMismatch(ValueError):
    """A store exists at the path but was made for other settings (or is no map store)."""


def require_zarr() -> Any:
    """Import ``zarr`` (>= 3) or raise an ``ImportError`` that names the extra to install."""
    try:
        import zarr
    except ImportError as error:
        raise ImportError(
            "dataset runs write zarr stores and need zarr>=3, which is not installed: "
            "pip install 'captum-gradmask[datasets]' (or pip install 'zarr>=3')"
        ) from error
    if int(zarr.__version__.split(".")[0]) < 3:
        raise ImportError(
            f"dataset runs need zarr>=3, found zarr {zarr.__version__}: "
            "pip install -U 'captum-gradmask[datasets]'"
        )
    return zarr


def files_digest(files: Sequence[str]) -> str:
    """SHA-256 of the file list (order included): a run's source, in 64 characters."""
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


class StoredMaps:
    """A map store opened with :func:`open_maps` (reading) or :func:`create_store`.

    The arrays (``maps``, ``files``, ``targets``, ``predicted``, ``probability``, ``done``,
    ``errors``) are zarr arrays: index them (``maps.maps[10:20]``) to read only those chunks.
    ``store[i]`` is one row as a dict.

    Attributes:
        path: the store's folder.
        group: the zarr group.
        attrs: its attributes (settings, versions, ...).
        chunk_size: images per chunk.
    """

    def __init__(self, group: Any, path: str | Path) -> None:
        self.group = group
        self.path = Path(path)
        self.attrs: dict[str, Any] = group.attrs.asdict()
        if self.attrs.get("format") != FORMAT:
            raise StoreMismatch(
                f"{str(self.path)!r} is a zarr group but not a captum-gradmask map store (its "
                f"attribute 'format' is {self.attrs.get('format')!r}, expected {FORMAT!r})"
            )
        self.maps = group["maps"]
        self.files = group["files"]
        self.targets = group["targets"]
        self.predicted = group["predicted"]
        self.probability = group["probability"]
        self.done = group["done"]
        self.errors = group["errors"]
        self.chunk_size = int(self.done.chunks[0])

    def __len__(self) -> int:
        return int(self.done.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        count = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"`index` must be an int, got {type(index).__name__}")
        if not -count <= index < count:
            raise IndexError(f"`index` {index} is out of range for a store of {count} images")
        i = int(index) % count
        return {
            "index": i,
            "file": str(self.files[i]),
            "map": np.asarray(self.maps[i]),
            "target": int(self.targets[i]),
            "predicted": int(self.predicted[i]),
            "probability": float(self.probability[i]),
            "done": bool(self.done[i]),
            "error": str(self.errors[i]),
        }

    @property
    def map_shape(self) -> tuple[int, ...]:
        """Shape of one map: ``(h, w)`` for patch grids, ``(H, W)`` for pixel maps."""
        return tuple(self.maps.shape[1:])

    def skipped(self) -> np.ndarray:
        """``(N,)`` bool: the rows skipped (unreadable image, or no usable target)."""
        return np.asarray(self.errors[:] != "", dtype=bool)

    def evaluated(self, names: Sequence[str]) -> np.ndarray:
        """``(N,)`` bool: the rows scored by every evaluation in ``names`` (one the store does
        not hold scores none), skipped rows left out."""
        done = ~self.skipped()
        for name in names:
            if name not in self.group:
                return np.zeros_like(done)
            done &= np.asarray(self.group[name]["done"][:], dtype=bool)
        return done

    def failed(self) -> list[tuple[int, str, str]]:
        """``(index, file, reason)`` of every skipped row."""
        where = np.flatnonzero(self.skipped())
        files, errors = self.files.oindex[where], self.errors.oindex[where]
        return [(int(i), str(f), str(e)) for i, f, e in zip(where, files, errors, strict=True)]

    def evaluation(self, name: str = "metrics") -> dict[str, np.ndarray]:
        """The per-image columns of an evaluation (see ``evaluate_store``), as numpy arrays."""
        if name not in self.group:
            raise KeyError(
                f"store {str(self.path)!r} has no evaluation {name!r}; run "
                f"`captum-gradmask evaluate {self.path}` first"
            )
        sub = self.group[name]
        return {key: np.asarray(sub[key][:]) for key in sub.attrs["columns"] + ["done"]}

    def write(
        self,
        indices: Sequence[int] | np.ndarray,
        *,
        maps: np.ndarray,
        targets: Sequence[int] | np.ndarray,
        predicted: Sequence[int] | np.ndarray,
        probability: Sequence[float] | np.ndarray,
        errors: Sequence[str],
    ) -> None:
        """Write the rows ``indices`` (sorted, of chunks this writer owns); ``done`` last, so a
        row is marked done only after everything else of it is on disk."""
        where = np.asarray(indices, dtype=np.int64)
        self.maps.oindex[where] = np.asarray(maps, dtype=np.float32).reshape(
            len(where), *self.map_shape
        )
        self.targets.oindex[where] = np.asarray(targets, dtype=np.int64)
        self.predicted.oindex[where] = np.asarray(predicted, dtype=np.int64)
        self.probability.oindex[where] = np.asarray(probability, dtype=np.float32)
        self.errors.oindex[where] = np.asarray(list(errors), dtype=str)
        self.done.oindex[where] = True


def create_store(
    path: str | Path,
    files: Sequence[str],
    map_shape: Sequence[int],
    *,
    chunk_size: int,
    identity: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
) -> StoredMaps:
    """Create a map store, or open the one at ``path`` when it was made with the same identity.

    Args:
        path: the store's folder (``.zarr`` by convention).
        files: the images' files or names, one per row.
        map_shape: ``(h, w)`` of one map.
        chunk_size: images per chunk (the unit of writing and of work sharing).
        identity: JSON-serialisable settings a resumed run must match (model, method, target
            policy, ...). The file list's digest, the map shape and the chunk size are added.
        attrs: more attributes to record (not compared).

    Returns:
        The store, opened for writing.

    Raises:
        StoreMismatch: a store exists at ``path`` with another identity (the message lists
            what differs), or something else is there.
        ImportError: zarr>=3 is not installed.
    """
    zarr = require_zarr()
    path = Path(path)
    files = [str(f) for f in files]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}")
    full_identity = _jsonable(
        {
            **identity,
            "count": len(files),
            "files_sha256": files_digest(files),
            "map_shape": list(map_shape),
            "chunk_size": chunk_size,
        }
    )
    if path.exists():
        if not (path / "zarr.json").is_file():
            raise StoreMismatch(
                f"`out` {str(path)!r} exists and is not a zarr store; choose a new path"
            )
        store = open_maps(path, mode="r+")
        _check_identity(store.attrs.get("identity", {}), full_identity, path)
        return store

    # Built beside the target and renamed into place: a run killed while creating the store
    # leaves no half-made store at `path` (only a `*.partial-*` folder).
    building = path.with_name(f"{path.name}.partial-{uuid.uuid4().hex[:8]}")
    group = zarr.open_group(building, mode="w-")
    group.create_array(
        "maps",
        shape=(len(files), *map_shape),
        chunks=(chunk_size, *map_shape),
        dtype="float32",
        fill_value=np.nan,
        dimension_names=("image", "y", "x")[: 1 + len(map_shape)],
    )
    for name, (dtype, fill) in {**_ROWS, "files": (str, "")}.items():
        group.create_array(
            name,
            shape=(len(files),),
            chunks=(chunk_size,),
            dtype=dtype,
            fill_value=fill,
            dimension_names=("image",),
        )
    group["files"][:] = np.asarray(files, dtype=str)
    group.attrs.update(
        {"format": FORMAT, "format_version": FORMAT_VERSION, "identity": full_identity}
        | _jsonable(dict(attrs or {}))
    )
    building.rename(path)
    return open_maps(path, mode="r+")


def open_maps(path: str | Path, *, mode: str = "r") -> StoredMaps:
    """Open a map store (for reading by default).

    Args:
        path: the store's folder.
        mode: ``"r"`` (read only) or ``"r+"`` (read and write rows).

    Returns:
        A :class:`StoredMaps`: ``len(store)``, ``store[i]`` (a row as a dict), the zarr arrays
        ``store.maps``, ``store.done``, ..., ``store.attrs``, ``store.failed()``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        StoreMismatch: ``path`` is not a map store.
        ImportError: zarr>=3 is not installed.

    Example::

        >>> from captum_gradmask.store import open_maps
        >>> store = open_maps("maps.zarr")  # doctest: +SKIP
        >>> ok = store.done[:] & (store.errors[:] == "")  # doctest: +SKIP
        >>> store.maps.oindex[ok.nonzero()[0]].shape  # doctest: +SKIP
        (498, 14, 14)
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"`mode` must be 'r' or 'r+', got {mode!r}")
    zarr = require_zarr()
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise FileNotFoundError(f"no zarr store at {str(path)!r} (no zarr.json there)")
    return StoredMaps(zarr.open_group(path, mode=mode), path)


def _check_identity(stored: Mapping[str, Any], wanted: Mapping[str, Any], path: Path) -> None:
    keys = sorted(set(stored) | set(wanted))
    differences = [
        f"{key}: store has {_short(stored.get(key))}, this run {_short(wanted.get(key))}"
        for key in keys
        if stored.get(key) != wanted.get(key)
    ]
    if differences:
        raise StoreMismatch(
            f"the store {str(path)!r} was made with other settings, so this run would mix "
            f"maps: {'; '.join(differences)}. Re-run with the store's settings to resume it, or "
            "write to a new --out path"
        )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, numpy/torch scalars as numbers and other objects as
    their ``repr`` (so attributes compare equal after a JSON round trip)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "item") and getattr(value, "numel", lambda: 0)() == 1:
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return repr(value)
