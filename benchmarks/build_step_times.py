"""Times of the fused CPU kernels of one build, to compare builds (not a pytest-benchmark file).

A build's instruction set is fixed when it is compiled, so comparing two (``-march=native`` against
``SHORTCUT_EXT_MARCH=x86-64-v3``, or a tree before and after a kernel change) takes one process per build: build
each in its own copy of the tree, then run this script under each, alternating, e.g.::

    (cd /tmp/avx2 && SHORTCUT_EXT_MARCH=x86-64-v3 python setup.py build_ext --inplace)
    for i in 1 2; do
      PYTHONPATH=/tmp/avx2 python benchmarks/build_step_times.py --out avx2.$i.json
      PYTHONPATH=.         python benchmarks/build_step_times.py --out native.$i.json
    done

A multi-target build (``SHORTCUT_EXT_MARCH=x86-64-v4,x86-64-v3,x86-64``) holds several in one tree: run the
script once per target with ``SHORTCUT_EXT_CPU_VARIANT=<target>`` (only targets this CPU runs).

Rows (2-shortcut nets, the activation between the two layers of each unit, ``--batch`` rows, one thread by
default): ``step``, train()'s one-call MSE step (forward, loss, gradient: ``_C.mse_step``) and ``forward``,
the inference forward, at d = 10 (R = 512), 16 (R = 200) and 64 (R = 12), ReLU and tanh, float32 and float64;
``hvp``, milliseconds per Hessian-vector product at d = 16, R = 128, B = 512, with 1 and 16 directions.
Before it is timed, every case is checked against the pure-PyTorch reference on its first rows (the step's
loss and gradient, the products): a build whose kernels give wrong answers stops the script.  Medians of
``--repeats`` calls after two warm-up calls.  The build (``build_info()``) is printed and saved.
"""
from __future__ import annotations

import argparse
import json

import torch

import common  # benchmarks/common.py
import shortcut_ext as se
from shortcut_ext._build import _C

from shortcut_ext import reference as ref

ACTS = ("identity", "relu", "identity")
STEP_CASES = ((10, 512), (16, 200), (64, 12))  # (d, R) of the step rows
HVP_CASE = (16, 128, 512)  # d, R, B of the HVP rows
CHECK_ROWS = 16  # rows of the correctness checks


def check(name: str, got, want, dtype) -> None:
    """``got`` against the float64 reference ``want``: relative error within the dtype's noise on these nets."""
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for g, w in zip(got, want):
        g, w = torch.as_tensor(g, dtype=torch.float64), torch.as_tensor(w, dtype=torch.float64)
        err = float((g - w).norm() / w.norm().clamp_min(1e-300))
        if not err <= tol:  # nan fails too
            raise AssertionError(f"{name}: the fused result differs from the reference by {err:.3g} (> {tol:g})")


def check_step(x, w, y, act: str, dtype) -> None:
    """_C.mse_step's loss and weight gradient against autograd of the reference, in float64."""
    xs, ys = x[:CHECK_ROWS], y[:CHECK_ROWS]
    L, g = _C.mse_step(xs, w, ys, True, "identity", act, "identity", False)
    w64 = w.double().requires_grad_(True)
    out = ref.residual_stack_forward(xs.double(), w64, True, "identity", act, "identity")
    L64 = 0.5 * (out - ys.double()).square().sum() / xs.shape[0]
    (g64,) = torch.autograd.grad(L64, w64)
    check(f"{str(dtype)[6:]} step d={x.shape[1]} {act}", (L, g), (L64.detach(), g64), dtype)


def check_hvp(x, w, y, v, dtype) -> None:
    got = torch.ops.shortcut_ext.residual_stack_hvp(x[:CHECK_ROWS], w, y[:CHECK_ROWS], v, True, *ACTS, "mse")
    want = ref.residual_stack_hvp(x[:CHECK_ROWS].double(), w.double(), y[:CHECK_ROWS].double(), v.double(), True, *ACTS)
    check(f"{str(dtype)[6:]} hvp k={v.shape[0]}", got, want, dtype)


def median_time(f, repeats: int) -> float:
    return common.median_seconds(f, repeats, warmup=2)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None, help="JSON file for the rows and the build")
    a = p.parse_args(argv)
    if _C is None:
        raise SystemExit("the compiled kernels are not built: " + str(se.build_info().get("error")))
    torch.set_num_threads(a.threads)
    info = se.build_info()
    print("build:", {k: info.get(k) for k in ("cpu_target", "cpu_gemm", "cpu_gemm_float64", "cpu_tanh")}, flush=True)
    rows = []
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        name = str(dtype).replace("torch.", "")
        for d, R in STEP_CASES:
            for act in ("relu", "tanh"):
                net = se.ShortcutNet(d, R, 2, mid=act, init="small", dtype=dtype, seed=0)
                w = net.weight.detach()
                x = torch.randn(a.batch, d, generator=g, dtype=torch.float64).to(dtype)
                y = torch.randn(a.batch, d, generator=g, dtype=torch.float64).to(dtype)
                check_step(x, w, y, act, dtype)
                step = median_time(lambda: _C.mse_step(x, w, y, True, "identity", act, "identity", False), a.repeats)
                fwd = median_time(lambda: torch.ops.shortcut_ext.residual_stack_forward(
                    x, w, True, "identity", act, "identity", False, False), a.repeats)
                flop = 2.0 * a.batch * d * d * 2 * R  # one forward
                rows.append({"dtype": name, "d": d, "R": R, "act": act, "batch": a.batch, "step_ms": step * 1e3,
                             "forward_ms": fwd * 1e3, "step_gflops": 3 * flop / step / 1e9,
                             "forward_gflops": flop / fwd / 1e9})
                print(f"{name:8s} d={d:3d} R={R:4d} {act:5s} step {step * 1e3:8.2f} ms  forward {fwd * 1e3:7.2f} ms",
                      flush=True)
        d, R, B = HVP_CASE
        net = se.ShortcutNet(d, R, 2, mid="relu", init="small", dtype=dtype, seed=0)
        w = net.weight.detach()
        x = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype)
        for k in (1, 16):
            v = torch.randn(k, *w.shape, generator=g, dtype=torch.float64).to(dtype)
            check_hvp(x, w, y, v, dtype)
            t = median_time(lambda: torch.ops.shortcut_ext.residual_stack_hvp(x, w, y, v, True, *ACTS, "mse"),
                            max(3, a.repeats // 2 + 1))
            rows.append({"dtype": name, "d": d, "R": R, "act": "relu", "batch": B, "directions": k,
                         "hvp_ms_per_product": t * 1e3 / k})
            print(f"{name:8s} hvp d={d} R={R} B={B} k={k:2d}: {t * 1e3 / k:7.2f} ms per product", flush=True)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"build": info, "threads": a.threads, "rows": rows}, f, indent=1, default=str)
    return rows


if __name__ == "__main__":
    main()
