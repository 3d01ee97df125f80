"""``shortcut-ext spectrum``: the Hessian spectrum of one network, with the zero-point theory overlaid.

Computes the ``k`` largest and smallest eigenvalues (Lanczos, with residual norms), the spectral
density by stochastic Lanczos quadrature, ``|lambda|`` quantiles, the index and the condition
numbers; for small nets also the exact spectrum (dense ``eigvalsh``).  At zero initialisation the
closed-form spectrum of Theorem 1 (docs/science.md section 2) is computed without building the Hessian and
compared.  The net comes from the network and data flags, or (``--weights``) is one trained by
``shortcut-ext train --save-weights``, with its data (no theory then).  ``--matrix ggn`` / ``functional``
analyses one of the Hessian's two parts instead, ``H = G + F``: the generalised Gauss-Newton matrix
``G = J^T H_l J`` (positive semi-definite; what Gauss-Newton, natural-gradient and K-FAC methods see) and the
functional part ``F = H - G`` (every negative eigenvalue is its); at an n >= 2 zero point ``G = 0`` and
``F`` is the whole Hessian, which is what Theorem 1 describes, and at the n = 1 zero point ``G``'s spectrum
is ``R eig(A)`` in closed form (``theory.zero_point_spectrum(matrix=)``); the part's theory is compared.  Writes ``spectrum.json`` and ``density.png``, ``extremes.png``, ``quantiles.png`` to ``--out``.
``spectrum.json`` is strict JSON (nan is written as ``null``, +-inf as ``"inf"`` / ``"-inf"``, so a
singular Hessian's condition number reads ``"inf"``); a Lanczos run that did not converge is saved with
``"converged": false`` and a WARNING on stderr.

Memory: the Krylov bases are what grows with the net.  The Lanczos basis and one SLQ group's bases
are each bounded by ``--basis-gib`` (default 3 GiB; the two phases run one after the other):
Lanczos holds what fits (at most max(300, 20 x --top) vectors) and, with ``--lanczos-products`` above that, thick-
restarts; SLQ runs as many probes per group as fit.  A request that cannot fit (``--max-iter``,
``--probe-batch``, or one probe's ``--steps`` basis) is refused with the numbers.

Example (the paper's scale claim: the 2-shortcut zero-point spectrum does not depend on depth)::

    shortcut-ext spectrum --shortcut 2 --units 1000 --width 16 --init zero --data synthetic --out runs/spec
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from .._cli_args import (activation_positions_error, add_activation_args, nonneg_float, nonneg_int, out_dir, out_lock,
                         positive_float, positive_int)
from .._cli_args import seed as seed_type
from .._device import init_distributed, parse_device
from .._dist import together
from .._io import atomic_open, save_figure
from ..ops import release_cache
from ..reference import LOSSES

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
DIGITS_SAMPLES = 1797  # scikit-learn's bundled digits (shortcut_ext.data.digits)
DIGITS_FEATURES = 64  # their 8 x 8 pixels
SYNTHETIC_NOISE = 0.1  # --noise: the synthetic teacher's label noise unless given
THEORY_DENSE_PARAMS = 8192  # the 1-shortcut zero-point Hessian is assembled densely up to this P
MATRIX_NAMES = {"hessian": "Hessian", "ggn": "Gauss-Newton part G", "functional": "functional part H - G",
                "empirical_fisher": "empirical Fisher"}


def steps_type(text: str) -> int:
    """An integer >= 2: Lanczos steps of one SLQ probe."""
    v = positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 2 (one step gives each probe a single quadrature node: no density, no "
            f"quantiles), got {text}")
    return v


def add_problem_args(p, batched: str) -> None:
    """The network and the data-and-loss flags, shared by the commands that analyse one net (``spectrum``,
    ``landscape``); ``batched``: what ``--batch-size`` splits."""
    from ..models import INITS

    g = p.add_argument_group("network")
    g.add_argument("--shortcut", type=nonneg_int, default=2,
                   help="layers per residual unit n (0: a plain net of depth --units)")
    g.add_argument("--units", type=positive_int, default=100, help="residual units R (plain net: depth)")
    g.add_argument("--width", type=positive_int, default=4, help="width d")
    g.add_argument("--init", choices=INITS, default="zero")
    g.add_argument("--scale", type=nonneg_float, default=0.01,
                   help="scale (>= 0) of the 'small' init: Xavier-normal std times this (--init small only)")
    add_activation_args(g)
    g = p.add_argument_group("data and loss")
    g.add_argument("--data", choices=("synthetic", "digits"), default="synthetic",
                   help="synthetic linear teacher, or sklearn's digits (PCA, whitened, one-hot)")
    g.add_argument("--samples", type=positive_int, default=512,
                   help=f"number of samples m (digits: a seeded subset, at most {DIGITS_SAMPLES})")
    g.add_argument("--noise", type=nonneg_float, default=None,
                   help=f"label noise (>= 0) of the synthetic teacher (default {SYNTHETIC_NOISE}; --data synthetic only)")
    g.add_argument("--loss", choices=LOSSES, default="mse")
    g.add_argument("--batch-size", type=positive_int, default=None, help=f"mini-batch size of the {batched} (the loss "
                   "and Hessian are always the full-data ones)")
    p.add_argument_group("trained weights").add_argument(
        "--weights", default=None, metavar="FILE",
        help="a trained net instead: the .weights.pt file of shortcut-ext train --save-weights (the net, its weights "
             "and its data come from the run: leave the network and data flags out)")


def trained_problem(args, command: str, dtype: torch.dtype, seed_flag: bool = True, full: bool = False):
    """``--weights``: ``(net, X, Y, what)`` of the trained run on the CPU (``what`` describes it), after refusing the
    network and data flags it replaces (and ``--seed`` where ``seed_flag``: the seed of the init and the data);
    with ``full``, also ``load_weights``'s ``(bundle, info)``.
    Sets ``args.weights_sha1``: a checkpoint belongs to the weights, not to their file's name."""
    from ..experiments.train_cmd import load_weights

    spare = argparse.ArgumentParser()
    add_problem_args(spare, "")
    defaults = dict(vars(spare.parse_args([])), noise=SYNTHETIC_NOISE)  # a given --noise: refused by _check_options
    given = [f"--{k.replace('_', '-')}" for k, v in defaults.items()
             if k not in ("batch_size", "weights") and getattr(args, k) != v]
    if seed_flag and args.seed != 0:
        given.append("--seed")
    if given:
        raise SystemExit(f"shortcut-ext {command}: {', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect "
                         f"with --weights {args.weights}: the net and its data come from the trained run (leave "
                         f"{'it' if len(given) == 1 else 'them'} out)")
    net, bundle, info = load_weights(args.weights, command, dtype=dtype)
    args.weights_sha1 = info["file_sha1"]
    n = info["net"]
    when = (f"trained {info['epoch']} epochs" if info["epoch"] == info["epochs"] else
            f"after epoch {info['epoch']} of {info['epochs']}")
    what = f"{n['arch']} ({n['act']}), depth {n['depth']}, d = {bundle.width}, {when} on {bundle.tag}"
    return (net, bundle.X, bundle.Y, what) + ((bundle, info) if full else ())


