"""One adapter so that every spectral tool accepts any symmetric linear operator.

Accepted: a torch-native operator (anything with ``matmat(V[P, k]) -> [P, k]`` on tensors, a
``shape`` ``(P, P)`` and a ``torch.dtype`` ``dtype``, such as :class:`HessianOperator`), a
``scipy.sparse.linalg.LinearOperator``, a dense ``torch.Tensor`` or ``numpy.ndarray`` ``[P, P]``, or a
scipy sparse matrix.  The spectral tools see only :class:`TorchOperator`: batched products on
``[P, k]`` tensors, with a product counter.
"""
from __future__ import annotations

import math

import numpy as np
import torch

_NP_TO_TORCH = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


class TorchOperator:
    """A symmetric ``P x P`` operator seen through batched products on tensors.

    Attributes:
        shape: ``(P, P)``.
        dtype: working ``torch.dtype`` of vectors (float32 or float64).
        device: device of vectors.
        num_products: operator-vector products computed so far (``k`` per ``matmat`` of ``k`` columns).
    """

    def __init__(self, op, dtype: torch.dtype | None = None, device=None):
        self.base = op
        self.num_products = 0
        # whether each product is new memory; a user's operator may return the same buffer at every call (as
        # a CUDA-graph replay does), and the solvers keep earlier products: such products are copied
        self._fresh = isinstance(op, (TorchOperator, torch.Tensor)) or bool(getattr(op, "_fresh_products", False))
        if isinstance(op, TorchOperator):  # its own matmat: it casts to its base operator's dtype and device
            self._mm, P, dt, dev = op.matmat, op.shape[0], op.dtype, op.device
        elif isinstance(op, torch.Tensor):
            _check_square("operator", tuple(op.shape))
            if op.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"operator tensor must be float32 or float64, got {op.dtype}")
            self._mm, P, dt, dev = (lambda V, A=op: A @ V), op.shape[0], op.dtype, op.device
        elif _is_torch_native(op):
            _check_square("operator.shape", tuple(op.shape))
            self._mm, P, dt = op.matmat, int(op.shape[0]), op.dtype
            dev = getattr(op, "device", torch.device("cpu"))
        else:
            from scipy.sparse import issparse
            from scipy.sparse.linalg import LinearOperator, aslinearoperator

            if isinstance(op, np.ndarray) or issparse(op):
                op = aslinearoperator(op)
            if not isinstance(op, LinearOperator):
                raise TypeError(
                    "operator must be a HessianOperator-like object (matmat on torch tensors, shape, torch dtype), "
                    f"a scipy LinearOperator, a dense torch.Tensor or numpy array, got {type(op).__name__}"
                )
            _check_square("operator.shape", tuple(op.shape))
            P = int(op.shape[0])
            dt = _NP_TO_TORCH.get(np.dtype(op.dtype), torch.float64)
            dev = torch.device("cpu")

            def _mm(V, op=op):
                return op.matmat(V.detach().cpu().numpy())

            self._mm = _mm
        # the base operator takes vectors in its own dtype and device (a float32 HessianOperator refuses
        # float64 directions); the working dtype / device given here apply to what this operator returns
        self._base_dtype, self._base_device = dt, torch.device(dev)
        self.shape = (P, P)
        self.dtype = dt if dtype is None else dtype
        self.device = torch.device(dev) if device is None else torch.device(device)
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")

    @property
    def P(self) -> int:
        return self.shape[0]

    @property
    def precision(self) -> torch.dtype:
        """The dtype the products are accurate to: the lower of the base operator's and the working dtype (a
        float32 operator seen in float64 is still float32-accurate: zero tolerances follow this)."""
        base = self.base.precision if isinstance(self.base, TorchOperator) else self._base_dtype
        return torch.float32 if torch.float32 in (base, self.dtype) else torch.float64

    def matmat(self, V: torch.Tensor) -> torch.Tensor:  # [P, k] -> [P, k]
        if V.dim() != 2 or V.shape[0] != self.P or V.shape[1] < 1:
            raise ValueError(f"V must have shape [{self.P}, k] with k >= 1, got {list(V.shape)}")
        out = self._mm(V.to(dtype=self._base_dtype, device=self._base_device))
        self.num_products += V.shape[1]
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the operator's matmat must return a tensor (or numpy array) of shape [{self.P}, "
                            f"{V.shape[1]}], got {type(out).__name__}")
        if out.dim() == 1 and V.shape[1] == 1 and out.shape[0] == self.P:
            out = out.unsqueeze(1)  # scipy's matmat of one column may return [P]
        if tuple(out.shape) != (self.P, V.shape[1]):
            raise ValueError(f"the operator's matmat must return shape [P, k] = [{self.P}, {V.shape[1]}] for "
                             f"V of shape {list(V.shape)}, got {list(out.shape)}")
        if not out.is_floating_point():
            raise TypeError(f"the operator's matmat must return floating-point values, got {out.dtype}")
        src = out
        out = out.to(dtype=self.dtype, device=self.device)
        if not self._fresh and out.data_ptr() == src.data_ptr():  # the operator's own memory: it may reuse it
            out = out.clone()
        # the extremes are finite only where every value is (nan propagates through them): one pass over the
        # values in memory order (a [P, k] product is often the transpose of a contiguous [k, P]: reduced as it
        # lies, not copied) and no [P, k] temporaries; isfinite(out).all() took 14x longer at P = 5M, k = 2
        flat = out.T if out.dim() == 2 and out.T.is_contiguous() else out
        if not bool(torch.isfinite(torch.stack(torch.aminmax(flat))).all()):
            raise FloatingPointError(
                f"the operator returned non-finite values (nan or inf) for {V.shape[1]} direction(s): check the "
                "model's weights and the data (a spectrum of a non-finite operator is meaningless)")
        return out

    def randn(self, k: int, generator: torch.Generator, distribution: str = "gaussian") -> torch.Tensor:  # [P, k]
        """Seeded random vectors, drawn on the CPU (reproducible across devices) in float64."""
        if distribution == "gaussian":
            Z = torch.randn(self.P, k, generator=generator, dtype=torch.float64, device="cpu")
        elif distribution == "rademacher":
            Z = torch.randint(0, 2, (self.P, k), generator=generator, dtype=torch.int64, device="cpu").to(torch.float64) * 2 - 1
        else:
            raise ValueError(f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}")
        return Z.to(dtype=self.dtype, device=self.device)

    def probes(self, k: int, generator: torch.Generator, distribution: str = "gaussian") -> torch.Tensor:  # [P, k]
        """``k`` random probe vectors drawn one after the other: probe ``i`` of a seed is the same whether
        the probes are drawn at once or in chunks (Hutchinson's batches, SLQ's groups)."""
        return torch.cat([self.randn(1, generator, distribution) for _ in range(k)], dim=1)


