"""``shortcut-ext landscape``: the loss of one network on a line or a plane through its weights (at init, or
trained: ``--weights``).

Random directions (seeded; unit norm, or scaled like the weights per layer or per filter: Li et al. 2018)
and the loss at ``w + t u`` (a line) or ``w + t u + s v`` (a plane) on a grid of steps, beside the exact
quadratic model ``L + t g.u + t^2/2 u^T H u`` from the gradient and Hessian-vector products.  With
``--order``, also the order of the stationary point along each direction (Theorem 1: ``n`` at an
n-shortcut net's zero point, where the gradient and, for ``n >= 3``, the Hessian vanish and the quadratic
model is flat).  The net is built from the network and data flags (as ``spectrum`` builds it), or, with
``--weights``, is a net trained by ``shortcut-ext train --save-weights``, with its data.  Writes ``landscape.json``, ``landscape.csv`` and ``landscape.png`` to ``--out``.

The grid's losses are saved as they finish (``landscape.checkpoint.jsonl``, one line per row of the grid):
an interrupted run resumes with the same command and ends with the same numbers; a checkpoint of other
options is replaced.

Example (a 3-shortcut net's zero point: flat to second order, a cubic saddle)::

    shortcut-ext landscape --shortcut 3 --units 100 --width 8 --init zero --plane --order --out runs/land3

Around a trained net::

    shortcut-ext train --arch 2-shortcut --act tanh-mid --depth 20 --epochs 500 --save-weights --out runs/t.json
    shortcut-ext landscape --weights runs/t.weights.pt --plane --normalize filter --out runs/land_t
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import time

import numpy as np
import torch

from .. import __version__
from .._cli_args import out_dir, out_lock, positive_float, positive_int
from .._cli_args import seed as seed_type
from .._device import parse_device
from .._io import atomic_open, save_figure
from .spectrum_cmd import (_check_options, _environment, _progress, add_problem_args, build_problem,
                           to_strict_json, trained_problem)

CHECKPOINT = "landscape.checkpoint.jsonl"
# what a checkpoint's numbers depend on besides the flags: the way they are computed (bump on a change)
_FORMAT = 1


def points_type(text: str) -> int:
    """An integer >= 2: grid points along each direction."""
    v = positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2 (a grid needs two ends), got {text}")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .hessian import BACKENDS
    from .landscape import NORMALIZE

    p = subparsers.add_parser(
        "landscape", help="the loss on a line or plane of weights through a network's initial point, beside its "
                          "quadratic model; resumable",
        description=__doc__.split("\n\n")[0] + " Writes JSON, CSV and a PNG figure.",
    )
    add_problem_args(p, "forwards and HVPs")
    g = p.add_argument_group("slice")
    g.add_argument("--plane", action="store_true", help="two directions, a plane (default: one, a line)")
    g.add_argument("--span", type=positive_float, default=1.0,
                   help="steps from -span to +span along each direction (> 0), in units of the direction")
    g.add_argument("--points", type=points_type, default=None,
                   help="grid points along each direction, >= 2 (default: 41 on a line, 21 on a plane; an odd "
                        "number puts the weights themselves on the grid)")
    g.add_argument("--normalize", choices=NORMALIZE, default="unit",
                   help="unit: each direction has norm 1 (the only choice at the zero point); layer / filter: "
                        "scaled like the weights per d x d layer / per row (Li et al. 2018)")
    g.add_argument("--direction-seed", type=seed_type, default=0, help="seed of the random directions")
    g.add_argument("--order", action="store_true",
                   help="also the order p of the stationary point along each direction (L(w + t v) - L(w) ~ c t^p "
                        "for small t: 19 more losses a direction; use float64)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_type, default=0, help="seed of the net's init and of the data")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    g.add_argument("--backend", choices=BACKENDS, default="fused", help="forward and HVP backend")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the network, data and losses live")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _grid(args) -> tuple[np.ndarray, np.ndarray | None]:
    n = args.points if args.points is not None else (21 if args.plane else 41)
    ts = np.linspace(-args.span, args.span, n)
    return ts, (ts.copy() if args.plane else None)


def _fingerprint(args) -> str:
    """The options the numbers depend on (not where they are written or shown), with the computation's format."""
    # (a trained net's weights by their digest, weights_sha1, not by their file's path)
    keep = {k: v for k, v in vars(args).items()
            if k not in ("func", "out", "no_plots", "no_progress", "command", "weights")}
    keep["format"] = _FORMAT
    keep["version"] = __version__
    keep["threads"] = torch.get_num_threads()  # the reductions' order: a resumed grid matches bit for bit
    text = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run(args) -> int:
    _check_options(args, "landscape")
    if args.weights is None and args.normalize != "unit" and args.init == "zero":
        raise SystemExit(f"shortcut-ext landscape: --normalize {args.normalize} scales the directions like the "
                         "weights, which are all 0 with --init zero: use --normalize unit (the default)")
    args.device = parse_device(args.device, "landscape")
    out_dir(args.out, "landscape")
    with out_lock(os.path.join(args.out, ".shortcut-ext.lock"), "landscape", device=args.device):
        return _run(args)


