"""Weights from checkpoints: Lightning ``.ckpt`` files, saved state dicts, modules, checked against a model.

Comparisons (interpolation between two runs, mode-connecting curves) take their end
points from anywhere a user keeps weights; every source is checked against the
model's architecture first, so a mismatch is named before any evaluation.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Anything the comparisons accept as a weight set.
WeightSource = str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module


def _read(path: Path, name: str) -> Mapping[str, Any]:
    if not path.is_file():
        raise ValueError(f"`{name}`={str(path)!r} is not a file; expected a .ckpt or a saved state dict.")
    try:
        # Lightning checkpoints also pickle hyperparameters and loop state; fall back to a full
        # unpickling only for the user's own file when the safe loader refuses it.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError):
        return torch.load(path, map_location="cpu", weights_only=False)


def read_state_dict(source: WeightSource, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of ``source``: a Lightning ``.ckpt`` (its ``"state_dict"``), a file saved with
    ``torch.save(model.state_dict())``, a state dict, or a module.

    Example:
        >>> sorted(read_state_dict(nn.Linear(2, 1)))
        ['bias', 'weight']
    """
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, (str, os.PathLike)):
        source = _read(Path(source), name)
    if not isinstance(source, Mapping):
        raise ValueError(f"`{name}` is a {type(source).__name__}; expected a .ckpt path, a state dict or an nn.Module.")
    if "state_dict" in source and isinstance(source["state_dict"], Mapping):
        source = source["state_dict"]  # a Lightning checkpoint
    return {k: v for k, v in source.items() if torch.is_tensor(v)}


def check_architecture(model: nn.Module, state: Mapping[str, torch.Tensor], name: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming the first entry of ``model`` that ``state`` lacks or holds with another shape.

    Example:
        >>> check_architecture(nn.Linear(2, 1), nn.Linear(3, 1).state_dict(), "end")
        Traceback (most recent call last):
        ...
        ValueError: `end` does not match the model: 'weight' has shape (1, 3) there and (1, 2) in the model; ...
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    for key, tensor in own.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"`{name}` does not match the model: {key!r} has shape {tuple(state[key].shape)} there and "
                f"{tuple(tensor.shape)} in the model; both weight sets must come from the same architecture."
            )
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"`{name}` does not match the model: it lacks {shown}; both weight sets must come from the same "
            "architecture."
        )


def load_weights(model: nn.Module, source: WeightSource, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict of ``source`` checked against ``model`` and placed on its tensors' devices and dtypes.

    Entries of ``source`` the model does not have (an optimizer's, a metric's) are dropped.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> state = load_weights(model, {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, "start")
        >>> state["weight"].tolist()
        [[1.0, 1.0]]
    """
    state = read_state_dict(source, name)
    check_architecture(model, state, name)
    return {k: state[k].detach().to(t) for k, t in model.state_dict().items()}
