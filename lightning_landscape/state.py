"""The one state guard every analysis runs inside.

An analysis moves the weights around (grid points, interpolation, Hessian-vector
products) and switches modes; the user's model must come out exactly as it went
in, also when the analysis fails or is interrupted. :func:`preserved_state`
records parameters, buffers, ``.grad`` tensors, ``requires_grad`` flags, the
train/eval mode of every submodule and the global RNG states, and restores them
bit for bit on exit.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from lightning_landscape.allocator import retained_memory


@dataclass
class ModelState:
    """What :func:`preserved_state` recorded on entry.

    ``parameters`` and ``buffers`` are detached copies of the values on entry,
    keyed by name; an analysis may use them as its reference point (for
    example the centre θ* of a loss surface) instead of copying the model again.
    A read-only record (``copied=False``) holds detached views of the live parameters
    instead, and ``versions`` what each was on entry: its storage address, version counter
    and sum (the sum catches writes through ``.data``, which the counter does not see).

    Example:
        >>> state = capture_state(nn.Linear(2, 1))
        >>> list(state.parameters), state.training
        (['weight', 'bias'], {'': True})
    """

    parameters: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor | None]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    rng: dict[str, object] = field(repr=False, default_factory=dict)
    copied: bool = True
    versions: dict[str, tuple[int, int, float]] = field(repr=False, default_factory=dict)


def capture_rng() -> dict[str, object]:
    """The global RNG states: torch, CUDA (when initialized), numpy, ``random``.

    Example:
        >>> sorted(capture_rng())[:3]
        ['numpy', 'python', 'torch']
    """
    state: dict[str, object] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, object]) -> None:
    """Put back the global RNG states recorded by :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]
    np.random.set_state(state["numpy"])  # type: ignore[arg-type]
    random.setstate(state["python"])  # type: ignore[arg-type]
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])  # type: ignore[arg-type]


def capture_state(model: nn.Module, *, copy_parameters: bool = True) -> ModelState:
    """Record ``model``'s complete state (see :func:`preserved_state`).

    ``copy_parameters=False`` records views of the parameters and their version counters
    instead of copies (a read-only analysis: see :func:`check_unchanged`).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> state = capture_state(model)
        >>> sorted(state.parameters), capture_state(model, copy_parameters=False).copied
        (['bias', 'weight'], False)
    """
    with torch.no_grad():
        named = dict(model.named_parameters())
        parameters = {name: p.detach().clone() if copy_parameters else p.detach() for name, p in named.items()}
        versions = {} if copy_parameters else _identities(named)
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    # The .grad tensors are not copied: they are detached from the parameters and
    # re-attached on exit, so whatever an analysis does to gradients never touches them.
    grads = {name: p.grad for name, p in model.named_parameters()}
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    training = {name: m.training for name, m in model.named_modules()}
    return ModelState(parameters, buffers, grads, requires_grad, training, capture_rng(), copy_parameters, versions)


def _identities(named: dict[str, torch.Tensor]) -> dict[str, tuple[int, int, float]]:
    """Per parameter: storage address, version counter and sum (one host sync for all the sums)."""
    if not named:
        return {}
    with torch.no_grad():
        sums = torch.stack([p.detach().sum().to(device="cpu", dtype=torch.float64) for p in named.values()]).tolist()
    return {name: (p.data_ptr(), p._version, total) for (name, p), total in zip(named.items(), sums)}


def _same(a: tuple[int, int, float] | None, b: tuple[int, int, float]) -> bool:
    return a is not None and a[:2] == b[:2] and (a[2] == b[2] or (a[2] != a[2] and b[2] != b[2]))  # NaN == NaN


def check_unchanged(model: nn.Module, state: ModelState) -> None:
    """``RuntimeError`` if a parameter of a read-only record was written in place or replaced since.

    Its values were not copied, so they could not be restored: an analysis that promised not to
    write the weights and did is a bug, reported instead of leaving the model silently changed.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> state = capture_state(model, copy_parameters=False)
        >>> check_unchanged(model, state)
    """
    now = _identities(dict(model.named_parameters()))
    changed = [name for name, seen in now.items() if not _same(state.versions.get(name), seen)]
    if changed:
        raise RuntimeError(
            f"a read-only analysis changed the parameters {changed[:5]} in place; they were not "
            "copied and cannot be restored (a bug: please report it)."
        )


def restore_state(model: nn.Module, state: ModelState, *, grads: bool = True) -> None:
    """Put ``model`` back into ``state`` in place (same tensor objects, values bit for bit).

    With ``grads=False`` the ``.grad`` tensors are left ``None`` instead of re-attached
    (a nested guard: the outer analysis still runs, and must not write into them).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> state = capture_state(model)
        >>> _ = model.weight.data.zero_(), model.eval()
        >>> restore_state(model, state)
        >>> torch.equal(model.weight, state.parameters["weight"]), model.training
        (True, True)
    """
    # Restoring must work even when the analysis failed inside inference mode.
    with torch.inference_mode(False), torch.no_grad():
        for name, p in model.named_parameters():
            if state.copied:
                p.copy_(state.parameters[name])
            p.requires_grad_(state.requires_grad[name])
            p.grad = state.grads[name] if grads else None
        for name, b in model.named_buffers():
            b.copy_(state.buffers[name])
    for name, module in model.named_modules():
        module.training = state.training[name]
    restore_rng(state.rng)
    if not state.copied:  # last: a weight written by mistake still leaves everything else restored
        check_unchanged(model, state)


