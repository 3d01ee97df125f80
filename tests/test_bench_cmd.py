"""``shortcut-ext bench``: the rows it measures, their arithmetic, the answer checks that come before the
timing, its refusals and what an interrupted run keeps.  (No timing is asserted: only that the reported
figures follow from the measured times.)"""
from __future__ import annotations

import json
import math

import pytest
import torch

from shortcut_ext import ops
from shortcut_ext._build import is_built
from shortcut_ext.cli import main
from shortcut_ext.experiments import bench

pytestmark = pytest.mark.skipif(not is_built(), reason="the fused kernels are not built")

@pytest.fixture(autouse=True)
def _small_gemm(monkeypatch):
    """A 256x256 large-matmul rate (4096 takes seconds on 2 cores, per run)."""
    monkeypatch.setitem(bench.GEMM_SIZE, "cpu", 256)


SMALL = ["--units", "5", "--width", "6", "--batch", "12", "--repeats", "3"]


def _run(tmp_path, monkeypatch, *extra, name="b.json"):
    """``bench`` at SMALL sizes (with 3 directions where HVPs are timed) into ``tmp_path / name``."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / name
    ops = list(extra[extra.index("--ops") + 1:]) if "--ops" in extra else ["hvp"]
    k = ["--directions", "3"] if "hvp" in ops and "--directions" not in extra else []
    rc = main(["bench", *SMALL, *k, *extra, "--out", str(out)])
    return rc, out


def _rows(out):
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    return doc, {(r["op"], r["impl"], r["k"]): r for r in doc["rows"]}


def test_bench_measures_every_variant_and_reports_consistent_figures(tmp_path, monkeypatch, capsys):
    rc, out = _run(tmp_path, monkeypatch)
    assert rc == 0
    doc, rows = _rows(out)
    assert doc["complete"] is True and doc["command"] == "bench"
    assert set(rows) == {
        ("forward", "torch", None), ("forward", "fused", None),
        ("forward+backward", "torch", None), ("forward+backward", "fused", None),
        ("forward+backward", "fused (recompute)", None),
        ("hvp", "torch (double backward)", 1), ("hvp", "torch (double backward)", 3),
        ("hvp", "fused", 1), ("hvp", "fused", 3)}
    rate = doc["gemm_gflops"]
    assert math.isfinite(rate) and rate > 0
    flops = 2.0 * 12 * 5 * 2 * 6 * 6
    for (op, impl, k), r in rows.items():
        assert r["repeats"] == 3
        assert 0 < r["min_ms"] <= r["median_ms"] and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        if impl.startswith("torch"):
            assert r["check"] == "reference" and r["max_rel_err"] == 0
        else:
            assert r["check"] == "ok" and r["max_rel_err"] <= doc["tolerance"] == 1e-4
        if op == "hvp":
            assert r["per_product_ms"] == pytest.approx(r["median_ms"] / k, rel=1e-12)
            assert r.get("gflops") is None
            base = rows[("hvp", "torch (double backward)", 1)]["per_product_ms"]
            if (impl, k) != ("torch (double backward)", 1):
                assert r["speedup"] == pytest.approx(base / r["per_product_ms"], rel=1e-12)
        else:
            f = flops * (1 if op == "forward" else 3)
            assert r["gflops"] == pytest.approx(f / (r["median_ms"] / 1e3) / 1e9, rel=1e-12)
            assert r["fraction_of_gemm"] == pytest.approx(r["gflops"] / rate, rel=1e-12)
            if impl != "torch":
                assert r["speedup"] == pytest.approx(rows[(op, "torch", None)]["median_ms"] / r["median_ms"], rel=1e-12)
    # the CSV beside the JSON: the same rows, empty cells for what a row does not have
    import csv

    with open(out.with_suffix(".csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["op"], r["impl"]) for r in csv_rows] == [(r["op"], r["impl"]) for r in doc["rows"]]
    assert all(r["gflops"] == "" for r in csv_rows if r["op"] == "hvp")
    printed = capsys.readouterr().out
    assert "R=5 d=6 B=12" in printed and "fused (recompute)" in printed and str(out) in printed


def test_bench_float64_plain_net_cross_entropy(tmp_path, monkeypatch):
    """A plain net (--shortcut 0: one unit of --units layers, no shortcut), float64, cross-entropy HVPs;
    float64 answers must agree to 1e-8."""
    rc, out = _run(tmp_path, monkeypatch, "--shortcut", "0", "--mid", "tanh", "--dtype", "float64", "--loss",
                   "cross_entropy")
    assert rc == 0
    doc, rows = _rows(out)
    assert doc["tolerance"] == 1e-10
    assert all(r["check"] in ("ok", "reference") for r in rows.values())
    assert rows[("hvp", "fused", 3)]["max_rel_err"] < 1e-10


def test_bench_one_shortcut_defaults_to_no_mid_activation(tmp_path, monkeypatch):
    """--mid defaults to relu, except with --shortcut 1 (a single layer per unit: no position between
    layers), where it is identity rather than a refusal."""
    rc, out = _run(tmp_path, monkeypatch, "--shortcut", "1", "--pre", "relu", "--ops", "forward")
    assert rc == 0
    doc, _ = _rows(out)
    assert (doc["options"]["pre"], doc["options"]["mid"]) == ("relu", "identity")
    assert _parsed().mid is None and bench.Problem(_parsed("--ops", "forward"), "cpu", torch.float32).acts[1] == "relu"


def test_problem_matches_the_options(monkeypatch):
    """The benchmarked stack is the one the options name (a plain net: [1, D, d, d] without shortcut)."""
    p = bench.Problem(_parsed("--shortcut", "3", "--units", "4", "--width", "5", "--batch", "7", "--pre", "tanh"),
                      "cpu", torch.float64)
    assert p.shortcut and tuple(p.w.shape) == (4, 3, 5, 5) and tuple(p.x.shape) == (7, 5)
    assert p.acts == ("tanh", "relu", "identity") and tuple(p.directions.shape) == (16, 4, 3, 5, 5)
    (y,) = p.forward("torch")()
    from shortcut_ext import reference

    torch.testing.assert_close(y, reference.residual_stack_forward(p.x, p.w, True, "tanh", "relu", "identity"))
    q = bench.Problem(_parsed("--shortcut", "0", "--units", "4", "--width", "5", "--ops", "forward"), "cpu",
                      torch.float32)
    assert not q.shortcut and tuple(q.w.shape) == (1, 4, 5, 5) and q.directions.shape[0] == 0
    assert q.w.dtype == torch.float32
    # a plain net's layers are orthogonal times the activation's gain: a signal's norm survives any depth
    torch.testing.assert_close(q.w[0, 0] @ q.w[0, 0].T, 2 * torch.eye(5), rtol=0, atol=1e-5)  # relu: sqrt(2)
    for mid, gain2 in (("tanh", 1.0), ("ssigmoid", 4.0), ("identity", 1.0)):
        q = bench.Problem(_parsed("--shortcut", "0", "--units", "3", "--width", "5", "--mid", mid), "cpu",
                          torch.float64)
        torch.testing.assert_close(q.w[0, 2] @ q.w[0, 2].T, gain2 * torch.eye(5, dtype=torch.float64))
    # a residual net's branches: Xavier over sqrt(R), so that R of them add up to O(1)
    from shortcut_ext.models import init_weights

    assert torch.equal(p.w, init_weights((4, 3, 5, 5), "xavier", seed=0, dtype=torch.float64) / 2)
    # cross-entropy targets: every class of d
    c = bench.Problem(_parsed("--width", "3", "--batch", "200", "--loss", "cross_entropy"), "cpu", torch.float64)
    assert c.targets.dtype == torch.int64 and set(c.targets.tolist()) == {0, 1, 2}


def _parsed(*argv):
    from shortcut_ext.cli import build_parser

    return build_parser().parse_args(["bench", *argv])


def _wrong(scale=1.01, nan=False):
    """A fused op whose answer is off (by ``scale``, or nan) while the reference is right."""
    real_stack, real_hvp = ops.residual_stack, ops.residual_stack_hvp

    def stack(*a, backend=None, **kw):
        y = real_stack(*a, backend=backend, **kw)
        if backend != "fused":
            return y
        return y * float("nan") if nan else y * scale

    def hvp(*a, backend=None, **kw):
        loss, g, hv = real_hvp(*a, backend=backend, **kw)
        return (loss, g, hv * (float("nan") if nan else scale)) if backend == "fused" else (loss, g, hv)
    return stack, hvp


@pytest.mark.parametrize("nan", [False, True], ids=["off_by_1pct", "nan"])
def test_bench_fails_a_wrong_answer_before_timing_it(tmp_path, monkeypatch, capsys, nan):
    stack, hvp = _wrong(nan=nan)
    monkeypatch.setattr(ops, "residual_stack", stack)
    monkeypatch.setattr(ops, "residual_stack_hvp", hvp)
    rc, out = _run(tmp_path, monkeypatch)
    assert rc == 1
    doc, rows = _rows(out)
    assert doc["complete"] is True
    failed = {key for key, r in rows.items() if r["check"] == "FAILED"}
    assert failed == {k for k in rows if k[1].startswith("fused")}
    err = capsys.readouterr().err
    assert "wrong answers" in err and "hvp fused" in err and "forward+backward fused (recompute)" in err


def test_bench_tolerates_float32_rounding_but_not_a_skipped_unit(tmp_path, monkeypatch):
    """The float32 check passes an error of 3e-5 (rounding over a deep residual stack stays ~4e-7) and fails
    3e-4, and a forward that leaves out one of 1000 units (an error of ~8e-4)."""
    for scale, rc_expected in ((1 + 3e-5, 0), (1 + 3e-4, 1)):
        stack, hvp = _wrong(scale=scale)
        monkeypatch.setattr(ops, "residual_stack_hvp", hvp)
        rc, out = _run(tmp_path, monkeypatch, "--ops", "hvp", name=f"{scale}.json")
        assert rc == rc_expected, scale
    real = ops.residual_stack
    monkeypatch.setattr(ops, "residual_stack", lambda x, w, *a, backend=None, **k: real(
        x, w[:-1] if backend == "fused" else w, *a, backend=backend, **k))
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--units", "1000", "--width", "16", "--batch", "16", "--repeats", "1", "--ops", "forward",
               "--out", "skip.json"])
    assert rc == 1
    _, rows = _rows(tmp_path / "skip.json")
    assert 1e-4 < rows[("forward", "fused", None)]["max_rel_err"] < 1e-2


def test_bench_ops_selects_what_is_timed(tmp_path, monkeypatch):
    rc, out = _run(tmp_path, monkeypatch, "--ops", "forward", "hvp", "--directions", "1")
    assert rc == 0
    _, rows = _rows(out)
    assert set(rows) == {("forward", "torch", None), ("forward", "fused", None),
                         ("hvp", "torch (double backward)", 1), ("hvp", "fused", 1)}


def test_bench_compile_row_with_its_compile_time(tmp_path, monkeypatch):
    """--compile adds a torch.compile row per stack op, checked and with its cold compile time (torch.compile
    replaced by a counting stand-in here: a real cold compile takes minutes; the slow test below runs it)."""
    calls = []

    def fake_compile(fn, **kw):
        calls.append(kw)
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    rc, out = _run(tmp_path, monkeypatch, "--ops", "forward", "forward+backward", "--compile")
    assert rc == 0 and len(calls) == 2 and calls[0] == {"dynamic": False}
    _, rows = _rows(out)
    for op in ("forward", "forward+backward"):
        r = rows[(op, "torch.compile", None)]
        assert r["check"] == "ok" and r["compile_s"] > 0 and r["speedup"] > 0


@pytest.mark.slow
def test_bench_compile_for_real(tmp_path, monkeypatch):
    rc, out = _run(tmp_path, monkeypatch, "--ops", "forward", "forward+backward", "--compile")
    assert rc == 0
    _, rows = _rows(out)
    assert rows[("forward+backward", "torch.compile", None)]["check"] == "ok"


def test_bench_interrupted_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    real = bench.time_calls
    calls = []

    def interrupt_third(fn, repeats, device):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(fn, repeats, device)
    monkeypatch.setattr(bench, "time_calls", interrupt_third)
    rc, out = _run(tmp_path, monkeypatch)
    assert rc == 130
    doc, rows = _rows(out)
    # call 1: the large-matmul rate; call 2: the first row; call 3 (the fused forward) is interrupted
    assert doc["complete"] is False and list(rows) == [("forward", "torch", None)]
    assert "rows measured so far" in capsys.readouterr().err
    assert out.with_suffix(".csv").exists()


def test_bench_interrupted_before_the_first_row_leaves_its_options(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the large matmul is timed: the JSON (and CSV) the message names exist, with no rows."""
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "gemm_rate", interrupt)
    rc, out = _run(tmp_path, monkeypatch)
    assert rc == 130
    doc, rows = _rows(out)
    assert doc["complete"] is False and rows == {} and doc["options"]["units"] == 5
    assert str(out) in capsys.readouterr().err and out.with_suffix(".csv").exists()


