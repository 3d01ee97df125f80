"""The curvature layer's scale target: a 2-shortcut net with d = 16 and R = 10000 units at the small
init, 512 synthetic samples: the 5 largest and 5 smallest Hessian eigenvalues (Lanczos, with
residual norms) and an 8-probe, 80-step SLQ density; wall time and peak memory of each part.

P = R * 2 * d^2 = 5.12 million weights at R = 10000.  Memory is dominated by the Krylov bases:
Lanczos keeps ``max_iter * P`` numbers, SLQ ``probes * steps * P`` (13 GiB in float32 for 8 x 80
at R = 10000); ``--no-reorth`` drops SLQ's basis (plain three-term recurrence).

    python benchmarks/bench_spectrum.py                      # the target (run on a quiet machine)
    python benchmarks/bench_spectrum.py --units 100          # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from bench_hvp import RssPeak  # noqa: E402

from shortcut_ext.curvature import HessianOperator, lanczos, slq  # noqa: E402
from shortcut_ext.models import ShortcutNet  # noqa: E402


def _data(m, d, seed, dtype):
    try:
        from shortcut_ext.data import synthetic_teacher
    except ImportError:  # pragma: no cover
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(m, d, generator=g, dtype=torch.float64)
        Y = X @ (torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5)
        return X.to(dtype), (Y + 0.1 * torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype)
    return synthetic_teacher(m, d, seed=seed, noise=0.1, dtype=dtype)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, default=10000)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--scale", type=float, default=0.01, help="the small init's scale")
    p.add_argument("--mid", default="identity", help="activation at the mid position")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--max-iter", type=int, default=120, help="Lanczos basis size")
    p.add_argument("--no-reorth", action="store_true", help="SLQ without full reorthogonalisation")
    p.add_argument("--backend", default="fused", choices=("fused", "autograd", "func"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_spectrum.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    X, Y = _data(args.samples, args.width, args.seed, dtype)
    net = ShortcutNet(args.width, args.units, 2, mid=args.mid, init="small", scale=args.scale, seed=args.seed,
                      dtype=dtype).to(args.device)
    H = HessianOperator(net, (X.to(args.device), Y.to(args.device)), backend=args.backend)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    res = {"config": vars(args), "num_params": H.P, "backend_used": H.backend_used,
           "fallback_reason": H.fallback_reason,
           "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                           "machine": platform.machine(), "python": platform.python_version(),
                           "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu"}}
    print(f"P = {H.P}, backend {H.backend_used}" + (f" ({H.fallback_reason})" if H.fallback_reason else ""))

    # one HVP, for the per-product cost
    v = torch.randn(H.P, 1, dtype=dtype, device=args.device, generator=None)
    H.matmat(v)
    sync()
    t0 = time.perf_counter()
    H.matmat(v)
    sync()
    res["hvp_s"] = time.perf_counter() - t0

    with RssPeak() as mem:
        t0 = time.perf_counter()
        lz = lanczos(H, k=args.top, max_iter=args.max_iter, verify=False, seed=args.seed, return_vectors=False)
        sync()
        t_l = time.perf_counter() - t0
    res["lanczos"] = {"time_s": t_l, "peak_rss_growth_mib": mem.growth_mib, "largest": lz.largest.tolist(),
                      "smallest": lz.smallest.tolist(), "largest_residuals": lz.largest_residuals.tolist(),
                      "smallest_residuals": lz.smallest_residuals.tolist(), "num_vectors": lz.num_vectors,
                      "num_products": lz.num_products, "converged": lz.converged, "stop_reason": lz.stop_reason}
    print(f"lanczos: {t_l:.1f} s, {lz.num_products} products, +{mem.growth_mib:.0f} MiB; "
          f"largest {np.round(lz.largest, 6).tolist()} smallest {np.round(lz.smallest, 6).tolist()} "
          f"max residual {max(lz.largest_residuals.max(), lz.smallest_residuals.max()):.2e}")

    with RssPeak() as mem:
        t0 = time.perf_counter()
        sq = slq(H, probes=args.probes, steps=args.steps, seed=args.seed + 1, reorthogonalize=not args.no_reorth)
        sync()
        t_s = time.perf_counter() - t0
    grid, dens = sq.density()
    res["slq"] = {"time_s": t_s, "peak_rss_growth_mib": mem.growth_mib, "num_products": sq.num_products,
                  "abs_q10": sq.abs_quantile(0.1), "index": sq.negative_mass(), "trace": sq.trace(1),
                  "grid": grid.tolist(), "density": dens.tolist()}
    if str(args.device).startswith("cuda"):
        res["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(f"slq: {t_s:.1f} s, {sq.num_products} products, +{mem.growth_mib:.0f} MiB; "
          f"|lambda|(0.1) = {res['slq']['abs_q10']:.4g}, index = {res['slq']['index']:.3f}")
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
