"""``lightning-landscape inspect``: what a saved result holds, as text or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_landscape.cli._kinds import load_result
from lightning_landscape.results import load_npz


def _versions(meta: Any) -> dict[str, str]:
    """Every ``*_version`` entry of the metadata, nested ones included."""
    found: dict[str, str] = {}
    if isinstance(meta, dict):
        for key, value in meta.items():
            if key.endswith("_version") and isinstance(value, str):
                found[key] = value
            else:
                found.update(_versions(value))
    return found


def describe(path: str | Path) -> dict[str, Any]:
    """Everything ``inspect`` shows about a saved result: its kind and analysis, arrays (name, shape,
    dtype), grid (for landscapes and curves), scalars, versions and the stored metadata exactly.

    Example:
        >>> import tempfile
        >>> from lightning_landscape.results import Landscape
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     ls = Landscape([np.arange(3.0)], {"loss": np.ones(3)}, metadata={"seed": 4})
        ...     info = describe(ls.save(tmp + "/s"))
        >>> info["kind"], info["grid"]["shape"], info["metadata"]["seed"]
        ('landscape', [3], 4)
    """
    path = Path(path)
    kind, result, meta = load_result(path)
    arrays, _ = load_npz(path)
    info: dict[str, Any] = {
        "file": str(path),
        "kind": kind.name,
        "analysis": meta.get("kind"),
        "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in arrays.items()},
    }
    if kind.grid is not None:
        info["grid"] = kind.grid(result)
    info["scalars"] = kind.scalars(result)
    info["versions"] = _versions(meta)
    info["metadata"] = meta
    return info


def _short(value: Any, width: int = 100) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def as_text(info: dict[str, Any]) -> str:
    """A readable rendering of :func:`describe`'s dictionary.

    Example:
        >>> print(as_text({"file": "s.npz", "kind": "hessian", "analysis": None, "arrays": {},
        ...                "scalars": {"ratio": 0.5}, "versions": {}, "metadata": {"seed": 0}}))
        s.npz: hessian result
        scalars:
          ratio = 0.5
        metadata:
          seed: 0
    """
    lines = [f"{info['file']}: {info['kind']} result" + (f" ({info['analysis']})" if info.get("analysis") else "")]
    grid = info.get("grid")
    if grid and "axes" in grid:
        axes = ", ".join(f"[{a['min']:.4g}, {a['max']:.4g}] x {a['num']}" for a in grid["axes"])
        lines.append(f"grid: {grid['dims']}-D, shape {tuple(grid['shape'])}; axes {axes}")
        lines.append(f"evaluated: {grid['evaluated']} points (complete: {grid['complete']})")
    if grid and "values" in grid:
        lines.append("values:")
        for name, r in grid["values"].items():
            lo, hi = ("-" if v is None else f"{v:.6g}" for v in (r["min"], r["max"]))
            lines.append(f"  {name}: min {lo}, max {hi}, non-finite {r['num_nonfinite']}")
    if info["arrays"]:
        lines.append("arrays: " + ", ".join(f"{n} {tuple(a['shape'])}" for n, a in info["arrays"].items()))
    if info["scalars"]:
        lines.append("scalars:")
        lines += [f"  {name} = {value:.6g}" for name, value in info["scalars"].items()]
    if info["versions"]:
        lines.append("versions: " + ", ".join(f"{k.removesuffix('_version')} {v}" for k, v in info["versions"].items()))
    shown = {k: v for k, v in info["metadata"].items() if k not in info["versions"]}
    if shown:
        lines.append("metadata:")
        lines += [f"  {key}: {_short(value)}" for key, value in shown.items()]
    return "\n".join(lines)


def run_inspect(cfg: Any) -> dict[str, Any]:
    """Print what ``cfg.file`` holds (``--json``: the dictionary of :func:`describe`, indented)."""
    info = describe(cfg.file)
    print(json.dumps(info, indent=2, ensure_ascii=False) if cfg.json else as_text(info))
    return info
