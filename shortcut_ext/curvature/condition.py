"""Condition-number reports of a Hessian (docs/science.md section 3).

- condition number ``cond = |lambda|max / |lambda|min``;
- the paper's stable variant ``cond_q10 = |lambda|max / |lambda|(0.1)`` with ``|lambda|(0.1)`` the 10th
  percentile of the absolute eigenvalues;
- ``index``: the fraction of negative eigenvalues.

Small nets (``P <= exact_max_params``): exact, from the dense Hessian's ``eigvalsh``.  Large nets:
``|lambda|max`` from Lanczos at both ends (with its residual norm), ``|lambda|(0.1)`` and the index
from stochastic Lanczos quadrature (with their spread over probes); ``|lambda|min`` is not available
from extreme-eigenvalue methods, so ``cond`` is ``nan`` there.

Numerically zero eigenvalues: ``|lambda| <= zero_tol`` count as zero: not negative, and they make
``cond`` infinite.  The default follows the dtype the Hessian was computed in: ``P * eps * |lambda|max``
for the exact report (the usual numerical-rank tolerance), ``sqrt(eps) * |lambda|max`` for the
Lanczos+SLQ estimate (1.5e-8 / 3.5e-4 relative in float64 / float32).  A float32 Hessian's zero
eigenvalues come out as rounding noise far above float64's ``eps``; measuring them against float64's
tolerance would count half of them as negative.  ``condition_report`` warns when an exact float32
report counts some but not all eigenvalues as zero: they may be small non-zero eigenvalues below
float32's resolution.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .. import reference
from ._linop import as_torch_operator, check_count, zero_tol_rel
from .lanczos import basis_capacity, lanczos
from .slq import slq


@dataclass
class ConditionReport:
    """Curvature summary.

    Attributes:
        lam_max: ``|lambda|max``.  lam_min: ``|lambda|min`` (exact method only, else ``nan``).
        lam_q10: ``|lambda|(q)`` for the report's ``q`` (0.1 by default).
        index: fraction of eigenvalues below ``-zero_tol``.
        cond: ``lam_max / lam_min`` (``inf`` if an eigenvalue is numerically zero, ``nan`` if ``H = 0``).
        cond_q10: ``lam_max / lam_q10``.
        top, bottom: the largest / smallest eigenvalues found (descending / ascending).
        method: ``"exact"`` or ``"lanczos+slq"``.
        num_params: ``P``.
        uncertainty: how far to trust the numbers (residual norms, spread across probes).  For
            ``"lanczos+slq"`` also ``index_unresolved_mass`` (estimated fraction of the spectrum whose
            sign SLQ did not resolve: the index may be off by up to about that much),
            ``lam_q10_unresolved_mass`` and ``lam_q10_resolved`` (``False`` when that mass below
            ``|lambda|(q)`` is ``>= q / 2``: then ``lam_q10`` and ``cond_q10`` are unreliable, off by
            factors in either direction; raise ``steps``).  The spread across probes does not show this
            bias.  Both masses are conservative: they can flag a spectrum whose index SLQ gets right.
    """

    lam_max: float
    lam_min: float
    lam_q10: float
    index: float
    cond: float
    cond_q10: float
    top: list
    bottom: list
    method: str
    num_params: int
    q: float = 0.1
    uncertainty: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _ratio(a: float, b: float) -> float:
    if a == 0.0 and b == 0.0:
        return float("nan")
    return a / b if b > 0 else float("inf")


def abs_quantile(eigenvalues, q: float = 0.1) -> float:
    """``|lambda|(q)``: the smallest ``|lambda_i|`` with at least a fraction ``q`` of ``|lambda| <=`` it."""
    a = np.sort(np.abs(np.asarray(eigenvalues, dtype=np.float64)).ravel())
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    if len(a) == 0:
        raise ValueError("eigenvalues must not be empty")
    return float(np.quantile(a, q, method="inverted_cdf"))


def report_from_eigenvalues(eigenvalues, q: float = 0.1, zero_tol: float | None = None, k: int = 5,
                            method: str = "exact", dtype: torch.dtype | None = None) -> ConditionReport:
    """Exact report from a full list of eigenvalues (of a dense Hessian, or of the closed form).

    ``dtype``: the precision the eigenvalues' matrix was computed in; it sets the default ``zero_tol``
    (``P * eps * |lambda|max``).  Default: the eigenvalues' own (float32 for a float32 tensor or
    array, float64 for float64 ones and for lists).
    """
    k = check_count("k", k)
    ev = np.sort(np.asarray(eigenvalues, dtype=np.float64).ravel())
    if len(ev) == 0:
        raise ValueError("eigenvalues must not be empty")
    if not np.isfinite(ev).all():
        raise ValueError(f"eigenvalues must be finite, got {int((~np.isfinite(ev)).sum())} nan/inf of {len(ev)} "
                         "(a Hessian of non-finite weights or data?)")
    P = len(ev)
    a = np.abs(ev)
    lam_max = float(a.max())
    if zero_tol is None:
        zero_tol = P * reference.eigen_eps(eigenvalues, dtype) * lam_max
    lam_min = float(a.min())
    nonzero_min = 0.0 if lam_min <= zero_tol else lam_min
    lam_q = abs_quantile(ev, q)
    return ConditionReport(
        lam_max=lam_max, lam_min=lam_min, lam_q10=lam_q, index=float((ev < -zero_tol).mean()),
        cond=_ratio(lam_max, nonzero_min), cond_q10=_ratio(lam_max, lam_q if lam_q > zero_tol else 0.0),
        top=ev[::-1][:k].tolist(), bottom=ev[:k].tolist(), method=method, num_params=P, q=q,
        uncertainty={"zero_tol": float(zero_tol), "num_zero": int((a <= zero_tol).sum())},
    )


def symmetrize_lower_(D: torch.Tensor, block: int = 512) -> float:
    """``max |D - D^T|`` of the square matrix ``D``, and its lower triangle replaced in place by that of
    ``(D + D^T) / 2`` (what ``torch.linalg.eigvalsh`` reads; the upper triangle outside the diagonal blocks
    is left as it was), one ``block x block`` tile at a time.

    The same numbers, bit for bit, as ``(D - D.T).abs().max()`` and ``0.5 * (D + D.T)``, without their
    four full-size temporaries and strided transposes: those took a fifth of ``eigvalsh``'s time at
    P = 2400 (117 against 626 ms on one thread).  A non-finite entry makes the result nan or inf."""
    n = D.shape[0]
    asym = 0.0
    for i in range(0, n, block):
        for j in range(0, i + 1, block):
            a = D[i:i + block, j:j + block]
            b = D[j:j + block, i:i + block].T  # the same memory as a where i == j
            d = float((a - b).abs().max())
            if d > asym or math.isnan(d):  # a nan stays (max() would drop it)
                asym = d
            if i == j:
                a.copy_((a + b).mul_(0.5))
            else:
                a.add_(b).mul_(0.5)
    return asym


def condition_report(op, method: str = "auto", exact_max_params: int = 2048, q: float = 0.1, k: int = 5,
                     probes: int = 8, steps: int = 80, max_iter: int | None = None, seed: int = 0,
                     zero_tol: float | None = None, callback=None) -> ConditionReport:
    """Condition numbers and index of a symmetric operator (a :class:`HessianOperator` or any other).

    Args:
        op: the operator; ``method="exact"`` needs ``to_dense()`` or a dense matrix.
        method: ``"auto"`` (exact when ``P <= exact_max_params``), ``"exact"`` or ``"lanczos+slq"``.
        q: the quantile of ``|lambda|`` (the paper's 0.1).
        k: extreme eigenvalues to report at each end.
        probes, steps: SLQ probes and Lanczos steps per probe.
        max_iter: Lanczos basis size for ``|lambda|max`` (default ``min(P, 200)``, fewer where 200
            vectors exceed the basis budget :data:`~shortcut_ext.curvature.lanczos.DEFAULT_MAX_BASIS_BYTES`).
        zero_tol: see the module docstring (default from the operator's dtype).
        callback: progress, forwarded to Lanczos and SLQ as ``callback(done, total)``.
    """
    if method not in ("auto", "exact", "lanczos+slq"):
        raise ValueError(f"method must be 'auto', 'exact' or 'lanczos+slq', got {method!r}")
    k = check_count("k", k)
    A = as_torch_operator(op)
    P = A.P
    if method == "auto":
        method = "exact" if P <= exact_max_params else "lanczos+slq"
    if method == "exact":
        from .hessian import HessianOperator

        if isinstance(op, torch.Tensor):
            D = op
        elif isinstance(op, HessianOperator):  # its batched assembly
            D = op.to_dense(force=True)
        else:
            D = A.matmat(torch.eye(P, dtype=A.dtype, device=A.device))
        D = D.double().cpu()
        if D is op:  # the caller's matrix: symmetrised in a copy
            D = D.clone()
        asym = symmetrize_lower_(D)
        if not math.isfinite(asym) and not bool(torch.isfinite(D).all()):
            raise FloatingPointError("the operator's matrix has nan or inf entries: check the model's weights and "
                                     "the data")
        ev = torch.linalg.eigvalsh(D).numpy()  # reads the lower triangle: (D + D^T) / 2
        rep = report_from_eigenvalues(ev, q=q, zero_tol=zero_tol, k=k, method="exact", dtype=A.precision)
        rep.uncertainty["asymmetry"] = asym  # max |H - H^T| of the assembled matrix
        nz = rep.uncertainty["num_zero"]
        if zero_tol is None and A.precision == torch.float32 and 0 < nz < P:
            import warnings

            # the spectrum command says the same; P eps32 |lambda|max is a worst-case bound, so that
            # small non-zero eigenvalues of a float32 Hessian can fall under it (cond inf, a lower index)
            warnings.warn(f"{nz} of the {P} eigenvalues lie within float32's zero tolerance "
                          f"({rep.uncertainty['zero_tol']:.3g} = P eps32 |lambda|max) and count as zero: they are "
                          "zero or below float32's resolution (then cond is not really inf, and the index can miss "
                          "them); a float64 operator (dtype=torch.float64) tells them apart (condition_report also takes a "
                          "zero_tol)",
                          stacklevel=2)
        return rep
    # large nets: Lanczos for the ends, SLQ for the bulk
    if max_iter is None:  # 200 vectors, fewer where they would not fit the basis budget (3 GiB)
        max_iter = max(2 * k + 2, min(P, 200, basis_capacity(P, A.dtype)))
    lz = lanczos(A, k=k, which="both", max_iter=max_iter, verify=False,
                 seed=seed, return_vectors=False, compute_residuals=True, callback=callback)
    sq = slq(A, probes=probes, steps=steps, seed=seed + 1, callback=callback)
    lam_max = lz.abs_max
    if A.precision == torch.float32 and 0 < lam_max < 1e-18:
        import warnings

        warnings.warn(f"|lambda|max = {lam_max:.3g} is near float32's underflow (norms of vectors this small lose "
                      "digits or vanish): the estimates are unreliable; use a float64 operator", stacklevel=2)
    zt = zero_tol_rel(A.precision) * lam_max if zero_tol is None else zero_tol
    lam_q = sq.abs_quantile(q)
    per_probe_q = sq.abs_quantile_per_probe(q)
    per_probe_idx = sq.negative_mass_per_probe(zt)
    sign_unres, q_unres = sq.sign_unresolved_mass(), sq.quantile_unresolved_mass(q)
    nprobe = sq.num_probes
    return ConditionReport(
        lam_max=lam_max, lam_min=float("nan"), lam_q10=lam_q, index=float(per_probe_idx.mean()),
        cond=float("nan"), cond_q10=_ratio(lam_max, lam_q if lam_q > zt else 0.0),
        top=lz.largest.tolist(), bottom=lz.smallest.tolist(), method="lanczos+slq", num_params=P, q=q,
        uncertainty={
            "lam_max_residual": lz.abs_max_residual,
            "lanczos_converged": bool(lz.converged),
            "lanczos_vectors": int(lz.num_vectors),
            "top_residuals": lz.largest_residuals.tolist(),
            "bottom_residuals": lz.smallest_residuals.tolist(),
            "lam_q10_probe_std": float(np.std(per_probe_q, ddof=1)) if nprobe > 1 else float("nan"),
            "lam_q10_probe_range": [float(per_probe_q.min()), float(per_probe_q.max())],
            "index_std_error": float(np.std(per_probe_idx, ddof=1) / math.sqrt(nprobe)) if nprobe > 1 else float("nan"),
            # near-zero resolution (see slq's module docstring): mass at nodes whose Ritz interval holds 0
            "index_unresolved_mass": sign_unres,
            "lam_q10_unresolved_mass": q_unres,
            "lam_q10_resolved": bool(q_unres < 0.5 * q or q_unres == 0.0),
            "slq_probes": nprobe,
            "slq_steps": int(sq.num_steps.max()),
            "zero_tol": float(zt),
        },
    )


def hessian_probes(model, data, loss: str = "mse", exact_max_params: int = 2048, *, backend: str = "fused",
                   dtype: torch.dtype | None = None, probes: int = 8, steps: int = 80, seed: int = 0,
                   q: float = 0.1, distributed: bool = False, process_group=None, matrix: str = "hessian",
                   parts=()) -> dict:
    """Curvature probes for training: ``{lam_max, lam_top, lam_q10, index, cond, cond_q10, method, resolved,
    index_unresolved_mass}``.

    ``lam_top`` is the largest eigenvalue with its sign (``lam_max`` is the largest ``|lambda|``): the
    sharpness that gradient descent at rate ``lr`` keeps below ``2 / lr`` to stay stable near a point.

    Exact (dense ``eigvalsh``) when the trunk has ``P <= exact_max_params`` weights, else Lanczos +
    SLQ (then ``cond`` is ``nan``: ``|lambda|min`` is out of reach of extreme-eigenvalue methods).
    ``resolved`` is ``False`` when SLQ could not tell the eigenvalues near 0 apart (deep plain nets):
    ``|lambda|(0.1)``, ``cond_q10`` and the index are then unreliable, by factors (see
    :func:`condition_report`'s ``uncertainty``); a larger ``exact_max_params`` gives the exact values.

    Args:
        model: the network (its current weights).
        data: ``(x, y)`` or an iterable of mini-batches (the full-data Hessian is used).
        loss: ``"mse"`` or ``"cross_entropy"``.
        exact_max_params: largest ``P`` handled exactly.
        backend, dtype: of the :class:`~shortcut_ext.curvature.hessian.HessianOperator`; ``dtype=None``
            means float64 for the exact path (``|lambda|min`` needs it) and the model's dtype above.
        probes, steps, seed: SLQ settings for large nets.
        q: the quantile reported as ``lam_q10``.
        distributed, process_group: ``data`` is this rank's shard of a data-parallel run (see
            :class:`~shortcut_ext.curvature.hessian.HessianOperator`); every rank gets the same probes.
        matrix: ``"hessian"``, one of its parts, ``"ggn"`` / ``"functional"``, or ``"empirical_fisher"`` (see
            :class:`~shortcut_ext.curvature.hessian.HessianOperator`).
        parts: also probe these parts (``"ggn"``, ``"functional"``) of ``matrix="hessian"``, or the
            ``"empirical_fisher"``, under prefixed keys (``ggn_lam_max``, ``functional_index``, ...).  On the exact
            path the dense ``H`` and ``G`` are assembled once each and ``F = H - G`` is their difference (two
            assemblies for all three; the empirical Fisher is one more).
    """
    from .hessian import MATRICES, HessianOperator

    parts = tuple(parts)
    bad = [p for p in parts if p not in MATRICES[1:]]
    if bad or (parts and matrix != "hessian"):
        raise ValueError(f"parts must name parts of the Hessian or the empirical Fisher, {MATRICES[1:]} (with "
                         f"matrix='hessian'), got "
                         f"{parts!r} with matrix={matrix!r}")
    if dtype is None and model.weight.numel() <= exact_max_params:
        dtype = torch.float64

    def operator(m):
        return HessianOperator(model, data, loss=loss, backend=backend, dtype=dtype, distributed=distributed,
                               process_group=process_group, matrix=m)

    def probe(op):
        rep = condition_report(op, method="exact" if isinstance(op, torch.Tensor) else "auto",
                               exact_max_params=exact_max_params, probes=probes, steps=steps, seed=seed, q=q)
        return {"lam_max": rep.lam_max, "lam_top": float(rep.top[0]), "lam_q10": rep.lam_q10, "index": rep.index,
                "cond": rep.cond, "cond_q10": rep.cond_q10, "method": rep.method, "resolved": report_resolved(rep),
                "index_unresolved_mass": float(rep.uncertainty.get("index_unresolved_mass", 0.0))}

    op = operator(matrix)
    if not parts:
        return probe(op)
    if op.P > exact_max_params:  # Lanczos + SLQ: each matrix on its own operator
        out = probe(op)
        for part in parts:
            out.update({f"{part}_{k}": v for k, v in probe(operator(part)).items()})
        return out
    H = op.to_dense(force=True)
    G = operator("ggn").to_dense(force=True) if set(parts) & {"ggn", "functional"} else None
    out = probe(H)
    for part in parts:
        D = {"ggn": lambda: G, "functional": lambda: H - G,
             "empirical_fisher": lambda: operator("empirical_fisher").to_dense(force=True)}[part]()
        out.update({f"{part}_{k}": v for k, v in probe(D).items()})
    return out


def report_resolved(rep: ConditionReport) -> bool:
    """Whether a report's ``lam_q10``, ``cond_q10`` and index can be trusted: always for the exact
    methods; for SLQ, when the mass at Ritz nodes of unresolved sign and below ``|lambda|(q)`` is small."""
    u = rep.uncertainty
    return bool(u.get("lam_q10_resolved", True) and u.get("index_unresolved_mass", 0.0) < 0.05)
