"""CUDA kernels of the residual stack (csrc/cuda) against the pure-PyTorch reference.

Two groups:

* On a GPU (skipped without CUDA or without the CUDA build): every compiled fused tile size and the
  generic path, forced through the SHORTCUT_EXT_CUDA_* switches, for both dtypes, every activation
  position, n = 1..3 and plain stacks; workspace chunking, atomic weight gradients, determinism,
  streams and device guards, the CPU path's error messages, float32 accuracy (no TF32 unless asked),
  the opt-in tensor-core kernels (TF32 against a model of TF32 products, 3xTF32 at float32
  accuracy), gradcheck and opcheck.  (tests/test_ops.py runs its value/shape/fuzz tests on CUDA as well.)
* Without a GPU (marked slow: one g++ build, ~30 s): the same kernel source compiled for CPU
  emulation (csrc/cuda/emulate), each emulated CUDA thread an OS thread, compared with the reference
  for every compiled configuration (tensor-core ones with mma.sync emulated lane by lane), padded
  widths, unit and row chunking, atomics and the generic path.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import shortcut_ext
from shortcut_ext import ops
from shortcut_ext import reference as ref
from testing import DEVICES, DispatchCalls, assert_close_lowp, stack_inputs, tol

ROOT = Path(__file__).resolve().parents[1]
ACTS = shortcut_ext.ACTIVATIONS
ACT_CODE = {"identity": 0, "relu": 1, "tanh": 2, "ssigmoid": 3}

# The fused configurations compiled in csrc/cuda/residual_stack_kernels.cu: {dtype: {D: [tile rows]}}.
FUSED_TILES = {
    torch.float32: {16: [128, 32], 32: [128, 32], 64: [128, 32], 128: [128, 64, 32]},
    torch.float64: {16: [64, 16], 32: [64, 16], 64: [64, 16], 128: [32]},
}
# Largest n whose backward fits in 227 KiB of shared memory, where that is below 3.
MAX_N = {(torch.float32, 128, 128): 1, (torch.float64, 128, 32): 2}
# The TF32 tensor-core configurations (csrc/cuda/residual_stack_fused_tf32.cu): {D: [tile rows]},
# and where their backward stops fitting below n = 3.
TF32_TILES = {16: [128, 32], 32: [128, 32], 64: [128, 32], 128: [128, 64, 32]}
NO_3XTF32 = {(128, 128)}  # (D, BM) tiles without a 3xTF32 build
TF32_MAX_N = {(128, 128): 1}


def _tf32_cases():
    """(D, BM, d, n, shortcut, acts) covering each TF32 tile at full and padded width."""
    cases, i = [], 0
    for D, tiles in TF32_TILES.items():
        for bm in tiles:
            for d in (D, D // 2 + 3):
                n = min(1 + i % 3, TF32_MAX_N.get((D, bm), 3))
                acts = list(itertools.product(ACTS, repeat=3))[(11 * i + 5) % 64]
                cases.append((D, bm, d, n, i % 4 != 1, acts))
                i += 1
    return cases


def _tf32_ids(case):
    D, bm, d, n, sc, acts = case
    return f"tf32-D{D}-BM{bm}-d{d}-n{n}-{'res' if sc else 'plain'}-{'.'.join(acts)}"


def _tensor_core_params():
    """(case, mode) for every TF32 tile in both modes, where the mode has that tile."""
    return [pytest.param(case, mode, id=f"{mode}-{_tf32_ids(case)[5:]}") for mode in ("tf32", "3xtf32")
            for case in _tf32_cases() if not (mode == "3xtf32" and case[:2] in NO_3XTF32)]


def _tf32_round(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 as cvt.rna.tf32.f32 does (10 mantissa bits, ties away from zero)."""
    u = t.contiguous().view(torch.int32)
    finite = (u & 0x7F800000) != 0x7F800000
    return torch.where(finite, (u + 0x1000) & -0x2000, u).view(torch.float32)


class _Tf32Linear(torch.autograd.Function):
    """a @ w^T with both inputs rounded to TF32 in the forward and every product of the backward
    (what the tensor-core kernels compute), accumulated in float32."""

    @staticmethod
    def forward(ctx, a, w):
        ctx.save_for_backward(a, w)
        return _tf32_round(a) @ _tf32_round(w).T

    @staticmethod
    def backward(ctx, g):
        a, w = ctx.saved_tensors
        return _tf32_round(g) @ _tf32_round(w), _tf32_round(g).T @ _tf32_round(a)


def _tf32_reference(x, w, gy, shortcut, acts):
    """y, unit inputs, grad_x, grad_w of the stack with TF32 products, float32 otherwise (activations
    evaluated in float64 and rounded to float32, as accurate as the kernels' own)."""
    pre, mid, post = acts

    def act(name, z):
        return ref.activation(name, z.double()).float()

    xs = x.detach().cpu().float().requires_grad_(True)
    ws = w.detach().cpu().float().requires_grad_(True)
    h, saved, n = xs, [], ws.shape[1]
    for unit in ws.unbind(0):
        saved.append(h.detach())
        a = act(pre, h)
        for k, wk in enumerate(unit.unbind(0)):
            a = _Tf32Linear.apply(a, wk)
            if k < n - 1:
                a = act(mid, a)
        h = h + act(post, a) if shortcut else act(post, a)
    gx, gw = torch.autograd.grad(h, (xs, ws), gy.detach().cpu().float())
    return h.detach(), torch.stack(saved), gx, gw


