"""``shortcut-ext reproduce``: the paper's figures 2-3, 5, 6-8, 9 and 10, plus the checks beyond the paper.

    shortcut-ext reproduce --out out/quick                 # QUICK (default): minutes on 2 CPU cores
    shortcut-ext reproduce --full --out out/full           # every depth up to 1002 layers, 3 seeds, 1000 epochs
    shortcut-ext reproduce --data mnist ~/mnist --out out/mnist
    shortcut-ext reproduce --only fig5 --only fig9 --out out/q   # a subset

Writes into ``--out``: ``report.html`` (self-contained), ``figures/*.png``, ``results/*.csv``,
``results/runs.jsonl`` (every finished run; a rerun with the same ``--out`` resumes and skips them),
``results/verdicts.json`` and ``results/summary.json``.  A partial run (``--only``) names its report
and JSON files after its groups (``report_fig5_fig9.html``), so it never overwrites a complete report.

QUICK takes about a minute on 2 CPU cores (3 seeds for every point except the activation variants, 2);
FULL takes hours on CPU and is resumable (rerun the same command after an interruption).  Each phase's
runs are shared by ``--workers`` forked processes of one thread each (default: one per usable CPU, at
most 8), which take them longest first as they come free; ``--distributed`` shares them across the
ranks of a torchrun launch instead.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .._device import init_distributed
from .._io import atomic_open
from ..train import TrainConfig, log_grid
from . import analysis, figures, report, sweeps
from .._cli_args import out_dir, out_lock, positive_int
from .store import DistributedRunStore, PoolRunStore, RunStore, fork_workers_possible, json_safe, usable_cpus

PHASES = ("fig2-3", "fig5", "saddle", "fig6-8", "fig9", "fig10", "ext")


@dataclass
class ReproConfig:
    """Sizes of one reproduction.  Depths are weight layers (rounded per net to a multiple of ``n``)."""

    name: str
    seeds: tuple = (0, 1, 2)
    lrs: tuple = tuple(log_grid(3.16e-3, 3.16, 2))
    epochs: int = 1000
    sweep_archs: tuple = ("2-shortcut", "1-shortcut", "3-shortcut", "plain-xavier", "plain-orthogonal")
    sweep_depths: tuple = (6, 12, 24, 48)
    relu_archs: tuple = ("2-shortcut", "plain-xavier", "plain-orthogonal")
    relu_depths: tuple = (6, 12, 24, 48)
    relu_epochs: int = 1000
    ext_acts: tuple = ("tanh-mid", "ssigmoid-mid", "relu-pre")
    ext_archs: tuple = ("2-shortcut", "plain-orthogonal")
    ext_depths: tuple = (6, 24)
    ext_seeds: tuple = (0, 1, 2)
    init_archs: tuple = ("2-shortcut-zero", "2-shortcut", "plain-xavier", "plain-orthogonal", "1-shortcut-zero",
                         "3-shortcut")
    init_depths: tuple = (4, 8, 16)
    curve_archs: tuple = ("2-shortcut", "plain-xavier", "plain-orthogonal")
    curve_depth: int = 12
    curve_epochs: int = 1000
    curve_probes: int = 16
    curve_seeds: tuple = (0, 1, 2)
    saddle_archs: tuple = ("1-shortcut-zero", "2-shortcut-zero", "3-shortcut-zero", "4-shortcut-zero", "plain-xavier",
                           "plain-orthogonal")
    saddle_acts: tuple = ("linear", "tanh-mid")
    saddle_depths: tuple = (12, 48)
    exact_max_params: int = 4000
    dtype: str = "float64"  # linear nets and every Hessian
    nonlinear_dtype: str = "float32"  # nonlinear sweeps (all samples; final losses only)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


QUICK = ReproConfig(
    name="quick", seeds=(0, 1, 2), lrs=tuple(log_grid(3.16e-3, 3.16, 2)), epochs=200,
    sweep_depths=(6, 12, 24, 48), relu_depths=(6, 12, 24, 48), relu_epochs=200,
    ext_acts=("tanh-mid", "relu-pre"), ext_depths=(6, 12), ext_seeds=(0, 1),
    init_depths=(4, 8, 16, 24), curve_depth=12, curve_epochs=200, curve_probes=14, curve_seeds=(0, 1, 2),
)
FULL = ReproConfig(
    name="full", seeds=(0, 1, 2), lrs=tuple(log_grid(1e-4, 3.16, 2)), epochs=1000,
    sweep_depths=(6, 12, 24, 48, 96, 192, 384, 768, 1002), relu_depths=(6, 12, 24, 48, 96, 192, 384),
    relu_epochs=1000, ext_acts=("tanh-mid", "ssigmoid-mid", "relu-pre", "tanh-pre"),
    ext_archs=("2-shortcut", "plain-xavier", "plain-orthogonal"), ext_depths=(6, 24, 96), ext_seeds=(0, 1, 2),
    init_depths=(4, 8, 16, 32, 64), curve_depth=24, curve_epochs=1000, curve_probes=30, curve_seeds=(0, 1, 2),
    saddle_depths=(12, 48, 192, 768), exact_max_params=7000,
)
TINY = ReproConfig(  # for tests: synthetic d = 4, seconds
    name="tiny", seeds=(0, 1), lrs=tuple(log_grid(0.01, 1.0, 2)), epochs=80,
    sweep_archs=("2-shortcut", "plain-xavier", "plain-orthogonal"), sweep_depths=(2, 4, 8),
    relu_archs=("2-shortcut", "plain-xavier", "plain-orthogonal"), relu_depths=(2, 8), relu_epochs=80,
    ext_acts=("tanh-mid",), ext_archs=("2-shortcut", "plain-orthogonal"), ext_depths=(2, 8), ext_seeds=(0,),
    init_archs=("2-shortcut-zero", "2-shortcut", "plain-xavier", "plain-orthogonal", "1-shortcut-zero"),
    init_depths=(2, 4, 8), curve_archs=("2-shortcut", "plain-xavier"), curve_depth=4, curve_epochs=80,
    curve_probes=8, curve_seeds=(0,), saddle_depths=(4, 8),
)
CONFIGS = {"quick": QUICK, "full": FULL, "tiny": TINY}

EXPECTED = {  # docs/science.md section 4
    "fig2-3": "mean Frobenius norm of the weights shrinks with depth (during and after training)",
    "fig5": "2-shortcut flat; Xavier and orthogonal grow, orthogonal slower (also 1- and 3-shortcut)",
    "saddle": "Theorem 1: the zero point of an n-shortcut net is a stationary point of order n - 1 (the loss leaves "
              "it as t^n); plain nets at their inits are not stationary",
    "fig6-8": "2-shortcut better conditioned, most of all at high loss; its index lower, dropping sharply early, "
              "with the gradient norm peaking at that moment (beyond the paper: the Hessian's top is its "
              "functional part near the 2-shortcut initial point, its Gauss-Newton part after training)",
    "fig9": "2-shortcut stays near L_min at all depths and tolerates larger rates; others degrade",
    "fig10": "Xavier / orthogonal miss the better optima; 2-shortcut reaches them",
    "ext": "beyond the paper: the Fig. 10 comparison with tanh, symmetric sigmoid and ReLU at other positions",
}


def _write_text(path: Path, text: str) -> None:
    """``path`` written whole or not at all (a temporary file of this process, then renamed)."""
    with atomic_open(path, tmp=path.with_name(f".{path.name}.{os.getpid()}.tmp")) as f:
        f.write(text)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = []
    for r in rows:
        for k in r:
            if k != "result" and k not in cols:
                cols.append(k)
    with atomic_open(path, "w", tmp=path.with_suffix(".tmp"), newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in cols})
    return path


def _options(cfg: ReproConfig, bundle: sweeps.DataBundle, backend: str | None) -> dict:
    """What makes the results in an output folder: the configuration, the data and the backend."""
    from ..ops import check_backend

    opts = {"config": cfg.to_dict(), "data": bundle.tag, "samples": int(bundle.X.shape[0]),
            "width": bundle.width, "backend": check_backend(backend)}
    return json.loads(json.dumps(json_safe(opts)))  # as it reads back from the file (tuples as lists)


_SEED_FIELDS = {"seeds", "ext_seeds", "curve_seeds"}  # what --seeds sets


def _config_hint(theirs: dict, mine: dict, fields: set) -> str:
    """Which flag a differing configuration comes from: the preset, --seeds, or else this version's preset."""
    if not fields:
        return ""
    if theirs.get("name") != mine.get("name"):
        name = f"--{theirs['name']}" if isinstance(theirs.get("name"), str) else "of an unknown preset"
        return f"; that run is {name}, this one --{mine.get('name')}"
    hint = ""
    seeds = sorted(fields & _SEED_FIELDS)
    if seeds:
        hint += ("; that run used " + ", ".join(f"{k} {theirs.get(k)}" for k in seeds) + ", this one "
                 + ", ".join(f"{k} {mine.get(k)}" for k in seeds)
                 + " (--seeds N sets seeds, ext_seeds and curve_seeds to 0..N-1; without it, the preset's)")
    if fields - _SEED_FIELDS:
        hint += ("; if you gave the same flags, the preset of this version of shortcut_ext differs from the one "
                 "that made that run (finish it with that version)")
    return hint


