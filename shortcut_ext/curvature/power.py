"""Power iteration for the eigenvalue of largest magnitude (von Mises, 1929).

For Hessians with a symmetric spectrum (the 2-shortcut zero point has ``+lambda`` and ``-lambda``
with equal multiplicity) the iterate does not settle on one eigenvector, but ``||A v||`` still
converges to ``|lambda|max``; such cases are flagged ``sign_ambiguous``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._linop import as_torch_operator, check_count, default_tol, seeded_generator


@dataclass
class PowerResult:
    """Result of :func:`power_iteration`.

    Attributes:
        abs_eigenvalue: ``|lambda|max`` estimate, ``||A v||`` for the final unit iterate ``v``.
        eigenvalue: signed estimate: the Rayleigh quotient, or when ``sign_ambiguous`` the sign whose
            eigen-component dominates the iterate times ``abs_eigenvalue``.
        vector: the final unit iterate ``[P]``.
        residual: ``||A v - eigenvalue v||``.
        iterations: products used; converged: the relative change of ``||A v||`` fell below ``tol``.
        sign_ambiguous: both ``+|lambda|max`` and ``-|lambda|max`` appear in the iterate.
    """

    abs_eigenvalue: float
    eigenvalue: float
    vector: torch.Tensor
    residual: float
    iterations: int
    converged: bool
    sign_ambiguous: bool


def power_iteration(op, max_iter: int = 500, tol: float | None = None, seed: int = 0,
                    v0: torch.Tensor | None = None) -> PowerResult:
    """Top eigenvalue in magnitude of a symmetric operator by power iteration.

    Converges at rate ``|lambda_2 / lambda_1|``; prefer :func:`~shortcut_ext.curvature.lanczos` for
    accuracy, this is the cheap monitor (one product per step, no stored basis).

    Args:
        op: any operator :func:`~shortcut_ext.curvature._linop.as_torch_operator` accepts.
        max_iter: most products.
        tol: stop when ``||A v||`` changes by less than ``tol`` relatively (default ``eps**(2/3)``).
        seed, v0: the start vector (random Gaussian by default).  A ``v0`` with ``A v0 = 0`` says
            nothing about ``|lambda|max``: the iteration then goes on from a random start.

    Raises:
        ValueError: bad ``max_iter`` or ``tol``, a ``v0`` of the wrong shape, zero or not finite.
        FloatingPointError: the operator returned nan or inf.

    >>> A = torch.diag(torch.tensor([1.0, -5.0, 2.0], dtype=torch.float64))
    >>> r = power_iteration(A)
    >>> round(r.eigenvalue, 6), r.sign_ambiguous
    (-5.0, False)
    """
    A = as_torch_operator(op)
    max_iter = check_count("max_iter", max_iter)
    tol = default_tol(A.precision) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    gen = seeded_generator(seed, "power")
    if v0 is None:
        v = A.randn(1, gen)[:, 0]
    else:
        if not isinstance(v0, torch.Tensor) or tuple(v0.shape) != (A.P,):
            raise ValueError(f"v0 must be a tensor of shape [{A.P}], got "
                             f"{list(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__}")
        if not v0.is_floating_point():
            raise TypeError(f"v0 must be a floating-point tensor, got {v0.dtype}")
        v = v0.to(device=A.device, dtype=A.dtype)
        if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
            raise ValueError("v0 must be finite and non-zero")
    v = v / v.norm()
    lam_prev, converged, it = float("nan"), False, 0
    Av = None
    for it in range(1, max_iter + 1):
        Av = A.matmat(v.unsqueeze(1)).squeeze(1)
        lam = float(Av.norm())
        if lam == 0.0:
            if it == 1 and v0 is not None:  # v0 lies in the null space: it tells nothing; go on from a random start
                v = A.randn(1, gen)[:, 0]
                v = v / v.norm()
                continue
            converged = True  # A v = 0 for a random start: A is (numerically) zero
            break
        if abs(lam - lam_prev) <= tol * lam:
            converged = True
            break
        lam_prev = lam
        if it < max_iter:  # the last product's v stays: the eigenvalue, residual and vector returned agree
            v = Av / lam
    lam = float(Av.norm())
    rq = float(v @ Av)
    ambiguous = lam > 0 and abs(rq) < (1.0 - 1e-3) * lam
    if ambiguous:  # v mixes the +lam and -lam eigenvectors: split them
        plus, minus = float((Av + lam * v).norm()), float((Av - lam * v).norm())
        eig = lam if plus >= minus else -lam
    else:
        eig = rq
    res = float((Av - eig * v).norm())
    return PowerResult(lam, eig, v, res, it, converged, ambiguous)