def _assert_tf32(outs, x, w, gy, shortcut, acts, names=("y", "saved", "grad_x", "grad_w")):
    """Outputs of the TF32 kernels (named `names`) against a model of TF32 products: closer to it than half the
    model's own distance to float64 (float32 kernels would be about as far from the model as float64
    is).  Not much closer: where the kernel's and the model's float32 sums differ in the last bit, an
    operand now and then rounds to the other TF32 neighbour."""
    exact = _reference(x, w, gy, shortcut, acts)
    model = _tf32_reference(x, w, gy, shortcut, acts)

    def rel(a, b):
        return ((a.cpu().double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    every = ("y", "saved", "grad_x", "grad_w")
    exact = [exact[every.index(nm)] for nm in names]
    model = [model[every.index(nm)] for nm in names]
    for name, a, e, m in zip(names, outs, exact, model):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        model_err, to_model = rel(m, e), rel(a, m)
        assert model_err < 0.1, f"{name}: the test problem is too ill-conditioned for TF32 ({model_err:.2e})"
        assert to_model <= max(0.5 * model_err, 3e-6), (
            f"{name}: {to_model:.2e} from the TF32 model, which is {model_err:.2e} from float64")


def _fused_cases():
    """(dtype, D, BM, d, n, shortcut, acts) covering each compiled tile at full and padded width."""
    cases, i = [], 0
    for dtype, by_d in FUSED_TILES.items():
        for D, tiles in by_d.items():
            for bm in tiles:
                for d in (D, D // 2 + 3):
                    n = min(1 + i % 3, MAX_N.get((dtype, D, bm), 3))
                    acts = list(itertools.product(ACTS, repeat=3))[(7 * i) % 64]
                    cases.append((dtype, D, bm, d, n, i % 4 != 0, acts))
                    i += 1
    return cases


def _ids(case):
    dtype, D, bm, d, n, sc, acts = case
    return f"{str(dtype)[6:]}-D{D}-BM{bm}-d{d}-n{n}-{'res' if sc else 'plain'}-{'.'.join(acts)}"


def _reference(x, w, gy, shortcut, acts):
    """float64 reference values: y, unit inputs, grad_x, grad_w."""
    x64 = x.detach().cpu().double().requires_grad_(True)
    w64 = w.detach().cpu().double().requires_grad_(True)
    y = ref.residual_stack_forward(x64, w64, shortcut, *acts)
    gx, gw = torch.autograd.grad(y, (x64, w64), gy.detach().cpu().double())
    saved = ref.residual_stack_unit_inputs(x64.detach(), w64.detach(), shortcut, *acts)
    return y.detach(), saved, gx, gw


def _assert_matches(outs, x, w, gy, shortcut, acts):
    """Kernel outputs (y, saved, grad_x, grad_w) against the reference: float64 to 1e-10, float32
    within a small multiple of PyTorch's own float32 error against float64."""
    exact = _reference(x, w, gy, shortcut, acts)
    if x.dtype == torch.float64:
        for a, b in zip(outs, exact):
            torch.testing.assert_close(a.cpu(), b, **tol(torch.float64))
        return
    xs, ws = x.detach().cpu().requires_grad_(True), w.detach().cpu().requires_grad_(True)
    ys = ref.residual_stack_forward(xs, ws, shortcut, *acts)
    same = (ys.detach(), ref.residual_stack_unit_inputs(xs.detach(), ws.detach(), shortcut, *acts))
    same += torch.autograd.grad(ys, (xs, ws), gy.cpu())
    for a, b, c in zip(outs, same, exact):
        assert a.dtype == torch.float32
        assert_close_lowp(a.cpu(), b, c)


# ==================================================================================== on a GPU
needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and the CUDA kernels")


def _switches(monkeypatch, path="auto", tile_rows=None, workspace_mb=None, atomic=False):
    monkeypatch.setenv("SHORTCUT_EXT_CUDA_PATH", path)
    for name, value in (("SHORTCUT_EXT_CUDA_TILE_ROWS", tile_rows), ("SHORTCUT_EXT_CUDA_WORKSPACE_MB", workspace_mb)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, str(value))
    monkeypatch.setenv("SHORTCUT_EXT_CUDA_ATOMIC_GRAD", "1" if atomic else "0")


def _run_ops(x, w, gy, shortcut, acts):
    """Both ops called directly: y, saved, grad_x, grad_w."""
    y, saved = torch.ops.shortcut_ext.residual_stack_forward(x, w, shortcut, *acts, True)
    gx, gw = torch.ops.shortcut_ext.residual_stack_backward(gy, w, saved, shortcut, *acts)
    return y, saved, gx, gw


def _inputs(B, d, R, n, dtype, seed=0, scale=None, device="cuda"):
    x, w = stack_inputs(B, d, R, n, dtype, device, scale=scale, seed=seed)
    gy = torch.randn(B, d, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64).to(device, dtype)
    return x, w, gy


@needs_cuda
@pytest.mark.parametrize("case", _fused_cases(), ids=_ids)
def test_every_fused_tile(case, monkeypatch):
    dtype, D, bm, d, n, shortcut, acts = case
    _switches(monkeypatch, "fused", tile_rows=bm)
    for B in (1, bm - 1, 2 * bm + 3):  # a partial tile, one tile, several with a ragged last one
        x, w, gy = _inputs(B, d, 3, n, dtype, seed=B, scale=0.8 / d ** 0.5)
        _assert_matches(_run_ops(x, w, gy, shortcut, acts), x, w, gy, shortcut, acts)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,d,R,n", [(1, 1, 2, 1), (37, 5, 3, 2), (70, 64, 2, 3), (33, 130, 2, 2), (100, 200, 2, 1),
                                     (65, 16, 2, 12)])
def test_generic_path(B, d, R, n, dtype, monkeypatch):
    _switches(monkeypatch, "generic")
    for i, acts in enumerate([("identity", "relu", "identity"), ("tanh", "ssigmoid", "relu")]):
        x, w, gy = _inputs(B, d, R, n, dtype, seed=i, scale=0.8 / d ** 0.5)
        _assert_matches(_run_ops(x, w, gy, i == 0, acts), x, w, gy, i == 0, acts)


@needs_cuda
def test_automatic_choice_covers_wide_and_deep(monkeypatch):
    """d > 128 and a deep plain unit (n = 40) fall back to the generic path without any switch."""
    _switches(monkeypatch)
    for B, d, R, n, sc in [(50, 150, 2, 2, True), (80, 16, 1, 40, False)]:
        acts = ("identity", "tanh", "identity")
        x, w, gy = _inputs(B, d, R, n, torch.float64, scale=1.0 / d ** 0.5)
        _assert_matches(_run_ops(x, w, gy, sc, acts), x, w, gy, sc, acts)


@needs_cuda
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_workspace_chunks_units_and_rows(path, monkeypatch):
    """A 1 MiB workspace bound forces one unit per launch and, on the fused path, several row chunks."""
    acts = ("relu", "relu", "tanh")
    x, w, gy = _inputs(4096, 64, 12, 2, torch.float32, seed=3)
    _switches(monkeypatch, path, workspace_mb=1)
    outs = _run_ops(x, w, gy, True, acts)
    _assert_matches(outs, x, w, gy, True, acts)


@needs_cuda
def test_generic_backward_scratch_within_the_workspace(monkeypatch):
    """The generic backward keeps n + 2 row tiles per block: a 1 MiB workspace holds two blocks' scratch
    of a 20-layer plain stack at d = 129 (363 KB each), so the blocks loop over the batch's 7 tiles."""
    acts = ("identity", "tanh", "identity")
    x, w, gy = _inputs(200, 129, 1, 20, torch.float64, seed=4, scale=1.0 / 129 ** 0.5)
    _switches(monkeypatch, "generic", workspace_mb=1)
    outs = _run_ops(x, w, gy, False, acts)
    _assert_matches(outs, x, w, gy, False, acts)


@needs_cuda
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_atomic_weight_gradients(path, monkeypatch):
    acts = ("identity", "relu", "identity")
    x, w, gy = _inputs(1000, 32, 6, 2, torch.float32, seed=4)
    _switches(monkeypatch, path, atomic=True)
    _assert_matches(_run_ops(x, w, gy, True, acts), x, w, gy, True, acts)


@needs_cuda
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_deterministic_by_default(path, monkeypatch):
    _switches(monkeypatch, path)
    x, w, gy = _inputs(3000, 48, 5, 2, torch.float32, seed=5)
    a = _run_ops(x, w, gy, True, ("relu", "tanh", "identity"))
    b = _run_ops(x, w, gy, True, ("relu", "tanh", "identity"))
    for u, v in zip(a, b):
        assert torch.equal(u, v), "two identical calls gave different bits"


@needs_cuda
@pytest.mark.parametrize("path, mode", [("fused", "off"), ("generic", "off"), ("fused", "tf32")])
def test_relu_propagates_nan(path, mode, monkeypatch):
    """torch.relu(nan) is nan: a diverged entry stays nan through ReLU in the forward, the backward and
    the HVP kernel, as in the reference."""
    _switches(monkeypatch, path)
    for pos in range(3):
        acts = tuple("relu" if i == pos else "identity" for i in range(3))
        x, w, gy = _inputs(70, 40, 2, 2, torch.float32, seed=pos, scale=0.15)
        x[5, 3] = float("nan")
        with shortcut_ext.cuda_tf32(mode):
            y, _, gx, gw = _run_ops(x, w, gy, False, acts)
        yr, _, gxr, gwr = _reference(x, w, gy, False, acts)
        for a, b, what in ((y, yr, "y"), (gx, gxr, "grad_x"), (gw, gwr, "grad_w")):
            assert torch.equal(a.isnan().cpu(), b.isnan()), (acts, what)
        assert y[5].isnan().all()
    v = torch.ones(1, 2, 2, 40, 40, device="cuda")
    L, g, hv = shortcut_ext.residual_stack_hvp(x, w, torch.zeros_like(x), v, False, "relu", "identity", "identity")
    assert L.isnan() and g.isnan().any() and hv.isnan().any()


@needs_cuda
def test_float32_is_not_tf32(monkeypatch):
    """A wide, long float32 stack stays float32-accurate (TF32 would be ~1e-3 relative), whatever
    torch's TF32 switch says."""
    _switches(monkeypatch)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        acts = ("identity", "relu", "identity")
        x, w, gy = _inputs(2048, 128, 16, 2, torch.float32, seed=6)
        y, saved, gx, gw = _run_ops(x, w, gy, True, acts)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    yr, _, gxr, gwr = _reference(x, w, gy, True, acts)
    for a, b in ((y, yr), (gx, gxr), (gw, gwr)):
        rel = ((a.cpu().double() - b).norm() / b.norm()).item()
        assert rel < 2e-5, f"relative error {rel:.2e} is not float32-level"


@needs_cuda
@pytest.mark.parametrize("case, mode", _tensor_core_params())
def test_tf32_tile(case, mode, monkeypatch, capfd):
    """Every tensor-core tile, asked for with shortcut_ext.cuda_tf32(mode): TF32 against the TF32
    model, 3xTF32 at float32 accuracy."""
    D, bm, d, n, shortcut, acts = case
    _switches(monkeypatch, "fused", tile_rows=bm)
    monkeypatch.setenv("SHORTCUT_EXT_CUDA_VERBOSE", "1")
    for B in (bm + 5, 2 * bm + 3):  # one tile, several with a ragged last one
        x, w, gy = _inputs(B, d, 3, n, torch.float32, seed=B, scale=0.8 / d ** 0.5)
        with shortcut_ext.cuda_tf32(mode):
            outs = _run_ops(x, w, gy, shortcut, acts)
        (_assert_tf32 if mode == "tf32" else _assert_matches)(outs, x, w, gy, shortcut, acts)
    plans = capfd.readouterr().err
    assert plans.count(f"fused-{mode} D={D} BM={bm}") == 4, plans


@needs_cuda
def test_tf32_through_autograd_and_off_by_default(monkeypatch, capfd):
    """The setting reaches the backward (run on autograd's thread), is off by default and after
    the with block, and leaves float64 alone."""
    _switches(monkeypatch)
    monkeypatch.setenv("SHORTCUT_EXT_CUDA_VERBOSE", "1")
    acts = ("identity", "relu", "tanh")
    x, w, gy = _inputs(3000, 64, 6, 2, torch.float32, seed=9, scale=0.8 / 8)

    def step():
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = shortcut_ext.residual_stack(xs, ws, True, *acts)
        y.backward(gy)
        return y.detach(), xs.grad, ws.grad

    assert shortcut_ext.cuda_tf32.current() == "off"
    with shortcut_ext.cuda_tf32():
        got = step()
    assert shortcut_ext.cuda_tf32.current() == "off"
    assert capfd.readouterr().err.count("fused-tf32 D=64") == 2
    _assert_tf32(got, x, w, gy, True, acts, names=("y", "grad_x", "grad_w"))
    plain = step()
    assert "tf32" not in capfd.readouterr().err
    for a, e in zip(plain, _reference(x, w, gy, True, acts)[:1] + _reference(x, w, gy, True, acts)[2:]):
        assert ((a.cpu().double() - e).norm() / e.norm()).item() < 2e-5
    with shortcut_ext.cuda_tf32("3xtf32"):  # float32 accuracy from tensor cores
        got = step()
    assert capfd.readouterr().err.count("fused-3xtf32 D=64") == 2
    for a, e in zip(got, _reference(x, w, gy, True, acts)[:1] + _reference(x, w, gy, True, acts)[2:]):
        assert ((a.cpu().double() - e).norm() / e.norm()).item() < 2e-5
    with shortcut_ext.cuda_tf32():
        x64, w64, gy64 = _inputs(300, 64, 2, 2, torch.float64, seed=9)
        _assert_matches(_run_ops(x64, w64, gy64, True, acts), x64, w64, gy64, True, acts)
    assert "tf32" not in capfd.readouterr().err


@needs_cuda
def test_runs_on_the_current_stream_and_device(monkeypatch):
    _switches(monkeypatch)
    acts = ("tanh", "relu", "identity")
    x, w, gy = _inputs(777, 32, 4, 2, torch.float32, seed=8)
    expected = _run_ops(x, w, gy, True, acts)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _run_ops(x, w, gy, True, acts)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    if torch.cuda.device_count() > 1:  # inputs on another device than the current one
        other = torch.device("cuda", 1)
        got = _run_ops(x.to(other), w.to(other), gy.to(other), True, acts)
        for a, b in zip(got, expected):
            assert a.device == other
            assert torch.equal(a.cpu(), b.cpu())


@needs_cuda
def test_errors_match_the_cpu_path():
    """Bad arguments get the same exception type and message on CUDA as on CPU (shared checks)."""
    acts = ("identity", "relu", "identity")
    bad_forward = [  # device -> op arguments
        lambda dev: (torch.zeros(5, 4, dtype=torch.float64, device=dev), torch.zeros(3, 2, 4, 4, device=dev)),
        lambda dev: (torch.zeros(5, 4, device=dev), torch.zeros(3, 2, 4, 3, device=dev)),
        lambda dev: (torch.zeros(5, 3, device=dev), torch.zeros(3, 2, 4, 4, device=dev)),
        lambda dev: (torch.zeros(5, 8, device=dev)[:, ::2], torch.zeros(3, 2, 4, 4, device=dev)),
        lambda dev: (torch.zeros(5, 4, dtype=torch.int32, device=dev), torch.zeros(3, 2, 4, 4, device=dev)),
        lambda dev: (torch.zeros(5, 4, device=dev), torch.zeros(0, 2, 4, 4, device=dev)),
    ]
    for make in bad_forward:
        errors = []
        for dev in ("cpu", "cuda"):
            with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
                torch.ops.shortcut_ext.residual_stack_forward(*make(dev), True, *acts, True)
            errors.append((info.type, str(info.value).splitlines()[0]))
        assert errors[0] == errors[1]
    bad_saved = [lambda dev: torch.zeros(3, 4, 4, device=dev), lambda dev: torch.zeros(3, 5, 4, 2, device=dev)[..., 0],
                 lambda dev: torch.zeros(3, 5, 4, dtype=torch.float64, device=dev)]
    for make in bad_saved:
        errors = []
        for dev in ("cpu", "cuda"):
            with pytest.raises((ValueError, TypeError)) as info:
                torch.ops.shortcut_ext.residual_stack_backward(torch.zeros(5, 4, device=dev),
                                                               torch.zeros(3, 2, 4, 4, device=dev), make(dev), True,
                                                               *acts)
            errors.append((info.type, str(info.value).splitlines()[0]))
        assert errors[0] == errors[1]
    for name, position in (("act_mid", 1), ("act_post", 2)):
        bad = list(acts)
        bad[position] = "softplus"
        with pytest.raises(ValueError, match=name):
            torch.ops.shortcut_ext.residual_stack_forward(torch.zeros(5, 4, device="cuda"),
                                                          torch.zeros(3, 2, 4, 4, device="cuda"), True, *bad, True)
    with pytest.raises(ValueError, match="same device"):
        torch.ops.shortcut_ext.residual_stack_forward(torch.zeros(5, 4), torch.zeros(3, 2, 4, 4, device="cuda"), True,
                                                      *acts, True)


@needs_cuda
@pytest.mark.parametrize("path", ["fused", "generic"])
def test_gradcheck_float64(path, monkeypatch):
    _switches(monkeypatch, path)
    for n, shortcut, acts in [(2, True, ("tanh", "ssigmoid", "tanh")), (3, False, ("identity", "tanh", "relu"))]:
        x, w = stack_inputs(5, 3, 3, n, torch.float64, "cuda", scale=0.7, seed=n, requires_grad=True)
        f = lambda x, w: shortcut_ext.residual_stack(x, w, shortcut, *acts, backend="fused")  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w))


@needs_cuda
def test_opcheck_cuda():
    for shortcut, acts in [(True, ("identity", "relu", "identity")), (False, ("tanh", "tanh", "ssigmoid"))]:
        x, w = stack_inputs(6, 4, 3, 2, torch.float64, "cuda", requires_grad=True)
        torch.library.opcheck(torch.ops.shortcut_ext.residual_stack_forward.default, (x, w, shortcut, *acts, True))
        _, saved = torch.ops.shortcut_ext.residual_stack_forward(x.detach(), w.detach(), shortcut, *acts, True)
        gy = torch.randn(6, 4, dtype=torch.float64, device="cuda")
        for grad_weights in (True, False):
            torch.library.opcheck(torch.ops.shortcut_ext.residual_stack_backward.default,
                                  (gy, w.detach(), saved, shortcut, *acts, grad_weights),
                                  test_utils=("test_schema", "test_faketensor"))


@needs_cuda
def test_backward_without_weight_gradients_cuda():
    """grad_weights=False on CUDA (frozen weights): the same grad_x as the full backward, an empty second
    output as on the CPU (the kernels compute the weight gradients all the same), and a frozen CUDA stack's
    input gradient through autograd equals the reference's."""
    for dtype, d, n in [(torch.float32, 64, 2), (torch.float64, 20, 3)]:
        x, w, gy = _inputs(300, d, 4, n, dtype)
        y, saved, gx, gw = _run_ops(x, w, gy, True, ("identity", "relu", "identity"))
        gx2, empty = torch.ops.shortcut_ext.residual_stack_backward(gy, w, saved, True, "identity", "relu",
                                                                    "identity", False)
        assert empty.shape == (0,) and empty.device == w.device and gw.shape == w.shape
        assert torch.equal(gx2, gx)
        xf = x.detach().requires_grad_()
        g = torch.autograd.grad(shortcut_ext.residual_stack(xf, w, True, "identity", "relu", "identity",
                                                            backend="fused"), xf, gy)[0]
        xr = x.detach().double().requires_grad_()
        want = torch.autograd.grad(ref.residual_stack_forward(xr, w.double(), True, "identity", "relu", "identity"),
                                   xr, gy.double())[0]
        torch.testing.assert_close(g.double(), want, **(tol(torch.float64) if dtype == torch.float64
                                                        else dict(rtol=1e-4, atol=1e-5)))


@needs_cuda
def test_save_inputs_false_and_empty_batch():
    x, w = stack_inputs(9, 5, 4, 2, torch.float32, "cuda")
    y, nothing = torch.ops.shortcut_ext.residual_stack_forward(x, w, True, "relu", "relu", "relu", False)
    assert nothing.numel() == 0
    torch.testing.assert_close(y.cpu(), ref.residual_stack_forward(x.cpu(), w.cpu(), True, "relu", "relu", "relu"),
                               **tol(torch.float32))
    e = x[:0]
    y, saved = torch.ops.shortcut_ext.residual_stack_forward(e, w, True, "relu", "relu", "relu", True)
    assert y.shape == (0, 5) and saved.shape == (4, 0, 5)
    gx, gw = torch.ops.shortcut_ext.residual_stack_backward(e, w, saved, True, "relu", "relu", "relu")
    assert gx.shape == (0, 5) and torch.equal(gw, torch.zeros_like(w))


# ================================================================================ CPU emulation
def _torch_dirs():
    base = Path(torch.__file__).resolve().parent
    return base / "include", base / "lib"


def _emulation_sources():
    files = sorted((ROOT / "csrc" / "cuda").rglob("*")) + [ROOT / "csrc" / "common.h"]
    return [f for f in files if f.is_file() and f.suffix in (".h", ".cuh", ".cu", ".cpp")]