def _claim_out(out: Path, cfg: ReproConfig, bundle: sweeps.DataBundle, backend: str | None) -> None:
    """One output folder holds one reproduction: a rerun with other options (configuration, seeds, data,
    samples, backend) would mix its CSVs, figures and report with the earlier run's (stored runs are
    keyed by data but not by backend), so it is refused; ``--only`` subsets of the same run are fine."""
    path = out / "results" / "options.json"
    mine = _options(cfg, bundle, backend)
    if path.exists():
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # unreadable (UnicodeDecodeError is a ValueError)
            theirs = None
        if not (isinstance(theirs, dict) and set(mine) <= set(theirs) and isinstance(theirs["config"], dict)):
            theirs = None  # not options.json as this program writes it (a damaged or emptied one): replaced
        if theirs is not None and theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if "config" in diff:
                c0, c1 = theirs.get("config", {}), mine["config"]
                diff = [d for d in diff if d != "config"] + [f"config.{k}" for k in sorted(set(c0) | set(c1))
                                                              if c0.get(k) != c1.get(k)]
            hint = _config_hint(theirs.get("config", {}), mine["config"],
                                {d[len("config."):] for d in diff if d.startswith("config.")})
            old_tag = str(theirs.get("data", ""))
            if "data" in diff and old_tag.startswith("mnist(") and not old_tag.startswith("mnist(sha1="):
                hint += ("; that folder was made by an earlier version of shortcut_ext, whose MNIST runs were not "
                         "keyed by the files' values (finish it with that version)")
            raise ValueError(f"--out {out} holds a reproduction made with other options (differing: "
                             f"{', '.join(diff)}{hint}); use another --out folder, or delete {out} to start over")
        if theirs is not None:
            return
    stored = [f for f in sorted(path.parent.glob("runs*.jsonl")) if f.is_file() and f.stat().st_size > 0]
    if stored:  # runs whose options nothing records: this run could mix its results with another's
        said = "is damaged" if path.exists() else "is missing"
        raise ValueError(f"--out {out} holds stored runs ({stored[0].name}) but its {path.relative_to(out)} {said}, so "
                         "the options they were made with (configuration, seeds, data, backend) are unknown and a "
                         "rerun could mix them with this one's; use another --out folder, or delete "
                         f"{out} to start over")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, tmp=path.with_suffix(".tmp")) as f:
        f.write(json.dumps(mine, indent=1))


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "result"} for r in rows]


