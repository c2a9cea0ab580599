"""The parsers of ``lightning-landscape``: jsonargparse (LightningCLI's own parser), one per subcommand.

``--model`` and ``--data`` take class paths the Lightning way (``--model pkg.Module --model.channels 4``,
or ``--model.init_args.channels 4``). Only the subcommand being run gets its full parser: the others are
described by name, so ``plot`` and ``inspect`` start without importing Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from jsonargparse import ArgumentParser

PROG = "lightning-landscape"

#: Shown under every subcommand that writes figures.
_FORMAT_HELP = "figure formats, comma-separated (e.g. png,pdf)"


def _parser(description: str) -> ArgumentParser:
    return ArgumentParser(description=description, exit_on_error=False)


def _drawing(p: ArgumentParser) -> None:
    p.add_argument("--levels", type=int, default=30, help="contour levels of 2-D figures (>= 2)")
    p.add_argument(
        "--vmin", type=float | None, default=None, help="lower end of the colour scale (2-D) or y axis (1-D)"
    )
    p.add_argument(
        "--vmax", type=float | None, default=None, help="upper end of the colour scale (2-D) or y axis (1-D)"
    )
    p.add_argument("--log", action="store_true", help="a logarithmic loss scale (default: chosen per figure)")
    p.add_argument(
        "--metric",
        type=str | None,
        default=None,
        help="the value to draw instead of the loss (2-D), or beside it (1-D)",
    )
    p.add_argument("--format", type=str, default="png", help=_FORMAT_HELP)


def build_plot() -> ArgumentParser:
    """The ``plot`` parser.

    Example:
        >>> build_plot().parse_args(["s.npz", "--levels", "12"]).levels
        12
    """
    p = _parser(
        "Re-draw saved results (.npz written by lightning_landscape: surfaces, interpolations, trajectories, "
        "Hessian reports, mode-connecting curves, sharpness reports, PCA paths) with the package's figure "
        "functions, as <DIR>/<file stem>_<figure>.<format>. --vmin/--vmax clip a copy of a 2-D landscape "
        "(colours saturate beyond them) and set a curve's y axis; options a kind has no use for are ignored."
    )
    p.add_argument("files", type=str, nargs="+", metavar="FILE", help="saved results (.npz)")
    p.add_argument("-o", "--output", type=str, default=".", help="directory of the figures (created)")
    _drawing(p)
    return p


def build_compare() -> ArgumentParser:
    """The ``compare`` parser.

    Example:
        >>> build_compare().parse_args(["a.npz", "b.npz", "--labels", "a,b"]).files
        ['a.npz', 'b.npz']
    """
    p = _parser(
        "Compare saved results: 1-D results as curves on one axis, or 2-D surfaces side by side with one "
        "colour scale and the same contour levels, computed over all of them, and one colour bar; plus a "
        "table of their scalars, printed and written to <DIR>/compare.json and compare.csv. Mixing 1-D and "
        "2-D results is an error; reports without a grid (Hessian, sharpness) join the table only."
    )
    p.add_argument("files", type=str, nargs="+", metavar="FILES", help="saved results (.npz)")
    p.add_argument("-o", "--output", type=str, default=".", help="directory of the figure and the table (created)")
    p.add_argument(
        "--labels", type=str | None, default=None, help="one name per file, comma-separated (default: file stems)"
    )
    _drawing(p)
    return p


def build_inspect() -> ArgumentParser:
    """The ``inspect`` parser.

    Example:
        >>> build_inspect().parse_args(["s.npz", "--json"]).json
        True
    """
    p = _parser(
        "Show what a saved result holds: kind, grid shape and ranges, scalars, versions and the stored "
        "metadata; --json prints it as JSON (the metadata exactly as stored)."
    )
    p.add_argument("file", type=str, metavar="FILE", help="a saved result (.npz)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _two_runs(p: ArgumentParser, bn_default: str) -> None:
    import pytorch_lightning as pl

    p.add_argument("ckpt_a", type=str, metavar="CKPT_A", help="the first run's checkpoint (.ckpt or state dict)")
    p.add_argument("ckpt_b", type=str, metavar="CKPT_B", help="the second run's checkpoint, same architecture")
    p.add_subclass_arguments(pl.LightningModule, "model", required=True, instantiate=True)
    p.add_subclass_arguments(pl.LightningDataModule, "data", required=True, instantiate=True)
    p.add_argument(
        "--metrics", type=str | None, default=None, help="metric names, comma-separated (accuracy, mse, mae)"
    )
    p.add_argument(
        "--bn",
        type=Literal["eval", "recompute"],
        default=bn_default,
        help="BatchNorm statistics at each point: as stored/interpolated, or recomputed on the data",
    )
    p.add_argument("--num-batches", type=int | None, default=None, help="use at most this many batches of each loader")
    p.add_argument("-o", "--output", type=str, default=".", help="directory of the results (created)")
    p.add_argument("--accelerator", type=str, default="auto", help="as pl.Trainer's accelerator (cpu, gpu, auto)")
    p.add_argument(
        "--devices",
        type=str,
        default="1",
        help="as pl.Trainer's devices; more than one runs under DDP (one process per device, each on its shard "
        "of the data; --num-batches is per process)",
    )
    p.add_argument("--format", type=str, default="png", help=_FORMAT_HELP)


def build_interpolate() -> ArgumentParser:
    """The ``interpolate`` parser.

    Example:
        >>> cfg = build_interpolate().parse_args(["a.ckpt", "b.ckpt", "--model", "pytorch_lightning.LightningModule",
        ...                                        "--data", "pytorch_lightning.LightningDataModule"])
        >>> cfg.alphas, cfg.bn
        ('-0.5,1.5,41', 'eval')
    """
    p = _parser(
        "Loss and metrics of two checkpoints of one LightningModule and on the line through them, "
        "θ(α) = (1−α)·θ_A + α·θ_B, on the datamodule's train and val data (datamodule.setup('fit')), with the "
        "module's own loss (landscape_step, else training_step). Runs on one device. Writes "
        "interpolation.npz, the figure and scalars.json (both ends and the barrier: max over α in [0, 1] of "
        "the loss minus the larger end loss)."
    )
    _two_runs(p, "eval")
    p.add_argument("--alphas", type=str, default="-0.5,1.5,41", help="lo,hi,n: n values of α from lo <= 0 to hi >= 1")
    return p


def build_connect() -> ArgumentParser:
    """The ``connect`` parser.

    Example:
        >>> cfg = build_connect().parse_args(["a.ckpt", "b.ckpt", "--curve", "polychain",
        ...     "--model", "pytorch_lightning.LightningModule", "--data", "pytorch_lightning.LightningDataModule"])
        >>> cfg.curve, cfg.num_bends, cfg.bn
        ('polychain', 1, 'recompute')
    """
    p = _parser(
        "Fit a low-loss curve between two checkpoints (Garipov et al. 2018) on the train data, then evaluate "
        "the curve and the straight line (barrier heights of both). Runs on one device. Writes curve.npz, "
        "curve.pt, the figure, scalars.json, and with --plane N the loss over the plane through both end "
        "points and the bend (curve_plane.npz)."
    )
    _two_runs(p, "recompute")
    p.add_argument("--curve", type=Literal["bezier", "polychain"], default="bezier", help="the curve type")
    p.add_argument("--num-bends", type=int, default=1, help="trainable bends")
    p.add_argument("--epochs", type=int, default=10, help="passes over the train batches")
    p.add_argument("--optimizer", type=Literal["sgd", "adam"], default="sgd", help="optimizer of the bends")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    p.add_argument("--seed", type=int, default=0, help="seeds the draws of t, the batch order and dropout")
    p.add_argument("--points", type=int, default=61, help="evaluated values of t from 0 to 1")
    p.add_argument("--eval-on", type=Literal["train", "val"], default="train", help="data of the evaluation")
    p.add_argument("--plane", type=int, default=0, help="resolution of the plane figure (0: none)")
    return p


#: name -> (one-line help, builder) of every subcommand.
COMMANDS: dict[str, tuple[str, Callable[[], ArgumentParser]]] = {
    "plot": ("re-draw saved results", build_plot),
    "compare": ("several results on one scale, and a table of their scalars", build_compare),
    "interpolate": ("two checkpoints and the line through them", build_interpolate),
    "connect": ("a trained low-loss curve between two checkpoints", build_connect),
    "inspect": ("what a saved result holds", build_inspect),
}


def chosen_command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` runs (its first word that is not an option), if it is one.

    Example:
        >>> chosen_command(["plot", "s.npz"]), chosen_command(["--help"])
        ('plot', None)
    """
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(command: str | None = None) -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    """The top-level parser and the subcommand parsers: ``command``'s in full, the others by name only.

    Example:
        >>> parser, subs = build_parser("inspect")
        >>> parser.parse_args(["inspect", "s.npz"]).inspect.file
        's.npz'
    """
    parser = ArgumentParser(
        prog=PROG,
        exit_on_error=False,
        description="Loss-landscape results from the command line: draw, compare and inspect saved results; "
        "interpolate or connect two checkpoints of a LightningModule. Class paths are imported from the "
        "current directory too.",
    )
    subcommands = parser.add_subcommands(dest="command")
    subs = {}
    for name, (text, build) in COMMANDS.items():
        subs[name] = build() if name == command else _parser(text)
        subcommands.add_subcommand(name, subs[name], help=text)
    return parser, subs


