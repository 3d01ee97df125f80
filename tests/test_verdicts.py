"""The verdicts' thresholds and rules and what the figures draw, pinned on made-up rows with known answers
(mutation testing of the experiment layer found each of these unpinned: a changed rule still passed)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from shortcut_ext.experiments import analysis, figures, reproduce, sweeps

EPOCHS = [0, 1, 2, 4, 8, 16, 32, 64]


def _claim(vs, start):
    hits = [v for v in vs if v.claim.startswith(start)]
    assert len(hits) == 1, [v.claim for v in vs]
    return hits[0]


def _linear_rows(excess: dict, lr: dict, depths=(4, 8, 16), seeds=(0,)):
    """Fig. 9 rows: final loss = L_min + excess(depth, seed) with L_min = 1, L_zero = 2 (relative excess = excess)."""
    return [{"arch": a, "act": "linear", "depth": d, "seed": s, "final_loss": 1.0 + f(d, s), "best_lr": 0.1,
             "max_stable_lr": lr[a]} for a, f in excess.items() for d in depths for s in seeds]


# --------------------------------------------------------------------------- Fig. 9 and Fig. 10 rules
def test_tolerates_larger_rates_needs_a_strictly_larger_rate():
    """'2-shortcut tolerates larger learning rates' held when every net's largest stable rate was the same
    grid point (lr2 >= v passed): equal rates, a coarse grid, are not larger."""
    same = _linear_rows({a: (lambda d, s: 1e-3) for a in ("2-shortcut",) + analysis.PLAIN},
                        {"2-shortcut": 0.316, "plain-xavier": 0.316, "plain-orthogonal": 0.316}, seeds=(0, 1, 2))
    tol = _claim(analysis.verdict_final_loss_linear(same, l_min=1.0, l_zero=2.0), "2-shortcut tolerates")
    assert tol.holds is False and tol.details == {"depth": 16, "2-shortcut": 0.316, "plain-xavier": 0.316,
                                                  "plain-orthogonal": 0.316}
    larger = [dict(r, max_stable_lr=1.0) if r["arch"] == "2-shortcut" else r for r in same]
    assert _claim(analysis.verdict_final_loss_linear(larger, 1.0, 2.0), "2-shortcut tolerates").holds is True
    one_equal = [dict(r, max_stable_lr=1.0) if r["arch"] != "plain-xavier" else r for r in same]
    assert _claim(analysis.verdict_final_loss_linear(one_equal, 1.0, 2.0), "2-shortcut tolerates").holds is False


def test_plain_nets_degrade_only_if_also_worse_than_the_2_shortcut_at_the_deepest_depth():
    """Fig. 9's 'plain nets degrade with depth' is stated (in its test) as worse at the deepest depth than at
    the shallowest AND than the 2-shortcut's at the deepest; the second condition was unpinned."""
    grows_but_better = _linear_rows({"2-shortcut": lambda d, s: 0.5, "plain-xavier": lambda d, s: 1e-3 * d,
                                     "plain-orthogonal": lambda d, s: 1e-3 * d},
                                    {"2-shortcut": 1.0, "plain-xavier": 0.1, "plain-orthogonal": 0.1})
    deg = _claim(analysis.verdict_final_loss_linear(grows_but_better, 1.0, 2.0), "plain Xavier / orthogonal")
    assert deg.holds is False and deg.details == {"plain-xavier": False, "plain-orthogonal": False}
    worse = _linear_rows({"2-shortcut": lambda d, s: 1e-3, "plain-xavier": lambda d, s: 1e-3 * d,
                          "plain-orthogonal": lambda d, s: 1e-3 * d},
                         {"2-shortcut": 1.0, "plain-xavier": 0.1, "plain-orthogonal": 0.1})
    assert _claim(analysis.verdict_final_loss_linear(worse, 1.0, 2.0), "plain Xavier / orthogonal").holds is True


def test_relu_optima_verdict_needs_a_strict_majority_of_depths():
    """Fig. 10: the 2-shortcut must be below every plain net at the deepest depth and 'at a majority of
    depths'; winning 2 of 4 depths (a tie) passed with >=."""
    def rows(wins):
        out = []
        for d, w in zip((6, 12, 24, 48), wins):
            out += [{"arch": "2-shortcut", "act": "relu-mid", "depth": d, "seed": 0, "final_loss": 0.1 if w else 0.3},
                    {"arch": "plain-xavier", "act": "relu-mid", "depth": d, "seed": 0, "final_loss": 0.2}]
        return out
    half = analysis.verdict_final_loss_nonlinear(rows([False, False, True, True]), l_min=0.05)[0]
    assert half.holds is False and half.details["wins"] == [False, False, True, True]
    assert analysis.verdict_final_loss_nonlinear(rows([False, True, True, True]), l_min=0.05)[0].holds is True