def _build_emulator(out_dir, defines=()):
    """The CUDA kernels compiled for CPU emulation with `defines`, loaded with ctypes."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    inc, lib = _torch_dirs()
    if not (inc / "c10").is_dir() or not list(lib.glob("libc10.*")):
        pytest.skip("torch headers or libc10 not found")
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in _emulation_sources())).hexdigest()[:16]
    out = Path(out_dir) / f"se_emu_{digest}.so"
    cmd = [cxx, "-std=c++17", "-O1", "-pthread", "-fPIC", "-shared", "-fno-strict-aliasing", "-w",
           "-DSHORTCUT_EXT_CUDA_EMULATE", *(f"-D{d}" for d in defines), f"-I{ROOT / 'csrc'}", f"-I{inc}",
           f"-I{inc / 'torch/csrc/api/include'}", str(ROOT / "csrc/cuda/emulate/emulate_api.cpp"), f"-L{lib}", "-lc10",
           f"-Wl,-rpath,{lib}", "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    so = ctypes.CDLL(str(out))
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    so.se_emu_set_sms.argtypes = [I]
    so.se_emu_set_concurrent_blocks.argtypes = [I]
    so.se_emu_set_grid_stride_cap.argtypes = [L]
    so.se_emu_set_cp_async_at_issue.argtypes = [I]
    so.se_emu_set_tf32.argtypes = [I]
    so.se_emu_forward.argtypes = [I, P, P, P, P, L, L, L, L, I, I, I, I, I, I, ctypes.c_char_p, I]
    so.se_emu_backward.argtypes = [I, P, P, P, P, P, L, L, L, L, I, I, I, I, I, I, I, L, ctypes.c_char_p, I]
    so.se_emu_describe.argtypes = [I, I, L, L, L, L, I, I, I, L, I, ctypes.c_char_p, I]
    return so


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """The CUDA kernels compiled for CPU emulation, loaded with ctypes."""
    return _build_emulator(tmp_path_factory.mktemp("cuda_emulation"))


TF32_CODE = {False: 0, True: 1, "tf32": 1, "3xtf32": 2}  # Options::tf32


def _emu_describe(so, dtype, backward, B, d, R, n, path=0, tile=0, atomic=False, ws=0, tf32=False, want_w=True):
    buf = ctypes.create_string_buffer(1024)
    so.se_emu_set_tf32(TF32_CODE[tf32])
    so.se_emu_describe(int(dtype == torch.float64), int(backward), B, d, R, n, path, tile, int(atomic), ws,
                       int(want_w), buf, 1024)
    return buf.value.decode()


def _emu_run(so, x, w, gy, shortcut, acts, path=0, tile=0, atomic=False, ws=0, sms=4, tf32=False, want_w=True):
    """Forward then backward through the emulated kernels (tf32: False, True / "tf32" or "3xtf32");
    outputs start as NaN to catch unwritten elements.  want_w=False: the backward without weight gradients
    (a null grad_w, frozen weights); gw is then None."""
    B, d = x.shape
    R, n = w.shape[:2]
    isd = int(x.dtype == torch.float64)
    codes = [ACT_CODE[a] for a in acts]
    y = torch.full((B, d), float("nan"), dtype=x.dtype)
    saved = torch.full((R, B, d), float("nan"), dtype=x.dtype)
    gx = torch.full((B, d), float("nan"), dtype=x.dtype)
    gw = torch.full((R, n, d, d), float("nan"), dtype=x.dtype)
    err = ctypes.create_string_buffer(1024)
    so.se_emu_set_sms(sms)
    so.se_emu_set_tf32(TF32_CODE[tf32])
    rc = so.se_emu_forward(isd, x.data_ptr(), w.data_ptr(), y.data_ptr(), saved.data_ptr(), B, d, R, n,
                           int(shortcut), *codes, path, tile, err, 1024)
    assert rc == 0, err.value.decode()
    rc = so.se_emu_backward(isd, gy.data_ptr(), w.data_ptr(), saved.data_ptr(), gx.data_ptr(),
                            gw.data_ptr() if want_w else None, B, d, R, n, int(shortcut), *codes, path, tile,
                            int(atomic), ws, err, 1024)
    assert rc == 0, err.value.decode()
    return y, saved, gx, gw if want_w else None


@pytest.mark.slow
@pytest.mark.parametrize("case", _fused_cases(), ids=_ids)
def test_emulated_fused_tile(case, emulator):
    dtype, D, bm, d, n, shortcut, acts = case
    for R, desc in ((2, "forward"), (2, "backward")):
        plan = _emu_describe(emulator, dtype, desc == "backward", bm + 3, d, R, n, path=1, tile=bm)
        assert plan.startswith(f"fused D={D} BM={bm}"), plan
    B = bm + 5 if bm <= 32 else bm // 2 + 3
    x, w, gy = _inputs(B, d, 2, n, dtype, seed=D + bm, scale=0.8 / d ** 0.5, device="cpu")
    _assert_matches(_emu_run(emulator, x, w, gy, shortcut, acts, path=1, tile=bm), x, w, gy, shortcut, acts)


EMULATED_SPECIALS = [
    # (B, d, R, n, shortcut, acts, dtype, switches, expected plan prefix)
    (100, 16, 5, 2, True, ("identity", "relu", "identity"), torch.float32, dict(path=1, tile=32, ws=4096),
     "fused D=16 BM=32 threads=32 smem=9984 grid=2 units_per_launch=1 tiles_per_launch=2"),  # unit + row chunks
    (100, 16, 5, 2, True, ("relu", "tanh", "ssigmoid"), torch.float32, dict(path=1, tile=32, ws=3 * 4 * 2048),
     "fused D=16 BM=32 threads=32 smem=9984 grid=4 units_per_launch=3"),  # unit chunks 3 + 2
    (100, 20, 4, 3, False, ("tanh", "identity", "relu"), torch.float64, dict(path=1, tile=16, atomic=True),
     "fused D=32 BM=16"),
    (100, 20, 4, 2, True, ("ssigmoid", "ssigmoid", "tanh"), torch.float32, dict(path=2, atomic=True), "generic"),
    (150, 70, 3, 2, True, ("relu", "tanh", "ssigmoid"), torch.float64, dict(path=2, ws=2 * 70 * 70 * 8 * 2),
     "generic BM=32 threads=256 smem=24832 grid=2 units_per_launch=1"),  # 2 column passes, unit chunks
    (40, 130, 2, 2, True, ("identity", "relu", "identity"), torch.float32, dict(), "generic"),  # d > 128
    (300, 8, 3, 2, True, ("relu", "tanh", "ssigmoid"), torch.float32, dict(path=2, sms=2),
     "generic BM=32 threads=256 smem=12416 grid=4"),  # blocks loop over tiles
    (200, 24, 1, 6, False, ("identity", "tanh", "identity"), torch.float64, dict(path=2, ws=60000),
     "generic BM=32 threads=256 smem=24832 grid=1"),  # the scratch of 8 row tiles per block bounds the grid
    (70, 8, 1, 40, False, ("identity", "tanh", "identity"), torch.float64, dict(), "fused"),  # deep plain unit
    (1, 3, 2, 4, True, ("ssigmoid", "ssigmoid", "tanh"), torch.float64, dict(), "fused D=16 BM=16"),
    (9, 1, 3, 1, False, ("relu", "tanh", "ssigmoid"), torch.float32, dict(), "fused D=16 BM=32"),
    (300, 16, 2, 2, True, ("identity", "relu", "identity"), torch.float32, dict(sms=2), "fused D=16 BM=128"),
]


@contextlib.contextmanager
def _cp_async_at_issue(so, on=True):
    """cp.async copies land as they are issued (the earliest a GPU may land them) instead of at the wait that
    retires them (the latest; the default): a weight stream that refills a buffer before the barrier that ends
    the block's reads of it computes wrong numbers only so."""
    so.se_emu_set_cp_async_at_issue(int(on))
    try:
        yield
    finally:
        so.se_emu_set_cp_async_at_issue(0)


@pytest.mark.parametrize("at_issue", [False, True], ids=["cp.async-at-wait", "cp.async-at-issue"])
def test_emulated_smoke(at_issue, emulator):
    """In the default run (one g++ build, ~15 s): one small emulated case per kernel family, so that CI
    without a GPU runs the CUDA sources: float32 and float64 FMA, TF32 and 3xTF32 tensor cores, generic; with
    the weight stream's cp.async copies landing at either end of the time a GPU may land them."""
    with _cp_async_at_issue(emulator, at_issue):
        for dtype, d, path, mode, check in ((torch.float32, 24, 1, False, _assert_matches),
                                            (torch.float64, 9, 1, False, _assert_matches),
                                            (torch.float32, 40, 1, "tf32", _assert_tf32),
                                            (torch.float32, 20, 1, "3xtf32", _assert_matches),
                                            (torch.float32, 140, 2, False, _assert_matches)):
            x, w, gy = _inputs(37, d, 2, 2, dtype, seed=d, scale=0.8 / d ** 0.5, device="cpu")
            acts = ("relu", "tanh", "ssigmoid")
            check(_emu_run(emulator, x, w, gy, True, acts, path=path, tf32=mode), x, w, gy, True, acts)


_FROZEN_CHUNKED = {  # (dtype, d): the full backward's plan, then the frozen one's (B = 100, R = 5, n = 2)
    (torch.float32, 16): ("grid=2 units_per_launch=1 tiles_per_launch=2 deterministic",
                          "grid=4 units_per_launch=5 tiles_per_launch=4 no-weight-gradients"),
    (torch.float64, 70): ("grid=2 units_per_launch=1 deterministic", "units_per_launch=5 no-weight-gradients")}


@pytest.mark.parametrize("dtype, d, kw", [
    pytest.param(torch.float32, 24, dict(path=1), id="f32-fma"), pytest.param(torch.float64, 9, dict(path=1), id="f64"),
    pytest.param(torch.float32, 40, dict(path=1, tf32="tf32"), id="tf32"),
    pytest.param(torch.float32, 20, dict(path=1, tf32="3xtf32"), id="3xtf32"),
    pytest.param(torch.float32, 40, dict(path=2), id="f32-generic"),
    pytest.param(torch.float32, 140, dict(path=2), id="f32-generic-d140", marks=pytest.mark.slow),  # d > 128
    pytest.param(torch.float64, 20, dict(path=1, tile=16, atomic=True), id="f64-atomic"),
    pytest.param(torch.float32, 20, dict(path=2, atomic=True), id="f32-generic-atomic"),
    pytest.param(torch.float32, 16, dict(path=1, tile=32, ws=4096), id="unit-and-row-chunks"),
    pytest.param(torch.float64, 70, dict(path=2, ws=2 * 70 * 70 * 8 * 2), id="generic-unit-chunks")])
def test_emulated_backward_without_weight_gradients(dtype, d, kw, emulator):
    """In the default run: the emulated backward with a null grad_w (frozen weights: no weight-gradient products,
    partial sums or reduction) gives the full backward's grad_x bit for bit, for every kernel family (float32 and
    float64 FMA, TF32 and 3xTF32 tensor cores, generic), with atomic weight gradients, and in unit and row chunks
    (where the full backward's workspace splits the units and rows into several launches; having no partial
    sums to hold, the frozen backward runs them all in one, so its plan says so). The generic path at d = 140
    (more than the fused path's 128; 30 s to emulate) is in the slow run; at d = 40 and 70 it has partial k and
    column chunks already."""
    acts = ("relu", "tanh", "ssigmoid")
    if (dtype, d) in _FROZEN_CHUNKED:
        plans = [_emu_describe(emulator, dtype, True, 100, d, 5, 2, want_w=want_w,
                               **{k: kw[k] for k in ("path", "tile", "ws") if k in kw}) for want_w in (True, False)]
        for plan, expected in zip(plans, _FROZEN_CHUNKED[dtype, d]):
            assert plan.endswith(expected), (plan, expected)
    x, w, gy = _inputs(100, d, 5, 2, dtype, seed=d, scale=0.8 / d ** 0.5, device="cpu")
    full = _emu_run(emulator, x, w, gy, True, acts, **kw)
    frozen = _emu_run(emulator, x, w, gy, True, acts, want_w=False, **kw)
    assert frozen[3] is None and torch.equal(frozen[0], full[0])
    assert torch.equal(frozen[2], full[2]), (dtype, d, kw, (frozen[2] - full[2]).abs().max().item())
    if not kw.get("tf32"):
        _assert_matches(full, x, w, gy, True, acts)


def _cp_async_at_issue_cases():
    """One case per compiled fused tile (dtype or TF32, D, BM), from the cases of test_emulated_fused_tile and
    test_emulated_tf32_tile; of the 3xTF32 tiles (the same weight stream as TF32's, and slow to emulate) two."""
    params, seen = [], set()
    for case in _fused_cases():
        if case[:3] not in seen:
            seen.add(case[:3])
            params.append(pytest.param(case, False, id=_ids(case)))
    for p in _tensor_core_params():
        (case, mode), key = p.values, (p.values[1],) + p.values[0][:2]
        if mode == "3xtf32" and case[:2] not in ((16, 128), (128, 64)):
            continue
        if key not in seen:
            seen.add(key)
            params.append(pytest.param((torch.float32,) + case, mode, id=p.id))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("case, mode", _cp_async_at_issue_cases())
def test_emulated_fused_tiles_with_cp_async_landing_at_issue(case, mode, emulator):
    """Every fused tile, its weight stream's cp.async copies landing as they are issued. Landing them at the wait
    (every other emulated test) hides a refill of a buffer the block is still reading: the stream issuing one
    chunk too many in its prologue, or issuing the next chunk before the barrier in acquire(), passed every
    other emulated test; on a GPU both race (compute-sanitizer's racecheck would report them)."""
    dtype, D, bm, d, n, shortcut, acts = case
    B = bm + 5 if bm <= 32 else bm // 2 + 3
    x, w, gy = _inputs(B, d, 3, n, dtype, seed=B + d + 1, scale=0.8 / d ** 0.5, device="cpu")  # 3 n chunks a stream
    with _cp_async_at_issue(emulator):
        outs = _emu_run(emulator, x, w, gy, shortcut, acts, path=1, tile=bm, tf32=mode)
    (_assert_tf32 if mode == "tf32" else _assert_matches)(outs, x, w, gy, shortcut, acts)


