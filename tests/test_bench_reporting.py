"""The CPU benchmarks' reporting (benchmarks/*.py): FLOP counts, GFLOP/s, per-HVP division by k, ratios,
medians and IQRs, warm-up, peak memory, extrapolation, and the correctness checks before timing.  Nothing
is timed for real: time.perf_counter is faked, or the timing helpers are replaced, on tiny problems; FLOP
counts are recomputed with torch.utils.flop_counter.FlopCounterMode and ratios from the reported times."""
from __future__ import annotations

import csv
import json
import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import shortcut_ext
from shortcut_ext import reference as ref

ROOT = Path(__file__).resolve().parents[1]
ACTS = ("identity", "relu", "identity")

pytestmark = pytest.mark.skipif(not shortcut_ext.is_built(), reason="shortcut_ext._C is not built")


def _fused():
    from shortcut_ext.curvature.hessian import fused_hvp_available

    return fused_hvp_available()


@pytest.fixture
def bench(monkeypatch):
    """bench(name) -> the module benchmarks/<name>.py, importable; common.RESULTS_DIR restored."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import importlib

    import common

    monkeypatch.setattr(common, "RESULTS_DIR", common.RESULTS_DIR)
    return importlib.import_module


@pytest.fixture
def clock(monkeypatch):
    """A fake time.perf_counter: clock[0] is now; tests advance it."""
    now = [0.0]
    monkeypatch.setattr(time_module(), "perf_counter", lambda: now[0])
    return now


def time_module():
    import time

    return time


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


# ------------------------------------------------------------------------------------------ bench_hvp
def test_hvp_time_variant_warms_up_then_times_each_repeat(bench, clock):
    bench_hvp = bench("bench_hvp")
    durations = iter([7.0, 0.1, 0.2, 0.3])
    calls = []

    def fn():
        calls.append(1)
        clock[0] += next(durations)

    assert bench_hvp.time_variant(fn, 3) == pytest.approx([0.1, 0.2, 0.3])
    assert len(calls) == 4


def test_hvp_main_reports_per_hvp_medians_iqr_and_ratios(bench, clock, monkeypatch, tmp_path):
    """main(): median and inclusive IQR of the repeats, per_hvp_s = median / k, and the speedup =
    double backward's median (k = 1) / the variant's per-HVP time; the CSV says what the JSON says."""
    bench_hvp = bench("bench_hvp")
    times = {"double_backward_k1": [0.01, 0.03, 0.02, 0.05, 0.04],
             "is_grads_batched_k16": [0.08, 0.16, 0.32, 0.16, 0.24]}
    real = bench_hvp.variant_fn

    def fake(name, x, y, w, V):
        fn = real(name, x, y, w, V)
        durations = iter([9.0] + times[name])  # the first call of each instance: check's, or the warm-up

        def run():
            clock[0] += next(durations)
            return fn()
        return run

    monkeypatch.setattr(bench_hvp, "variant_fn", fake)
    monkeypatch.setattr(bench_hvp, "peak_memory_mib", lambda name, units: {"double_backward_k1": 3.5}.get(name, 7.25))
    out = tmp_path / "h.json"
    assert bench_hvp.main(["--units", "2", "--variants", "double_backward_k1", "is_grads_batched_k16",
                           "--repeats", "5", "--threads", str(torch.get_num_threads()), "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    for name, ts in times.items():
        r = rows[name]
        k = 1 if name.endswith("_k1") else 16
        q = statistics.quantiles(ts, n=4, method="inclusive")
        assert r["k"] == k and r["status"] == "ok"
        assert r["median_s"] == pytest.approx(statistics.median(ts))
        assert r["iqr_s"] == pytest.approx([q[0], q[2]])
        assert r["per_hvp_s"] == pytest.approx(statistics.median(ts) / k)
        assert r["speedup_vs_double_backward_per_hvp"] == pytest.approx(0.03 / (statistics.median(ts) / k))
    assert rows["is_grads_batched_k16"]["speedup_vs_double_backward_per_hvp"] == pytest.approx(3.0)
    assert (rows["double_backward_k1"]["peak_rss_mib"], rows["is_grads_batched_k16"]["peak_rss_mib"]) == (3.5, 7.25)
    with open(tmp_path / "h.csv") as f:
        table = {r["variant"]: r for r in csv.DictReader(f)}
    for name, r in rows.items():
        for key in ("median_s", "per_hvp_s", "speedup_vs_double_backward_per_hvp", "peak_rss_mib"):
            assert float(table[name][key]) == pytest.approx(r[key])


@pytest.mark.skipif(not _fused(), reason="the fused HVP kernel is not built")
def test_hvp_act_benchmarks_that_activation_everywhere(bench, monkeypatch, tmp_path):
    """--act tanh: the variants, their check and the memory children all run nets with tanh between each unit's
    layers (the fused products equal double backward's of a tanh net written out here, and differ from a ReLU
    net's); a default run is ReLU again; an unknown activation is refused."""
    bench_hvp = bench("bench_hvp")
    monkeypatch.setattr(bench_hvp, "ACTS", bench_hvp.ACTS)  # restored after the test
    children = []

    def fake_run(cmd, **kw):
        children.append(cmd)
        return SimpleNamespace(returncode=0, stdout="1.5\n", stderr="")

    monkeypatch.setattr(bench_hvp.subprocess, "run", fake_run)
    out = tmp_path / "t.json"
    assert bench_hvp.main(["--act", "tanh", "--units", "3", "--variants", "fused_k1", "--repeats", "1",
                           "--threads", str(torch.get_num_threads()), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["environment"]["activations"] == ["identity", "tanh", "identity"]
    assert rep["results"][0]["status"] == "ok" and rep["results"][0]["peak_rss_mib"] == 1.5
    assert children and children[0][-2:] == ["--act", "tanh"]
    x, y, w, V = bench_hvp.make_problem(3)
    got = bench_hvp.variant_fn("fused_k1", x, y, w, V)()[0]
    for act, same in (("tanh", True), ("relu", False)):
        wr = w.double().requires_grad_(True)
        loss = ref.loss_fn("mse", ref.residual_stack_forward(x.double(), wr, True, "identity", act, "identity"),
                           y.double())
        (g,) = torch.autograd.grad(loss, wr, create_graph=True)
        want = torch.autograd.grad(g, wr, grad_outputs=V[0].double())[0]
        err = float((got.double() - want).abs().max() / want.abs().max())
        assert (err < 1e-4) == same, (act, err)
    assert bench_hvp.main(["--units", "3", "--variants", "fused_k1", "--repeats", "1", "--no-memory",
                           "--threads", str(torch.get_num_threads()), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["environment"]["activations"] == ["identity", "relu", "identity"]
    with pytest.raises(SystemExit):
        bench_hvp.main(["--act", "gelu", "--out", str(out)])
    with pytest.raises(ValueError, match="act must be one of"):
        bench_hvp.set_mid_activation("gelu")


# ------------------------------------------------------------------------------------------ bench_sharpness
@pytest.mark.skipif(not _fused(), reason="the fused HVP kernel is not built")
def test_sharpness_bench_reports_both_lanczos_runs_and_an_epoch(bench, clock, monkeypatch, tmp_path):
    """main(): the fused and autograd sharpness of the same weights agree and took the same products; each row's
    median is of its own calls; autograd / fused and fused / epoch are ratios of those medians; rows are written."""
    bs = bench("bench_sharpness")
    import common
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    real, real_epoch = bs.sharpness, bs.epoch_fn
    cost = {"fused": 0.5, "autograd": 2.0}

    def timed(net, data):
        clock[0] += cost["fused" if net.backend != "torch" else "autograd"]
        return real(net, data)

    def step_fn(net, data):
        fn = real_epoch(net, data)

        def step():
            clock[0] += 0.01
            return fn()
        return step

    monkeypatch.setattr(bs, "sharpness", timed)
    monkeypatch.setattr(bs, "epoch_fn", step_fn)
    assert bs.main(["--units", "3", "--repeats", "2", "--threads", str(torch.get_num_threads())]) == 0
    with open(tmp_path / "sharpness_tanh.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"fused", "autograd", "epoch"}
    f, a, e = rows["fused"], rows["autograd"], rows["epoch"]
    assert float(f["median_s"]) == pytest.approx(0.5) and float(a["median_s"]) == pytest.approx(2.0)
    assert float(e["median_s"]) == pytest.approx(0.01)
    assert float(a["speedup_of_fused"]) == pytest.approx(4.0)
    assert float(f["epochs_per_sharpness"]) == pytest.approx(50.0)
    assert f["products"] == a["products"] and int(f["products"]) >= 2
    assert float(f["per_product_ms"]) == pytest.approx(500.0 / int(f["products"]))
    assert float(f["lam_top"]) == pytest.approx(float(a["lam_top"]), rel=2e-4)
    rep = json.loads((tmp_path / "sharpness_tanh.json").read_text())
    assert rep["act"] == "tanh" and len(rep["rows"]) == 3


def test_sharpness_bench_check_refuses_a_disagreement_or_no_convergence(bench, monkeypatch):
    bs = bench("bench_sharpness")
    answers = iter([{"lam_top": 1.0, "converged": True}, {"lam_top": 1.01, "converged": True},
                    {"lam_top": 1.0, "converged": True}, {"lam_top": 1.0, "converged": False},
                    {"lam_top": float("nan"), "converged": True}, {"lam_top": 1.0, "converged": True}])
    monkeypatch.setattr(bs, "sharpness", lambda net, data: next(answers))
    with pytest.raises(AssertionError, match="differ"):
        bs.check(None, None, None)
    with pytest.raises(AssertionError, match="autograd sharpness did not converge"):
        bs.check(None, None, None)
    with pytest.raises(AssertionError, match="differ"):
        bs.check(None, None, None)
    with pytest.raises(ValueError, match="act must be one of"):
        bs.make_problem(3, "gelu")


_RSS_PEAK_CODE = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import bench_hvp
with bench_hvp.RssPeak() as peak:
    t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    # held until the sampling thread has seen it (on busy cores it can be scheduled too late to see a tensor
    # freed at once: 53 MiB was measured); a sampler that never samples leaves the peak at the base
    deadline = time.monotonic() + 10
    while peak.peak - peak.base < 60 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.005)
    del t
assert 56 <= peak.growth_mib <= 90, peak.growth_mib
assert abs(peak.peak - peak.base - peak.growth_mib * 2**20) < 1, (peak.peak, peak.base, peak.growth_mib)
print("ok")
"""


def test_hvp_peak_memory_measures_growth_in_mib(tmp_path):
    """RssPeak sees a 64 MiB tensor made and freed in its body. In a fresh process, as bench_hvp measures: in the
    suite's own process, memory that earlier tests left for the garbage collector or the allocator to give back
    could be freed during the body and hide the growth (a CI run measured 0.09 MiB)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(shortcut_ext.__file__).resolve().parents[1])]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-c", _RSS_PEAK_CODE, str(ROOT / "benchmarks")], env=env, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.split()[-1:] == ["ok"], (r.stdout[-2000:], r.stderr[-2000:])


# ------------------------------------------------------------------------------- bench_residual_stack
class FakeBenchmark:
    """pytest-benchmark's fixture, enough for test_residual_stack: runs the warm-up and the rounds, and
    reports a fixed median (the mean differs, so that a row built from the mean shows)."""

    def __init__(self, median, iqr):
        self.median, self.iqr, self.calls = median, iqr, 0

    def pedantic(self, fn, rounds, warmup_rounds, iterations):
        for _ in range(warmup_rounds + rounds):
            fn()
            self.calls += 1
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=self.median, iqr=self.iqr, mean=100 * self.median,
                                                           min=self.median / 100))


def _tiny_bench(bench, monkeypatch, name, **attrs):
    """benchmarks/<name>.py at R = 3, B = 8 with fresh rows and ``attrs`` set; its result files are
    captured: -> (module, [(name, rows, extra) of each write])."""
    mod = bench(name)
    for key, value in {"R": 3, "B": 8, "ROWS": [], **attrs}.items():
        monkeypatch.setattr(mod, key, value)
    written = []
    monkeypatch.setattr(mod, "write_results", lambda name, rows, extra: written.append((name, rows, extra)))
    return mod, written


@pytest.fixture
def residual_stack_bench(bench, monkeypatch):
    return _tiny_bench(bench, monkeypatch, "bench_residual_stack", _CACHE={}, _RATE=[1000.0])


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_residual_stack_flops_are_torchs(residual_stack_bench, mode):
    mod, _ = residual_stack_bench
    d = 4
    x, w = mod._inputs(d)
    if mode == "forward":
        counted = _flops(lambda: ref.residual_stack_forward(x, w, True, *ACTS))
    else:
        xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

        def fb():
            y = ref.residual_stack_forward(xg, wg, True, *ACTS)
            torch.autograd.grad(y.square().sum(), (xg, wg))
        counted = _flops(fb)
    assert mod.flops(d, mode) == counted


def test_residual_stack_rows_rates_and_ratios(residual_stack_bench):
    """A row: median_ms = the benchmark's median, gflops = flops / median, its fraction of the GEMM rate,
    and the speedup = eager's median / the row's (the ratios recomputed from the reported times)."""
    mod, written = residual_stack_bench
    d = 4
    medians = {"eager": 4e-9, "fused": 1e-9, "fused_recompute": 2e-9}
    for mode in ("forward", "forward_backward"):
        for impl, med in medians.items():
            if impl == "fused_recompute" and mode == "forward":
                continue
            fb = FakeBenchmark(med, med / 4)
            mod.test_residual_stack(fb, d, mode, impl)
            assert fb.calls == (3 if impl == "eager" else 7) + 1
    rows = written[-1][1]
    assert written[-1][0] == "residual_stack_partial" and written[-1][2]["gemm4096_gflops"] == 1000.0
    assert len(rows) == 5
    for r in rows:
        med = medians[r["impl"]]
        assert r["median_ms"] == pytest.approx(med * 1e3) and r["iqr_ms"] == pytest.approx(med / 4 * 1e3)
        assert r["gflops"] == pytest.approx(mod.flops(d, r["mode"]) / med / 1e9)
        assert r["fraction_of_gemm"] == pytest.approx(r["gflops"] / 1000.0, abs=1e-3)
        assert r["speedup_vs_eager"] == pytest.approx(medians["eager"] / med, abs=0.01)
    assert {r["impl"]: r["speedup_vs_eager"] for r in rows if r["mode"] == "forward"} == {"eager": 1.0, "fused": 4.0}


def test_residual_stack_complete_run_removes_its_partial_files(residual_stack_bench, monkeypatch, tmp_path):
    """Results go to disk after every case: to the partial files until the table is complete, then to the
    complete ones, and the partial files of the run (stale by then) are removed; an incomplete run leaves the
    complete files alone."""
    mod, written = residual_stack_bench

    def write(name, rows, extra):
        written.append((name, rows, extra))
        paths = [tmp_path / f"{name}.{ext}" for ext in ("csv", "json")]
        for p in paths:
            p.write_text(str(len(rows)))
        return tuple(map(str, paths))

    monkeypatch.setattr(mod, "write_results", write)
    monkeypatch.setattr(mod, "_FULL", {("d=4 forward", "eager"), ("d=4 forward", "fused")})
    row = {"d": 4, "mode": "forward", "median_ms": 1.0, "iqr_ms": 0.1, "gflops": 1.0}
    mod.ROWS.append({"case": "d=4 forward", "impl": "eager", **row})
    mod._finish_rows(1000.0)
    assert written[-1][0] == "residual_stack_partial"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["residual_stack_partial.csv", "residual_stack_partial.json"]
    mod.ROWS.append({"case": "d=4 forward", "impl": "fused", **row})
    mod._finish_rows(1000.0)
    assert written[-1][0] == "residual_stack"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["residual_stack.csv", "residual_stack.json"]


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
def test_residual_stack_refuses_a_wrong_output(residual_stack_bench, monkeypatch, mode):
    """The fused output is compared with eager before timing (the output itself, not only its gradients)."""
    mod, _ = residual_stack_bench
    real = mod.residual_stack
    monkeypatch.setattr(mod, "residual_stack", lambda *a, **k: real(*a, **k) + 0.5)  # gradients unchanged
    mod.test_residual_stack(FakeBenchmark(1e-9, 1e-10), 4, mode, "eager")
    with pytest.raises(AssertionError):
        mod.test_residual_stack(FakeBenchmark(1e-9, 1e-10), 4, mode, "fused")


# ------------------------------------------------------------------------------------ bench_gemm_ceiling
def test_gemm_ceiling_median_warms_up_once(bench, clock):
    mod = bench("bench_gemm_ceiling")
    durations = iter([5.0, 0.3, 0.1, 0.2, 0.9, 0.4])
    calls = []

    def fn():
        calls.append(1)
        clock[0] += next(durations)

    assert mod._median_s(fn, 5) == pytest.approx(0.3) and len(calls) == 6


def test_gemm_ceiling_fused_rates_count_torchs_flops(bench, monkeypatch, tmp_path):
    mod = bench("bench_gemm_ceiling")
    t = {"s": 1e-6}
    monkeypatch.setattr(mod, "_median_s", lambda fn, reps: t["s"])
    monkeypatch.setattr(mod, "gemm_rate", lambda: 123.0)
    monkeypatch.setattr(mod, "environment", lambda: {})
    monkeypatch.setattr(mod, "load_inline", lambda *a, **k: SimpleNamespace(brgemm_rate=lambda *a: 42.0))
    out = tmp_path / "g.json"
    monkeypatch.setattr("sys.argv", ["bench_gemm_ceiling.py", "--units", "2", "--out", str(out)])
    old = torch.get_num_threads()
    try:
        mod.main()
    finally:
        torch.set_num_threads(old)
    res = json.loads(out.read_text())
    assert res["gemm4096_gflops"] == {"1": 123.0, "2": 123.0}
    for d in (64, 128):
        x, w = torch.randn(256, d), torch.randn(2, 2, d, d)
        fwd = _flops(lambda: ref.residual_stack_forward(x, w, True, *ACTS))
        xg, wg = x.requires_grad_(), w.requires_grad_()
        y = ref.residual_stack_forward(xg, wg, True, *ACTS)
        bwd = _flops(lambda: torch.autograd.grad(y, (xg, wg), torch.randn_like(y)))
        rates = {r["what"]: r["gflops"] for r in res["rows"] if r["d"] == d}
        assert rates["fused forward, no save, 1 thread"] == pytest.approx(fwd / t["s"] / 1e9, abs=0.1)
        assert rates["fused forward saving layer inputs, 1 thread"] == pytest.approx(fwd / t["s"] / 1e9, abs=0.1)
        assert rates["fused backward from layer inputs, 1 thread"] == pytest.approx(bwd / t["s"] / 1e9, abs=0.1)
        assert sum(v == 42.0 for v in rates.values()) == 3


# ---------------------------------------------------------------------------------------- bench_spectrum
SPECTRUM_ARGS = ["--units", "4", "--samples", "16", "--probes", "2", "--steps", "4", "--top", "1",
                 "--lanczos-products", "12", "--extrapolate-units", "12"]


def test_spectrum_totals_plan_and_extrapolation(bench, tmp_path):
    """Totals are the phases' sums (setup included), the quiet estimate is CPU time / threads, the plan's
    basis sizes are vectors * P * itemsize, and the extrapolation scales time by f and the RSS above the
    base by f."""
    mod = bench("bench_spectrum")
    out = tmp_path / "s.json"
    assert mod.main(SPECTRUM_ARGS + ["--out", str(out)]) == 0
    res = json.loads(out.read_text())
    phases = ("setup", "lanczos", "slq")
    t, P = res["total"], res["num_params"]
    assert t["wall_s"] == pytest.approx(sum(res[k]["wall_s"] for k in phases))
    assert t["cpu_s"] == pytest.approx(sum(res[k]["cpu_s"] for k in phases))
    assert t["quiet_wall_estimate_s"] == pytest.approx(t["cpu_s"] / torch.get_num_threads())
    assert t["peak_rss_sampled_mib"] == max(res[k]["peak_rss_mib"] for k in ("lanczos", "slq"))
    assert t["products"] == res["lanczos"]["products"] + res["slq"]["products"] + 1  # + the warm-up product
    assert res["lanczos"]["products"] > 0 and res["slq"]["products"] > 0
    plan = res["plan"]
    assert plan["lanczos_basis_gib"] == pytest.approx(plan["lanczos_vectors"] * P * 4 / 2**30)
    assert plan["slq_basis_gib"] == pytest.approx(plan["slq_probe_batch"] * 4 * P * 4 / 2**30)
    for k in ("lanczos", "slq"):
        ph = res[k]
        assert ph["peak_rss_growth_mib"] == pytest.approx(ph["peak_rss_mib"] - ph["rss_at_start_mib"])
    est, base, f = res["extrapolated"], res["rss_base_mib"], 3.0
    assert est["factor"] == f
    for k in ("lanczos", "slq", "total"):
        assert est[k]["wall_s"] == pytest.approx(f * res[k]["wall_s"])
        assert est[k]["quiet_wall_s"] == pytest.approx(f * res[k]["cpu_s"] / torch.get_num_threads())
    for k in ("lanczos", "slq"):
        assert est[k]["peak_rss_mib"] == pytest.approx(base + f * (res[k]["peak_rss_mib"] - base))
    assert est["peak_rss_mib"] == pytest.approx(base + f * (t["peak_rss_sampled_mib"] - base))


def test_spectrum_phase_times_come_from_the_clock(bench, monkeypatch):
    mod = bench("bench_spectrum")
    now = [10.0]
    monkeypatch.setattr(mod.time, "perf_counter", lambda: now[0])
    op = SimpleNamespace(num_products=5)
    with mod.Phase("x", op, lambda: None) as ph:
        now[0] += 2.5
        op.num_products += 7
    assert ph.info["wall_s"] == pytest.approx(2.5) and ph.info["products"] == 7


@pytest.mark.skipif(not _fused(), reason="the fused HVP kernel is not built")
def test_spectrum_refuses_a_wrong_fused_product(bench, monkeypatch, tmp_path):
    """1% off fails the float32 check (a nan never reaches it: HessianOperator refuses non-finite products)."""
    mod = bench("bench_spectrum")
    real = mod.HessianOperator.matmat

    def poisoned(self, V):
        return real(self, V) * (1.01 if self.backend_used == "fused" else 1.0)

    monkeypatch.setattr(mod.HessianOperator, "matmat", poisoned)
    with pytest.raises(SystemExit, match="disagrees"):
        mod.main(SPECTRUM_ARGS + ["--out", str(tmp_path / "s.json")])


# ---------------------------------------------------------------------------------------- bench_readout_hvp
_SMALL_READOUT = {"orthonormal": (3, 4, 6, 8, "mse"), "classifier": (3, 6, 2, 8, "cross_entropy")}


def _small_readout(mod, monkeypatch):
    monkeypatch.setattr(mod, "CASES", _SMALL_READOUT)


@pytest.mark.skipif(not _fused(), reason="the fused HVP kernel is not built")
def test_readout_main_reports_median_ratio(bench, monkeypatch, capsys):
    """main(): the median of 7 timed calls after a warm-up, per backend, and the ratio autograd / fused."""
    mod = bench("bench_readout_hvp")
    _small_readout(mod, monkeypatch)
    from shortcut_ext.curvature import HessianOperator

    now = [0.0]
    monkeypatch.setattr(mod.time, "perf_counter", lambda: now[0])
    per_call = {"fused": [50.0] + [0.001, 0.002, 0.002, 0.004, 0.002, 0.003, 0.009],
                "autograd": [50.0] + [0.006, 0.006, 0.012, 0.006, 0.001, 0.007, 0.020]}
    seq = {}
    real = HessianOperator.matmat

    def timed(self, V):
        out = real(self, V)
        it = seq.get(id(self))
        if it is not None:
            now[0] += next(it)
        return out

    def fresh_ops(case, k=1, _mk=mod.make_operators):
        seq.clear()  # the last problem's operators are gone, and a new one may get an old one's id
        ops, V = _mk(case, k=k)
        for be, op in ops.items():
            seq[id(op)] = iter(per_call[be])
        return ops, V

    monkeypatch.setattr(HessianOperator, "matmat", timed)
    monkeypatch.setattr(mod, "make_operators", fresh_ops)
    monkeypatch.setattr(mod.common, "environment", lambda: {})
    old = torch.get_num_threads()
    try:
        assert mod.main() == 0
    finally:
        torch.set_num_threads(old)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ", k = " in ln]
    assert [ln.split(",")[0] for ln in lines] == ["orthonormal"] * 2 + ["classifier"] * 2, lines
    for line in lines:
        assert "fused 2.0 ms, autograd 6.0 ms per call (median of 7): autograd / fused = 3.0x" in line, line


