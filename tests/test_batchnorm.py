"""The BatchNorm policy: recomputed statistics equal torch's update_bn, the model's own come back."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn

from lightning_landscape import GridEvaluator, LandscapeWarning, interpolate, loss_surface, make_batch_loss
from lightning_landscape.batchnorm import recompute_bn
from lightning_landscape.state import capture_state
from tests.helpers import assert_state_equal


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture
def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (16, 16, 9)]


def reference_loss(model: nn.Module, batches) -> float:
    """update_bn on a copy, then the sample-weighted eval loss, by hand."""
    ref = copy.deepcopy(model)
    update_bn([x for x, _ in batches], ref)
    ref.eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(ref(x), y, reduction="sum").item() for x, y in batches)
    return total / sum(len(y) for _, y in batches)


def test_recomputed_statistics_equal_update_bn(batches):
    model = bn_net(0)
    with torch.no_grad():  # stored statistics far from the data's
        model[1].running_mean.fill_(5.0)
        model[1].running_var.fill_(0.01)
    ref = copy.deepcopy(model)
    update_bn([x for x, _ in batches], ref)
    work = copy.deepcopy(model)
    recompute_bn(work, batches, lambda m, b: m(b[0]))
    torch.testing.assert_close(work[1].running_mean, ref[1].running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(work[1].running_var, ref[1].running_var, rtol=0, atol=1e-6)
    assert work[1].momentum == model[1].momentum and work.training and work[1].training


def test_evaluator_recompute_equals_update_bn_and_restores_the_model(batches):
    model = bn_net(0)
    with torch.no_grad():
        model[1].running_mean.fill_(5.0)
    model.train()
    before = capture_state(model)
    ev = GridEvaluator(batches, make_batch_loss(F.cross_entropy), bn="recompute")
    from lightning_landscape import preserved_state

    with preserved_state(model):
        got = ev.evaluate(model)["loss"]
    assert got == pytest.approx(reference_loss(model, batches), rel=1e-6)
    stored = GridEvaluator(batches, make_batch_loss(F.cross_entropy)).evaluate(copy.deepcopy(model))["loss"]
    assert abs(stored - got) > 0.01  # the policy matters here
    assert_state_equal(model, before)


def test_interpolation_with_recompute_matches_update_bn_at_every_alpha(batches):
    a, b = bn_net(0), bn_net(1)
    b.train()
    with torch.no_grad():
        b(torch.randn(64, 5) * 3)  # b's statistics differ from a's
    model = bn_net(2)
    before = capture_state(model)
    alphas = np.array([-0.5, 0.0, 0.3, 1.0])
    ls = interpolate(model, a, b, alphas, batches, loss_fn=F.cross_entropy, bn="recompute", progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    for k, alpha in enumerate(alphas):
        point = bn_net(2)
        point.load_state_dict({n: torch.lerp(sa[n].double(), sb[n].double(), alpha).to(sa[n].dtype) for n in sa})
        assert ls.loss[k] == pytest.approx(reference_loss(point, batches), rel=1e-5)
    assert ls.metadata["bn"] == "recompute"
    assert_state_equal(model, before)


def test_surface_with_recompute_differs_from_eval_and_centre_matches(batches):
    model = bn_net(0)
    from lightning_landscape import random_direction

    d = random_direction(model, seed=0)
    coords = [np.linspace(-1, 1, 3)]
    rec = loss_surface(model, batches, d, coords, loss_fn=F.cross_entropy, bn="recompute", progress=False)
    ev = loss_surface(model, batches, d, coords, loss_fn=F.cross_entropy, progress=False)
    assert rec.loss[1] == pytest.approx(reference_loss(model, batches), rel=1e-6)
    assert not np.allclose(rec.loss, ev.loss)


def test_recompute_without_batchnorm_warns_and_evaluates_as_eval(batches):
    model = nn.Sequential(nn.Linear(5, 3))
    ev = GridEvaluator(batches, make_batch_loss(F.cross_entropy), bn="recompute")
    with pytest.warns(LandscapeWarning, match="no BatchNorm layer"):
        got = ev.evaluate(model)["loss"]
    assert ev.bn == "eval"
    assert got == GridEvaluator(batches, make_batch_loss(F.cross_entropy)).evaluate(model)["loss"]


def test_bad_bn_policy_is_named(batches):
    with pytest.raises(ValueError, match=r"`bn`='train' is not supported; accepted values: 'eval', 'recompute'"):
        GridEvaluator(batches, make_batch_loss(F.cross_entropy), bn="train")


def test_statistics_average_across_processes_weighted_by_batch_count():
    """Two "processes" (two halves of the batches) summed by a reduce give the all-data average."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 5, generator=g) for _ in range(3)]
    full = bn_net(0)
    recompute_bn(full, xs, lambda m, b: m(b))
    shards = [xs[:2], xs[2:]]
    # Compute each shard's contribution, then feed their sum to both, as all_reduce would.
    sent: list[torch.Tensor] = []
    for shard in shards:
        recompute_bn(bn_net(0), shard, lambda m, b: m(b), reduce=lambda t: sent.append(t.clone()) or t)
    total = sent[0] + sent[1]
    model = bn_net(0)
    recompute_bn(model, shards[0], lambda m, b: m(b), reduce=lambda t: total)
    torch.testing.assert_close(model[1].running_mean, full[1].running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, full[1].running_var, rtol=0, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 3


def _train_batches(datamodule, limit: int):
    loader = datamodule.train_dataloader()
    out = []
    for k, batch in enumerate(loader):
        if k == limit:
            break
        out.append(batch)
    return out


def test_loss_surface_callback_recomputes_bn_and_leaves_the_module_as_it_was(tmp_path):
    """The fit-end surface with bn='recompute': every point equals update_bn on a copy, then eval."""
    from lightning_landscape import LossSurface, random_direction
    from tests.helpers import small_fit

    class Probe(pl.Callback):
        def on_fit_end(self, trainer, pl_module):
            self.before = copy.deepcopy(pl_module.state_dict())

    probe = Probe()
    surface = LossSurface(dims=1, resolution=3, span=0.5, num_batches=2, bn="recompute", progress=False)
    trainer, model, datamodule = small_fit(tmp_path, [probe, surface], shuffle=False)
    after = model.state_dict()
    assert all(torch.equal(probe.before[k], after[k]) for k in after)  # the module's own statistics came back
    assert surface.landscape.metadata["bn"] == "recompute"
    d = random_direction(model, seed=0)
    batches = _train_batches(datamodule, 2)
    for k, alpha in enumerate(surface.landscape.coords[0]):
        point = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in point.named_parameters():
                p.add_(d[n], alpha=float(alpha))
        assert surface.landscape.loss[k] == pytest.approx(reference_loss(point, batches), rel=1e-5)


def test_callbacks_warn_at_fit_start_when_there_is_no_batchnorm(tmp_path):
    from lightning_landscape import LossSurface

    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(5, 3)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g))
    surface = LossSurface(dims=1, resolution=3, bn="recompute", progress=False)
    trainer = pl.Trainer(
        max_steps=2,
        callbacks=[surface],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.warns(LandscapeWarning, match=r"LossSurface\(bn='recompute'\): Plain has no BatchNorm") as record:
        trainer.fit(Plain(), torch.utils.data.DataLoader(data, batch_size=16))
    assert sum("BatchNorm" in str(w.message) for w in record) == 1  # once, at fit start
    assert surface.landscape.metadata["bn"] == "eval"


@pytest.mark.parametrize("callback", ["LossSurface", "TrajectoryPCA"])
def test_callbacks_name_a_bad_bn_policy(callback):
    import lightning_landscape

    kwargs = {"every_n_epochs": 1} if callback == "TrajectoryPCA" else {}
    with pytest.raises(MisconfigurationException, match=r"`bn`='train' is not supported; accepted values: 'eval'"):
        getattr(lightning_landscape, callback)(bn="train", **kwargs)