def _sanitizer_cases():
    """The check(...) calls of the case benchmarks/gpu/run.sh hands to compute-sanitizer, as tuples."""
    import ast
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "run.sh").read_text()
    start = text.index("cat > /tmp/se_sanitize_case.py <<'EOF'\n")
    tree = ast.parse(text[text.index("\n", start) + 1:text.index("\nEOF\n", start)])
    cases = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check":
            B, d, R, n = (ast.literal_eval(a) for a in node.args[:4])
            dtype = torch.float64 if ast.unparse(node.args[4]) == "torch.float64" else torch.float32
            env = ast.literal_eval(node.args[5])
            tf32 = next((ast.literal_eval(k.value) for k in node.keywords if k.arg == "tf32"), False)
            cases.append((B, d, R, n, dtype, env, tf32))
    return cases


def test_sanitizer_cases_have_plans_on_the_h200(emulator):
    """Every case run.sh hands to compute-sanitizer must be one the planner runs on the H200 (132 SMs,
    227 KB of shared memory per block) with its forced switches, forward and backward: one case forced
    a 128-row tile on a d = 128, n = 2 backward, which does not fit, and would have failed the GPU run."""
    cases = _sanitizer_cases()
    assert len(cases) >= 10
    emulator.se_emu_set_sms(132)
    try:
        for B, d, R, n, dtype, env, tf32 in cases:
            tile = int(env.get("SHORTCUT_EXT_CUDA_TILE_ROWS", 0))
            path = {"fused": 1, "generic": 2}.get(env.get("SHORTCUT_EXT_CUDA_PATH", ""), 0)
            ws = int(env.get("SHORTCUT_EXT_CUDA_WORKSPACE_MB", 1024)) << 20
            for backward in (False, True):
                plan = _emu_describe(emulator, dtype, backward, B, d, R, n, path, tile,
                                     env.get("SHORTCUT_EXT_CUDA_ATOMIC_GRAD") == "1", ws, tf32=tf32)
                assert not plan.startswith("error"), (B, d, R, n, env, tf32, backward, plan)
                if tile:
                    assert f"BM={tile} " in plan, (B, d, R, n, env, backward, plan)
                if tf32:
                    assert plan.startswith("fused-3xtf32" if tf32 == "3xtf32" else "fused-tf32"), plan
    finally:
        emulator.se_emu_set_sms(4)


@pytest.mark.slow
def test_emulated_deterministic_and_errors(emulator):
    x, w, gy = _inputs(90, 24, 3, 2, torch.float32, seed=1, device="cpu")
    a = _emu_run(emulator, x, w, gy, True, ("relu", "relu", "relu"))
    b = _emu_run(emulator, x, w, gy, True, ("relu", "relu", "relu"))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert "needs d <= 128" in _emu_describe(emulator, torch.float32, False, 8, 200, 1, 1, path=1)
    assert "not a fused tile size" in _emu_describe(emulator, torch.float32, True, 8, 128, 1, 2, path=1, tile=128)


@pytest.mark.slow
@pytest.mark.parametrize("case, mode", _tensor_core_params())
def test_emulated_tf32_tile(case, mode, emulator):
    """Every tensor-core tile, with mma.sync emulated lane by lane in the PTX ISA's fragment layout:
    TF32 against the TF32 model, 3xTF32 at float32 accuracy (as the float32 kernels are held to)."""
    D, bm, d, n, shortcut, acts = case
    for backward in (False, True):
        plan = _emu_describe(emulator, torch.float32, backward, bm + 3, d, 2, n, path=1, tile=bm, tf32=mode)
        assert plan.startswith(f"fused-{mode} D={D} BM={bm}"), plan
    B = bm + 5 if bm <= 32 else bm // 2 + 3
    x, w, gy = _inputs(B, d, 2, n, torch.float32, seed=D + bm + 1, scale=0.8 / d ** 0.5, device="cpu")
    outs = _emu_run(emulator, x, w, gy, shortcut, acts, path=1, tile=bm, tf32=mode)
    (_assert_tf32 if mode == "tf32" else _assert_matches)(outs, x, w, gy, shortcut, acts)


EMULATED_TF32_SPECIALS = [
    # (B, d, R, n, shortcut, acts, dtype, switches, expected backward plan prefix)
    (300, 64, 5, 2, True, ("relu", "tanh", "identity"), torch.float32, dict(ws=64 * 64 * 4 * 2 * 3, tf32=True),
     "fused-tf32 D=64 BM=32 threads=128"),  # automatic tile; unit and row chunks
    (200, 40, 3, 2, False, ("tanh", "relu", "ssigmoid"), torch.float32, dict(atomic=True, sms=1, tf32=True),
     "fused-tf32 D=64 BM=128"),  # atomic weight gradients; one SM: the largest tile
    (150, 100, 3, 3, True, ("ssigmoid", "tanh", "relu"), torch.float32, dict(ws=2 * 3 * 128 * 128 * 4, tf32="3xtf32"),
     "fused-3xtf32 D=128 BM=32"),  # 3xTF32 with unit and row chunks
    (70, 100, 2, 8, True, ("identity", "relu", "identity"), torch.float32, dict(tf32=True),
     "fused D=128 BM=32"),  # no TF32 tile fits n = 8: the float32 fused kernels
    (40, 150, 2, 2, True, ("identity", "tanh", "identity"), torch.float32, dict(tf32=True), "generic"),  # d > 128
]