def run(cfg: ReproConfig, bundle: sweeps.DataBundle, out, only=None, backend: str | None = None,
        progress: bool = True, log=print, store=None, workers: int = 1) -> dict:
    """Run the phases ``only`` (default all) of ``cfg`` on ``bundle``; write results, figures, report.

    ``store``: where runs are kept (default ``out/results/runs.jsonl``); a
    :class:`~shortcut_ext.experiments.store.DistributedRunStore` splits the runs across ranks.
    ``workers``: with the default store, the number of processes of this machine that share each
    phase's runs (:class:`~shortcut_ext.experiments.store.PoolRunStore`: Linux, one torch thread).

    Returns:
        ``{"verdicts": [...], "timings": {...}, "report": path, ...}``.
    """
    out = Path(out)
    only = set(only or PHASES)
    bad = only - set(PHASES)
    if bad:
        raise ValueError(f"only must name phases from {PHASES}, got {sorted(bad)}")
    dtypes = {"float64": torch.float64, "float32": torch.float32}
    dtype, nl_dtype = dtypes[cfg.dtype], dtypes[cfg.nonlinear_dtype]
    if store is not None and workers != 1:
        raise ValueError(f"workers={workers!r} needs the default store (a given store decides who runs what)")
    if store is None and workers != 1:
        PoolRunStore.check_workers(workers)  # before anything is written
    _claim_out(out, cfg, bundle, backend)
    if store is None:
        store = RunStore(out / "results" / "runs.jsonl")
        store.absorb_shards()  # runs an interrupted distributed run (or worker pool) left in its shards
        if workers > 1:
            store = PoolRunStore(store, workers)
    figdir, resdir = out / "figures", out / "results"
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    log(f"[reproduce] {cfg.name} on {bundle.tag}: L_min = {bundle.l_min:.6g}, {len(store)} runs already in "
        f"{store.path}" + (f" ({store.skipped_lines} partial lines skipped)" if store.skipped_lines else ""))
    if bundle.out_features > bundle.width and only & {"fig9", "fig2-3", "fig6-8"}:
        log(f"[reproduce] note: width {bundle.width} < {bundle.out_features} targets: a linear net's frozen read-out "
            f"(rank {bundle.width}, seeded per run) keeps its loss above L_min (shortcut_ext.data.best_linear_loss with "
            "readout= gives its floor): the linear verdicts measured against L_min are not meaningful at this width")
    sections: list[report.Section] = []
    train_cfg = TrainConfig(epochs=cfg.epochs, optimizer="gd", exact_max_params=cfg.exact_max_params)
    square = bundle.out_features == bundle.width

    def caption(depths, seeds, epochs=None, dt=dtype, extra: str = "") -> str:
        """What a figure shows was computed from, under the figure (the PNGs travel without the report)."""
        return (f"{cfg.name} reproduction, data {bundle.tag}, {bundle.X.shape[0]} samples; depths "
                f"{', '.join(map(str, depths))}; seeds {', '.join(map(str, seeds))}"
                + (f"; {epochs} epochs of full-batch gradient descent" if epochs else "")
                + f"; {str(dt).replace('torch.', '')}" + (f"; {extra}" if extra else ""))

    # ---- Fig. 9 (and the runs behind Figs. 2-3): linear nets, learning-rate sweep per depth
    best_lin, runs_lin = [], []
    if only & {"fig9", "fig2-3"}:
        t = time.perf_counter()
        runs_lin, best_lin = sweeps.run_lr_sweeps(bundle, cfg.sweep_archs, ["linear"], cfg.sweep_depths, cfg.seeds,
                                                  cfg.lrs, train_cfg, store, dtype, backend,
                                                  desc="Fig. 9 linear sweep", progress=progress)
        timings["fig9 linear sweep"] = time.perf_counter() - t
        _write_csv(resdir / "fig9_runs.csv", runs_lin)
        _write_csv(resdir / "fig9_best.csv", best_lin)
    if "fig2-3" in only and best_lin:
        p = figures.fig_weight_norm(best_lin, figdir / "fig2_3_weight_norm.png",
                                    caption=caption(cfg.sweep_depths, cfg.seeds, cfg.epochs, extra="best rate per net"))
        sections.append(report.Section("fig2-3", "Figs. 2-3: mean Frobenius norm of the weights vs depth",
                                       EXPECTED["fig2-3"], [p],
                                       analysis.verdict_weight_norm(best_lin, "linear", bundle.l_min, bundle.l_zero)))
    if "fig9" in only and best_lin:
        p = figures.fig_final_loss(best_lin, figdir / "fig9_final_loss_linear.png", bundle.l_min, bundle.l_zero,
                                   "linear", "Fig. 9", caption=caption(cfg.sweep_depths, cfg.seeds, cfg.epochs,
                                                                       extra="best rate per net and seed"))
        sections.append(report.Section(
            "fig9", "Fig. 9: final loss at the best learning rate vs depth, linear nets", EXPECTED["fig9"], [p],
            analysis.verdict_final_loss_linear(best_lin, bundle.l_min, bundle.l_zero),
            {"best rate per net (seed rows)": _strip(best_lin)},
            notes="Linear nets train on the second-moment compression of the data (same loss function of the "
                  "weights, so the same gradient-descent trajectory)."))

    # ---- Fig. 5: Hessian at initialisation vs depth
    if "fig5" in only:
        t = time.perf_counter()
        init_rows = sweeps.run_init_probes(bundle, cfg.init_archs, cfg.init_depths, cfg.seeds, store,
                                           cfg.exact_max_params, dtype, progress=progress, backend=backend)
        timings["fig5 Hessians at init"] = time.perf_counter() - t
        theory = bundle.theory_cond_2shortcut() if square else None
        _write_csv(resdir / "fig5_init_condition.csv", init_rows)
        p = figures.fig_init_condition(init_rows, figdir / "fig5_condition_at_init.png", theory,
                                       # the depths run: an n-shortcut net rounds a depth to whole units
                                       caption=caption(sorted({int(r["depth"]) for r in init_rows}) or cfg.init_depths,
                                                       cfg.seeds, extra="exact Hessians at init; zero inits do not "
                                                       "depend on the seed: one each"))
        sections.append(report.Section(
            "fig5", "Fig. 5: condition number of the Hessian at initialisation vs depth", EXPECTED["fig5"], [p],
            analysis.verdict_init_condition(init_rows, theory), {"Hessian probes at init": init_rows},
            notes="2-shortcut-zero: all weights 0; 2-shortcut / 3-shortcut / 1-shortcut: Xavier x 0.01 "
                  "(the paper's small perturbation); 1-shortcut-zero: V = I + W at W = 0. Exact dense Hessians."))

    # ---- beyond the figures, Theorem 1's order: how the loss leaves the initial point
    if "saddle" in only and cfg.saddle_archs:
        t = time.perf_counter()
        sad_rows, sad_curves = sweeps.run_stationary_orders(bundle, cfg.saddle_archs, cfg.saddle_acts,
                                                            cfg.saddle_depths, cfg.seeds, dtype, backend,
                                                            progress=progress, store=store)
        timings["saddle orders at init"] = time.perf_counter() - t
        _write_csv(resdir / "saddle_orders.csv", sad_rows)
        _write_csv(resdir / "saddle_curves.csv", sad_curves)
        p = figures.fig_stationary_order(sad_rows, sad_curves, figdir / "saddle_order.png",
                                         caption=caption(sorted({r["depth"] for r in sad_rows}) or cfg.saddle_depths,
                                                         cfg.seeds, extra="random unit directions, one per seed; "
                                                         "float64 losses at 19 steps from 1e-6 to 1"))
        # the picture of the same: the loss on a plane through each zero point, beside its quadratic model
        zero_archs = [a for a in cfg.saddle_archs if sweeps.check_arch(a).init == "zero" and not sweeps.check_arch(a).plain]
        t = time.perf_counter()
        planes = sweeps.run_zero_point_planes(bundle, zero_archs, "linear", min(cfg.saddle_depths), cfg.seeds[0],
                                              dtype, backend, store=store, progress=progress)
        timings["saddle planes at init"] = time.perf_counter() - t
        _write_csv(resdir / "saddle_planes.csv", [
            {"arch": pl["arch"], "act": pl["act"], "depth": pl["depth"], "t": t_, "s": s_, "loss": pl["loss"][i][j],
             "quadratic": pl["quadratic"][i][j]}
            for pl in planes for i, t_ in enumerate(pl["ts"]) for j, s_ in enumerate(pl["ts"])])
        figs = [p]
        if planes:
            figs.append(figures.fig_zero_point_planes(
                planes, figdir / "saddle_planes.png",
                caption=caption(sorted({pl["depth"] for pl in planes}), cfg.seeds[:1],
                                extra=f"linear nets at W = 0; two random unit directions, steps -1..1, "
                                      f"{sweeps.PLANE_POINTS} x {sweeps.PLANE_POINTS}")))
        sections.append(report.Section(
            "saddle", "Theorem 1: the order of the stationary point at initialisation", EXPECTED["saddle"], figs,
            analysis.verdict_stationary_order(sad_rows), {"orders at init": sad_rows},
            notes="The loss at w + t v for random unit directions v (one per seed), t from 1e-6 to 1; the order p "
                  "is the slope of log|L(w + t v) - L(w)| vs log t over the smallest steps whose change is clear of "
                  "rounding (shortcut_ext.curvature.stationary_order). At an n-shortcut net's zero point gradient and "
                  "Hessian vanish for n >= 3, and the spectral tools see a flat Hessian; the order tells the saddles "
                  "apart."))

    # ---- Figs. 6-8: Hessian along training at each net's best rate
    if "fig6-8" in only:
        t = time.perf_counter()
        # the best rates come from the same sweep as Fig. 9 (shared run keys: no duplicate work)
        runs_c, best_c = sweeps.run_lr_sweeps(bundle, cfg.curve_archs, ["linear"], [cfg.curve_depth], cfg.curve_seeds,
                                         cfg.lrs, dataclasses.replace(train_cfg, epochs=cfg.curve_epochs), store,
                                         dtype, backend, desc="Figs. 6-8 rates", progress=progress)
        lrs = {}
        for arch, depth in dict.fromkeys((r["arch"], r["depth"]) for r in best_c):  # in order (a set's varied by run)
            lr = sweeps.best_lr_by_arch(runs_c, "linear", depth).get(arch)
            if lr is not None:
                lrs[arch] = lr
        ccfg = TrainConfig(epochs=cfg.curve_epochs, exact_max_params=cfg.exact_max_params,
                           probe_epochs=sweeps.log_probe_epochs(cfg.curve_epochs, cfg.curve_probes),
                           probe_parts=("ggn",),  # beyond the paper: the Hessian's Gauss-Newton part
                           sharpness_every=1)  # and its largest eigenvalue at every epoch (the edge of stability)
        probe_rows, hist_rows = sweeps.run_probe_curves(bundle, cfg.curve_archs, "linear", cfg.curve_depth,
                                                        cfg.curve_seeds, lrs, ccfg, store, dtype, backend,
                                                        progress=progress)
        timings["fig6-8 Hessians along training"] = time.perf_counter() - t
        _write_csv(resdir / "fig6_8_probes.csv", probe_rows)
        _write_csv(resdir / "fig6_8_history.csv", hist_rows)
        cap = caption([cfg.curve_depth], cfg.curve_seeds, cfg.curve_epochs, extra="one rate per net: " + ", ".join(
            f"{a} {v:g}" for a, v in sorted(lrs.items())))
        p1 = figures.fig_curvature_vs_loss(probe_rows, figdir / "fig6_7_curvature_vs_loss.png", bundle.l_min,
                                           caption=cap)
        p2 = figures.fig_index_gradnorm(probe_rows, hist_rows, figdir / "fig8_index_gradnorm.png", caption=cap)
        p3 = figures.fig_hessian_parts(probe_rows, figdir / "fig6_8_hessian_parts.png", caption=cap)
        p4 = figures.fig_stability(probe_rows, figdir / "fig6_8_stability.png", caption=cap, hist_rows=hist_rows)
        verdicts = (analysis.verdict_curvature_training(probe_rows) + analysis.verdict_index(probe_rows, hist_rows)
                    + analysis.verdict_hessian_parts(probe_rows) + analysis.verdict_stability(probe_rows, hist_rows))
        # a net with no rate at which every seed stayed finite has no probe run: say so beside each verdict
        no_rate = [a for a in cfg.curve_archs if a not in lrs]
        if no_rate:
            why = (f" [left out, with no rate to probe: {', '.join(no_rate)} (at every rate of the grid, at least "
                   "one seed diverged)]")
            verdicts = [dataclasses.replace(v, measured=v.measured + why) for v in verdicts]
        sections.append(report.Section(
            "fig6-8", f"Figs. 6-8: Hessian along training (depth {cfg.curve_depth}, linear, best rate per net)",
            EXPECTED["fig6-8"], [p1, p2, p3, p4],
            verdicts,
            {"learning rates": [{"arch": a, "lr": v} for a, v in lrs.items()]},
            notes="Exact Hessians at log-spaced epochs; runs compared at equal loss - L_min (as in the paper's "
                  "figures), with the same-epoch ratio beside it. Beyond the paper, each probe also takes the "
                  "Gauss-Newton part of the Hessian, G = J^T H_l J (positive semi-definite), whose rest is the "
                  "functional part F = H - G (HessianOperator(matrix=...), train --probe-parts; docs/science.md "
                  "section 2); at a 2-shortcut net's zero point G = 0. Also beyond the paper, the sharpness "
                  "lambda_top (the Hessian's largest eigenvalue, with its sign; by Lanczos at every epoch, exact at "
                  "the probes) is set against gradient descent's stability threshold 2 / lr (Cohen et al. 2021): "
                  "lr * lambda_top / 2 above 1 makes gradient descent diverge on the loss's quadratic model there; "
                  "measured, not tested."))

    # ---- Fig. 10: ReLU at mid positions
    best_relu = []
    if "fig10" in only:
        t = time.perf_counter()
        runs_relu, best_relu = sweeps.run_lr_sweeps(bundle, cfg.relu_archs, ["relu-mid"], cfg.relu_depths, cfg.seeds,
                                                     cfg.lrs, dataclasses.replace(train_cfg, epochs=cfg.relu_epochs),
                                                     store, nl_dtype, backend, desc="Fig. 10 ReLU sweep",
                                                     progress=progress)
        timings["fig10 ReLU sweep"] = time.perf_counter() - t
        _write_csv(resdir / "fig10_runs.csv", runs_relu)
        _write_csv(resdir / "fig10_best.csv", best_relu)
        p = figures.fig_final_loss(best_relu, figdir / "fig10_final_loss_relu.png", bundle.l_min, bundle.l_zero,
                                   "relu-mid", "Fig. 10", caption=caption(cfg.relu_depths, cfg.seeds, cfg.relu_epochs,
                                                                          nl_dtype, "best rate per net and seed"))
        sections.append(report.Section(
            "fig10", "Fig. 10: final loss at the best rate vs depth, ReLU at mid positions", EXPECTED["fig10"], [p],
            analysis.verdict_final_loss_nonlinear(best_relu, bundle.l_min, "relu-mid", "Fig. 10"),
            {"best rate per net (seed rows)": _strip(best_relu)}))

    # ---- beyond the paper: other activations and positions
    if "ext" in only and cfg.ext_acts:
        t = time.perf_counter()
        runs_ext, best_ext = sweeps.run_lr_sweeps(bundle, cfg.ext_archs, cfg.ext_acts, cfg.ext_depths, cfg.ext_seeds,
                                                  cfg.lrs, dataclasses.replace(train_cfg, epochs=cfg.relu_epochs),
                                                  store, nl_dtype, backend, desc="activations sweep", progress=progress)
        timings["ext activations sweep"] = time.perf_counter() - t
        _write_csv(resdir / "ext_runs.csv", runs_ext)
        _write_csv(resdir / "ext_best.csv", best_ext)
        p = figures.fig_activations(best_ext, figdir / "ext_activations.png", bundle.l_min, list(cfg.ext_acts),
                                    caption=caption(cfg.ext_depths, cfg.ext_seeds, cfg.relu_epochs, nl_dtype,
                                                    "best rate per net and seed"))
        vs = []
        for act in cfg.ext_acts:
            vs += analysis.verdict_final_loss_nonlinear(best_ext, bundle.l_min, act, f"beyond ({act})")
        sections.append(report.Section(
            "ext", "Beyond the paper: " + ", ".join(cfg.ext_acts), EXPECTED["ext"], [p], vs,
            {"best rate per net (seed rows)": _strip(best_ext)},
            notes="A plain net has one activation, between layers: for a '-pre' variant it is the same plain net "
                  "as for '-mid'. A '-pre' shortcut net applies the activation to the unit's input inside the "
                  "branch only (h + W2 W1 s(h)); the shortcut stays linear."))

    timings["total"] = time.perf_counter() - t_all
    sections.sort(key=lambda s: PHASES.index(s.key))
    verdicts = [v for s in sections for v in s.verdicts]
    # a partial run (--only) must not overwrite the report of a complete one
    suffix = "" if only == set(PHASES) else "_" + "_".join(p for p in PHASES if p in only)
    env = report.environment()
    env["backend_requested"] = backend or "default (fused where built)"
    env["processes"] = getattr(store, "world_size", 1)  # that shared the runs (--workers, or the ranks)
    conf = {"config": cfg.to_dict(), "data": bundle.tag, "L_min": bundle.l_min, "L_zero": bundle.l_zero,
            "phases": sorted(only), "samples": int(bundle.X.shape[0]), "width": bundle.width}
    resdir.mkdir(parents=True, exist_ok=True)
    _write_text(resdir / f"verdicts{suffix}.json", json.dumps(json_safe(analysis.verdict_table(verdicts)), indent=1))
    summary = {"config": conf, "environment": env, "timings": timings,
               "verdicts": analysis.verdict_table(verdicts)}
    _write_text(resdir / f"summary{suffix}.json", json.dumps(json_safe(summary), indent=1, default=str))
    rep = report.write_report(
        out / f"report{suffix}.html", f"Demystifying ResNet (Li et al., arXiv:1611.01186): {cfg.name} reproduction",
        sections, conf, env, timings,
        intro=(f"Data: {bundle.tag} ({bundle.X.shape[0]} samples, inputs in R^{bundle.width}, targets in "
               f"R^{bundle.out_features}); L_min = {bundle.l_min:.6g}. Full-batch gradient descent, the best "
               f"rate of a log grid per net (per seed in Figs. 9-10; one rate per net, the seed-mean best, in Figs. 6-8); "
               f"lines: seed means (geometric on log axes), bands: mean -/+ one standard deviation over seeds "
               f"(geometric on log axes; min to max for final losses and the index). Triangles on an edge: "
               f"values a log axis cannot show (an infinite condition number, a seed whose every rate diverged)."))
    for v in verdicts:
        mark = "measured" if v.measured_only else {True: "holds", False: "DOES NOT HOLD", None: "n/a"}[v.holds]
        m = v.measured if len(v.measured) <= 300 else v.measured[:297] + "..."  # in full in the report and JSON
        log(f"[reproduce] {v.figure}: {v.claim}: {mark} ({m})")
    log(f"[reproduce] total {timings['total']:.1f} s; report: {rep}")
    return {"verdicts": verdicts, "timings": timings, "report": rep, "sections": sections, "store": store}


