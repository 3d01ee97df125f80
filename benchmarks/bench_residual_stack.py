"""Fused residual stack vs eager PyTorch vs torch.compile on CPU.

2-shortcut ReLU (mid), R=1000 units, B=256, d in {16, 24, 64, 128}, float32, 2 threads; forward and
forward+backward.  Each run also measures one large 4096x4096 matmul and reports every variant's
GFLOP/s and its fraction of that rate.  Results: benchmarks/results/residual_stack.{csv,json} (a run of
only some cases, with -k: residual_stack_partial.{csv,json}) and a table printed at the end.

    pytest benchmarks/bench_residual_stack.py --benchmark-columns=median,iqr -s
    SHORTCUT_EXT_BENCH_COMPILE=0 ...   # skip torch.compile (cold compiles take minutes)

Run on a quiet machine: two processes timing on the same 2 cores wreck each other's figures.
"""
from __future__ import annotations

import os
import sys
import time

import pytest
import torch

from shortcut_ext import reference as ref
from shortcut_ext.ops import residual_stack

from common import gemm_rate, write_results

R, B, N = 1000, 256, 2
WIDTHS = [16, 24, 64, 128]
ACTS = ("identity", "relu", "identity")
THREADS = int(os.environ.get("SHORTCUT_EXT_BENCH_THREADS", "2"))
COMPILE = os.environ.get("SHORTCUT_EXT_BENCH_COMPILE", "1") != "0"
ROWS: list[dict] = []
_RATE: list[float] = []
_CACHE: dict = {}


def flops(d: int, mode: str) -> float:
    fwd = 2.0 * B * R * N * d * d
    return fwd if mode == "forward" else 3.0 * fwd  # backward = data + weight gradients


def _inputs(d):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g)
    w = torch.randn(R, N, d, d, generator=g) * (0.5 / (d * R) ** 0.5)
    return x, w


def _make(impl: str, d: int, mode: str):
    x, w = _inputs(d)
    if impl == "fused":  # default memory policy: saves every layer's input here (262 MB at d = 128)
        fn = lambda x, w: residual_stack(x, w, True, *ACTS, backend="fused")  # noqa: E731
    elif impl == "fused_recompute":  # saves unit inputs only, recomputes in the backward
        fn = lambda x, w: residual_stack(x, w, True, *ACTS, backend="fused", recompute=True)  # noqa: E731
    elif impl == "eager":
        fn = lambda x, w: ref.residual_stack_forward(x, w, True, *ACTS)  # noqa: E731
    else:
        # inductor walks the 1000-unit backward graph recursively (torch 2.13: RecursionError at
        # Python's default limit of 1000)
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
        # a static graph per case: the cases share this lambda's code object, so without the reset a second
        # width recompiles with d symbolic (automatic dynamic shapes) and the next reuses that graph, and the
        # figures would depend on which cases ran before
        torch._dynamo.reset()
        fn = torch.compile(lambda x, w: ref.residual_stack_forward(x, w, True, *ACTS), dynamic=False)
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(x, w)
    else:
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

        def run():
            y = fn(xg, wg)
            return (y,) + torch.autograd.grad(y.square().sum(), (xg, wg))
    return run


_FULL = {(f"d={d} {m}", i) for d in WIDTHS for m in ("forward", "forward_backward")
         for i in ("eager", "fused", "fused_recompute", "compile") if not (i == "fused_recompute" and m == "forward")}