@pytest.mark.slow
def test_emulated_generic_forward_blocks_loop_over_tiles(emulator):
    """The generic forward's grid is min(tiles, 8 x SMs), and every emulated case had as many blocks as tiles:
    a forward whose blocks ran only their first tile (the rows of the others left unwritten) passed. One SM:
    8 blocks over 10 tiles."""
    acts = ("relu", "tanh", "ssigmoid")
    emulator.se_emu_set_sms(1)
    plan = _emu_describe(emulator, torch.float32, False, 300, 8, 2, 2, path=2)
    assert plan.startswith("generic BM=32") and " grid=8" in plan, plan
    x, w, gy = _inputs(300, 8, 2, 2, torch.float32, seed=4, scale=0.9 / 8 ** 0.5, device="cpu")
    try:
        _assert_matches(_emu_run(emulator, x, w, gy, True, acts, path=2, sms=1), x, w, gy, True, acts)
    finally:
        emulator.se_emu_set_sms(4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_emulated_blocks_run_concurrently(dtype, emulator):
    """The emulation ran a launch's blocks one after another, so a generic kernel whose blocks shared global
    scratch by mistake (each block's stride one tile short: block b's second buffer was block b+1's first)
    computed bitwise the same and passed. Here all blocks of a launch run at once, as on a GPU: the generic
    kernels, and the fused ones (several blocks, unit chunks, atomic weight gradients)."""
    acts = ("relu", "tanh", "ssigmoid")
    emulator.se_emu_set_concurrent_blocks(16)
    try:
        for B, d, R, n, sms in ((300, 8, 2, 2, 1), (150, 70, 3, 2, 4)):
            x, w, gy = _inputs(B, d, R, n, dtype, seed=B, scale=0.9 / d ** 0.5, device="cpu")
            _assert_matches(_emu_run(emulator, x, w, gy, True, acts, path=2, sms=sms), x, w, gy, True, acts)
        # the fused kernels too: several blocks, unit chunks, atomic weight gradients
        for B, d, R, n, sms, sw, dt in ((300, 16, 2, 2, 2, {}, dtype),  # (the tiles compiled differ by dtype)
                                        (100, 16, 5, 2, 4, dict(path=1, tile=32, ws=4096), torch.float32),
                                        (100, 20, 4, 3, 4, dict(path=1, tile=16, atomic=True), torch.float64)):
            if dt != dtype:
                continue
            x, w, gy = _inputs(B, d, R, n, dtype, seed=B + d, scale=0.9 / d ** 0.5, device="cpu")
            _assert_matches(_emu_run(emulator, x, w, gy, True, acts, sms=sms, **sw), x, w, gy, True, acts)
    finally:
        emulator.se_emu_set_concurrent_blocks(1)
        emulator.se_emu_set_sms(4)


def _several_large_tile_cases():
    """Fused tiles of 64 and 128 rows, each over several full tiles and a ragged one (B = 2 BM + 3), as the GPU
    tests run them (test_every_fused_tile); test_emulated_fused_tile gives these tiles one partial tile only. All
    FMA tiles; of the tensor-core tiles the narrowest width of each (D, BM) in TF32, and two in 3xTF32 (the
    emulated mma.sync is slow)."""
    params = [pytest.param(case, False, id=_ids(case)) for case in _fused_cases() if case[2] >= 64]
    picked = {}
    for mode in ("tf32", "3xtf32"):
        for case in _tf32_cases():
            D, bm, d = case[:3]
            if bm < 64 or (mode == "3xtf32" and (case[:2] in NO_3XTF32 or (D, bm) not in ((16, 128), (128, 64)))):
                continue
            if (mode, D, bm) not in picked or d < picked[mode, D, bm][2]:
                picked[mode, D, bm] = case
    params += [pytest.param((torch.float32,) + case, mode, id=f"{mode}-{_tf32_ids(case)[5:]}")
               for (mode, _, _), case in picked.items()]
    return params


@pytest.mark.slow
@pytest.mark.parametrize("case, mode", _several_large_tile_cases())
def test_emulated_several_large_tiles(case, mode, emulator):
    dtype, D, bm, d, n, shortcut, acts = case
    plan = _emu_describe(emulator, dtype, True, 2 * bm + 3, d, 2, n, path=1, tile=bm, tf32=mode)
    assert plan.startswith(f"fused{'-' + mode if mode else ''} D={D} BM={bm} "), plan
    B = 2 * bm + 3
    x, w, gy = _inputs(B, d, 2, n, dtype, seed=B + d, scale=0.8 / d ** 0.5, device="cpu")
    outs = _emu_run(emulator, x, w, gy, shortcut, acts, path=1, tile=bm, tf32=mode)
    (_assert_tf32 if mode == "tf32" else _assert_matches)(outs, x, w, gy, shortcut, acts)


@pytest.mark.slow
def test_emulated_grid_stride_loops_run_several_rounds(emulator):
    """The weight preparation and the partial sums of the weight gradient are grid-stride loops capped at 65,535
    blocks of 256 threads: on every emulated (and most GPU) problems one round covers all elements, so a loop
    that skipped or repeated elements after its first round went unseen. Here the cap is 1 and 2 blocks: the
    loops run many rounds, for the FMA, tensor-core and generic kernels, unit chunks (partials added to the
    output) and atomic weight gradients included."""
    acts = ("relu", "tanh", "ssigmoid")
    cases = [  # (B, d, R, n, dtype, switches)
        (100, 16, 5, 2, torch.float32, dict(path=1, tile=32, ws=4096)),  # unit and row chunks
        (100, 20, 4, 3, torch.float64, dict(path=1, tile=16, atomic=True)),
        (150, 70, 3, 2, torch.float64, dict(path=2, ws=2 * 70 * 70 * 8 * 2)),  # generic, unit chunks
        (40, 20, 3, 2, torch.float32, dict(path=1, tf32="tf32")),  # weights rounded to TF32 as they are copied
        (40, 20, 3, 2, torch.float32, dict(path=1, tf32="3xtf32")),
    ]
    try:
        for cap in (1, 2):
            emulator.se_emu_set_grid_stride_cap(cap)
            for B, d, R, n, dtype, sw in cases:
                x, w, gy = _inputs(B, d, R, n, dtype, seed=B + d + cap, scale=0.9 / d ** 0.5, device="cpu")
                outs = _emu_run(emulator, x, w, gy, True, acts, **sw)
                (_assert_tf32 if sw.get("tf32") == "tf32" else _assert_matches)(outs, x, w, gy, True, acts)
    finally:
        emulator.se_emu_set_grid_stride_cap(65535)


@pytest.mark.slow
def test_emulated_tensor_core_blocks_run_concurrently(emulator):
    """The TF32 and 3xTF32 tiles with every block of a launch at once (test_emulated_blocks_run_concurrently runs
    the FMA and generic kernels so): several blocks, unit and row chunks, atomic weight gradients."""
    acts = ("relu", "tanh", "ssigmoid")
    emulator.se_emu_set_concurrent_blocks(16)
    try:
        for B, d, R, n, sw in ((100, 20, 3, 2, dict(path=1, tile=32, tf32="tf32", sms=4)),
                               (100, 20, 4, 2, dict(path=1, tile=32, tf32="tf32", ws=32 * 32 * 4 * 2 * 2)),
                               (100, 20, 3, 2, dict(path=1, tile=32, tf32="tf32", atomic=True)),
                               (100, 20, 3, 2, dict(path=1, tile=32, tf32="3xtf32", ws=32 * 32 * 4 * 2 * 2))):
            x, w, gy = _inputs(B, d, R, n, torch.float32, seed=B + R, scale=0.9 / d ** 0.5, device="cpu")
            outs = _emu_run(emulator, x, w, gy, True, acts, **sw)
            (_assert_tf32 if sw["tf32"] == "tf32" else _assert_matches)(outs, x, w, gy, True, acts)
    finally:
        emulator.se_emu_set_concurrent_blocks(1)
        emulator.se_emu_set_sms(4)


@pytest.mark.slow
@pytest.mark.parametrize("case", EMULATED_SPECIALS + EMULATED_TF32_SPECIALS,
                         ids=lambda c: c[-1].split(" units")[0].split(" threads")[0].replace(" ", "-"))
def test_emulated_special_cases(case, emulator):
    B, d, R, n, shortcut, acts, dtype, sw, expect = case
    sw = dict(sw)
    sms, tf32 = sw.pop("sms", 4), sw.pop("tf32", False)
    emulator.se_emu_set_sms(sms)
    plan = _emu_describe(emulator, dtype, True, B, d, R, n, sw.get("path", 0), sw.get("tile", 0),
                         sw.get("atomic", False), sw.get("ws", 0), tf32=tf32)
    assert plan.startswith(expect), plan
    x, w, gy = _inputs(B, d, R, n, dtype, seed=B + d, scale=0.9 / d ** 0.5, device="cpu")
    outs = _emu_run(emulator, x, w, gy, shortcut, acts, sms=sms, tf32=tf32, **sw)
    if expect.startswith("fused-tf32"):
        _assert_tf32(outs, x, w, gy, shortcut, acts)
    elif expect.startswith("fused-3xtf32"):  # float32 accuracy
        _assert_matches(outs, x, w, gy, shortcut, acts)
    elif tf32 and expect.startswith("fused D="):  # a TF32 forward, a float32 backward recomputing in float32
        for a, e in zip(outs, _reference(x, w, gy, shortcut, acts)):
            assert ((a.double() - e).norm() / e.norm()).item() < 2e-2
    else:
        _assert_matches(outs, x, w, gy, shortcut, acts)


@pytest.mark.slow
def test_emulated_tf32_leaves_float64_alone(emulator):
    assert _emu_describe(emulator, torch.float64, True, 100, 64, 2, 2, tf32=True).startswith("fused D=64")
    x, w, gy = _inputs(50, 24, 2, 2, torch.float64, seed=3, device="cpu")
    _assert_matches(_emu_run(emulator, x, w, gy, True, ACTS[:3], tf32=True), x, w, gy, True, ACTS[:3])


@pytest.mark.slow
def test_emulation_catches_an_undersized_launch(tmp_path):
    """The emulation's checks can fail: built so that every launch gets 64 bytes less shared memory
    than the host asked for, the fused and generic kernels' accesses past it are errors of the call
    (what compute-sanitizer or a trap would report on a GPU), not crashes or silent results."""
    so = _build_emulator(tmp_path, defines=["SE_EMU_SMEM_SHORTFALL=64"])
    for path, d in ((1, 16), (1, 64), (2, 40)):
        x, w, gy = _inputs(40, d, 2, 2, torch.float32, seed=2, device="cpu")
        with pytest.raises(AssertionError, match="emulated CUDA: .*(outside the dynamic shared memory|past the "
                                                 "launch's dynamic shared memory)"):
            _emu_run(so, x, w, gy, True, ("relu", "tanh", "identity"), path=path)


@pytest.mark.slow
def test_emulated_kernels_under_asan(tmp_path):
    """csrc/cuda/emulate/sanitizer_check.cpp built with AddressSanitizer + UBSan (~4 min): its quick
    sweep of edge shapes (d = 1, 20, 131; B = 1; partial tiles; TF32 / 3xTF32; chunked units; atomic weight
    gradients of a padded tile; HVP row chunks; grid-stride launches capped at 2 blocks) reads and writes no byte outside the exactly sized buffers or past the shared memory,
    and matches the float64 generic path.  The same binary, handed 64 bytes less workspace than the
    kernels ask for, must abort with ASan's report: the check can fail."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    inc, lib = _torch_dirs()
    exe = tmp_path / "sanitizer_check"
    cmd = [cxx, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-pthread",
           "-fno-strict-aliasing", "-w", "-DSHORTCUT_EXT_CUDA_EMULATE", f"-I{ROOT / 'csrc'}", f"-I{inc}",
           f"-I{inc / 'torch/csrc/api/include'}", str(ROOT / "csrc/cuda/emulate/sanitizer_check.cpp"), f"-L{lib}",
           "-lc10", f"-Wl,-rpath,{lib}", "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and ("asan" in r.stderr or "ubsan" in r.stderr):
        pytest.skip(f"no sanitizer runtime for {cxx}: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-4000:]
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
    env.pop("SE_EMU_WORKSPACE_SHORTFALL", None)
    r = subprocess.run([str(exe), "sweep", "quick"], capture_output=True, text=True, env=env, timeout=1500)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "runtime error" not in out, out[-6000:]
    assert "ok=22 refused=0 bad=0" in r.stdout, r.stdout[-3000:]
    r = subprocess.run([str(exe), "sweep", "quick"], capture_output=True, text=True, timeout=1500,
                       env={**env, "SE_EMU_WORKSPACE_SHORTFALL": "64"})
    assert r.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in r.stderr, (r.stdout + r.stderr)[-3000:]


# ============================================================ residual_stack_hvp (R-operator) on a GPU
HVP_TARGETS = ("mse", "ce_index", "ce_prob")


def _hvp_problem(B, d, R, n, K, target, dtype, device="cuda", seed=0, q=None):
    """Seeded (x, weights, targets, directions, loss name) for the HVP op; ``q``: the targets' width
    (a read-out's rows; default d)."""
    x, w = stack_inputs(B, d, R, n, torch.float64, scale=0.8 / d ** 0.5, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    v = torch.randn(K, R, n, d, d, generator=g, dtype=torch.float64)
    q = d if q is None else q
    if target == "mse":
        y, loss = torch.randn(B, q, generator=g, dtype=torch.float64), "mse"
    elif target == "ce_index":
        y, loss = torch.randint(0, q, (B,), generator=g), "cross_entropy"
    else:
        y, loss = torch.softmax(2 * torch.randn(B, q, generator=g, dtype=torch.float64), 1), "cross_entropy"
    cast = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    return cast(x), cast(w), cast(y), cast(v), loss


def _hvp_readout(q, d, dtype, device="cuda", seed=0):
    """A seeded read-out P [q, d] (columns of scale 1, not orthonormal)."""
    g = torch.Generator().manual_seed(seed + 2000)
    return (torch.randn(q, d, generator=g, dtype=torch.float64) / d ** 0.5).to(device, dtype)


def _hvp_assert_matches(outs, x, w, y, v, shortcut, acts, loss, readout=None, matrix="hessian"):
    """(loss, grad, hvps) of the CUDA op against the double-backward reference: float64 to 1e-10,
    float32 within a small multiple of the reference's own float32 error; ``matrix``: the products with the
    Hessian's part or the empirical Fisher instead (``reference.ggn_products``)."""
    cpu = lambda t: t.detach().cpu() if t is not None else None  # noqa: E731
    x, w, y, v, P = cpu(x), cpu(w), cpu(y), cpu(v), cpu(readout)
    d64 = lambda t: t.double() if t is not None and t.is_floating_point() else t  # noqa: E731
    exact = ref.residual_stack_hvp(d64(x), d64(w), d64(y), d64(v), shortcut, *acts, loss, d64(P), matrix)
    assert [tuple(o.shape) for o in outs] == [tuple(e.shape) for e in exact]
    if x.dtype == torch.float64:
        for a, b in zip(outs, exact):
            assert a.dtype == torch.float64
            torch.testing.assert_close(cpu(a), b, rtol=1e-10, atol=1e-10)
        return
    same = ref.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss, P, matrix)
    for a, b, c in zip(outs, same, exact):
        assert a.dtype == torch.float32
        assert_close_lowp(cpu(a), b, c, factor=10.0)


HVP_CASES = [  # (B, d, R, n, shortcut, acts, target, K)
    (1, 1, 1, 1, True, ("identity",) * 3, "mse", 1),
    (9, 4, 3, 1, True, ("identity",) * 3, "mse", 5),
    (17, 6, 2, 2, True, ("tanh", "ssigmoid", "relu"), "ce_index", 5),
    (13, 5, 1, 3, False, ("identity",) * 3, "ce_prob", 1),  # a plain net of depth 3
    (20, 7, 3, 3, False, ("relu", "tanh", "ssigmoid"), "mse", 1),
    (33, 16, 2, 2, True, ("ssigmoid", "relu", "tanh"), "ce_prob", 5),
    (8, 3, 4, 2, True, ("tanh",) * 3, "ce_index", 1),
    (70, 40, 2, 1, False, ("relu", "relu", "relu"), "mse", 5),
    (5, 130, 1, 2, True, ("identity", "tanh", "identity"), "ce_index", 5),  # d beyond any tile width
]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", HVP_CASES, ids=lambda c: f"B{c[0]}-d{c[1]}-R{c[2]}-n{c[3]}-{c[6]}-k{c[7]}")
def test_hvp_matches_reference(case, dtype):
    B, d, R, n, shortcut, acts, target, K = case
    x, w, y, v, loss = _hvp_problem(B, d, R, n, K, target, dtype, seed=B + d)
    outs = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss)
    assert all(o.device == x.device for o in outs)
    _hvp_assert_matches(outs, x, w, y, v, shortcut, acts, loss)


@needs_cuda
def test_hvp_row_chunks(monkeypatch):
    """SHORTCUT_EXT_CUDA_HVP_MB bounds the HVP's scratch: a batch over it runs in row chunks (here the
    weight and direction copies alone, ~66 MB in float64, exceed 1 MB: 1 row per chunk) with the same
    loss, gradient and products."""
    x, w, y, v, loss = _hvp_problem(20, 64, 200, 2, 4, "ce_index", torch.float64, seed=3)
    acts = ("tanh", "relu", "identity")
    whole = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss)
    monkeypatch.setenv("SHORTCUT_EXT_CUDA_HVP_MB", "1")
    chunked = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for matrix in ops.MATRICES[1:]:  # G, F, the empirical Fisher (G's scratch holds no tangents of unit inputs)
        monkeypatch.delenv("SHORTCUT_EXT_CUDA_HVP_MB")
        whole = torch.ops.shortcut_ext.residual_stack_hvp_part(x, w, y, v, True, *acts, loss, matrix)
        monkeypatch.setenv("SHORTCUT_EXT_CUDA_HVP_MB", "1")
        chunked = torch.ops.shortcut_ext.residual_stack_hvp_part(x, w, y, v, True, *acts, loss, matrix)
        for a, b in zip(chunked, whole):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=matrix)
    monkeypatch.setenv("SHORTCUT_EXT_CUDA_HVP_MB", "-1")
    with pytest.raises(ValueError, match=r"SHORTCUT_EXT_CUDA_HVP_MB must be a whole number of megabytes in \[0, "):
        torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss)


@needs_cuda
def test_hvp_deterministic_and_empty_batch():
    x, w, y, v, loss = _hvp_problem(45, 12, 3, 2, 3, "ce_index", torch.float32, seed=3)
    acts = ("tanh", "relu", "ssigmoid")
    a = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss)
    b = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *acts, loss)
    for u, t in zip(a, b):
        assert torch.equal(u, t)
    x0, y0 = x[:0], y[:0]
    out = torch.ops.shortcut_ext.residual_stack_hvp(x0, w, y0, v, True, *acts, loss)
    assert out[0].item() == 0.0 and not out[1].any() and not out[2].any()


@needs_cuda
def test_hvp_errors_match_the_cpu_path():
    """Bad targets and directions get the same exception type and message on CUDA as on CPU."""
    acts = ("identity", "relu", "identity")
    B, d, R, n = 5, 4, 3, 2

    def args(dev, targets=None, directions=None, loss="mse"):
        x = torch.zeros(B, d, device=dev)
        w = torch.zeros(R, n, d, d, device=dev)
        t = torch.zeros(B, d, device=dev) if targets is None else targets(dev)
        v = torch.zeros(2, R, n, d, d, device=dev) if directions is None else directions(dev)
        return (x, w, t, v, True, *acts, loss)

    bad = [
        dict(directions=lambda dev: torch.zeros(2, R, n, d, d + 1, device=dev)),
        dict(directions=lambda dev: torch.zeros(0, R, n, d, d, device=dev)),
        dict(directions=lambda dev: torch.zeros(2, R, n, d, d, dtype=torch.float64, device=dev)),
        dict(directions=lambda dev: torch.zeros(2, R, n, d, 2 * d, device=dev)[..., ::2]),
        dict(targets=lambda dev: torch.zeros(B, dtype=torch.long, device=dev)),
        dict(targets=lambda dev: torch.zeros(B + 1, dtype=torch.long, device=dev), loss="cross_entropy"),
        dict(targets=lambda dev: torch.zeros(B, dtype=torch.int32, device=dev), loss="cross_entropy"),
        dict(targets=lambda dev: torch.full((B,), d, dtype=torch.long, device=dev), loss="cross_entropy"),
        dict(targets=lambda dev: torch.zeros(B, d, dtype=torch.float64, device=dev)),
        dict(targets=lambda dev: torch.zeros(B, d + 1, device=dev), loss="cross_entropy"),
        dict(loss="hinge"),
    ]
    for kw in bad:
        errors = []
        for dev in ("cpu", "cuda"):
            with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
                torch.ops.shortcut_ext.residual_stack_hvp(*args(dev, **kw))
            errors.append((info.type, str(info.value).splitlines()[0].replace("cuda:0", "DEV").replace("cpu", "DEV")))
        assert errors[0] == errors[1], kw
    for kw, matrix in [(bad[0], "ggn"), (bad[5], "empirical_fisher"), ({}, "fisher")]:  # the parts' op too
        errors = []
        for dev in ("cpu", "cuda"):
            with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
                torch.ops.shortcut_ext.residual_stack_hvp_part(*args(dev, **kw), matrix)
            errors.append((info.type, str(info.value).splitlines()[0].replace("cuda:0", "DEV").replace("cpu", "DEV")))
        assert errors[0] == errors[1], (kw, matrix)


