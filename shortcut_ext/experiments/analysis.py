"""Summaries of the sweeps and the verdicts: does each paper figure's expected shape hold in the data?

Every verdict is computed from the measured rows, with its threshold stated in ``test``; nothing
here knows the answer in advance.  ``holds`` is ``True``/``False``, or ``None`` when the data needed
for it were not run (e.g. ``--only fig5``).  Thresholds are ours (docs/science.md states shapes, not
numbers); they are loose enough to be robust to seeds and strict enough to fail if the shape is
absent.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

PLAIN = ("plain-xavier", "plain-orthogonal")

# thresholds (ours)
FLAT_SLOPE = 0.1  # |d log cond / d log depth| below this is "flat"
GROW_SLOPE = 0.5  # above this is "grows"
SHRINK_SLOPE = -0.1  # d log norm / d log depth below this is "shrinks"
NEAR_LMIN = 0.02  # (L - L_min) / (L_zero - L_min) below this is "near L_min"
THEORY_RTOL = 1e-6


@dataclass
class Verdict:
    """One expected shape of a paper figure, checked against the data.

    Attributes:
        figure: e.g. ``"Fig. 5"``.
        claim: the paper's expected shape (docs/science.md section 4).
        test: how it is computed, with thresholds.
        holds: ``True`` / ``False``, or ``None`` when there is not enough data.
        measured: the numbers behind it, in words.
        details: the same numbers, machine-readable.
    """

    figure: str
    claim: str
    test: str
    holds: bool | None
    measured: str
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def measured_only(self) -> bool:
        """A measurement beyond the paper, reported and not tested (``holds`` is always ``None``)."""
        return self.holds is None and self.test.startswith(MEASURED_ONLY)


MEASURED_ONLY = "measured, not tested"


# --------------------------------------------------------------------------- helpers
def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float, np.floating)) and math.isfinite(float(x))


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool)


def _unresolved_note(rows: list[dict], archs, by: str = "depth") -> str:
    """Names the (net, depth / epoch) points whose curvature numbers SLQ could not resolve near 0
    (``resolved`` False: unreliable by factors); empty if none."""
    bad = {}
    for r in rows:
        if r.get("arch") in archs and r.get("resolved") is False:
            bad.setdefault(r["arch"], set()).add(r.get(by))
    return "".join(f"; {a}: SLQ estimates not resolved near 0 at {by}s {sorted(v)} (unreliable: raise "
                   f"exact_max_params)" for a, v in sorted(bad.items()))


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x`` over the finite, positive points (nan if < 2).

    >>> round(loglog_slope([1, 2, 4], [3, 6, 12]), 6)
    1.0
    """
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if _finite(x) and _finite(y) and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return math.nan
    a = np.array(pts)
    return float(np.polyfit(a[:, 0], a[:, 1], 1)[0])


def aggregate(rows: Iterable[dict], by: Sequence[str], value: str, log: bool = False,
              keep_inf: bool = False) -> list[dict]:
    """Group ``rows`` by the keys ``by`` and summarise ``value`` over the group (seeds).

    Returns rows with the ``by`` keys plus ``n`` (finite values), ``n_inf`` (+inf values), ``n_total``,
    ``mean``, ``std``, ``min``, ``max``, ``median``; with ``log=True`` mean/std are of ``log10(value)``
    and ``mean`` is reported back as the geometric mean (``lo``/``hi`` = geometric mean / * 10^std).
    Non-finite values are left out, unless ``keep_inf``: then a group with a +inf value (e.g. a seed
    whose every learning rate diverged) has an infinite mean, median and max.
    """
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r.get(value))
    out = []
    for key in sorted(groups, key=lambda k: tuple((str(type(x)), x) for x in k)):
        vals = [float(v) for v in groups[key] if _finite(v) and (not log or float(v) > 0)]
        row = dict(zip(by, key))
        n_inf = sum(1 for v in groups[key] if v is not None and _is_num(v) and float(v) == math.inf)
        row.update(n=len(vals), n_inf=n_inf, n_total=len(groups[key]))
        if vals:
            a = np.array(vals)
            if log:
                la = np.log10(a)
                mu, sd = float(la.mean()), float(la.std())
                row.update(mean=10 ** mu, std=sd, lo=10 ** (mu - sd), hi=10 ** (mu + sd))
            else:
                mu, sd = float(a.mean()), float(a.std())
                row.update(mean=mu, std=sd, lo=mu - sd, hi=mu + sd)
            row.update(min=float(a.min()), max=float(a.max()), median=float(np.median(a)))
            if keep_inf and n_inf:
                row.update(mean=math.inf, hi=math.inf, max=math.inf, std=math.nan,
                           median=float(np.median(np.concatenate([a, np.full(n_inf, np.inf)]))))
        elif keep_inf and n_inf:
            row.update(mean=math.inf, std=math.nan, lo=math.inf, hi=math.inf, min=math.inf, max=math.inf,
                       median=math.inf)
        else:
            row.update(mean=math.nan, std=math.nan, lo=math.nan, hi=math.nan, min=math.nan, max=math.nan,
                       median=math.nan)
        out.append(row)
    return out


