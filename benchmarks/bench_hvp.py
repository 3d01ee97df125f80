"""Per-HVP time and peak memory of every way to get Hessian-vector products of a residual stack.

Problem: 2-shortcut net, ReLU at the mid position (``--act tanh | ssigmoid`` for another), d = 16, B = 512 samples, R in {16, 128, 1024}
units, float32, 2 threads, weights at the "small" init (scale 0.1), mse loss.  Variants (each
computes loss, gradient and ``k`` HVPs from scratch, forward included, as HessianOperator does):

- ``fused_k1``, ``fused_k16``: :func:`shortcut_ext.ops.residual_stack_hvp` (the fused R-operator
  kernel; skipped where it is not built);
- ``double_backward_k1``: reference forward, ``grad(create_graph=True)``, then ``grad(g, w, v)``;
- ``func_jvp_grad_k1``: ``torch.func.jvp(torch.func.grad(loss), (w,), (v,))``;
- ``func_vmap_k16``: ``torch.func.vmap`` of that over 16 directions;
- ``is_grads_batched_k16``: one graph, ``torch.autograd.grad(g, w, V, is_grads_batched=True)``.

Every variant is checked against ``double_backward`` before it is timed.  Times are medians with the
interquartile range over repeats, reported per HVP (time / k) and as a ratio to ``double_backward_k1``
measured in the same run (the command line; the pytest mode times whole calls of k HVPs, grouped by
R and k, with ``hvps_per_call`` in each entry's extra_info).  Peak memory: the peak growth of the resident set size (sampled every
0.5 ms) of a fresh child process that builds the problem, then runs the variant once.

Two ways to run it (not collected by the default test run: benchmarks/ is outside ``testpaths``):

    python benchmarks/bench_hvp.py --units 16 128 1024 --out bench_hvp.json   # JSON + CSV
    python benchmarks/bench_hvp.py --act tanh --units 1024 --out bench_hvp_tanh.json   # tanh's second derivatives
    pytest benchmarks/bench_hvp.py -o addopts="" --benchmark-only --benchmark-json=bench_hvp_pytest.json
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:  # the installed package (or the one on PYTHONPATH): the source tree has no kernels unless built in place
    import shortcut_ext  # noqa: F401
except ImportError:  # a source checkout without an install
    sys.path.insert(0, os.path.dirname(HERE))

from shortcut_ext import ops, reference  # noqa: E402
from shortcut_ext.curvature.hessian import fused_hvp_available  # noqa: E402

sys.path.insert(0, HERE)  # benchmarks/common.py
import common  # noqa: E402

D_WIDTH, BATCH, K_BATCHED = 16, 512, 16
ACTS = ("identity", "relu", "identity")
MID_ACTS = ("relu", "tanh", "ssigmoid")  # --act: the activation between each unit's layers


def set_mid_activation(act: str) -> None:
    """Benchmark nets with ``act`` between the layers of each unit (every variant, the checks, the memory children)."""
    global ACTS
    if act not in MID_ACTS:
        raise ValueError(f"act must be one of {MID_ACTS}, got {act!r}")
    ACTS = ("identity", act, "identity")
VARIANTS = ("fused_k1", "fused_k16", "double_backward_k1", "func_jvp_grad_k1", "func_vmap_k16",
            "is_grads_batched_k16")
UNITS = (16, 128, 1024)


def make_problem(units: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    d = D_WIDTH
    x = torch.randn(BATCH, d, generator=g, dtype=torch.float64)
    y = x @ (torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5) + 0.1 * torch.randn(BATCH, d, generator=g,
                                                                                                 dtype=torch.float64)
    w = torch.randn(units, 2, d, d, generator=g, dtype=torch.float64) * (0.1 / d ** 0.5)
    V = torch.randn(K_BATCHED, units, 2, d, d, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype), w.to(dtype), V.to(dtype)


def _loss(w, x, y):
    return reference.loss_fn("mse", reference.residual_stack_forward(x, w, True, *ACTS), y)


def variant_fn(name: str, x, y, w, V):
    """A zero-argument callable computing the variant's HVPs ``[k, R, 2, d, d]``."""
    k = 1 if name.endswith("_k1") else K_BATCHED
    D = V[:k].contiguous()
    if name.startswith("fused"):
        if not fused_hvp_available():
            return None
        return lambda: ops.residual_stack_hvp(x, w, y, D, True, *ACTS, loss="mse", backend="fused")[2]
    if name == "double_backward_k1":
        def run():
            wr = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(_loss(wr, x, y), wr, create_graph=True)
            return torch.autograd.grad(g, wr, grad_outputs=D[0])[0].unsqueeze(0)
        return run
    if name == "is_grads_batched_k16":
        def run():
            wr = w.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(_loss(wr, x, y), wr, create_graph=True)
            return torch.autograd.grad(g, wr, grad_outputs=D, is_grads_batched=True)[0]
        return run
    from torch.func import grad, jvp, vmap

    def hvp(v):
        return jvp(grad(lambda ww: _loss(ww, x, y)), (w,), (v,))[1]

    if name == "func_jvp_grad_k1":
        return lambda: hvp(D[0]).unsqueeze(0)
    if name == "func_vmap_k16":
        return lambda: vmap(hvp)(D)
    raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")


