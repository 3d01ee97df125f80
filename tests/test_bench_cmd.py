"""``shortcut-ext bench``: the rows it measures, their arithmetic, the answer checks that come before the
timing, its refusals and what an interrupted run keeps.  (No timing is asserted: only that the reported
figures follow from the measured times.)"""
from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

import shortcut_ext
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
        ("input-gradient", "torch", None), ("input-gradient", "fused", None),
        ("input-gradient", "fused (recompute)", None),
        ("hvp", "torch (double backward)", 1), ("hvp", "torch (double backward)", 3),
        ("hvp", "fused", 1), ("hvp", "fused", 3)}
    assert doc["options"]["directions"] == 3 and doc["options"]["mid"] == "relu"
    assert doc["check"] == {"error": "||o - r|| / ||r|| per output", "factor": 16, "floor": 1e-6, "draws": 3,
                            "loose_above": 1e-2,
                            "perturbation": {"fused": 2.0**-23, "fused hvp": 2.0**-23, "torch.compile": 2.0**-23}}
    rate = doc["gemm_gflops"]
    assert math.isfinite(rate) and rate > 0
    flops = 2.0 * 12 * 5 * 2 * 6 * 6
    for (op, impl, k), r in rows.items():
        assert r["repeats"] == 3
        assert 0 < r["min_ms"] <= r["median_ms"] and r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        if impl.startswith("torch"):
            assert r["check"] == "reference" and r["max_rel_err"] is None and r["error_ratio"] is None
        else:
            # the bound: 16 times the reference's noise under a perturbation of 2^-24, at least 1e-6
            assert r["check"] == "ok" and 0 <= r["error_ratio"] <= 1 and r["max_rel_err"] < 1e-6
            assert 0 < r["noise"] < 1e-6
        if op == "hvp":
            assert r["per_product_ms"] == pytest.approx(r["median_ms"] / k, rel=1e-12)
            f = flops * (3 + 6 * k)  # the gradient's three products and six per direction
            assert r["gflops"] == pytest.approx(f / (r["median_ms"] / 1e3) / 1e9, rel=1e-12)
            assert r["fraction_of_gemm"] == pytest.approx(r["gflops"] / rate, rel=1e-12)
            base = rows[("hvp", "torch (double backward)", 1)]["per_product_ms"]
            if (impl, k) != ("torch (double backward)", 1):
                assert r["speedup"] == pytest.approx(base / r["per_product_ms"], rel=1e-12)
        else:
            f = flops * {"forward": 1, "forward+backward": 3, "input-gradient": 2}[op]
            assert r["gflops"] == pytest.approx(f / (r["median_ms"] / 1e3) / 1e9, rel=1e-12)
            assert r["fraction_of_gemm"] == pytest.approx(r["gflops"] / rate, rel=1e-12)
            if impl != "torch":
                assert r["speedup"] == pytest.approx(rows[(op, "torch", None)]["median_ms"] / r["median_ms"], rel=1e-12)
    # the CSV beside the JSON: the same rows, empty cells for what a row does not have
    import csv

    with open(out.with_suffix(".csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert [(r["op"], r["impl"]) for r in csv_rows] == [(r["op"], r["impl"]) for r in doc["rows"]]
    assert [float(r["gflops"]) for r in csv_rows] == pytest.approx([r["gflops"] for r in doc["rows"]], rel=1e-9)
    assert all(r["compile_s"] == "" for r in csv_rows)  # no --compile: an empty cell
    printed = capsys.readouterr().out
    assert "R=5 d=6 B=12" in printed and "fused (recompute)" in printed and str(out) in printed


def test_bench_float64_plain_net_cross_entropy(tmp_path, monkeypatch):
    """A plain net (--shortcut 0: one unit of --units layers, no shortcut), float64, cross-entropy HVPs;
    float64 answers must agree to 1e-8."""
    rc, out = _run(tmp_path, monkeypatch, "--shortcut", "0", "--mid", "tanh", "--dtype", "float64", "--loss",
                   "cross_entropy")
    assert rc == 0
    doc, rows = _rows(out)
    assert doc["check"]["floor"] == 1e-13 and doc["check"]["perturbation"]["fused"] == 2.0**-52
    assert all(r["check"] in ("ok", "reference") for r in rows.values())
    assert rows[("hvp", "fused", 3)]["max_rel_err"] < 1e-13


def test_bench_one_shortcut_defaults_to_no_mid_activation(tmp_path, monkeypatch):
    """--mid defaults to relu, except with --shortcut 1 (a single layer per unit: no position between
    layers), where it is identity rather than a refusal."""
    rc, out = _run(tmp_path, monkeypatch, "--shortcut", "1", "--pre", "relu", "--ops", "forward")
    assert rc == 0
    doc, _ = _rows(out)
    assert (doc["options"]["pre"], doc["options"]["mid"]) == ("relu", "identity")
    assert doc["options"]["directions"] is None  # no HVPs timed
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
    # input-gradient: the weights frozen, so only (y, grad_x), the same grad_x as forward+backward's
    y1, gx, gw = p.forward_backward("fused")()
    y2, gx2 = p.input_gradient("fused")()
    assert gw.shape == p.w.shape and torch.equal(y1, y2) and torch.equal(gx, gx2)
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


def test_bench_tolerates_rounding_but_not_a_skipped_unit(tmp_path, monkeypatch):
    """The check passes HVPs off by 3e-7 (a few roundings: the bound is 1e-6 here) and fails 1e-5, and a
    forward that leaves out one of 1000 units (an error of ~5e-4)."""
    for scale, rc_expected in ((1 + 3e-7, 0), (1 + 1e-5, 1)):
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
    r = rows[("forward", "fused", None)]
    assert 1e-4 < r["max_rel_err"] < 1e-2 and r["error_ratio"] > 100 and r["noise"] < 1e-6


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
    rc, out = _run(tmp_path, monkeypatch, "--ops", "forward", "forward+backward", "input-gradient", "--compile")
    assert rc == 0 and len(calls) == 3 and calls[0] == {"dynamic": False}
    bench._check_args(_parsed("--compile", "--ops", "forward+backward"), "cpu")  # one stack op is enough
    bench._check_args(_parsed("--compile", "--ops", "input-gradient"), "cpu")
    _, rows = _rows(out)
    for op in ("forward", "forward+backward", "input-gradient"):
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


def test_rounding_and_the_error_bound():
    f32, f64 = torch.float32, torch.float64
    assert bench.rounding(f32, None, 16) == bench.rounding(f32, "3xtf32", 16) == (2.0**-23, 1e-6)
    assert bench.rounding(f32, "tf32", 16) == (2.0**-10, 1e-6)
    assert bench.rounding(f32, None, 256) == (2.0**-23, 2.0**-23 * 16)
    assert bench.rounding(f64, None, 256) == (2.0**-52, 1e-13)
    # the reference's own sums over B rows: the floor grows as eps sqrt(B)
    assert bench.rounding(f32, None, 2**20) == (2.0**-23, 2.0**-23 * 2**10)
    assert bench.rounding(f64, None, 2**40) == (2.0**-52, 2.0**-52 * 2**20)
    assert bench.bounds([0.0, 1e-3], 1e-6) == [1e-6, 1.6e-2]
    # each output against its own bound max(floor, 16 * noise); the worst ratio decides
    assert bench.check_errors([1e-6, 3.2e-5], [0.0, 2e-6], 1e-6) == pytest.approx(1.0)
    assert bench.check_errors([2e-6, 1e-7], [0.0, 1e-3], 1e-6) == pytest.approx(2.0)
    assert bench.check_errors([5e-7], [0.0], 1e-6) == pytest.approx(0.5)
    assert math.isnan(bench.check_errors([math.nan, 0.0], [1.0, 1.0], 1e-6))
    assert bench.check_errors([math.inf], [1.0], 1e-6) == math.inf


def test_perturbed_problem_moves_input_and_weights_by_one_rounding():
    p = bench.Problem(_parsed("--units", "4", "--width", "5", "--batch", "7"), "cpu", torch.float64)
    q = p.perturbed(1e-3, torch.Generator().manual_seed(0))
    for a, b in ((q.x, p.x), (q.w, p.w)):
        rel = (a / b - 1).abs()
        assert 0 < float(rel.max()) <= 1e-3 and float(rel.max()) > 5e-4 and a.dtype == b.dtype
    assert q.targets is p.targets and q.directions is p.directions and p.x is not q.x
    assert torch.equal(p.x, bench.Problem(_parsed("--units", "4", "--width", "5", "--batch", "7"), "cpu",
                                          torch.float64).x)  # the original is left as it was


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
                    "input-gradient": 2 * layers + weights, "hvp": 8 * layers + (4 + 2 * 4) * weights}
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
    assert doc["unchecked"] == ["forward: an output of the reference is zero or within 2^24 of the smallest "
                                "normal number (underflow)"]
    assert "the answer check means little here" in capsys.readouterr().err
    # one output of several (the gradients of a net whose signal faded), denormal rather than zero
    monkeypatch.setattr(ops, "residual_stack", lambda *a, **k: (lambda y: y.detach() + 1e-33 * y)(real(*a, **k)))
    rc, out = _run(tmp_path, monkeypatch, "--ops", "forward+backward", name="c.json")
    doc, _ = _rows(out)
    assert rc == 0 and [u.split(":")[0] for u in doc["unchecked"]] == ["forward+backward"]


@pytest.mark.parametrize("argv, expected", [
    (["--width", "0"], "argument --width: expected an integer >= 1, got 0"),
    (["--ops", "backward"], "argument --ops: invalid choice: 'backward'"),
    (["--shortcut", "1", "--mid", "relu"], "--mid relu has no effect with --shortcut 1"),
    (["--shortcut", "0", "--pre", "tanh"], "--pre tanh has no effect on a plain net"),
    (["--tf32", "tf32"], "--tf32 needs --dtype float32 and --device cuda, got --dtype float32 --device cpu"),
    (["--loss", "cross_entropy", "--ops", "forward"], "--loss cross_entropy has no effect without --ops hvp"),
    (["--directions", "4", "--ops", "forward+backward"], "--directions 4 has no effect without --ops hvp"),
    (["--directions", "16", "--ops", "forward"], "--directions 16 has no effect without --ops hvp"),
    (["--compile", "--ops", "hvp"], "--compile times torch.compile of the reference's forward, forward+backward and"),
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


def test_rel_errors_are_normwise_per_output_and_fail_nan():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([1e-6, 0.0])
    assert bench.rel_errors((a, b), (a, b)) == [0, 0]
    assert bench.rel_errors((a * 1.5, b), (a, b)) == pytest.approx([0.5, 0])
    # each output against its own norm: an error of 1e-6 in a 1e-6-sized output is 100%
    assert bench.rel_errors((a + torch.tensor([0.0, 1.0]), b * 2), (a, b)) == pytest.approx([0.2, 1.0])
    # an all-zero reference: the absolute norm
    assert bench.rel_errors((torch.tensor([3e-3, 4e-3]),), (torch.zeros(2),)) == pytest.approx([5e-3])
    assert math.isnan(bench.rel_errors((torch.tensor([float("nan"), 1.0]),), (torch.ones(2),))[0])
    assert math.isnan(bench.rel_errors((torch.tensor([float("inf")]),), (torch.ones(1),))[0])
    assert bench.rel_errors((torch.zeros(2),), (torch.zeros(3),)) == [math.inf]


def test_bench_interrupted_before_writing_anything_says_so(tmp_path, monkeypatch, capsys):
    from shortcut_ext.experiments import report

    def interrupt():
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "environment", interrupt)
    rc, out = _run(tmp_path, monkeypatch)
    assert rc == 130 and not out.exists()
    assert "nothing was measured yet" in capsys.readouterr().err


def test_reference_noise_is_the_largest_of_its_draws(monkeypatch):
    p = bench.Problem(_parsed("--units", "6", "--width", "5", "--batch", "9", "--mid", "tanh"), "cpu", torch.float64)
    ref = p.forward_backward("torch")()
    eps = 1e-6
    g = torch.Generator().manual_seed(7)
    draws = [bench.rel_errors(p.perturbed(eps, g).forward_backward("torch")(), ref) for _ in range(3)]
    noise = bench.reference_noise(p, "forward+backward", ref, eps, 7)
    assert noise == [max(d[i] for d in draws) for i in range(3)]
    assert len({tuple(d) for d in draws}) == 3 and all(0 < n < 1e-4 for n in noise)
    # linear in the perturbation, as a rounding error is
    noise2 = bench.reference_noise(p, "forward+backward", ref, 2 * eps, 7)
    assert [b / a for a, b in zip(noise, noise2)] == pytest.approx([2, 2, 2], rel=1e-3)
    # an HVP's noise: loss, gradient and the one product
    h = p.hvp("torch", 1)()
    assert len(bench.reference_noise(p, "hvp", h, eps, 7)) == 3


def test_tf32_variants_are_checked_at_tf32_rounding(tmp_path, monkeypatch):
    """Under --tf32 tf32 the fused stack rows' bound comes from the reference's noise at 2^-10 (one TF32 unit in
    the last place); HVPs (never on tensor cores), stacks wider than 128 (no tensor-core tiles) and
    torch.compile at 2^-23.  Run on the CPU by calling past the CUDA-only option check."""
    monkeypatch.setattr(shortcut_ext, "cuda_tf32", lambda mode: contextlib.nullcontext())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    args = _parsed(*SMALL, "--ops", "forward", "hvp", "--directions", "2", "--tf32", "tf32", "--compile")
    assert bench._bench(args, "cpu", tmp_path / "t.json") == 0
    doc, rows = _rows(tmp_path / "t.json")
    assert doc["check"]["perturbation"] == {"fused": 2.0**-10, "fused hvp": 2.0**-23, "torch.compile": 2.0**-23}
    fused, comp = rows[("forward", "fused", None)], rows[("forward", "torch.compile", None)]
    assert (fused["perturbation"], comp["perturbation"]) == (2.0**-10, 2.0**-23)
    assert 2.0**11 < fused["noise"] / comp["noise"] < 2.0**14  # 2^13 times the perturbation
    assert {rows[("hvp", "fused", k)]["perturbation"] for k in (1, 2)} == {2.0**-23}
    wide = _parsed("--units", "2", "--width", "129", "--batch", "4", "--repeats", "1", "--ops", "forward",
                   "--tf32", "tf32")
    assert bench._bench(wide, "cpu", tmp_path / "w.json") == 0
    doc, rows = _rows(tmp_path / "w.json")
    assert doc["check"]["perturbation"]["fused"] == rows[("forward", "fused", None)]["perturbation"] == 2.0**-23


def test_bench_passes_correct_kernels_at_large_batches(tmp_path, monkeypatch):
    """The reference's float32 sums over B rows round by ~eps sqrt(B), which no perturbation shows: the
    floor grows with it (a bound of 1.5e-6 failed the fused answers at B = 200000, which were the accurate
    ones)."""
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--units", "2", "--width", "4", "--batch", "200000", "--repeats", "1", "--ops",
               "forward+backward", "--out", "big.json"])
    assert rc == 0
    doc, rows = _rows(tmp_path / "big.json")
    assert doc["check"]["floor"] == pytest.approx(2.0**-23 * 200000**0.5)
    assert rows[("forward+backward", "fused", None)]["check"] == "ok"


