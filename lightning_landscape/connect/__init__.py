"""Mode connectivity (Garipov et al., 2018): curves of low loss between two trained networks.

:func:`fit_curve` trains the bends of a Bezier or polygonal-chain curve between two fixed
end points; :func:`evaluate_curve` measures the loss along it and along the straight
line, with the barrier height of both; :func:`curve_plane` evaluates the loss over the
plane through w₁, a bend and w₂; :func:`connect` fits and evaluates in one call.
"""

from lightning_landscape.connect.curves import (
    CURVES,
    Curve,
    bezier_coefficients,
    curve_coefficients,
    polychain_coefficients,
)
from lightning_landscape.connect.evaluate import (
    PlaneBasis,
    check_ts,
    connect,
    curve_plane,
    curve_result_from_evaluator,
    evaluate_curve,
    plane_basis,
)
from lightning_landscape.connect.fit import OPTIMIZERS, fit_curve

__all__ = [
    "CURVES",
    "OPTIMIZERS",
    "Curve",
    "PlaneBasis",
    "bezier_coefficients",
    "check_ts",
    "connect",
    "curve_coefficients",
    "curve_plane",
    "curve_result_from_evaluator",
    "evaluate_curve",
    "fit_curve",
    "plane_basis",
    "polychain_coefficients",
]
