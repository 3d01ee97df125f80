"""The loss on lines and planes through the weights, its quadratic model, and the order of a stationary
point (shortcut_ext.curvature.landscape), against pure-PyTorch losses and Theorem 1."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shortcut_ext import reference
from shortcut_ext.curvature import (
    HessianOperator,
    align_hidden_units,
    bezier_point,
    fit_bezier_curve,
    loss_at,
    loss_slice,
    losses_at,
    path_directions,
    permute_hidden_units,
    random_directions,
    stationary_order,
)
from shortcut_ext.curvature import landscape
from shortcut_ext.curvature.hessian import fused_hvp_available
from shortcut_ext.experiments import analysis
from shortcut_ext.models import PlainNet, ShortcutNet
from testing import one_thread  # noqa: F401 (the fixture)

F64 = torch.float64
BACKENDS = ["autograd"] + (["fused"] if fused_hvp_available() else [])


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(B=12, d=4, q=None, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, d, generator=g, dtype=dtype), torch.randn(B, q or d, generator=g, dtype=dtype))


def _ref_loss(net, x, y, w_flat, loss="mse"):
    """The mean loss of the net at flat trunk weights ``w_flat``, by the pure-PyTorch reference stack."""
    W = net.stack_weights(net.weight.detach()).double()
    W = w_flat.double().view_as(W)
    h = x.double()
    if getattr(net, "input_proj", None) is not None:
        h = h @ net.input_proj.double().T
    h = reference.residual_stack_forward(h, W, net.shortcut, *net.activations)
    if getattr(net, "readout", None) is not None:
        h = h @ net.readout.double().T
    return float(reference.loss_fn(loss, h, y.double() if y.is_floating_point() else y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [dict(units=3, shortcut=2, mid="tanh"), dict(units=2, shortcut=3, mid="relu"),
                                   dict(units=4, shortcut=1, pre="tanh"), dict(plain=5)])
def test_slice_values_match_the_reference(backend, dtype, shape, request):
    kw = dict(shape)
    if "plain" in kw:
        net = PlainNet(width=4, depth=kw.pop("plain"), activation="tanh", init="xavier", dtype=dtype, seed=1)
    else:
        net = ShortcutNet(width=4, init="small", scale=0.5, dtype=dtype, seed=1, **kw)
    x, y = _data(dtype=dtype)
    op = HessianOperator(net, (x, y), backend=backend)
    V = random_directions(op, k=2, seed=3)
    ts, ss = [-0.5, 0.0, 0.25], [0.1, -1.0]
    w0 = op._W.reshape(-1).double()
    line = loss_slice(op, V[:, 0], ts, quadratic=False)
    plane = loss_slice(op, V, ts, ss, quadratic=False)
    rtol = 1e-12 if dtype == F64 else 2e-5
    for i, t in enumerate(ts):
        ref = _ref_loss(net, x, y, w0 + t * V[:, 0].double())
        assert line.loss[i] == pytest.approx(ref, rel=rtol)
        for j, s in enumerate(ss):
            ref = _ref_loss(net, x, y, w0 + t * V[:, 0].double() + s * V[:, 1].double())
            assert plane.loss[i, j] == pytest.approx(ref, rel=rtol)
    assert line.center == pytest.approx(_ref_loss(net, x, y, w0), rel=rtol) == loss_at(op)
    assert plane.loss.shape == (3, 2) and line.loss.shape == (3,) and line.ss is None
    assert loss_at(op, V[:, 1] * 0.3) == pytest.approx(_ref_loss(net, x, y, w0 + 0.3 * V[:, 1].double()), rel=rtol)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mini_batches_give_the_full_data_slice(loss):
    net = ShortcutNet(width=4, units=3, shortcut=2, mid="tanh", init="small", scale=0.3, dtype=F64, seed=2,
                      out_features=3 if loss == "cross_entropy" else None)
    x, y = _data(B=10)
    if loss == "cross_entropy":
        y = torch.arange(10) % 3
    full = HessianOperator(net, (x, y), loss=loss, backend="autograd")
    parts = HessianOperator(net, [(x[:3], y[:3]), (x[3:], y[3:])], loss=loss, backend="autograd")
    v = random_directions(full, seed=1)
    a, b = loss_slice(full, v, [-1.0, 0.5]), loss_slice(parts, v, [-1.0, 0.5])
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-13)
    np.testing.assert_allclose(a.curvature, b.curvature, rtol=1e-10)
    w0 = full._W.reshape(-1)
    assert a.loss[0] == pytest.approx(_ref_loss(net, x, y, w0 - v[:, 0], loss), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quadratic_model_is_the_second_order_taylor_polynomial(backend):
    """slopes and curvature against central finite differences of the loss, and the model's error O(t^3)."""
    net = ShortcutNet(width=3, units=3, shortcut=2, mid="tanh", init="small", scale=0.8, dtype=F64, seed=4)
    op = HessianOperator(net, _data(d=3), backend=backend)
    V = random_directions(op, k=2, seed=5)
    h = 1e-4
    sl = loss_slice(op, V, [-h, 0.0, h], [-h, 0.0, h])
    L = sl.loss
    assert sl.slopes[0] == pytest.approx((L[2, 1] - L[0, 1]) / (2 * h), rel=1e-6)
    assert sl.slopes[1] == pytest.approx((L[1, 2] - L[1, 0]) / (2 * h), rel=1e-6)
    assert sl.curvature[0, 0] == pytest.approx((L[2, 1] + L[0, 1] - 2 * L[1, 1]) / h**2, rel=1e-4, abs=1e-6)
    assert sl.curvature[1, 1] == pytest.approx((L[1, 2] + L[1, 0] - 2 * L[1, 1]) / h**2, rel=1e-4, abs=1e-6)
    assert sl.curvature[0, 1] == pytest.approx((L[2, 2] - L[2, 0] - L[0, 2] + L[0, 0]) / (4 * h**2), rel=1e-4, abs=1e-6)
    # the exact gradient and v^T H v: against the operator's own
    _, g = op.loss_and_grad()
    HV = op.matmat(V)
    np.testing.assert_allclose(sl.slopes, (g @ V).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sl.curvature, (V.T @ HV).numpy(), rtol=1e-10, atol=1e-14)
    # the model's error falls as t^3 along a line
    errs = [abs(loss_slice(op, V[:, 0], [t]).loss[0] - loss_slice(op, V[:, 0], [t]).quadratic()[0])
            for t in (1e-2, 1e-3)]
    assert 500 < errs[0] / errs[1] < 2000


