"""The fused Hessian-vector-product op ``residual_stack_hvp`` (Pearlmutter's R-operator) against the
double-backward reference and dense ``torch.func.hessian`` matrices."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.func import hessian

import shortcut_ext
from shortcut_ext import reference as ref
from shortcut_ext.ops import residual_stack_hvp
from testing import DispatchCalls, assert_close_lowp, requires_fused, stack_inputs

pytestmark = requires_fused

ACTS = shortcut_ext.ACTIVATIONS
# every activation at every position: the four uniform patterns plus three mixed rotations
PATTERNS = [(a, a, a) for a in ACTS] + [
    ("tanh", "ssigmoid", "relu"), ("relu", "tanh", "ssigmoid"), ("ssigmoid", "relu", "tanh"),
    # an identity at some positions only: the kernel passes an identity's input on without a copy
    ("identity", "tanh", "relu"), ("tanh", "identity", "ssigmoid"), ("relu", "ssigmoid", "identity"),
    ("identity", "identity", "tanh"), ("ssigmoid", "identity", "identity"),
]
TARGETS = ("mse", "ce_index", "ce_prob")


@pytest.fixture(autouse=True, params=["store", "checkpoint"])
def hvp_memory_mode(request, monkeypatch):
    """Every test runs both ways of the CPU kernel: every unit's record kept from the forward
    (SHORTCUT_EXT_HVP_STORE_MB large: at any width), and checkpoints every C units with the segments
    recomputed (SHORTCUT_EXT_HVP_STORE_MB=0)."""
    monkeypatch.setenv("SHORTCUT_EXT_HVP_STORE_MB", "0" if request.param == "checkpoint" else "4096")
    return request.param


@pytest.mark.parametrize("value", ["lots", "-1"])
def test_store_budget_bad_value(value, monkeypatch):
    monkeypatch.setenv("SHORTCUT_EXT_HVP_STORE_MB", value)
    x, w, y, v, loss = _problem(4, 3, 2, 2, 1, "mse")
    with pytest.raises(ValueError, match=f"SHORTCUT_EXT_HVP_STORE_MB must be a number of megabytes >= 0.*got '{value}'"):
        _op(x, w, y, v, True, ("identity", "relu", "identity"), loss)


def _op(x, w, y, v, shortcut, acts, loss):
    return torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss)


def _problem(B, d, R, n, K, target, dtype=torch.float64, scale=None, zero=False, seed=0):
    """Seeded (x, weights, targets, directions, loss name)."""
    x, w = stack_inputs(B, d, R, n, torch.float64, scale=scale, seed=seed)
    if zero:
        w = torch.zeros_like(w)
    g = torch.Generator().manual_seed(seed + 1000)
    v = torch.randn(K, R, n, d, d, generator=g, dtype=torch.float64)
    if target == "mse":
        y, loss = torch.randn(B, d, generator=g, dtype=torch.float64), "mse"
    elif target == "ce_index":
        y, loss = torch.randint(0, d, (B,), generator=g), "cross_entropy"
    else:
        y, loss = torch.softmax(2 * torch.randn(B, d, generator=g, dtype=torch.float64), 1), "cross_entropy"
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    return cast(x), cast(w), cast(y), cast(v), loss


def _dense(x, w, y, v, shortcut, acts, loss):
    """Loss, gradient and H @ v from a dense ``torch.func`` Hessian of the flat weights."""
    shape = w.shape

    def f(flat):
        return ref.loss_fn(loss, ref.residual_stack_forward(x, flat.view(shape), shortcut, *acts), y)

    flat = w.reshape(-1)
    H = hessian(f)(flat)
    g = torch.func.grad(f)(flat)
    return f(flat).detach(), g.view(shape), (v.reshape(v.shape[0], -1) @ H.T).view(v.shape)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_rel(a, b, bound, what):
    if b.norm() == 0:
        assert a.norm().item() <= 1e-14, f"{what}: expected zeros, got norm {a.norm().item():.3e}"
    else:
        assert _rel(a, b) <= bound, f"{what}: relative error {_rel(a, b):.3e} > {bound:.0e}"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("n,shortcut", [(1, True), (2, True), (3, True), (1, False), (2, False), (3, False)])
def test_float64_matches_reference_and_dense_hessian(n, shortcut, target):
    """Every activation pattern, zero and random weights (ReLU only at random weights, away from its
    kink), both losses: loss, gradient and HVPs to relative error 1e-10."""
    for i, acts in enumerate(PATTERNS):
        for zero in (False, True):
            if zero and "relu" in acts:
                continue
            x, w, y, v, loss = _problem(B=5, d=3, R=2, n=n, K=3, target=target, scale=0.7, zero=zero, seed=i)
            got = _op(x, w, y, v, shortcut, acts, loss)
            want_ref = ref.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss)
            want_dense = _dense(x, w, y, v, shortcut, acts, loss)
            for name, a, b, c in zip(("loss", "grad", "hvp"), got, want_ref, want_dense):
                assert a.shape == b.shape and a.dtype == torch.float64
                case = f"{name} n={n} shortcut={shortcut} {acts} {target} zero={zero}"
                _assert_rel(a, b, 1e-10, case + " vs reference")
                _assert_rel(a, c, 1e-10, case + " vs dense hessian")


def test_plain_net_one_unit_many_layers():
    """A plain net of depth D is one unit of D layers without shortcut (activation between layers)."""
    for target, act in itertools.product(TARGETS, ("tanh", "relu")):
        x, w, y, v, loss = _problem(B=6, d=3, R=1, n=5, K=2, target=target, scale=0.9)
        acts = ("identity", act, "identity")
        got = _op(x, w, y, v, False, acts, loss)
        for name, a, c in zip(("loss", "grad", "hvp"), got, _dense(x, w, y, v, False, acts, loss)):
            _assert_rel(a, c, 1e-10, f"{name} {target} {act}")


def test_unnormalised_probability_targets():
    """Cross entropy with target rows that do not sum to 1: the Hessian scales with the row mass."""
    x, w, _, v, _ = _problem(B=4, d=4, R=2, n=2, K=2, target="mse", scale=0.7)
    y = torch.rand(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    acts = ("tanh", "ssigmoid", "identity")
    got = _op(x, w, y, v, True, acts, "cross_entropy")
    for a, b in zip(got, ref.residual_stack_hvp(x, w, y, v, True, *acts, "cross_entropy")):
        _assert_rel(a, b, 1e-10, "unnormalised targets")


@pytest.mark.parametrize(
    "B,d,R,n,K,target",
    [(300, 16, 40, 2, 16, "mse"), (700, 4, 30, 3, 5, "ce_index"), (1, 5, 3, 2, 1, "ce_prob"), (37, 1, 4, 1, 2, "mse"),
     (65, 20, 6, 2, 3, "mse"), (40, 23, 4, 1, 2, "ce_index"), (9, 31, 3, 2, 1, "ce_prob")],
)
def test_many_tiles_and_segments(B, d, R, n, K, target):
    """Shapes that cut the batch into several tiles and slots and the stack into several segments; widths whose
    rows end in partial vectors of 8 and 16 (the masked row tails of the tangents' elementwise products)."""
    x, w, y, v, loss = _problem(B, d, R, n, K, target)
    acts = ("tanh", "relu", "ssigmoid")
    for name, a, b in zip(("loss", "grad", "hvp"), _op(x, w, y, v, True, acts, loss),
                          ref.residual_stack_hvp(x, w, y, v, True, *acts, loss)):
        _assert_rel(a, b, 1e-10, name)


@pytest.mark.parametrize("target", TARGETS)
def test_float32_within_torch_error(target):
    """float32: the kernel's error against float64 stays within a small multiple of the float32
    reference's own error."""
    for shortcut, acts in [(True, ("identity", "relu", "identity")), (True, ("tanh", "tanh", "ssigmoid")),
                           (False, ("ssigmoid", "tanh", "relu"))]:
        x, w, y, v, loss = _problem(B=33, d=6, R=5, n=2, K=4, target=target, scale=0.5)
        exact = ref.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss)
        f32 = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
        args = tuple(map(f32, (x, w, y, v)))
        got = _op(*args, shortcut, acts, loss)
        same = ref.residual_stack_hvp(*args, shortcut, *acts, loss)
        for a, b, c in zip(got, same, exact):
            assert a.dtype == torch.float32
            assert_close_lowp(a, b, c, factor=10.0)