# --------------------------------------------------------------------------- Figs. 2-3
def _wn_rows(rel_excess: dict, history=None, l_min=1.0, l_zero=2.0, depths=(6, 12, 24, 48)):
    """2-shortcut best-rate rows whose final norm shrinks as 1/depth (the claim holds on the norms)."""
    return [{"arch": "2-shortcut", "act": "linear", "depth": d, "seed": 0, "final_weight_norm": 1.0 / d,
             "final_loss": l_min + rel_excess.get(d, 1e-3) * (l_zero - l_min),
             "result": SimpleNamespace(history=history(d) if history else {"epoch": [0, 10, 100],
                                                                           "weight_norm": [1.0 / d] * 3})}
            for d in depths]


def test_weight_norm_verdict_is_undecided_for_a_net_left_above_halfway_to_l_min():
    """Figs. 2-3: a net whose loss stays above half the way from L_zero to L_min (verdict_weight_norm's
    docstring) is not trained, and its weights decide nothing; the 0.5 was unpinned (5 passed)."""
    v = analysis.verdict_weight_norm(_wn_rows({48: 0.9}), l_min=1.0, l_zero=2.0)[0]
    assert v.holds is None and v.details["untrained_depths"] == [48]
    assert "not trained at depths [48] (loss above halfway from L_zero to L_min): undecided" in v.measured
    v = analysis.verdict_weight_norm(_wn_rows({48: 0.6}), l_min=1.0, l_zero=2.0)[0]
    assert v.holds is None and v.details["untrained_depths"] == [48]
    v = analysis.verdict_weight_norm(_wn_rows({48: 0.4}), l_min=1.0, l_zero=2.0)[0]
    assert v.holds is True and v.details["untrained_depths"] == []


def test_reproduce_gives_the_weight_norm_verdict_l_min_and_l_zero(tmp_path, monkeypatch):
    """reproduce.run must pass L_min and L_zero to the Figs. 2-3 verdict, or a net stuck at its zero saddle
    reads as a trained one (the sweep is replaced by made-up rows: no training)."""
    bundle = sweeps.load_data("synthetic", d=4, samples=96)
    l_min, l_zero = bundle.l_min, bundle.l_zero

    def fake_sweeps(b, archs, acts, depths, seeds, *a, **k):
        best = []
        for d in depths:
            for s in seeds:
                rel = 1.0 if d == max(depths) else 1e-4  # the deepest net stays at L_zero
                best.append({"arch": "2-shortcut", "act": "linear", "depth": d, "seed": s, "lr": 0.1,
                             "final_loss": l_min + rel * (l_zero - l_min), "final_weight_norm": 1.0 / d,
                             "best_lr": 0.1, "max_stable_lr": 0.1,
                             "result": SimpleNamespace(history={"epoch": [0, 8, 80], "weight_norm": [1.0 / d] * 3})})
        return best, best

    monkeypatch.setattr(sweeps, "run_lr_sweeps", fake_sweeps)
    res = reproduce.run(reproduce.TINY, bundle, tmp_path, only=["fig2-3"], progress=False, log=lambda *a: None)
    v = _claim(res["verdicts"], "mean Frobenius norm of the 2-shortcut")
    deepest = max(reproduce.TINY.sweep_depths)
    assert v.holds is None and v.details["untrained_depths"] == [deepest], v.measured
    assert f"not trained at depths [{deepest}]" in v.measured


