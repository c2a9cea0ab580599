"""The ``lightning-landscape`` command line: every subcommand run as a process on real results and
checkpoints, values checked against independent computations; help and every bad input in-process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_landscape import hessian_check, interpolate, loss_surface, random_direction
from lightning_landscape.cli import main
from lightning_landscape.cli._kinds import PlotOptions, landscape_figures
from lightning_landscape.connect import connect
from lightning_landscape.params import flatten_parameters
from lightning_landscape.results import CurveResult, HessianReport, Landscape, SharpnessReport, load_npz
from lightning_landscape.trajectory import SnapshotStore, path_range, pca_directions, trajectory_pca
from tests.helpers import eval_loss

from .conftest import ROOT

MODEL = ["--model", "examples.digits.DigitsClassifier", "--model.channels", "2"]
DATA = ["--data", "examples.digits.DigitsDataModule", "--data.init_args.num_train", "96"]
ON_CPU = ["--accelerator", "cpu", "--devices", "1"]
ON_TWO = ["--accelerator", "cpu", "--devices", "2"]
SAMPLER_SEED = 3
LIGHT = (
    "import sys; from lightning_landscape.cli import main; files = sys.argv[1:]; "
    "main(['plot', *files, '-o', 'light']); main(['compare', *files, '-o', 'light']); main(['inspect', files[0]]); "
    "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('pytorch_lightning', 'lightning')))"
)


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
    return model, data


def _trajectory(model, data, out: Path) -> None:
    """A real trajectory landscape: SGD snapshots, their PCA plane, the loss on it, the path as extras."""
    params = dict(model.named_parameters())
    store = SnapshotStore(sum(p.numel() for p in params.values()), storage="memory")
    opt = torch.optim.SGD(params.values(), lr=0.5)
    for step in range(6):
        store.append(flatten_parameters(params), step=step, epoch=step // 3)
        opt.zero_grad()
        F.cross_entropy(model(data[0][0]), data[0][1]).backward()
        opt.step()
    pca = trajectory_pca(store, flatten_parameters(params))
    dirs = pca_directions(pca, params)
    coords = [np.linspace(lo, hi, 5) for lo, hi in path_range(pca.path)]
    ls = loss_surface(
        model, data, dirs, coords, loss_fn=F.cross_entropy, progress=False, metadata={"kind": "trajectory"}
    )
    ls.extras.update(
        path=pca.path, epochs=np.asarray(pca.epochs), explained_variance_ratio=pca.explained_variance_ratio
    )
    ls.save(out / "trajectory.npz")
    pca.save(out / "pca.npz")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One saved result of every kind, from the functional API on a tiny model."""
    out = tmp_path_factory.mktemp("results")
    model, data = _tiny()
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    g = np.linspace(-1, 1, 7)
    meta = {"note": "small batch ü", "nested": {"lr": [0.1, 0.25], "ok": True}}
    kw = {"loss_fn": F.cross_entropy, "progress": False}
    loss_surface(model, data, [d1, d2], [g, g], metrics=["accuracy"], metadata=meta, **kw).save(out / "surface.npz")
    loss_surface(model, data, [d1, d2], [g, 2 * g], **kw).save(out / "wide.npz")
    loss_surface(model, data, d1, [g], metrics=["accuracy"], **kw).save(out / "line.npz")
    other = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    interpolate(model, model, other, np.linspace(-0.5, 1.5, 9), data, **kw).save(out / "interpolation.npz")
    hessian_check(model, data, F.cross_entropy, top_k=2, density=True, density_steps=8, density_runs=1).save(
        out / "hessian.npz"
    )
    connect(model, model, other, data, epochs=2, ts=5, bn="eval", metrics=["accuracy"], **kw).save(out / "curve.npz")
    SharpnessReport(
        loss=0.5,
        eps_sharpness=2.0,
        basin_radii=np.array([1.0, 3.0]),
        radii=np.array([0.5]),
        loss_at_radii=np.array([[0.5], [1.0]]),
        threshold=1.5,
    ).save(out / "sharpness.npz")
    with torch.no_grad():
        center = float(F.cross_entropy(model(data[0][0]), data[0][1]))  # at θ*, before the trajectory trains it
    _trajectory(model, data, out)
    np.savez(out / "plain.npz", x=np.arange(3))
    return out, center


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two digits fits of channels=2 (different seeds) and one of channels=3, as Lightning checkpoints."""
    out = tmp_path_factory.mktemp("ckpts")
    for name, seed, channels in (("a", 0, 2), ("b", 1, 2), ("c", 2, 3)):
        pl.seed_everything(seed, verbose=False)
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
        )
        trainer.fit(DigitsClassifier(channels=channels), DigitsDataModule(batch_size=32, num_train=96, seed=0))
        trainer.save_checkpoint(out / f"{name}.ckpt")
    return out


@pytest.fixture(scope="module")
def runs(results, checkpoints, tmp_path_factory):
    """Every subcommand as its own process, started together (they are independent) and awaited here."""
    res, _ = results
    cwd = tmp_path_factory.mktemp("cwd")
    kinds = ["surface", "line", "interpolation", "hessian", "curve", "sharpness", "trajectory", "pca"]
    a, b, c = (str(checkpoints / f"{n}.ckpt") for n in "abc")
    commands = {
        "plot": ["plot", *(str(res / f"{k}.npz") for k in kinds), "-o", "figs", "--format", "png,pdf", "--levels", "8"],
        "compare": [
            "compare",
            str(res / "surface.npz"),
            str(res / "wide.npz"),
            str(res / "hessian.npz"),
            "-o",
            "cmp",
            "--labels",
            "small,large,hessian",
            "--levels",
            "8",
        ],
        "interpolate": [
            "interpolate",
            a,
            b,
            *MODEL,
            *DATA,
            *ON_CPU,
            "--metrics",
            "accuracy",
            "--alphas",
            "-0.5,1.5,9",
            "-o",
            "interp",
        ],
        "connect": [
            "connect",
            a,
            b,
            *MODEL,
            *DATA,
            *ON_CPU,
            "--epochs",
            "1",
            "--points",
            "3",
            "--bn",
            "eval",
            "-o",
            "conn",
        ],
        # Two processes (gloo), each on its half of the 96 digits (48: two batches of 24).
        "interpolate_ddp": [
            "interpolate",
            a,
            b,
            *MODEL,
            *DATA,
            *ON_TWO,
            "--metrics",
            "accuracy",
            "--alphas",
            "-0.5,1.5,9",
            "-o",
            "interp2",
        ],
        "connect_ddp": [
            "connect",
            a,
            b,
            *MODEL,
            *DATA,
            *ON_TWO,
            "--data.init_args.batch_size",
            "24",
            "--epochs",
            "1",
            "--points",
            "3",
            "--bn",
            "eval",
            "-o",
            "conn2",
        ],
        "inspect": ["inspect", str(res / "surface.npz"), "--json"],
        "help": ["connect", "--help"],
        "mismatch": ["interpolate", a, c, *MODEL, *DATA, *ON_CPU, "-o", "never"],
        # Drawing and reading results must not pay for importing Lightning.
        "light": ["-c", LIGHT, str(res / "surface.npz"), str(res / "hessian.npz")],
    }
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env["PL_GLOBAL_SEED"] = str(SAMPLER_SEED)  # Lightning's seed, which DistributedSampler's shuffle takes
    procs = {
        name: subprocess.Popen(
            [sys.executable, *(args if args[0] == "-c" else ["-m", "lightning_landscape", *args])],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[name] = (proc.returncode, out, err)
    return cwd, done


def _ok(runs, name):
    cwd, done = runs
    rc, out, err = done[name]
    assert rc == 0, err
    return cwd, out


def test_plot_writes_the_figures_of_every_result_kind(runs):
    cwd, _ = _ok(runs, "plot")
    figures = [
        "surface_contour",
        "surface_contour_filled",
        "surface_heatmap",
        "surface_surface_3d",
        "line_curve",
        "interpolation_interpolation",
        "hessian_eigenvalues",
        "hessian_density",
        "curve_connection",
        "sharpness_basin_radii",
        "trajectory_contour_path",
        "trajectory_path",
        "pca_path",
    ]
    expected = {f"{name}.{fmt}" for name in figures for fmt in ("png", "pdf")}
    written = {p.name for p in (cwd / "figs").iterdir()}
    assert written == expected
    assert all((cwd / "figs" / name).stat().st_size > 1000 for name in expected)


def test_levels_vmin_vmax_and_log_reach_the_figures(results):
    res, _ = results
    ls = Landscape.load(res / "surface.npz")
    lo, hi = np.quantile(ls.loss, [0.2, 0.8])
    figs = landscape_figures(ls, PlotOptions(levels=6, vmin=float(lo), vmax=float(hi)))
    drawn = figs["heatmap"].axes[0].collections[0].get_array()
    assert drawn.min() == pytest.approx(lo) and drawn.max() == pytest.approx(hi)
    levels = figs["contour_filled"].axes[0].collections[0].levels  # over the clipped copy: exactly the limits
    np.testing.assert_allclose(levels, np.geomspace(lo, hi, 6))
    assert np.nanmax(Landscape.load(res / "surface.npz").loss) > hi  # the saved result is untouched
    assert figs["heatmap"].axes[0].collections[0].norm.__class__.__name__ == "Normalize"
    log = landscape_figures(ls, PlotOptions(log=True))["heatmap"].axes[0].collections[0].norm
    assert type(log).__name__ == "LogNorm"
    curve = landscape_figures(Landscape.load(res / "line.npz"), PlotOptions(vmin=0.1, vmax=5.0))["curve"]
    assert curve.axes[0].get_ylim() == (0.1, 5.0)


def test_compare_draws_surfaces_on_one_scale_with_shared_levels(runs, results):
    cwd, stdout = _ok(runs, "compare")
    res, center = results
    both = np.concatenate([Landscape.load(res / f).loss.ravel() for f in ("surface.npz", "wide.npz")])
    lo, hi = float(np.nanmin(both)), float(np.nanmax(both))
    report = json.loads((cwd / "cmp" / "compare.json").read_text())
    panels = report["scale"]["panels"]
    assert [p["label"] for p in panels] == ["small", "large"]
    for panel in panels:  # what each drawn panel holds: the same norm and levels, over both surfaces
        assert panel["vmin"] == pytest.approx(lo) and panel["vmax"] == pytest.approx(hi)
        np.testing.assert_allclose(panel["levels"], np.geomspace(lo, hi, 8))
    assert (cwd / "cmp" / "compare.png").stat().st_size > 1000
    rows = {row["label"]: row for row in csv.DictReader((cwd / "cmp" / "compare.csv").open())}
    assert float(rows["small"]["center_loss"]) == pytest.approx(center, rel=1e-6)  # the model's own loss at θ*
    assert float(rows["large"]["max_loss"]) == pytest.approx(Landscape.load(res / "wide.npz").loss.max())
    lam = HessianReport.load(res / "hessian.npz").lambda_max
    assert float(rows["hessian"]["lambda_max"]) == pytest.approx(lam) and rows["small"]["lambda_max"] == ""
    assert "center_loss" in stdout and "lambda_max" in stdout


def test_compare_draws_one_dimensional_results_on_one_axis(results, tmp_path, capsys):
    res, _ = results
    main(
        [
            "compare",
            str(res / "line.npz"),
            str(res / "interpolation.npz"),
            str(res / "curve.npz"),
            "-o",
            str(tmp_path),
            "--vmax",
            "9",
        ]
    )
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["scale"]["ylim"][1] == 9.0
    labels = [row["label"] for row in report["results"]]
    assert labels == ["line", "interpolation", "curve"]
    assert report["results"][2]["scalars"]["barrier_line"] == pytest.approx(
        CurveResult.load(res / "curve.npz").barrier_line
    )


def _model_from(ckpt: Path) -> DigitsClassifier:
    model = DigitsClassifier(channels=2)
    model.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    return model.eval()


def _accuracy(model, loader) -> float:
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return hits / sum(len(y) for _, y in loader)


def test_interpolate_gives_both_checkpoints_own_losses_and_the_barrier(runs, checkpoints):
    cwd, _ = _ok(runs, "interpolate")
    scalars = json.loads((cwd / "interp" / "scalars.json").read_text())
    dm = DigitsDataModule(num_train=96)
    dm.setup("fit")
    for end, name in (("start", "a"), ("end", "b")):
        model = _model_from(checkpoints / f"{name}.ckpt")
        assert scalars[f"loss_{end}"] == pytest.approx(eval_loss(model, dm.train_dataloader()), rel=1e-5)
        assert scalars[f"val_loss_{end}"] == pytest.approx(eval_loss(model, dm.val_dataloader()), rel=1e-5)
        assert scalars[f"accuracy_{end}"] == pytest.approx(_accuracy(model, dm.train_dataloader()))
    ls = Landscape.load(cwd / "interp" / "interpolation.npz")
    alphas = ls.coords[0]
    assert 0.0 in alphas and 1.0 in alphas and len(alphas) == 9
    inside = ls.loss[(alphas >= 0) & (alphas <= 1)]
    ends = ls.loss[alphas == 0.0][0], ls.loss[alphas == 1.0][0]
    assert scalars["barrier"] == pytest.approx(inside.max() - max(ends))
    assert ls.metadata["start_label"] == "a" and ls.metadata["loss_source"] == "training_step"
    assert (cwd / "interp" / "interpolation.png").stat().st_size > 1000


def test_connect_fits_and_evaluates_a_curve_between_checkpoints(runs, checkpoints):
    cwd, _ = _ok(runs, "connect")
    result = CurveResult.load(cwd / "conn" / "curve.npz")
    assert result.ts.tolist() == [0.0, 0.5, 1.0] and result.history.size == 2  # 96 samples, batches of 64
    dm = DigitsDataModule(num_train=96)
    dm.setup("fit")
    # bn=eval with the first run's statistics: the curve starts at that model itself.
    own = eval_loss(_model_from(checkpoints / "a.ckpt"), dm.train_dataloader())
    assert result.curve["loss"][0] == pytest.approx(own, rel=1e-5) == result.line["loss"][0]
    scalars = json.loads((cwd / "conn" / "scalars.json").read_text())
    assert scalars["barrier_line"] == pytest.approx(result.line["loss"].max() - result.line["loss"][[0, -1]].max())
    assert {p.name for p in (cwd / "conn").iterdir()} == {
        "curve.npz",
        "curve.pt",
        "curve_connection.png",
        "scalars.json",
    }


def test_interpolate_on_two_processes_gives_the_values_of_one(runs):
    cwd, _ = _ok(runs, "interpolate_ddp")
    one, two = (Landscape.load(cwd / d / "interpolation.npz") for d in ("interp", "interp2"))
    assert sorted(two.values) == sorted(one.values) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    for name in one.values:
        np.testing.assert_allclose(two.values[name], one.values[name], rtol=1e-5, err_msg=name)
    assert (two.metadata["processes"], one.metadata["processes"]) == (2, 1)
    assert two.metadata["num_samples"] == one.metadata["num_samples"] == 96  # each sample once, none twice


def _ddp_first_step_loss(ckpt_a: Path, ckpt_b: Path, batch_size: int, seed: int = 0) -> float:
    """The curve fit's first loss under two processes, by hand: t and the batch drawn as the fit draws
    them, each rank's batch from its DistributedSampler shard (shuffled with Lightning's seed), the two batch
    losses in train mode at the line's point θ(t) (the bends start on it) averaged."""
    dm = DigitsDataModule(num_train=96, batch_size=batch_size)
    dm.setup("fit")
    x, y = dm.train_set.tensors
    order = torch.randperm(96, generator=torch.Generator().manual_seed(SAMPLER_SEED))
    generator = torch.Generator().manual_seed(seed)
    index = int(torch.randperm(48 // batch_size, generator=generator)[0])
    t = float(torch.rand((), generator=generator, dtype=torch.float64))
    a, b = _model_from(ckpt_a), _model_from(ckpt_b)
    with torch.no_grad():
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.copy_((1 - t) * pa + t * pb)
    a.train()
    losses = []
    for rank in range(2):
        idx = order[rank::2][index * batch_size : (index + 1) * batch_size]
        losses.append(float(F.cross_entropy(a(x[idx]), y[idx])))
    return sum(losses) / 2


def test_connect_on_two_processes_averages_their_losses_and_evaluates_each_sample_once(runs, checkpoints):
    cwd, _ = _ok(runs, "connect_ddp")
    result = CurveResult.load(cwd / "conn2" / "curve.npz")
    assert result.history.size == 2  # one epoch of 48 samples per process, batches of 24
    assert result.history[0] == pytest.approx(
        _ddp_first_step_loss(checkpoints / "a.ckpt", checkpoints / "b.ckpt", 24), rel=1e-5
    )
    dm = DigitsDataModule(num_train=96)
    dm.setup("fit")
    a, b = _model_from(checkpoints / "a.ckpt"), _model_from(checkpoints / "b.ckpt")
    b.load_state_dict({**b.state_dict(), **dict(a.named_buffers())})  # the curve moves weights only
    for i, model in ((0, a), (-1, b)):  # the end points' losses over all 96 samples (bn=eval)
        own = eval_loss(model, dm.train_dataloader())
        assert result.curve["loss"][i] == pytest.approx(own, rel=1e-5) == result.line["loss"][i]
    assert result.metadata["processes"] == 2


def test_inspect_json_round_trips_the_metadata(runs, results):
    _, stdout = _ok(runs, "inspect")
    res, _ = results
    info = json.loads(stdout)
    assert info["metadata"] == load_npz(res / "surface.npz")[1]
    assert info["metadata"]["nested"] == {"lr": [0.1, 0.25], "ok": True} and info["kind"] == "landscape"
    assert info["grid"]["shape"] == [7, 7] and info["grid"]["axes"][0] == {"min": -1.0, "max": 1.0, "num": 7}
    assert info["versions"]["torch_version"] == torch.__version__
    assert info["scalars"]["center_loss"] == pytest.approx(results[1], rel=1e-6)


def test_help_works_on_every_subcommand(runs, capsys):
    rc, out, _ = runs[1]["help"]
    assert rc == 0 and "--num-bends" in out and "--model" in out
    for command in ([], ["plot"], ["compare"], ["interpolate"], ["connect"], ["inspect"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0
        assert "usage:" in capsys.readouterr().out
    script = [ep for ep in entry_points(group="console_scripts") if ep.name == "lightning-landscape"]
    assert script and script[0].load() is main


def test_plot_compare_and_inspect_do_not_import_lightning(runs):
    _, out = _ok(runs, "light")
    assert out.strip().splitlines()[-1] == "LOADED []"


def test_architecture_mismatch_exits_2_with_one_line_naming_the_checkpoint(runs):
    cwd, done = runs
    rc, _, err = done["mismatch"]
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lightning-landscape interpolate: error: CKPT_B does not match the model")
    assert "(3, 1, 3, 3)" in last and not (cwd / "never").exists()


def _bad(capsys, argv, *names):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    for name in names:
        assert name in err, err
    return err


def test_bad_arguments_exit_2_with_a_message_naming_the_argument(results, checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    res, _ = results
    surface, line = str(res / "surface.npz"), str(res / "line.npz")
    a, b, c = (str(checkpoints / f"{n}.ckpt") for n in "abc")
    (tmp_path / "file").write_text("x")
    _bad(capsys, ["plot", surface, "--vmin", "2", "--vmax", "1"], "--vmin=2.0", "--vmax=1.0")
    _bad(capsys, ["plot", surface, "--levels", "x"], "--levels")
    _bad(capsys, ["plot", surface, "--levels", "1"], "--levels=1")
    _bad(capsys, ["plot", surface, "--metric", "nope"], "--metric='nope'", "accuracy")
    _bad(capsys, ["plot", surface, "--format", "doc"], "--format")
    _bad(capsys, ["plot", str(res / "plain.npz")], "FILE=", "plain.npz", "written by lightning_landscape")
    _bad(capsys, ["inspect", str(tmp_path / "file")], "FILE=", "written by lightning_landscape")
    _bad(capsys, ["inspect", "missing.npz"], "FILE='missing.npz'")
    _bad(capsys, ["plot", surface, "-o", str(tmp_path / "file" / "sub")], "-o/--output")
    _bad(capsys, ["plot", surface, "--bogus"], "--bogus")
    _bad(capsys, ["compare", surface, line], "1-D", "2-D", "line.npz")
    _bad(capsys, ["compare", surface, line, "--labels", "one"], "--labels")
    runs = ["interpolate", a, b, *DATA, *ON_CPU]
    _bad(capsys, [*runs, "--model", "examples.digits.Nope"], "--model", "Nope")
    _bad(capsys, [*runs, "--model", "examples.digits.DigitsDataModule"], "--model", "LightningModule")
    _bad(capsys, [*runs, *MODEL, "--model.chanels", "2"], "--model", "chanels")
    _bad(capsys, ["interpolate", a, c, *MODEL, *DATA, *ON_CPU], "CKPT_B", "shape")
    _bad(capsys, ["interpolate", a, "none.ckpt", *MODEL, *DATA, *ON_CPU], "CKPT_B='none.ckpt'")
    _bad(capsys, [*runs, *MODEL, "--alphas", "1,0,5"], "--alphas")
    _bad(capsys, [*runs, *MODEL, "--alphas", "0.2,0.8,5"], "--alphas", "[0, 1]")
    _bad(capsys, [*runs, *MODEL, "--metrics", "acurracy"], "--metrics", "'acurracy'")
    _bad(capsys, [*runs, *MODEL, "--bn", "train"], "--bn='train'", "'recompute'")
    _bad(capsys, [*runs, *MODEL, "--devices", "0"], "--devices='0'", ">= 1")
    _bad(capsys, [*runs, *MODEL, "--devices", "x"], "--devices='x'")
    _bad(capsys, [*runs, *MODEL, "-o", str(tmp_path / "file" / "sub")], "-o/--output")
    _bad(capsys, ["interpolate", a, b, *MODEL, *ON_CPU], "--data")
    _bad(capsys, ["connect", a, b, *MODEL, *DATA, *ON_CPU, "--num-bends", "0"], "--num-bends=0")
    _bad(capsys, ["connect", a, b, *MODEL, *DATA, *ON_CPU, "--lr", "-1"], "--lr")
    assert not list(tmp_path.glob("*.npz"))  # nothing was computed