# The HVP kernels compiled for CPU emulation (see csrc/cuda/emulate/emulation.h) through a small C
# entry point kept here, next to its only user.
_HVP_EMU_DRIVER = r"""
#define SHORTCUT_EXT_CUDA_EMULATE
#include "cuda/residual_stack_hvp_cuda.cu"
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>
namespace sc = shortcut_ext::cuda;
template <typename T>
static int run(int64_t B, int64_t d, int64_t R, int64_t n, int64_t K, int shortcut, int pre, int mid, int post,
               int loss, const void* x, const void* w, const void* y, const void* cls, const void* v, void* lo,
               void* gw, void* hv, int64_t max_rows, const void* P, int64_t q, int matrix) {
  std::vector<std::unique_ptr<unsigned char[]>> held;
  sc::Allocator alloc = [&](size_t bytes) -> void* {  // poisoned (NaN) like the other emulation tests
    held.emplace_back(new unsigned char[bytes + 16]);
    std::memset(held.back().get(), 0xFF, bytes + 16);
    return held.back().get();
  };
  const sc::StackArgs a{B, d, R, n, shortcut != 0, shortcut_ext::Act(pre), shortcut_ext::Act(mid),
                        shortcut_ext::Act(post)};
  return int(sc::launch_residual_stack_hvp<T>(
      a, K, shortcut_ext::Loss(loss), static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(y),
      static_cast<const int64_t*>(cls), static_cast<const T*>(v), static_cast<T*>(lo), static_cast<T*>(gw),
      static_cast<T*>(hv), alloc, nullptr, max_rows, static_cast<const T*>(P), q, shortcut_ext::HvpMatrix(matrix)));
}
extern "C" int se_emu_hvp(int is_double, int64_t B, int64_t d, int64_t R, int64_t n, int64_t K, int shortcut,
                          int pre, int mid, int post, int loss, const void* x, const void* w, const void* y,
                          const void* cls, const void* v, void* lo, void* gw, void* hv, int64_t max_rows,
                          const void* P, int64_t q, int matrix) {
  try {
    return is_double ? run<double>(B, d, R, n, K, shortcut, pre, mid, post, loss, x, w, y, cls, v, lo, gw, hv,
                                   max_rows, P, q, matrix)
                     : run<float>(B, d, R, n, K, shortcut, pre, mid, post, loss, x, w, y, cls, v, lo, gw, hv,
                                  max_rows, P, q, matrix);
  } catch (const std::exception& e) {  // what a GPU would trap on (emulation.h): reported, not a crash
    std::fprintf(stderr, "se_emu_hvp: %s\n", e.what());
    return 99;
  }
}
// Blocks of a launch run at the same time (1: one after another); the most blocks of a grid-stride launch.
extern "C" void se_emu_hvp_set_launch(int concurrent_blocks, int64_t grid_stride_cap) {
  se_emu::concurrent_blocks() = concurrent_blocks;
  se_emu::grid_stride_cap() = grid_stride_cap;
}
"""


def _build_hvp_emulator(work, defines=()):
    """The HVP kernels compiled for CPU emulation with `defines`, loaded with ctypes."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    inc, lib = _torch_dirs()
    if not (inc / "c10").is_dir() or not list(lib.glob("libc10.*")):
        pytest.skip("torch headers or libc10 not found")
    src = work / "hvp_emu.cpp"
    src.write_text(_HVP_EMU_DRIVER)
    out = work / "hvp_emu.so"
    cmd = [cxx, "-std=c++17", "-O1", "-pthread", "-fPIC", "-shared", "-fno-strict-aliasing", "-w",
           *(f"-D{d}" for d in defines), f"-I{ROOT / 'csrc'}", f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}",
           str(src), f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}", "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    so = ctypes.CDLL(str(out))
    P, I, L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    so.se_emu_hvp.argtypes = [I, L, L, L, L, L, I, I, I, I, I, P, P, P, P, P, P, P, P, L, P, L, I]
    so.se_emu_hvp_set_launch.argtypes = [I, L]
    return so


@pytest.fixture(scope="session")
def hvp_emulator(tmp_path_factory):
    """The HVP kernels compiled for CPU emulation (32 threads per block), loaded with ctypes."""
    return _build_hvp_emulator(tmp_path_factory.mktemp("hvp_emulation"))


def _emu_hvp(so, x, w, y, v, shortcut, acts, loss, max_rows=0, readout=None, matrix="hessian"):
    """(loss, grad, hvps) from the emulated kernels; outputs start as NaN to catch unwritten elements;
    ``max_rows`` > 0 runs the batch in row chunks of at most that many rows; ``readout``: P [q, d]; ``matrix``:
    the products with the Hessian or one of ``ops.MATRICES``' other matrices."""
    (B, d), (R, n), K = x.shape, w.shape[:2], v.shape[0]
    P = None if readout is None else readout.contiguous()
    lo = torch.full((), float("nan"), dtype=x.dtype)
    gw, hv = torch.full_like(w, float("nan")), torch.full_like(v, float("nan"))
    by_class = y.dtype == torch.int64
    ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
    rc = so.se_emu_hvp(int(x.dtype == torch.float64), B, d, R, n, K, int(shortcut), *(ACT_CODE[a] for a in acts),
                       0 if loss == "mse" else 1, ptr(x), ptr(w), None if by_class else ptr(y),
                       ptr(y) if by_class else None, ptr(v), ptr(lo), ptr(gw), ptr(hv), max_rows, ptr(P),
                       0 if P is None else P.shape[0], ops.MATRICES.index(matrix))
    assert rc == 0
    return lo, gw, hv


@pytest.mark.slow
def test_emulated_hvp_matches_reference(hvp_emulator):
    for case in HVP_CASES:
        B, d, R, n, shortcut, acts, target, K = case
        for dtype in (torch.float64, torch.float32):
            x, w, y, v, loss = _hvp_problem(B, d, R, n, K, target, dtype, device="cpu", seed=B + d)
            _hvp_assert_matches(_emu_hvp(hvp_emulator, x, w, y, v, shortcut, acts, loss), x, w, y, v, shortcut,
                                acts, loss)
    x, w, y, v, loss = _hvp_problem(19, 6, 2, 2, 3, "ce_prob", torch.float32, device="cpu", seed=5)
    a = _emu_hvp(hvp_emulator, x, w, y, v, True, ("tanh", "relu", "ssigmoid"), loss)
    b = _emu_hvp(hvp_emulator, x, w, y, v, True, ("tanh", "relu", "ssigmoid"), loss)
    assert all(torch.equal(s, t) for s, t in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mse", "ce_index", "ce_prob"])
def test_emulated_hvp_row_chunks(hvp_emulator, target):
    """A batch larger than the scratch budget (SHORTCUT_EXT_CUDA_HVP_MB) runs in row chunks whose loss,
    gradient and products add up to the whole batch's, a ragged last chunk included."""
    for dtype in (torch.float64, torch.float32):
        x, w, y, v, loss = _hvp_problem(23, 5, 3, 2, 2, target, dtype, device="cpu", seed=11)
        acts = ("tanh", "relu", "ssigmoid")
        whole = _emu_hvp(hvp_emulator, x, w, y, v, True, acts, loss)
        for rows in (1, 7, 22):
            chunked = _emu_hvp(hvp_emulator, x, w, y, v, True, acts, loss, max_rows=rows)
            _hvp_assert_matches(chunked, x, w, y, v, True, acts, loss)
            for a, b in zip(chunked, whole):
                torch.testing.assert_close(a, b, **tol(dtype))


@pytest.mark.slow
def test_emulated_hvp_grid_stride_and_concurrent_blocks(hvp_emulator):
    """The HVP kernel with its transposes' grid-stride loops capped at 1 and 3 blocks (many rounds; on the GPU one
    round covers up to 16.7M elements) and every block of a launch running at once, as on a GPU."""
    try:
        for cap in (1, 3):
            hvp_emulator.se_emu_hvp_set_launch(16, cap)
            for B, d, R, n, shortcut, acts, target, K in HVP_CASES[1:7]:
                dtype = torch.float64 if cap == 1 else torch.float32
                x, w, y, v, loss = _hvp_problem(B, d, R, n, K, target, dtype, device="cpu", seed=B + cap)
                _hvp_assert_matches(_emu_hvp(hvp_emulator, x, w, y, v, shortcut, acts, loss), x, w, y, v, shortcut,
                                    acts, loss)
    finally:
        hvp_emulator.se_emu_hvp_set_launch(1, 65535)


@pytest.mark.slow
def test_emulated_hvp_with_the_gpus_block_size(tmp_path):
    """The HVP kernel as the GPU launches it, 256 threads per block (the other emulated tests use 32 OS threads),
    so most threads of a tile have no element in most loops and must still meet every barrier; with and
    without a read-out."""
    so = _build_hvp_emulator(tmp_path, defines=["SE_EMU_HVP_THREADS=256"])
    so.se_emu_hvp_set_launch(4, 65535)
    for B, d, R, n, shortcut, acts, target, K in (HVP_CASES[0], HVP_CASES[2], HVP_CASES[5]):
        for dtype in (torch.float64, torch.float32):
            x, w, y, v, loss = _hvp_problem(B, d, R, n, K, target, dtype, device="cpu", seed=B + 2)
            _hvp_assert_matches(_emu_hvp(so, x, w, y, v, shortcut, acts, loss), x, w, y, v, shortcut, acts, loss)
    x, w, y, v, loss = _hvp_problem(300, 3, 2, 2, 2, "mse", torch.float64, device="cpu", seed=9)  # > 256 rows
    _hvp_assert_matches(_emu_hvp(so, x, w, y, v, True, ("tanh",) * 3, loss), x, w, y, v, True, ("tanh",) * 3, loss)
    # a read-out: its loss kernel runs one thread per row, 300 rows over two blocks of 256
    x, w, y, v, loss = _hvp_problem(300, 4, 2, 2, 2, "ce_index", torch.float64, device="cpu", seed=8, q=10)
    P = _hvp_readout(10, 4, torch.float64, device="cpu", seed=8)
    acts = ("tanh", "relu", "ssigmoid")
    _hvp_assert_matches(_emu_hvp(so, x, w, y, v, True, acts, loss, readout=P), x, w, y, v, True, acts, loss, readout=P)


HVP_READOUT_CASES = [  # (B, d, R, n, shortcut, acts, target, K, q): q below, at and above the width
    (9, 4, 2, 2, True, ("tanh", "relu", "ssigmoid"), "ce_index", 3, 3),
    (13, 7, 2, 1, False, ("relu", "tanh", "identity"), "mse", 1, 1),
    (11, 5, 3, 2, True, ("identity",) * 3, "ce_prob", 2, 10),
    (20, 16, 1, 3, True, ("ssigmoid", "tanh", "relu"), "ce_index", 4, 10),
    (6, 3, 2, 2, True, ("tanh",) * 3, "mse", 2, 3),
]


def _readout_case_id(c):
    return f"B{c[0]}-d{c[1]}-R{c[2]}-n{c[3]}-{c[6]}-k{c[7]}-q{c[8]}"


@pytest.mark.slow
def test_emulated_hvp_with_a_readout(hvp_emulator):
    """The CUDA HVP kernel with a frozen read-out P [q, d] (the loss of f P^T: a classifier's), emulated:
    against the double-backward reference for q below, at and above d, all three target forms, float64 and
    float32; in row chunks (the targets' rows then start at b0 * q); the identity read-out gives the same bits
    as none; and every block of a launch at once with the transposes' grid-stride loops capped."""
    for B, d, R, n, shortcut, acts, target, K, q in HVP_READOUT_CASES:
        for dtype in (torch.float64, torch.float32):
            x, w, y, v, loss = _hvp_problem(B, d, R, n, K, target, dtype, device="cpu", seed=B + q, q=q)
            P = _hvp_readout(q, d, dtype, device="cpu", seed=B)
            whole = _emu_hvp(hvp_emulator, x, w, y, v, shortcut, acts, loss, readout=P)
            _hvp_assert_matches(whole, x, w, y, v, shortcut, acts, loss, readout=P)
            chunked = _emu_hvp(hvp_emulator, x, w, y, v, shortcut, acts, loss, max_rows=4, readout=P)
            _hvp_assert_matches(chunked, x, w, y, v, shortcut, acts, loss, readout=P)
            for a, b in zip(chunked, whole):
                torch.testing.assert_close(a, b, **tol(dtype))
    x, w, y, v, loss = _hvp_problem(15, 6, 2, 2, 2, "ce_prob", torch.float64, device="cpu", seed=4)
    acts = ("tanh", "relu", "ssigmoid")
    none = _emu_hvp(hvp_emulator, x, w, y, v, True, acts, loss)
    eye = _emu_hvp(hvp_emulator, x, w, y, v, True, acts, loss, readout=torch.eye(6, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(none, eye))
    try:
        hvp_emulator.se_emu_hvp_set_launch(16, 2)
        B, d, R, n, shortcut, acts, target, K, q = HVP_READOUT_CASES[3]
        x, w, y, v, loss = _hvp_problem(B, d, R, n, K, target, torch.float32, device="cpu", seed=1, q=q)
        P = _hvp_readout(q, d, torch.float32, device="cpu", seed=1)
        _hvp_assert_matches(_emu_hvp(hvp_emulator, x, w, y, v, shortcut, acts, loss, readout=P), x, w, y, v,
                            shortcut, acts, loss, readout=P)
    finally:
        hvp_emulator.se_emu_hvp_set_launch(1, 65535)


@pytest.mark.slow
def test_emulated_hvp_extremes(hvp_emulator):
    """The CUDA HVP kernel's loss of large logits (log 2 for [s, s, 0, 0], not 1 or 0) and its ReLU,
    which passes 0 backward through an inactive unit whatever arrives (NaN included), as autograd."""
    for dtype, s in ((torch.float32, 1e7), (torch.float64, 1e16)):
        x = torch.tensor([[s, s, 0.0, 0.0]], dtype=dtype)
        w, v = torch.zeros(1, 2, 4, 4, dtype=dtype), torch.zeros(1, 1, 2, 4, 4, dtype=dtype)
        for y in (torch.tensor([0]), torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=dtype)):
            lo, _, _ = _emu_hvp(hvp_emulator, x, w, y, v, True, ("identity",) * 3, "cross_entropy")
            assert float(lo) == pytest.approx(math.log(2.0), rel=1e-6)
    x = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    w = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)
    y = torch.tensor([[float("nan"), 0.0]], dtype=torch.float64)
    v = torch.ones(1, 1, 2, 2, 2, dtype=torch.float64)
    for position in range(3):
        acts = tuple("relu" if i == position else "identity" for i in range(3))
        got = _emu_hvp(hvp_emulator, x, w, y, v, False, acts, "mse")
        want = ref.residual_stack_hvp(x, w, y, v, False, *acts, "mse")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, equal_nan=True)