def _run(args) -> int:
    from ..experiments.store import RunStore, json_float
    from .hessian import HessianOperator
    from .landscape import _loss, _taylor, random_directions, stationary_order

    t_start = time.perf_counter()
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    what = None
    if args.weights is None:
        net, X, Y = build_problem(args, dtype)
    else:  # the checkpoint's fingerprint takes the weights' digest (args.weights_sha1)
        net, X, Y, what = trained_problem(args, "landscape", dtype)
        net, X, Y = net.to(args.device), X.to(args.device), Y.to(args.device)
    if args.batch_size is None:
        data = [(X, Y)]
    else:
        data = [(X[i:i + args.batch_size], Y[i:i + args.batch_size]) for i in range(0, X.shape[0], args.batch_size)]
    H = HessianOperator(net, data, loss=args.loss, backend=args.backend, dtype=dtype)
    V = random_directions(H, 2 if args.plane else 1, seed=args.direction_seed, normalize=args.normalize)
    ts, ss = _grid(args)
    rows = [np.array([[t, s] for s in ss]) for t in ts] if args.plane else [np.array([[t]]) for t in ts]

    # the checkpoint: one record per finished row of the grid, under this run's fingerprint
    fp = _fingerprint(args)
    path = os.path.join(args.out, CHECKPOINT)
    store = RunStore(path)
    if len(store) and not all(k.startswith(fp + "|") for k in store.keys()):
        print(f"shortcut-ext landscape: the checkpoint {path} is of other options (or another version of "
              "shortcut_ext, or another thread count); starting afresh and replacing it", flush=True)
        os.remove(path)
        store = RunStore(path)

    def stored(i):
        rec = store.get(f"{fp}|row={i}")
        ok = (isinstance(rec, dict) and isinstance(rec.get("loss"), list) and len(rec["loss"]) == len(rows[i])
              and all(v is None or v in ("inf", "-inf") or (isinstance(v, (int, float)) and not isinstance(v, bool))
                      for v in rec["loss"]))
        return [json_float(v) for v in rec["loss"]] if ok else None

    center = _loss(H, H._W)
    losses = [stored(i) for i in range(len(rows))]
    done = sum(x is not None for x in losses)
    if done:
        print(f"shortcut-ext landscape: resuming from the checkpoint {path}: {done} of {len(rows)} rows of the grid "
              "done", flush=True)
    bar, cb = _progress("landscape", args.no_progress)
    t0 = time.perf_counter()
    try:
        total = sum(len(r) for r in rows)
        finished = sum(len(r) for r, x in zip(rows, losses) if x is not None)
        for i, r in enumerate(rows):
            if losses[i] is not None:
                continue
            vals = _row_losses(H, V, r, center)
            store.put(f"{fp}|row={i}", {"loss": vals})
            losses[i] = [json_float(v) for v in store.get(f"{fp}|row={i}")["loss"]]
            finished += len(r)
            cb(finished, total)
    finally:
        bar.close()
    grid_s = time.perf_counter() - t0
    loss = np.array(losses, dtype=np.float64)
    loss = loss.reshape(len(ts), len(ss)) if args.plane else loss[:, 0]
    slopes, curv = _taylor(H, V)
    res = _model(ts, ss, center, slopes, curv)
    fin = np.isfinite(loss)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "func"}, "net": what,
        "num_params": H.P, "backend_used": H.backend_used, "fallback_reason": H.fallback_reason,
        "environment": _environment(),
        "center": center, "grad_norm": float(H.loss_and_grad()[1].norm()),
        "ts": ts.tolist(), "ss": None if ss is None else ss.tolist(), "loss": loss.tolist(),
        "quadratic": res.tolist(), "slopes": slopes.tolist(), "curvature": curv.tolist(),
        "direction_norms": V.double().norm(dim=0).cpu().tolist(),
        # over the points where the loss is finite (a long step on a deep net overflows)
        "max_abs_model_error": float(np.max(np.abs(loss - res)[fin])) if fin.any() else math.nan,
        "nonfinite_points": int((~fin).sum()),
        "resumed_rows": done, "timings_s": {"grid": grid_s},
    }
    if args.order:
        t1 = time.perf_counter()
        result["orders"] = [stationary_order(H, V[:, j]).to_dict() for j in range(V.shape[1])]
        result["timings_s"]["order"] = time.perf_counter() - t1
    result["timings_s"]["total_this_process"] = time.perf_counter() - t_start
    with atomic_open(os.path.join(args.out, "landscape.json")) as f:
        f.write(to_strict_json(result, indent=1))
    _write_csv(os.path.join(args.out, "landscape.csv"), ts, ss, loss, res)
    if not args.no_plots:
        _plot(os.path.join(args.out, "landscape.png"), args, ts, ss, loss, res, center, what)
    msg = (f"shortcut-ext landscape: P = {H.P}, L(w) = {center:.6g}, |grad| = {result['grad_norm']:.3g}, "
           f"u^T H u = {curv[0, 0]:.4g}; the loss on the grid spans [{np.nanmin(loss):.6g}, {np.nanmax(loss):.6g}], "
           f"the quadratic model is off by at most {result['max_abs_model_error']:.3g}"
           + (" where it is finite" if result["nonfinite_points"] else ""))
    if result["nonfinite_points"]:
        msg += (f"; the loss is not finite at {result['nonfinite_points']} of {loss.size} points (it overflows "
                "there: a smaller --span stays in range)")
    if args.order:
        msg += "; order along each direction: " + ", ".join(f"{o['order']:.3g}" for o in result["orders"])
    print(msg + f"; written to {args.out}", flush=True)
    return 0


