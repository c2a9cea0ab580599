"""The Hessian of the sample-weighted mean loss as a matrix-free ``scipy`` linear operator.

H is only ever applied to vectors (Hessian-vector products, HVPs), one full pass over the
cached batches per product, by double backward through the user's own loss step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from lightning_landscape._validation import check_callable, check_positive_int
from lightning_landscape.data import BatchLoss, Reduce, cache_batches, model_device
from lightning_landscape.params import trainable_parameters

#: What a ``batch_loss`` must look like, for the error messages.
BATCH_LOSS_SIGNATURE = "batch_loss(model, batch) -> (loss, n, outputs, targets)"
#: Elements per finiteness test in :meth:`HessianOperator.product` (its mask is this many bytes).
FINITE_CHUNK = 1 << 20


def _clone_inference_tensors(batch: Any) -> Any:
    """Copy inference tensors into normal ones: autograd cannot save an inference tensor for backward.

    Any other tensor is kept as it is (the same object, no copy).
    """
    if isinstance(batch, torch.Tensor):
        return batch.clone() if batch.is_inference() else batch
    if isinstance(batch, dict):
        return type(batch)({k: _clone_inference_tensors(v) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_clone_inference_tensors(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_clone_inference_tensors(v) for v in batch)
    return batch


class _StartFrom(torch.autograd.Function):
    """A zero scalar whose gradient with respect to each ``g_i`` is ``v_i``: ``apply(k, g_1..g_k, v_1..v_k)``.

    Backpropagating from it is ``autograd.grad(g, params, grad_outputs=v)`` (the second pass of an
    HVP), except that it does not hold the gradients ``g``: they can be freed before that pass
    runs. Valid only for a backward started with gradient 1 (``autograd.grad`` of this scalar),
    which is how it is used; ``v_i`` is handed on as it is, not multiplied.
    """

    @staticmethod
    def forward(ctx: Any, count: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.vectors = tensors[count:]
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        vectors = ctx.vectors
        return (None, *vectors, *([None] * len(vectors)))


class HessianOperator(LinearOperator):
    """The Hessian of the sample-weighted mean loss w.r.t. the trainable parameters, as a linear operator.

    With batches b of n_b samples and batch-mean losses L_b,
    ``H = Σ_b n_b ∇²L_b / Σ_b n_b``: the Hessian of the mean over all samples,
    also when the last batch is short. The operator acts on float64 numpy
    vectors of length P (the number of trainable weights, concatenated in model
    order, as in :func:`~lightning_landscape.params.trainable_parameters`)
    so that scipy's solvers can use it; the products themselves are computed in
    each parameter's dtype on the model's device.

    The operator reads the parameters' *current* values at every product, so
    moving the weights in place (e.g. with :class:`~lightning_landscape.params.Plane`)
    moves the operator too. It neither changes the weights nor touches ``.grad``; it
    does not set the model's mode either: put the model in eval mode first (BatchNorm in
    train mode would make the loss depend on the batch composition and update
    the running statistics at every product).

    Products work inside ``torch.inference_mode()`` and ``torch.no_grad()``.

    Args:
        model: the network.
        data: an iterable of batches; cached on the model's device once. Tensors already
            there are used as they are, not copied (e.g. a surface evaluator's cached
            batches), except inference tensors, which autograd cannot use: those are cloned.
        batch_loss: ``batch_loss(model, batch) -> (mean_loss, n, outputs, targets)``,
            see :func:`~lightning_landscape.data.make_batch_loss`.
        num_batches: use at most this many batches of ``data``.
        reduce: sums the float64 vector ``[Σ n_b H_b v, Σ n_b L_b, Σ n_b]`` across
            processes before it is normalized; ``None`` (identity) on one process.
        agree: returns rank zero's value of its argument on every rank (a broadcast); the
            eigensolvers pass each stopping decision through it, so floating-point noise can
            never make one rank stop while another goes on. ``None`` on one process.

    Attributes:
        num_hvp: how many Hessian-vector products (full passes over the data) were made.
        num_samples: the number of samples seen by the last product or loss.

    Example:
        >>> from lightning_landscape.data import make_batch_loss
        >>> model = nn.Linear(3, 1, bias=False)
        >>> x = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3]])
        >>> op = HessianOperator(model.eval(), [(x, torch.zeros(3, 1))], make_batch_loss(nn.functional.mse_loss))
        >>> op @ np.ones(3)  # H = 2 XᵀX / 3
        array([0.66666669, 2.66666675, 6.        ])
        >>> op.num_hvp
        1
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable[Any],
        batch_loss: BatchLoss,
        *,
        num_batches: int | None = None,
        reduce: Reduce | None = None,
        agree: Callable[[Any], Any] | None = None,
    ) -> None:
        check_positive_int("num_batches", num_batches, allow_none=True)
        check_callable("batch_loss", batch_loss, BATCH_LOSS_SIGNATURE, allow_none=False)
        self.model = model
        self.params = list(trainable_parameters(model).values())
        #: Machine epsilon of the products' dtype: no eigenvalue is resolved more finely than ~10·eps·‖H‖.
        self.eps = max((float(torch.finfo(p.dtype).eps) for p in self.params), default=float(np.finfo(np.float64).eps))
        self.device = model_device(model)
        with torch.inference_mode(False):
            self.batches = [_clone_inference_tensors(b) for b in cache_batches(data, self.device, num_batches)]
        self.batch_loss = batch_loss
        self.reduce = reduce
        self.agree = agree
        self.num_hvp = 0
        self.num_samples: int | None = None
        self._sizes = [p.numel() for p in self.params]
        size = sum(self._sizes)
        super().__init__(dtype=np.dtype(np.float64), shape=(size, size))

    def describe(self) -> dict[str, Any]:
        """The operator's facts for a result's metadata: sizes, samples, batches, dtype.

        Example:
            >>> from lightning_landscape.data import make_batch_loss
            >>> data = [(torch.ones(4, 2), torch.ones(4, 1))]
            >>> op = HessianOperator(nn.Linear(2, 1), data, make_batch_loss(nn.functional.mse_loss))
            >>> op.describe()
            {'num_params': 3, 'num_samples': None, 'num_batches': 1, 'dtype': 'torch.float32'}
        """
        return {
            "num_params": self.shape[0],
            "num_samples": self.num_samples,
            "num_batches": len(self.batches),
            "dtype": str(self.params[0].dtype),
        }

    def _reduce(self, sums: torch.Tensor) -> torch.Tensor:
        return sums if self.reduce is None else self.reduce(sums)

    def _count(self, count: float, what: str) -> float:
        """Record the (reduced) sample count; raise if there is none."""
        self.num_samples = int(count)
        if count <= 0:
            raise ValueError(f"the batches hold no samples; expected at least one sample to take the {what} of.")
        return count

    def loss(self) -> float:
        """The sample-weighted mean loss at the current weights (one forward pass per batch, no autograd)."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for batch in self.batches:
                loss, n, _, _ = self.batch_loss(self.model, batch)
                sums[0] += loss.detach().to(torch.float64) * n
                sums[1] += n
        total, count = self._reduce(sums).tolist()
        return total / self._count(count, "loss")

    def _split(self, x: np.ndarray) -> list[torch.Tensor]:
        flat = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        chunks = torch.split(flat, self._sizes)
        return [c.view(p.shape).to(device=p.device, dtype=p.dtype) for c, p in zip(chunks, self.params)]

    def _batch_hvp(self, batch: Any, vector: list[torch.Tensor]) -> tuple[torch.Tensor, int, list[torch.Tensor | None]]:
        # Double backward (reverse-over-reverse), because it was the cheaper one on CPU (torch 2.13,
        # 2 threads, 1024 samples in batches of 256): one HVP cost 2.6 gradients on a 6.6k-weight
        # MLP and 3.3 on a 2k-weight CNN with BatchNorm, against 7.5 to 23 and 5.7 gradients for
        # torch.func forward-over-reverse (jvp of grad through functional_call); benchmarks/hessian.py
        # measures 3.1 on the digits CNN. It also runs the user's step as ordinary eager autograd,
        # with no torch.func transform around it.
        loss, n, _, _ = self.batch_loss(self.model, batch)
        if not loss.requires_grad:  # a loss that does not depend on the weights
            return loss.detach(), n, [None] * len(self.params)
        grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        # A gradient without a graph is constant in the weights: its block of H is zero.
        linked = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        hv: list[torch.Tensor | None] = [None] * len(self.params)
        if linked:
            seed = _StartFrom.apply(len(linked), *[grads[i] for i in linked], *[vector[i] for i in linked])
            del grads  # the second pass needs their graph, not their values: one model copy less at its peak
            hv = list(torch.autograd.grad(seed, self.params, allow_unused=True))
        return loss.detach(), n, hv

    def _sums(self, vector: list[torch.Tensor]) -> torch.Tensor:
        """Un-normalized float64 sums [Σ n_b H_b v, Σ n_b L_b, Σ n_b] over the batches, before ``reduce``.

        Only these add up across processes, so a ``reduce`` can sum them before the one division at the end.
        """
        size = self.shape[0]
        with torch.inference_mode(False), torch.enable_grad():
            # Created here: an inference tensor made under an outer inference_mode could not be updated.
            sums = torch.zeros(size + 2, dtype=torch.float64, device=self.device)
            for batch in self.batches:
                loss, n, hv = self._batch_hvp(batch, vector)
                offset = 0
                for h, numel in zip(hv, self._sizes):
                    if h is not None:
                        sums[offset : offset + numel] += h.detach().reshape(-1).to(torch.float64) * n
                    offset += numel
                sums[size] += loss.to(torch.float64) * n
                sums[size + 1] += n
        return sums

    @property
    def vector_dtype(self) -> torch.dtype:
        """The dtype of :meth:`product`'s vectors: the parameters' (promoted, at least float32).

        Example:
            >>> from lightning_landscape.data import make_batch_loss
            >>> data = [(torch.ones(4, 2), torch.ones(4, 1))]
            >>> HessianOperator(nn.Linear(2, 1), data, make_batch_loss(nn.functional.mse_loss)).vector_dtype
            torch.float32
        """
        dtype = torch.float32
        for p in self.params:
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def product(self, vector: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """H·``vector`` for a flat tensor of the P weights in torch, with no float64 or numpy copy.

        ``vector`` (``vector_dtype``, on the model's device) is split into views shaped like the
        parameters, and the batches' products are summed into one new tensor in that dtype,
        allocated after the first backward pass. The gradient is freed before the second pass
        (only its graph is needed): at its peak the product holds the vector, the sum, and the
        second pass's blocks and temporaries (1.9 parameter-sized tensors beyond the vector and
        the sum on a 5M-weight MLP, 2.9 while the gradient was kept), where :meth:`matvec` also
        holds float64 copies of both vectors and of the sum. The bounded-memory
        Lanczos (:class:`~lightning_landscape.hessian.basis.DiskLanczos`) uses it; ``reduce`` receives
        the un-normalized sums with the loss and the sample count
        appended, in ``vector_dtype``.

        Example:
            >>> from lightning_landscape.data import make_batch_loss
            >>> model = nn.Linear(3, 1, bias=False)
            >>> x = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 3]])
            >>> op = HessianOperator(model.eval(), [(x, torch.zeros(3, 1))], make_batch_loss(nn.functional.mse_loss))
            >>> op.product(torch.ones(3))  # H = 2 XᵀX / 3
            tensor([0.6667, 2.6667, 6.0000])
        """
        size = self.shape[0]
        views = [c.view(p.shape).to(dtype=p.dtype) for c, p in zip(torch.split(vector, self._sizes), self.params)]
        sums: torch.Tensor | None = None
        with torch.inference_mode(False), torch.enable_grad():
            for batch in self.batches:
                loss, n, hv = self._batch_hvp(batch, views)
                if sums is None:  # only now: during the first backward a new one would be one more vector held
                    sums = torch.zeros(size + 2, dtype=vector.dtype, device=self.device) if out is None else out.zero_()
                offset = 0
                for i, numel in enumerate(self._sizes):
                    if hv[i] is not None:
                        sums[offset : offset + numel].add_(hv[i].reshape(-1).to(sums.dtype), alpha=float(n))
                        hv[i] = None  # free each block as soon as it is summed
                    offset += numel
                sums[size] += loss.to(sums.dtype) * n
                sums[size + 1] += n
        if sums is None:  # no batches: the count check below says so
            sums = torch.zeros(size + 2, dtype=vector.dtype, device=self.device)
        if out is not None and sums is not out:  # a DDP reduce returns a new tensor
            sums = out.copy_(sums)
        sums = self._reduce(sums)
        self.num_hvp += 1
        count = self._count(float(sums[size + 1]), "Hessian")
        loss_value = float(sums[size]) / count
        if not math.isfinite(loss_value):
            raise ValueError(f"the loss at the model's weights is {loss_value}; the Hessian needs a finite loss.")
        out = sums[:size].div_(count)
        for chunk in torch.split(out, FINITE_CHUNK):  # chunked: a whole-vector isfinite mask is a quarter copy
            if not bool(torch.isfinite(chunk).all()):
                raise ValueError(
                    "a Hessian-vector product is not finite although the loss is; the Hessian is not defined here."
                )
        return out

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        size = self.shape[0]
        sums = self._reduce(self._sums(self._split(x)))
        self.num_hvp += 1
        count = self._count(float(sums[size + 1]), "Hessian")
        loss_value = float(sums[size]) / count
        if not math.isfinite(loss_value):
            raise ValueError(f"the loss at the model's weights is {loss_value}; the Hessian needs a finite loss.")
        out = (sums[:size] / count).cpu().numpy()
        if not np.all(np.isfinite(out)):
            raise ValueError(
                "a Hessian-vector product is not finite although the loss is; the Hessian is not defined here."
            )
        return out

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _adjoint(self) -> HessianOperator:
        return self  # H is symmetric