def test_row_quartiles_stay_within_the_measured_times():
    r = bench._row("forward", "torch", [0.001, 0.010])  # two calls: quartiles interpolate, never extrapolate
    assert 1.0 <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= 10.0 and r["min_ms"] == 1.0
    r = bench._row("hvp", "fused", [0.005, 0.001, 0.009, 0.002, 0.003], k=2)  # the median, not the mean (4 ms)
    assert (r["median_ms"], r["q1_ms"], r["q3_ms"], r["min_ms"]) == pytest.approx((3.0, 2.0, 5.0, 1.0))
    assert r["per_product_ms"] == pytest.approx(1.5) and r["repeats"] == 5
    r = bench._row("forward", "torch", [0.004])
    assert r["q1_ms"] == r["median_ms"] == r["q3_ms"] == pytest.approx(4.0)


def test_tolerance_by_dtype_mode_and_depth():
    f32, f64 = torch.float32, torch.float64
    assert bench.tolerance(f32, None, 2000, True) == 1e-4  # residual stacks: rounding stays ~4e-7 at any depth
    assert bench.tolerance(f32, "3xtf32", 2000, True) == 1e-4  # float32 accuracy on tensor cores
    assert bench.tolerance(f32, "tf32", 10, True) == 1e-2
    assert bench.tolerance(f64, None, 10**5, True) == 1e-10
    # plain nets: rounding grows with depth (tanh: 6.4e-5 at 1000 layers in float32)
    assert bench.tolerance(f32, None, 100, False) == 1e-4
    assert bench.tolerance(f32, None, 1000, False) == pytest.approx(4 * 2.0**-23 * 1000)
    assert bench.tolerance(f64, None, 10**4, False) == 1e-10


