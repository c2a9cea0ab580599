"""Reading the data never advances an RNG the training uses: global torch/numpy/python RNGs and
DataLoader/sampler generators, in the functions and in the callbacks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from examples.digits import DigitsClassifier, DigitsDataModule
from lightning_landscape import LossSurface, hessian_check, interpolate, loss_surface, random_direction


def _rng_snapshot():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _model_and_loader(shuffle: bool, generator=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    return model, DataLoader(data, batch_size=6, shuffle=shuffle, generator=generator)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("analysis", ["loss_surface", "interpolate", "hessian_check"])
def test_functions_leave_the_global_rngs_untouched(shuffle, analysis):
    model, loader = _model_and_loader(shuffle)
    before = _rng_snapshot()
    if analysis == "loss_surface":
        loss_surface(model, loader, random_direction(model), [np.linspace(-1, 1, 3)], loss_fn=F.cross_entropy)
    elif analysis == "interpolate":
        interpolate(model, model, model.state_dict(), [0.0, 1.0], loader, loss_fn=F.cross_entropy)
    else:
        hessian_check(model, loader, F.cross_entropy, lambda_min=False)
    _assert_same(before, _rng_snapshot())


def test_a_loaders_own_generator_is_not_advanced():
    generator = torch.Generator().manual_seed(5)
    model, loader = _model_and_loader(True, generator)
    state = generator.get_state()
    loss_surface(model, loader, random_direction(model), [np.linspace(-1, 1, 3)], loss_fn=F.cross_entropy)
    assert torch.equal(generator.get_state(), state)


class SeededLoaderData(DigitsDataModule):
    """Digits with a DataLoader that has its own seeded generator, as careful users write it."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(self.seed)
        )


def _fit(tmp_path, callbacks):
    pl.seed_everything(0, verbose=False)
    model = DigitsClassifier(channels=4)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        deterministic=True,
    )
    trainer.fit(model, SeededLoaderData(num_train=96, seed=3))
    return model


def test_training_with_a_seeded_loader_is_bit_for_bit_the_same_with_the_callback(tmp_path):
    plain = _fit(tmp_path / "a", [])
    cb = LossSurface(dims=1, resolution=3, every_n_epochs=1, num_batches=2, progress=False)
    with_cb = _fit(tmp_path / "b", [cb])
    for (name, p), q in zip(plain.named_parameters(), with_cb.parameters()):
        assert torch.equal(p, q), name