def build_problem(args, dtype: torch.dtype):
    """``(net, X, Y)`` on ``args.device`` from the flags of :func:`add_problem_args` (cross-entropy: class indices)."""
    from ..models import PlainNet, ShortcutNet

    X, Y = load_data(args.data, args.samples, args.width, args.seed, args.noise, dtype)
    q_out = Y.shape[1]  # digits: 10 one-hot columns, whatever the width (then a frozen read-out)
    out_features = None if q_out == args.width else q_out
    if args.loss == "cross_entropy":
        Y = Y.argmax(dim=1)  # class indices (synthetic: the teacher's largest output)
    if args.shortcut == 0:
        net = PlainNet(args.width, args.units, activation=args.mid, init=args.init, scale=args.scale,
                       seed=args.seed, out_features=out_features, dtype=dtype)
    else:
        net = ShortcutNet(args.width, args.units, args.shortcut, args.pre, args.mid, args.post, init=args.init,
                          scale=args.scale, seed=args.seed, out_features=out_features, dtype=dtype)
    return net.to(args.device), X.to(args.device), Y.to(args.device)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from .hessian import BACKENDS, MATRICES

    p = subparsers.add_parser(
        "spectrum", help="Hessian spectrum of a network (extremes, SLQ density, |lambda| quantiles, theory)",
        description=__doc__.split("\n\n")[0] + " Writes JSON and PNG figures.",
    )
    add_problem_args(p, "HVPs")
    g = p.add_argument_group("estimators")
    g.add_argument("--top", type=positive_int, default=5, help="extreme eigenvalues at each end")
    g.add_argument("--probes", type=positive_int, default=8,
                   help="SLQ probes (run in batched groups, see --probe-batch)")
    g.add_argument("--steps", type=steps_type, default=80,
                   help="Lanczos steps per SLQ probe, >= 2 (each step adds one quadrature node per probe)")
    g.add_argument("--probe-batch", type=positive_int, default=None,
                   help="SLQ probes per group (default: as many as fit in --basis-gib)")
    g.add_argument("--max-iter", type=positive_int, default=None,
                   help="Lanczos basis size for the extremes, at least 2 x --top (default: what fits in "
                        "--basis-gib, at most max(300, 20 x --top))")
    g.add_argument("--lanczos-products", type=positive_int, default=None,
                   help="Lanczos products in all, at least 2 x --top; above the basis size the basis is "
                        "thick-restarted (default: no restarts)")
    g.add_argument("--basis-gib", type=positive_float, default=3.0,
                   help="memory budget (GiB, > 0) of the Lanczos basis and of one SLQ group's bases")
    g.add_argument("--no-verify", action="store_true", help="skip Lanczos's multiplicity check (faster)")
    g.add_argument("--exact-max-params", type=nonneg_int, default=2048,
                   help="also compute the dense spectrum up to this P (0: never); above "
                        f"{THEORY_DENSE_PARAMS} it also raises the limit of the dense 1-shortcut theory")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_type, default=0)
    g.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    g.add_argument("--backend", choices=BACKENDS, default="fused", help="HVP backend")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the network, data and HVPs live")
    g.add_argument("--distributed", action="store_true",
                   help="data-parallel HVPs over torch.distributed, launched with torchrun (gloo on cpu, NCCL on "
                        "cuda: each rank takes cuda:LOCAL_RANK); rank r holds samples r, r + world, ...; rank 0 writes")
    g.add_argument("--matrix", choices=MATRICES, default="hessian",
                   help="the Hessian H (default), its generalised Gauss-Newton part G = J^T H_l J (ggn), or the rest "
                        "F = H - G (functional); or the empirical Fisher (1/m) sum_i grad l_i grad l_i^T (empirical_fisher); on "
                        "the CPU's fused backend each costs one call a product (G and the empirical Fisher about half "
                        "an H's at many directions), elsewhere F costs two")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _check_options(args, command: str = "spectrum") -> None:
    """Refuse combinations the argument types cannot see: flags the chosen net or data would ignore, and
    more samples than the data holds."""
    def refuse(msg):
        raise SystemExit(f"shortcut-ext {command}: {msg}")

    positions = activation_positions_error(args)
    if positions:
        refuse(positions)
    if args.init != "small" and args.scale != 0.01:
        refuse(f"--scale {args.scale} has no effect with --init {args.init}: it scales the 'small' init only "
               "(use --init small, or drop --scale)")
    if args.noise is not None and (args.data != "synthetic" or getattr(args, "weights", None) is not None):
        refuse(f"--noise {args.noise} has no effect with " + (f"--data {args.data}" if args.weights is None else
               f"--weights {args.weights}") + ": it is the label noise of the synthetic teacher (use --data "
               "synthetic, or drop --noise)")
    if args.noise is None:
        args.noise = SYNTHETIC_NOISE  # recorded as before: the value the synthetic teacher uses
    if args.data == "digits" and args.weights is None and args.width > DIGITS_FEATURES:
        refuse(f"--width {args.width} does not fit --data digits: its images have {DIGITS_FEATURES} pixels, the most "
               "input features a net of it can take (lower --width)")
    if args.data == "digits" and args.samples > DIGITS_SAMPLES:
        refuse(f"--samples must be <= {DIGITS_SAMPLES}, the number of samples of --data digits, got "
               f"{args.samples} (--data synthetic draws any number)")


def load_data(kind: str, m: int, d: int, seed: int, noise: float, dtype: torch.dtype):
    """``(X, Y)`` of the chosen data set (synthetic falls back to a local teacher if ``shortcut_ext.data``
    is missing)."""
    if kind == "digits":
        from ..data import digits

        try:
            return digits(d=d, seed=seed, m=m, dtype=dtype)  # refuses m above the 1797 samples
        except ValueError as e:
            if "input features" in str(e):
                raise SystemExit(f"--width {d} does not fit --data digits: {e} (lower --width)") from None
            if "principal components" not in str(e):
                raise
            more = ", or raise --samples: all 1797 samples have 61 such components" if m < 1797 else ""
            raise SystemExit(f"--width {d} does not fit --data digits with --samples {m}: {e} (lower --width"
                             f"{more})") from None
    try:
        from ..data import synthetic_teacher
    except ImportError:  # pragma: no cover - data.py not present
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(m, d, generator=g, dtype=torch.float64, device="cpu")
        T = torch.randn(d, d, generator=g, dtype=torch.float64, device="cpu") / math.sqrt(d)
        Y = X @ T.T + noise * torch.randn(m, d, generator=g, dtype=torch.float64, device="cpu")
        return X.to(dtype), Y.to(dtype)
    return synthetic_teacher(m, d, seed=seed, noise=noise, dtype=dtype)


