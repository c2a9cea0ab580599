"""The paper reproductions run end to end (reduced with --quick) and write the numbers README quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Per example: paths into results.json ("/" between keys, "*" for every entry of a mapping) README quotes.
QUOTED = {
    "batch_size": [
        "runs/*/test_error",
        "runs/*/lambda_max",
        "runs/*/eps_sharpness",
        "runs/*/curve_loss_rise@0.5",
        "runs/*/surface_loss_rise@0.5",
        "interpolation/*/max_train_loss",
    ],
    "skip_connections": ["models/*/test_error", "models/*/lambda_max", "models/*/ratio_map_mean"],
    "swa": ["test_error/*", "train_loss/*", "width/*", "distance_sgd_swa"],
    "mode_connectivity": [
        "curves/*/barrier_line",
        "curves/*/barrier_curve",
        "curves/*/max_test_error_curve",
        "curves/*/max_test_error_line",
    ],
    "basin_volume": [
        "normal/log_basin_volume",
        "poisoned/log_basin_volume",
        "normal/basin_radius_mean",
        "poisoned/basin_radius_mean",
        "normal/test_error",
        "poisoned/test_error",
    ],
}


def lookup(results: dict, path: str) -> list:
    """The values at ``path`` (``/`` between keys, ``*`` for every entry)."""
    nodes = [results]
    for key in path.split("/"):
        nodes = [v for node in nodes for v in (node.values() if key == "*" else [node[key]])]
    return nodes


@pytest.mark.parametrize("name", list(QUOTED))
def test_example_runs_quick_and_writes_the_quoted_numbers(name, tmp_path):
    script = ROOT / "examples" / "papers" / f"{name}.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True
    for path in QUOTED[name]:
        values = lookup(results, path)
        assert values and all(isinstance(v, (int, float)) for v in values), path
    assert list(tmp_path.rglob("*.png")), "no figure written"