def flags_of(parser: ArgumentParser) -> dict[str, str]:
    """Parser key -> what a user types: ``num_batches`` -> ``--num-batches``, ``ckpt_a`` -> ``CKPT_A``.

    Example:
        >>> flags_of(build_inspect())["file"], flags_of(build_plot())["output"]
        ('FILE', '-o/--output')
    """
    out = {}
    for action in parser._actions:  # argparse's list of every argument
        if action.option_strings:
            longest = sorted(action.option_strings, key=len)
            out[action.dest] = "/".join(longest) if len(longest) > 1 else longest[0]
        else:
            out[action.dest] = str(action.metavar or action.dest.upper())
    return out


def instantiate(parser: ArgumentParser, cfg: Any, key: str) -> Any:
    """The object ``cfg[key]`` describes (``"model"`` or ``"data"``), built alone so a failure names its flag."""
    from lightning_landscape.cli._errors import CLIError, first_reason

    single = cfg.clone()
    for other in ("model", "data"):
        if other != key:
            single[other] = None
    try:
        return parser.instantiate_classes(single)[key]
    except Exception as err:  # the user's own constructor: any error is theirs to see, in one line
        path = getattr(cfg[key], "class_path", cfg[key])
        raise CLIError(f"--{key}={path!r} could not be created: {first_reason(str(err))}") from None