def _environment() -> dict:
    from ..experiments.report import environment

    return environment()


def _flag_hint(e: ValueError, words, flags: str):
    """Lanczos' or SLQ's refusal of a size (its message names one of ``words``) ends the command naming
    the flags to change; any other ValueError goes on to the command's one-line error as it is."""
    if any(w in str(e) for w in words):
        raise SystemExit(f"shortcut-ext spectrum: {e} (flags: {flags})") from e
    raise e


def _progress(desc: str, disable: bool):
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, total=1, disable=disable, leave=False, dynamic_ncols=True)

    def cb(done, total):
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return bar, cb


def run(args) -> int:
    # the flags' ranges are checked by their argparse types; here what depends on several of them
    _check_options(args)
    budget = max(1, int(args.basis_gib * 2**30))
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    args.device = parse_device(args.device, "spectrum")
    created_group = False
    rank, world = 0, 1
    if args.distributed:
        created_group, rank, world, args.device = init_distributed("spectrum", args.device)
    try:
        # (a file one rank lacks stops every rank, not only that one)
        with together(bool(args.distributed), "spectrum"):
            # a trained net (--weights) is loaded first: its size is the file's, not the flags'
            trained = None if args.weights is None else trained_problem(args, "spectrum", dtype, seed_flag=False)
            _check_memory(args, budget, None if trained is None else trained[0].weight.numel())
            out_dir(args.out, "spectrum")  # before any work (every rank: they all read the checkpoint there)
        with out_lock(os.path.join(args.out, ".shortcut-ext.lock"), "spectrum", lead=rank == 0,
                      distributed=bool(args.distributed), device=args.device):
            return _run(args, dtype, budget, rank, world, trained)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, dtype, budget, rank, world, trained=None) -> int:
    from .. import theory
    from .condition import report_from_eigenvalues, symmetrize_lower_
    from .hessian import HessianOperator
    from ._linop import zero_tol_rel
    from .lanczos import lanczos
    from .slq import slq

    lead = rank == 0  # the rank that prints and writes; every rank computes the same spectrum
    quiet = args.no_progress or not lead
    t_start = time.perf_counter()

    if trained is None:
        net, X, Y = build_problem(args, dtype)
        what = None
    else:
        net, X, Y, what = trained
        net, X, Y = net.to(args.device), X.to(args.device), Y.to(args.device)
    Xs, Ys = (X[rank::world], Y[rank::world]) if args.distributed else (X, Y)  # this rank's shard
    if args.batch_size is None:
        data = [(Xs, Ys)] if Xs.shape[0] else []
    else:
        data = [(Xs[i:i + args.batch_size], Ys[i:i + args.batch_size]) for i in range(0, Xs.shape[0], args.batch_size)]
    H = HessianOperator(net, data, loss=args.loss, backend=args.backend, dtype=dtype, distributed=args.distributed,
                        matrix=args.matrix)
    _check_sizes(args, H.P, H.dtype, budget)
    # read by every rank before the first product (rank 0 writes it only after collectives): all skip alike
    with together(bool(args.distributed), "spectrum"):  # (each node's own --out)
        ckpt = _Checkpoint(args, write=lead)
    if args.distributed:  # resume only what every rank read alike (e.g. each node's own --out): else afresh
        ckpt.agree(H.device)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "func"}, "net": what,
        "num_params": H.P, "backend_used": H.backend_used, "fallback_reason": H.fallback_reason,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "timings_s": {},
        "environment": _environment(),  # versions, build, threads, machine: what a reviewer asks
        "world_size": world, "matrix": args.matrix,
    }
    loss, grad = H.loss_and_grad()
    result["loss"], result["grad_norm"] = float(loss), float(grad.norm())

    # extremes
    lz = ckpt.lanczos()
    result["resumed"] = {"lanczos": lz is not None, "slq_probes": len(ckpt.slq_done), "checkpoint": ckpt.path,
                         "seconds_unknown": ckpt.seconds_unknown}  # not in timings_s: an older checkpoint
    if lz is not None or ckpt.slq_done:  # say so, as train does: a finished run's rerun returns its numbers
        ckpt._say(f"resuming from the checkpoint {ckpt.path}: the Lanczos extremes "
                  f"{'are' if lz is not None else 'are not'} done, {len(ckpt.slq_done)} of {args.probes} SLQ probes "
                  "done")
    # the timings of every process that computed this spectrum: a resumed run's own, plus the checkpoint's
    earlier = dict(ckpt.seconds)
    if lz is not None and "lanczos" in earlier:
        result["timings_s"]["lanczos"] = earlier["lanczos"]
    if lz is None:
        bar, cb = _progress("lanczos", quiet)
        t0 = time.perf_counter()
        try:
            lz = lanczos(H, k=min(args.top, H.P), max_iter=args.max_iter, verify=not args.no_verify, seed=args.seed,
                         return_vectors=False, callback=cb, max_basis_bytes=budget,
                         max_products=args.lanczos_products)
        except ValueError as e:  # a basis that does not fit the budget: say which flag to change
            _flag_hint(e, ("max_iter", "max_products", "basis"), "--max-iter, --lanczos-products, --basis-gib")
        finally:
            bar.close()
        result["timings_s"]["lanczos"] = time.perf_counter() - t0
        ckpt.save_lanczos(lz, result["timings_s"]["lanczos"])
    result["lanczos"] = {
        "largest": lz.largest.tolist(), "smallest": lz.smallest.tolist(),
        "largest_residuals": lz.largest_residuals.tolist(), "smallest_residuals": lz.smallest_residuals.tolist(),
        "num_vectors": lz.num_vectors, "num_products": lz.num_products, "breakdowns": lz.breakdowns,
        "segments": [list(s) for s in lz.segments], "converged": lz.converged, "stop_reason": lz.stop_reason,
        "restarts": lz.restarts, "max_vectors": lz.max_vectors, "basis_bytes": lz.basis_bytes,
    }
    warnings = []
    unconverged = _unconverged_message(args, lz) if not lz.converged else None
    if unconverged:
        warnings.append(unconverged)
    if H.dtype == torch.float32:
        result["float32_check"] = chk = _float32_check(net, data, args, H)
        if chk["rel_error"] is not None and chk["rel_error"] > 1e-3:
            warnings.append(f"float32 Hessian-vector products differ from float64 ones by {chk['rel_error']:.2g} "
                            "(relative, one random direction): the float32 spectrum is unreliable; use --dtype "
                            "float64")
        if 0 < lz.abs_max < 1e-18:
            warnings.append(f"|lambda|max = {lz.abs_max:.3g} is near float32's underflow (norms of vectors this "
                            "small lose digits or vanish): the float32 extremes and density are unreliable; use "
                            "--dtype float64")
    result["converged"] = bool(lz.converged)  # of the Lanczos extremes (and so of |lambda|max, the conditions)
    # density; the Lanczos products' buffers (one direction) do not fit SLQ's (a group of probes): freed
    # before SLQ allocates its bases, so that they do not add to its peak (about 1 GB at P = 5.12 million)
    release_cache()
    bar, cb = _progress("slq", quiet)
    t0 = time.perf_counter()
    ckpt.start_slq(t0)
    try:
        sq = slq(H, probes=args.probes, steps=args.steps, seed=args.seed + 1, callback=cb,
                 probe_batch=args.probe_batch, max_basis_bytes=budget, done=ckpt.slq_done,
                 on_group=ckpt.save_slq_group)
    except ValueError as e:
        _flag_hint(e, ("probe_batch", "steps", "basis"), "--probe-batch, --steps, --basis-gib")
    finally:
        bar.close()
    if "slq" in ckpt.seconds_unknown:  # an older checkpoint's probes: their time is unknown, only this share
        result["timings_s"]["slq_this_process"] = time.perf_counter() - t0
    else:
        result["timings_s"]["slq"] = earlier.get("slq", 0.0) * bool(ckpt.slq_done) + time.perf_counter() - t0
    sigma = sq.default_sigma()
    grid, dens = sq.density(sigma=sigma)
    lam_max = lz.abs_max
    zero_tol = zero_tol_rel(H.dtype) * lam_max  # rounding in the products moves zero eigenvalues about this far
    result["slq"] = {
        "probes": args.probes, "probe_batch": sq.probe_batch, "basis_bytes": sq.basis_bytes,
        "steps": sq.num_steps.tolist(), "nodes": sq.nodes.tolist(),
        "weights": sq.weights.tolist(), "grid": grid.tolist(), "density": dens.tolist(), "sigma": sigma,
        "abs_quantiles": {str(q): sq.abs_quantile(q) for q in QUANTILES},
        "abs_q10_probe_std": float(np.std(sq.abs_quantile_per_probe(0.1), ddof=1)) if args.probes > 1 else None,
        "index": sq.negative_mass(zero_tol), "trace": sq.trace(1), "trace_sq": sq.trace(2),
    }
    lam_q10 = sq.abs_quantile(0.1)
    idx_unres, q_unres = sq.sign_unresolved_mass(), sq.quantile_unresolved_mass(0.1)
    result["slq"].update(index_unresolved_mass=idx_unres, q10_unresolved_mass=q_unres)
    result["condition"] = {"lam_max": lam_max, "lam_max_residual": lz.abs_max_residual, "lam_q10": lam_q10,
                           # a zero Hessian (lam_max = 0) has no condition number: nan, as the exact block says
                           "cond_q10": (lam_max / lam_q10 if lam_q10 > zero_tol else float("inf")) if lam_max > 0
                           else float("nan"),
                           "index": result["slq"]["index"], "zero_tol": zero_tol, "method": "lanczos+slq",
                           "converged": bool(lz.converged), "lam_q10_resolved": bool(q_unres < 0.05)}
    if H.dtype == torch.float32 and lam_max > 0:  # what float32's zero tolerance (sqrt(eps) |lambda|max) decided
        x, wts = sq.pooled()
        band = float(wts[(x < 0) & (x >= -zero_tol)].sum())
        if 0 < lam_q10 <= zero_tol:
            warnings.append(f"SLQ: |lambda|(0.1) = {lam_q10:.3g} is below float32's zero tolerance {zero_tol:.3g} "
                            "(sqrt(eps) |lambda|max), so cond_q10 is reported inf: those eigenvalues are zero or "
                            "below float32's resolution; a --dtype float64 run tells them apart")
        if band >= 0.01:
            warnings.append(f"SLQ: {band:.1%} of the spectrum lies in [-{zero_tol:.3g}, 0), within float32's zero "
                            "tolerance, and is not counted in the index (zero, or negative below float32's "
                            "resolution: a --dtype float64 run tells them apart)")
    if q_unres >= 0.05 or idx_unres >= 0.05:
        warnings.append(
            f"SLQ did not resolve the spectrum near 0 with --steps {args.steps}: {q_unres:.1%} of it lies at nodes "
            f"below |lambda|(0.1) whose Ritz interval contains 0, and {idx_unres:.1%} at nodes of unresolved sign, "
            f"so |lambda|(0.1) = {lam_q10:.3g} and cond_q10 are unreliable (off by factors either way) and the "
            f"index {result['slq']['index']:.3f} may be off by up to ~{idx_unres:.2f}; the spread across probes "
            f"does not show this. Raise --steps (saved with \"lam_q10_resolved\": false)"
            if q_unres >= 0.05 else
            f"SLQ left {idx_unres:.1%} of the spectrum at nodes of unresolved sign (Ritz interval containing 0) with "
            f"--steps {args.steps}: the index {result['slq']['index']:.3f} may be off by up to ~{idx_unres:.2f}. "
            f"Raise --steps")

    # exact spectrum for small nets
    exact = None
    if H.P <= args.exact_max_params:
        t0 = time.perf_counter()
        D = H.to_dense(force=True)  # --exact-max-params is the limit asked for; its memory was checked up front
        D = D.double().cpu()
        symmetrize_lower_(D)  # (D + D^T) / 2 in float64, in place: what eigvalsh reads
        exact = torch.linalg.eigvalsh(D).numpy()
        del D
        result["timings_s"]["exact"] = time.perf_counter() - t0
        # the zero tolerance follows the dtype the products were computed in (float32: P * eps32 * |lambda|max)
        result["exact"] = report_from_eigenvalues(exact, k=args.top, dtype=H.dtype).as_dict()
        # the exact numbers replace SLQ's estimates in the summary (SLQ's stay in the "slq" block): with few
        # weights SLQ's quadrature can be far off (P = 2: every probe an eigenvector, index 0.75 for 0.5)
        ex = result["exact"]
        # exact values: converged, with no Lanczos residual (the "lanczos" block keeps its own)
        result["condition"].update(lam_max=ex["lam_max"], lam_q10=ex["lam_q10"], cond_q10=ex["cond_q10"],
                                   cond=ex["cond"], index=ex["index"], zero_tol=ex["uncertainty"]["zero_tol"],
                                   method="exact", lam_q10_resolved=True, converged=True, lam_max_residual=None)
        result["converged"] = True
        notes = [w for w in warnings if w.startswith("SLQ")]  # about estimates the exact values replace
        if notes:
            warnings[:] = [w for w in warnings if not w.startswith("SLQ")]
            result["slq"]["notes"] = notes
        if unconverged:  # its extremes are replaced too: a note on the Lanczos block, not a warning
            warnings.remove(unconverged)
            result["lanczos"]["notes"] = [unconverged + " (the exact spectrum replaces them in \"condition\")"]
        nz = result["exact"]["uncertainty"]["num_zero"]
        if H.dtype == torch.float32 and nz and 0 < nz < H.P:
            warnings.append(f"{nz} eigenvalues of the exact spectrum lie within float32's zero tolerance "
                            f"({result['exact']['uncertainty']['zero_tol']:.3g} = P eps |lambda|max) and count as "
                            "zero: they are zero or below float32's resolution (then cond is not really inf); a "
                            "--dtype float64 run tells them apart")

    # theory at the zero point
    spec = None
    if args.shortcut >= 1 and args.init == "zero" and trained is None:  # (a trained net is not at its zero point)
        # the theory of the matrix analysed (theory.zero_point_spectrum): the Gauss-Newton part is 0 at n >= 2
        # and in closed form at n = 1; the functional part is the Hessian at n >= 2
        dense_limit = max(THEORY_DENSE_PARAMS, args.exact_max_params)
        if args.shortcut == 1 and args.matrix != "ggn" and H.P > dense_limit:  # no closed form: assembled densely
            result["theory"] = {"skipped": (
                f"the 1-shortcut zero-point theory has no closed form: it is a dense P x P eigendecomposition, "
                f"skipped for P above {dense_limit}; this net has P = {H.P}: raise --exact-max-params to {H.P} to "
                "compute it (and the dense spectrum of the net), or lower --units / --width")}
        else:
            try:
                spec = theory.model_zero_point_spectrum(net, X.cpu(), Y.cpu(), loss=args.loss,
                                                        max_dense_params=dense_limit, matrix=args.matrix)
            except ValueError as e:
                result["theory"] = {"skipped": str(e)}
        if lead and "theory" in result:
            print(f"shortcut-ext spectrum: theory skipped: {result['theory']['skipped']}")
    if spec is not None:
        ev = spec.eigenvalues()
        rep = report_from_eigenvalues(ev, k=args.top)
        # Errors are measured against the spectrum's scale, |lambda|max of the theory (of the measurement
        # where the theory is all zero), not against the value itself: a numerically zero eigenvalue or
        # quantile (~1e-17) compared with another one is agreement, not a 100% error.
        scale = float(np.abs(ev).max())
        if not scale > 0:
            scale = float(lam_max) if lam_max > 0 else 1.0
        k_top = len(lz.largest)
        vals, mult = spec.distinct()
        result["theory"] = {
            "method": spec.method, "distinct_values": vals.tolist(), "multiplicities": mult.tolist(),
            "singular_values_M": None if spec.singular_values is None else spec.singular_values.tolist(),
            "slope": spec.slope, "gradient_norm": spec.gradient_norm,
            "assumptions": {"holds": spec.assumptions.holds, "notes": spec.assumptions.notes},
            "report": rep.as_dict(),
            "rel_error_scale": scale,
            "rel_error_definition": ("|measured - theory| / rel_error_scale (|lambda|max of the theory; the "
                                     "measured one where the theory is all zero)"),
            "lanczos_rel_error": (max(float(np.abs(lz.largest - ev[::-1][:k_top]).max()),
                                      float(np.abs(lz.smallest - ev[:k_top]).max())) / scale) if k_top else None,
            "slq_q10_rel_error": abs(lam_q10 - rep.lam_q10) / scale,
            # the whole dense spectrum against the theory's, eigenvalue by eigenvalue (sorted)
            "exact_rel_error": (float(np.abs(np.sort(exact) - np.sort(np.asarray(ev, dtype=np.float64))).max()) / scale
                                if exact is not None and len(exact) == len(ev) else None),
        }
        if not spec.assumptions.holds:
            warnings.append("the zero-point theory's assumptions do not hold here, so its spectrum is not the "
                            "Hessian's: " + "; ".join(spec.assumptions.notes))
    # this process's wall time plus what earlier processes spent on the phases it resumed
    result["timings_s"]["total"] = time.perf_counter() - t_start + sum(
        v for k, v in earlier.items() if (k == "lanczos" and result["resumed"]["lanczos"])
        or (k == "slq" and result["resumed"]["slq_probes"]))
    result["timings_s"]["this_process"] = time.perf_counter() - t_start
    if not lead:
        return 0
    result["warnings"] = warnings
    path = os.path.join(args.out, "spectrum.json")
    with atomic_open(path) as f:  # whole or not at all
        f.write(to_strict_json(result, indent=1))
    if not args.no_plots:
        _plots(args.out, sq, grid, dens, sigma, lz, exact, spec, MATRIX_NAMES[args.matrix])
    c = result["condition"]
    print(f"P = {H.P}  " + ("" if args.matrix == "hessian" else f"{MATRIX_NAMES[args.matrix]}: ")
          + f"|lambda|max = {c['lam_max']:.6g}"
          + ("" if c["method"] == "exact" else f" (residual {lz.abs_max_residual:.2g})") + "  "
          f"|lambda|(0.1) = {c['lam_q10']:.6g}  index = {c['index']:.4f}"
          + ("  (exact spectrum)" if c["method"] == "exact" else "") + f"  -> {args.out}")
    if spec is not None:
        err, ex_err = result["theory"]["lanczos_rel_error"], result["theory"]["exact_rel_error"]
        print(f"theory ({spec.method}): |lambda|max = {result['theory']['report']['lam_max']:.6g}  "
              + (f"exact spectrum error / |lambda|max {ex_err:.2e}, " if ex_err is not None else "")
              + f"Lanczos error / |lambda|max {'n/a' if err is None else f'{err:.2e}'}"
              + ("" if lz.converged else " (Lanczos did not converge: see "
                 + ("its \"notes\" in spectrum.json)" if result["lanczos"].get("notes") else "the warning)")))
    for w in warnings:
        print(f"shortcut-ext spectrum: WARNING: {w}", file=sys.stderr)
    return 0