@pytest.mark.skipif(not _fused(), reason="the fused HVP kernel is not built")
@pytest.mark.parametrize("case", list(_SMALL_READOUT))
def test_readout_check_refuses_a_wrong_product(bench, monkeypatch, case):
    mod = bench("bench_readout_hvp")
    _small_readout(mod, monkeypatch)
    from shortcut_ext.curvature import HessianOperator

    real = HessianOperator.matmat
    monkeypatch.setattr(HessianOperator, "matmat",
                        lambda self, V: real(self, V) * (1.01 if self.backend_used == "fused" else 1.0))
    with pytest.raises(AssertionError, match="differ"):
        mod.make_operators(case, k=2)


@pytest.mark.skipif(not _fused(), reason="the fused HVP kernel is not built")
@pytest.mark.parametrize("case", list(_SMALL_READOUT))
def test_readout_check_refuses_a_nan_product(bench, monkeypatch, case):
    mod = bench("bench_readout_hvp")
    _small_readout(mod, monkeypatch)
    from shortcut_ext.curvature import HessianOperator

    real = HessianOperator.matmat

    def poisoned(self, V):
        out = real(self, V)
        return out.index_fill(0, torch.tensor([out.shape[0] - 1]), math.nan) if self.backend_used == "fused" else out

    monkeypatch.setattr(HessianOperator, "matmat", poisoned)
    with pytest.raises(AssertionError, match="differ"):
        mod.make_operators(case, k=2)


