"""GPU benchmark of Hessian-vector products: the fused R-operator kernel (csrc/cuda/residual_stack_hvp_cuda.cu)
against the pure-PyTorch ways to get HVPs, on the GPU, for the 2-shortcut ReLU network.

The variants and their definitions are those of the CPU benchmark, benchmarks/bench_hvp.py (each
computes loss, gradient and k HVPs from scratch, forward included, as HessianOperator does):
fused k = 1 and k = 16, double backward, torch.func jvp(grad), vmap of that over 16 directions, and
one double-backward graph queried with is_grads_batched for 16 directions; and fused_ggn_k16, the fused
kernel's 16 Gauss-Newton products G v (residual_stack_hvp(..., matrix="ggn")), beside fused_k16's H v for
their cost (its speedup column is still per product against double backward's H v).  Every variant is
checked against double backward on two directions before it is timed (fused_ggn_k16 against double backward
at the targets y = f(x), the net's own outputs, where the mse residual is zero and H is G).  Times are medians of CUDA-event
timings after a warm-up, reported per HVP (time / k) and as a ratio to double backward measured in
the same run; peak memory is torch.cuda.max_memory_allocated over the timed calls.

Problems (float32, mse loss, weights at scale 0.1 / sqrt(d)):
  d = 16, B = 512,  R = 1024   (the CPU benchmark's largest case, for comparison)
  d = 64, B = 4096, R = 256    (a GPU-sized one)

    python benchmarks/gpu/bench_gpu_hvp.py --out OUT_DIR            # on a GPU (run.sh does this)
    python benchmarks/gpu/bench_gpu_hvp.py --cpu-smoke --out /tmp/x  # the same logic, tiny, on CPU
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: common.py, bench_hvp.py
sys.path.insert(0, HERE)  # bench_gpu.py: the CUDA-event clock, the log
import bench_hvp  # noqa: E402
import common  # noqa: E402
from bench_gpu import sig, start  # noqa: E402

import shortcut_ext  # noqa: E402

VARIANTS = bench_hvp.VARIANTS + ("fused_ggn_k16",)
AGREE = 1e-3  # relative (max-abs) disagreement with float32 double backward that still counts as agreement


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(HERE, "out")), help="output folder")
    p.add_argument("--problems", default="16x512x1024,64x4096x256", help="comma-separated d x B x R")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {','.join(VARIANTS)}")
    p.add_argument("--budget-s", type=float, default=60.0, help="stop starting new measurements after this")
    p.add_argument("--target-s", type=float, default=0.3, help="timed seconds per variant (3 to 20 repetitions)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks this script's logic")
    a = p.parse_args(argv)
    problems = []
    for spec in a.problems.split(","):
        try:
            d, B, R = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            p.error(f"--problems must be d x B x R triples such as 16x512x1024, got {spec!r}")
        if min(d, B, R) < 1:
            p.error(f"--problems: d, B and R must be >= 1, got {spec!r}")
        problems.append((d, B, R))
    a.problems = [(6, 32, 4), (16, 64, 8)] if a.cpu_smoke else problems
    a.variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants must be among {VARIANTS}, got {bad}")
    a.device = "cpu" if a.cpu_smoke else "cuda"
    return a


def make_problem(d, B, R, device, seed=0):
    """x, y (a noisy linear teacher), weights at scale 0.1 / sqrt(d), 16 directions; float32 on device."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    y = x @ (torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5)
    y += 0.1 * torch.randn(B, d, generator=g, dtype=torch.float64)
    w = torch.randn(R, 2, d, d, generator=g, dtype=torch.float64) * (0.1 / d ** 0.5)
    V = torch.randn(bench_hvp.K_BATCHED, R, 2, d, d, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=torch.float32) for t in (x, y, w, V))


def double_backward(x, y, w, v):
    wr = w.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(bench_hvp._loss(wr, x, y), wr, create_graph=True)
    return torch.autograd.grad(g, wr, grad_outputs=v)[0]


def ggn_fn(x, y, w, V):
    """fused_ggn_k16: the fused kernel's Gauss-Newton products of the 16 directions (None where not built)."""
    from shortcut_ext import ops
    from shortcut_ext.curvature.hessian import fused_hvp_available

    if not fused_hvp_available():
        return None
    D = V.contiguous()
    return lambda: ops.residual_stack_hvp(x, w, y, D, True, *bench_hvp.ACTS, loss="mse", backend="fused",
                                          matrix="ggn")[2]