def test_weight_norm_during_training_is_read_at_a_tenth_of_the_epochs():
    """Figs. 2-3 'during' = the norm at 10% of the epochs (the verdict's test); the epoch read was unpinned
    (half of the epochs passed). Here the norm shrinks with depth at epoch 10 of 100 only."""
    def norm_shrinks_at(epoch):
        return lambda d: {"epoch": list(range(101)), "weight_norm": [1.0 / d if e == epoch else 1.0 for e in range(101)]}
    v = analysis.verdict_weight_norm(_wn_rows({}, history=norm_shrinks_at(10)))[0]
    assert v.holds is True
    assert v.details["slope_during"] == pytest.approx(-1.0) and v.details["slope_after"] == pytest.approx(-1.0)
    v = analysis.verdict_weight_norm(_wn_rows({}, history=norm_shrinks_at(9)))[0]
    assert v.holds is False and v.details["slope_during"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- Fig. 5
def test_flat_condition_number_means_small_slope_either_way():
    """Fig. 5 'flat' is |slope| < 0.1: a condition number falling as 1/depth is not flat (slope < 0.1 passed)."""
    rows = [{"arch": "2-shortcut", "depth": d, "seed": 0, "cond_q10": 300.0 / d, "cond": 300.0 / d}
            for d in (4, 8, 16, 32)]
    v = _claim(analysis.verdict_init_condition(rows), "2-shortcut condition number is flat")
    assert v.holds is False and v.details["2-shortcut"] == pytest.approx(-1.0)
    rows = [dict(r, cond_q10=3.0 * r["depth"] ** -0.05) for r in rows]
    assert _claim(analysis.verdict_init_condition(rows), "2-shortcut condition number is flat").holds is True


def test_theorem_1_verdict_tolerance_is_1e_6():
    """Fig. 5's Theorem 1 verdict: relative error below THEORY_RTOL = 1e-6 (its test); a 5e-6 error passed
    at 1e-5."""
    def v(err):
        rows = [{"arch": "2-shortcut-zero", "depth": d, "seed": 0, "cond_q10": 3.0, "cond": 3.0 * (1 + err)}
                for d in (4, 8, 16)]
        return _claim(analysis.verdict_init_condition(rows, theory_cond=3.0), "2-shortcut at zero matches")
    assert analysis.THEORY_RTOL == 1e-6
    bad = v(5e-6)
    assert bad.holds is False and bad.details["max_rel_err"] == pytest.approx(5e-6, rel=1e-6)
    assert v(5e-7).holds is True


# --------------------------------------------------------------------------- Figs. 6-8
def _curve_rows(ratios: dict, index2=None, index_other=0.2):
    """Probe rows of 2-shortcut and plain-xavier; per seed, cond_q10(plain) / cond_q10(2-shortcut) = ratios[seed]
    at every probe (so the seed's geometric-mean ratio is exactly that)."""
    rows = []
    for seed, ratio in ratios.items():
        for i, e in enumerate(EPOCHS):
            ex = 10.0 / (1 + e)
            idx2 = index2[i] if index2 else 0.1
            rows.append({"arch": "2-shortcut", "seed": seed, "epoch": e, "excess": ex, "index": idx2,
                         "cond_q10": 10.0, "lam_max": 1.0, "lam_q10": 0.1})
            rows.append({"arch": "plain-xavier", "seed": seed, "epoch": e, "excess": ex, "index": index_other,
                         "cond_q10": 10.0 * ratio, "lam_max": 1.0, "lam_q10": 0.1 / ratio})
    return rows


def test_curvature_verdict_takes_the_median_over_seeds():
    """Figs. 6-7 compare the seeds' ratios by their median (the verdict's test): one outlier seed (100x) must
    not outvote two seeds where the 2-shortcut is worse conditioned (ratio 0.5); the mean passed."""
    vs = analysis.verdict_curvature_training(_curve_rows({0: 0.5, 1: 0.5, 2: 100.0}))
    assert vs[0].holds is False
    assert vs[0].details["plain-xavier"]["all"] == pytest.approx(0.5)
    assert vs[0].details["plain-xavier"]["equal_epochs"] == pytest.approx(0.5)
    vs = analysis.verdict_curvature_training(_curve_rows({0: 2.0, 1: 2.0, 2: 0.01}))
    assert vs[0].holds is True and vs[0].details["plain-xavier"]["all"] == pytest.approx(2.0)


def test_index_verdict_leaves_out_the_probe_at_initialisation():
    """Fig. 8 compares the mean index 'over the probes after initialisation' (its test): the 2-shortcut's
    saddle at epoch 0 (index 0.9 here) must not count."""
    idx2 = [0.9] + [0.1] * (len(EPOCHS) - 1)
    v = analysis.verdict_index(_curve_rows({0: 2.0}, index2=idx2), [])[0]
    assert v.holds is True and v.details == {"plain-xavier": pytest.approx(0.1)}


SHARP = [0.5, 0.5, 0.45, 0.2, 0.15, 0.12, 0.1, 0.1]  # the largest drop between epochs 2 and 4 (probes 2 -> 3)
SLOW = [0.5, 0.46, 0.42, 0.38, 0.34, 0.3, 0.26, 0.1]  # largest drop 0.16 of 0.4, late (epochs 32 -> 64): not sharp


def test_gradient_norm_peak_window_is_one_probe_interval_either_side():
    """Fig. 8: the gradient norm's peak must lie in 'the probe window around the largest index drop (one
    probe interval either side)': the drop between epochs 2 and 4 gives the window [1, 8]; the window was
    unpinned ([2, 4] passed)."""
    rows = [{"arch": "2-shortcut", "seed": 0, "epoch": e, "index": i} for e, i in zip(EPOCHS, SHARP)]
    got = {}
    for peak in (0, 1, 2, 4, 8, 9, 16):
        hist = [{"arch": "2-shortcut", "seed": 0, "epoch": e, "grad_norm": 5.0 if e == peak else 1.0}
                for e in range(65)]
        v = analysis.verdict_index(rows, hist)[2]
        got[peak] = v.holds
    assert got == {0: False, 1: True, 2: True, 4: True, 8: True, 9: False, 16: False}
    assert "(window [1, 8])" in v.measured


def test_index_majority_rules_need_more_than_half_the_seeds():
    """Fig. 8's per-seed verdicts hold on a 'majority of seeds': one sharp drop of two seeds is a tie, not
    a majority (>= passed); the gradient-norm verdict uses the same rule."""
    seeds = {0: SHARP, 1: SLOW}
    rows = [{"arch": "2-shortcut", "seed": s, "epoch": e, "index": i} for s, idx in seeds.items()
            for e, i in zip(EPOCHS, idx)]
    peaks = {0: 4, 1: 2}  # seed 0's in its window [1, 8]; seed 1's outside its window [16, 64]
    hist = [{"arch": "2-shortcut", "seed": s, "epoch": e, "grad_norm": 5.0 if e == peaks[s] else 1.0}
            for s in seeds for e in range(65)]
    _, sharp, peak = analysis.verdict_index(rows, hist)
    assert sharp.details["per_seed"] == [True, False] and sharp.holds is False
    assert peak.details["per_seed"] == [True, False] and peak.holds is False
    rows3 = rows + [dict(r, seed=2) for r in rows if r["seed"] == 0]
    hist3 = hist + [dict(h, seed=2) for h in hist if h["seed"] == 0]
    _, sharp, peak = analysis.verdict_index(rows3, hist3)
    assert sharp.holds is True and peak.holds is True


# --------------------------------------------------------------------------- figures
@pytest.fixture
def drawn(monkeypatch):
    """The figures each drawing function made (written too, as in a run)."""
    figs = []
    real_save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path, caption=None: (figs.append(fig), real_save(fig, path))[1])
    return figs