# ------------------------------------------------------------------------------------------ bench_float64
def test_float64_bench_variants_agree_and_ratios_are_per_product(bench):
    """benchmarks/bench_float64.py on a tiny problem: for every mode the fused call returns what eager does (the
    check it makes before timing), and the reported ratios divide per-product times: an HVP call with k = 4 counts
    4 products, against eager with the same k and against eager with one direction."""
    b64 = bench("bench_float64")
    assert [b64.directions(m) for m in b64.MODES] == [1, 1, 1, 4]
    for mode in b64.MODES:
        fused = b64.make("fused", 5, mode, units=3, batch=7)()
        eager = b64.make("eager", 5, mode, units=3, batch=7)()
        assert len(fused) == len(eager) == (1 if mode == "forward" else 3)
        for a, b in zip(fused, eager):
            assert a.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    rows = [{"case": f"d=5 {m}", "impl": i, "d": 5, "mode": m, "median_ms": t}
            for m, i, t in (("forward", "eager", 10.0), ("forward", "fused", 2.0), ("hvp_k1", "eager", 30.0),
                            ("hvp_k1", "fused", 6.0), ("hvp_k4", "eager", 80.0), ("hvp_k4", "fused", 8.0))]
    b64.finish_rows(rows)
    got = {(r["mode"], r["impl"]): r for r in rows}
    assert got[("hvp_k4", "fused")]["per_product_ms"] == 2.0
    assert got[("hvp_k4", "fused")]["speedup_vs_eager"] == 10.0  # 20 ms per eager product / 2
    assert got[("hvp_k4", "fused")]["speedup_vs_eager_k1"] == 15.0  # 30 ms, eager's one-direction product / 2
    assert got[("forward", "fused")]["speedup_vs_eager"] == 5.0 and "speedup_vs_eager_k1" not in got[("forward", "fused")]