def _check_memory(args, budget: int, P: int | None = None) -> None:
    """Refuse, before any work, a net whose weights (the model's, the operator's copy, a direction and a
    product: 4 x P numbers) or whose --basis-gib cannot fit in the device's memory.  ``P``: the trunk's size
    where the flags do not give it (a trained net's)."""
    from .._cli_args import device_memory

    itemsize = 8 if args.dtype == "float64" else 4
    if P is None:
        P = args.units * max(args.shortcut, 1) * args.width ** 2
    have, where = device_memory(args.device)
    # the bases take what the run needs within --basis-gib (a cap): the Lanczos basis (--max-iter, else up to
    # max(300, 20 --top) vectors) or one SLQ group (--probe-batch, else up to --probes, x (--steps + 1))
    lanczos = args.max_iter or max(300, 20 * args.top)
    group = (args.probe_batch or args.probes) * (args.steps + 1)
    bases = min(budget, min(max(lanczos, group), P + 1) * P * itemsize)
    local = 1
    if args.distributed and not str(args.device).startswith("cuda"):  # the ranks on this machine share its memory
        local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
        bases *= local
    if bases > have:
        raise SystemExit(f"shortcut-ext spectrum: --basis-gib {args.basis_gib:g} lets the Krylov bases of this run "
                         f"take {bases / 2**30:.3g} GiB" + (f" ({local} ranks on this machine)" if local > 1 else "")
                         + f", more than {where} {have / 2**30:.3g} GiB of memory; lower it")
    if P <= args.exact_max_params:
        # the dense spectrum (and for n = 1 at zero the dense theory): P x P of the operator's dtype, then
        # float64 copies: the matrix (symmetrised in place) and eigvalsh's workspace
        dense = P * P * (itemsize + 2 * 8) * local
        if dense > have:
            raise SystemExit(f"shortcut-ext spectrum: --exact-max-params {args.exact_max_params} asks for the dense "
                             f"spectrum of P = {P} weights, which needs about {dense / 2**30:.3g} GiB, more than "
                             f"{where} {have / 2**30:.3g} GiB of memory; lower --exact-max-params below {P}")
    need = (4 * P * itemsize + min(budget, 3 * P * itemsize)) * local
    if need > have:
        net = (f"--units {args.units} --width {args.width}" if args.weights is None else
               f"the net of --weights {args.weights}")
        raise SystemExit(f"shortcut-ext spectrum: {net} (P = {P} weights) is too "
                         f"large: the weights, the operator's copy, a direction, a product and a small basis need "
                         f"{need / 2**30:.3g} GiB of {args.dtype}" + (f" ({local} ranks on this machine)" if local > 1
                                                                    else "")
                         + f", more than {where} {have / 2**30:.3g} GiB of memory; "
                         + ("lower --units or --width" if args.weights is None else "use a machine with more memory"))