def test_batched_equals_sequential():
    """k = 5 directions in one call equal five calls with one direction each."""
    for target in TARGETS:
        x, w, y, v, loss = _problem(B=40, d=5, R=6, n=2, K=5, target=target, scale=0.6)
        acts = ("relu", "tanh", "ssigmoid")
        L, g, hv = _op(x, w, y, v, True, acts, loss)
        for j in range(5):
            L1, g1, hv1 = _op(x, w, y, v[j : j + 1], True, acts, loss)
            torch.testing.assert_close(L1, L, rtol=1e-13, atol=0)
            torch.testing.assert_close(g1, g, rtol=1e-12, atol=1e-15)
            torch.testing.assert_close(hv1[0], hv[j], rtol=1e-12, atol=1e-15)


def test_batched_equals_sequential_across_unit_chunks():
    """Many directions at a wide layer: the weight-gradient buffers then hold fewer units than the
    stack (n (1 + 2k) d^2 elements per unit and slot, ~2^24 in all: under 30 of the 40 units here, at
    any thread count), so the reverse pass runs in several chunks; one direction needs a single chunk."""
    x, w, y, v, loss = _problem(B=12, d=48, R=40, n=2, K=64, target="ce_index", scale=0.3)
    acts = ("identity", "tanh", "identity")
    L, g, hv = _op(x, w, y, v, True, acts, loss)
    for j in (0, 17, 63):
        L1, g1, hv1 = _op(x, w, y, v[j : j + 1], True, acts, loss)
        torch.testing.assert_close(g1, g, rtol=1e-12, atol=1e-15)
        # to rounding of the largest entry (~3e9 here, with cancellation in the smaller ones): the BLAS blocks a
        # product of K d columns otherwise than one of d, so single entries differ by more than 1e-12 relative
        torch.testing.assert_close(hv1[0], hv[j], rtol=1e-12, atol=1e-14 * float(hv[j].abs().max()))


