"""Shared test setup: offline W&B, the examples importable, small digits fits."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _wandb_dirs(tmp_path_factory, monkeypatch):
    """Keep W&B's caches and artifact staging out of the home directory."""
    base = tmp_path_factory.getbasetemp() / "wandb_home"
    monkeypatch.setenv("WANDB_DATA_DIR", str(base / "data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(base / "config"))
