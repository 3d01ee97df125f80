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


SMALL = ["--units", "5", "--width", "6", "--batch", "12", "--repeats", "3", "--directions", "3"]


def _run(tmp_path, monkeypatch, *extra, name="b.json"):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / name
    rc = main(["bench", *SMALL, *extra, "--out", str(out)])
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
            assert r["check"] == "ok" and r["max_rel_err"] <= doc["tolerance"] == 2e-3
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
    assert doc["tolerance"] == 1e-8
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
    # a plain net's layers are orthogonal: the norm of a row survives any depth
    torch.testing.assert_close(q.w[0, 0] @ q.w[0, 0].T, torch.eye(5), rtol=0, atol=1e-5)


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


def test_bench_tolerates_float32_rounding_but_not_more(tmp_path, monkeypatch):
    """An error of 1e-4 (float32 rounding over a deep stack is ~1e-6) passes the float32 check; 1e-2 fails."""
    stack, hvp = _wrong(scale=1 + 1e-4)
    monkeypatch.setattr(ops, "residual_stack_hvp", hvp)
    rc, out = _run(tmp_path, monkeypatch, "--ops", "hvp")
    assert rc == 0
    stack, hvp = _wrong(scale=1 + 1e-2)
    monkeypatch.setattr(ops, "residual_stack_hvp", hvp)
    rc, out = _run(tmp_path, monkeypatch, "--ops", "hvp", name="c.json")
    assert rc == 1


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


@pytest.mark.parametrize("argv, expected", [
    (["--width", "0"], "argument --width: expected an integer >= 1, got 0"),
    (["--ops", "backward"], "argument --ops: invalid choice: 'backward'"),
    (["--shortcut", "1", "--mid", "relu"], "--mid relu has no effect with --shortcut 1"),
    (["--shortcut", "0", "--pre", "tanh"], "--pre tanh has no effect on a plain net"),
    (["--tf32", "tf32"], "--tf32 needs --dtype float32 and --device cuda, got --dtype float32 --device cpu"),
    (["--loss", "cross_entropy", "--ops", "forward"], "--loss cross_entropy has no effect without --ops hvp"),
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
