"""The fused products with the Hessian's two parts, ``residual_stack_hvp_part`` (``matrix="ggn"``: ``G v = J^T H_l
J v``; ``"functional"``: ``F v = (H - G) v``), against the reference (``jvp`` then ``vjp`` for ``G``, double backward
less that for ``F``) and dense matrices: ``G = J^T H_z J`` from ``torch.func.jacrev`` of the outputs and
``torch.func.hessian`` of the loss in the outputs (no closed form of ``H_l`` in it), ``F = H - G`` with ``H`` by
``torch.func.hessian``; and the empirical Fisher (``matrix="empirical_fisher"``) against ``(1/m) sum_i g_i g_i^T``
from ``jacrev`` of the per-sample losses; in both memory modes of the CPU kernel."""
from __future__ import annotations

import pytest
import torch
from torch.func import hessian, jacrev

import shortcut_ext
from shortcut_ext import reference as ref
from test_hvp_op import PATTERNS, TARGETS, _assert_rel, _problem, _readout_problem, hvp_memory_mode  # noqa: F401
from testing import DispatchCalls, assert_close_lowp, requires_fused

pytestmark = requires_fused


PARTS = ("ggn", "functional")
KINDS = PARTS + ("empirical_fisher",)  # what the op computes besides the Hessian


def _assert_rel_to(a, b, scale, bound, what):
    """``|a - b| <= bound |scale|`` (norms): a part may be zero where the Hessian ``scale`` is not."""
    s = float(scale.norm())
    if s == 0:
        assert float(a.norm()) <= 1e-14 and float(b.norm()) <= 1e-14, f"{what}: expected zeros"
    else:
        err = float((a - b).norm()) / s
        assert err <= bound, f"{what}: error {err:.3e} of the Hessian's products > {bound:.0e}"


def _op(x, w, y, v, shortcut, acts, loss, P=None, matrix="ggn"):
    return torch.ops.shortcut_ext.residual_stack_hvp_part(x, w, y, v, shortcut, *acts, loss, matrix, P)


def _ref(x, w, y, v, shortcut, acts, loss, P=None, matrix="ggn"):
    return ref.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss, P, matrix)


_DENSE: dict = {}  # the dense matrices of a problem, shared by its cases (the matrices and both memory modes)


def _dense_matrix(x, w, y, shortcut, acts, loss, P, matrix):
    """The dense ``[p, p]`` matrix ``matrix`` of the problem, computed once per problem and matrix: ``G = J^T H_z J``
    (``J`` the Jacobian of the outputs ``z`` ``[B, q]`` in the flat weights, ``H_z`` the Hessian of the whole loss in
    ``z``, ``[B, q, B, q]``), ``H`` by ``torch.func.hessian``, ``F = H - G``, or the empirical Fisher
    ``(1/B) sum_i g_i g_i^T`` with ``g_i`` the gradient of sample i's loss."""
    key = (tuple(t.dtype for t in (x, w, y)), x.numpy().tobytes(), w.numpy().tobytes(), y.numpy().tobytes(),
           tuple(w.shape), shortcut, tuple(acts), loss, None if P is None else P.numpy().tobytes(), matrix)
    if key in _DENSE:
        return _DENSE[key]
    shape = w.shape

    def outputs(flat):
        f = ref.residual_stack_forward(x, flat.view(shape), shortcut, *acts)
        return f if P is None else f @ P.T

    flat = w.reshape(-1)
    if matrix == "empirical_fisher":
        B = x.shape[0]
        g = jacrev(lambda fl: torch.stack([ref.loss_fn(loss, outputs(fl)[i:i + 1], y[i:i + 1]) for i in range(B)]))(flat)
        M = g.T @ g / B
    elif matrix == "ggn":
        J = jacrev(outputs)(flat)  # [B, q, p]
        Hz = hessian(lambda z: ref.loss_fn(loss, z, y))(outputs(flat))  # [B, q, B, q]
        M = torch.einsum("aip,aibj,bjr->pr", J, Hz, J)
    elif matrix == "hessian":
        M = hessian(lambda fl: ref.loss_fn(loss, outputs(fl), y))(flat)
    else:
        M = _dense_matrix(x, w, y, shortcut, acts, loss, P, "hessian") - _dense_matrix(x, w, y, shortcut, acts, loss, P,
                                                                                        "ggn")
    _DENSE[key] = M
    return M


