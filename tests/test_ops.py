"""The fused residual-stack ops against the pure-PyTorch reference."""
from __future__ import annotations

import itertools
import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import shortcut_ext
from shortcut_ext import reference as ref
from shortcut_ext.ops import residual_stack
from testing import DEVICES, DTYPES, assert_close_lowp, requires_fused, stack_inputs, tol

pytestmark = requires_fused
ACTS = shortcut_ext.ACTIVATIONS


def _outputs(x, w, gy, shortcut, acts, backend, recompute=True):
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    y = residual_stack(x, w, shortcut, *acts, backend=backend, recompute=recompute)
    return (y.detach(),) + torch.autograd.grad(y, (x, w), gy.to(y.dtype))


def _compare(B, d, R, n, shortcut, acts, dtype, device, seed=0, scale=None, recompute=True):
    """Values and gradients of the fused op against the reference: float64 to 1e-10; float32 within
    a small multiple of PyTorch's own float32 error against float64."""
    x, w = stack_inputs(B, d, R, n, dtype, device, scale=scale, seed=seed)
    gy = torch.randn(B, d, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    fused = _outputs(x, w, gy, shortcut, acts, "fused", recompute)
    same = _outputs(x, w, gy, shortcut, acts, "torch")
    if dtype == torch.float64:
        for a, b in zip(fused, same):
            torch.testing.assert_close(a, b, **tol(dtype))
    else:
        exact = _outputs(x.double(), w.double(), gy, shortcut, acts, "torch")
        for a, b, c in zip(fused, same, exact):
            assert a.dtype == torch.float32
            assert_close_lowp(a, b, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,shortcut", [(1, True), (2, True), (3, True), (4, True), (1, False), (5, False)])
@pytest.mark.parametrize("recompute", [True, False])
def test_every_activation_at_every_position(n, shortcut, dtype, device, recompute):
    for i, acts in enumerate(itertools.product(ACTS, repeat=3)):
        _compare(B=7, d=5, R=3, n=n, shortcut=shortcut, acts=acts, dtype=dtype, device=device, seed=i, scale=0.6,
                 recompute=recompute)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,d,R,n",
    [(0, 4, 3, 2), (1, 4, 3, 2), (5, 1, 4, 2), (3, 6, 1, 1), (1, 1, 1, 1), (13, 7, 5, 3), (257, 16, 9, 2),
     (1031, 33, 4, 2), (64, 128, 2, 2), (300, 64, 3, 1)],
)
def test_shapes(B, d, R, n, dtype, device):
    for recompute in (True, False):
        _compare(B, d, R, n, True, ("identity", "relu", "identity"), dtype, device, recompute=recompute)
        _compare(B, d, R, n, False, ("tanh", "ssigmoid", "relu"), dtype, device, scale=1.0 / d ** 0.5,
                 recompute=recompute)


@pytest.mark.parametrize("device", DEVICES)
def test_deep_plain_stack(device):
    """A plain net of depth 300 is one unit of n=300 layers: the backward's per-unit scratch grows with n."""
    _compare(70, 8, 1, 300, False, ("identity", "tanh", "identity"), torch.float64, device, scale=1.1 / 8 ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_thousand_units(device, dtype):
    _compare(96, 16, 1000, 2, True, ("identity", "relu", "identity"), dtype, device)


@pytest.mark.parametrize("layout", ["batch", "feature"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "B,d,R,n,shortcut",
    [(7, 5, 3, 2, True), (1, 3, 2, 1, True), (300, 40, 3, 2, True), (129, 64, 2, 3, False), (33, 17, 4, 4, True),
     (2, 128, 2, 2, True), (64, 48, 3, 3, True)],  # the last: 16-aligned tiles (in-register transposes)
)
def test_cpu_tile_layouts(B, d, R, n, shortcut, dtype, layout, monkeypatch):
    """Both CPU tile layouts (SHORTCUT_EXT_CPU_LAYOUT; the default picks by width) at widths on both
    sides of the default switch and every activation position, from unit inputs (recompute) and from
    every layer's input (several row tiles per slot: test_cpu_tile_layouts_several_tiles_per_slot)."""
    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
    for i, acts in enumerate([("identity", "relu", "identity"), ("tanh", "ssigmoid", "relu"),
                              ("relu", "identity", "tanh"), ("ssigmoid", "tanh", "ssigmoid")]):
        for recompute in (True, False):
            _compare(B, d, R, n, shortcut, acts, dtype, "cpu", seed=i, scale=0.8 / d ** 0.5, recompute=recompute)


@pytest.mark.parametrize("layout", ["batch", "feature"])
@pytest.mark.parametrize("B,d,R,n", [(4096, 16, 40, 2), (2050, 10, 60, 1)])
def test_saves_above_the_cached_store_limit(B, d, R, n, layout, monkeypatch):
    """The forward writes its saves with plain stores up to 8 MB in all (they stay in cache for the backward)
    and with non-temporal stores beyond: both ways, from unit inputs (recompute) and from every layer's input,
    in both tile layouts. float32: the unit inputs here are 10.5 and 4.9 MB, the layer inputs 21 and 4.9 MB."""
    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
    for recompute in (True, False):
        _compare(B, d, R, n, True, ("tanh", "relu", "identity"), torch.float32, "cpu", scale=0.8 / d ** 0.5,
                 recompute=recompute)


def _special_inputs(count, dtype):
    """count values through tanh's every regime: nan, +-inf, +-0, subnormal, tiny, moderate, beyond saturation."""
    tiny = torch.finfo(dtype).tiny
    pool = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, tiny / 4, -tiny, 1e-9, -3e-5, 0.3,
                         -0.7, 1.5, -4.0, 9.5, 20.0, -40.0, 400.0, 9.3e-3], dtype=dtype)
    g = torch.Generator().manual_seed(count)
    return torch.where(torch.rand(count, generator=g) < 0.6, pool[torch.randint(0, len(pool), (count,), generator=g)],
                       torch.randn(count, generator=g, dtype=torch.float64).mul(3).to(dtype))


@requires_fused
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["tanh", "ssigmoid"])
def test_cpu_tanh_matches_torch_at_every_length_and_special_value(act, dtype):
    """The CPU kernels' tanh (SLEEF's vector tanh on AVX-512 builds, 16 floats / 8 doubles at a time, the last ones
    masked, 8 / 4 on AVX2 builds; std::tanh elsewhere) against torch.tanh, element by element, on a one-layer identity stack whose output is
    s(x): every length 1 to 40 (every tail), nan, +-inf, +-0, subnormals, saturation. Its gradient
    (g * s'(x), the tanh recomputed in the backward) against the reference's."""
    scale = 0.5 if act == "ssigmoid" else 1.0
    eps = torch.finfo(dtype).eps
    for count in range(1, 41):
        x = _special_inputs(count, dtype).view(count, 1)
        w = torch.ones(1, 1, 1, 1, dtype=dtype)
        for recompute in (True, False):
            xg = x.clone().requires_grad_(True)
            y = residual_stack(xg, w, False, "identity", "identity", act, backend="fused", recompute=recompute)
            want = torch.tanh(x * scale)
            assert torch.equal(y.isnan(), want.isnan()), (count, x.flatten(), y.flatten())
            ok = ~want.isnan()
            err = (y[ok] - want[ok]).abs() / want[ok].abs().clamp_min(torch.finfo(dtype).tiny)
            assert err.max() <= 2 * eps, (count, err.max().item(), x.flatten(), y.flatten())
            gy = torch.linspace(-1, 1, count, dtype=dtype).view(count, 1)
            (gx,) = torch.autograd.grad(y, xg, gy)
            xr = x.clone().requires_grad_(True)
            (gr,) = torch.autograd.grad(
                residual_stack(xr, w, False, "identity", "identity", act, backend="torch"), xr, gy)
            assert torch.equal(gx.isnan(), gr.isnan()), (count, gx.flatten(), gr.flatten())
            ok = ~gr.isnan()
            torch.testing.assert_close(gx[ok], gr[ok], rtol=8 * eps, atol=4 * eps)


def test_cpu_tanh_is_the_vector_one_where_libtorch_has_it():
    """build_info()["cpu_tanh"]: "sleef" on an AVX-512 or AVX2 build whose libtorch exports SLEEF's tanh for it (the
    x86 wheels do), else "std": a build that dropped the vector path (2-4.6x slower tanh nets at d = 10 to 64) would
    fail here."""
    import ctypes
    import os

    path = shortcut_ext.build_info()["cpu_tanh"]
    isa = shortcut_ext.build_info()["native_isa"]
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    isa = set(isa or ())
    names = (("Sleef_tanhf16_u10", "Sleef_tanhd8_u10") if "avx512f" in isa else
             ("Sleef_tanhf8_u10avx2", "Sleef_tanhd4_u10avx2") if {"avx2", "fma"} <= isa else None)
    exported = names is not None and os.path.exists(lib) and all(hasattr(ctypes.CDLL(lib), f) for f in names)
    if exported:
        assert path == "sleef", path
    else:
        assert path in ("sleef", "std"), path


def test_cpu_tile_layout_bad_value(monkeypatch):
    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", "columns")
    x, w = stack_inputs(4, 3, 2, 2, torch.float64)
    with pytest.raises(ValueError, match="SHORTCUT_EXT_CPU_LAYOUT must be batch, feature or auto.*columns"):
        residual_stack(x, w, backend="fused")


def test_cpu_tile_layouts_agree(monkeypatch):
    x, w = stack_inputs(200, 48, 6, 2, torch.float64, requires_grad=True, scale=0.5 / 48 ** 0.5)
    outs = {}
    for layout in ("batch", "feature"):
        monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
        y = residual_stack(x, w, True, "relu", "tanh", "relu", backend="fused")
        outs[layout] = (y,) + torch.autograd.grad(y.square().sum(), (x, w))
    for a, b in zip(outs["batch"], outs["feature"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["batch", "feature"])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree_and_are_deterministic(threads, layout, monkeypatch):
    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x, w = stack_inputs(333, 12, 20, 2, torch.float32, requires_grad=True)
        outs = []
        for _ in range(2):
            y = residual_stack(x, w, True, "relu", "relu", "identity", backend="fused")
            outs.append((y,) + torch.autograd.grad(y.square().sum(), (x, w)))
        for a, b in zip(*outs):
            assert torch.equal(a, b), "two identical calls gave different bits"
        y_ref = ref.residual_stack_forward(x, w, True, "relu", "relu", "identity")
        torch.testing.assert_close(outs[0][0], y_ref, **tol(torch.float32))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("acts", [("identity", "identity", "identity"), ("tanh", "ssigmoid", "tanh"),
                                  ("relu", "relu", "relu")])
@pytest.mark.parametrize("n,shortcut", [(1, True), (2, True), (3, True), (2, False)])
@pytest.mark.parametrize("recompute", [True, False])
def test_gradcheck(n, shortcut, acts, recompute):
    x, w = stack_inputs(4, 3, 3, n, torch.float64, scale=0.7, seed=3, requires_grad=True)
    f = lambda x, w: residual_stack(x, w, shortcut, *acts, backend="fused", recompute=recompute)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w))


