"""Grid evaluation: loss surfaces along directions, and paths between weight sets."""

from lightning_landscape.data import make_batch_loss
from lightning_landscape.surface.evaluator import GridEvaluator
from lightning_landscape.surface.path import interpolate, interpolation_from_evaluator
from lightning_landscape.surface.plane import loss_surface, surface_from_evaluator
from lightning_landscape.surface.runs import interpolate_runs

__all__ = [
    "GridEvaluator",
    "interpolate",
    "interpolate_runs",
    "interpolation_from_evaluator",
    "loss_surface",
    "make_batch_loss",
    "surface_from_evaluator",
]
