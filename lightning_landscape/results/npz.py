"""One ``.npz`` format for every result kind: named arrays plus a JSON metadata entry.

Every result class (:class:`~lightning_landscape.Landscape`,
:class:`~lightning_landscape.HessianReport`, :class:`~lightning_landscape.PCAResult`)
saves through :func:`save_npz` and loads through :func:`load_npz`, so the file
layout, the atomic write and the errors for a file that is not a result live here once.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: The entry holding the JSON metadata; no array may use this name.
METADATA_KEY = "metadata_json"
#: Written into every file, so a reader can tell a result from any other ``.npz``.
FORMAT = "lightning_landscape/1"


def npz_path(path: str | os.PathLike) -> Path:
    """``path`` with a ``.npz`` suffix (added when missing, as ``numpy.savez`` does).

    Example:
        >>> npz_path("runs/surface").name
        'surface.npz'
    """
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_suffix(".npz")


def save_npz(path: str | os.PathLike, kind: str, arrays: Mapping[str, Any], metadata: Mapping[str, Any]) -> Path:
    """Write ``arrays`` and ``metadata`` (with ``kind``) to one ``.npz`` file, atomically.

    The file is written next to its destination under a temporary name and renamed
    into place, so a crash mid-write never leaves a truncated result behind.

    Example:
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = save_npz(Path(tmp) / "r", "demo", {"x": np.arange(3)}, {"seed": 0})
        ...     arrays, meta = load_npz(path, kinds=("demo",))
        >>> arrays["x"].tolist(), meta["seed"], meta["result_kind"]
        ([0, 1, 2], 0, 'demo')
    """
    path = npz_path(path)
    if METADATA_KEY in arrays:
        raise ValueError(f"array name {METADATA_KEY!r} is reserved for the metadata; rename that array.")
    meta = dict(metadata, result_format=FORMAT, result_kind=kind)
    payload = {name: np.asarray(value) for name, value in arrays.items()}
    # JSON writes floats with repr, which round-trips every float64 exactly (NaN included).
    payload[METADATA_KEY] = np.array(json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_npz(
    path: str | os.PathLike, *, kinds: tuple[str, ...] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by :func:`save_npz`: ``(arrays, metadata)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a readable result (truncated, another
            ``.npz``, another format) or its kind is not one of ``kinds``; the
            message names the file and what was expected.
    """
    path = Path(path)
    expected = "a result saved by lightning_landscape" + (f" of kind {', '.join(map(repr, kinds))}" if kinds else "")
    if not path.is_file():
        raise FileNotFoundError(f"`path`={str(path)!r} does not exist; expected {expected}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            if METADATA_KEY not in data.files:
                raise ValueError(f"`path`={str(path)!r} has no {METADATA_KEY!r} entry; expected {expected}.")
            meta = json.loads(str(data[METADATA_KEY]))
            arrays = {name: data[name] for name in data.files if name != METADATA_KEY}
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, json.JSONDecodeError) as err:
        raise ValueError(
            f"`path`={str(path)!r} cannot be read ({type(err).__name__}: {err}); expected {expected}."
        ) from err
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"`path`={str(path)!r} cannot be read ({err}); expected {expected}.") from err
    kind = meta.get("result_kind")  # None in files written before the kind was stored: accepted
    if kinds is not None and kind is not None and kind not in kinds:
        raise ValueError(f"`path`={str(path)!r} holds a result of kind {kind!r}; expected {expected}.")
    return arrays, meta
