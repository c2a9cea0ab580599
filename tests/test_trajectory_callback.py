"""TrajectoryPCA with a real Trainer: PCA against numpy on a recorded path, storage modes, resume, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_landscape import Landscape, TrajectoryPCA

from .helpers import small_fit


class Recorder(Callback):
    """A hand-made path: the trainable weights at fit start and after every optimizer step."""

    def __init__(self):
        self.rows = []

    def _take(self, module):
        self.rows.append(
            torch.cat([p.detach().flatten().double() for p in module.parameters() if p.requires_grad]).numpy()
        )

    def on_fit_start(self, trainer, pl_module):
        self._take(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self._take(pl_module)


def test_pca_and_path_match_numpy_svd_of_the_recorded_trajectory(tmp_path):
    recorder = Recorder()
    cb = TrajectoryPCA(every_n_steps=1, resolution=5, dirpath=str(tmp_path / "out"), progress=False)
    _, model, _ = small_fit(tmp_path, [recorder, cb], max_epochs=2)
    snaps = np.stack(recorder.rows)
    final = snaps[-1]
    M = snaps[:-1] - final  # the last snapshot is the final weights: M = [θ_0 − θ_n; ...; θ_{n−1} − θ_n]
    _, s, vt = np.linalg.svd(M, full_matrices=False)
    evr = s**2 / np.sum(s**2)
    np.testing.assert_allclose(cb.pca.explained_variance_ratio, evr[:2], rtol=1e-4, atol=1e-7)
    for k in range(2):
        comp = cb.pca.components[k].double().numpy()
        assert abs(abs(comp @ vt[k]) - 1.0) < 1e-4
    expected_path = M @ vt[:2].T
    got = cb.pca.path
    assert got.shape == (len(snaps), 2)
    np.testing.assert_array_equal(got[-1], [0.0, 0.0])
    for k in range(2):
        sign = np.sign(got[0, k] * expected_path[0, k])
        np.testing.assert_allclose(
            got[:-1, k], sign * expected_path[:, k], rtol=1e-3, atol=1e-5 * np.abs(expected_path).max()
        )
    # The saved arrays have plain names and the surface is centred on the final weights.
    ls = Landscape.load(tmp_path / "out" / "trajectory.npz")
    np.testing.assert_allclose(ls.extras["explained_variance_ratio"], cb.pca.explained_variance_ratio)
    np.testing.assert_array_equal(ls.extras["path"], cb.pca.path)
    assert ls.loss.shape == (5, 5)
    lo, hi = ls.coords[0][0], ls.coords[0][-1]
    assert lo < got[:, 0].min() and hi > got[:, 0].max()  # the range covers the path plus a margin
    for key in ("contour_path", "path"):
        assert (tmp_path / "out" / f"trajectory_{key}.png").stat().st_size > 5000


def test_memory_and_disk_modes_give_the_same_result(tmp_path):
    mem = TrajectoryPCA(every_n_steps=2, resolution=3, storage="memory", dirpath=str(tmp_path / "m"), progress=False)
    small_fit(tmp_path / "a", [mem])
    disk = TrajectoryPCA(
        every_n_steps=2,
        resolution=3,
        storage="disk",
        snapshot_dir=str(tmp_path / "snaps"),
        dirpath=str(tmp_path / "d"),
        progress=False,
    )
    small_fit(tmp_path / "b", [disk])
    assert list((tmp_path / "snaps").glob("*.npy"))
    np.testing.assert_allclose(mem.pca.explained_variance_ratio, disk.pca.explained_variance_ratio, rtol=1e-6)
    np.testing.assert_allclose(mem.pca.path, disk.pca.path, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mem.landscape.loss, disk.landscape.loss, rtol=1e-6)


def test_every_n_epochs_snapshots_at_fit_start_and_epoch_ends(tmp_path):
    cb = TrajectoryPCA(every_n_epochs=1, resolution=3, storage="memory", progress=False)
    small_fit(tmp_path, [cb], max_epochs=3)
    assert cb.pca.steps == [0, 6, 12, 18]  # 6 steps per epoch; the final weights are the last snapshot
    assert cb.pca.epochs == [0, 1, 2, 3]  # epochs completed: every point is an epoch boundary


def test_epoch_labels_put_the_path_markers_on_epoch_boundaries(tmp_path):
    cb = TrajectoryPCA(every_n_steps=2, resolution=3, storage="memory", progress=False)
    small_fit(tmp_path, [cb], max_epochs=2)
    assert cb.pca.steps == [0, 2, 4, 6, 8, 10, 12]
    # The snapshot after an epoch's last batch (step 6) already counts that epoch as done.
    assert cb.pca.epochs == [0, 0, 0, 1, 1, 1, 2]


def test_two_trajectories_in_one_trainer_keep_separate_state(tmp_path):
    steps = TrajectoryPCA(every_n_steps=3, resolution=3, storage="memory", progress=False, name="steps")
    epochs = TrajectoryPCA(every_n_epochs=1, resolution=3, storage="memory", progress=False, name="epochs")
    assert steps.state_key != epochs.state_key
    small_fit(tmp_path, [steps, epochs], max_epochs=2)
    assert steps.pca.steps == [0, 3, 6, 9, 12] and epochs.pca.steps == [0, 6, 12]


def test_callback_added_when_resuming_starts_at_the_restored_step(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    small_fit(tmp_path, [ckpt], max_epochs=1, enable_checkpointing=True)
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    cb = TrajectoryPCA(every_n_steps=2, resolution=3, storage="memory", progress=False)
    small_fit(tmp_path, [cb], max_epochs=2, ckpt_path=str(path))
    assert cb.pca.steps == [6, 8, 10, 12] and cb.pca.epochs == [1, 1, 1, 2]


@pytest.mark.parametrize("storage", ["disk", "auto"])  # auto: in memory until the first checkpoint moves it to disk
def test_state_dict_is_plain_and_resume_continues_the_same_trajectory(tmp_path, storage):
    def run(root, max_epochs, ckpt_path=None, snapshot_dir=None):
        cb = TrajectoryPCA(
            every_n_steps=1, resolution=3, storage=storage, snapshot_dir=str(snapshot_dir), progress=False
        )
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_epochs=1)
        small_fit(
            root, [cb, ckpt], max_epochs=max_epochs, shuffle=False, ckpt_path=ckpt_path, enable_checkpointing=True
        )
        return cb

    full = run(tmp_path / "full", 3, snapshot_dir=tmp_path / "full_snaps")
    first = run(tmp_path / "part", 1, snapshot_dir=tmp_path / "part_snaps")
    ckpt = next((tmp_path / "part" / "ckpt").glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    entry = next(v for k, v in state.items() if k.startswith("TrajectoryPCA"))
    path = tmp_path / "state.pt"
    torch.save(entry, path)
    torch.load(path, weights_only=True)  # counters and paths only, no pickled objects
    resumed = run(tmp_path / "part", 3, ckpt_path=str(ckpt), snapshot_dir=tmp_path / "part_snaps")
    assert first.pca.steps == list(range(7))
    assert (
        first.store.storage == "disk" and len(list((tmp_path / "part_snaps").glob("*.npy"))) >= 1
    )  # kept for the resume
    assert resumed.pca.steps == full.pca.steps == list(range(19))
    np.testing.assert_allclose(resumed.pca.explained_variance_ratio, full.pca.explained_variance_ratio, rtol=1e-6)
    np.testing.assert_allclose(resumed.pca.path, full.pca.path, rtol=1e-5, atol=1e-7)


def test_too_few_snapshots_warns_without_figure(tmp_path):
    cb = TrajectoryPCA(every_n_epochs=5, dirpath=str(tmp_path / "out"), progress=False)
    with pytest.warns(
        UserWarning, match=r"TrajectoryPCA: 1 snapshot\(s\) were taken and the PCA needs at least 3.*now 5"
    ):
        small_fit(tmp_path, [cb], max_epochs=1)
    assert cb.pca is None and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of `every_n_steps`=None and `every_n_epochs`=None"),
        ({"every_n_steps": 1, "every_n_epochs": 1}, "exactly one of `every_n_steps`=1 and `every_n_epochs`=1"),
        ({"every_n_steps": 0}, r"`every_n_steps`=0.*>= 1"),
        ({"every_n_epochs": -1}, r"`every_n_epochs`=-1.*>= 1"),
        ({"every_n_steps": 1, "storage": "gpu"}, r"`storage`='gpu'.*'auto'"),
        ({"every_n_steps": 1, "snapshot_dtype": "int8"}, r"`snapshot_dtype`='int8'.*'float32'"),
        ({"every_n_steps": 1, "margin": -0.1}, r"`margin`=-0.1"),
        ({"every_n_steps": 1, "resolution": 0}, r"`resolution`=0"),
        ({"every_n_steps": 1, "max_memory_mb": float("inf")}, r"`max_memory_mb`=inf.*finite.*storage='memory'"),
        ({"every_n_steps": 1, "max_memory_mb": float("nan")}, r"`max_memory_mb`=nan"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        TrajectoryPCA(**kwargs)


def test_unwritable_snapshot_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(MisconfigurationException, match="`snapshot_dir`=.*cannot be written"):
        TrajectoryPCA(every_n_steps=1, storage="disk", snapshot_dir=str(blocker / "snaps"))
    for storage in ("auto", "memory"):
        with pytest.raises(MisconfigurationException, match="`snapshot_dir`=.*cannot be written"):
            TrajectoryPCA(every_n_steps=1, storage=storage, snapshot_dir=str(blocker / "snaps"))


def test_training_unchanged_by_snapshots(tmp_path):
    _, plain, _ = small_fit(tmp_path / "a", [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, traced, _ = small_fit(tmp_path / "b", [TrajectoryPCA(every_n_steps=1, resolution=3, progress=False)])
    for (k, a), (_, b) in zip(plain.state_dict().items(), traced.state_dict().items()):
        assert torch.equal(a, b), k
