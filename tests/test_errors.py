"""Bad input gets a clear error naming the argument, what was expected and what arrived."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import shortcut_ext
from shortcut_ext.ops import residual_stack
from testing import requires_fused

pytestmark = requires_fused
OP = torch.ops.shortcut_ext


def _xw(B=4, d=3, R=2, n=2, dtype=torch.float32):
    return torch.randn(B, d, dtype=dtype), torch.randn(R, n, d, d, dtype=dtype)


@pytest.mark.parametrize("call", ["wrapper", "op"])
@pytest.mark.parametrize(
    "make,exc,pattern",
    [
        (lambda: (torch.randn(4), torch.randn(2, 2, 4, 4)), ValueError, r"x must have shape \[B, d\], got \[4\]"),
        (lambda: (torch.randn(4, 3), torch.randn(2, 3, 3)), ValueError, r"weights must have shape \[R, n, d, d\].*got \[2, 3, 3\]"),
        (lambda: (torch.randn(4, 8), torch.randn(4, 2, 8, 16)), ValueError, r"d == x.size\(1\) == 8, got \[4, 2, 8, 16\]"),
        (lambda: (torch.randn(4, 3), torch.randn(0, 2, 3, 3)), ValueError, r"R >= 1 units and n >= 1.*\[0, 2, 3, 3\]"),
        (lambda: (torch.randn(4, 3), torch.randn(2, 0, 3, 3)), ValueError, r"R >= 1 units and n >= 1.*\[2, 0, 3, 3\]"),
        (lambda: (torch.randn(4, 3), torch.randn(2, 2, 3, 3, dtype=torch.float64)), TypeError, r"same dtype, got x: float32, weights: float64"),
        (lambda: (torch.ones(4, 3, dtype=torch.int64), torch.ones(2, 2, 3, 3, dtype=torch.int64)), TypeError, r"float32 or float64, got (torch.)?int64"),
        (lambda: (torch.ones(4, 3, dtype=torch.float16), torch.ones(2, 2, 3, 3, dtype=torch.float16)), TypeError, r"float32 or float64, got (torch.)?float16"),
    ],
)
def test_bad_shapes_and_dtypes(make, exc, pattern, call):
    x, w = make()
    with pytest.raises(exc, match=pattern):
        if call == "wrapper":
            residual_stack(x, w, backend="fused")
        else:
            OP.residual_stack_forward(x, w, True, "identity", "identity", "identity", True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ops_take_inputs_of_any_strides(dtype):
    """The raw ops take transposed, expanded and offset inputs, with the contiguous inputs' results: a
    graph exported from the wrapper drops its .contiguous() (a no-op on the example input), and the
    exported program then met the op's refusal."""
    acts = (True, "identity", "tanh", "identity")
    x, w = _xw(B=5, d=3, dtype=dtype)
    odd = {  # the same values through other strides
        "transposed": (x.T.contiguous().T, w.transpose(2, 3).contiguous().transpose(2, 3)),
        "expanded": (x[:1].expand(5, 3), w[:1].expand(2, 2, 3, 3)),
        "offset": (torch.cat([torch.zeros(1, 3, dtype=dtype), x])[1:], w),
    }
    for name, (xo, wo) in odd.items():
        xc, wc = xo.contiguous(), wo.contiguous()
        y0, s0 = OP.residual_stack_forward(xc, wc, *acts, True, False)
        y1, s1 = OP.residual_stack_forward(xo, wo, *acts, True, False)
        assert y1.is_contiguous() and torch.equal(y0, y1) and torch.equal(s0, s1), name
        gy = torch.randn_like(y0)
        for a, b in zip(OP.residual_stack_backward(gy, wc, s0, *acts),
                        OP.residual_stack_backward(gy.T.contiguous().T, wo, s1, *acts)):
            assert torch.equal(a, b), name
        y = torch.randn(5, 3, dtype=dtype)
        v = torch.randn(2, *wc.shape, dtype=dtype)
        for a, b in zip(OP.residual_stack_hvp(xc, wc, y, v, *acts, "mse"),
                        OP.residual_stack_hvp(xo, wo, y.T.contiguous().T, v.transpose(3, 4).contiguous()
                                              .transpose(3, 4), *acts, "mse")):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_inputs_are_refused_by_the_fused_backend(layout):
    x, w = _xw(B=4, d=3)
    xs = x.to_sparse() if layout == "coo" else x.to_sparse_csr()
    with pytest.raises(ValueError, match=r"x must be a dense \(strided\) tensor for backend='fused', got layout "
                                         r"torch.sparse_.*call .to_dense\(\)"):
        residual_stack(xs, w, backend="fused")
    y = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"directions must be a dense \(strided\) tensor"):
        shortcut_ext.residual_stack_hvp(x, w, y, torch.zeros(1, *w.shape).to_sparse(), backend="fused")
    classes = torch.tensor([0, 1, 2, 0]).to_sparse()  # reached targets.min(): aten::min on SparseCPU
    for backend in ("fused", "torch"):
        with pytest.raises(ValueError, match=r"targets must be a dense \(strided\) tensor"):
            shortcut_ext.residual_stack_hvp(x, w, classes, torch.zeros(1, *w.shape), loss="cross_entropy",
                                            backend=backend)


