"""The interpolation figure of Goodfellow et al. (2015) and Keskar et al. (2017): two runs and the line through them."""

from __future__ import annotations

from matplotlib.figure import Figure

from lightning_landscape.plots._figure import masked, new_figure
from lightning_landscape.results import Landscape

#: Line styles of the two data sets (the papers draw train solid, test dashed).
_STYLES = {"": ("-", "train"), "val_": ("--", "val")}


def _metric_of(landscape: Landscape, metric: str | None) -> str | None:
    names = [k for k in landscape.values if k != "loss" and not k.startswith("val_")]
    if metric is None:
        return names[0] if names else None
    if metric not in names:
        raise ValueError(f"`metric`={metric!r} is not in the result; accepted: {names or 'none (no metrics)'}.")
    return metric


def plot_interpolation(landscape: Landscape, *, metric: str | None = None, title: str | None = None) -> Figure:
    """Loss (left axis) and ``metric`` (right axis, default the first metric) along the line between two runs.

    Train values solid, validation values (``val_*``, from :func:`~lightning_landscape.interpolate_runs`)
    dashed; the two end points (α = 0 and α = 1) marked and labelled with the runs' names.

    Example:
        >>> a = np.linspace(-0.5, 1.5, 9)
        >>> ls = Landscape(coords=[a], values={"loss": (a - 1) ** 2, "accuracy": 1 - a / 4},
        ...                metadata={"kind": "interpolation", "start_label": "small batch", "end_label": "large"})
        >>> fig = plot_interpolation(ls)
        >>> [t.get_text() for t in fig.axes[0].texts]
        ['small batch', 'large']
    """
    if landscape.dims != 1:
        raise ValueError(f"`landscape` has {landscape.dims} dimension(s); plot_interpolation needs a 1-D result.")
    metric = _metric_of(landscape, metric)
    fig = new_figure((6.0, 4.5))
    ax = fig.add_subplot()
    x = landscape.coords[0]
    twin = ax.twinx() if metric else None
    for prefix, (style, data) in _STYLES.items():
        if prefix + "loss" in landscape.values:
            ax.plot(x, masked(landscape.values[prefix + "loss"]), style, color="tab:blue", label=f"{data} loss")
        if twin is not None and prefix + metric in landscape.values:
            values = masked(landscape.values[prefix + metric])
            twin.plot(x, values, style, color="tab:red", label=f"{data} {metric}")
    ax.set_xlabel("α")
    ax.set_ylabel("loss", color="tab:blue")
    labels = (landscape.metadata.get("start_label", "start"), landscape.metadata.get("end_label", "end"))
    for alpha, label in zip((0.0, 1.0), labels):
        ax.axvline(alpha, color="0.6", lw=0.8, ls=":")
        ax.text(alpha, 1.01, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9)
    handles, names = ax.get_legend_handles_labels()
    if twin is not None:
        twin.set_ylabel(metric, color="tab:red")
        more = twin.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    ax.legend(handles, names, loc="best", fontsize=8, framealpha=0.8)
    ax.set_title(title or "interpolation between two runs", pad=18)
    fig.tight_layout()
    return fig
