"""The input gradient of a stack with frozen weights: fused (no weight gradients) vs fused with them vs eager.

A stack whose weights do not require grad (input-output Jacobians and signal propagation at
initialisation, adversarial or saliency gradients, a frozen random stack under a trained read-out) needs
dL/dx only.  The fused backward then skips the weight-gradient products (about half its arithmetic).
2-shortcut ReLU (mid), R = 1000, B = 256, 2 threads; forward (saving) + input gradient:

- ``eager``: the pure-PyTorch reference with frozen weights (autograd skips the weight gradients too);
- ``fused_full``: the fused op with weights that require grad (what a frozen stack cost before:
  the weight gradients computed and thrown away), timed for the same input gradient;
- ``fused``: the fused op with frozen weights.

Each variant's input gradient is checked against eager's before timing.  Results:
benchmarks/results/frozen_backward.{csv,json} and a table with the ratios.

    pytest benchmarks/bench_frozen_backward.py --benchmark-columns=median,iqr -s

Run on a quiet machine: two processes timing on the same 2 cores wreck each other's figures.
"""
from __future__ import annotations

import os

import pytest
import torch

from shortcut_ext import reference as ref
from shortcut_ext.ops import residual_stack

from common import write_results

R, B, N = 1000, 256, 2
CASES = [(16, torch.float32), (64, torch.float32), (16, torch.float64), (64, torch.float64)]
ACTS = ("identity", "relu", "identity")
THREADS = int(os.environ.get("SHORTCUT_EXT_BENCH_THREADS", "2"))
ROWS: list[dict] = []
_REF: dict = {}


def _run(impl: str, d: int, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(R, N, d, d, generator=g, dtype=torch.float64) * (0.5 / (d * R) ** 0.5)).to(dtype)
    w.requires_grad_(impl == "fused_full")
    if impl == "eager":
        fn = lambda: ref.residual_stack_forward(x, w, True, *ACTS)  # noqa: E731
    else:
        fn = lambda: residual_stack(x, w, True, *ACTS, backend="fused")  # noqa: E731

    def run():
        return torch.autograd.grad(fn().square().sum(), x)[0]
    return run


@pytest.fixture(scope="module", autouse=True)
def _threads_and_report():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)
    if not ROWS:
        return
    print(f"\n{'case':<20}{'impl':<12}{'median ms':>11}{'x eager':>9}{'x fused_full':>14}")
    for r in ROWS:
        print(f"{r['case']:<20}{r['impl']:<12}{r['median_ms']:>11.2f}{(r['speedup_vs_eager'] or 0):>9.2f}"
              f"{(r['speedup_vs_fused_full'] or 0):>14.2f}")


def _finish_rows():
    for row in ROWS:
        for base_impl in ("eager", "fused_full"):
            base = next((r for r in ROWS if r["case"] == row["case"] and r["impl"] == base_impl), None)
            row[f"speedup_vs_{base_impl}"] = round(base["median_ms"] / row["median_ms"], 2) if base else None
    write_results("frozen_backward", ROWS, {"R": R, "B": B, "n": N, "acts": ACTS})


@pytest.mark.parametrize("impl", ["eager", "fused_full", "fused"])
@pytest.mark.parametrize("d,dtype", CASES, ids=[f"d={d}-{str(t).split('.')[1]}" for d, t in CASES])
def test_frozen_backward(benchmark, d, dtype, impl):
    run = _run(impl, d, dtype)
    got = run()
    key = (d, dtype)
    if key not in _REF:
        _REF[key] = _run("eager", d, dtype)() if impl != "eager" else got
    torch.testing.assert_close(got, _REF[key], **({"rtol": 1e-3, "atol": 1e-5} if dtype == torch.float32 else {}))
    benchmark.pedantic(run, rounds=3 if impl == "eager" else 7, warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: checked, not timed
        return
    ROWS.append({"case": f"d={d} {str(dtype).split('.')[1]}", "impl": impl, "d": d,
                 "dtype": str(dtype).split(".")[1], "median_ms": benchmark.stats.stats.median * 1e3,
                 "iqr_ms": benchmark.stats.stats.iqr * 1e3})
    _finish_rows()  # on disk after every case
