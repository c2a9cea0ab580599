"""Batches are walked with Lightning's own collection walker: every structure Lightning moves, we move."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch

from lightning_landscape.data import count_samples, move_to_device

Pair = namedtuple("Pair", ["x", "y"])


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    name: str = "digits"


def test_dataclass_namedtuple_and_nested_batches_keep_their_structure():
    batch = {"a": Pair(torch.zeros(3, 2), [torch.ones(3)]), "b": Batch(torch.zeros(5, 1), torch.ones(5))}
    moved = move_to_device(batch, torch.device("cpu"))
    assert isinstance(moved["a"], Pair) and isinstance(moved["b"], Batch) and moved["b"].name == "digits"
    assert torch.equal(moved["a"].y[0], torch.ones(3))
    assert count_samples(Batch(torch.zeros(7, 1), torch.ones(7))) == 7
    assert count_samples(moved) == 3  # the first tensor in order: a.x