def _labels(ax):
    return [ln.get_label() for ln in ax.lines if not ln.get_label().startswith("_")]


def _fig9_rows():
    # seeds' final losses differ per net and depth; 2-shortcut close to L_min = 1, plain nets worse with depth
    return [{"arch": a, "act": "linear", "depth": d, "seed": s,
             "final_loss": 1.0 + 1e-3 * (s + 1) + 0.01 * d * (s + 1) * (a != "2-shortcut"),
             "best_lr": 0.1, "max_stable_lr": 0.3, "final_weight_norm": (1.0 + 0.1 * s) / d,
             "result": SimpleNamespace(history={"epoch": [0, 1], "weight_norm": [1.0, 1.0 / d]})}
            for a in ("2-shortcut", "1-shortcut", "plain-xavier") for d in (4, 8) for s in range(3)]


def _band_by_x(ax, arch):
    """The seed band drawn for ``arch``: {x: (lowest y, highest y)} of its fill."""
    polys = [c for c in ax.collections if np.allclose(c.get_facecolor()[0][:3], to_rgba(figures._color(arch))[:3])]
    assert len(polys) == 1
    out = {}
    for x, y in polys[0].get_paths()[0].vertices:
        lo, hi = out.get(x, (math.inf, -math.inf))
        out[x] = (min(lo, y), max(hi, y))
    return out


def test_fig9_draws_l_zero_log_distance_and_min_max_loss_bands(tmp_path, drawn):
    """Fig. 9: the L_zero line (the verdicts measure against L_zero - L_min), a log axis for the distance to
    L_min, and final-loss bands from the seeds' min to max (its axis label; a mean - std band can go below
    L_min) were all unpinned."""
    rows = _fig9_rows()
    figures.fig_final_loss(rows, tmp_path / "f9.png", 1.0, 2.0)
    left, middle = drawn[-1].axes[0], drawn[-1].axes[1]
    zero = [ln for ln in left.lines if ln.get_label() == "L_zero (the zero map)"]
    assert len(zero) == 1 and list(zero[0].get_ydata()) == [2.0, 2.0]
    assert "L_min (best linear)" in _labels(left)
    assert middle.get_yscale() == "log" and left.get_yscale() == "linear"
    band = _band_by_x(left, "2-shortcut")
    for d in (4, 8):
        losses = [r["final_loss"] for r in rows if r["arch"] == "2-shortcut" and r["depth"] == d]
        assert band[d] == (pytest.approx(min(losses), abs=1e-12), pytest.approx(max(losses), abs=1e-12))
    line = next(ln for ln in middle.lines if ln.get_label() == "plain-xavier")  # geometric seed mean of L - L_min
    want = [math.exp(np.mean([math.log(r["final_loss"] - 1.0) for r in rows
                              if r["arch"] == "plain-xavier" and r["depth"] == d])) for d in (4, 8)]
    np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)


def test_fig3_draws_the_shortcut_nets_only(tmp_path, drawn):
    """Figs. 2-3's after-training panel shows 'every shortcut net' (fig_weight_norm's docstring); plain nets
    were drawn there too when the filter was removed."""
    rows = _fig9_rows()
    figures.fig_weight_norm(rows, tmp_path / "w.png")
    after = drawn[-1].axes[1]
    assert _labels(after) == ["2-shortcut", "1-shortcut"]
    line = after.lines[0]
    want = [math.exp(np.mean([math.log((1.0 + 0.1 * s) / d) for s in range(3)])) for d in (4, 8)]
    assert list(line.get_xdata()) == [4, 8]
    np.testing.assert_allclose(line.get_ydata(), want, rtol=1e-12)