# --------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    p = subparsers.add_parser("reproduce", help="reproduce the paper's figures (HTML report, PNG, CSV/JSON)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="small depths and epochs, minutes on 2 CPU cores (default)")
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="the paper's scale and beyond: 1000 epochs, depths up to 1002 layers (hours on CPU)")
    size.add_argument("--tiny", dest="size", action="store_const", const="tiny", help=argparse.SUPPRESS)
    p.set_defaults(size="quick")
    p.add_argument("--data", nargs="+", default=["digits"], metavar="KIND",
                   help="digits (bundled, default) | synthetic | mnist PATH (folder of IDX files or .npz)")
    p.add_argument("--samples", type=positive_int, default=None, help="use a seeded subset of this many samples")
    p.add_argument("--out", required=True, help="output folder (a rerun with the same folder and options resumes; "
                   "other options need another folder)")
    p.add_argument("--only", action="append", choices=PHASES, help="run only these figure groups (repeatable)")
    p.add_argument("--backend", choices=("fused", "torch"), default=None,
                   help="stack backend (default: fused where built, else torch)")
    p.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (overrides the config)")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch intra-op threads (default 1: the sweeps run many tiny nets, for which threads "
                        "cost more than they give, most of all on shared cores)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="processes that share each phase's runs, each with one thread (default: one per CPU this "
                        f"process may use, at most {MAX_AUTO_WORKERS}, with --threads 1 on Linux; else 1); the runs "
                        "are the same bit for bit whatever the count")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--distributed", action="store_true",
                   help="split the runs across the ranks of a torchrun launch (gloo; e.g. torchrun --standalone "
                        "--nproc_per_node=2 -m shortcut_ext reproduce --distributed ...); rank 0 writes the report")
    p.set_defaults(func=main)


