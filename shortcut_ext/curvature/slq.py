"""Spectral density by stochastic Lanczos quadrature (SLQ).

After B. Ghorbani, S. Krishnan, Y. Xiao, "An Investigation into Neural Net Optimization via Hessian
Eigenvalue Density", ICML 2019 (and Lin, Saad, Yang, "Approximating spectral densities of large
matrices", SIAM Review 2016).  For a unit probe ``v``, ``m`` Lanczos steps give a tridiagonal
``T = U diag(theta) U^T``; the Gauss quadrature nodes ``theta_l`` with weights ``tau_l = U[0, l]^2``
satisfy ``sum_l tau_l f(theta_l) ~= v^T f(H) v`` (exact for polynomials of degree ``< 2m``).  Averaged
over probes, the nodes and weights are a discrete estimate of the spectral measure
``phi(t) = (1/P) sum_i delta(t - lambda_i)``.

Probes run in groups: each step is one batched product ``A.matmat(Q[P, group])``; each probe keeps
its own recursion (not block Lanczos) with full reorthogonalisation against its own basis.  The bases
take ``group * steps * P`` numbers, so the group size is chosen from a memory budget
(``max_basis_bytes``, default 3 GiB: at ``P = 5.12e6`` in float32 one probe's 80-step basis is
1.6 GB, all 8 probes' 13 GB).  The probes are drawn at once from the seed, so the result does not
depend on the grouping.  A probe whose recursion breaks down (an invariant subspace: ``beta ~ 0``,
e.g. after ``2d`` steps at the 2-shortcut zero point, whose spectrum has ``2d`` distinct values, when
``d`` is small: rounding hides the breakdown from about ``d = 16`` on, see ``lanczos``) stops there:
its quadrature is then exact for every ``f``.

Resolution near zero: a node ``theta_l`` stands for a Ritz pair with residual ``r_l = beta_m |U[m-1, l]|``,
and ``[theta_l - r_l, theta_l + r_l]`` holds an eigenvalue.  Where many eigenvalues crowd near zero
(deep plain nets), ``m`` steps cannot separate them: the nodes nearest zero are averages whose
intervals contain 0, the index cannot tell their sign and ``|lambda|(q)`` is unreliable (off by
factors, in either direction).  :meth:`SLQResult.sign_unresolved_mass` and :meth:`SLQResult.quantile_unresolved_mass`
measure how much of the estimated spectrum is in that state (``condition_report`` reports both and
whether ``|lambda|(q)`` is resolved); more ``steps`` is the remedy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._linop import as_torch_operator, check_count, default_tol, project_out, seeded_generator, zero_tol_rel
from .lanczos import DEFAULT_MAX_BASIS_BYTES


@dataclass
class SLQResult:
    """Gauss quadrature nodes and weights of every probe.

    Attributes:
        nodes: ``[probes, steps]`` Ritz values of each probe (padded with 0 where a probe stopped early).
        weights: ``[probes, steps]`` quadrature weights (each row sums to 1; padding has weight 0).
        num_steps: ``[probes]`` Lanczos steps each probe took (fewer than ``steps`` after a breakdown).
        num_params: ``P``, the operator's size (multiply a mass by ``P`` to count eigenvalues).
        num_products: operator-vector products used.
        probe_batch: probes per group (per batched product); ``0`` if unknown.
        basis_bytes: size of the reorthogonalisation basis buffer (``probe_batch * steps * P`` numbers).
        dtype: the dtype of the operator's products (``"float32"`` or ``"float64"``): it sets the default
            tolerance below which a node counts as zero.
        residuals: ``[probes, steps]`` residual norms ``beta_m |U[m-1, l]|`` of the Ritz pairs behind the
            nodes (0 for a probe that broke down, whose nodes are exact; ``None`` if unknown).
    """

    nodes: np.ndarray
    weights: np.ndarray
    num_steps: np.ndarray
    num_params: int
    num_products: int
    probe_batch: int = 0
    basis_bytes: int = 0
    dtype: str = "float64"
    residuals: np.ndarray | None = None

    @property
    def num_probes(self) -> int:
        return self.nodes.shape[0]

    def pooled(self) -> tuple[np.ndarray, np.ndarray]:
        """All probes' nodes and weights as one measure of total mass 1 (weights divided by the probes)."""
        mask = self.weights > 0
        return self.nodes[mask], self.weights[mask] / self.num_probes

    def moment(self, p: int) -> float:
        """``E[lambda^p]`` under the estimated measure, i.e. an estimate of ``tr(H^p) / P``."""
        return float((self.weights * self.nodes ** p).sum(axis=1).mean())

    def moments_per_probe(self, p: int) -> np.ndarray:
        """``v_i^T H^p v_i`` of every probe (exact while ``p < 2 * steps``)."""
        return (self.weights * self.nodes ** p).sum(axis=1)

    def trace(self, p: int = 1) -> tuple[float, float]:
        """Estimate and standard error of ``tr(H^p)`` (Hutchinson's estimator with the same probes)."""
        vals = self.num_params * self.moments_per_probe(p)
        se = float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
        return float(vals.mean()), se

    def density(self, grid: np.ndarray | None = None, sigma: float | None = None,
                num: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """Gaussian-smoothed density ``phi_sigma(t) = sum_l w_l N(t; theta_l, sigma^2)`` (integrates to 1).

        Args:
            grid: where to evaluate (default: ``num`` points spanning the nodes, padded by ``5 sigma``).
            sigma: kernel width (default: 1% of the node range, or of ``max |node|`` if the range is 0).
        """
        x, w = self.pooled()
        if sigma is None:
            sigma = self.default_sigma()
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if grid is None:
            grid = np.linspace(float(x.min()) - 5 * sigma, float(x.max()) + 5 * sigma, num)
        grid = np.asarray(grid, dtype=np.float64)
        dens = np.zeros_like(grid)
        for c in range(0, len(x), 4096):
            z = (grid[:, None] - x[None, c:c + 4096]) / sigma
            dens += (np.exp(-0.5 * z * z) * w[None, c:c + 4096]).sum(axis=1)
        return grid, dens / (sigma * math.sqrt(2 * math.pi))

    def default_sigma(self) -> float:
        """1% of the node range (of ``max |node|`` if the range is 0): the default kernel width."""
        x, _ = self.pooled()
        span = float(x.max() - x.min()) if len(x) else 0.0
        return 0.01 * span if span > 0 else 0.01 * max(float(np.abs(x).max(initial=0.0)), 1e-12)

    def abs_quantile(self, q: float = 0.1) -> float:
        """``|lambda|(q)``: the smallest ``t`` with estimated mass of ``|lambda| <= t`` at least ``q``.

        The paper's ``|lambda|(0.1)`` is ``abs_quantile(0.1)``.
        """
        x, w = self.pooled()
        return _weighted_quantile(np.abs(x), w, q)

    def abs_quantile_per_probe(self, q: float = 0.1) -> np.ndarray:
        """``|lambda|(q)`` from each probe alone (its spread measures the estimate's uncertainty)."""
        return np.array([_weighted_quantile(np.abs(n[w > 0]), w[w > 0], q)
                         for n, w in zip(self.nodes, self.weights)])

    def negative_mass(self, zero_tol: float | None = None) -> float:
        """Estimated fraction of eigenvalues ``< -zero_tol`` (the paper's index).

        ``zero_tol`` defaults to ``sqrt(eps) * max |node|`` with the ``eps`` of the operator's dtype
        (1.5e-8 in float64, 3.5e-4 in float32): zero eigenvalues, which rounding in the products moves
        by about that much, are not negative.
        """
        return float(self.negative_mass_per_probe(zero_tol).mean())

    index = negative_mass

    def negative_mass_per_probe(self, zero_tol: float | None = None) -> np.ndarray:
        if zero_tol is None:
            zero_tol = self.default_zero_tol()
        return (self.weights * (self.nodes < -zero_tol)).sum(axis=1)

    def default_zero_tol(self) -> float:
        """``sqrt(eps) * max |node|`` (eps of :attr:`dtype`): see :meth:`negative_mass`."""
        return zero_tol_rel(getattr(torch, self.dtype)) * float(np.abs(self.nodes).max(initial=0.0))

    def _unresolved(self) -> np.ndarray:
        """``[probes, steps]``: nodes whose Ritz interval ``theta +- r`` contains 0 (an exact node, ``r``
        within the zero tolerance, is resolved even at 0)."""
        if self.residuals is None:
            raise ValueError("this SLQResult has no residuals (built without them): the resolution near 0 is unknown")
        r = self.residuals
        return (self.weights > 0) & (r > np.abs(self.nodes)) & (r > self.default_zero_tol())

    def sign_unresolved_mass(self) -> float:
        """Estimated fraction of the spectrum at nodes whose sign is not resolved (their Ritz interval
        ``theta +- r`` contains 0): the index could move by up to this much with more steps."""
        return float((self.weights * self._unresolved()).sum(axis=1).mean())

    def quantile_unresolved_mass(self, q: float = 0.1) -> float:
        """Estimated fraction of the spectrum at nodes with ``|theta| <= |lambda|(q)`` whose interval
        contains 0.  Where it is a sizeable part of ``q`` (say ``>= q / 2``), ``|lambda|(q)`` is set by
        unresolved nodes and can be off by factors in either direction."""
        lam_q = self.abs_quantile(q)
        return float((self.weights * (self._unresolved() & (np.abs(self.nodes) <= lam_q))).sum(axis=1).mean())

    def extremes(self) -> tuple[float, float]:
        """Smallest and largest node (inner bounds on ``lambda_min``, ``lambda_max``)."""
        x, _ = self.pooled()
        return float(x.min()), float(x.max())


def _weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    if len(x) == 0:
        return float("nan")
    order = np.argsort(x, kind="stable")
    cw = np.cumsum(w[order])
    cw /= cw[-1]
    i = int(np.searchsorted(cw, q - 1e-12, side="left"))
    return float(x[order][min(i, len(x) - 1)])


def slq_group_size(P: int, probes: int, steps: int, dtype: torch.dtype = torch.float32,
                   max_basis_bytes: int | None = None) -> int:
    """Probes per group that keep the reorthogonalisation basis within ``max_basis_bytes``.

    A group of ``g`` probes keeps ``g * steps * P`` numbers of ``dtype``; the group size is the largest
    ``g <= probes`` within the budget (default :data:`DEFAULT_MAX_BASIS_BYTES`).

    >>> slq_group_size(5_120_000, 8, 80, torch.float32, 5 * 2**30)  # the scale target: 3 probes per group
    3
    """
    budget = DEFAULT_MAX_BASIS_BYTES if max_basis_bytes is None else _check_bytes(max_basis_bytes)
    steps = min(steps, P)
    per_probe = steps * P * _itemsize(dtype)
    g = min(probes, budget // per_probe)
    if g < 1:
        raise ValueError(
            f"max_basis_bytes must hold at least one probe's Lanczos basis (steps x P x itemsize = {steps} x {P} x "
            f"{_itemsize(dtype)} = {per_probe / 2**30:.2f} GiB), got {budget / 2**30:.2f} GiB; raise max_basis_bytes, "
            "lower steps, or pass reorthogonalize=False")
    return int(g)


def slq(op, probes: int = 8, steps: int = 80, seed: int = 0, distribution: str = "rademacher",
        reorthogonalize: bool = True, breakdown_tol: float | None = None, callback=None,
        probe_batch: int | None = None, max_basis_bytes: int | None = None, done: dict | None = None,
        on_group=None) -> SLQResult:
    """Stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019), probes batched in memory-bounded groups.

    The probes are drawn all at once from ``seed`` (so they do not depend on the grouping) and run in
    groups of ``probe_batch``: one batched product ``A.matmat`` of the group's columns per step, and
    full reorthogonalisation of each probe against its own basis, which a group keeps in
    ``probe_batch * steps * P`` numbers.  Groups run one after the other and reuse one basis buffer.
    Each probe's recursion is independent of the others, so the nodes and weights do not depend on
    the grouping (up to the rounding of batched products with a different number of columns).

    Args:
        op: any operator :func:`~shortcut_ext.curvature._linop.as_torch_operator` accepts.
        probes: number of random probe vectors.
        steps: Lanczos steps per probe (capped at ``P``).
        seed: seeds the probes.
        distribution: ``"rademacher"`` or ``"gaussian"`` probes (normalised to unit length).
        reorthogonalize: full reorthogonalisation of each probe's basis (recommended; without it ghost
            copies of converged Ritz values shift weight between nodes, and no basis is kept).
        breakdown_tol: relative size of ``beta`` below which a probe has found an invariant subspace.
        callback: called as ``callback(done, total)`` in probe-steps (``total = probes * steps``).
        probe_batch: probes per group.  Default: as many as fit in ``max_basis_bytes``
            (:func:`slq_group_size`), all of them without reorthogonalisation.
        max_basis_bytes: memory budget of a group's basis (default :data:`DEFAULT_MAX_BASIS_BYTES`,
            3 GiB, when ``probe_batch`` is chosen automatically).  Given together with ``probe_batch``,
            the two must agree.
        done: recurrences of probes already run (a resumed run): ``{probe: (alpha, beta, steps)}``
            with ``alpha``, ``beta`` of length ``steps``.  A group whose probes are all there is not rerun.
        on_group: called as ``on_group(g0, g1, alpha, beta, steps)`` after each group that ran (for a
            checkpoint); ``alpha``, ``beta`` are ``[g1 - g0, steps]`` arrays.

    Returns:
        :class:`SLQResult`.

    Raises:
        ValueError: a non-positive ``probes``, ``steps`` or ``probe_batch``, or a budget that cannot hold
            one probe's basis (or the requested ``probe_batch``).

    >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> r = slq(A, probes=4, steps=10)
    >>> round(r.trace(1)[0], 9), round(r.moment(2) * 10, 9)  # Rademacher: tr(A) exact; tr(A^2) estimated
    (55.0, 385.0)
    >>> bool(np.allclose(slq(A, probes=4, steps=10, probe_batch=1).nodes, r.nodes, atol=1e-12))
    True
    """
    A = as_torch_operator(op)
    P, dt, dev = A.P, A.dtype, A.device
    probes, steps = check_count("probes", probes), check_count("steps", steps)
    if probe_batch is not None:
        probe_batch = check_count("probe_batch", probe_batch)
    p0 = A.num_products
    if max_basis_bytes is not None:
        _check_bytes(max_basis_bytes)
    steps = min(steps, P)
    if steps == 1 and P > 1:
        import warnings

        warnings.warn("slq(steps=1) gives each probe one quadrature node, its Rayleigh quotient: the result's trace "
                      "estimate (Hutchinson's) holds, but its density, quantiles and index describe those quotients, not the "
                      "spectrum; use steps >= 2", stacklevel=2)
    if not reorthogonalize:
        group = probes if probe_batch is None else min(probe_batch, probes)
    elif probe_batch is None:
        group = slq_group_size(P, probes, steps, dt, max_basis_bytes)
    else:
        group = min(probe_batch, probes)
        need = group * steps * P * _itemsize(dt)
        if max_basis_bytes is not None and need > max_basis_bytes:
            raise ValueError(
                f"probe_batch={probe_batch} needs a basis of {group} x {steps} x {P} x {_itemsize(dt)} bytes = "
                f"{need / 2**30:.2f} GiB, above max_basis_bytes = {max_basis_bytes / 2**30:.2f} GiB; lower "
                f"probe_batch to {max(1, max_basis_bytes // (steps * P * _itemsize(dt)))} or leave it to the budget")
    btol = default_tol(A.precision) if breakdown_tol is None else float(breakdown_tol)
    gen = seeded_generator(seed, "probes")
    Z = A.probes(probes, gen, distribution).T.contiguous()  # [probes, P], drawn at once: grouping-independent
    Z /= Z.norm(dim=1, keepdim=True)
    basis = torch.empty(group, steps, P, dtype=dt, device=dev) if reorthogonalize else None  # reused by groups
    alpha = np.zeros((probes, steps))
    beta = np.zeros((probes, steps))
    nsteps = np.zeros(probes, dtype=np.int64)
    total = probes * steps
    done = {} if done is None else done
    for g0 in range(0, probes, group):
        g1 = min(probes, g0 + group)
        done0 = g0 * steps
        if all(i in done for i in range(g0, g1)):  # resumed: this group ran before
            for i in range(g0, g1):
                a_i, b_i, n_i = done[i]
                n_i = int(n_i)
                if n_i > steps or len(a_i) < n_i or len(b_i) < n_i:
                    raise ValueError(f"done[{i}] holds {len(a_i)} / {len(b_i)} coefficients for {n_i} steps; "
                                     f"at most steps = {steps} fit")
                alpha[i, :n_i], beta[i, :n_i], nsteps[i] = a_i[:n_i], b_i[:n_i], n_i
            if callback is not None:
                callback(g1 * steps, total)
            continue

        def cb(j, g0=g0, g1=g1, done0=done0):
            if callback is not None:
                callback(done0 + j * (g1 - g0), total)

        a, b, n = _lanczos_recurrences(A, Z[g0:g1], steps, None if basis is None else basis[: g1 - g0], btol, cb)
        alpha[g0:g1], beta[g0:g1], nsteps[g0:g1] = a, b, n
        if on_group is not None:
            on_group(g0, g1, alpha[g0:g1].copy(), beta[g0:g1].copy(), nsteps[g0:g1].copy())
        if callback is not None:
            callback(g1 * steps, total)
    del basis, Z

    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    residuals = np.zeros((probes, steps))
    for i in range(probes):
        m = int(nsteps[i])
        T = torch.diag(torch.as_tensor(alpha[i, :m], device="cpu"))
        if m > 1:
            off = torch.as_tensor(beta[i, : m - 1], device="cpu")
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        th, U = torch.linalg.eigh(T)
        nodes[i, :m] = th.numpy()
        weights[i, :m] = (U[0] ** 2).numpy()
        # beta[i, m-1] is the norm left after the last step (~0 where the probe broke down)
        if m:
            residuals[i, :m] = beta[i, m - 1] * U[m - 1].abs().numpy()
    return SLQResult(nodes=nodes, weights=weights, num_steps=nsteps, num_params=P, num_products=A.num_products - p0,
                     probe_batch=group, basis_bytes=0 if not reorthogonalize else group * steps * P * _itemsize(dt),
                     dtype=str(A.precision).replace("torch.", ""), residuals=residuals)


def _lanczos_recurrences(A, q, steps, basis, btol, callback):
    """Lanczos recurrences of the probes ``q[g, P]`` (unit rows), one batched product per step.

    ``basis`` (``[g, steps, P]`` or ``None``) holds each probe's Lanczos vectors for full
    reorthogonalisation: classical Gram-Schmidt against the probe's own basis, repeated only where
    the first pass removed more than ``1 - 1/sqrt(2)`` of the norm (the Daniel-Gragg-Kaufman-Stewart
    criterion).  After the three-term recurrence the vector is nearly orthogonal already, so one pass
    (two reads of the basis) is the rule.  Matrix-vector products per probe (``project_out``: batched
    over column slices, one per thread, on a large CPU basis), no ``[g, P]``-sized temporaries per
    basis vector and no copies of the basis.

    Returns:
        ``alpha[g, steps]``, ``beta[g, steps]`` (float64) and ``nsteps[g]``.
    """
    g, P = q.shape
    dt, dev = q.dtype, q.device
    alpha = np.zeros((g, steps))
    beta = np.zeros((g, steps))
    nsteps = np.zeros(g, dtype=np.int64)
    active = np.ones(g, dtype=bool)
    q = q.clone()
    q_prev = torch.zeros_like(q)
    b_prev = torch.zeros(g, dtype=dt, device=dev)
    anorm = np.zeros(g)
    tiny = float(torch.finfo(dt).tiny)
    eta = 1.0 / math.sqrt(2.0)
    for j in range(steps):
        if not active.any():
            break
        if basis is not None:
            basis[:, j] = q
        if active.all():
            w = A.matmat(q.T).T  # [g, P]
        else:  # stopped probes have q = 0: leave them out of the product
            idx = torch.as_tensor(np.flatnonzero(active), device=dev)
            w = torch.zeros_like(q)
            w[idx] = A.matmat(q[idx].T).T
        w = w.contiguous()
        al = torch.linalg.vecdot(q, w)  # [g]
        # in place: a [g, P] temporary is a fresh block with its page faults at every step (at P = 5M, g = 2
        # the two temporaries cost about 60 ms a step, more than the arithmetic)
        w.addcmul_(q, al[:, None], value=-1)
        w.addcmul_(q_prev, b_prev[:, None], value=-1)
        if basis is not None:
            for i in np.flatnonzero(active):
                Qi = basis[i, : j + 1]  # [j+1, P], a view
                wi = w[i]
                n0 = wi.norm()
                for _ in range(2):
                    project_out(wi[None], Qi)
                    n1 = wi.norm()
                    if n1 >= eta * n0:
                        break
                    n0 = n1
        bt = w.norm(dim=1)
        al_np, bt_np = al.double().cpu().numpy(), bt.double().cpu().numpy()
        alpha[active, j] = al_np[active]
        beta[active, j] = bt_np[active]
        nsteps[active] = j + 1
        anorm = np.maximum(anorm, np.abs(al_np) + bt_np + b_prev.double().cpu().numpy())
        active = active & (bt_np > btol * np.maximum(anorm, tiny))
        keep = torch.as_tensor(active, device=dev)
        q_prev = q
        b_prev = torch.where(keep, bt, torch.zeros_like(bt))
        w /= torch.where(keep, bt, torch.ones_like(bt))[:, None]
        if not active.all():
            w[~keep] = 0.0
        q = w
        callback(j + 1)
    return alpha, beta, nsteps


def _itemsize(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _check_bytes(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"max_basis_bytes must be a positive integer (bytes), got {value!r}")
    return int(value)