def test_bench_one_direction_times_each_variant_once(tmp_path, monkeypatch):
    rc, out = _run(tmp_path, monkeypatch, "--ops", "hvp", "--directions", "1")
    assert rc == 0
    doc, _ = _rows(out)
    assert [(r["impl"], r["k"]) for r in doc["rows"]] == [("torch (double backward)", 1), ("fused", 1)]


def test_gemm_rate_counts_2n3_flops_in_the_dtype_asked(monkeypatch):
    seen = []

    def fixed(fn, repeats, device):
        c = fn()
        seen.append((c.dtype, tuple(c.shape)))
        return [0.5, 0.25, 1.0]
    monkeypatch.setattr(bench, "time_calls", fixed)
    monkeypatch.setitem(bench.GEMM_SIZE, "cpu", 64)
    assert bench.gemm_rate("cpu", torch.float32) == pytest.approx(2 * 64**3 / 0.5 / 1e9)
    assert bench.gemm_rate("cpu", torch.float64) == pytest.approx(2 * 32**3 / 0.5 / 1e9)  # half the size
    assert seen == [(torch.float32, (64, 64)), (torch.float64, (32, 32))]


def test_bench_measures_the_matmul_rate_and_threads_it_was_asked(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "gemm_rate", lambda device, dtype: calls.append((device, dtype)) or 100.0)
    threads = torch.get_num_threads()
    rc, out = _run(tmp_path, monkeypatch, "--ops", "forward", "--dtype", "float64", "--threads", "1",
                   "--shortcut", "0")
    assert rc == 0 and calls == [("cpu", torch.float64)]
    doc, rows = _rows(out)
    assert doc["environment"]["torch_threads"] == 1 and doc["gemm_gflops"] == 100.0
    assert rows[("forward", "fused", None)]["fraction_of_gemm"] == pytest.approx(
        rows[("forward", "fused", None)]["gflops"] / 100.0)
    assert torch.get_num_threads() == threads  # put back after the command
    assert "(1 threads), plain net of 5 layers d=6 B=12" in capsys.readouterr().out


