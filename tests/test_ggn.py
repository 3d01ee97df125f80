"""The Hessian's two parts, H = G + F: HessianOperator(matrix="ggn" | "functional") against dense references.

``G = J^T H_l J`` (the generalised Gauss-Newton matrix) by ``torch.func.jacrev`` (``dense_ggn_func``), ``F = H - G``
with ``H`` by ``torch.func.hessian``; the operator's fused backend gets either part from the fused kernel's own
parts (CPU and CUDA), its autograd backend as the Hessian
at those predictions, its func backend as ``J^T (H_l (J v))``, so the three are checked against one independent
reference and against each other (the op itself: tests/test_hvp_part_op.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shortcut_ext import theory
from shortcut_ext.curvature import (PARTS, HessianOperator, dense_empirical_fisher_func, dense_ggn_func,
                                    dense_hessian_func, lanczos)
from shortcut_ext.models import PlainNet, ShortcutNet
from test_curvature import BACKENDS, CASES, make_data, make_net, split
from testing import DispatchCalls, one_thread  # noqa: F401 (the fixture)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def err_vs(A, ref, scale):
    """Max entry error against the Hessian's scale (G or F may be zero where H is not)."""
    return float((A - ref).abs().max()) / max(float(scale.abs().max()), 1e-300)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{'/'.join(c[2])}")
def test_ggn_and_functional_parts_match_dense_references(case, backend, loss):
    kind, init, acts = case
    net = make_net(kind, init, acts, seed=4)
    X, Y = make_data(m=9, seed=5, loss=loss)
    H = dense_hessian_func(net, (X, Y), loss=loss)
    G = dense_ggn_func(net, (X, Y), loss=loss)
    for data in ((X, Y), split(X, Y, [5, 4])):  # one batch and mini-batches sum alike
        g = HessianOperator(net, data, loss=loss, backend=backend, matrix="ggn").to_dense()
        f = HessianOperator(net, data, loss=loss, backend=backend, matrix="functional").to_dense()
        assert err_vs(g, G, H) <= 1e-10
        assert err_vs(f, H - G, H) <= 1e-10
    # G is symmetric positive semi-definite (J^T H_l J with H_l >= 0)
    assert err_vs(G, G.T, H) <= 1e-13
    assert float(torch.linalg.eigvalsh(G).min()) >= -1e-12 * max(float(H.abs().max()), 1.0)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features", [dict(in_features=5, out_features=6), dict(in_features=5, out_features=2)],
                         ids=["readout-6", "readout-2"])