def test_fig6_x_axis_is_the_loss_above_l_min(tmp_path, drawn):
    """Figs. 6-7 plot against loss - L_min (the axis label says so); the plain loss went unnoticed."""
    probe = [{"arch": "2-shortcut", "seed": 0, "epoch": e, "loss": 1.0 + 1.0 / (1 + e), "lam_max": 2.0,
              "lam_q10": 0.1, "cond_q10": 20.0} for e in (0, 1, 3)]
    figures.fig_curvature_vs_loss(probe, tmp_path / "c.png", l_min=1.0)
    for ax, y in zip(drawn[-1].axes, (2.0, 0.1, 20.0)):
        assert ax.get_xlabel() == "loss - L_min"
        np.testing.assert_allclose(ax.lines[0].get_xdata(), [1.0, 0.5, 0.25], rtol=1e-12)
        np.testing.assert_allclose(ax.lines[0].get_ydata(), [y] * 3, rtol=1e-12)


def test_fig5_second_panel_plots_the_exact_condition_number(tmp_path, drawn):
    """Fig. 5's right panel is titled |λ|max / |λ|min (exact): it must plot `cond`, not `cond_q10` again."""
    init = [{"arch": "2-shortcut", "depth": d, "seed": s, "cond_q10": 10.0 * (s + 1), "cond": 1000.0 * (s + 1)}
            for d in (4, 8) for s in range(2)]
    figures.fig_init_condition(init, tmp_path / "f5.png")
    q10, exact = drawn[-1].axes
    assert "exact" in exact.get_title() and "exact" not in q10.get_title()
    np.testing.assert_allclose(q10.lines[0].get_ydata(), [10.0 * math.sqrt(2)] * 2, rtol=1e-12)
    np.testing.assert_allclose(exact.lines[0].get_ydata(), [1000.0 * math.sqrt(2)] * 2, rtol=1e-12)


# --------------------------------------------------------------------------- defects these tests found
def test_log_probe_epochs_are_at_most_the_count_asked_for():
    """log_probe_epochs' docstring promised ``count`` probe epochs; rounding the log grid merges neighbours
    (1.55 and 2.4 both round to 2), so QUICK (200 epochs, curve_probes=14) probes 13 epochs: it says so now."""
    assert sweeps.log_probe_epochs(200, 14) == [0, 1, 2, 4, 6, 9, 14, 22, 34, 53, 83, 129, 200]
    for epochs, count in ((200, 14), (1000, 30), (80, 8), (5, 40)):
        e = sweeps.log_probe_epochs(epochs, count)
        assert e[0] == 0 and e[-1] == epochs and e == sorted(set(e)) and len(e) <= count, e


def test_a_curve_net_without_a_rate_is_named_in_the_fig6_8_verdicts(tmp_path, monkeypatch):
    """Figs. 6-8: a net of curve_archs for which best_lr_by_arch finds no rate (every rate diverged for some
    seed) gets no probe run, and the verdicts compared the 2-shortcut with the remaining nets only, without
    naming it ('better conditioned than the other nets' holds on plain-orthogonal alone). Sweeps and probe
    runs are replaced by made-up rows: no training."""
    import dataclasses

    bundle = sweeps.load_data("synthetic", d=4, samples=96)
    cfg = dataclasses.replace(reproduce.TINY, curve_archs=("2-shortcut", "plain-xavier", "plain-orthogonal"))

    def fake_sweeps(b, archs, acts, depths, seeds, lrs, *a, **k):
        runs = [{"arch": arch, "act": "linear", "depth": d, "seed": s, "lr": lr,
                 "final_loss": math.inf if arch == "plain-xavier" else 1.0 + lr}  # plain-xavier: every rate diverged
                for arch in archs for d in depths for s in seeds for lr in lrs]
        return runs, [{"arch": arch, "act": "linear", "depth": d, "seed": s, "result": None}
                      for arch in archs for d in depths for s in seeds]

    def fake_curves(b, archs, act, depth, seeds, lrs, *a, **k):
        probes = [{"arch": arch, "seed": s, "epoch": e, "loss": b.l_min + 10.0 / (1 + e), "excess": 10.0 / (1 + e),
                   "index": 0.1 if arch == "2-shortcut" else 0.3, "cond_q10": 10.0 if arch == "2-shortcut" else 100.0,
                   "lam_max": 1.0, "lam_q10": 0.1 if arch == "2-shortcut" else 0.01}
                  for arch in archs if arch in lrs for s in seeds for e in (0, 1, 2, 4, 8, 16)]
        return probes, [{"arch": p["arch"], "seed": p["seed"], "epoch": p["epoch"], "grad_norm": 1.0} for p in probes]

    monkeypatch.setattr(sweeps, "run_lr_sweeps", fake_sweeps)
    monkeypatch.setattr(sweeps, "run_probe_curves", fake_curves)
    res = reproduce.run(cfg, bundle, tmp_path, only=["fig6-8"], progress=False, log=lambda *a: None)
    better = _claim(res["verdicts"], "2-shortcut better conditioned than the other nets")
    assert "left out, with no rate to probe: plain-xavier (at every rate of the grid, at least one seed diverged)" \
        in better.measured, better.measured