def test_symmetry():
    """u^T H v == v^T H u, and H is linear in the direction."""
    for target, shortcut in itertools.product(TARGETS, (True, False)):
        x, w, y, v, loss = _problem(B=9, d=4, R=3, n=2, K=2, target=target, scale=0.8)
        acts = ("ssigmoid", "tanh", "relu")
        v3 = torch.stack([v[0], v[1], 2.0 * v[0] - 3.0 * v[1]])
        _, _, hv = _op(x, w, y, v3, shortcut, acts, loss)
        uHv, vHu = (v[0] * hv[1]).sum().item(), (v[1] * hv[0]).sum().item()
        assert abs(uHv - vHu) <= 1e-11 * max(abs(uHv), 1e-3)
        torch.testing.assert_close(hv[2], 2.0 * hv[0] - 3.0 * hv[1], rtol=1e-11, atol=1e-13)


def test_deterministic_and_thread_count():
    """Bitwise repeatable for a given number of threads; equal to rounding across thread counts."""
    x, w, y, v, loss = _problem(B=257, d=8, R=10, n=2, K=3, target="mse")
    acts = ("identity", "relu", "identity")
    a = _op(x, w, y, v, True, acts, loss)
    b = _op(x, w, y, v, True, acts, loss)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = _op(x, w, y, v, True, acts, loss)
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(a, c):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


def test_public_wrapper_uses_fused_op():
    """backend="fused" calls the kernel (seen by a dispatch mode) and agrees with the reference; it used
    to be checked by values alone, which a silent fallback to the reference also gives."""
    x, w, y, v, loss = _problem(B=8, d=3, R=2, n=2, K=2, target="ce_index")
    acts = ("tanh", "tanh", "tanh")
    with DispatchCalls() as calls:
        got = residual_stack_hvp(x, w, y, v, True, *acts, loss=loss, backend="fused")
    assert "shortcut_ext.residual_stack_hvp.default" in calls.names, calls.names[:10]
    with DispatchCalls() as calls:
        want = residual_stack_hvp(x, w, y, v, True, *acts, loss=loss, backend="torch")
    assert "shortcut_ext.residual_stack_hvp.default" not in calls.names
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_empty_batch_gives_zero_loss_and_derivatives():
    """B == 0: the loss of no samples is 0 (as reference.loss_fn), and so are its derivatives."""
    for target in TARGETS:
        x, w, y, v, loss = _problem(B=0, d=3, R=2, n=2, K=2, target=target)
        L, g, hv = _op(x, w, y, v, True, ("tanh",) * 3, loss)
        assert L.shape == () and L.item() == 0.0
        assert g.shape == w.shape and not g.any()
        assert hv.shape == v.shape and not hv.any()


def test_opcheck():
    for target, acts in [("mse", ("identity", "relu", "identity")), ("ce_index", ("tanh", "tanh", "ssigmoid")),
                         ("ce_prob", ("ssigmoid", "identity", "tanh"))]:
        x, w, y, v, loss = _problem(B=6, d=4, R=3, n=2, K=2, target=target)
        torch.library.opcheck(torch.ops.shortcut_ext.residual_stack_hvp.default, (x, w, y, v, True, *acts, loss))


