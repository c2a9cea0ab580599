"""Property-based tests: direction normalization on any shapes, zero filters and dtypes; grid
arguments; the save/load round trip of every result kind."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from lightning_landscape import HessianReport, Landscape, PCAResult, SpectralDensity, random_direction
from lightning_landscape._validation import as_grid_coords

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4).map(tuple)


class Params(nn.Module):
    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(t) for t in tensors])


@SETTINGS
@given(
    shapes=st.lists(shapes, min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    zero_filter=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_filter_normalization_matches_each_filters_norm(shapes, dtype, zero_filter, seed):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    if zero_filter:
        tensors[0][0] = 0.0  # a dead filter (or a zero 1-D weight)
    model = Params(tensors)
    d = random_direction(model, norm="filter", ignore="none", seed=seed % 1000)
    for (name, p), t in zip(model.named_parameters(), tensors):
        assert d[name].shape == p.shape and d[name].dtype == p.dtype and torch.isfinite(d[name]).all()
        w = t.reshape(t.shape[0], -1).double() if t.dim() >= 2 else t.reshape(1, -1).double()
        v = d[name].reshape(w.shape).double()
        np.testing.assert_allclose(v.norm(dim=1).numpy(), w.norm(dim=1).numpy(), rtol=1e-5, atol=1e-6)


@SETTINGS
@given(shapes=st.lists(shapes, min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_biasbn_zeroes_one_dimensional_parameters(shapes, seed):
    model = Params([torch.randn(s) for s in shapes])
    d = random_direction(model, seed=seed)
    for name, p in model.named_parameters():
        assert (d[name] == 0).all() == (p.dim() <= 1)


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@SETTINGS
@given(axes=st.lists(st.lists(finite, min_size=1, max_size=6), min_size=1, max_size=2))
def test_grid_coordinates_round_trip_or_fail_clearly(axes):
    grid = as_grid_coords(axes, len(axes))
    assert [g.tolist() for g in grid] == [[float(x) for x in a] for a in axes]


@SETTINGS
@given(bad=st.sampled_from([[], [float("nan")], [[1.0]], "ab"]))
def test_bad_grid_coordinates_name_the_axis(bad):
    try:
        as_grid_coords([bad], 1)
    except ValueError as err:
        assert "coords" in str(err)
    else:
        raise AssertionError(f"{bad!r} accepted")


def _roundtrip(result):
    with tempfile.TemporaryDirectory() as tmp:
        return type(result).load(result.save(Path(tmp) / "r.npz"))


@SETTINGS
@given(
    loss=hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 5)), elements=st.floats(allow_nan=True)),
    seed=st.integers(0, 10),
)
def test_landscape_round_trip_is_exact(loss, seed):
    coords = [np.arange(loss.shape[0], dtype=float), np.linspace(-1, 1, loss.shape[1])]
    evaluated = np.random.default_rng(seed).random(loss.shape) > 0.3
    ls = Landscape(
        coords=coords, values={"loss": loss}, evaluated=evaluated, metadata={"seed": seed, "kind": "surface"}
    )
    back = _roundtrip(ls)
    np.testing.assert_array_equal(back.loss, ls.loss)
    np.testing.assert_array_equal(back.evaluated, evaluated)
    assert back.metadata == ls.metadata


@SETTINGS
@given(
    eig=hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(-1e6, 1e6)),
    trace=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=False)),
    density=st.booleans(),
)
def test_hessian_report_round_trip_is_exact(eig, trace, density):
    dens = SpectralDensity(np.linspace(0, 1, 4), np.arange(4.0)) if density else None
    report = HessianReport(eigenvalues=eig, lambda_max=float(eig[0]), trace=trace, density=dens, metadata={"tol": 1e-3})
    back = _roundtrip(report)
    np.testing.assert_array_equal(back.eigenvalues, eig)
    assert (back.trace is None) == (trace is None) and (
        trace is None or np.array_equal([back.trace], [trace], equal_nan=True)
    )
    assert (back.density is None) == (not density) and back.metadata["tol"] == 1e-3


@SETTINGS
@given(k=st.integers(1, 3), p=st.integers(1, 6), n=st.integers(2, 5), centered=st.booleans())
def test_pca_result_round_trip_is_exact(k, p, n, centered):
    gen = torch.Generator().manual_seed(k * 100 + p)
    result = PCAResult(
        components=torch.randn(k, p, generator=gen),
        singular_values=np.linspace(2, 1, k),
        explained_variance_ratio=np.full(k, 1.0 / (k + 1)),
        path=np.random.default_rng(n).random((n, k)),
        steps=list(range(n)),
        epochs=[0] * n,
        centered=centered,
        rank=k,
    )
    back = _roundtrip(result)
    assert torch.equal(back.components, result.components) and back.components.dtype == result.components.dtype
    np.testing.assert_array_equal(back.path, result.path)
    assert back.steps == result.steps and back.centered == centered and back.rank == k
