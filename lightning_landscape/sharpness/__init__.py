"""Sharpness and basin numbers at the model's weights: ε-sharpness, basin radius, log basin volume.

* ε-sharpness (Keskar et al., "On Large-Batch Training for Deep Learning", ICLR 2017): the largest
  relative loss rise in a box ``|δ_i| <= ε(|θ_i| + 1)`` (or in a random subspace), in percent
  (:func:`epsilon_sharpness`).
* Basin radius along random directions and the log volume of the basin, ``log V = log ω_n +
  log E_φ[r(φ)^n]`` (Huang et al., "Understanding Generalization through Visualizations", 2019)
  (:func:`basin_radius`, :func:`basin_radii`, :func:`log_basin_volume`).
* :func:`sharpness`: all of them (with the mean loss rise at fixed radii, and λmax and the trace of
  the Hessian) in one :class:`~lightning_landscape.results.SharpnessReport`.

Example:
    >>> import math
    >>> from lightning_landscape.sharpness import log_basin_volume
    >>> round(log_basin_volume([1.0, 1.0], 2), 6) == round(math.log(math.pi), 6)  # the unit disc
    True
"""

from lightning_landscape.results.sharpness import SharpnessReport
from lightning_landscape.sharpness.basin import (
    BasinRadii,
    basin_radii,
    basin_radius,
    count_moved,
    log_basin_volume,
    log_unit_ball_volume,
)
from lightning_landscape.sharpness.epsilon import EpsilonSharpness, epsilon_sharpness, random_subspace
from lightning_landscape.sharpness.report import check_sharpness_args, sharpness

__all__ = [
    "BasinRadii",
    "EpsilonSharpness",
    "SharpnessReport",
    "basin_radii",
    "basin_radius",
    "check_sharpness_args",
    "count_moved",
    "epsilon_sharpness",
    "log_basin_volume",
    "log_unit_ball_volume",
    "random_subspace",
    "sharpness",
]