F64 = dict(dtype=torch.float64)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(v=torch.zeros(0, 2, 2, 3, 3, **F64)), ValueError,
         r"directions must hold k >= 1 directions.*got \[0, 2, 2, 3, 3\]"),
        (dict(v=torch.zeros(2, 2, 2, 3, 4, **F64)), ValueError,
         r"directions must have shape \[k, R, n, d, d\] = \[k, 2, 2, 3, 3\], got \[2, 2, 2, 3, 4\]"),
        (dict(v=torch.zeros(2, 2, 3, 3, **F64)), ValueError, r"directions must have shape .*got \[2, 2, 3, 3\]"),
        # a wrong second-to-last size: the kernel assumed d x d blocks (wrong products, a write past the output)
        (dict(v=torch.zeros(2, 2, 2, 4, 3, **F64)), ValueError,
         r"directions must have shape \[k, R, n, d, d\] = \[k, 2, 2, 3, 3\], got \[2, 2, 2, 4, 3\]"),
        (dict(v=torch.zeros(2, 2, 2, 3, 3)), TypeError, r"directions must have dtype float64 like weights, got float32"),
        (dict(v=torch.zeros(2, 2, 2, 3, 3, **F64).transpose(3, 4)), None, None),  # any strides
        (dict(y=torch.zeros(5, **F64)), ValueError,
         r"targets must have shape \[B, d\] = \[5, 3\] for loss='mse', got \[5\]"),
        (dict(y=torch.zeros(4, 3, **F64)), ValueError, r"targets must have shape \[B, d\] = \[5, 3\], got \[4, 3\]"),
        # a wrong width: read with row stride d (a silently wrong loss, a read past the end for fewer columns)
        (dict(y=torch.zeros(5, 4, **F64)), ValueError, r"targets must have shape \[B, d\] = \[5, 3\], got \[5, 4\]"),
        (dict(y=torch.zeros(5, 2, **F64), loss="cross_entropy"), ValueError, r"targets must have shape .*got \[5, 2\]"),
        (dict(y=torch.zeros(5, 3)), TypeError, r"targets \[B, d\] must have dtype float64 like x, got float32"),
        (dict(y=torch.zeros(5, dtype=torch.int64), loss="cross_entropy"), None, None),
        (dict(y=torch.tensor([0, 1, 2, 3, 0]), loss="cross_entropy"), ValueError,
         r"class-index targets must lie in \[0, d\) = \[0, 3\), got values in \[0, 3\]"),
        (dict(y=torch.tensor([0, 1, -1, 2, 0]), loss="cross_entropy"), ValueError, r"class-index targets must lie in"),
        (dict(y=torch.zeros(5, dtype=torch.int32), loss="cross_entropy"), TypeError,
         r"class-index targets \[B\] must be int64, got int32"),
        (dict(y=torch.zeros(4, dtype=torch.int64), loss="cross_entropy"), ValueError,
         r"targets must have shape \[B\] = \[5\] \(class indices\).*got \[4\]"),
        (dict(loss="hinge"), ValueError, r"loss must be one of mse, cross_entropy, got 'hinge'"),
        (dict(acts=("identity", "gelu", "identity")), ValueError, r"act_mid must be one of"),
        (dict(w=torch.zeros(2, 2, 3, 4, **F64)), ValueError, r"weights must have shape \[R, n, d, d\]"),
        (dict(x=torch.zeros(5, 3)), TypeError, r"x and weights must have the same dtype"),
    ],
)
def test_bad_inputs(change, exc, match):
    """Direct op calls: each bad argument is named, with what was expected and what arrived."""
    args = dict(x=torch.zeros(5, 3, **F64), w=torch.zeros(2, 2, 3, 3, **F64), y=torch.zeros(5, 3, **F64),
                v=torch.zeros(2, 2, 2, 3, 3, **F64), acts=("tanh",) * 3, loss="mse")
    args.update(change)
    _runs_or_raises(lambda: _op(args["x"], args["w"], args["y"], args["v"], True, args["acts"], args["loss"]),
                    args, exc, match)


def _runs_or_raises(call, args, exc, match):
    """``call()`` gives finite outputs of the argument shapes where ``exc`` is None, else raises ``exc`` matching
    ``match``."""
    if exc is None:
        L, g, hv = call()
        assert torch.isfinite(L) and g.shape == args["w"].shape and hv.shape == args["v"].shape
    else:
        with pytest.raises(exc, match=match):
            call()


