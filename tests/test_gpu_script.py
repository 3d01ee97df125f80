"""The GPU check (benchmarks/gpu/): run.sh parses, and both GPU benchmarks run their whole logic on the
CPU (--cpu-smoke: tiny sizes, every variant checked against eager PyTorch before it is timed), so that
a session with a GPU does not spend its minutes on a script error."""
from __future__ import annotations

import csv
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


@pytest.mark.skipif(not shortcut_ext.is_built(), reason="shortcut_ext._C is not built")
@pytest.mark.parametrize("script, name, rows", [("bench_gpu.py", "bench_gpu_cpu_smoke", 32),
                                                ("bench_gpu_hvp.py", "bench_gpu_hvp_cpu_smoke", 12)])
def test_gpu_benchmark_cpu_smoke(tmp_path, script, name, rows):
    r = subprocess.run([sys.executable, str(GPU / script), "--cpu-smoke", "--out", str(tmp_path)],
                       env=_env(), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(tmp_path / f"{name}.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == rows
    notes = [row.get("note", "") for row in table]
    assert not any(n.startswith(("MISMATCH", "ERROR")) for n in notes), notes
    timed = [row for row in table if row.get("ms_median") or row.get("ms_per_hvp")]
    assert timed and all(float(row.get("ms_median") or row.get("ms_per_hvp")) > 0 for row in timed)
    assert (tmp_path / f"{name}.json").stat().st_size > 0


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
    assert r.stdout.count("ok ") == 15, r.stdout


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

    ops, V = bench_readout_hvp.make_operators(units=3, width=4, targets=6, batch=8, k=2)
    if fused_hvp_available():
        assert ops["fused"].backend_used == "fused" and ops["autograd"].backend_used == "autograd"
        assert V.shape == (ops["fused"].P, 2)
    else:
        assert ops is None