@pytest.mark.parametrize("arg", ["act_pre", "act_mid", "act_post"])
def test_unknown_activation(arg):
    x, w = _xw()
    acts = {"act_pre": "identity", "act_mid": "identity", "act_post": "identity", arg: "gelu"}
    with pytest.raises(ValueError, match=rf"{arg} must be one of .*got 'gelu'"):
        residual_stack(x, w, **acts, backend="fused")
    with pytest.raises(ValueError, match=rf"{arg} must be one of identity, relu, tanh, ssigmoid, got 'gelu'"):
        OP.residual_stack_forward(x, w, True, acts["act_pre"], acts["act_mid"], acts["act_post"], True)


def test_backward_checks_saved():
    x, w = _xw()
    with pytest.raises(ValueError, match=r"saved must be the unit inputs of shape \[R, B, d\] = \[2, 4, 3\].*got \[0\]"):
        OP.residual_stack_backward(x, w, torch.empty(0), True, "identity", "identity", "identity")
    n = w.shape[1]
    with pytest.raises(ValueError, match=rf"or the layer inputs of shape \[R, n, B, d\] = \[2, {n}, 4, 3\].*"
                                         rf"got \[2, {n + 1}, 4, 3\]"):
        OP.residual_stack_backward(x, w, torch.zeros(2, n + 1, 4, 3, dtype=x.dtype), True, "identity", "identity",
                                   "identity")


def test_shortcut_below_one_and_bad_model_args():
    with pytest.raises(ValueError, match=r"shortcut must be an integer >= 1, got 0"):
        shortcut_ext.ShortcutNet(width=4, units=2, shortcut=0)
    with pytest.raises(ValueError, match=r"units must be an integer >= 1, got -3"):
        shortcut_ext.ShortcutNet(width=4, units=-3)
    with pytest.raises(ValueError, match=r"init must be one of .*got 'glorot'"):
        shortcut_ext.ShortcutNet(width=4, units=2, init="glorot")
    with pytest.raises(ValueError, match=r"mid must be one of .*got 'swish'"):
        shortcut_ext.ShortcutNet(width=4, units=2, mid="swish")
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'cuda'"):
        shortcut_ext.ShortcutNet(width=4, units=2, backend="cuda")
    net = shortcut_ext.ShortcutNet(width=4, units=2)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 4\], got \[3, 5\]"):
        net(torch.randn(3, 5))


def test_not_tensor():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor of shape \[B, d\], got list"):
        residual_stack([[1.0]], torch.zeros(1, 1, 1, 1))


