"""The paper's figures (docs/science.md section 4) drawn from the sweep rows, as PNG files (matplotlib, Agg).

Lines are means over seeds (geometric for log-scale quantities, see
:func:`~shortcut_ext.experiments.analysis.aggregate`); bands are the seeds' spread: mean -/+ std, or from the
seeds' minimum to their maximum for losses and indices (a mean - std band can cross their floor).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker
from matplotlib import colormaps
from matplotlib.figure import Figure
import numpy as np  # noqa: E402

from .._io import save_figure  # noqa: E402
from .analysis import _finite, _is_num, aggregate, sharpness_ratio  # noqa: E402

COLORS = {
    "2-shortcut": "#d62728",
    "2-shortcut-zero": "#ff7f0e",
    "1-shortcut": "#2ca02c",
    "1-shortcut-zero": "#2ca02c",
    "3-shortcut": "#9467bd",
    "3-shortcut-zero": "#9467bd",
    "4-shortcut-zero": "#8c564b",
    "plain-xavier": "#1f77b4",
    "plain-orthogonal": "#17becf",
}
STYLES = {"2-shortcut-zero": "--", "1-shortcut-zero": "-"}


def _color(arch: str) -> str:
    return COLORS.get(arch, "#7f7f7f")


def _subplots(*grid, figsize, **kw):
    """``plt.subplots`` without pyplot: a figure no backend knows, so that importing or drawing here
    never switches the caller's matplotlib backend (a notebook's inline plots) or keeps figures open."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


def _save(fig, path, caption: str | None = None) -> Path:
    """Write the figure; ``caption`` (what was computed: data, depths, seeds, epochs, dtype) goes under it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if caption:
        # plain text: the caption names the data, and a `$` in it would start math (which could fail to parse);
        # an escaped dollar is drawn as a dollar
        fig.text(0.005, 0.005, caption.replace("$", r"\$"), fontsize=7, color="0.3", ha="left", va="bottom",
                 wrap=True)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
    else:
        fig.tight_layout()
    save_figure(fig, path, dpi=110)  # a Figure outside pyplot: Agg draws it, the user's backend is untouched
    return path


def _band(ax, agg: list[dict], arch: str, x: str = "depth", label: str | None = None, minmax: bool = False,
          **match):
    """The seed mean as a line, and a band: mean -/+ std (geometric for ``aggregate(log=True)``), or the
    seeds' min to max with ``minmax`` (for losses, which a mean - std band can take below their floor)."""
    lo, hi = ("min", "max") if minmax else ("lo", "hi")
    pts = sorted((r[x], r["mean"], r[lo], r[hi]) for r in agg
                 if r["arch"] == arch and all(r.get(k) == v for k, v in match.items()) and _finite(r["mean"]))
    if not pts:
        return
    a = np.array(pts, dtype=float)
    ax.plot(a[:, 0], a[:, 1], marker="o", ms=3, color=_color(arch), ls=STYLES.get(arch, "-"), label=label or arch)
    if len(a) > 1 and np.all(np.isfinite(a[:, 2:])):
        ax.fill_between(a[:, 0], a[:, 2], a[:, 3], color=_color(arch), alpha=0.18, lw=0)


def _mark_singular(ax, rows: list[dict], value: str, x="depth", at: float = math.inf,
                   label: str = "singular (= inf) for some seed"):
    """Triangles on the top edge where some seed's ``value`` is +inf (a condition number of a Hessian
    singular to working precision), which a log axis and the seed means cannot show; with ``at=0``,
    triangles on the bottom edge where it is 0.  ``x`` is a row key or a function of the row (rows
    where it is not finite and positive are skipped)."""
    first = True
    xof = x if callable(x) else (lambda r: r[x])
    for arch in _archs(rows):
        xs = sorted({xof(r) for r in rows if r["arch"] == arch and r.get(value) == at})
        xs = [v for v in xs if _finite(v) and v > 0]
        if xs:
            top = at == math.inf
            ax.plot(xs, [1.0 if top else 0.0] * len(xs), ls="none", marker="^" if top else "v", ms=7,
                    color=_color(arch), clip_on=False, transform=ax.get_xaxis_transform(),
                    label=label if first else None)
            first = False