def test_bench_calls_a_check_loose_where_rounding_noise_is_large(tmp_path, monkeypatch, capsys):
    """A deep plain ReLU net: units within rounding of 0 switch samples' gradients, so the reference's own
    noise is percent-sized and a halved input gradient would pass; the rows say "loose", not "ok"."""
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "--shortcut", "0", "--units", "300", "--width", "64", "--batch", "256", "--repeats", "1",
               "--ops", "forward", "forward+backward", "--out", "p.json"])
    assert rc == 0
    doc, rows = _rows(tmp_path / "p.json")
    assert rows[("forward", "fused", None)]["check"] == "ok"  # the output itself is well conditioned
    fb = rows[("forward+backward", "fused", None)]
    assert fb["check"] == "loose" and 16 * fb["noise"] > 1e-2
    assert [u.split(":")[0] for u in doc["unchecked"]] == ["forward+backward fused"]
    assert "the check only catches errors above" in capsys.readouterr().err


def test_bench_interrupted_over_an_earlier_complete_file_says_nothing_was_measured(tmp_path, monkeypatch,
                                                                                  capsys):
    from shortcut_ext.experiments import report

    (tmp_path / "b.json").write_text(json.dumps({"complete": True, "rows": []}))

    def interrupt():
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "environment", interrupt)
    rc, out = _run(tmp_path, monkeypatch)
    assert rc == 130 and "nothing was measured yet" in capsys.readouterr().err