def _series(agg: list[dict], arch: str, x: str = "depth", y: str = "mean", **match) -> tuple[list, list]:
    pts = sorted((r[x], r[y]) for r in agg if r["arch"] == arch and all(r.get(k) == v for k, v in match.items()))
    return [p[0] for p in pts], [p[1] for p in pts]


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}"


# --------------------------------------------------------------------------- Figs. 2-3
def verdict_weight_norm(best_rows: list[dict], act: str = "linear", l_min: float | None = None,
                        l_zero: float | None = None) -> list[Verdict]:
    """Figs. 2-3: the mean Frobenius norm of the trained 2-shortcut weights shrinks with depth.

    With ``l_min`` and ``l_zero``, a net whose best run stays above half the way from ``L_zero`` to
    ``L_min`` at some depth (e.g. a 3-shortcut net still at its zero saddle) is reported undecided:
    its weights are not those of a trained net.
    """
    rows = [r for r in best_rows if r["act"] == act and r.get("result") is not None]
    out = []
    test = (f"slope of log(mean Frobenius norm) vs log(depth) over depths, seed-mean, best rate per net: "
            f"after training and at 10% of the epochs (during); shrinks if both < {SHRINK_SLOPE}")
    for arch in ("2-shortcut", "1-shortcut", "3-shortcut"):
        sub = [r for r in rows if r["arch"] == arch]
        if not sub:
            continue
        during = []
        for r in sub:
            h = r["result"].history
            ep, wn = h.get("epoch", []), h.get("weight_norm", [])
            if ep:
                target = 0.1 * ep[-1]
                i = int(np.argmin([abs(e - target) for e in ep]))
                during.append({**r, "wn_during": wn[i]})
        agg_after = aggregate(sub, ("arch", "depth"), "final_weight_norm", log=True)
        agg_during = aggregate(during, ("arch", "depth"), "wn_during", log=True)
        s_after = loglog_slope(*_series(agg_after, arch))
        s_during = loglog_slope(*_series(agg_during, arch))
        holds = None if not (_finite(s_after) and _finite(s_during)) else bool(s_after < SHRINK_SLOPE and s_during < SHRINK_SLOPE)
        depths, norms = _series(agg_after, arch)
        untrained = []
        if l_min is not None and l_zero is not None:
            rel = aggregate([dict(r, rel=_rel_excess(r["final_loss"], l_min, l_zero)) for r in sub],
                            ("arch", "depth"), "rel")
            untrained = [r["depth"] for r in rel if not (_finite(r["mean"]) and r["mean"] < 0.5)]
        note = (f"; not trained at depths {untrained} (loss above halfway from L_zero to L_min): undecided"
                if untrained else "")
        # a seed whose every rate diverged has no trained weights: the seed mean would leave it out unseen
        lost = sorted({r["depth"] for r in best_rows if r["act"] == act and r["arch"] == arch
                       and r.get("result") is None})
        if lost:
            note += f"; no run without divergence for some seed at depths {lost}: undecided"
            untrained = sorted(set(untrained) | set(lost))
        out.append(Verdict(
            "Figs. 2-3" if arch == "2-shortcut" else f"Figs. 2-3 ({arch}, also)",
            f"mean Frobenius norm of the {arch} weights shrinks with depth",
            test, None if untrained else holds,
            f"slope after = {_fmt(s_after)}, during = {_fmt(s_during)}; norms "
            + ", ".join(f"D={d}: {_fmt(n)}" for d, n in zip(depths, norms)) + note,
            {"arch": arch, "slope_after": s_after, "slope_during": s_during, "untrained_depths": untrained},
        ))
    return out