def _check_sizes(args, P: int, dtype: torch.dtype, budget: int) -> None:
    """Refuse, with the numbers, a --basis-gib that cannot hold one vector and a Lanczos run that cannot
    hold ``--top`` Ritz values at both ends."""
    itemsize = torch.finfo(dtype).bits // 8
    if budget < P * itemsize:
        raise SystemExit(
            f"shortcut-ext spectrum: --basis-gib {args.basis_gib:g} ({budget} bytes) cannot hold one basis vector "
            f"of P = {P} {str(dtype).replace('torch.', '')} numbers ({P * itemsize} bytes): raise --basis-gib to at "
            f"least {_gib_ceil(P * itemsize)}")
    k = min(args.top, P)
    need = min(2 * k, P)  # distinct Ritz values for k at each end
    if args.max_iter is not None and min(args.max_iter, P) < need:
        raise SystemExit(
            f"shortcut-ext spectrum: --max-iter {args.max_iter} gives at most {min(args.max_iter, P)} Ritz values, "
            f"but --top {args.top} at both ends needs {need}: raise --max-iter to at least {need} or lower --top")
    if args.max_iter is None and min(budget // (P * itemsize), P) < need:
        raise SystemExit(
            f"shortcut-ext spectrum: --basis-gib {args.basis_gib:g} holds {budget // (P * itemsize)} basis vectors "
            f"of P = {P}, but --top {args.top} at both ends needs {need}: raise --basis-gib to at least "
            f"{_gib_ceil(need * P * itemsize)} or lower --top")
    if args.lanczos_products is not None and args.lanczos_products < need:
        raise SystemExit(
            f"shortcut-ext spectrum: --lanczos-products {args.lanczos_products} gives at most "
            f"{args.lanczos_products} Ritz values, but --top {args.top} at both ends needs {need}: raise "
            f"--lanczos-products to at least {need} or lower --top")


def _gib_ceil(nbytes: int) -> str:
    """``nbytes`` in GiB, rounded up to 3 significant digits (a value that is enough)."""
    g = nbytes / 2**30
    e = math.floor(math.log10(g)) - 2
    return f"{math.ceil(g / 10**e) * 10**e:.3g}"


def _float32_check(net, data, args, H) -> dict:
    """One Hessian-vector product of the float32 operator against the same product in float64 (a float64
    copy of the model and data): how far the float32 numbers can be trusted at this depth."""
    import copy

    from .hessian import HessianOperator

    net64 = copy.deepcopy(net).double()
    data64 = [(x.double(), y.double() if y.is_floating_point() else y) for x, y in data]
    import warnings

    from .hessian import FallbackWarning

    with warnings.catch_warnings():  # the check's own operator: its backend is recorded, not the run's
        warnings.simplefilter("ignore", FallbackWarning)
        H64 = HessianOperator(net64, data64, loss=args.loss, backend=args.backend, dtype=torch.float64,
                              distributed=args.distributed, matrix=args.matrix)
    v = torch.randn(H.P, generator=torch.Generator().manual_seed(args.seed + 7), dtype=torch.float64, device="cpu")
    v = v.to(H64.device)
    hv64 = H64.matvec(v)
    hv32 = H.matvec(v.to(H.dtype)).double()
    den = float(hv64.norm())
    return {"rel_error": float((hv32 - hv64).norm()) / den if den > 0 else None, "products_float64": 1,
            "float64_backend_used": H64.backend_used}


def _unconverged_message(args, lz) -> str:
    """What an unconverged Lanczos run means and which flags to raise."""
    res = max((float(np.max(r)) for r in (lz.largest_residuals, lz.smallest_residuals) if len(r)), default=float("nan"))
    got = "" if len(lz.largest) >= args.top else f"; it found only {len(lz.largest)} of --top {args.top} values"
    now_iter = args.max_iter if args.max_iter is not None else f"{lz.max_vectors}, from --basis-gib"
    now_prod = args.lanczos_products if args.lanczos_products is not None else "unset: no restarts"
    if lz.stop_reason == "converged":  # the budgets were not what stopped it: raising them changes nothing
        return (f"Lanczos stopped on converged estimates after {lz.num_products} products, but the computed "
                f"residuals reach {res:.2g} against |lambda|max {lz.abs_max:.3g}{got} (above sqrt(eps) of the "
                f"dtype): the extremes may be inaccurate (saved with \"converged\": false); a Ritz value's error "
                f"is about residual^2 / gap. --dtype float64 computes the products more accurately")
    return (f"Lanczos did not converge (stopped at {lz.stop_reason} after {lz.num_products} products; largest "
            f"residual {res:.2g} against |lambda|max {lz.abs_max:.3g}){got}: the extremes, |lambda|max and the "
            f"condition numbers are unreliable (saved with \"converged\": false). Raise --max-iter (now "
            f"{now_iter}) or --lanczos-products (now {now_prod})")


def to_strict_json(obj, **kw) -> str:
    """``obj`` as strict JSON: numpy values as numbers and lists, nan as ``null``, +-inf as ``"inf"``
    (:func:`~shortcut_ext.experiments.store.json_safe`)."""
    from ..experiments.store import json_safe

    plain = json.loads(json.dumps(obj, default=_json_default))  # numpy / torch values -> Python (nan kept)
    return json.dumps(json_safe(plain), allow_nan=False, **kw)


# What a spectrum's numbers depend on (a checkpoint is reused only under the same values); where the
# computation runs (device, ranks) and how it is shown do not count.
_PLACEMENT_ARGS = ("out", "no_progress", "no_plots", "device", "distributed", "func")
# Raised whenever what a checkpoint holds would be computed differently; a checkpoint of another format is
# not resumed.  Checkpoints without the field are format 1 (SLQ probes drawn one by one, as now).
CHECKPOINT_FORMAT = 1


class _Checkpoint:
    """``OUT/spectrum.checkpoint.json``: the finished Lanczos result and SLQ probes of this run's
    configuration, written (atomically) as each finishes, so that a rerun after an interruption redoes
    only what had not finished.  A checkpoint of another configuration is ignored (and replaced)."""

    def __init__(self, args, write: bool):
        self.path = os.path.join(args.out, "spectrum.checkpoint.json")
        self.write = write
        # a trained net's weights are known by their digest (weights_sha1), not by their file's path
        self.config = {k: v for k, v in sorted(vars(args).items()) if k not in _PLACEMENT_ARGS + ("weights",)}
        if self.config.get("matrix") == "hessian":  # the default: a checkpoint from before --matrix resumes
            del self.config["matrix"]
        self.state = {"format": CHECKPOINT_FORMAT, "config": self.config, "lanczos": None, "slq": {}}
        if os.path.isdir(self.path):  # found now, not at the first save after the Lanczos phase
            raise SystemExit(f"shortcut-ext spectrum: the checkpoint path {self.path} (in --out) is a folder: move it "
                             "away")
        try:
            if os.path.exists(self.path) and not os.path.isfile(self.path):  # a FIFO or a device: never read it
                raise OSError(f"{self.path} is not a regular file")
            with open(self.path, encoding="utf-8") as f:
                old = json.load(f)
        except FileNotFoundError:
            old = None  # none yet
        except (OSError, ValueError, RecursionError) as e:  # unreadable: start afresh
            old = None
            self._say(f"the checkpoint {self.path} is unreadable ({e}); starting afresh and replacing it")
        if isinstance(old, dict) and "config" in old and old.get("format", 1) != CHECKPOINT_FORMAT:
            self._say(f"the checkpoint in --out {args.out} was written by another version of shortcut_ext "
                      f"(checkpoint format {old.get('format', 1)!r}, this version writes {CHECKPOINT_FORMAT}), whose "
                      "numbers are computed differently; it is not resumed and is being replaced")
        elif isinstance(old, dict):
            mine = json.loads(json.dumps(self.config, default=_json_default))
            theirs = old.get("config")
            if theirs == mine:
                self.state = {"format": CHECKPOINT_FORMAT, "config": self.config, "lanczos": old.get("lanczos"),
                              "slq": old.get("slq") or {}}
                damaged = _damaged_checkpoint(self.state, args)
                if damaged:  # hand-edited or corrupted: its numbers cannot be trusted
                    self._say(f"the checkpoint {self.path} holds damaged entries ({damaged}); starting afresh and "
                              "replacing it")
                    self.state = {"format": CHECKPOINT_FORMAT, "config": self.config, "lanczos": None, "slq": {}}
                    old = None
            else:
                theirs = theirs if isinstance(theirs, dict) else {}
                diff = [f"--{k.replace('_', '-')} {_flag_value(theirs.get(k, '(unset)'))} -> {_flag_value(mine.get(k))}"
                        for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)]
                self._say(f"the checkpoint in --out {args.out} was made with different options "
                          f"({', '.join(diff) or 'unknown'}); it is not resumed and is being replaced")
        elif old is not None or os.path.isfile(self.path):  # (a file holding JSON's null reads as None)
            self._say(f"the checkpoint {self.path} is not a spectrum checkpoint; starting afresh and replacing it")
        self.slq_done = {int(i): (np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), int(n))
                         for i, (a, b, n) in self.state["slq"].items()}
        # seconds earlier processes spent on what the checkpoint holds (absent in older checkpoints)
        resumes = self.state["lanczos"] is not None or bool(self.state["slq"])
        sec = old.get("seconds") if isinstance(old, dict) and resumes else None
        sec = sec if isinstance(sec, dict) else {}  # a damaged entry: the earlier time is unknown, as for an old one
        self.seconds = {k: float(v) for k, v in sec.items()
                        if k in ("lanczos", "slq") and _finite_number(v) and v >= 0}
        self.state["seconds"] = dict(self.seconds)
        # resumed phases whose earlier time the checkpoint does not hold (one written by an older version)
        self.seconds_unknown = [k for k, done in (("lanczos", self.state["lanczos"] is not None),
                                                  ("slq", bool(self.slq_done))) if done and k not in self.seconds]
        self._slq_t0, self._slq_before = None, self.seconds.get("slq", 0.0) if self.slq_done else 0.0

    def agree(self, device) -> None:
        """Distributed: keep the checkpoint only if every rank read the same one (the Lanczos result or not,
        the same SLQ probes); ranks resuming different parts would sum unlike products in one all-reduce."""
        import hashlib

        import torch.distributed as dist

        from .._dist import all_reduce

        text = json.dumps([self.state["lanczos"] is not None, sorted(self.slq_done)], default=_json_default)
        h = float(int(hashlib.sha1(text.encode()).hexdigest()[:12], 16))
        t = torch.tensor([h, -h], dtype=torch.float64, device=device)
        all_reduce(t, None, dist.ReduceOp.MAX)
        if float(t[0]) != -float(t[1]):
            self._say(f"the ranks read different checkpoints from --out {self.path} (each node's own folder?); "
                      "starting afresh on every rank and replacing it")
            self.state = {"format": CHECKPOINT_FORMAT, "config": self.config, "lanczos": None, "slq": {},
                          "seconds": {}}
            self.slq_done, self.seconds, self._slq_before, self.seconds_unknown = {}, {}, 0.0, []

    def _say(self, msg: str) -> None:
        if self.write:
            print(f"shortcut-ext spectrum: {msg}", file=sys.stderr)

    def _flush(self) -> None:
        if not self.write:
            return
        with atomic_open(self.path) as f:
            json.dump(self.state, f, default=_json_default)

    def lanczos(self):
        from .lanczos import LanczosResult

        d = self.state["lanczos"]
        if d is None:
            return None
        arr = {k: np.asarray(d[k], dtype=np.float64) for k in ("largest", "smallest", "largest_residuals",
                                                                  "smallest_residuals", "ritz_values")}
        return LanczosResult(largest_vectors=None, smallest_vectors=None, segments=[tuple(x) for x in d["segments"]],
                             **arr, **{k: d[k] for k in ("num_vectors", "num_products", "breakdowns", "converged",
                                                         "norm_estimate", "stop_reason", "restarts", "max_vectors",
                                                         "basis_bytes")})

    def save_lanczos(self, lz, seconds: float) -> None:
        self.state["lanczos"] = {k: getattr(lz, k) for k in (
            "largest", "smallest", "largest_residuals", "smallest_residuals", "ritz_values", "num_vectors",
            "num_products", "segments", "breakdowns", "converged", "norm_estimate", "stop_reason", "restarts",
            "max_vectors", "basis_bytes")}
        self.state["seconds"]["lanczos"] = float(seconds)
        self._flush()

    def start_slq(self, t0: float) -> None:
        self._slq_t0 = t0

    def save_slq_group(self, g0, g1, alpha, beta, steps) -> None:
        for i in range(g0, g1):
            n = int(steps[i - g0])
            self.state["slq"][str(i)] = [alpha[i - g0, :n].tolist(), beta[i - g0, :n].tolist(), n]
        if self._slq_t0 is not None and "slq" not in self.seconds_unknown:  # every process's SLQ time so far
            self.state["seconds"]["slq"] = self._slq_before + time.perf_counter() - self._slq_t0
        self._flush()