# ---------------------------------------------------------------------------------------- build_step_times
def test_build_step_times_rows_and_json(bench, monkeypatch, tmp_path, capsys):
    """One row per (dtype, d, activation) with the step's and the forward's medians and rates, and one per
    (dtype, directions) with ms per product (the call's median / k); the JSON holds the build and the rows."""
    mod = bench("build_step_times")
    monkeypatch.setattr(mod, "STEP_CASES", ((3, 2),))
    monkeypatch.setattr(mod, "HVP_CASE", (4, 3, 8))
    monkeypatch.setattr(mod, "median_time", lambda f, repeats: (f(), 0.002)[1])
    old = torch.get_num_threads()
    try:
        rows = mod.main(["--batch", "5", "--repeats", "1", "--out", str(tmp_path / "t.json")])
    finally:
        torch.set_num_threads(old)
    steps = [r for r in rows if "step_ms" in r]
    hvps = [r for r in rows if "hvp_ms_per_product" in r]
    assert [(r["dtype"], r["d"], r["act"]) for r in steps] == [
        (dt, 3, act) for dt in ("float32", "float64") for act in ("relu", "tanh")]
    for r in steps:
        assert r["step_ms"] == r["forward_ms"] == 2.0
        flop = 2.0 * 5 * 3 * 3 * 2 * 2
        assert r["forward_gflops"] == pytest.approx(flop / 0.002 / 1e9) and r["step_gflops"] == pytest.approx(3 * r["forward_gflops"])
    assert [(r["dtype"], r["directions"], r["hvp_ms_per_product"]) for r in hvps] == [
        ("float32", 1, 2.0), ("float32", 16, 2.0 / 16), ("float64", 1, 2.0), ("float64", 16, 2.0 / 16)]
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["rows"] == rows and saved["build"]["cpu_gemm"] == shortcut_ext.build_info()["cpu_gemm"]
    assert saved["threads"] == 1
    assert "build:" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["step", "hvp"])
