"""Figures as a researcher would put them in a paper: few, distinct contour labels, ticks that do
not run into each other, a log colour scale when the loss spans decades."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import LogNorm

from lightning_landscape import Landscape, landscape_figures, plot_contour, plot_heatmap, plot_surface_3d


def _bowl(resolution: int = 21, spread: float = 36.0) -> Landscape:
    a = np.linspace(-1, 1, resolution)
    loss = 0.05 + spread * np.add.outer(a**2, a**2) ** 2  # 0.05 at the centre, ~2.9 decades
    return Landscape(coords=[a, a], values={"loss": loss})


def _texts(labels) -> list[str]:
    return [t.get_text() for t in labels if t.get_text()]


def _overlaps(boxes) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_contour_labels_are_few_and_distinct():
    fig = plot_contour(_bowl())
    fig.canvas.draw()
    labels = _texts(fig.axes[0].texts)
    assert 2 <= len(labels) <= 6
    assert len(set(labels)) == len(labels)


def test_near_equal_levels_get_enough_digits_to_differ():
    a = np.linspace(-1, 1, 15)
    loss = 2.22 + 0.004 * np.add.outer(a**2, a**2)  # every level reads "2.22" at 3 digits
    fig = plot_contour(Landscape(coords=[a, a], values={"loss": loss}))
    fig.canvas.draw()
    labels = _texts(fig.axes[0].texts)
    assert len(labels) >= 2 and len(set(labels)) == len(labels)


@pytest.mark.parametrize("spread", [36.0, 0.004])
def test_tick_labels_of_every_axis_are_distinct_and_do_not_overlap(spread):
    for name, fig in landscape_figures(_bowl(spread=spread)).items():
        renderer = fig.canvas.get_renderer()
        fig.canvas.draw()
        for ax in fig.axes:
            axes = [ax.xaxis, ax.yaxis] + ([ax.zaxis] if hasattr(ax, "zaxis") else [])
            for axis in axes:
                lo, hi = sorted(axis.get_view_interval())
                pairs = zip(axis.get_majorticklocs(), axis.get_ticklabels())
                # Ticks outside the view are not drawn (3-D axes keep stale ones in the list).
                labels = [t for loc, t in pairs if t.get_text() and lo <= loc <= hi]
                texts = [t.get_text() for t in labels]
                assert len(set(texts)) == len(texts), (name, texts)
                assert not _overlaps([t.get_window_extent(renderer) for t in labels]), (name, texts)


def test_3d_axis_labels_clear_their_ticks():
    fig = plot_surface_3d(_bowl())
    renderer = fig.canvas.get_renderer()
    fig.canvas.draw()
    ax = fig.axes[0]
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        label = axis.label.get_window_extent(renderer)
        lo, hi = sorted(axis.get_view_interval())
        pairs = zip(axis.get_majorticklocs(), axis.get_ticklabels())
        ticks = [t.get_window_extent(renderer) for loc, t in pairs if t.get_text() and lo <= loc <= hi]
        assert ticks and not any(label.overlaps(t) for t in ticks), axis.label.get_text()


def test_heatmap_goes_logarithmic_when_the_loss_spans_decades():
    assert isinstance(plot_heatmap(_bowl()).axes[0].collections[0].norm, LogNorm)
    assert not isinstance(plot_heatmap(_bowl(spread=0.5)).axes[0].collections[0].norm, LogNorm)
    assert not isinstance(plot_heatmap(_bowl(), log_scale=False).axes[0].collections[0].norm, LogNorm)


def test_vmin_vmax_fix_the_colour_scale_and_levels_even_inside_the_data():
    """Several surfaces on one scale: the limits hold also where the data lie inside them."""
    from lightning_landscape import plot_contour, plot_heatmap, plot_surface_3d
    from lightning_landscape.results import Landscape

    a = np.linspace(-1, 1, 7)
    ls = Landscape(coords=[a, a], values={"loss": 1.0 + np.add.outer(a**2, a**2)})  # in [1, 3]
    heat = plot_heatmap(ls, vmin=0.5, vmax=8.0, log_scale=True)
    norm = heat.axes[0].collections[0].norm
    assert (norm.vmin, norm.vmax) == (0.5, 8.0)
    contour = plot_contour(ls, filled=True, levels=5, vmin=0.5, vmax=8.0)
    np.testing.assert_allclose(contour.axes[0].collections[0].levels, np.geomspace(0.5, 8.0, 5))
    lines = plot_contour(ls, levels=4, vmin=0.0, vmax=6.0)
    np.testing.assert_allclose(lines.axes[0].collections[0].levels, np.linspace(0.0, 6.0, 4))
    surface = plot_surface_3d(ls, vmin=1.5, vmax=2.5, log_scale=False)
    assert surface.axes[0].get_zlim() == (1.5, 2.5)
