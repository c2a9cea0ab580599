"""The figures of Izmailov et al. (2018): SGD and SWA on the line through them and along random directions."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from lightning_landscape.plots._figure import masked, new_figure
from lightning_landscape.results import Landscape

#: The paper's colours: SWA blue, SGD green.
COLORS = {"SGD": "tab:green", "SWA": "tab:blue"}


def _right_axis_value(line: Landscape) -> str | None:
    for name in ("val_error", "error", "val_loss"):
        if name in line.values:
            return name
    return None


def plot_swa_line(line: Landscape, *, title: str | None = None) -> Figure:
    """Train loss (left axis) and test error (right axis) against the distance along the SGD→SWA line.

    The x axis is the distance from the SGD weights, ``α·‖θ_SWA − θ_SGD‖`` (``extras["distance"]``;
    α itself when absent); both points are marked on the loss curve and labelled. The right axis
    shows ``val_error``, else ``error``, else ``val_loss``.

    Example:
        >>> a = np.linspace(-0.5, 1.5, 9)
        >>> line = Landscape(coords=[a], values={"loss": (a - 0.8) ** 2, "val_error": 0.1 + 0.05 * (a - 1) ** 2},
        ...                  metadata={"distance": 2.0}, extras={"distance": 2.0 * a})
        >>> fig = plot_swa_line(line)
        >>> [t.get_text() for t in fig.axes[0].texts], fig.axes[1].get_ylabel()
        (['SGD', 'SWA'], 'val error')
    """
    if line.dims != 1:
        raise ValueError(f"`line` has {line.dims} dimension(s); plot_swa_line needs the 1-D line result.")
    alphas = line.coords[0]
    x = np.asarray(line.extras.get("distance", alphas), dtype=np.float64)
    fig = new_figure((6.0, 4.5))
    ax = fig.add_subplot()
    ax.plot(x, masked(line.loss), "-", color="tab:blue", marker=".", label="train loss")
    right = _right_axis_value(line)
    handles, names = ax.get_legend_handles_labels()
    if right is not None:
        twin = ax.twinx()
        twin.plot(x, masked(line.values[right]), "--", color="tab:red", marker=".", label=right.replace("_", " "))
        twin.set_ylabel(right.replace("_", " "), color="tab:red")
        more = twin.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    labels = (line.metadata.get("start_label", "SGD"), line.metadata.get("end_label", "SWA"))
    for alpha, label in zip((0.0, 1.0), labels):
        hit = np.flatnonzero(np.isclose(alphas, alpha))
        where = float(x[hit[0]]) if hit.size else alpha * float(line.metadata.get("distance", 1.0))
        ax.axvline(where, color="0.6", lw=0.8, ls=":")
        if hit.size and np.isfinite(line.loss[hit[0]]):
            color = COLORS.get(label, "k")
            ax.scatter([where], [line.loss[hit[0]]], s=60, color=color, edgecolor="k", zorder=4)
        ax.text(where, 1.01, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9)
    has_distance = "distance" in line.extras
    ax.set_xlabel("distance from SGD along SGD → SWA" if has_distance else "α (SGD → SWA)")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.legend(handles, names, loc="upper center", fontsize=8, framealpha=0.8)
    ax.set_title(title or "SGD → SWA line", pad=18)
    fig.tight_layout()
    return fig


def plot_swa_directions(sgd: Landscape, swa: Landscape, *, value: str = "loss", title: str | None = None) -> Figure:
    """The loss along each random direction through SGD and through SWA, overlaid.

    ``sgd`` and ``swa`` are the 2-D results over (direction, α) that
    :class:`~lightning_landscape.callbacks.swa.SWAComparison` writes; each direction is one thin
    curve against the weight-space distance (``extras["distance"]``; α when absent), both points'
    centres at 0. A wider optimum rises more slowly.

    Example:
        >>> a = np.linspace(-1, 1, 5)
        >>> sgd = Landscape(coords=[np.arange(2.0), a], values={"loss": np.stack([4 * a**2, 5 * a**2])})
        >>> swa = Landscape(coords=[np.arange(2.0), a], values={"loss": np.stack([a**2, 2 * a**2])})
        >>> fig = plot_swa_directions(sgd, swa)
        >>> fig.axes[0].get_legend_handles_labels()[1]
        ['SGD', 'SWA']
    """
    for label, result in (("sgd", sgd), ("swa", swa)):
        if result.dims != 2:
            raise ValueError(f"`{label}` has {result.dims} dimension(s); expected the 2-D (direction, α) result.")
        if value not in result.values:
            raise ValueError(f"`value`={value!r} is not in `{label}`; accepted: {sorted(result.values)}.")
    fig = new_figure((6.0, 4.5))
    ax = fig.add_subplot()
    has_distance = all("distance" in r.extras for r in (sgd, swa))
    for label, result in (("SGD", sgd), ("SWA", swa)):
        alphas = result.coords[1]
        xs = result.extras["distance"] if has_distance else np.broadcast_to(alphas, result.values[value].shape)
        for k in range(result.shape[0]):
            ax.plot(
                xs[k],
                masked(result.values[value][k]),
                color=COLORS[label],
                lw=1.2,
                alpha=0.85,
                label=label if k == 0 else None,
            )
    ax.axvline(0.0, color="0.7", lw=0.8, ls="--")
    ax.set_xlabel("distance along a random direction" if has_distance else "α (filter-normalized units)")
    ax.set_ylabel(f"train {value}" if value == "loss" else value.replace("_", " "))
    ax.legend(loc="upper center", fontsize=8)
    ax.set_title(title or f"{value} along random directions: SGD vs SWA")
    fig.tight_layout()
    return fig