def test_recompute_choice_and_saved_layer_inputs(monkeypatch):
    """recompute=False saves every layer's input [R, n, B, d]: saved[r, 0] the unit input, saved[r, k]
    act_mid(z_{k-1}); the default picks it on CPU within SHORTCUT_EXT_SAVE_LAYERS_MB."""
    from shortcut_ext.ops import _save_layers

    x, w = stack_inputs(6, 4, 3, 3, torch.float64, scale=0.5)
    _, saved = torch.ops.shortcut_ext.residual_stack_forward(x, w, True, "tanh", "relu", "identity", True, True)
    assert saved.shape == (3, 3, 6, 4)
    h = x
    for r in range(3):
        torch.testing.assert_close(saved[r, 0], h, rtol=1e-13, atol=1e-14)
        a = torch.tanh(h)
        for k in range(3):
            z = a @ w[r, k].T
            if k < 2:
                torch.testing.assert_close(saved[r, k + 1], torch.relu(z), rtol=1e-14, atol=1e-14)
            a = torch.relu(z)
        h = h + z
    wide = torch.zeros(2, 2, 32, 32)
    assert _save_layers(torch.zeros(8, 32), wide, None)
    assert _save_layers(torch.zeros(8, 16), torch.zeros(2, 2, 16, 16), False)
    assert not _save_layers(torch.zeros(8, 32, device="meta"), wide.to("meta"), None)  # not CPU
    assert not _save_layers(torch.zeros(8, 32), wide, True)
    monkeypatch.setenv("SHORTCUT_EXT_SAVE_LAYERS_MB", "0.001")  # 1 kB < the 4 kB of layer inputs
    assert not _save_layers(torch.zeros(8, 32), wide, None)
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("SHORTCUT_EXT_SAVE_LAYERS_MB", bad)
        with pytest.raises(ValueError, match=f"SHORTCUT_EXT_SAVE_LAYERS_MB must be a number of megabytes >= 0, got '{bad}'"):
            residual_stack(x, w, backend="fused")
    with pytest.raises(TypeError, match="recompute must be True, False or None, got 'yes'"):
        residual_stack(x, w, backend="fused", recompute="yes")


@pytest.mark.parametrize("d", [4, 40])  # batch-major and feature-major tiles (feature-major saved)
@pytest.mark.parametrize("layers", [False, True])
def test_opcheck(layers, d):
    for shortcut, acts in [(True, ("identity", "relu", "identity")), (False, ("tanh", "tanh", "ssigmoid"))]:
        x, w = stack_inputs(6, d, 3, 2, torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.shortcut_ext.residual_stack_forward.default,
                              (x, w, shortcut, *acts, True, layers))
        _, saved = torch.ops.shortcut_ext.residual_stack_forward(x.detach(), w.detach(), shortcut, *acts, True,
                                                                 layers)
        for grad_weights in (True, False):  # False: frozen weights, an empty second output
            torch.library.opcheck(torch.ops.shortcut_ext.residual_stack_backward.default,
                                  (torch.randn(6, d, dtype=torch.float64), w.detach(), saved, shortcut, *acts,
                                   grad_weights),
                                  test_utils=("test_schema", "test_faketensor"))


def test_saved_inputs_are_the_unit_inputs():
    x, w = stack_inputs(9, 5, 6, 2, torch.float64)
    y, saved = torch.ops.shortcut_ext.residual_stack_forward(x, w, True, "relu", "tanh", "identity", True)
    torch.testing.assert_close(saved, ref.residual_stack_unit_inputs(x, w, True, "relu", "tanh", "identity"))
    _, nothing = torch.ops.shortcut_ext.residual_stack_forward(x, w, True, "relu", "tanh", "identity", False)
    assert nothing.numel() == 0


