"""Figures of Hessian results: pure functions from a result to a matplotlib ``Figure``.

As in :mod:`lightning_landscape.plots._figure`, no pyplot state is touched: every figure
is a ``matplotlib.figure.Figure`` with an Agg canvas, safe in headless jobs.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from lightning_landscape.hessian import HessianReport
from lightning_landscape.plots._figure import axis_labels, masked, new_figure
from lightning_landscape.results import Landscape


def _mark_extremes(ax, report: HessianReport) -> None:
    ax.axvline(report.lambda_max, color="tab:red", lw=0.9, ls="--", label=f"λmax = {report.lambda_max:.4g}")
    if report.lambda_min is not None:
        ax.axvline(report.lambda_min, color="tab:blue", lw=0.9, ls="--", label=f"λmin = {report.lambda_min:.4g}")


def plot_density(report: HessianReport, *, title: str | None = None) -> Figure:
    """The spectral density of the Hessian (SLQ) on a logarithmic y axis, with λmin and λmax marked.

    The outliers carry a tiny share of the mass next to the bulk near zero, so
    only a log scale shows both. Points where the density underflows to 0 are masked.

    Raises:
        ValueError: if ``report`` holds no density (``hessian_check(..., density=True)``).

    Example:
        >>> grid = np.linspace(-1, 5, 50)
        >>> report = HessianReport(eigenvalues=np.array([4.0]), lambda_max=4.0, lambda_min=-0.5,
        ...                        density=(grid, np.exp(-grid**2)))
        >>> plot_density(report).axes[0].get_yscale()
        'log'
    """
    if report.density is None:
        raise ValueError("`report` holds no spectral density; expected a report of hessian_check(..., density=True).")
    fig = new_figure()
    ax = fig.add_subplot()
    grid, values = report.density
    density = masked(values, True)
    ax.plot(grid, density, color="k", lw=1.0)
    ax.fill_between(grid, density.filled(np.nan), alpha=0.15, color="0.3")
    _mark_extremes(ax, report)
    ax.set_yscale("log")
    if density.count():
        # A floor a few decades under the peak keeps the far tails of the Gaussians from squashing the plot.
        ax.set_ylim(max(float(density.min()), float(density.max()) * 1e-8), float(density.max()) * 3)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.legend(loc="best", fontsize=7)
    ax.set_title(title or "Hessian eigenvalue density")
    fig.tight_layout()
    return fig


def plot_eigenvalues(report: HessianReport, *, title: str | None = None) -> Figure:
    """The top-k eigenvalues as a stem plot against their rank, with λmin as a dashed line if known.

    Example:
        >>> report = HessianReport(eigenvalues=np.array([5.0, 2.0, 1.0]), lambda_max=5.0, lambda_min=-0.2)
        >>> plot_eigenvalues(report).axes[0].get_xlabel()
        'rank'
    """
    fig = new_figure()
    ax = fig.add_subplot()
    ranks = np.arange(1, report.eigenvalues.size + 1)
    ax.stem(ranks, report.eigenvalues, basefmt="0.6")
    if report.lambda_min is not None:
        ax.axhline(report.lambda_min, color="tab:blue", lw=0.9, ls="--", label=f"λmin = {report.lambda_min:.4g}")
        ax.legend(loc="best", fontsize=7)
    ax.axhline(0.0, color="0.7", lw=0.6)
    ax.set_xticks(ranks)
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title(title or f"top-{report.eigenvalues.size} Hessian eigenvalues")
    fig.tight_layout()
    return fig


def plot_ratio_map(landscape: Landscape, *, levels: int = 20, title: str | None = None) -> Figure:
    """|λmin/λmax| beside the loss: a heat map and loss contours for a 2-D map, two curves for a 1-D one.

    Read the two panels together as in Li et al. (2018), Fig. 7: blue (near zero)
    marks locally convex regions, yellow strong negative curvature.

    Raises:
        ValueError: if ``landscape`` has no ``"ratio"`` values (it is not from :func:`ratio_map`).

    Example:
        >>> a = np.linspace(-1, 1, 3)
        >>> ls = Landscape(coords=[a, a], values={"loss": np.add.outer(a**2, a**2), "ratio": np.full((3, 3), 0.1)})
        >>> [ax.get_title() for ax in plot_ratio_map(ls).axes[:2]]
        ['|λmin / λmax|', 'loss contours']
    """
    if "ratio" not in landscape.values:
        raise ValueError(
            f"`landscape` has values {sorted(landscape.values)}; expected a 'ratio' entry from ratio_map()."
        )
    fig = new_figure(figsize=(10.5, 4.5))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xl, yl = axis_labels(landscape)
    ratio, loss = masked(landscape.values["ratio"]), masked(landscape.loss)
    if landscape.dims == 1:
        x = landscape.coords[0]
        left.plot(x, ratio, marker="o", color="tab:purple")
        right.plot(x, loss, marker=".", color="tab:blue")
        left.set_ylabel("|λmin / λmax|")
        right.set_ylabel("loss")
        for ax in (left, right):
            ax.set_xlabel(xl)
    else:
        x, y = landscape.coords
        mesh = left.pcolormesh(x, y, ratio.T, shading="nearest", cmap="viridis")
        fig.colorbar(mesh, ax=left, label="|λmin / λmax|")
        if loss.count() > 1 and np.ptp(loss.compressed()) > 0 and min(landscape.shape) > 1:
            cs = right.contour(
                x,
                y,
                loss.T,
                levels=np.linspace(float(loss.min()), float(loss.max()), levels),
                cmap="viridis",
                linewidths=0.9,
            )
            right.clabel(cs, inline=True, fontsize=7, fmt="%.3g")
        else:  # too few points or a flat loss: contours are undefined, show the points instead
            grid_x, grid_y = np.meshgrid(x, y, indexing="ij")
            right.scatter(grid_x, grid_y, c=loss.filled(np.nan), cmap="viridis")
        for ax in (left, right):
            ax.scatter([0.0], [0.0], marker="*", s=80, color="tab:red", zorder=3)
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
    left.set_title("|λmin / λmax|")
    right.set_title("loss contours" if landscape.dims == 2 else "loss")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