def _depth_axis(ax, rows, key: str = "depth"):
    """Log x axis with the measured depths as plain tick labels."""
    depths = sorted({r[key] for r in rows if _finite(r.get(key))})
    ax.set_xscale("log")
    if depths:
        ax.set_xticks(depths)
        # neighbours closer than 15% on the log axis ("15", "16") would overlap: label the depths most nets
        # were measured at first (16 for five nets, not the 3-shortcut's 15), then the others that have room
        count = {d: len({r.get("arch") for r in rows if r.get(key) == d}) for d in depths}
        shown: list = []
        for d in sorted(depths, key=lambda d: (-count[d], d)):
            if all(max(d, e) >= 1.15 * min(d, e) for e in shown):
                shown.append(d)
        ax.set_xticklabels([str(int(d)) if d in shown else "" for d in depths], fontsize=7)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())


def _archs(rows) -> list[str]:
    order = list(COLORS)
    present = {r["arch"] for r in rows}
    return [a for a in order if a in present] + sorted(present - set(order))


# --------------------------------------------------------------------------- Figs. 2-3
def fig_weight_norm(best_rows: list[dict], path, act: str = "linear", caption: str | None = None) -> Path:
    """Figs. 2-3: mean Frobenius norm of the weights during training (2-shortcut, each depth) and
    after training vs depth (every shortcut net), at each net's best rate."""
    rows = [r for r in best_rows if r["act"] == act and r.get("result") is not None]
    fig, (a1, a2) = _subplots(1, 2, figsize=(11, 4))
    depths = sorted({r["depth"] for r in rows if r["arch"] == "2-shortcut"})
    cmap = colormaps["viridis"]
    for i, depth in enumerate(depths):
        hs = [r["result"].history for r in rows if r["arch"] == "2-shortcut" and r["depth"] == depth]
        hs = [h for h in hs if h.get("epoch")]
        if not hs:
            continue
        n = min(len(h["epoch"]) for h in hs)
        ep = np.array(hs[0]["epoch"][:n], dtype=float)
        wn = np.nanmean(np.array([h["weight_norm"][:n] for h in hs], dtype=float), axis=0)
        a1.plot(ep + 1, wn, color=cmap(i / max(len(depths) - 1, 1)), label=f"depth {depth}")
    a1.set_xscale("log")
    a1.set_yscale("log")
    a1.set_xlabel("epoch + 1")
    a1.set_ylabel("mean Frobenius norm of W")
    a1.set_title("Fig. 2: 2-shortcut, during training")
    a1.legend(fontsize=7)
    agg = aggregate(rows, ("arch", "depth"), "final_weight_norm", log=True)
    for arch in _archs(rows):
        if not arch.startswith("plain"):
            _band(a2, agg, arch)
    lost = [dict(r, lost=math.inf) for r in best_rows if r["act"] == act and r.get("result") is None
            and not r["arch"].startswith("plain")]  # seeds whose every rate diverged: no trained weights
    _mark_singular(a2, lost, "lost", label="every rate diverged for some seed")
    _depth_axis(a2, rows)
    a2.set_yscale("log")
    a2.set_xlabel("depth (weight layers)")
    a2.set_ylabel("mean Frobenius norm after training (geometric seed mean)")
    a2.set_title("Fig. 3: after training vs depth")
    a2.legend(fontsize=7)
    return _save(fig, path, caption)


# --------------------------------------------------------------------------- Fig. 5
def fig_init_condition(init_rows: list[dict], path, theory_cond: float | None = None,
                       caption: str | None = None) -> Path:
    """Fig. 5: condition number of the Hessian at initialisation vs depth."""
    fig, axes = _subplots(1, 2, figsize=(11, 4))
    for ax, value, title in ((axes[0], "cond_q10", "|λ|max / |λ|(0.1) (the paper's measure)"),
                             (axes[1], "cond", "|λ|max / |λ|min (exact)")):
        agg = aggregate(init_rows, ("arch", "depth"), value, log=True)
        for arch in _archs(init_rows):
            _band(ax, agg, arch)
        _mark_singular(ax, init_rows, value)
        if theory_cond is not None and _finite(theory_cond):
            ax.axhline(theory_cond, color="k", ls=":", lw=1, label="Theorem 1, 2-shortcut at 0")
        _depth_axis(ax, init_rows)
        ax.set_yscale("log")
        ax.set_xlabel("depth (weight layers)")
        ax.set_ylabel("condition number at init")
        ax.set_title("Fig. 5: " + title, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path, caption)


