"""The layout's promises: one guard per analysis, one forward per batch, shared cached data,
trackers chosen by isinstance, no side effects at construction, early checks, conventions."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from pytorch_lightning.utilities.exceptions import MisconfigurationException

import lightning_landscape
from lightning_landscape import HessianSpectrum, LossSurface, TrajectoryPCA, state
from lightning_landscape.callbacks._base import LandscapeCallback

from .helpers import small_fit

PACKAGE = Path(lightning_landscape.__file__).parent
#: The limits of the style guide: small modules, short functions.
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


class _OnFitEnd(Callback):
    """Runs ``action`` at fit end, before the callbacks listed after it."""

    def __init__(self, action) -> None:
        self.action = action

    def on_fit_end(self, trainer, pl_module) -> None:
        self.action(pl_module)


def test_one_state_record_per_analysis(tmp_path, monkeypatch):
    calls = []
    real = state.capture_state
    monkeypatch.setattr(state, "capture_state", lambda model, **kw: calls.append(1) or real(model, **kw))
    cb = LossSurface(dims=1, resolution=3, progress=False, dirpath=str(tmp_path / "out"))
    start = _OnFitEnd(lambda module: calls.clear())
    small_fit(tmp_path, [start, cb], max_epochs=1)
    assert len(calls) == 1  # the callback's context and the engine share one record of the model


def test_metrics_come_from_the_loss_forward(tmp_path):
    counter = {"forward": 0}

    def count(module, args, output):
        counter["forward"] += 1

    def start(module):
        counter["forward"] = 0
        module.register_forward_hook(count)

    cb = LossSurface(dims=1, resolution=3, num_batches=2, metrics=["accuracy"], progress=False)
    trainer, model, _ = small_fit(tmp_path, [_OnFitEnd(start), cb], max_epochs=1)
    assert counter["forward"] == 3 * 2  # 3 points x 2 batches, loss and accuracy from the same pass
    accuracy = cb.landscape.values["accuracy"]
    assert ((accuracy > 0) & (accuracy <= 1)).all()


def test_ratio_map_and_surface_read_the_data_once(tmp_path):
    reads = {"n": 0}

    def start(module):
        dataset = trainer_ref["dm"].train_set
        original = dataset.__class__.__getitem__

        class Counting(dataset.__class__):
            def __getitem__(self, index):
                reads["n"] += 1
                return original(self, index)

        dataset.__class__ = Counting
        reads["n"] = 0

    trainer_ref = {}

    class Remember(Callback):
        def setup(self, trainer, pl_module, stage):
            trainer_ref["dm"] = trainer.datamodule

    cb = LossSurface(resolution=3, ratio_map=True, ratio_resolution=2, num_batches=1, progress=False)
    small_fit(tmp_path, [Remember(), _OnFitEnd(start), cb], max_epochs=1)
    assert reads["n"] == 32  # one batch of 32 samples, read once for the surface and the ratio map
    assert cb.ratio_landscape is not None and cb.ratio_landscape.complete


def test_a_wandb_logger_subclass_gets_the_images(tmp_path):
    class TeamWandbLogger(WandbLogger):
        pass

    logger = TeamWandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    cb = LossSurface(resolution=3, progress=False, interactive=False, dirpath=str(tmp_path / "out"))
    small_fit(tmp_path, [cb], logger=logger, max_epochs=1)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    images = sorted(p.name.rsplit("_", 2)[0] for p in (run_dir / "files/media/images/loss_surface").glob("*.png"))
    assert images == ["contour", "contour_filled", "heatmap", "surface_3d"]


class _BrokenLogger(CSVLogger):
    def log_metrics(self, metrics, step=None):
        if any(k.startswith("loss_surface/") for k in metrics):
            raise RuntimeError("tracker down")
        super().log_metrics(metrics, step)


def test_a_failing_logger_raises_with_on_error_raise_and_the_files_are_kept(tmp_path):
    cb = LossSurface(dims=1, resolution=3, progress=False, dirpath=str(tmp_path / "out"), on_error="raise")
    with pytest.raises(RuntimeError, match="tracker down"):
        small_fit(tmp_path, [cb], logger=_BrokenLogger(str(tmp_path / "csv")), max_epochs=1)
    assert (tmp_path / "out" / "loss_surface.npz").exists()


def test_a_failing_analysis_warns_with_its_traceback_and_the_fit_goes_on(tmp_path):
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_landscape import LandscapeWarning

    def broken_after_moving_weights(module, batch):
        with torch.no_grad():
            next(module.parameters()).add_(1.0)  # the analysis moved the weights, then failed
        raise ValueError("user loss broke")

    before = {}
    record = _OnFitEnd(lambda module: before.update({k: v.clone() for k, v in module.state_dict().items()}))
    first = LossSurface(dims=1, resolution=3, progress=False, loss_fn=broken_after_moving_weights)
    second = HessianSpectrum(num_batches=1, trace=False, density=False)  # runs after the failure
    logger = TensorBoardLogger(str(tmp_path))
    with pytest.warns(LandscapeWarning, match=r"(?s)LossSurface\('loss_surface'\) failed.*user loss broke"):
        trainer, model, _ = small_fit(tmp_path, [record, first, second], logger=logger, max_epochs=1)
    assert first.landscape is None and second.report is not None
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    assert "loss_surface/error/text_summary" in acc.Tags()["tensors"]


def test_constructing_a_callback_creates_no_directory(tmp_path):
    LossSurface(dirpath=str(tmp_path / "a" / "b"))
    HessianSpectrum(dirpath=str(tmp_path / "c"))
    TrajectoryPCA(every_n_steps=1, snapshot_dir=str(tmp_path / "snaps"), dirpath=str(tmp_path / "d"))
    assert list(tmp_path.iterdir()) == []


def test_dirpath_under_a_file_fails_at_construction(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(MisconfigurationException, match=r"`dirpath`=.*file.*writable directory"):
        LossSurface(dirpath=str(tmp_path / "file" / "out"))


@pytest.mark.parametrize("make", [lambda s: HessianSpectrum(seed=s), lambda s: LossSurface(seed=s)])
@pytest.mark.parametrize("seed", [-1, 2**64 - 1, 1.5, True])
def test_seeds_are_checked_at_construction(make, seed):
    with pytest.raises(MisconfigurationException, match=rf"`seed`={seed!r} is not valid; expected an integer"):
        make(seed)


@pytest.mark.parametrize("cls", [LossSurface, TrajectoryPCA, HessianSpectrum])
def test_every_hook_is_marked_override(cls):
    hooks = {name for name, _ in inspect.getmembers(Callback, inspect.isfunction) if not name.startswith("_")}
    for klass in (cls, LandscapeCallback):
        for name, member in vars(klass).items():
            if name in hooks:
                assert getattr(member, "__override__", False), f"{klass.__name__}.{name} lacks @override"


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_modules_and_functions_stay_small():
    for path in _modules():
        source = path.read_text()
        assert source.count("\n") <= MAX_MODULE_LINES, f"{path} has {source.count(chr(10))} lines"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # Code lines from the signature to the end; the docstring (Args, Example) does not count.
                length = node.end_lineno - node.lineno + 1
                if ast.get_docstring(node) is not None:
                    doc = node.body[0]
                    length -= doc.end_lineno - doc.lineno + 1
                assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name} has {length} lines"


def test_no_private_name_is_imported_across_modules():
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_landscape"):
                where = PACKAGE.parent.joinpath(*node.module.split("."))
                is_module = [(where / f"{a.name}.py").exists() or (where / a.name).is_dir() for a in node.names]
                private = [a.name for a, mod in zip(node.names, is_module) if a.name.startswith("_") and not mod]
                # Private *modules* (_validation, _lightning, _base) are the package's own; private names are not.
                assert not private, f"{path} imports {private} from {node.module}"


def test_the_core_imports_no_lightning():
    # The command line builds Trainers and LightningModules from class paths, like LightningCLI.
    outside = ("callbacks", "trackers", "cli")
    core = [p for p in _modules() if p.parent.name not in outside and p.name != "_lightning.py"]
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("pytorch_lightning", "lightning") for n in names), path


def test_reentrant_guard_keeps_the_users_gradients_out_of_the_inner_analysis():
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    grad = model.weight.grad
    before = grad.clone()
    with state.preserved_state(model):
        with state.preserved_state(model):
            pass
        assert model.weight.grad is None  # the inner exit does not hand the user's .grad back yet
        model(torch.ones(1, 2)).sum().backward()
    assert model.weight.grad is grad and torch.equal(grad, before)


def test_the_package_warns_in_its_own_category(tmp_path):
    from lightning_landscape import LandscapeWarning

    cb = TrajectoryPCA(every_n_epochs=5, progress=False)
    with pytest.warns(LandscapeWarning, match="TrajectoryPCA: 1 snapshot"):
        small_fit(tmp_path, [cb], max_epochs=1)


def test_readme_architecture_tree_names_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    tree = readme[readme.index("## Architecture") :].split("```")[1]
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        if rel.name == "__init__.py":
            continue
        assert rel.name in tree or rel.stem in tree, f"README's architecture tree does not list {rel}"
        if len(rel.parts) > 1:
            assert f"{rel.parts[0]}/" in tree