@pytest.mark.parametrize("act", ["identity", "tanh"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_zero_point_is_a_stationary_point_of_order_n_minus_1(n, act):
    """Theorem 1: along a random direction the loss leaves an n-shortcut net's zero point as t^n."""
    if n == 1 and act == "tanh":
        act_kw = dict(pre="tanh")  # a 1-shortcut net has no mid position
    else:
        act_kw = dict(mid=act)
    net = ShortcutNet(width=4, units=12 // n, shortcut=n, init="zero", dtype=F64, **act_kw)
    x, y = _data(B=20)
    op = HessianOperator(net, (x, y), backend=BACKENDS[-1])
    for seed in (0, 1):
        r = stationary_order(op, random_directions(op, seed=seed))
        assert abs(r.order - n) < 0.05, (n, act, r.local_orders)
        assert r.center == pytest.approx(loss_at(op))
        if n == 2:  # the t^2 coefficient is v^T H v / 2
            v = random_directions(op, seed=seed)[:, 0]
            assert r.coefficient == pytest.approx(0.5 * float(v @ op.matvec(v)), rel=1e-4)


def test_order_of_non_stationary_points_and_of_directions_the_loss_ignores():
    plain = PlainNet(width=4, depth=6, init="xavier", dtype=F64, seed=3)
    op = HessianOperator(plain, _data(), backend="autograd")
    r = stationary_order(op, random_directions(op, seed=2))
    assert abs(r.order - 1) < 0.05
    _, g = op.loss_and_grad()
    assert r.coefficient == pytest.approx(float(g @ random_directions(op, seed=2)[:, 0]), rel=1e-3)
    # at a 2-shortcut zero point, moving only the second matrix of each unit (A) changes nothing: B = 0 keeps
    # every branch 0, so there is no order to measure
    net = ShortcutNet(width=4, units=3, shortcut=2, init="zero", dtype=F64)
    op = HessianOperator(net, _data(), backend="autograd")
    v = torch.zeros(3, 2, 4, 4, dtype=F64)
    v[:, 1] = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    r = stationary_order(op, v.reshape(-1) / v.norm())
    assert math.isnan(r.order) and math.isnan(r.coefficient) and not np.any(r.changes)
    assert np.isnan(r.local_orders).all()


def test_random_directions_normalisations():
    net = ShortcutNet(width=3, units=4, shortcut=2, init="small", scale=1.0, dtype=F64, seed=7)
    with torch.no_grad():
        net.weight[1, 0, 2] = 0  # a zero row: its filter direction is 0
    op = HessianOperator(net, _data(d=3), backend="autograd")
    W = op._W
    u = random_directions(op, k=3, seed=1)
    assert u.shape == (op.P, 3) and u.dtype == F64
    np.testing.assert_allclose(u.norm(dim=0).numpy(), 1.0, rtol=1e-14)
    assert torch.equal(u, random_directions(op, k=3, seed=1)) and not torch.equal(u, random_directions(op, k=3, seed=2))
    f = random_directions(op, k=2, seed=1, normalize="filter").T.reshape((2,) + tuple(W.shape))
    np.testing.assert_allclose(f.norm(dim=-1).numpy(), W.norm(dim=-1).expand(2, *W.shape[:-1]).numpy(), rtol=1e-12)
    assert not f[:, 1, 0, 2].any()
    lay = random_directions(op, seed=1, normalize="layer").T.reshape(W.shape)
    np.testing.assert_allclose(lay.norm(dim=(-2, -1)).numpy(), W.norm(dim=(-2, -1)).numpy(), rtol=1e-12)
    net32 = ShortcutNet(width=3, units=2, shortcut=2, init="small", dtype=torch.float32)
    assert random_directions(HessianOperator(net32, _data(d=3, dtype=torch.float32)), seed=0).dtype == torch.float32
    zero = HessianOperator(ShortcutNet(width=3, units=2, shortcut=2, init="zero", dtype=F64), _data(d=3))
    for how in ("filter", "layer"):
        with pytest.raises(ValueError, match=f"normalize='{how}'.*all 0.*normalize='unit'"):
            random_directions(zero, normalize=how)


def test_bad_input_is_named():
    net = ShortcutNet(width=3, units=2, shortcut=2, init="small", dtype=F64)
    op = HessianOperator(net, _data(d=3), backend="autograd")
    P = op.P
    v = random_directions(op, k=3)
    cases = [
        (lambda: loss_slice(net, v[:, 0], [0.1]), TypeError, "op must be a HessianOperator"),
        (lambda: loss_slice(op, v[:5, 0], [0.1]), ValueError, rf"directions must have shape \[{P}\] or \[{P}, k\]"),
        (lambda: loss_slice(op, v[:, 0].numpy(), [0.1]), TypeError, "directions must be a torch.Tensor"),
        (lambda: loss_slice(op, v[:, 0].long(), [0.1]), TypeError, "directions must be floating point"),
        (lambda: loss_slice(op, v[:, 0] * math.nan, [0.1]), ValueError, "directions must be finite"),
        (lambda: loss_slice(op, v, [0.1]), ValueError, "one direction .* or two .*, got 3"),
        (lambda: loss_slice(op, v[:, 0], [0.1], [0.2]), ValueError, "ss is the grid along a second direction"),
        (lambda: loss_slice(op, v[:, :2], [0.1]), ValueError, "give the grid along the second as ss"),
        (lambda: loss_slice(op, v[:, 0], []), ValueError, "ts must be a non-empty 1-D"),
        (lambda: loss_slice(op, v[:, 0], [0.1, math.inf]), ValueError, "ts must be finite"),
        (lambda: loss_slice(op, v[:, 0], "abc"), TypeError, "ts must be a 1-D sequence of real numbers"),
        (lambda: loss_slice(op, v[:, 0], [0.1], quadratic=1), TypeError, "quadratic must be True or False"),
        (lambda: loss_slice(op, v[:, 0], [0.1], quadratic=False).quadratic(), ValueError, "quadratic=False"),
        (lambda: stationary_order(op, v[:, :2]), ValueError, "direction must be one direction"),
        (lambda: stationary_order(op, v[:, 0] * 0), ValueError, "direction must not be 0"),
        (lambda: stationary_order(op, v[:, 0], ts=[0.0, 0.1]), ValueError, "ts must be positive"),
        (lambda: stationary_order(op, v[:, 0], ts=[0.1]), ValueError, "at least 2 steps"),
        (lambda: stationary_order(op, v[:, 0], use=0), ValueError, "use must be a positive integer"),
        (lambda: random_directions(op, k=0), ValueError, "k must be a positive integer"),
        (lambda: random_directions(op, normalize="global"), ValueError, "normalize must be one of"),
        (lambda: loss_at(op, v[:, :2]), ValueError, rf"shift must have shape \[{P}\]"),
        (lambda: losses_at(op, v[:, :2], [0.1, 0.2]), ValueError, r"coords must have shape \[N, 2\] .*got \[2\]"),
        (lambda: losses_at(op, v[:, :2], np.zeros((0, 2))), ValueError, r"with N >= 1 .*got \[0, 2\]"),
        (lambda: losses_at(op, v[:, 0], [[0.1, 0.2]]), ValueError, r"coords must have shape \[N, 1\]"),
        (lambda: losses_at(op, v[:, 0], [math.nan]), ValueError, "coords must be finite"),
        (lambda: losses_at(op, v[:, 0], "abc"), TypeError, "coords must be real numbers"),
        (lambda: losses_at(net, v[:, 0], [0.1]), TypeError, "op must be a HessianOperator"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_slice_callback_and_dict():
    net = ShortcutNet(width=3, units=2, shortcut=2, init="small", dtype=F64)
    op = HessianOperator(net, _data(d=3), backend="autograd")
    seen = []
    sl = loss_slice(op, random_directions(op, k=2), [0.0, 0.1], [0.2, 0.3, 0.4], callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 6) for i in range(1, 7)]
    d = sl.to_dict()
    assert np.array(d["loss"]).shape == (2, 3) and len(d["curvature"]) == 2 and d["center"] == sl.center


def test_losses_at_any_points_are_the_references():
    """Points off any grid (a path through the plane), each loss the reference stack's at ``w + V c``."""
    net = ShortcutNet(width=3, units=3, shortcut=2, mid="tanh", init="small", scale=0.5, dtype=F64)
    x, y = _data(d=3)
    op = HessianOperator(net, (x, y), backend=BACKENDS[-1])
    V = random_directions(op, k=2, seed=3)
    c = np.array([[0.0, 0.0], [0.3, -0.1], [-1.2, 0.7], [1e-4, 2.0]])
    seen = []
    got = losses_at(op, V, c, callback=lambda i, n: seen.append((i, n)))
    w = net.stack_weights(net.weight.detach()).double().reshape(-1)
    want = [_ref_loss(net, x, y, w + V.double() @ torch.tensor(ci)) for ci in c]
    np.testing.assert_allclose(got, want, rtol=1e-13)
    assert got[0] == loss_at(op) and seen == [(i, 4) for i in range(1, 5)]
    assert np.array_equal(losses_at(op, V[:, 0], c[:, 0]), losses_at(op, V[:, :1], c[:, :1]))


def test_verdict_fails_when_an_order_is_off():
    rows = [{"arch": "2-shortcut-zero", "act": "linear", "depth": 12, "seed": 0, "n": 2, "init": "zero",
             "order": 2.0, "coefficient": 0.5, "second_order_hvp": 0.5},
            {"arch": "3-shortcut-zero", "act": "linear", "depth": 12, "seed": 0, "n": 3, "init": "zero",
             "order": 3.0, "coefficient": 1.0, "second_order_hvp": 0.0},
            {"arch": "plain-xavier", "act": "linear", "depth": 12, "seed": 0, "n": 0, "init": "xavier",
             "order": 1.0, "coefficient": 1.0, "second_order_hvp": 1.0}]
    assert [v.holds for v in analysis.verdict_stationary_order(rows)] == [True, True, True]
    bad = [dict(rows[0]), dict(rows[1], order=2.0), dict(rows[2], order=2.0)]
    assert [v.holds for v in analysis.verdict_stationary_order(bad)] == [False, True, False]
    off = [dict(rows[0], coefficient=0.51)] + rows[1:]
    assert [v.holds for v in analysis.verdict_stationary_order(off)] == [True, False, True]
    unmeasured = [dict(rows[0]), dict(rows[1], order=math.nan), rows[2], dict(rows[2], depth=480, order=math.nan)]
    v = analysis.verdict_stationary_order(unmeasured)
    assert v[0].holds is None and v[2].holds is True and "vanished gradient) at plain-xavier D=480" in v[2].measured
    assert analysis.verdict_stationary_order([dict(rows[2], order=math.nan)])[0].holds is None


def _op(seed=0, units=3, d=3, n=2):
    net = ShortcutNet(d, units, n, "identity", "tanh", "identity", init="small", scale=0.3, seed=seed, dtype=F64)
    data = _data(B=10, d=d)
    return HessianOperator(net, data, backend="autograd"), net, data


def test_path_directions_of_a_path_in_a_plane_recover_it():
    """Points of a plane through the weights: the two directions span it (every point back from its
    coordinates), are orthonormal, hold all the path's variance, and start the path at negative coordinates."""
    op, _, _ = _op()
    w = op._W.reshape(-1)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, op.P, generator=g, dtype=F64)
    t = torch.linspace(1, 0, 7, dtype=F64)[:, None]
    path = w + t * a + (t * t - t) * 3 * b  # a curved path ending at the weights
    pp = path_directions(op, path)
    V = pp.directions
    assert V.shape == (op.P, 2) and V.dtype == F64
    torch.testing.assert_close(V.T @ V, torch.eye(2, dtype=F64), rtol=0, atol=1e-13)
    torch.testing.assert_close(w + torch.from_numpy(pp.coords) @ V.T, path, rtol=0, atol=1e-12)
    assert pp.off_plane.max() < 1e-13 and pp.off_plane[-1] == pytest.approx(0, abs=1e-15)
    assert pp.explained.sum() == pytest.approx(1, abs=1e-12) and pp.explained[0] >= pp.explained[1] > 0
    assert (pp.coords[0] < 0).all() and np.abs(pp.coords[-1]).max() < 1e-12
    # the same points as a list of [R, n, d, d] tensors: the same plane
    again = path_directions(op, [p.view_as(op._W) for p in path])
    assert torch.equal(again.directions, V) and np.array_equal(again.coords, pp.coords)


def test_path_directions_are_the_principal_components(monkeypatch):
    """Against numpy's SVD of the centred differences: the same subspace (projector), variance fractions and
    coordinates, for a path of random points; one direction is the first of the two."""
    op, net, (x, y) = _op(units=4, d=2)
    g = torch.Generator().manual_seed(2)
    path = op._W.reshape(-1) + torch.randn(9, op.P, generator=g, dtype=F64) * torch.linspace(3, 0.1, op.P,
                                                                                             dtype=F64)
    pp = path_directions(op, path)
    D = (path - op._W.reshape(-1)).numpy()
    _, S, Vt = np.linalg.svd(D - D.mean(axis=0), full_matrices=False)
    V = pp.directions.numpy()
    np.testing.assert_allclose(V @ V.T, Vt[:2].T @ Vt[:2], atol=1e-12)
    np.testing.assert_allclose(pp.explained, S[:2] ** 2 / (S ** 2).sum(), rtol=1e-12)
    np.testing.assert_allclose(pp.coords, D @ V, atol=1e-12)
    np.testing.assert_allclose(pp.off_plane, np.linalg.norm(D - D @ V @ V.T, axis=1) / np.linalg.norm(D, axis=1).max(),
                               rtol=1e-10)
    # in slices of 2 weights each (as a long path of a big net is done): the same numbers to rounding
    monkeypatch.setattr(landscape, "_PATH_BLOCK", 18)
    sliced = path_directions(op, path)
    np.testing.assert_allclose(sliced.directions.numpy(), V, atol=1e-12)
    np.testing.assert_allclose(sliced.coords, pp.coords, atol=1e-12)
    one = path_directions(op, path, k=1)
    np.testing.assert_allclose(one.directions[:, 0].numpy(), V[:, 0], atol=1e-12)
    # the slice along them is a slice like any other
    sl = loss_slice(op, pp.directions, [-1.0, 0.0, 0.5], [0.0, 0.25])
    ref = [float(_ref_loss(net, x, y, op._W.reshape(-1) + t * pp.directions[:, 0] + s * pp.directions[:, 1]))
           for t in [-1.0, 0.0, 0.5] for s in [0.0, 0.25]]
    np.testing.assert_allclose(sl.loss.ravel(), ref, rtol=1e-12)


def test_path_directions_refuse_what_spans_no_plane():
    op, _, _ = _op()
    w = op._W.reshape(-1)
    line = torch.stack([w + t * torch.ones_like(w) for t in (2.0, 1.0, 0.0)])
    with pytest.raises(ValueError, match="spans fewer than 2 directions .* lie on a line"):
        path_directions(op, line)
    assert path_directions(op, line, k=1).off_plane.max() < 1e-15
    with pytest.raises(ValueError, match=r"at least k \+ 1 = 3 points"):
        path_directions(op, line[:2])
    with pytest.raises(ValueError, match=r"are all one point \(the weights never moved\)"):
        path_directions(op, torch.stack([w, w, w]))
    with pytest.raises(ValueError, match=r"path\[1\] must be floating-point weights of 54 values"):
        path_directions(op, [w, w[:5], w])
    with pytest.raises(ValueError, match=r"path\[0\] must be floating-point weights .* got list"):
        path_directions(op, [[1.0], w, w])
    with pytest.raises(ValueError, match=r"shape \[T, 54\]"):
        path_directions(op, w)
    with pytest.raises(ValueError, match="finite"):
        path_directions(op, torch.stack([w, w + 1, w * math.nan]))
    with pytest.raises(TypeError, match="path must be"):
        path_directions(op, 3)
    with pytest.raises(TypeError, match="HessianOperator"):
        path_directions("op", line)


def _perms(R, n, d, g):
    return torch.stack([torch.stack([torch.randperm(d, generator=g) for _ in range(n - 1)]) for _ in range(R)])


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind, R, n, acts", [
    ("shortcut", 4, 2, ("identity", "tanh", "identity")),
    ("shortcut", 3, 3, ("relu", "relu", "tanh")),
    ("shortcut", 2, 4, ("identity", "ssigmoid", "identity")),
    ("plain", 1, 6, ("identity", "tanh", "identity")),
])
def test_permuting_hidden_units_keeps_the_function(kind, R, n, acts, dtype):
    """Layer k's rows and layer k + 1's columns move together: the stack computes the same outputs (to
    rounding: the sums run in another order), for every activation at every position."""
    g = torch.Generator().manual_seed(R * 10 + n)
    d = 5
    W = (torch.randn(R, n, d, d, generator=g, dtype=F64) / d ** 0.5).to(dtype)
    P = _perms(R, n, d, g)
    W2 = permute_hidden_units(W, P)
    assert W2.dtype == dtype and not torch.equal(W2, W)
    x = torch.randn(9, d, generator=g, dtype=F64).to(dtype)
    f1 = reference.residual_stack_forward(x, W, kind == "shortcut", *acts)
    f2 = reference.residual_stack_forward(x, W2, kind == "shortcut", *acts)
    tol = 1e-13 if dtype == F64 else 1e-5
    torch.testing.assert_close(f2, f1, rtol=tol, atol=tol)
    # the permuted units, one by one: layer k's rows by P_k, layer k + 1's columns by P_k
    for r in range(R):
        for k in range(n):
            want = W[r, k]
            if k < n - 1:
                want = want[P[r, k]]
            if k > 0:
                want = want[:, P[r, k - 1]]
            assert torch.equal(W2[r, k], want)
    assert torch.equal(permute_hidden_units(W, torch.arange(d).repeat(R, n - 1, 1)), W)


@pytest.mark.parametrize("R, n, d", [(6, 2, 7), (3, 3, 6), (2, 4, 5), (1, 12, 8)])
def test_weight_matching_takes_a_permuted_net_back(R, n, d):
    """A net with its hidden units permuted is matched back to the original exactly, and the permutations
    found are the ones that map it there."""
    g = torch.Generator().manual_seed(n * 100 + d)
    W = torch.randn(R, n, d, d, generator=g, dtype=F64)
    other = permute_hidden_units(W, _perms(R, n, d, g))
    al = align_hidden_units(W, other)
    assert al.distance_before > 1 and al.distance_after < 1e-12 and torch.equal(al.weights, W)
    assert torch.equal(permute_hidden_units(other, al.perms), al.weights)
    assert al.converged and al.moved_units == R and (al.sweeps == 1 if n == 2 else al.sweeps >= 2)
    assert al.to_dict()["units"] == R and al.to_dict()["distance_after"] == al.distance_after
    same = align_hidden_units(W, W)  # a net against itself: nothing moves
    assert same.moved_units == 0 and same.distance_after == 0 and torch.equal(same.weights, W)


def test_weight_matching_of_two_nets_is_optimal_where_it_can_be_checked():
    """Two unrelated nets: for n = 2 each unit's permutation is the best of all d! (checked by enumeration);
    for longer chains no single permutation can be improved, and the distance never grows."""
    import itertools

    g = torch.Generator().manual_seed(3)
    d = 4
    A, B = torch.randn(5, 2, d, d, generator=g, dtype=F64), torch.randn(5, 2, d, d, generator=g, dtype=F64)
    al = align_hidden_units(A, B)
    for r in range(5):
        best = min(float((A[r] - permute_hidden_units(B[r:r + 1], torch.tensor(p)[None, None])[0]).norm())
                   for p in itertools.permutations(range(d)))
        assert float((A[r] - al.weights[r]).norm()) == pytest.approx(best, rel=1e-12)
    assert al.distance_after < al.distance_before
    A, B = torch.randn(3, 5, d, d, generator=g, dtype=F64), torch.randn(3, 5, d, d, generator=g, dtype=F64)
    al = align_hidden_units(A, B)
    assert al.converged and al.distance_after <= al.distance_before
    for r in range(3):
        for k in range(4):  # change one permutation to any other: never closer
            for p in itertools.permutations(range(d)):
                P = al.perms[r:r + 1].clone()
                P[0, k] = torch.tensor(p)
                moved = float((A[r] - permute_hidden_units(B[r:r + 1], P)[0]).norm())
                assert moved >= float((A[r] - al.weights[r]).norm()) * (1 - 1e-12)


def test_alignment_refusals():
    W = torch.randn(2, 2, 3, 3, dtype=F64)
    with pytest.raises(ValueError, match="n = 1 layer has no hidden units"):
        align_hidden_units(W[:, :1], W[:, :1])
    with pytest.raises(ValueError, match="the same shape"):
        align_hidden_units(W, W[:1])
    with pytest.raises(ValueError, match=r"reference must have shape \[R, n, d, d\]"):
        align_hidden_units(W[0], W[0])
    with pytest.raises(ValueError, match="other holds nan or inf"):
        align_hidden_units(W, W.clone().fill_(math.nan))
    with pytest.raises(TypeError, match="other must be a floating-point torch.Tensor"):
        align_hidden_units(W, W.long())
    with pytest.raises(ValueError, match="max_sweeps"):
        align_hidden_units(W, W, max_sweeps=0)
    with pytest.raises(ValueError, match=r"perms must have shape \[R, n - 1, d\] = \[2, 1, 3\]"):
        permute_hidden_units(W, torch.zeros(2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="a permutation of 0..d-1 in every row"):
        permute_hidden_units(W, torch.zeros(2, 1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="perms must be an integer torch.Tensor"):
        permute_hidden_units(W, torch.zeros(2, 1, 3))


def _two_nets(seed=0, units=3, d=4):
    g = torch.Generator().manual_seed(seed)
    nets = [ShortcutNet(d, units, 2, mid="tanh", init="xavier", seed=s, backend="torch", dtype=F64) for s in (0, 1)]
    X, Y = torch.randn(20, d, generator=g, dtype=F64), torch.randn(20, d, generator=g, dtype=F64)
    return nets, X, Y


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bezier_step_is_the_pure_pytorch_gradient_step(backend):
    """One step of fit_bezier_curve: bend - lr * mean_j 2 t_j (1 - t_j) grad L(phi(t_j)), each gradient taken by
    autograd through the pure-PyTorch stack; the curve's ends are its end points exactly."""
    nets, X, Y = _two_nets()
    op = HessianOperator(nets[0], (X, Y), "mse", backend=backend)
    A, B = op._W.clone(), nets[1].stack_weights().detach()
    for samples in (1, 3):
        c = fit_bezier_curve(op, A, B, steps=1, lr=0.7, samples=samples, seed=5)
        u = float(np.random.default_rng([5, 0]).random())
        theta = (A + B) / 2
        want, mean = theta.clone(), 0.0
        for j in range(samples):
            t = (j + u) / samples
            w = ((1 - t) ** 2 * A + 2 * t * (1 - t) * theta + t * t * B).requires_grad_(True)
            L = reference.loss_fn("mse", reference.residual_stack_forward(X, w, True, "identity", "tanh",
                                                                          "identity"), Y)
            (gr,) = torch.autograd.grad(L, w)
            want -= 0.7 * 2 * t * (1 - t) / samples * gr
            mean += float(L.detach()) / samples
        torch.testing.assert_close(c.bend, want, rtol=1e-12, atol=1e-14)
        assert c.steps == 1 and c.objective == [pytest.approx(mean, rel=1e-12)]
    assert torch.equal(bezier_point(A, c.bend, B, 0.0), A) and torch.equal(bezier_point(A, c.bend, B, 1.0), B)


def test_a_bezier_fit_lowers_its_objective_and_resumes_to_the_same_bits():
    nets, X, Y = _two_nets(units=4, d=5)
    op = HessianOperator(nets[0], (X, Y), "mse")
    A, B = op._W.clone(), nets[1].stack_weights().detach()
    seen = []
    whole = fit_bezier_curve(op, A, B, steps=40, lr=0.2, seed=1, callback=lambda s, n, th, h: seen.append(s))
    assert seen == list(range(1, 41)) and len(whole.objective) == 40
    assert whole.objective[-1] < 0.5 * whole.objective[0]
    ts = np.linspace(0, 1, 11)
    line = [landscape._loss(op, bezier_point(A, (A + B) / 2, B, t)) for t in ts]
    curve = [landscape._loss(op, bezier_point(A, whole.bend, B, t)) for t in ts]
    assert max(curve[1:-1]) < max(line[1:-1]) and curve[0] == line[0] and curve[-1] == line[-1]
    part = fit_bezier_curve(op, A, B, steps=15, lr=0.2, seed=1)
    rest = fit_bezier_curve(op, A, B, steps=40, lr=0.2, seed=1, bend=part.bend, start=15, objective=part.objective)
    assert torch.equal(rest.bend, whole.bend) and rest.objective == whole.objective
    assert torch.equal(fit_bezier_curve(op, A, B, steps=0, lr=0.2).bend, (A + B) / 2)


def test_bezier_fit_refusals():
    nets, X, Y = _two_nets()
    op = HessianOperator(nets[0], (X, Y), "mse")
    A = op._W
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        fit_bezier_curve(op, A, A, steps=1, lr=0.0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        fit_bezier_curve(op, A, A, steps=1, lr=math.nan)
    with pytest.raises(ValueError, match="start must be <= steps"):
        fit_bezier_curve(op, A, A, steps=1, lr=0.1, start=2)
    with pytest.raises(ValueError, match="samples"):
        fit_bezier_curve(op, A, A, steps=1, lr=0.1, samples=0)
    with pytest.raises(ValueError, match=r"end1 must have shape \["):
        fit_bezier_curve(op, A, A[:1], steps=1, lr=0.1)
    with pytest.raises(ValueError, match="end1 must be finite"):
        fit_bezier_curve(op, A, torch.full_like(A, math.nan), steps=1, lr=0.1)
    with pytest.raises(TypeError, match="op must be a HessianOperator"):
        fit_bezier_curve(None, A, A, steps=1, lr=0.1)
