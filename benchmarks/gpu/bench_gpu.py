"""GPU benchmark: the fused residual stack against eager PyTorch, eager PyTorch replayed from a CUDA
graph, and torch.compile (all float32, TF32 off), and the fused stack on TF32 tensor cores
(shortcut_ext.cuda_tf32) against eager PyTorch with cuBLAS TF32 on, and on 3xTF32 tensor cores
(float32 accuracy), for the paper's 2-shortcut ReLU network (n = 2, ReLU between the two
layers of each branch, docs/science.md section 1) with R = 1000 units, float32, forward and forward+backward
(and, with --modes fwddx, forward + input gradient with frozen weights: the fused backward skips the weight
gradients).

Every variant is checked against eager PyTorch on the same inputs before it is timed.  Times are
medians of CUDA-event timings after a warm-up; rates count useful FLOPs only (forward 2*B*d^2*n*R,
forward+backward 3x that, forward + input gradient 2x: the fused backward's recomputation of each unit is
not counted) and are
compared with a large GEMM measured in the same run at the variant's precision (float32 with TF32
off; TF32 for the *_tf32 variants; a third of the TF32 rate for 3xTF32, which issues three TF32 products
per product: gemm_ref names the ceiling).  TF32 variants must agree with eager float32 to 1e-2 instead of
1e-3 (3xTF32 is held to 1e-3).

Ratios (speedup_vs_<baseline> = baseline ms / variant ms, above 1: faster than the baseline) are given
against eager, eager_tf32, eager_graph and compile.  Like for like: float32 and 3xTF32 (float32 accuracy)
against the float32 baselines, TF32 against eager_tf32; there is no TF32 compile or graph baseline, so
fused_tf32's speedup_vs_compile compares TF32 with float32 (the log prints the like-for-like ratio).

torch.compile is applied to one residual unit and looped over the units ("regional" compilation, as
for repeated transformer blocks): compiling the whole 1000-unit graph takes minutes per shape
(measured on the CPU machines), which the time budget of benchmarks/gpu/run.sh cannot hold.  So every
step makes R calls into the compiled unit from Python (guards and autograd wrappers included, no CUDA
graph): at small d that overhead is much of the compile time, as it is for a user who compiles a deep
stack this way.  Compile cases that do not fit the compile budget are skipped with a note.

    python benchmarks/gpu/bench_gpu.py --out OUT_DIR            # on a GPU (run.sh does this)
    python benchmarks/gpu/bench_gpu.py --cpu-smoke --out /tmp/x  # the same logic, tiny, on CPU
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/common.py
import common  # noqa: E402

import shortcut_ext  # noqa: E402
from shortcut_ext import reference as ref  # noqa: E402

ACTS = ("identity", "relu", "identity")  # pre, mid, post: ReLU between the layers of each branch
AGREE = 1e-3  # relative (Frobenius) disagreement with eager float32 that still counts as agreement
AGREE_TF32 = 1e-2  # the same for the TF32 variants (10 mantissa bits per product, over R units)


# stack-sized products per call: forward; forward + both gradients; forward + the input gradient (frozen weights)
MODE_PRODUCTS = {"fwd": 1, "fwdbwd": 3, "fwddx": 2}
VARIANTS = ("fused", "fused_tf32", "fused_3xtf32", "fused_atomic", "eager", "eager_tf32", "eager_graph", "compile")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(here, "out")),
                   help="folder for the CSV, JSON and log (default: $OUT, else benchmarks/gpu/out)")
    p.add_argument("--ds", default="16,64,128", help="widths d")
    p.add_argument("--bs", default="4096,65536", help="batch sizes B")
    p.add_argument("--units", type=int, default=1000, help="residual units R")
    p.add_argument("--n", type=int, default=2, help="layers per unit (2 = the 2-shortcut net)")
    p.add_argument("--modes", default=None,
                   help="fwd, fwdbwd (both gradients) and/or fwddx (the input gradient only, weights frozen); "
                        "default fwd,fwdbwd (all three with --cpu-smoke)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="fused_atomic: the fused op with SHORTCUT_EXT_CUDA_ATOMIC_GRAD=1 (forward+backward only); "
                        "fused_tf32 / fused_3xtf32: inside shortcut_ext.cuda_tf32(mode); eager_tf32: torch.backends.cuda.matmul."
                        "allow_tf32 = True")
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new measurements after this")
    p.add_argument("--compile-budget-s", type=float, default=100.0, help="total time allowed for compiling")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default inductor; eager for --cpu-smoke)")
    p.add_argument("--target-s", type=float, default=0.5, help="timed seconds per variant (3 to 20 repetitions)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: checks this script's logic")
    a = p.parse_args(argv)
    if a.modes is None:
        a.modes = "fwd,fwdbwd,fwddx" if a.cpu_smoke else "fwd,fwdbwd"
    modes = [m for m in a.modes.split(",") if m]
    if not modes or set(modes) - set(MODE_PRODUCTS):
        p.error(f"--modes must be a comma-separated list of fwd, fwdbwd and fwddx, got {a.modes!r}")
    known = set(VARIANTS)
    bad = [v for v in a.variants.split(",") if v and v not in known]
    if bad or not [v for v in a.variants.split(",") if v]:
        p.error(f"--variants must name some of {','.join(VARIANTS)}, got {a.variants!r}")
    for flag, text in (("--ds", a.ds), ("--bs", a.bs)):
        try:
            ok = all(int(v) >= 1 for v in text.split(","))
        except ValueError:
            ok = False
        if not ok:
            p.error(f"{flag} must be a comma-separated list of integers >= 1, got {text!r}")
    if a.units < 1 or a.n < 1:
        p.error(f"--units and --n must be >= 1, got {a.units} and {a.n}")
    if a.cpu_smoke:
        a.ds, a.bs, a.units = "16,20", "64", 4
        a.budget_s = min(a.budget_s, 120.0)
        a.compile_backend = a.compile_backend or "eager"
    a.compile_backend = a.compile_backend or "inductor"
    a.device = "cpu" if a.cpu_smoke else "cuda"
    return a


class Clock:
    """Median / min / max seconds of `fn` after one warm-up call, with device events on CUDA."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def time(self, fn, target_s):
        fn()
        self.sync()
        first = self.once(fn)
        reps = int(min(20, max(3, target_s / max(first, 1e-6))))
        times = [first] + [self.once(fn) for _ in range(reps - 1)]
        return statistics.median(times), min(times), max(times), reps