def _parse_data(values: list[str], command: str = "reproduce") -> tuple[str, str | None]:
    """``--data KIND [PATH]`` -> ``(kind, path)``; a bad value stops ``shortcut-ext <command>`` with one line."""
    cmd = f"shortcut-ext {command}"
    kind = values[0]
    if kind == "mnist":
        if len(values) != 2:
            raise SystemExit(f"{cmd}: --data mnist needs a PATH: --data mnist ~/mnist")
        if not Path(values[1]).expanduser().exists():
            raise SystemExit(f"{cmd}: --data mnist PATH: {values[1]} does not exist (a folder of IDX files or an .npz)")
        return kind, values[1]
    if kind not in ("digits", "synthetic") or len(values) != 1:
        raise SystemExit(f"{cmd}: --data must be 'digits', 'synthetic' or 'mnist PATH', got {' '.join(values)!r}")
    return kind, None


MAX_AUTO_WORKERS = 8  # --workers by default: a quick run's phases have 9 to 60 runs each


def _workers(args) -> int:
    """``--workers``, checked against the other options; unset: one per usable CPU where a pool can run."""
    given = getattr(args, "workers", None)
    if given is not None and given < 1:
        raise SystemExit(f"shortcut-ext reproduce: --workers must be >= 1, got {given}")
    if getattr(args, "distributed", False):
        if given not in (None, 1):
            raise SystemExit(f"shortcut-ext reproduce: --workers {given} does not combine with --distributed (there "
                             "the ranks share the runs: launch more of them)")
        return 1
    if args.threads != 1:
        if given not in (None, 1):
            raise SystemExit(f"shortcut-ext reproduce: --workers {given} needs --threads 1 (each worker computes "
                             f"with one thread), got --threads {args.threads}")
        return 1
    why = fork_workers_possible()
    if given is None:
        return 1 if why else min(usable_cpus(), MAX_AUTO_WORKERS)
    if given > 1 and why:
        raise SystemExit(f"shortcut-ext reproduce: --workers {given}: {why}; use --workers 1")
    return given


