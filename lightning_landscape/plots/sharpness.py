"""The figure of a sharpness report: basin radius per direction and the loss along each ray."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from lightning_landscape.plots._figure import new_figure
from lightning_landscape.results.sharpness import SharpnessReport


def plot_basin_radii(report: SharpnessReport, *, title: str | None = None) -> Figure:
    """The basin radius along each direction (bars; hatched where capped at ``max_radius``) with their mean,
    beside the loss at the fixed radii per direction and the threshold, the report's numbers in the title.

    Example:
        >>> report = SharpnessReport(loss=0.1, eps_sharpness=1.5, basin_radii=np.array([0.5, 0.7]),
        ...                          basin_capped=np.array([False, True]), threshold=0.2,
        ...                          radii=np.array([0.25, 0.5]), loss_at_radii=np.array([[0.12, 0.3], [0.11, 0.15]]))
        >>> [ax.get_xlabel() for ax in plot_basin_radii(report).axes]
        ['direction', 'radius (direction units)']
    """
    fig = new_figure((9.0, 4.0))
    bars, curves = fig.subplots(1, 2)
    index = np.arange(1, report.basin_radii.size + 1)
    capped = report.basin_capped if report.basin_capped.size == index.size else np.zeros(index.size, dtype=bool)
    drawn = bars.bar(index, report.basin_radii, color=np.where(capped, "0.75", "tab:blue"))
    for patch, cap in zip(drawn, capped):
        if cap:
            patch.set_hatch("//")
    if report.basin_radii.size:
        mean = float(report.basin_radii.mean())
        bars.axhline(mean, color="k", lw=0.9, ls="--", label=f"mean = {mean:.3g}")
        bars.legend(loc="best", fontsize=7)
    bars.set_xticks(index)
    bars.set_xlabel("direction")
    bars.set_ylabel("basin radius (direction units)")
    center = report.loss if report.basin_center_loss is None else report.basin_center_loss
    for row in report.loss_at_radii:
        curves.plot(np.r_[0.0, report.radii], np.r_[center, row], color="tab:blue", lw=0.8, alpha=0.6, marker=".")
    if report.threshold is not None:
        curves.axhline(report.threshold, color="tab:red", lw=0.9, ls="--", label=f"threshold = {report.threshold:.3g}")
        curves.legend(loc="best", fontsize=7)
    curves.set_xlabel("radius (direction units)")
    curves.set_ylabel("loss")
    numbers = [f"ε-sharpness = {report.eps_sharpness:.3g}"]
    if report.log_basin_volume is not None:
        numbers.append(f"log V = {report.log_basin_volume:.4g}")
    if report.lambda_max is not None:
        numbers.append(f"λmax = {report.lambda_max:.3g}")
    fig.suptitle(title or "basin radii — " + ", ".join(numbers), fontsize=9)
    fig.tight_layout()
    return fig
