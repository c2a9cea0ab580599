"""``python -m lightning_landscape``: the ``lightning-landscape`` command line."""

from lightning_landscape.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
