"""``shortcut-ext landscape``: the loss of one network on a line or a plane through its weights (at init, or
trained: ``--weights``).

Random directions (seeded; unit norm, or scaled like the weights per layer or per filter: Li et al. 2018)
and the loss at ``w + t u`` (a line) or ``w + t u + s v`` (a plane) on a grid of steps, beside the exact
quadratic model ``L + t g.u + t^2/2 u^T H u`` from the gradient and Hessian-vector products.  With
``--order``, also the order of the stationary point along each direction (Theorem 1: ``n`` at an
n-shortcut net's zero point, where the gradient and, for ``n >= 3``, the Hessian vanish and the quadratic
model is flat).  The net is built from the network and data flags (as ``spectrum`` builds it), or, with
``--weights``, is a net trained by ``shortcut-ext train --save-weights``, with its data.  Writes ``landscape.json``, ``landscape.csv`` and ``landscape.png`` to ``--out``.

``--directions hessian``: the Hessian's eigenvectors of its largest eigenvalue (a line), and of its smallest
too (a plane): the sharpest rise and, at a saddle, the way down (Lanczos); ``--matrix ggn`` / ``functional``
takes those of the Hessian's Gauss-Newton part (its two largest: it is positive semi-definite) or of the rest.  Around a trained net
(``--weights``): ``--directions pca``, the plane (or line) of the training path's principal directions, with
the path drawn on it (Li et al. 2018, section 7; the path is the weights along training that ``train
--save-weights-every N`` keeps beside the weights file); ``--directions init``, the line from the trained
weights (``t = 0``) to the run's initial weights (``t = 1``; Goodfellow et al. 2015), which says whether the
loss falls monotonically between them; ``--directions between --other FILE``, the line to another weights file
of the same net and data (another epoch, or a net trained from another seed: is there a barrier between two
minima?  Frankle et al. 2020's linear mode connectivity; ``--align`` first matches the other net's hidden units
to these, Ainsworth et al. 2023; ``--curve STEPS`` fits a low-loss quadratic Bezier curve between them,
Garipov et al. 2018).

The grid's losses are saved as they finish (``landscape.checkpoint.jsonl``, one line per row of the grid, and
one per point of a training path): an interrupted run resumes with the same command and ends with the same numbers; a checkpoint of other
options is replaced.

Example (a 3-shortcut net's zero point: flat to second order, a cubic saddle)::

    shortcut-ext landscape --shortcut 3 --units 100 --width 8 --init zero --plane --order --out runs/land3

Around a trained net::

    shortcut-ext train --arch 2-shortcut --act tanh-mid --depth 20 --epochs 500 --save-weights --out runs/t.json
    shortcut-ext landscape --weights runs/t.weights.pt --plane --normalize filter --out runs/land_t

Along its training path::

    shortcut-ext train --arch 2-shortcut --act tanh-mid --depth 20 --epochs 500 --save-weights-every 25 --out runs/t.json
    shortcut-ext landscape --weights runs/t.weights.pt --directions pca --plane --out runs/path_t
    shortcut-ext landscape --weights runs/t.weights.pt --directions init --out runs/interp_t
    shortcut-ext landscape --weights runs/t.weights.pt --directions between --other runs/t_seed1.weights.pt --out runs/lmc
    shortcut-ext landscape --weights runs/t.weights.pt --directions between --other runs/t_seed1.weights.pt --align --curve 200 --out runs/curve
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import time

import numpy as np
import torch

from .. import __version__
from .._cli_args import finite_float, nonneg_int, out_dir, out_lock, positive_float, positive_int
from .._cli_args import seed as seed_type
from .._device import init_distributed, parse_device
from .._dist import together
from .._io import atomic_open, save_figure
from ..reference import MATRICES
from .spectrum_cmd import (_check_options, _environment, _progress, add_problem_args, build_problem,
                           to_strict_json, trained_problem)

CHECKPOINT = "landscape.checkpoint.jsonl"
DIRECTIONS_FILE = "landscape.directions.pt"  # --directions hessian's eigenvectors, for a rerun
CURVE_FILE = "landscape.curve.pt"  # --curve's control point and steps so far, for a rerun or a resume
CURVE_SAMPLES = 4  # points of the curve a step of --curve takes (one in each quarter of [0, 1])
CURVE_POINTS = 21  # points of the fitted curve whose loss is reported (t = 0, 0.05, ..., 1)
CURVE_SAVE_S = 10.0  # --curve saves its control point at most this often (and when it ends or is interrupted)
DIRECTIONS = ("random", "hessian", "pca", "init", "between")
LANCZOS_BASIS = 64  # most Krylov vectors --directions hessian holds (thick restarts beyond: memory 64 x P)
LANCZOS_PRODUCTS = 2000
# what a checkpoint's numbers depend on besides the flags: the way they are computed (bump on a change)
_FORMAT = 2  # 2: --range; the init and between lines' grid is -0.5..1.5 by default (was -1.5..1.5)


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
        "landscape", help="the loss on a line or plane of weights through a network's initial or trained point "
                          "(random, Hessian-eigenvector or training-path directions), beside its quadratic model; "
                          "resumable",
        description=__doc__.split("\n\n")[0] + " Writes JSON, CSV and a PNG figure.",
    )
    add_problem_args(p, "forwards and HVPs")
    g = p.add_argument_group("slice")
    g.add_argument("--plane", action="store_true", help="two directions, a plane (default: one, a line)")
    g.add_argument("--directions", choices=DIRECTIONS, default="random",
                   help="random: seeded random directions (default); hessian: the Hessian's eigenvectors of its "
                        "largest eigenvalue (a line) and also of its smallest (a plane: the sharpest rise and, at a "
                        "saddle, the steepest fall; Lanczos, started from --direction-seed); "
                        "pca: the training path's principal directions, "
                        "with the path drawn on them (needs --weights and the snapshots of train "
                        "--save-weights-every); init: the line from the trained weights (t = 0) to the run's initial "
                        "weights (t = 1; needs --weights); between: the line from --weights (t = 0) to --other's "
                        "weights (t = 1)")
    g.add_argument("--matrix", choices=MATRICES, default="hessian",
                   help="with --directions hessian: the eigenvectors of the Hessian (default), of its Gauss-Newton "
                        "part G = J^T H_l J (ggn: its two largest on a plane, G being positive semi-definite), of "
                        "the rest H - G (functional), or of the empirical Fisher (1/m) sum_i g_i g_i^T (its two "
                        "largest, as G's); the quadratic model beside the loss is the Hessian's all the same")
    g.add_argument("--other", metavar="FILE", default=None,
                   help="--directions between: the other end, a weights file of train --save-weights of the same net "
                        "and data (another epoch of the run, or a run from another seed)")
    g.add_argument("--align", action="store_true",
                   help="--directions between: first permute --other's hidden units inside each residual unit to "
                        "match --weights (weight matching, Ainsworth et al. 2023; the function --other computes is "
                        "unchanged), so that a barrier left is not the permutation symmetry's")
    g.add_argument("--curve", type=nonneg_int, default=0, metavar="STEPS",
                   help="--directions between: also fit a quadratic Bezier curve from --weights to --other, STEPS "
                        "gradient steps on its control point (Garipov et al. 2018; 4 points of the curve a step), "
                        "and give the loss along it: a low-loss path where the line has a barrier (default 0: none); "
                        "with --plane, the loss on the plane of the two nets and the curve's control point, the curve "
                        "drawn in it")
    g.add_argument("--curve-lr", type=positive_float, default=None,
                   help="--curve's step size (default: the learning rate --weights was trained with)")
    g.add_argument("--trajectory", metavar="DIR", default=None,
                   help="--directions pca: the folder of the weights along training (default: the .weights/ folder "
                        "beside --weights, or the folder --weights is in)")
    g.add_argument("--span", type=positive_float, default=None,
                   help="steps from -span to +span along each direction (> 0), in units of the direction (default: "
                        "1; pca: 1.2 times the path's reach along each direction; init, between: see --range)")
    g.add_argument("--range", type=finite_float, nargs="+", metavar="X", default=None,
                   help="LO HI: steps from LO to HI along each direction instead of --span's -span..span (a plane: "
                        "LO HI LO2 HI2 for the two directions apart); default for init and between: -0.5 1.5, where "
                        "the default 41 points put both ends of the line on the grid")
    g.add_argument("--points", type=points_type, default=None,
                   help="grid points along each direction, >= 2 (default: 41 on a line, 21 on a plane; an odd "
                        "number puts the weights themselves on the grid)")
    g.add_argument("--normalize", choices=NORMALIZE, default="unit",
                   help="unit: each direction has norm 1 (the only choice at the zero point); layer / filter: "
                        "scaled like the weights per d x d layer / per row (Li et al. 2018)")
    g.add_argument("--direction-seed", type=seed_type, default=0,
                   help="seed of the random directions (hessian: of Lanczos's start vector)")
    g.add_argument("--order", action="store_true",
                   help="also the order p of the stationary point along each direction (L(w + t v) - L(w) ~ c t^p "
                        "for small t: 19 more losses a direction; use float64)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_type, default=0, help="seed of the net's init and of the data")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    g.add_argument("--backend", choices=BACKENDS, default="fused", help="forward and HVP backend")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the network, data and losses live")
    g.add_argument("--distributed", action="store_true",
                   help="data-parallel losses and HVPs over torch.distributed, launched with torchrun (gloo on cpu, "
                        "NCCL on cuda: each rank takes cuda:LOCAL_RANK); rank r holds samples r, r + world, ...; "
                        "every rank reads --weights and the training path, rank 0 keeps the checkpoint and writes")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _grid(args, ranges) -> tuple[np.ndarray, np.ndarray | None]:
    """The steps along each direction: ``ranges`` (``[(lo, hi)]`` per direction, the kind of directions'
    default) unless ``--range`` or ``--span`` is given."""
    if args.range is not None:
        ranges = [tuple(args.range[:2]), tuple(args.range[-2:])]
    elif args.span is not None:
        ranges = [(-args.span, args.span)] * 2
    n = args.points if args.points is not None else (21 if args.plane else 41)
    ts = np.linspace(*ranges[0], n)
    return ts, (np.linspace(*ranges[1], n) if args.plane else None)


def _reach(x: float) -> float:
    """A span a little beyond ``x`` (> 0), rounded up to two significant digits."""
    x *= 1.2
    e = 10.0 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(x / e - 1e-9) * e, 12)


_MATRIX_WORDS = {"hessian": "Hessian's", "ggn": "Gauss-Newton part's", "functional": "functional part's (H - G)",
                 "empirical_fisher": "empirical Fisher's"}
_PSD = ("ggn", "empirical_fisher")  # positive semi-definite: a plane of the two largest eigenvectors
_GRID_ONLY = ("points", "span", "range", "order")  # options that shape the grid, not the directions or the curve


def _fingerprint(args, world: int = 1, drop=()) -> str:
    """The options the numbers depend on (not where they are written or shown), with the computation's format;
    ``drop``: options that the numbers keyed by it do not depend on."""
    # (a trained net's weights by their digest, weights_sha1, not by their file's path)
    keep = {k: v for k, v in vars(args).items()
            if k not in ("func", "out", "no_plots", "no_progress", "command", "weights", "trajectory", "distributed",
                         "other") + tuple(drop)}
    if keep.get("matrix") == "hessian":  # the default: the checkpoints of versions before --matrix resume
        del keep["matrix"]
    if world > 1:
        keep["world_size"] = world  # the all-reduce's order of the ranks' sums
    keep["format"] = _FORMAT
    keep["version"] = __version__
    keep["threads"] = torch.get_num_threads()  # the reductions' order: a resumed grid matches bit for bit
    text = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run(args) -> int:
    _check_options(args, "landscape")

    def refuse(msg):
        raise SystemExit(f"shortcut-ext landscape: {msg}")

    if args.directions == "hessian" and args.normalize != "unit":
        refuse("--normalize has no effect with --directions hessian: eigenvectors have norm 1 (leave it out)")
    if args.matrix != "hessian" and args.directions != "hessian":
        refuse(f"--matrix {args.matrix} has no effect with --directions {args.directions}: it picks the matrix whose "
               "eigenvectors --directions hessian takes")
    if args.directions in ("pca", "init", "between"):
        if args.weights is None:
            refuse(f"--directions {args.directions} needs --weights: the "
                   + {"pca": "training path of a run (train --save-weights-every N keeps it)",
                      "init": "initial and trained weights of a run (train --save-weights)",
                      "between": "weights at one end of the line (train --save-weights), and --other at the other"
                      }[args.directions] + ", got no --weights")
        for flag, given in (("--normalize", args.normalize != "unit"), ("--direction-seed", args.direction_seed != 0)):
            if given:
                refuse(f"{flag} has no effect with --directions {args.directions}: it shapes random directions "
                       "(leave it out)")
        if args.directions in ("init", "between") and args.plane and not (args.directions == "between" and args.curve):
            refuse(f"--directions {args.directions} is one direction, a line (from --weights to "
                   + ("the initial weights" if args.directions == "init" else "--other") + "): drop --plane, or use "
                   "--directions pca for a plane through a training path"
                   + (", or --curve STEPS for the plane of a curve fitted between them" if args.directions == "between"
                      else ""))
    if args.range is not None:
        r = args.range
        if args.span is not None:
            refuse(f"--span {args.span:g} and --range {' '.join(f'{x:g}' for x in r)} both set the grid's ends: give "
                   "one of them")
        if len(r) not in ((2, 4) if args.plane else (2,)):
            refuse("--range takes LO HI" + (" (or LO HI LO2 HI2, one pair a direction)" if args.plane else
                                              " on a line (two pairs only with --plane)")
                   + f", got {len(r)} number{'s' if len(r) > 1 else ''}")
        for j in range(0, len(r), 2):
            if not r[j] < r[j + 1]:
                refuse(f"--range: LO < HI, got {r[j]:g} {r[j + 1]:g}")
    if (args.other is None) != (args.directions != "between"):
        refuse("--directions between needs --other FILE (the other end of the line)" if args.other is None else
               f"--other has no effect with --directions {args.directions}: it is the far end of --directions between")
    if args.curve and args.directions != "between":
        refuse(f"--curve has no effect with --directions {args.directions}: it fits a curve between --weights and "
               "--other (--directions between)")
    if args.curve_lr is not None and not args.curve:
        refuse("--curve-lr has no effect without --curve STEPS (the curve's gradient steps)")
    if args.align and args.directions != "between":
        refuse(f"--align has no effect with --directions {args.directions}: it permutes --other's hidden units "
               "(--directions between)")
    if args.trajectory is not None and args.directions != "pca":
        refuse(f"--trajectory has no effect with --directions {args.directions}: it is the path of --directions pca")
    if args.weights is None and args.normalize != "unit" and args.init == "zero":
        raise SystemExit(f"shortcut-ext landscape: --normalize {args.normalize} scales the directions like the "
                         "weights, which are all 0 with --init zero: use --normalize unit (the default)")
    args.device = parse_device(args.device, "landscape")
    created, rank, world = False, 0, 1
    if args.distributed:
        created, rank, world, args.device = init_distributed("landscape", args.device)
    try:
        with together(args.distributed, "landscape"):  # (each node's own disk)
            out_dir(args.out, "landscape")
        with out_lock(os.path.join(args.out, ".shortcut-ext.lock"), "landscape", lead=rank == 0,
                      distributed=args.distributed, device=args.device):
            return _run(args, rank, world)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, rank: int = 0, world: int = 1) -> int:
    from ..experiments.store import RunStore, json_float
    from .hessian import HessianOperator
    from .landscape import _loss, _taylor, stationary_order

    t_start = time.perf_counter()
    lead = rank == 0  # prints, keeps the checkpoint and writes; every rank computes every loss (all-reduced)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    what = bundle = info = None
    with together(args.distributed, "landscape"):  # a file one rank lacks stops every rank, not only that one
        if args.weights is None:
            net, X, Y = build_problem(args, dtype)
        else:  # the checkpoint's fingerprint takes the weights' digest (args.weights_sha1)
            net, X, Y, what, bundle, info = trained_problem(args, "landscape", dtype, full=True)
            net, X, Y = net.to(args.device), X.to(args.device), Y.to(args.device)
    if args.distributed:
        X, Y = X[rank::world], Y[rank::world]  # this rank's shard
    if args.batch_size is None:
        data = [(X, Y)]
    else:
        data = [(X[i:i + args.batch_size], Y[i:i + args.batch_size]) for i in range(0, X.shape[0], args.batch_size)]
    H = HessianOperator(net, data, loss=args.loss, backend=args.backend, dtype=dtype, distributed=args.distributed)
    k = 2 if args.plane else 1
    path = plane = eig = None  # the training path's points (epoch, weights), its principal directions; eigenpairs
    t_dir = time.perf_counter()
    folder = alignment = None
    if args.directions == "hessian":  # (collectives: Lanczos's products)
        E = H if args.matrix == "hessian" else HessianOperator(
            net, data, loss=args.loss, backend=args.backend, dtype=dtype, distributed=args.distributed,
            matrix=args.matrix)
        V, eig = _eigen_directions(E, k, args, world, lead)
        eig["matrix"] = args.matrix
        ranges = [(-1.0, 1.0)] * 2
    else:
        with together(args.distributed, "landscape"):  # files (--other, the training path) one rank may lack
            V, ranges, path, plane, folder, alignment = _directions(args, H, net, info, bundle, k)
    dir_s = time.perf_counter() - t_dir
    ts, ss = _grid(args, ranges)
    rows = [np.array([[t, s] for s in ss]) for t in ts] if args.plane else [np.array([[t]]) for t in ts]

    # the checkpoint: one record per finished row of the grid (and point of the path), under this run's fingerprint;
    # rank 0 reads and writes it and tells the other ranks what is done
    fp = _fingerprint(args, world)
    if args.distributed:
        import torch.distributed as dist

        fps = [None] * world
        dist.all_gather_object(fps, fp)
        if len(set(fps)) > 1:
            raise SystemExit("shortcut-ext landscape: --distributed: the ranks differ in their options, --weights or "
                             "training path (their digests differ): give every rank the same command and files")
    ck_path = os.path.join(args.out, CHECKPOINT)
    store = RunStore(ck_path) if lead else None
    mine = [k for k in store.keys() if k.startswith(fp + "|")] if lead else []
    if lead and len(store) and not mine:
        print(f"shortcut-ext landscape: the checkpoint {ck_path} is of other options (or another version of "
              "shortcut_ext, or another thread count or world size); starting afresh and replacing it", flush=True)
        os.remove(ck_path)
        store = RunStore(ck_path)
    elif lead and (len(store) > len(mine) or store.skipped_lines):  # this run's rows resume; the rest is said
        other = len(store) - len(mine)
        print(f"shortcut-ext landscape: the checkpoint {ck_path} also holds "
              + " and ".join(x for x in (f"{other} record{'s' if other > 1 else ''} of other options" if other else "",
                                         f"{store.skipped_lines} unreadable line{'s' if store.skipped_lines > 1 else ''}"
                                         if store.skipped_lines else "") if x)
              + f"; ignored ({len(mine)} of this run's records resume)", flush=True)

    def stored(key, n):  # a record of n finished losses, or None (missing, or damaged: computed again)
        rec = store.get(f"{fp}|{key}")
        ok = (isinstance(rec, dict) and isinstance(rec.get("loss"), list) and len(rec["loss"]) == n
              and all(v is None or v in ("inf", "-inf") or (isinstance(v, (int, float)) and not isinstance(v, bool))
                      for v in rec["loss"]))
        return [json_float(v) for v in rec["loss"]] if ok else None

    def save(key, vals, seconds=None):  # the values as stored and read back (the same on every rank)
        if not lead:
            return [float(v) for v in vals]
        store.put(f"{fp}|{key}", {"loss": vals, **({"seconds": seconds} if seconds is not None else {})})
        return stored(key, len(vals))

    def seconds_of(key):  # the time an earlier process spent on a stored record, or None (an older version's)
        v = (store.get(f"{fp}|{key}") or {}).get("seconds") if lead else None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0 else None

    keys = ([(f"row={i}", len(r)) for i, r in enumerate(rows)] + [(f"path={e}", 1) for e, _ in path or []]
            + [(f"curve={i}", 1) for i in range(CURVE_POINTS if args.curve else 0)])
    have = {key: stored(key, n) for key, n in keys} if lead else None
    if lead:
        damaged = [key for key, n in keys if have[key] is None and store.get(f"{fp}|{key}") is not None]
        if damaged:
            print(f"shortcut-ext landscape: the checkpoint {ck_path} holds {len(damaged)} damaged "
                  f"record{'s' if len(damaged) > 1 else ''} ({damaged[0]}{' ...' if len(damaged) > 1 else ''}); "
                  "computed again", flush=True)
    if args.distributed:
        box = [have]
        dist.broadcast_object_list(box, src=0)
        have = box[0]
    center = _loss(H, H._W)
    path_loss = None
    if path is not None:  # each point's own loss (the trained weights' is the centre's), saved as it finishes
        path_loss = [center if w is H._W else (have[f"path={e}"] or [None])[0] for e, w in path]
        todo = [i for i, v in enumerate(path_loss) if v is None]
        pbar, pcb = _progress("training path", args.no_progress or not todo or not lead)
        try:
            for j, i in enumerate(todo):
                e, w = path[i]
                path_loss[i] = save(f"path={e}", [_loss(H, w.to(device=H.device, dtype=H.dtype))])[0]
                pcb(j + 1, len(todo))
        finally:
            pbar.close()
    curve = None
    if args.curve:  # the fitted curve's control point (resumed from its file), then its points' losses
        from .landscape import bezier_point

        t_curve = time.perf_counter()
        bend, objective, lr, resumed = _fit_curve(args, H, path[0][1], info, world, lead)
        ts_c = np.linspace(0.0, 1.0, CURVE_POINTS)
        loss_c = [(have[f"curve={i}"] or [None])[0] for i in range(CURVE_POINTS)]
        todo = [i for i, v in enumerate(loss_c) if v is None]
        pbar, pcb = _progress("curve's points", args.no_progress or not todo or not lead)
        try:
            for j, i in enumerate(todo):
                loss_c[i] = save(f"curve={i}", [_loss(H, bezier_point(H._W, bend, path[0][1], float(ts_c[i])))])[0]
                pcb(j + 1, len(todo))
        finally:
            pbar.close()
        mid = (H._W + path[0][1]) / 2
        curve = {"steps": args.curve, "lr": lr, "samples_per_step": CURVE_SAMPLES, "resumed_steps": resumed,
                 "ts": ts_c.tolist(), "loss": loss_c,
                 **(_curve_plane(H, path[0][1], bend, ts_c) if args.plane else {}),
                 "barrier": float(max(0.0, np.nanmax(loss_c) - max(loss_c[0], loss_c[-1]))),
                 # how far the control point moved off the line, relative to the ends' distance
                 "bend_offset": float((bend - mid).norm() / (path[0][1] - H._W).norm()),
                 "objective": objective}
        curve_s = time.perf_counter() - t_curve
        if args.plane:  # the plane of the two ends and the control point: the curve lies in it
            u = path[0][1] - H._W
            V = torch.stack([u.reshape(-1), (bend - H._W - curve["bend_coords"][0] * u).reshape(-1)], dim=1)
    losses = [have[f"row={i}"] for i in range(len(rows))]
    done = sum(x is not None for x in losses)
    if done and lead:
        print(f"shortcut-ext landscape: resuming from the checkpoint {ck_path}: {done} of {len(rows)} rows of the grid "
              "done", flush=True)
    bar, cb = _progress("landscape", args.no_progress or not lead)
    t0 = time.perf_counter()
    try:
        total = sum(len(r) for r in rows)
        finished = sum(len(r) for r, x in zip(rows, losses) if x is not None)
        for i, r in enumerate(rows):
            if losses[i] is not None:
                continue
            t_row = time.perf_counter()
            vals = _row_losses(H, V, r, center)
            losses[i] = save(f"row={i}", vals, seconds=time.perf_counter() - t_row)
            finished += len(r)
            cb(finished, total)
    finally:
        bar.close()
    grid_s = time.perf_counter() - t0
    # the rows earlier processes computed: their time is in their records (not in those of older versions)
    earlier = [seconds_of(f"row={i}") for i in range(len(rows)) if have is not None and have[f"row={i}"] is not None]
    unknown = sum(v is None for v in earlier)
    loss = np.array(losses, dtype=np.float64)
    loss = loss.reshape(len(ts), len(ss)) if args.plane else loss[:, 0]
    slopes, curv = _taylor(H, V)
    res = _model(ts, ss, center, slopes, curv)
    fin = np.isfinite(loss)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "func"}, "net": what,
        "num_params": H.P, "backend_used": H.backend_used, "fallback_reason": H.fallback_reason,
        "environment": _environment(), "world_size": world,
        "center": center, "grad_norm": float(H.loss_and_grad()[1].norm()),
        "ts": ts.tolist(), "ss": None if ss is None else ss.tolist(), "loss": loss.tolist(),
        "quadratic": res.tolist(), "slopes": slopes.tolist(), "curvature": curv.tolist(),
        "direction_norms": V.double().norm(dim=0).cpu().tolist(),
        # over the points where the loss is finite (a long step on a deep net overflows)
        "max_abs_model_error": float(np.max(np.abs(loss - res)[fin])) if fin.any() else math.nan,
        "nonfinite_points": int((~fin).sum()),
        "resumed_rows": done,
        # grid: all processes' time on the rows where every resumed row recorded it; grid_this_process: this one's
        "timings_s": {"directions": dir_s, **({"grid": grid_s + sum(earlier)} if not unknown else {}),
                      "grid_this_process": grid_s, **({"curve": curve_s} if curve is not None else {})},
        **({"resumed_rows_seconds_unknown": unknown} if unknown else {}),
    }
    if eig is not None:
        result["eigen"] = eig
    if path is not None:
        coords = (plane.coords if plane is not None else np.array([[1.0, 0.0], [0.0, 0.0]])[:, :k])
        off = plane.off_plane if plane is not None else np.zeros(len(path))
        result["path"] = [{"epoch": int(e), "coords": c.tolist(), "loss": lv, "off_plane": float(o)}
                          for (e, _), c, lv, o in zip(path, coords, path_loss, off)]
        if plane is not None:
            result["explained_variance"] = plane.explained.tolist()
            result["trajectory"] = str(folder)
        else:
            on_line = loss if ss is None else next((loss[:, j] for j in range(len(ss)) if ss[j] == 0), None)
            result["interpolation"] = None if on_line is None else _interpolation(ts, on_line, path_loss[0], center)
            if args.directions == "between":
                result["other"] = str(args.other)
                if alignment is not None:
                    result["alignment"] = alignment
                if curve is not None:
                    result["curve"] = curve
    if args.order:
        t1 = time.perf_counter()
        result["orders"] = [stationary_order(H, V[:, j]).to_dict() for j in range(V.shape[1])]
        result["timings_s"]["order"] = time.perf_counter() - t1
    result["timings_s"]["total_this_process"] = time.perf_counter() - t_start
    if not lead:  # every collective is behind: rank 0 writes
        return 0
    with atomic_open(os.path.join(args.out, "landscape.json")) as f:
        f.write(to_strict_json(result, indent=1))
    _write_csv(os.path.join(args.out, "landscape.csv"), ts, ss, loss, res)
    if curve is not None:
        with atomic_open(os.path.join(args.out, "landscape.curve.csv"), newline="") as f:
            w = csv.writer(f)
            w.writerow(["t", "loss"])
            w.writerows([repr(float(t)), repr(float(v))] for t, v in zip(curve["ts"], curve["loss"]))
    if path is not None:
        with atomic_open(os.path.join(args.out, "landscape.path.csv"), newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch"] + ["t", "s"][:k] + ["loss", "off_plane"])
            w.writerows([p["epoch"]] + [repr(float(c)) for c in p["coords"]] + [repr(float(p["loss"])),
                                                                               repr(p["off_plane"])]
                        for p in result["path"])
    if not args.no_plots:
        _plot(os.path.join(args.out, "landscape.png"), args, ts, ss, loss, res, center, what, result)
    msg = (f"shortcut-ext landscape: P = {H.P}, L(w) = {center:.6g}, |grad| = {result['grad_norm']:.3g}, "
           f"u^T H u = {curv[0, 0]:.4g}; the loss on the grid spans [{np.nanmin(loss):.6g}, {np.nanmax(loss):.6g}], "
           f"the quadratic model is off by at most {result['max_abs_model_error']:.3g}"
           + (" where it is finite" if result["nonfinite_points"] else ""))
    if result["nonfinite_points"]:
        msg += (f"; the loss is not finite at {result['nonfinite_points']} of {loss.size} points (it overflows "
                "there: a smaller --span stays in range)")
    if eig is not None:
        msg += (f"; the directions are the {_MATRIX_WORDS[eig.get('matrix', 'hessian')]} eigenvectors of lambda max = "
                + f"{eig['eigenvalues'][0]:.6g}"
                + (f" and lambda {'2' if eig.get('matrix') in _PSD else 'min'} = {eig['eigenvalues'][1]:.6g}"
                   if k == 2 else "")
                + f" (Lanczos, {eig['num_products']} products"
                + (")" if eig["converged"] else ", not converged: the vectors are approximate)"))
    if plane is not None:
        ex = result["explained_variance"]
        msg += (f"; the training path ({len(path)} points, epochs {path[0][0]}..{path[-1][0]}): its principal "
                f"direction{'s explain' if k == 2 else ' explains'} " + " and ".join(f"{x:.1%}" for x in ex)
                + f" of its variance, and it lies at most {float(plane.off_plane.max()):.1%} of its reach (its "
                f"farthest point from the weights) off the {'plane' if k == 2 else 'line'}")
    elif args.directions == "init":
        it = result["interpolation"]
        msg += (f"; L at the initial weights (t = 1) = {path_loss[0]:.6g}; from them to the trained weights the loss "
                + ("falls monotonically on the grid" if it["monotonic"] else
                   f"rises by up to {it['max_rise']:.3g} between grid points on the way"))
    elif path is not None:
        it = result["interpolation"]
        if alignment is not None:
            msg += (f"; --other's hidden units aligned to --weights' (weight matching: distance "
                    f"{alignment['distance_before']:.4g} -> {alignment['distance_after']:.4g}, "
                    f"{alignment['moved_units']} of {alignment['units']} units permuted)")
        msg += f"; L at --other (t = 1) = {path_loss[0]:.6g}"
        if it is not None:  # (a plane whose grid has no row on the line: no line's numbers)
            msg += ("; on the line between them the loss "
                    + (f"rises {it['barrier']:.3g} above the higher end (a barrier)" if it["barrier"] > 0 else
                       "stays at or below the higher end (no barrier on the grid)"))
        if curve is not None:
            msg += (f"; along a Bezier curve fitted in {curve['steps']} steps it "
                    + (f"rises {curve['barrier']:.3g} above the higher end" if curve["barrier"] > 0 else
                       "stays at or below the higher end"))
    if args.order:
        msg += "; order along each direction: " + ", ".join(f"{o['order']:.3g}" for o in result["orders"])
    print(msg + f"; written to {args.out}", flush=True)
    return 0


def _directions(args, H, net, info, bundle, k: int):
    """The directions of every kind but ``hessian`` (no collective: each rank computes its own alike), as
    ``(V [P, k], default (lo, hi) per direction, the path's points or None, its PathPlane or None, its
    folder or None, --align's numbers or None)``."""
    from ..experiments.train_cmd import initial_net
    from .landscape import path_directions, random_directions

    if args.directions == "random":
        return random_directions(H, k, seed=args.direction_seed, normalize=args.normalize), [(-1.0, 1.0)] * 2, \
            None, None, None, None
    line = [(-0.5, 1.5)]  # from beyond --weights (t = 0) to beyond the far end (t = 1)
    if args.directions == "init":
        w0 = initial_net(info, bundle.width, net.weight.dtype).weight.detach()  # in the run's dtype, as it began
        path = [(0, net.stack_weights(w0).to(device=H.device, dtype=H.dtype)), (info["epoch"], H._W)]
        V = (path[0][1] - H._W).reshape(-1, 1)
        if not bool(V.any()):
            raise SystemExit(f"shortcut-ext landscape: --directions init: the weights of --weights {args.weights} are "
                             "the run's initial weights ("
                             + ("epoch 0" if info["epoch"] == 0 else "training never moved them")
                             + "): the line has no direction")
        return V, line, path, None, None, None
    if args.directions == "between":
        w1, e1, args.other_sha1 = _other_end(args, net, info, H)
        alignment = None
        if args.align:
            w1, alignment = _aligned(H, w1)
        V = (w1 - H._W).reshape(-1, 1)
        if not bool(V.any()):
            raise SystemExit(f"shortcut-ext landscape: --directions between: --other {args.other} holds the same "
                             f"weights as --weights {args.weights}: the line has no direction")
        # (with --curve --plane the second direction, toward the curve's control point, is set once it is fitted)
        return V, line * k, [(e1, w1), (info["epoch"], H._W)], None, None, alignment
    path, args.trajectory_sha1, folder = _trajectory(args, net, info, H)
    try:
        plane = path_directions(H, [w for _, w in path], k)
    except ValueError as e:
        raise SystemExit(f"shortcut-ext landscape: --directions pca: the weights along training in {folder} "
                         f"({len(path)} points with --weights): {e}") from None
    ranges = [(-r, r) for r in (_reach(float(np.abs(plane.coords[:, j]).max())) for j in range(k))]
    return plane.directions, ranges, path, plane, folder, None


def _eigen_directions(H, k: int, args, world: int = 1, lead: bool = True):
    """``--directions hessian``: ``([P, k] unit eigenvectors, info)`` of the largest and (a plane) the smallest
    eigenvalue, by Lanczos with thick restarts; each signed so that its largest entry is positive.  Saved in
    ``--out`` (``landscape.directions.pt``) under the run's fingerprint, and taken from there by a rerun of the
    same options (under ``--distributed`` rank 0 reads them and sends them to the other ranks)."""
    from .lanczos import lanczos

    fp, saved = _fingerprint(args, world, drop=_GRID_ONLY), os.path.join(args.out, DIRECTIONS_FILE)
    got = _saved(saved, fp, (H.P, k), H, world, lead)
    if got is not None:
        if lead:
            print(f"shortcut-ext landscape: the Hessian's eigenvectors are those saved in {saved}", flush=True)
        return got
    # G is positive semi-definite, its smallest eigenvalues a null space: its plane is that of its two largest
    psd = getattr(args, "matrix", "hessian") in _PSD
    bar, cb = _progress("lanczos", args.no_progress or not lead)
    try:
        lz = lanczos(H, k=k if psd else 1, which="largest" if psd else "both", seed=args.direction_seed,
                     max_iter=min(H.P, LANCZOS_BASIS), max_products=LANCZOS_PRODUCTS, callback=cb)
    finally:
        bar.close()
    top = float(lz.largest[0])
    bottom = float(lz.largest[-1]) if psd else float(lz.smallest[0])
    if top == 0 and bottom == 0:
        if getattr(args, "matrix", "hessian") in _PSD:
            what = "Gauss-Newton part" if args.matrix == "ggn" else "empirical Fisher"
            raise SystemExit(f"shortcut-ext landscape: --directions hessian --matrix {args.matrix}: the {what} is 0 at "
                             "these weights (J = 0, as at an n-shortcut net's zero point for n >= 2), so its "
                             "eigenvectors are no particular directions: use --matrix hessian (there the Hessian is "
                             "its functional part)")
        raise SystemExit("shortcut-ext landscape: --directions hessian: the Hessian is 0 at these weights (as at an "
                         "n-shortcut net's zero point for n >= 3), so its eigenvectors are no particular directions: "
                         "use --directions random (and --order for the order of the stationary point)")
    V = (lz.largest_vectors[:, :k] if psd else torch.cat([lz.largest_vectors[:, :1], lz.smallest_vectors[:, :1]][:k],
                                                         dim=1)).to(device=H.device, dtype=H.dtype)
    for j in range(k):
        if float(V[int(V[:, j].abs().argmax()), j]) < 0:
            V[:, j].neg_()
    info = {"eigenvalues": [top, bottom][:k], "residuals": [float(lz.largest_residuals[0]), float(
                lz.largest_residuals[-1] if psd else lz.smallest_residuals[0])][:k],
            "converged": bool(lz.converged), "num_products": int(lz.num_products)}
    if lead:
        _save_blob(saved, fp, V, info)
    return V.contiguous(), info


def _saved(path: str, fp: str, shape: tuple, H, world: int, lead: bool):
    """``(tensor, info)`` that :func:`_save_blob` wrote to ``path`` under the fingerprint ``fp`` (a tensor of
    ``shape`` in H's dtype, finite), or None (no file, a damaged one, or another run's).  Rank 0 reads it and
    sends it to the other ranks."""
    got = None
    if lead and os.path.exists(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 -- damaged or not ours: computed again, and replaced
            blob = None
        if (isinstance(blob, dict) and blob.get("fingerprint") == fp and isinstance(blob.get("V"), torch.Tensor)
                and tuple(blob["V"].shape) == tuple(shape) and blob["V"].dtype == H.dtype
                and isinstance(blob.get("info"), dict) and bool(torch.isfinite(blob["V"]).all())):
            got = blob["V"].to(H.device).contiguous(), blob["info"]
    if world > 1:
        import torch.distributed as dist

        box = [None if got is None else got[1]]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            V = got[0] if lead else torch.empty(shape, dtype=H.dtype, device=H.device)
            dist.broadcast(V, src=0)
            got = V, box[0]
    return got


def _save_blob(path: str, fp: str, V: torch.Tensor, info: dict) -> None:
    buf = io.BytesIO()
    torch.save({"fingerprint": fp, "V": V.detach().cpu().contiguous(), "info": info}, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def _curve_plane(H, w1, bend, ts) -> dict:
    """``--curve --plane``: the coordinates of the control point and of the curve's points in the plane of
    ``--weights`` (0, 0), ``--other`` (1, 0) and the control point (a, 1): its directions are ``u = w1 - w`` and
    ``v``, the part of ``bend - w`` off that line, so that ``phi(t) = w + (2 t (1 - t) a + t^2) u + 2 t (1 - t) v``."""
    u, b = (w1 - H._W).reshape(-1).double(), (bend - H._W).reshape(-1).double()
    a = float(b @ u / (u @ u))
    if not float((b - a * u).norm()) > 1e-9 * float(b.norm()):
        raise SystemExit("shortcut-ext landscape: --curve --plane: the fitted curve did not leave the line (its control "
                         "point lies on it), so there is no plane to draw: drop --plane")
    t = np.asarray(ts, dtype=np.float64)
    return {"bend_coords": [a, 1.0], "coords": np.stack([2 * t * (1 - t) * a + t * t, 2 * t * (1 - t)], 1).tolist()}


def _fit_curve(args, H, w1, info, world: int, lead: bool):
    """``--curve STEPS``: ``(control point, objective per step, step size, steps resumed)`` of the Bezier curve
    from ``--weights`` to ``w1`` (:func:`~shortcut_ext.curvature.landscape.fit_bezier_curve`).  The control
    point and its steps so far are saved in ``--out`` (``landscape.curve.pt``) at most every 10 s, when the fit
    ends and when it is interrupted: a rerun of the same options goes on from there, to the same numbers, and
    so does a run with more steps, another grid or ``--plane``."""
    from .landscape import fit_bezier_curve

    lr = args.curve_lr
    if lr is None:
        lr = (info.get("train") or {}).get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise SystemExit(f"shortcut-ext landscape: --curve: --weights {args.weights} does not record its learning "
                             "rate (a file of an earlier version of train): give --curve-lr")
    # (not keyed by the grid, nor by the number of steps: a longer --curve goes on from a shorter one's point)
    fp = _fingerprint(args, world, drop=_GRID_ONLY + ("plane", "curve", "normalize", "direction_seed"))
    saved = os.path.join(args.out, CURVE_FILE)
    got = _saved(saved, fp, tuple(H._W.shape), H, world, lead)
    start, bend, objective = 0, None, None
    if got is not None:
        step, hist = got[1].get("step"), got[1].get("objective")
        if (isinstance(step, int) and 0 <= step <= args.curve and isinstance(hist, list) and len(hist) == step
                and all(isinstance(v, float) and math.isfinite(v) for v in hist)):
            start, bend, objective = step, got[0], hist
            if lead:
                print(f"shortcut-ext landscape: the curve's control point after {step} of {args.curve} steps is "
                      f"the one saved in {saved}" + (": going on from there" if step < args.curve else ""),
                      flush=True)
    state = {"step": start, "bend": bend, "objective": list(objective or [])}
    last = [time.monotonic()]

    def keep():
        _save_blob(saved, fp, state["bend"], {"step": state["step"], "objective": state["objective"]})
        last[0] = time.monotonic()

    bar, cb = _progress("curve", args.no_progress or not lead or start == args.curve)

    def callback(step, steps, theta, hist):
        if not math.isfinite(hist[-1]):  # every rank alike (the losses are all-reduced)
            raise SystemExit(f"shortcut-ext landscape: --curve: the loss along the curve is not finite at step {step} "
                             f"(step size {lr:g}): lower --curve-lr")
        state.update(step=step, bend=theta.clone(), objective=list(hist))  # a copy: an interrupt mid-step keeps
        cb(step, steps)                                                      # the last whole step's point
        if lead and time.monotonic() - last[0] >= CURVE_SAVE_S:
            keep()

    try:
        c = fit_bezier_curve(H, H._W, w1, args.curve, lr, samples=CURVE_SAMPLES, bend=bend, start=start,
                             objective=objective, callback=callback)
    finally:
        bar.close()
        if lead and state["bend"] is not None and (got is None or state["step"] > start):
            keep()
    return c.bend, c.objective, float(lr), start


def _other_end(args, net, info, H):
    """``--directions between``: ``(weights [R, n, d, d] in H's dtype, epoch, file digest)`` of ``--other``, after
    checking that it is a net of the same shape and frozen projections, trained on the same data."""
    from ..experiments.train_cmd import load_weights

    where = f"shortcut-ext landscape: --directions between: --other {args.other}"
    _, bundle, other = load_weights(args.other, "landscape")
    a, b = info["net"], other["net"]
    shape = ("arch", "act", "depth", "width", "out_features")
    diff = [f"{k} {b[k]} against {a[k]}" for k in shape if a[k] != b[k]]
    if other["data"]["tag"] != info["data"]["tag"]:
        diff.append(f"data {other['data']['tag']} against {info['data']['tag']}")
    if diff:
        raise SystemExit(f"{where}: is of another net or data than --weights {args.weights} ({', '.join(diff)})")
    mine, theirs = info["state_dict"], other["state_dict"]
    frozen = [k for k in mine if k != "weight" and not torch.equal(mine[k].double(), theirs[k].double())]
    if frozen:
        raise SystemExit(f"{where}: its frozen projections ({', '.join(frozen)}) differ from those of --weights "
                         f"{args.weights} (they are drawn from the seed, here {b['seed']} against {a['seed']}): the "
                         "line would join two different functions of the trunk; at --width equal to the data's inputs "
                         "and outputs a net has none")
    w = net.stack_weights(theirs["weight"]).to(device=H.device, dtype=H.dtype)
    return w, int(other["epoch"]), other["file_sha1"]


def _aligned(H, w1):
    """``--align``: ``(--other's weights with their hidden units permuted to match --weights', the
    alignment's numbers)`` (weight matching)."""
    from .landscape import align_hidden_units

    if w1.shape[1] < 2:
        raise SystemExit("shortcut-ext landscape: --align: a unit of this net has one layer (n = 1), so it has no "
                         "hidden units to permute (the shortcut pins the residual stream): drop --align")
    al = align_hidden_units(H._W, w1)
    return al.weights.to(device=H.device, dtype=H.dtype), al.to_dict()


def _trajectory(args, net, info, H):
    """``--directions pca``: the run's path, ``[(epoch, weights [R, n, d, d])]`` in epoch order (memory-mapped, in the
    run's dtype) with
    ``--weights``' own point (``H._W``) among them, a digest of the snapshot files, and their folder.  Snapshots
    of another run (net, data, dtype or frozen projections) are refused."""
    from pathlib import Path

    from ..experiments.train_cmd import WEIGHTS_FORMAT, WEIGHTS_KIND

    where = "shortcut-ext landscape: --directions pca"
    w = Path(args.weights).expanduser()
    if args.trajectory is not None:
        folder = Path(args.trajectory).expanduser()
    elif w.name.endswith(".weights.pt"):
        folder = w.with_name(w.name[:-len(".pt")])  # run.weights.pt -> run.weights/
    else:
        folder = w.parent  # a snapshot itself: run.weights/epoch_000040.pt
    if not folder.is_dir():
        raise SystemExit(f"{where}: there is no folder of weights along training at {folder} (train "
                         "--save-weights-every N keeps them in run.weights/ beside run.weights.pt; or give --trajectory "
                         "DIR)")
    files = sorted(folder.glob("epoch_*.pt"))
    if not files:
        raise SystemExit(f"{where}: {folder} holds no epoch_NNNNNN.pt files (the weights along training that train "
                         "--save-weights-every N writes)")
    digest, centre, points = hashlib.sha1(), info["state_dict"], {}
    for f in files:
        h = hashlib.sha1()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
        digest.update(f.name.encode() + b"\0" + h.digest())
        try:  # memory-mapped: a long path of a big net is read slice by slice, not held
            blob = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 -- any unreadable file: one line naming it
            raise SystemExit(f"{where}: {f} cannot be read (torch.load: {type(e).__name__})") from None
        if not (isinstance(blob, dict) and blob.get("kind") == WEIGHTS_KIND and blob.get("format") == WEIGHTS_FORMAT):
            raise SystemExit(f"{where}: {f} is not a weights file of shortcut-ext train (format {WEIGHTS_FORMAT})")
        try:
            same = (blob["net"] == info["net"] and blob["data"]["tag"] == info["data"]["tag"]
                    and blob["dtype"] == info["dtype"])
            state, epoch = blob["state_dict"], int(blob["epoch"])
        except (KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"{where}: {f} is damaged ({type(e).__name__}: {e})") from None
        if not same:
            raise SystemExit(f"{where}: {f} is of another run than --weights {args.weights} (another net, data or "
                             "dtype)")
        if blob.get("run") is not None and info.get("run") is not None and blob["run"] != info["run"]:
            raise SystemExit(f"{where}: {f} is of another training run than --weights {args.weights} (the same net "
                             f"and data, other options: run {blob['run']} against {info['run']})")
        fits = isinstance(state, dict) and set(state) == set(centre) and all(
            isinstance(state[n], torch.Tensor) and state[n].shape == centre[n].shape and state[n].dtype == centre[n].dtype
            and (n == "weight" or torch.equal(state[n], centre[n])) for n in centre)
        if not fits:
            raise SystemExit(f"{where}: {f} does not fit the net of --weights {args.weights} (other shapes, or other "
                             "frozen projections): it is of another run")
        if epoch in points:
            raise SystemExit(f"{where}: two files of {folder} hold epoch {epoch}")
        points[epoch] = state["weight"]
    e0 = int(info["epoch"])
    if e0 in points and not torch.equal(points[e0], centre["weight"]):
        raise SystemExit(f"{where}: the weights of epoch {e0} in {folder} differ from those of --weights {args.weights}"
                         f" (epoch {e0} too): they are of different runs")
    path = {e: net.stack_weights(v) for e, v in points.items() if e != e0}  # in the run's dtype, as saved
    path[e0] = H._W
    return sorted(path.items(), key=lambda ew: ew[0]), digest.hexdigest(), folder


def _interpolation(ts, loss, at_init: float, center: float) -> dict:
    """On the line from the far end (t = 1: the initial weights, or --other's) to --weights (t = 0), over the
    grid points between them: does the loss fall all the way, and how far does it rise above the higher end
    (the barrier between two minima)?"""
    inside = [(t, v) for t, v in zip(ts, loss) if 0 < t < 1]
    seq = np.array([at_init] + [v for _, v in sorted(inside, reverse=True)] + [center], dtype=np.float64)
    rise = np.diff(seq)
    return {"monotonic": bool(np.all(rise <= 0)), "max_rise": float(max(0.0, np.nanmax(rise))),
            "barrier": float(max(0.0, np.nanmax(seq) - max(seq[0], seq[-1]))), "grid_points_between": len(inside)}


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


def _plot(path, args, ts, ss, loss, model, center, what=None, result=None) -> None:
    from matplotlib.figure import Figure  # outside pyplot: the caller's backend is untouched

    net = what.replace(", trained", ",\ntrained") if what else ((f"plain net, depth {args.units}" if args.shortcut == 0 else
                    f"{args.shortcut}-shortcut net, {args.units} units") + f", d = {args.width}, init {args.init}")
    fig = Figure(figsize=(7, 4.8))
    ax = fig.subplots()
    if ss is None:
        ax.plot(ts, loss, "o-", ms=3, label="loss")
        ax.plot(ts, model, "--", label="quadratic model (gradient, Hessian)")
        ax.plot([0], [center], "kx", ms=8, label="the weights")
        pts = (result or {}).get("path")
        if args.directions == "pca":
            ax.plot([p["coords"][0] for p in pts], [p["loss"] for p in pts], "r.:", ms=5, lw=0.8,
                    label="the training path (each point's own loss, at its coordinate)")
            ax.set_xlabel(f"t (along the training path's principal direction: "
                          f"{result['explained_variance'][0]:.0%} of its variance)")
        elif args.directions == "init":
            ax.plot([1], [pts[0]["loss"]], "rs", ms=6, label="the initial weights")
            ax.set_xlabel("t (0: the trained weights, 1: the initial weights)")
        elif args.directions == "between":
            ax.plot([1], [pts[0]["loss"]], "rs", ms=6, label=f"--other (epoch {pts[0]['epoch']})")
            if result.get("curve"):
                c = result["curve"]
                ax.plot(c["ts"], c["loss"], "g.-", ms=4, lw=1,
                        label=f"along a fitted Bezier curve ({c['steps']} steps; t: its parameter)")
            ax.set_xlabel("t (0: --weights, 1: --other" + (", its hidden units aligned)" if args.align else ")"))
        elif args.directions == "hessian":
            ax.set_xlabel(f"t (along the {_MATRIX_WORDS[result['eigen'].get('matrix', 'hessian')]} top eigenvector: "
                          f"lambda max = {result['eigen']['eigenvalues'][0]:.4g})")
        else:
            ax.set_xlabel(f"t (steps along a {args.normalize} random direction)")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    else:
        finite = loss[np.isfinite(loss)]
        levels = 25
        if finite.size and finite.max() > finite.min():  # geometric where the loss spans a decade or more (the
            lo, hi = finite.min(), finite.max()          # basin's contours, not only the walls')
            levels = np.geomspace(lo, hi, 25) if lo > 0 and hi > 10 * lo else np.linspace(lo, hi, 25)
        cs = ax.contourf(ts, ss, loss.T, levels=levels, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="loss")
        ax.contour(ts, ss, model.T, levels=cs.levels, colors="white", linestyles="dashed", linewidths=0.6)
        ax.plot([0], [0], "rx", ms=8)
        if args.directions == "pca":
            pts, ex = result["path"], result["explained_variance"]
            ax.plot([p["coords"][0] for p in pts], [p["coords"][1] for p in pts], "r.-", ms=5, lw=1)
            for p in (pts[0], pts[-1]):
                ax.annotate(f"epoch {p['epoch']}", p["coords"], fontsize=7, color="red",
                            xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(f"t (the path's first principal direction: {ex[0]:.0%} of its variance)")
            ax.set_ylabel(f"s (second: {ex[1]:.0%})")
        elif args.directions == "hessian":
            lam = result["eigen"]["eigenvalues"]
            ax.set_xlabel(f"t (the {_MATRIX_WORDS[result['eigen'].get('matrix', 'hessian')]} top eigenvector: "
                          f"lambda max = {lam[0]:.4g})")
            ax.set_ylabel(f"s (its second eigenvector: lambda 2 = {lam[1]:.4g})"
                          if result["eigen"].get("matrix") in _PSD else
                          f"s (its bottom eigenvector: lambda min = {lam[1]:.4g})")
            ax.set_aspect("equal")
        elif args.directions == "between":  # --curve --plane: the plane of the two nets and the control point
            c = result["curve"]
            xy = np.array(c["coords"])
            ax.plot([0, 1], [0, 0], "r:", lw=1, label="the line")
            ax.plot(xy[:, 0], xy[:, 1], "r.-", ms=4, lw=1.2, label=f"the fitted Bezier curve ({c['steps']} steps)")
            ax.plot([1], [0], "rs", ms=6, label="--other")
            ax.plot([c["bend_coords"][0]], [1], "r^", ms=6, label="the curve's control point")
            ax.set_xlabel("t (0: --weights, 1: --other" + (", its hidden units aligned)" if args.align else ")"))
            ax.set_ylabel("s (toward the curve's control point, at s = 1)")
            ax.legend(fontsize=7)
        else:
            ax.set_xlabel("t (first direction)")
            ax.set_ylabel("s (second direction)")
            ax.set_aspect("equal")
    ax.set_title(f"loss around the weights: {net}" + ("" if ss is None else " (dashed: quadratic model)"), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


__all__ = ["add_parser", "run"]