def test_ggn_with_projections(features, backend, loss):
    """The frozen read-out in each of its fused forms: absorbed into the targets (orthonormal, mse), or given to
    the kernel (q < d, or cross-entropy); the prediction targets must be in the form the products take."""
    net = ShortcutNet(4, 2, 2, "tanh", "tanh", "identity", init="xavier", seed=6, backend="torch", dtype=F64,
                      **features)
    g = torch.Generator().manual_seed(7)
    X = torch.randn(8, 5, generator=g, dtype=F64)
    q = features["out_features"]
    Y = torch.randn(8, q, generator=g, dtype=F64) if loss == "mse" else torch.randint(0, q, (8,), generator=g)
    H = dense_hessian_func(net, (X, Y), loss=loss)
    G = dense_ggn_func(net, (X, Y), loss=loss)
    op = HessianOperator(net, split(X, Y, [3, 5]), loss=loss, backend=backend, matrix="ggn")
    assert err_vs(op.to_dense(), G, H) <= 1e-10
    f = HessianOperator(net, (X, Y), loss=loss, backend=backend, matrix="functional").to_dense()
    assert err_vs(f, H - G, H) <= 1e-10


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "ce_mass"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_empirical_fisher_matches_per_sample_gradients(backend, loss):
    """matrix="empirical_fisher": (1/m) sum_i g_i g_i^T, against per-sample gradients by jacrev
    (dense_empirical_fisher_func) and against the outer products of per-sample torch.func.grad computed here;
    one batch and mini-batches, with a read-out; positive semi-definite, zero at a 2-shortcut zero point."""
    net = ShortcutNet(3, 2, 2, "tanh", "relu", "identity", init="xavier", seed=3, backend="torch", dtype=F64,
                      in_features=4, out_features=5)
    g = torch.Generator().manual_seed(8)
    X = torch.randn(7, 4, generator=g, dtype=F64)
    Y = (torch.randn(7, 5, generator=g, dtype=F64) if loss == "mse" else torch.randint(0, 5, (7,), generator=g)
         if loss == "cross_entropy" else 3 * torch.rand(7, 5, generator=g, dtype=F64))
    loss = "mse" if loss == "mse" else "cross_entropy"
    Fe = dense_empirical_fisher_func(net, (X, Y), loss=loss)
    from shortcut_ext import reference

    w0 = net.weight.detach().reshape(-1)
    grads = torch.stack([torch.func.grad(lambda w, i=i: reference.loss_fn(
        loss, net.forward_with(w.view(net.weight.shape), X[i:i + 1], backend="torch"), Y[i:i + 1]))(w0)
        for i in range(7)])
    assert err_vs(Fe, grads.T @ grads / 7, Fe) <= 1e-13
    for data in ((X, Y), split(X, Y, [3, 4])):
        op = HessianOperator(net, data, loss=loss, backend=backend, matrix="empirical_fisher")
        assert err_vs(op.to_dense(), Fe, Fe) <= 1e-10
    assert float(torch.linalg.eigvalsh(Fe).min()) >= -1e-12 * float(Fe.abs().max())
    zero = ShortcutNet(3, 2, 2, "tanh", "tanh", "identity", init="zero", backend="torch", dtype=F64)
    X3 = X[:, :3]
    Y3 = Y[:, :3] if Y.dim() == 2 else Y % 3
    assert not HessianOperator(zero, (X3, Y3), loss=loss, backend=backend, matrix="empirical_fisher").to_dense().any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalised_probability_targets_scale_the_gauss_newton_part(backend):
    """Cross-entropy with target rows of mass c_i != 1: the loss's Hessian in the outputs is c_i (diag(s) - s s^T),
    so G scales with the mass and F = H - G keeps the net's second derivatives alone.  Checked against
    J^T H_z J with H_z by torch.func.hessian of the loss in the outputs (no closed form of H_l); the operator's
    G took c_i = 1 until 2026-12 (prediction targets softmax(z), and the func and dense references likewise)."""
    from torch.func import hessian, jacrev

    from shortcut_ext import reference

    net = ShortcutNet(3, 2, 2, "tanh", "tanh", "identity", init="xavier", seed=3, backend="torch", dtype=F64,
                      in_features=4, out_features=5)
    g = torch.Generator().manual_seed(4)
    X = torch.randn(7, 4, generator=g, dtype=F64)
    Y = 3 * torch.rand(7, 5, generator=g, dtype=F64)  # row masses between 0 and 15
    op = HessianOperator(net, split(X, Y, [3, 4]), loss="cross_entropy", backend=backend, matrix="ggn")
    shape = op._W.shape
    w0 = op._W.reshape(-1).clone()

    def outputs(w):
        return net.forward_with(w.view(shape), X, backend="torch")

    J = jacrev(outputs)(w0).reshape(7 * 5, -1)
    Hz = hessian(lambda z: reference.loss_fn("cross_entropy", z, Y))(outputs(w0)).reshape(35, 35)
    G = J.T @ Hz @ J
    H = dense_hessian_func(net, (X, Y), loss="cross_entropy")
    assert err_vs(dense_ggn_func(net, (X, Y), loss="cross_entropy"), G, H) <= 1e-12
    assert err_vs(op.to_dense(), G, H) <= 1e-10
    f = HessianOperator(net, (X, Y), loss="cross_entropy", backend=backend, matrix="functional").to_dense()
    assert err_vs(f, H - G, H) <= 1e-10


