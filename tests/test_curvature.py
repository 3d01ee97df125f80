"""HessianOperator against dense torch.func Hessians (float64), and its interface and errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shortcut_ext.curvature import (
    MAX_DENSE_PARAMS,
    HessianOperator,
    condition_report,
    dense_hessian_func,
    fused_hvp_available,
    hessian_probes,
)
from shortcut_ext.models import PlainNet, ShortcutNet
from testing import one_thread  # noqa: F401 (the fixture)

F64 = torch.float64
BACKENDS = ("autograd", "func", "fused")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_data(m=10, p=3, q=3, seed=0, loss="mse"):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m, p, generator=g, dtype=F64)
    if loss == "mse":
        Y = X[:, :q] @ torch.randn(q, q, generator=g, dtype=F64) * 0.5 + 0.3 * torch.randn(m, q, generator=g, dtype=F64)
    else:
        Y = torch.randint(0, q, (m,), generator=g)
    return X, Y


def make_net(kind, init, acts, d=3, units=2, seed=0, **kw):
    if kind == "plain":
        return PlainNet(d, units * 2, activation=acts[1], init=init, seed=seed, backend="torch", dtype=F64, **kw)
    return ShortcutNet(d, units, kind, *acts, init=init, scale=1.0 if init == "small" else 0.01, seed=seed,
                       backend="torch", dtype=F64, **kw)


def split(X, Y, sizes):
    out, i = [], 0
    for s in sizes:
        out.append((X[i:i + s], Y[i:i + s]))
        i += s
    return out


def rel_err(A, B):
    return float((A - B).abs().max() / B.abs().max().clamp_min(1e-300))


# (kind, init, (pre, mid, post)): n in {1, 2, 3} and plain nets; relu only at random non-zero weights
CASES = [
    (1, "zero", ("identity", "identity", "identity")),
    (1, "xavier", ("tanh", "identity", "tanh")),
    (2, "zero", ("identity", "identity", "identity")),
    (2, "zero", ("tanh", "tanh", "ssigmoid")),
    (2, "xavier", ("ssigmoid", "relu", "identity")),
    (2, "small", ("identity", "tanh", "tanh")),
    (3, "zero", ("tanh", "tanh", "tanh")),
    (3, "xavier", ("relu", "tanh", "identity")),
    ("plain", "xavier", ("identity", "identity", "identity")),
    ("plain", "orthogonal", ("identity", "tanh", "identity")),
    ("plain", "xavier", ("identity", "relu", "identity")),
    ("plain", "xavier", ("identity", "ssigmoid", "identity")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'/'.join(c[2])}")
def test_dense_matches_torch_func_hessian(case, backend):
    kind, init, acts = case
    net = make_net(kind, init, acts)
    X, Y = make_data()
    ref = dense_hessian_func(net, (X, Y))
    H = HessianOperator(net, (X, Y), backend=backend).to_dense()
    if ref.abs().max() == 0:  # n = 3 at zero: the Hessian vanishes
        assert H.abs().max() <= 1e-14
    else:
        assert rel_err(H, ref) <= 1e-10


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4], CASES[7], CASES[10]],
                         ids=lambda c: f"{c[0]}-{c[1]}-{'/'.join(c[2])}")
def test_minibatched_equals_full_data(case, backend, loss):
    kind, init, acts = case
    net = make_net(kind, init, acts, seed=1)
    X, Y = make_data(m=11, seed=2, loss=loss)
    ref = dense_hessian_func(net, (X, Y), loss=loss)
    for data in ((X, Y), split(X, Y, [4, 4, 3]), iter(split(X, Y, [1, 10]))):
        H = HessianOperator(net, data, loss=loss, backend=backend).to_dense()
        assert rel_err(H, ref) <= 1e-10


def test_cross_entropy_probability_targets_and_projections():
    """A frozen input projection (5 -> 3) and read-out (3 -> 2) before a cross-entropy loss: the CPU kernel
    takes the read-out (residual_stack_hvp(..., readout=P)); the operator had fallen back to autograd products."""
    import warnings

    from shortcut_ext.curvature.hessian import FallbackWarning

    net = ShortcutNet(3, 2, 2, "tanh", "tanh", "identity", init="xavier", seed=3, backend="torch", dtype=F64,
                      in_features=5, out_features=2)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 5, generator=g, dtype=F64)
    Y = torch.softmax(torch.randn(9, 2, generator=g, dtype=F64), dim=1)
    ref = dense_hessian_func(net, (X, Y), loss="cross_entropy")
    if fused_hvp_available():
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            op = HessianOperator(net, (X, Y), loss="cross_entropy", backend="fused")
        assert op.backend_used == "fused" and op.fallback_reason is None and op._kernel_readout is not None
        assert "cross-entropy" in op._readout_not_absorbed()  # why the kernel takes it
    else:
        with pytest.warns(UserWarning, match=r"runs autograd Hessian-vector products \(slower\)"):
            op = HessianOperator(net, (X, Y), loss="cross_entropy", backend="fused")
    assert rel_err(op.to_dense(), ref) <= 1e-10
    assert rel_err(HessianOperator(net, (X, Y), loss="cross_entropy", backend="func").to_dense(), ref) <= 1e-10


@pytest.mark.parametrize("mid", ["tanh", "relu"])
def test_an_orthonormal_read_out_runs_fused_under_mse(mid, monkeypatch):
    """A read-out with orthonormal columns (q >= d, as the models make it) under mse: the Hessian is the
    trunk's with targets y P, so the fused kernel runs (it fell back to autograd's double backward, 2-7x
    slower, for every model with out_features != width). Other read-outs go into the kernel itself (the loss of
    h P^T), without a warning (_readout_not_absorbed says why)."""
    import shortcut_ext.ops as ops_mod

    g = torch.Generator().manual_seed(1)
    for kw in (dict(out_features=6), dict(in_features=7, out_features=5)):
        net = ShortcutNet(4, 3, 2, "identity", mid, "identity", init="xavier", seed=2, dtype=F64, **kw)
        X = torch.randn(13, net.in_features, generator=g, dtype=F64)
        Y = torch.randn(13, net.out_features, generator=g, dtype=F64)
        calls = []
        op = HessianOperator(net, split(X, Y, [6, 7]), backend="fused")
        with monkeypatch.context() as m:
            orig = ops_mod.residual_stack_hvp
            m.setattr(ops_mod, "residual_stack_hvp", lambda *a, **k: calls.append(1) or orig(*a, **k))
            H = op.to_dense()
        if fused_hvp_available():
            assert op.backend_used == "fused" and calls
        assert rel_err(H, dense_hessian_func(net, (X, Y))) <= 1e-10
        ref = HessianOperator(net, (X, Y), backend="autograd").loss_and_grad()
        for a, b in zip(op.loss_and_grad(), ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # judged at the operator's precision: a float32 model's read-out (orthonormal to float32 rounding) runs
    # fused in a float32 operator, and falls back in a float64 one; a read-out 3e-5 off falls back in both
    # (the tolerance grew with q: 64 q eps accepted a read-out 0.35% off at q = 1000)
    if not fused_hvp_available():
        return
    import warnings

    from shortcut_ext.curvature.hessian import FallbackWarning

    def op_of(net, data, why=None, **kw):
        """The operator, built without a FallbackWarning: targets y P where ``why`` is None, else the read-out
        in the kernel, with ``why`` what _readout_not_absorbed says."""
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            op = HessianOperator(net, data, **kw)
        assert op.backend_used == "fused"
        if why is None:
            assert op._target_map is not None and op._kernel_readout is None and op._readout_not_absorbed() is None
        else:
            assert op._target_map is None and op._kernel_readout is not None
            assert why in op._readout_not_absorbed(), op._readout_not_absorbed()
            assert rel_err(op.to_dense(), dense_hessian_func(net, data)) <= (1e-10 if op.dtype == F64 else 1e-4)
        return op

    net32 = ShortcutNet(4, 2, 2, "identity", "tanh", "identity", init="xavier", out_features=10)
    X32, Y32 = torch.randn(7, 4), torch.randn(7, 10)
    op_of(net32, (X32, Y32))
    op_of(net32, (X32, Y32), "orthonormal columns to float32 precision only", dtype=F64)
    # float64 models' own read-outs take the targets at any q (4 sqrt(d) eps rejected d = 2, q = 1000, seed 127)
    wide = ShortcutNet(2, 1, 2, init="xavier", dtype=F64, out_features=1000, seed=127)
    op_of(wide, (torch.randn(3, 2, dtype=F64), torch.randn(3, 1000, dtype=F64)))
    with torch.no_grad():
        net32.readout.mul_(1.00003)
    for dt in (torch.float32, F64):
        op_of(net32, (X32, Y32), "does not have orthonormal columns (max |P^T P - I| = 6", dtype=dt)
    narrow = ShortcutNet(4, 2, 2, init="xavier", dtype=F64, out_features=3)  # q < d: rows orthonormal, not columns
    op_of(narrow, (torch.randn(5, 4, dtype=F64), torch.randn(5, 3, dtype=F64)),
          "read-out [3, 4] has fewer targets than the width")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_probability_targets(backend):
    net = make_net(2, "xavier", ("identity", "tanh", "ssigmoid"), seed=5)
    X, _ = make_data(m=8, seed=6)
    Y = torch.softmax(torch.randn(8, 3, generator=torch.Generator().manual_seed(7), dtype=F64), dim=1)
    ref = dense_hessian_func(net, (X, Y), loss="cross_entropy")
    op = HessianOperator(net, split(X, Y, [3, 5]), loss="cross_entropy", backend=backend)
    assert op.backend_used == ("fused" if backend == "fused" and fused_hvp_available() else
                               "autograd" if backend == "fused" else backend)
    assert rel_err(op.to_dense(), ref) <= 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_symmetry_batched_and_dense(backend):
    net = make_net(2, "xavier", ("tanh", "relu", "ssigmoid"), units=3, seed=4)
    X, Y = make_data(m=12, seed=5)
    op = HessianOperator(net, split(X, Y, [5, 7]), backend=backend)
    g = torch.Generator().manual_seed(6)
    U = torch.randn(op.P, 5, generator=g, dtype=F64)
    V = torch.randn(op.P, 5, generator=g, dtype=F64)
    HU, HV = op.matmat(U), op.matmat(V)
    # u^T H v == v^T H u
    torch.testing.assert_close(U.T @ HV, (V.T @ HU).T, rtol=1e-12, atol=1e-13)
    # batched == sequential
    seq = torch.stack([op.matvec(V[:, i]) for i in range(V.shape[1])], dim=1)
    torch.testing.assert_close(HV, seq, rtol=1e-12, atol=1e-13)
    D = op.to_dense(chunk=7)
    torch.testing.assert_close(D, D.T, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(D @ V, HV, rtol=1e-10, atol=1e-12)


def test_max_directions_chunks():
    net = make_net(2, "small", ("identity", "tanh", "identity"))
    X, Y = make_data()
    V = torch.randn(net.weight.numel(), 9, dtype=F64)
    a = HessianOperator(net, (X, Y), backend="autograd").matmat(V)
    b = HessianOperator(net, (X, Y), backend="autograd", max_directions=4).matmat(V)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_zero_point_two_shortcut_linear_closed_form():
    # L(w) = L(0) + sum_r tr(A_r B_r M^T) + O(|w|^3), M = (1/m) sum_i (x_i - y_i) x_i^T
    d, R = 3, 4
    X, Y = make_data(m=15, seed=7)
    net = ShortcutNet(d, R, 2, init="zero", backend="torch", dtype=F64)
    D = HessianOperator(net, (X, Y), backend="autograd").to_dense()
    M = (X - Y).T @ X / X.shape[0]
    # d^2 / dA_ij dB_j'k of sum A_ij B_jk M_ik = delta_jj' M_ik
    K = torch.einsum("ik,jl->ijlk", M, torch.eye(d, dtype=F64)).reshape(d * d, d * d)
    blk = torch.zeros(2 * d * d, 2 * d * d, dtype=F64)
    blk[d * d:, : d * d] = K  # rows: A = W[r, 1]; columns: B = W[r, 0]
    blk[: d * d, d * d:] = K.T
    ref = torch.block_diag(*[blk] * R)
    assert rel_err(D, ref) <= 1e-12


def test_loss_and_grad():
    net = make_net(2, "xavier", ("tanh", "relu", "identity"), seed=8)
    X, Y = make_data(m=13, seed=9)
    w = net.weight.detach().clone().requires_grad_(True)
    L = 0.5 * ((net.forward_with(w, X) - Y) ** 2).sum() / X.shape[0]
    (g,) = torch.autograd.grad(L, w)
    for backend in BACKENDS:
        loss, grad = HessianOperator(net, split(X, Y, [6, 7]), backend=backend).loss_and_grad()
        torch.testing.assert_close(loss, L.detach(), rtol=1e-13, atol=0)
        torch.testing.assert_close(grad, g.reshape(-1), rtol=1e-12, atol=1e-14)


def test_as_scipy_and_dtype_cast():
    from scipy.sparse.linalg import eigsh

    net = ShortcutNet(3, 3, 2, "identity", "tanh", "identity", init="xavier", seed=10, backend="torch")  # float32
    X, Y = make_data(m=10, seed=11)
    op = HessianOperator(net, (X.float(), Y.float()), backend="autograd", dtype=F64)
    assert op.dtype == F64 and op.shape == (54, 54) and op.size == 54
    D = op.to_dense()
    ev = np.linalg.eigvalsh(D.numpy())
    lin = op.as_scipy()
    assert lin.shape == (54, 54) and lin.dtype == np.float64
    v = np.random.default_rng(0).standard_normal(54)
    np.testing.assert_allclose(lin.matvec(v), D.numpy() @ v, rtol=1e-10, atol=1e-12)
    top = eigsh(lin, k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(top), ev[-2:], rtol=1e-8)


def test_float32_operator_close_to_float64():
    net = make_net(2, "xavier", ("tanh", "tanh", "identity"), seed=12)
    X, Y = make_data(m=10, seed=13)
    d64 = HessianOperator(net, (X, Y), backend="autograd").to_dense()
    d32 = HessianOperator(net, (X, Y), backend="autograd", dtype=torch.float32).to_dense()
    assert d32.dtype == torch.float32
    assert rel_err(d32.double(), d64) <= 1e-5


def test_bad_inputs():
    net = make_net(2, "small", ("identity", "identity", "identity"))
    X, Y = make_data()
    op = HessianOperator(net, (X, Y), backend="autograd")
    P = op.P
    with pytest.raises(ValueError, match=r"V must have shape \[36, k\]"):
        op.matmat(torch.zeros(P + 1, 2, dtype=F64))
    with pytest.raises(ValueError, match="k >= 1"):
        op.matmat(torch.zeros(P, 0, dtype=F64))
    with pytest.raises(TypeError, match="dtype torch.float64"):
        op.matmat(torch.zeros(P, 2, dtype=torch.float32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op.matmat(np.zeros((P, 2)))
    with pytest.raises(ValueError, match="1-D"):
        op.matvec(torch.zeros(P, 1, dtype=F64))
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(net, [], backend="autograd")
    with pytest.raises(ValueError, match="at least one sample"):
        HessianOperator(net, (X[:0], Y[:0]), backend="autograd")
    with pytest.raises(ValueError, match="targets must have 10 rows"):
        HessianOperator(net, (X, Y[:9]), backend="autograd")
    with pytest.raises(ValueError, match=r"targets must have shape \[10, 3\]"):
        HessianOperator(net, (X, Y[:, :2]), backend="autograd")
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3\]"):
        HessianOperator(net, (X[:, :2], Y), backend="autograd")
    with pytest.raises(ValueError, match="loss must be one of"):
        HessianOperator(net, (X, Y), loss="hinge")
    with pytest.raises(ValueError, match="backend must be one of"):
        HessianOperator(net, (X, Y), backend="jax")
    with pytest.raises(TypeError, match="data must be one batch"):
        HessianOperator(net, X)
    with pytest.raises(TypeError, match=r"data\[1\] must be a pair"):
        HessianOperator(net, [(X, Y), X])
    with pytest.raises(TypeError, match=r"data \(x, y\) must be torch tensors, got \(ndarray, ndarray\)"):
        HessianOperator(net, (X.numpy(), Y.numpy()))
    with pytest.raises(TypeError, match=r"data\[0\] must be a pair \(x, y\) of torch tensors, got \(Tensor, ndarray\)"):
        HessianOperator(net, [(X, Y.numpy())])
    # ([x1, x2], [y1, y2]) read as the mini-batches (x1, x2), (y1, y2) when y has x's width: refused
    for pair in (([X[:5], X[5:]], [X[:5], X[5:]]), (torch.split(X, 5), torch.split(X, 5))):
        with pytest.raises(TypeError, match=r"tuple of two sequences of 2 tensors.*ambiguous.*list\(zip\(xs, ys\)\)"):
            HessianOperator(net, pair, backend="autograd")
    a = HessianOperator(net, [[X[:5], Y[:5]], [X[5:], Y[5:]]], backend="autograd")  # list(DataLoader): fine
    b = HessianOperator(net, list(zip([X[:5], X[5:]], [Y[:5], Y[5:]])), backend="autograd")
    v = torch.randn(a.shape[0], dtype=X.dtype)
    torch.testing.assert_close(a.matvec(v), b.matvec(v))
    with pytest.raises(TypeError, match="ShortcutNet or PlainNet"):
        HessianOperator(torch.nn.Linear(3, 3), (X, Y))
    with pytest.raises(ValueError, match="class indices must lie in"):
        HessianOperator(net, (X, torch.full((10,), 3)), loss="cross_entropy")
    big = ShortcutNet(16, 17, 2, init="zero", backend="torch")
    assert big.weight.numel() > MAX_DENSE_PARAMS
    with pytest.raises(ValueError, match="refuses P = 8704"):
        HessianOperator(big, (torch.zeros(2, 16), torch.zeros(2, 16)), backend="autograd").to_dense()


def test_hessian_probes_exact_and_estimated():
    net = make_net(2, "xavier", ("identity", "tanh", "identity"), units=3, seed=14)
    X, Y = make_data(m=20, seed=15)
    ev = np.linalg.eigvalsh(dense_hessian_func(net, (X, Y)).numpy())
    exact = hessian_probes(net, (X, Y), "mse", exact_max_params=1000, backend="autograd")
    assert set(exact) == {"lam_max", "lam_top", "lam_q10", "index", "cond", "cond_q10", "method", "resolved",
                          "index_unresolved_mass"}
    assert exact["resolved"] is True and exact["index_unresolved_mass"] == 0.0
    assert exact["method"] == "exact"
    a = np.abs(ev)
    np.testing.assert_allclose(exact["lam_max"], a.max(), rtol=1e-10)
    np.testing.assert_allclose(exact["cond"], a.max() / a.min(), rtol=1e-6)
    np.testing.assert_allclose(exact["lam_q10"], np.quantile(a, 0.1, method="inverted_cdf"), rtol=1e-10)
    assert exact["index"] == pytest.approx((ev < 0).mean())
    est = hessian_probes(net, (X, Y), "mse", exact_max_params=0, backend="autograd", probes=16, steps=30)
    assert est["method"] == "lanczos+slq" and np.isnan(est["cond"])
    np.testing.assert_allclose(est["lam_max"], a.max(), rtol=1e-8)
    np.testing.assert_allclose([exact["lam_top"], est["lam_top"]], [ev.max()] * 2, rtol=1e-8)  # with its sign
    assert abs(est["index"] - exact["index"]) < 0.15
    # lam_top is the largest eigenvalue, not the largest |lambda|: a Hessian whose negative end is the larger
    neg = make_net(2, "xavier", ("tanh", "identity", "tanh"), units=3, seed=1)
    with torch.no_grad():
        neg.weight.mul_(2.0)  # its spectrum runs from -84.7 to 5.54
    evn = np.linalg.eigvalsh(dense_hessian_func(neg, (X, Y)).numpy())
    for kw in ({"exact_max_params": 1000}, {"exact_max_params": 0, "probes": 4, "steps": 30}):
        pn = hessian_probes(neg, (X, Y), "mse", backend="autograd", **kw)
        np.testing.assert_allclose([pn["lam_top"], pn["lam_max"]], [evn.max(), np.abs(evn).max()], rtol=1e-8)
    rep = condition_report(HessianOperator(net, (X, Y), backend="autograd"), method="lanczos+slq", probes=16,
                           steps=30)
    assert rep.uncertainty["lam_max_residual"] < 1e-8 * rep.lam_max


@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_under_autocast_and_inference_mode(backend):
    """Under torch.autocast the double backward, the jvp and the read-out ran in bfloat16 (a 3e-3 error in
    a float32 Hessian; a model with an input projection failed at the first product); under
    torch.inference_mode the autograd backend (the fallback of every net with a read-out) and
    loss_and_grad raised, and data made in inference mode could not be saved for backward."""
    torch.manual_seed(0)
    for kw in ({}, {"in_features": 5, "out_features": 3}):
        net = ShortcutNet(width=4, units=3, shortcut=2, mid="tanh", init="small", **kw)
        X, Y = torch.randn(12, net.in_features), torch.randn(12, net.out_features)
        H0 = HessianOperator(net, (X, Y), backend=backend)
        ref, (L0, g0) = H0.to_dense(), H0.loss_and_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            H = HessianOperator(net, (X, Y), backend=backend)
            Ha = H.to_dense()
            La, ga = H.loss_and_grad()
            Hb = H0.to_dense()
        for A in (Ha, Hb):
            assert A.dtype == torch.float32
            torch.testing.assert_close(A, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
        torch.testing.assert_close((La, ga), (L0, g0), rtol=1e-6, atol=1e-7)
        with torch.inference_mode():
            Xi, Yi = X.clone(), Y.clone()
            H = HessianOperator(net, (Xi, Yi), backend=backend)
            Hi = H.to_dense()
            Li, gi = H.loss_and_grad()
        torch.testing.assert_close(Hi, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))
        torch.testing.assert_close((Li, gi), (L0, g0), rtol=1e-6, atol=1e-7)
        Ho = HessianOperator(net, (Xi, Yi), backend=backend)  # inference-mode data used outside it
        torch.testing.assert_close(Ho.to_dense(), ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_bad_targets_and_non_finite_data():
    net = make_net(2, "small", ("identity", "identity", "identity"))
    X, Y = make_data()
    with pytest.raises(ValueError, match="targets must have 10 rows like x, got shape \\[\\]"):
        HessianOperator(net, (X, torch.tensor(1.0, dtype=F64)), backend="autograd")
    with pytest.raises(TypeError, match="class-index targets must be integers, got torch.bool"):
        HessianOperator(net, (X, torch.ones(10, dtype=torch.bool)), loss="cross_entropy", backend="autograd")
    with pytest.raises(ValueError, match="probability targets must be finite and >= 0"):
        HessianOperator(net, (X, -torch.rand(10, 3, dtype=F64)), loss="cross_entropy", backend="autograd")
    Xn = X.clone()
    Xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"data\[0\] x must be finite"):
        HessianOperator(net, (Xn, Y), backend="autograd")
    Yn = Y.clone()
    Yn[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"data\[1\] targets must be finite"):
        HessianOperator(net, [(X, Y), (X, Yn)], backend="autograd")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_operator_is_a_snapshot_of_the_data_too(dtype):
    """The data were held by reference where no cast copied them (float64 data for a float64 net, views
    from torch.split): editing X in place afterwards changed the operator's Hessian and loss, while the
    weights are copied; now both are snapshots, in every dtype."""
    net = ShortcutNet(width=4, units=3, shortcut=2, mid="tanh", init="xavier", dtype=dtype)
    g = torch.Generator().manual_seed(5)
    X = torch.randn(12, 4, dtype=dtype, generator=g)
    Y = torch.randn(12, 4, dtype=dtype, generator=g)
    labels = torch.randint(0, 4, (12,), generator=g)
    v = torch.randn(net.num_parameters(), dtype=dtype, generator=g)
    ops = [HessianOperator(net, (X, Y), "mse"), HessianOperator(net, list(zip(X.split(5), Y.split(5))), "mse"),
           HessianOperator(net, (X, labels), "cross_entropy")]
    before = [(op.matvec(v), op.loss_and_grad()[0]) for op in ops]
    X.mul_(2.0)
    Y.add_(1.0)
    labels.fill_(0)
    for op, (hv, L) in zip(ops, before):
        assert torch.equal(op.matvec(v), hv) and float(op.loss_and_grad()[0]) == float(L)
    ref = HessianOperator(net, (X, Y), "mse", copy_data=False)  # by reference: no second copy, on request
    hv = ref.matvec(v)
    X.mul_(3.0)
    assert not torch.equal(ref.matvec(v), hv)
    with pytest.raises(TypeError, match="copy_data must be True or False"):
        HessianOperator(net, (X, Y), "mse", copy_data="no")


def test_float32_exact_report_warns_when_the_zero_tolerance_swallows_eigenvalues():
    """P eps32 |lambda|max counted 35 small non-zero eigenvalues of a float32 Hessian as zero (cond inf
    for 1.3e9, index 0.388 for 0.403) with no word; the spectrum command warned, the API did not."""
    import warnings

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=g)
    Y = X @ torch.randn(16, 16, generator=g) * 0.3 + 0.1 * torch.randn(256, 16, generator=g)
    net = ShortcutNet(width=16, units=4, shortcut=1, mid="tanh", init="xavier")
    with pytest.warns(UserWarning, match=r"eigenvalues lie within float32's zero tolerance .*\(dtype=torch.float64\)"):
        r32 = condition_report(HessianOperator(net, (X, Y)))
    assert r32.uncertainty["num_zero"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r64 = condition_report(HessianOperator(net, (X, Y), dtype=torch.float64))
    assert r64.uncertainty["num_zero"] == 0 and math.isfinite(r64.cond)


def test_operator_keeps_its_own_read_out():
    """The frozen projections were the model's own buffers: a load_state_dict of another net changed an
    existing operator's loss and products."""
    kw = dict(width=4, units=2, shortcut=2, mid="tanh", init="xavier", in_features=5, out_features=3,
              dtype=torch.float64)
    net = ShortcutNet(seed=0, **kw)
    g = torch.Generator().manual_seed(8)
    X, Y = torch.randn(10, 5, dtype=F64, generator=g), torch.randn(10, 3, dtype=F64, generator=g)
    op = HessianOperator(net, (X, Y), backend="autograd")
    v = torch.randn(op.P, dtype=F64, generator=g)
    before = (op.matvec(v), float(op.loss_and_grad()[0]))
    net.load_state_dict(ShortcutNet(seed=1, **kw).state_dict())
    assert torch.equal(op.matvec(v), before[0]) and float(op.loss_and_grad()[0]) == before[1]


