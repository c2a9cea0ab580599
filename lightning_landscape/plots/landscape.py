"""Figures of a loss landscape: the 1-D curve, contours, heat map, 3-D surface and an interactive plotly surface."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_landscape.plots._figure import (
    MAX_CONTOUR_LABELS,
    DistinctFormatter,
    axis_labels,
    check_dims,
    color_norm,
    contour_levels,
    distinct_labels,
    limit_ticks,
    masked,
    new_figure,
    resolve_log_scale,
    thin_3d_ticks,
)
from lightning_landscape.results import Landscape


def plot_curve(
    landscape: Landscape, *, metric: str | None = None, log_scale: bool | None = False, title: str | None = None
) -> Figure:
    """A 1-D landscape as a curve of the loss, with ``metric`` (if given) on a twin axis.

    Example:
        >>> ls = Landscape(coords=[np.linspace(-1, 1, 5)], values={"loss": np.linspace(-1, 1, 5) ** 2 + 0.1})
        >>> fig = plot_curve(ls)
        >>> fig.axes[0].get_ylabel()
        'loss'
    """
    check_dims(landscape, 1, "plot_curve")
    log_scale = bool(log_scale)
    fig = new_figure()
    ax = fig.add_subplot()
    x = landscape.coords[0]
    ax.plot(x, masked(landscape.loss, log_scale), color="tab:blue", marker=".", label="loss")
    ax.set_xlabel(axis_labels(landscape)[0])
    ax.set_ylabel("loss")
    if log_scale:
        ax.set_yscale("log")
    if metric is not None:
        if metric not in landscape.values:
            raise ValueError(f"`metric`={metric!r} is not in the landscape; accepted: {sorted(landscape.values)}.")
        twin = ax.twinx()
        twin.plot(x, masked(landscape.values[metric], False), color="tab:orange", marker=".", label=metric)
        twin.set_ylabel(metric, color="tab:orange")
    ax.axvline(0.0, color="0.7", lw=0.8, ls="--")
    if landscape.metadata.get("kind") == "interpolation":
        ax.axvline(1.0, color="0.7", lw=0.8, ls="--")
    ax.set_title(title or "loss along the line")
    fig.tight_layout()
    return fig


def plot_contour(
    landscape: Landscape,
    *,
    filled: bool = False,
    levels: int = 30,
    log_scale: bool | None = None,
    value: str = "loss",
    path: np.ndarray | None = None,
    path_markers: np.ndarray | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """A 2-D landscape as contour lines (or filled contours), optionally with a path on top.

    Args:
        landscape: a 2-D :class:`Landscape`.
        filled: filled contours with a colour bar instead of labelled lines.
        levels: number of contour levels (log-spaced where all values are > 0); at most
            six of them are labelled, each label with enough digits to differ from its neighbours.
        log_scale: a logarithmic colour scale (non-positive values masked); ``None`` chooses it
            when the values span more than two decades.
        value: which entry of ``landscape.values`` to draw.
        path: ``(K, 2)`` coordinates of an optimization path to draw on the plane;
            its first point is marked as the start and its last as the end.
        path_markers: indices into ``path`` to mark (e.g. one per epoch).
        vmin, vmax: the colour scale and the levels span [vmin, vmax] instead of the data's range
            (e.g. one scale for several surfaces).

    Example:
        >>> a = np.linspace(-1, 1, 5)
        >>> ls = Landscape(coords=[a, a], values={"loss": np.add.outer(a**2, a**2)})
        >>> len(plot_contour(ls, filled=True).axes)  # the plot and its colour bar
        2
    """
    check_dims(landscape, 2, "plot_contour")
    if value not in landscape.values:
        raise ValueError(f"`value`={value!r} is not in the landscape; accepted: {sorted(landscape.values)}.")
    fig = new_figure()
    ax = fig.add_subplot()
    draw_contours(fig, ax, landscape, value, filled=filled, levels=levels, log_scale=log_scale, vmin=vmin, vmax=vmax)
    if path is not None:
        path = np.asarray(path, dtype=np.float64)
        ax.plot(path[:, 0], path[:, 1], color="tab:red", lw=1.2, marker=".", ms=3, label="path")
        if path_markers is not None and len(path_markers):
            idx = np.asarray(path_markers, dtype=int)
            ax.scatter(path[idx, 0], path[idx, 1], color="tab:red", s=18, zorder=3, label="epochs")
        ax.scatter(*path[0], marker="o", s=60, facecolor="white", edgecolor="tab:red", zorder=4, label="start")
        ax.scatter(*path[-1], marker="*", s=120, color="gold", edgecolor="k", zorder=4, label="end")
        ax.legend(loc="best", fontsize=7)
    else:
        ax.scatter([0.0], [0.0], marker="*", s=80, color="tab:red", zorder=3)
    xl, yl = axis_labels(landscape)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title or (f"{value} (filled contours)" if filled else f"{value} contours"))
    fig.tight_layout()
    return fig


def draw_contours(
    fig: Figure,
    ax: Any,
    landscape: Landscape,
    value: str,
    *,
    filled: bool,
    levels: int,
    log_scale: bool | None,
    vmin: float | None,
    vmax: float | None,
) -> None:
    """Contour lines (labelled) or filled contours (with a colour bar) of ``landscape.values[value]`` on ``ax``.

    The part every plane figure shares (:func:`plot_contour`, the curve plane): levels over the
    values or [``vmin``, ``vmax``], log-spaced where they are all > 0, a log colour scale when asked
    or (``log_scale=None``) when the values span more than two decades, at most six ticks per axis.
    """
    x, y = landscape.coords
    log_scale = resolve_log_scale(landscape.values[value], log_scale)
    z = masked(landscape.values[value], log_scale).T  # matplotlib wants z[row=y, col=x]
    lv = contour_levels(z, levels, vmin, vmax)
    norm = color_norm(log_scale, vmin, vmax)
    if filled:
        cs = ax.contourf(x, y, z, levels=lv, cmap="viridis", norm=norm)
        fig.colorbar(cs, ax=ax, label=value).ax.yaxis.set_major_formatter(DistinctFormatter())
    else:
        cs = ax.contour(x, y, z, levels=lv, cmap="viridis", norm=norm, linewidths=0.9)
        label_contours(ax, cs)
    limit_ticks(ax)


def label_contours(ax: Any, cs: Any) -> None:
    """Label at most :data:`MAX_CONTOUR_LABELS` evenly spread levels, once each, with distinct texts.

    Each chosen level gets one label, at the middle of its longest line (matplotlib's own
    placement labels every piece of a level, which crowds the basin).
    """
    longest = {}
    for level, segs in zip(cs.levels, cs.allsegs):
        pieces = [seg for seg in segs if len(seg)]
        if pieces:
            longest[level] = max(pieces, key=len)
    if not longest:
        return
    drawn = list(longest)
    step = -(-len(drawn) // MAX_CONTOUR_LABELS)  # ceil
    chosen = drawn[step // 2 :: step]
    positions = [tuple(longest[level][len(longest[level]) // 2]) for level in chosen]
    fmt = dict(zip(chosen, distinct_labels(chosen)))
    ax.clabel(cs, levels=chosen, inline=True, fontsize=7, fmt=fmt, manual=positions)


def plot_heatmap(
    landscape: Landscape,
    *,
    log_scale: bool | None = None,
    value: str = "loss",
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """A 2-D landscape as a heat map (NaN points left blank), on a log colour scale when the values
    span more than two decades (``log_scale=None``), so the basin is not one dark block; the colour
    scale spans [``vmin``, ``vmax``] where given.

    Example:
        >>> a = np.linspace(-1, 1, 4)
        >>> plot_heatmap(Landscape(coords=[a, a], values={"loss": np.ones((4, 4))})).axes[0].get_xlabel()
        'α (direction 1)'
    """
    check_dims(landscape, 2, "plot_heatmap")
    fig = new_figure()
    ax = fig.add_subplot()
    x, y = landscape.coords
    log_scale = resolve_log_scale(landscape.values[value], log_scale)
    z = masked(landscape.values[value], log_scale).T
    mesh = ax.pcolormesh(x, y, z, shading="nearest", cmap="viridis", norm=color_norm(log_scale, vmin, vmax))
    fig.colorbar(mesh, ax=ax, label=value).ax.yaxis.set_major_formatter(DistinctFormatter())
    limit_ticks(ax)
    xl, yl = axis_labels(landscape)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title or f"{value} heat map")
    fig.tight_layout()
    return fig


def plot_surface_3d(
    landscape: Landscape,
    *,
    log_scale: bool | None = None,
    value: str = "loss",
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Figure:
    """A 2-D landscape as a 3-D surface (``log10`` of the value on a log scale; ``None``: when the
    values span more than two decades), with a few distinct ticks per axis; the value axis and
    colours span [``vmin``, ``vmax``] where given (values beyond are drawn at the limit).

    Example:
        >>> a = np.linspace(-1, 1, 4)
        >>> plot_surface_3d(Landscape(coords=[a, a], values={"loss": np.ones((4, 4))})).axes[0].name
        '3d'
    """
    check_dims(landscape, 2, "plot_surface_3d")
    fig = new_figure(figsize=(6.0, 5.0))
    ax = fig.add_subplot(projection="3d")
    x, y = landscape.coords
    X, Y = np.meshgrid(x, y, indexing="ij")
    log_scale = resolve_log_scale(landscape.values[value], log_scale)
    z = masked(landscape.values[value], log_scale)
    if vmin is not None or vmax is not None:
        z = np.ma.clip(z, vmin, vmax)  # a surface beyond the axis limits would be drawn outside the box
    lo, hi = vmin, vmax
    if log_scale:
        z = np.ma.log10(z)
        lo, hi = (None if lo is None else np.log10(lo)), (None if hi is None else np.log10(hi))
    # plot_surface does not honour masks: NaN leaves holes, which is what we want.
    ax.plot_surface(X, Y, z.filled(np.nan), cmap="viridis", linewidth=0, antialiased=True, vmin=lo, vmax=hi)
    if lo is not None or hi is not None:
        ax.set_zlim(lo, hi)
    xl, yl = axis_labels(landscape)
    thin_3d_ticks(ax)
    # Padding keeps the axis labels clear of the tick labels, which 3-D axes draw close by.
    ax.set_xlabel(xl, labelpad=8)
    ax.set_ylabel(yl, labelpad=8)
    ax.set_zlabel(f"log10 {value}" if log_scale else value, labelpad=10)
    ax.set_title(title or f"{value} surface")
    return fig


def landscape_figures(
    landscape: Landscape, *, log_scale: bool | None = None, metric: str | None = None
) -> dict[str, Figure]:
    """Every standard figure for ``landscape``, keyed by a short name.

    A 1-D landscape gives ``{"curve"}``; a 2-D one gives ``{"contour", "contour_filled", "heatmap", "surface_3d"}``.

    Example:
        >>> ls = Landscape(coords=[np.linspace(-1, 1, 3)], values={"loss": np.ones(3)})
        >>> list(landscape_figures(ls))
        ['curve']
    """
    if landscape.dims == 1:
        if metric is None:
            metric = next((name for name in landscape.values if name != "loss"), None)
        return {"curve": plot_curve(landscape, metric=metric, log_scale=log_scale)}
    return {
        "contour": plot_contour(landscape, log_scale=log_scale),
        "contour_filled": plot_contour(landscape, filled=True, log_scale=log_scale),
        "heatmap": plot_heatmap(landscape, log_scale=log_scale),
        "surface_3d": plot_surface_3d(landscape, log_scale=log_scale),
    }


def plotly_surface(landscape: Landscape, *, value: str = "loss") -> Any:
    """An interactive 3-D surface as a plotly ``Figure`` (needs the ``plotly`` extra).

    Raises:
        ImportError: if plotly is not installed.

    Example:
        >>> a = np.linspace(-1, 1, 3)
        >>> fig = plotly_surface(Landscape(coords=[a, a], values={"loss": np.ones((3, 3))}))
        >>> fig.data[0].type, fig.layout.scene.zaxis.title.text
        ('surface', 'loss')
    """
    import plotly.graph_objects as go

    check_dims(landscape, 2, "plotly_surface")
    x, y = landscape.coords
    z = np.where(np.isfinite(landscape.values[value]), landscape.values[value], None).T
    xl, yl = axis_labels(landscape)
    fig = go.Figure(data=[go.Surface(x=x, y=y, z=z, colorscale="Viridis")])
    fig.update_layout(scene={"xaxis_title": xl, "yaxis_title": yl, "zaxis_title": value}, title=f"{value} surface")
    return fig
