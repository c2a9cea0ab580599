"""Figures of a training trajectory on its PCA plane."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from lightning_landscape.plots._figure import new_figure


def plot_path(
    path: np.ndarray,
    *,
    epochs: np.ndarray | None = None,
    explained_variance_ratio: np.ndarray | None = None,
    title: str | None = None,
) -> Figure:
    """An optimization path on its PCA plane, coloured by epoch, start and end marked.

    Example:
        >>> fig = plot_path(np.array([[2.0, 1.0], [1.0, 0.2], [0.0, 0.0]]), epochs=np.array([0, 1, 1]))
        >>> fig.axes[0].get_xlabel()
        'PC1'
    """
    path = np.asarray(path, dtype=np.float64)
    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot(path[:, 0], path[:, 1], color="0.6", lw=1.0, zorder=1)
    colors = np.asarray(epochs) if epochs is not None else np.arange(len(path))
    points = ax.scatter(path[:, 0], path[:, 1], c=colors, cmap="plasma", s=12, zorder=2)
    fig.colorbar(points, ax=ax, label="epoch" if epochs is not None else "snapshot")
    ax.scatter(*path[0], marker="o", s=60, facecolor="white", edgecolor="k", zorder=3, label="start")
    ax.scatter(*path[-1], marker="*", s=120, color="gold", edgecolor="k", zorder=3, label="end")
    ax.legend(loc="best", fontsize=7)
    labels = pca_axis_labels(explained_variance_ratio) if explained_variance_ratio is not None else ["PC1", "PC2"]
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title or "optimization path (PCA plane)")
    fig.tight_layout()
    return fig


def pca_axis_labels(explained_variance_ratio: np.ndarray) -> list[str]:
    """``["PC1 (71.2%)", "PC2 (12.0%)"]`` from explained-variance ratios.

    Example:
        >>> pca_axis_labels(np.array([0.712, 0.12]))
        ['PC1 (71.2%)', 'PC2 (12.0%)']
    """
    return [f"PC{i + 1} ({100 * float(r):.1f}%)" for i, r in enumerate(explained_variance_ratio)]
