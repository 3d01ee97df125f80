"""Spectral tools (Lanczos, SLQ, Hutchinson / Hutch++, power iteration, condition reports) against
exact eigendecompositions, on Hessians of small nets and on matrices with known spectra."""
from __future__ import annotations

import importlib
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator

from shortcut_ext.curvature import (
    HessianOperator,
    TorchOperator,
    as_torch_operator,
    block_lanczos,
    condition_report,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    report_from_eigenvalues,
    slq,
)
from shortcut_ext.curvature._linop import seeded_generator
from shortcut_ext.curvature.lanczos import DEFAULT_MAX_BASIS_BYTES, basis_capacity
from shortcut_ext.curvature.slq import slq_group_size
from shortcut_ext.models import ShortcutNet
from testing import one_thread  # noqa: F401 (the fixture)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def data(m=20, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, d, generator=g, dtype=F64)
    Y = X @ torch.randn(d, d, generator=g, dtype=F64) * 0.5 + 0.2 * torch.randn(m, d, generator=g, dtype=F64)
    return X, Y


@pytest.fixture(scope="module")
def random_hessian():
    """A generic Hessian (2-shortcut tanh/relu net at random weights), P = 90, and its eigenvalues."""
    net = ShortcutNet(3, 5, 2, "tanh", "relu", "identity", init="xavier", seed=1, backend="torch", dtype=F64)
    op = HessianOperator(net, data(seed=2), backend="autograd")
    D = op.to_dense()
    return op, D, np.linalg.eigvalsh(D.numpy())


@pytest.fixture(scope="module")
def zero_point():
    """The 2-shortcut zero point, d = 3, R = 4: 2d = 6 distinct eigenvalues, each d*R = 12 times."""
    net = ShortcutNet(3, 4, 2, init="zero", backend="torch", dtype=F64)
    op = HessianOperator(net, data(seed=3), backend="autograd")
    D = op.to_dense()
    return op, D, np.linalg.eigvalsh(D.numpy())


def known_spectrum(ev, seed=0):
    g = torch.Generator().manual_seed(seed)
    ev = torch.as_tensor(ev, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=F64))
    return Q @ torch.diag(ev) @ Q.T


