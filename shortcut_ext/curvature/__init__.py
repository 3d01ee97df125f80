"""Curvature of the loss: the Hessian as a linear operator and spectral tools that take any operator.

- :class:`HessianOperator`: ``matvec`` / ``matmat`` (batched HVPs, fused / autograd / torch.func),
  ``to_dense``, ``as_scipy``, ``loss_and_grad``; ``matrix="ggn" | "functional"`` for the Hessian's two parts,
  the generalised Gauss-Newton matrix ``G = J^T H_l J`` and the rest ``H - G``.
- :func:`lanczos`, :func:`block_lanczos`: extreme eigenpairs with full reorthogonalisation, robust to
  invariant subspaces and multiplicities.
- :func:`slq`: stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019): density, ``|lambda|``
  quantiles, index, moments.
- :func:`hutchinson_trace`, :func:`hutchpp_trace`: Hutchinson (1989), Hutch++ (Meyer et al. 2021).
- :func:`power_iteration`: the cheap ``|lambda|max`` monitor.
- :func:`loss_slice`, :func:`stationary_order`, :func:`random_directions`: the loss on lines and planes through
  the weights beside its exact quadratic model, and the order of a stationary point (Theorem 1: ``n - 1`` at
  an n-shortcut net's zero point, where the Hessian alone cannot tell ``n >= 3`` apart);
  :func:`path_directions`: the principal directions of a training path, for a slice that shows it;
  :func:`align_hidden_units`: weight matching of two nets' hidden units, for the line between them;
  :func:`fit_bezier_curve`: a low-loss curve between two nets (mode connectivity).
- :func:`condition_report`, :func:`hessian_probes`: condition numbers and index, exact or estimated.

Every spectral tool accepts a :class:`HessianOperator`, a ``scipy.sparse.linalg.LinearOperator``, a
dense matrix, or any object with ``matmat`` on tensors (see :func:`as_torch_operator`).
"""
from __future__ import annotations

from ._linop import TorchOperator, as_torch_operator
from .condition import ConditionReport, abs_quantile, condition_report, hessian_probes, report_from_eigenvalues
from .hessian import (MATRICES, MAX_DENSE_PARAMS, PARTS, HessianOperator, dense_empirical_fisher_func, dense_ggn_func,
                      dense_hessian_func, fused_hvp_available)
from .landscape import (Alignment, BezierCurve, LossSlice, PathPlane, StationaryOrder, align_hidden_units,
                        bezier_point, fit_bezier_curve, loss_at, loss_slice, losses_at, path_directions,
                        permute_hidden_units, random_directions, stationary_order)
from .lanczos import LanczosResult, block_lanczos, lanczos
from .power import PowerResult, power_iteration
from .slq import SLQResult, slq
from .trace import TraceEstimate, hutchinson1989, hutchinson_trace, hutchpp_trace, meyer2021hutchpp

__all__ = [
    "MATRICES",
    "PARTS",
    "MAX_DENSE_PARAMS",
    "Alignment",
    "BezierCurve",
    "ConditionReport",
    "HessianOperator",
    "LanczosResult",
    "LossSlice",
    "PathPlane",
    "PowerResult",
    "SLQResult",
    "StationaryOrder",
    "TorchOperator",
    "TraceEstimate",
    "abs_quantile",
    "align_hidden_units",
    "as_torch_operator",
    "bezier_point",
    "block_lanczos",
    "condition_report",
    "dense_empirical_fisher_func",
    "dense_ggn_func",
    "dense_hessian_func",
    "fused_hvp_available",
    "fit_bezier_curve",
    "hessian_probes",
    "hutchinson1989",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "loss_at",
    "loss_slice",
    "losses_at",
    "meyer2021hutchpp",
    "path_directions",
    "permute_hidden_units",
    "power_iteration",
    "random_directions",
    "report_from_eigenvalues",
    "slq",
    "stationary_order",
]