class _CudaLooking(torch.Tensor):
    """A CPU tensor that reports a CUDA device: this CPU-only torch cannot make real CUDA tensors."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.skipif(shortcut_ext.build_info().get("cuda", False), reason="the CUDA kernels are built")
def test_cuda_tensor_without_cuda_build():
    x, w = _xw()
    with pytest.raises(RuntimeError, match=r"x is a CUDA tensor but shortcut_ext was built without CUDA kernels"):
        residual_stack(x.as_subclass(_CudaLooking), w.as_subclass(_CudaLooking), backend="fused")


def test_nan_input_does_not_crash():
    x, w = _xw()
    x[0, 0] = float("nan")
    w[1, 1, 2, 2] = float("inf")
    y = residual_stack(x, w, backend="fused")
    assert y.shape == x.shape


def test_unbuilt_extension_message(tmp_path):
    """Without the compiled module, import works, the torch backend works, and the fused backend says how to build."""
    pkg = os.path.dirname(shortcut_ext.__file__)
    dst = tmp_path / "shortcut_ext"
    dst.mkdir()
    for root, _dirs, files in os.walk(pkg):
        rel = os.path.relpath(root, pkg)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            if f.endswith(".py"):
                (dst / rel / f).write_bytes(open(os.path.join(root, f), "rb").read())
    code = (
        "import torch, shortcut_ext as se\n"
        "assert not se.is_built()\n"
        "net = se.ShortcutNet(4, 3, backend=None); assert net.backend == 'torch'\n"
        "net(torch.randn(2, 4))\n"
        "try:\n    se.ShortcutNet(4, 3, backend='fused')\nexcept RuntimeError as e:\n    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "pip install --no-build-isolation ." in r.stdout and "backend='torch'" in r.stdout


# ------------------------------------------------------------------ NaN, transforms, devices, targets
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pos", ["pre", "mid", "post"])
@pytest.mark.parametrize("d", [2, 16, 40])
def test_relu_propagates_nan_like_torch(dtype, pos, d):
    """torch.relu(nan) is nan: a diverged value must not turn into 0 inside a ReLU branch."""
    acts = {"pre": "identity", "mid": "identity", "post": "identity", pos: "relu"}
    g = torch.Generator().manual_seed(d)
    x = torch.randn(33, d, generator=g, dtype=dtype)
    x[3, 1] = float("nan")
    w = torch.randn(2, 2, d, d, generator=g, dtype=dtype) / d ** 0.5
    outs = {}
    for be in ("torch", "fused"):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = residual_stack(xx, ww, False, acts["pre"], acts["mid"], acts["post"], backend=be)
        y.sum().backward()
        outs[be] = (y.detach(), ww.grad)
    for a, b in zip(outs["fused"], outs["torch"]):
        assert torch.equal(a.isnan(), b.isnan())
    assert outs["fused"][0][3].isnan().all()
    tgt = torch.zeros(33, d, dtype=dtype)
    v = torch.ones(1, 2, 2, d, d, dtype=dtype)
    for be in ("torch", "fused"):
        L, gw, hv = shortcut_ext.residual_stack_hvp(x, w, tgt, v, False, acts["pre"], acts["mid"], acts["post"], backend=be)
        assert L.isnan() and gw.isnan().any()


def test_forward_mode_and_func_transforms_get_a_clear_error():
    x, w = _xw(dtype=torch.float64)
    v = torch.randn_like(w)
    f = lambda w: residual_stack(x, w, backend="fused")  # noqa: E731
    with pytest.raises(NotImplementedError, match="jvp transform.*backend='torch'"):
        torch.func.jvp(f, (w,), (v,))
    with pytest.raises(NotImplementedError, match="grad transform.*residual_stack_hvp"):
        torch.func.grad(lambda w: f(w).sum())(w)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        f(fwAD.make_dual(w, v))
    _, t = torch.func.jvp(lambda w: residual_stack(x, w, backend="torch"), (w,), (v,))  # the reference can
    assert t.abs().sum() > 0
    assert torch.vmap(lambda xi: residual_stack(xi, w, backend="fused"))(torch.randn(2, 4, 3, dtype=torch.float64)).shape == (2, 4, 3)


def test_func_transforms_under_torch_compile_are_refused_too():
    """Dynamo runs the torch.func transforms with their interpreters pushed: the eager check was skipped
    while compiling, and a compiled jvp through the fused op gave a zero tangent, a compiled dual tensor a
    None tangent."""
    import torch.autograd.forward_ad as fwAD

    x, w = _xw(dtype=torch.float64)
    v = torch.randn_like(w)
    f = lambda w: residual_stack(x, w, True, "tanh", "tanh", "tanh", backend="fused")  # noqa: E731
    try:
        with pytest.raises(Exception, match="jvp transform: the fused residual stack has a fused backward only"):
            torch.compile(lambda w: torch.func.jvp(f, (w,), (v,))[1], backend="aot_eager")(w)
        torch._dynamo.reset()

        def dual(w):
            with fwAD.dual_level():
                return fwAD.unpack_dual(f(fwAD.make_dual(w, v))).tangent

        with pytest.raises(Exception, match="forward-mode AD"):
            torch.compile(dual, backend="aot_eager")(w)
        torch._dynamo.reset()
        # a plain compiled forward + backward still traces in one graph, and is right
        wr = w.clone().requires_grad_()
        torch.compile(f, backend="aot_eager", fullgraph=True)(wr).square().sum().backward()
        w2 = w.clone().requires_grad_()
        residual_stack(x, w2, True, "tanh", "tanh", "tanh", backend="torch").square().sum().backward()
        torch.testing.assert_close(wr.grad, w2.grad, rtol=1e-12, atol=1e-12)
    finally:
        torch._dynamo.reset()


def test_compiled_vmap_runs_the_fused_op_in_one_graph_and_fullgraph_transforms_are_refused():
    """Under torch.compile(fullgraph=True) an ensemble (vmap over stacked weights) forward + backward and a
    vmap'd HVP trace with no graph break and match the reference; torch.func.grad through the fused op is
    refused with the library's message (dynamo wraps it), not traced to a zero."""
    import warnings

    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g)
    ws = torch.randn(3, 2, 2, 4, 4, dtype=torch.float64, generator=g) * 0.3
    t = torch.randn(5, 4, dtype=torch.float64, generator=g)
    v = torch.randn(2, 2, 2, 4, 4, dtype=torch.float64, generator=g)
    grads = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for be in ("fused", "torch"):
                torch._dynamo.reset()
                counters.clear()
                fn = lambda xx, ww, be=be: residual_stack(xx, ww, True, "tanh", "tanh", "tanh", backend=be)  # noqa: E731
                wr = ws.clone().requires_grad_()
                loss = torch.compile(lambda w: torch.func.vmap(fn, in_dims=(None, 0))(x, w).square().sum(),
                                     backend="aot_eager", fullgraph=True)
                loss(wr).backward()
                grads[be] = wr.grad
                assert not counters["graph_break"], dict(counters["graph_break"])
            torch.testing.assert_close(grads["fused"], grads["torch"], rtol=1e-12, atol=1e-12)
            torch._dynamo.reset()
            hvp = lambda w: shortcut_ext.residual_stack_hvp(x, w, t, v, True, "tanh", "tanh", "identity")[2]  # noqa: E731
            got = torch.compile(torch.func.vmap(hvp), backend="aot_eager", fullgraph=True)(ws)
            torch.testing.assert_close(got, torch.stack([hvp(w) for w in ws]), rtol=0, atol=0)
            torch._dynamo.reset()
            f = lambda w: residual_stack(x, w, True, "tanh", "tanh", "tanh", backend="fused").sum()  # noqa: E731
            with pytest.raises(Exception, match="grad transform: the fused residual stack has a fused backward only"):
                torch.compile(torch.func.grad(f), backend="aot_eager", fullgraph=True)(ws[0])
            torch._dynamo.reset()
            # grad outside a vmap: dynamo sees only the vmap; PyTorch's own error, loud, never a zero
            fv = lambda W: torch.func.vmap(f)(W).sum()  # noqa: E731
            with pytest.raises(Exception):
                torch.compile(torch.func.grad(fv), backend="aot_eager")(ws)
            torch._dynamo.reset()
            counters.clear()  # vmap of vmap (nested levels) still traces in one graph
            got = torch.compile(torch.func.vmap(torch.func.vmap(f)), backend="aot_eager", fullgraph=True)(
                ws.reshape(3, 1, 2, 2, 4, 4).expand(3, 2, 2, 2, 4, 4))
            assert got.shape == (3, 2) and not counters["graph_break"]
    finally:
        torch._dynamo.reset()