def test_meta_data_is_refused_by_name():
    """Meta data reached a range check's .item() ("cannot be called on meta tensors")."""
    net = ShortcutNet(width=3, units=2)
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"data\[0\] x must hold values .*got a meta tensor"):
        HessianOperator(net, (meta, meta))
    X, Y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"model.weight must hold values .*got a meta tensor"):
        HessianOperator(ShortcutNet(width=3, units=2).to("meta"), (X, Y))  # took the data to meta, silently
    for sparse in (X.to_sparse(), X.to_sparse_csr()):
        with pytest.raises(ValueError, match=r"data\[0\] x must be a dense \(strided\) tensor"):
            HessianOperator(net, (sparse, Y))


def test_to_dense_peak_memory_is_about_the_result(tmp_path):
    """to_dense held an identity, the list of chunks and their concatenation at once: a peak of 3.3x the
    [P, P] result (460 MB for a 128 MB Hessian). Measured in a child process by its peak RSS."""
    import os
    import subprocess
    import sys

    import shortcut_ext

    code = (
        "import resource, torch, shortcut_ext as se\n"
        "from shortcut_ext.curvature import HessianOperator\n"
        "torch.set_num_threads(1)\n"
        "net = se.ShortcutNet(width=8, units=32, shortcut=2, mid='tanh', init='xavier', dtype=torch.float64)\n"
        "X = torch.randn(64, 8, dtype=torch.float64); Y = torch.randn(64, 8, dtype=torch.float64)\n"
        "H = HessianOperator(net, (X, Y)); H.matmat(torch.randn(H.P, 256, dtype=torch.float64))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "D = H.to_dense()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / D.numel() / 8)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(shortcut_ext.__file__)))
    env = dict(os.environ, SHORTCUT_EXT_CPU_CACHE_MB="0",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split()[-1]) < 1.6  # peak growth in units of the result's size (it was 3.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_data_with_history_gives_plain_values(backend):
    """Targets (or an x) that require grad made the fused and func products require grad: Lanczos, SLQ and
    as_scipy failed with "Can't call numpy() on Tensor that requires grad"."""
    from shortcut_ext.curvature import lanczos

    X, Y = make_data(m=12, p=3, q=3)
    head = torch.nn.Linear(3, 3, dtype=F64)
    Xg = X.clone().requires_grad_(True)
    net = ShortcutNet(width=3, units=2, shortcut=2, mid="tanh", init="xavier", dtype=F64)
    H = HessianOperator(net, (Xg, head(Y)), backend=backend)
    ref = HessianOperator(net, (X, head(Y).detach()), backend=backend)
    v = torch.randn(H.P, dtype=F64)
    Hv = H.matvec(v)
    assert not Hv.requires_grad and not H.to_dense().requires_grad
    torch.testing.assert_close(Hv, ref.matvec(v), rtol=0, atol=0)
    assert lanczos(H, k=2).largest.shape == (2,)