def check(name: str, units: int) -> None:
    """Compare the variant with double backward, direction by direction (float32 tolerance)."""
    x, y, w, V = make_problem(units)
    fn = variant_fn(name, x, y, w, V)
    if fn is None:
        return
    out = fn()
    k = out.shape[0]
    for i in range(k):
        wr = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_loss(wr, x, y), wr, create_graph=True)
        ref = torch.autograd.grad(g, wr, grad_outputs=V[i])[0]
        err = float((out[i] - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if not err <= 1e-3:  # nan too
            raise AssertionError(f"{name} at R={units}: direction {i} differs from double backward by {err:.2e}")


def time_variant(fn, repeats: int, warmup: int = 1) -> list[float]:
    return common.call_times(fn, repeats, warmup)


def peak_memory_mib(name: str, units: int) -> float | None:
    """Peak RSS growth of a fresh child process running the variant once, after a one-unit warm-up
    call (MiB); None if unavailable."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, str(units), "--act", ACTS[1]]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory child for {name} R={units} failed:\n{res.stderr[-2000:]}")
    val = res.stdout.strip().splitlines()[-1]
    return None if val == "None" else float(val)


def _child(name: str, units: int) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    x, y, w, V = make_problem(units)
    fn = variant_fn(name, x, y, w, V)
    if fn is None:
        print("None")
        return
    # warm-up on a one-unit problem: the first call's one-time setup (libraries, allocator pools,
    # autograd and functorch machinery: tens of MiB) is not the variant's memory
    variant_fn(name, *make_problem(1))()
    with RssPeak() as peak:
        fn()
    print(peak.growth_mib)


class RssPeak:
    """Peak growth of the resident set size while the ``with`` body runs, sampled every ``interval``
    seconds from ``/proc/self/statm`` by a background thread (torch kernels release the GIL).
    Falls back to ``ru_maxrss`` where ``/proc`` is missing."""

    def __init__(self, interval: float = 5e-4):
        self.interval = interval
        self.growth_mib = float("nan")

    @staticmethod
    def rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        import gc
        import threading

        gc.collect()  # garbage collected inside the body would lower the RSS and hide the body's growth
        self.base = self.peak = self.rss_bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss_bytes())
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_bytes())
        self.growth_mib = (self.peak - self.base) / 2**20
        return False


def environment() -> dict:
    """benchmarks/common.py's (versions, threads, processor, build, date) and this problem's."""
    return {**common.environment(), "fused_hvp_kernel": fused_hvp_available(), "d": D_WIDTH, "batch": BATCH,
            "dtype": "float32", "activations": ACTS}


def _check_out(parser, out: str) -> None:
    """The result file's folder must exist (and be writable) before a long run, not after it."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        parser.error(f"--out {out} must be a file in an existing, writable folder")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, nargs="+", default=list(UNITS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--act", choices=MID_ACTS, default="relu", help="the activation between each unit's layers")
    p.add_argument("--out", default="bench_hvp.json", help="JSON path; a CSV is written beside it")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    set_mid_activation(args.act)
    if args.child:  # a memory child writes nothing (it used to check --out's default in its own folder)
        _child(args.child[0], int(args.child[1]))
        return 0
    _check_out(p, args.out)
    if args.repeats < 1 or args.threads < 1 or min(args.units) < 1:
        p.error(f"--repeats, --threads and --units must be >= 1, got {args.repeats}, {args.threads}, {args.units}")
    torch.set_num_threads(args.threads)
    rows = []
    for units in args.units:
        base = None
        for name in args.variants:
            x, y, w, V = make_problem(units)
            fn = variant_fn(name, x, y, w, V)
            if fn is None:
                rows.append({"variant": name, "units": units, "status": "fused HVP kernel not built"})
                print(f"R={units:5d} {name:22s} skipped (fused HVP kernel not built)")
                continue
            check(name, units)
            k = 1 if name.endswith("_k1") else K_BATCHED
            ts = time_variant(fn, args.repeats)
            q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
            med = statistics.median(ts)
            if name == "double_backward_k1":
                base = med
            mem = None if args.no_memory else peak_memory_mib(name, units)
            row = {"variant": name, "units": units, "k": k, "median_s": med, "iqr_s": [q[0], q[2]],
                   "per_hvp_s": med / k, "peak_rss_mib": mem, "status": "ok"}
            rows.append(row)
            print(f"R={units:5d} {name:22s} {med / k * 1e3:9.3f} ms/HVP  (call {med * 1e3:9.2f} ms, "
                  f"IQR {q[0] * 1e3:.2f}-{q[2] * 1e3:.2f})  peak +{mem if mem is not None else float('nan'):.1f} MiB")
        if base is not None:
            for r in rows:
                if r.get("units") == units and r.get("status") == "ok":
                    r["speedup_vs_double_backward_per_hvp"] = base / r["per_hvp_s"]
    out = {"environment": environment(), "results": rows}
    with open(args.out, "w") as f:
        json.dump(common.json_safe(out), f, indent=1, allow_nan=False)  # strict JSON: nan as null
    csv_path = os.path.splitext(args.out)[0] + ".csv"
    keys = ["variant", "units", "k", "median_s", "per_hvp_s", "speedup_vs_double_backward_per_hvp", "peak_rss_mib",
            "status"]
    with open(csv_path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {args.out} and {csv_path}")
    return 0


# ------------------------------------------------------------------------------ pytest-benchmark
from common import pytest  # noqa: E402  (None without pytest)

if pytest is not None:
    from common import two_threads  # noqa: E402,F401  (2 threads in the pytest mode too)

    @pytest.mark.parametrize("units", UNITS)
    @pytest.mark.parametrize("name", VARIANTS)
    def test_hvp(benchmark, name, units):
        x, y, w, V = make_problem(units)
        fn = variant_fn(name, x, y, w, V)
        if fn is None:
            pytest.skip("the fused HVP kernel is not built")
        check(name, units)
        k = 1 if name.endswith("_k1") else K_BATCHED
        # pytest-benchmark times a call, which holds k HVPs: one group per (R, k), so that a table never ranks
        # a 16-product call against a 1-product one; ms_per_hvp = the call's time / k (the command line
        # reports per HVP and the ratios)
        benchmark.group = f"R={units} k={k}"
        benchmark.extra_info.update(k=k, hvps_per_call=k, units=units, peak_rss_mib=peak_memory_mib(name, units),
                                    **environment())
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