# --------------------------------------------------------------------------- Figs. 6-8
def fig_curvature_vs_loss(probe_rows: list[dict], path, l_min: float | None = None,
                          caption: str | None = None) -> Path:
    """Figs. 6-7: ``|lambda|max``, ``|lambda|(0.1)`` and their ratio along training, against the loss
    (x axis reversed: training runs left to right)."""
    fig, axes = _subplots(1, 3, figsize=(15, 4))
    keys = (("lam_max", "Fig. 6: |λ|max"), ("lam_q10", "Fig. 7: |λ|(0.1)"), ("cond_q10", "|λ|max / |λ|(0.1)"))
    lm = l_min or 0.0
    for ax, (key, title) in zip(axes, keys):
        seen = set()
        for arch in _archs(probe_rows):
            for seed in sorted({r["seed"] for r in probe_rows if r["arch"] == arch}):
                rs = sorted((r for r in probe_rows if r["arch"] == arch and r["seed"] == seed), key=lambda r: r["epoch"])
                pts = [(r["loss"] - lm, r[key]) for r in rs if _finite(r.get(key)) and _finite(r.get("loss"))
                       and r["loss"] - lm > 0 and r[key] > 0]
                if not pts:
                    continue
                a = np.array(pts)
                ax.plot(a[:, 0], a[:, 1], marker=".", ms=3, lw=1, color=_color(arch), alpha=0.8,
                        label=None if arch in seen else arch)
                seen.add(arch)
        excess = lambda r: r["loss"] - lm if _finite(r.get("loss")) else math.nan  # noqa: E731
        if key == "cond_q10":  # |lambda|(0.1) zero to working precision: a log axis cannot show these
            _mark_singular(ax, probe_rows, key, excess, label="= inf (|λ|(0.1) = 0)")
        elif key == "lam_q10":
            _mark_singular(ax, probe_rows, key, excess, at=0.0, label="= 0 (below resolution)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("loss - L_min" if l_min is not None else "loss")
        ax.set_ylabel({"lam_max": "|λ|max", "lam_q10": "|λ|(0.1): 10% quantile of |λ|",
                       "cond_q10": "|λ|max / |λ|(0.1)"}[key])
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path, caption)


