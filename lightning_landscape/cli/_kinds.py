"""What the command line knows about each saved result kind: how to load it, draw it, summarise it.

One :class:`Kind` per ``result_kind`` written by :func:`~lightning_landscape.results.save_npz`, all in
:data:`KINDS`; a new result kind is one more entry there. Figures come from the package's own figure
functions; ``--vmin``/``--vmax`` fix a 2-D figure's colour scale and levels, drawn on a copy of the
landscape clipped to them (see :func:`clipped`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_landscape.cli._errors import CLIError
from lightning_landscape.plots import (
    plot_contour,
    plot_curve,
    plot_density,
    plot_eigenvalues,
    plot_heatmap,
    plot_path,
    plot_ratio_map,
    plot_surface_3d,
)
from lightning_landscape.plots.interpolation import plot_interpolation
from lightning_landscape.results import CurveResult, HessianReport, Landscape, PCAResult, SharpnessReport, load_npz
from lightning_landscape.results.curve import barrier_height


@dataclass
class PlotOptions:
    """The drawing options of ``plot`` and ``compare``: contour ``levels``, colour/axis limits ``vmin`` and
    ``vmax``, ``log`` (True: a log scale; None: the figure's automatic choice) and the ``metric`` to draw.

    Example:
        >>> PlotOptions(levels=12).levels
        12
    """

    levels: int = 30
    vmin: float | None = None
    vmax: float | None = None
    log: bool | None = None
    metric: str | None = None


def clipped(landscape: Landscape, value: str, vmin: float | None, vmax: float | None) -> Landscape:
    """A copy of ``landscape`` with ``values[value]`` clipped to [vmin, vmax] (NaN stays NaN).

    The figure functions fix their colour scale to ``vmin``/``vmax``; on the clipped copy the
    contour levels end at the limits wherever the values reach past them (colours saturate there,
    as matplotlib's own vmin/vmax do). The saved result is never changed.

    Example:
        >>> ls = Landscape(coords=[np.arange(3.0)], values={"loss": np.array([0.5, np.nan, 9.0])})
        >>> clipped(ls, "loss", None, 2.0).loss.tolist(), ls.loss.tolist()[2]
        ([0.5, nan, 2.0], 9.0)
    """
    if vmin is None and vmax is None:
        return landscape
    values = dict(landscape.values)
    values[value] = np.clip(values[value], vmin, vmax)
    return Landscape(
        coords=list(landscape.coords),
        values=values,
        evaluated=landscape.evaluated,
        metadata=dict(landscape.metadata),
        extras=dict(landscape.extras),
    )


def limit_axis(ax: Any, vmin: float | None, vmax: float | None) -> None:
    """Set the y limits of ``ax`` to ``vmin``/``vmax`` where given; a single limit beyond all the data
    keeps the axis' current span on its side, so the axis never turns upside down.

    Example:
        >>> from lightning_landscape.plots import new_figure
        >>> ax = new_figure().add_subplot()
        >>> _ = ax.plot([0, 1], [2.0, 3.0])
        >>> limit_axis(ax, None, 1.0)
        >>> lo, hi = ax.get_ylim()
        >>> bool(lo < hi == 1.0)
        True
    """
    if vmin is None and vmax is None:
        return
    auto_lo, auto_hi = ax.get_ylim()
    lo = auto_lo if vmin is None else vmin
    hi = auto_hi if vmax is None else vmax
    if not lo < hi:
        log = ax.get_yscale() == "log"
        if vmin is None:
            lo = hi / 10 if log else hi - (abs(auto_hi - auto_lo) or 1.0)
        else:
            hi = lo * 10 if log else lo + (abs(auto_hi - auto_lo) or 1.0)
    ax.set_ylim(lo, hi)


def _limit_y(fig: Figure, opts: PlotOptions, log: bool = False) -> Figure:
    # A curve's vmin/vmax are its loss axis' limits; matplotlib sets them on the figure directly.
    ax = fig.axes[0]
    if log:
        ax.set_yscale("log")
    limit_axis(ax, opts.vmin, opts.vmax)
    return fig


def landscape_values(ls: Landscape) -> list[str]:
    """The names ``--metric`` accepts for a landscape: its values.

    Example:
        >>> landscape_values(Landscape(coords=[np.arange(2.0)], values={"loss": np.ones(2), "accuracy": np.ones(2)}))
        ['loss', 'accuracy']
    """
    return list(ls.values)


def _curve_figures(ls: Landscape, opts: PlotOptions) -> dict[str, Figure]:
    metric = None if opts.metric == "loss" else opts.metric
    if ls.metadata.get("kind") == "interpolation":
        return {"interpolation": _limit_y(plot_interpolation(ls, metric=metric), opts, bool(opts.log))}
    if metric is None:
        metric = next((name for name in ls.values if name != "loss"), None)
    return {"curve": _limit_y(plot_curve(ls, metric=metric, log_scale=opts.log), opts)}


def landscape_figures(ls: Landscape, opts: PlotOptions) -> dict[str, Figure]:
    """The figures of a saved landscape, by its analysis (``metadata["kind"]``) and dimension.

    A 1-D landscape gives its curve (``interpolation`` for two runs); a trajectory its PCA plane with
    the path, and the path alone; a ratio map its two panels; Garipov's curve plane its plane; any other
    2-D landscape contour lines, filled contours, a heat map and a 3-D surface of ``opts.metric``.

    Example:
        >>> a = np.linspace(-1, 1, 5)
        >>> sorted(landscape_figures(Landscape(coords=[a, a], values={"loss": np.add.outer(a, a) + 3}), PlotOptions()))
        ['contour', 'contour_filled', 'heatmap', 'surface_3d']
    """
    if ls.dims == 1:
        return _curve_figures(ls, opts)
    value = opts.metric or "loss"
    view = clipped(ls, value, opts.vmin, opts.vmax)
    limits = {"vmin": opts.vmin, "vmax": opts.vmax}
    common = {"levels": opts.levels, "log_scale": opts.log, "value": value, **limits}
    analysis = ls.metadata.get("kind")
    if analysis == "trajectory" and "path" in ls.extras:
        epochs = np.asarray(ls.extras.get("epochs", np.zeros(len(ls.extras["path"]))))
        starts = np.flatnonzero(np.r_[True, epochs[1:] != epochs[:-1]])
        title = "loss on the PCA plane, with the optimization path"
        contour = plot_contour(view, path=ls.extras["path"], path_markers=starts, title=title, **common)
        evr = ls.extras.get("explained_variance_ratio")
        return {
            "contour_path": contour,
            "path": plot_path(ls.extras["path"], epochs=epochs, explained_variance_ratio=evr),
        }
    if analysis == "curve_plane" and {"points", "curve_path"} <= set(ls.extras):
        from lightning_landscape.plots.curves import plot_curve_plane

        return {"plane": plot_curve_plane(view, **common)}
    figures = {}
    if "ratio" in ls.values:
        figures["ratio_map"] = plot_ratio_map(view, levels=opts.levels)
    figures.update(
        contour=plot_contour(view, **common),
        contour_filled=plot_contour(view, filled=True, **common),
        heatmap=plot_heatmap(view, log_scale=opts.log, value=value, **limits),
        surface_3d=plot_surface_3d(view, log_scale=opts.log, value=value, **limits),
    )
    return figures


def _ends(alphas: np.ndarray) -> tuple[int, int] | None:
    span = float(alphas[-1] - alphas[0]) or 1.0
    found = [int(np.argmin(np.abs(alphas - a))) for a in (0.0, 1.0)]
    if all(abs(alphas[i] - a) <= 1e-9 * span for i, a in zip(found, (0.0, 1.0))):
        return found[0], found[1]
    return None


def interpolation_scalars(ls: Landscape) -> dict[str, float]:
    """Each value at both runs (``loss_start``, ``val_accuracy_end``, ...) and the barrier of each loss:
    max over α in [0, 1] of the loss minus the larger end loss (``barrier``, ``val_barrier``).

    Empty when the grid does not hold α = 0 and α = 1.

    Example:
        >>> a = np.linspace(-0.5, 1.5, 5)
        >>> ls = Landscape(coords=[a], values={"loss": np.array([3.0, 1.0, 2.5, 2.0, 4.0])})
        >>> interpolation_scalars(ls)
        {'loss_start': 1.0, 'loss_end': 2.0, 'barrier': 0.5}
    """
    ends = _ends(ls.coords[0])
    if ends is None:
        return {}
    i0, i1 = ends
    out: dict[str, float] = {}
    for name, values in ls.values.items():
        out[f"{name}_start"], out[f"{name}_end"] = float(values[i0]), float(values[i1])
    for name, values in ls.values.items():
        if name == "loss" or name.endswith("_loss"):
            prefix = name[: -len("loss")]
            out[f"{prefix}barrier"] = barrier_height(values[i0 : i1 + 1])
    return out


def landscape_scalars(ls: Landscape) -> dict[str, float]:
    """:meth:`Landscape.summary`, the smallest and largest finite loss, and for two runs' interpolation
    :func:`interpolation_scalars`.

    Example:
        >>> ls = Landscape(coords=[np.array([-1.0, 0.0, 1.0])], values={"loss": np.array([2.0, 1.0, 3.0])})
        >>> landscape_scalars(ls)
        {'center_loss': 1.0, 'min_loss': 1.0, 'max_loss': 3.0}
    """
    out = dict(ls.summary())
    finite = ls.loss[np.isfinite(ls.loss)]
    out.update(min_loss=float(finite.min()) if finite.size else float("nan"))
    out.update(max_loss=float(finite.max()) if finite.size else float("nan"))
    if ls.metadata.get("kind") == "interpolation":
        out.update(interpolation_scalars(ls))
    return out


def _range(array: np.ndarray) -> dict[str, Any]:
    finite = array[np.isfinite(array)]
    return {
        "min": float(finite.min()) if finite.size else None,
        "max": float(finite.max()) if finite.size else None,
        "num_nonfinite": int(array.size - finite.size),
    }


def landscape_grid(ls: Landscape) -> dict[str, Any]:
    """The grid of a landscape for ``inspect``: shape, each axis' range and size, each value's range.

    Example:
        >>> landscape_grid(Landscape(coords=[np.arange(3.0)], values={"loss": np.ones(3)}))["axes"]
        [{'min': 0.0, 'max': 2.0, 'num': 3}]
    """
    return {
        "dims": ls.dims,
        "shape": list(ls.shape),
        "axes": [{"min": float(c.min()), "max": float(c.max()), "num": int(c.size)} for c in ls.coords],
        "evaluated": int(ls.evaluated.sum()),  # type: ignore[union-attr]
        "complete": ls.complete,
        "values": {name: _range(values) for name, values in ls.values.items()},
        "extras": {name: list(np.shape(array)) for name, array in ls.extras.items()},
    }


def _hessian_figures(report: HessianReport, opts: PlotOptions) -> dict[str, Figure]:
    figures = {"eigenvalues": plot_eigenvalues(report)}
    if report.density is not None:
        figures["density"] = plot_density(report)
    return figures


def _curve_result_figures(result: CurveResult, opts: PlotOptions) -> dict[str, Figure]:
    from lightning_landscape.plots.curves import plot_connection

    metric = None if opts.metric == "loss" else opts.metric
    return {"connection": _limit_y(plot_connection(result, metric=metric, log_scale=bool(opts.log)), opts)}


def _sharpness_figures(report: SharpnessReport, opts: PlotOptions) -> dict[str, Figure]:
    from lightning_landscape.plots import plot_basin_radii

    return {"basin_radii": plot_basin_radii(report)}


def _pca_figures(result: PCAResult, opts: PlotOptions) -> dict[str, Figure]:
    epochs = np.asarray(result.epochs)
    return {"path": plot_path(result.path, epochs=epochs, explained_variance_ratio=result.explained_variance_ratio)}


def _pca_scalars(result: PCAResult) -> dict[str, float]:
    out = {f"explained_variance_pc{i + 1}": float(r) for i, r in enumerate(result.explained_variance_ratio)}
    out["rank"] = float(result.rank)
    return out


@dataclass(frozen=True)
class Kind:
    """One saved result kind: ``load(path)``, ``figures(result, opts)``, ``scalars(result)``, the ``values``
    ``--metric`` may name (``None``: the kind has no named values), the ``grid`` ``inspect`` shows, and
    ``dims`` (the grid's dimension: 1 or 2; ``None`` for a report without a grid)."""

    name: str
    load: Callable[[Path], Any]
    figures: Callable[[Any, PlotOptions], dict[str, Figure]]
    scalars: Callable[[Any], dict[str, float]]
    values: Callable[[Any], list[str]] | None = None
    grid: Callable[[Any], dict[str, Any]] | None = None
    dims: Callable[[Any], int] | None = None


#: Every result kind the command line reads, by ``result_kind``.
KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "landscape",
            Landscape.load,
            landscape_figures,
            landscape_scalars,
            landscape_values,
            landscape_grid,
            lambda r: r.dims,
        ),
        Kind("hessian", HessianReport.load, _hessian_figures, lambda r: r.scalars()),
        Kind(
            "curve",
            CurveResult.load,
            _curve_result_figures,
            lambda r: r.scalars(),
            lambda r: r.names,
            lambda r: {
                "ts": {"min": float(r.ts[0]), "max": float(r.ts[-1]), "num": int(r.ts.size)},
                "values": {n: _range(v) for n, v in r.curve.items()},
                "history": int(r.history.size),
            },
            lambda r: 1,
        ),
        Kind("sharpness", SharpnessReport.load, _sharpness_figures, lambda r: r.scalars()),
        Kind("pca", PCAResult.load, _pca_figures, _pca_scalars),
    )
}

