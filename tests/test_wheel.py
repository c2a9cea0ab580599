"""The wheel installs clean: built from this tree, installed into a fresh virtual environment, it
imports, reports its distribution's version, ships py.typed, and runs a callback on a tiny model."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
import zipfile

from .conftest import ROOT

SMOKE = textwrap.dedent(
    """
    import importlib.metadata as md, pathlib, sys
    import pytorch_lightning as pl, torch
    import lightning_landscape as ll
    assert "site-packages" in ll.__file__ and sys.prefix in ll.__file__, ll.__file__
    assert ll.__version__ == md.version("lightning-landscape"), (ll.__version__, md.version("lightning-landscape"))
    assert (pathlib.Path(ll.__file__).parent / "py.typed").exists()

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)
        def forward(self, x):
            return self.layer(x)
        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    samples = torch.utils.data.TensorDataset(torch.randn(16, 3), torch.randint(0, 2, (16,)))
    data = torch.utils.data.DataLoader(samples, batch_size=8)
    surface = ll.LossSurface(dims=1, resolution=3, progress=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[surface], default_root_dir=sys.argv[1])
    trainer.fit(Tiny(), data)
    assert surface.landscape.loss.shape == (3,)
    print("wheel ok", ll.__version__)
    """
)


def test_wheel_installs_into_a_fresh_venv_and_runs_a_callback(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--sdist", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("*.whl")
    assert list(dist.glob("*.tar.gz"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_landscape/py.typed" in names and not any(n.startswith("tests/") for n in names)

    # The heavy dependencies (torch, Lightning) come from this interpreter's site-packages;
    # the package itself only from the wheel.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, system_site_packages=True, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    smoke = subprocess.run(
        [str(python), "-c", SMOKE, str(tmp_path / "run")], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    assert "wheel ok" in smoke.stdout