def test_spectral_tools_draw_on_the_cpu_under_another_default_device():
    """Under torch.set_default_device (a GPU user's habit) the seeded CPU generators met tensors of the default
    device: lanczos, slq and hutchpp failed, and train()'s probes turned NaN. "meta" stands in for "cuda"
    here (the same failure: a CPU generator, another device)."""
    from shortcut_ext.curvature import hutchpp_trace, lanczos, slq

    X, Y = make_data(m=12, p=3, q=3)
    net = ShortcutNet(width=3, units=2, shortcut=2, mid="tanh", init="xavier", dtype=F64)
    H = HessianOperator(net, (X, Y))
    want = (lanczos(H, k=2).largest, hutchpp_trace(H, num_products=12, seed=1).estimate)
    torch.set_default_device("meta")
    try:
        got = (lanczos(H, k=2).largest, hutchpp_trace(H, num_products=12, seed=1).estimate)
        dens = slq(H, probes=2, steps=8)
        with torch.device("meta"):
            on_meta = ShortcutNet(width=3, units=2, shortcut=2, init="xavier", dtype=F64, in_features=4)
    finally:
        torch.set_default_device(None)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1] and dens is not None
    assert on_meta.weight.device.type == "meta" and on_meta.input_proj.device.type == "meta"


def test_autograd_backend_goes_one_direction_at_a_time_without_a_batching_rule(monkeypatch):
    """Not tested: the autograd backend's fallback when the batched double backward raises (an op without a
    vmap batching rule): the directions are then taken one at a time.  Reference: the same operator's batched
    products (before the patch) and the dense func-backend Hessian; the fallback was really taken."""
    net = ShortcutNet(3, 2, 2, init="xavier", seed=0, mid="tanh", backend="torch", dtype=F64)
    X, Y = make_data()
    V = torch.randn(net.weight.numel(), 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    op = HessianOperator(net, (X, Y), backend="autograd")
    batched = op.matmat(V)
    real, refused = torch.autograd.grad, []

    def no_batching_rule(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            refused.append(1)
            raise RuntimeError("Batching rule not implemented for aten::some_op")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching_rule)
    one_by_one = op.matmat(V)
    monkeypatch.undo()
    assert refused, "the batched path was not tried"
    torch.testing.assert_close(one_by_one, batched, rtol=1e-12, atol=1e-14)
    H = dense_hessian_func(net, (X, Y))
    torch.testing.assert_close(one_by_one, H @ V, rtol=1e-10, atol=1e-12)


def test_the_dense_reference_checks_its_targets():
    """dense_hessian_func (the tests' reference, public in curvature) took mse targets of shape [B] (broadcast:
    the Hessian of another loss), float class indices (truncated) and integer mse targets without a word."""
    net = ShortcutNet(3, 2, 2, init="xavier", seed=1, backend="torch", dtype=F64)
    X = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"targets must have shape \[3, 3\], got \[3\]"):
        dense_hessian_func(net, (X, torch.zeros(3, dtype=F64)))
    with pytest.raises(TypeError, match="class-index targets must be integers, got torch.float64"):
        dense_hessian_func(net, (X, torch.tensor([0.9, 1.7, 2.2], dtype=F64)), loss="cross_entropy")
    with pytest.raises(TypeError, match=r"targets of shape \[B, 3\] must be floating point, got torch.int64"):
        dense_hessian_func(net, (X, torch.ones(3, 3, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3\], got \[3, 4\]"):
        dense_hessian_func(net, (torch.zeros(3, 4, dtype=F64), X))
    with pytest.raises(ValueError, match="loss must be one of"):
        dense_hessian_func(net, (X, X), loss="hinge")
    with pytest.raises(ValueError, match="class-index targets must have 3 entries like x, got 2"):  # gather took it
        dense_hessian_func(net, (X, torch.tensor([0, 2])), loss="cross_entropy")
    with pytest.raises(TypeError, match="must be integers, got torch.complex128"):
        dense_hessian_func(net, (X, torch.tensor([0, 2.7, 1], dtype=torch.complex128)), loss="cross_entropy")
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\), got values in \[0, 3\]"):
        dense_hessian_func(net, (X, torch.tensor([0, 3, 1])), loss="cross_entropy")
    H = dense_hessian_func(net, (X, torch.tensor([0, 2, 1])), loss="cross_entropy")
    assert H.shape == (net.weight.numel(),) * 2 and torch.allclose(H, H.T, atol=1e-14)


def test_max_directions_zero_is_refused_and_products_are_counted_per_direction():
    """Not pinned: max_directions=0 (built, then every product failed in matmat's chunking) is refused when the
    operator is built; and num_products counts directions, not calls (one matmat of 3 directions is 3)."""
    net = ShortcutNet(3, 2, 2, init="small", seed=1, backend="torch", dtype=F64)
    X, Y = make_data()
    with pytest.raises(ValueError, match="max_directions must be a positive integer or None, got 0"):
        HessianOperator(net, (X, Y), max_directions=0)
    for md in (None, 1, 2):
        H = HessianOperator(net, (X, Y), backend="autograd", max_directions=md)
        assert H.num_products == 0
        H.matmat(torch.randn(H.P, 3, generator=torch.Generator().manual_seed(0), dtype=F64))
        assert H.num_products == 3, md
        H.matvec(torch.ones(H.P, dtype=F64))
        assert H.num_products == 4, md


@pytest.mark.skipif(not fused_hvp_available(), reason="the fused HVP op is not built")
def test_a_square_orthonormal_readout_keeps_the_fused_backend():
    """Not pinned: a frozen read-out P [q, d] with q == d and orthonormal columns (a rotation of the output)
    runs the fused HVP (targets y P, the same Hessian) with no FallbackWarning; only q < d falls back."""
    import warnings

    from shortcut_ext.curvature.hessian import FallbackWarning

    g = torch.Generator().manual_seed(0)
    net = ShortcutNet(4, 2, 2, init="small", seed=1, in_features=6, out_features=4, backend="torch", dtype=F64)
    assert net.readout is None
    net.readout = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))[0]
    X, Y = torch.randn(10, 6, generator=g, dtype=F64), torch.randn(10, 4, generator=g, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        H = HessianOperator(net, (X, Y), backend="fused")
    assert H.backend_used == "fused" and H.fallback_reason is None
    want = HessianOperator(net, (X, Y), backend="autograd").to_dense()
    assert rel_err(H.to_dense(), want) < 1e-10