def gemm_reference(variant, gemm, gemm_tf32):
    """(TFLOP/s ceiling, its name) a variant's rate is compared with: the large GEMM at its precision."""
    if variant in ("fused_tf32", "eager_tf32"):
        return gemm_tf32, "tf32"
    if variant == "fused_3xtf32":  # three TF32 tensor-core products per product
        return gemm_tf32 / 3, "tf32/3"
    return gemm, "fp32"


def like_for_like(variant):
    """The eager baseline of the same precision: eager_tf32 for TF32, eager for float32 and 3xTF32."""
    return "eager_tf32" if variant in ("fused_tf32", "eager_tf32") else "eager"


BASELINES = ("eager", "eager_tf32", "eager_graph", "compile")


def speedups(rows, baseline_ms):
    """speedup_vs_<b> = baseline_ms[b] / ms_median for every timed row ('' where b was not timed)."""
    for r in rows:
        if "ms_median" in r:
            for b in BASELINES:
                r[f"speedup_vs_{b}"] = round(baseline_ms[b] / r["ms_median"], 2) if b in baseline_ms else ""


def sig(x, digits=4):
    """x rounded to `digits` significant digits (rates of tiny CPU-smoke cases stay readable)."""
    return float(f"{x:.{digits}g}")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, d, R, n, device, seed=0):
    """x, weights scaled so that the 1000-unit stack stays O(1) (growth ~ (1 + 1/2R)^R), and dL/dy."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g).to(device)
    w = (torch.randn(R, n, d, d, generator=g) * (R ** -0.25 / math.sqrt(d))).to(device)
    gy = torch.randn(B, d, generator=g).to(device)
    return x, w, gy


def stack_fns(args):
    """name -> f(x, w) -> y for the forward of each variant (CUDA graphs wrap one of these later)."""
    n = args.n

    def fused(x, w):
        return shortcut_ext.residual_stack(x, w, True, *ACTS, backend="fused")

    def eager(x, w):
        return ref.residual_stack_forward(x, w, True, *ACTS)

    def unit(h, wr):  # one residual unit, for regional compilation
        a = h
        for k in range(n):
            a = a @ wr[k].transpose(0, 1)
            if k < n - 1:
                a = torch.relu(a)
        return h + a

    # one graph per (shape, grad mode); the default recompile limit (8) would silently fall back to eager
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    compiled_unit = torch.compile(unit, backend=args.compile_backend, dynamic=False)

    def compiled(x, w):
        # unbind, as eager does (reference.py): indexing w[r] gives each unit's backward its own full-size
        # zero [R, n, d, d] gradient to add into w's, R times a step, outside the compiled region
        h = x
        for wr in w.unbind(0):
            h = compiled_unit(h, wr)
        return h

    return {"fused": fused, "eager": eager, "compile": compiled}


@contextlib.contextmanager
def precision(variant):
    """The switch a variant runs under, around the whole step (the backward reads it too)."""
    if variant in ("fused_tf32", "fused_3xtf32"):
        with shortcut_ext.cuda_tf32(variant.split("_")[1]):
            yield
    elif variant == "eager_tf32":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    elif variant == "fused_atomic":
        os.environ["SHORTCUT_EXT_CUDA_ATOMIC_GRAD"] = "1"
        try:
            yield
        finally:
            os.environ.pop("SHORTCUT_EXT_CUDA_ATOMIC_GRAD", None)
    else:
        yield


def step(f, mode, x, w, gy):
    """The measured work: forward, forward and both gradients, or (fwddx) forward and the input gradient with
    the weights frozen."""
    if mode == "fwd":
        with torch.no_grad():
            return (f(x, w),)
    xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(mode == "fwdbwd")
    y = f(xg, wg)
    return (y.detach(), *torch.autograd.grad(y, (xg, wg) if mode == "fwdbwd" else (xg,), gy))


def eager_reference(f_eager, mode, x, w, gy, rows=16384):
    """Eager outputs computed in row chunks: rows are independent samples and dL/dW sums over them,
    so the check fits in memory where one eager forward+backward of the whole batch would not."""
    ys, gxs, gw = [], [], None
    for s in range(0, x.shape[0], rows):
        outs = step(f_eager, mode, x[s:s + rows], w, gy[s:s + rows])
        ys.append(outs[0])
        if mode != "fwd":
            gxs.append(outs[1])
        if mode == "fwdbwd":
            gw = outs[2] if gw is None else gw + outs[2]
    if mode == "fwd":
        return (torch.cat(ys),)
    return (torch.cat(ys), torch.cat(gxs)) if mode == "fwddx" else (torch.cat(ys), torch.cat(gxs), gw)


def graphed(f, mode, x, w, gy):
    """Capture `step` into a CUDA graph on static inputs; returns replay() -> outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(f, mode, x, w, gy)
    torch.cuda.current_stream().wait_stream(side)
    # the warm-up's cached blocks would stay reserved beside the graph's private pool during capture
    # (eager fwd+bwd at d = 128, B = 65536 keeps ~63 GiB alive: twice that is close to the H200's memory)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(f, mode, x, w, gy)

    def replay():
        graph.replay()
        return outs

    return replay, graph