def _finite_number(x) -> bool:
    """A JSON number that is a finite float (not a bool, not an integer beyond float's range)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # json reads 1e400 written as an integer literal as a Python int
        return False


def _damaged_checkpoint(state: dict, args) -> str | None:
    """What is wrong with a checkpoint's Lanczos and SLQ entries (types, sizes, non-finite values), or None."""
    def finite_list(v, n=None):
        return isinstance(v, list) and (n is None or len(v) == n) and all(_finite_number(x) for x in v)

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    lz = state.get("lanczos")
    if lz is not None:
        if not isinstance(lz, dict):
            return "the Lanczos entry is not an object"
        missing = [k for k in ("num_vectors", "num_products", "segments", "breakdowns", "converged", "norm_estimate",
                               "stop_reason", "restarts", "max_vectors", "basis_bytes") if k not in lz]
        if missing:
            return "the Lanczos entry lacks " + ", ".join(missing)
        for k in ("largest", "smallest", "largest_residuals", "smallest_residuals", "ritz_values"):
            if not finite_list(lz.get(k)):
                return f"lanczos.{k} is not a list of finite numbers"
        if not (len(lz["largest"]) == len(lz["smallest"]) == len(lz["largest_residuals"])
                == len(lz["smallest_residuals"])):
            return "the Lanczos lists differ in length"
        if not 1 <= len(lz["largest"]) <= args.top or not lz["ritz_values"]:
            return f"the Lanczos lists hold {len(lz['largest'])} extremes, not 1 to --top {args.top}"
        for k in ("num_vectors", "num_products", "breakdowns", "restarts"):
            if not count(lz.get(k)):
                return f"lanczos.{k} is not a count"
        for k in ("max_vectors", "basis_bytes"):
            if not count(lz.get(k)):
                return f"lanczos.{k} is not a count"
        if not len(lz["largest"]) <= lz["num_vectors"] <= lz["max_vectors"] or lz["max_vectors"] > 2**40:
            return "lanczos.num_vectors is not between the extremes' count and max_vectors"
        if not isinstance(lz.get("converged"), bool):
            return "lanczos.converged is not true or false"
        if not isinstance(lz.get("stop_reason"), str):
            return "lanczos.stop_reason is not a string"
        segments = lz.get("segments")
        if not (isinstance(segments, list) and all(
                isinstance(seg, list) and len(seg) == 3 and count(seg[0]) and count(seg[1]) and seg[0] <= seg[1]
                and isinstance(seg[2], str) for seg in segments)):
            return "lanczos.segments is not a list of [start, end, reason]"
        if not _finite_number(lz.get("norm_estimate")):
            return "lanczos.norm_estimate is not a finite number"
    slq_state = state.get("slq")
    if not isinstance(slq_state, dict):
        return "the SLQ entry is not an object"
    for i, entry in slq_state.items():
        if not (isinstance(i, str) and i.isascii() and i.isdigit() and int(i) < args.probes):
            return f"SLQ probe {i!r} is not one of the {args.probes} probes"
        if not (isinstance(entry, list) and len(entry) == 3 and count(entry[2]) and 1 <= entry[2] <= args.steps):
            return f"SLQ probe {i} is not [alpha, beta, steps] with 1 <= steps <= {args.steps}"
        if not (finite_list(entry[0], entry[2]) and finite_list(entry[1], entry[2])):
            return f"SLQ probe {i}'s recurrence is not {entry[2]} finite numbers each"
    return None


