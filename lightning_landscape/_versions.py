"""Versions recorded in every result, so a saved landscape says what produced it."""

from __future__ import annotations

import platform
from importlib import metadata

import numpy as np
import torch


def package_version() -> str:
    """This package's installed version ("unknown" when run from a bare checkout)."""
    try:
        return metadata.version("lightning-landscape")
    except metadata.PackageNotFoundError:
        return "unknown"


def collect() -> dict[str, str]:
    """Versions of this package, torch, numpy and Python."""
    return {
        "lightning_landscape_version": package_version(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
    }