def _is_torch_native(op) -> bool:
    return hasattr(op, "matmat") and hasattr(op, "shape") and isinstance(getattr(op, "dtype", None), torch.dtype)


def _check_square(name: str, shape: tuple) -> None:
    if len(shape) != 2 or shape[0] != shape[1] or shape[0] < 1:
        raise ValueError(f"{name} must be a square (P, P) operator with P >= 1, got {shape}")


def as_torch_operator(op, dtype: torch.dtype | None = None, device=None) -> TorchOperator:
    """Wrap ``op`` (see module docstring) as a :class:`TorchOperator`; ``dtype`` overrides the working dtype."""
    if isinstance(op, TorchOperator) and dtype is None and device is None:
        return op
    return TorchOperator(op, dtype=dtype, device=device)


_STREAMS = {"lanczos": 1, "power": 2, "probes": 3, "hutch++": 5, "landscape": 6}  # probes: SLQ and Hutchinson, alike


def seeded_generator(seed, stream: str) -> torch.Generator:
    """The random stream of one algorithm for ``seed``.  Its numbers are not those of
    ``torch.Generator().manual_seed(seed)``, which draws a model's initial weights: with equal seeds a
    Lanczos start vector or a probe used to be the initial weight vector itself, not a direction
    independent of the operator.  Nor are they another algorithm's for the same seed, except that SLQ
    and Hutchinson share ``"probes"``: with the same seed they draw the same probes."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + _STREAMS[stream] * 0xBF58476D1CE4E5B9) % 2**63
    return torch.Generator().manual_seed(mixed)


def check_count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` (Python or numpy integer, not bool) ``>= minimum``, else a ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def zero_tol_rel(dtype: torch.dtype) -> float:
    """Relative size below which an estimated eigenvalue counts as zero: ``sqrt(eps)`` of the dtype in
    which the operator's products were computed (1.5e-8 in float64, 3.5e-4 in float32)."""
    return math.sqrt(float(torch.finfo(dtype).eps))


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual tolerance reachable in ``dtype`` (about ``eps**(2/3)``: 4e-11 / 2e-5)."""
    return float(torch.finfo(dtype).eps) ** (2.0 / 3.0)


# Reorthogonalisation reads the whole Krylov basis twice per step, and at P = 512,000 that is most of a
# step's time besides the product.  The BLAS runs these matrix-vector shapes on one thread (MKL's gemv:
# 31-32 GB/s on a 2-core machine that reads 48-50 GB/s with both cores), so a basis of at least this many
# numbers is cut into as many column slices as torch has threads, and the two products are batched over
# the slices (``bmm`` runs its batch in parallel): 1.5x (dots) and 1.8x (update) at P = 512,000.
SPLIT_MIN_NUMEL = 1 << 20


def reorth_split(Vb: torch.Tensor) -> int:
    """Column slices :func:`project_out` cuts the basis ``Vb`` into by default: torch's thread count for a
    CPU basis of at least ``SPLIT_MIN_NUMEL`` numbers, else 1."""
    cpu = Vb.device.type == "cpu"
    return torch.get_num_threads() if cpu and Vb.numel() >= SPLIT_MIN_NUMEL else 1


def project_out(X: torch.Tensor, Vb: torch.Tensor, split: int | None = None) -> torch.Tensor:
    """One classical Gram-Schmidt pass, in place: ``C = X Vb^T``, then ``X -= C Vb``; returns ``C``.

    Args:
        X: ``[c, P]`` rows to orthogonalise (unit stride along ``P``; a view of a larger tensor is fine).
        Vb: ``[m, P]`` rows to project out (unit stride along ``P``).
        split: column slices to batch the products over.  Default: :func:`reorth_split` (1 on a GPU or
            for a small basis: one matrix product each).
            The result is the same up to the order of the sums over ``P``.
    """
    c, P = X.shape
    m = Vb.shape[0]
    if split is None:
        split = reorth_split(Vb)
    q = P // max(1, split)
    if split <= 1 or q == 0 or m == 0:
        C = X @ Vb.T
        X.addmm_(C, Vb, alpha=-1.0)
        return C
    main = q * split
    Xs = X[:, :main].unflatten(1, (split, q)).transpose(0, 1)  # [split, c, q] views, no copies
    Vs = Vb[:, :main].unflatten(1, (split, q)).transpose(0, 1)  # [split, m, q]
    C = torch.bmm(Xs, Vs.transpose(1, 2)).sum(0)  # [c, m]
    if main < P:
        C += X[:, main:] @ Vb[:, main:].T
    Xs.baddbmm_(C.expand(split, c, m), Vs, alpha=-1.0)
    if main < P:
        X[:, main:].addmm_(C, Vb[:, main:], alpha=-1.0)
    return C