PARTS = ops.MATRICES[1:]  # G, F and the empirical Fisher: launch_residual_stack_hvp's `matrix` 1, 2, 3


def _part_problem(case, dtype, seed, mass=1.7):
    """An HVP problem whose probability targets (``ce_prob``) have row mass ``mass``, not 1: the cross-entropy
    curvature ``c_i (diag(p) - p p^T)`` and the empirical Fisher's residuals then carry it."""
    B, d, R, n, shortcut, acts, target, K = case[:8]
    q = case[8] if len(case) > 8 else None
    x, w, y, v, loss = _hvp_problem(B, d, R, n, K, target, dtype, device="cpu", seed=seed, q=q)
    if target == "ce_prob":
        y = y * mass
    return x, w, y, v, loss


def test_emulated_hvp_parts_smoke(hvp_emulator):
    """In the default run: the CUDA HVP kernel's products with G, F and the empirical Fisher, emulated, against
    the reference in float64 on one small net with every activation, with and without a read-out."""
    acts = ("tanh", "relu", "ssigmoid")
    for case, P in (((9, 4, 2, 2, True, acts, "ce_prob", 3), None),
                    ((7, 3, 2, 2, True, acts, "ce_index", 2, 5), _hvp_readout(5, 3, torch.float64, device="cpu"))):
        x, w, y, v, loss = _part_problem(case, torch.float64, seed=3)
        for matrix in PARTS:
            got = _emu_hvp(hvp_emulator, x, w, y, v, True, acts, loss, readout=P, matrix=matrix)
            _hvp_assert_matches(got, x, w, y, v, True, acts, loss, readout=P, matrix=matrix)


@pytest.mark.slow
def test_emulated_hvp_parts_match_reference(hvp_emulator):
    """The CUDA kernel's products with G (the tangent backward of the output seed alone, no tangent recompute), F
    (that seed zeroed) and the empirical Fisher (G with the per-sample seed), emulated: against the reference
    (``torch.func`` products of the outputs) for the HVP cases (plain and residual, n = 1..3, every activation
    at every position, all target forms, probability rows of mass 1.7), float64 and float32; with a read-out;
    in row chunks (the empirical Fisher's seed weighs the residual by the whole batch's size); G + F = H."""
    for case in HVP_CASES[:8] + [c for c in HVP_READOUT_CASES]:
        B, d, R, n, shortcut, acts, target, K = case[:8]
        P = _hvp_readout(case[8], d, torch.float64, device="cpu", seed=B) if len(case) > 8 else None
        for dtype in (torch.float64, torch.float32):
            x, w, y, v, loss = _part_problem(case, dtype, seed=B + d)
            Pt = None if P is None else P.to(dtype)
            for matrix in PARTS:
                got = _emu_hvp(hvp_emulator, x, w, y, v, shortcut, acts, loss, readout=Pt, matrix=matrix)
                _hvp_assert_matches(got, x, w, y, v, shortcut, acts, loss, readout=Pt, matrix=matrix)
    acts = ("tanh", "relu", "ssigmoid")
    x, w, y, v, loss = _part_problem((23, 5, 3, 2, True, acts, "ce_prob", 2), torch.float64, seed=11)
    parts = {}
    for matrix in ops.MATRICES:
        parts[matrix] = whole = _emu_hvp(hvp_emulator, x, w, y, v, True, acts, loss, matrix=matrix)
        for rows in (1, 7):
            chunked = _emu_hvp(hvp_emulator, x, w, y, v, True, acts, loss, max_rows=rows, matrix=matrix)
            for a, b in zip(chunked, whole):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for matrix in PARTS:  # the loss and gradient are the loss's for every matrix, to the bit
        assert all(torch.equal(a, b) for a, b in zip(parts[matrix][:2], parts["hessian"][:2])), matrix
    torch.testing.assert_close(parts["ggn"][2] + parts["functional"][2], parts["hessian"][2], rtol=1e-12,
                               atol=1e-14)


@pytest.mark.slow
def test_emulated_hvp_parts_with_the_gpus_block_size(tmp_path):
    """G, F and the empirical Fisher with 256 threads per block (as the GPU launches them) and the blocks of a
    launch at once: G's reverse pass skips the tangent loops, whose threads must still meet every barrier."""
    so = _build_hvp_emulator(tmp_path, defines=["SE_EMU_HVP_THREADS=256"])
    so.se_emu_hvp_set_launch(4, 65535)
    for case in (HVP_CASES[2], HVP_CASES[5], HVP_READOUT_CASES[3]):
        B, d, R, n, shortcut, acts, target, K = case[:8]
        P = _hvp_readout(case[8], d, torch.float32, device="cpu", seed=B) if len(case) > 8 else None
        x, w, y, v, loss = _part_problem(case, torch.float32, seed=B)
        for matrix in PARTS:
            got = _emu_hvp(so, x, w, y, v, shortcut, acts, loss, readout=P, matrix=matrix)
            _hvp_assert_matches(got, x, w, y, v, shortcut, acts, loss, readout=P, matrix=matrix)


# ==================================================== end to end on a GPU: what a user runs there
# The ops above are exercised one call at a time; these run the library's user-facing layers on a GPU
# (models moved with .to(GPU), autograd through them, torch.compile, training, the Hessian operator
# and the spectrum command) and compare each with the same computation on the CPU.  They need a GPU (each
# is marked needs_cuda); with GPU = "cpu" and those marks removed they run on the CPU as a check of the
# tests themselves, where all but the `train --tf32` command (which refuses a CPU device) pass.
GPU = "cuda"


def _e2e_net(dtype, recompute=None, seed=1):
    from shortcut_ext.models import ShortcutNet

    net = ShortcutNet(20, 30, 2, "identity", "relu", "tanh", init="small", scale=0.2, seed=seed, backend="fused",
                      in_features=7, out_features=3, dtype=dtype)  # frozen projections must move too
    net.recompute = recompute
    return net


def _e2e_close(gpu: torch.Tensor, cpu: torch.Tensor, dtype) -> None:
    assert gpu.device.type == GPU and gpu.dtype == cpu.dtype
    rel = 1e-10 if dtype == torch.float64 else 1e-4
    err = (gpu.cpu().double() - cpu.double()).norm().item()
    assert err <= rel * cpu.double().norm().item() + 1e-12, (err, cpu.norm().item())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("recompute", [None, True, False], ids=["auto", "recompute", "save"])
def test_cuda_model_forward_backward_matches_cpu(recompute, dtype):
    import copy

    cpu = _e2e_net(dtype, recompute)
    gpu = copy.deepcopy(cpu).to(GPU)
    assert gpu.input_proj.device.type == GPU and gpu.readout.device.type == GPU
    x = torch.randn(33, 7, dtype=dtype, generator=torch.Generator().manual_seed(4))
    yc, yg = cpu(x), gpu(x.to(GPU))
    _e2e_close(yg.detach(), yc.detach(), dtype)
    (yc ** 2).sum().backward()
    (yg ** 2).sum().backward()
    _e2e_close(gpu.weight.grad, cpu.weight.grad, dtype)


@needs_cuda
def test_cuda_torch_compile_model():
    """The compiled model (fake kernel on CUDA tensors, functionalisation) equals the eager one."""
    torch._dynamo.reset()
    net = _e2e_net(torch.float32).to(GPU)
    x = torch.randn(40, 7, device=GPU)
    y_eager = net(x)
    (g_eager,) = torch.autograd.grad(y_eager.square().sum(), net.weight)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    (g,) = torch.autograd.grad(y.square().sum(), net.weight)
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("optimizer", ["gd", "adam"])
def test_cuda_training_matches_cpu(optimizer):
    """train() on a GPU model, fed CPU data (moved once), follows the CPU run; its Hessian probes
    (exact, and through fused HVPs above exact_max_params) agree."""
    from shortcut_ext.train import train

    dtype = torch.float64
    cpu = _e2e_net(dtype)
    gpu = _e2e_net(dtype).to(GPU)
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(64, 7, generator=g, dtype=dtype), torch.randn(64, 3, generator=g, dtype=dtype)
    kw = dict(epochs=6, lr=0.05, optimizer=optimizer, probe_epochs=[6], exact_max_params=0, sharpness_every=3)
    rc, rg = train(cpu, (X, Y), **kw), train(gpu, (X, Y), **kw)
    assert rc.status == rg.status == "ok"
    assert rg.final_loss == pytest.approx(rc.final_loss, rel=1e-9)
    assert rg.history["loss"] == pytest.approx(rc.history["loss"], rel=1e-9)
    _e2e_close(gpu.weight.detach(), cpu.weight.detach(), dtype)
    pc, pg = rc.probes[-1], rg.probes[-1]
    assert pg["method"] == pc["method"]
    assert pg["grad_norm"] == pytest.approx(pc["grad_norm"], rel=1e-9)
    assert pg["lam_max"] == pytest.approx(pc["lam_max"], rel=1e-6)
    # the sharpness by Lanczos on the device's fused products: the CPU's to Lanczos's tolerance (1e-4 |lambda|max)
    sc, sg = rc.history["sharpness"], rg.history["sharpness"]
    assert [math.isnan(v) for v in sg] == [e % 3 != 0 for e in range(7)] == [math.isnan(v) for v in sc]
    assert sg[::3] == pytest.approx(sc[::3], rel=2e-4)


@needs_cuda
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_cuda_hessian_operator_matches_cpu(loss):
    """HessianOperator on a GPU model, data in mini-batches: fused equals autograd on the GPU and the
    fused operator on the CPU; to_dense is symmetric."""
    import copy

    from shortcut_ext.curvature import HessianOperator
    from shortcut_ext.models import ShortcutNet

    dtype = torch.float64
    net = ShortcutNet(6, 4, 2, "tanh", "relu", "ssigmoid", init="small", scale=0.3, seed=2, backend="fused",
                      out_features=3 if loss == "mse" else 4, dtype=dtype)
    g = torch.Generator().manual_seed(6)
    X = torch.randn(50, 6, generator=g, dtype=dtype)
    Y = torch.randn(50, 3, generator=g, dtype=dtype) if loss == "mse" else torch.randint(0, 4, (50,), generator=g)
    batches = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 50, 16)]
    Hc = HessianOperator(net, batches, loss=loss, backend="fused")
    gnet = copy.deepcopy(net).to(GPU)
    Hg = HessianOperator(gnet, [(x.to(GPU), y.to(GPU)) for x, y in batches], loss=loss, backend="fused")
    Ha = HessianOperator(gnet, (X.to(GPU), Y.to(GPU)), loss=loss, backend="autograd")
    V = torch.randn(Hc.P, 3, generator=g, dtype=dtype)
    ref_mm = Hc.matmat(V)
    _e2e_close(Hg.matmat(V.to(GPU)), ref_mm, dtype)
    _e2e_close(Ha.matmat(V.to(GPU)), ref_mm, dtype)
    _e2e_close(Hg.matvec(V[:, 0].to(GPU)), ref_mm[:, 0], dtype)
    D = Hg.to_dense()
    assert D.device.type == GPU
    torch.testing.assert_close(D, D.T, rtol=1e-12, atol=1e-12)