def _dense_part(x, w, y, v, shortcut, acts, loss, P=None, matrix="ggn"):
    """The products of the dense matrix ``matrix`` (``_dense_matrix``) with the directions ``v``."""
    M = _dense_matrix(x, w, y, shortcut, acts, loss, P, matrix)
    return (v.reshape(v.shape[0], -1) @ M.T).view(v.shape)


@pytest.mark.parametrize("matrix", KINDS)
@pytest.mark.parametrize("target", TARGETS + ("ce_mass",))
@pytest.mark.parametrize("n,shortcut", [(1, True), (2, True), (3, True), (1, False), (2, False)])
def test_float64_matches_reference_and_dense_parts(n, shortcut, target, matrix):
    """Every activation pattern, zero and random weights, both losses (probability targets whose rows do not sum
    to 1 as well: ``H_l`` scales with the row's mass): the products to 1e-10 against the reference and the dense
    ``J^T H_z J`` (or ``H`` less it), the loss and gradient equal to the HVP op's."""
    for i, acts in enumerate(PATTERNS):
        for zero in (False, True):
            if zero and "relu" in acts:
                continue
            x, w, y, v, loss = _problem(B=5, d=3, R=2, n=n, K=3, target="mse" if target == "ce_mass" else target,
                                        scale=0.7, zero=zero, seed=i)
            if target == "ce_mass":
                y, loss = 2 * torch.rand(5, 3, generator=torch.Generator().manual_seed(i), dtype=torch.float64), \
                    "cross_entropy"
            got = _op(x, w, y, v, shortcut, acts, loss, matrix=matrix)
            case = f"{matrix} n={n} shortcut={shortcut} {acts} {target} zero={zero}"
            scale = _dense_part(x, w, y, v, shortcut, acts, loss, matrix="hessian")
            want = _ref(x, w, y, v, shortcut, acts, loss, matrix=matrix)[2]
            _assert_rel_to(got[2], want, scale, 1e-10, case + " vs reference")
            _assert_rel_to(got[2], _dense_part(x, w, y, v, shortcut, acts, loss, matrix=matrix), scale, 1e-10,
                           case + " vs dense")
            hvp = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss)
            _assert_rel(got[0], hvp[0], 1e-14, case + " loss vs the HVP op's")
            _assert_rel(got[1], hvp[1], 1e-14, case + " gradient vs the HVP op's")


@pytest.mark.parametrize("matrix", KINDS)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("q", [1, 3, 7])  # fewer targets than the width (d = 3), as many, more
def test_a_readout_gives_the_parts_of_the_read_out_loss(q, target, matrix):
    for i, acts in enumerate(PATTERNS[::3]):
        x, w, y, v, loss, P = _readout_problem(B=5, d=3, q=q, R=2, n=2, K=2, target=target, seed=i)
        got = _op(x, w, y, v, True, acts, loss, P, matrix)
        case = f"{matrix} q={q} {acts} {target}"
        scale = _dense_part(x, w, y, v, True, acts, loss, P, "hessian")
        _assert_rel_to(got[2], _ref(x, w, y, v, True, acts, loss, P, matrix)[2], scale, 1e-10, case + " vs reference")
        _assert_rel_to(got[2], _dense_part(x, w, y, v, True, acts, loss, P, matrix), scale, 1e-10, case + " vs dense")


@pytest.mark.parametrize(
    "B,d,R,n,K,target",
    [(300, 16, 40, 2, 16, "mse"), (700, 4, 30, 3, 5, "ce_index"), (1, 5, 3, 2, 1, "ce_prob"), (37, 1, 4, 1, 2, "mse"),
     (65, 20, 6, 2, 3, "mse"), (40, 33, 4, 1, 2, "ce_index"), (9, 31, 3, 2, 1, "ce_prob")],
)
def test_many_tiles_and_segments(B, d, R, n, K, target):
    """Several tiles, slots and segments (G's reverse pass recomputes a segment's forward without tangents), and
    widths on both sides of the record policy (d >= 32 keeps every record by default)."""
    x, w, y, v, loss = _problem(B, d, R, n, K, target)
    acts = ("tanh", "relu", "ssigmoid")
    for matrix in KINDS:
        _assert_rel(_op(x, w, y, v, True, acts, loss, matrix=matrix)[2],
                    _ref(x, w, y, v, True, acts, loss, matrix=matrix)[2], 1e-10, matrix)