def test_memory_need_and_its_refusal_boundary(monkeypatch, capsys):
    args = _parsed("--units", "10", "--width", "8", "--batch", "32", "--directions", "4")
    layers, weights = 10 * 2 * 32 * 8 * 4, 10 * 2 * 64 * 4
    need = bench.memory_need(args)
    assert need == {"forward": weights + 2 * 32 * 8 * 4, "forward+backward": 2 * layers + 3 * weights,
                    "hvp": 8 * layers + (4 + 2 * 4) * weights}
    args64 = _parsed("--units", "20", "--width", "8", "--batch", "32", "--dtype", "float64", "--shortcut", "0")
    # a plain net of 20 layers, as many as 10 units of 2; float64; 16 directions by default
    assert bench.memory_need(args64)["hvp"] == 2 * (8 * layers + (4 + 2 * 16) * weights)
    for total, refused in ((need["hvp"] / 0.9 * 1.01, False), (need["hvp"] / 0.9 * 0.99, True)):
        monkeypatch.setattr(bench, "device_memory", lambda dev, t=total: (int(t), "this machine's"))
        if refused:
            with pytest.raises(SystemExit, match="--ops hvp needs about"):
                bench._check_args(args, "cpu")
        else:
            bench._check_args(args, "cpu")
    # without hvp, only the largest of the others counts
    fb = _parsed("--units", "10", "--width", "8", "--batch", "32", "--ops", "forward", "forward+backward")
    monkeypatch.setattr(bench, "device_memory", lambda dev: (int(need["forward+backward"] / 0.9 * 1.01), "x's"))
    bench._check_args(fb, "cpu")


