"""Several grid points per forward pass (``points_per_forward=K``): the weights of K points stacked, ``vmap``-ed.

One call evaluates K points: their weights θ* + Σ_d c_kd·d_d are written into K stacked copies
of each trainable parameter, and the user's loss runs once per batch under
:func:`torch.func.vmap` over :func:`torch.func.functional_call`, so every layer sees a batch of
K weight sets (a Linear becomes one batched matrix product). The model itself is not written:
its parameters keep θ*. It pays where a forward is dominated by per-call overhead (small models,
small batches, GPU kernel launches) and costs K model copies of memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_landscape._validation import check_positive_int


def check_points_per_forward(value: Any, bn: str, compile: Any) -> int:
    """``value`` as an int >= 1; above 1 only with ``bn="eval"`` and without ``compile``.

    Example:
        >>> check_points_per_forward(4, "eval", False)
        4
    """
    k = int(check_positive_int("points_per_forward", value))  # type: ignore[arg-type]
    if k > 1 and bn != "eval":
        raise ValueError(
            f"`points_per_forward`={k} needs bn='eval', got bn={bn!r}: recomputing BatchNorm statistics "
            "is a pass over the data per point; use points_per_forward=1."
        )
    if k > 1 and compile is not False:
        raise ValueError(f"`points_per_forward`={k} evaluates eagerly; expected compile=False, got {compile!r}.")
    return k


def check_low_memory_points(memory: str, points_per_forward: int) -> None:
    """``ValueError`` for ``memory="low"`` (one model copy) with several points per forward pass (K copies).

    Example:
        >>> check_low_memory_points("default", 4)
    """
    if memory == "low" and points_per_forward > 1:
        raise ValueError(
            f"`points_per_forward`={points_per_forward} holds that many model copies; "
            "memory='low' holds one. Use memory='default' or points_per_forward=1."
        )


class StackedPlane:
    """θ* + Σ_d c_kd·d_d for K points at once, as tensors with a leading dimension of K.

    Each point is formed with the same in-place operations as :class:`~lightning_landscape.params.Plane`
    (a copy of θ*, then one ``add_`` per direction), so its weights are bit for bit those the
    one-point path writes into the model.

    Args:
        names: the parameter names, in model order.
        center: θ*, one tensor per name.
        steps: ``steps[d][i]`` is direction d's tensor for ``names[i]``, in the parameter's dtype and device.

    Example:
        >>> plane = StackedPlane(["w"], [torch.ones(2)], [[torch.tensor([1.0, 0.0])]])
        >>> plane.stack([[0.5], [-1.0]])["w"].tolist()
        [[1.5, 1.0], [0.0, 1.0]]
    """

    def __init__(self, names: Sequence[str], center: Sequence[torch.Tensor], steps: Sequence[Sequence[torch.Tensor]]):
        self.names = list(names)
        self.center = list(center)
        self.steps = [list(s) for s in steps]
        self._buffers: list[torch.Tensor] | None = None

    def stack(self, coefs: Sequence[Sequence[float]]) -> dict[str, torch.Tensor]:
        """The K points ``coefs`` (K lists of one coefficient per direction), keyed by name; buffers are reused."""
        k = len(coefs)
        if self._buffers is None or self._buffers[0].shape[0] < k:
            self._buffers = [torch.empty((k, *c.shape), dtype=c.dtype, device=c.device) for c in self.center]
        with torch.no_grad():
            for j, point in enumerate(coefs):
                rows = [b[j] for b in self._buffers]
                torch._foreach_copy_(rows, self.center)
                for step, coef in zip(self.steps, point):
                    torch._foreach_add_(rows, step, alpha=float(coef))
        return {n: b[:k] for n, b in zip(self.names, self._buffers)}


class _PointLoss(nn.Module):
    """``batch_loss(model, batch)`` as a module, so ``functional_call`` can swap the model's weights in.

    The sample count and the targets do not depend on the weights: they are kept aside (once,
    while vmap traces the call) instead of being returned as batched outputs.
    """

    def __init__(self, model: nn.Module, batch_loss: Any) -> None:
        super().__init__()
        self.model = model
        self.batch_loss = batch_loss
        self.aside: tuple[int, Any] | None = None

    def forward(self, batch: Any) -> tuple[torch.Tensor, Any]:
        loss, n, outputs, targets = self.batch_loss(self.model, batch)
        self.aside = (n, targets)
        return loss, outputs


def stacked_batch_loss(
    model: nn.Module, batch_loss: Any, batch: Any, weights: dict[str, torch.Tensor], with_outputs: bool
) -> tuple[torch.Tensor, int, Any, Any]:
    """The K points' batch losses (a tensor of K), the sample count, the K points' outputs and the targets.

    ``weights`` are the stacked trainable parameters (see :class:`StackedPlane`); buffers and
    frozen parameters are the model's own.

    Example:
        >>> from lightning_landscape.data import make_batch_loss
        >>> model = nn.Linear(1, 1, bias=False)
        >>> batch = (torch.ones(2, 1), torch.zeros(2, 1))
        >>> loss, n, _, _ = stacked_batch_loss(model, make_batch_loss(nn.functional.mse_loss), batch,
        ...                                    {"weight": torch.tensor([[[1.0]], [[2.0]]])}, with_outputs=False)
        >>> loss.tolist(), n
        ([1.0, 4.0], 2)
    """
    wrapper = _PointLoss(model, batch_loss)
    named = {f"model.{name}": w for name, w in weights.items()}

    def one_point(w: dict[str, torch.Tensor]) -> Any:
        loss, outputs = torch.func.functional_call(wrapper, w, (batch,))
        return (loss, outputs) if with_outputs else loss

    result = torch.func.vmap(one_point, randomness="error")(named)
    loss, outputs = result if with_outputs else (result, None)
    assert wrapper.aside is not None  # set while vmap ran the loss
    n, targets = wrapper.aside
    if isinstance(targets, torch.Tensor) and torch._C._functorch.is_batchedtensor(targets):
        raise ValueError("`points_per_forward` > 1 needs targets that do not depend on the weights.")
    return loss, n, outputs, targets