def main(argv=None):
    args = parse_args(argv)
    name = "bench_gpu_hvp" if not args.cpu_smoke else "bench_gpu_hvp_cpu_smoke"
    t_start = time.time()
    started = start(args.device, args.out, name)
    if started is None:
        return 2
    log, clock, env = started
    if args.device == "cuda":
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 baselines, like the kernel
    log(f"environment: {env}")
    rows, failures = [], 0
    common.RESULTS_DIR = args.out

    def flush():  # after every variant: a run cut short by a timeout keeps every row it measured
        return common.write_results(name, rows, {"args": {k: v for k, v in vars(args).items()}})
    for d, B, R in args.problems:
        x, y, w, V = make_problem(d, B, R, args.device)
        case = dict(d=d, B=B, R=R, params=R * 2 * d * d)
        refs = {i: double_backward(x, y, w, V[i]) for i in (0, bench_hvp.K_BATCHED - 1)}
        refs_ggn = None  # G v: H v at the targets f(x) (zero residual), made when a G variant first needs it
        per_hvp_ms = {}  # unrounded, for the ratios
        for variant in args.variants:
            k = 1 if variant.endswith("_k1") else bench_hvp.K_BATCHED
            row = dict(case, variant=variant, k=k)
            if time.time() - t_start > args.budget_s:
                rows.append(dict(row, note=f"skipped: time budget {args.budget_s:.0f}s used"))
                continue
            try:
                ggn = variant == "fused_ggn_k16"
                if ggn and refs_ggn is None:
                    f = shortcut_ext.reference.residual_stack_forward(x, w, True, *bench_hvp.ACTS).detach()
                    refs_ggn = {i: double_backward(x, f, w, V[i]) for i in refs}
                fn = ggn_fn(x, y, w, V) if ggn else bench_hvp.variant_fn(variant, x, y, w, V)
                if fn is None:
                    rows.append(dict(row, note="skipped: the fused HVP kernel is not built"))
                    continue
                if args.device == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                out = fn()
                clock.sync()
                errs = [((out[i] - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                        for i, r in (refs_ggn if ggn else refs).items() if i < k]  # k = 1: direction 0 only
                # the directions without a reference must be finite too
                err = common.worst_error(errs + ([] if bool(torch.isfinite(out).all()) else [math.nan]))
                row["rel_err_vs_double_backward"] = f"{err:.2e}"
                if not err < AGREE:
                    failures += 1
                    rows.append(dict(row, note=f"MISMATCH: relative error {err:.2e} >= {AGREE}"))
                    log(f"d={d} B={B} R={R} {variant}: MISMATCH {err:.2e}")
                    continue
                del out
                med, lo, hi, reps = clock.time(fn, args.target_s)
                row.update(ms_per_hvp=sig(med * 1e3 / k, 6), ms_call_median=sig(med * 1e3, 6),
                           ms_call_min=sig(lo * 1e3, 6), ms_call_max=sig(hi * 1e3, 6), reps=reps)
                per_hvp_ms[variant] = med * 1e3 / k
                if args.device == "cuda":
                    row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                rows.append(row)
            except torch.cuda.OutOfMemoryError as e:
                rows.append(dict(row, note=f"skipped: out of memory ({str(e).splitlines()[0][:80]})"))
            except Exception as e:  # a failed baseline must not hide the others
                failures += 1
                rows.append(dict(row, note=f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            finally:
                flush()
        base_ms = per_hvp_ms.get("double_backward_k1")
        for r_ in rows[-len(args.variants):]:
            if "ms_per_hvp" in r_ and base_ms:
                r_["speedup_per_hvp_vs_double_backward"] = round(base_ms / per_hvp_ms[r_["variant"]], 2)
        for r_ in rows[-len(args.variants):]:
            log(f"d={d:3d} B={B:5d} R={R:5d} {r_['variant']:22s} "
                + (f"{r_['ms_per_hvp']:9.3f} ms/HVP  x{r_.get('speedup_per_hvp_vs_double_backward', '')} vs double "
                   f"backward  peak {r_.get('peak_mem_mib', '-')} MiB  err {r_['rel_err_vs_double_backward']}"
                   if "ms_per_hvp" in r_ else r_.get("note", "")))
        del x, y, w, V, refs
    csv_path, json_path = flush()
    log(f"wrote {csv_path} and {json_path} ({len(rows)} rows) in {time.time() - t_start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
