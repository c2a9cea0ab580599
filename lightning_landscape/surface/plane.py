"""Loss surfaces: f(α, β) = L(θ* + αδ + βη) on a 1-D or 2-D grid (Li et al., NeurIPS 2018)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from lightning_landscape import _versions
from lightning_landscape._validation import as_direction_list, as_grid_coords, check_choice
from lightning_landscape.data import ForwardFn, LossFn, make_batch_loss, model_device
from lightning_landscape.directions import Direction, check_direction
from lightning_landscape.params import Plane, check_finite_weights, trainable_parameters
from lightning_landscape.results import Landscape
from lightning_landscape.seeded import SeededDirection, SeededPlane
from lightning_landscape.state import preserved_state
from lightning_landscape.surface.evaluator import GridEvaluator, compile_label
from lightning_landscape.surface.resume import PartialSaver, checkpointed, fingerprint, load_partial
from lightning_landscape.surface.stacked import StackedPlane, check_low_memory_points


def surface_from_evaluator(
    model: nn.Module,
    evaluator: GridEvaluator,
    directions: Any,
    coords: Any,
    *,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
    resume: Landscape | str | os.PathLike | None = None,
    share: Callable[[Any], Any] | None = None,
    owner: bool = True,
    grid_share: tuple[int, int] | None = None,
    combine: Callable[[np.ndarray], np.ndarray] | None = None,
    memory: str = "default",
) -> Landscape:
    """Evaluate f(α, β) = L(θ* + αδ + βη) with a ready :class:`GridEvaluator`.

    This is :func:`loss_surface` for callers that build their own evaluator (a
    Lightning module's loss, a cross-process ``reduce``). ``resume`` continues a
    partial result of the same grid: a :class:`Landscape`, or a path as in :func:`loss_surface`.
    Across processes, only the ``owner`` (global rank zero) reads and writes the ``resume``
    file, and ``share(obj)`` (a broadcast from the owner) gives every process the owner's
    starting point, so all evaluate the same points. With ``grid_share=(rank, world)`` the
    grid is split instead of the data: this process evaluates the points whose flat index is
    ``rank`` modulo ``world`` (over all the data, in ``evaluator``), and ``combine`` (a sum
    across processes) joins the value arrays. See :func:`loss_surface` for the rest.

    Example:
        >>> from lightning_landscape import random_direction
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(2, 1)
        >>> ev = GridEvaluator([(torch.ones(4, 2), torch.zeros(4, 1))], make_batch_loss(nn.functional.mse_loss))
        >>> direction = random_direction(model, seed=0)
        >>> ls = surface_from_evaluator(model, ev, direction, [np.linspace(-1, 1, 3)], progress=False)
        >>> ls.loss.shape, ls.metadata["kind"], ls.metadata["center_loss"] == float(ls.loss[1])
        ((3,), 'surface', True)
    """
    params = trainable_parameters(model)
    check_finite_weights(params)  # before any grid point is spent
    dirs = _checked_directions(model, directions, params, memory, evaluator.points_per_forward)
    grid = as_grid_coords(coords, len(dirs))
    meta = {
        "kind": "surface",
        "bn": evaluator.bn,
        "memory": memory,
        "eval_dtype": evaluator.dtype,
        "compile": compile_label(evaluator.compile),
        **_versions.collect(),
        **(metadata or {}),
    }
    if memory == "low":
        meta["seeded_directions"] = [d.describe() for d in dirs]
    save_to = None if resume is None or isinstance(resume, Landscape) or not owner else Path(resume)
    if save_to is not None:  # hashing θ*, the directions and the data is only needed to resume
        meta["fingerprint"] = fingerprint(
            {
                "weights": list(params.values()),
                "directions": [] if memory == "low" else [d[n] for d in dirs for n in params],
                "data": evaluator.batches,
                "settings": {k: v for k, v in meta.items() if k not in VOLATILE},
            }
        )
    found = _starting_point(resume, save_to, meta, grid)
    found = found if share is None else share(found)
    landscape = found if found is not None else Landscape.empty(grid, evaluator.metrics, meta)

    with preserved_state(model) as state:
        make_plane = SeededPlane if memory == "low" else Plane
        plane = make_plane(params, state.parameters, dirs)

        def evaluate_grid(on_point: Any) -> Landscape:
            return _run_grid(evaluator, model, landscape, plane, grid, on_point, grid_share, combine, progress)

        checkpointed(evaluate_grid, PartialSaver(save_to), landscape)
        if "center_loss" not in landscape.metadata:
            origin = tuple(int(np.argmin(np.abs(c))) for c in grid)
            if all(grid[a][i] == 0 for a, i in enumerate(origin)) and landscape.evaluated[origin]:  # type: ignore[index]
                landscape.metadata["center_loss"] = float(landscape.loss[origin])
            else:  # θ* is not a grid point: evaluate it, so center_loss is always the loss at θ* itself
                plane.reset()
                landscape.metadata["center_loss"] = evaluator.evaluate(model)["loss"]
        if evaluator.dtype != "model" or evaluator.compile is not False:
            plane.reset()  # the faster evaluation's error at θ*, against an exact one, on record
            landscape.metadata.update(evaluator.reference_error(model, landscape.metadata["center_loss"]))
    landscape.metadata["partial"] = False
    if save_to is not None:
        landscape.save(save_to)
    return landscape


def _run_grid(
    evaluator: GridEvaluator,
    model: nn.Module,
    landscape: Landscape,
    plane: Plane,
    grid: Sequence[np.ndarray],
    on_point: Any,
    grid_share: tuple[int, int] | None,
    combine: Callable[[np.ndarray], np.ndarray] | None,
    progress: bool | None,
) -> Landscape:
    """Evaluate the grid's missing points through ``plane`` (``points_per_forward`` of them at a time, stacked).

    With ``grid_share=(rank, world)`` only this process's share (flat index ≡ rank mod world), then
    the shares are joined with ``combine``.
    """

    def coefs(idx: tuple[int, ...]) -> list[float]:
        return [float(grid[axis][i]) for axis, i in enumerate(idx)]

    def set_point(idx: tuple[int, ...]) -> None:
        plane.set(coefs(idx))

    stacked = StackedPlane(plane.names, plane.center, plane.steps) if evaluator.points_per_forward > 1 else None

    def stack(idxs: list[tuple[int, ...]]) -> dict:
        return stacked.stack([coefs(i) for i in idxs])  # type: ignore[union-attr]

    run = dict(progress=progress, description="loss surface", stack_points=None if stacked is None else stack)
    if grid_share is None:
        return evaluator.run(model, landscape, set_point, on_point=on_point, **run)  # type: ignore[arg-type]
    rank, world = grid_share
    own = (np.arange(landscape.loss.size).reshape(landscape.shape) % world) == rank
    landscape.evaluated[~own] = True  # type: ignore[index]  # the other processes' points
    evaluator.run(model, landscape, set_point, **run)  # type: ignore[arg-type]
    for name, values in landscape.values.items():
        mine = np.where(own, values, 0.0)  # a NaN of the owner survives the sum, the zeros add nothing
        landscape.values[name] = mine if combine is None else combine(mine)
    landscape.metadata["num_nonfinite"] = landscape.num_nonfinite
    return landscape


MEMORY_MODES = ("default", "low")


def _checked_directions(model: nn.Module, directions: Any, params: dict, memory: str, points: int = 1) -> list:
    """The directions as a list: stored ones checked against the model, recipes materialized unless ``memory="low"``."""
    check_choice("memory", memory, MEMORY_MODES)
    check_low_memory_points(memory, points)
    listed = [directions] if isinstance(directions, SeededDirection) else as_direction_list(directions)
    seeded = [isinstance(d, SeededDirection) for d in listed]
    if memory == "low":
        if not all(seeded):
            raise ValueError(
                "`memory`='low' draws the directions again at every grid point from their recipe, so `directions` "
                "must be SeededDirection objects (e.g. [SeededDirection(seed=0), SeededDirection(seed=1)]); "
                "got stored tensors. Pass recipes, or memory='default'."
            )
        return listed
    listed = [d.materialize(model) if s else d for d, s in zip(listed, seeded)]
    for k, d in enumerate(listed):
        check_direction("directions" if len(listed) == 1 else f"directions[{k}]", d, params)
    return listed


#: Metadata that changes from run to run without changing any value: not part of the fingerprint.
VOLATILE = ("fingerprint", "partial", "center_loss", "num_nonfinite", "num_samples", "global_step", "epoch")


def _starting_point(
    resume: Landscape | Path | None, save_to: Path | None, meta: dict[str, Any], grid: list
) -> Landscape | None:
    if isinstance(resume, Landscape):
        if resume.shape != tuple(len(c) for c in grid) or not all(
            np.array_equal(a, b) for a, b in zip(resume.coords, grid)
        ):
            raise ValueError("`resume` was computed on another grid; expected the same `coords`.")
        return resume
    return load_partial(save_to, meta["fingerprint"], grid) if save_to is not None else None


def loss_surface(
    model: nn.Module,
    data: Iterable[Any],
    directions: Direction | Sequence[Direction],
    coords: Any,
    *,
    loss_fn: LossFn,
    metrics: Any = None,
    forward_fn: ForwardFn | None = None,
    num_batches: int | None = None,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
    resume: str | os.PathLike | None = None,
    bn: str = "eval",
    memory: str = "default",
    dtype: str = "model",
    compile: bool | str | Callable[..., Any] = False,
    points_per_forward: int = 1,
) -> Landscape:
    """Loss (and metrics) on a 1-D or 2-D slice θ* + αδ + βη through the model's weights.

    Args:
        model: any ``nn.Module``; θ* are its current trainable weights. It is
            evaluated in eval mode without autograd and left exactly as it was.
        data: any iterable of batches; it is read once and cached on the model's device.
        directions: one direction or a list of two (see :func:`random_direction`), stored
            tensors or :class:`~lightning_landscape.SeededDirection` recipes.
        coords: one 1-D array of coordinates per direction.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; the value at
            a point is the sample-weighted mean over all samples.
        metrics: torchmetrics objects (dict name -> metric, or a list), reset per point.
        forward_fn: ``forward_fn(model, batch) -> (outputs, targets)``; by default a
            batch is ``(inputs, targets)``.
        num_batches: use at most this many batches of ``data``.
        progress: show a progress bar; ``None`` shows it only on a terminal.
        metadata: extra facts to store (e.g. the directions' ``norm`` and ``seed``).
        resume: a ``.npz`` path: the result is saved there as it grows (every 30 s and when
            interrupted, SIGTERM included, marked ``partial``) and at the end; a partial file
            made with the same weights, directions, grid, data and settings is continued (only
            the missing points are evaluated, bit for bit as an uninterrupted run); any other
            file there is replaced, with a log line saying why.
        bn: ``"eval"`` evaluates with the BatchNorm running statistics as stored;
            ``"recompute"`` recomputes them at every point with one pass over the data
            (see :class:`GridEvaluator`); the model's own statistics come back either way.
        memory: ``"default"`` holds θ* and the directions (three model copies for a 2-D
            surface); ``"low"`` holds θ* only and draws each parameter's slice of the directions
            again at every point from their :class:`~lightning_landscape.SeededDirection` recipes
            (bit for bit the same values and results, a few parameters' worth of memory, more time
            per point on small data; see README "Performance").
        dtype: ``"model"`` (its own dtype) or ``"bf16"`` (forward passes under bfloat16 autocast);
        compile: ``True`` or a backend name: forward passes through ``torch.compile(model)``,
            eager with a warning where compiling fails. With either, ``metadata`` records the
            loss at θ* evaluated exactly and the relative error (``center_loss_rel_error``).
        points_per_forward: evaluate this many grid points per forward pass, their weights
            stacked and the loss ``vmap``-ed (K model copies; with ``bn="eval"``, ``memory="default"``,
            no ``compile``). Faster where a forward pass is mostly overhead, slower where it is
            compute-bound (README "Performance").

    Returns:
        a :class:`Landscape` with ``values["loss"]`` of shape ``(len(α),)`` or ``(len(α), len(β))``.

    Raises:
        ValueError: for more than two directions, directions that do not match the
            model, empty or non-finite coords, empty data, a model without trainable
            parameters.

    Example:
        >>> from lightning_landscape import random_direction
        >>> model = nn.Linear(2, 1)
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> dirs = [random_direction(model, seed=0), random_direction(model, seed=1)]
        >>> ls = loss_surface(model, data, dirs, [np.linspace(-1, 1, 5)] * 2, loss_fn=nn.functional.mse_loss)
        >>> ls.loss.shape
        (5, 5)
    """
    dirs = _checked_directions(model, directions, trainable_parameters(model), memory)
    grid = as_grid_coords(coords, len(dirs))
    evaluator = GridEvaluator(
        data,
        make_batch_loss(loss_fn, forward_fn),
        metrics=metrics,
        device=model_device(model),
        num_batches=num_batches,
        bn=bn,
        dtype=dtype,
        compile=compile,
        points_per_forward=points_per_forward,
    )
    return surface_from_evaluator(
        model, evaluator, dirs, grid, progress=progress, metadata=metadata, resume=resume, memory=memory
    )