#: What a file must be, in every "not a saved result" message.
EXPECTED = (
    "a .npz written by lightning_landscape (a Landscape, HessianReport, CurveResult, SharpnessReport or PCAResult)"
)


def _guess_kind(arrays: dict[str, np.ndarray]) -> str | None:
    # Files written before the kind was stored: recognise them by their arrays.
    if "coords_0" in arrays:
        return "landscape"
    if "eigenvalues" in arrays:
        return "hessian"
    return None


def load_result(path: str | Path, flag: str = "FILE") -> tuple[Kind, Any, dict[str, Any]]:
    """``(kind, result, stored metadata)`` of a saved result; a :class:`CLIError` naming ``flag`` and the
    file when it is missing, not a result, or of a kind this command line does not know yet.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     kind, ls, meta = load_result(Landscape([np.arange(2.0)], {"loss": np.ones(2)}).save(tmp + "/s.npz"))
        >>> kind.name, meta["result_kind"]
        ('landscape', 'landscape')
    """
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"{flag}={str(path)!r} is not a file; expected {EXPECTED}.")
    try:
        arrays, meta = load_npz(path)
    except ValueError as err:
        reason = str(err).split("; expected")[0].replace(f"`path`={str(path)!r} ", "")
        if reason.startswith("cannot be read (") and reason.endswith(")"):
            reason = reason[len("cannot be read (") : -1]
        raise CLIError(f"{flag}={str(path)!r} is not a saved result ({reason}); expected {EXPECTED}.") from None
    name = meta.get("result_kind") or _guess_kind(arrays)
    if name not in KINDS:
        raise CLIError(
            f"{flag}={str(path)!r} holds a result of kind {name!r}, which is not supported yet; "
            f"supported kinds: {', '.join(KINDS)}."
        )
    kind = KINDS[name]
    try:
        return kind, kind.load(path), meta
    except (ValueError, KeyError) as err:
        raise CLIError(
            f"{flag}={str(path)!r} is not a readable {name!r} result ({err}); expected {EXPECTED}."
        ) from None


def check_metric(kind: Kind, result: Any, metric: str | None, path: Path) -> None:
    """Fail unless ``--metric`` names one of the result's values (when it has named values).

    Example:
        >>> ls = Landscape(coords=[np.arange(2.0)], values={"loss": np.ones(2)})
        >>> check_metric(KINDS["landscape"], ls, "accuracy", Path("s.npz"))
        Traceback (most recent call last):
            ...
        lightning_landscape.cli._errors.CLIError: --metric='accuracy' is not in 's.npz'; accepted: loss.
    """
    if metric is None or kind.values is None:
        return
    names = kind.values(result)
    if metric not in names:
        raise CLIError(f"--metric={metric!r} is not in {str(path)!r}; accepted: {', '.join(names)}.")
