"""Lanczos with its basis on disk: the steps of the in-memory core, two vectors in memory.

The in-memory core keeps every basis vector as float64 in RAM: ``steps × P × 8`` bytes, about
1 GiB on a 5M-weight model (50 model copies in float32). :class:`DiskLanczos` performs the same
steps (one product each, classical Gram–Schmidt twice against the whole basis) with the vectors
in the parameters' dtype on the model's device, the products taken by
:meth:`~lightning_landscape.hessian.HessianOperator.product` (no float64 or numpy copies), and
the basis appended to an unnamed temporary file and streamed back in chunks for each
orthogonalization. Memory: the current vector and its product (two vectors) plus one chunk
buffer; the operating system's page cache holds the file, not the process.

``basis="auto"`` (:func:`resolve_basis`) keeps the float64 basis in memory while its default
capacity fits in :data:`MEMORY_BASIS_BYTES` and puts it on disk beyond.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from lightning_landscape._validation import check_choice

#: Where the Lanczos basis lives: chosen by size, in RAM (float64), or in a temporary file.
BASIS_CHOICES = ("auto", "memory", "disk")
#: ``basis="auto"`` keeps the in-memory float64 basis while its default capacity stays within
#: this many bytes (200 vectors of 168k weights); larger models put it on disk.
MEMORY_BASIS_BYTES = 2**28
#: Elements per chunk read back from the basis file: the one buffer beside the two vectors.
CHUNK = 1 << 20
#: Gram–Schmidt passes against the whole basis per step, as in the in-memory core ("twice is enough").
PASSES = 2


def resolve_basis(basis: Any, num_params: int, capacity: int) -> str:
    """``"memory"`` or ``"disk"`` for a ``basis`` argument; ``"auto"`` picks by the in-memory basis's bytes.

    ``capacity`` is the number of vectors the basis may hold; ``"auto"`` gives ``"memory"`` while
    ``capacity × num_params × 8`` bytes fit in :data:`MEMORY_BASIS_BYTES` (256 MiB).

    Example:
        >>> resolve_basis("auto", 1_986, 200), resolve_basis("auto", 5_000_000, 26), resolve_basis("disk", 10, 10)
        ('memory', 'disk', 'disk')
    """
    check_choice("basis", basis, BASIS_CHOICES)
    if basis != "auto":
        return str(basis)
    return "memory" if capacity * num_params * np.dtype(np.float64).itemsize <= MEMORY_BASIS_BYTES else "disk"


class DiskLanczos:
    """The Lanczos core of :class:`~lightning_landscape.hessian.lanczos.Lanczos` with the basis in a temporary file.

    Same interface and the same steps: after :meth:`start`, each :meth:`step` applies the operator
    once to the newest vector, stores α_j, orthogonalizes the residual against the whole basis
    (classical Gram–Schmidt twice, streamed from the file in chunks of :data:`CHUNK` numbers) and
    returns β_j. The three-term recurrence's β_{j-1}·q_{j-1} is not subtracted separately: the
    first Gram–Schmidt pass removes it with every other basis component.

    Vectors are torch tensors in the operator's ``vector_dtype`` on its device when it has
    :meth:`~lightning_landscape.hessian.HessianOperator.product`; any other operator (a matrix,
    a ``LinearOperator``) is applied through ``matvec`` in float64 on the CPU. The file is created
    unnamed (:func:`tempfile.TemporaryFile`, in ``directory`` or the system's temporary folder)
    and goes away with :meth:`release` or the object. No fallback to ARPACK: it would hold its own
    float64 basis in memory.

    Args:
        op: a symmetric operator.
        capacity: the most basis vectors written (``capacity × P × itemsize`` bytes of file).
        directory: where the temporary file is created (None: the system's temporary folder).

    Attributes:
        size, piece, capacity: as in :class:`~lightning_landscape.hessian.lanczos.Lanczos`.
        peak_resident: the parameter-sized vector buffers this object allocated: two for the
            whole run (the current vector and its product; a restart vector takes the free one).

    Example:
        >>> lanczos = DiskLanczos(np.diag([1.0, 2.0, 3.0]), capacity=3)
        >>> lanczos.start(np.ones(3))
        >>> beta = lanczos.step(); lanczos.extend(beta); beta = lanczos.step()
        >>> alphas, betas = lanczos.tridiagonal()
        >>> alphas.round(4).tolist(), lanczos.size, lanczos.disk_bytes
        ([2.0, 2.0], 2, 48)
    """

    def __init__(self, op: Any, capacity: int, directory: str | None = None) -> None:
        self._product = getattr(op, "product", None)
        if self._product is not None:
            self.dtype, self.device = op.vector_dtype, torch.device(op.device)
        else:
            op = aslinearoperator(op)
            self.dtype, self.device = torch.float64, torch.device("cpu")
        self.op: LinearOperator = op
        self.n = int(op.shape[0])
        self.capacity = capacity
        self.alphas = np.empty(capacity)
        self.betas = np.empty(capacity)
        self.size = 0
        self.piece = 0
        self.peak_resident = 0
        self._file: Any = tempfile.TemporaryFile(dir=directory, buffering=0)
        self._itemsize = torch.empty(0, dtype=self.dtype).element_size()
        self._buffer = torch.empty(min(CHUNK, self.n), dtype=self.dtype)  # CPU staging of one chunk
        self._slots: list[torch.Tensor] = []  # the two vector buffers, allocated on first use
        self._next: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None

    @property
    def disk_bytes(self) -> int:
        """Bytes of basis written to the file so far (``size × P × itemsize``)."""
        return self.size * self.n * self._itemsize

    def random_vector(self, rng: np.random.Generator) -> torch.Tensor:
        """``rng.standard_normal(P)`` in the vectors' dtype, drawn in chunks: no float64 vector of P numbers.

        The numbers are those of one ``rng.standard_normal(P)`` call (numpy draws them in order),
        so a run starts from the same vector as the in-memory core's. It is written into the free
        one of the two vector buffers.
        """
        out = self._free_slot()
        for a in range(0, self.n, CHUNK):
            part = rng.standard_normal(min(CHUNK, self.n - a))
            out[a : a + part.size] = torch.from_numpy(part)
        return out

    def start(self, v0: np.ndarray | torch.Tensor) -> None:
        """Begin from ``v0`` (normalized here, in the vectors' dtype)."""
        self._next = self._into_slot(v0)
        self._next.div_(torch.linalg.vector_norm(self._next))

    def step(self) -> float:
        """One product: append the next basis vector and α_j; return the norm β_j of the new residual."""
        j, v = self.size, self._next
        assert v is not None, "start() first"
        self._write(j, v)
        self.size = j + 1
        w = self._apply(v, self._free_slot())
        self.alphas[j] = float(torch.dot(v, w))
        w.sub_(v, alpha=self.alphas[j])
        self._next = None  # v is in the file now: its buffer is free for the next product
        self._residual = w
        self._orthogonalize(w)
        return float(torch.linalg.vector_norm(w))

    def extend(self, beta: float) -> None:
        """Go on with the residual of the last step, its norm ``beta`` coupling it into T."""
        self.betas[self.size - 1] = beta
        assert self._residual is not None
        self._next, self._residual = self._residual.div_(beta), None

    def restart(self, v: np.ndarray | torch.Tensor) -> None:
        """Go on from ``v`` made orthogonal to the basis: T splits into blocks, a new piece begins."""
        t = self._into_slot(v)
        self._residual = None
        self._orthogonalize(t)
        self.betas[self.size - 1] = 0.0
        self.piece = self.size
        self._next = t.div_(torch.linalg.vector_norm(t))

    def tridiagonal(self) -> tuple[np.ndarray, np.ndarray]:
        """T so far: its diagonal (``size`` entries) and off-diagonal (``size - 1``), as views."""
        return self.alphas[: self.size], self.betas[: self.size - 1]

    def block_eigenvalues(self, start: int, stop: int) -> np.ndarray:
        """The eigenvalues, ascending, of the diagonal block ``start:stop`` of T (empty if none)."""
        if stop <= start:
            return np.empty(0)
        return eigh_tridiagonal(self.alphas[start:stop], self.betas[start : stop - 1], eigvals_only=True)

    def combine(self, coefficients: np.ndarray) -> np.ndarray:
        """Σ_i c_i q_i in float64 (a column per column of ``coefficients``), streamed from the file."""
        coefficients = np.asarray(coefficients, dtype=np.float64)
        out = np.zeros((self.n, *coefficients.shape[1:]))
        for i in range(self.size):
            for a, chunk in self._chunks(i):
                block = chunk.cpu().numpy().astype(np.float64)
                out[a : a + block.size] += block.reshape(-1, *([1] * (coefficients.ndim - 1))) * coefficients[i]
        return out

    def release(self) -> None:
        """Close (and so delete) the basis file (T stays)."""
        self._file.close()

    # --- internals -----------------------------------------------------------------------------

    def _free_slot(self) -> torch.Tensor:
        """A vector buffer (P numbers, a view of P + 2) that holds neither the next vector nor the residual.

        Two buffers serve the whole run, reused step after step: a fresh vector per step left the
        allocator holding freed ones (7.9 model copies at the peak on a 5M-weight MLP, not 5).
        """
        busy = {t.data_ptr() for t in (self._next, self._residual) if t is not None}
        for slot in self._slots:
            if slot.data_ptr() not in busy:
                return slot[: self.n]
        # P + 2: HessianOperator.product sums the loss and the sample count behind the product.
        with torch.inference_mode(False):  # a normal tensor: the product updates it outside inference mode
            self._slots.append(torch.empty(self.n + 2, dtype=self.dtype, device=self.device))
        self.peak_resident = len(self._slots)
        return self._slots[-1][: self.n]

    def _into_slot(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``x`` in a vector buffer: itself when it already is one (from :meth:`random_vector`), else copied."""
        if isinstance(x, torch.Tensor) and any(x.data_ptr() == slot.data_ptr() for slot in self._slots):
            return x
        if not isinstance(x, torch.Tensor):
            x = torch.from_numpy(np.asarray(x, dtype=np.float64).reshape(-1))
        return self._free_slot().copy_(x.reshape(-1))

    def _apply(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """H·v written into ``out`` (a free vector buffer)."""
        if self._product is not None:
            return self._product(v, out=out.as_strided((self.n + 2,), (1,)))
        return out.copy_(torch.from_numpy(np.asarray(self.op.matvec(v.numpy()), dtype=np.float64).reshape(-1)))

    def _chunks(self, i: int):
        """(start, chunk) pairs of basis vector ``i``, read into the one staging buffer (on the vectors' device)."""
        view = self._buffer.numpy()
        for a in range(0, self.n, CHUNK):
            size = min(CHUNK, self.n - a)
            _io(self._file, memoryview(view[:size]).cast("B"), (i * self.n + a) * self._itemsize, write=False)
            yield a, self._buffer[:size].to(self.device)

    def _write(self, j: int, v: torch.Tensor) -> None:
        for a in range(0, self.n, CHUNK):
            part = v[a : a + CHUNK].cpu()  # no copy on the CPU
            _io(self._file, memoryview(part.numpy()).cast("B"), (j * self.n + a) * self._itemsize, write=True)

    def _dot(self, i: int, w: torch.Tensor) -> float:
        """q_iᵀw, q_i streamed from the file."""
        return sum(float(torch.dot(c, w[a : a + c.numel()])) for a, c in self._chunks(i))

    def _orthogonalize(self, w: torch.Tensor) -> None:
        """w -= Q(Qᵀw), twice, against the ``size`` vectors in the file (classical Gram–Schmidt)."""
        for _ in range(PASSES):
            # Each coefficient summed over chunks in float64: only the chunks' own dots are in w's dtype.
            coefficients = [self._dot(i, w) for i in range(self.size)]
            for i, coefficient in enumerate(coefficients):
                for a, c in self._chunks(i):
                    w[a : a + c.numel()].sub_(c, alpha=coefficient)


def _io(f: Any, view: memoryview, offset: int, write: bool) -> None:
    """Write (or read into) all of ``view`` at byte ``offset`` of the unbuffered file ``f``."""
    done = 0
    f.seek(offset)
    while done < view.nbytes:
        got = f.write(view[done:]) if write else f.readinto(view[done:])
        if not got:
            what = "write to" if write else "read from"
            raise OSError(f"could not {what} the Lanczos basis file ({done} of {view.nbytes} bytes at {offset}).")
        done += got
