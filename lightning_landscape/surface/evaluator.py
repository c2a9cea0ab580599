"""The grid engine: a model's loss and metrics at its current weights, over batches cached once.

:class:`GridEvaluator` returns per-point *sums* (loss x samples, samples) that a
caller may reduce across processes before dividing; :meth:`GridEvaluator.run`
visits the points of a :class:`~lightning_landscape.Landscape` not yet evaluated
and writes them in place, point by point, so a partial result is always consistent.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_landscape._validation import check_choice, check_positive_int
from lightning_landscape.batchnorm import BN_POLICIES, recompute_bn, resolve_bn
from lightning_landscape.data import BatchLoss, Reduce, cache_batches
from lightning_landscape.errors import LandscapeWarning
from lightning_landscape.metrics import METRIC_NAMES, check_metric_names, is_metric, metric_from_name
from lightning_landscape.progress import track
from lightning_landscape.results import Landscape
from lightning_landscape.surface.stacked import check_points_per_forward, stacked_batch_loss


def as_metric_dict(metrics: Any) -> dict[str, Any]:
    """Metrics as ``{name: metric}``: a dict kept as is, a list named by class (or by the name itself).

    An entry may be a metric name from :data:`~lightning_landscape.metrics.METRIC_NAMES`
    (``"accuracy"``): it maps to ``None`` and is built from the first batch's outputs.

    Example:
        >>> as_metric_dict(["accuracy"])
        {'accuracy': None}
    """
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        items = list(metrics.items())
    else:
        listed = list(metrics) if isinstance(metrics, Sequence) and not isinstance(metrics, str) else [metrics]
        items = [(m if isinstance(m, str) else type(m).__name__.lower(), m) for m in listed]
    out: dict[str, Any] = {}
    for name, metric in items:
        if isinstance(metric, str):
            check_metric_names([metric])
            metric = None
        elif not is_metric(metric):
            raise ValueError(
                f"`metrics[{name!r}]`={metric!r} is not a metric; expected torchmetrics.Metric objects "
                "(anything with update/compute/reset) or the names " + ", ".join(map(repr, METRIC_NAMES)) + "."
            )
        if name == "loss" or name in out:
            raise ValueError(
                f"`metrics` uses the name {name!r} twice or for the loss; pass a dict with distinct names."
            )
        out[name] = metric
    return out


def compile_label(compile: Any) -> str:
    """How a ``compile`` setting is written into a result's metadata.

    Example:
        >>> compile_label(True), compile_label("aot_eager")
        ('True', 'aot_eager')
    """
    return compile if isinstance(compile, str) else getattr(compile, "__name__", None) or str(compile)


#: The evaluation dtypes: the model's own, or bfloat16 autocast.
EVAL_DTYPES = ("model", "bf16")


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
        sync_metrics: let torchmetrics sync their states across processes at ``compute``
            (their default); ``False`` when every process evaluates all the data itself.
        bn: BatchNorm running statistics at each point: ``"eval"`` uses them as stored;
            ``"recompute"`` resets and recomputes them first with one pass over the cached
            batches at the point's weights (see :func:`~lightning_landscape.batchnorm.recompute_bn`),
            which interpolated, curve and plane points of BatchNorm networks need. A model
            without BatchNorm warns once and is evaluated as with ``"eval"``.
        bn_batches: the batches the statistics are recomputed from (default: this evaluator's own),
            e.g. the training batches of an evaluator on validation data.
        dtype: ``"model"`` evaluates in the model's own dtype; ``"bf16"`` runs each forward under
            ``torch.autocast`` in bfloat16 (faster where the hardware has bf16 units, less exact:
            :meth:`reference_error` measures it).
        compile: ``True`` (or a ``torch.compile`` backend name) evaluates through
            ``torch.compile(model)``, compiled at the first point and reused for the others; where
            compiling fails it warns once and evaluates eagerly.
        points_per_forward: grid points evaluated together, K weight sets in one ``vmap``-ed call
            per batch (:mod:`~lightning_landscape.surface.stacked`; K model copies of memory). With
            ``bn="eval"``, eagerly; where the loss cannot be vmapped it warns once and goes on one
            point at a time.

    Example:
        >>> from lightning_landscape import make_batch_loss
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
        sync_metrics: bool = True,
        bn: str = "eval",
        bn_batches: list[Any] | None = None,
        dtype: str = "model",
        compile: bool | str | Callable[..., Any] = False,
        points_per_forward: int = 1,
    ) -> None:
        check_positive_int("num_batches", num_batches, allow_none=True)
        self.points_per_forward = check_points_per_forward(points_per_forward, bn, compile)
        self.dtype = check_choice("dtype", dtype, EVAL_DTYPES)
        if not (isinstance(compile, bool) or (isinstance(compile, str) and compile) or callable(compile)):
            raise ValueError(
                f"`compile`={compile!r}; expected True, False or a torch.compile backend (name or callable)."
            )
        self.compile = compile
        self._compiled: tuple[int, Any] | None = None
        self.bn = check_choice("bn", bn, BN_POLICIES)
        self._bn_resolved = bn == "eval"
        self.bn_batches = bn_batches
        self.device = torch.device(device)
        self.batches = cache_batches(data, self.device, num_batches)
        self.batch_loss = batch_loss
        # Metrics given by name are built from the first batch's outputs (see _build_metrics), so sizing
        # them costs no extra forward pass.
        self.metrics = {
            name: None if m is None else copy.deepcopy(m).to(self.device) for name, m in as_metric_dict(metrics).items()
        }
        self.reduce = reduce
        self.sync_metrics = sync_metrics
        for metric in self.metrics.values():
            self._set_sync(metric)
        self.num_samples: int | None = None
        self._sums: torch.Tensor | None = None
        self._point_metrics: list[dict[str, Any]] = []

    def evaluate(self, model: nn.Module, *, exact: bool = False) -> dict[str, float]:
        """Loss and metrics at the model's current weights; puts the model in eval mode.

        ``exact=True`` evaluates in the model's own dtype, eagerly, whatever ``dtype`` and ``compile`` say.

        With ``bn="recompute"`` the BatchNorm statistics are recomputed first and left so:
        run inside :func:`~lightning_landscape.preserved_state` to get the model's own back.
        """
        if not self._bn_resolved:
            self.bn, self._bn_resolved = resolve_bn(model, self.bn), True
        if self.bn == "recompute":
            batches = self.batches if self.bn_batches is None else self.bn_batches
            recompute_bn(model, batches, self.batch_loss, reduce=self.reduce)
        model.eval()
        for metric in self.metrics.values():
            if metric is not None:
                metric.reset()
        # One float64 accumulator for the whole evaluator: no new device tensor per batch or point.
        if self._sums is None:
            self._sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        sums = self._sums.zero_()
        total, count = sums[0], 0
        runner = model if exact else self._runner(model)
        autocast = self.dtype == "bf16" and not exact
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            for batch in self.batches:
                loss, n, outputs, targets = self._batch_loss(runner, model, batch)
                total.add_(loss.detach(), alpha=n)
                count += n
                if self.metrics:
                    if outputs is None:
                        raise ValueError(
                            "`metrics` need the model's outputs, but the loss function gave none; "
                            "return them from `landscape_step` or pass metrics=None."
                        )
                    self._build_metrics(outputs)
                    for metric in self.metrics.values():
                        metric.update(outputs, targets)
        sums[1] = count
        if self.reduce is not None:
            sums = self.reduce(sums)
        return self._read(sums, self.metrics)

    def evaluate_stacked(self, model: nn.Module, weights: dict[str, torch.Tensor], k: int) -> list[dict[str, float]]:
        """Loss and metrics of ``k`` points at once, their trainable weights stacked in ``weights``.

        ``weights`` maps each trainable parameter's name to a tensor of ``k`` weight sets
        (:class:`~lightning_landscape.surface.stacked.StackedPlane`); the model's own values are not
        used or changed. Puts the model in eval mode. One ``vmap``-ed call per batch.
        """
        model.eval()
        with_outputs = bool(self.metrics)
        for metrics in self._point_metrics:
            for metric in metrics.values():
                metric.reset()
        sums = torch.zeros(k, 2, dtype=torch.float64, device=self.device)
        count = 0
        autocast = self.dtype == "bf16"
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast):
            for batch in self.batches:
                loss, n, outputs, targets = stacked_batch_loss(model, self.batch_loss, batch, weights, with_outputs)
                sums[:, 0].add_(loss.detach().to(torch.float64), alpha=n)
                count += n
                if with_outputs:
                    for j, metrics in enumerate(self._metrics_for(k, outputs)):
                        for metric in metrics.values():
                            metric.update(outputs[j], targets)
        sums[:, 1] = count
        if self.reduce is not None:
            sums = self.reduce(sums)
        point_metrics = self._point_metrics[:k] if with_outputs else [{}] * k
        return [self._read(sums[j], metrics) for j, metrics in enumerate(point_metrics)]

    def _metrics_for(self, k: int, outputs: torch.Tensor) -> list[dict[str, Any]]:
        """``k`` reset copies of the metrics (one per stacked point), built on the first call of a chunk."""
        if any(m is None for m in self.metrics.values()):
            self._build_metrics(outputs[0])
        while len(self._point_metrics) < k:
            self._point_metrics.append({name: copy.deepcopy(m) for name, m in self.metrics.items()})
        return self._point_metrics[:k]

    def _read(self, sums: torch.Tensor, metrics: dict[str, Any]) -> dict[str, float]:
        """The point's loss and metrics from the summed ``[loss x samples, samples]``, with one host sync."""
        computed = {name: metric.compute() for name, metric in metrics.items()}
        scalars = [
            v.detach().reshape(()).to(device=sums.device, dtype=torch.float64)
            for v in computed.values()
            if torch.is_tensor(v) and v.numel() == 1
        ]
        loss_sum, count_sum, *read = torch.cat([sums, torch.stack(scalars)]).tolist() if scalars else sums.tolist()
        self.num_samples = int(count_sum)
        mean = loss_sum / count_sum if count_sum else math.nan
        out = {"loss": mean if math.isfinite(mean) else math.nan}
        values = iter(read)
        for name, value in computed.items():
            out[name] = next(values) if torch.is_tensor(value) and value.numel() == 1 else math.nan
        return out

    def _runner(self, model: nn.Module) -> Any:
        """The module the forward passes go through: ``model``, or its compiled wrapper (made once)."""
        if self.compile is False:
            return model
        if self._compiled is None or self._compiled[0] != id(model):
            backend = "inductor" if self.compile is True else self.compile
            self._compiled = (id(model), torch.compile(model, backend=backend))
        return self._compiled[1]

    def _batch_loss(self, runner: Any, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int, Any, Any]:
        if runner is model:
            return self.batch_loss(model, batch)
        try:
            return self.batch_loss(runner, batch)
        except Exception as error:  # noqa: BLE001  # any backend failure: fall back, and say so once
            warnings.warn(
                f"`compile`={self.compile!r}: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
                "evaluating eagerly.",
                LandscapeWarning,
                stacklevel=4,
            )
            self.compile = False
            return self.batch_loss(model, batch)

    def reference_error(self, model: nn.Module, value: float) -> dict[str, float | str]:
        """``value`` (a loss this evaluator gave at the model's current weights) against an exact evaluation.

        For ``dtype="bf16"`` or ``compile``: the exact (model dtype, eager) loss and the relative
        error, stored in a result's metadata so the cost of the faster evaluation is on record.
        """
        exact = self.evaluate(model, exact=True)["loss"]
        error = abs(value - exact) / abs(exact) if exact else abs(value - exact)
        return {
            "eval_dtype": self.dtype,
            "compile": compile_label(self.compile),
            "exact_center_loss": exact,
            "center_loss_rel_error": error,
        }

    def _build_metrics(self, outputs: Any) -> None:
        for name, metric in self.metrics.items():
            if metric is None:
                self.metrics[name] = self._set_sync(metric_from_name(name, outputs).to(self.device))

    def _set_sync(self, metric: Any) -> Any:
        if metric is not None and not self.sync_metrics:
            # torchmetrics reads `_to_sync` (set from `sync_on_compute` at construction) in compute().
            metric.sync_on_compute = False
            metric._to_sync = False
        return metric

    def run(
        self,
        model: nn.Module,
        landscape: Landscape,
        set_point: Callable[[tuple[int, ...]], None],
        *,
        progress: bool | None = None,
        description: str = "landscape",
        on_point: Callable[[Landscape], None] | None = None,
        stack_points: Callable[[list[tuple[int, ...]]], dict[str, torch.Tensor]] | None = None,
    ) -> Landscape:
        """Evaluate every point of ``landscape`` not yet evaluated, writing results in place.

        ``set_point(index)`` puts the weights of grid point ``index`` into the model.
        Points are written one by one, so an interruption leaves a consistent partial result.
        ``progress``: a bar (True; None on a terminal), log lines (None off a terminal), nothing (False).
        ``on_point(landscape)`` runs after each point (e.g. to save a partial result).
        With ``points_per_forward`` K > 1 and ``stack_points(indices)`` (the stacked trainable
        weights of those points, see :meth:`evaluate_stacked`), K points are evaluated per call
        and ``on_point`` runs after each K.
        """
        todo = [idx for idx in np.ndindex(*landscape.shape) if not landscape.evaluated[idx]]  # type: ignore[index]
        k = self.points_per_forward if stack_points is not None else 1
        chunks = [todo[i : i + k] for i in range(0, len(todo), k)]
        cost = f"{len(self.batches)} forward pass(es)" + (f" of {k} points" if k > 1 else "")
        for chunk in track(chunks, len(chunks), description=description, progress=progress, unit_cost=cost):
            if k > 1:
                points = self._evaluate_chunk(model, chunk, set_point, stack_points)
            else:  # only evaluate(): other evaluators borrow this loop (callbacks/swa.py)
                set_point(chunk[0])
                points = [self.evaluate(model)]
            for idx, point in zip(chunk, points, strict=True):
                for name, value in point.items():
                    if name not in landscape.values:
                        landscape.values[name] = np.full(landscape.shape, np.nan)
                    landscape.values[name][idx] = value
                landscape.evaluated[idx] = True  # type: ignore[index]
            if on_point is not None:
                on_point(landscape)
        landscape.metadata["num_nonfinite"] = landscape.num_nonfinite
        landscape.metadata["num_samples"] = self.num_samples
        return landscape

    def _evaluate_chunk(
        self,
        model: nn.Module,
        chunk: list[tuple[int, ...]],
        set_point: Callable[[tuple[int, ...]], None],
        stack_points: Callable[[list[tuple[int, ...]]], dict[str, torch.Tensor]] | None,
    ) -> list[dict[str, float]]:
        """The chunk's points: stacked when it has several, else one by one through ``set_point``."""
        if len(chunk) > 1 and stack_points is not None and self.points_per_forward > 1:
            try:
                return self.evaluate_stacked(model, stack_points(chunk), len(chunk))
            except Exception as error:  # noqa: BLE001  # a loss vmap cannot run: one point at a time, said once
                warnings.warn(
                    f"`points_per_forward`={self.points_per_forward}: the loss could not be evaluated for several "
                    f"points at once ({type(error).__name__}: {str(error)[:200]}); evaluating one point at a time.",
                    LandscapeWarning,
                    stacklevel=4,
                )
                self.points_per_forward = 1
        points = []
        for idx in chunk:
            set_point(idx)
            points.append(self.evaluate(model))
        return points
