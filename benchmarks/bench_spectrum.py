"""The curvature layer's scale target: the Hessian spectrum of a 2-shortcut net with d = 16 and
R = 10000 units (P = R * 2 * d^2 = 5.12 million weights) at the small init, 512 synthetic samples:
the 5 largest and 5 smallest eigenvalues (thick-restarted Lanczos, with true residual norms) and an
8-probe, 80-step SLQ density (Ghorbani, Krishnan, Xiao 2019), float32, fused HVPs.  Target: at most
10 minutes on a 2-core machine and a peak resident set of at most 8 GB for the whole process.

Memory is the Krylov bases, bounded by budgets (``--*-basis-gib``); the two phases run one after the
other, so the peak is the larger phase plus the process's base:

- Lanczos keeps at most 157 vectors (what fits in 3 GiB at the target: 3.2 GB) and thick-restarts
  when the basis is full, ``--lanczos-products`` (320) products in all;
- SLQ runs the probes in groups whose bases (``group * steps * P`` numbers) fit in 3.5 GiB: groups of
  2 at the target (3.3 GB; all 8 probes at once would take 13 GB).  Groups of 3 (``--slq-basis-gib
  5``, 4.9 GB) save ~3% of SLQ's product time for 1.6 GB more.  The nodes and weights do not depend
  on the grouping.

Not done, measured first: taking the extremes from an SLQ probe's Krylov space (one 80-step space
resolves only the top eigenvalue of the small init's clustered ends; sharing the first 80 Lanczos
steps with probe 0 would save 80 of ~970 products, 8%), and riding the Lanczos vector along in SLQ's
batched products (saves about a third of a single-vector product's cost, ~10% in all, but both bases
must then fit in memory at once).

Writes a JSON file with wall and CPU time per phase, products (HVPs), peak RSS (``ru_maxrss`` and a
sampled peak of ``/proc/self/statm`` per phase), the eigenvalues with residuals, and a density
summary.  Before timing, one fused HVP is compared with double backward on the net's first 64 units.
On a machine shared with other jobs wall times stretch; CPU time does less so.  ``--extrapolate-units``
plans the basis sizes and groups for that size and scales the run's time and memory to it (every
cost here is linear in R at fixed products: HVPs in R, basis algebra in P).

    python benchmarks/bench_spectrum.py                          # the target (on a quiet machine)
    python benchmarks/bench_spectrum.py --units 1000 --extrapolate-units 10000 --out /tmp/spec1000.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:  # the installed package (or the one on PYTHONPATH): the source tree has no kernels unless built in place
    import shortcut_ext  # noqa: F401
except ImportError:  # a source checkout without an install
    sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import common  # noqa: E402
from bench_hvp import RssPeak  # noqa: E402

from shortcut_ext.curvature import HessianOperator, lanczos, slq  # noqa: E402
from shortcut_ext.curvature.lanczos import basis_capacity  # noqa: E402
from shortcut_ext.curvature.slq import slq_group_size  # noqa: E402
from shortcut_ext.models import ShortcutNet  # noqa: E402
from shortcut_ext.ops import release_cache  # noqa: E402

GIB = 2**30
QUANTILES = (0.01, 0.1, 0.5, 0.9, 1.0)


def _data(m, d, seed, dtype):
    try:
        from shortcut_ext.data import synthetic_teacher
    except ImportError:  # pragma: no cover
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(m, d, generator=g, dtype=torch.float64)
        Y = X @ (torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5)
        return X.to(dtype), (Y + 0.1 * torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype)
    return synthetic_teacher(m, d, seed=seed, noise=0.1, dtype=dtype)


def _trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so that RSS measures what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _warm_up(args, dtype) -> None:
    """Load kernels, thread pools and allocators on a 2-unit net: their memory does not grow with R."""
    X, Y = _data(16, args.width, args.seed, dtype)
    net = ShortcutNet(args.width, 2, 2, mid=args.mid, init="small", scale=args.scale, seed=args.seed, dtype=dtype)
    for backend in (args.backend, "autograd"):
        H = HessianOperator(net, (X, Y), backend=backend)
        lanczos(H, k=2, max_iter=8, max_products=12, verify=False, return_vectors=False)
        slq(H, probes=2, steps=4)
    _trim()


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Phase:
    """Wall time, CPU time, products and the sampled peak RSS of one phase."""

    def __init__(self, name, op, sync, interval=0.005):
        self.name, self.op, self.sync, self.mem = name, op, sync, RssPeak(interval)
        self.info = {}

    def __enter__(self):
        self.p0 = self.op.num_products
        self.mem.__enter__()
        self.c0, self.t0 = _cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.info = {"wall_s": time.perf_counter() - self.t0, "cpu_s": _cpu_s() - self.c0,
                     "products": self.op.num_products - self.p0}
        self.mem.__exit__(*exc)
        self.info.update(peak_rss_mib=self.mem.peak / 2**20, rss_at_start_mib=self.mem.base / 2**20,
                         peak_rss_growth_mib=self.mem.growth_mib, ru_maxrss_mib=_maxrss_mib())
        return False


def _check_out(parser, out: str) -> None:
    """The result file's folder must exist (and be writable) before a long run, not after it."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        parser.error(f"--out {out} must be a file in an existing, writable folder")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", type=int, default=10000, help="residual units R (the target: 10000)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--scale", type=float, default=0.01, help="the small init's scale")
    p.add_argument("--mid", default="identity", help="activation at the mid position")
    p.add_argument("--top", type=int, default=5, help="eigenvalues at each end")
    p.add_argument("--lanczos-basis-gib", type=float, default=3.0, help="Lanczos basis budget (GiB)")
    p.add_argument("--lanczos-vectors", type=int, default=None,
                   help="Lanczos basis size (default: what fits in the budget, at most 300)")
    p.add_argument("--lanczos-products", type=int, default=320,
                   help="Lanczos products in all (thick restarts when the basis is full)")
    p.add_argument("--verify", action="store_true", help="Lanczos multiplicity check (more products)")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--slq-basis-gib", type=float, default=3.5, help="SLQ group basis budget (GiB)")
    p.add_argument("--probe-batch", type=int, default=None, help="SLQ probes per group (default: from the budget)")
    p.add_argument("--no-reorth", action="store_true", help="SLQ without full reorthogonalisation (no basis)")
    p.add_argument("--backend", default="fused", choices=("fused", "autograd", "func"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check-units", type=int, default=64,
                   help="compare one fused HVP with autograd on the net's first units (before timing)")
    p.add_argument("--extrapolate-units", type=int, default=None,
                   help="also estimate time and memory at this many units (linear in R)")
    p.add_argument("--out", default="bench_spectrum.json")
    args = p.parse_args(argv)
    _check_out(p, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("units", "width", "samples", "top", "probes", "steps", "lanczos_products"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("threads", "lanczos_vectors", "probe_batch", "extrapolate_units"):  # unset: None; 0 is no default
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (or left out), got {getattr(args, name)}")
    for name in ("lanczos_basis_gib", "slq_basis_gib", "scale"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.extrapolate_units is not None and args.extrapolate_units < args.units:
        p.error(f"--extrapolate-units must be >= --units {args.units}, got {args.extrapolate_units}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    itemsize = torch.finfo(dtype).bits // 8
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    _warm_up(args, dtype)
    rss_base = RssPeak.rss_bytes() / 2**20  # torch, the interpreter, kernels: what does not grow with R

    t_setup, c_setup = time.perf_counter(), _cpu_s()
    X, Y = _data(args.samples, args.width, args.seed, dtype)
    net = ShortcutNet(args.width, args.units, 2, mid=args.mid, init="small", scale=args.scale, seed=args.seed,
                      dtype=dtype).to(args.device)
    H = HessianOperator(net, (X.to(args.device), Y.to(args.device)), backend=args.backend)
    P = H.P
    # basis sizes from the budgets, as at the extrapolation target when there is one (a scaled-down run
    # then does the same work as the target, on smaller vectors)
    plan_P = P * args.extrapolate_units // args.units if args.extrapolate_units else P
    lz_vectors = args.lanczos_vectors or min(300, basis_capacity(plan_P, dtype, int(args.lanczos_basis_gib * GIB)))
    if args.no_reorth:
        group = args.probe_batch or args.probes
    else:
        group = args.probe_batch or slq_group_size(plan_P, args.probes, args.steps, dtype,
                                                   int(args.slq_basis_gib * GIB))
    res = {"config": vars(args), "num_params": P, "backend_used": H.backend_used,
           "fallback_reason": H.fallback_reason,
           "environment": {**common.environment(), "machine": platform.machine(), "cpus": os.cpu_count(),
                           "load_average_at_start": os.getloadavg(),
                           "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu"},
           "rss_base_mib": rss_base,
           "plan": {"lanczos_vectors": lz_vectors, "lanczos_basis_gib": lz_vectors * P * itemsize / GIB,
                    "lanczos_products": args.lanczos_products, "slq_probe_batch": group,
                    "slq_basis_gib": 0.0 if args.no_reorth else group * min(args.steps, P) * P * itemsize / GIB}}
    print(f"P = {P}, backend {H.backend_used}" + (f" ({H.fallback_reason})" if H.fallback_reason else "")
          + f", {torch.get_num_threads()} threads; Lanczos basis {lz_vectors} vectors "
          f"({res['plan']['lanczos_basis_gib']:.2f} GiB), SLQ groups of {group} "
          f"({res['plan']['slq_basis_gib']:.2f} GiB)")

    # check before timing: one fused HVP against double backward, on the net's first (at most) 64 units
    # with the same weights (double backward keeps every activation: ~2.7 GB at R = 1000)
    if H.backend_used == "fused":
        r_chk = min(args.units, args.check_units)
        sub = ShortcutNet(args.width, r_chk, 2, mid=args.mid, init="zero", dtype=dtype).to(args.device)
        with torch.no_grad():
            sub.weight.copy_(net.weight[:r_chk])
        Hf, Ha = (HessianOperator(sub, (X.to(args.device), Y.to(args.device)), backend=b)
                  for b in ("fused", "autograd"))
        v = torch.randn(Hf.P, 1, generator=torch.Generator().manual_seed(args.seed + 7), dtype=torch.float64).to(dtype)
        hv, ref = Hf.matmat(v.to(args.device)).cpu(), Ha.matmat(v.to(args.device)).cpu()
        err = float((hv - ref).norm() / ref.norm().clamp_min(1e-30))
        res["check_fused_vs_autograd"] = {"units": r_chk, "rel_err": err}
        print(f"check: fused HVP vs autograd on the first {r_chk} units, relative error {err:.2e}")
        if not err < (1e-3 if dtype == torch.float32 else 1e-9):
            raise SystemExit(f"fused HVP disagrees with autograd: relative error {err:.2e}")
        del sub, Hf, Ha
    v = torch.randn(P, 1, generator=torch.Generator().manual_seed(args.seed + 7), dtype=torch.float64).to(dtype)
    hv = H.matmat(v.to(args.device))  # warm-up of the full-size product
    del v, hv
    sync()
    _trim()
    res["setup"] = {"wall_s": time.perf_counter() - t_setup, "cpu_s": _cpu_s() - c_setup,
                    "rss_mib": RssPeak.rss_bytes() / 2**20, "ru_maxrss_mib": _maxrss_mib()}

    with Phase("lanczos", H, sync) as ph:
        lz = lanczos(H, k=args.top, max_iter=lz_vectors, max_products=args.lanczos_products, verify=args.verify,
                     seed=args.seed, return_vectors=False, compute_residuals=True)
    scale = lz.norm_estimate
    res["lanczos"] = {**ph.info, "largest": lz.largest.tolist(), "smallest": lz.smallest.tolist(),
                      "largest_residuals": lz.largest_residuals.tolist(),
                      "smallest_residuals": lz.smallest_residuals.tolist(),
                      "relative_residuals": (np.concatenate([lz.largest_residuals, lz.smallest_residuals])
                                             / scale).tolist(),
                      "num_vectors": lz.num_vectors, "max_vectors": lz.max_vectors,
                      "basis_mib": lz.basis_bytes / 2**20, "restarts": lz.restarts,
                      "converged": lz.converged, "stop_reason": lz.stop_reason, "norm_estimate": scale}
    del lz
    release_cache()  # the k = 1 products' buffers: SLQ's groups cannot reuse them (as the spectrum command does)
    _trim()
    r = res["lanczos"]
    print(f"lanczos: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, {r['products']} products, "
          f"{r['restarts']} restarts, peak RSS {r['peak_rss_mib']:.0f} MiB ({r['stop_reason']})")
    for name in ("largest", "smallest"):
        print(f"  {name:8s} " + "  ".join(f"{v:.6g} ({e:.1e})" for v, e in zip(r[name], r[name + "_residuals"])))

    with Phase("slq", H, sync) as ph:
        sq = slq(H, probes=args.probes, steps=args.steps, seed=args.seed + 1, reorthogonalize=not args.no_reorth,
                 probe_batch=group)
    sigma = sq.default_sigma()
    grid, dens = sq.density(sigma=sigma, num=200)
    tr, tr_se = sq.trace(1)
    res["slq"] = {**ph.info, "probe_batch": sq.probe_batch, "basis_mib": sq.basis_bytes / 2**20,
                  "steps": sq.num_steps.tolist(), "node_range": list(sq.extremes()),
                  "abs_quantiles": {str(q): sq.abs_quantile(q) for q in QUANTILES},
                  "abs_q10_per_probe": sq.abs_quantile_per_probe(0.1).tolist(),
                  "index": sq.negative_mass(), "index_per_probe": sq.negative_mass_per_probe().tolist(),
                  "trace": [tr, tr_se], "sigma": sigma, "grid": grid.tolist(), "density": dens.tolist()}
    r = res["slq"]
    print(f"slq: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, {r['products']} products in groups of "
          f"{r['probe_batch']}, peak RSS {r['peak_rss_mib']:.0f} MiB")
    print(f"  nodes in [{r['node_range'][0]:.5g}, {r['node_range'][1]:.5g}], |lambda|(0.1) = "
          f"{r['abs_quantiles']['0.1']:.4g}, index = {r['index']:.3f}, tr(H) = {tr:.5g} +- {tr_se:.2g}")
    if str(args.device).startswith("cuda"):
        res["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20

    phases = ("lanczos", "slq")
    res["total"] = {
        "wall_s": res["setup"]["wall_s"] + sum(res[k]["wall_s"] for k in phases),
        "cpu_s": res["setup"]["cpu_s"] + sum(res[k]["cpu_s"] for k in phases),
        "products": int(H.num_products),
        "peak_rss_sampled_mib": max(res[k]["peak_rss_mib"] for k in phases),
        "ru_maxrss_mib": _maxrss_mib(),
    }
    t = res["total"]
    t["quiet_wall_estimate_s"] = t["cpu_s"] / torch.get_num_threads()
    print(f"total: {t['wall_s']:.1f} s wall ({t['cpu_s']:.1f} s CPU; quiet {torch.get_num_threads()}-thread estimate "
          f"{t['quiet_wall_estimate_s']:.0f} s), {t['products']} products, peak RSS {t['peak_rss_sampled_mib']:.0f} "
          f"MiB sampled, {t['ru_maxrss_mib']:.0f} MiB ru_maxrss")

    if args.extrapolate_units:
        f = args.extrapolate_units / args.units
        est = {"units": args.extrapolate_units, "factor": f,
               "assumes": "the same products, basis sizes and groups as at the target (planned for it); time and "
                          "the R-dependent part of the RSS (peak - base) linear in R (an upper bound: the HVP "
                          "kernel's work buffers are bounded)"}
        for k in phases + ("total",):
            est[k] = {"wall_s": f * res[k]["wall_s"], "cpu_s": f * res[k]["cpu_s"],
                      "quiet_wall_s": f * res[k]["cpu_s"] / torch.get_num_threads()}
        peak = max(res[k]["peak_rss_mib"] for k in phases)
        est["peak_rss_mib"] = rss_base + f * (peak - rss_base)
        for k in phases:
            est[k]["peak_rss_mib"] = rss_base + f * (res[k]["peak_rss_mib"] - rss_base)
        res["extrapolated"] = est
        print(f"extrapolated to {args.extrapolate_units} units: {est['total']['wall_s']:.0f} s at this run's wall "
              f"rate, {est['total']['quiet_wall_s']:.0f} s from CPU time; peak RSS {est['peak_rss_mib'] / 1024:.2f} "
              f"GiB (lanczos {est['lanczos']['peak_rss_mib'] / 1024:.2f}, slq {est['slq']['peak_rss_mib'] / 1024:.2f})")
    with open(args.out, "w") as fh:
        json.dump(common.json_safe(res), fh, indent=1, allow_nan=False)  # strict JSON: nan as null
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
