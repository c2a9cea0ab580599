"""``lightning-landscape compare``: several results on one axis, or surfaces side by side on one colour
scale with the same contour levels (the papers' small- vs large-batch and skip vs plain panels), and a
table of their scalars."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from lightning_landscape.cli._errors import CLIError
from lightning_landscape.cli._kinds import PlotOptions, check_metric, limit_axis, load_result
from lightning_landscape.cli._options import comma_list, output_dir, parse_formats, unique_stems
from lightning_landscape.cli._plot import plot_options, save_figure
from lightning_landscape.plots import axis_labels, contour_levels, masked, new_figure
from lightning_landscape.plots._figure import DistinctFormatter, resolve_log_scale
from lightning_landscape.results import CurveResult, Landscape


def shared_scale(surfaces: Sequence[np.ndarray], opts: PlotOptions) -> tuple[np.ndarray, Normalize, bool]:
    """``(levels, norm, log)`` shared by every surface: computed over all their finite values together
    (``opts.vmin``/``opts.vmax`` replace the lowest/highest), log-spaced when all are > 0.

    Example:
        >>> levels, norm, log = shared_scale([np.array([[1.0, 2.0]]), np.array([[4.0]])], PlotOptions(levels=3))
        >>> levels.tolist(), (norm.vmin, norm.vmax), log
        ([1.0, 2.0, 4.0], (1.0, 4.0), False)
    """
    everything = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in surfaces])
    log = resolve_log_scale(everything, opts.log)
    finite = masked(everything, log).compressed()
    if finite.size == 0:
        raise CLIError("the surfaces hold no finite value to draw (all NaN, or none > 0 with --log).")
    lo = float(finite.min()) if opts.vmin is None else opts.vmin
    hi = float(finite.max()) if opts.vmax is None else opts.vmax
    if not lo < hi:  # one flat value everywhere, or a limit past all the data
        hi = lo + max(abs(lo), 1.0) * 1e-6
    levels = np.asarray(contour_levels(masked(np.array([lo, hi]), log), opts.levels), dtype=np.float64)
    norm = LogNorm(vmin=lo, vmax=hi) if log else Normalize(vmin=lo, vmax=hi)
    return levels, norm, log


def compare_surfaces(
    surfaces: Sequence[Landscape], labels: Sequence[str], opts: PlotOptions
) -> tuple[Figure, dict[str, Any]]:
    """One panel per surface, filled contours of ``opts.metric`` (default the loss) with the same levels and
    colour norm in every panel and one colour bar; returns the figure and what each panel drew.

    Values beyond the shared range are clipped to it, so every panel is filled (colours saturate there).

    Example:
        >>> a = np.linspace(-1, 1, 5)
        >>> ls = [Landscape([a, a], {"loss": np.add.outer(a**2, a**2) + s}) for s in (0.1, 1.0)]
        >>> fig, scale = compare_surfaces(ls, ["sharp", "flat"], PlotOptions(levels=5))
        >>> len(fig.axes), scale["panels"][0]["levels"] == scale["panels"][1]["levels"]
        (3, True)
    """
    value = opts.metric or "loss"
    levels, norm, log = shared_scale([ls.values[value] for ls in surfaces], opts)
    fig = new_figure(figsize=(4.2 * len(surfaces) + 1.2, 4.2), layout="constrained")
    axes = fig.subplots(1, len(surfaces), squeeze=False)[0]
    panels = []
    for ax, ls, label in zip(axes, surfaces, labels):
        x, y = ls.coords
        # Masked first (NaN, and <= 0 on a log scale), then clipped: matplotlib wants z[row=y, col=x].
        z = np.ma.clip(masked(ls.values[value], log), levels[0], levels[-1]).T
        filled = ax.contourf(x, y, z, levels=levels, cmap="viridis", norm=norm)
        ax.contour(x, y, z, levels=levels, colors="k", linewidths=0.4, alpha=0.5)
        ax.scatter([0.0], [0.0], marker="*", s=60, color="tab:red", zorder=3)
        xl, yl = axis_labels(ls)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(label)
        panels.append(
            {"label": label, "levels": filled.levels.tolist(), "vmin": filled.norm.vmin, "vmax": filled.norm.vmax}
        )
    bar = fig.colorbar(filled, ax=list(axes), label=value)
    bar.ax.yaxis.set_major_formatter(DistinctFormatter())
    scale = {"value": value, "log": log, "levels": levels.tolist(), "vmin": norm.vmin, "vmax": norm.vmax}
    return fig, {**scale, "panels": panels}


def _curve_xy(result: Any, value: str) -> tuple[np.ndarray, np.ndarray, str]:
    if isinstance(result, CurveResult):
        return result.ts, result.curve[value], "t"
    return result.coords[0], result.values[value], axis_labels(result)[0]


def compare_curves(results: Sequence[Any], labels: Sequence[str], opts: PlotOptions) -> tuple[Figure, dict[str, Any]]:
    """Every 1-D result's ``opts.metric`` (default the loss) on one axis, one line per result.

    Example:
        >>> a = np.linspace(0, 1, 3)
        >>> fig, scale = compare_curves([Landscape([a], {"loss": a + 1})], ["run"], PlotOptions(vmax=5.0))
        >>> scale["ylim"][1]
        5.0
    """
    value = opts.metric or "loss"
    fig = new_figure((6.0, 4.5))
    ax = fig.add_subplot()
    xlabels = []
    for result, label in zip(results, labels):
        x, y, xlabel = _curve_xy(result, value)
        ax.plot(x, masked(y, bool(opts.log)), marker=".", ms=3, label=label)
        xlabels.append(xlabel)
    if opts.log:
        ax.set_yscale("log")
    limit_axis(ax, opts.vmin, opts.vmax)
    ax.set_xlabel(" / ".join(dict.fromkeys(xlabels)))
    ax.set_ylabel(value)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{value} of {len(results)} results")
    fig.tight_layout()
    return fig, {"value": value, "log": bool(opts.log), "ylim": [float(v) for v in ax.get_ylim()]}


def write_table(directory: Path, rows: list[dict[str, Any]], scale: dict[str, Any] | None) -> tuple[Path, Path]:
    """``compare.json`` (the rows and the shared scale) and ``compare.csv`` (one row per result).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     js, table = write_table(Path(tmp), [{"label": "a", "file": "a.npz", "kind": "hessian",
        ...                                          "scalars": {"ratio": 0.5}}], None)
        ...     table.read_text().splitlines()
        ['label,file,kind,ratio', 'a,a.npz,hessian,0.5']
    """
    names = list(dict.fromkeys(name for row in rows for name in row["scalars"]))
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / "compare.json", directory / "compare.csv"
    json_path.write_text(json.dumps({"results": rows, "scale": scale}, indent=2, ensure_ascii=False))
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "file", "kind", *names])
        for row in rows:
            writer.writerow([row["label"], row["file"], row["kind"], *(row["scalars"].get(n, "") for n in names)])
    return json_path, csv_path


def format_table(rows: list[dict[str, Any]]) -> str:
    """The scalars as a text table: one row per scalar, one column per result.

    Example:
        >>> print(format_table([{"label": "a", "scalars": {"loss": 0.5}}, {"label": "b", "scalars": {"loss": 2.0}}]))
        scalar  a    b
        loss    0.5  2
    """
    names = list(dict.fromkeys(name for row in rows for name in row["scalars"]))
    cells = [["scalar", *(row["label"] for row in rows)]]
    for name in names:
        cells.append([name, *(f"{row['scalars'][name]:.6g}" if name in row["scalars"] else "-" for row in rows)])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _labels(cfg: Any, paths: list[Path]) -> list[str]:
    labels = comma_list("--labels", cfg.labels) or unique_stems(paths)
    if len(labels) != len(paths):
        raise CLIError(
            f"--labels={cfg.labels!r} has {len(labels)} names for {len(paths)} files; expected one per file."
        )
    return labels


def _grid_dims(paths: list[Path], loaded: list[tuple[Any, Any, Any]]) -> dict[int, list[int]]:
    """The grid results' indices by dimension; mixing 1-D and 2-D is a usage error."""
    by_dims: dict[int, list[int]] = {}
    for i, (kind, result, _) in enumerate(loaded):
        if kind.dims is not None:
            by_dims.setdefault(kind.dims(result), []).append(i)
    if len(by_dims) > 1:
        one, two = (", ".join(str(paths[i]) for i in by_dims[d]) for d in (1, 2))
        raise CLIError(
            f"FILES mix 1-D results ({one}) and 2-D results ({two}); expected only curves (drawn on one axis) "
            "or only surfaces (drawn side by side)."
        )
    return by_dims