def test_func_transforms_of_other_variables_may_call_the_fused_ops():
    """Inside torch.func.grad over another variable the fused ops' inputs are constants to the transform
    (a 1 / lambda_max step size in a torch.func training step): they run, and the gradient is right; an
    input the transform tracks is still refused."""
    x, w = _xw(dtype=torch.float64)
    t, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(1, 2, 2, 3, 3, dtype=torch.float64)
    a = torch.tensor(2.0, dtype=torch.float64)
    L = shortcut_ext.residual_stack_hvp(x, w, t, v, backend="fused")[0]
    assert float(torch.func.grad(lambda a: a * shortcut_ext.residual_stack_hvp(x, w, t, v, backend="fused")[0])(a)) \
        == float(L)
    y = residual_stack(x, w, backend="fused").sum()
    assert float(torch.func.grad(lambda a: a * residual_stack(x, w, backend="fused").sum())(a)) == float(y)
    with pytest.raises(NotImplementedError, match="grad transform"):
        torch.func.grad(lambda w: residual_stack(x, w, backend="fused").sum())(w)


def test_vmap_with_grad_saves_for_the_backward():
    """vmap's batched tensors say requires_grad=False: the fused forward kept nothing, and the backward of
    an ensemble (stack_module_state + vmap(functional_call)) or of per-sample inputs raised a misleading
    save_inputs=False error; now it matches the reference."""
    import warnings

    from torch.func import functional_call, stack_module_state, vmap

    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g)
    xs0 = torch.randn(3, 5, 4, dtype=torch.float64, generator=g)
    w = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=g) * 0.3
    grads = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "no batching rule" performance note
        for be in ("fused", "torch"):
            models = [shortcut_ext.ShortcutNet(width=4, units=3, mid="tanh", init="xavier", seed=s, backend=be,
                                               dtype=torch.float64) for s in range(3)]
            params, bufs = stack_module_state(models)
            base = shortcut_ext.ShortcutNet(width=4, units=3, mid="tanh", backend=be, dtype=torch.float64).to("meta")
            vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))(params, bufs, x) \
                .square().mean().backward()
            xs = xs0.clone().requires_grad_()
            vmap(lambda xi: residual_stack(xi, w, True, "tanh", "tanh", "tanh", backend=be))(xs).sum().backward()
            grads[be] = (params["weight"].grad, xs.grad)
    for a, b in zip(grads["fused"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_vmap_of_the_hvp_with_class_targets():
    """The wrapper's range check called .item() on vmap's batched targets (torch's 'please file a bug');
    the fused kernel checks per slice; the reference cannot run under vmap and says so."""
    import warnings

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 6, 4, dtype=torch.float64, generator=g)
    w = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=g) * 0.3
    t = torch.randint(0, 4, (3, 6), generator=g)
    v = torch.randn(2, 2, 2, 4, 4, dtype=torch.float64, generator=g)
    hvp = lambda x, t, be="fused": shortcut_ext.residual_stack_hvp(  # noqa: E731
        x, w, t, v, True, "tanh", "tanh", "identity", loss="cross_entropy", backend=be)[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torch.func.vmap(hvp)(x, t)
        torch.testing.assert_close(got, torch.stack([hvp(x[i], t[i]) for i in range(3)]), rtol=0, atol=0)
        with pytest.raises(NotImplementedError, match="backend=.torch.*cannot run under a torch.func transform \\(here: vmap\\)"):
            torch.func.vmap(lambda x, t: hvp(x, t, "torch"))(x, t)
        bad = t.clone()
        bad[1, 2] = 7
        with pytest.raises((ValueError, RuntimeError), match=r"class-index targets must lie in \[0, d\)"):
            torch.func.vmap(hvp)(x, bad)


def test_jit_trace_is_refused():
    """A trace fixed the forward's save flags (the check rerun without grad differed, and a trace made
    under no_grad failed in backward with a misleading save_inputs=False error)."""
    net = shortcut_ext.ShortcutNet(width=3, units=2, init="xavier", backend="fused")
    with pytest.raises(NotImplementedError, match="torch.jit.trace of the fused residual stack"):
        torch.jit.trace(net, torch.randn(4, 3))


def test_meta_tensors_among_real_ones_are_refused():
    """A meta tensor sends the call to the fake kernel, which must not return uninitialised memory."""
    x, w = _xw(dtype=torch.float64)
    t, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 2, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="targets must be on cpu like x, got meta"):
        shortcut_ext.residual_stack_hvp(x, w, t.to("meta"), v)
    with pytest.raises(ValueError, match="directions must be on cpu like weights, got meta"):
        shortcut_ext.residual_stack_hvp(x, w, t, v.to("meta"))
    with pytest.raises(ValueError, match="residual_stack_forward: weights must be on cpu like x, got meta"):
        OP.residual_stack_forward(x, w.to("meta"), True, "identity", "identity", "identity", False)
    with pytest.raises(ValueError, match="residual_stack_hvp: targets must be on cpu like x, got meta"):
        OP.residual_stack_hvp(x, w, t.to("meta"), v, True, "identity", "identity", "identity", "mse")
    y, s = OP.residual_stack_forward(x.to("meta"), w.to("meta"), True, "identity", "identity", "identity", True)
    assert y.device.type == "meta" and y.shape == x.shape  # all-meta calls still trace