@pytest.mark.parametrize("matrix", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_float32_within_torch_error(target, matrix):
    for shortcut, acts in [(True, ("identity", "relu", "identity")), (True, ("tanh", "tanh", "ssigmoid")),
                           (False, ("ssigmoid", "tanh", "relu"))]:
        x, w, y, v, loss = _problem(B=33, d=6, R=5, n=2, K=4, target=target, scale=0.5)
        exact = _ref(x, w, y, v, shortcut, acts, loss, matrix=matrix)
        f32 = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
        args = tuple(map(f32, (x, w, y, v)))
        got = _op(*args, shortcut, acts, loss, matrix=matrix)
        same = _ref(*args, shortcut, acts, loss, matrix=matrix)
        for a, b, c in zip(got, same, exact):
            assert a.dtype == torch.float32
            assert_close_lowp(a, b, c, factor=10.0)


@pytest.mark.parametrize("matrix", KINDS)
def test_symmetric_and_batched_equals_sequential(matrix):
    """u^T M v = v^T M u, k directions in one call equal k calls, G and the empirical Fisher positive
    semi-definite, and the two parts sum to the Hessian's products."""
    x, w, y, v, loss = _problem(B=40, d=5, R=6, n=2, K=5, target="ce_index", scale=0.8)
    acts = ("tanh", "ssigmoid", "relu")
    gv = _op(x, w, y, v, True, acts, loss, matrix=matrix)[2]
    for j in range(5):
        one = _op(x, w, y, v[j:j + 1], True, acts, loss, matrix=matrix)[2][0]
        torch.testing.assert_close(one, gv[j], rtol=1e-12, atol=1e-15)
        if matrix != "functional":
            assert float((v[j] * gv[j]).sum()) >= 0  # v^T G v >= 0
    uGv, vGu = float((v[0] * gv[1]).sum()), float((v[1] * gv[0]).sum())
    assert abs(uGv - vGu) <= 1e-11 * max(abs(uGv), 1e-3)
    parts = sum(_op(x, w, y, v, True, acts, loss, matrix=m)[2] for m in PARTS)
    hv = _op(x, w, y, v, True, acts, loss, matrix="hessian")[2]
    assert torch.equal(hv, torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss)[2])
    torch.testing.assert_close(parts, hv, rtol=1e-12, atol=1e-13 * float(hv.abs().max()))


@pytest.mark.parametrize("n", [2, 3])
def test_zero_at_a_two_or_more_shortcut_zero_point(n):
    """At all-zero weights with n >= 2 the outputs do not move to first order (J = 0), so G = 0 exactly (and so
    is the empirical Fisher: every sample's gradient is zero) and F is the Hessian, Theorem 1's saddle at n = 2 (at
    n >= 3 it is zero too)."""
    x, w, y, v, loss = _problem(B=7, d=4, R=3, n=n, K=2, target="mse", zero=True)
    acts = ("identity", "tanh", "identity")
    assert not _op(x, w, y, v, True, acts, loss)[2].any()
    assert not _op(x, w, y, v, True, acts, loss, matrix="empirical_fisher")[2].any()
    hv = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss)[2]
    assert torch.equal(_op(x, w, y, v, True, acts, loss, matrix="functional")[2], hv)
    if n == 2:
        assert hv.abs().max() > 0.01


@pytest.mark.parametrize("matrix", KINDS)
def test_public_wrapper_uses_the_part_kernel_on_the_cpu(matrix):
    x, w, y, v, loss = _problem(B=8, d=3, R=2, n=2, K=2, target="ce_prob")
    acts = ("tanh", "relu", "tanh")
    with DispatchCalls() as calls:
        got = shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss=loss, backend="fused", matrix=matrix)
    assert [n for n in calls.names if n.startswith("shortcut_ext.")] == ["shortcut_ext.residual_stack_hvp_part.default"]
    with DispatchCalls() as calls:
        want = shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss=loss, backend="torch", matrix=matrix)
    assert not any(n.startswith("shortcut_ext.") for n in calls.names)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("matrix", KINDS)