def _flag_value(v) -> str:
    """A config value as the command line shows it."""
    if v is None:
        return "(default)"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _plots(out, sq, grid, dens, sigma, lz, exact, spec, what="Hessian") -> None:
    from matplotlib.figure import Figure  # outside pyplot: the caller's backend is untouched

    # density
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(grid, dens, label=f"SLQ ({sq.num_probes} probes, Gaussian sigma={sigma:.2g})")
    if exact is not None:
        ax.hist(exact, bins=min(200, max(20, len(exact) // 10)), density=True, alpha=0.3, label="exact (dense)")
    if spec is not None:
        vals, mult = spec.distinct()
        w = mult / mult.sum()
        z = (grid[:, None] - vals[None, :]) / sigma
        th = (np.exp(-0.5 * z * z) * w).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))
        ax.plot(grid, th, "--", label=f"theory ({spec.method}), same smoothing")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"{what} spectral density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "density.png"), dpi=120)

    # extremes
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    k = len(lz.largest)
    ax.errorbar(range(1, k + 1), lz.largest, yerr=lz.largest_residuals, fmt="o", label="Lanczos largest")
    ax.errorbar(range(1, len(lz.smallest) + 1), lz.smallest, yerr=lz.smallest_residuals, fmt="s",
                label="Lanczos smallest")
    if spec is not None:
        ev = spec.eigenvalues()
        ax.plot(range(1, k + 1), ev[::-1][:k], "x", ms=10, label="theory")
        ax.plot(range(1, len(lz.smallest) + 1), ev[: len(lz.smallest)], "x", ms=10, color="C2")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("rank from the end")
    ax.set_ylabel("eigenvalue")
    ax.set_title("extreme eigenvalues (error bars: residual norms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "extremes.png"), dpi=120)

    # |lambda| quantiles
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    qs = np.linspace(0.005, 1.0, 200)
    ax.plot(qs, [sq.abs_quantile(q) for q in qs], label="SLQ")
    if exact is not None:
        ax.plot(qs, np.quantile(np.abs(exact), qs, method="inverted_cdf"), label="exact (dense)")
    if spec is not None:
        ax.plot(qs, np.quantile(np.abs(spec.eigenvalues()), qs, method="inverted_cdf"), "--", label="theory")
    ax.axvline(0.1, color="gray", lw=0.5)
    ax.set_xlabel("q")
    ax.set_ylabel("|lambda|(q)")
    lows = [sq.abs_quantile(0.005)]  # a log scale only when every curve stays above zero
    if exact is not None:
        lows.append(float(np.abs(exact).min()))
    if spec is not None:
        lows.append(float(np.abs(spec.eigenvalues()).min()))
    if min(lows) > 0:
        ax.set_yscale("log")
    ax.set_title("quantiles of |eigenvalues| (the paper uses q = 0.1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "quantiles.png"), dpi=120)