@requires_fused
def test_hvp_compiles_in_one_graph_with_class_indices():
    """torch.compile(fullgraph=True) of the fused HVP with class-index targets: the Python range check is
    data-dependent, so it is left to the kernel while compiling (it broke the graph)."""
    B, d, R = 6, 4, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(R, 2, d, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, d, (B,), generator=g)
    v = torch.randn(2, R, 2, d, d, generator=g, dtype=torch.float64)

    def f(x, w, y, v):
        return residual_stack_hvp(x, w, y, v, True, "tanh", "relu", "identity", "cross_entropy", backend="fused")

    for a, b in zip(torch.compile(f, fullgraph=True, backend="eager")(x, w, y, v), f(x, w, y, v)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"class-index targets must lie in \[0, d\)"):
        f(x, w, torch.full((B,), d), v)


@requires_fused
@pytest.mark.parametrize("dtype, s", [(torch.float32, 1e4), (torch.float32, 1e7), (torch.float64, 1e16)])
def test_cross_entropy_loss_of_large_logits(dtype, s):
    """Logits [s, s, 0, 0] (zero weights: the stack is the identity) have loss log 2 for class 0 and for
    the soft target [1/2, 1/2, 0, 0]; the kernel added log(sum) to the max logit before subtracting the
    target's, which rounded it away (loss 1 or 0)."""
    x = torch.tensor([[s, s, 0.0, 0.0]], dtype=dtype)
    w, v = torch.zeros(1, 2, 4, 4, dtype=dtype), torch.zeros(1, 1, 2, 4, 4, dtype=dtype)
    for target in (torch.tensor([0]), torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=dtype)):
        loss = residual_stack_hvp(x, w, target, v, loss="cross_entropy", backend="fused")[0]
        assert float(loss) == pytest.approx(math.log(2.0), rel=1e-6)