# --------------------------------------------------------------------------- qa14: rules, figures, store, report
def test_relu_optima_verdict_needs_the_2_shortcut_below_every_plain_net():
    """Fig. 10 'Xavier / orthogonal miss the better optima that 2-shortcut reaches': the 2-shortcut must be
    below the BEST plain net (its test: 'below every plain net'); beating only the worse of two (orthogonal
    0.6) while Xavier (0.4) is better at every depth passed when the rule compared with the worst."""
    def rows(l2):
        return [{"arch": a, "act": "relu-mid", "depth": d, "seed": 0, "final_loss": L}
                for a, L in (("2-shortcut", l2), ("plain-xavier", 0.4), ("plain-orthogonal", 0.6)) for d in (4, 8, 16)]
    v = analysis.verdict_final_loss_nonlinear(rows(0.5), l_min=0.3)[0]
    assert v.holds is False and v.details["wins"] == [False, False, False]
    v = analysis.verdict_final_loss_nonlinear(rows(0.35), l_min=0.3)[0]
    assert v.holds is True and v.details["wins"] == [True, True, True]


def test_relu_below_l_min_verdict_needs_every_depth():
    """Fig. 10 (also) '2-shortcut with relu-mid goes below L_min' holds when the seed-mean loss is below
    L_min at every depth (bool(len(below) == len(depths))); tests had all depths or none below, so 'any
    depth' passed. Here only depth 4 of [4, 8, 16] is below L_min = 0.3."""
    def rows(losses):
        return ([{"arch": "2-shortcut", "act": "relu-mid", "depth": d, "seed": 0, "final_loss": L}
                 for d, L in zip((4, 8, 16), losses)]
                + [{"arch": "plain-xavier", "act": "relu-mid", "depth": d, "seed": 0, "final_loss": 0.5}
                   for d in (4, 8, 16)])
    v = analysis.verdict_final_loss_nonlinear(rows((0.25, 0.35, 0.4)), l_min=0.3)[1]
    assert v.holds is False and v.details == {"below": [4]}
    assert v.measured == "below L_min at depths [4] of [4, 8, 16]"
    v = analysis.verdict_final_loss_nonlinear(rows((0.25, 0.2, 0.29)), l_min=0.3)[1]
    assert v.holds is True and v.details == {"below": [4, 8, 16]}


def test_fig5_slopes_use_the_geometric_seed_mean():
    """Fig. 5 slopes are of the seeds' geometric mean (the verdict's test text); every test had one seed
    per depth, so the arithmetic mean passed. Two seeds at depth 2 (10 and 1000) and equal seeds (10) at
    4 and 8: reference numpy polyfit of log(sqrt(a b)) against log(depth) (the arithmetic mean, 505, gives
    another slope)."""
    cq = {0: [10.0, 10.0, 10.0], 1: [1000.0, 10.0, 10.0]}  # plain-xavier at depths 2, 4, 8
    rows = [{"arch": "plain-xavier", "depth": d, "seed": s, "cond_q10": cq[s][i], "cond": cq[s][i]}
            for s in (0, 1) for i, d in enumerate((2, 4, 8))]
    rows += [{"arch": "plain-orthogonal", "depth": d, "seed": 0, "cond_q10": 3.0 * d, "cond": 3.0 * d}
             for d in (2, 4, 8)]
    v = _claim(analysis.verdict_init_condition(rows), "plain Xavier and orthogonal grow")
    want = np.polyfit(np.log([2.0, 4.0, 8.0]), np.log([100.0, 10.0, 10.0]), 1)[0]  # sqrt(10 * 1000) = 100
    assert v.details["plain-xavier"] == pytest.approx(want, rel=1e-9)
    assert v.details["plain-orthogonal"] == pytest.approx(1.0, rel=1e-9)
    assert v.holds is False  # Xavier falls with depth here


def test_orthogonal_grows_slower_needs_a_slope_above_flat_only():
    """Fig. 5 'plain Xavier and orthogonal grow with depth, orthogonal slower': Xavier slope > 0.5, orthogonal
    slope > FLAT_SLOPE = 0.1 and below Xavier's (its test). Tests used orthogonal slopes 1 or 2, so asking
    the orthogonal slope to exceed 0.5 passed; a slope of 0.3 is exactly 'grows, slower'."""
    def v(orth):
        rows = [{"arch": a, "depth": d, "seed": 0, "cond_q10": 3.0 * d ** s, "cond": 3.0 * d ** s}
                for a, s in (("plain-xavier", 1.0), ("plain-orthogonal", orth)) for d in (2, 4, 8)]
        return _claim(analysis.verdict_init_condition(rows), "plain Xavier and orthogonal grow")
    grows_slower = v(0.3)
    assert grows_slower.holds is True and grows_slower.details["plain-orthogonal"] == pytest.approx(0.3)
    assert v(0.05).holds is False  # flat: does not grow