def test_the_fused_operator_runs_the_gauss_newton_kernel_on_the_cpu():
    """matrix="ggn" / "functional" on the CPU's fused backend: one call a batch of residual_stack_hvp_part (G without
    the net's second derivatives, F with a zero output seed), not the HVP kernel at prediction targets and H less
    that (the CUDA path)."""
    net = make_net(2, "xavier", ("identity", "relu", "tanh"), d=4, units=3, seed=8)
    X, Y = make_data(m=12, p=4, q=4, seed=9)
    V = torch.randn(net.weight.numel(), 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    for matrix in ("ggn", "functional", "empirical_fisher"):
        op = HessianOperator(net, split(X, Y, [5, 7]), backend="fused", matrix=matrix)
        with DispatchCalls() as calls:
            op.matmat(V)
        assert [n for n in calls.names if n.startswith("shortcut_ext.")] == \
            ["shortcut_ext.residual_stack_hvp_part.default"] * 2, (matrix, calls.names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_parts_sum_to_the_hessian_and_the_loss_is_the_losses(backend):
    net = make_net(2, "xavier", ("identity", "relu", "tanh"), d=4, units=3, seed=8)
    X, Y = make_data(m=12, p=4, q=4, seed=9)
    ops = {m: HessianOperator(net, (X, Y), backend=backend, matrix=m) for m in ("hessian",) + PARTS}
    V = torch.randn(ops["hessian"].P, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    HV, GV, FV = (ops[m].matmat(V) for m in ("hessian",) + PARTS)
    assert float((GV + FV - HV).abs().max()) <= 1e-12 * float(HV.abs().max())
    assert torch.allclose(ops["ggn"].matvec(V[:, 1]), GV[:, 1], rtol=1e-13, atol=1e-15)  # batched == one by one
    # the loss and gradient are the loss's, whatever the matrix
    (l0, g0), (l1, g1) = ops["hessian"].loss_and_grad(), ops["ggn"].loss_and_grad()
    assert float(l0) == float(l1) and torch.equal(g0, g1) and float(l0) > 0
    assert "matrix='ggn'" in repr(ops["ggn"]) and "matrix" not in repr(ops["hessian"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("net", [
    lambda: ShortcutNet(3, 4, 2, "tanh", "tanh", "identity", init="zero", dtype=F64),
    lambda: ShortcutNet(3, 4, 2, "identity", "relu", "identity", init="zero", dtype=F64),
    lambda: ShortcutNet(3, 2, 3, "identity", "tanh", "identity", init="zero", dtype=F64),
    lambda: PlainNet(3, 4, activation="tanh", init="zero", dtype=F64),
], ids=["2-tanh", "2-relu", "3-tanh", "plain-tanh"])
def test_the_gauss_newton_part_vanishes_at_the_zero_point(net, backend):
    """At an n >= 2 zero point (and a plain net's) every weight's first-order effect on the output needs another
    weight of its chain non-zero: J = 0, so G = 0 exactly and the whole Hessian is the functional part."""
    net = net()
    X, Y = make_data(m=10, seed=10)
    G = HessianOperator(net, (X, Y), backend=backend, matrix="ggn").to_dense()
    F = HessianOperator(net, (X, Y), backend=backend, matrix="functional").to_dense()
    H = HessianOperator(net, (X, Y), backend=backend).to_dense()
    assert float(G.abs().max()) == 0.0
    assert torch.equal(F, H)


def test_the_2_shortcut_zero_point_spectrum_is_all_functional():
    """Theorem 1's closed form is the spectrum of F: at the 2-shortcut zero point G = 0, so Gauss-Newton (and
    natural-gradient, K-FAC) curvature is blind to the saddle whose condition number does not grow with depth."""
    net = ShortcutNet(3, 5, 2, "identity", "tanh", "identity", init="zero", dtype=F64)
    X, Y = make_data(m=20, seed=11)
    F = HessianOperator(net, (X, Y), matrix="functional").to_dense()
    ev = np.sort(torch.linalg.eigvalsh(F).numpy())
    th = np.sort(np.asarray(theory.model_zero_point_spectrum(net, X, Y).eigenvalues(), dtype=np.float64))
    assert np.abs(ev - th).max() <= 1e-12 * np.abs(th).max()
    assert np.abs(th).max() > 0.1


@pytest.mark.parametrize("units", [1, 3, 8])
def test_the_1_shortcut_zero_point_ggn_in_closed_form(units):
    """A linear 1-shortcut net at zero is the identity and J v = (sum_r V_r) x: G = 1 1^T (x) Sigma (x) I_d with
    Sigma = X^T X / m, so its non-zero eigenvalues are R eig(Sigma), each d times: they grow with the depth."""
    d, m = 3, 15
    net = ShortcutNet(d, units, 1, init="zero", dtype=F64)
    X, Y = make_data(m=m, p=d, q=d, seed=12)
    for backend in BACKENDS:
        G = HessianOperator(net, (X, Y), backend=backend, matrix="ggn").to_dense()
        ev = np.sort(torch.linalg.eigvalsh(G).numpy())[::-1]
        sig = np.sort(torch.linalg.eigvalsh(X.T @ X / m).numpy())[::-1]
        want = np.concatenate([np.repeat(units * sig, d), np.zeros(units * d * d - d * d)])
        assert np.abs(ev - want).max() <= 1e-12 * want.max()


def test_lanczos_on_the_parts_of_a_trained_like_net():
    """The spectral tools take the parts as they take H: G's smallest eigenvalue is >= 0 to rounding, and H's
    negative ones come from F (Weyl: lambda_min(H) >= lambda_min(F) since G >= 0)."""
    net = ShortcutNet(4, 6, 2, "identity", "tanh", "identity", init="xavier", seed=13, dtype=F64)
    X, Y = make_data(m=30, p=4, q=4, seed=14)
    res = {m: lanczos(HessianOperator(net, (X, Y), matrix=m), k=2, seed=0) for m in ("hessian",) + PARTS}
    assert res["ggn"].smallest.min() >= -1e-10 * res["ggn"].abs_max
    assert res["hessian"].smallest.min() >= res["functional"].smallest.min() - 1e-9
    assert res["hessian"].largest.max() <= res["ggn"].largest.max() + res["functional"].largest.max() + 1e-9


def test_float32_ggn_matches_float64():
    net = make_net(2, "xavier", ("identity", "tanh", "identity"), d=4, units=6, seed=15)
    X, Y = make_data(m=16, p=4, q=4, seed=16)
    V = torch.randn(net.weight.numel(), 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    ref = HessianOperator(net, (X, Y), backend="func", matrix="ggn").matmat(V)
    for backend in BACKENDS:
        got = HessianOperator(net, (X, Y), backend=backend, matrix="ggn", dtype=torch.float32).matmat(V.float())
        assert float((got.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("bad", ["gn", "Hessian", None, 1])
def test_an_unknown_matrix_is_refused(bad):
    net = make_net(2, "zero", ("identity",) * 3)
    with pytest.raises(ValueError, match=r"matrix must be one of \('hessian', 'ggn', 'functional', 'empirical_fisher'\).*got " + repr(bad)):
        HessianOperator(net, make_data(), matrix=bad)


def test_dense_ggn_func_refusals():
    net = make_net(2, "zero", ("identity",) * 3)
    with pytest.raises(ValueError, match="loss must be one of"):
        dense_ggn_func(net, make_data(), loss="hinge")
    X, Y = make_data()
    with pytest.raises(ValueError, match="at least one sample"):
        dense_ggn_func(net, [(X[:0], Y[:0])])


def test_hessian_probes_of_the_parts():
    from shortcut_ext.curvature import hessian_probes

    net = make_net(2, "xavier", ("identity", "tanh", "identity"), d=3, units=2, seed=17)
    X, Y = make_data(m=12, seed=18)
    H = dense_hessian_func(net, (X, Y))
    G = dense_ggn_func(net, (X, Y))
    for matrix, D in (("hessian", H), ("ggn", G), ("functional", H - G)):
        p = hessian_probes(net, (X, Y), matrix=matrix)
        ev = torch.linalg.eigvalsh(D)
        assert p["method"] == "exact" and p["lam_max"] == pytest.approx(float(ev.abs().max()), rel=1e-10)
        assert p["index"] == pytest.approx(float((ev < -1e-12 * ev.abs().max()).double().mean()))
    with pytest.raises(ValueError, match="matrix must be one of"):
        hessian_probes(net, (X, Y), matrix="fisher")


def test_hessian_probes_with_parts_share_the_dense_matrices(monkeypatch):
    """parts=("ggn", "functional") on the exact path: two dense assemblies (H and G; F = H - G), the same numbers
    as a probe of each matrix on its own; above exact_max_params each part gets its own Lanczos + SLQ."""
    from shortcut_ext.curvature import hessian_probes

    net = make_net(2, "xavier", ("identity", "tanh", "identity"), d=3, units=2, seed=19)
    X, Y = make_data(m=12, seed=20)
    calls = []
    real = HessianOperator.to_dense
    monkeypatch.setattr(HessianOperator, "to_dense", lambda self, **kw: (calls.append(self.matrix), real(self, **kw))[1])
    both = hessian_probes(net, (X, Y), parts=("ggn", "functional"))
    assert calls == ["hessian", "ggn"]
    for part in ("ggn", "functional"):
        alone = hessian_probes(net, (X, Y), matrix=part)
        for k in ("lam_max", "lam_q10", "index"):
            assert both[f"{part}_{k}"] == pytest.approx(alone[k], rel=1e-9, abs=1e-12), (part, k)
    assert both["lam_max"] == hessian_probes(net, (X, Y))["lam_max"]
    slq = hessian_probes(net, (X, Y), exact_max_params=10, parts=("ggn",), probes=2, steps=10)
    assert slq["method"] == slq["ggn_method"] == "lanczos+slq" and "functional_lam_max" not in slq
    assert slq["ggn_lam_max"] == pytest.approx(both["ggn_lam_max"], rel=1e-6)
    for bad in (dict(parts=("hessian",)), dict(parts=("ggn",), matrix="ggn")):
        with pytest.raises(ValueError, match="parts must name parts of the Hessian"):
            hessian_probes(net, (X, Y), **bad)