def test_hvp_outputs_are_detached_and_direct_op_backward_raises():
    x, w = _xw(dtype=torch.float64)
    w.requires_grad_()
    t, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(2, 2, 2, 3, 3, dtype=torch.float64)
    for be in ("fused", "torch"):
        outs = shortcut_ext.residual_stack_hvp(x, w, t, v, backend=be)
        assert not any(o.requires_grad for o in outs)
        # torch.func.grad of its loss or of v^T H v used to return zeros (fused) or torch's requires_grad_ error
        for pick in (lambda o: o[0], lambda o: (o[2] * v).sum()):
            with pytest.raises(NotImplementedError, match="grad transform: residual_stack_hvp's .* are values"):
                torch.func.grad(lambda w: pick(shortcut_ext.residual_stack_hvp(x, w, t, v, backend=be)))(w.detach())
    L, _, _ = OP.residual_stack_hvp(x, w, t, v, True, "identity", "identity", "identity", "mse")
    with pytest.raises(RuntimeError, match="derivative for shortcut_ext::residual_stack_hvp is not implemented"):
        L.backward()


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize(
    "targets,loss,exc,pattern",
    [
        (torch.randn(1, 4, 3, dtype=torch.float64), "mse", ValueError, r"targets must have shape \[B, d\] = \[4, 3\], got \[1, 4, 3\]"),
        (torch.randn(2, 3, dtype=torch.float64), "mse", ValueError, r"targets must have shape \[B, d\] = \[4, 3\], got \[2, 3\]"),
        (torch.tensor([0, 1]), "cross_entropy", ValueError, r"targets must have shape \[B\] = \[4\] \(class indices\), got \[2\]"),
        (torch.randn(4, 1, dtype=torch.float64), "cross_entropy", ValueError, r"probabilities \[B, d\] = \[4, 3\] or class indices"),
        (torch.tensor([0.9, 1.9, 2.9, 0.0]), "cross_entropy", TypeError, "class-index targets \\[B\\] must be integers, got float32"),
        (torch.tensor([0, 1, 3, 0]), "cross_entropy", ValueError, r"must lie in \[0, d\) = \[0, 3\), got values in \[0, 3\]"),
        (torch.tensor([0, 1, 2, 0]), "mse", ValueError, r"targets must have shape \[B, d\] = \[4, 3\] for loss='mse'"),
        (torch.randn(4, 3), "mse", TypeError, r"must have dtype float64 like x, got float32"),
        (None, "mse", TypeError, r"targets must be a torch.Tensor"),
    ],
)
def test_hvp_targets_checked_alike_on_both_backends(backend, targets, loss, exc, pattern):
    x, w = _xw(dtype=torch.float64)
    v = torch.randn(1, 2, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(exc, match=pattern):
        shortcut_ext.residual_stack_hvp(x, w, targets, v, loss=loss, backend=backend)


def test_hvp_int32_class_indices_zero_directions_and_inference_mode():
    x, w = _xw(dtype=torch.float64)
    v = torch.randn(2, 2, 2, 3, 3, dtype=torch.float64)
    idx = torch.tensor([0, 2, 1, 1])
    ref = shortcut_ext.residual_stack_hvp(x, w, idx, v, loss="cross_entropy", backend="torch")
    for be in ("fused", "torch"):
        out = shortcut_ext.residual_stack_hvp(x, w, idx.int(), v, loss="cross_entropy", backend=be)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        with pytest.raises(ValueError, match="k >= 1 directions"):
            shortcut_ext.residual_stack_hvp(x, w, idx, v[:0], loss="cross_entropy", backend=be)
        with torch.inference_mode():
            xi, wi, vi = x.clone(), w.clone(), v.clone()
            out = shortcut_ext.residual_stack_hvp(xi, wi, idx, vi, loss="cross_entropy", backend=be)
        torch.testing.assert_close(out[2], ref[2], rtol=1e-12, atol=1e-12)


def test_shortcut_recompute_and_zero_width_checked_on_both_backends():
    x, w = _xw()
    for be in ("fused", "torch"):
        with pytest.raises(TypeError, match="shortcut must be True or False, got 'False'"):
            residual_stack(x, w, shortcut="False", backend=be)
        with pytest.raises(TypeError, match="recompute must be True, False or None, got 'yes'"):
            residual_stack(x, w, recompute="yes", backend=be)
        with pytest.raises(ValueError, match=r"d >= 1 features"):
            residual_stack(torch.randn(4, 0), torch.randn(2, 2, 0, 0), backend=be)
    assert torch.equal(residual_stack(x, w, shortcut=1), residual_stack(x, w, shortcut=True))


def test_bad_cpu_gemm_variable_is_named(tmp_path):
    code = ("import torch, shortcut_ext as s\nprint(s.build_info()['cpu_gemm'])\n"
            "s.residual_stack(torch.randn(4, 16), torch.randn(2, 2, 16, 16))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(shortcut_ext.__file__)))  # the package under test
    env = dict(os.environ, SHORTCUT_EXT_CPU_GEMM="bogus",
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode != 0 and "invalid: SHORTCUT_EXT_CPU_GEMM" in r.stdout
    assert "SHORTCUT_EXT_CPU_GEMM must be auto, brgemm or portable (or unset), got 'bogus'" in r.stderr


@requires_fused
def test_cuda_tf32_blocks_of_two_threads_exiting_out_of_order_restore_the_mode():
    """Thread A enters tf32, thread B enters 3xtf32, A exits, B exits: the mode stayed 'tf32' (each block
    restored the mode it found), so every later float32 CUDA call ran on TF32 silently."""
    import threading

    from shortcut_ext import cuda_tf32

    assert cuda_tf32.current() == "off"
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with cuda_tf32("tf32"):
            a_in.set()
            b_in.wait(10)
        seen["after_a"] = cuda_tf32.current()
        a_out.set()

    def b():
        a_in.wait(10)
        with cuda_tf32("3xtf32"):
            b_in.set()
            a_out.wait(10)
            seen["inside_b"] = cuda_tf32.current()

    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(20)
    assert seen == {"after_a": "3xtf32", "inside_b": "3xtf32"}, seen
    assert cuda_tf32.current() == "off"
    with cuda_tf32("tf32"), cuda_tf32(False):  # nesting in one thread is unchanged
        assert cuda_tf32.current() == "off"
    assert cuda_tf32.current() == "off"
    with cuda_tf32("tf32"):  # a set() inside a block stays after a nested block's exit, as it did
        cuda_tf32.set("3xtf32")
        with cuda_tf32(False):
            pass
        assert cuda_tf32.current() == "3xtf32"
    assert cuda_tf32.current() == "off"


def test_log_grid_refuses_infinite_bounds_and_takes_numpy_integers():
    """log_grid(0.01, inf) passed its check and died in int(inf) with an OverflowError; a numpy integer
    per_decade (as TrainConfig accepts) was refused."""
    import math

    import numpy as np

    from shortcut_ext.train import log_grid

    with pytest.raises(ValueError, match=r"need 0 < lo <= hi < inf, got lo=0.01, hi=inf"):
        log_grid(0.01, math.inf)
    with pytest.raises(ValueError, match=r"need 0 < lo <= hi < inf"):
        log_grid(math.nan, 1.0)
    assert log_grid(0.01, 1, per_decade=np.int64(2)) == log_grid(0.01, 1, per_decade=2)
    for bad in (True, 2.0, 0):
        with pytest.raises(ValueError, match="per_decade must be an integer >= 1"):
            log_grid(0.01, 1, per_decade=bad)


def test_projections_take_any_integer_seed_as_the_weights_do():
    """init_weights reduces any integer seed mod 2**63, but the frozen projections seeded the raw value + 7919:
    ShortcutNet(3, 1, seed=2**64) built, and with in_features it failed with 'Overflow when unpacking long'."""
    from shortcut_ext.models import ShortcutNet

    net = ShortcutNet(3, 1, seed=2**64, in_features=5, out_features=4)
    assert net.input_proj.shape == (3, 5) and net.readout.shape == (4, 3)
    same = ShortcutNet(3, 1, seed=0, in_features=5, out_features=4)  # 2**64 = 0 mod 2**63, as for the weights
    assert torch.equal(net.weight, same.weight) and torch.equal(net.input_proj, same.input_proj)


def test_max_points_is_checked_before_training():
    """TrainResult.to_dict(max_points=0) of a one-epoch history died in numpy ('Geometric sequence cannot include
    zero'), and lr_sweep checked max_points only after its first run had trained."""
    from shortcut_ext.data import synthetic_teacher
    from shortcut_ext.models import ShortcutNet
    from shortcut_ext.train import TrainConfig, lr_sweep, train

    X, Y = synthetic_teacher(16, 3, seed=0)
    res = train(ShortcutNet(3, 1, init="small", dtype=torch.float64), (X, Y), TrainConfig(epochs=0))
    for bad in (0, 1, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_points must be None or an integer >= 2"):
            res.to_dict(max_points=bad)
    assert res.to_dict(max_points=2)["history"]["epoch"] == [0]
    built = []

    def make():
        built.append(1)
        return ShortcutNet(3, 1, init="small", dtype=torch.float64)

    with pytest.raises(ValueError, match=r"max_points must be None or an integer >= 2 .*got 1"):
        lr_sweep(make, (X, Y), [0.1], TrainConfig(epochs=1), store={}, key="k", max_points=1)
    assert built == []


# Argument checks that mutation testing of the C++ CPU kernels (QA 14) found untested.


def test_raw_ops_refuse_weights_with_a_wrong_row_count():
    """test_bad_shapes_and_dtypes's only mismatched weights are [R, n, d, 2d]: a check of weights.size(3) alone
    passed, and the raw ops (the wrapper checks in Python first) then read [R, n, 2d, d] weights with the wrong
    strides and returned a result."""
    acts = (True, "identity", "tanh", "identity")
    x, w = torch.randn(4, 8), torch.randn(3, 2, 16, 8)
    with pytest.raises(ValueError, match=r"weights must have shape \[R, n, d, d\] with d == x\.size\(1\) == 8, "
                                         r"got \[3, 2, 16, 8\]"):
        OP.residual_stack_forward(x, w, *acts, True)
    with pytest.raises(ValueError, match=r"weights must have shape \[R, n, d, d\] with d == grad_y\.size\(1\) == 8, "
                                         r"got \[3, 2, 16, 8\]"):
        OP.residual_stack_backward(x, w, torch.zeros(3, 4, 8), *acts)
    with pytest.raises(ValueError, match=r"weights must have shape \[R, n, d, d\] with d == x\.size\(1\) == 8, "
                                         r"got \[3, 2, 16, 8\]"):
        OP.residual_stack_hvp(x, w, torch.zeros(4, 8), torch.zeros(1, 3, 2, 16, 8), *acts, "mse")


@pytest.mark.parametrize("d", [5, 40])  # saved batch-major / feature-major by the forward
def test_backward_refuses_layer_inputs_with_bad_strides(d):
    """The backward takes layer inputs [R, n, B, d] contiguous or feature-major ([n*d*B, d*B, 1, B]); the only
    bad-strides test gave unit inputs [R, B, d], and a feature-major check that ignored stride(1) passed (a
    stride(1) of 0 then ran every layer's gradient from layer 0's memory). Each stride wrong in turn is refused,
    naming saved and the strides received."""
    R, n, B = 3, 2, 5
    acts = (True, "identity", "tanh", "identity")
    w = torch.randn(R, n, d, d, dtype=torch.float64) / d
    gy = torch.randn(B, d, dtype=torch.float64)
    buf = torch.randn(4 * R * n * d * B, dtype=torch.float64)
    good = (n * d * B, d * B, 1, B)
    bads = [(n * d * B, 0, 1, B), (n * d * B, 2 * d * B, 1, B), (2 * n * d * B, d * B, 1, B), (n * d * B, d * B, 2, B),
            (n * d * B, d * B, 1, B + 1)]
    OP.residual_stack_backward(gy, w, buf.as_strided((R, n, B, d), good), *acts)  # accepted
    for strides in bads:
        bad = buf.as_strided((R, n, B, d), strides)
        assert not bad.is_contiguous()
        shown = ", ".join(map(str, strides))
        with pytest.raises(ValueError, match=r"saved must be contiguous \(or feature-major: .*\[n\*d\*B, d\*B, 1, B\] "
                                             rf"for layer inputs\) .*got strides \[{shown}\]"):
            OP.residual_stack_backward(gy, w, bad, *acts)


@pytest.mark.parametrize("d", [5, 40])  # saved batch-major / feature-major by the forward
def test_backward_refuses_unit_inputs_with_bad_strides_sizes_or_dtype(d):
    """Unit inputs [R, B, d] are taken contiguous or feature-major ([B*d, 1, B]). The bad-strides test of unit
    inputs sliced [..., ::2] (stride(1) wrong) and the shape tests tried [0] and layer inputs with n + 1: a check
    that ignored stride(2) (a stride of 0 read every feature from one column), one that ignored the batch size
    (the kernel then reads the rows with stride B) and one that dropped the dtype check (ATen's "expected scalar
    type Double" instead of a TypeError naming saved) passed. Each is refused, naming saved."""
    R, n, B = 3, 2, 5
    acts = (True, "identity", "tanh", "identity")
    w = torch.randn(R, n, d, d, dtype=torch.float64) / d
    gy = torch.randn(B, d, dtype=torch.float64)
    buf = torch.randn(4 * R * B * d, dtype=torch.float64)
    OP.residual_stack_backward(gy, w, buf.as_strided((R, B, d), (B * d, 1, B)), *acts)  # accepted
    OP.residual_stack_backward(gy, w, buf[:R * B * d].view(R, B, d), *acts)  # accepted
    for strides in [(2 * B * d, 1, B), (B * d, 0, B), (B * d, 2, B), (B * d, 1, 0), (B * d, 1, B + 1)]:
        bad = buf.as_strided((R, B, d), strides)
        assert not bad.is_contiguous()
        shown = ", ".join(map(str, strides))
        with pytest.raises(ValueError, match=r"saved must be contiguous \(or feature-major: strides \[B\*d, 1, B\].*"
                                             rf"got strides \[{shown}\]"):
            OP.residual_stack_backward(gy, w, bad, *acts)
    for shape in [(R, B + 1, d), (R, B, d + 1), (R + 1, B, d), (R, B - 1, d)]:
        shown = ", ".join(map(str, shape))
        with pytest.raises(ValueError, match=rf"saved must be the unit inputs of shape \[R, B, d\] = \[{R}, {B}, {d}\]"
                                             rf".*got \[{shown}\]"):
            OP.residual_stack_backward(gy, w, torch.randn(*shape, dtype=torch.float64), *acts)
    _, saved = OP.residual_stack_forward(torch.randn(B, d, dtype=torch.float64), w, *acts, True, False)
    with pytest.raises(TypeError, match="saved must have dtype float64, got float32"):
        OP.residual_stack_backward(gy, w, saved.float(), *acts)
    with pytest.raises(TypeError, match="saved must have dtype float32, got float64"):
        OP.residual_stack_backward(gy.float(), w.float(), saved, *acts)


def test_bfloat16_is_named_in_dtype_errors():
    """test_bad_shapes_and_dtypes named int64 and float16 only: bfloat16 reported as "float16" passed."""
    acts = (True, "identity", "identity", "identity")
    xb, wb = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(1, 1, 8, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"x must be float32 or float64, got bfloat16"):
        OP.residual_stack_forward(xb, wb, *acts, False, False)
    with pytest.raises(TypeError, match=r"same dtype, got x: float32, weights: bfloat16"):
        OP.residual_stack_forward(xb.float(), wb, *acts, False, False)
    with pytest.raises(TypeError, match=r"x must be float32 or float64, got bfloat16"):
        residual_stack(xb, wb, backend="fused")


def _cache_limit_run(value, tmp_path):
    """A fused call that takes a pooled buffer, in a fresh process with SHORTCUT_EXT_CPU_CACHE_MB=value (read once a
    process); prints the cache limit in MB."""
    code = ("import torch, shortcut_ext as se\n"
            "x = torch.randn(300, 48, dtype=torch.float64)\n"
            "w = (torch.randn(30, 2, 48, 48, dtype=torch.float64) / 60).requires_grad_()  # saves 3.3 MB\n"
            "se.residual_stack(x, w, True, 'identity', 'relu', 'identity', backend='fused')\n"
            "print(se.cache_stats()['limit_bytes'] >> 20)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(shortcut_ext.__file__)))  # the package under test
    env = dict(os.environ, SHORTCUT_EXT_CPU_CACHE_MB=value,
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


@pytest.mark.parametrize("value", ["64abc", "1.5"])
def test_cache_limit_with_trailing_junk_is_refused(value, tmp_path):
    """SHORTCUT_EXT_CPU_CACHE_MB="64abc" is refused, naming the variable and the value: the bad values tried had no
    numeric prefix, and a parser that took the number and ignored what followed it (64 MB) passed."""
    r = _cache_limit_run(value, tmp_path)
    assert r.returncode != 0, r.stdout
    assert "SHORTCUT_EXT_CPU_CACHE_MB must be a whole number of megabytes" in r.stderr, r.stderr
    assert f"got '{value}'" in r.stderr, r.stderr


def test_empty_cache_limit_means_the_default(tmp_path):
    """SHORTCUT_EXT_CPU_CACHE_MB= (empty) means the default, 2048 MB, as unset does; refusing it (got '') passed."""
    r = _cache_limit_run("", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "2048", r.stdout