def fig_index_gradnorm(probe_rows: list[dict], hist_rows: list[dict], path, caption: str | None = None) -> Path:
    """Fig. 8: index (fraction of negative Hessian eigenvalues) and gradient norm along training."""
    fig, (a1, a2) = _subplots(1, 2, figsize=(11, 4))
    for arch in _archs(probe_rows):
        agg = aggregate([r for r in probe_rows if r["arch"] == arch], ("arch", "epoch"), "index")
        pts = np.array([(r["epoch"] + 1, r["mean"], r["min"], r["max"]) for r in agg if _finite(r["mean"])], dtype=float)
        if len(pts):
            a1.plot(pts[:, 0], pts[:, 1], marker="o", ms=3, color=_color(arch), label=arch)
            a1.fill_between(pts[:, 0], pts[:, 2], pts[:, 3], color=_color(arch), alpha=0.18, lw=0)
    allg, keep = [], []
    for arch in _archs(hist_rows):  # one line per seed: a transient blow-up of one seed must not hide the rest
        for i, seed in enumerate(sorted({r["seed"] for r in hist_rows if r["arch"] == arch})):
            pts = np.array([(r["epoch"] + 1, r["grad_norm"]) for r in hist_rows if r["arch"] == arch
                            and r["seed"] == seed and _finite(r["grad_norm"]) and r["grad_norm"] > 0], dtype=float)
            if len(pts):
                a2.plot(pts[:, 0], pts[:, 1], color=_color(arch), lw=1, alpha=0.8, label=arch if i == 0 else None)
                allg.append(pts[:, 1])
                if arch == "2-shortcut":
                    keep.append(pts[:, 1])
    if allg:
        g = np.concatenate(allg)
        lo, hi = np.percentile(g, 1), np.percentile(g, 97)
        if keep:  # the 2-shortcut's gradient-norm peak is what Fig. 8's verdict is about: never clipped
            k = np.concatenate(keep)
            lo, hi = min(lo, float(k.min())), max(hi, float(k.max()))
        if hi > lo > 0:
            a2.set_ylim(lo / 3, hi * 3)  # robust limits: a transient blow-up of another net is clipped, and said
            above = g[g > hi * 3]
            if above.size:
                a2.text(0.01, 0.99, f"{above.size} values above the axis (up to {above.max():.3g}) clipped",
                        transform=a2.transAxes, fontsize=7, va="top")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("epoch + 1")
        if ax.get_legend_handles_labels()[0]:  # (a panel without data has no legend, and no matplotlib warning)
            ax.legend(fontsize=7)
    a1.set_ylabel("index (fraction of negative eigenvalues)")
    a1.set_title("Fig. 8: index along training", fontsize=9)
    a2.set_yscale("log")
    a2.set_ylabel("gradient norm")
    a2.set_title("Fig. 8: gradient norm along training", fontsize=9)
    return _save(fig, path, caption)


# --------------------------------------------------------------------------- Figs. 9-10
def fig_final_loss(best_rows: list[dict], path, l_min: float, l_zero: float | None = None,
                   act: str = "linear", title: str = "Fig. 9", caption: str | None = None) -> Path:
    """Figs. 9-10: final loss at the best learning rate vs depth; relative excess; rates."""
    rows = [r for r in best_rows if r["act"] == act]
    fig, axes = _subplots(1, 3, figsize=(15, 4))
    agg = aggregate(rows, ("arch", "depth"), "final_loss")
    for arch in _archs(rows):
        _band(axes[0], agg, arch, minmax=True)
    axes[0].axhline(l_min, color="k", ls=":", lw=1, label="L_min (best linear)")
    if l_zero is not None and _finite(l_zero):  # the verdicts measure the excess loss against L_zero - L_min
        axes[0].axhline(l_zero, color="0.5", ls="--", lw=1, label="L_zero (the zero map)")
    axes[0].set_ylabel("final loss (best rate): seed mean, band min-max")
    axes[0].set_title(f"{title}: final loss, {act}", fontsize=9)
    if act == "linear":  # L_min bounds a linear net's loss: show the distance to it
        ex_rows = [dict(r, excess=(r["final_loss"] - l_min) if _finite(r["final_loss"]) else math.nan) for r in rows]
        agg_e = aggregate(ex_rows, ("arch", "depth"), "excess", log=True)
        axes[1].set_ylabel("final loss - L_min: geometric seed mean")
        axes[1].set_title(f"{title}: distance to L_min", fontsize=9)
    else:  # a nonlinear net can go below L_min
        agg_e = aggregate(rows, ("arch", "depth"), "final_loss", log=True)
        axes[1].axhline(l_min, color="k", ls=":", lw=1, label="L_min (best linear)")
        axes[1].set_ylabel("final loss: geometric seed mean")
        axes[1].set_title(f"{title}: final loss, log scale", fontsize=9)
    for arch in _archs(rows):
        _band(axes[1], agg_e, arch)
    for ax in axes[:2]:  # a seed whose every rate diverged has no final loss to average: marked instead
        _mark_singular(ax, rows, "final_loss", label="every rate diverged for some seed")
    axes[1].set_yscale("log")
    agg_lr = aggregate(rows, ("arch", "depth"), "best_lr", log=True)
    # as in the verdict: a seed with no stable rate on the grid counts 0 in the median (0 is marked at the bottom)
    agg_st = aggregate([dict(r, max_stable_lr=r["max_stable_lr"] if _finite(r.get("max_stable_lr")) else 0.0)
                        for r in rows], ("arch", "depth"), "max_stable_lr")
    first_none = True
    for arch in _archs(rows):
        _band(axes[2], agg_lr, arch, label=f"{arch} best")
        pts = sorted((r["depth"], r["median"]) for r in agg_st if r["arch"] == arch and _finite(r["median"])
                     and r["median"] > 0)
        if pts:
            a = np.array(pts)
            axes[2].plot(a[:, 0], a[:, 1], ls=":", marker="^", ms=3, color=_color(arch), label=f"{arch} largest stable")
        none = sorted(r["depth"] for r in agg_st if r["arch"] == arch and r["median"] == 0)
        if none:
            axes[2].plot(none, [0.0] * len(none), ls="none", marker="v", ms=7, color=_color(arch), clip_on=False,
                         transform=axes[2].get_xaxis_transform(),
                         label="no stable rate (seed median)" if first_none else None)
            first_none = False
    axes[2].set_yscale("log")
    axes[2].set_ylabel("learning rate")
    axes[2].set_title(f"{title}: best rate; largest stable (ends below its start)", fontsize=9)
    for ax in axes:
        _depth_axis(ax, rows)
        ax.set_xlabel("depth (weight layers)")
        ax.legend(fontsize=6)
    return _save(fig, path, caption)


