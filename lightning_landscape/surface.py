"""Grid evaluation: loss surfaces along directions, and linear interpolation.

The engine is :class:`GridEvaluator`: it evaluates the model at its current
weights over batches cached on the device, as per-point *sums* (loss x samples,
samples) that a caller may reduce across processes before dividing. The public
functions set the weights for each grid point and write into a
:class:`~lightning_landscape.results.Landscape`, point by point, so a partial
result is always consistent.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lightning_landscape import _versions
from lightning_landscape._validation import as_coordinate_array, check_positive_int
from lightning_landscape.batches import ForwardFn, cache_batches, count_samples, default_forward, model_device
from lightning_landscape.directions import Direction, check_direction, trainable_parameters
from lightning_landscape.results import Landscape
from lightning_landscape.state import preserved_state

#: ``loss_fn(outputs, targets) -> Tensor``: the mean loss of one batch.
LossFn = Callable[[Any, Any], torch.Tensor]
#: ``batch_loss(model, batch) -> (mean_loss, num_samples, outputs, targets)``; outputs may be None.
BatchLoss = Callable[[nn.Module, Any], tuple[torch.Tensor, int, Any, Any]]
#: ``reduce(sums) -> sums``: sums a float64 tensor over processes (identity on one process).
Reduce = Callable[[torch.Tensor], torch.Tensor]


def make_batch_loss(loss_fn: LossFn, forward_fn: ForwardFn | None = None) -> BatchLoss:
    """Build a :data:`BatchLoss` from a ``loss_fn(outputs, targets)`` and an optional ``forward_fn``.

    Example:
        >>> batch_loss = make_batch_loss(nn.functional.mse_loss, lambda model, batch: (model(batch["x"]), batch["y"]))
        >>> loss, n, outputs, targets = batch_loss(nn.Identity(), {"x": torch.ones(4, 1), "y": torch.zeros(4, 1)})
        >>> loss.item(), n
        (1.0, 4)
    """
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn`={loss_fn!r} is not callable; expected loss_fn(outputs, targets) -> Tensor.")
    forward = forward_fn or default_forward

    def batch_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, Any, Any]:
        outputs, targets = forward(model, batch)
        return loss_fn(outputs, targets), count_samples(targets, outputs), outputs, targets

    return batch_loss


def _as_metric_dict(metrics: Any) -> dict[str, Any]:
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        items = [(type(m).__name__.lower(), m) for m in metrics]
    else:
        items = [(type(metrics).__name__.lower(), metrics)]
    out: dict[str, Any] = {}
    for name, metric in items:
        if not all(hasattr(metric, attr) for attr in ("update", "compute", "reset")):
            raise ValueError(
                f"`metrics[{name!r}]`={metric!r} is not a metric; expected torchmetrics.Metric objects "
                "(anything with update/compute/reset)."
            )
        if name == "loss" or name in out:
            raise ValueError(f"`metrics` uses the name {name!r} twice or for the loss; pass a dict with distinct names.")
        out[name] = metric
    return out


class GridEvaluator:
    """Evaluate a model's loss and metrics at its current weights over cached batches.

    The batches are moved to ``device`` once; each :meth:`evaluate` call runs one
    eval-mode forward pass per batch without autograd and returns the
    sample-weighted mean loss (not the mean of batch means) and the metrics.

    Args:
        data: an iterable of batches (a DataLoader, a list).
        batch_loss: see :data:`BatchLoss`; build one with :func:`make_batch_loss`.
        metrics: torchmetrics objects (a dict name -> metric, or a list);
            they are copied, never mutated, and reset at every point.
        device: where the batches and metrics live (the model's device).
        num_batches: use at most this many batches of ``data``.
        reduce: sums the per-point ``[loss x samples, samples]`` across processes;
            ``None`` on a single process.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> data = [(torch.ones(3, 2), torch.zeros(3, 1))]
        >>> ev = GridEvaluator(data, make_batch_loss(nn.functional.mse_loss), device="cpu")
        >>> sorted(ev.evaluate(model))
        ['loss']
    """

    def __init__(
        self,
        data: Iterable[Any],
        batch_loss: BatchLoss,
        *,
        metrics: Any = None,
        device: torch.device | str = "cpu",
        num_batches: int | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        check_positive_int("num_batches", num_batches, allow_none=True)
        self.device = torch.device(device)
        self.batches = cache_batches(data, self.device, num_batches)
        self.batch_loss = batch_loss
        self.metrics = {name: copy.deepcopy(m).to(self.device) for name, m in _as_metric_dict(metrics).items()}
        self.reduce = reduce
        self.num_samples: int | None = None

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Loss and metrics at the model's current weights; puts the model in eval mode."""
        model.eval()
        for metric in self.metrics.values():
            metric.reset()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        with torch.no_grad():
            for batch in self.batches:
                loss, n, outputs, targets = self.batch_loss(model, batch)
                total = total + loss.detach().to(torch.float64) * n
                count += n
                if self.metrics:
                    if outputs is None:
                        raise ValueError(
                            "`metrics` need the model's outputs, but the loss function gave none; "
                            "return them from `landscape_step` or pass metrics=None."
                        )
                    for metric in self.metrics.values():
                        metric.update(outputs, targets)
        sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        if self.reduce is not None:
            sums = self.reduce(sums)
        loss_sum, count_sum = sums.tolist()
        self.num_samples = int(count_sum)
        mean = loss_sum / count_sum if count_sum else math.nan
        out = {"loss": mean if math.isfinite(mean) else math.nan}
        for name, metric in self.metrics.items():
            value = metric.compute()
            out[name] = float(value) if torch.is_tensor(value) and value.numel() == 1 else math.nan
        return out

    def run(
        self,
        model: nn.Module,
        landscape: Landscape,
        set_point: Callable[[tuple[int, ...]], None],
        *,
        progress: bool | None = None,
        description: str = "landscape",
    ) -> Landscape:
        """Evaluate every point of ``landscape`` not yet evaluated, writing results in place.

        ``set_point(index)`` puts the weights of grid point ``index`` into the model.
        Points are written one by one, so an interruption leaves a consistent partial result.
        """
        todo = [idx for idx in np.ndindex(*landscape.shape) if not landscape.evaluated[idx]]  # type: ignore[index]
        # tqdm's disable=None turns the bar off when stderr is not a terminal.
        bar = tqdm(todo, desc=description, disable=None if progress is None else not progress, leave=False)
        for idx in bar:
            set_point(idx)
            point = self.evaluate(model)
            for name, value in point.items():
                if name not in landscape.values:
                    landscape.values[name] = np.full(landscape.shape, np.nan)
                landscape.values[name][idx] = value
            landscape.evaluated[idx] = True  # type: ignore[index]
        landscape.metadata["num_nonfinite"] = landscape.num_nonfinite
        landscape.metadata["num_samples"] = self.num_samples
        return landscape


def _empty_landscape(coords: list[np.ndarray], names: Iterable[str], metadata: dict[str, Any]) -> Landscape:
    shape = tuple(len(c) for c in coords)
    values = {name: np.full(shape, np.nan) for name in ("loss", *names)}
    return Landscape(coords=coords, values=values, evaluated=np.zeros(shape, dtype=bool), metadata=metadata)


def _as_direction_list(directions: Any) -> list[Mapping[str, torch.Tensor]]:
    if isinstance(directions, Mapping):
        return [directions]
    if isinstance(directions, Sequence) and not isinstance(directions, str):
        directions = list(directions)
        if not 1 <= len(directions) <= 2:
            raise ValueError(f"`directions` holds {len(directions)} directions; expected 1 or 2.")
        return directions
    raise ValueError(f"`directions` is a {type(directions).__name__}; expected one direction (a dict) or a list of 1 or 2.")


def _as_coords(coords: Any, dims: int) -> list[np.ndarray]:
    if isinstance(coords, np.ndarray) and coords.ndim == 1 and dims == 1:
        coords = [coords]
    if not isinstance(coords, (Sequence, np.ndarray)) or isinstance(coords, str) or len(coords) != dims:
        got = len(coords) if isinstance(coords, (Sequence, np.ndarray)) else type(coords).__name__
        raise ValueError(f"`coords` holds {got} axes; expected one 1-D array per direction ({dims}).")
    return [as_coordinate_array(f"coords[{i}]", c) for i, c in enumerate(coords)]


def set_plane_point(
    targets: list[torch.Tensor], center: list[torch.Tensor], steps: list[list[torch.Tensor]], coefs: Sequence[float]
) -> None:
    """Write θ* + Σ_k c_k d_k into ``targets`` in place.

    The point is rebuilt from the saved centre every time, so no rounding error
    accumulates across grid points, and all-zero coefficients give θ* bit for bit.
    ``steps[k]`` holds direction k's tensors in the order of ``targets``.

    Example:
        >>> targets, center = [torch.zeros(2)], [torch.ones(2)]
        >>> steps = [[torch.tensor([1.0, 0.0])], [torch.tensor([0.0, 1.0])]]
        >>> set_plane_point(targets, center, steps, [0.5, -2.0])
        >>> targets[0].tolist()
        [1.5, -1.0]
    """
    with torch.no_grad():
        torch._foreach_copy_(targets, center)
        for step, coef in zip(steps, coefs):
            torch._foreach_add_(targets, step, alpha=float(coef))


def surface_from_evaluator(
    model: nn.Module,
    evaluator: GridEvaluator,
    directions: Any,
    coords: Any,
    *,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
    resume: Landscape | None = None,
) -> Landscape:
    """Evaluate f(α, β) = L(θ* + αδ + βη) with a ready :class:`GridEvaluator`.

    This is :func:`loss_surface` for callers that build their own evaluator (a
    Lightning module's loss, a cross-process ``reduce``). ``resume`` continues a
    partial result of the same grid. See :func:`loss_surface` for the rest.

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
    dirs = _as_direction_list(directions)
    params = trainable_parameters(model)
    for k, d in enumerate(dirs):
        check_direction("directions" if len(dirs) == 1 else f"directions[{k}]", d, params)
    grid = _as_coords(coords, len(dirs))
    names = list(params)
    meta = {"kind": "surface", **_versions.collect(), **(metadata or {})}
    if resume is not None:
        if resume.shape != tuple(len(c) for c in grid) or not all(np.array_equal(a, b) for a, b in zip(resume.coords, grid)):
            raise ValueError("`resume` was computed on another grid; expected the same `coords`.")
        landscape = resume
    else:
        landscape = _empty_landscape(grid, evaluator.metrics, meta)

    with preserved_state(model) as state:
        with torch.no_grad():
            targets = [params[n] for n in names]
            center = [state.parameters[n] for n in names]
            steps = [[d[n].to(device=params[n].device, dtype=params[n].dtype) for n in names] for d in dirs]

            def set_point(idx: tuple[int, ...]) -> None:
                set_plane_point(targets, center, steps, [float(grid[axis][i]) for axis, i in enumerate(idx)])

        evaluator.run(model, landscape, set_point, progress=progress, description="loss surface")
        if "center_loss" not in landscape.metadata:
            origin = tuple(int(np.argmin(np.abs(c))) for c in grid)
            if all(grid[a][i] == 0 for a, i in enumerate(origin)) and landscape.evaluated[origin]:  # type: ignore[index]
                landscape.metadata["center_loss"] = float(landscape.loss[origin])
            else:
                with torch.no_grad():
                    torch._foreach_copy_(targets, center)
                landscape.metadata["center_loss"] = evaluator.evaluate(model)["loss"]
    return landscape


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
) -> Landscape:
    """Loss (and metrics) on a 1-D or 2-D slice θ* + αδ + βη through the model's weights.

    Args:
        model: any ``nn.Module``; θ* are its current trainable weights. It is
            evaluated in eval mode without autograd and left exactly as it was.
        data: any iterable of batches; it is read once and cached on the model's device.
        directions: one direction or a list of two (see :func:`random_direction`).
        coords: one 1-D array of coordinates per direction.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch mean; the value at
            a point is the sample-weighted mean over all samples.
        metrics: torchmetrics objects (dict name -> metric, or a list), reset per point.
        forward_fn: ``forward_fn(model, batch) -> (outputs, targets)``; by default a
            batch is ``(inputs, targets)``.
        num_batches: use at most this many batches of ``data``.
        progress: show a progress bar; ``None`` shows it only on a terminal.
        metadata: extra facts to store (e.g. the directions' ``norm`` and ``seed``).

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
    dirs = _as_direction_list(directions)
    params = trainable_parameters(model)
    for k, d in enumerate(dirs):
        check_direction("directions" if len(dirs) == 1 else f"directions[{k}]", d, params)
    grid = _as_coords(coords, len(dirs))
    evaluator = GridEvaluator(
        data, make_batch_loss(loss_fn, forward_fn), metrics=metrics, device=model_device(model), num_batches=num_batches
    )
    return surface_from_evaluator(model, evaluator, dirs, grid, progress=progress, metadata=metadata)


def _state_of(name: str, obj: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise ValueError(f"`{name}` is a {type(obj).__name__}; expected a state dict or an nn.Module.")


def interpolation_from_evaluator(
    model: nn.Module,
    evaluator: GridEvaluator,
    start: Mapping[str, torch.Tensor] | nn.Module,
    end: Mapping[str, torch.Tensor] | nn.Module,
    alphas: Any,
    *,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
) -> Landscape:
    """:func:`interpolate` with a ready :class:`GridEvaluator`.

    Example:
        >>> a, b = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
        >>> _ = nn.init.zeros_(a.weight), nn.init.ones_(b.weight)
        >>> ev = GridEvaluator([(torch.ones(2, 1), torch.zeros(2, 1))], make_batch_loss(nn.functional.mse_loss))
        >>> interpolation_from_evaluator(a, ev, a, b, [0.0, 0.5, 1.0], progress=False).loss.tolist()
        [0.0, 0.25, 1.0]
    """
    alphas = as_coordinate_array("alphas", alphas)
    start_sd, end_sd = _state_of("start", start), _state_of("end", end)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    names = [n for n, t in tensors.items() if t.is_floating_point()]
    for label, sd in (("start", start_sd), ("end", end_sd)):
        missing = [n for n in names if n not in sd]
        if missing:
            raise ValueError(f"`{label}` lacks the entries {missing[:5]}; expected a state dict of the same model.")
        for n in names:
            if tuple(sd[n].shape) != tuple(tensors[n].shape):
                raise ValueError(f"`{label}[{n!r}]` has shape {tuple(sd[n].shape)}; expected {tuple(tensors[n].shape)}.")
    targets = [tensors[n] for n in names]
    starts = [start_sd[n].detach().to(tensors[n]) for n in names]
    ends = [end_sd[n].detach().to(tensors[n]) for n in names]
    meta = {"kind": "interpolation", **_versions.collect(), **(metadata or {})}
    landscape = _empty_landscape([alphas], evaluator.metrics, meta)

    def set_point(idx: tuple[int, ...]) -> None:
        # torch.lerp is exact at both ends, so α = 0 and α = 1 reproduce the two models bit for bit.
        with torch.no_grad():
            for t, s, e in zip(targets, starts, ends):
                torch.lerp(s, e, float(alphas[idx[0]]), out=t)

    with preserved_state(model):
        return evaluator.run(model, landscape, set_point, progress=progress, description="interpolation")


def interpolate(
    model: nn.Module,
    start: Mapping[str, torch.Tensor] | nn.Module,
    end: Mapping[str, torch.Tensor] | nn.Module,
    alphas: Any,
    data: Iterable[Any],
    *,
    loss_fn: LossFn,
    metrics: Any = None,
    forward_fn: ForwardFn | None = None,
    num_batches: int | None = None,
    progress: bool | None = None,
    metadata: dict[str, Any] | None = None,
) -> Landscape:
    """Loss along θ(α) = (1−α)·θ_start + α·θ_end (Goodfellow et al. 2015).

    Every floating-point parameter and buffer (BatchNorm running statistics too)
    is interpolated, so α = 0 and α = 1 give exactly the two models' own losses;
    α may leave [0, 1]. ``model`` supplies the architecture and is left as it was.

    Args:
        model: a module with the architecture of both end points.
        start, end: state dicts or modules of that architecture.
        alphas: 1-D array of interpolation coefficients.
        data, loss_fn, metrics, forward_fn, num_batches, progress, metadata: as in
            :func:`loss_surface`.

    Example:
        >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
        >>> data = [(torch.randn(8, 2), torch.randn(8, 1))]
        >>> ls = interpolate(a, a, b, np.linspace(0, 1, 3), data, loss_fn=nn.functional.mse_loss)
        >>> ls.coords[0].tolist()
        [0.0, 0.5, 1.0]
    """
    as_coordinate_array("alphas", alphas)  # checked before the data is read
    evaluator = GridEvaluator(
        data, make_batch_loss(loss_fn, forward_fn), metrics=metrics, device=model_device(model), num_batches=num_batches
    )
    return interpolation_from_evaluator(model, evaluator, start, end, alphas, progress=progress, metadata=metadata)
