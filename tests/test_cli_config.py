"""LightningCLI use as README shows it: configs compose, help lists the callback's arguments,
a wrong value prints the package's own message plainly."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from .conftest import ROOT

TRAIN = ROOT / "examples" / "train.py"


def _cli(tmp_path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env
    )


def _callbacks(printed: str) -> list[str]:
    return [c["class_path"] for c in yaml.safe_load(printed)["trainer"]["callbacks"]]


def test_landscape_yaml_adds_to_the_callbacks_already_configured(tmp_path):
    first = tmp_path / "my.yaml"
    first.write_text("trainer:\n  callbacks:\n    - class_path: pytorch_lightning.callbacks.LearningRateMonitor\n")
    landscape = ROOT / "examples" / "configs" / "landscape.yaml"
    out = _cli(tmp_path, "fit", "--config", str(first), "--config", str(landscape), "--print_config")
    assert out.returncode == 0, out.stderr
    assert _callbacks(out.stdout) == [
        "pytorch_lightning.callbacks.LearningRateMonitor",
        "lightning_landscape.LossSurface",
    ]

    digits = ROOT / "examples" / "configs" / "digits.yaml"
    out = _cli(tmp_path, "fit", "--config", str(digits), "--config", str(landscape), "--print_config")
    assert out.returncode == 0, out.stderr
    assert _callbacks(out.stdout) == [
        "lightning_landscape.LossSurface",
        "lightning_landscape.HessianSpectrum",
        "lightning_landscape.TrajectoryPCA",
        "lightning_landscape.LossSurface",
    ]


def test_callback_help_lists_its_arguments(tmp_path):
    out = _cli(tmp_path, "fit", "--trainer.callbacks.help", "lightning_landscape.LossSurface")
    assert out.returncode == 0, out.stderr
    for argument in (
        "--trainer.callbacks.resolution",
        "--trainer.callbacks.num_batches",
        "--trainer.callbacks.enabled",
    ):
        assert argument in out.stdout


def test_a_wrong_value_prints_the_package_message_plainly(tmp_path):
    for flag, message in [
        ("--trainer.callbacks.resolution=0", "error: `resolution`=0 is not valid; expected an integer >= 1."),
        ("--trainer.callbacks.metrics=[acurracy]", "error: `metrics` holds 'acurracy'; accepted names: 'accuracy'"),
    ]:
        out = _cli(
            tmp_path, "fit", "--trainer.max_epochs=1", "--trainer.callbacks+=lightning_landscape.LossSurface", flag
        )
        assert out.returncode == 2
        assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr
        assert "Traceback" not in out.stderr and "Union subtypes" not in out.stderr
