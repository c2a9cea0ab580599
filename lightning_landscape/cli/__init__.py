"""The ``lightning-landscape`` command line (also ``python -m lightning_landscape``).

Subcommands: ``plot`` (re-draw saved results), ``compare`` (several results on one scale, and a
table of their scalars), ``interpolate`` and ``connect`` (two checkpoints of a LightningModule),
``inspect`` (what a saved result holds). ``lightning-landscape <subcommand> --help`` lists each
one's options. A usage error prints one line naming the argument and exits with status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from jsonargparse import ArgumentError

from lightning_landscape.cli._errors import USAGE_ERROR, CLIError, condense
from lightning_landscape.cli._parser import PROG, build_parser, chosen_command, flags_of, instantiate

__all__ = ["main"]

#: Options whose value may start with "-" (``--alphas -0.5,1.5,41``), which argparse would read as an option.
_SIGNED = ("--alphas", "--vmin", "--vmax")


def _join_signed(argv: list[str]) -> list[str]:
    out: list[str] = []
    for token in argv:
        signed_number = len(token) > 1 and token[0] == "-" and (token[1].isdigit() or token[1] == ".")
        if out and out[-1] in _SIGNED and signed_number:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _run(command: str, cfg, parser) -> None:
    from lightning_landscape.cli import _compare, _inspect, _plot

    if command == "plot":
        _plot.run_plot(cfg)
    elif command == "compare":
        _compare.run_compare(cfg)
    elif command == "inspect":
        _inspect.run_inspect(cfg)
    else:
        from lightning_landscape.cli import _runs

        run = _runs.run_interpolate if command == "interpolate" else _runs.run_connect
        run(cfg, lambda key: instantiate(parser, cfg, key))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-landscape`` with ``argv`` (default ``sys.argv[1:]``); 0 on success.

    Raises:
        SystemExit: 2 after printing a one-line usage error; 0 after ``--help``.

    Example:
        >>> main(["inspect", "missing.npz"])
        Traceback (most recent call last):
            ...
        SystemExit: 2
    """
    argv = _join_signed(list(sys.argv[1:] if argv is None else argv))
    # Class paths resolve from the working directory, as with `python -m`, also for the console script.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    command = chosen_command(argv)
    parser, subs = build_parser(command)
    where = f"{PROG} {command}" if command else PROG
    try:
        cfg = parser.parse_args(argv)
        command = cfg.command
        _run(command, cfg[command], subs[command])
    except ArgumentError as err:
        flags = flags_of(subs[command]) if command else {}
        print(f"{where}: error: {condense(str(err), flags, command)}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
    except CLIError as err:
        print(f"{where}: error: {err}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    return 0
