"""``shortcut-ext spectrum`` from the command line: plots without a theory overlay, strict JSON, refused
flags (ignored, out of range, too large for the data or the Lanczos basis), unconverged Lanczos
warnings, theory errors on the spectrum's scale, and the checkpoint-replacement notice.

Every call is in-process through ``shortcut_ext.cli.main`` at tiny sizes (a few seconds each)."""
from __future__ import annotations

import json
import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from shortcut_ext.cli import main  # noqa: E402
from shortcut_ext.curvature import spectrum_cmd  # noqa: E402

TINY = ["spectrum", "--units", "6", "--width", "3", "--samples", "32", "--probes", "2", "--steps", "8",
        "--top", "2", "--no-progress"]
PLOTS = ("density.png", "extremes.png", "quantiles.png")


def _strict(text: str):
    """Parse ``text`` as strict JSON (no NaN / Infinity)."""
    def bad(const):
        raise AssertionError(f"not strict JSON: {const}")

    return json.loads(text, parse_constant=bad)


def _result(out):
    return _strict((out / "spectrum.json").read_text())


# ------------------------------------------------------------------ 1. plots without a theory overlay
@pytest.mark.parametrize("extra", [["--init", "small"], ["--shortcut", "0"], ["--init", "xavier", "--shortcut", "3"]],
                         ids=["small", "plain", "xavier"])
def test_plots_without_theory(tmp_path, extra):
    out = tmp_path / "o"
    assert main(TINY + extra + ["--out", str(out)]) == 0
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000
    assert "theory" not in _result(out)