def test_fig6_7_y_labels_name_the_series_drawn(tmp_path, drawn):
    """Figs. 6-7: each panel's y label names what it plots (|λ|max, |λ|(0.1), their ratio); only the x
    labels and data were pinned, so swapped y labels passed."""
    probe = [{"arch": "2-shortcut", "seed": 0, "epoch": e, "loss": 1.0 + 1.0 / (1 + e), "lam_max": 2.0,
              "lam_q10": 0.1, "cond_q10": 20.0} for e in (0, 1, 3)]
    figures.fig_curvature_vs_loss(probe, tmp_path / "c.png", l_min=1.0)
    got = [(ax.get_ylabel(), float(ax.lines[0].get_ydata()[0])) for ax in drawn[-1].axes]
    assert got == [("|λ|max", 2.0), ("|λ|(0.1): 10% quantile of |λ|", 0.1), ("|λ|max / |λ|(0.1)", 20.0)]


def test_fig9_rate_panel_best_line_is_the_best_rate(tmp_path, drawn):
    """Figs. 9-10 right panel: '<arch> best' is the seeds' geometric mean of best_lr and '<arch> largest
    stable' their median max_stable_lr; every test row had best_lr 0.1, so drawing the largest stable rate
    under both labels passed."""
    rows = [{"arch": "2-shortcut", "act": "linear", "depth": d, "seed": s, "final_loss": 1.1,
             "best_lr": 0.01 * (1 + 3 * s), "max_stable_lr": 1.0} for d in (4, 8) for s in (0, 1)]
    figures.fig_final_loss(rows, tmp_path / "f9.png", 1.0, 2.0)
    lines = {ln.get_label(): ln for ln in drawn[-1].axes[2].lines}
    np.testing.assert_allclose(lines["2-shortcut best"].get_xdata(), [4, 8])
    np.testing.assert_allclose(lines["2-shortcut best"].get_ydata(), [0.02, 0.02], rtol=1e-12)  # sqrt(0.01 * 0.04)
    np.testing.assert_allclose(lines["2-shortcut largest stable"].get_ydata(), [1.0, 1.0], rtol=1e-12)


def test_fig8_index_band_spans_the_seeds_min_to_max(tmp_path, drawn):
    """Fig. 8's index band is the seeds' min to max (module docstring; a mean - std band can leave [0, 1]);
    no test drew Fig. 8 with several seeds, so a mean -/+ std band passed. Seeds' indices 0.1, 0.2, 0.3."""
    probe = [{"arch": "2-shortcut", "seed": s, "epoch": e, "index": 0.1 * (s + 1)} for s in range(3) for e in (0, 1, 3)]
    figures.fig_index_gradnorm(probe, [], tmp_path / "f8.png")
    band = _band_by_x(drawn[-1].axes[0], "2-shortcut")
    assert sorted(band) == [1.0, 2.0, 4.0]  # epoch + 1
    for lo, hi in band.values():
        assert lo == pytest.approx(0.1, abs=1e-12) and hi == pytest.approx(0.3, abs=1e-12)
    np.testing.assert_allclose(drawn[-1].axes[0].lines[0].get_ydata(), [0.2] * 3, rtol=1e-12)


def test_init_probes_key_includes_exact_max_params(tmp_path):
    """run_init_probes with another exact_max_params on the same store must probe again (exact dense
    Hessian vs Lanczos + SLQ), not return the first call's record; the sweep API has no guard of its own.
    plain-xavier at depth 8, width 3: 72 weights, exact below 4000 and Lanczos + SLQ above 10."""
    from shortcut_ext.experiments.store import RunStore

    bundle = sweeps.load_data("synthetic", d=3, samples=40)
    store = RunStore(tmp_path / "runs.jsonl")
    exact = sweeps.run_init_probes(bundle, ["plain-xavier"], [8], [0], store, exact_max_params=4000, progress=False)
    approx = sweeps.run_init_probes(bundle, ["plain-xavier"], [8], [0], store, exact_max_params=10, progress=False)
    assert exact[0]["num_params"] == 72
    assert (exact[0]["method"], approx[0]["method"]) == ("exact", "lanczos+slq")
    assert len(store.keys()) == 2


