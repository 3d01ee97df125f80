"""The GPU check (benchmarks/gpu/): run.sh parses, and both GPU benchmarks run their whole logic on the
CPU (--cpu-smoke: tiny sizes, every variant checked against eager PyTorch before it is timed), so that
a session with a GPU does not spend its minutes on a script error."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import shortcut_ext

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "benchmarks" / "gpu"


def _env():
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(shortcut_ext.__file__)))  # the package under test
    return dict(os.environ, PYTHONPATH=os.pathsep.join([pkg_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
                OUT="")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_parses():
    r = subprocess.run(["bash", "-n", str(GPU / "run.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """smoke(script) -> (rows of its CSV, its JSON, its log): each benchmark run once with --cpu-smoke."""
    if not shortcut_ext.is_built():
        pytest.skip("shortcut_ext._C is not built")
    done = {}

    def run(script):
        if script not in done:
            out = tmp_path_factory.mktemp(script.replace(".py", ""))
            r = subprocess.run([sys.executable, str(GPU / script), "--cpu-smoke", "--out", str(out)],
                               env=_env(), capture_output=True, text=True, cwd=out, timeout=600)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            name = script.replace(".py", "_cpu_smoke")
            with open(out / f"{name}.csv") as f:
                table = list(csv.DictReader(f))
            with open(out / f"{name}.json") as f:
                meta = json.load(f)
            done[script] = table, meta, "".join(f.read_text() for f in sorted(out.glob("*.log")))
        return done[script]

    return run


@pytest.mark.parametrize("script, rows", [("bench_gpu.py", 48), ("bench_gpu_hvp.py", 14)])
def test_gpu_benchmark_cpu_smoke(smoke, script, rows):
    table, meta, _ = smoke(script)
    assert len(table) == rows and len(meta["rows"]) == rows
    notes = [row.get("note", "") for row in table]
    assert not any(n.startswith(("MISMATCH", "ERROR")) for n in notes), notes
    timed = [row for row in table if row.get("ms_median") or row.get("ms_per_hvp")]
    assert timed and all(float(row.get("ms_median") or row.get("ms_per_hvp")) > 0 for row in timed)


@pytest.fixture
def gpu_benchmarks(monkeypatch):
    """The modules bench_gpu, bench_gpu_hvp, bench_hvp and common, importable; common.RESULTS_DIR restored."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(GPU))
    import bench_gpu
    import bench_gpu_hvp
    import bench_hvp
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", common.RESULTS_DIR)
    return bench_gpu, bench_gpu_hvp, bench_hvp, common


def test_gpu_benchmark_counts_flops_as_torch_does(smoke, gpu_benchmarks):
    """gflop, tflops and pct_of_gemm of every row against torch's FLOP counter run on the eager step (the rates
    the GPU run will quote): a forward+backward counted as 2x, a layer per unit left out, or TFLOP/s in the wrong
    unit would pass the smoke run above."""
    from torch.utils.flop_counter import FlopCounterMode

    bench_gpu = gpu_benchmarks[0]
    table, meta, _ = smoke("bench_gpu.py")
    fns = bench_gpu.stack_fns(bench_gpu.parse_args(["--cpu-smoke"]))
    counted = {}
    for row in table:
        key = (row["mode"], int(row["B"]), int(row["d"]), int(row["R"]), int(row["n"]))
        if key not in counted:
            x, w, gy = bench_gpu.make_inputs(*key[1:], "cpu")
            with FlopCounterMode(display=False) as fc:
                bench_gpu.step(fns["eager"], row["mode"], x, w, gy)
            counted[key] = fc.get_total_flops()
        flops = counted[key]
        assert float(row["gflop"]) == pytest.approx(flops / 1e9, rel=1e-3), row
        if row.get("ms_median"):
            rate = flops / (float(row["ms_median"]) / 1e3) / 1e12
            assert float(row["tflops"]) == pytest.approx(rate, rel=2e-3), row
            ceiling = {"fp32": meta["gemm_fp32_tflops"], "tf32": meta["gemm_tf32_tflops"],
                       "tf32/3": meta["gemm_tf32_tflops"] / 3}[row["gemm_ref"]]
            assert float(row["pct_of_gemm"]) == pytest.approx(100 * rate / ceiling, rel=1e-2), row
    assert {k[0] for k in counted} == {"fwd", "fwdbwd", "fwddx"} and len({k[2] for k in counted}) == 2