def _row_losses(H, V, r, center) -> list[float]:
    """A row's losses, the origin's (when on the row) taken from ``center`` rather than computed again."""
    from .landscape import losses_at

    at0 = np.array([not c.any() for c in r])
    out = np.full(len(r), center, dtype=np.float64)
    if (~at0).any():
        out[~at0] = losses_at(H, V, r[~at0])
    return [float(v) for v in out]


def _model(ts, ss, center, g, C) -> np.ndarray:
    if ss is None:
        return center + ts * g[0] + 0.5 * ts * ts * C[0, 0]
    t, s = ts[:, None], ss[None, :]
    return center + t * g[0] + s * g[1] + 0.5 * (t * t * C[0, 0] + 2 * t * s * C[0, 1] + s * s * C[1, 1])


def _write_csv(path, ts, ss, loss, model) -> None:
    with atomic_open(path, newline="") as f:
        w = csv.writer(f)
        if ss is None:
            w.writerow(["t", "loss", "quadratic"])
            w.writerows([repr(float(t)), repr(float(a)), repr(float(b))] for t, a, b in zip(ts, loss, model))
        else:
            w.writerow(["t", "s", "loss", "quadratic"])
            w.writerows([repr(float(t)), repr(float(s)), repr(float(loss[i, j])), repr(float(model[i, j]))]
                        for i, t in enumerate(ts) for j, s in enumerate(ss))


def _plot(path, args, ts, ss, loss, model, center, what=None) -> None:
    from matplotlib.figure import Figure  # outside pyplot: the caller's backend is untouched

    net = what.replace(", trained", ",\ntrained") if what else ((f"plain net, depth {args.units}" if args.shortcut == 0 else
                    f"{args.shortcut}-shortcut net, {args.units} units") + f", d = {args.width}, init {args.init}")
    fig = Figure(figsize=(7, 4.8))
    ax = fig.subplots()
    if ss is None:
        ax.plot(ts, loss, "o-", ms=3, label="loss")
        ax.plot(ts, model, "--", label="quadratic model (gradient, Hessian)")
        ax.plot([0], [center], "kx", ms=8, label="the weights")
        ax.set_xlabel(f"t (steps along a {args.normalize} random direction)")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    else:
        finite = loss[np.isfinite(loss)]
        levels = np.linspace(finite.min(), finite.max(), 25) if finite.size and finite.max() > finite.min() else 25
        cs = ax.contourf(ts, ss, loss.T, levels=levels, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="loss")
        ax.contour(ts, ss, model.T, levels=cs.levels, colors="white", linestyles="dashed", linewidths=0.6)
        ax.plot([0], [0], "rx", ms=8)
        ax.set_xlabel("t (first direction)")
        ax.set_ylabel("s (second direction)")
        ax.set_aspect("equal")
    ax.set_title(f"loss around the weights: {net}" + ("" if ss is None else " (dashed: quadratic model)"), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


__all__ = ["add_parser", "run"]