def test_build_step_times_refuses_a_wrong_kernel(bench, monkeypatch, what):
    """A build whose kernels answer wrong (here: a gradient or products 1% off, or NaN) stops the script before
    anything is timed."""
    mod = bench("build_step_times")
    monkeypatch.setattr(mod, "STEP_CASES", ((3, 2),))
    monkeypatch.setattr(mod, "HVP_CASE", (4, 3, 8))
    timed = []
    monkeypatch.setattr(mod, "median_time", lambda f, repeats: timed.append(1) or 0.001)
    if what == "step":
        real = mod._C.mse_step
        monkeypatch.setattr(mod, "_C", SimpleNamespace(mse_step=lambda *a: (real(*a)[0], real(*a)[1] * 1.01)))
    else:
        real_hvp = torch.ops.shortcut_ext.residual_stack_hvp
        fake = SimpleNamespace(shortcut_ext=SimpleNamespace(
            residual_stack_hvp=lambda *a: (*real_hvp(*a)[:2], real_hvp(*a)[2] * float("nan")),
            residual_stack_forward=torch.ops.shortcut_ext.residual_stack_forward))
        monkeypatch.setattr(mod.torch, "ops", fake)
    old = torch.get_num_threads()
    try:
        with pytest.raises(AssertionError, match="differs from the reference"):
            mod.main(["--batch", "5", "--repeats", "1"])
    finally:
        torch.set_num_threads(old)
    assert timed == ([] if what == "step" else [1] * 4)  # the hvp check comes after the float32 step rows