# --------------------------------------------------------------------------- Fig. 5
def verdict_init_condition(init_rows: list[dict], theory_cond: float | None = None,
                           value: str = "cond_q10") -> list[Verdict]:
    """Fig. 5: condition number at initialisation vs depth, per initialisation."""
    agg = aggregate(init_rows, ("arch", "depth"), value, log=True)
    slope = {a: loglog_slope(*_series(agg, a)) for a in dict.fromkeys(r["arch"] for r in agg)}
    s = lambda a: slope.get(a, math.nan)  # noqa: E731
    out = []
    test_base = f"slope of log({value}) vs log(depth), seed geometric mean"

    def singular(a: str) -> str:  # depths where a seed's Hessian is singular to working precision
        ds = sorted({r["depth"] for r in init_rows if r["arch"] == a and r.get(value) == math.inf})
        return f"; {a}: {value} = inf (singular) for some seed at depths {ds}, left out of the slope" if ds else ""

    flat = [a for a in ("2-shortcut-zero", "2-shortcut") if a in slope]
    if flat:
        holds = None if not all(_finite(s(a)) for a in flat) else all(abs(s(a)) < FLAT_SLOPE for a in flat)
        if any(singular(a) for a in flat):  # an infinite condition number at some depth is not flat
            holds = False
        if _unresolved_note(init_rows, flat):
            holds = None
        out.append(Verdict("Fig. 5", "2-shortcut condition number is flat in depth",
                           f"{test_base}; flat if |slope| < {FLAT_SLOPE} for " + " and ".join(flat)
                           + " and finite at every depth", holds,
                           ", ".join(f"{a}: slope {_fmt(s(a))}" for a in flat) + "".join(singular(a) for a in flat)
                           + _unresolved_note(init_rows, flat), {a: s(a) for a in flat}))
    if theory_cond is not None and _finite(theory_cond):
        z = [r for r in init_rows if r["arch"] == "2-shortcut-zero" and r.get("cond") is not None
             and not math.isnan(float(r["cond"]))]  # inf (singular) counts, as an infinite error
        if z:
            errs = [abs(r["cond"] - theory_cond) / theory_cond for r in z]
            out.append(Verdict(
                "Fig. 5", "2-shortcut at zero matches Theorem 1: cond = sigma_max(M) / sigma_min(M) at every depth",
                f"max relative error of the measured |lambda|max/|lambda|min against the closed form < {THEORY_RTOL}",
                bool(max(errs) < THEORY_RTOL),
                f"theory {_fmt(theory_cond, 6)}; max relative error {_fmt(max(errs))} over {len(z)} depths",
                {"theory": theory_cond, "max_rel_err": max(errs)}))
    xa, orth = s("plain-xavier"), s("plain-orthogonal")
    if "plain-xavier" in slope or "plain-orthogonal" in slope:
        holds = None if not (_finite(xa) and _finite(orth)) else bool(xa > GROW_SLOPE and orth > FLAT_SLOPE and orth < xa)
        unres = _unresolved_note(init_rows, PLAIN)
        out.append(Verdict("Fig. 5", "plain Xavier and orthogonal grow with depth, orthogonal slower",
                           f"{test_base}; Xavier slope > {GROW_SLOPE}, orthogonal slope > {FLAT_SLOPE} and below Xavier's",
                           None if unres else holds, f"Xavier slope {_fmt(xa)}, orthogonal slope {_fmt(orth)}"
                           + singular("plain-xavier") + singular("plain-orthogonal") + unres,
                           {"plain-xavier": xa, "plain-orthogonal": orth}))
    for a, claim in (("1-shortcut-zero", "1-shortcut (zero) grows with depth (Theorem 1: linearly)"),
                     ("1-shortcut", "1-shortcut (small) grows with depth")):
        if a in slope:
            unres = _unresolved_note(init_rows, (a,))
            out.append(Verdict("Fig. 5", claim, f"{test_base}; grows if slope > {GROW_SLOPE}",
                               None if not _finite(s(a)) or unres else bool(s(a) > GROW_SLOPE),
                               f"slope {_fmt(s(a))}" + singular(a) + unres, {a: s(a)}))
    if "3-shortcut" in slope:
        out.append(Verdict("Fig. 5 (also)", "3-shortcut (small init): shown for reference, no expected shape",
                           test_base, None, f"slope {_fmt(s('3-shortcut'))}", {"3-shortcut": s("3-shortcut")}))
    return out