# ------------------------------------------------------------------------------------- Lanczos
@pytest.mark.parametrize("method", ["lanczos", "block"])
def test_lanczos_extremes_vs_eigvalsh(random_hessian, method):
    op, D, ev = random_hessian
    k = 4
    r = lanczos(op, k=k, tol=1e-10) if method == "lanczos" else block_lanczos(op, k=k, block_size=3, tol=1e-10)
    scale = np.abs(ev).max()
    np.testing.assert_allclose(r.largest, ev[::-1][:k], rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(r.smallest, ev[:k], rtol=0, atol=1e-9 * scale)
    assert r.converged and np.all(r.largest_residuals < 1e-9 * scale)
    Y = r.largest_vectors
    torch.testing.assert_close(D @ Y, Y * torch.as_tensor(r.largest), rtol=0, atol=1e-8 * scale)
    assert r.abs_max == pytest.approx(np.abs(ev).max(), rel=1e-12)


@pytest.mark.parametrize("k", [5, 12, 13])
@pytest.mark.parametrize("method", ["lanczos", "block"])
def test_lanczos_survives_invariant_subspaces(zero_point, method, k):
    op, _, ev = zero_point
    assert len(np.unique(np.round(ev, 10))) == 6  # 2d distinct values, each 12 times
    r = lanczos(op, k=k) if method == "lanczos" else block_lanczos(op, k=k, block_size=2)
    scale = np.abs(ev).max()
    # every requested eigenvalue, with its multiplicity
    np.testing.assert_allclose(r.largest, ev[::-1][:k], rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(r.smallest, ev[:k], rtol=0, atol=1e-10 * scale)
    assert r.breakdowns >= 2 and r.converged
    assert np.all(r.largest_residuals < 1e-10 * scale) and np.all(r.smallest_residuals < 1e-10 * scale)


def test_lanczos_multiplicities_without_breakdown():
    # a continuous part plus two eigenvalues of multiplicity 7: no breakdown, verification finds the copies
    ev = np.concatenate([np.full(7, 5.0), np.full(7, -4.0), np.linspace(-3, 3, 86)])
    A = known_spectrum(ev, seed=1)
    r = lanczos(A, k=3)
    np.testing.assert_allclose(r.largest, [5, 5, 5], atol=1e-9)
    np.testing.assert_allclose(r.smallest, [-4, -4, -4], atol=1e-9)
    fast = lanczos(A, k=1, verify=False)
    assert fast.largest[0] == pytest.approx(5.0, abs=1e-9) and len(fast.segments) == 1


def test_lanczos_which_and_zero_operator():
    A = known_spectrum(np.linspace(-1, 2, 40), seed=2)
    top = lanczos(A, k=2, which="largest")
    assert len(top.smallest) == 0 and top.largest == pytest.approx([2.0, 2.0 - 3 / 39], abs=1e-9)
    bot = lanczos(A, k=1, which="smallest")
    assert len(bot.largest) == 0 and bot.smallest[0] == pytest.approx(-1.0, abs=1e-9)
    z = lanczos(torch.zeros(10, 10, dtype=F64), k=3)
    assert np.all(z.largest == 0) and np.all(z.smallest == 0)


def test_operator_adapter_dtype_override_casts_the_directions():
    """as_torch_operator(op, dtype=float64) of a float32 HessianOperator (or tensor) passed float64
    directions to it and raised; the base operator now gets its own dtype and returns the working one."""
    from shortcut_ext.curvature import HessianOperator

    torch.manual_seed(0)
    net = ShortcutNet(width=3, units=2, shortcut=2, mid="tanh", init="small")
    H = HessianOperator(net, (torch.randn(10, 3), torch.randn(10, 3)), backend="autograd")
    D = H.to_dense()
    for base in (H, D):
        T = as_torch_operator(base, dtype=F64)
        V = torch.randn(H.P, 2, dtype=F64)
        out = T.matmat(V)
        assert out.dtype == F64
        torch.testing.assert_close(out, (D @ V.float()).double(), rtol=1e-5, atol=1e-6)
        r = lanczos(T, k=1)
        assert r.largest[0] == pytest.approx(float(torch.linalg.eigvalsh(D.double())[-1]), rel=1e-5)
        TT = as_torch_operator(T, dtype=F64, device="cpu")  # wrapped twice: the inner one still casts
        torch.testing.assert_close(TT.matmat(V), out)
        assert T.precision == TT.precision == torch.float32  # tolerances follow the float32 products
    # a float32 operator seen in float64 keeps float32's zero tolerance: with float64's, its rounding-level
    # eigenvalues counted as real (cond_q10 1e9 and index 0.49 where the float64 truth is inf and 0.36)
    rep32 = condition_report(as_torch_operator(D, dtype=F64), method="exact")
    assert rep32.uncertainty["zero_tol"] == pytest.approx(condition_report(D, method="exact").uncertainty["zero_tol"])


def test_operator_adapter_accepts_scipy_numpy_dense(random_hessian):
    op, D, ev = random_hessian
    for A in (op.as_scipy(), D.numpy(), aslinearoperator(D.numpy()), D):
        r = lanczos(A, k=2, tol=1e-10)
        np.testing.assert_allclose(r.largest, ev[::-1][:2], atol=1e-9)
    T = as_torch_operator(op)
    assert isinstance(T, TorchOperator) and T.shape == (90, 90) and T.dtype == F64
    with pytest.raises(TypeError, match="operator must be"):
        as_torch_operator("not an operator")
    with pytest.raises(ValueError, match="square"):
        as_torch_operator(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        lanczos(D, k=0)
    with pytest.raises(ValueError, match="which must be one of"):
        lanczos(D, which="middle")


# ------------------------------------------------------------------------------------- SLQ
def test_slq_moments_are_quadratic_forms_and_converge_to_traces(random_hessian):
    op, D, ev = random_hessian
    r = slq(op, probes=64, steps=20, seed=0)
    # Gauss quadrature with m nodes is exact for degree < 2m: each probe's moments are v^T H^p v
    gen = seeded_generator(0, "probes")  # the same probes as slq(seed=0)
    V = as_torch_operator(op).probes(64, gen, "rademacher")
    V = V / V.norm(dim=0, keepdim=True)
    for p in (1, 2, 3):
        exact_q = ((V * (torch.linalg.matrix_power(D, p) @ V)).sum(dim=0)).numpy()
        np.testing.assert_allclose(r.moments_per_probe(p), exact_q, rtol=1e-9, atol=1e-12)
    # and their mean converges to tr(H^p) / P: within 4 standard errors
    for p, exact in ((1, ev.sum()), (2, (ev ** 2).sum())):
        est, se = r.trace(p)
        assert abs(est - exact) <= 4 * se + 1e-12
    # Hutchinson with the same probes and Rademacher entries is the same estimator as SLQ's first moment
    h = hutchinson_trace(op, 64, seed=0)
    assert h.estimate == pytest.approx(r.trace(1)[0], rel=1e-10)


def test_slq_quantiles_and_index_converge():
    # a known spectrum with a spread of magnitudes
    g = np.random.default_rng(0)
    ev = np.concatenate([g.uniform(0.05, 3.0, 200), -g.uniform(0.05, 1.0, 100)])
    A = known_spectrum(ev, seed=3)
    q10 = np.quantile(np.abs(ev), 0.1, method="inverted_cdf")
    errs, idx_errs = [], []
    for probes in (2, 16, 128):
        e, ie = [], []
        for seed in range(3):
            r = slq(A, probes=probes, steps=60, seed=seed)
            e.append(abs(r.abs_quantile(0.1) - q10) / q10)
            ie.append(abs(r.index() - 1 / 3))
        errs.append(np.mean(e))
        idx_errs.append(np.mean(ie))
    assert errs[-1] < errs[1] < errs[0] and errs[-1] < 0.02
    assert idx_errs[-1] < idx_errs[0] and idx_errs[-1] < 0.02
    grid, dens = r.density()
    assert (np.trapezoid if hasattr(np, "trapezoid") else np.trapz)(dens, grid) == pytest.approx(1.0, abs=1e-3)


def test_slq_at_zero_point_is_exact(zero_point):
    op, _, ev = zero_point
    r = slq(op, probes=4, steps=30, seed=1)
    assert np.all(r.num_steps == 6)  # each probe breaks down after 2d steps
    x, w = r.pooled()
    np.testing.assert_allclose(np.unique(np.round(x, 10)), np.unique(np.round(ev, 10)), atol=1e-10)
    assert r.abs_quantile(0.1) == pytest.approx(np.quantile(np.abs(ev), 0.1, method="inverted_cdf"), rel=1e-10)
    assert r.negative_mass() == pytest.approx(0.5, abs=0.2)
    lo, hi = r.extremes()
    assert hi == pytest.approx(ev.max(), rel=1e-10) and lo == pytest.approx(ev.min(), rel=1e-10)


def test_slq_residuals_bound_the_distance_to_an_eigenvalue(random_hessian, zero_point):
    """Each node's residual ``beta_m |U[m-1, l]|`` is a Ritz residual: an eigenvalue lies within it
    (and it is much smaller than the node spacing for converged nodes); a broken-down probe is exact."""
    op, _, ev = random_hessian
    r = slq(op, probes=3, steps=12, seed=2)
    assert r.residuals is not None and r.residuals.shape == r.nodes.shape
    for i in range(r.num_probes):
        m = int(r.num_steps[i])
        dist = np.abs(ev[None, :] - r.nodes[i, :m, None]).min(axis=1)
        assert np.all(dist <= r.residuals[i, :m] * (1 + 1e-6) + 1e-10)
        assert r.residuals[i, :m].max() > 1e-6  # 12 steps of a 90-dimensional spectrum: not all exact
    rz = slq(zero_point[0], probes=2, steps=30, seed=1)
    assert np.all(rz.residuals < 1e-8 * np.abs(zero_point[2]).max())
    assert rz.sign_unresolved_mass() == 0.0 and rz.quantile_unresolved_mass(0.1) == 0.0


def test_slq_reports_an_unresolved_cluster_at_zero():
    """30% of the eigenvalues within 1e-6 of 0 among a spread on [-10, 50]: 10 steps cannot resolve
    them, so the quantile and the index are flagged; with steps = P the quadrature is exact."""
    g = np.random.default_rng(1)
    ev = np.concatenate([g.uniform(-1e-6, 1e-6, 60), g.uniform(0.5, 50.0, 100), -g.uniform(0.5, 10.0, 40)])
    A = known_spectrum(ev, seed=4)
    coarse = slq(A, probes=4, steps=10, seed=0)
    assert coarse.quantile_unresolved_mass(0.1) >= 0.05 and coarse.sign_unresolved_mass() >= 0.05
    assert coarse.abs_quantile(0.1) > 100 * np.quantile(np.abs(ev), 0.1, method="inverted_cdf")
    rep = condition_report(A, method="lanczos+slq", probes=4, steps=10, max_iter=40)
    assert rep.uncertainty["lam_q10_resolved"] is False and rep.uncertainty["index_unresolved_mass"] >= 0.05
    fine = slq(A, probes=2, steps=len(ev), seed=0)
    assert fine.quantile_unresolved_mass(0.1) < 0.01


def test_slq_bad_inputs():
    with pytest.raises(ValueError, match="probes must be a positive integer"):
        slq(torch.eye(3, dtype=F64), probes=0)
    with pytest.raises(ValueError, match="distribution must be"):
        slq(torch.eye(3, dtype=F64), distribution="uniform")


def test_slq_with_one_step_warns_that_only_its_trace_means_anything():
    """One step a probe: one node, the probe's Rayleigh quotient. Its trace (Hutchinson's) holds, but its index
    describes those quotients, not the spectrum (much of it unresolved); the call says so. A 1 x 1 operator's single
    step is exact."""
    ev = np.array([-3.0, -1.0, 2.0, 4.0, 5.0])
    A = known_spectrum(ev, seed=2)
    with pytest.warns(UserWarning, match=r"slq\(steps=1\).*use steps >= 2"):
        r = slq(A, probes=400, steps=1, seed=0)
    assert r.sign_unresolved_mass() > 0.3 and r.trace(1)[0] == pytest.approx(ev.sum(), rel=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert slq(torch.full((1, 1), -2.0, dtype=F64), probes=2, steps=1).index() == 1.0
        slq(A, probes=2, steps=2)


# ------------------------------------------------------------------------------------- memory bounds
class DiagOperator:
    """A diagonal operator in float32 (products are cheap, so memory effects can be measured)."""

    def __init__(self, diag):
        self.diag, self.shape, self.dtype, self.device = diag, (len(diag), len(diag)), diag.dtype, diag.device

    def matmat(self, V):  # [P, k] -> [P, k]
        return self.diag[:, None] * V


def _rss_peak_growth(fn):
    """Peak growth of this process's resident set while ``fn`` runs (sampled every 2 ms), and its result."""
    import os
    import threading

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    base = peak = rss()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss())
            stop.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    return max(peak, rss()) - base, out


def test_slq_grouping_does_not_change_the_result(random_hessian):
    op, _, _ = random_hessian
    runs = {g: slq(op, probes=8, steps=15, seed=3, probe_batch=g) for g in (1, 2, 3, 8)}
    for g, r in runs.items():
        assert r.probe_batch == g and r.num_products == 8 * 15
        assert r.basis_bytes == g * 15 * 90 * 8
        np.testing.assert_allclose(r.nodes, runs[8].nodes, rtol=0, atol=1e-10)
        np.testing.assert_allclose(r.weights, runs[8].weights, rtol=0, atol=1e-10)
        np.testing.assert_array_equal(r.num_steps, runs[8].num_steps)
    # a budget chooses the group: 15 steps x 90 x 8 bytes = 10800 bytes per probe
    r = slq(op, probes=8, steps=15, seed=3, max_basis_bytes=3 * 10800 + 1)
    assert r.probe_batch == 3 and r.basis_bytes <= 3 * 10800 + 1
    np.testing.assert_allclose(r.nodes, runs[8].nodes, rtol=0, atol=1e-10)
    # breakdowns inside groups (the zero point: every probe stops after 2d = 6 steps) also agree
    calls = []
    a = slq(zero_point_op(), probes=5, steps=12, seed=0, probe_batch=2, callback=lambda d, t: calls.append((d, t)))
    b = slq(zero_point_op(), probes=5, steps=12, seed=0, probe_batch=5)
    assert np.all(a.num_steps == 6) and np.all(b.num_steps == 6)
    np.testing.assert_allclose(a.nodes, b.nodes, atol=1e-10)
    assert calls[-1] == (60, 60) and all(d2 >= d1 for (d1, _), (d2, _) in zip(calls, calls[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("P,split", [(1000, 3), (1001, 2), (97, 4), (7, 3), (5, 8), (64, 1)])
@pytest.mark.parametrize("c,m", [(1, 1), (1, 9), (3, 7), (2, 0)])
def test_project_out_in_column_slices_is_one_gram_schmidt_pass(dtype, P, split, c, m):
    """The reorthogonalisation's batched slices against one product each: C = X V^T and X - C V."""
    from shortcut_ext.curvature._linop import project_out

    g = torch.Generator().manual_seed(P * 31 + split * 7 + c * 3 + m)
    V = torch.randn(m, P, generator=g, dtype=dtype)
    big = torch.randn(c + 2, P + 5, generator=g, dtype=dtype)
    X = big[1:1 + c, 2:2 + P]  # a view with a row stride of its own, as SLQ's rows of w
    X0 = X.double().clone()
    C = project_out(X, V, split=split)
    C_ref = X0 @ V.double().T
    tol = 1e-12 if dtype == F64 else 1e-4
    assert C.shape == (c, m) and C.dtype == dtype
    torch.testing.assert_close(C.double(), C_ref, rtol=tol, atol=tol * P)
    torch.testing.assert_close(X.double(), X0 - C_ref @ V.double(), rtol=tol, atol=tol * P)
    untouched = big.clone()
    untouched[1:1 + c, 2:2 + P] = X
    assert torch.equal(untouched, big)  # nothing outside the view was written


def test_lanczos_and_slq_reorthogonalise_in_slices_to_the_same_spectrum(random_hessian, monkeypatch):
    """With the slices forced on (P = 90 cut in 3), Lanczos and SLQ give the one-product results."""
    from shortcut_ext.curvature import _linop

    op, _, ev = random_hessian
    ref_l = lanczos(op, k=4, tol=1e-10)
    ref_s = slq(op, probes=4, steps=20, seed=3)
    calls = []
    orig = _linop.project_out

    def spy(X, Vb, split=None):
        calls.append(_linop.reorth_split(Vb) if split is None else split)
        return orig(X, Vb, split)

    monkeypatch.setattr(_linop, "SPLIT_MIN_NUMEL", 0)
    lz_mod = importlib.import_module("shortcut_ext.curvature.lanczos")  # the package exports functions
    slq_mod = importlib.import_module("shortcut_ext.curvature.slq")  # of the same names

    monkeypatch.setattr(lz_mod, "project_out", spy)
    monkeypatch.setattr(slq_mod, "project_out", spy)
    bmm_calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **kw: bmm_calls.append(1) or real_bmm(*a, **kw))
    torch.set_num_threads(3)  # the module's fixture restores the count after its tests
    try:
        r_l = lanczos(op, k=4, tol=1e-10)
        n_l = len(calls)
        r_s = slq(op, probes=4, steps=20, seed=3)
        assert _linop.reorth_split(torch.empty(5, 7, device="meta")) == 1  # not on the CPU: one product
        monkeypatch.setattr(_linop, "SPLIT_MIN_NUMEL", 36)
        assert _linop.reorth_split(torch.empty(5, 7)) == 1 and _linop.reorth_split(torch.empty(4, 9)) == 3
    finally:
        torch.set_num_threads(1)
    assert n_l > 0 and len(calls) > n_l and set(calls) == {3}  # both went through the sliced pass
    assert len(bmm_calls) >= len(calls)  # one batched product of the slices per pass
    scale = np.abs(ev).max()
    np.testing.assert_allclose(r_l.largest, ref_l.largest, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(r_l.smallest, ref_l.smallest, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(r_s.nodes, ref_s.nodes, rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(r_s.weights, ref_s.weights, rtol=0, atol=1e-9)


def zero_point_op():
    net = ShortcutNet(3, 4, 2, init="zero", backend="torch", dtype=F64)
    return HessianOperator(net, data(seed=3), backend="autograd")


def test_slq_group_size_and_bad_budgets():
    # the scale target: P = 5.12e6 float32, 8 probes x 80 steps (13 GB at once)
    assert slq_group_size(5_120_000, 8, 80, torch.float32) == 1  # 3 GiB default
    assert slq_group_size(5_120_000, 8, 80, torch.float32, 5 * 2**30) == 3
    assert slq_group_size(5_120_000, 8, 80, torch.float32, 20 * 2**30) == 8
    assert slq_group_size(100, 8, 80, torch.float64) == 8  # small operators: everything at once
    assert DEFAULT_MAX_BASIS_BYTES == 3 * 2**30
    A = torch.eye(50, dtype=F64)
    with pytest.raises(ValueError, match="max_basis_bytes must hold at least one probe"):
        slq(A, probes=4, steps=10, max_basis_bytes=10 * 50 * 8 - 1)
    with pytest.raises(ValueError, match="probe_batch=4 needs a basis"):
        slq(A, probes=4, steps=10, probe_batch=4, max_basis_bytes=2 * 10 * 50 * 8)
    with pytest.raises(ValueError, match="probe_batch must be a positive integer"):
        slq(A, probes=4, probe_batch=0)
    with pytest.raises(ValueError, match="max_basis_bytes must be a positive integer"):
        slq(A, probes=4, max_basis_bytes=-5)
    r = slq(A, probes=4, steps=10, max_basis_bytes=1, reorthogonalize=False)  # no basis: no budget needed
    assert r.probe_batch == 4 and r.basis_bytes == 0


def test_slq_memory_stays_within_the_budget():
    # P = 250k float32 (1 MB a vector), 8 probes x 40 steps: all bases at once would take 320 MB;
    # a 45 MB budget runs groups of 1 (40 MB)
    P = 250_000
    diag = torch.linspace(-1.0, 2.0, P, dtype=torch.float32)
    growth, r = _rss_peak_growth(lambda: slq(DiagOperator(diag), probes=8, steps=40, seed=0,
                                             max_basis_bytes=45 * 2**20))
    assert r.probe_batch == 1 and r.basis_bytes == 40 * P * 4
    assert growth < 150 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    # the quadrature is still right: the mean of the spectrum is exact with Rademacher probes
    assert r.moment(1) == pytest.approx(float(diag.double().mean()), abs=1e-5)


def test_lanczos_thick_restart_in_a_bounded_basis():
    # clustered ends (the small init's difficulty): 5 values within 1% at each end, a bulk in between
    g = np.random.default_rng(5)
    ev = np.concatenate([3.0 - 0.03 * g.random(8), -2.0 + 0.02 * g.random(8), g.uniform(-1.5, 2.5, 384)])
    A = known_spectrum(ev, seed=6)
    ex = np.sort(ev)
    bounded = lanczos(A, k=5, max_iter=30, verify=False)  # no restarts: stops with an unconverged basis
    assert bounded.stop_reason == "max_iter" and not bounded.converged and bounded.restarts == 0
    r = lanczos(A, k=5, max_iter=30, max_products=3000, verify=False, tol=1e-10)
    assert r.restarts >= 1 and r.max_vectors == 30 and r.num_vectors <= 30 and r.converged
    assert r.stop_reason == "converged" and r.num_products <= 3000 + 10
    np.testing.assert_allclose(r.largest, ex[::-1][:5], rtol=0, atol=1e-9)
    np.testing.assert_allclose(r.smallest, ex[:5], rtol=0, atol=1e-9)
    assert np.all(r.largest_residuals < 1e-9 * 3) and np.all(r.smallest_residuals < 1e-9 * 3)
    # a product budget stops the run (and says so)
    short = lanczos(A, k=5, max_iter=30, max_products=50, verify=False)
    assert short.stop_reason == "max_products" and short.num_products == 50 + 10


@pytest.mark.parametrize("method", ["lanczos", "block"])
def test_lanczos_restarts_on_hessians(random_hessian, zero_point, method):
    op, _, ev = random_hessian
    kw = dict(k=4, max_iter=24, max_products=600, tol=1e-10)
    r = lanczos(op, **kw) if method == "lanczos" else block_lanczos(op, block_size=2, **kw)
    scale = np.abs(ev).max()
    assert r.restarts >= 1 and r.converged
    np.testing.assert_allclose(r.largest, ev[::-1][:4], rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(r.smallest, ev[:4], rtol=0, atol=1e-9 * scale)
    # the zero point: breakdowns (invariant subspaces), multiplicities and restarts together
    opz, _, evz = zero_point
    kz = dict(k=8, max_iter=20, max_products=400)
    rz = lanczos(opz, **kz) if method == "lanczos" else block_lanczos(opz, block_size=2, **kz)
    sz = np.abs(evz).max()
    assert rz.restarts >= 1 and rz.converged
    np.testing.assert_allclose(rz.largest, evz[::-1][:8], rtol=0, atol=1e-9 * sz)
    np.testing.assert_allclose(rz.smallest, evz[:8], rtol=0, atol=1e-9 * sz)


def test_lanczos_basis_budget():
    assert basis_capacity(5_120_000, torch.float32) == 157  # the scale target: 3 GiB
    assert basis_capacity(1000, F64, 80_000) == 10
    A = known_spectrum(np.linspace(-1, 1, 200), seed=7)
    r = lanczos(A, k=2, max_basis_bytes=12 * 200 * 8)  # 12 vectors fit
    assert r.max_vectors == 12 and r.basis_bytes == 12 * 200 * 8 and r.num_vectors <= 12
    with pytest.raises(ValueError, match="max_iter=50 needs a basis"):
        lanczos(A, k=2, max_iter=50, max_basis_bytes=12 * 200 * 8)
    with pytest.raises(ValueError, match="max_basis_bytes must hold at least one basis vector"):
        lanczos(A, k=2, max_basis_bytes=100)
    with pytest.raises(ValueError, match="max_products must be a positive integer"):
        lanczos(A, k=2, max_products=0)
    # a default-sized basis at P = 5.12e6 would need 300 vectors (6 GB): the default budget caps it
    assert min(max(300, 20 * 5), basis_capacity(5_120_000, torch.float32)) == 157


# ------------------------------------------------------------------------------------- traces
def test_hutchpp_converges_faster_than_hutchinson():
    ev = 1.0 / np.arange(1, 201) ** 2  # fast decay: the regime Hutch++ is built for
    A = known_spectrum(ev, seed=4)
    exact = ev.sum()
    err = {}
    for m in (12, 48, 192):
        err[m] = (np.mean([abs(hutchpp_trace(A, m, seed=s).estimate - exact) for s in range(5)]),
                  np.mean([abs(hutchinson_trace(A, m, seed=s).estimate - exact) for s in range(5)]))
    assert err[192][0] < err[48][0] < err[12][0]
    assert err[192][0] < 0.2 * err[192][1]
    assert err[192][0] / exact < 1e-3
    r = hutchpp_trace(A, 30)
    assert r.num_products == 30 and r.method == "meyer2021hutchpp"


def test_trace_of_hessian(random_hessian):
    op, _, ev = random_hessian
    r = hutchpp_trace(op, 90, seed=0)  # 30 sketch columns of 90: close, not exact
    assert abs(r.estimate - ev.sum()) < 0.1 * np.abs(ev).sum()
    with pytest.raises(ValueError, match="num_products must be an integer >= 3"):
        hutchpp_trace(op, 2)


# ------------------------------------------------------------------------------------- power, condition
def test_power_iteration(random_hessian, zero_point):
    _, D, ev = random_hessian
    A = known_spectrum([-6.0, 3.0, 2.0, 1.0, 0.5, -0.1], seed=5)
    r = power_iteration(A, tol=1e-12, max_iter=2000)
    assert r.eigenvalue == pytest.approx(-6.0, rel=1e-6) and not r.sign_ambiguous and r.converged
    r = power_iteration(D, max_iter=3000, tol=1e-13)
    assert r.abs_eigenvalue == pytest.approx(np.abs(ev).max(), rel=1e-4)
    # +-|lambda|max at the zero point: ||Av|| still converges, the sign is flagged
    _, Dz, evz = zero_point
    rz = power_iteration(Dz, max_iter=200)
    assert rz.abs_eigenvalue == pytest.approx(np.abs(evz).max(), rel=1e-8) and rz.sign_ambiguous


def test_power_iteration_stopped_early_returns_a_consistent_pair():
    """Stopped by max_iter, the eigenvalue, residual and vector must belong together: v was advanced
    past the last product, so the eigenvalue came out +||Av|| with residual 0 for a -3 eigenvector."""
    for diag, iters in (([-3.0, 1.0, 0.5], 5), ([-3.0, 2.999, 1.0], 200)):
        A = torch.diag(torch.tensor(diag, dtype=F64))
        r = power_iteration(A, max_iter=iters)
        assert not r.converged
        true_res = float((A @ r.vector - r.eigenvalue * r.vector).norm())
        assert r.residual == pytest.approx(true_res, abs=1e-12)
        if not r.sign_ambiguous:
            assert r.eigenvalue == pytest.approx(float(r.vector @ A @ r.vector), rel=1e-12)
        assert r.eigenvalue < 0 or r.sign_ambiguous  # the dominant eigenvalue is -3


def test_hutchinson_estimate_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(60, 60, generator=g, dtype=F64)
    A = M + M.T
    est = {b: hutchinson_trace(A, 30, seed=3, batch=b).estimate for b in (1, 7, 10, 64)}
    assert max(est.values()) - min(est.values()) < 1e-9 * max(1.0, abs(est[64])), est


def test_condition_report_q0_on_a_resolved_spectrum():
    A = known_spectrum(np.repeat([-2.0, 1.0, 3.0], 20), seed=6)
    rep = condition_report(A, method="lanczos+slq", q=0.0, probes=2, steps=10, max_iter=30)
    assert rep.uncertainty["lam_q10_unresolved_mass"] == 0.0 and rep.uncertainty["lam_q10_resolved"] is True


def test_condition_report_exact_and_estimated(random_hessian):
    op, _, ev = random_hessian
    ex = condition_report(op, method="exact")
    a = np.abs(ev)
    assert ex.lam_max == pytest.approx(a.max(), rel=1e-12)
    assert ex.cond == pytest.approx(a.max() / a.min(), rel=1e-8)
    assert ex.cond_q10 == pytest.approx(a.max() / np.quantile(a, 0.1, method="inverted_cdf"), rel=1e-10)
    assert ex.index == pytest.approx((ev < 0).mean())
    est = condition_report(op, method="lanczos+slq", probes=32, steps=40, seed=0)
    assert est.lam_max == pytest.approx(a.max(), rel=1e-8)
    assert np.isnan(est.cond) and est.uncertainty["lam_max_residual"] < 1e-8 * a.max()
    assert abs(est.lam_q10 - ex.lam_q10) < 4 * est.uncertainty["lam_q10_probe_std"] + 0.1 * ex.lam_q10
    assert abs(est.index - ex.index) < 4 * est.uncertainty["index_std_error"] + 0.02


def test_condition_report_lanczos_basis_stays_in_budget(random_hessian, monkeypatch):
    """The default Lanczos basis of the estimate (200 vectors) shrinks to what the basis budget holds."""
    import sys

    lz = sys.modules["shortcut_ext.curvature.lanczos"]  # the package's `lanczos` is the function
    op, _, ev = random_hessian
    P = op.shape[0]
    monkeypatch.setattr(lz, "DEFAULT_MAX_BASIS_BYTES", 30 * P * 8)  # 30 float64 vectors
    est = condition_report(op, method="lanczos+slq", probes=4, steps=20, seed=0)
    assert est.uncertainty["lanczos_vectors"] <= 30
    assert est.lam_max == pytest.approx(np.abs(ev).max(), rel=1e-3)


def test_report_zero_and_singular_spectra():
    z = report_from_eigenvalues(np.zeros(10))
    assert z.lam_max == 0 and np.isnan(z.cond) and z.index == 0.0
    s = report_from_eigenvalues([2.0, -1.0, 0.0, 1e-20])
    assert s.cond == np.inf and s.index == 0.25 and s.lam_max == 2.0


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_float32_eigenvalues_get_float32s_zero_tolerance(kind):
    """Zero eigenvalues of a float32 Hessian come out as +-1e-7 |lambda|max: float64's tolerance counted
    half of them negative (the index doubled) and the smallest one as |lambda|min (cond finite)."""
    from shortcut_ext.train import spectrum_probes

    ev = np.concatenate([[2.0, 1.0, -0.5], 3e-7 * np.array([1.0, -1.0, 1.0, -1.0])])
    ev32 = torch.tensor(ev, dtype=torch.float32) if kind == "torch" else ev.astype(np.float32)
    for rep in (report_from_eigenvalues(ev32).as_dict(), spectrum_probes(ev32)):
        assert rep["index"] == pytest.approx(1 / 7) and rep["cond"] == np.inf
    # float64 eigenvalues, or a stated dtype, keep float64's tolerance: those are small but real
    for rep in (report_from_eigenvalues(ev).as_dict(), spectrum_probes(ev),
                report_from_eigenvalues(ev32, dtype=torch.float64).as_dict(),
                spectrum_probes(ev32, dtype=torch.float64)):
        assert rep["index"] == pytest.approx(3 / 7) and rep["cond"] == pytest.approx(2.0 / 3e-7, rel=1e-6)


# ------------------------------------------------------------------------------------- the CLI
def test_spectrum_command_writes_json_and_figures(tmp_path):
    import json

    from shortcut_ext.cli import main

    out = tmp_path / "spec"
    rc = main(["spectrum", "--shortcut", "2", "--units", "6", "--width", "3", "--init", "zero", "--data", "synthetic",
               "--samples", "40", "--probes", "3", "--steps", "10", "--top", "4", "--batch-size", "16",
               "--backend", "fused", "--no-progress", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "spectrum.json").read_text())
    assert res["num_params"] == 6 * 2 * 9
    assert res["theory"]["method"] == "closed_form" and res["theory"]["lanczos_rel_error"] < 1e-10
    assert res["theory"]["multiplicities"] == [18] * 6
    assert res["lanczos"]["largest"] == pytest.approx(res["exact"]["top"][:4], rel=1e-10)
    assert res["theory"]["slq_q10_rel_error"] < 1e-8  # probes break down after 2d steps: exact quadrature
    for name in ("density.png", "extremes.png", "quantiles.png"):
        assert (out / name).stat().st_size > 1000
    assert res["slq"]["probe_batch"] == 3 and res["lanczos"]["max_vectors"] <= 108


def test_spectrum_command_memory_flags(tmp_path):
    import json

    from shortcut_ext.cli import main

    common = ["spectrum", "--units", "4", "--width", "3", "--init", "small", "--samples", "20", "--probes", "3",
              "--steps", "8", "--top", "2", "--backend", "autograd", "--no-progress", "--no-plots"]
    per_vector = 4 * 2 * 9 * 8  # P = 72 float64
    rc = main(common + ["--probe-batch", "2", "--max-iter", "30", "--lanczos-products", "120",
                        "--basis-gib", str(30 * per_vector / 2**30), "--out", str(tmp_path / "a")])
    assert rc == 0
    res = json.loads((tmp_path / "a" / "spectrum.json").read_text())
    assert res["slq"]["probe_batch"] == 2 and res["lanczos"]["max_vectors"] == 30
    assert res["lanczos"]["largest"] == pytest.approx(res["exact"]["top"][:2], rel=1e-8)
    with pytest.raises(SystemExit, match="max_iter=40 needs a basis"):
        main(common + ["--max-iter", "40", "--basis-gib", str(30 * per_vector / 2**30), "--out", str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="one probe's Lanczos basis"):
        main(common + ["--basis-gib", str(7 * per_vector / 2**30), "--max-iter", "5", "--out", str(tmp_path / "c")])


def test_spectrum_command_checks_device(tmp_path):
    from shortcut_ext.cli import main

    common = ["spectrum", "--units", "2", "--width", "3", "--samples", "10", "--no-progress", "--no-plots",
              "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"--device must be a torch device .* got 'gpu0'"):
        main(common + ["--device", "gpu0"])
    with pytest.raises(SystemExit, match=r"--device must be cpu or cuda\[:N\], got 'meta'"):
        main(common + ["--device", "meta"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(SystemExit, match="no CUDA device is visible" if visible == 0 else "CUDA device"):
        main(common + ["--device", f"cuda:{visible}" if visible else "cuda"])
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_spectrum_command_resumes_after_an_interruption(tmp_path, monkeypatch):
    """An interrupted spectrum keeps its finished Lanczos result and SLQ probe groups
    (spectrum.checkpoint.json); the rerun redoes only the rest and gives the uninterrupted numbers."""
    import json

    from shortcut_ext.cli import main
    import importlib

    slq_mod = importlib.import_module("shortcut_ext.curvature.slq")

    args = ["spectrum", "--units", "5", "--width", "3", "--init", "small", "--samples", "30", "--probes", "5",
            "--steps", "9", "--top", "3", "--probe-batch", "2", "--no-progress", "--no-plots"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "spectrum.json").read_text())
    assert whole["resumed"]["lanczos"] is False and whole["resumed"]["slq_probes"] == 0

    real, calls = slq_mod._lanczos_recurrences, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the second probe group
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "cut"
    monkeypatch.setattr(slq_mod, "_lanczos_recurrences", interrupted)
    assert main(args + ["--out", str(out)]) == 130  # the command's one-line "interrupted" exit
    assert not (out / "spectrum.json").exists()
    ck = json.loads((out / "spectrum.checkpoint.json").read_text())
    assert ck["lanczos"] is not None and sorted(ck["slq"]) == ["0", "1"]
    monkeypatch.setattr(slq_mod, "_lanczos_recurrences", real)
    calls.clear()
    assert main(args + ["--out", str(out)]) == 0
    res = json.loads((out / "spectrum.json").read_text())
    assert res["resumed"]["lanczos"] is True and res["resumed"]["slq_probes"] == 2
    assert res["timings_s"]["lanczos"] == ck["seconds"]["lanczos"]  # not rerun: the earlier process's time
    for key in ("largest", "smallest", "largest_residuals"):
        assert res["lanczos"][key] == whole["lanczos"][key]
    np.testing.assert_allclose(np.array(res["slq"]["nodes"]), np.array(whole["slq"]["nodes"]), rtol=1e-12, atol=1e-14)
    assert res["slq"]["abs_quantiles"] == pytest.approx(whole["slq"]["abs_quantiles"], rel=1e-12)
    assert res["condition"] == pytest.approx(whole["condition"])
    # another configuration in the same folder ignores (and replaces) the checkpoint
    assert main(args[:-4] + ["--probe-batch", "3", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    other = json.loads((out / "spectrum.json").read_text())
    assert other["resumed"]["lanczos"] is False and other["resumed"]["slq_probes"] == 0
    assert json.loads((out / "spectrum.checkpoint.json").read_text())["config"]["probe_batch"] == 3


def test_slq_resumes_from_done_probes():
    A = known_spectrum(np.linspace(-1, 2, 30), seed=8)
    groups = []
    whole = slq(A, probes=5, steps=8, seed=3, probe_batch=2,
                on_group=lambda g0, g1, a, b, n: groups.append((g0, g1, a, b, n)))
    assert [(g0, g1) for g0, g1, *_ in groups] == [(0, 2), (2, 4), (4, 5)]
    done = {}
    for g0, g1, a, b, n in groups[:2]:
        for i in range(g0, g1):
            done[i] = (a[i - g0], b[i - g0], n[i - g0])
    ran = []
    resumed = slq(A, probes=5, steps=8, seed=3, probe_batch=2, done=done, on_group=lambda g0, g1, *r: ran.append(g0))
    assert ran == [4]  # only the group that had not run
    np.testing.assert_allclose(resumed.nodes, whole.nodes, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(resumed.weights, whole.weights, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"done\[0\] holds 2 / 2 coefficients for 5 steps"):
        slq(A, probes=5, steps=8, seed=3, probe_batch=2, done={0: ([1.0, 2.0], [0.5, 0.5], 5), 1: done[1]})


# ------------------------------------------------------------------------- start vectors, checks, counts
def test_start_vectors_are_used():
    A = torch.diag(torch.arange(1.0, 9.0, dtype=F64))
    e = torch.zeros(8, dtype=F64)
    e[2] = 1.0  # an eigenvector: the Krylov space of v0 alone is invariant at once
    r = lanczos(A, k=1, v0=e, verify=False)
    assert r.breakdowns >= 1 and r.segments[0][1] - r.segments[0][0] == 1
    r = lanczos(A, k=2, v0=torch.ones(8, dtype=torch.float32))  # a float32 v0 for a float64 operator
    np.testing.assert_allclose(r.largest, [8.0, 7.0], rtol=1e-12)
    np.testing.assert_allclose(block_lanczos(A, k=2, v0=torch.ones(8, 2, dtype=F64)).smallest, [1.0, 2.0], rtol=1e-12)
    for bad, err in ((torch.tensor(1.0, dtype=F64), "shape \\[8\\]"), (torch.ones(3, dtype=F64), "shape \\[8\\]"),
                     (torch.zeros(8, dtype=F64), "finite and non-zero"), (torch.ones(8, dtype=torch.int64), "floating")):
        with pytest.raises((ValueError, TypeError), match=err):
            lanczos(A, k=1, v0=bad)


def test_power_iteration_start_vector_and_bad_inputs():
    A = torch.diag(torch.tensor([5.0, 0.0, 0.0], dtype=F64))
    r = power_iteration(A, v0=torch.tensor([0.0, 1.0, 0.0], dtype=F64))  # A v0 = 0: says nothing about |lambda|max
    assert r.converged and r.abs_eigenvalue == pytest.approx(5.0, rel=1e-10)
    assert power_iteration(torch.zeros(3, 3, dtype=F64)).abs_eigenvalue == 0.0
    with pytest.raises(ValueError, match="finite and non-zero"):
        power_iteration(A, v0=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="tol must be positive"):
        power_iteration(A, tol=-1.0)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        power_iteration(A, max_iter=0)
    assert power_iteration(A, max_iter=np.int64(50)).abs_eigenvalue == pytest.approx(5.0)


def test_operator_outputs_are_checked():
    class Op:
        def __init__(self, f):
            self.f, self.shape, self.dtype = f, (4, 4), F64

        def matmat(self, V):
            return self.f(V)

    for f, err in ((lambda V: V.T, r"must return shape \[P, k\] = \[4, 1\]"), (lambda V: V[:, 0] if V.shape[1] > 1 else V[:3],
                   r"must return shape"), (lambda V: [1.0], "must return a tensor"),
                   (lambda V: V * float("nan"), "non-finite")):
        with pytest.raises((ValueError, TypeError, FloatingPointError), match=err):
            lanczos(Op(f), k=1)
    np.testing.assert_allclose(lanczos(Op(lambda V: 2 * V.numpy()), k=1).largest, [2.0])  # numpy results are fine
    with pytest.raises(FloatingPointError, match="non-finite"):
        slq(torch.full((3, 3), float("inf"), dtype=F64), probes=1, steps=2)
    # one bad value among finite ones, in a [P, k] product laid out either way (the check reduces the transpose
    # of a contiguous [k, P] as it lies), float32 and float64
    for dtype in (torch.float32, F64):
        for transposed in (False, True):
            for bad in (float("nan"), float("inf"), -float("inf")):
                def mm(V, bad=bad, transposed=transposed):
                    out = (2 * V.T).contiguous().T if transposed else 2 * V.contiguous()
                    out[3, 1] = bad
                    return out
                op = Op(mm)
                op.dtype = dtype
                with pytest.raises(FloatingPointError, match="non-finite"):
                    as_torch_operator(op).matmat(torch.ones(4, 2, dtype=dtype))


def test_product_counts_are_per_call():
    T = as_torch_operator(torch.diag(torch.arange(1.0, 7.0, dtype=F64)))
    assert [hutchpp_trace(T, 6).num_products for _ in range(2)] == [6, 6]
    assert hutchinson_trace(T, 5).num_products == 5
    n0 = T.num_products
    r = lanczos(T, k=1)
    assert r.num_products == T.num_products - n0
    n0 = T.num_products
    assert slq(T, probes=2, steps=3).num_products == T.num_products - n0 == 6


def test_one_end_has_no_abs_max_and_restarts_need_room():
    A = torch.diag(torch.tensor([1.0, -5.0, 2.0], dtype=F64))
    r = lanczos(A, k=1, which="largest")
    assert r.largest[0] == pytest.approx(2.0) and np.isnan(r.abs_max) and np.isnan(r.abs_max_residual)
    assert lanczos(A, k=1).abs_max == pytest.approx(5.0)
    A60 = torch.diag(torch.linspace(-1.0, 2.0, 60, dtype=F64))
    with pytest.raises(ValueError, match="raise max_iter to at least 18"):
        lanczos(A60, k=8, max_iter=12, max_products=2000)
    r = lanczos(A60, k=5, max_iter=12, max_products=2000)
    assert r.restarts > 0 and r.converged


def test_integer_arguments_accept_numpy_integers():
    A = torch.diag(torch.arange(1.0, 7.0, dtype=F64))
    assert lanczos(A, k=np.int64(2)).largest.tolist() == pytest.approx([6.0, 5.0])
    assert slq(A, probes=np.int32(2), steps=np.int64(3)).num_probes == 2
    assert hutchinson_trace(A, np.int64(4)).num_products == 4
    for call in (lambda: lanczos(A, k=True), lambda: slq(A, probes=2.0), lambda: condition_report(A, k=0)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            call()


def test_condition_report_of_dense_tensors_and_float32_zero_tolerance():
    D = torch.diag(torch.tensor([1.0, 2.0, -3.0], dtype=F64))
    for op in (D, D.numpy(), aslinearoperator(D.numpy())):
        rep = condition_report(op)
        assert rep.cond == pytest.approx(3.0) and rep.index == pytest.approx(1 / 3)
    # 190 zero eigenvalues: in float32 they come out as rounding noise ~1e-7 |lambda|max, which is
    # neither negative nor a finite condition number
    g = np.random.default_rng(0)
    vals = np.r_[np.zeros(190), np.linspace(1.0, 2.0, 10)]
    Q, _ = np.linalg.qr(g.standard_normal((200, 200)))
    A32 = torch.tensor((Q * vals) @ Q.T).float()
    rep = condition_report(A32, method="exact")
    assert rep.cond == float("inf") and rep.cond_q10 == float("inf") and rep.index == 0.0
    assert rep.uncertainty["num_zero"] == 190
    assert rep.uncertainty["zero_tol"] == pytest.approx(200 * 2.0**-23 * rep.lam_max)
    est = condition_report(A32, method="lanczos+slq", probes=16, steps=30)
    assert est.index < 0.02 and est.cond_q10 == float("inf")
    assert slq(A32, probes=16, steps=30).index() < 0.02
    assert slq(A32.double(), probes=16, steps=30).index() < 0.02
    with pytest.raises(ValueError, match="eigenvalues must be finite"):
        report_from_eigenvalues([float("nan"), 1.0, -2.0])
    with pytest.raises(FloatingPointError, match="nan or inf"):
        condition_report(torch.full((3, 3), float("nan"), dtype=F64), method="exact")


def test_random_starts_are_not_the_initial_weights_of_the_same_seed():
    """A net built with seed s draws its weights from manual_seed(s); Lanczos, power iteration, SLQ
    and the trace estimators used to draw their vectors from the same generator, so with equal seeds
    the start vector was the initial weight vector itself (cosine 1.0).  Each now has its own stream."""
    P = 300
    w = torch.randn(P, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = {}

    class Recorder:
        shape, dtype = (P, P), np.float64

        def __init__(self, name):
            self.name = name

        def matmat(self, V):
            V = np.asarray(V)
            seen.setdefault(self.name, V[:, 0].copy())
            return V * np.linspace(1.0, 2.0, P)[:, None]

        def matvec(self, v):
            return self.matmat(np.asarray(v).reshape(P, 1))[:, 0]

    lanczos(aslinearoperator(Recorder("lanczos")), k=1, seed=0, max_iter=20)
    power_iteration(aslinearoperator(Recorder("power")), max_iter=3, seed=0)
    slq(aslinearoperator(Recorder("slq")), probes=1, steps=5, seed=0)
    hutchinson_trace(aslinearoperator(Recorder("hutchinson")), num_products=2, seed=0, distribution="gaussian")
    hutchpp_trace(aslinearoperator(Recorder("hutch++")), num_products=6, seed=0, distribution="gaussian")
    assert set(seen) == {"lanczos", "power", "slq", "hutchinson", "hutch++"}
    vecs = {k: torch.as_tensor(v) for k, v in seen.items()}
    del vecs["hutchinson"]  # SLQ's probes, by design (its first moment is Hutchinson's estimator)
    for name, v in vecs.items():
        cos = abs(float(v @ w / (v.norm() * w.norm())))
        assert cos < 0.3, f"{name}'s first vector has cosine {cos:.3f} with the seed's initial weights"
    for a, b in itertools.combinations(vecs, 2):
        cos = abs(float(vecs[a] @ vecs[b] / (vecs[a].norm() * vecs[b].norm())))
        assert cos < 0.3, f"{a} and {b} start from the same direction (cosine {cos:.3f})"


def test_an_operator_that_reuses_its_output_buffer():
    """An operator returning the same buffer at every call (a CUDA-graph replay does) corrupted SLQ: its Lanczos
    vector was that buffer, overwritten by the next product; nodes fell outside the spectrum without an error."""
    P = 120
    diag = torch.linspace(-1, 2, P, dtype=F64)

    class Replay:  # static input and output buffers, as captured graphs have
        shape, dtype = (P, P), F64

        def __init__(self, reuse):
            self.reuse, self.bufs = reuse, {}

        def matmat(self, V):
            if not self.reuse:
                return diag[:, None] * V
            sin, sout = self.bufs.setdefault(V.shape[1], (torch.empty(P, V.shape[1], dtype=F64),
                                                          torch.empty(P, V.shape[1], dtype=F64)))
            sin.copy_(V)
            return torch.mul(diag[:, None], sin, out=sout)

    class ScipyReplay(Replay):  # the same through a scipy LinearOperator returning one numpy buffer
        def as_scipy(self):
            from scipy.sparse.linalg import LinearOperator

            def mm(V):
                return self.matmat(torch.from_numpy(np.asarray(V).reshape(P, -1))).numpy()

            return LinearOperator((P, P), matvec=mm, matmat=mm, dtype=np.float64)

    for kw in ({"probe_batch": 1}, {}):
        want, got = slq(Replay(False), probes=4, steps=20, **kw), slq(Replay(True), probes=4, steps=20, **kw)
        assert want.nodes.min() >= -1 - 1e-9 and want.nodes.max() <= 2 + 1e-9
        np.testing.assert_allclose(got.nodes, want.nodes, rtol=0, atol=1e-12)
        got = slq(ScipyReplay(True).as_scipy(), probes=4, steps=20, **kw)
        np.testing.assert_allclose(got.nodes, want.nodes, rtol=0, atol=1e-12)
    for fn in (lambda A: lanczos(A, k=3).largest, lambda A: block_lanczos(A, k=3).smallest,
               lambda A: power_iteration(A, max_iter=50).eigenvalue):
        np.testing.assert_allclose(fn(Replay(True)), fn(Replay(False)), rtol=0, atol=1e-12)


def _planted(P=120, seed=0):
    """``A = Q diag(ev) Q^T`` with a triple top eigenvalue 5, then 4, a double bottom -3 and a bulk in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    ev = torch.cat([torch.tensor([5.0, 5.0, 5.0, 4.0]), torch.linspace(-1, 1, P - 6),
                    torch.tensor([-3.0, -3.0])]).double()
    return Q @ torch.diag(ev) @ Q.T, np.sort(ev.numpy()), g


def test_block_lanczos_fills_a_one_column_v0_to_the_block_size():
    """Not tested: ``block_lanczos`` given a single start vector ``v0 [P]`` with ``block_size`` 3 (the block is
    filled with random directions orthogonal to it).  A block of one would see the triple eigenvalue 5 once;
    the filled block finds its multiplicity: the 4 largest and smallest converged Ritz values are the planted
    ones (eigvalsh), and the filled start keeps v0's direction (v0 = an eigenvector of 4 gives 4 at once)."""
    A, true, g = _planted()
    v0 = torch.randn(A.shape[0], generator=g, dtype=torch.float64)
    r = block_lanczos(A, k=4, block_size=3, v0=v0)
    assert r.converged
    np.testing.assert_allclose(r.largest, true[::-1][:4], rtol=0, atol=1e-9)
    np.testing.assert_allclose(r.smallest, true[:4], rtol=0, atol=1e-9)
    _, U = torch.linalg.eigh(A)
    first = block_lanczos(A, k=1, block_size=3, v0=U[:, -4], max_iter=3, which="largest", verify=False,
                          compute_residuals=False)  # one block: v0 and two random directions
    assert sorted(np.round(first.ritz_values, 8)).count(4.0) == 1
    with pytest.raises(ValueError, match="v0 must be finite and non-zero"):
        block_lanczos(A, k=2, block_size=3, v0=torch.zeros(A.shape[0], dtype=torch.float64))


def test_max_products_stops_after_exactly_that_many_products():
    """Not tested: the ``max_products`` limit cutting a block short (7 = 4 + 3, 20 = 5 x 4 products with blocks of
    4) and single-vector Lanczos under it.  Reference: a scipy operator that counts its products; each run uses
    exactly ``max_products`` (residuals off), says "max_products", and its Ritz values interlace the spectrum
    (inside [-3, 5]) and improve with more products (the Krylov spaces are nested: the same seed)."""
    from scipy.sparse.linalg import LinearOperator

    A, true, _ = _planted()
    An, P, count = A.numpy(), A.shape[0], [0]

    def mm(V):
        V = np.asarray(V)
        count[0] += V.shape[1]
        return An @ V

    op = LinearOperator((P, P), matvec=lambda v: mm(v.reshape(-1, 1)).ravel(), matmat=mm, dtype=np.float64)
    for run in (lambda mp: block_lanczos(op, k=3, block_size=4, max_iter=60, max_products=mp, verify=False,
                                         compute_residuals=False),
                lambda mp: lanczos(op, k=3, max_iter=60, max_products=mp, verify=False, compute_residuals=False)):
        prev = None
        for mp in (7, 20, 40):
            count[0] = 0
            r = run(mp)
            assert count[0] == r.num_products == mp and r.stop_reason == "max_products", (mp, count[0], r.stop_reason)
            assert true[0] - 1e-12 <= r.smallest.min() and r.largest.max() <= true[-1] + 1e-12
            if prev is not None:
                assert np.all(r.largest >= prev.largest - 1e-12) and np.all(r.smallest <= prev.smallest + 1e-12)
            prev = r
    np.testing.assert_allclose(prev.largest[:2], [5.0, 5.0], atol=1e-6)  # 40 products: the top is found


# ------------------------------------------------------------------ the exact path's symmetrisation
@pytest.mark.parametrize("n, block", [(1, 512), (2, 1), (5, 2), (7, 3), (64, 64), (65, 64), (130, 16), (600, 512)])
def test_symmetrize_lower_in_tiles_is_the_full_symmetrisation_bit_for_bit(n, block):
    """The exact path used to form D - D^T and (D + D^T) / 2 at full size; the tiled version gives the same
    asymmetry and, in the triangle eigvalsh reads, the same matrix, so the same eigenvalues, bit for bit."""
    from shortcut_ext.curvature.condition import symmetrize_lower_

    g = torch.Generator().manual_seed(n)
    D0 = torch.randn(n, n, generator=g, dtype=F64)
    D0 = D0 + D0.T + 1e-7 * torch.randn(n, n, generator=g, dtype=F64)  # an assembled Hessian's asymmetry
    D = D0.clone()
    asym = symmetrize_lower_(D, block=block)
    S = 0.5 * (D0 + D0.T)
    assert asym == float((D0 - D0.T).abs().max()) and (n == 1 or asym > 0)
    assert torch.equal(D.tril(), S.tril())
    assert torch.equal(torch.linalg.eigvalsh(D), torch.linalg.eigvalsh(S))
    # outside the diagonal tiles the upper triangle is the input's
    rows, cols = torch.triu_indices(n, n, 1)
    off = (rows // block) != (cols // block)
    assert torch.equal(D[rows[off], cols[off]], D0[rows[off], cols[off]])


@pytest.mark.parametrize("where", [(599, 3), (3, 599), (300, 300), (0, 0)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_entry_anywhere_is_refused(where, bad):
    from shortcut_ext.curvature.condition import symmetrize_lower_

    D = torch.eye(600, dtype=F64)
    D[where] = bad
    assert not math.isfinite(symmetrize_lower_(D.clone()))
    with pytest.raises(FloatingPointError, match="nan or inf"):
        condition_report(D, method="exact")


def test_exact_report_leaves_the_callers_matrix_alone_and_takes_huge_finite_entries():
    A = torch.tensor([[2.0, 1.0 + 1e-12], [1.0, 3.0]], dtype=F64)
    before = A.clone()
    rep = condition_report(A, method="exact")
    assert torch.equal(A, before) and rep.uncertainty["asymmetry"] == pytest.approx(1e-12, rel=1e-3)
    big = torch.tensor([[1.0, 1e308], [-1e308, 1.0]], dtype=F64)  # D - D^T overflows; the entries are finite
    rep = condition_report(big, method="exact")
    assert rep.uncertainty["asymmetry"] == float("inf") and rep.lam_max == pytest.approx(1.0)
