"""The trajectory core: flat vectors, the snapshot store, PCA against numpy's SVD of the explicit M."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch
from torch import nn

from lightning_landscape.directions import trainable_parameters
from lightning_landscape.results import Landscape
from lightning_landscape.trajectory import (
    PCAResult,
    SnapshotStore,
    TooFewSnapshotsError,
    flatten_parameters,
    path_range,
    pca_directions,
    trajectory_pca,
    unflatten_vector,
)


def random_trajectory(k: int = 7, p: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """K snapshots drifting towards a final point, plus noise (so M has full row rank)."""
    gen = torch.Generator().manual_seed(seed)
    final = torch.randn(p, generator=gen)
    start = final + 3 * torch.randn(p, generator=gen)
    t = torch.linspace(1, 0.1, k)
    snaps = final + t[:, None] * (start - final) + 0.3 * torch.randn(k, p, generator=gen)
    return snaps, final


def fill(store: SnapshotStore, snaps: torch.Tensor, first_step: int = 0) -> SnapshotStore:
    for i, row in enumerate(snaps):
        store.append(row, step=first_step + i, epoch=(first_step + i) // 3)
    return store


def explicit_m(snaps: torch.Tensor, final: torch.Tensor) -> np.ndarray:
    return snaps.double().numpy() - final.double().numpy()[None, :]


def assert_rows_equal_up_to_sign(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    for x, y in zip(a, b):
        sign = 1.0 if float(np.dot(x, y)) >= 0 else -1.0
        np.testing.assert_allclose(x, sign * y, atol=atol)


# ---- flat vectors


def test_flatten_unflatten_round_trip_keeps_shapes_dtypes_and_order():
    like = {"w": torch.randn(3, 2), "b": torch.randn(4, dtype=torch.float64), "s": torch.tensor(2.5)}
    flat = flatten_parameters(like)
    assert flat.dtype == torch.float32 and flat.shape == (11,) and flat.device.type == "cpu"
    np.testing.assert_array_equal(flat[:6].numpy(), like["w"].reshape(-1).numpy())
    back = unflatten_vector(flat, like)
    assert list(back) == list(like)
    for name, t in like.items():
        assert back[name].shape == t.shape and back[name].dtype == t.dtype
        torch.testing.assert_close(back[name], t.to(torch.float32).to(t.dtype))
    # A new tensor, not a view of the parameters or of the vector.
    flat[0] = 100.0
    assert like["w"][0, 0] != 100.0 and back["w"][0, 0] != 100.0
    assert flatten_parameters(like, ["s", "w"]).tolist()[0] == 2.5


def test_flatten_and_unflatten_errors_name_the_argument():
    with pytest.raises(ValueError, match="`names`.*'missing'"):
        flatten_parameters({"w": torch.ones(2)}, ["missing"])
    with pytest.raises(ValueError, match="`vec` has 3 elements; expected 2"):
        unflatten_vector(torch.ones(3), {"w": torch.ones(2)})


# ---- PCA against numpy


@pytest.mark.parametrize("final_in_store", [False, True])
def test_pca_matches_numpy_svd_of_explicit_m(final_in_store):
    snaps, final = random_trajectory()
    rows = torch.cat([snaps, final[None]]) if final_in_store else snaps
    store = fill(SnapshotStore(snaps.shape[1], storage="memory"), rows)
    result = trajectory_pca(store, final, n_components=3)

    m = explicit_m(snaps, final)  # θ_n itself never adds a row
    _, s, vt = np.linalg.svd(m, full_matrices=False)
    assert isinstance(result, PCAResult) and result.final_in_store is final_in_store
    assert result.components.dtype == torch.float32 and result.components.shape == (3, snaps.shape[1])
    np.testing.assert_allclose(result.singular_values, s[:3], rtol=1e-9)
    np.testing.assert_allclose(result.explained_variance_ratio, s[:3] ** 2 / np.sum(s**2), rtol=1e-9)
    assert_rows_equal_up_to_sign(result.components.numpy(), vt[:3], atol=1e-6)
    comps = result.components.double().numpy()
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-6)
    # The path is the projection of every θ_i − θ_n, then the final point at the origin.
    assert result.path.shape == (len(snaps) + 1, 3)
    np.testing.assert_allclose(result.path[:-1], m @ comps.T, atol=1e-5)
    assert result.path[-1].tolist() == [0.0, 0.0, 0.0]
    assert result.steps == list(range(len(snaps))) + ([len(snaps)] if final_in_store else [-1])
    assert len(result.epochs) == len(result.path)
    # Sign convention: the first snapshot projects to positive coordinates.
    assert np.all(result.path[0] > 0)


def test_centered_pca_matches_svd_of_centered_m():
    snaps, final = random_trajectory(k=8, p=30, seed=3)
    store = fill(SnapshotStore(snaps.shape[1], storage="memory"), snaps)
    result = trajectory_pca(store, final, n_components=2, center=True)

    m = explicit_m(snaps, final)
    mc = m - m.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(mc, full_matrices=False)
    assert result.centered
    np.testing.assert_allclose(result.singular_values, s[:2], rtol=1e-9)
    np.testing.assert_allclose(result.explained_variance_ratio, s[:2] ** 2 / np.sum(s**2), rtol=1e-9)
    assert_rows_equal_up_to_sign(result.components.numpy(), vt[:2], atol=1e-6)
    # Still the projection of θ_i − θ_n (not of the centered rows), so θ_n stays at the origin.
    np.testing.assert_allclose(result.path[:-1], m @ result.components.double().numpy().T, atol=1e-5)
    assert result.path[-1].tolist() == [0.0, 0.0]
    # Uncentered and centered differ on a drifting path.
    plain = trajectory_pca(store, final, n_components=2)
    assert not np.allclose(plain.singular_values, result.singular_values)


def test_straight_line_path_has_one_component():
    gen = torch.Generator().manual_seed(1)
    theta0, v = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    t = torch.tensor([0.0, 0.3, 0.45, 0.8, 1.1, 1.5])
    line = theta0 + t[:, None] * v
    store = fill(SnapshotStore(64, storage="memory"), line)
    result = trajectory_pca(store, line[-1], n_components=2)

    assert result.final_in_store
    assert result.explained_variance_ratio[0] > 0.999
    assert result.rank == 1
    np.testing.assert_allclose(result.path[:, 1], 0.0, atol=1e-5 * float(np.abs(result.path[:, 0]).max()))
    expected = (t[-1] - t).double().numpy() * float(v.double().norm())  # distance to θ_n along v
    np.testing.assert_allclose(result.path[:, 0], expected, rtol=1e-5, atol=1e-6)
    # v/|v| up to sign, and a unit second component orthogonal to it, without NaN.
    comps = result.components.double()
    assert abs(float(comps[0] @ (v.double() / v.double().norm()))) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(comps @ comps.T, torch.eye(2, dtype=torch.float64), atol=1e-6, rtol=0)


def test_degenerate_trajectories_give_no_nan():
    # Rank 1 with 3 components asked for, and a trajectory that never moved (rank 0).
    base = torch.arange(6, dtype=torch.float32)
    store = fill(SnapshotStore(6, storage="memory"), torch.stack([base + 2, base + 1, base]))
    result = trajectory_pca(store, base, n_components=4)
    assert result.rank == 1
    assert np.all(np.isfinite(result.path)) and torch.isfinite(result.components).all()
    np.testing.assert_allclose(result.explained_variance_ratio, [1.0, 0.0, 0.0, 0.0], atol=1e-12)
    comps = result.components.double()
    torch.testing.assert_close(comps @ comps.T, torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)

    still = fill(SnapshotStore(6, storage="memory"), torch.stack([base] * 4))
    flat = trajectory_pca(still, base, n_components=2, center=True)
    assert flat.rank == 0 and flat.final_in_store
    assert np.all(flat.path == 0) and np.all(flat.explained_variance_ratio == 0) and np.all(flat.singular_values == 0)
    assert torch.isfinite(flat.components).all()


def test_too_few_snapshots():
    store = fill(SnapshotStore(4, storage="memory"), torch.randn(2, 4))
    with pytest.raises(TooFewSnapshotsError, match="2 snapshot") as info:
        trajectory_pca(store, torch.zeros(4))
    assert info.value.count == 2 and isinstance(info.value, ValueError)


def test_pca_argument_errors():
    snaps, final = random_trajectory(k=4, p=5)
    store = fill(SnapshotStore(5, storage="memory"), snaps)
    with pytest.raises(ValueError, match="`final` has 4 elements"):
        trajectory_pca(store, final[:4])
    with pytest.raises(ValueError, match="`n_components`=0"):
        trajectory_pca(store, final, n_components=0)


def test_final_as_the_parameter_list_equals_the_flat_vector(tmp_path):
    # The callback hands the model's parameters over without flattening them; column blocks of 7
    # cut across the parameters' boundaries (sizes 6, 4, 1, 9), and a float64 parameter is mixed in.
    params = [torch.randn(2, 3), torch.randn(4, dtype=torch.float64), torch.randn(()), torch.randn(3, 3)]
    final = torch.cat([p.reshape(-1).float() for p in params])
    snaps = final + torch.randn(6, 20).cumsum(0).flip(0)
    store = fill(SnapshotStore(20, storage="disk", snapshot_dir=tmp_path, block_rows=4), snaps)
    flat = trajectory_pca(store, final, n_components=2, chunk_size=7, center=True)
    listed = trajectory_pca(store, params, n_components=2, chunk_size=7, center=True)
    np.testing.assert_allclose(listed.path, flat.path, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(listed.components, flat.components)
    store.append(final, step=6, epoch=2)  # the final weights as the last snapshot: recognized from the list too
    assert trajectory_pca(store, params, chunk_size=7).final_in_store
    with pytest.raises(ValueError, match="`final` holds 19 elements in all; expected 20"):
        trajectory_pca(store, [params[0], params[2], params[3], torch.zeros(3)])
    with pytest.raises(ValueError, match="`final` is a list; expected a floating tensor of 20 elements"):
        trajectory_pca(store, [])
    store.close()


def test_final_list_keeps_float64_parameters_exact_in_blocks_that_span_two(tmp_path):
    # Large weights, small steps: rounding the float64 parameter to float32 inside a block that also
    # holds the float32 one would change the differences θ_i − θ_n, and so the result with chunk_size.
    params = [torch.full((4,), 1e3), 1e3 + torch.arange(5, dtype=torch.float64) * 1e-4]
    final64 = torch.cat([p.double() for p in params])
    snaps = final64 + 1e-3 * torch.randn(6, 9, dtype=torch.float64).cumsum(0).flip(0)
    store = fill(SnapshotStore(9, storage="memory"), snaps.float())
    reference = trajectory_pca(store, final64, chunk_size=2)
    for chunk_size in (2, 3, 9):  # 3 and 9: a block holds the end of one parameter and the start of the next
        result = trajectory_pca(store, params, chunk_size=chunk_size)
        np.testing.assert_allclose(result.singular_values, reference.singular_values, rtol=1e-9)
        np.testing.assert_allclose(result.path, reference.path, rtol=1e-7, atol=1e-12)
    assert trajectory_pca(store, (p for p in params)).path.shape == reference.path.shape  # any iterable of tensors


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc (Linux)")
def test_reading_a_store_of_many_files_keeps_few_open(tmp_path, monkeypatch):
    from lightning_landscape.trajectory import _npy

    monkeypatch.setattr(_npy, "MAX_OPEN_FILES", 2)
    snaps, final = random_trajectory(k=7, p=11, seed=3)
    store = fill(SnapshotStore(11, storage="disk", snapshot_dir=tmp_path, block_rows=1), snaps)  # 7 files

    def open_snapshot_files() -> int:
        links = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
        return sum(link.startswith(str(tmp_path.resolve())) for link in links)

    seen = [open_snapshot_files() for _ in store.iter_column_blocks(4)]
    assert max(seen) <= 2
    expected = trajectory_pca(fill(SnapshotStore(11, storage="memory"), snaps), final, chunk_size=4)
    np.testing.assert_allclose(trajectory_pca(store, final, chunk_size=4).path, expected.path, rtol=1e-9, atol=1e-12)
    store.close()


def test_column_blocks_reuse_one_buffer_and_check_out(tmp_path):
    snaps = torch.randn(5, 9)
    store = fill(SnapshotStore(9, storage="disk", snapshot_dir=tmp_path, block_rows=2), snaps)
    out = torch.empty(3 * 4)
    blocks = [
        (a, b, blk.clone(), blk.data_ptr()) for a, b, blk in store.iter_column_blocks(4, start=1, stop=4, out=out)
    ]
    assert [(a, b) for a, b, _, _ in blocks] == [(0, 4), (4, 8), (8, 9)]
    assert {ptr for *_, ptr in blocks} == {out.data_ptr()}  # every block is a view of `out`
    torch.testing.assert_close(torch.cat([blk for _, _, blk, _ in blocks], dim=1), snaps[1:4], rtol=0, atol=0)
    with pytest.raises(
        ValueError, match="`out` is a \\(11,\\) torch.float32 tensor; expected a contiguous 1-D torch.float32"
    ):
        next(store.iter_column_blocks(4, start=1, stop=4, out=torch.empty(11)))
    with pytest.raises(ValueError, match="`start`=5"):
        next(store.iter_column_blocks(4, start=5, stop=4))
    store.close()


# ---- storage modes


def test_memory_disk_and_auto_spill_give_the_same_result(tmp_path):
    snaps, final = random_trajectory(k=9, p=50, seed=5)
    memory = fill(SnapshotStore(50, storage="memory"), snaps)
    disk = fill(SnapshotStore(50, storage="disk", snapshot_dir=tmp_path / "disk", block_rows=4), snaps)
    # Budget of 3 snapshots: the store starts in memory and moves to disk at the 4th.
    auto = SnapshotStore(
        50, storage="auto", max_memory_mb=3 * 50 * 4 / 2**20, snapshot_dir=tmp_path / "auto", block_rows=2
    )
    fill(auto, snaps[:3])
    assert auto.storage == "memory" and auto.files == []
    fill(auto, snaps[3:], first_step=3)
    assert auto.storage == "disk" and len(auto.files) == 5 and all(f.exists() for f in auto.files)
    assert disk.storage == "disk" and len(disk.files) == 3

    expected = trajectory_pca(memory, final, n_components=3)
    for store in (disk, auto):
        assert len(store) == 9 and store.steps == memory.steps and store.epochs == memory.epochs
        for i in (0, 4, -1):
            torch.testing.assert_close(store.get(i), snaps[i], rtol=0, atol=0)
        result = trajectory_pca(store, final, n_components=3)
        np.testing.assert_allclose(result.singular_values, expected.singular_values, rtol=1e-12)
        np.testing.assert_allclose(result.path, expected.path, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(result.components, expected.components)
    disk.close()
    auto.close(delete=True)
    assert not any((tmp_path / "auto").iterdir())
    assert len(list((tmp_path / "disk").iterdir())) == 3  # kept: the directory was given


def test_disk_store_in_own_temporary_directory_is_removed_on_close():
    store = fill(SnapshotStore(8, storage="disk"), torch.randn(3, 8))
    directory = store.snapshot_dir
    assert directory is not None and len(list(directory.iterdir())) == 1
    store.close()
    assert not directory.exists()
    with pytest.raises(RuntimeError, match="closed"):
        store.append(torch.zeros(8), step=0, epoch=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", torch.bfloat16])
def test_half_precision_storage_is_close_and_halves_the_files(tmp_path, dtype):
    snaps, final = random_trajectory(k=8, p=64, seed=7)
    full = trajectory_pca(fill(SnapshotStore(64, storage="memory"), snaps), final)
    store = fill(SnapshotStore(64, dtype=dtype, storage="disk", snapshot_dir=tmp_path, block_rows=16), snaps)
    assert store.dtype in ("float16", "bfloat16")
    assert store.nbytes == 8 * 64 * 2
    raw = np.load(store.files[0], mmap_mode="r")
    assert raw.dtype == (np.uint16 if store.dtype == "bfloat16" else np.float16)
    tol = 1e-2 if store.dtype == "bfloat16" else 2e-3
    np.testing.assert_allclose(store.get(3).numpy(), snaps[3].numpy(), rtol=tol, atol=tol)
    half = trajectory_pca(store, final)
    np.testing.assert_allclose(half.explained_variance_ratio, full.explained_variance_ratio, rtol=5 * tol, atol=tol)
    assert_rows_equal_up_to_sign(half.components.numpy(), full.components.numpy(), atol=5 * tol)
    scale = np.abs(full.path).max()
    np.testing.assert_allclose(half.path, full.path, atol=5 * tol * scale)
    # A final point rounded to the storage dtype is recognized as the last snapshot.
    store.append(final, step=99, epoch=9)
    again = trajectory_pca(store, final)
    assert again.final_in_store and again.path.shape == half.path.shape and again.steps[-1] == 99
    store.close()


def test_column_streaming_with_small_chunks_gives_the_same_result(tmp_path, monkeypatch):
    snaps, final = random_trajectory(k=10, p=37, seed=11)
    store = fill(SnapshotStore(37, storage="disk", snapshot_dir=tmp_path, block_rows=3), snaps)
    reference = trajectory_pca(store, final, n_components=3, center=True)

    blocks: list[tuple[int, int]] = []
    original = SnapshotStore.iter_column_blocks

    def recording(self, cols, **kwargs):
        for a, b, block in original(self, cols, **kwargs):
            blocks.append(tuple(block.shape))
            yield a, b, block

    monkeypatch.setattr(SnapshotStore, "iter_column_blocks", recording)
    chunked = trajectory_pca(store, final, n_components=3, center=True, chunk_size=4)
    assert blocks and max(width for _, width in blocks) <= 4  # never more than 4 of the 37 columns at once
    # Two passes over every column of every snapshot, and a look at the last snapshot alone (is it `final`?),
    # which stops at its first block: `final` is not in this store.
    assert sum(width for rows, width in blocks if rows == len(snaps)) == 2 * 37
    assert sum(width for rows, width in blocks if rows == 1) == 4 and len({rows for rows, _ in blocks}) == 2
    np.testing.assert_allclose(chunked.singular_values, reference.singular_values, rtol=1e-10)
    np.testing.assert_allclose(chunked.path, reference.path, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(chunked.components, reference.components)
    store.close()


def test_rows_read_back_across_blocks(tmp_path):
    snaps = torch.randn(7, 5)
    store = fill(SnapshotStore(5, storage="disk", snapshot_dir=tmp_path, block_rows=3), snaps)
    rows = [store.get(i) for i in range(len(store))]
    assert [r.shape for r in rows] == [(5,)] * 7
    torch.testing.assert_close(torch.stack(rows), snaps, rtol=0, atol=0)
    ((a, b, first_five),) = list(store.iter_column_blocks(5, stop=5))  # one block: all 5 columns, rows 0..4
    assert (a, b) == (0, 5)
    torch.testing.assert_close(first_five, snaps[:5], rtol=0, atol=0)
    store.close()


# ---- checkpointing


def _assert_plain(value):
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            _assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            _assert_plain(v)
    else:
        assert value is None or type(value) in (int, float, str, bool), type(value)


def test_state_dict_is_plain_and_loads_with_weights_only(tmp_path):
    store = fill(
        SnapshotStore(6, dtype="bfloat16", storage="disk", snapshot_dir=tmp_path / "snaps", block_rows=2),
        torch.randn(5, 6),
    )
    sd = store.state_dict()
    _assert_plain(sd)
    assert sd["count"] == 5 and sd["dtype"] == "bfloat16" and len(sd["files"]) == 3
    torch.save({"trajectory": sd}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["trajectory"]
    assert loaded == sd
    store.close()


def test_resume_from_state_dict_appends_to_the_same_files(tmp_path):
    snaps, final = random_trajectory(k=11, p=24, seed=2)
    first = fill(SnapshotStore(24, storage="disk", snapshot_dir=tmp_path / "resumed", block_rows=4), snaps[:6])
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    # Written after the checkpoint, then lost in a crash: the resumed store overwrites it.
    first.append(torch.full((24,), 1e6), step=1000, epoch=1000)
    old_files = first.files
    first.close()

    resumed = SnapshotStore.from_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert len(resumed) == 6 and resumed.storage == "disk" and resumed.files == old_files
    fill(resumed, snaps[6:], first_step=6)
    assert resumed.files[:2] == old_files and len(resumed.files) == 3
    uninterrupted = fill(SnapshotStore(24, storage="disk", snapshot_dir=tmp_path / "straight", block_rows=4), snaps)

    assert resumed.steps == uninterrupted.steps and resumed.epochs == uninterrupted.epochs
    a = trajectory_pca(resumed, final, n_components=3)
    b = trajectory_pca(uninterrupted, final, n_components=3)
    np.testing.assert_array_equal(a.path, b.path)
    np.testing.assert_array_equal(a.singular_values, b.singular_values)
    torch.testing.assert_close(a.components, b.components, rtol=0, atol=0)
    resumed.close()
    uninterrupted.close()


def test_from_state_dict_errors(tmp_path):
    memory = fill(SnapshotStore(3, storage="memory"), torch.randn(2, 3))
    with pytest.raises(ValueError, match="held in memory"):
        SnapshotStore.from_state_dict(memory.state_dict())
    empty = SnapshotStore.from_state_dict(memory.state_dict(), strict=False)
    assert len(empty) == 0 and empty.num_params == 3

    disk = fill(SnapshotStore(3, storage="disk", snapshot_dir=tmp_path), torch.randn(2, 3))
    sd = disk.state_dict()
    disk.close(delete=True)
    with pytest.raises(ValueError, match="state_dict\\['files'\\]"):
        SnapshotStore.from_state_dict(sd)
    with pytest.raises(ValueError, match="`state_dict` has keys"):
        SnapshotStore.from_state_dict({"count": 1})


# ---- argument checks


def test_unwritable_snapshot_dir_fails_at_construction(tmp_path):
    regular_file = tmp_path / "not_a_dir"
    regular_file.write_text("x")
    with pytest.raises(ValueError, match="snapshot_dir"):
        SnapshotStore(10, storage="disk", snapshot_dir=regular_file / "snapshots")
    with pytest.raises(ValueError, match="snapshot_dir"):
        SnapshotStore(10, storage="auto", snapshot_dir=regular_file)


def test_store_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="`storage`='ram'"):
        SnapshotStore(4, storage="ram")
    with pytest.raises(ValueError, match="`dtype`='int8'"):
        SnapshotStore(4, dtype="int8")
    with pytest.raises(ValueError, match="`num_params`=0"):
        SnapshotStore(0)
    with pytest.raises(ValueError, match="`max_memory_mb`=-1"):
        SnapshotStore(4, max_memory_mb=-1)
    store = SnapshotStore(4, storage="memory")
    with pytest.raises(ValueError, match="`vec` has shape \\(3,\\)"):
        store.append(torch.zeros(3), step=0, epoch=0)
    with pytest.raises(ValueError, match="`step`"):
        store.append(torch.zeros(4), step=1.5, epoch=0)
    assert len(store) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_append_from_cuda_is_copied_asynchronously_and_read_back(tmp_path):
    snaps = torch.randn(5, 1000)
    store = SnapshotStore(1000, dtype="bfloat16", storage="disk", snapshot_dir=tmp_path, block_rows=2)
    for i, row in enumerate(snaps):
        gpu = row.cuda()
        store.append(gpu, step=i, epoch=0)
        gpu.fill_(float("nan"))  # later work on the same stream must not reach the snapshot
    for i in range(5):
        torch.testing.assert_close(store.get(i), snaps[i].to(torch.bfloat16).float(), rtol=0, atol=0)
    store.close()


# ---- saving a PCAResult


def test_pca_result_save_load_round_trip_is_exact(tmp_path):
    snaps, final = random_trajectory(k=6, p=30, seed=4)
    store = fill(SnapshotStore(30, dtype="float16", storage="memory"), torch.cat([snaps, final[None]]))
    result = trajectory_pca(store, final, n_components=3, center=True)
    saved = result.save(tmp_path / "pca")
    assert saved == tmp_path / "pca.npz" and saved.is_file()
    back = PCAResult.load(saved)

    assert back.components.dtype == torch.float32 and torch.equal(back.components, result.components)
    for name in ("singular_values", "explained_variance_ratio", "path"):
        got, want = getattr(back, name), getattr(result, name)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert back.steps == result.steps and back.epochs == result.epochs
    assert all(type(s) is int for s in back.steps + back.epochs)
    assert (back.centered, back.rank, back.final_in_store) == (True, result.rank, True)
    assert back.metadata == result.metadata == {"num_snapshots": 7, "storage_dtype": "float16"}


def test_pca_result_load_rejects_truncated_and_foreign_files_naming_them(tmp_path):
    snaps, final = random_trajectory(k=4, p=8)
    saved = trajectory_pca(fill(SnapshotStore(8, storage="memory"), snaps), final).save(tmp_path / "pca.npz")
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, components=np.zeros((2, 8), dtype=np.float32))
    landscape = Landscape(coords=[np.arange(3.0)], values={"loss": np.ones(3)}).save(tmp_path / "surface.npz")
    for path in (truncated, foreign, landscape):
        with pytest.raises(ValueError, match=re.escape(repr(str(path)))):
            PCAResult.load(path)
    with pytest.raises(ValueError, match="kind 'landscape'"):
        PCAResult.load(landscape)


# ---- directions and plot bounds


def test_pca_directions_are_keyed_like_the_trainable_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    params = trainable_parameters(model)
    num = sum(p.numel() for p in params.values())
    gen = torch.Generator().manual_seed(0)
    store = fill(SnapshotStore(num, storage="memory"), torch.randn(5, num, generator=gen))
    result = trajectory_pca(store, flatten_parameters(params))
    dirs = pca_directions(result, params)
    assert len(dirs) == 2
    for k, d in enumerate(dirs):
        assert list(d) == list(params)
        assert all(d[n].shape == p.shape and d[n].dtype == p.dtype for n, p in params.items())
        torch.testing.assert_close(flatten_parameters(d), result.components[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="`vec` has"):
        pca_directions(result, {"w": torch.zeros(3)})


def test_path_range_covers_the_path_with_margin():
    path = np.array([[4.0, 1.0], [2.0, -1.0], [0.0, 0.0]])
    (x_lo, x_hi), (y_lo, y_hi) = path_range(path, margin=0.25)
    assert (x_lo, x_hi) == (-1.0, 5.0) and (y_lo, y_hi) == (-1.5, 1.5)
    # A flat axis borrows the largest extent of the others; a flat path gets width 1 (+ margins).
    flat_axis = path_range(np.array([[3.0, 2.0], [0.0, 2.0]]), margin=0.0)
    np.testing.assert_allclose(flat_axis[1], [0.5, 3.5])
    single = path_range(np.zeros((1, 2)), margin=0.25)
    assert all(hi - lo == pytest.approx(1.5) for lo, hi in single)
    with pytest.raises(ValueError, match="`margin`=-0.1"):
        path_range(path, margin=-0.1)
    with pytest.raises(ValueError, match="`path` has shape"):
        path_range(np.zeros(3))


def test_move_to_disk_keeps_every_snapshot_and_refuses_a_memory_store(tmp_path):
    snaps = torch.randn(5, 7)
    auto = fill(SnapshotStore(7, storage="auto", snapshot_dir=tmp_path, block_rows=2), snaps[:3])
    auto.move_to_disk()
    fill(auto, snaps[3:], first_step=3)  # appends continue on disk
    assert auto.storage == "disk" and len(auto.files) == 3 and auto.steps == list(range(5))
    resumed = SnapshotStore.from_state_dict(auto.state_dict())
    torch.testing.assert_close(torch.stack([resumed.get(i) for i in range(len(resumed))]), snaps, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`storage`='memory'"):
        SnapshotStore(7, storage="memory").move_to_disk()
    auto.close()
    resumed.close()