# ------------------------------------------------------------------------------ bench_frozen_backward
@pytest.fixture
def frozen_bench(bench, monkeypatch):
    return _tiny_bench(bench, monkeypatch, "bench_frozen_backward", _REF={})


def test_frozen_backward_rows_and_ratios(frozen_bench):
    """Each row's median is the benchmark's; the speedups are eager's and fused_full's medians over the
    row's; the variants ran the warm-up and the rounds (eager 3, the fused ones 7)."""
    mod, written = frozen_bench
    medians = {"eager": 6e-9, "fused_full": 3e-9, "fused": 2e-9}
    for dtype in (torch.float32, torch.float64):
        for impl, med in medians.items():
            fb = FakeBenchmark(med, med / 4)
            mod.test_frozen_backward(fb, 5, dtype, impl)
            assert fb.calls == (3 if impl == "eager" else 7) + 1
    name, rows, extra = written[-1]
    assert name == "frozen_backward" and extra["R"] == 3 and len(rows) == 6
    for r in rows:
        med = medians[r["impl"]]
        assert r["median_ms"] == pytest.approx(med * 1e3) and r["iqr_ms"] == pytest.approx(med / 4 * 1e3)
        assert r["speedup_vs_eager"] == pytest.approx(medians["eager"] / med, abs=0.01)
        assert r["speedup_vs_fused_full"] == pytest.approx(medians["fused_full"] / med, abs=0.01)
    assert {r["case"] for r in rows} == {"d=5 float32", "d=5 float64"}


def test_frozen_backward_checks_the_input_gradient_before_timing(frozen_bench, monkeypatch):
    """A fused input gradient that differs from eager's fails the case before anything is timed; the fused
    variants differentiate with frozen (fused) and trainable (fused_full) weights."""
    mod, _ = frozen_bench
    seen = []
    real = mod.residual_stack

    def spy(x, w, *args, **kw):
        seen.append(w.requires_grad)
        return real(x, w, *args, **kw)
    monkeypatch.setattr(mod, "residual_stack", spy)
    mod.test_frozen_backward(FakeBenchmark(1e-9, 0.0), 5, torch.float64, "fused")
    assert seen and set(seen) == {False}
    seen.clear()
    mod.test_frozen_backward(FakeBenchmark(1e-9, 0.0), 5, torch.float64, "fused_full")
    assert seen and set(seen) == {True}
    monkeypatch.setattr(mod, "residual_stack", lambda x, w, *a, **k: 1.001 * real(x, w, *a, **k))
    fb = FakeBenchmark(1e-9, 0.0)
    with pytest.raises(AssertionError):
        mod.test_frozen_backward(fb, 5, torch.float64, "fused")
    assert fb.calls == 0