def test_one_shortcut_beyond_the_dense_theory(tmp_path, capsys):
    """n = 1 with P above the dense limit: plots, and a skip message that names the flag to raise."""
    out = tmp_path / "o"
    args = ["spectrum", "--shortcut", "1", "--units", "1000", "--width", "3", "--samples", "16", "--probes", "2",
            "--steps", "6", "--top", "2", "--max-iter", "20", "--no-verify", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    for name in PLOTS:
        assert (out / name).stat().st_size > 1000
    skipped = _result(out)["theory"]["skipped"]
    assert "P = 9000" in skipped and "--exact-max-params" in skipped and "OneShortcutHessian" not in skipped
    assert "theory skipped" in capsys.readouterr().out


# ------------------------------------------------------------------ 2. strict JSON at a zero Hessian
def test_zero_hessian_writes_strict_json_and_resumes(tmp_path, capsys):
    out = tmp_path / "o"
    args = TINY + ["--shortcut", "3", "--init", "zero", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    res = _result(out)
    assert res["condition"]["lam_max"] == 0.0 and res["condition"]["cond_q10"] is None  # 0 / 0: nan -> null
    assert res["theory"]["method"] == "zero" and res["theory"]["report"]["cond"] is None  # nan -> null
    _strict((out / "spectrum.checkpoint.json").read_text())
    capsys.readouterr()
    assert main(args) == 0  # the checkpoint still resumes
    again = _result(out)
    assert again["resumed"]["lanczos"] is True and again["resumed"]["slq_probes"] == 2
    assert again["lanczos"] == res["lanczos"]
    assert "different options" not in capsys.readouterr().err


# ------------------------------------------------------------------ 3. flags the net would ignore
@pytest.mark.parametrize("extra, match", [
    (["--shortcut", "1", "--mid", "tanh"], r"--mid tanh has no effect with --shortcut 1"),
    (["--shortcut", "0", "--pre", "relu"], r"--pre relu has no effect on a plain net \(--shortcut 0\).*--mid"),
    (["--shortcut", "0", "--post", "tanh"], r"--post tanh has no effect on a plain net"),
    (["--init", "zero", "--scale", "0.5"], r"--scale 0.5 has no effect with --init zero"),
    (["--data", "digits", "--noise", "0.5"], r"--noise 0.5 has no effect with --data digits"),
    (["--data", "digits", "--noise", "0.1"], r"--noise 0.1 has no effect with --data digits"),  # the default, given
    (["--data", "digits", "--width", "65"], r"--width 65 does not fit --data digits: its images have 64 pixels"),
])
def test_ignored_flags_are_refused(tmp_path, extra, match):
    with pytest.raises(SystemExit, match=match):
        main(TINY + extra + ["--no-plots", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # refused before anything is written


def test_meaningful_activation_flags_are_accepted(tmp_path):
    assert main(TINY + ["--shortcut", "1", "--pre", "tanh", "--post", "tanh", "--init", "small", "--no-plots",
                        "--out", str(tmp_path / "a")]) == 0
    assert main(TINY + ["--shortcut", "0", "--mid", "tanh", "--init", "small", "--no-plots",
                        "--out", str(tmp_path / "b")]) == 0


# ------------------------------------------------------------------ 4. bad arguments
@pytest.mark.parametrize("flag, value", [
    ("--units", "0"), ("--width", "-1"), ("--samples", "0"), ("--top", "0"), ("--probes", "0"), ("--steps", "1"),
    ("--steps", "x"), ("--probe-batch", "0"), ("--max-iter", "0"), ("--lanczos-products", "0"),
    ("--exact-max-params", "-1"), ("--batch-size", "0"), ("--seed", "-1"), ("--seed", str(2**63)),
    ("--noise", "-0.1"), ("--noise", "nan"), ("--scale", "-0.01"), ("--basis-gib", "inf"), ("--basis-gib", "0"),
    ("--basis-gib", "nan"), ("--shortcut", "-1"),
])
def test_bad_values_are_refused_by_the_parser(tmp_path, capsys, flag, value):
    extra = ["--init", "small"] if flag == "--scale" else []
    with pytest.raises(SystemExit) as e:
        main(TINY + extra + [flag, value, "--no-plots", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected" in err and value in err
    assert err.count("\n") == 1 and err.startswith("shortcut-ext spectrum: error: argument"), err  # one line
    if flag == "--steps" and value == "1":
        assert ">= 2" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--lr", "-1", "--out", "x.json"], ["train", "--probe-parts", "nope", "--out", "x.json"],
    ["landscape", "--points", "0", "--out", "o"], ["bench", "--units", "0"], ["reproduce", "--quick", "--full"],
    ["reproduce", "--workers", "0", "--out", "o"], ["demo", "--nope"], [], ["nosuch"]])
def test_every_commands_parser_errors_are_one_line(tmp_path, capsys, monkeypatch, argv):
    """argparse's own refusals (a flag's type or choices, exclusive flags, a missing command) are one line naming
    the flag, as the commands' own are, not the usage block first; exit status 2."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shortcut-ext") and ": error: " in err, err
    assert "--help lists the options" in err and "usage:" not in err
    if not argv:  # no command: which there are
        assert "required: command (one of: demo, reproduce, train, spectrum, landscape, bench, info)" in err
    assert not any(tmp_path.iterdir())


def test_basis_gib_too_small_for_one_vector(tmp_path):
    with pytest.raises(SystemExit, match=r"--basis-gib 1e-12 \(1 bytes\) cannot hold one basis vector of P = 108 "
                                         r"float64 numbers \(864 bytes\)"):
        main(TINY + ["--basis-gib", "1e-12", "--no-plots", "--out", str(tmp_path / "o")])


def test_lanczos_room_for_top_at_both_ends(tmp_path):
    with pytest.raises(SystemExit, match=r"--max-iter 3 gives at most 3 Ritz values, but --top 2 at both ends "
                                         r"needs 4"):
        main(TINY + ["--max-iter", "3", "--no-plots", "--out", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match=r"--lanczos-products 3 gives at most 3 Ritz values.*needs 4"):
        main(TINY + ["--lanczos-products", "3", "--no-plots", "--out", str(tmp_path / "b")])


def test_out_is_checked_before_any_work(tmp_path, monkeypatch):
    import shortcut_ext.curvature.spectrum_cmd as cmd

    def no_data(*a, **k):
        raise AssertionError("data loaded before --out was checked")

    monkeypatch.setattr(cmd, "load_data", no_data)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(SystemExit, match=r"--out .*file.txt must be a folder, but .*file.txt is a file"):
        main(TINY + ["--no-plots", "--out", str(f)])
    with pytest.raises(SystemExit, match=r"--out .*file.txt/sub must be a folder, but .*file.txt is a file"):
        main(TINY + ["--no-plots", "--out", str(f / "sub")])


# ------------------------------------------------------------------ 5. more samples than the data holds
def test_digits_samples_above_the_data_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--samples must be <= 1797, the number of samples of --data digits, "
                                         r"got 5000"):
        main(TINY + ["--data", "digits", "--samples", "5000", "--no-plots", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 6. unconverged Lanczos
def test_unconverged_lanczos_warns_and_is_recorded(tmp_path, capsys):
    NO_EXACT = ["--exact-max-params", "0"]
    assert main(TINY + NO_EXACT + ["--init", "small", "--max-iter", "4", "--no-plots", "--out",
                                   str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: Lanczos did not converge" in err and "--max-iter" in err and "--lanczos-products" in err
    res = _result(tmp_path / "a")
    assert res["converged"] is False and res["condition"]["converged"] is False
    assert res["lanczos"]["converged"] is False and len(res["warnings"]) == 1

    # with the exact spectrum the summary holds exact values: stdout, "condition" and the warnings said
    # |lambda|max was Lanczos's unconverged estimate (a value the JSON did not hold)
    assert main(TINY + ["--init", "small", "--max-iter", "4", "--no-plots", "--out", str(tmp_path / "e")]) == 0
    out, err = capsys.readouterr()
    res = _result(tmp_path / "e")
    assert "WARNING" not in err and res["warnings"] == [] and res["lanczos"]["converged"] is False
    assert "Lanczos did not converge" in res["lanczos"]["notes"][0]
    c = res["condition"]
    assert c["method"] == "exact" and c["converged"] is True and c["lam_max_residual"] is None
    assert res["converged"] is True and f"|lambda|max = {c['lam_max']:.6g}  " in out and "residual" not in out

    assert main(TINY + NO_EXACT + ["--init", "small", "--lanczos-products", "5", "--no-plots", "--out",
                                   str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: Lanczos did not converge" in err and "--lanczos-products (now 5)" in err
    assert _result(tmp_path / "b")["condition"]["converged"] is False

    assert main(TINY + ["--init", "small", "--no-plots", "--out", str(tmp_path / "c")]) == 0
    assert "WARNING" not in capsys.readouterr().err
    res = _result(tmp_path / "c")
    assert res["converged"] is True and res["condition"]["converged"] is True and res["warnings"] == []


# ------------------------------------------------------------------ 7. theory errors on the spectrum's scale
def test_theory_errors_are_relative_to_the_spectrum_scale(tmp_path):
    out = tmp_path / "o"
    assert main(TINY + ["--loss", "cross_entropy", "--no-plots", "--out", str(out)]) == 0
    th = _result(out)["theory"]
    assert th["report"]["lam_q10"] < 1e-12  # the theory's q = 0.1 quantile is a numerical zero
    assert th["rel_error_scale"] == pytest.approx(th["report"]["lam_max"])
    assert "lambda|max" in th["rel_error_definition"]
    assert th["slq_q10_rel_error"] < 1e-10 and th["lanczos_rel_error"] < 1e-10


# ------------------------------------------------------------------ 8. a checkpoint of other options
def test_replaced_checkpoint_is_announced(tmp_path, capsys):
    out = tmp_path / "o"
    base = TINY + ["--init", "small", "--no-plots", "--out", str(out)]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--probes", "3", "--seed", "4"]) == 0
    err = capsys.readouterr().err
    assert f"the checkpoint in --out {out} was made with different options" in err
    assert "--probes 2 -> 3" in err and "--seed 0 -> 4" in err and "replaced" in err
    assert _result(out)["resumed"]["lanczos"] is False
    assert main(base + ["--probes", "3", "--seed", "4"]) == 0  # same options: resumed, no notice
    assert "different options" not in capsys.readouterr().err
    assert _result(out)["resumed"]["lanczos"] is True


def test_checkpoint_of_another_format_is_not_resumed(tmp_path, capsys):
    """Checkpoints carry a format number: one without it (written before the field, computed as now)
    resumes; one of another format is replaced with a notice instead of resumed into other numbers."""
    out = tmp_path / "o"
    base = TINY + ["--init", "small", "--no-plots", "--out", str(out)]
    assert main(base) == 0
    ck = out / "spectrum.checkpoint.json"
    state = json.loads(ck.read_text())
    assert state["format"] == spectrum_cmd.CHECKPOINT_FORMAT
    del state["format"]
    ck.write_text(json.dumps(state))
    assert main(base) == 0 and _result(out)["resumed"]["lanczos"] is True
    ck.write_text(json.dumps(dict(state, format=spectrum_cmd.CHECKPOINT_FORMAT + 1)))
    capsys.readouterr()
    assert main(base) == 0
    err = capsys.readouterr().err
    assert f"written by another version of shortcut_ext (checkpoint format {spectrum_cmd.CHECKPOINT_FORMAT + 1}" in err
    assert "replaced" in err and _result(out)["resumed"]["lanczos"] is False
    assert json.loads(ck.read_text())["format"] == spectrum_cmd.CHECKPOINT_FORMAT
    ck.write_text(json.dumps(dict(state, format=str(spectrum_cmd.CHECKPOINT_FORMAT))))  # a string: named as one
    assert main(base) == 0
    assert f"(checkpoint format '{spectrum_cmd.CHECKPOINT_FORMAT}', this version writes" in capsys.readouterr().err


def test_sizes_beyond_memory_and_overflow_are_one_line(tmp_path, capsys, monkeypatch):
    """A net or --basis-gib beyond the machine's memory is refused before any work (it allocated for
    23 s, then failed with a traceback); a Hessian that overflows (3000 He-init plain layers) ends in one
    line with exit status 1, not a 24-line traceback."""
    import shortcut_ext._cli_args as cli_args

    monkeypatch.setattr(cli_args, "device_memory", lambda device: (16 * 2**30, "this machine's"))
    with pytest.raises(SystemExit) as e:
        main(["spectrum", "--units", "100000000", "--width", "16", "--out", str(tmp_path / "a")])
    assert e.value.code == 2 and "--units 100000000 --width 16 (P = 51200000000 weights) is too large" in str(e.value)
    with pytest.raises(SystemExit) as e:
        main(["spectrum", "--units", "20000", "--width", "16", "--basis-gib", "1e9", "--out", str(tmp_path / "b")])
    assert e.value.code == 2 and "--basis-gib 1e+09 lets the Krylov bases of this run take" in str(e.value)
    assert main(TINY + ["--basis-gib", "1e9", "--no-plots", "--out", str(tmp_path / "tiny")]) == 0  # a cap, not a need
    capsys.readouterr()
    rc = main(["spectrum", "--shortcut", "0", "--units", "3000", "--width", "4", "--init", "he", "--data", "synthetic",
               "--samples", "32", "--no-progress", "--no-plots", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 1 and "failed: the operator returned non-finite values" in err and "Traceback" not in err


# ------------------------------------------------------------------ zero tolerance of the exact block
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_exact_block_zero_tolerance_follows_the_dtype(tmp_path, dtype):
    """2-shortcut zero point with 2 samples: M has rank 2, so 48 of the 96 eigenvalues are 0.  The
    float32 run's exact block used float64's tolerance and counted them as negative (index 0.5,
    cond 4e10)."""
    out = tmp_path / dtype
    assert main(["spectrum", "--shortcut", "2", "--units", "3", "--width", "4", "--samples", "2", "--init", "zero",
                 "--dtype", dtype, "--probes", "2", "--steps", "8", "--top", "2", "--no-progress", "--no-plots",
                 "--out", str(out)]) == 0
    exact = _result(out)["exact"]
    assert exact["index"] == pytest.approx(0.25) and exact["cond"] == "inf"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_exact_block_symmetrises_in_float64_in_place(tmp_path, monkeypatch, dtype):
    """The dense matrix is symmetrised a tile at a time in float64 (it was (D + D^T) / 2 at full size, in the
    operator's dtype, beside three more P x P copies); its largest |lambda| is the dense matrix's."""
    import shortcut_ext.curvature.condition as condition

    seen = []
    real = condition.symmetrize_lower_

    def spy(D, *a, **k):
        seen.append((D.dtype, D.device.type, tuple(D.shape), D.clone()))
        return real(D, *a, **k)

    monkeypatch.setattr(condition, "symmetrize_lower_", spy)
    out = tmp_path / dtype
    assert main(TINY + ["--dtype", dtype, "--init", "small", "--no-plots", "--out", str(out)]) == 0
    (dt, dev, shape, D), = seen
    assert dt == torch.float64 and dev == "cpu" and shape == (6 * 2 * 9, 6 * 2 * 9)
    lam = torch.linalg.eigvalsh(0.5 * (D + D.T)).abs().max().item()
    assert _result(out)["exact"]["lam_max"] == pytest.approx(lam, rel=1e-12)


def test_unresolved_slq_is_warned_and_saved(tmp_path, capsys):
    """A deep Xavier plain net crowds eigenvalues near 0: 8 SLQ steps cannot resolve them, and the run
    says so instead of reporting |lambda|(0.1) and the index with only the probe spread."""
    out = tmp_path / "o"
    args = ["spectrum", "--shortcut", "0", "--units", "12", "--width", "4", "--init", "xavier", "--samples", "64",
            "--dtype", "float64", "--probes", "2", "--steps", "8", "--top", "2", "--no-progress", "--no-plots"]
    assert main(args + ["--exact-max-params", "0", "--out", str(out)]) == 0
    res = _result(out)
    assert res["condition"]["lam_q10_resolved"] is False and res["condition"]["method"] == "lanczos+slq"
    assert res["slq"]["q10_unresolved_mass"] >= 0.05
    assert "SLQ did not resolve the spectrum near 0" in capsys.readouterr().err
    # with the exact spectrum at hand (P = 192), the summary and the condition block are exact (they were SLQ's,
    # off by factors, beside the exact values in the same JSON), and SLQ's caveat is a note, not a warning
    out2 = tmp_path / "exact"
    assert main(args + ["--out", str(out2)]) == 0
    res, printed = _result(out2), capsys.readouterr()
    c, ex = res["condition"], res["exact"]
    assert c["method"] == "exact" and c["lam_q10_resolved"] is True
    assert (c["index"], c["lam_q10"], c["cond_q10"]) == (ex["index"], ex["lam_q10"], ex["cond_q10"])
    assert c["index"] != res["slq"]["index"] and f"index = {ex['index']:.4f}  (exact spectrum)" in printed.out
    assert "SLQ did not resolve" not in printed.err and any("SLQ did not resolve" in n for n in res["slq"]["notes"])


def test_converged_lanczos_is_not_reported_unconverged(tmp_path, capsys):
    """The README's spectrum example, small: Lanczos stops on converged estimates and its extremes match
    Theorem 1 to 1e-14, but a final residual check stricter than the loop's (eps^(2/3) on residuals the
    restarted segments keep near 1e-9) called it unconverged and advised budgets it never used."""
    out = tmp_path / "o"
    assert main(["spectrum", "--units", "5", "--width", "16", "--probes", "2", "--steps", "40", "--exact-max-params",
                 "0", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    res = _result(out)
    assert res["converged"] is True and res["lanczos"]["stop_reason"] == "converged"
    assert res["theory"]["lanczos_rel_error"] < 1e-12
    assert "WARNING" not in capsys.readouterr().err


def test_digits_width_beyond_the_components_names_the_flags(tmp_path):
    with pytest.raises(SystemExit, match=r"--width 64 does not fit --data digits with --samples 512: .*only 59 "
                                         r"principal components.*raise --samples"):
        main(["spectrum", "--data", "digits", "--width", "64", "--no-progress", "--out", str(tmp_path / "o")])


def test_float32_runs_say_when_float32_decided_the_numbers(tmp_path, capsys):
    """Float32 spectra: the eigenvalues its zero tolerance swallows (a 1-shortcut zero point: |lambda|min
    4e-3 against a tolerance of 0.1, so cond was inf) and a Hessian near float32's underflow (a 450-layer
    tanh plain net: |lambda|max ~1e-29, where norms vanish) are reported with a warning naming
    --dtype float64, and every float32 run records one product's error against float64."""
    out = tmp_path / "zero"
    assert main(["spectrum", "--shortcut", "1", "--units", "128", "--width", "4", "--init", "zero", "--dtype",
                 "float32", "--probes", "2", "--steps", "10", "--top", "2", "--no-progress", "--no-plots",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "eigenvalues of the exact spectrum lie within float32's zero tolerance" in err
    chk = _result(out)["float32_check"]
    assert 0 < chk["rel_error"] < 1e-5
    out = tmp_path / "deep"
    assert main(["spectrum", "--shortcut", "0", "--units", "450", "--width", "4", "--init", "xavier", "--mid",
                 "tanh", "--dtype", "float32", "--probes", "2", "--steps", "10", "--top", "2", "--exact-max-params",
                 "0", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    assert "near float32's underflow" in capsys.readouterr().err


def test_float32_zero_hessian_has_no_resolution_warning(tmp_path, capsys):
    """At the 3-shortcut zero point the Hessian is exactly 0: float64 finds the same zeros, so the float32
    run must not suggest that float64 would resolve them."""
    assert main(["spectrum", "--shortcut", "3", "--units", "2", "--width", "3", "--init", "zero", "--dtype",
                 "float32", "--probes", "2", "--steps", "10", "--top", "2", "--no-progress", "--no-plots",
                 "--out", str(tmp_path / "o")]) == 0
    assert "float32's zero tolerance" not in capsys.readouterr().err


def test_theory_assumptions_that_fail_are_warned(tmp_path, capsys):
    """With --mid relu at the zero point Theorem 1's smoothness assumption fails: it was in the JSON only,
    while the console showed |lambda|max = 0 beside the theory's numbers."""
    out = tmp_path / "o"
    assert main(TINY + ["--mid", "relu", "--init", "zero", "--no-plots", "--out", str(out)]) == 0
    res = _result(out)
    assert res["theory"]["assumptions"]["holds"] is False
    err = capsys.readouterr().err
    assert "WARNING: the zero-point theory's assumptions do not hold here" in err
    assert any("assumptions do not hold" in w for w in res["warnings"])


def test_other_errors_during_lanczos_are_not_blamed_on_the_basis_flags(tmp_path, monkeypatch, capsys):
    """A bad SHORTCUT_EXT_HVP_STORE_MB found inside Lanczos used to end as "(flags: --max-iter,
    --lanczos-products, --basis-gib)" and ignore SHORTCUT_EXT_TRACEBACK; it now ends as any other bad
    value does: its own line, exit status 2, the traceback on request."""
    monkeypatch.setenv("SHORTCUT_EXT_HVP_STORE_MB", "x")
    assert main(TINY + ["--no-plots", "--no-progress", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "SHORTCUT_EXT_HVP_STORE_MB must be a number" in err and "flags:" not in err
    monkeypatch.setenv("SHORTCUT_EXT_TRACEBACK", "1")
    with pytest.raises(ValueError, match="SHORTCUT_EXT_HVP_STORE_MB"):
        main(TINY + ["--no-plots", "--no-progress", "--out", str(tmp_path / "b")])


def test_exact_max_params_above_the_dense_limit_is_honoured(tmp_path, monkeypatch):
    """--exact-max-params above to_dense()'s own limit (MAX_DENSE_PARAMS, 8192) failed after Lanczos and SLQ
    had run, with a hint to pass force=True, which no flag sets; the flag is the limit asked for (here the
    library limit is lowered to 50 so that a tiny net, P = 108, crosses it)."""
    from shortcut_ext.curvature import hessian

    monkeypatch.setattr(hessian, "MAX_DENSE_PARAMS", 50)
    out = tmp_path / "s"
    assert main(TINY + ["--exact-max-params", "200", "--no-plots", "--out", str(out)]) == 0
    assert _result(out)["condition"]["method"] == "exact"


def test_a_dense_spectrum_that_cannot_fit_is_refused_before_any_work(tmp_path, monkeypatch):
    from shortcut_ext import _cli_args

    monkeypatch.setattr(_cli_args, "device_memory", lambda device: (200_000, "this machine's"))
    with pytest.raises(SystemExit, match=r"--exact-max-params 200 asks for the dense spectrum of P = 108 weights, "
                                         r"which needs about .* GiB, more than this machine's"):
        main(TINY + ["--exact-max-params", "200", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s" / "spectrum.json").exists()


def test_float32_slq_warnings_step_aside_for_the_exact_spectrum(tmp_path):
    """float32: SLQ's zero-tolerance warnings ("cond_q10 is reported inf") stayed among the warnings
    when the exact spectrum had replaced SLQ's numbers (cond_q10 = 13114.8 in the same file)."""
    assert main(["spectrum", "--shortcut", "0", "--units", "6", "--width", "10", "--init", "xavier", "--data",
                 "digits", "--samples", "500", "--top", "2", "--probes", "4", "--steps", "40", "--dtype", "float32",
                 "--no-progress", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    res = _result(tmp_path / "o")
    assert res["condition"]["method"] == "exact" and math.isfinite(res["condition"]["cond_q10"])
    assert not [w for w in res["warnings"] if "reported inf" in w or w.startswith("SLQ")]
    assert any("cond_q10 is reported inf" in n for n in res["slq"]["notes"])


def test_theory_line_compares_the_exact_spectrum(tmp_path, capsys):
    """With the exact spectrum the theory line compared only Lanczos's unconverged extremes (a "43%
    error" beside an exact spectrum that matched Theorem 1 to 1e-15), and no warning explained it."""
    assert main(["spectrum", "--shortcut", "2", "--units", "20", "--width", "4", "--init", "zero", "--top", "2",
                 "--max-iter", "6", "--no-progress", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    th = _result(tmp_path / "o")["theory"]
    assert th["exact_rel_error"] < 1e-12 and th["lanczos_rel_error"] > 0.1
    assert f"exact spectrum error / |lambda|max {th['exact_rel_error']:.2e}" in out
    assert "Lanczos did not converge" in out


def test_a_resumed_spectrum_says_so_and_keeps_the_earlier_timings(tmp_path, capsys):
    """A resumed spectrum printed only its summary, and its timings_s lost the Lanczos entry and counted the last
    process only (total 2.78 s for an 18.7 s spectrum)."""
    out = tmp_path / "o"
    args = TINY + ["--init", "small", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    first = _result(out)["timings_s"]
    assert "resuming" not in capsys.readouterr().err
    ck = json.loads((out / "spectrum.checkpoint.json").read_text())
    assert ck["seconds"]["lanczos"] == pytest.approx(first["lanczos"]) and ck["seconds"]["slq"] > 0
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"resuming from the checkpoint {out / 'spectrum.checkpoint.json'}: the Lanczos extremes are done, 2 of 2" in err
    again = _result(out)["timings_s"]
    assert again["lanczos"] == pytest.approx(first["lanczos"]) and again["slq"] >= ck["seconds"]["slq"]
    assert again["total"] >= again["lanczos"] + ck["seconds"]["slq"] and again["this_process"] < again["total"]
    assert _result(out)["resumed"]["seconds_unknown"] == []
    # a checkpoint of an older version holds no seconds: the resumed parts' earlier time is named as unknown,
    # not recorded as this process's share
    ck.pop("seconds")
    (out / "spectrum.checkpoint.json").write_text(json.dumps(ck))
    assert main(args) == 0
    res = _result(out)
    assert res["resumed"]["seconds_unknown"] == ["lanczos", "slq"] and "lanczos" not in res["timings_s"]
    assert "slq" not in res["timings_s"] and res["timings_s"]["slq_this_process"] >= 0
    assert "slq" not in json.loads((out / "spectrum.checkpoint.json").read_text()).get("seconds", {})


def test_a_float32_run_with_a_read_out_does_not_warn_of_a_fallback(tmp_path):
    """The float32 check builds a float64 copy whose float32 read-out is orthonormal to float32 precision only:
    its operator warned "HessianOperator(backend='fused') runs autograd Hessian-vector products" though the
    run itself used the fused kernel."""
    import warnings

    from shortcut_ext.curvature.hessian import FallbackWarning

    out = tmp_path / "o"
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        assert main(["spectrum", "--data", "digits", "--width", "6", "--units", "3", "--samples", "40",
                     "--dtype", "float32", "--probes", "2", "--steps", "8", "--top", "2", "--no-progress",
                     "--no-plots", "--out", str(out)]) == 0
    assert not [w for w in got if issubclass(w.category, FallbackWarning)]
    res = _result(out)
    assert res["float32_check"]["float64_backend_used"] in ("fused", "autograd")
    from shortcut_ext import is_built

    if is_built():
        assert res["backend_used"] == "fused"


def test_float32_check_above_1e_3_is_a_warning_naming_float64(tmp_path, capsys, monkeypatch):
    """Not tested: the warning when the float32 operator's product differs from float64's by more than 1e-3
    (no tiny run reaches it: the measured errors are ~1e-7).  The check is made to report 2e-3 and then
    9e-4: above 1e-3 the warning (with the error, naming --dtype float64) is in the JSON's warnings and on
    stderr, below it there is none; the check's value is recorded either way."""
    real = spectrum_cmd._float32_check
    args = TINY + ["--dtype", "float32", "--no-plots"]
    for rel, warned in ((2e-3, True), (9e-4, False)):
        monkeypatch.setattr(spectrum_cmd, "_float32_check",
                            lambda *a, rel=rel: {**real(*a), "rel_error": rel})
        out = tmp_path / f"o{rel}"
        capsys.readouterr()
        assert main(args + ["--out", str(out)]) == 0
        res, err = _result(out), capsys.readouterr().err
        assert res["float32_check"]["rel_error"] == rel and res["float32_check"]["products_float64"] == 1
        msg = [w for w in res["warnings"] if w.startswith("float32 Hessian-vector products differ")]
        if warned:
            assert msg == [f"float32 Hessian-vector products differ from float64 ones by {rel:.2g} (relative, one "
                           "random direction): the float32 spectrum is unreliable; use --dtype float64"]
            assert "differ from float64 ones by 0.002" in err
        else:
            assert msg == [] and "differ from float64 ones" not in err


def test_a_theory_that_raises_is_skipped_with_its_reason(tmp_path, capsys, monkeypatch):
    """Not tested: the zero-point theory raising a ValueError for a 2-shortcut zero-init net (a net the
    theory does not cover).  The run still finishes (exit 0) with its Lanczos and SLQ numbers, records
    ``theory = {"skipped": <the error>}`` with no theory comparison, and prints "theory skipped: <reason>"."""
    from shortcut_ext import theory

    def refuse(*a, **k):
        raise ValueError("Theorem 1 does not cover this net")

    monkeypatch.setattr(theory, "model_zero_point_spectrum", refuse)
    out = tmp_path / "o"
    assert main(TINY + ["--init", "zero", "--no-plots", "--out", str(out)]) == 0
    res = _result(out)
    assert res["theory"] == {"skipped": "Theorem 1 does not cover this net"}
    assert len(res["lanczos"]["largest"]) == 2 and math.isfinite(res["lanczos"]["largest"][0])
    assert "shortcut-ext spectrum: theory skipped: Theorem 1 does not cover this net" in capsys.readouterr().out


def test_damaged_lanczos_checkpoint_entries_are_named_and_the_run_starts_afresh(tmp_path, capsys):
    """Not tested: the checks of a spectrum checkpoint's Lanczos entry other than its Ritz values (a non-object,
    a missing key, lists of other lengths, a count that is not one, the wrong type of segments / converged, a
    non-finite norm estimate) and an SLQ entry that is not an object.  Each is named by ``_damaged_checkpoint``
    (the intact checkpoint: None), and a rerun on one of them starts afresh with the first run's numbers."""
    out = tmp_path / "o"
    args = TINY + ["--init", "xavier", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    want = _result(out)["condition"]
    ck_path = out / "spectrum.checkpoint.json"
    good = json.loads(ck_path.read_text())
    from shortcut_ext.cli import build_parser

    ns = build_parser().parse_args(args)
    assert spectrum_cmd._damaged_checkpoint(good, ns) is None
    lz = good["lanczos"]
    cases = [({"lanczos": "x"}, "the Lanczos entry is not an object"),
             ({"lanczos": {k: v for k, v in lz.items() if k != "restarts"}}, "the Lanczos entry lacks restarts"),
             ({"lanczos": {**lz, "smallest": lz["smallest"][:1]}}, "the Lanczos lists differ in length"),
             ({"lanczos": {**lz, "num_products": -1}}, "lanczos.num_products is not a count"),
             ({"lanczos": {**lz, "breakdowns": True}}, "lanczos.breakdowns is not a count"),
             ({"lanczos": {**lz, "converged": 1}}, "lanczos.converged is not true or false"),
             ({"lanczos": {**lz, "segments": "0-3"}}, "lanczos.segments is not a list of [start, end, reason]"),
             ({"lanczos": {**lz, "norm_estimate": math.inf}}, "lanczos.norm_estimate is not a finite number"),
             ({"lanczos": {**lz, "norm_estimate": "1"}}, "lanczos.norm_estimate is not a finite number"),
             ({"slq": []}, "the SLQ entry is not an object")]
    for damage, why in cases:
        assert spectrum_cmd._damaged_checkpoint({**good, **damage}, ns) == why, why
    ck_path.write_text(json.dumps({**good, "lanczos": {**lz, "num_products": -1}}))
    capsys.readouterr()
    assert main(args) == 0
    assert "holds damaged entries" in capsys.readouterr().err
    got = _result(out)
    assert got["resumed"]["lanczos"] is False and got["condition"] == pytest.approx(want)


def test_checkpoint_json_encodes_numpy_and_torch_values():
    """Not tested: ``_json_default``, the encoder of spectrum checkpoints: numpy scalars become Python numbers
    (the same value), arrays lists, torch dtypes their names; anything else is a TypeError naming the type
    (json.dumps's contract for ``default``), not a silent string."""
    import numpy as np
    import torch

    obj = {"f": np.float32(1.5), "i": np.int64(7), "a": np.array([[1.0, 2.0]]), "d": torch.float32}
    text = json.dumps(obj, default=spectrum_cmd._json_default)
    assert json.loads(text) == {"f": 1.5, "i": 7, "a": [[1.0, 2.0]], "d": "torch.float32"}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        json.dumps({"x": object()}, default=spectrum_cmd._json_default)


# ------------------------------------------------------------------ QA 12 mutation survivors (experiments)
# every flag of `spectrum` and a value other than the base run's: the computational ones change the numbers
# (a checkpoint of the other value is replaced), the placement ones (where it runs, how it is shown) do not
_COMPUTATIONAL = {"--shortcut": "3", "--units": "7", "--width": "4", "--init": "xavier", "--scale": "0.02",
                  "--pre": "tanh", "--mid": "tanh", "--post": "tanh", "--data": "digits", "--samples": "33",
                  "--noise": "0.2", "--loss": "cross_entropy", "--batch-size": "16", "--top": "3", "--probes": "3",
                  "--steps": "9", "--probe-batch": "1", "--max-iter": "20", "--lanczos-products": "30",
                  "--basis-gib": "2.0", "--no-verify": None, "--exact-max-params": "100", "--seed": "4",
                  "--dtype": "float32", "--backend": "autograd", "--matrix": "ggn"}
_PLACEMENT = ("--device", "--distributed", "--no-plots", "--no-progress", "--out")
# known by the file's digest, not its path: test_the_spectrum_of_a_trained_net
_BY_CONTENT = ("--weights",)


@pytest.fixture(scope="module")
def finished_spectrum(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "o"
    base = TINY + ["--init", "small", "--no-plots", "--out", str(out)]
    assert main(base) == 0
    return out, base


def _checkpoint_for(argv, capsys):
    from shortcut_ext.cli import build_parser

    capsys.readouterr()
    args = build_parser().parse_args(argv)
    spectrum_cmd._check_options(args)  # as the command does first (it resolves the defaults the flags leave open)
    ck = spectrum_cmd._Checkpoint(args, write=True)
    return ck, capsys.readouterr().err


def test_every_spectrum_flag_is_either_computational_or_placement():
    """The lists below cover the command's flags: a new flag must be sorted into one (and so tested)."""
    from shortcut_ext.cli import build_parser

    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    flags = {o for a in sub.choices["spectrum"]._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert flags == set(_COMPUTATIONAL) | set(_PLACEMENT) | set(_BY_CONTENT)


@pytest.mark.parametrize("flag", sorted(_COMPUTATIONAL))
def test_a_checkpoint_of_another_value_of_any_computational_flag_is_replaced(finished_spectrum, flag, capsys):
    """Not pinned: which options a spectrum checkpoint is compared on (test_replaced_checkpoint_is_announced
    changes --probes and --seed only). Every flag that changes the numbers must replace the checkpoint with a
    notice naming it; --steps once counted as placement and resumed SLQ probes of another length."""
    out, base = finished_spectrum
    value = _COMPUTATIONAL[flag]
    ck, err = _checkpoint_for(base + ([flag] if value is None else [flag, value]), capsys)
    assert ck.state["lanczos"] is None and ck.slq_done == {}, flag
    assert f"the checkpoint in --out {out} was made with different options ({flag} " in err, err
    assert f" -> {'on' if value is None else value}); it is not resumed and is being replaced" in err, err


def test_placement_flags_do_not_replace_a_spectrum_checkpoint(finished_spectrum, capsys):
    """Where a spectrum runs and how it is shown (--device, --distributed, plots, progress bars) leave its numbers
    alone: the checkpoint is resumed whole, without a notice. A --steps change end to end is not."""
    out, base = finished_spectrum
    no_show = [a for a in base if a not in ("--no-plots", "--no-progress")]
    for argv in (base + ["--device", "cuda"], base + ["--distributed"], no_show):
        ck, err = _checkpoint_for(argv, capsys)
        assert ck.state["lanczos"] is not None and sorted(ck.slq_done) == [0, 1] and err == "", (argv, err)
    import shutil

    other = out.parent / "steps"  # a copy: the fixture's checkpoint stays as it was
    shutil.copytree(out, other)
    capsys.readouterr()
    assert main(base[:-1] + [str(other), "--steps", "10"]) == 0
    assert "(--steps 8 -> 10); it is not resumed" in capsys.readouterr().err
    res = _result(other)
    assert res["resumed"]["lanczos"] is False and res["resumed"]["slq_probes"] == 0
    assert max(res["slq"]["steps"]) == 10


def test_the_total_time_of_a_resumed_spectrum_adds_the_earlier_lanczos_and_slq_time(tmp_path):
    """Not pinned exactly (the existing check is an inequality that a tiny run passes anyway): a rerun's
    timings_s.total is this process's time plus what earlier processes spent on the Lanczos extremes and on the
    SLQ probes it resumed (README); the SLQ part was once left out."""
    out = tmp_path / "o"
    args = TINY + ["--init", "small", "--no-plots", "--out", str(out)]
    assert main(args) == 0
    path = out / "spectrum.checkpoint.json"
    ck = json.loads(path.read_text())
    ck["seconds"] = {"lanczos": 50.0, "slq": 100.0}  # earlier processes' time, far above this process's
    path.write_text(json.dumps(ck))
    assert main(args) == 0
    t = _result(out)["timings_s"]
    assert t["lanczos"] == 50.0 and 100.0 <= t["slq"] < 100.0 + t["this_process"]
    assert t["total"] == pytest.approx(t["this_process"] + 150.0, abs=0.05), t


def test_a_cuda_index_one_past_the_visible_devices_is_refused(monkeypatch):
    """Not pinned: with one CUDA device visible, --device cuda:1 (an index equal to the count) is refused with a
    one-line error; cuda:0 and cuda are accepted.  (CUDA is faked: the check needs no GPU.)"""
    import torch

    from shortcut_ext._device import parse_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=r"--device cuda:1: only 1 CUDA device\(s\) are visible"):
        parse_device("cuda:1", "spectrum")
    assert parse_device("cuda:0", "spectrum") == "cuda:0" and parse_device("cuda", "spectrum") == "cuda"


def test_digits_takes_all_of_its_samples(tmp_path, monkeypatch):
    """Not pinned: --data digits --samples 1797 (every sample of the data set, the documented maximum) runs;
    only more is refused."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    assert main(["spectrum", "--data", "digits", "--samples", "1797", "--units", "2", "--width", "2", "--probes", "2",
                 "--steps", "5", "--top", "2", "--exact-max-params", "0", "--no-plots", "--no-progress",
                 "--out", str(out)]) == 0
    assert _result(out)["slq"]["probes"] == 2


@pytest.mark.parametrize("damage, why", [
    (lambda slq: slq.update({"3": slq["0"]}), "SLQ probe '3' is not one of the 3 probes"),
    (lambda slq: slq.update({"1": [[], [], 0]}), "SLQ probe 1 is not [alpha, beta, steps] with 1 <= steps <= 5"),
], ids=["probe_index_equal_to_probes", "zero_steps"])
def test_damaged_slq_checkpoint_entries_start_afresh(tmp_path, monkeypatch, capsys, damage, why):
    """Not pinned: a 3-probe checkpoint holding a probe "3" (one past the last index: resumed as 4 of 3 probes)
    or a probe of 0 steps (crashed with an IndexError) is named as damaged, and the run starts afresh with the
    first run's numbers."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    args = ["spectrum", "--units", "3", "--width", "2", "--samples", "20", "--probes", "3", "--steps", "5", "--top",
            "2", "--no-plots", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    want = _result(out)["slq"]
    path = out / "spectrum.checkpoint.json"
    ck = json.loads(path.read_text())
    damage(ck["slq"])
    path.write_text(json.dumps(ck))
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "holds damaged entries (" + why + "); starting afresh" in err, err
    got = _result(out)
    assert got["resumed"]["slq_probes"] == 0 and got["slq"]["probes"] == 3
    assert got["slq"]["abs_quantiles"] == pytest.approx(want["abs_quantiles"], rel=1e-10)


# ------------------------------------------------------------------ the buffer cache between the phases
def test_the_lanczos_buffers_are_freed_before_slq(tmp_path, monkeypatch):
    """Lanczos's one-direction products leave buffers that SLQ's groups of probes cannot reuse: at R = 10000
    the cache held about 1 GB of them through the SLQ phase, on top of its bases.  Freed in between."""
    import importlib

    import shortcut_ext

    lz_mod, slq_mod = (importlib.import_module(f"shortcut_ext.curvature.{m}") for m in ("lanczos", "slq"))
    events = []
    real_lanczos, real_slq, real_release = lz_mod.lanczos, slq_mod.slq, spectrum_cmd.release_cache

    def lanczos(*a, **k):
        out = real_lanczos(*a, **k)
        events.append(("lanczos", shortcut_ext.cache_stats()["cached_bytes"]))
        return out

    def release():
        real_release()
        events.append(("release", shortcut_ext.cache_stats()["cached_bytes"]))

    def slq(*a, **k):
        events.append(("slq", None))
        return real_slq(*a, **k)

    monkeypatch.setattr(lz_mod, "lanczos", lanczos)
    monkeypatch.setattr(slq_mod, "slq", slq)
    monkeypatch.setattr(spectrum_cmd, "release_cache", release)
    assert main(TINY + ["--units", "40", "--width", "8", "--samples", "256", "--out", str(tmp_path / "o"),
                        "--no-plots"]) == 0
    assert [e[0] for e in events] == ["lanczos", "release", "slq"]
    assert events[1][1] == 0, events
    if shortcut_ext.cache_stats()["limit_bytes"] > 0:  # (SHORTCUT_EXT_CPU_CACHE_MB=0 keeps nothing)
        assert events[0][1] > 0, events


# ------------------------------------------------------------------ a trained net (train --save-weights)
def test_the_spectrum_of_a_trained_net(tmp_path, capsys):
    """--weights: the loss is the run's final loss, the exact spectrum is the dense Hessian's of the trained net,
    no zero-point theory is overlaid; the network flags are refused, --seed (the probes') is not; a retrained
    file is another checkpoint."""
    from shortcut_ext.curvature import HessianOperator
    from shortcut_ext.experiments.train_cmd import load_weights

    run = tmp_path / "run.json"
    train = ["train", "--arch", "2-shortcut", "--act", "tanh-mid", "--depth", "4", "--width", "4", "--samples",
             "40", "--lr", "0.3", "--no-progress", "--save-weights", "--out", str(run)]
    assert main(train + ["--epochs", "10"]) == 0
    w = str(tmp_path / "run.weights.pt")
    args = ["spectrum", "--weights", w, "--top", "2", "--probes", "2", "--steps", "8", "--no-progress", "--no-plots"]
    out = tmp_path / "s"
    assert main(args + ["--seed", "3", "--out", str(out)]) == 0
    r = _result(out)
    assert r["loss"] == pytest.approx(json.loads(run.read_text())["final_loss"], rel=1e-12)
    assert "theory" not in r and "trained 10 epochs on digits" in r["net"] and r["num_params"] == 64
    net, bundle, _ = load_weights(w)
    dense = torch.linalg.eigvalsh(HessianOperator(net, (bundle.X, bundle.Y), backend="autograd").to_dense())
    assert r["lanczos"]["largest"][0] == pytest.approx(float(dense[-1]), rel=1e-9)
    assert r["lanczos"]["smallest"][0] == pytest.approx(float(dense[0]), rel=1e-9, abs=1e-12)
    with pytest.raises(SystemExit, match=r"--units, --init have no effect with --weights"):
        main(args + ["--units", "3", "--init", "small", "--out", str(tmp_path / "x")])
    capsys.readouterr()
    assert main(train + ["--epochs", "20"]) == 0  # retrained into the same file: not the checkpoint's weights
    assert main(args + ["--seed", "3", "--out", str(out)]) == 0
    assert "was made with different options (--weights-sha1" in capsys.readouterr().err
    assert _result(out)["loss"] == pytest.approx(json.loads(run.read_text())["final_loss"], rel=1e-12)
    import shutil

    moved = tmp_path / "elsewhere.pt"  # the same weights under another name: the checkpoint is theirs
    shutil.copy(w, moved)
    args[2] = str(moved)
    assert main(args + ["--seed", "3", "--out", str(out)]) == 0
    assert "different options" not in capsys.readouterr().err
    assert _result(out)["resumed"]["lanczos"] is True and _result(out)["resumed"]["slq_probes"] == 2


def test_the_gauss_newton_and_functional_parts(tmp_path, capsys):
    """--matrix ggn / functional: at the 2-shortcut zero point G = 0 (the theory's "zero") and F is the
    whole Hessian, compared with Theorem 1; at the 1-shortcut zero point each part against its theory (G in
    closed form, F assembled) and the dense parts; on a trained net the three runs' extremes are the dense parts' (the
    API's reference, built apart), G has no negative eigenvalue, and the default keeps the checkpoints of
    versions before the flag (its config has no "matrix")."""
    from shortcut_ext.curvature import dense_ggn_func, dense_hessian_func
    from shortcut_ext.experiments.train_cmd import load_weights

    zero = TINY + ["--no-plots", "--init", "zero"]
    res = {}
    for m in ("hessian", "ggn", "functional"):
        assert main(zero + ["--matrix", m, "--out", str(tmp_path / m)]) == 0
        res[m] = _result(tmp_path / m)
        assert res[m]["matrix"] == m
    out = capsys.readouterr().out
    assert "Gauss-Newton part G: |lambda|max = 0 " in out and "functional part H - G: |lambda|max" in out
    assert res["ggn"]["condition"]["lam_max"] == 0
    assert res["ggn"]["theory"]["method"] == "zero" and res["ggn"]["theory"]["exact_rel_error"] == 0
    assert res["functional"]["lanczos"] == res["hessian"]["lanczos"]  # the same bits: F = H there
    assert res["functional"]["theory"]["exact_rel_error"] <= 1e-12
    # the 1-shortcut zero point: G = J (x) A is not zero there, and its theory is in closed form
    one = zero + ["--shortcut", "1", "--pre", "tanh", "--post", "tanh", "--loss", "cross_entropy"]
    for m, method in (("ggn", "closed_form"), ("functional", "assembled"), ("empirical_fisher", "closed_form")):
        assert main(one + ["--matrix", m, "--out", str(tmp_path / f"one-{m}")]) == 0
        r = _result(tmp_path / f"one-{m}")
        assert r["theory"]["method"] == method and r["theory"]["exact_rel_error"] <= 1e-12
        assert r["theory"]["lanczos_rel_error"] <= 1e-8
        assert r["exact"]["lam_max"] > 0.01
        if m != "functional":
            assert r["exact"]["lam_min"] >= -1e-12 and r["condition"]["index"] == 0
    ck = json.loads((tmp_path / "hessian" / "spectrum.checkpoint.json").read_text())
    assert "matrix" not in ck["config"] and json.loads(
        (tmp_path / "ggn" / "spectrum.checkpoint.json").read_text())["config"]["matrix"] == "ggn"

    run = tmp_path / "run.json"
    assert main(["train", "--arch", "2-shortcut", "--act", "tanh-mid", "--depth", "4", "--width", "4", "--samples",
                 "40", "--lr", "0.3", "--epochs", "30", "--no-progress", "--save-weights", "--out", str(run)]) == 0
    w = str(tmp_path / "run.weights.pt")
    net, bundle, _ = load_weights(w)
    H = dense_hessian_func(net, (bundle.X, bundle.Y))
    G = dense_ggn_func(net, (bundle.X, bundle.Y))
    for m, D in (("hessian", H), ("ggn", G), ("functional", H - G)):
        out = tmp_path / f"w-{m}"
        assert main(["spectrum", "--weights", w, "--matrix", m, "--top", "2", "--probes", "2", "--steps", "8",
                     "--no-progress", "--no-plots", "--out", str(out)]) == 0
        r = _result(out)
        ev = torch.linalg.eigvalsh(D)
        assert r["lanczos"]["largest"][0] == pytest.approx(float(ev[-1]), rel=1e-9)
        assert r["lanczos"]["smallest"][0] == pytest.approx(float(ev[0]), rel=1e-9, abs=1e-12)
        assert r["loss"] == pytest.approx(json.loads(run.read_text())["final_loss"], rel=1e-12)
        res[m] = r
    assert res["ggn"]["exact"]["lam_min"] >= -1e-12 and res["ggn"]["condition"]["index"] == 0
    assert res["hessian"]["condition"]["index"] > 0 and res["functional"]["condition"]["index"] > 0
