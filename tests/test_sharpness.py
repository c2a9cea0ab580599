"""ε-sharpness, basin radius and log basin volume against closed forms on quadratics; the n-ball volume;
bad input; the model untouched; two DDP processes equal one process on all the data."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from scipy.special import gammaln
from torch import nn

from lightning_landscape import random_direction
from lightning_landscape.plots.sharpness import plot_basin_radii
from lightning_landscape.results import SharpnessReport
from lightning_landscape.sharpness import (
    basin_radius,
    epsilon_sharpness,
    log_basin_volume,
    random_subspace,
    sharpness,
)
from lightning_landscape.state import capture_rng, capture_state, restore_rng


class Quadratic(nn.Module):
    """L(x) = ½ vec(x)ᵀ H vec(x): the "loss" is the quadratic of the parameter, whatever the batch."""

    def __init__(self, hessian: np.ndarray, x: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("hessian", torch.as_tensor(hessian, dtype=torch.float64))
        self.x = nn.Parameter(torch.as_tensor(x, dtype=torch.float64).clone())

    def forward(self) -> torch.Tensor:
        v = self.x.reshape(-1)
        return 0.5 * v @ self.hessian @ v


def quadratic_loss(model, batch):
    return model(), 1, None, None


DUMMY = [torch.zeros(1)]


def spd(n: int, seed: int, low: float = 0.5, high: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ np.diag(np.linspace(low, high, n)) @ q.T


def quad(h: np.ndarray, v: np.ndarray) -> float:
    return 0.5 * float(v @ h @ v)


def vertex_max(h: np.ndarray, x: np.ndarray, width: np.ndarray, basis: np.ndarray | None = None) -> float:
    """max over the vertices of the box |z| <= width of ½ (x + Bz)ᵀ H (x + Bz): a convex function's
    maximum over a box is attained at a vertex, so enumerating them all is exact."""
    basis = np.eye(x.size) if basis is None else basis
    return max(quad(h, x + basis @ (np.array(s) * width)) for s in itertools.product((-1.0, 1.0), repeat=width.size))


def sharpness_of(max_loss: float, loss: float) -> float:
    return 100.0 * (max_loss - loss) / (1.0 + loss)


# --- ε-sharpness -----------------------------------------------------------------------------


def test_full_space_ascent_reaches_the_worst_vertex():
    h, x = spd(6, 0), np.array([1.0, -2.0, 0.5, 3.0, -1.0, 1.5])
    eps = 0.05
    expected = sharpness_of(vertex_max(h, x, eps * (np.abs(x) + 1)), quad(h, x))
    result = epsilon_sharpness(Quadratic(h, x.reshape(2, 3)), DUMMY, quadratic_loss, epsilon=eps, steps=20)
    assert result.loss == pytest.approx(quad(h, x), rel=1e-12)
    assert result.value == pytest.approx(expected, rel=1e-9)
    assert result.value > 0.5  # a real rise, not the centre


def test_diagonal_quadratic_at_zero_every_vertex_is_the_maximum():
    a = np.array([1.0, 2.0, 0.5, 4.0])
    eps = 0.1  # x = 0: the box is |δ_i| <= ε, and max ½ Σ a_i δ_i² = ½ ε² Σ a_i at every vertex
    result = epsilon_sharpness(Quadratic(np.diag(a), np.zeros(4)), DUMMY, quadratic_loss, epsilon=eps, steps=12, seed=3)
    assert result.loss == 0.0
    assert result.value == pytest.approx(100 * 0.5 * eps**2 * a.sum(), rel=1e-9)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_few_steps_never_exceed_the_maximum(steps):
    h, x = spd(5, 1), np.random.default_rng(2).standard_normal(5)
    eps = 0.3
    bound = sharpness_of(vertex_max(h, x, eps * (np.abs(x) + 1)), quad(h, x))
    result = epsilon_sharpness(Quadratic(h, x), DUMMY, quadratic_loss, epsilon=eps, steps=steps, seed=steps)
    assert 0.0 <= result.value <= bound * (1 + 1e-12)
    assert len(result.losses) == steps + 1


def test_random_subspace_ascent_reaches_the_worst_vertex_of_the_y_box():
    h, x = spd(6, 4), np.array([2.0, -1.0, 0.7, -3.0, 1.2, 0.4])
    eps, p, seed = 0.02, 3, 7
    basis = random_subspace(6, p, seed=seed).double().numpy()
    coords = np.linalg.lstsq(basis, x, rcond=None)[0]  # A⁺x
    expected = sharpness_of(vertex_max(h, x, eps * (np.abs(coords) + 1), basis), quad(h, x))
    model = Quadratic(h, x)
    result = epsilon_sharpness(model, DUMMY, quadratic_loss, epsilon=eps, steps=30, subspace_dim=p, seed=seed)
    assert result.value == pytest.approx(expected, rel=1e-4)  # A is float32: δ = A y to float32 accuracy
    full = epsilon_sharpness(model, DUMMY, quadratic_loss, epsilon=eps, steps=30, seed=seed)
    assert not math.isclose(full.value, result.value, rel_tol=1e-3)  # the subspace is a different box


def test_the_subspace_is_seeded_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    a, b, c = random_subspace(50, 4, seed=1), random_subspace(50, 4, seed=1), random_subspace(50, 4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)


# --- basin radius ------------------------------------------------------------------------------


def exact_radius(h: np.ndarray, theta: np.ndarray, d: np.ndarray, rise: float) -> float:
    """Solve ½ (θ + r d)ᵀ H (θ + r d) = L(θ) + rise for r > 0: ½ a r² + b r − rise = 0."""
    a, b = float(d @ h @ d), float(d @ h @ theta)
    return (-b + math.sqrt(b * b + 2 * a * rise)) / a


def test_basin_radii_match_the_exact_roots_along_each_direction():
    h, theta = spd(12, 5), np.random.default_rng(6).standard_normal(12)
    model = Quadratic(h, theta.reshape(3, 4))
    rise, m, seed = 0.3, 4, 11
    report = sharpness(
        model, DUMMY, batch_loss=quadratic_loss, num_directions=m, rise=rise, radii=(0.1, 0.5), rtol=1e-7, seed=seed
    )
    dirs = [random_direction(model, seed=seed + i)["x"].reshape(-1).double().numpy() for i in range(m)]
    exact = np.array([exact_radius(h, theta, d, rise) for d in dirs])
    norms = np.array([np.linalg.norm(d) for d in dirs])
    np.testing.assert_allclose(report.basin_radii, exact, rtol=1e-6)
    np.testing.assert_allclose(report.basin_weight_radii, exact * norms, rtol=1e-6)
    assert not report.basin_capped.any()
    assert report.threshold == pytest.approx(quad(h, theta) + rise, rel=1e-12)
    # The loss rise at fixed radii: L(θ + r d) − L(θ) = r b + ½ r² a, averaged over directions.
    rises = np.array([[r * (d @ h @ theta) + 0.5 * r * r * (d @ h @ d) for r in (0.1, 0.5)] for d in dirs])
    np.testing.assert_allclose(report.loss_rise, rises.mean(axis=0), rtol=1e-9)
    assert report.scalars()["loss_rise@0.5"] == pytest.approx(rises[:, 1].mean(), rel=1e-9)
    # Volume of the basin in the 12 moved weights, from the weight-space radii, directly.
    n = 12
    omega = math.pi ** (n / 2) / math.gamma(n / 2 + 1)
    assert report.num_moved == n
    assert report.log_basin_volume == pytest.approx(math.log(omega * np.mean((exact * norms) ** n)), rel=1e-5)
    # Hessian numbers of a quadratic: λmax and trace of H.
    assert report.lambda_max == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=1e-3)  # hessian_check's default tol
    assert report.trace == pytest.approx(np.trace(h), rel=1e-6)


def test_absolute_threshold_and_capped_rays():
    h, theta = spd(6, 8), np.random.default_rng(9).standard_normal(6)
    model = Quadratic(h, theta.reshape(2, 3))
    center = quad(h, theta)
    report = sharpness(model, DUMMY, batch_loss=quadratic_loss, num_directions=2, threshold=center + 0.05, rtol=1e-7)
    d0 = random_direction(model, seed=0)["x"].reshape(-1).double().numpy()
    assert report.basin_radii[0] == pytest.approx(exact_radius(h, theta, d0, 0.05), rel=1e-6)
    huge = sharpness(
        model, DUMMY, batch_loss=quadratic_loss, num_directions=2, threshold=center + 1e9, max_radius=2.0, hessian=False
    )
    assert huge.basin_capped.all() and np.all(huge.basin_radii == 2.0)


def test_basin_radius_on_closed_forms():
    r, capped, evals = basin_radius(lambda r: r**3, 8.0, initial_radius=0.1, rtol=1e-10)
    assert r == pytest.approx(2.0, rel=1e-9) and not capped and evals < 60
    # Exceeded already at the first radius: bisection between 0 and it.
    assert basin_radius(lambda r: 100 * r, 1.0, initial_radius=0.5, rtol=1e-10)[0] == pytest.approx(0.01, rel=1e-9)
    # A NaN loss counts as outside the basin.
    r, capped, _ = basin_radius(lambda r: math.nan if r > 0.3 else 0.0, 1.0, initial_radius=0.1, rtol=1e-9)
    assert r == pytest.approx(0.3, rel=1e-8) and not capped
    assert basin_radius(lambda r: 0.0, 1.0, initial_radius=0.1, max_radius=3.0) == (
        3.0,
        True,
        6,
    )  # 0.1, 0.2, ..., 1.6, 3.0


# --- log basin volume ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000, 10**6])
@pytest.mark.parametrize("radius", [0.01, 1.0, 7.5])
def test_log_volume_of_an_n_ball(n, radius):
    expected = 0.5 * n * math.log(math.pi) - gammaln(n / 2 + 1) + n * math.log(radius)
    value = log_basin_volume([radius] * 5, n)
    assert math.isfinite(value)
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_log_volume_small_cases_and_mixed_radii():
    assert math.exp(log_basin_volume([2.0], 2)) == pytest.approx(math.pi * 4, rel=1e-12)
    assert math.exp(log_basin_volume([1.5, 1.5], 3)) == pytest.approx(4 / 3 * math.pi * 1.5**3, rel=1e-12)
    r = np.array([0.5, 1.0, 2.0])
    direct = math.pi**2 / math.gamma(3) * np.mean(r**4)  # n = 4: V = ω_4 E[r^4]
    assert math.exp(log_basin_volume(r, 4)) == pytest.approx(direct, rel=1e-12)
    # Huge n: the largest radius dominates E[r^n]; r^n itself would overflow to inf.
    n = 10**6
    value = log_basin_volume(np.array([2.0, 1.9, 1.0]), n)
    assert value == pytest.approx(0.5 * n * math.log(math.pi) - gammaln(n / 2 + 1) + n * math.log(2.0) - math.log(3))
    assert log_basin_volume([0.0, 0.0], 5) == -math.inf


# --- bad input ---------------------------------------------------------------------------------


class Unreadable:
    def __iter__(self):
        raise AssertionError("the data was read before the arguments were checked")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, r"`epsilon`=0.0 is not valid; expected a finite number > 0"),
        ({"epsilon": -1e-3}, r"`epsilon`=-0.001 is not valid"),
        ({"epsilon": math.inf}, r"`epsilon`=inf is not valid"),
        ({"num_directions": 0}, r"`num_directions`=0 is not valid; expected an integer >= 1"),
        ({"steps": 0}, r"`steps`=0 is not valid"),
        ({"rise": 0.0}, r"`rise`=0.0 is not valid"),
        ({"threshold": math.nan}, r"`threshold`=nan is not valid; expected a finite number or None"),
        ({"radii": (0.5, -1.0)}, r"`radii`=\(0.5, -1.0\) is not valid"),
        ({"max_radius": 0.01}, r"`max_radius`=0.01 is not valid; expected a number >= `initial_radius`"),
        ({"bn": "train"}, r"`bn`='train' is not supported"),
        ({"subspace_dim": 7}, r"`subspace_dim`=7 is larger than the model's 6 trainable parameters"),
    ],
)
def test_bad_arguments_raise_before_the_data_is_read(kwargs, message):
    model = Quadratic(np.eye(6), np.ones((2, 3)))
    with pytest.raises(ValueError, match=message):
        sharpness(model, Unreadable(), batch_loss=quadratic_loss, **kwargs)


def test_threshold_not_above_the_centre_loss_names_both():
    model = Quadratic(2 * np.eye(4), np.ones((2, 2)))  # L(θ) = 4
    before = model.x.detach().clone()
    with pytest.raises(ValueError, match=r"`threshold`=3\.5 is not above the loss at the weights \(4\.0\)"):
        sharpness(model, DUMMY, batch_loss=quadratic_loss, threshold=3.5, hessian=False)
    assert torch.equal(model.x, before)


# --- the model is left as it was ------------------------------------------------------------------


def test_the_model_is_unchanged_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    model[1].eval()  # a mixed mode must come back too
    np.random.seed(3)
    random.seed(4)
    before = capture_state(model)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    rng = capture_rng()
    draws = (torch.rand(3), np.random.rand(3), random.random())  # what the RNGs give next, then put back
    restore_rng(rng)
    data = [(x, y)]  # one batch: each Hessian-vector product is one double backward
    report = sharpness(
        model, data, loss_fn=nn.functional.cross_entropy, num_directions=2, steps=3, bn="recompute", subspace_dim=4
    )
    after = capture_state(model)
    assert report.eps_sharpness >= 0 and report.lambda_max is not None
    for name in before.parameters:
        assert torch.equal(before.parameters[name], after.parameters[name])
        assert after.grads[name] is before.grads[name] and torch.equal(after.grads[name], grads[name])
    for name in before.buffers:
        assert torch.equal(before.buffers[name], after.buffers[name])
    assert before.training == after.training
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]


# --- the report ----------------------------------------------------------------------------------


def test_report_round_trips_and_draws(tmp_path):
    h, theta = spd(6, 12), np.random.default_rng(13).standard_normal((2, 3))
    report = sharpness(Quadratic(h, theta), DUMMY, batch_loss=quadratic_loss, num_directions=3, max_radius=0.5)
    back = SharpnessReport.load(report.save(tmp_path / "sharpness.npz"))
    assert back.scalars() == report.scalars()
    for name in ("basin_radii", "basin_weight_radii", "basin_capped", "radii", "loss_at_radii", "ascent_losses"):
        np.testing.assert_array_equal(getattr(back, name), getattr(report, name))
    assert (
        back.metadata["epsilon"] == 1e-3
        and back.metadata["num_directions"] == 3
        and back.metadata["radii"]
        == [
            0.25,
            0.5,
            1.0,
        ]
    )
    assert set(report.scalars()) == {
        "loss",
        "eps_sharpness",
        "basin_radius_mean",
        "basin_radius_min",
        "log_basin_volume",
        "loss_rise@0.25",
        "loss_rise@0.5",
        "loss_rise@1",
        "lambda_max",
        "trace",
    }
    fig = plot_basin_radii(report)
    bars = fig.axes[0].patches
    assert len(bars) == 3
    np.testing.assert_allclose([b.get_height() for b in bars], report.basin_radii)
    assert [bool(b.get_hatch()) for b in bars] == report.basin_capped.tolist()


# --- DDP: two processes, each on its shard, equal one process on all the data ----------------------


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, data = _ddp_problem()
        shard = data[rank::world]

        def reduce(t):
            t = t.clone()
            dist.all_reduce(t)
            return t

        def agree(obj):
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        report = sharpness(model, shard, loss_fn=nn.functional.cross_entropy, reduce=reduce, agree=agree, **DDP_ARGS)
        queue.put((rank, report.scalars(), report.basin_radii.tolist()))
        dist.barrier()  # neither rank tears its group down while the other may still use it
    finally:
        dist.destroy_process_group()


DDP_ARGS = {"num_directions": 2, "steps": 4, "subspace_dim": None, "seed": 5, "rtol": 1e-4, "progress": False}


def _ddp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    return model, [(x[i : i + 12], y[i : i + 12]) for i in range(0, 48, 12)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_two_processes_equal_one_process_on_all_the_data():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = dict((rank, (scalars, radii)) for rank, scalars, radii in (queue.get(), queue.get()))
    model, data = _ddp_problem()
    ref = sharpness(model, data, loss_fn=nn.functional.cross_entropy, **DDP_ARGS)
    for rank in (0, 1):
        scalars, radii = results[rank]
        assert scalars.keys() == ref.scalars().keys()
        for key, value in ref.scalars().items():
            assert scalars[key] == pytest.approx(value, rel=1e-4), key
        np.testing.assert_allclose(radii, ref.basin_radii, rtol=1e-4)
    assert results[0] == results[1]  # every rank took the same steps