# --------------------------------------------------------------------------- Figs. 6-8
def _by_run(rows: list[dict]) -> dict:
    runs: dict[tuple, list] = {}
    for r in rows:
        runs.setdefault((r["arch"], r["seed"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["epoch"]) for k, v in runs.items()}


def _geo_ratio(num: dict, den: dict, epochs: Iterable[int]) -> float:
    logs = [math.log(num[e] / den[e]) for e in epochs
            if _finite(num.get(e)) and _finite(den.get(e)) and num[e] > 0 and den[e] > 0]
    return math.exp(float(np.mean(logs))) if logs else math.nan


def _loss_matched(rs: list[dict], ref: list[dict], key: str, points: int = 24) -> dict | None:
    """Geometric-mean ratio ``key(rs) / key(ref)`` at equal ``loss - L_min``, over the loss range both
    runs visit (log-log interpolation on a grid); also over its upper and lower thirds."""
    def curve(rows):
        pts = sorted((math.log(r["excess"]), math.log(r[key])) for r in rows
                     if _finite(r.get("excess")) and r["excess"] > 0 and _finite(r.get(key)) and r[key] > 0)
        return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if len(pts) >= 2 else None

    a, b = curve(rs), curve(ref)
    if a is None or b is None:
        return None
    lo, hi = max(a[0].min(), b[0].min()), min(a[0].max(), b[0].max())
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, points)
    diff = np.interp(grid, *a) - np.interp(grid, *b)
    third = max(1, points // 3)
    return {"all": float(np.exp(diff.mean())), "high": float(np.exp(diff[-third:].mean())),
            "low": float(np.exp(diff[:third].mean())), "range": [float(np.exp(lo)), float(np.exp(hi))],
            "frac_above": float((diff > 0).mean())}  # share of the common range where the ratio exceeds 1


def verdict_curvature_training(probe_rows: list[dict], ref: str = "2-shortcut") -> list[Verdict]:
    """Figs. 6-7: along training the 2-shortcut net is better conditioned, most of all at high loss.

    As in the paper's figures the comparison is at equal loss: ``cond_q10 = |lambda|max / |lambda|(0.1)``
    of each run is interpolated (log-log) against ``loss - L_min`` and compared with the 2-shortcut run
    of the same seed over the loss range both visit.  The comparison at equal epochs is reported too.
    """
    runs = _by_run(probe_rows)
    plains = sorted({a for a, _ in runs if a != ref})
    if not any(a == ref for a, _ in runs) or not plains:
        return [Verdict("Figs. 6-7", "2-shortcut better conditioned along training, most of all at high loss",
                        "needs probe runs of 2-shortcut and another net", None, "not run")]
    ratios = {}
    for arch in plains:
        per_seed = []
        for (a, seed), rs in runs.items():
            if a != arch or (ref, seed) not in runs:
                continue
            base = runs[(ref, seed)]
            m = _loss_matched(rs, base, "cond_q10")
            if m is None:
                continue
            lmax = _loss_matched(rs, base, "lam_max")
            lq = _loss_matched(rs, base, "lam_q10")
            by_ep = {r["epoch"]: r["cond_q10"] for r in rs}
            base_ep = {r["epoch"]: r["cond_q10"] for r in base}
            common = sorted(set(by_ep) & set(base_ep))
            per_seed.append({"all": m["all"], "high_loss": m["high"], "low_loss": m["low"],
                             "frac_range_better": m["frac_above"],
                             "lam_max": lmax["all"] if lmax else math.nan, "lam_q10": lq["all"] if lq else math.nan,
                             "equal_epochs": _geo_ratio(by_ep, base_ep, common)})
        if per_seed:
            ratios[arch] = {k: float(np.median([p[k] for p in per_seed])) for k in per_seed[0]}
    if not ratios:
        return [Verdict("Figs. 6-7", "2-shortcut better conditioned than the other nets along training",
                        "the runs visit no common loss range", None, "n/a")]
    better = all(_finite(r["all"]) and r["all"] > 1 for r in ratios.values())
    most_high = all(_finite(r["high_loss"]) and _finite(r["low_loss"]) and r["high_loss"] > r["low_loss"]
                    for r in ratios.values())
    # probes whose cond_q10 is +inf (|lambda|(0.1) zero to working precision) cannot enter the log-log
    # interpolation: they are named, and an infinite 2-shortcut value leaves the comparison undecided
    singular = {a: sorted({(r["seed"], r["epoch"]) for rs in (runs[k] for k in runs if k[0] == a)
                           for r in rs if r.get("cond_q10") == math.inf}) for a in [ref, *ratios]}
    singular = {a: v for a, v in singular.items() if v}
    note = "".join(f"; {a}: cond_q10 = inf (singular) at (seed, epoch) {v}, left out of the ratios"
                   for a, v in singular.items())
    unres = _unresolved_note(probe_rows, [ref, *ratios], by="epoch")
    note += unres
    undecided = ref in singular or bool(unres)
    meas = "; ".join(f"{a}/{ref}: {_fmt(r['all'])} over the common loss range, above 1 on "
                     f"{r['frac_range_better']:.0%} of it (high-loss third {_fmt(r['high_loss'])}, "
                     f"low-loss third {_fmt(r['low_loss'])}); |lambda|max ratio {_fmt(r['lam_max'])}, "
                     f"|lambda|(0.1) ratio {_fmt(r['lam_q10'])}; at equal epochs {_fmt(r['equal_epochs'])}"
                     for a, r in ratios.items())
    return [
        Verdict("Figs. 6-7", "2-shortcut better conditioned than the other nets along training",
                "geometric mean of cond_q10(other) / cond_q10(2-shortcut) at equal loss - L_min over the loss range "
                "both runs visit, median over seeds; holds if > 1 for every other net (undecided if the 2-shortcut "
                "net's own cond_q10 is inf at some probe)", None if undecided else bool(better), meas + note,
                {**ratios, "singular": singular}),
        Verdict("Figs. 6-7", "... most of all at high loss",
                "the same ratio over the highest third of the common loss range exceeds that over the lowest third, "
                "for every other net", None if undecided else bool(most_high), meas + note,
                {**ratios, "singular": singular}),
    ]


def verdict_index(probe_rows: list[dict], hist_rows: list[dict], ref: str = "2-shortcut") -> list[Verdict]:
    """Fig. 8: 2-shortcut index lower, dropping sharply early; the gradient norm peaks at that moment."""
    runs = _by_run(probe_rows)
    hist = _by_run(hist_rows)
    mine = {s: rs for (a, s), rs in runs.items() if a == ref}
    if not mine:
        return [Verdict("Fig. 8", "2-shortcut index lower, drops sharply early; gradient norm peaks then",
                        "needs probe runs", None, "not run")]
    others = sorted({a for a, _ in runs if a != ref})
    lower = {}
    for arch in others:
        diffs = []
        for (a, seed), rs in runs.items():
            if a == arch and seed in mine:
                mi = [r["index"] for r in mine[seed] if r["epoch"] > 0 and _finite(r["index"])]
                oi = [r["index"] for r in rs if r["epoch"] > 0 and _finite(r["index"])]
                if mi and oi:
                    diffs.append(float(np.mean(oi) - np.mean(mi)))
        if diffs:
            lower[arch] = float(np.median(diffs))
    sharp, peak, info = [], [], []
    for seed, rs in mine.items():
        ep = [r["epoch"] for r in rs]
        idx = [r["index"] for r in rs]
        if len(ep) < 3 or not all(_finite(i) for i in idx):
            continue
        drops = [idx[i] - idx[i + 1] for i in range(len(idx) - 1)]
        j = int(np.argmax(drops))
        total = max(idx) - min(idx[j + 1:] or [idx[-1]])
        last = ep[-1]
        is_sharp = drops[j] > 0 and drops[j] >= 0.5 * total and ep[j + 1] <= 0.5 * last
        sharp.append(bool(is_sharp))
        lo, hi = ep[max(j - 1, 0)], ep[min(j + 2, len(ep) - 1)]
        h = hist.get((ref, seed))
        if h:
            gn = [r["grad_norm"] if _finite(r["grad_norm"]) else -1.0 for r in h]
            e_peak = h[int(np.argmax(gn))]["epoch"]
            peak.append(bool(lo <= e_peak <= hi))
            info.append(f"seed {seed}: largest index drop {_fmt(drops[j])} of {_fmt(total)} between epochs "
                        f"{ep[j]} and {ep[j + 1]}; gradient norm peaks at epoch {e_peak} (window [{lo}, {hi}])")
        else:
            info.append(f"seed {seed}: largest index drop {_fmt(drops[j])} between epochs {ep[j]} and {ep[j + 1]}")
    unres = _unresolved_note(probe_rows, [ref, *others], by="epoch")  # an SLQ index off by up to its unresolved mass
    out = [Verdict("Fig. 8", "2-shortcut index lower than the other nets'",
                   "mean index over the probes after initialisation, other minus 2-shortcut, median over seeds; "
                   "holds if > 0 for every other net",
                   None if not lower or unres else bool(all(v > 0 for v in lower.values())),
                   ("; ".join(f"{a} - {ref}: {_fmt(v)}" for a, v in lower.items()) or "n/a") + unres, lower)]
    maj = lambda xs: None if not xs else bool(sum(xs) * 2 > len(xs))  # noqa: E731
    unres_ref = _unresolved_note(probe_rows, [ref], by="epoch")  # the drop is read off the 2-shortcut's index
    out.append(Verdict("Fig. 8", "2-shortcut index drops sharply early",
                       "largest drop between consecutive probes is >= half of the whole drop and ends in the first "
                       "half of training; majority of seeds", None if unres_ref else maj(sharp),
                       ("; ".join(info) or "n/a") + unres_ref, {"per_seed": sharp}))
    out.append(Verdict("Fig. 8", "the gradient norm peaks at the moment the index drops",
                       "epoch of the largest gradient norm lies in the probe window around the largest index drop "
                       "(one probe interval either side); majority of seeds", None if unres_ref else maj(peak),
                       ("; ".join(info) or "n/a") + unres_ref, {"per_seed": peak}))
    return out


# --------------------------------------------------------------------------- Figs. 9-10
def verdict_hessian_parts(probe_rows: list[dict], ref: str = "2-shortcut", start_below: float = 0.01,
                          end_above: float = 0.9) -> list[Verdict]:
    """Beyond the paper: the Hessian's Gauss-Newton part ``G`` against the whole (docs/science.md section 2): near
    the 2-shortcut net's initial point ``G`` is negligible (``J = 0`` at its zero point), and after training the
    top of every net's spectrum is ``G``'s."""
    runs = _by_run([r for r in probe_rows if _finite(r.get("ggn_lam_max")) and _finite(r.get("lam_max"))])
    if not runs:
        return [Verdict("beyond (H = G + F)", "the Hessian's top is its Gauss-Newton part after training",
                        "needs probes of the Hessian's parts", None, "not run")]
    ratio = lambda r: r["ggn_lam_max"] / r["lam_max"] if r["lam_max"] > 0 else math.nan  # noqa: E731
    start = {s: ratio(rs[0]) for (a, s), rs in runs.items() if a == ref and rs[0]["epoch"] == 0}
    end = {(a, s): (rs[-1]["epoch"], ratio(rs[-1])) for (a, s), rs in runs.items()}
    # (|lambda|max is Lanczos's, or exact: SLQ's resolution near 0, which other verdicts wait for, is not used)
    out = [Verdict(
        "beyond (H = G + F)", f"near the {ref} net's initial point the Hessian is its functional part",
        f"lambda_max(G) / |lambda|max(H) at epoch 0 below {start_below} for every seed (G = 0 at the zero point: "
        "J = 0)", None if not start else bool(all(v < start_below for v in start.values())),
        "; ".join(f"seed {s}: {_fmt(v)}" for s, v in sorted(start.items())) or "n/a",
        {str(s): v for s, v in start.items()})]
    out.append(Verdict(
        "beyond (H = G + F)", "after training the top of the Hessian's spectrum is its Gauss-Newton part",
        f"lambda_max(G) / |lambda|max(H) at the last probe at least {end_above}, for every net and seed",
        None if not end else bool(all(v >= end_above for _, v in end.values())),
        "; ".join(f"{a} seed {s} (epoch {e}): {_fmt(v)}" for (a, s), (e, v) in sorted(end.items())),
        {f"{a}/{s}": v for (a, s), (_, v) in end.items()}))
    return out


def sharpness_ratio(row: dict, key: str = "lam_top") -> float:
    """``lr * row[key] / 2``: the sharpness (the Hessian's largest eigenvalue, with its sign: a probe's ``lam_top``,
    a history row's ``sharpness``) against gradient descent's stability threshold ``2 / lr``; above 1 a quadratic
    model of the loss there makes gradient descent at rate ``lr`` diverge along the top eigenvector (nan where the
    row has no such value)."""
    lr, top = row.get("lr"), row.get(key)
    return float(lr) * float(top) / 2 if _finite(lr) and _finite(top) else math.nan


def _sharpness_rows(probe_rows: list[dict], hist_rows: list[dict] | None) -> tuple[list[dict], str, str]:
    """The rows that carry the sharpness, as ``(rows with "ratio", where from, their unit)``: the history's per-epoch
    series where the runs tracked it, else the probes' ``lam_top``."""
    hist = [dict(r, ratio=sharpness_ratio(r, "sharpness")) for r in hist_rows or []]
    hist = [r for r in hist if _finite(r["ratio"])]
    if hist:
        return hist, "every epoch (Lanczos)", "epochs"
    return ([dict(r, ratio=sharpness_ratio(r)) for r in probe_rows if _finite(sharpness_ratio(r))], "at the probes",
            "probes")


def verdict_stability(probe_rows: list[dict], hist_rows: list[dict] | None = None) -> list[Verdict]:
    """Beyond the paper, measured and not tested: where each net trains against gradient descent's stability
    threshold (``lr * lambda_top / 2`` against 1; Cohen et al. 2021, "Gradient descent on neural networks typically
    occurs at the edge of stability"): at the start, at its peak and at the end, median over seeds; from the history's
    per-epoch sharpness where the runs tracked it (``hist_rows``), else from the probes."""
    claim = "each net's sharpness against gradient descent's stability threshold: lr * lambda_top / 2 (1: at 2 / lr)"
    rows, where, unit = _sharpness_rows([r for r in probe_rows if r.get("status", "ok") == "ok"],
                                  [r for r in hist_rows or [] if r.get("status", "ok") == "ok"])
    test = (f"{MEASURED_ONLY}: lr * lambda_top / 2 ({where}) at the start, its largest (with the epoch) and at the "
            "end; median over seeds, runs that stayed finite")
    runs = _by_run(rows)
    if not runs:
        older = any(r.get("lam_top") is None and _finite(r.get("lam_max")) for r in probe_rows)
        return [Verdict("beyond (stability)", claim, test, None,
                        "not in these probes (stored by an earlier version, which did not record lambda_top: a new "
                        "--out computes them)" if older else "not run")]
    per: dict[str, dict] = {}
    for (arch, seed), rs in runs.items():
        r = [x["ratio"] for x in rs]
        j = int(np.argmax(r))
        d = per.setdefault(arch, {"lr": rs[0]["lr"], "first": [], "peak": [], "peak_epoch": [], "last": [],
                                  "last_epoch": [], "epochs_above": []})
        d["first"].append(r[0])
        d["peak"].append(r[j])
        d["peak_epoch"].append(rs[j]["epoch"])
        d["last"].append(r[-1])
        d["last_epoch"].append(rs[-1]["epoch"])
        d["epochs_above"].append(sum(v > 1 for v in r) / len(r))
    summary = {a: {"lr": d["lr"], "seeds": len(d["first"]), "first": float(np.median(d["first"])),
                   "peak": float(np.median(d["peak"])), "peak_epoch": float(np.median(d["peak_epoch"])),
                   "last": float(np.median(d["last"])), "last_epoch": max(d["last_epoch"]),
                   "seeds_above_at_peak": sum(v > 1 for v in d["peak"]),
                   "share_above": float(np.median(d["epochs_above"]))} for a, d in per.items()}
    text = "; ".join(
        f"{a} (lr {_fmt(v['lr'])}): {_fmt(v['first'])} at the start, peak {_fmt(v['peak'])} (epoch "
        f"{_fmt(v['peak_epoch'])}), {_fmt(v['last'])} at epoch {v['last_epoch']}; above 1 in {v['seeds_above_at_peak']} "
        f"of {v['seeds']} seeds, for {_fmt(100 * v['share_above'], 2)}% of the {unit}"
        for a, v in sorted(summary.items()))
    return [Verdict("beyond (stability)", claim, test, None, text, summary)]


def _rel_excess(loss, l_min, l_zero):
    return (loss - l_min) / (l_zero - l_min) if _finite(loss) else math.inf


def verdict_final_loss_linear(best_rows: list[dict], l_min: float, l_zero: float, act: str = "linear") -> list[Verdict]:
    """Fig. 9: at the best rate, 2-shortcut stays near L_min at every depth and tolerates larger rates;
    the other nets degrade with depth."""
    rows = [dict(r, rel=_rel_excess(r["final_loss"], l_min, l_zero)) for r in best_rows if r["act"] == act]
    if not any(r["arch"] == "2-shortcut" for r in rows):
        return [Verdict("Fig. 9", "2-shortcut near L_min at all depths", "needs the sweep", None, "not run")]
    agg = aggregate(rows, ("arch", "depth"), "rel", keep_inf=True)  # a seed diverged at every rate: inf
    # a seed with no stable rate on the grid has a largest stable rate below it: 0, not a seed left out
    agg_lr = aggregate([dict(r, max_stable_lr=r.get("max_stable_lr") if _finite(r.get("max_stable_lr")) else 0.0)
                        for r in rows], ("arch", "depth"), "max_stable_lr")
    d2, e2 = _series(agg, "2-shortcut")
    out = [Verdict(
        "Fig. 9", "2-shortcut stays near L_min at all depths",
        f"relative excess (L - L_min) / (L_zero - L_min) of the best rate, seed mean, below {NEAR_LMIN} at every "
        f"depth (L_zero = loss of the zero map = {_fmt(l_zero)}, L_min = {_fmt(l_min)})",
        bool(all(_finite(e) and e < NEAR_LMIN for e in e2)),
        ", ".join(f"D={d}: {_fmt(e)}" for d, e in zip(d2, e2)) + _diverged_note(agg),
        {"depths": d2, "rel_excess": e2})]
    degrade, meas = {}, []
    for arch in sorted({r["arch"] for r in rows} - {"2-shortcut"}):
        d, e = _series(agg, arch)
        if len(d) < 2:
            continue
        e2_deep = dict(zip(d2, e2)).get(d[-1], e2[-1] if e2 else math.nan)
        s = loglog_slope(d, [max(x, 1e-300) if _finite(x) else 1e300 for x in e])
        worse = (not _finite(e[-1]) or e[-1] > e[0]) and (not _finite(e[-1]) or e[-1] > e2_deep)
        degrade[arch] = bool(worse)
        meas.append(f"{arch}: " + ", ".join(f"D={x}: {_fmt(y)}" for x, y in zip(d, e)) + f" (slope {_fmt(s)})")
    plain_deg = [degrade[a] for a in PLAIN if a in degrade]
    out.append(Verdict(
        "Fig. 9", "plain Xavier / orthogonal nets degrade with depth",
        "relative excess at the deepest depth above that at the shallowest and above 2-shortcut's at the deepest, "
        "for each plain net (other shortcut nets reported too)",
        None if not plain_deg else bool(all(plain_deg)), "; ".join(meas) or "n/a", degrade))
    dl, l2 = _series(agg_lr, "2-shortcut", y="median")
    if dl:
        deep = dl[-1]
        lr2 = dict(zip(dl, l2)).get(deep)
        others = {a: dict(zip(*_series(agg_lr, a, y="median"))).get(deep) for a in PLAIN}
        others = {a: v for a, v in others.items() if v is not None}
        tol = None if not others or not _finite(lr2) else bool(all((not _finite(v)) or lr2 > v for v in others.values()))
        out.append(Verdict(
            "Fig. 9", "2-shortcut tolerates larger learning rates",
            "largest stable rate of the grid (not diverged, ends below its start; 0 for a seed with none) at the "
            "deepest depth, seed median, above each plain net's",
            tol, f"D={deep}: 2-shortcut {_fmt(lr2)}; " + ", ".join(f"{a} {_fmt(v)}" for a, v in others.items()),
            {"depth": deep, "2-shortcut": lr2, **others}))
    return out


def verdict_final_loss_nonlinear(best_rows: list[dict], l_min: float, act: str = "relu-mid",
                                 figure: str = "Fig. 10") -> list[Verdict]:
    """Fig. 10 (ReLU at mid) and the activation variants beyond the paper: Xavier / orthogonal miss the
    better optima that 2-shortcut reaches."""
    rows = [r for r in best_rows if r["act"] == act]
    agg = aggregate(rows, ("arch", "depth"), "final_loss", keep_inf=True)  # a seed diverged at every rate: inf
    d2, l2 = _series(agg, "2-shortcut")
    if not d2:
        return [Verdict(figure, f"2-shortcut ({act}) reaches better optima than plain nets", "needs the sweep", None, "not run")]
    others = {a: dict(zip(*_series(agg, a))) for a in PLAIN if any(r["arch"] == a for r in rows)}
    wins, meas = [], []
    for d, l in zip(d2, l2):
        best_other = min((v.get(d, math.inf) for v in others.values()), default=math.inf)
        best_other = best_other if _finite(best_other) else math.inf
        wins.append(_finite(l) and l < best_other)
        meas.append(f"D={d}: 2-shortcut {_fmt(l)}, " + ", ".join(f"{a} {_fmt(v.get(d))}" for a, v in others.items()))
    deep_win = wins[-1] if wins else None
    below = [d for d, l in zip(d2, l2) if _finite(l) and l < l_min]
    names = " / ".join(_PLAIN_NAMES.get(a, a) for a in others) or "the plain nets"
    note = _diverged_note(agg)
    return [
        Verdict(figure, f"with {act}, {names} miss the better optima that 2-shortcut reaches",
                "seed-mean final loss at the best rate: 2-shortcut below every plain net at the deepest depth and "
                "at a majority of depths", None if not others else bool(deep_win and sum(wins) * 2 > len(wins)),
                "; ".join(meas) + note, {"wins": wins, "depths": d2}),
        Verdict(f"{figure} (also)", f"2-shortcut with {act} goes below the linear optimum L_min",
                f"seed-mean final loss < L_min = {_fmt(l_min)} at every depth (the depths below it are listed)", bool(len(below) == len(d2)),
                f"below L_min at depths {below} of {d2}" + note, {"below": below}),
    ]


# --------------------------------------------------------------------------- Theorem 1: order of the saddle
ORDER_TOL = 0.1  # a measured exponent within this of n counts as n
SECOND_ORDER_RTOL = 1e-3  # finite-difference t^2 coefficient against v^T H v / 2


def verdict_stationary_order(rows: list[dict]) -> list[Verdict]:
    """Theorem 1: an n-shortcut net's zero point is a stationary point of order ``n - 1``, so along a random
    direction the loss changes as ``t^n``; plain nets at their inits are not stationary (``t^1``)."""
    out = []

    def orders(pred):
        got: dict[str, list] = {}
        for r in rows:
            if pred(r):
                got.setdefault(f"{r['arch']} ({r['act']})", []).append(r.get("order"))
        return got

    def span(v):
        fin = [float(x) for x in v if _finite(x)]
        nan = len(v) - len(fin)
        return (f"{_fmt(min(fin))}..{_fmt(max(fin))}" if fin else "n/a") + (f" ({nan} not measurable)" if nan else "")

    zero = [r for r in rows if r.get("init") == "zero" and r.get("n", 0) >= 1]
    if zero:
        ok = [(_finite(r.get("order")) and abs(float(r["order"]) - r["n"]) < ORDER_TOL) for r in zero]
        got = orders(lambda r: r in zero)
        ns = sorted({r["n"] for r in zero})
        out.append(Verdict(
            "Theorem 1", "the zero point of an n-shortcut net is a stationary point of order n - 1: along random "
            "directions the loss leaves it as t^n (" + ", ".join(f"n = {n}" for n in ns) + ")",
            f"exponent of |L(t v) - L(0)| vs t at the smallest steps clear of rounding, per net, depth and random unit "
            f"direction: within {ORDER_TOL} of n for every one",
            None if not all(_finite(r.get("order")) for r in zero) else bool(all(ok)),
            "; ".join(f"{k}: {span(v)}" for k, v in got.items()) + f"; depths {sorted({r['depth'] for r in zero})}",
            {k: v for k, v in got.items()}))
        two = [r for r in zero if r["n"] == 2 and _finite(r.get("coefficient")) and _finite(r.get("second_order_hvp"))]
        if two:
            errs = [abs(r["coefficient"] - r["second_order_hvp"]) / max(abs(r["second_order_hvp"]), 1e-300) for r in two]
            out.append(Verdict(
                "Theorem 1 (also)", "2-shortcut at zero: the loss's t^2 term along v is v^T H v / 2 (the Hessian "
                "the curvature tools compute is all of it)",
                f"relative difference of the finite-difference t^2 coefficient and v^T H v / 2 from a Hessian-vector "
                f"product < {SECOND_ORDER_RTOL} for every direction", bool(max(errs) < SECOND_ORDER_RTOL),
                f"max relative difference {_fmt(max(errs))} over {len(two)} directions", {"max_rel_diff": max(errs)}))
    plain = [r for r in rows if r.get("n") == 0]
    if plain:
        got = orders(lambda r: r in plain)
        # a deep plain net can lose its gradient below rounding (vanishing gradients): no order to measure there,
        # which says nothing against the claim; it is named in the measurement
        measured = [r for r in plain if _finite(r.get("order"))]
        ok = [abs(float(r["order"]) - 1) < ORDER_TOL for r in measured]
        lost = sorted({(r["arch"], r["depth"]) for r in plain if not _finite(r.get("order"))})
        out.append(Verdict(
            "Theorem 1 (also)", "plain nets at their Xavier / orthogonal inits are not stationary: the loss leaves "
            "them as t^1", f"exponent within {ORDER_TOL} of 1 for every net, depth and direction where the loss "
            "moves above rounding", bool(all(ok)) if measured else None,
            "; ".join(f"{k}: {span(v)}" for k, v in got.items())
            + ("; no change above rounding (vanished gradient) at " + ", ".join(f"{a} D={d}" for a, d in lost)
               if lost else ""), {k: v for k, v in got.items()}))
    return out


_PLAIN_NAMES = {"plain-xavier": "Xavier", "plain-orthogonal": "orthogonal"}


def _diverged_note(agg: list[dict]) -> str:
    """Names the (net, depth) groups where some seed diverged at every rate (counted as an infinite loss)."""
    bad = [f"{r['arch']} D={r['depth']} ({r['n_inf']} of {r['n_total']} seeds)" for r in agg if r.get("n_inf")]
    return ("; every rate diverged (loss counted as inf) for " + ", ".join(bad)) if bad else ""


def verdict_table(verdicts: list[Verdict]) -> list[dict]:
    return [v.as_dict() for v in verdicts]


__all__ = [
    "Verdict",
    "aggregate",
    "loglog_slope",
    "sharpness_ratio",
    "verdict_curvature_training",
    "verdict_final_loss_linear",
    "verdict_final_loss_nonlinear",
    "verdict_index",
    "verdict_init_condition",
    "verdict_stability",
    "verdict_stationary_order",
    "verdict_table",
    "verdict_weight_norm",
]