def main(args) -> int:
    cfg = CONFIGS[args.size]
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
        s = tuple(range(args.seeds))
        cfg = dataclasses.replace(cfg, seeds=s, ext_seeds=s, curve_seeds=s)
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    workers = _workers(args)
    kind, path = _parse_data(args.data)
    out_dir(args.out, "reproduce")
    d = 4 if args.size == "tiny" else 10
    samples = args.samples if args.samples is not None else (96 if args.size == "tiny" else None)
    cap = None
    if kind == "mnist" and args.samples is None and args.size != "full":
        cap = 10000  # the nonlinear sweeps cost time in proportion to the samples (linear nets do not)
        print(f"[reproduce] --{args.size} on MNIST uses at most {cap} training images, a seeded subset "
              "(--samples N to change; --full uses all)")
    bundle = sweeps.load_data(kind, path, d=d, samples=samples if kind != "mnist" or args.size != "tiny" else None,
                              dtype=torch.float64, max_samples=cap)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    created, rank = False, 0
    locks = contextlib.ExitStack()
    try:
        lock = Path(args.out) / ".shortcut-ext.lock"  # one run per --out (others would redo and overwrite)
        if getattr(args, "distributed", False):
            created, rank, world, dev = init_distributed("reproduce")
            locks.enter_context(out_lock(lock, "reproduce", lead=rank == 0, distributed=True, device=dev))
            # rank 0 checks the folder's options before any rank computes (the others work in a scratch
            # folder and would otherwise add runs of the refused options to the store first)
            refused = None
            if rank == 0:
                try:
                    _claim_out(Path(args.out), cfg, bundle, args.backend)
                except ValueError as e:
                    refused = e
            import torch.distributed as dist

            flag = torch.tensor([float(refused is not None)], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if refused is not None:
                raise refused
            if flag.item() > 0:
                raise SystemExit(f"rank 0 refused --out {args.out} (it holds a reproduction made with other "
                                 "options); this rank stops too")
            store = DistributedRunStore(RunStore(Path(args.out) / "results" / "runs.jsonl"))
            if rank == 0:
                print(f"[reproduce] {world} ranks share the runs")
                res = run(cfg, bundle, args.out, only=args.only, backend=args.backend, progress=not args.no_progress,
                          store=store)
                store.close()  # rank 0's runs.jsonl holds every run; the ranks' shards go
            else:  # the same phases (their collectives must match), outputs to a scratch folder
                with tempfile.TemporaryDirectory() as scratch:
                    run(cfg, bundle, scratch, only=args.only, backend=args.backend, progress=False,
                        log=lambda *a, **k: None, store=store)
                store.close()
                return 0
        else:
            with out_lock(lock, "reproduce"):
                if workers > 1:
                    print(f"[reproduce] {workers} processes share the runs (--workers)")
                res = run(cfg, bundle, args.out, only=args.only, backend=args.backend, progress=not args.no_progress,
                          workers=workers)
    finally:
        locks.close()
        torch.set_num_threads(threads)
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()
    n_ok, n_bad = (sum(v.holds is h for v in res["verdicts"]) for h in (True, False))
    print(f"{n_ok} of {len(res['verdicts'])} checks hold, {n_bad} do not, {len(res['verdicts']) - n_ok - n_bad} are "
          f"undecided or informational. Report: {res['report']}")
    return 0


__all__ = ["CONFIGS", "FULL", "PHASES", "QUICK", "TINY", "ReproConfig", "add_parser", "main", "run"]