def test_init_probes_read_a_stored_infinite_condition_number_as_inf(tmp_path):
    """A singular Hessian's cond = inf is stored as the string "inf": run_init_probes must read it back as
    float inf, or the Fig. 5 'flat' verdict never sees the singular depth (it held, the depth silently
    dropped). The store and the verdict were tested apart, never through run_init_probes."""
    from shortcut_ext.experiments.store import RunStore

    bundle = sweeps.load_data("synthetic", d=3, samples=40)
    store = RunStore(tmp_path / "runs.jsonl")
    sweeps.run_init_probes(bundle, ["2-shortcut-zero"], [2, 4, 8], [0], store, progress=False)
    key = next(k for k in store.keys() if "depth=4" in k)
    store.put(key, dict(store.get(key), cond=math.inf, cond_q10=math.inf))  # singular to working precision
    rows = sweeps.run_init_probes(bundle, ["2-shortcut-zero"], [2, 4, 8], [0], store, progress=False)
    r4 = next(r for r in rows if r["depth"] == 4)
    assert type(r4["cond"]) is float and r4["cond"] == math.inf and r4["cond_q10"] == math.inf
    flat = _claim(analysis.verdict_init_condition(rows), "2-shortcut condition number is flat")
    assert flat.holds is False
    assert "2-shortcut-zero: cond_q10 = inf (singular) for some seed at depths [4]" in flat.measured


def test_init_probe_record_without_cond_q10_is_computed_again(tmp_path):
    """A stored init-probe record lacking cond_q10 (the paper's Fig. 5 measure) must be computed again, not
    reused with cond_q10 = nan (the point vanished from the figure and the slope)."""
    from shortcut_ext.experiments.store import RunStore

    bundle = sweeps.load_data("synthetic", d=3, samples=40)
    store = RunStore(tmp_path / "runs.jsonl")
    first = sweeps.run_init_probes(bundle, ["plain-xavier"], [4], [0], store, progress=False)
    assert math.isfinite(first[0]["cond_q10"]) and first[0]["cond_q10"] > 1.0
    key = store.keys()[0]
    store.put(key, {k: v for k, v in store.get(key).items() if k != "cond_q10"})
    again = sweeps.run_init_probes(bundle, ["plain-xavier"], [4], [0], store, progress=False)
    assert again[0]["cond_q10"] == pytest.approx(first[0]["cond_q10"], rel=1e-12)
    assert "cond_q10" in store.get(key)


def _report_html(tmp_path):
    from shortcut_ext.experiments import report

    vs = [analysis.Verdict("Fig. 5", "a", "t", True, "m"), analysis.Verdict("Fig. 5", "b", "t", False, "m"),
          analysis.Verdict("Fig. 5", "c", "t", None, "m")]
    return report.write_report(tmp_path / "r.html", "t", [report.Section("fig5", "F5", "e", [], vs)],
                               {}, {}, {}).read_text()


def test_report_summary_counts_undecided_verdicts_apart(tmp_path):
    """The HTML summary: one verdict holds, one does not, one undecided (holds None: not run, SLQ
    unresolved) must read 1 / 1 / 1; counting 'not holds' as failures said '2 do not'."""
    import re

    summary = re.search(r"<h2>Summary</h2><p>(.*?)</p>", _report_html(tmp_path)).group(1)
    assert summary == "1 expected shapes hold, 1 do not, 1 not decided (not run or reference only)."


def test_report_verdict_table_marks_undecided_as_n_a(tmp_path):
    """The verdict table's mark: holds True / False / None are 'holds' / 'does not hold' (red) / 'n/a';
    an undecided verdict was shown in red as 'does not hold' when the mark was looked up by bool(holds)."""
    import re

    marks = dict(re.findall(r"<tr><td>Fig\. 5</td><td>(\w)</td><td>(.*?)</td>", _report_html(tmp_path)))
    assert marks["b"] == '<span class="bad">does not hold</span>'
    assert marks["c"] == '<span class="na">n/a</span>'
    assert "does not hold" not in marks["a"] and "n/a" not in marks["a"]


def test_best_lr_by_arch_means_over_seeds_and_breaks_ties_by_the_smaller_rate():
    """docs/science.md section 4: the rate of the lowest seed-mean final loss; a rate that diverged for any
    seed is out; of equal means, the smaller rate (whatever the order of the rows)."""
    def row(arch, lr, seed, loss, act="linear", depth=4):
        return {"arch": arch, "act": act, "depth": depth, "lr": lr, "seed": seed, "final_loss": loss}

    rows = [row("a", 0.3, 0, 0.2), row("a", 0.3, 1, 0.5), row("a", 0.1, 0, 0.3), row("a", 0.1, 1, 0.3),
            row("a", 1.0, 0, 0.01), row("a", 1.0, 1, math.inf),  # best seed, but diverged for seed 1
            row("b", 0.5, 0, 0.1), row("b", 0.05, 0, 0.1),  # a tie: the smaller rate
            row("c", 0.1, 0, math.inf),  # no finite rate: no entry
            row("a", 0.01, 0, 0.0, depth=8), row("a", 0.01, 0, 0.0, act="relu-mid")]  # other depth / act
    for order in (rows, rows[::-1]):
        assert sweeps.best_lr_by_arch(order, "linear", 4) == {"a": 0.1, "b": 0.05}