@pytest.mark.parametrize("layout", ["batch", "feature"])
@pytest.mark.parametrize("layers", [False, True])
@pytest.mark.parametrize("d", [8, 40])
def test_saved_layout_depends_on_the_width_only(d, layers, layout, monkeypatch):
    """The saved activations' strides followed SHORTCUT_EXT_CPU_LAYOUT, which no compiled graph sees: a graph
    compiled in one process (Inductor's cache is on disk) failed its stride assertion ("expected ... stride
    40==1") in a process that set the variable otherwise. Now they follow the width, as the fake kernel says."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
    x, w = stack_inputs(7, d, 3, 2, torch.float64, scale=0.5 / d ** 0.5)
    acts = ("tanh", "relu", "identity")
    with FakeTensorMode() as mode:
        _, fake = torch.ops.shortcut_ext.residual_stack_forward(mode.from_tensor(x), mode.from_tensor(w), True,
                                                                 *acts, True, layers)
    y, real = torch.ops.shortcut_ext.residual_stack_forward(x, w, True, *acts, True, layers)
    assert fake.shape == real.shape and fake.stride() == real.stride()
    assert real.is_contiguous() == (d < 32)
    torch.testing.assert_close(y, ref.residual_stack_forward(x, w, True, *acts), rtol=1e-12, atol=1e-14)
    units = real[:, 0] if layers else real
    torch.testing.assert_close(units, ref.residual_stack_unit_inputs(x, w, True, *acts), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layers", [False, True])
@pytest.mark.parametrize("B", [1, 70])
def test_saved_feature_major(B, layers, monkeypatch):
    """With feature-major tiles the unit inputs (layer inputs) are stored feature-major: strides
    [B*d, 1, B] ([n*d*B, d*B, 1, B]), same values; the backward takes them, or a contiguous copy,
    under either tile layout."""
    d, n, acts = 40, 3, ("tanh", "relu", "ssigmoid")
    x, w = stack_inputs(B, d, 5, n, torch.float64, scale=0.6 / d ** 0.5)
    gy = torch.randn(B, d, dtype=torch.float64)
    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", "feature")
    _, saved = torch.ops.shortcut_ext.residual_stack_forward(x, w, True, *acts, True, layers)
    if layers:
        assert saved.shape == (5, n, B, d) and saved.stride() == (n * d * B, d * B, 1, B)
        torch.testing.assert_close(saved[:, 0], ref.residual_stack_unit_inputs(x, w, True, *acts), rtol=1e-13,
                                   atol=1e-14)
        torch.testing.assert_close(saved[1, 2], torch.relu(torch.relu(torch.tanh(saved[1, 0]) @ w[1, 0].T) @ w[1, 1].T),
                                   rtol=1e-12, atol=1e-14)
    else:
        assert saved.shape == (5, B, d) and saved.stride() == (B * d, 1, B)
        torch.testing.assert_close(saved, ref.residual_stack_unit_inputs(x, w, True, *acts), rtol=1e-13, atol=1e-14)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    expect = torch.autograd.grad(ref.residual_stack_forward(xr, wr, True, *acts), (xr, wr), gy)
    for layout in ("feature", "batch"):
        monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
        for sv in (saved, saved.contiguous()):
            got = torch.ops.shortcut_ext.residual_stack_backward(gy, w, sv, True, *acts)
            for a, b in zip(got, expect):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bad = torch.zeros(5, B, 2 * d, dtype=torch.float64)[..., ::2]
    with pytest.raises(ValueError, match=r"saved must be contiguous \(or feature-major: strides \[B\*d, 1, B\].*got strides"):
        torch.ops.shortcut_ext.residual_stack_backward(gy, w, bad, True, *acts)


def test_output_buffer_cache():
    """Large CPU outputs come from a cache: a repeated call reuses the freed buffers, buffers in use
    are never handed out twice, empty_cache() frees what is cached."""
    x, w = stack_inputs(256, 64, 40, 2, torch.float32, requires_grad=True)  # saved 2.6 MB, grad_w 1.3 MB
    shortcut_ext.empty_cache()

    def step():
        y = residual_stack(x, w, True, "identity", "relu", "identity", backend="fused")
        return (y,) + torch.autograd.grad(y.square().sum(), (x, w))

    first = step()
    before = shortcut_ext.cache_stats()
    assert before["cached_blocks"] >= 1  # the saved inputs went back to the cache
    second = step()  # first's grad_w is alive: second must not share its buffer
    after = shortcut_ext.cache_stats()
    assert after["hits"] > before["hits"]
    assert first[2].data_ptr() != second[2].data_ptr()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    del first, second
    assert shortcut_ext.cache_stats()["cached_bytes"] > 0
    shortcut_ext.empty_cache()
    st = shortcut_ext.cache_stats()
    assert st["cached_bytes"] == 0 and st["cached_blocks"] == 0 and st["limit_bytes"] == 2048 << 20


def test_cached_outputs_have_resizable_storage():
    """Outputs from the cache had storage that could not be resized: FSDP / ZeRO-style code freeing a gradient with
    ``p.grad.untyped_storage().resize_(0)`` failed with "Trying to resize storage that is not resizable"."""
    net = shortcut_ext.ShortcutNet(width=16, units=600, shortcut=2, backend="fused")
    x = torch.randn(64, 16)
    shortcut_ext.empty_cache()
    net(x).square().sum().backward()
    g = net.weight.grad
    assert g.untyped_storage().nbytes() >= 1 << 20  # from the cache
    in_use = shortcut_ext.cache_stats()["in_use_bytes"]
    assert in_use >= g.untyped_storage().nbytes()
    g.untyped_storage().resize_(0)  # frees it: the block goes back to the cache
    assert g.untyped_storage().nbytes() == 0 and shortcut_ext.cache_stats()["in_use_bytes"] < in_use
    x, w = stack_inputs(4096, 64, 2, 2, torch.float64)  # an output of 2 MB; growing works too, keeping the values
    out = residual_stack(x, w, backend="fused")
    keep = out.clone()
    st = out.untyped_storage()
    st.resize_(st.nbytes() * 2)
    assert torch.equal(out, keep)
    out.resize_(3 * 4096, 64)
    assert torch.equal(out[:4096], keep)


@pytest.mark.parametrize("value,ok", [("0", True), ("64", True), ("lots", False), ("-3", False),
                                      # its bytes overflowed int64: the cache went off (2^44) or negative
                                      ("17592186044416", False), ("99999999999999999999", False)])
def test_output_buffer_cache_limit_env(value, ok, tmp_path):
    """SHORTCUT_EXT_CPU_CACHE_MB: 0 disables the cache (results unchanged); a bad value is a clear error."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, shortcut_ext as se; from shortcut_ext import reference as ref\n"
        "x = torch.randn(300, 48, dtype=torch.float64); w = torch.randn(30, 2, 48, 48, dtype=torch.float64) / 60\n"
        "w.requires_grad_(True)\n"
        "for _ in range(2):\n"
        "    y = se.residual_stack(x, w, True, 'identity', 'relu', 'identity', backend='fused')\n"
        "    g = torch.autograd.grad(y.sum(), w)[0]\n"
        "    yr = ref.residual_stack_forward(x, w, True, 'identity', 'relu', 'identity')\n"
        "    torch.testing.assert_close(g, torch.autograd.grad(yr.sum(), w)[0])\n"
        "st = se.cache_stats(); print(st)\n"
        f"assert st['limit_bytes'] == {int(value) if ok else 0} << 20\n"
        f"assert ({value if ok else 1} != 0) or (st['cached_bytes'] == 0 and st['hits'] == 0)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(shortcut_ext.__file__)))
    env = dict(os.environ, SHORTCUT_EXT_CPU_CACHE_MB=value,
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    if ok:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode != 0
        assert "SHORTCUT_EXT_CPU_CACHE_MB must be a whole number of megabytes in [0, 8796093022207] (0 disables " \
               "the cache)" in r.stderr and value in r.stderr


def test_no_grad_saves_nothing_and_matches():
    x, w = stack_inputs(9, 5, 6, 2, torch.float32)
    with torch.no_grad():
        y = residual_stack(x, w, True, "identity", "relu", "identity", backend="fused")
    torch.testing.assert_close(y, ref.residual_stack_forward(x, w, True, "identity", "relu", "identity"),
                               **tol(torch.float32))


def test_double_backward_points_to_hvp():
    x, w = stack_inputs(4, 3, 2, 2, torch.float64, requires_grad=True)
    y = residual_stack(x, w, backend="fused")
    (g,) = torch.autograd.grad(y.square().sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="residual_stack_hvp"):
        torch.autograd.grad(g.sum(), w)


def test_input_derivative_of_the_weight_gradient_raises_not_vanishes():
    """d/dx of dL/dw (J_w^T v with a fixed cotangent, a linear read-out's weight gradient) runs through the
    saved unit inputs alone: it came out as zero with no error; the reference's is not zero."""
    x0, w0 = stack_inputs(5, 4, 3, 2, torch.float64)
    v = torch.randn_like(x0)
    for be in ("torch", "fused"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = residual_stack(x, w, True, "tanh", "tanh", "tanh", backend=be)
        (gw,) = torch.autograd.grad(y, w, v, create_graph=True)
        if be == "torch":
            (h,) = torch.autograd.grad((gw ** 2).sum(), x)
            assert h.norm() > 0.1
        else:
            with pytest.raises(RuntimeError, match="double backward through the fused residual stack"):
                torch.autograd.grad((gw ** 2).sum() + (x ** 2).sum(), x)


@pytest.mark.parametrize("width", [4, 40])  # batch-major tiles; feature-major tiles and saved activations
def test_second_derivatives_through_x_raise_not_vanish(width):
    """Second-order paths through the input (an input Hessian, a Jacobian penalty) run through the saved
    unit inputs, which the graph does not see: they used to come out as zero with no error."""
    x0, w = stack_inputs(3, width, 3, 2, torch.float64)
    acts = (True, "tanh", "tanh", "tanh")
    f = lambda x: residual_stack(x, w, *acts, backend="fused").sum()  # noqa: E731
    assert torch.autograd.functional.hessian(lambda x: residual_stack(x, w, *acts, backend="torch").sum(),
                                             x0).norm() > 0.1  # the reference's is not zero
    with pytest.raises(RuntimeError, match="double backward through the fused residual stack"):
        torch.autograd.functional.hessian(f, x0)
    x, wr = x0.clone().requires_grad_(), w.clone().requires_grad_()
    v = torch.randn_like(x0)
    y = residual_stack(x, wr, *acts, backend="fused")
    (jtv,) = torch.autograd.grad(y, x, v, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through the fused residual stack"):
        torch.autograd.grad((x ** 2).sum() + (jtv ** 2).sum(), x)
    # first-order gradients with create_graph=True are still right, and twice with retain_graph
    y = residual_stack(x, wr, *acts, backend="fused")
    yr = residual_stack(x, wr, *acts, backend="torch")
    for _ in range(2):
        got = torch.autograd.grad(y.sum(), (x, wr), create_graph=True, retain_graph=True)
        want = torch.autograd.grad(yr.sum(), (x, wr), retain_graph=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_export_with_a_dynamic_batch():
    """torch.export with a symbolic batch size: the save-every-layer memory guard was evaluated on it
    and failed the export ("Constraints violated (B)")."""
    from torch.export import Dim, export

    net = shortcut_ext.ShortcutNet(width=4, units=3, mid="relu", init="xavier", backend="fused", dtype=torch.float64)
    ep = export(net, (torch.randn(8, 4, dtype=torch.float64),), dynamic_shapes={"x": {0: Dim("B", min=2)}})
    x = torch.randn(13, 4, dtype=torch.float64)
    torch.testing.assert_close(ep.module()(x), net(x))


@pytest.mark.parametrize("dtype,lo,hi", [(torch.float32, 17, 64), (torch.float32, 2, 16), (torch.float64, 32, 64),
                                         (torch.float64, 2, 31)])
def test_export_with_a_dynamic_width(dtype, lo, hi):
    """torch.export with a symbolic width: the fake kernel chose the saved activations' layout by int(d), which
    specialised the width ("Constraints violated (d)! ... Suggested fixes: d = 40"). A range on one side of the
    switch (17 in float32, 32 in float64) exports and runs at every width in it; one across it (the layout
    changes there) is refused clearly."""
    from torch.export import Dim, export

    class Stack(torch.nn.Module):
        def forward(self, x, w):
            return residual_stack(x, w, True, "identity", "tanh", "identity", backend="fused")

    switch = 32 if dtype == torch.float64 else 17
    d0 = (lo + hi) // 2
    x0, w0 = stack_inputs(5, d0, 3, 2, dtype, requires_grad=True, scale=0.5 / d0 ** 0.5)
    D = Dim("d", min=lo, max=hi)
    ep = export(Stack(), (x0, w0), dynamic_shapes={"x": {1: D}, "w": {2: D, 3: D}})
    for d in (lo, hi):
        x, w = stack_inputs(5, d, 3, 2, dtype, requires_grad=True, scale=0.5 / d ** 0.5, seed=d)
        y = ep.module()(x, w)
        xr, wr = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        yr = ref.residual_stack_forward(xr, wr, True, "identity", "tanh", "identity")
        torch.testing.assert_close(y, yr, **tol(dtype))
        for a, b in zip(torch.autograd.grad(y.square().sum(), (x, w)), torch.autograd.grad(yr.square().sum(), (xr, wr))):
            torch.testing.assert_close(a, b, **tol(dtype))
    if lo >= switch:
        with pytest.raises(Exception, match=rf"(?s){switch} <= L\['x'\]\.size\(\)\[1\].*Dim\('d2', min={switch}"):
            export(Stack(), (x0, w0), dynamic_shapes={"x": {1: Dim("d2", min=8, max=64)},
                                                       "w": {2: Dim("d2", min=8, max=64), 3: Dim("d2", min=8, max=64)}})


@pytest.mark.parametrize("frozen", [False, True])
def test_exported_program_takes_any_strides_and_differentiates(frozen):
    """An exported fused model: inputs of other strides than the example's (the wrapper's .contiguous()
    was dropped from the graph, and the op refused them), and the input gradient of a model exported
    with frozen weights (the graph had save_inputs=False fixed in it). Exported under no_grad it cannot
    be differentiated, and says so."""
    from torch.export import Dim, export

    net = shortcut_ext.ShortcutNet(width=6, units=3, mid="tanh", init="xavier", backend="fused", dtype=torch.float64)
    net.weight.requires_grad_(not frozen)
    ref_net = shortcut_ext.ShortcutNet(width=6, units=3, mid="tanh", backend="torch", dtype=torch.float64)
    ref_net.load_state_dict(net.state_dict())
    ref_net.weight.requires_grad_(not frozen)
    ep = export(net, (torch.randn(7, 6, dtype=torch.float64),), dynamic_shapes={"x": {0: Dim("B", min=2)}})
    for x in (torch.randn(6, 9, dtype=torch.float64).T, torch.randn(1, 6, dtype=torch.float64).expand(5, 6)):
        torch.testing.assert_close(ep.module()(x), ref_net(x), rtol=1e-12, atol=1e-12)
    x = torch.randn(6, 9, dtype=torch.float64).T.requires_grad_()
    m = ep.module()
    got = torch.autograd.grad(m(x).square().sum(), [x] if frozen else [x, m.weight])
    want = torch.autograd.grad(ref_net(x).square().sum(), [x] if frozen else [x, ref_net.weight])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if frozen:
        with torch.no_grad():
            ep0 = export(net, (torch.randn(9, 6, dtype=torch.float64),))
        with pytest.raises(RuntimeError, match=r"exported under torch.no_grad\(\) has it fixed to False"):
            torch.autograd.grad(ep0.module()(x).sum(), x)


@pytest.mark.parametrize("layout", ["batch", "feature"])
@pytest.mark.parametrize("layers", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_without_weight_gradients_gives_the_same_input_gradient(dtype, layers, layout, monkeypatch):
    """grad_weights=False (frozen weights): the CPU kernel skips the weight-gradient products, and grad_x is the
    full backward's, bit for bit (the data gradient runs the same operations in the same order); the second
    output is empty, as the fake kernel says.  Every backward tile variant (batch-major and feature-major
    tiles, the feature-major data gradient below d = 32, recompute and saved layer inputs), several row tiles,
    and at d = 128 more units (70) than one chunk of the weight-gradient slots holds (64)."""
    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
    cases = [(37, 5, 4, 2, True, ("identity", "relu", "identity")), (37, 16, 3, 3, True, ("tanh", "ssigmoid", "relu")),
             (600, 20, 3, 1, True, ("relu", "relu", "tanh")), (37, 40, 2, 2, False, ("ssigmoid", "tanh", "identity")),
             (9, 64, 3, 2, True, ("identity", "relu", "relu")), (8, 128, 70, 2, True, ("identity", "tanh", "identity"))]
    for B, d, R, n, shortcut, acts in cases:
        x, w = stack_inputs(B, d, R, n, dtype, seed=d)
        _, saved = torch.ops.shortcut_ext.residual_stack_forward(x, w, shortcut, *acts, True, layers)
        gy = torch.randn(B, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        gx, gw = torch.ops.shortcut_ext.residual_stack_backward(gy, w, saved, shortcut, *acts)
        gx_only, empty = torch.ops.shortcut_ext.residual_stack_backward(gy, w, saved, shortcut, *acts, False)
        assert gw.shape == w.shape and empty.shape == (0,) and empty.dtype == dtype, (d, empty.shape)
        assert torch.equal(gx_only, gx), (B, d, R, n, layers, (gx_only - gx).abs().max().item())
        # and grad_x is right: against autograd through the reference (float64 reference for float32)
        xr = x.double().requires_grad_()
        want = torch.autograd.grad(ref.residual_stack_forward(xr, w.double(), shortcut, *acts), xr, gy.double())[0]
        torch.testing.assert_close(gx_only.double(), want, **(tol(torch.float64) if dtype == torch.float64
                                                                else dict(rtol=1e-4, atol=1e-5)))


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_weights_input_gradient(dtype, recompute):
    """A stack with frozen weights (requires_grad=False) differentiates through x alone: the fused backward is
    asked for no weight gradients, x.grad equals the reference's (and the trainable stack's bit for bit),
    no weight gradient appears, gradcheck passes on x in float64, and torch.compile (whose fake kernel then
    predicts an empty weight gradient) gives the same input gradient."""
    for width, n, mid in [(6, 2, "relu"), (24, 3, "tanh"), (40, 1, "ssigmoid")]:
        net = shortcut_ext.ShortcutNet(width=width, units=5, shortcut=n, mid=mid, init="xavier", backend="fused",
                                       dtype=dtype)
        ref_net = shortcut_ext.ShortcutNet(width=width, units=5, shortcut=n, mid=mid, backend="torch", dtype=dtype)
        ref_net.load_state_dict(net.state_dict())
        net.recompute = recompute
        x = torch.randn(33, width, dtype=dtype, generator=torch.Generator().manual_seed(width))
        full = torch.autograd.grad(net(x.requires_grad_()).square().sum(), [x, net.weight])[0]
        for m in (net, ref_net):
            m.weight.requires_grad_(False)
        xf = x.detach().requires_grad_()
        net(xf).square().sum().backward()
        assert net.weight.grad is None
        assert torch.equal(xf.grad, full), width
        xr = x.detach().requires_grad_()
        ref_net(xr).square().sum().backward()
        torch.testing.assert_close(xf.grad, xr.grad, **tol(dtype))
        torch._dynamo.reset()  # (each case compiles the same forward anew: no recompile limit across tests)
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
        xc = x.detach().requires_grad_()
        compiled(xc).square().sum().backward()
        torch.testing.assert_close(xc.grad, xf.grad, **tol(dtype))
        torch._dynamo.reset()
    x, w = stack_inputs(4, 3, 3, 2, torch.float64, scale=0.7, seed=3)
    x.requires_grad_()
    f = lambda x: residual_stack(x, w, True, "tanh", "relu", "ssigmoid", backend="fused", recompute=recompute)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("width", [6, 40])  # batch-major tiles; feature-major tiles and saved activations
def test_torch_compile_matches_eager(width, backend):
    net = shortcut_ext.ShortcutNet(width=width, units=4, shortcut=2, mid="relu", init="xavier", backend="fused",
                                   dtype=torch.float64)
    x = torch.randn(10, width, dtype=torch.float64)
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(x), net(x))
    g1 = torch.autograd.grad(compiled(x).sum(), net.weight)[0]
    g2 = torch.autograd.grad(net(x).sum(), net.weight)[0]
    torch.testing.assert_close(g1, g2)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    net = shortcut_ext.ShortcutNet(width=6, units=4, shortcut=2, mid="relu", init="xavier", backend="fused")
    x = torch.randn(10, 6)
    torch.testing.assert_close(torch.compile(net)(x), net(x), **tol(torch.float32))


def test_nan_propagates():
    x, w = stack_inputs(5, 4, 3, 2, torch.float32)
    x[2, 1] = float("nan")
    y = residual_stack(x, w, True, "identity", "tanh", "identity", backend="fused")
    assert torch.isnan(y[2]).any() and torch.isfinite(y[[0, 1, 3, 4]]).all()


@settings(max_examples=40, deadline=None, derandomize=True)  # the same examples every run: CI stays reproducible
@given(
    B=st.integers(0, 40), d=st.integers(1, 9), R=st.integers(1, 6), n=st.integers(1, 4),
    shortcut=st.booleans(), acts=st.tuples(*[st.sampled_from(ACTS)] * 3), transpose=st.booleans(),
    step=st.integers(1, 3), dtype=st.sampled_from(DTYPES), scale=st.floats(0.0, 1.5), seed=st.integers(0, 2**16),
)
def test_fuzz_shapes_strides_values(B, d, R, n, shortcut, acts, transpose, step, dtype, scale, seed):
    """Any strides through the public wrapper (which makes them contiguous for the kernel)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, B * step, generator=g, dtype=dtype) if transpose else torch.randn(B * step, d, generator=g, dtype=dtype)
    x = (base.T if transpose else base)[::step]
    w = torch.randn(R, n, d, d, generator=g, dtype=dtype) * (scale / d ** 0.5)
    w = w.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous weights too
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = residual_stack(x, w, shortcut, *acts, backend="fused")
    y_ref = ref.residual_stack_forward(x, w, shortcut, *acts)
    outs = [(y, y_ref)]
    if B:
        outs += zip(torch.autograd.grad(y.sum(), (x, w)), torch.autograd.grad(y_ref.sum(), (x, w)))
    if dtype == torch.float64:
        for a, b in outs:
            torch.testing.assert_close(a, b, **tol(dtype))
        return
    # float32: within a small multiple of PyTorch's own float32 error against float64 (deep plain
    # stacks at scale 1.5 amplify rounding past any fixed tolerance)
    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    y64 = ref.residual_stack_forward(x64, w64, shortcut, *acts)
    exact = [y64] + (list(torch.autograd.grad(y64.sum(), (x64, w64))) if B else [])
    for (a, b), c in zip(outs, exact):
        assert_close_lowp(a, b, c)


@pytest.mark.parametrize("path", ["portable", "brgemm"])
def test_gemm_paths_match(path, tmp_path):
    """The float32 GEMM paths other than the default, selected by SHORTCUT_EXT_CPU_GEMM in a subprocess:
    the portable loops, and brgemm without the d <= 16 register kernel."""
    import subprocess
    import sys
    import os

    code = (
        "import torch, shortcut_ext as se; from shortcut_ext import reference as ref\n"
        f"assert se.build_info()['cpu_gemm'] == '{path}', se.build_info()\n"
        "for d in (16, 40):  # batch-major and feature-major tiles\n"
        "    x = torch.randn(37, d, requires_grad=True); w = (torch.randn(5, 2, d, d) / d).requires_grad_()\n"
        "    y = se.residual_stack(x, w, True, 'relu', 'tanh', 'identity', backend='fused')\n"
        "    yr = ref.residual_stack_forward(x, w, True, 'relu', 'tanh', 'identity')\n"
        "    torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)\n"
        "    a = torch.autograd.grad(y.sum(), w)[0]; b = torch.autograd.grad(yr.sum(), w)[0]\n"
        "    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)\n"
    )
    import shortcut_ext

    # the subprocess imports the shortcut_ext under test (an in-place build or an installed one)
    root = os.path.dirname(os.path.dirname(os.path.abspath(shortcut_ext.__file__)))
    env = dict(os.environ, SHORTCUT_EXT_CPU_GEMM=path,
               PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def _register_kernel_build() -> bool:
    """A native build for a CPU with AVX-512, or AVX2 and FMA: the register kernels (kernel16, kernel64) are
    compiled in."""
    isa = shortcut_ext.build_info()["native_isa"]
    return isa is not None and ("avx512f" in isa or {"avx2", "fma"} <= set(isa))


def _check_cpu_gemm(dtype, seed=0):
    """The kernels' GEMM routine (_C.cpu_gemm, the path this process selected) against torch.matmul in float64,
    both orientations, written or accumulated, over shapes that reach every register block and tail (rows 1 to
    9 and beyond, columns around multiples of 4, 8, 16 and 32 (the AVX2 and AVX-512 vectors and panels), inner
    sizes 1 to 130), on padded views whose padding
    holds NaN: a read past a row's end would spread NaN into the result, a write past it would overwrite the
    padding."""
    from shortcut_ext._build import _C

    g = torch.Generator().manual_seed(seed)
    eps = torch.finfo(dtype).eps
    routines = set()
    for M in (1, 2, 5, 6, 7, 8, 9, 13, 16, 33):
        for N in (1, 7, 8, 9, 12, 16, 20, 24, 31, 32, 33, 40, 64, 65):
            for K in (1, 3, 16, 37, 130):
                for a_t in (False, True):
                    for acc in (False, True):
                        pad = int(torch.randint(0, 3, (), generator=g))

                        def padded(rows, cols):
                            buf = torch.full((rows, cols + pad), float("nan"), dtype=dtype)
                            view = buf[:, :cols]
                            view.copy_(torch.randn(rows, cols, generator=g, dtype=torch.float64))
                            return buf, view

                        _, a = padded(K, M) if a_t else padded(M, K)
                        _, b = padded(K, N)
                        cbuf, c = padded(M, N)
                        c0 = c.double().clone()
                        routines.add(_C.cpu_gemm(a, b, c, a_t, acc))
                        want = (a.double().T if a_t else a.double()) @ b.double() + (c0 if acc else 0)
                        scale = (a.double().abs().T if a_t else a.double().abs()) @ b.double().abs() + c0.abs()
                        err = ((c.double() - want).abs() / scale.clamp_min(1e-30)).max().item()
                        assert err <= 4 * (K + 1) * eps, (dtype, M, N, K, a_t, acc, pad, err)
                        assert torch.isnan(cbuf[:, N:]).all(), (dtype, M, N, K, a_t, acc, pad)
    return routines  # the routines that ran


_GUARD_PAGE_CODE = r"""
import ctypes, mmap, sys, torch
from shortcut_ext._build import _C
page = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)


def at_page_end(rows, cols, ld, dtype, g):
    # a [rows, cols] row-major view (leading dimension ld) whose last element ends where a PROT_NONE page begins
    n = (rows - 1) * ld + cols
    size = torch.empty((), dtype=dtype).element_size()
    pages = -(-n * size // page)
    buf = mmap.mmap(-1, (pages + 1) * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(base + pages * page), page, 0) == 0, ctypes.get_errno()
    flat = torch.frombuffer(buf, dtype=dtype, count=pages * page // size)[-n:]
    view = flat.as_strided((rows, cols), (ld, 1))
    view.copy_(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return view, buf


g = torch.Generator().manual_seed(0)
keep = []
for dtype in (torch.float32, torch.float64):
    for M, N, K in ((1, 1, 1), (3, 5, 2), (7, 9, 3), (9, 17, 5), (13, 33, 4), (6, 31, 16), (2, 65, 1)):
        for a_t in (False, True):
            for acc in (False, True):
                a, ba = at_page_end(*((K, M) if a_t else (M, K)), (M if a_t else K) + 1, dtype, g)
                b, bb = at_page_end(K, N, N + 1, dtype, g)
                c, bc = at_page_end(M, N, N + 1, dtype, g)
                keep += [ba, bb, bc]
                c0 = c.double().clone()
                _C.cpu_gemm(a, b, c, a_t, acc)
                want = (a.double().T if a_t else a.double()) @ b.double() + (c0 if acc else 0)
                assert torch.allclose(c.double(), want, rtol=1e-4, atol=1e-4), (dtype, M, N, K, a_t, acc)
print("ok")
"""


def test_cpu_gemm_reads_and_writes_nothing_past_its_operands(tmp_path):
    """Every operand of the kernels' GEMM ends where an unreadable page begins (mprotect PROT_NONE), at shapes whose
    last column vector is partial: a load or a store past the last element (an unmasked tail vector) crashes the
    process. A read past the end gives no wrong value in the NaN-padding test (the extra columns are never stored),
    so only this test sees it. In a subprocess, so that a crash fails the test instead of ending pytest."""
    import mmap

    if not hasattr(mmap, "PROT_READ"):
        pytest.skip("no mmap protection flags on this platform")
    r = _run_python(_GUARD_PAGE_CODE, tmp_path)
    assert r.returncode == 0 and r.stdout.split()[-1:] == ["ok"], (r.returncode, r.stdout[-2000:], r.stderr[-2000:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_gemm_matches_matmul(dtype):
    """The GEMM routine of the CPU kernels on its own, this process's path (the default: float64's AVX-512 register
    kernel on AVX-512 builds, float32's brgemm and d <= 16 kernel): the fused ops' tests reach it only at their
    shapes; this reaches every row block, column tail and leading dimension."""
    routines = _check_cpu_gemm(dtype)
    path = shortcut_ext.build_info()["cpu_gemm_float64" if dtype == torch.float64 else "cpu_gemm"]
    # the routines that ran are the ones the build reports (kernel16 takes the transposed products up to 16 x 16)
    assert routines == {"brgemm+kernel16": {"brgemm", "kernel16"}}.get(path, {path}), (path, routines)


def test_cpu_gemm_refuses_bad_arguments():
    from shortcut_ext._build import _C

    a, b, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), torch.empty(3, 5,
                                                                                                       dtype=torch.float64)
    with pytest.raises(ValueError, match="shapes do not chain"):
        _C.cpu_gemm(a, b.T.contiguous(), c)
    with pytest.raises(ValueError, match="b must be row-major"):
        _C.cpu_gemm(a, torch.randn(5, 4, dtype=torch.float64).T, c)
    with pytest.raises(ValueError, match="c must be a 2-D float32 or float64 CPU tensor of c's dtype, got \\[15\\]"):
        _C.cpu_gemm(a, b, c.reshape(-1))
    with pytest.raises(ValueError, match="a must be a 2-D float32 or float64 CPU tensor of c's dtype, got .* Double"):
        _C.cpu_gemm(a, b.float(), c.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefetch_requests_every_line_of_the_panel_once(dtype):
    """The backward's kernels request the next unit's saved panel (and the forward the next weights) while they
    compute, spread over `parts` calls of `steps` steps.  A line left out only costs time, so it is checked here:
    for panels at every offset within a cache line, one row or several, leading dimensions that keep rows in
    step with lines or not, the requests are exactly the lines of each row in turn, and each call asks for its share
    (the last ones for what is left)."""
    from shortcut_ext._build import _C

    esize = torch.empty((), dtype=dtype).element_size()
    buf = torch.zeros(1 << 16, dtype=dtype)
    rng = random.Random(0)
    cases = [(off, rows, cols, ld, parts, steps)
             for off in range(0, 64 // esize + 1, 3) for rows, cols, ld in
             [(1, 1, 1), (1, 16, 16), (1, 333, 333), (3, 16, 16), (4, 7, 16), (5, 16, 40), (64, 128, 256), (2, 1, 1000)]
             for parts, steps in [(1, 1), (1, 128), (4, 16), (6, 256), (3, 1)]]
    cases += [(rng.randrange(64), rng.randint(1, 40), rng.randint(1, 300), 0, rng.randint(1, 8), rng.randint(1, 300))
              for _ in range(300)]
    for off, rows, cols, ld, parts, steps in cases:
        ld = ld or cols + rng.randrange(40)
        view = buf[off:]
        plan = _C.prefetch_plan(view, rows, cols, ld, parts, steps)
        start = view.data_ptr()  # absolute addresses: lines are address // 64
        lines = [(start + o) // 64 for call in plan for o in call]
        rows_lines = [set(range((start + r * ld * esize) // 64, (start + (r * ld + cols) * esize - 1) // 64 + 1))
                      for r in range(rows)]
        assert lines == [line for rl in rows_lines for line in sorted(rl)], (off, rows, cols, ld, parts, steps)
        # a call's share: of the most lines a row can span (one more where rows start at other offsets in a line)
        aligned = rows == 1 or ld * esize % 64 == 0
        row_lines = (start % 64 + cols * esize + 63) // 64 if aligned else (cols * esize + 63) // 64 + 1
        share = -(-rows * row_lines // parts)
        left = len(lines)
        for call in plan:  # each call spends its share, the last ones what is left
            assert len(call) == min(share, left), ([len(c) for c in plan], share)
            left -= len(call)
    assert _C.prefetch_plan(buf, 0, 16, 16, 2, 8) == [[], []]
    with pytest.raises(ValueError, match="parts and steps must be >= 1, got 0 and 8"):
        _C.prefetch_plan(buf, 1, 16, 16, 0, 8)
    with pytest.raises(ValueError, match="x must be float32 or float64, got Int"):
        _C.prefetch_plan(buf.int(), 1, 16, 16, 1, 8)


@pytest.mark.parametrize("env", [None, "auto", "brgemm", "portable"])
def test_float64_gemm_paths_match(env, tmp_path):
    """float64 GEMMs: by default (unset or auto) the AVX-512 register kernel on AVX-512 builds, else the BLAS dgemm
    of libtorch; SHORTCUT_EXT_CPU_GEMM=brgemm (the libraries only) the dgemm, =portable the loops. Both orientations
    (the weight gradients and HVP terms are transposed products). On each path the GEMM routine matches matmul over
    every tail, and forward, backward and HVPs with several directions match the reference to float64 accuracy."""
    import subprocess
    import sys
    import os

    import inspect

    path = {"portable": "portable", "brgemm": "blas"}.get(env, "kernel64" if _register_kernel_build() else "blas")
    code = (
        "import torch, shortcut_ext as se; from shortcut_ext import reference as ref\n"
        + inspect.getsource(_check_cpu_gemm) +
        f"assert se.build_info()['cpu_gemm_float64'] == '{path}', se.build_info()\n"
        f"routines = _check_cpu_gemm(torch.float64); assert routines == {{'{path}'}}, routines\n"
        "torch.manual_seed(0)\n"
        "for d in (5, 16, 40):  # batch-major and feature-major tiles\n"
        "    x = torch.randn(37, d, dtype=torch.float64, requires_grad=True)\n"
        "    w = (torch.randn(5, 2, d, d, dtype=torch.float64) / d).requires_grad_()\n"
        "    y = se.residual_stack(x, w, True, 'relu', 'tanh', 'identity', backend='fused')\n"
        "    yr = ref.residual_stack_forward(x, w, True, 'relu', 'tanh', 'identity')\n"
        "    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-13)\n"
        "    a = torch.autograd.grad(y.square().sum(), (x, w)); b = torch.autograd.grad(yr.square().sum(), (x, w))\n"
        "    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)\n"
        "    t = torch.randn(37, d, dtype=torch.float64); V = torch.randn(3, 5, 2, d, d, dtype=torch.float64)\n"
        "    h = se.residual_stack_hvp(x.detach(), w.detach(), t, V, True, 'relu', 'tanh', 'identity', backend='fused')\n"
        "    hr = ref.residual_stack_hvp(x.detach(), w.detach(), t, V, True, 'relu', 'tanh', 'identity')\n"
        "    torch.testing.assert_close(h, hr, rtol=1e-11, atol=1e-12)\n"
    )
    import shortcut_ext

    root = os.path.dirname(os.path.dirname(os.path.abspath(shortcut_ext.__file__)))
    env_vars = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env_vars.pop("SHORTCUT_EXT_CPU_GEMM", None)
    if env:
        env_vars["SHORTCUT_EXT_CPU_GEMM"] = env
    r = subprocess.run([sys.executable, "-c", code], env=env_vars, capture_output=True, text=True, cwd=tmp_path)
    if path == "blas" and not _libtorch_exports("dgemm_"):
        assert r.returncode != 0 and "'cpu_gemm_float64': 'portable'" in r.stderr, r.stderr
        pytest.skip("this libtorch exports no dgemm_: float64 runs the portable loops")
    assert r.returncode == 0, r.stderr


def _libtorch_exports(symbol: str) -> bool:
    import ctypes
    import glob
    import os

    lib = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.*"))
    return bool(lib) and hasattr(ctypes.CDLL(lib[0]), symbol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_ssigmoid_is_accurate_near_zero(dtype):
    """The ground truth must be right where small-init nets live: 2*sigmoid(z) - 1 loses all digits
    near z = 0 (1e-7 gave 1.19e-7 in float32), tanh(z/2) does not."""
    z = torch.tensor([1e-20, 1e-9, 1e-7, 1e-5, 0.3, -2.0, 30.0], dtype=dtype)
    exact = torch.tanh(z.double() / 2)
    torch.testing.assert_close(ref.activation("ssigmoid", z).double(), exact, rtol=2 * torch.finfo(dtype).eps, atol=0)


@requires_fused
def test_a_forked_child_computes_instead_of_hanging(tmp_path):
    """After the parent ran a fused op on 2 threads, a fork child's first fused op hung for good (libgomp
    cannot restart its pool after fork; multiprocessing's default start method on Linux is fork): the
    child now runs with one thread, and its result equals the parent's one-thread result."""
    import os
    import subprocess
    import sys

    code = """
import os, sys, faulthandler, torch, shortcut_ext as se
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 8, generator=g, dtype=torch.float64)
w = 0.1 * torch.randn(5, 2, 8, 8, generator=g, dtype=torch.float64)
def step():
    ww = w.clone().requires_grad_()
    se.residual_stack(x, ww, True, "identity", "tanh", backend="fused").square().mean().backward()
    return ww.grad
step()
torch.set_num_threads(1); one = step(); torch.set_num_threads(2)
r, wfd = os.pipe()
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(60, exit=True)
    ok = torch.get_num_threads() == 1 and torch.equal(step(), one)
    os.write(wfd, b"1" if ok else b"0"); os._exit(0)
os.close(wfd)
status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print("child", status, os.read(r, 1).decode(), "parent threads", torch.get_num_threads())
"""
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(shortcut_ext.__file__)))  # the package under test
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=pkg_root))
    assert r.stdout.split() == ["child", "0", "1", "parent", "threads", "2"], (r.stdout, r.stderr[-2000:])


# Kernel paths that mutation testing of the C++ CPU kernels (QA 12) found untested: each test below
# fails on a realistic bug that the suite above passed.


def _compare_given(x, w, gy, shortcut, acts, recompute):
    """_compare for given inputs (exact zeros, NaN): the NaN pattern of y, grad_x and grad_w equals the
    reference's, and the other entries agree as _compare asks."""
    fused = _outputs(x, w, gy, shortcut, acts, "fused", recompute)
    same = _outputs(x, w, gy, shortcut, acts, "torch")
    exact = _outputs(x.double(), w.double(), gy, shortcut, acts, "torch")
    for name, a, b, c in zip(("y", "grad_x", "grad_w"), fused, same, exact):
        assert torch.equal(a.isnan(), b.isnan()), \
            f"{name}: NaN at {int(a.isnan().sum())} entries, the reference at {int(b.isnan().sum())}"
        a, b, c = (t.nan_to_num(0.0) for t in (a, b, c))
        if x.dtype == torch.float64:
            torch.testing.assert_close(a, b, **tol(x.dtype), msg=lambda m: f"{name}: {m}")
        else:
            assert_close_lowp(a, b, c)


def _cpu_backward_schedule(B, d, R, n):
    """(row tiles, slots, units per chunk) of the fused CPU backward at the current thread count, from the
    kernels themselves: the tests below assert that their shapes reach the path they are about, so that they
    fail rather than silently stop covering it."""
    from shortcut_ext._build import _C

    s = _C.cpu_schedule("backward", B, d, R, n)
    return s["tiles"], s["slots"], s["chunk_units"]


def test_cpu_schedule_reports_the_kernels_tiles():
    from shortcut_ext._build import _C

    s = _on_threads(2, lambda: _C.cpu_schedule("backward", 5000, 16, 2, 2))
    assert s["tiles"] * s["tile_rows"] >= 5000 > (s["tiles"] - 1) * s["tile_rows"] and 1 <= s["slots"] <= 2
    with pytest.raises(ValueError, match="op must be 'backward' or 'hvp', got 'forward'"):
        _C.cpu_schedule("forward", 5, 4, 1, 1)
    with pytest.raises(ValueError, match="B must be >= 1, got 0"):
        _C.cpu_schedule("hvp", 0, 4, 1, 1)


def _on_threads(threads, f):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return f()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("d", [4, 48])  # batch-major and feature-major tiles
@pytest.mark.parametrize("position", ["pre", "mid", "post"])
def test_nan_propagates_through_relu(position, d, recompute, dtype):
    """test_nan_propagates runs tanh and checks the forward only: a fused ReLU written z > 0 ? z : 0 turns
    NaN into 0 (torch.relu keeps it), which left one NaN in y instead of the row and, with ReLU at pre,
    none in grad_w, and passed. Now the NaN pattern of y, grad_x and grad_w is the reference's, with ReLU
    at each position, both tile layouts, from unit inputs and from every layer's input."""
    acts = tuple("relu" if p == position else "identity" for p in ("pre", "mid", "post"))
    x, w = stack_inputs(32, d, 2, 2, dtype, seed=1)
    x[3, 1] = float("nan")
    gy = torch.randn(32, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _compare_given(x, w, gy, True, acts, recompute)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("d", [4, 48])  # batch-major and feature-major tiles
@pytest.mark.parametrize("position,n", [("post", 1), ("post", 2), ("pre", 1), ("pre", 2), ("mid", 2)])
def test_relu_derivative_at_exact_zero(position, n, d, recompute, dtype):
    """relu'(0) = 0, as autograd's: no fused forward/backward test sent an exact zero into a ReLU, and
    kernels with relu'(0) = 1 (z < 0 ? 0 : g) passed. Exact zeros reach ReLU at post from zero weights
    (the last layer's: at n = 2 the input of the last layer stays nonzero, so its weight gradient shows
    the difference), at mid from a zero first layer, at pre from zeros in x (at zero weights ga = 0
    whatever relu'(0) is, so there the weights stay random)."""
    acts = tuple("relu" if p == position else "identity" for p in ("pre", "mid", "post"))
    x, w = stack_inputs(32, d, 2, n, dtype, seed=3, scale=0.5 / d ** 0.5)  # 16-row tiles at 2 threads: AVX-512 paths
    if position == "post":
        w[:, -1] = 0.0
    elif position == "mid":
        w[:, 0] = 0.0
    else:
        x[::2, ::2] = 0.0
    gy = torch.randn(32, d, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _compare_given(x, w, gy, True, acts, recompute)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("d", [8, 16])
def test_several_row_tiles_per_slot(d, recompute, dtype):
    """A slot's later row tiles add to its weight-gradient buffer. At d < 32 a tile holds up to
    min(16384 / d, 2^18 / (n d)) rows (2048 at d = 8, 1024 at d = 16) and every batch-major test gave
    each slot one tile: a batch-major recompute backward that overwrote instead of adding, and the
    d = 16 float32 register kernel (gemm16_tn) ignoring `accumulate`, both passed. B = 5000 gives 3
    (d = 8) or 5 (d = 16) tiles to 1 slot at 1 thread and to 2 slots at 2 threads."""
    B, R, n = 5000, 2, 2

    def run():
        tiles, slots, _ = _cpu_backward_schedule(B, d, R, n)
        assert tiles > slots, (tiles, slots)  # some slot runs two tiles or more
        _compare(B, d, R, n, True, ("identity", "relu", "identity"), dtype, "cpu", recompute=recompute)

    for threads in (1, 2):
        _on_threads(threads, run)


@pytest.mark.parametrize("recompute", [True, False])
def test_weight_gradients_in_several_unit_chunks(recompute):
    """The backward reduces the slots' weight gradients in chunks of U = 2^21 / (slots n d^2) units
    (64 at d = 128, n = 2 on 1 slot, 32 on 2); every test at d >= 64 had R <= 3, one chunk, and a
    reduction that wrote U units for the last, partial chunk (over units already reduced) passed.
    R = 70 > U, R % U != 0 at 1 and 2 threads."""
    B, d, R, n = 64, 128, 70, 2

    def run():
        _, _, U = _cpu_backward_schedule(B, d, R, n)
        assert R > U and R % U != 0, U
        _compare(B, d, R, n, True, ("identity", "tanh", "identity"), torch.float64, "cpu", recompute=recompute)

    for threads in (1, 2):
        _on_threads(threads, run)


@pytest.mark.parametrize("layout", ["batch", "feature"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_tile_layouts_several_tiles_per_slot(dtype, layout, monkeypatch):
    """test_cpu_tile_layouts gives each slot one row tile ((300, 40) at 2 threads: 150 rows a slot, 409 a
    tile), so neither layout's accumulation over a slot's tiles was compared there. d = 20 and 33 (both
    sides of the default switch) with 3 tiles to 1 slot at 1 thread and to 2 slots at 2 threads."""
    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
    R, n = 3, 2
    for B, d in [(1700, 20), (1031, 33)]:
        def run():
            tiles, slots, _ = _cpu_backward_schedule(B, d, R, n)
            assert tiles > slots, (B, d, tiles, slots)
            for recompute in (True, False):
                _compare(B, d, R, n, True, ("tanh", "ssigmoid", "relu"), dtype, "cpu", scale=0.8 / d ** 0.5,
                         recompute=recompute)

        for threads in (1, 2):
            _on_threads(threads, run)


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_mismatched_dtype_device_and_shortcut_values_are_refused_on_both_backends(backend):
    """Not pinned under backend='torch': x and weights of different dtypes (torch's own RuntimeError deep in a
    matmul) or devices (x on meta, weights on cpu: ran, and returned a meta tensor), and a shortcut that is an
    integer other than 0 / 1 (2, np.int64(5): taken as True) are refused with the op's own errors."""
    import numpy as np

    from shortcut_ext.ops import residual_stack_hvp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w = 0.1 * torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    with pytest.raises(TypeError, match="x and weights must have the same dtype, got x: float32, weights: float64"):
        residual_stack(x.float(), w, backend=backend)
    with pytest.raises(ValueError, match="x and weights must be on the same device, got x: meta, weights: cpu"):
        residual_stack(x.to("meta"), w, backend=backend)
    for bad in (2, np.int64(5), -1):
        with pytest.raises(TypeError, match="shortcut must be True or False, got"):
            residual_stack(x, w, shortcut=bad, backend=backend)
        with pytest.raises(TypeError, match="shortcut must be True or False, got"):
            residual_stack_hvp(x, w, torch.zeros_like(x), w[None].clone(), shortcut=bad, backend=backend)
    for ok in (0, 1, np.int64(1)):  # 0 / 1 still mean False / True
        torch.testing.assert_close(residual_stack(x, w, shortcut=ok, backend=backend),
                                   residual_stack(x, w, shortcut=bool(ok), backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_hvp_directions_of_another_dtype_are_refused_on_both_backends(backend):
    """Not pinned under backend='torch': float32 directions with float64 weights ran (and returned products in
    a mixed precision) instead of the TypeError the fused backend gives."""
    from shortcut_ext.ops import residual_stack_hvp

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    w = 0.1 * torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    D = torch.randn(1, 2, 2, 3, 3, generator=g, dtype=torch.float64)
    with pytest.raises(TypeError, match="directions must have dtype float64 like weights, got float32"):
        residual_stack_hvp(x, w, torch.zeros_like(x), D.float(), backend=backend)
    _, _, hv = residual_stack_hvp(x, w, torch.zeros_like(x), D, backend=backend)
    assert hv.dtype == torch.float64 and hv.shape == D.shape


# Kernel paths that mutation testing of the C++ CPU kernels (QA 14) found untested: each test below
# fails on a realistic one-line bug that the suite above passed.


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_major_weight_gradients_in_several_unit_chunks(dtype, monkeypatch):
    """test_weight_gradients_in_several_unit_chunks runs d = 128 with the default (feature-major) tiles, whose
    slot reduction transposes dW^T back; the batch-major recompute backward reduces its slots elementwise, and a
    reduction that wrote a whole chunk (U units) for the last, partial chunk, over units already reduced, passed.
    SHORTCUT_EXT_CPU_LAYOUT=batch (read at every call), recompute=True: R = 70 > U, R % U != 0 at 1 and 2
    threads (B = 16 keeps it cheap: U depends on the slots, not on B)."""
    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", "batch")
    B, d, R, n = 16, 128, 70, 2

    def run():
        _, _, U = _cpu_backward_schedule(B, d, R, n)
        assert R > U and R % U != 0, U
        _compare(B, d, R, n, True, ("identity", "tanh", "identity"), dtype, "cpu", recompute=True)

    for threads in (1, 2):
        _on_threads(threads, run)


@pytest.mark.parametrize("layout", [None, "batch", "feature"])
@pytest.mark.parametrize("layers", [False, True])
@pytest.mark.parametrize("dtype,d", [(torch.float32, 16), (torch.float32, 17), (torch.float32, 18),
                                     (torch.float32, 31), (torch.float32, 32),
                                     (torch.float64, 16), (torch.float64, 17), (torch.float64, 31),
                                     (torch.float64, 32), (torch.float64, 33)])
def test_saved_layout_switches_exactly_at_its_width(dtype, d, layers, layout, monkeypatch):
    """The saved activations are feature-major from d = 17 on in float32 and from d = 32 on in float64, in the
    C++ forward and in the Python fake kernel alike (_C.cpu_saved_feature_major_from(float64)); the stride tests
    ran d = 8 and 40 only, and a C++ switch at d > 32 (saved batch-major at d = 32 while the fake kernel said
    feature-major) passed. On both sides of each switch (and at float32 d = 31, 32, where the backward's data
    gradient changes layout), under every SHORTCUT_EXT_CPU_LAYOUT: the fake and real strides agree, and the
    backward from them is right."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from shortcut_ext._build import _C

    if layout is None:
        monkeypatch.delenv("SHORTCUT_EXT_CPU_LAYOUT", raising=False)
    else:
        monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
    switch = _C.cpu_saved_feature_major_from(dtype == torch.float64)
    assert switch == (32 if dtype == torch.float64 else 17)
    B, R, n = 7, 3, 2
    x, w = stack_inputs(B, d, R, n, dtype, scale=0.5 / d ** 0.5)
    acts = ("tanh", "relu", "identity")
    with FakeTensorMode() as mode:
        _, fake = torch.ops.shortcut_ext.residual_stack_forward(mode.from_tensor(x), mode.from_tensor(w), True,
                                                                 *acts, True, layers)
    y, real = torch.ops.shortcut_ext.residual_stack_forward(x, w, True, *acts, True, layers)
    assert fake.shape == real.shape and fake.stride() == real.stride(), (d, fake.stride(), real.stride())
    assert real.is_contiguous() == (d < switch), (d, real.stride())
    torch.testing.assert_close(y, ref.residual_stack_forward(x, w, True, *acts), **tol(dtype))
    gy = torch.randn(B, d, generator=torch.Generator().manual_seed(1), dtype=dtype)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    expect = torch.autograd.grad(ref.residual_stack_forward(xr, wr, True, *acts), (xr, wr), gy)
    got = torch.ops.shortcut_ext.residual_stack_backward(gy, w, real, True, *acts)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, **tol(dtype))


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("threads,B", [(3, 4), (4, 5), (4, 6)])
def test_backward_with_fewer_row_tiles_than_threads(threads, B, recompute):
    """At 3-4 threads and a tiny batch there are fewer row tiles (2-row tiles: 2 or 3 of them) than threads; the
    backward must then run no more slots than tiles, since an empty slot's weight-gradient buffer is never
    written (buffers are not zero-filled) and the reduction sums every slot. A schedule of one slot per thread
    passed: at 2 threads there are always 2 tiles, and the only 3-thread test has B = 333. R n d^2 is large
    enough that the work alone would ask for a slot per thread. Repeated calls: fresh memory is often zero."""
    d, R, n = 16, 60, 2
    acts = ("identity", "relu", "identity")

    def run():
        tiles, slots, _ = _cpu_backward_schedule(B, d, R, n)
        assert tiles < threads, (tiles, threads)  # the shape reaches the case it is about
        assert 1 <= slots <= tiles, (tiles, slots)
        for seed in range(3):
            for dtype in DTYPES:
                _compare(B, d, R, n, True, acts, dtype, "cpu", seed=seed, recompute=recompute)

    _on_threads(threads, run)


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("d", [8, 40])  # batch-major and feature-major tiles (and saved activations)
def test_deep_plain_stack_every_backward(d, recompute):
    """test_deep_plain_stack (n = 300 > 64 layers a unit, whose layer pointers go to a heap array) ran
    recompute=True only: the backward from saved layer inputs (recompute=False, what the CPU default picks
    for such a net) writing n pointers into its 64-entry stack array passed. Both tile layouts, both backwards."""
    _compare(70, d, 1, 300, False, ("identity", "tanh", "identity"), torch.float64, "cpu", scale=1.1 / d ** 0.5,
             recompute=recompute)


# CPU GEMM path, tile layout and buffer cache checks that mutation testing of the C++ CPU kernels (QA 14) found
# untested. SHORTCUT_EXT_CPU_GEMM and SHORTCUT_EXT_CPU_CACHE_MB are read once a process (a subprocess each);
# SHORTCUT_EXT_CPU_LAYOUT at every call (monkeypatch).


def _run_python(code, tmp_path, **env_vars):
    """Runs code in a fresh interpreter that imports the shortcut_ext under test; an env value None unsets it."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(shortcut_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    for k, v in env_vars.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


@pytest.mark.parametrize("value", [None, "auto"])
def test_default_cpu_gemm_path(value, tmp_path):
    """SHORTCUT_EXT_CPU_GEMM unset or "auto" (the default) runs brgemm, with the d <= 16 register kernel on AVX-512
    builds. test_gemm_paths_match checks only the non-default paths: a default that silently fell back to the
    portable loops (right values, the slow path) passed, and so did refusing "auto", which the error message itself
    lists as valid."""
    code = (
        "import torch, shortcut_ext as se\n"
        "se.residual_stack(torch.randn(37, 16), torch.randn(3, 2, 16, 16) / 16, backend='fused')  # accepted\n"
        "print(se.build_info()['cpu_gemm'])\n"
    )
    r = _run_python(code, tmp_path, SHORTCUT_EXT_CPU_GEMM=value)
    assert r.returncode == 0, r.stderr
    path = r.stdout.split()[-1]
    if path == "portable":  # the default is portable only where brgemm is compiled out (SHORTCUT_EXT_NO_BRGEMM)
        probe = _run_python("import shortcut_ext as se; print(se.build_info()['cpu_gemm'])", tmp_path,
                            SHORTCUT_EXT_CPU_GEMM="brgemm")
        assert probe.returncode == 0, probe.stderr
        if probe.stdout.split()[-1] == "portable":
            pytest.skip("built with SHORTCUT_EXT_NO_BRGEMM: no brgemm path")
        pytest.fail(f"SHORTCUT_EXT_CPU_GEMM={value!r}: the default path is 'portable' although brgemm is built "
                    f"({probe.stdout.split()[-1]!r} with SHORTCUT_EXT_CPU_GEMM=brgemm)")
    if _register_kernel_build():  # -march=native on AVX-512 or AVX2: the register kernel is compiled in
        assert path == "brgemm+kernel16", (value, path)
    else:
        assert path in ("brgemm", "brgemm+kernel16"), (value, path)


def test_cpu_tile_layout_follows_the_variable(monkeypatch):
    """SHORTCUT_EXT_CPU_LAYOUT=batch / feature selects the tile layout at any width. The layouts give the same
    values, so a "feature" that selected batch-major tiles passed every layout-parametrized test (which then never
    ran the feature-major kernels at d < 32); _C.cpu_tile_layout reports the kernels' choice."""
    from shortcut_ext._build import _C

    widths = (1, 3, 16, 17, 31, 32, 33, 40, 128)
    for layout in ("batch", "feature", "batch"):
        monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", layout)
        assert [_C.cpu_tile_layout(d) for d in widths] == [layout] * len(widths), layout


def test_cpu_tile_layout_auto_is_the_width_default(monkeypatch):
    """SHORTCUT_EXT_CPU_LAYOUT=auto (and empty) is the default: batch-major tiles below d = 17, feature-major from
    there on; a forward that saves nothing (inference) feature-major at every width in float32 and below 16 in
    float64; refusing "auto", which the error message lists as valid, passed every test."""
    from shortcut_ext._build import _C

    assert (_C.cpu_saved_feature_major_from(), _C.cpu_saved_feature_major_from(True)) == (17, 32)
    widths = (1, 8, 15, 16, 17, 31, 32, 33, 128)
    want = ["batch"] * 4 + ["feature"] * 5
    want64 = ["batch"] * 6 + ["feature"] * 3
    want_inference64 = ["feature"] * 3 + ["batch"] * 3 + ["feature"] * 3
    monkeypatch.delenv("SHORTCUT_EXT_CPU_LAYOUT", raising=False)
    assert [_C.cpu_tile_layout(d) for d in widths] == want
    for value in ("auto", ""):
        monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", value)
        assert [_C.cpu_tile_layout(d) for d in widths] == want, value
        assert [_C.cpu_tile_layout(d, float64=True) for d in widths] == want64, value
        assert [_C.cpu_tile_layout(d, saves=False) for d in widths] == ["feature"] * len(widths), value
        assert [_C.cpu_tile_layout(d, saves=False, float64=True) for d in widths] == want_inference64, value
    for value in ("batch", "feature"):  # the variable decides inference tiles too
        monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", value)
        assert {_C.cpu_tile_layout(d, saves=False, float64=f) for d in widths for f in (False, True)} == {value}
    monkeypatch.setenv("SHORTCUT_EXT_CPU_LAYOUT", "auto")
    for d in (8, 40):
        x, w = stack_inputs(9, d, 3, 2, torch.float64, requires_grad=True)
        y = residual_stack(x, w, True, "relu", "tanh", "identity", backend="fused")
        yr = ref.residual_stack_forward(x, w, True, "relu", "tanh", "identity")
        torch.testing.assert_close(y, yr, **tol(torch.float64))
        for a, b in zip(torch.autograd.grad(y.sum(), (x, w)), torch.autograd.grad(yr.sum(), (x, w))):
            torch.testing.assert_close(a, b, **tol(torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 5, 10, 15, 16, 17])
def test_the_inference_forward_takes_feature_major_tiles_and_agrees(d, dtype):
    """A forward that saves nothing runs feature-major tiles at small widths, where the saving one runs
    batch-major (_C.cpu_tile_layout(d, saves=False)): the same function to rounding, at every activation
    position, residual and plain, with batch sizes off the 16-row blocks."""
    from shortcut_ext._build import _C

    inference = _C.cpu_tile_layout(d, saves=False, float64=dtype == torch.float64)
    assert inference == ("batch" if (dtype == torch.float64 and d >= 16) else "feature")
    fwd = torch.ops.shortcut_ext.residual_stack_forward
    for i, (B, acts, shortcut, n) in enumerate([(1, ("identity", "relu", "identity"), True, 2),
                                                (17, ("tanh", "ssigmoid", "relu"), True, 3),
                                                (300, ("relu", "identity", "tanh"), False, 1),
                                                (33, ("ssigmoid", "tanh", "ssigmoid"), True, 1)]):
        x, w = stack_inputs(B, d, 4, n, dtype, scale=0.8 / d ** 0.5, seed=i)
        y0, saved = fwd(x, w, shortcut, *acts, False, False)
        y1, _ = fwd(x, w, shortcut, *acts, True, False)
        yr = ref.residual_stack_forward(x, w, shortcut, *acts)
        assert saved.numel() == 0
        torch.testing.assert_close(y0, yr, **tol(dtype))
        torch.testing.assert_close(y0, y1, **tol(dtype))
        with torch.no_grad():  # the module path under no_grad: the same op without saves
            torch.testing.assert_close(residual_stack(x, w, shortcut, *acts, backend="fused"), y0, rtol=0, atol=0)


def _pooled_unit_inputs(R):
    """The unit inputs [R, 1024, 16] float64 saved by the raw forward: R * 128 KiB from the CPU buffer cache."""
    x = torch.randn(1024, 16, dtype=torch.float64)
    w = torch.randn(R, 1, 16, 16, dtype=torch.float64) / 16
    return torch.ops.shortcut_ext.residual_stack_forward(x, w, True, "identity", "identity", "identity", True,
                                                         False)[1]


def test_output_buffer_cache_counts_only_the_blocks_it_holds():
    """A cache hit takes its block out of cached_bytes: test_output_buffer_cache checked hits and the state after
    empty_cache() only, and cached_bytes still counting a taken block (2 MB cached with no block cached; the limit
    then evicts early) passed. Blocks of 2 MB and 4 MB (3 MB rounded up to 2 MB pages)."""
    import gc

    if shortcut_ext.cache_stats()["limit_bytes"] < 16 << 20:
        pytest.skip("SHORTCUT_EXT_CPU_CACHE_MB is below 16 in this process")
    gc.collect()
    shortcut_ext.empty_cache()
    try:
        a, b = _pooled_unit_inputs(16), _pooled_unit_inputs(24)
        del a, b
        st = shortcut_ext.cache_stats()
        assert (st["cached_blocks"], st["cached_bytes"]) == (2, 6 << 20), st
        hits = st["hits"]
        c = _pooled_unit_inputs(16)  # takes the 2 MB block, the smallest that fits
        st = shortcut_ext.cache_stats()
        assert st["hits"] == hits + 1, st
        assert (st["cached_blocks"], st["cached_bytes"]) == (1, 4 << 20), st
        del c
        st = shortcut_ext.cache_stats()
        assert (st["cached_blocks"], st["cached_bytes"]) == (2, 6 << 20), st
    finally:
        shortcut_ext.empty_cache()


def test_output_buffer_cache_evicts_until_under_its_limit(tmp_path):
    """SHORTCUT_EXT_CPU_CACHE_MB=4 (read once a process: a subprocess): blocks of 2, 2 and 8 MB come back; the
    third puts the cache at 12 MB and every block must go to get under 4 MB. The limit test's 64 MB is never
    reached and its "0" evicts a single block, so an eviction of one block a return (10 MB cached) passed."""
    code = (
        "import torch, shortcut_ext as se\n"
        "def saved(R):\n"
        "    x = torch.randn(1024, 16, dtype=torch.float64); w = torch.randn(R, 1, 16, 16, dtype=torch.float64) / 16\n"
        "    return torch.ops.shortcut_ext.residual_stack_forward(x, w, True, 'identity', 'identity', 'identity',\n"
        "                                                         True, False)[1]\n"
        "a, b, c = saved(16), saved(16), saved(64)\n"
        "st = se.cache_stats(); assert st['in_use_blocks'] == 3 and st['in_use_bytes'] == 12 << 20, st\n"
        "del a, b\n"
        "st = se.cache_stats(); assert (st['cached_blocks'], st['cached_bytes']) == (2, 4 << 20), st\n"
        "del c\n"
        "st = se.cache_stats(); print(st)\n"
        "assert st['limit_bytes'] == 4 << 20, st\n"
        "assert (st['cached_blocks'], st['cached_bytes'], st['in_use_bytes']) == (0, 0, 0), st\n"
    )
    r = _run_python(code, tmp_path, SHORTCUT_EXT_CPU_CACHE_MB="4")
    assert r.returncode == 0, r.stderr


def _float64_bit_cases() -> dict:
    """float64 outputs of the fused CPU kernels on fixed inputs: forward, both gradients and HVPs (loss, gradient,
    3 products), ReLU, identity and tanh between the layers, d = 5, 10, 16, 40 and 64 (batch-major and
    feature-major tiles, every register block and tail)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for act in ("relu", "identity", "tanh"):
        for d in (5, 10, 16, 40, 64):
            x = torch.randn(300, d, generator=g, dtype=torch.float64).requires_grad_(True)
            w = (torch.randn(20, 2, d, d, generator=g, dtype=torch.float64) * 0.5 / d ** 0.5).requires_grad_(True)
            y = residual_stack(x, w, True, "identity", act, "identity", backend="fused")
            gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
            t = torch.randn(300, d, generator=g, dtype=torch.float64)
            V = torch.randn(3, 20, 2, d, d, generator=g, dtype=torch.float64)
            h = shortcut_ext.residual_stack_hvp(x.detach(), w.detach(), t, V, True, "identity", act, "identity",
                                                backend="fused")
            for name, v in zip(("y", "grad_x", "grad_w", "loss", "grad", "hvp"), (y.detach(), gx, gw, *h)):
                out[f"{act} d={d} {name}"] = v
    return out


@pytest.mark.skipif(not os.environ.get("SHORTCUT_EXT_BITS_FILE"),
                    reason="compares two builds: SHORTCUT_EXT_BITS_FILE names the file the first one writes")
def test_float64_bits_match_another_build():
    """The float64 register kernels sum every product in order, with the same FMAs on AVX-512 and on AVX2, and the
    reductions across threads run in a fixed order: a native AVX-512 build and an x86-64-v3 build give the same
    bits (forward, gradients, HVPs; tanh too where both use SLEEF's). The first build run with
    SHORTCUT_EXT_BITS_FILE set writes its results there, the second compares (.ci/run does both)."""
    path = os.environ["SHORTCUT_EXT_BITS_FILE"]
    info = shortcut_ext.build_info()
    if info.get("cpu_gemm_float64") != "kernel64":
        pytest.skip(f"the float64 GEMMs are {info.get('cpu_gemm_float64')!r}, not the register kernel")
    mine = {"threads": torch.get_num_threads(), "cpu_tanh": info["cpu_tanh"], "target": info.get("cpu_target"),
            "results": _float64_bit_cases()}
    if not os.path.exists(path):
        torch.save(mine, path)
        return
    theirs = torch.load(path)
    if theirs["threads"] != mine["threads"]:
        pytest.skip(f"the other build ran with {theirs['threads']} threads, this one with {mine['threads']}")
    same_tanh = theirs["cpu_tanh"] == mine["cpu_tanh"]
    keys = [k for k in mine["results"] if same_tanh or not k.startswith("tanh")]
    differ = [k for k in keys if not torch.equal(mine["results"][k], theirs["results"][k])]
    assert not differ, (f"{len(differ)} of {len(keys)} float64 results differ between the build for "
                        f"{theirs['target']!r} and this one for {mine['target']!r}: {differ[:8]}")