def run_compare(cfg: Any) -> dict[str, Any]:
    """Compare ``cfg.files``: the figure (when they hold grids), ``compare.json``/``compare.csv``, the printed table."""
    opts = plot_options(cfg)
    formats = parse_formats(cfg.format)
    paths = [Path(f) for f in cfg.files]
    labels = _labels(cfg, paths)
    loaded = [load_result(p, "FILES") for p in paths]
    by_dims = _grid_dims(paths, loaded)
    grids = next(iter(by_dims.values()), [])
    for i in grids:
        check_metric(loaded[i][0], loaded[i][1], opts.metric or "loss", paths[i])
    directory = output_dir(cfg.output)
    scale, written = None, []
    if grids:
        results, names = [loaded[i][1] for i in grids], [labels[i] for i in grids]
        draw = compare_surfaces if 2 in by_dims else compare_curves
        fig, scale = draw(results, names, opts)
        written += save_figure(fig, directory, "compare", formats)
    rows = [
        {"label": label, "file": str(path), "kind": kind.name, "scalars": kind.scalars(result)}
        for label, path, (kind, result, _) in zip(labels, paths, loaded)
    ]
    written += write_table(directory, rows, scale)
    print(format_table(rows))
    for path in written:
        print(path)
    return {"results": rows, "scale": scale}