def test_bench_warns_when_the_reference_is_all_zeros(tmp_path, monkeypatch, capsys):
    """A reference of zeros (an underflowed deep net) checks nothing: the command says so."""
    real = ops.residual_stack
    monkeypatch.setattr(ops, "residual_stack", lambda *a, **k: real(*a, **k) * 0)
    rc, out = _run(tmp_path, monkeypatch, "--ops", "forward")
    assert rc == 0
    doc, _ = _rows(out)
    assert doc["unchecked"] == ["forward: an output of the reference is all zeros (underflow?)"]
    assert "the check means nothing here" in capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--width", "0"], "argument --width: expected an integer >= 1, got 0"),
    (["--ops", "backward"], "argument --ops: invalid choice: 'backward'"),
    (["--shortcut", "1", "--mid", "relu"], "--mid relu has no effect with --shortcut 1"),
    (["--shortcut", "0", "--pre", "tanh"], "--pre tanh has no effect on a plain net"),
    (["--tf32", "tf32"], "--tf32 needs --dtype float32 and --device cuda, got --dtype float32 --device cpu"),
    (["--loss", "cross_entropy", "--ops", "forward"], "--loss cross_entropy has no effect without --ops hvp"),
    (["--directions", "4", "--ops", "forward+backward"], "--directions 4 has no effect without --ops hvp"),
    (["--compile", "--ops", "hvp"], "--compile times torch.compile of the reference's forward and forward+backward"),
    (["--out", "b.txt"], "--out must name a .json file, got b.txt"),
    (["--device", "tpu"], "--device must be"),
    (["--units", "1000000", "--width", "1024", "--batch", "100000"], "lower the sizes"),
])
def test_bench_refuses_bad_options_before_any_work(tmp_path, monkeypatch, capsys, argv, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "gemm_rate", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2
    assert expected in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_bench_refuses_cuda_without_a_device(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device is visible" in capsys.readouterr().err


def test_max_rel_err_is_relative_per_output_and_fails_nan():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([1e-6, 0.0])
    assert bench.max_rel_err((a, b), (a, b)) == 0
    assert bench.max_rel_err((a * 1.5, b), (a, b)) == pytest.approx(0.5)
    # each output against its own scale: an error of 1e-6 in a 1e-6-sized output is 100%
    assert bench.max_rel_err((a, b * 2), (a, b)) == pytest.approx(1.0)
    # an all-zero reference: the absolute error
    assert bench.max_rel_err((torch.tensor([3e-3]),), (torch.tensor([0.0]),)) == pytest.approx(3e-3)
    assert math.isnan(bench.max_rel_err((torch.tensor([float("nan")]),), (torch.tensor([1.0]),)))
    assert bench.max_rel_err((torch.zeros(2),), (torch.zeros(3),)) == math.inf


def test_bench_docstring_examples_pass_the_checks(monkeypatch):
    """The examples at the top of ``shortcut-ext bench --help`` are not refused (the GPU one on an H200's
    139 GiB: its forward+backward reference keeps ~67 GB; with hvp it would need ~270 GB)."""
    monkeypatch.setattr(bench, "device_memory", lambda dev: (139 * 2**30, f"{dev}'s"))
    examples = [line.split("#")[0].split()[2:] for line in bench.__doc__.splitlines()
                if line.strip().startswith("shortcut-ext bench")]
    assert len(examples) == 3
    for argv in examples:
        bench._check_args(_parsed(*argv), "cuda" if "cuda" in argv else "cpu")
    with pytest.raises(SystemExit, match="--ops hvp needs about 2"):
        bench._check_args(_parsed("--device", "cuda", "--batch", "65536"), "cuda")
