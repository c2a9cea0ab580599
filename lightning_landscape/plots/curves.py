"""Figures of mode connectivity: loss and error along the curve and the line, and Garipov's plane."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_landscape.plots._figure import (
    axis_labels,
    check_dims,
    masked,
    new_figure,
)
from lightning_landscape.plots.landscape import draw_contours
from lightning_landscape.results import CurveResult, Landscape

#: How each path is drawn: the fitted curve solid, the straight line dashed.
_STYLES = {"curve": {"color": "tab:blue", "ls": "-"}, "line": {"color": "0.45", "ls": "--"}}


def _panels(result: CurveResult, metric: str | None) -> list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(label, curve values, line values) for each panel: the loss, then the error or ``metric``."""
    panels = [("loss", result.curve["loss"], result.line["loss"])]
    if metric is not None:
        if metric not in result.curve:
            raise ValueError(f"`metric`={metric!r} is not in the result; accepted: {sorted(result.curve)}.")
        panels.append((metric, result.curve[metric], result.line[metric]))
    elif "accuracy" in result.curve:
        panels.append(("error (1 − accuracy)", 1.0 - result.curve["accuracy"], 1.0 - result.line["accuracy"]))
    return panels  # type: ignore[return-value]


def plot_connection(
    result: CurveResult, *, metric: str | None = None, log_scale: bool = False, title: str | None = None
) -> Figure:
    """Loss (and error, 1 − accuracy, when an ``"accuracy"`` metric was measured) against t, along the
    fitted curve and along the straight line, with both end points marked and the barriers in the legend.

    ``metric`` draws that metric's raw values in the second panel instead of the error.

    Example:
        >>> ts = np.linspace(0, 1, 5)
        >>> r = CurveResult(ts, {"loss": 0.1 + 0 * ts, "accuracy": 0.9 + 0 * ts},
        ...                 {"loss": 0.1 + ts * (1 - ts), "accuracy": 0.9 - ts * (1 - ts)})
        >>> fig = plot_connection(r)
        >>> [ax.get_ylabel() for ax in fig.axes]
        ['loss', 'error (1 − accuracy)']
    """
    panels = _panels(result, metric)
    fig = new_figure(figsize=(5.5 * len(panels), 4.2))
    barriers = {"curve": result.barrier_curve, "line": result.barrier_line}
    name = result.settings.get("curve", "curve")
    for k, (label, on_curve, on_line) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for path, values in (("line", on_line), ("curve", on_curve)):
            text = "straight line" if path == "line" else f"{name} curve"
            if k == 0:
                text += f" (barrier {barriers[path]:.3g})"
            ax.plot(result.ts, masked(values, log_scale and k == 0), lw=1.6, label=text, **_STYLES[path])
        ends = np.array([on_curve[0], on_curve[-1]])
        ax.scatter([0.0, 1.0], ends, marker="o", s=50, color="tab:red", edgecolor="k", zorder=3)
        for t, value, text in ((0.0, ends[0], "w₁"), (1.0, ends[1], "w₂")):
            ax.annotate(text, (t, value), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=9)
        if log_scale and k == 0:
            ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel(label)
        ax.set_xlim(-0.03, 1.03)
        ax.legend(loc="best", fontsize=8)
    fig.axes[0].set_title(title or "loss along the curve and the line")
    fig.tight_layout()
    return fig


def _check_plane(landscape: Landscape, value: str) -> None:
    check_dims(landscape, 2, "plot_curve_plane")
    missing = [key for key in ("points", "curve_path") if key not in landscape.extras]
    if missing:
        raise ValueError(
            f"`landscape` has no extras {missing}; expected a landscape from curve_plane (kind 'curve_plane')."
        )
    if value not in landscape.values:
        raise ValueError(f"`value`={value!r} is not in the landscape; accepted: {sorted(landscape.values)}.")


def plot_curve_plane(
    landscape: Landscape,
    *,
    filled: bool = True,
    levels: int = 30,
    log_scale: bool | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    value: str = "loss",
    title: str | None = None,
) -> Figure:
    """Contours of the loss over Garipov's plane, with w₁, the bend, w₂, the line between the end
    points and the fitted curve drawn on top.

    Args:
        landscape: a 2-D landscape from :func:`~lightning_landscape.connect.curve_plane`.
        filled: filled contours with a colour bar; ``False`` draws labelled contour lines.
        levels: number of contour levels (log-spaced where every value is > 0).
        log_scale: a logarithmic colour scale; ``None`` chooses it when the values span more than two decades.
        vmin, vmax: the colour scale and the levels span [vmin, vmax] instead of the data's range.
        value: which entry of ``landscape.values`` to draw.

    Example:
        >>> x = np.linspace(-1, 3, 6)
        >>> ls = Landscape(coords=[x, x], values={"loss": np.add.outer(x**2, x**2) + 0.1},
        ...                extras={"points": np.array([[0, 0], [1, 2], [2, 0.0]]),
        ...                        "curve_path": np.array([[0, 0], [1, 1], [2, 0.0]])})
        >>> len(plot_curve_plane(ls).axes)  # the plane and its colour bar
        2
    """
    _check_plane(landscape, value)
    fig = new_figure(figsize=(6.0, 4.8))
    ax = fig.add_subplot()
    draw_contours(fig, ax, landscape, value, filled=filled, levels=levels, log_scale=log_scale, vmin=vmin, vmax=vmax)
    _draw_points(ax, landscape)
    xl, yl = axis_labels(landscape)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title or f"{value} on the plane of the curve")
    fig.tight_layout()
    return fig


def _draw_points(ax: Any, landscape: Landscape) -> None:
    points = np.asarray(landscape.extras["points"], dtype=np.float64)
    path = np.asarray(landscape.extras["curve_path"], dtype=np.float64)
    labels = landscape.metadata.get("point_labels") or ["w₁", "θ", "w₂"]
    ax.plot(points[[0, 2], 0], points[[0, 2], 1], color="k", ls="--", lw=1.0, label="straight line")
    ax.plot(path[:, 0], path[:, 1], color="tab:red", lw=1.8, label=f"{landscape.metadata.get('curve', 'curve')} curve")
    ax.scatter(points[[0, 2], 0], points[[0, 2], 1], marker="o", s=60, color="white", edgecolor="k", zorder=4)
    ax.scatter(points[1, 0], points[1, 1], marker="D", s=45, color="tab:orange", edgecolor="k", zorder=4)
    for (px, py), text in zip(points, labels):
        ax.annotate(text, (px, py), textcoords="offset points", xytext=(6, 6), fontsize=9, color="k")
    ax.legend(loc="best", fontsize=7)