def _finish_rows(rate):
    for row in ROWS:
        row["gemm4096_gflops"] = round(rate, 1)
        row["fraction_of_gemm"] = round(row["gflops"] / rate, 3)
        base = next((r for r in ROWS if r["case"] == row["case"] and r["impl"] == "eager"), None)
        ok = base and row["median_ms"] == row["median_ms"]
        row["speedup_vs_eager"] = round(base["median_ms"] / row["median_ms"], 2) if ok else None
    # a run of some of the cases (-k) must not replace the complete table: it gets a file of its own
    complete = _FULL <= {(r["case"], r["impl"]) for r in ROWS}
    paths = write_results("residual_stack" if complete else "residual_stack_partial", ROWS,
                          {"gemm4096_gflops": rate, "R": R, "B": B, "n": N, "acts": ACTS})
    if complete and paths:  # the partial files this run wrote case by case until now are superseded
        for ext in ("csv", "json"):
            stale = os.path.join(os.path.dirname(paths[0]), f"residual_stack_partial.{ext}")
            if os.path.exists(stale):
                os.remove(stale)


@pytest.fixture(scope="module", autouse=True)
def _threads_and_report():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    _RATE.append(gemm_rate())
    yield
    rate = _RATE[0]
    if not ROWS:  # nothing measured (all deselected or failed): keep the last results on disk
        torch.set_num_threads(old)
        return
    _finish_rows(rate)
    print(f"\n4096x4096 float32 matmul: {rate:.0f} GFLOP/s ({THREADS} threads)")
    print(f"{'case':<18}{'impl':<16}{'median ms':>11}{'GFLOP/s':>9}{'of GEMM':>9}{'x eager':>9}{'compile s':>11}")
    for r in ROWS:
        print(f"{r['case']:<18}{r['impl']:<16}{r['median_ms']:>11.2f}{r['gflops']:>9.1f}{r['fraction_of_gemm']:>9.2f}"
              f"{(r['speedup_vs_eager'] or 0):>9.2f}{r.get('compile_s', ''):>11}")
    torch.set_num_threads(old)


@pytest.mark.parametrize("impl", ["eager", "fused", "fused_recompute", "compile"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("d", WIDTHS)
def test_residual_stack(benchmark, d, mode, impl):
    if impl == "compile" and not COMPILE:
        pytest.skip("SHORTCUT_EXT_BENCH_COMPILE=0")
    if impl == "fused_recompute" and mode == "forward":
        pytest.skip("the forward without grad saves nothing: same as fused")
    run = _make(impl, d, mode)
    t0 = time.perf_counter()
    try:
        out = run()  # first call: compiles for impl == "compile"
    except Exception as e:  # noqa: BLE001 - a baseline that cannot be built is a result, not a crash
        if impl != "compile":
            raise
        ROWS.append({"case": f"d={d} {mode}", "impl": impl, "d": d, "mode": mode, "median_ms": float("nan"),
                     "iqr_ms": float("nan"), "gflops": float("nan"),
                     "compile_s": f"failed: {type(e).__name__}"[:40]})
        pytest.skip(f"torch.compile failed after {time.perf_counter() - t0:.0f} s: {type(e).__name__}: {str(e)[:200]}")
    first_s = time.perf_counter() - t0
    # check before timing: every variant agrees with eager (computed here when eager was deselected)
    key = (d, mode)
    if impl == "eager":
        _CACHE[key] = [o.detach() for o in (out if isinstance(out, tuple) else (out,))]
    else:
        if key not in _CACHE:
            ref_out = _make("eager", d, mode)()
            _CACHE[key] = [o.detach() for o in (ref_out if isinstance(ref_out, tuple) else (ref_out,))]
        got = out if isinstance(out, tuple) else (out,)
        for a, b in zip(got, _CACHE[key]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    rounds = 3 if impl == "eager" else 7
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the variants ran once and agreed; nothing timed
        return
    med = benchmark.stats.stats.median
    row = {"case": f"d={d} {mode}", "impl": impl, "d": d, "mode": mode, "median_ms": med * 1e3,
           "iqr_ms": benchmark.stats.stats.iqr * 1e3, "gflops": flops(d, mode) / med / 1e9}
    if impl == "compile":
        row["compile_s"] = round(first_s, 1)
    ROWS.append(row)
    _finish_rows(_RATE[0])  # results on disk after every case: an interrupted run keeps them