def fig_activations(best_rows: list[dict], path, l_min: float, acts: list[str],
                    caption: str | None = None) -> Path:
    """Beyond the paper: final loss at the best rate vs depth for other activations and positions."""
    acts = [a for a in acts if any(r["act"] == a for r in best_rows)]
    fig, axes = _subplots(1, max(len(acts), 1), figsize=(4.5 * max(len(acts), 1), 4), squeeze=False)
    for ax, act in zip(axes[0], acts):
        rows = [r for r in best_rows if r["act"] == act]
        agg = aggregate(rows, ("arch", "depth"), "final_loss")
        for arch in _archs(rows):
            _band(ax, agg, arch, minmax=True)
        _mark_singular(ax, rows, "final_loss", label="every rate diverged for some seed")
        ax.axhline(l_min, color="k", ls=":", lw=1, label="L_min (best linear)")
        _depth_axis(ax, rows)
        ax.set_xlabel("depth (weight layers)")
        ax.set_ylabel("final loss (best rate): seed mean, band min-max")
        ax.set_title(f"beyond the paper: {act}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path, caption)


__all__ = ["fig_activations", "fig_curvature_vs_loss", "fig_final_loss", "fig_index_gradnorm",
           "fig_init_condition", "fig_stability", "fig_weight_norm"]


# --------------------------------------------------------------------------- Theorem 1: order of the saddle
def fig_stationary_order(rows: list[dict], curves: list[dict], path, caption: str | None = None) -> Path:
    """How the loss leaves the initial point: ``|L(w + t v) - L(w)|`` against the step (deepest depth, first
    direction seed, per net and activation), and the measured exponent against depth."""
    fig, axes = _subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if curves:
        deepest = max(c["depth"] for c in curves)
        seed0 = min(c["seed"] for c in curves)
        keys = list(dict.fromkeys((c["arch"], c["act"]) for c in curves if c["depth"] == deepest))
        for arch, act in keys:
            pts = sorted((c["step"], abs(c["change"])) for c in curves if c["arch"] == arch and c["act"] == act
                         and c["depth"] == deepest and c["seed"] == seed0 and _finite(c["change"]) and c["change"])
            if pts:
                ax.loglog(*zip(*pts), marker=".", color=_color(arch), ls="-" if act == "linear" else ":",
                          label=f"{arch} ({act})")
        ax.set_title(f"|L(w + t v) - L(w)| along a random unit direction, depth {deepest}", fontsize=9)
    ax.set_xlabel("step t (|t v| = t)")
    ax.set_ylabel("|change of the loss|")
    ax.legend(fontsize=6)
    ax = axes[1]
    for arch, act in dict.fromkeys((r["arch"], r["act"]) for r in rows):
        pts = sorted((r["depth"], r["order"]) for r in rows if r["arch"] == arch and r["act"] == act
                     and _finite(r.get("order")))
        if pts:
            ax.plot(*zip(*pts), marker="o" if act == "linear" else "x", ls="none", color=_color(arch),
                    label=f"{arch} ({act})", alpha=0.8)
    for n in sorted({r["n"] for r in rows}):
        ax.axhline(max(n, 1), color="0.6", lw=0.8, ls=":")
    ax.set_xscale("log")
    _depth_axis(ax, rows)
    ax.set_xlabel("depth (weight layers)")
    ax.set_ylabel("measured order p: change ~ t^p")
    ax.set_title("Theorem 1: p = n at an n-shortcut net's zero point (dotted: 1..n)", fontsize=9)
    ax.legend(fontsize=6)
    return _save(fig, path, caption)


def fig_zero_point_planes(planes: list[dict], path, caption: str | None = None) -> Path:
    """The loss minus its value at the initial point on a plane of two random unit directions, one panel per
    net, with the quadratic model's contours dashed at the same levels (flat where gradient and Hessian vanish)."""
    k = max(len(planes), 1)
    fig, axes = _subplots(1, k, figsize=(3.6 * k + 0.6, 3.6), squeeze=False)
    for ax, pl in zip(axes[0], planes):
        ts = np.asarray(pl["ts"], dtype=float)
        z = np.asarray(pl["loss"], dtype=float) - pl["center"]
        q = np.asarray(pl["quadratic"], dtype=float) - pl["center"]
        fin = z[np.isfinite(z)]
        top = float(np.max(np.abs(fin))) if fin.size else 0.0
        if top > 0:
            levels = np.linspace(-top, top, 21)
            cs = ax.contourf(ts, ts, z.T, levels=levels, cmap="RdBu_r")
            fig.colorbar(cs, ax=ax, shrink=0.8, format="%.1e").ax.tick_params(labelsize=6)
            if np.ptp(q[np.isfinite(q)]) > 1e-12 * top:
                ax.contour(ts, ts, q.T, levels=levels, colors="k", linestyles="dashed", linewidths=0.5)
        ax.plot([0], [0], "k+", ms=8)
        ax.set_aspect("equal")
        ax.set_title(f"{pl['arch']} ({pl['act']}), depth {pl['depth']}", fontsize=8)
        ax.set_xlabel("t (first direction)", fontsize=7)
        ax.set_ylabel("s (second direction)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("L(w + t u + s v) - L(w) at each net's initial point (dashed: the quadratic model; none drawn: "
                 "it is flat)", fontsize=9)
    return _save(fig, path, caption)


PART_STYLES = (("lam_max", "H (the Hessian)", "0.15", "-"), ("ggn_lam_max", "G = J^T H_l J (Gauss-Newton)", "#1f77b4", "--"),
               ("functional_lam_max", "F = H - G (functional)", "#ff7f0e", ":"))


def fig_hessian_parts(probe_rows: list[dict], path, caption: str | None = None) -> Path:
    """Beyond the paper: ``|lambda|max`` of the Hessian and of its two parts along training, one panel per net
    (seed means, geometric, with the seeds' range)."""
    archs = _archs(probe_rows)
    fig, axes = _subplots(1, max(1, len(archs)), figsize=(5 * max(1, len(archs)), 4), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rows = [r for r in probe_rows if r["arch"] == arch]
        for key, label, color, ls in PART_STYLES:
            agg = aggregate(rows, ("arch", "epoch"), key, log=True)
            pts = np.array([(r["epoch"] + 1, r["mean"], r["min"], r["max"]) for r in agg if _finite(r["mean"])],
                           dtype=float)
            if len(pts):
                ax.plot(pts[:, 0], pts[:, 1], ls=ls, marker=".", ms=3, color=color, label=label)
                ax.fill_between(pts[:, 0], pts[:, 2], pts[:, 3], color=color, alpha=0.15, lw=0)
        zero = sorted({r["epoch"] for r in rows if _is_num(r.get("ggn_lam_max")) and r["ggn_lam_max"] == 0})
        if zero:
            ax.text(0.01, 0.01, f"G = 0 exactly at epoch {', '.join(map(str, zero[:4]))}"
                    + (" ..." if len(zero) > 4 else ""), transform=ax.transAxes, fontsize=7, va="bottom")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("epoch + 1")
        ax.set_ylabel("|λ|max")
        ax.set_title(f"{arch}: the Hessian's parts along training", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path, caption)


def fig_stability(probe_rows: list[dict], path, caption: str | None = None, hist_rows: list[dict] | None = None) -> Path:
    """Beyond the paper: the sharpness ``lambda_top`` (the Hessian's largest eigenvalue) along training against
    gradient descent's stability threshold ``2 / lr`` (Cohen et al. 2021): left ``lambda_top`` with each net's
    ``2 / lr`` dotted, right ``lr * lambda_top / 2`` against 1; one line per seed, from the history's per-epoch
    ``sharpness`` where the runs tracked it (``hist_rows``; the probes' exact values as dots), else the probes'."""
    fig, (a1, a2) = _subplots(1, 2, figsize=(11, 4))
    per_epoch = any(_finite(r.get("sharpness")) for r in hist_rows or [])
    lines = hist_rows if per_epoch else probe_rows
    key = "sharpness" if per_epoch else "lam_top"
    dropped = 0
    for arch in _archs(lines):
        seeds = sorted({r["seed"] for r in lines if r["arch"] == arch})
        lr = None
        for i, seed in enumerate(seeds):
            rs = sorted((r for r in lines if r["arch"] == arch and r["seed"] == seed), key=lambda r: r["epoch"])
            pts = [(r["epoch"] + 1, float(r[key]), sharpness_ratio(r, key)) for r in rs if _finite(r.get(key))]
            dropped += sum(1 for p in pts if p[1] <= 0)
            pts = np.array([p for p in pts if p[1] > 0], dtype=float)
            if not len(pts):
                continue
            lr = next(r["lr"] for r in rs if _finite(r.get("lr")))
            label = f"{arch} (lr {lr:g})" if i == 0 else None
            style = dict(lw=1, color=_color(arch), alpha=0.8, label=label)
            if not per_epoch:
                style.update(marker=".", ms=3)
            a1.plot(pts[:, 0], pts[:, 1], **style)
            a2.plot(pts[:, 0], pts[:, 2], **style)
            if per_epoch:  # the probes' exact values on the Lanczos lines
                dots = np.array([(r["epoch"] + 1, float(r["lam_top"]), sharpness_ratio(r)) for r in probe_rows
                                 if r["arch"] == arch and r["seed"] == seed and _finite(r.get("lam_top"))
                                 and r["lam_top"] > 0], dtype=float)
                if len(dots):
                    a1.plot(dots[:, 0], dots[:, 1], ls="none", marker="o", ms=2.5, color=_color(arch))
                    a2.plot(dots[:, 0], dots[:, 2], ls="none", marker="o", ms=2.5, color=_color(arch))
        if lr is not None and lr > 0:
            a1.axhline(2.0 / lr, color=_color(arch), ls=":", lw=1.2)
    a2.axhline(1.0, color="k", ls="--", lw=1, label="2 / lr: gradient descent's threshold")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("epoch + 1")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    a1.set_ylabel("λ_top: the largest eigenvalue of H")
    a1.set_title("sharpness along training (dotted: each net's 2 / lr" + ("; dots: the exact probes)" if per_epoch
                                                                          else ")"), fontsize=9)
    a2.set_ylabel("lr · λ_top / 2")
    a2.set_title("against the threshold (above 1: unstable on the quadratic model)", fontsize=9)
    if dropped:
        a1.text(0.01, 0.01, f"{dropped} {'epochs' if per_epoch else 'probes'} with λ_top <= 0 not drawn",
                transform=a1.transAxes, fontsize=7, va="bottom")
    if not per_epoch and not any(_finite(r.get("lam_top")) for r in probe_rows):
        a1.text(0.5, 0.5, "no λ_top in these probes (stored by an earlier version)", transform=a1.transAxes,
                ha="center", fontsize=8)
    return _save(fig, path, caption)
