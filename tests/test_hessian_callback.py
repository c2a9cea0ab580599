"""HessianSpectrum and LossSurface(ratio_map=True) with a real Trainer, against the exact Hessian."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.func import functional_call
from torch.nn import functional as F

from lightning_landscape import HessianReport, HessianSpectrum, LossSurface
from lightning_landscape.state import capture_state


def exact_hessian_eigenvalues(model, x, y) -> np.ndarray:
    """Dense Hessian of the eval-mode mean cross-entropy w.r.t. all trainable weights (float64)."""
    model = model.double().eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if p.requires_grad])

    def loss(vec):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = vec[i : i + s.numel()].view(s)
            i += s.numel()
        return F.cross_entropy(functional_call(model, params, (x.double(),)), y)

    h = torch.func.hessian(loss)(flat)
    model.float()
    return np.linalg.eigvalsh(h.numpy())


def fit_with(tmp_path, callbacks, logger=False):
    # channels=2: 396 weights, so the exact Hessian is cheap; shuffle off so batch 0 is known.
    import pytorch_lightning as pl

    from examples.digits import DigitsClassifier, DigitsDataModule

    pl.seed_everything(0)
    model = DigitsClassifier(channels=2)
    dm = DigitsDataModule(batch_size=32, num_train=96, shuffle=False)
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=callbacks,
        logger=logger,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    x, y = dm.train_set.tensors
    return trainer, model, x[:32], y[:32]


def test_spectrum_matches_exact_hessian_and_logs(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    cb = HessianSpectrum(top_k=3, trace=True, density=True, num_batches=1, dirpath=str(tmp_path / "out"))
    trainer, model, x, y = fit_with(tmp_path, [cb], logger=logger)
    exact = exact_hessian_eigenvalues(model, x, y)
    r = cb.report
    np.testing.assert_allclose(r.eigenvalues, exact[::-1][:3], rtol=1e-3)
    assert r.lambda_max == pytest.approx(exact[-1], rel=1e-3)
    assert r.lambda_min == pytest.approx(exact[0], rel=1e-2)
    assert r.ratio == pytest.approx(abs(exact[0] / exact[-1]), rel=1e-2)
    assert abs(r.trace - exact.sum()) <= 3 * r.trace_stderr + 1e-6
    assert r.density is not None and np.all(r.density.values >= 0) and r.density.grid.shape == r.density.values.shape
    assert r.metadata["loss_source"] == "training_step"
    # Files and the CSV scalars.
    back = HessianReport.load(tmp_path / "out" / "hessian.npz")
    np.testing.assert_array_equal(back.eigenvalues, r.eigenvalues)
    assert (tmp_path / "out" / "hessian_density.png").stat().st_size > 5000
    assert (tmp_path / "out" / "hessian_eigenvalues.png").stat().st_size > 5000
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    row = next(row for row in rows if row.get("hessian/lambda_max"))
    for key in ("lambda_max", "lambda_min", "ratio", "trace"):
        assert float(row[f"hessian/{key}"]) == pytest.approx(getattr(r, key), rel=1e-6)


def test_wandb_gets_table_figures_and_artifact(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    cb = HessianSpectrum(top_k=2, trace=False, density=True, num_batches=1, dirpath=str(tmp_path / "out"))
    fit_with(tmp_path, [cb], logger=logger)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    tables = list((run_dir / "files/media/table/hessian").glob("top_eigenvalues*.table.json"))
    assert tables
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["rank", "eigenvalue"]
    np.testing.assert_allclose([row[1] for row in table["data"]], cb.report.eigenvalues)
    images = sorted(p.name.rsplit("_", 2)[0] for p in (run_dir / "files/media/images/hessian").glob("*.png"))
    assert images == ["density", "eigenvalues"]
    assert (run_dir / "files" / "hessian.npz").exists()


def test_model_state_unchanged_by_the_analysis(tmp_path):
    cb = HessianSpectrum(top_k=1, trace=True, density=False, num_batches=1, enabled=False)
    trainer, model, _, _ = fit_with(tmp_path, [cb])
    model.train()
    loss = F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    before = capture_state(model)
    cb.enabled = True
    cb.run(trainer, model)
    after = capture_state(model)
    for k in before.parameters:
        assert torch.equal(before.parameters[k], after.parameters[k])
        assert after.grads[k] is before.grads[k]
    for k in before.buffers:
        assert torch.equal(before.buffers[k], after.buffers[k])
    assert before.training == after.training
    assert torch.equal(before.rng["torch"], after.rng["torch"])


def test_ratio_map_center_matches_the_exact_ratio(tmp_path):
    surface = LossSurface(
        resolution=3, ratio_map=True, ratio_resolution=3, num_batches=1, dirpath=str(tmp_path / "out"), progress=False
    )
    trainer, model, x, y = fit_with(tmp_path, [surface])
    exact = exact_hessian_eigenvalues(model, x, y)
    ratio = surface.ratio_landscape
    assert ratio.values["ratio"].shape == (3, 3)
    assert ratio.values["ratio"][1, 1] == pytest.approx(abs(exact[0] / exact[-1]), rel=1e-2)
    assert ratio.values["lambda_max"][1, 1] == pytest.approx(exact[-1], rel=1e-3)
    assert (tmp_path / "out" / "loss_surface_ratio_map_ratio_map.png").exists()
    assert (tmp_path / "out" / "loss_surface_ratio_map.npz").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, r"`top_k`=0.*>= 1"),
        ({"tol": 0.0}, r"`tol`=0.0.*> 0"),
        ({"data": "test"}, r"`data`='test'"),
        ({"num_batches": -1}, r"`num_batches`=-1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        HessianSpectrum(**kwargs)


def test_ratio_map_needs_two_dims():
    with pytest.raises(MisconfigurationException, match="`ratio_map`=True needs a 2-D surface"):
        LossSurface(dims=1, ratio_map=True)


def test_top_k_larger_than_model_fails_before_training(tmp_path):
    steps = {"n": 0}

    class Count(HessianSpectrum):
        def on_train_batch_start(self, *args):
            steps["n"] += 1

    with pytest.raises(MisconfigurationException, match=r"`top_k`=100000 is larger than the model's 396"):
        fit_with(tmp_path, [Count(top_k=100000)])
    assert steps["n"] == 0


def test_loss_surface_along_hessian_eigenvectors_matches_the_exact_hessian(tmp_path):
    """directions='hessian': the plane of the exact Hessian's top-2 eigenvectors (up to sign)."""
    from lightning_landscape.hessian.directions import fix_signs

    surface = LossSurface(resolution=5, span=0.5, num_batches=1, directions="hessian", progress=False)
    trainer, model, x, y = fit_with(tmp_path, [surface])
    model = model.double().eval()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(vec):
        params, i = {}, 0
        for n, p in model.named_parameters():
            params[n] = vec[i : i + p.numel()].view(p.shape)
            i += p.numel()
        return F.cross_entropy(functional_call(model, params, (x.double(),)), y)

    values, vectors = np.linalg.eigh(torch.func.hessian(loss)(flat).numpy())
    top = fix_signs(vectors[:, ::-1][:, :2].T.copy())
    ls = surface.landscape
    np.testing.assert_allclose(ls.metadata["hessian_eigenvalues"], values[::-1][:2], rtol=1e-3)
    assert ls.metadata["directions"] == "hessian" and ls.metadata["axis_labels"][0].startswith("v1 (λ=")
    for i, alpha in enumerate(ls.coords[0]):
        for j, beta in enumerate(ls.coords[1]):
            point = flat + torch.from_numpy(alpha * top[0] + beta * top[1])
            assert ls.loss[i, j] == pytest.approx(loss(point).item(), rel=1e-4), (alpha, beta)


def test_hessian_directions_reject_a_norm_and_unknown_kinds():
    with pytest.raises(MisconfigurationException, match=r"`directions`='hessian' .* `norm`='layer'"):
        LossSurface(directions="hessian", norm="layer")
    with pytest.raises(MisconfigurationException, match=r"`directions`='spectral' is not supported"):
        LossSurface(directions="spectral")