def usable_cpus() -> int:
    """The number of CPUs this process may run on (its affinity mask where the OS has one).

    Example:
        >>> usable_cpus() >= 1
        True
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextmanager
def bounded_threads() -> Iterator[None]:
    """Cap torch's intra-op threads at :func:`usable_cpus` for the block, and restore them.

    More threads than usable CPUs (a container or a scheduler's CPU set smaller than the
    machine) makes every forward pass wait on descheduled threads: the analyses' hundreds of
    small forwards slow down many times over.

    Example:
        >>> with bounded_threads():
        ...     torch.get_num_threads() <= usable_cpus()
        True
    """
    before = torch.get_num_threads()
    cap = usable_cpus()
    if before > cap:
        torch.set_num_threads(cap)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


#: The record of every model inside a guard, by ``id``: a nested guard on the same model reuses it.
_ACTIVE: dict[int, ModelState] = {}


@contextmanager
def preserved_state(model: nn.Module, *, read_only: bool = False) -> Iterator[ModelState]:
    """Run a block of analysis code and leave ``model`` exactly as it was.

    On entry the parameters, buffers, ``requires_grad`` flags, ``.grad`` tensors,
    train/eval modes of all submodules and the global RNG states (torch, CUDA,
    numpy, ``random``) are recorded; on exit, normal or by any exception
    including ``KeyboardInterrupt``, they are restored bit for bit, in place, so
    optimizers and other holders of the parameter objects keep working.
    Inside the block ``.grad`` is ``None`` on every parameter.

    ``read_only=True`` is for a block that never writes the weights (a Hessian check): their
    values are not copied, one model copy less, and on exit :func:`check_unchanged` verifies
    that they were not written (a ``RuntimeError`` otherwise). Everything else is recorded and
    restored as always.

    Inside the block torch uses at most as many threads as the CPUs this process may run on
    (:func:`bounded_threads`), and the C allocator keeps the memory it frees between the block's
    forward passes (:func:`~lightning_landscape.allocator.retained_memory`). Guards nest at no
    cost: inside a guard on the same model (a callback's, around an engine's own), the inner
    guard copies nothing, yields the outer record and restores the model to it on exit, so an
    analysis holds one copy of the model. (Only a writing block inside a read-only guard copies
    the weights, for its own duration.)

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> with preserved_state(model) as state:
        ...     _ = model.eval()
        ...     _ = model[0].weight.data.add_(1.0)
        ...     with preserved_state(model) as inner:
        ...         inner is state
        True
        >>> model.training, torch.equal(model[0].weight, state.parameters["0.weight"])
        (True, True)
        >>> with preserved_state(model, read_only=True) as state:
        ...     state.copied, model(torch.ones(2)).shape
        (False, torch.Size([2]))
    """
    outer = _ACTIVE.get(id(model))
    if outer is not None and (outer.copied or read_only):
        try:
            yield outer
        finally:
            restore_state(model, outer, grads=False)
        return
    if outer is not None:  # a writing block inside a read-only guard: it records the weights itself
        yield from _nested_copy(model, outer)
        return
    state = capture_state(model, copy_parameters=not read_only)
    _ACTIVE[id(model)] = state
    for p in model.parameters():
        p.grad = None
    try:
        with bounded_threads(), retained_memory():
            yield state
    finally:
        del _ACTIVE[id(model)]
        restore_state(model, state)


def _nested_copy(model: nn.Module, outer: ModelState) -> Iterator[ModelState]:
    check_unchanged(model, outer)
    with torch.no_grad():
        copied = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = replace(outer, parameters=copied, copied=True, versions={})
    _ACTIVE[id(model)] = state
    try:
        yield state
    finally:
        _ACTIVE[id(model)] = outer
        restore_state(model, state, grads=False)
        outer.versions = _identities(dict(model.named_parameters()))  # the same values, new version counters


@contextmanager
def preserved_rng(generators: Iterable[torch.Generator] = ()) -> Iterator[None]:
    """Leave the global RNGs and the given ``torch.Generator`` objects as they were.

    Reading a DataLoader draws from the global torch RNG (its sampler's seed, the workers'
    base seed) or from its own ``generator``; an analysis that reads the training data must
    not advance either, or training after it would differ from training without it.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> with preserved_rng([g]):
        ...     _ = torch.rand(3), torch.rand(3, generator=g)
        >>> torch.equal(torch.rand(1, generator=g), torch.rand(1, generator=torch.Generator().manual_seed(0)))
        True
    """
    generators = list({id(g): g for g in generators}.values())
    saved = [g.get_state() for g in generators]
    rng = capture_rng()
    try:
        yield
    finally:
        restore_rng(rng)
        for g, st in zip(generators, saved):
            g.set_state(st)