def test_empty_batch_deterministic_and_opcheck(matrix):
    for target in TARGETS:
        x, w, y, v, loss = _problem(B=0, d=3, R=2, n=2, K=2, target=target)
        L, g, gv = _op(x, w, y, v, True, ("tanh",) * 3, loss, matrix=matrix)
        assert L.item() == 0.0 and not g.any() and gv.shape == v.shape and not gv.any()
    x, w, y, v, loss = _problem(B=257, d=8, R=10, n=2, K=3, target="mse")
    a, b = (_op(x, w, y, v, True, ("identity", "relu", "identity"), loss, matrix=matrix) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    op = torch.ops.shortcut_ext.residual_stack_hvp_part.default
    for target, acts in [("mse", ("identity", "relu", "identity")), ("ce_index", ("tanh", "tanh", "ssigmoid")),
                         ("ce_prob", ("ssigmoid", "identity", "tanh"))]:
        x, w, y, v, loss = _problem(B=6, d=4, R=3, n=2, K=2, target=target)
        torch.library.opcheck(op, (x, w, y, v, True, *acts, loss, matrix))
    x, w, y, v, loss, P = _readout_problem(B=5, d=3, q=2, R=2, n=2, K=2, target="ce_index", seed=0)
    torch.library.opcheck(op, (x, w, y, v, True, "relu", "tanh", "identity", loss, matrix, P))


F64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("via", ["op", "wrapper"])
@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(v=torch.zeros(0, 2, 2, 3, 3, **F64)), ValueError, r"directions must hold k >= 1 directions"),
        (dict(v=torch.zeros(2, 2, 2, 4, 3, **F64)), ValueError, r"directions must have shape \[k, .*got \[2, 2, 2, 4, 3\]"),
        (dict(v=torch.zeros(2, 2, 2, 3, 3)), TypeError, r"directions must have dtype float64 like weights, got float32"),
        (dict(y=torch.zeros(5, 4, **F64)), ValueError, r"targets must have shape \[B, d\] = \[5, 3\].*got \[5, 4\]"),
        (dict(y=torch.tensor([0, 1, 2, 3, 0]), loss="cross_entropy"), ValueError, r"class.*\[0, 3\)"),
        (dict(loss="hinge"), ValueError, r"loss must be one of mse, cross_entropy, got 'hinge'"),
        (dict(acts=("identity", "gelu", "identity")), ValueError, r"act_mid must be one of"),
        (dict(P=torch.zeros(2, 4, **F64)), ValueError, r"readout must have shape \[q, d\] = \[q, 3\]"),
        (dict(matrix="gnn"), ValueError, r"matrix must be one of hessian, ggn, functional, empirical_fisher, got 'gnn'"),
    ],
)
def test_bad_inputs(change, exc, match, via):
    """The op and the public wrapper name each bad argument, with what was expected and what arrived."""
    args = dict(x=torch.zeros(5, 3, **F64), w=torch.zeros(2, 2, 3, 3, **F64), y=torch.zeros(5, 3, **F64),
                v=torch.zeros(2, 2, 2, 3, 3, **F64), acts=("tanh",) * 3, loss="mse", P=None, matrix="ggn")
    args.update(change)
    a = args
    with pytest.raises(exc, match=match):
        if via == "op":
            _op(a["x"], a["w"], a["y"], a["v"], True, a["acts"], a["loss"], a["P"], a["matrix"])
        else:
            shortcut_ext.residual_stack_hvp(a["x"], a["w"], a["y"], a["v"], True, *a["acts"], loss=a["loss"],
                                            backend="fused", readout=a["P"], matrix=a["matrix"])


def test_torch_func_transforms_are_refused_by_name():
    x, w, y, v, loss = _problem(B=4, d=3, R=2, n=2, K=1, target="mse")
    with pytest.raises(RuntimeError, match="residual_stack_hvp's loss, gradient and products are values"):
        torch.func.grad(lambda w_: shortcut_ext.residual_stack_hvp(x, w_, y, v, backend="fused", matrix="ggn")[2].sum())(w)
