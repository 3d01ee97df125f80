"""How close the fused CPU stack can come to the large-GEMM rate: the ceiling of its small GEMMs.

The foundation issue asks the fused forward+backward at d >= 64 to reach the GFLOP/s of one
4096 x 4096 ``torch.matmul``.  Every GEMM of the fused stack is a small oneDNN brgemm call
(``at::native::cpublas::brgemm``, the routine the kernels use); this script measures, on this machine:

- the 4096^2 matmul rate with 1 and with 2 threads;
- each small GEMM shape of the R = 1000, B = 256 benchmark (2 threads: 128-row tiles) on one thread,
  hot in cache, called back to back: the best the fused kernels could do with zero other work;
- the fused ops themselves on one thread (forward without saving, forward saving every layer's
  input, the backward from those), in GFLOP/s.

    python benchmarks/bench_gemm_ceiling.py [--out benchmarks/results/gemm_ceiling.json]

The microkernel is compiled with ``torch.utils.cpp_extension.load_inline`` (about a minute the first
time).  Run on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
from torch.utils.cpp_extension import load_inline

import common  # benchmarks/common.py
import shortcut_ext  # noqa: F401  (registers the ops)
from shortcut_ext import reference as ref
from shortcut_ext._cli_args import positive_int
from shortcut_ext.experiments.store import json_safe

from common import environment, gemm_rate

_SRC = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <chrono>
#include <vector>
// GFLOP/s of C[M, N] (+)= A[M, K] @ B[K, N] (leading dimensions lda, ldb, ldc), hot in cache.
double brgemm_rate(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool acc, int64_t reps) {
  std::vector<float> A(M * lda + 64, 0.5f), B(K * ldb + 64, 0.25f), C(M * ldc + 64, 0.f);
  for (int i = 0; i < 100; ++i)
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, acc, A.data(), B.data(), C.data(), false);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < reps; ++i)
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, acc, A.data(), B.data(), C.data(), false);
  const auto t1 = std::chrono::steady_clock::now();
  at::native::cpublas::brgemm_release(false);
  return 2.0 * M * N * K * reps / std::chrono::duration<double>(t1 - t0).count() / 1e9;
}
"""


def _median_s(fn, reps: int) -> float:
    return common.median_seconds(fn, reps, warmup=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gemm_ceiling.json"))
    p.add_argument("--units", type=positive_int, default=1000)
    args = p.parse_args()
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    if os.path.isdir(args.out) or args.out.endswith(os.sep) or not os.access(folder, os.W_OK):
        p.error(f"--out {args.out} must name a file in a writable folder")  # before minutes of work
    old = torch.get_num_threads()
    out: dict = {"environment": environment()}
    out["gemm4096_gflops"] = {}
    for th in (1, 2):
        torch.set_num_threads(th)
        out["gemm4096_gflops"][th] = round(gemm_rate(), 1)
        print(f"4096^2 matmul, {th} thread(s): {out['gemm4096_gflops'][th]:.0f} GFLOP/s", flush=True)
    torch.set_num_threads(1)
    mod = load_inline("shortcut_ext_gemm_ceiling", cpp_sources=_SRC, functions=["brgemm_rate"],
                      extra_cflags=["-O2"], verbose=False)
    m, B, R = 128, 256, args.units
    rows = []
    for d in (64, 128):
        shapes = {
            "forward z^T = W a^T (M=d, N=m, K=d)": (d, m, d, d, m, m, False),
            "data gradient ga = gz W (M=m, N=d, K=d)": (m, d, d, d, d, d, False),
            "weight gradient dW^T = a^T gz (M=d, N=d, K=m, lda=B)": (d, d, m, B, d, d, False),
        }
        for name, a in shapes.items():
            rate = mod.brgemm_rate(*a, 20000)
            rows.append({"d": d, "what": f"brgemm hot-cache, 1 thread: {name}", "gflops": round(rate, 1)})
        # the fused ops on one thread
        x = torch.randn(B, d)
        w = torch.randn(R, 2, d, d) * (0.3 / d ** 0.5)
        ops = torch.ops.shortcut_ext
        acts = ("identity", "relu", "identity")
        fl = 2.0 * R * 2 * B * d * d
        t_f0 = _median_s(lambda: ops.residual_stack_forward(x, w, True, *acts, False, False), 7)
        t_f1 = _median_s(lambda: ops.residual_stack_forward(x, w, True, *acts, True, True), 7)
        y, saved = ops.residual_stack_forward(x, w, True, *acts, True, True)
        g = torch.randn(B, d)
        # the fused ops agree with the reference before they are timed (on the first 8 units)
        xr, wr = x.double().requires_grad_(), w[:8].double().requires_grad_()
        yr = ref.residual_stack_forward(xr, wr, True, *acts)
        y8, s8 = ops.residual_stack_forward(x, w[:8].contiguous(), True, *acts, True, True)
        gx8, gw8 = ops.residual_stack_backward(g, w[:8].contiguous(), s8, True, *acts)
        gxr, gwr = torch.autograd.grad(yr, (xr, wr), g.double())
        for a, b in ((y8, yr), (gx8, gxr), (gw8, gwr)):
            torch.testing.assert_close(a.double(), b.detach(), rtol=1e-3, atol=1e-4)
        t_b = _median_s(lambda: ops.residual_stack_backward(g, w, saved, True, *acts), 5)
        rows += [
            {"d": d, "what": "fused forward, no save, 1 thread", "gflops": round(fl / t_f0 / 1e9, 1)},
            {"d": d, "what": "fused forward saving layer inputs, 1 thread", "gflops": round(fl / t_f1 / 1e9, 1)},
            {"d": d, "what": "fused backward from layer inputs, 1 thread", "gflops": round(2 * fl / t_b / 1e9, 1)},
        ]
        for r in rows[-6:]:
            print(f"d={r['d']:<4} {r['what']:<80} {r['gflops']:>7.1f} GFLOP/s", flush=True)
    torch.set_num_threads(old)
    out["rows"] = rows
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(json_safe(out), f, indent=2, allow_nan=False)  # strict JSON: nan as null
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
