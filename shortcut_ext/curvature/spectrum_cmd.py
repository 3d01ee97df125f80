"""``shortcut-ext spectrum``: the Hessian spectrum of one network, with the zero-point theory overlaid.

Computes the ``k`` largest and smallest eigenvalues (Lanczos, with residual norms), the spectral
density by stochastic Lanczos quadrature, ``|lambda|`` quantiles, the index and the condition
numbers; for small nets also the exact spectrum (dense ``eigvalsh``).  At zero initialisation the
closed-form spectrum of Theorem 1 (PAPER.md section 2) is computed without building the Hessian and
compared.  Writes ``spectrum.json`` and ``density.png``, ``extremes.png``, ``quantiles.png`` to ``--out``.

Memory: the Krylov bases are what grows with the net.  The Lanczos basis and one SLQ group's bases
are each bounded by ``--basis-gib`` (default 3 GiB; the two phases run one after the other):
Lanczos holds what fits (at most 300 vectors) and, with ``--lanczos-products`` above that, thick-
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
import time

import numpy as np
import torch

from .._device import init_distributed, parse_device
from ..reference import ACTIVATIONS, LOSSES

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..models import INITS
    from .hessian import BACKENDS

    p = subparsers.add_parser(
        "spectrum", help="Hessian spectrum of a network (extremes, SLQ density, |lambda| quantiles, theory)",
        description=__doc__.split("\n\n")[0] + " Writes JSON and PNG figures.",
    )
    g = p.add_argument_group("network")
    g.add_argument("--shortcut", type=int, default=2,
                   help="layers per residual unit n (0: a plain net of depth --units)")
    g.add_argument("--units", type=int, default=100, help="residual units R (plain net: depth)")
    g.add_argument("--width", type=int, default=4, help="width d")
    g.add_argument("--init", choices=INITS, default="zero")
    g.add_argument("--scale", type=float, default=0.01, help="scale of the 'small' init")
    g.add_argument("--pre", choices=ACTIVATIONS, default="identity")
    g.add_argument("--mid", choices=ACTIVATIONS, default="identity")
    g.add_argument("--post", choices=ACTIVATIONS, default="identity")
    g = p.add_argument_group("data and loss")
    g.add_argument("--data", choices=("synthetic", "digits"), default="synthetic",
                   help="synthetic linear teacher, or sklearn's digits (PCA, whitened, one-hot)")
    g.add_argument("--samples", type=int, default=512, help="number of samples m (digits: a subset)")
    g.add_argument("--noise", type=float, default=0.1, help="label noise of the synthetic teacher")
    g.add_argument("--loss", choices=LOSSES, default="mse")
    g.add_argument("--batch-size", type=int, default=None, help="mini-batch size of the HVPs (the Hessian is "
                   "always the full-data one)")
    g = p.add_argument_group("estimators")
    g.add_argument("--top", type=int, default=5, help="extreme eigenvalues at each end")
    g.add_argument("--probes", type=int, default=8, help="SLQ probes (run in batched groups, see --probe-batch)")
    g.add_argument("--steps", type=int, default=80, help="Lanczos steps per SLQ probe")
    g.add_argument("--probe-batch", type=int, default=None,
                   help="SLQ probes per group (default: as many as fit in --basis-gib)")
    g.add_argument("--max-iter", type=int, default=None,
                   help="Lanczos basis size for the extremes (default: what fits in --basis-gib, at most 300)")
    g.add_argument("--lanczos-products", type=int, default=None,
                   help="Lanczos products in all; above the basis size the basis is thick-restarted "
                        "(default: no restarts)")
    g.add_argument("--basis-gib", type=float, default=3.0,
                   help="memory budget (GiB) of the Lanczos basis and of one SLQ group's bases")
    g.add_argument("--no-verify", action="store_true", help="skip Lanczos's multiplicity check (faster)")
    g.add_argument("--exact-max-params", type=int, default=2048, help="also compute the dense spectrum up to this P")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    g.add_argument("--backend", choices=BACKENDS, default="fused", help="HVP backend")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the network, data and HVPs live")
    g.add_argument("--distributed", action="store_true",
                   help="data-parallel HVPs over torch.distributed, launched with torchrun (gloo on cpu, NCCL on "
                        "cuda: each rank takes cuda:LOCAL_RANK); rank r holds samples r, r + world, ...; rank 0 writes")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def _positive(name, value):
    if value is None or value < 1:
        raise SystemExit(f"shortcut-ext spectrum: --{name} must be >= 1, got {value}")


def load_data(kind: str, m: int, d: int, seed: int, noise: float, dtype: torch.dtype):
    """``(X, Y)`` of the chosen data set (synthetic falls back to a local teacher if ``shortcut_ext.data``
    is missing)."""
    if kind == "digits":
        from ..data import digits

        return digits(d=d, seed=seed, m=min(m, 1797), dtype=dtype)
    try:
        from ..data import synthetic_teacher
    except ImportError:  # pragma: no cover - data.py not present
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(m, d, generator=g, dtype=torch.float64)
        T = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        Y = X @ T.T + noise * torch.randn(m, d, generator=g, dtype=torch.float64)
        return X.to(dtype), Y.to(dtype)
    return synthetic_teacher(m, d, seed=seed, noise=noise, dtype=dtype)


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
    for name in ("units", "width", "samples", "top", "probes", "steps"):
        _positive(name.replace("_", "-"), getattr(args, name))
    for name in ("probe_batch", "max_iter", "lanczos_products"):
        if getattr(args, name) is not None:
            _positive(name.replace("_", "-"), getattr(args, name))
    if not args.basis_gib > 0:
        raise SystemExit(f"shortcut-ext spectrum: --basis-gib must be > 0, got {args.basis_gib}")
    budget = max(1, int(args.basis_gib * 2**30))
    if args.shortcut < 0:
        raise SystemExit(f"shortcut-ext spectrum: --shortcut must be >= 0, got {args.shortcut}")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    args.device = parse_device(args.device, "spectrum")
    created_group = False
    rank, world = 0, 1
    if args.distributed:
        created_group, rank, world, args.device = init_distributed("spectrum", args.device)
    try:
        return _run(args, dtype, budget, rank, world)
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, dtype, budget, rank, world) -> int:
    from .. import theory
    from ..models import PlainNet, ShortcutNet
    from .condition import report_from_eigenvalues
    from .hessian import HessianOperator
    from ._linop import zero_tol_rel
    from .lanczos import lanczos
    from .slq import slq

    lead = rank == 0  # the rank that prints and writes; every rank computes the same spectrum
    quiet = args.no_progress or not lead
    if lead:
        os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    ckpt = _Checkpoint(args, write=lead)  # read by every rank before any collective: all skip alike

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
    net = net.to(args.device)
    X, Y = X.to(args.device), Y.to(args.device)
    Xs, Ys = (X[rank::world], Y[rank::world]) if args.distributed else (X, Y)  # this rank's shard
    if args.batch_size is None:
        data = [(Xs, Ys)] if Xs.shape[0] else []
    else:
        data = [(Xs[i:i + args.batch_size], Ys[i:i + args.batch_size]) for i in range(0, Xs.shape[0], args.batch_size)]
    H = HessianOperator(net, data, loss=args.loss, backend=args.backend, dtype=dtype, distributed=args.distributed)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "num_params": H.P, "backend_used": H.backend_used, "fallback_reason": H.fallback_reason,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "timings_s": {},
        "world_size": world,
    }
    loss, grad = H.loss_and_grad()
    result["loss"], result["grad_norm"] = float(loss), float(grad.norm())

    # extremes
    lz = ckpt.lanczos()
    result["resumed"] = {"lanczos": lz is not None, "slq_probes": len(ckpt.slq_done), "checkpoint": ckpt.path}
    if lz is None:
        bar, cb = _progress("lanczos", quiet)
        t0 = time.perf_counter()
        try:
            lz = lanczos(H, k=min(args.top, H.P), max_iter=args.max_iter, verify=not args.no_verify, seed=args.seed,
                         return_vectors=False, callback=cb, max_basis_bytes=budget,
                         max_products=args.lanczos_products)
        except ValueError as e:  # a basis that does not fit the budget: say which flag to change
            raise SystemExit(f"shortcut-ext spectrum: {e} (flags: --max-iter, --basis-gib)") from e
        finally:
            bar.close()
        result["timings_s"]["lanczos"] = time.perf_counter() - t0
        ckpt.save_lanczos(lz)
    result["lanczos"] = {
        "largest": lz.largest.tolist(), "smallest": lz.smallest.tolist(),
        "largest_residuals": lz.largest_residuals.tolist(), "smallest_residuals": lz.smallest_residuals.tolist(),
        "num_vectors": lz.num_vectors, "num_products": lz.num_products, "breakdowns": lz.breakdowns,
        "segments": [list(s) for s in lz.segments], "converged": lz.converged, "stop_reason": lz.stop_reason,
        "restarts": lz.restarts, "max_vectors": lz.max_vectors, "basis_bytes": lz.basis_bytes,
    }
    # density
    bar, cb = _progress("slq", quiet)
    t0 = time.perf_counter()
    try:
        sq = slq(H, probes=args.probes, steps=args.steps, seed=args.seed + 1, callback=cb,
                 probe_batch=args.probe_batch, max_basis_bytes=budget, done=ckpt.slq_done,
                 on_group=ckpt.save_slq_group)
    except ValueError as e:
        raise SystemExit(f"shortcut-ext spectrum: {e} (flags: --probe-batch, --steps, --basis-gib)") from e
    finally:
        bar.close()
    result["timings_s"]["slq"] = time.perf_counter() - t0
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
    result["condition"] = {"lam_max": lam_max, "lam_max_residual": lz.abs_max_residual, "lam_q10": lam_q10,
                           "cond_q10": lam_max / lam_q10 if lam_q10 > zero_tol else float("inf"),
                           "index": result["slq"]["index"], "zero_tol": zero_tol, "method": "lanczos+slq"}

    # exact spectrum for small nets
    exact = None
    if H.P <= args.exact_max_params:
        t0 = time.perf_counter()
        D = H.to_dense()
        exact = torch.linalg.eigvalsh(0.5 * (D + D.T).double().cpu()).numpy()
        result["timings_s"]["exact"] = time.perf_counter() - t0
        result["exact"] = report_from_eigenvalues(exact, k=args.top).as_dict()

    # theory at the zero point
    spec = None
    if args.shortcut >= 1 and args.init == "zero":
        try:
            spec = theory.model_zero_point_spectrum(net, X.cpu(), Y.cpu(), loss=args.loss)
        except ValueError as e:  # n = 1 beyond the dense limit
            result["theory"] = {"skipped": str(e)}
    if spec is not None:
        ev = spec.eigenvalues()
        rep = report_from_eigenvalues(ev, k=args.top)
        scale = max(float(np.abs(ev).max()), 1e-300)
        k_top = len(lz.largest)
        vals, mult = spec.distinct()
        result["theory"] = {
            "method": spec.method, "distinct_values": vals.tolist(), "multiplicities": mult.tolist(),
            "singular_values_M": None if spec.singular_values is None else spec.singular_values.tolist(),
            "slope": spec.slope, "gradient_norm": spec.gradient_norm,
            "assumptions": {"holds": spec.assumptions.holds, "notes": spec.assumptions.notes},
            "report": rep.as_dict(),
            "lanczos_rel_error": max(float(np.abs(lz.largest - ev[::-1][:k_top]).max()),
                                     float(np.abs(lz.smallest - ev[:k_top]).max())) / scale,
            "slq_q10_rel_error": abs(lam_q10 - rep.lam_q10) / max(rep.lam_q10, 1e-300),
        }
    result["timings_s"]["total"] = time.perf_counter() - t_start
    if not lead:
        return 0
    with open(os.path.join(args.out, "spectrum.json"), "w") as f:
        json.dump(result, f, indent=1, default=_json_default)
    if not args.no_plots:
        _plots(args.out, sq, grid, dens, sigma, lz, exact, spec)
    print(f"P = {H.P}  |lambda|max = {lam_max:.6g} (residual {lz.abs_max_residual:.2g})  "
          f"|lambda|(0.1) = {lam_q10:.6g}  index = {result['slq']['index']:.4f}  -> {args.out}")
    if spec is not None:
        print(f"theory ({spec.method}): |lambda|max = {result['theory']['report']['lam_max']:.6g}  "
              f"Lanczos rel. error {result['theory']['lanczos_rel_error']:.2e}")
    return 0


# What a spectrum's numbers depend on (a checkpoint is reused only under the same values); where the
# computation runs (device, ranks) and how it is shown do not count.
_PLACEMENT_ARGS = ("out", "no_progress", "no_plots", "device", "distributed", "func")


class _Checkpoint:
    """``OUT/spectrum.checkpoint.json``: the finished Lanczos result and SLQ probes of this run's
    configuration, written (atomically) as each finishes, so that a rerun after an interruption redoes
    only what had not finished.  A checkpoint of another configuration is ignored (and replaced)."""

    def __init__(self, args, write: bool):
        self.path = os.path.join(args.out, "spectrum.checkpoint.json")
        self.write = write
        self.config = {k: v for k, v in sorted(vars(args).items()) if k not in _PLACEMENT_ARGS}
        self.state = {"config": self.config, "lanczos": None, "slq": {}}
        try:
            with open(self.path) as f:
                old = json.load(f)
            if old.get("config") == json.loads(json.dumps(self.config, default=_json_default)):
                self.state = {"config": self.config, "lanczos": old.get("lanczos"), "slq": old.get("slq") or {}}
        except (OSError, ValueError, AttributeError):
            pass  # none yet, or unreadable (an interrupted first write): start afresh
        self.slq_done = {int(i): (np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), int(n))
                         for i, (a, b, n) in self.state["slq"].items()}

    def _flush(self) -> None:
        if not self.write:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

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

    def save_lanczos(self, lz) -> None:
        self.state["lanczos"] = {k: getattr(lz, k) for k in (
            "largest", "smallest", "largest_residuals", "smallest_residuals", "ritz_values", "num_vectors",
            "num_products", "segments", "breakdowns", "converged", "norm_estimate", "stop_reason", "restarts",
            "max_vectors", "basis_bytes")}
        self._flush()

    def save_slq_group(self, g0, g1, alpha, beta, steps) -> None:
        for i in range(g0, g1):
            n = int(steps[i - g0])
            self.state["slq"][str(i)] = [alpha[i - g0, :n].tolist(), beta[i - g0, :n].tolist(), n]
        self._flush()


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.dtype):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _plots(out, sq, grid, dens, sigma, lz, exact, spec) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # density
    fig, ax = plt.subplots(figsize=(7, 4))
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
    ax.set_title("Hessian spectral density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "density.png"), dpi=120)
    plt.close(fig)

    # extremes
    fig, ax = plt.subplots(figsize=(7, 4))
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
    fig.savefig(os.path.join(out, "extremes.png"), dpi=120)
    plt.close(fig)

    # |lambda| quantiles
    fig, ax = plt.subplots(figsize=(7, 4))
    qs = np.linspace(0.005, 1.0, 200)
    ax.plot(qs, [sq.abs_quantile(q) for q in qs], label="SLQ")
    if exact is not None:
        ax.plot(qs, np.quantile(np.abs(exact), qs, method="inverted_cdf"), label="exact (dense)")
    if spec is not None:
        ax.plot(qs, np.quantile(np.abs(spec.eigenvalues()), qs, method="inverted_cdf"), "--", label="theory")
    ax.axvline(0.1, color="gray", lw=0.5)
    ax.set_xlabel("q")
    ax.set_ylabel("|lambda|(q)")
    if min(sq.abs_quantile(0.005), *([] if spec is None else [float(np.abs(spec.eigenvalues()).min())])) > 0:
        ax.set_yscale("log")
    ax.set_title("quantiles of |eigenvalues| (the paper uses q = 0.1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "quantiles.png"), dpi=120)
    plt.close(fig)
