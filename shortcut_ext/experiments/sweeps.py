"""The experiments of docs/science.md section 4 as resumable sweeps over architectures, depths and seeds.

Names used throughout the reproduction:

- architectures (:data:`ARCHS`): ``2-shortcut`` (the paper's zero init with a small perturbation),
  ``2-shortcut-zero``, ``1-shortcut``, ``1-shortcut-zero``, ``3-shortcut``, ``3-shortcut-zero``,
  ``4-shortcut-zero``, ``plain-xavier``, ``plain-orthogonal``;
- activation variants (:data:`ACT_VARIANTS`): ``linear``, ``relu-mid`` (the paper's nonlinear
  runs), and beyond the paper ``relu-pre``, ``tanh-mid``, ``ssigmoid-mid``, ``tanh-pre``.  A plain
  net has one activation between layers: the variant's non-identity one.

Linear nets train and are probed on :func:`~shortcut_ext.data.second_moment_compress` of the data:
the loss as a function of the weights is *the same function* (a linear net's squared loss depends on the
data only through ``S_xx``, ``S_yx``, ``S_yy``), so gradient descent follows the same trajectory and
the Hessian is the same, at ``d + q`` rows instead of ``m`` **(ours)**.  Nonlinear nets use all rows.

Every run is saved in a :class:`~shortcut_ext.experiments.store.RunStore` under a readable key
built from everything that determines it; a rerun with the same output folder skips finished runs.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from .. import data as data_mod
from ..models import PlainNet, ShortcutNet
from ..train import TrainConfig, TrainResult, hessian_probes, lr_sweep, sweep_run_key, sweep_run_record, train
from .store import json_float, json_safe


@dataclass(frozen=True)
class Arch:
    """A network family: ``shortcut`` = layers skipped per shortcut (0: plain net) and its init."""

    name: str
    shortcut: int
    init: str
    scale: float = 0.01

    @property
    def plain(self) -> bool:
        return self.shortcut == 0

    def valid_depth(self, depth: int) -> int:
        """The depth nearest ``depth`` that this family can have (a multiple of ``n``, at least ``n``)."""
        n = max(self.shortcut, 1)
        return n * max(1, int(round(depth / n)))


ARCHS = {a.name: a for a in (
    Arch("2-shortcut", 2, "small"),
    Arch("2-shortcut-zero", 2, "zero"),
    Arch("1-shortcut", 1, "small"),
    Arch("1-shortcut-zero", 1, "zero"),
    Arch("3-shortcut", 3, "small"),
    Arch("3-shortcut-zero", 3, "zero"),
    Arch("4-shortcut-zero", 4, "zero"),
    Arch("plain-xavier", 0, "xavier"),
    Arch("plain-orthogonal", 0, "orthogonal"),
)}

ACT_VARIANTS = {  # (pre, mid, post)
    "linear": ("identity", "identity", "identity"),
    "relu-mid": ("identity", "relu", "identity"),
    "relu-pre": ("relu", "identity", "identity"),
    "tanh-mid": ("identity", "tanh", "identity"),
    "tanh-pre": ("tanh", "identity", "identity"),
    "ssigmoid-mid": ("identity", "ssigmoid", "identity"),
}


def check_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {name!r}")
    return ARCHS[name]


def check_act(name: str) -> tuple[str, str, str]:
    if name not in ACT_VARIANTS:
        raise ValueError(f"act must be one of {sorted(ACT_VARIANTS)}, got {name!r}")
    return ACT_VARIANTS[name]


def arch_supports(arch: str, act: str) -> bool:
    """False where the variant would silently be linear (``mid`` activations need ``n >= 2``)."""
    a, (pre, mid, _) = check_arch(arch), check_act(act)
    return not (a.shortcut == 1 and mid != "identity" and pre == "identity")


def build_model(arch: str, act: str, depth: int, width: int, seed: int = 0, dtype=torch.float64,
                backend: str | None = None, in_features: int | None = None, out_features: int | None = None):
    """The network ``arch`` with activation variant ``act`` and ``depth`` weight layers."""
    a = check_arch(arch)
    pre, mid, post = check_act(act)
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    depth = int(depth)
    kw = dict(seed=int(seed), dtype=dtype, backend=backend, in_features=in_features, out_features=out_features)
    if a.plain:
        act1 = mid if mid != "identity" else pre
        return PlainNet(width, depth, activation=act1, init=a.init, scale=a.scale, **kw)
    if depth % a.shortcut:
        raise ValueError(f"depth of a {a.name} net must be a multiple of {a.shortcut}, got {depth}")
    return ShortcutNet(width, depth // a.shortcut, a.shortcut, pre=pre, mid=mid, post=post, init=a.init,
                       scale=a.scale, **kw)


def seeds_for(arch: str, seeds: Sequence[int]) -> list[int]:
    """Zero initialisations do not depend on the seed: one seed is enough."""
    return [seeds[0]] if check_arch(arch).init == "zero" else list(seeds)


# --------------------------------------------------------------------------- data
@dataclass
class DataBundle:
    """The prepared data of a reproduction and the constants its figures are stated against.

    Attributes:
        tag: names the data in run keys (runs on other data never mix).
        X, Y: ``[m, d]``, ``[m, q]``.
        Xc, Yc: :func:`~shortcut_ext.data.second_moment_compress` of ``(X, Y)`` (linear nets).
        l_min: best linear loss ``L_min``; l_zero: loss of the zero map ``||Y||^2 / (2m)``.
    """

    tag: str
    X: torch.Tensor
    Y: torch.Tensor
    Xc: torch.Tensor
    Yc: torch.Tensor
    l_min: float
    l_zero: float

    @classmethod
    def from_xy(cls, tag: str, X: torch.Tensor, Y: torch.Tensor) -> "DataBundle":
        Xc, Yc = data_mod.second_moment_compress(X, Y)
        return cls(tag, X, Y, Xc, Yc, data_mod.best_linear_loss(X, Y), float(0.5 * (Y.double() ** 2).sum() / Y.shape[0]))

    @property
    def width(self) -> int:
        return self.X.shape[1]

    @property
    def out_features(self) -> int:
        return self.Y.shape[1]

    def for_act(self, act: str):
        """The rows a net of variant ``act`` trains on: compressed for linear nets, all otherwise."""
        return (self.Xc, self.Yc) if act == "linear" else (self.X, self.Y)

    def m_matrix(self) -> torch.Tensor:
        """``M = S_xx - S_yx`` of Theorem 1 (linear, ``n = 2``), ``[d, d]``; needs ``q == d``."""
        X, Y = self.X.double(), self.Y.double()
        if Y.shape[1] != X.shape[1]:
            raise ValueError(f"M = S_xx - S_yx needs as many targets as inputs (q == d), got q={Y.shape[1]} "
                             f"targets and d={X.shape[1]} inputs")
        m = X.shape[0]
        return (X.T @ X - Y.T @ X) / m

    def theory_cond_2shortcut(self) -> float:
        """``sigma_max(M) / sigma_min(M)``: Theorem 1's condition number of a 2-shortcut linear net at
        zero, for any number of units."""
        s = torch.linalg.svdvals(self.m_matrix())
        return float(s.max() / s.min()) if s.min() > 0 else math.inf

    def theory_spectrum_2shortcut(self, units: int) -> np.ndarray:
        """All ``2 d^2 R`` Hessian eigenvalues at zero of a linear 2-shortcut net: ``± sigma_i(M)``,
        each ``d`` times per unit (Theorem 1)."""
        s = torch.linalg.svdvals(self.m_matrix()).numpy()
        d = self.width
        return np.concatenate([np.repeat(s, d * units), -np.repeat(s, d * units)])


def load_data(kind: str = "digits", path=None, d: int = 10, samples: int | None = None, seed: int = 0,
              dtype=torch.float64, noise: float = 0.1, max_samples: int | None = None) -> DataBundle:
    """``kind``: ``"digits"`` (bundled), ``"synthetic"`` (linear teacher) or ``"mnist"`` (needs ``path``).

    ``samples``: a seeded subset of that size; ``max_samples`` (MNIST): a subset only if there are more.
    """
    if kind == "digits":
        X, Y = data_mod.digits(d=d, seed=seed, m=samples, dtype=dtype)
        tag = f"digits(d={d},m={samples or 'all'},seed={seed if samples else 0})"
    elif kind == "synthetic":
        m = samples or 1000
        X, Y = data_mod.synthetic_teacher(m, d, seed=seed, noise=noise, dtype=dtype)
        tag = f"synthetic(m={m},d={d},noise={noise},seed={seed})"
    elif kind == "mnist":
        if path is None:
            raise ValueError("kind='mnist' needs path (a folder of IDX files or an .npz file)")
        X, Y = data_mod.mnist(path, d=d, m=samples, seed=seed, dtype=dtype, max_m=max_samples)
        m = X.shape[0]
        # the data by their values, not their path: another file at the same path (a rerun into the same --out)
        # must not reuse the runs, the same file moved (or a colleague's copy) may, and no private path goes into
        # the keys and the report.  The raw images and labels, not the prepared X (its whitening's bits vary
        # with BLAS threads)
        images, labels, _ = data_mod.load_mnist_arrays(path, "train")
        digest = hashlib.sha1(np.ascontiguousarray(images).tobytes())
        digest.update(np.ascontiguousarray(labels).tobytes())
        tag = f"mnist(sha1={digest.hexdigest()[:16]},d={d},m={m},seed={seed if (samples or max_samples) else 0})"
    else:
        raise ValueError(f"data kind must be 'digits', 'synthetic' or 'mnist', got {kind!r}")
    return DataBundle.from_xy(tag, X, Y)


# --------------------------------------------------------------------------- run keys
def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def group_key(kind: str, bundle: DataBundle, arch: str, act: str, depth: int, seed: int, cfg: TrainConfig,
              dtype) -> str:
    """Readable key of a run group: everything that determines the runs except the learning rate and the
    backend (one store holds one backend's runs: ``reproduce`` refuses a folder of another backend).
    Training settings at their :class:`TrainConfig` defaults are left out of the key (as in keys written
    before they were added)."""
    probe = "" if cfg.probe_epochs is None and not cfg.probe_every else (
        f"|probes={list(cfg.probe_epochs) if cfg.probe_epochs is not None else cfg.probe_every}"
        f"|exact<={cfg.exact_max_params}")
    default = TrainConfig()
    extra = "".join(f"|{name}={getattr(cfg, name)}" for name in ("batch_size", "momentum", "loss", "divergence_factor",
                                                                "seed")
                    if getattr(cfg, name) != getattr(default, name))
    return (f"{kind}|{bundle.tag}|{arch}|{act}|depth={depth}|seed={seed}|{cfg.optimizer}|epochs={cfg.epochs}"
            f"|{_dtype_name(dtype)}{probe}{extra}")


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=True)


def _release_buffers() -> None:
    """The fused ops' CPU buffer cache holds the last shape's outputs; the next depth's do not fit them
    (a sweep over depths filled it to its 2 GB limit): freed between a sweep's groups."""
    from ..ops import release_cache

    release_cache()


def _then_release(job):
    """``job()``, then the buffer cache freed (a distributed sweep runs every depth's jobs in one go)."""
    try:
        return job()
    finally:
        _release_buffers()


_PROBE_FIELDS = ("lam_max", "lam_q10", "index", "cond", "cond_q10", "method")


def _is_probe_record(rec) -> bool:
    """A stored initial-curvature record with every field the rows read, each number a number as ``json_safe``
    writes it (nan as null, +-inf as strings), else it is computed again (a hand-edited ``"abc"`` had reached
    the CSV)."""
    from .store import json_float

    def number(v) -> bool:
        v = json_float(v)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return (isinstance(rec, dict) and all(k in rec for k in _PROBE_FIELDS) and isinstance(rec["method"], str)
            and all(number(rec[k]) for k in _PROBE_FIELDS if k != "method"))


def _fill(store, jobs, desc, progress, usable=None) -> None:
    """Runs a phase's missing runs across the ranks of a :class:`DistributedRunStore` (a bar on rank 0) or
    the processes of a :class:`PoolRunStore`; ``usable(record)`` False counts a stored record as missing."""
    from .store import PoolRunStore

    bar = None
    total = len(store.plan(jobs, usable)[0]) if progress and store.rank == 0 else 0
    if total:  # no bar for a phase whose runs are all stored (it printed "0it")
        from tqdm.auto import tqdm

        pool = isinstance(store, PoolRunStore)
        n = min(store.workers, total)
        where = f"{n} process{'es' if n > 1 else ''}" if pool else f"rank 0 of {store.world_size}"
        bar = tqdm(total=total, desc=f"{desc} ({where})", dynamic_ncols=True, leave=True)
    try:
        store.fill(jobs, progress=None if bar is None else (lambda done, total: bar.update(1)), usable=usable)
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- phases
def run_lr_sweeps(bundle: DataBundle, archs: Iterable[str], acts: Iterable[str], depths: Iterable[int],
                  seeds: Sequence[int], lrs: Sequence[float], cfg: TrainConfig, store, dtype=torch.float64,
                  backend: str | None = None, desc: str = "sweep", progress: bool = True):
    """Learning-rate sweeps (the paper's Figs. 9-10): for each (arch, act, depth, seed), every rate.

    Returns:
        ``(runs, best)``: one row per run (no history), and one row per group with the best rate's
        numbers plus its ``result`` (:class:`~shortcut_ext.train.TrainResult`, with history).
    """
    groups = []
    for act in acts:
        for arch in archs:
            if not arch_supports(arch, act):
                continue
            a = check_arch(arch)
            for depth in sorted({a.valid_depth(x) for x in depths}):
                for seed in seeds_for(arch, seeds):
                    groups.append((arch, act, depth, seed))
    out_features = None if bundle.out_features == bundle.width else bundle.out_features

    def maker(arch, act, depth, seed):
        return lambda: build_model(arch, act, depth, bundle.width, seed, dtype, backend, out_features=out_features)

    def data_for(act):
        return tuple(t.to(dtype) for t in bundle.for_act(act))

    if hasattr(store, "fill"):  # distributed: the ranks share the runs first (DistributedRunStore)
        jobs = []
        for arch, act, depth, seed in groups:
            key = group_key("sweep", bundle, arch, act, depth, seed, cfg, dtype)
            for lr in lrs:
                jobs.append((sweep_run_key(key, lr),
                             functools.partial(_then_release, functools.partial(
                                 sweep_run_record, maker(arch, act, depth, seed), data_for(act), lr, cfg, bundle.l_min)),
                             depth))
        _fill(store, jobs, desc, progress, usable=TrainResult.is_record)
    runs, best = [], []
    for arch, act, depth, seed in _progress(groups, len(groups), desc, progress and not hasattr(store, "fill")):
        key = group_key("sweep", bundle, arch, act, depth, seed, cfg, dtype)
        b, results = lr_sweep(maker(arch, act, depth, seed), data_for(act), lrs, cfg, l_min=bundle.l_min, store=store,
                              key=key)
        _release_buffers()
        base = {"arch": arch, "act": act, "depth": depth, "seed": seed}
        stable = [r.lr for r in results if is_stable(r)]
        for r in results:
            runs.append({**base, "lr": r.lr, "status": r.status, "final_loss": r.final_loss,
                         "final_excess": r.final_excess, "final_weight_norm": r.final_weight_norm,
                         "diverged_epoch": r.diverged_epoch, "seconds": r.seconds, "is_best": r is b})
        best.append({**base, "best_lr": b.lr if b else math.nan,
                     "final_loss": b.final_loss if b else math.inf,
                     "final_excess": b.final_excess if b else math.inf,
                     "final_weight_norm": b.final_weight_norm if b else math.nan,
                     "max_stable_lr": max(stable) if stable else math.nan,
                     "num_diverged": sum(r.status == "diverged" for r in results),
                     "result": b})
    return runs, best


def run_init_probes(bundle: DataBundle, archs: Iterable[str], depths: Iterable[int], seeds: Sequence[int], store,
                    exact_max_params: int = 4000, dtype=torch.float64, act: str = "linear",
                    desc: str = "Hessian at init", progress: bool = True, backend: str | None = None) -> list[dict]:
    """Hessian probes at initialisation (the paper's Fig. 5): one row per (arch, depth, seed); ``backend``
    ``"torch"`` computes them without the fused kernels (autograd Hessian-vector products)."""
    jobs = []
    for arch in archs:
        if not arch_supports(arch, act):
            continue
        a = check_arch(arch)
        for depth in sorted({a.valid_depth(x) for x in depths}):
            for seed in seeds_for(arch, seeds):
                jobs.append((arch, depth, seed))
    rows = []
    data = tuple(t.to(dtype) for t in bundle.for_act(act))

    def key_of(arch, depth, seed):
        return f"init|{bundle.tag}|{arch}|{act}|depth={depth}|seed={seed}|{_dtype_name(dtype)}|exact<={exact_max_params}"

    def compute(arch, depth, seed):
        net = build_model(arch, act, depth, bundle.width, seed, dtype, backend=backend,
                          out_features=None if bundle.out_features == bundle.width else bundle.out_features)
        rec = dict(hessian_probes(net, data, "mse", exact_max_params=exact_max_params, seed=seed))
        rec["num_params"] = net.num_parameters()
        _release_buffers()
        return rec

    if hasattr(store, "fill"):
        _fill(store, [(key_of(*job), functools.partial(compute, *job), job[1]) for job in jobs], desc, progress,
              usable=_is_probe_record)
    for arch, depth, seed in _progress(jobs, len(jobs), desc, progress and not hasattr(store, "fill")):
        key = key_of(arch, depth, seed)
        rec = store.get(key)
        if not _is_probe_record(rec):  # missing, or without its fields: computed (again)
            store.put(key, compute(arch, depth, seed))
            rec = store.get(key)  # as stored (strict JSON), so that fresh and resumed rows agree
        rows.append({"arch": arch, "act": act, "depth": depth, "seed": seed,
                     **{k: (rec.get(k) if k == "method" else json_float(rec.get(k)))
                        for k in ("lam_max", "lam_q10", "index", "cond", "cond_q10", "method", "num_params")},
                     "resolved": rec.get("resolved")})  # False: SLQ could not resolve the spectrum near 0
    return rows


def is_stable(result: TrainResult) -> bool:
    """A run counts towards ``max_stable_lr`` if it did not diverge and ended below its starting loss: a
    run still climbing at its last epoch, slowly enough to stay under the divergence limit, is not stable,
    and neither is one that never moved (a net stuck at a saddle: final loss = start to 1e-9 relative)."""
    loss = result.history.get("loss") or []
    return result.status == "ok" and bool(loss) and result.final_loss < loss[0] - 1e-9 * abs(loss[0])


def best_lr_by_arch(run_rows: list[dict], act: str, depth: int) -> dict:
    """Per arch at ``depth``: the rate whose final loss, averaged over seeds, is lowest (a rate that
    diverged for any seed counts as infinite)."""
    per: dict[str, dict[float, list]] = {}
    for r in run_rows:
        if r["act"] == act and r["depth"] == depth:
            per.setdefault(r["arch"], {}).setdefault(r["lr"], []).append(r["final_loss"])
    out = {}
    for arch, by_lr in per.items():
        mean = {lr: float(np.mean(v)) if all(math.isfinite(x) for x in v) else math.inf for lr, v in by_lr.items()}
        lr = min(mean, key=lambda k: (mean[k], k))
        if math.isfinite(mean[lr]):
            out[arch] = lr
    return out


def log_probe_epochs(epochs: int, count: int) -> list[int]:
    """At most ``count`` probe epochs: epoch 0 and ``count - 1`` log-spaced in ``[1, epochs]`` (dense early,
    where the paper's Fig. 8 index drops), rounded to whole epochs; neighbours that round to the same epoch
    are one probe (200 epochs and 14 asked: 13 probes)."""
    if epochs <= 0:
        return [0]
    e = np.unique(np.round(np.geomspace(1, epochs, max(count - 1, 1))).astype(int))
    return [0] + [int(x) for x in e]


def run_probe_curves(bundle: DataBundle, archs: Iterable[str], act: str, depth: int, seeds: Sequence[int],
                     lrs: dict, cfg: TrainConfig, store, dtype=torch.float64, backend: str | None = None,
                     desc: str = "Hessian along training", progress: bool = True):
    """Training with Hessian probes (the paper's Figs. 6-8), each arch at its rate ``lrs[arch]``.

    Returns:
        ``(probe_rows, history_rows)``: per probe (epoch, loss, curvature numbers) and per recorded
        epoch (loss, gradient norm, weight norm).
    """
    jobs = []
    for arch in archs:
        if arch not in lrs or not arch_supports(arch, act):
            continue
        d = check_arch(arch).valid_depth(depth)
        for seed in seeds_for(arch, seeds):
            jobs.append((arch, d, seed))
    probe_rows, hist_rows = [], []

    def key_of(arch, d, seed):
        c = dataclasses.replace(cfg, lr=float(lrs[arch]))
        return group_key("curve", bundle, arch, act, d, seed, c, dtype) + f"|lr={c.lr:.6g}"

    def compute(arch, d, seed):
        net = build_model(arch, act, d, bundle.width, seed, dtype, backend,
                          out_features=None if bundle.out_features == bundle.width else bundle.out_features)
        # the empirical Fisher sums each sample's gradient squared: a linear net's compressed rows (for_act) keep the
        # loss, gradient, Hessian and G exact but not that, so its probes take all rows
        probe = ((bundle.X.to(dtype), bundle.Y.to(dtype)) if act == "linear" and "empirical_fisher" in cfg.probe_parts
                 else None)
        res = train(net, tuple(t.to(dtype) for t in bundle.for_act(act)), dataclasses.replace(cfg, lr=float(lrs[arch])),
                    l_min=bundle.l_min, probe_data=probe)
        _release_buffers()
        return res.to_dict(max_points=1000)

    def usable(rec) -> bool:  # a finished run, with the sharpness series where the runs track it
        return TrainResult.is_record(rec) and (not cfg.sharpness_every or "sharpness" in rec["history"])

    if hasattr(store, "fill"):
        _fill(store, [(key_of(*job), functools.partial(compute, *job), job[1]) for job in jobs], desc, progress,
              usable=usable)
    for arch, d, seed in _progress(jobs, len(jobs), desc, progress and not hasattr(store, "fill")):
        c = dataclasses.replace(cfg, lr=float(lrs[arch]))
        key = key_of(arch, d, seed)
        rec = store.get(key)
        if not usable(rec):  # missing, or without its fields: trained (again)
            rec = compute(arch, d, seed)
            store.put(key, rec)
        res = TrainResult.from_dict(rec)
        base = {"arch": arch, "act": act, "depth": d, "seed": seed, "lr": c.lr, "status": res.status}
        for p in res.probes:
            probe_rows.append({**base, **{k: p.get(k) for k in ("epoch", "loss", "excess", "grad_norm", "lam_max",
                                                                  "lam_top", "lam_q10", "index", "cond", "cond_q10",
                                                                  "method", "resolved")},
                               # the Hessian's parts, where the run probed them (cfg.probe_parts)
                               **{f"{part}_{k}": p.get(f"{part}_{k}") for part in cfg.probe_parts
                                  for k in ("lam_max", "index")}})
        h = res.history
        for i in range(len(h.get("epoch", []))):
            hist_rows.append({**base, "epoch": h["epoch"][i], "loss": h["loss"][i], "excess": h["excess"][i],
                              "grad_norm": h["grad_norm"][i], "weight_norm": h["weight_norm"][i],
                              # the Hessian's largest eigenvalue, where the run tracked it (cfg.sharpness_every)
                              **({"sharpness": h["sharpness"][i]} if cfg.sharpness_every else {})})
    return probe_rows, hist_rows


_SADDLE_FIELDS = ("order", "coefficient", "second_order_hvp", "loss", "num_params", "ts", "changes")


def _is_saddle_record(rec) -> bool:
    """A stored stationary-order record with every field the rows and curves read, its curve one change per step."""
    return (isinstance(rec, dict) and all(k in rec for k in _SADDLE_FIELDS) and isinstance(rec["ts"], list)
            and isinstance(rec["changes"], list) and len(rec["ts"]) == len(rec["changes"]) > 0)


def run_stationary_orders(bundle: DataBundle, archs: Iterable[str], acts: Iterable[str], depths: Iterable[int],
                          seeds: Sequence[int], dtype=torch.float64, backend: str | None = None,
                          desc: str = "stationary orders", progress: bool = True,
                          store=None) -> tuple[list[dict], list[dict]]:
    """How the loss leaves each net's initial point along random unit directions (Theorem 1: ``t^n`` at an
    n-shortcut net's zero point), one row per (arch, act, depth, direction seed), and the curves behind them.

    A zero init does not depend on the seed; the direction does (:func:`~shortcut_ext.curvature.random_directions`
    with the seed).  Rows: the measured ``order``, the leading ``coefficient`` (``change / t^order`` at the smallest
    step used), and ``second_order_hvp`` = ``v^T H v / 2`` from a Hessian-vector product, which is that coefficient
    where the order is 2.

    ``store``: a run store (:class:`~shortcut_ext.experiments.store.RunStore` or one that splits its runs across
    processes or ranks); each finished measurement is kept there, and a rerun reads it back instead of computing
    it again (an interrupted phase loses no finished one).  ``None``: computed afresh, nothing kept.
    """
    import warnings

    from ..curvature import HessianOperator
    from ..curvature.hessian import FallbackWarning
    from ..curvature.landscape import random_directions, stationary_order

    jobs = []
    for act in acts:
        for arch in archs:
            if not arch_supports(arch, act):
                continue
            for depth in sorted({check_arch(arch).valid_depth(x) for x in depths}):
                jobs.extend((arch, act, depth, seed) for seed in seeds)

    def key_of(arch, act, depth, seed):
        # the steps are stationary_order's default grid (19 from 1e-6 to 1): named, so that another grid is another run
        return f"saddle|{bundle.tag}|{arch}|{act}|depth={depth}|seed={seed}|{_dtype_name(dtype)}|ts=1e-6..1x19"

    def compute(arch, act, depth, seed) -> dict:
        net = build_model(arch, act, depth, bundle.width, seed, dtype, backend=backend,
                          out_features=None if bundle.out_features == bundle.width else bundle.out_features)
        data = tuple(t.to(dtype) for t in bundle.for_act(act))
        with warnings.catch_warnings():  # without the fused kernels: autograd products, said by the other phases
            warnings.simplefilter("ignore", FallbackWarning)
            op = HessianOperator(net, data, "mse", backend="autograd" if backend == "torch" else "fused")
        v = random_directions(op, seed=seed)
        r = stationary_order(op, v)
        second = 0.5 * float(v[:, 0].double() @ op.matvec(v[:, 0]).double())
        rec = {"order": r.order, "coefficient": r.coefficient, "second_order_hvp": second, "loss": r.center,
               "num_params": net.num_parameters(), "ts": [float(t) for t in r.ts],
               "changes": [float(c) for c in r.changes]}
        _release_buffers()
        return rec

    if store is not None and hasattr(store, "fill"):
        _fill(store, [(key_of(*job), functools.partial(compute, *job), job[2]) for job in jobs], desc, progress,
              usable=_is_saddle_record)
    rows, curves = [], []
    for arch, act, depth, seed in _progress(jobs, len(jobs), desc, progress and not hasattr(store, "fill")):
        if store is None:
            rec = json_safe(compute(arch, act, depth, seed))  # as a stored one reads
        else:
            key = key_of(arch, act, depth, seed)
            rec = store.get(key)
            if not _is_saddle_record(rec):  # missing, or without its fields: computed (again)
                store.put(key, compute(arch, act, depth, seed))
                rec = store.get(key)  # as stored (strict JSON), so that fresh and resumed rows agree
        a = check_arch(arch)
        rows.append({"arch": arch, "act": act, "depth": depth, "seed": seed, "n": a.shortcut, "init": a.init,
                     **{k: json_float(rec.get(k)) for k in ("order", "coefficient", "second_order_hvp", "loss")},
                     "num_params": int(rec["num_params"])})
        curves.extend({"arch": arch, "act": act, "depth": depth, "seed": seed, "step": json_float(t),
                       "change": json_float(c)} for t, c in zip(rec["ts"], rec["changes"]))
    return rows, curves


PLANE_POINTS = 21  # the zero-point planes' grid: 21 x 21 steps from -1 to 1 along two random unit directions


def _is_plane_record(rec) -> bool:
    """A stored zero-point plane with its grid, losses and quadratic model, each ``PLANE_POINTS`` square."""
    ok = isinstance(rec, dict) and all(isinstance(rec.get(k), list) for k in ("ts", "loss", "quadratic"))
    return ok and len(rec["ts"]) == PLANE_POINTS and all(
        isinstance(r, list) and len(r) == PLANE_POINTS for k in ("loss", "quadratic") for r in rec[k]) and \
        len(rec["loss"]) == len(rec["quadratic"]) == PLANE_POINTS and "center" in rec


def run_zero_point_planes(bundle: DataBundle, archs: Iterable[str], act: str, depth: int, seed: int,
                          dtype=torch.float64, backend: str | None = None, store=None, desc: str = "zero-point planes",
                          progress: bool = True) -> list[dict]:
    """The loss on a plane through each net's initial point (two random unit directions of ``seed``, steps -1..1,
    ``PLANE_POINTS`` a side) beside its quadratic model: at an n-shortcut net's zero point a tilted plane for
    ``n = 1``, a quadratic saddle for ``n = 2``, and for ``n >= 3`` a flat model under a cubic (or higher) saddle.
    One dict per net: ``arch, act, depth, n, ts, loss [a][a], quadratic [a][a], center``; kept in ``store``
    like the other phases' runs (``None``: computed afresh)."""
    import warnings

    from ..curvature import HessianOperator
    from ..curvature.hessian import FallbackWarning
    from ..curvature.landscape import loss_slice, random_directions

    jobs = [(arch, check_arch(arch).valid_depth(depth)) for arch in archs if arch_supports(arch, act)]

    def key_of(arch, d):
        return (f"plane|{bundle.tag}|{arch}|{act}|depth={d}|seed={seed}|{_dtype_name(dtype)}"
                f"|ts=-1..1x{PLANE_POINTS}")

    def compute(arch, d) -> dict:
        net = build_model(arch, act, d, bundle.width, seed, dtype, backend=backend,
                          out_features=None if bundle.out_features == bundle.width else bundle.out_features)
        data = tuple(t.to(dtype) for t in bundle.for_act(act))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            op = HessianOperator(net, data, "mse", backend="autograd" if backend == "torch" else "fused")
        ts = np.linspace(-1.0, 1.0, PLANE_POINTS)
        sl = loss_slice(op, random_directions(op, 2, seed=seed), ts, ts)
        _release_buffers()
        return {"ts": ts.tolist(), "loss": sl.loss.tolist(), "quadratic": sl.quadratic().tolist(),
                "center": sl.center}

    if store is not None and hasattr(store, "fill"):
        _fill(store, [(key_of(*job), functools.partial(compute, *job), job[1]) for job in jobs], desc, progress,
              usable=_is_plane_record)
    out = []
    for arch, d in jobs:
        if store is None:
            rec = json_safe(compute(arch, d))
        else:
            key = key_of(arch, d)
            rec = store.get(key)
            if not _is_plane_record(rec):
                store.put(key, compute(arch, d))
                rec = store.get(key)
        grid = lambda m: [[json_float(v) for v in row] for row in m]  # noqa: E731
        out.append({"arch": arch, "act": act, "depth": d, "n": check_arch(arch).shortcut,
                    "ts": [json_float(t) for t in rec["ts"]], "loss": grid(rec["loss"]),
                    "quadratic": grid(rec["quadratic"]), "center": json_float(rec["center"])})
    return out


__all__ = [
    "ACT_VARIANTS",
    "ARCHS",
    "Arch",
    "DataBundle",
    "arch_supports",
    "best_lr_by_arch",
    "build_model",
    "group_key",
    "load_data",
    "log_probe_epochs",
    "is_stable",
    "run_init_probes",
    "run_lr_sweeps",
    "run_probe_curves",
    "run_stationary_orders",
    "run_zero_point_planes",
    "seeds_for",
]