def open_log(out: str, name: str):
    """log(msg): print and append to OUT/name.log (flushed: a run cut off by its time limit keeps it)."""
    os.makedirs(out, exist_ok=True)
    log_file = open(os.path.join(out, name + ".log"), "a")

    def log(msg=""):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    return log


def start(device: str, out: str, name: str):
    """``(log, clock, environment)`` for a benchmark on ``device``, or ``None`` (said in the log) when a
    CUDA benchmark has no GPU or no CUDA kernels to measure."""
    log = open_log(out, name)
    if device == "cuda" and not torch.cuda.is_available():
        log("no CUDA device: nothing to benchmark (use --cpu-smoke to check the script on CPU)")
        return None
    if device == "cuda" and not shortcut_ext.build_info().get("cuda", False):
        log(f"shortcut_ext was built without CUDA kernels: {shortcut_ext.build_info()}")
        return None
    return log, Clock(device), common.environment()


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    started = start(args.device, args.out, "bench_gpu")
    if started is None:
        return 2
    log, clock, env = started
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        gemm = common.gemm_rate(n=8192, reps=5, device="cuda") / 1e3  # TFLOP/s, fp32 without TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        gemm_tf32 = common.gemm_rate(n=8192, reps=5, device="cuda") / 1e3
        # float32 baselines (eager, eager_graph, compile) run without TF32 whatever the environment set
        # (only the *_tf32 variants switch it on, inside precision()); the old value is logged
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        env.update(device="cpu")
        gemm = gemm_tf32 = common.gemm_rate(n=512, reps=3, device="cpu") / 1e3
    env["gemm_fp32_tflops"] = round(gemm, 3)
    env["gemm_tf32_tflops"] = round(gemm_tf32, 3)
    log(f"environment: {env}")
    log(f"large GEMM: {gemm:.2f} TFLOP/s float32 (TF32 off), {gemm_tf32:.2f} TFLOP/s TF32")
    log("torch.compile baseline: regional (one unit compiled, called R times a step from Python; no CUDA graph)")
    if args.device == "cuda":
        log(f"torch TF32 matmul switch: {old_tf32} at start; off for the float32 baselines")

    fns = stack_fns(args)
    variants = [v for v in args.variants.split(",") if v]
    rows, compile_spent, failures = [], 0.0, 0
    common.RESULTS_DIR = args.out
    name = "bench_gpu" if not args.cpu_smoke else "bench_gpu_cpu_smoke"

    def flush():  # the CSV and JSON as they stand (written whole, then renamed)
        graphs = dict(torch._dynamo.utils.counters.get("stats", {})).get("unique_graphs", 0)
        return common.write_results(name, rows, {"args": vars(args), "gemm_fp32_tflops": gemm,
                                                 "gemm_tf32_tflops": gemm_tf32, "compile_seconds": compile_spent,
                                                 "compiled_graphs": graphs})

    ds = [int(v) for v in args.ds.split(",")]
    bs = [int(v) for v in args.bs.split(",")]
    R, n = args.units, args.n
    for mode in args.modes.split(","):
        for d in ds:
            for B in bs:
                flops = 2.0 * B * d * d * n * R * MODE_PRODUCTS[mode]
                case = dict(mode=mode, d=d, B=B, R=R, n=n, dtype="float32", gflop=sig(flops / 1e9))
                x, w, gy = make_inputs(B, d, R, n, args.device)
                baseline_ms = {}
                in_budget = time.time() - t_start < args.budget_s
                baseline = eager_reference(fns["eager"], mode, x, w, gy) if in_budget else None
                for variant in variants:
                    row = dict(case, variant=variant)
                    elapsed = time.time() - t_start
                    if elapsed > args.budget_s:
                        rows.append(dict(row, note=f"skipped: time budget {args.budget_s:.0f}s used"))
                        continue
                    if variant in ("eager_graph", "fused_atomic") and args.device != "cuda":
                        rows.append(dict(row, note="skipped: needs a GPU"))
                        continue
                    if variant == "fused_atomic" and mode != "fwdbwd":
                        rows.append(dict(row, note=f"skipped: {mode} has no weight gradients"))
                        continue
                    if variant == "compile" and compile_spent >= args.compile_budget_s:
                        rows.append(dict(row, note=f"skipped: compile budget {args.compile_budget_s:.0f}s used"))
                        continue
                    if variant == "compile" and args.budget_s - elapsed < 30 and not args.cpu_smoke:
                        # a compile started this late could outlive the caller's timeout (run.sh gives 30 s
                        # past the budget): one unit's graph takes seconds to tens of seconds
                        rows.append(dict(row, note="skipped: under 30 s of the time budget left for a compile"))
                        continue
                    try:
                        if args.device == "cuda":
                            gc.collect()
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats()
                        t0 = time.time()
                        if variant == "eager_graph":
                            run, graph = graphed(fns["eager"], mode, x, w, gy)
                        else:
                            def run(f=fns[variant.split("_")[0]], variant=variant):
                                with precision(variant):
                                    return step(f, mode, x, w, gy)
                        if variant.startswith("fused") and args.device == "cuda":
                            os.environ["SHORTCUT_EXT_CUDA_VERBOSE"] = "1"  # the chosen kernels, once per case
                        outs = run()
                        clock.sync()
                        os.environ.pop("SHORTCUT_EXT_CUDA_VERBOSE", None)
                        setup_s = time.time() - t0
                        if variant == "compile":
                            compile_spent += setup_s
                            row["compile_s"] = round(setup_s, 1)
                        # check before timing, against eager PyTorch on the same inputs
                        err = common.worst_error(rel_err(a, b) for a, b in zip(outs, baseline))
                        row["rel_err_vs_eager"] = f"{err:.2e}"
                        agree = AGREE_TF32 if variant.endswith("_tf32") else AGREE
                        if not err < agree:
                            failures += 1
                            rows.append(dict(row, note=f"MISMATCH: relative error {err:.2e} >= {agree}"))
                            log(f"{mode} d={d} B={B} {variant}: MISMATCH {err:.2e}")
                            continue
                        med, lo, hi, reps = clock.time(run, args.target_s)
                        rate, rate_name = gemm_reference(variant, gemm, gemm_tf32)
                        row.update(ms_median=sig(med * 1e3, 6), ms_min=sig(lo * 1e3, 6), ms_max=sig(hi * 1e3, 6),
                                   reps=reps, tflops=sig(flops / med / 1e12),
                                   pct_of_gemm=sig(100 * flops / med / 1e12 / rate, 3), gemm_ref=rate_name)
                        if args.device == "cuda":
                            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                        if variant in BASELINES:
                            baseline_ms[variant] = med * 1e3
                        rows.append(row)
                    except torch.cuda.OutOfMemoryError as e:  # eager fwd+bwd at B=65536 saves ~2*R*B*d floats
                        rows.append(dict(row, note=f"skipped: out of memory ({str(e).splitlines()[0][:80]})"))
                    except Exception as e:  # a failed baseline must not hide the others
                        failures += 1
                        rows.append(dict(row, note=f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                    finally:
                        os.environ.pop("SHORTCUT_EXT_CUDA_VERBOSE", None)
                        # a mismatch or failure leaves them too: a captured graph's private pool must not stay
                        # reserved into the next variants (eager fwd+bwd at d = 128, B = 65536 holds ~63 GiB)
                        outs = run = graph = None
                        flush()  # after every variant: a run cut short keeps every row it measured
                speedups(rows[-len(variants):], baseline_ms)
                for r_ in rows[-len(variants):]:
                    base = like_for_like(r_["variant"])
                    log(f"{mode:7s} d={d:4d} B={B:6d} {r_['variant']:12s} "
                        + (f"{r_['ms_median']:10.3f} ms  {r_['tflops']:7.2f} TFLOP/s  {r_['pct_of_gemm']:5.1f}% "
                           f"{r_['gemm_ref']} GEMM  x{r_.get('speedup_vs_' + base, '')} vs {base}  "
                           f"x{r_.get('speedup_vs_compile', '')} vs compile (float32)  err {r_['rel_err_vs_eager']}"
                           if "ms_median" in r_ else r_.get("note", "")))
                del x, w, gy, baseline
                flush()

    graphs = dict(torch._dynamo.utils.counters.get("stats", {})).get("unique_graphs", 0)
    log(f"torch.compile: {graphs} graphs compiled in {compile_spent:.0f}s (one per shape and grad mode expected)")
    csv_path, json_path = flush()
    log(f"wrote {csv_path} and {json_path} ({len(rows)} rows) in {time.time() - t_start:.0f}s")
    log(_table(rows))
    return 1 if failures else 0


def _table(rows):
    """A short summary: median ms per variant, one line per case."""
    cases, variants = {}, []
    for r in rows:
        key = (r["mode"], r["d"], r["B"])
        cases.setdefault(key, {})[r["variant"]] = f"{r['ms_median']:.2f}" if "ms_median" in r else "-"
        if r["variant"] not in variants:
            variants.append(r["variant"])
    head = f"{'mode':7s} {'d':>4s} {'B':>6s} " + " ".join(f"{v:>12s}" for v in variants) + "   (median ms)"
    lines = [head] + [f"{m:7s} {d:4d} {B:6d} " + " ".join(f"{c.get(v, '-'):>12s}" for v in variants)
                      for (m, d, B), c in cases.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
