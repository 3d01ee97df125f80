"""Randomised trace estimators for a symmetric operator, from products only.

- Hutchinson's estimator: M. F. Hutchinson, "A stochastic estimator of the trace of the influence
  matrix for Laplacian smoothing splines", Comm. Statist. Simulation Comput. 18(3), 1989:
  ``tr(A) ~= (1/s) sum_i z_i^T A z_i`` with Rademacher ``z_i``; variance ``2 (||A||_F^2 - sum A_ii^2) / s``.
- Hutch++: R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal Stochastic Trace
  Estimation", SOSA 2021 (arXiv:2010.09649).  With ``m`` products: sketch ``Q = orth(A S)`` with
  ``m/3`` columns, take ``tr(Q^T A Q)`` exactly and Hutchinson on the deflated rest with ``m/3``
  probes; error ``O(1/m)`` instead of ``O(1/sqrt(m))`` for matrices with decaying spectra.

Both use batched products (``matmat`` of many columns at once).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._linop import as_torch_operator, check_count, seeded_generator


@dataclass
class TraceEstimate:
    """A trace estimate.

    Attributes:
        estimate: the trace estimate.
        std_error: standard error of its random part (``nan`` with a single probe).
        num_products: operator-vector products used.
        method: ``"hutchinson1989"`` or ``"meyer2021hutchpp"``.
    """

    estimate: float
    std_error: float
    num_products: int
    method: str


def hutchinson_trace(op, num_products: int = 30, seed: int = 0, distribution: str = "rademacher",
                     batch: int = 64) -> TraceEstimate:
    """Hutchinson (1989): ``tr(A) ~= mean_i z_i^T A z_i`` over ``num_products`` random probes.

    Args:
        op: any operator :func:`~shortcut_ext.curvature._linop.as_torch_operator` accepts.
        num_products: number of probes (= products).
        seed: seeds the probes.
        distribution: ``"rademacher"`` (minimum variance among i.i.d. entries) or ``"gaussian"``.
        batch: probes per batched product (memory only: each probe is drawn on its own, so the estimate
            for a seed does not depend on it).

    >>> A = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))
    >>> hutchinson_trace(A, 8).estimate  # Rademacher probes are exact on diagonal matrices
    10.0
    """
    num_products = check_count("num_products", num_products)
    batch = check_count("batch", batch)
    A = as_torch_operator(op)
    gen = seeded_generator(seed, "probes")
    vals = []
    for c in range(0, num_products, batch):
        Z = A.probes(min(batch, num_products - c), gen, distribution)
        vals.append((Z * A.matmat(Z)).sum(dim=0).double().cpu())
    vals = torch.cat(vals)
    se = float(vals.std() / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    return TraceEstimate(float(vals.mean()), se, num_products, "hutchinson1989")


def hutchpp_trace(op, num_products: int = 30, seed: int = 0, distribution: str = "rademacher") -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with ``num_products`` products (a multiple of 3 is best).

    ``S``: ``P x s`` random, ``Q = orth(A S)``, ``G``: ``P x g`` random with ``g = num_products - 2 s``;
    ``tr(A) ~= tr(Q^T A Q) + (1/g) tr(G^T (I - Q Q^T) A (I - Q Q^T) G)``.

    >>> g = torch.Generator().manual_seed(0)
    >>> U, _ = torch.linalg.qr(torch.randn(50, 5, generator=g, dtype=torch.float64))
    >>> A = U @ torch.diag(torch.tensor([9., 7., 5., 3., 1.], dtype=torch.float64)) @ U.T  # rank 5
    >>> round(hutchpp_trace(A, 18).estimate, 9)  # the sketch captures the whole range: exact
    25.0
    """
    num_products = check_count("num_products", num_products, 3)
    A = as_torch_operator(op)
    p0 = A.num_products
    gen = seeded_generator(seed, "hutch++")
    s = min(num_products // 3, A.P)
    g = num_products - 2 * s
    S = A.randn(s, gen, distribution)
    Q, _ = torch.linalg.qr(A.matmat(S))  # [P, s]
    t_low = float(torch.trace(Q.T @ A.matmat(Q)))
    G = A.randn(g, gen, distribution)
    G = G - Q @ (Q.T @ G)
    vals = (G * A.matmat(G)).sum(dim=0).double().cpu()
    se = float(vals.std() / math.sqrt(g)) if g > 1 else float("nan")
    return TraceEstimate(t_low + float(vals.mean()), se, A.num_products - p0, "meyer2021hutchpp")


# names after the papers
hutchinson1989 = hutchinson_trace
meyer2021hutchpp = hutchpp_trace