def test_gpu_benchmark_ratios_and_ceilings(smoke, gpu_benchmarks):
    """Each ratio is the baseline's median over the row's (above 1: faster), per case; each variant is compared
    with the GEMM ceiling of its precision (3xTF32 issues three TF32 products per product), and the log names
    the like-for-like baseline (TF32 against eager_tf32, not float32 eager)."""
    bench_gpu = gpu_benchmarks[0]
    assert bench_gpu.gemm_reference("fused_tf32", 10.0, 40.0) == (40.0, "tf32")
    assert bench_gpu.gemm_reference("eager_tf32", 10.0, 40.0) == (40.0, "tf32")
    assert bench_gpu.gemm_reference("fused_3xtf32", 10.0, 45.0) == (15.0, "tf32/3")
    for v in ("fused", "fused_atomic", "eager", "eager_graph", "compile"):
        assert bench_gpu.gemm_reference(v, 10.0, 40.0) == (10.0, "fp32")
        assert bench_gpu.like_for_like(v) == "eager"
    assert bench_gpu.like_for_like("fused_tf32") == "eager_tf32" and bench_gpu.like_for_like("fused_3xtf32") == "eager"
    table, _, log = smoke("bench_gpu.py")
    timed = [r for r in table if r.get("ms_median")]
    by_case = {}
    for r in timed:
        by_case.setdefault((r["mode"], r["d"], r["B"]), {})[r["variant"]] = float(r["ms_median"])
    for r in timed:
        case = by_case[r["mode"], r["d"], r["B"]]
        assert {"eager", "eager_tf32", "compile"} <= set(case), case
        for base in ("eager", "eager_tf32", "compile"):
            assert float(r[f"speedup_vs_{base}"]) == pytest.approx(case[base] / float(r["ms_median"]), rel=0.01,
                                                                   abs=0.006), (base, r)
        assert r["speedup_vs_eager_graph"] == ""  # not timed on the CPU
        assert float(r["ms_min"]) <= float(r["ms_median"]) <= float(r["ms_max"])
    for line in log.splitlines():
        if " ms " in line and "fused_tf32" in line:
            assert " vs eager_tf32 " in line and "vs compile (float32)" in line, line
        elif " ms " in line and " fused " in line:
            assert " vs eager " in line, line
    assert "regional" in log


def test_gpu_benchmark_compiles_one_graph_per_shape(smoke):
    """The compile variant must run compiled code (one graph per width and grad mode: no grad, both gradients,
    the input gradient only), not the eager unit."""
    assert smoke("bench_gpu.py")[1]["compiled_graphs"] == 6


def test_gpu_benchmark_clock(gpu_benchmarks, monkeypatch):
    """Clock.time: one untimed warm-up call, then the median of at least 3 timed calls (the first of them slow)."""
    bench_gpu = gpu_benchmarks[0]
    now = [0.0]
    monkeypatch.setattr(bench_gpu.time, "perf_counter", lambda: now[0])
    durations = iter([5.0, 0.01, 0.01, 0.04] + [0.0] * 50)
    calls = []

    def fn():
        calls.append(1)
        now[0] += next(durations)

    med, lo, hi, reps = bench_gpu.Clock("cpu").time(fn, target_s=1e-3)
    assert (reps, len(calls)) == (3, 4)
    assert (med, lo, hi) == pytest.approx((0.01, 0.01, 0.04))