@requires_fused
@pytest.mark.parametrize("position", ["pre", "mid", "post"])
def test_relu_hvp_zeroes_what_inactive_units_receive(position):
    """An inactive ReLU passes 0 backward whatever arrives, NaN included, as autograd's threshold_backward
    and the fused backward do; the HVP kernel multiplied by relu' = 0 and turned 0 * NaN into NaN."""
    acts = {"pre": "identity", "mid": "identity", "post": "identity", position: "relu"}
    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    w = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)  # R=1, n=2
    y = torch.tensor([[float("nan"), 0.0]], dtype=torch.float64)
    v = torch.ones(1, 1, 2, 2, 2, dtype=torch.float64)
    args = (x, w, y, v, False, acts["pre"], acts["mid"], acts["post"], "mse")
    got = residual_stack_hvp(*args, backend="fused")
    want = residual_stack_hvp(*args, backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert bool(torch.isfinite(want[1]).any())  # the case has finite entries to lose


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_fake_tensors_with_class_index_targets(backend):
    """Under FakeTensorMode the class-index range check read values that fake tensors do not have
    (DataDependentOutputException): shapes come out, as for every other target."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.randn(5, 3), torch.randn(2, 2, 3, 3)
        out = residual_stack_hvp(x, w, torch.zeros(5, dtype=torch.long), torch.randn(4, 2, 2, 3, 3),
                                 loss="cross_entropy", backend=backend)
    assert [tuple(t.shape) for t in out] == [(), (2, 2, 3, 3), (4, 2, 2, 3, 3)]


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_outputs_are_values_when_the_targets_require_grad(backend):
    """Targets from a teacher net (requiring grad) made the fused op's loss, gradient and products require grad,
    with a grad_fn that raised "derivative ... not implemented" when a loss built on them was backpropagated."""
    if backend == "fused" and not hasattr(torch.ops.shortcut_ext, "residual_stack_hvp"):
        pytest.skip("fused HVP not built")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    D = torch.randn(2, 2, 2, 3, 3, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(3, 3, dtype=torch.float64)
    y = head(x)
    L, G, HV = residual_stack_hvp(x, w, y, D, True, "identity", "tanh", "identity", loss="mse", backend=backend)
    assert not (L.requires_grad or G.requires_grad or HV.requires_grad)
    want = residual_stack_hvp(x, w, y.detach(), D, True, "identity", "tanh", "identity", loss="mse", backend=backend)
    for a, b in zip((L, G, HV), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (L + y.sum()).backward()  # the teacher's own graph is untouched
    assert head.weight.grad is not None


def test_float32_several_row_tiles_per_slot():
    """float32 at d = 16, whose weight-gradient products run a register kernel (gemm16_tn): a slot's later
    row tiles must add to its buffer. That kernel ignoring `accumulate` passed, since the float32 tests
    ran d = 6, B = 33, one tile. A tile holds at most 2^19 / ((2n + 1)(1 + K) d) = 3276 rows here: B = 12000
    gives 4 tiles to 1 slot at 1 thread and 2 tiles to each of 2 slots at 2 threads."""
    B, d, R, n, K = 12000, 16, 3, 2, 1
    x, w, y, v, loss = _problem(B, d, R, n, K, "mse", scale=0.1)
    acts = ("identity", "tanh", "identity")
    exact = ref.residual_stack_hvp(x, w, y, v, True, *acts, loss)
    args = tuple(t.float() for t in (x, w, y, v))
    same = ref.residual_stack_hvp(*args, True, *acts, loss)
    threads = torch.get_num_threads()
    try:
        for k in (1, 2):
            torch.set_num_threads(k)
            from shortcut_ext._build import _C

            sch = _C.cpu_schedule("hvp", B, d, R, n, K)  # the kernel's own row tiles at k threads
            assert sch["tiles"] > sch["slots"], sch  # some slot runs two tiles or more
            got = _op(*args, True, acts, loss)
            for a, b, c in zip(got, same, exact):
                assert a.dtype == torch.float32
                assert_close_lowp(a, b, c, factor=10.0)
    finally:
        torch.set_num_threads(threads)


def test_cpu_schedule_gives_the_slots_equal_rows():
    """The HVP kernel's slots (parallel tasks) get equal shares of the rows: tiles of the cap and a short last
    one had left one slot 160 rows and the other 96 at B = 256, d = 16, K = 16 on 2 threads (a 1.2x slower
    call). The rows of a slot may differ from another's only by the rounding of equal tiles."""
    from shortcut_ext._build import _C

    threads = torch.get_num_threads()
    try:
        for p in (2, 3):
            torch.set_num_threads(p)
            for B in list(range(1, 40)) + [255, 256, 257, 513, 1000, 4097]:
                for d, K in ((4, 1), (16, 16), (64, 4), (64, 16), (128, 16)):
                    sch = _C.cpu_schedule("hvp", B, d, 50, 2, K)
                    m, tiles, slots = sch["tile_rows"], sch["tiles"], sch["slots"]
                    assert tiles == -(-B // m) and 1 <= slots <= min(p, tiles), sch
                    rows = [sum(min(m, B - t * m) for t in range(s * tiles // slots, (s + 1) * tiles // slots))
                            for s in range(slots)]
                    assert sum(rows) == B
                    per_slot = -(-tiles // slots)
                    assert max(rows) - min(rows) <= slots * per_slot, (B, d, K, p, sch, rows)
        # a tile's record of one unit holds up to 2^19 elements: at d = 64, K = 16, B = 256 each of 2 slots runs its
        # 128 rows as two tiles of 64 (2^17 cut them into 22-row tiles, each re-reading every direction from memory)
        torch.set_num_threads(2)
        assert _C.cpu_schedule("hvp", 256, 64, 200, 2, 16)["tile_rows"] == 64
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("d", [6, 10, 16, 20, 23])
def test_float32_several_directions_at_small_width(d):
    """float32 at d <= 16 with K >= 2 directions: the HVP's weight-gradient products are gemm_tn(d, K*d, m), which
    must not take the register kernel for products up to 16 x 16 where K*d > 16 (it computes 16 columns at most).
    The forward and backward call gemm_tn with M == N == d only, and the float32 HVP tests ran d = 6 (K = 4) and
    d = 16 with K = 1: a kernel16 selection that ignored N passed them all and returned NaN here. d = 6 with K = 2
    (12 columns) takes the kernel, the others do not. Against the float64 reference (QA 14)."""
    B, R, n = 64, 3, 2
    acts = ("identity", "tanh", "identity")
    for K in (2, 3):
        x, w, y, v, loss = _problem(B, d, R, n, K, "mse", scale=0.5 / d ** 0.5)
        exact = ref.residual_stack_hvp(x, w, y, v, True, *acts, loss)
        args = tuple(t.float() for t in (x, w, y, v))
        same = ref.residual_stack_hvp(*args, True, *acts, loss)
        got = _op(*args, True, acts, loss)
        assert got[2].shape == (K, R, n, d, d)
        for name, a, b, c in zip(("loss", "grad", "hvp"), got, same, exact):
            assert a.dtype == torch.float32, name
            assert torch.isfinite(a).all(), f"{name} K={K}: not finite"
            assert_close_lowp(a, b, c, factor=10.0)


# --------------------------------------------------------------------------- a frozen read-out P [q, d]
def _readout_problem(B, d, q, R, n, K, target, dtype=torch.float64, seed=0, scale=0.7):
    """(x, weights, targets [B, q] or [B], directions, loss, P [q, d]) for a net read out through P."""
    x, w = stack_inputs(B, d, R, n, torch.float64, scale=scale, seed=seed)
    g = torch.Generator().manual_seed(seed + 2000)
    P = torch.randn(q, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    v = torch.randn(K, R, n, d, d, generator=g, dtype=torch.float64)
    if target == "mse":
        y, loss = torch.randn(B, q, generator=g, dtype=torch.float64), "mse"
    elif target == "ce_index":
        y, loss = torch.randint(0, q, (B,), generator=g), "cross_entropy"
    else:  # unnormalised probabilities: the loss weighs each row by its mass
        y, loss = torch.rand(B, q, generator=g, dtype=torch.float64), "cross_entropy"
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    return cast(x), cast(w), cast(y), cast(v), loss, cast(P)


def _dense_readout(x, w, y, v, shortcut, acts, loss, P):
    shape = w.shape

    def f(flat):
        return ref.loss_fn(loss, ref.residual_stack_forward(x, flat.view(shape), shortcut, *acts) @ P.T, y)

    flat = w.reshape(-1)
    H = hessian(f)(flat)
    return f(flat).detach(), torch.func.grad(f)(flat).view(shape), (v.reshape(v.shape[0], -1) @ H.T).view(v.shape)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("q", [1, 2, 3, 7])  # fewer targets than the width (d = 3), as many, more
@pytest.mark.parametrize("n,shortcut", [(1, True), (2, True), (3, True), (2, False)])
def test_a_readout_gives_the_hessian_of_the_read_out_loss(n, shortcut, q, target):
    """The loss of f P^T for a frozen P [q, d] (a classifier's last layer): loss, gradient and HVPs against the
    double-backward reference and a dense torch.func Hessian, relative error 1e-10, over the activation
    patterns, zero and random weights.  HessianOperator fell back to autograd products (10x slower and more)
    for every read-out but an orthonormal one under mse."""
    for i, acts in enumerate(PATTERNS[::2]):
        for zero in (False, True):
            if zero and "relu" in acts:
                continue
            x, w, y, v, loss, P = _readout_problem(B=5, d=3, q=q, R=2, n=n, K=3, target=target, seed=i)
            if zero:
                w = torch.zeros_like(w)
            got = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss, P)
            want_ref = ref.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss, P)
            want_dense = _dense_readout(x, w, y, v, shortcut, acts, loss, P)
            for name, a, b, c in zip(("loss", "grad", "hvp"), got, want_ref, want_dense):
                assert a.shape == b.shape and a.dtype == torch.float64
                case = f"{name} q={q} n={n} shortcut={shortcut} {acts} {target} zero={zero}"
                _assert_rel(a, b, 1e-10, case + " vs reference")
                _assert_rel(a, c, 1e-10, case + " vs dense hessian")


@pytest.mark.parametrize("B,d,q,R,n,K", [(700, 16, 10, 5, 2, 4), (300, 40, 10, 3, 2, 3), (900, 8, 30, 4, 1, 1)])
@pytest.mark.parametrize("target", TARGETS)
def test_a_readout_over_many_tiles_and_threads(B, d, q, R, n, K, target):
    """Batches of several row tiles and slots (the head runs per tile), widths on both sides of the record
    policy, float64 to 1e-12 and float32 within a small multiple of the float32 reference's own error."""
    x, w, y, v, loss, P = _readout_problem(B, d, q, R, n, K, target, scale=0.5, seed=3)
    acts = ("relu", "tanh", "identity")
    want = ref.residual_stack_hvp(x, w, y, v, True, *acts, loss, P)
    for a, b, name in zip(torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss, P), want,
                          ("loss", "grad", "hvp")):
        _assert_rel(a, b, 1e-12, f"{name} float64")
    f32 = lambda t: t.float() if t.is_floating_point() else t  # noqa: E731
    args = tuple(map(f32, (x, w, y, v)))
    got32 = torch.ops.shortcut_ext.residual_stack_hvp(*args, True, *acts, loss, f32(P))
    same = ref.residual_stack_hvp(*args, True, *acts, loss, f32(P))
    for a, b, c in zip(got32, same, want):
        assert a.dtype == torch.float32
        assert_close_lowp(a, b, c, factor=10.0)


def test_a_readout_through_the_public_wrapper_on_both_backends():
    """shortcut_ext.residual_stack_hvp(..., readout=P): the fused kernel and the torch backend agree, and
    batched directions equal one at a time."""
    x, w, y, v, loss, P = _readout_problem(B=9, d=4, q=2, R=3, n=2, K=3, target="ce_index", seed=5)
    acts = ("tanh", "relu", "identity")
    fused = residual_stack_hvp(x, w, y, v, True, *acts, loss=loss, backend="fused", readout=P)
    torch_ = residual_stack_hvp(x, w, y, v, True, *acts, loss=loss, backend="torch", readout=P)
    for a, b in zip(fused, torch_):
        _assert_rel(a, b, 1e-12, "fused vs torch")
    one_by_one = torch.cat([residual_stack_hvp(x, w, y, v[j:j + 1], True, *acts, loss=loss, readout=P)[2]
                            for j in range(3)])
    torch.testing.assert_close(fused[2], one_by_one, rtol=1e-13, atol=1e-15)
    # no read-out is the identity read-out
    x, w, y, v, loss = _problem(B=6, d=3, R=2, n=2, K=2, target="ce_prob")
    plain = _op(x, w, y, v, True, acts, loss)
    eye = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss, torch.eye(3, dtype=torch.float64))
    for a, b in zip(plain, eye):
        _assert_rel(a, b, 1e-14, "identity read-out")


def test_opcheck_with_a_readout():
    x, w, y, v, loss, P = _readout_problem(B=6, d=4, q=3, R=2, n=2, K=2, target="ce_index")
    torch.library.opcheck(torch.ops.shortcut_ext.residual_stack_hvp.default,
                          (x, w, y, v, True, "tanh", "relu", "identity", loss, P))


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(P=torch.zeros(2, 4, **F64)), ValueError,
         r"readout must have shape \[q, d\] = \[q, 3\] with q >= 1.*got \[2, 4\]"),
        (dict(P=torch.zeros(0, 3, **F64)), ValueError, r"readout must have shape \[q, d\] = \[q, 3\].*got \[0, 3\]"),
        (dict(P=torch.zeros(3, **F64)), ValueError, r"readout must have shape .*got \[3\]"),
        (dict(P=torch.zeros(2, 3)), TypeError, r"readout must have dtype float64 like x, got float32"),
        # targets are in the read-out's q columns now
        (dict(y=torch.zeros(5, 3, **F64)), ValueError, r"targets must have shape \[B, q\] = \[5, 2\], got \[5, 3\]"),
        (dict(y=torch.zeros(5, **F64)), ValueError, r"targets must have shape \[B, q\] = \[5, 2\] for loss='mse'"),
        (dict(y=torch.tensor([0, 1, 2, 1, 0]), loss="cross_entropy"), ValueError,
         r"class-index targets must lie in \[0, q\) = \[0, 2\), got values in \[0, 2\]"),
        (dict(y=torch.zeros(5, 2)), TypeError, r"targets \[B, q\] must have dtype float64 like x, got float32"),
        (dict(y=torch.tensor([0, 1, 1, 1, 0]), loss="cross_entropy"), None, None),
        (dict(P=torch.zeros(3, 2, **F64).T), None, None),  # any strides
    ],
)
@pytest.mark.parametrize("via", ["op", "wrapper"])
def test_bad_readout_inputs(change, exc, match, via):
    """The read-out and the targets it implies: each bad argument named, with what was expected and what
    arrived, from the op and from the public wrapper alike."""
    args = dict(x=torch.zeros(5, 3, **F64), w=torch.zeros(2, 2, 3, 3, **F64), y=torch.zeros(5, 2, **F64),
                v=torch.zeros(2, 2, 2, 3, 3, **F64), P=torch.ones(2, 3, **F64), loss="mse")
    args.update(change)
    if via == "op":
        call = lambda: torch.ops.shortcut_ext.residual_stack_hvp(  # noqa: E731
            args["x"], args["w"], args["y"], args["v"], True, "tanh", "tanh", "tanh", args["loss"], args["P"])
    else:
        call = lambda: residual_stack_hvp(args["x"], args["w"], args["y"], args["v"], True, "tanh", "tanh",  # noqa: E731
                                          "tanh", loss=args["loss"], readout=args["P"])
    _runs_or_raises(call, args, exc, match)
