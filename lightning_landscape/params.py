"""The weights an analysis moves: trainable parameters, flat vectors, and points of a plane.

Every analysis that visits other weights (surfaces, the ratio map, curves) writes
them through :class:`Plane`, which rebuilds θ* + Σ_k c_k d_k from the saved centre
at every point, so no rounding accumulates and all-zero coefficients give θ* bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from lightning_landscape._validation import short_list


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters with ``requires_grad=True``, keyed by name, in model order.

    A parameter shared by several modules (tied weights) appears once.

    Raises:
        ValueError: if the model has none, or has complex ones (not supported: their imaginary
            parts would be silently dropped).

    Example:
        >>> model = nn.Linear(3, 2)
        >>> _ = model.bias.requires_grad_(False)
        >>> list(trainable_parameters(model))
        ['weight']
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    complex_ = [name for name, p in params.items() if p.is_complex()]
    if complex_:
        raise ValueError(
            f"`model` ({type(model).__name__}) has complex parameters {short_list(complex_)}; the analyses "
            "support real floating-point parameters only (freeze them with requires_grad_(False), or split them "
            "into real and imaginary parts)."
        )
    if not params:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no trainable parameters; "
            "expected at least one parameter with requires_grad=True."
        )
    return params


def flatten_parameters(
    params: Mapping[str, torch.Tensor],
    names: Iterable[str] | None = None,
    *,
    device: torch.device | str | None = "cpu",
) -> torch.Tensor:
    """Concatenate the tensors ``params[name]`` for ``name`` in ``names`` into one 1-D float32 vector.

    Args:
        params: tensors keyed by name (a model's trainable parameters, a direction).
        names: the names to take, in this order; ``None`` takes every key of
            ``params`` in its order.
        device: where the vector lives; ``"cpu"`` (the default) gives a CPU
            vector, ``None`` keeps it on the parameters' device (concatenating on
            a GPU and then handing the vector to :meth:`SnapshotStore.append`
            lets the store copy it to the host asynchronously).

    Returns:
        a new 1-D float32 tensor (never a view of ``params``) of length
        Σ numel, detached from autograd.

    Raises:
        ValueError: if a name is missing from ``params`` or an entry is not a tensor.

    Example:
        >>> params = {"w": torch.ones(2, 2), "b": torch.zeros(3, dtype=torch.float64)}
        >>> flatten_parameters(params).tolist()
        [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        >>> flatten_parameters(params, ["b"]).dtype
        torch.float32
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"`params` is a {type(params).__name__}; expected a dict of tensors keyed by parameter name.")
    names = list(params) if names is None else list(names)
    if not names:
        raise ValueError("`names` is empty; expected at least one parameter name.")
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(
            f"`names` holds {short_list(missing)}, not found in `params`; "
            f"expected names from {short_list(list(params))}."
        )
    tensors = []
    for n in names:
        t = params[n]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"`params[{n!r}]` is a {type(t).__name__}; expected a tensor.")
        tensors.append(t.detach().reshape(-1))
    devices = {t.device for t in tensors}
    if len(devices) > 1:  # parameters spread over devices: gather them on the target (CPU by default)
        target = torch.device("cpu") if device is None else torch.device(device)
        tensors = [t.to(target) for t in tensors]
    flat = torch.cat([t.to(torch.float32) for t in tensors])  # cat always allocates: never a view of params
    return flat if device is None else flat.to(device)


def unflatten_vector(vec: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector into tensors shaped, typed and placed like ``like``, keyed like ``like``.

    The inverse of :func:`flatten_parameters` with ``names=list(like)``: the
    vector is read in the key order of ``like``. The returned tensors never share
    memory with ``vec``.

    Raises:
        ValueError: if ``vec`` is not a tensor or its length is not Σ numel of ``like``.

    Example:
        >>> like = {"w": torch.zeros(2, 2), "b": torch.zeros(1, dtype=torch.float64)}
        >>> parts = unflatten_vector(torch.arange(5.0), like)
        >>> parts["w"].tolist(), parts["b"].dtype
        ([[0.0, 1.0], [2.0, 3.0]], torch.float64)
    """
    if not isinstance(like, Mapping) or not like:
        raise ValueError(
            f"`like`={type(like).__name__} is not valid; expected a non-empty dict of tensors keyed by parameter name."
        )
    if not isinstance(vec, torch.Tensor):
        raise ValueError(f"`vec` is a {type(vec).__name__}; expected a 1-D tensor.")
    total = sum(int(t.numel()) for t in like.values())
    if vec.numel() != total:
        raise ValueError(
            f"`vec` has {vec.numel()} elements; expected {total}, the total size of the tensors in `like`."
        )
    flat = vec.detach().reshape(-1)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, t in like.items():
        n = int(t.numel())
        out[name] = flat[offset : offset + n].reshape(t.shape).to(device=t.device, dtype=t.dtype, copy=True)
        offset += n
    return out


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


class Plane:
    """Writes θ* + Σ_k c_k d_k into a model's parameters, in place.

    Args:
        params: the parameters to move, keyed by name (see :func:`trainable_parameters`).
        center: θ*, tensors keyed like ``params`` (e.g. the guard's recorded values).
        directions: the directions d_k, each keyed like ``params``; cast once to each
            parameter's device and dtype.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> params = trainable_parameters(model)
        >>> center = {"weight": torch.ones(1, 2)}
        >>> plane = Plane(params, center, [{"weight": torch.tensor([[1.0, 0.0]])}])
        >>> plane.set([0.5])
        >>> model.weight.tolist()
        [[1.5, 1.0]]
        >>> plane.reset(); model.weight.tolist()
        [[1.0, 1.0]]
    """

    def __init__(
        self,
        params: Mapping[str, torch.Tensor],
        center: Mapping[str, torch.Tensor],
        directions: Sequence[Mapping[str, torch.Tensor]],
    ) -> None:
        names = list(params)
        self.names = names
        self.targets = [params[n] for n in names]
        self.center = [center[n] for n in names]
        self.steps = [[d[n].to(device=params[n].device, dtype=params[n].dtype) for n in names] for d in directions]

    @property
    def dims(self) -> int:
        """The number of directions."""
        return len(self.steps)

    def set(self, coefs: Sequence[float]) -> None:
        """Put the point θ* + Σ_k coefs[k]·d_k into the parameters."""
        set_plane_point(self.targets, self.center, self.steps, coefs)

    def reset(self) -> None:
        """Put θ* back."""
        with torch.no_grad():
            torch._foreach_copy_(self.targets, self.center)


def check_finite_weights(params: Mapping[str, torch.Tensor]) -> None:
    """``ValueError`` naming the parameters that hold NaN or Inf (a diverged model), before any work.

    Example:
        >>> check_finite_weights({"w": torch.ones(2)})
    """
    bad = [name for name, p in params.items() if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        raise ValueError(
            f"the model's weights are not finite in {short_list(bad)} (NaN or Inf: training diverged?); "
            "a landscape around them has no meaning. Lower the learning rate or analyse an earlier checkpoint."
        )