@needs_cuda
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_cuda_gauss_newton_and_functional_parts_match_cpu(loss):
    """HessianOperator(matrix="ggn" | "functional" | "empirical_fisher") on a GPU model: the CUDA kernel's products
    equal torch.func's on the CPU (J^T H_l J v, H v less that, J^T diag(e_i e_i^T) J v); G + F = H."""
    import copy

    from shortcut_ext.curvature import HessianOperator
    from shortcut_ext.models import ShortcutNet

    dtype = torch.float64
    net = ShortcutNet(6, 4, 2, "tanh", "tanh", "identity", init="small", scale=0.3, seed=3, backend="fused",
                      out_features=3 if loss == "mse" else 4, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    X = torch.randn(50, 6, generator=g, dtype=dtype)
    Y = torch.randn(50, 3, generator=g, dtype=dtype) if loss == "mse" else torch.randint(0, 4, (50,), generator=g)
    batches = [(X[i:i + 16], Y[i:i + 16]) for i in range(0, 50, 16)]
    gnet = copy.deepcopy(net).to(GPU)
    gb = [(x.to(GPU), y.to(GPU)) for x, y in batches]
    V = torch.randn(net.weight.numel(), 3, generator=g, dtype=dtype)
    got = {m: HessianOperator(gnet, gb, loss=loss, backend="fused", matrix=m).matmat(V.to(GPU))
           for m in ops.MATRICES}
    assert got["ggn"].device.type == GPU
    for m in ops.MATRICES[1:]:
        _e2e_close(got[m], HessianOperator(net, batches, loss=loss, backend="func", matrix=m).matmat(V), dtype)
    _e2e_close(got["ggn"] + got["functional"], got["hessian"], dtype)


@needs_cuda
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_cuda_hvp_parts_match_the_cpu_kernel(loss):
    """shortcut_ext.residual_stack_hvp(..., matrix="ggn" | "functional" | "empirical_fisher") on a GPU (one call of
    the CUDA kernel's parts, as the dispatcher records) against the CPU's kernel, with a read-out and, under
    cross-entropy, targets whose rows do not sum to 1."""
    g = torch.Generator().manual_seed(11)
    B, d, q, R, n, K = 40, 6, 4, 5, 2, 3
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    w = 0.4 * torch.randn(R, n, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    v = torch.randn(K, R, n, d, d, generator=g, dtype=torch.float64)
    P = torch.randn(q, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    y = torch.randn(B, q, generator=g, dtype=torch.float64) if loss == "mse" else \
        2 * torch.rand(B, q, generator=g, dtype=torch.float64)
    acts = ("tanh", "relu", "ssigmoid")
    for matrix in ("ggn", "functional", "empirical_fisher"):
        want = torch.ops.shortcut_ext.residual_stack_hvp_part(x, w, y, v, True, *acts, loss, matrix, P)
        with DispatchCalls() as calls:
            got = shortcut_ext.residual_stack_hvp(*(t.to(GPU) for t in (x, w, y, v)), True, *acts, loss=loss,
                                                  backend="fused", readout=P.to(GPU), matrix=matrix)
        assert [c for c in calls.names if c.startswith("shortcut_ext.")] == [
            "shortcut_ext.residual_stack_hvp_part.default"], calls.names
        for name, a, b in zip(("loss", "grad", matrix), got, want):
            assert a.device.type == GPU, name
            torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12, msg=name)


@needs_cuda
def test_cuda_spectrum_command(tmp_path):
    """`shortcut-ext spectrum --device cuda` at the zero point of a linear 2-shortcut net: the Lanczos
    extremes equal the dense spectrum and the closed form, as on the CPU."""
    import json

    from shortcut_ext.cli import main

    rc = main(["spectrum", "--shortcut", "2", "--units", "6", "--width", "3", "--init", "zero", "--data",
               "synthetic", "--samples", "40", "--probes", "3", "--steps", "10", "--top", "4", "--batch-size", "16",
               "--backend", "fused", "--device", GPU, "--no-progress", "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "spectrum.json").read_text())
    assert res["config"]["device"] == GPU and res["backend_used"] == "fused"
    assert res["theory"]["method"] == "closed_form" and res["theory"]["lanczos_rel_error"] < 1e-10
    assert res["lanczos"]["largest"] == pytest.approx(res["exact"]["top"][:4], rel=1e-10)


@needs_cuda
def test_cuda_landscape_command(tmp_path):
    """`shortcut-ext landscape --device cuda` on a plane through a 3-shortcut zero point: the same losses as on
    the CPU to float64 rounding, a flat quadratic model, and Theorem 1's order 3 along both directions."""
    import json

    from shortcut_ext.cli import main

    base = ["landscape", "--shortcut", "3", "--units", "5", "--width", "4", "--init", "zero", "--samples", "40",
            "--plane", "--points", "5", "--order", "--batch-size", "16", "--no-progress", "--no-plots"]
    res = {}
    for dev in ("cpu", GPU):
        assert main(base + ["--device", dev, "--out", str(tmp_path / dev)]) == 0
        res[dev] = json.loads((tmp_path / dev / "landscape.json").read_text())
    g, c = res[GPU], res["cpu"]
    assert g["config"]["device"] == GPU and g["backend_used"] == "fused"
    torch.testing.assert_close(torch.tensor(g["loss"]), torch.tensor(c["loss"]), rtol=1e-12, atol=0)
    assert g["center"] == pytest.approx(c["center"], rel=1e-12)
    assert g["grad_norm"] == 0 and all(v == 0 for row in g["curvature"] for v in row)
    assert [round(o["order"], 1) for o in g["orders"]] == [3.0, 3.0]


@needs_cuda
def test_cuda_landscape_of_a_training_path(tmp_path):
    """`landscape --directions pca --device cuda` around a CPU-trained net: the path's principal directions and
    coordinates, each point's loss and the grid as on the CPU, to float64 rounding."""
    import json

    from shortcut_ext.cli import main

    assert main(["train", "--arch", "2-shortcut", "--act", "tanh-mid", "--depth", "4", "--width", "4", "--samples",
                 "40", "--lr", "0.3", "--epochs", "6", "--save-weights-every", "2", "--no-progress",
                 "--out", str(tmp_path / "run.json")]) == 0
    res = {}
    for dev in ("cpu", GPU):
        assert main(["landscape", "--weights", str(tmp_path / "run.weights.pt"), "--directions", "pca", "--plane",
                     "--points", "5", "--no-progress", "--no-plots", "--device", dev,
                     "--out", str(tmp_path / dev)]) == 0
        res[dev] = json.loads((tmp_path / dev / "landscape.json").read_text())
    g, c = res[GPU], res["cpu"]
    torch.testing.assert_close(torch.tensor([p["coords"] for p in g["path"]]),
                               torch.tensor([p["coords"] for p in c["path"]]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor([p["loss"] for p in g["path"]]),
                               torch.tensor([p["loss"] for p in c["path"]]), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.tensor(g["loss"]), torch.tensor(c["loss"]), rtol=1e-10, atol=0)
    assert g["explained_variance"] == pytest.approx(c["explained_variance"], rel=1e-10)


@needs_cuda
def test_cuda_bench_command(tmp_path, monkeypatch):
    """`shortcut-ext bench --device cuda`: every variant checked against the reference, timed with
    synchronisation, with its peak memory; no recompute row (the CUDA backward always recomputes); --tf32
    reaches the fused kernels (a larger forward error than float32's) and is off afterwards."""
    import json

    from shortcut_ext.cli import main

    monkeypatch.chdir(tmp_path)
    errs = {}
    for tf32 in (None, "tf32", "3xtf32"):
        out = tmp_path / f"b_{tf32}.json"
        rc = main(["bench", "--units", "8", "--width", "16", "--batch", "64", "--repeats", "2", "--directions", "3",
                   "--device", GPU, *(["--tf32", tf32] if tf32 else []), "--out", str(out)])
        assert rc == 0
        doc = json.loads(out.read_text())
        assert doc["complete"] and doc["gemm_gflops"] > 0 and doc["options"]["tf32"] == tf32
        rows = {(r["op"], r["impl"], r["k"]): r for r in doc["rows"]}
        assert ("forward+backward", "fused (recompute)", None) not in rows and ("hvp", "fused", 3) in rows
        # TF32 gradients of a ReLU net: rounding alone moves them by about a percent, a "loose" check
        for r in doc["rows"]:
            assert r["check"] in ("ok", "reference", "loose" if tf32 == "tf32" else "ok"), r
            assert r["peak_mib"] >= 0 and r["median_ms"] > 0, r
        errs[tf32] = rows[("forward", "fused", None)]["max_rel_err"]
        assert shortcut_ext.cuda_tf32.current() == "off"
    assert errs["tf32"] > max(10 * errs[None], 1e-6) and errs["3xtf32"] <= 1e-4, errs


@needs_cuda
def test_cuda_train_command(tmp_path):
    """`shortcut-ext train --device cuda` follows the same run on the CPU."""
    import json

    from shortcut_ext.cli import build_parser

    recs = []
    for device in ("cpu", GPU):
        out = tmp_path / f"{device}.json"
        args = build_parser().parse_args(["train", "--arch", "2-shortcut", "--act", "relu-mid", "--depth", "6", "--epochs",
                                          "15", "--lr", "0.1", "--data", "synthetic", "--width", "5", "--samples", "60",
                                          "--probe-every", "15", "--device", device, "--out", str(out)])
        assert args.func(args) == 0
        recs.append(json.loads(out.read_text()))
    assert recs[1]["device"] == GPU and recs[1]["status"] == "ok"
    assert recs[1]["history"]["loss"] == pytest.approx(recs[0]["history"]["loss"], rel=1e-9)
    assert recs[1]["probes"][-1]["lam_max"] == pytest.approx(recs[0]["probes"][-1]["lam_max"], rel=1e-8)


@needs_cuda
def test_cuda_train_command_tf32(tmp_path):
    """`shortcut-ext train --tf32` trains float32 on TF32 tensor cores: close to, not equal to, float32."""
    import json

    from shortcut_ext.cli import build_parser

    recs = []
    for extra in ([], ["--tf32"]):
        out = tmp_path / f"run{len(recs)}.json"
        args = build_parser().parse_args(["train", "--arch", "2-shortcut", "--act", "relu-mid", "--depth", "6", "--epochs",
                                          "15", "--lr", "0.1", "--data", "synthetic", "--width", "5", "--samples", "60",
                                          "--dtype", "float32", "--device", GPU, *extra, "--out", str(out)])
        assert args.func(args) == 0
        recs.append(json.loads(out.read_text()))
    assert [r["tf32"] for r in recs] == ["off", "tf32"] and recs[1]["status"] == "ok"
    assert recs[1]["history"]["loss"] == pytest.approx(recs[0]["history"]["loss"], rel=1e-2)
    assert recs[1]["history"]["loss"] != recs[0]["history"]["loss"], "--tf32 changed nothing"
    assert shortcut_ext.cuda_tf32.current() == "off"


@needs_cuda
def test_cuda_dense_hessian_matches_cpu():
    """train.dense_hessian (torch.func, the probes' fallback) on a GPU model, fed CPU data."""
    from shortcut_ext.models import ShortcutNet
    from shortcut_ext.train import dense_hessian

    net = ShortcutNet(4, 3, 2, "identity", "tanh", "identity", init="small", scale=0.3, seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    X, Y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)
    want = dense_hessian(net, (X, Y))
    got = dense_hessian(net.to(GPU), (X, Y))
    _e2e_close(got, want, torch.float64)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", HVP_READOUT_CASES, ids=_readout_case_id)
def test_hvp_with_a_readout_matches_reference(case, dtype):
    """residual_stack_hvp(..., readout=P) on a GPU: the loss of f P^T, against the double-backward reference."""
    B, d, R, n, shortcut, acts, target, K, q = case
    x, w, y, v, loss = _hvp_problem(B, d, R, n, K, target, dtype, seed=B + q, q=q)
    P = _hvp_readout(q, d, dtype, seed=B)
    outs = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss, P)
    assert all(o.device == x.device for o in outs)
    _hvp_assert_matches(outs, x, w, y, v, shortcut, acts, loss, readout=P)
    # the public wrapper, and a read-out given as a non-contiguous view
    Pt = P.T.contiguous().T
    outs = shortcut_ext.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss, readout=Pt)
    _hvp_assert_matches(outs, x, w, y, v, shortcut, acts, loss, readout=P)


@needs_cuda
def test_hvp_readout_on_cuda_and_the_operator_runs_it_fused(monkeypatch):
    """The CUDA op checks a read-out as the CPU's does, runs in row chunks with one, and a HessianOperator of a
    CUDA classifier (cross-entropy through a read-out [3, 4]) runs the fused kernel, without a warning, with
    the CPU operator's Hessian."""
    import warnings

    from shortcut_ext.curvature import HessianOperator
    from shortcut_ext.models import ShortcutNet

    x, w = torch.zeros(5, 4, device=GPU), torch.zeros(2, 2, 4, 4, device=GPU)
    y, v = torch.zeros(5, dtype=torch.long, device=GPU), torch.zeros(1, 2, 2, 4, 4, device=GPU)
    for P, exc, msg in ((torch.ones(3, 5, device=GPU), ValueError, r"readout must have shape \[q, d\] = \[q, 4\]"),
                        (torch.ones(3, 4, device=GPU, dtype=torch.float64), TypeError, "readout must have dtype"),
                        (torch.ones(3, 4), ValueError, "readout must be on cuda")):
        with pytest.raises(exc, match=msg):
            torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, "tanh", "tanh", "tanh", "cross_entropy", P)
    with pytest.raises(ValueError, match=r"class-index targets must lie in \[0, q\) = \[0, 3\)"):
        torch.ops.shortcut_ext.residual_stack_hvp(x, w, torch.full((5,), 3, device=GPU), v, True, "tanh", "tanh",
                                                  "tanh", "cross_entropy", torch.ones(3, 4, device=GPU))
    B, d, R, n, shortcut, acts, target, K, q = HVP_READOUT_CASES[0]
    x, w, y, v, loss = _hvp_problem(B, d, R, n, K, target, torch.float64, seed=2, q=q)
    P = _hvp_readout(q, d, torch.float64, seed=2)
    whole = torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, shortcut, *acts, loss, P)
    monkeypatch.setenv("SHORTCUT_EXT_CUDA_HVP_MB", "1")  # 1 row per chunk (see test_hvp_row_chunks)
    xl, wl, yl, vl, _ = _hvp_problem(20, 64, 200, 2, 2, target, torch.float64, seed=3, q=10)
    Pl = _hvp_readout(10, 64, torch.float64, seed=3)
    chunked = torch.ops.shortcut_ext.residual_stack_hvp(xl, wl, yl, vl, True, *acts, loss, Pl)
    monkeypatch.delenv("SHORTCUT_EXT_CUDA_HVP_MB")
    unchunked = torch.ops.shortcut_ext.residual_stack_hvp(xl, wl, yl, vl, True, *acts, loss, Pl)
    for a, b in zip(chunked, unchunked):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    _hvp_assert_matches(whole, x, w, y, v, shortcut, acts, loss, readout=P)
    net = ShortcutNet(4, 2, 2, "tanh", "tanh", "identity", init="xavier", seed=3, dtype=torch.float64, out_features=3)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    want = HessianOperator(net, (X, Y), loss="cross_entropy").to_dense()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = HessianOperator(net.to(GPU), (X, Y), loss="cross_entropy", backend="fused")
    assert op.backend_used == "fused" and op.fallback_reason is None
    _e2e_close(op.to_dense().cpu(), want, torch.float64)