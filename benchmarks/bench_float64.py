"""float64, the dtype of the commands' curvature work: fused vs eager PyTorch on CPU.

2-shortcut ReLU (mid), R = 300 units, B = 256, d in {10, 64}, float64, 2 threads: forward (no grad),
forward+backward, and Hessian-vector products with k = 1 and k = 4 directions (eager: double backward, one
graph, then one ``grad`` call per direction; times per product).  Every fused variant is checked against
eager before it is timed.  The results record which float64 GEMM ran (``build_info()["cpu_gemm_float64"]``):
the AVX-512 register kernel by default on AVX-512 builds; run again with ``SHORTCUT_EXT_CPU_GEMM=brgemm`` for
the BLAS ``dgemm`` that libtorch carries (the variable is read once a process).  Results:
benchmarks/results/float64.{csv,json} (``SHORTCUT_EXT_CPU_GEMM=brgemm``: float64_blas.{csv,json}).

    pytest benchmarks/bench_float64.py --benchmark-columns=median,iqr -s
    SHORTCUT_EXT_CPU_GEMM=brgemm pytest benchmarks/bench_float64.py -s

Run on a quiet machine: two processes timing on the same 2 cores wreck each other's figures.
"""
from __future__ import annotations

import os

import pytest
import torch

import shortcut_ext
from shortcut_ext import reference as ref
from shortcut_ext.ops import residual_stack, residual_stack_hvp

from common import write_results

R, B, N = 300, 256, 2
WIDTHS = [10, 64]
MODES = ["forward", "forward_backward", "hvp_k1", "hvp_k4"]
ACTS = ("identity", "relu", "identity")
THREADS = int(os.environ.get("SHORTCUT_EXT_BENCH_THREADS", "2"))
ROWS: list[dict] = []
_CACHE: dict = {}


def directions(mode: str) -> int:
    """The HVPs one call computes (1 for the forward modes)."""
    return int(mode.split("_k")[1]) if mode.startswith("hvp") else 1


def inputs(d: int, mode: str, units: int = R, batch: int = B):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d, generator=g, dtype=torch.float64)
    w = torch.randn(units, N, d, d, generator=g, dtype=torch.float64) * (0.5 / (d * units) ** 0.5)
    y = torch.randn(batch, d, generator=g, dtype=torch.float64)
    V = torch.randn(directions(mode), units, N, d, d, generator=g, dtype=torch.float64)
    return x, w, y, V


def make(impl: str, d: int, mode: str, units: int = R, batch: int = B):
    """A call of ``impl`` ("eager" or "fused") for ``mode``, returning its outputs as a tuple."""
    x, w, y, V = inputs(d, mode, units, batch)
    backend = "fused" if impl == "fused" else "torch"
    if mode == "forward":
        def run():
            with torch.no_grad():
                return (residual_stack(x, w, True, *ACTS, backend=backend),)
    elif mode == "forward_backward":
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

        def run():
            out = residual_stack(xg, wg, True, *ACTS, backend=backend)
            return (out,) + torch.autograd.grad(out.square().sum(), (xg, wg))
    elif impl == "fused":
        def run():
            return tuple(residual_stack_hvp(x, w, y, V, True, *ACTS, loss="mse", backend="fused"))
    else:  # double backward, as PyHessian: one graph, then one grad call per direction
        def run():
            wg = w.clone().requires_grad_(True)
            loss = ref.loss_fn("mse", ref.residual_stack_forward(x, wg, True, *ACTS), y)
            (grad,) = torch.autograd.grad(loss, wg, create_graph=True)
            hv = [torch.autograd.grad(grad, wg, v, retain_graph=True)[0] for v in V]
            return loss.detach(), grad.detach(), torch.stack(hv)
    return run


def finish_rows(rows: list[dict]) -> None:
    """Per-product medians and speedups over eager (same case), in place."""
    for row in rows:
        row["per_product_ms"] = row["median_ms"] / directions(row["mode"])
    for row in rows:
        base = next((r for r in rows if r["case"] == row["case"] and r["impl"] == "eager"), None)
        row["speedup_vs_eager"] = round(base["per_product_ms"] / row["per_product_ms"], 2) if base else None
        # HVPs: against eager with one direction, the baseline the HVP targets use
        one = next((r for r in rows if r["d"] == row["d"] and r["mode"] == "hvp_k1" and r["impl"] == "eager"), None)
        if row["mode"].startswith("hvp") and one:
            row["speedup_vs_eager_k1"] = round(one["per_product_ms"] / row["per_product_ms"], 2)


def _results_name() -> str:
    return "float64" if shortcut_ext.build_info()["cpu_gemm_float64"] != "blas" else "float64_blas"


@pytest.fixture(scope="module", autouse=True)
def _threads_and_report():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    if ROWS:
        path = shortcut_ext.build_info()["cpu_gemm_float64"]
        print(f"\nfloat64 GEMM: {path} ({THREADS} threads); R = {R}, B = {B}")
        print(f"{'case':<22}{'impl':<8}{'median ms':>11}{'per product':>13}{'x eager':>9}{'x eager k=1':>13}")
        def num(v):
            return "-" if v is None else f"{v:.2f}"

        for r in ROWS:
            print(f"{r['case']:<22}{r['impl']:<8}{r['median_ms']:>11.2f}{r['per_product_ms']:>13.2f}"
                  f"{num(r['speedup_vs_eager']):>9}{num(r.get('speedup_vs_eager_k1')):>13}")
    torch.set_num_threads(old)


@pytest.mark.parametrize("impl", ["eager", "fused"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("d", WIDTHS)
def test_float64(benchmark, d, mode, impl):
    if impl == "fused" and not shortcut_ext.is_built():
        pytest.skip("shortcut_ext._C is not built")
    run = make(impl, d, mode)
    out = run()
    key = (d, mode)
    if impl == "eager":
        _CACHE[key] = [o.detach() for o in out]
    else:  # checked before it is timed
        want = _CACHE.get(key) or [o.detach() for o in make("eager", d, mode)()]
        for a, b in zip(out, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    benchmark.pedantic(run, rounds=3 if impl == "eager" else 7, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: checked, not timed
        return
    s = benchmark.stats.stats
    ROWS.append({"case": f"d={d} {mode}", "impl": impl, "d": d, "mode": mode, "median_ms": s.median * 1e3,
                 "iqr_ms": s.iqr * 1e3, "float64_gemm": shortcut_ext.build_info()["cpu_gemm_float64"]})
    finish_rows(ROWS)
    write_results(_results_name(), ROWS, {"R": R, "B": B, "n": N, "acts": ACTS})  # after every case
