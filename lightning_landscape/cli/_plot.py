"""``lightning-landscape plot``: every saved result re-drawn with the package's figure functions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_landscape.cli._errors import CLIError
from lightning_landscape.cli._kinds import PlotOptions, check_metric, load_result
from lightning_landscape.cli._options import check_int, check_order, output_dir, parse_formats, unique_stems

#: The callbacks' PNG resolution (lightning_landscape.trackers.files.PNG_DPI), not imported from there: the
#: trackers load Lightning, which plot, compare and inspect do not need.
PNG_DPI = 110


def plot_options(cfg: Any) -> PlotOptions:
    """The checked drawing options of ``plot`` and ``compare`` from their parsed arguments.

    Example:
        >>> from types import SimpleNamespace
        >>> plot_options(SimpleNamespace(levels=10, vmin=None, vmax=2.0, log=False, metric=None)).vmax
        2.0
    """
    check_int("--levels", cfg.levels, minimum=2)
    check_order("--vmin", cfg.vmin, "--vmax", cfg.vmax)
    if cfg.log and cfg.vmin is not None and cfg.vmin <= 0:
        raise CLIError(f"--vmin={cfg.vmin!r} is not valid with --log; expected a number > 0 on a log scale.")
    return PlotOptions(
        levels=cfg.levels, vmin=cfg.vmin, vmax=cfg.vmax, log=True if cfg.log else None, metric=cfg.metric
    )


def save_figure(fig: Figure, directory: Path, name: str, formats: Sequence[str]) -> list[Path]:
    """Write ``fig`` as ``<directory>/<name>.<format>`` for each format; returns the paths.

    Example:
        >>> import tempfile
        >>> from lightning_landscape.plots import new_figure
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     [p.name for p in save_figure(new_figure(), Path(tmp), "empty", ["png", "pdf"])]
        ['empty.png', 'empty.pdf']
    """
    paths = []
    directory.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        path = directory / f"{name}.{fmt}"
        fig.savefig(path, dpi=PNG_DPI)
        paths.append(path)
    return paths


def figures_of(kind: Any, result: Any, opts: PlotOptions, path: Path) -> dict[str, Figure]:
    """The kind's figures of ``result``; a figure function's own ValueError becomes a usage error naming the file.

    Example:
        >>> from lightning_landscape.cli._kinds import KINDS
        >>> from lightning_landscape.results import HessianReport
        >>> list(figures_of(KINDS["hessian"], HessianReport(np.array([2.0]), 2.0), PlotOptions(), Path("h.npz")))
        ['eigenvalues']
    """
    try:
        return kind.figures(result, opts)
    except ValueError as err:
        message = str(err).replace("`metric`", "--metric").replace("`value`", "--metric")
        raise CLIError(f"FILE={str(path)!r} cannot be drawn: {message}") from None


def run_plot(cfg: Any) -> list[Path]:
    """Draw every file of ``cfg.files`` into ``cfg.output``; returns the written paths.

    Every file is read and every option checked before anything is drawn or written.
    """
    opts = plot_options(cfg)
    formats = parse_formats(cfg.format)
    paths = [Path(f) for f in cfg.files]
    loaded = [load_result(p) for p in paths]
    for path, (kind, result, _) in zip(paths, loaded):
        check_metric(kind, result, opts.metric, path)
    directory = output_dir(cfg.output)
    written: list[Path] = []
    for path, stem, (kind, result, _) in zip(paths, unique_stems(paths), loaded):
        for key, fig in figures_of(kind, result, opts, path).items():
            written += save_figure(fig, directory, f"{stem}_{key}", formats)
    for path in written:
        print(path)
    return written