def test_gemm_rate_counts_2n3(gpu_benchmarks, monkeypatch):
    common = gpu_benchmarks[3]
    now = [0.0]
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])
    import torch

    real = torch.matmul

    def slow(a, b):
        now[0] += 0.5
        return real(a, b)

    monkeypatch.setattr(torch, "matmul", slow)
    assert common.gemm_rate(n=64, reps=3) == pytest.approx(2 * 64 ** 3 / 0.5 / 1e9)


def test_gpu_benchmark_precision_switches(gpu_benchmarks):
    import torch

    bench_gpu = gpu_benchmarks[0]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with bench_gpu.precision("eager_tf32"):
            assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    with bench_gpu.precision("fused_atomic"):
        assert os.environ["SHORTCUT_EXT_CUDA_ATOMIC_GRAD"] == "1"
    assert "SHORTCUT_EXT_CUDA_ATOMIC_GRAD" not in os.environ


@pytest.mark.skipif(not shortcut_ext.is_built(), reason="shortcut_ext._C is not built")
@pytest.mark.parametrize("poison", ["scaled", "nan_in_last_row"])
def test_gpu_benchmark_refuses_a_wrong_variant(tmp_path, gpu_benchmarks, monkeypatch, poison):
    """A variant 1% off, or with a NaN in its last row, is a MISMATCH (not timed) and fails the run."""
    import math

    import torch

    bench_gpu = gpu_benchmarks[0]
    real = bench_gpu.stack_fns

    def fns(args):
        f = real(args)
        fused = f["fused"]

        def bad(x, w):
            y = fused(x, w)
            return y * 1.01 if poison == "scaled" else torch.cat([y[:-1], torch.full_like(y[-1:], math.nan)])

        return dict(f, fused=bad)

    monkeypatch.setattr(bench_gpu, "stack_fns", fns)
    rc = bench_gpu.main(["--cpu-smoke", "--variants", "fused,eager", "--modes", "fwd", "--out", str(tmp_path)])
    assert rc == 1
    with open(tmp_path / "bench_gpu_cpu_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    fused = [r for r in rows if r["variant"] == "fused"]
    assert fused and all(r["note"].startswith("MISMATCH") and not r.get("ms_median") for r in fused), fused


def test_gpu_hvp_benchmark_ratios(smoke):
    table, _, _ = smoke("bench_gpu_hvp.py")
    timed = [r for r in table if r.get("ms_per_hvp")]
    assert timed
    for r in timed:
        k = int(r["k"])
        assert k == (1 if r["variant"].endswith("_k1") else 16), r
        assert float(r["ms_per_hvp"]) == pytest.approx(float(r["ms_call_median"]) / k, rel=1e-4)
        base = next(b for b in timed if (b["d"], b["B"], b["R"], b["variant"]) == (r["d"], r["B"], r["R"],
                                                                                   "double_backward_k1"))
        assert float(r["speedup_per_hvp_vs_double_backward"]) == pytest.approx(
            float(base["ms_per_hvp"]) / float(r["ms_per_hvp"]), rel=0.01, abs=0.006), r


@pytest.mark.skipif(not shortcut_ext.is_built(), reason="shortcut_ext._C is not built")
@pytest.mark.parametrize("poison", ["nan", "wrong"])
def test_gpu_hvp_benchmark_checks_the_last_direction(tmp_path, gpu_benchmarks, monkeypatch, poison):
    """The batched variants are checked on their last direction too: a NaN or a wrong product there fails."""
    import math

    _, bench_gpu_hvp, bench_hvp, _ = gpu_benchmarks
    real = bench_hvp.variant_fn

    def variant_fn(name, x, y, w, V):
        fn = real(name, x, y, w, V)

        def bad():
            out = fn().clone()
            out[-1] = math.nan if poison == "nan" else out[-1] * 1.5
            return out

        return bad if name == "is_grads_batched_k16" else fn

    monkeypatch.setattr(bench_hvp, "variant_fn", variant_fn)
    assert bench_gpu_hvp.main(["--cpu-smoke", "--variants", "is_grads_batched_k16", "--out", str(tmp_path)]) == 1
    with open(tmp_path / "bench_gpu_hvp_cpu_smoke.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["note"].startswith("MISMATCH") for r in rows), rows


def test_gpu_benchmark_refuses_bad_problems(tmp_path):
    r = subprocess.run([sys.executable, str(GPU / "bench_gpu_hvp.py"), "--problems", "16x512", "--out", str(tmp_path)],
                       env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "--problems must be d x B x R triples" in r.stderr and "'16x512'" in r.stderr


@pytest.mark.skipif(not shortcut_ext.is_built(), reason="shortcut_ext._C is not built")
def test_sanitizer_case_runs_on_cpu(tmp_path):
    """The small case run.sh hands to compute-sanitizer, with its .cuda() calls dropped: the script is
    valid and its reference checks pass on the CPU kernels."""
    text = (GPU / "run.sh").read_text()
    start = text.index("cat > /tmp/se_sanitize_case.py <<'EOF'\n") + len("cat > /tmp/se_sanitize_case.py <<'EOF'\n")
    case = text[start:text.index("\nEOF\n", start)]
    assert ".cuda()" in case and "check_hvp(" in case
    script = tmp_path / "case.py"
    script.write_text(case.replace(".cuda()", "").replace("torch.cuda.synchronize()", "pass"))
    r = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("ok ") == 20, r.stdout


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_run_sh_publishes_few_files_even_when_it_stops_early(tmp_path):
    """The device tool brings back at most 8 files from $OUT: run.sh keeps its outputs in a work folder
    and publishes run.log, the key tables and one tarball, also when it stops at a failed build."""
    import tarfile

    fake = tmp_path / "python"  # a python whose every call fails: the build stage stops the run
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(fake), TMPDIR=str(tmp_path), SHORTCUT_EXT_GPU_BUDGET_S="60")
    r = subprocess.run(["bash", str(GPU / "run.sh"), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "BUILD FAILED" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["results.tar.gz", "run.log"], files
    with tarfile.open(out / "results.tar.gz") as t:
        assert "./build.log" in t.getnames()


def test_benchmark_checks_fail_on_nan(monkeypatch):
    """The benchmarks' correctness checks took max() over outputs, which keeps a nan only when it comes
    first (a nan in grad_w, or in the last HVP direction, passed); bench_hvp.check compared err > 1e-3."""
    import math

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_hvp
    import common

    assert math.isnan(common.worst_error([0.1, math.nan])) and common.worst_error([0.1, 0.3]) == 0.3
    real = bench_hvp.variant_fn

    def poisoned(name, x, y, w, V):
        fn = real(name, x, y, w, V)
        return lambda: torch.cat([fn()[:-1], torch.full_like(fn()[-1:], math.nan)])

    monkeypatch.setattr(bench_hvp, "variant_fn", poisoned)
    with pytest.raises(AssertionError, match="direction 15 differs from double backward by nan"):
        bench_hvp.check("is_grads_batched_k16", 2)


def test_readout_benchmark_checks_and_runs_small(monkeypatch):
    """benchmarks/bench_readout_hvp.py: its problem builds, runs fused where the kernel is built, and its
    check compares the two backends (a small case; the timing itself is not run here)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_readout_hvp
    from shortcut_ext.curvature.hessian import fused_hvp_available

    monkeypatch.setattr(bench_readout_hvp, "CASES", {"orthonormal": (3, 4, 6, 8, "mse"),
                                                     "classifier": (3, 6, 2, 8, "cross_entropy")})
    for case, in_kernel in (("orthonormal", False), ("classifier", True)):
        ops, V = bench_readout_hvp.make_operators(case, k=2)
        if fused_hvp_available():
            assert ops["fused"].backend_used == "fused" and ops["autograd"].backend_used == "autograd"
            assert (ops["fused"]._kernel_readout is not None) == in_kernel, case
            assert V.shape == (ops["fused"].P, 2)
        else:
            assert ops is None
