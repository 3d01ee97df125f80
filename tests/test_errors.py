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


def test_non_contiguous_op_input_is_refused_wrapper_accepts():
    x, w = _xw(B=4, d=3)
    xt = torch.randn(3, 4).T
    with pytest.raises(ValueError, match=r"x must be contiguous, got strides"):
        OP.residual_stack_forward(xt, w, True, "identity", "identity", "identity", True)
    wt = w.transpose(2, 3)
    with pytest.raises(ValueError, match=r"weights must be contiguous"):
        OP.residual_stack_forward(x, wt, True, "identity", "identity", "identity", True)
    residual_stack(xt, wt, backend="fused")  # the public wrapper copies


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
