"""Training as in the paper (docs/science.md section 4): full-batch gradient descent, per-epoch metrics,
Hessian probes along training, and the learning-rate sweep with the best rate per network.

- :func:`train` runs one network: ``optimizer="gd"`` (the paper's full-batch gradient descent),
  ``"sgd"`` (mini-batches, optional momentum) or ``"adam"``.  Every epoch it records the loss,
  ``loss - L_min``, the gradient norm and the mean Frobenius norm of the weight matrices; at the
  probe epochs it records the Hessian's ``|lambda|max``, ``|lambda|(0.1)``, index and condition
  numbers (:func:`hessian_probes`).  A loss that becomes NaN/inf or explodes ends the run with
  ``status="diverged"``: a result, never an exception.
- :func:`lr_sweep` trains one network per learning rate of a log grid and picks the rate with the
  lowest final loss, as the paper did.  With a ``store`` (any object with ``get(key)`` and
  ``put(key, record)``, e.g. :class:`shortcut_ext.experiments.store.RunStore`) every finished run is
  checkpointed and a rerun skips it.

Epoch ``e`` metrics are measured at the weights *before* the ``e``-th update; the history holds
epochs ``0..epochs`` (the last entry is the final network).

``train(..., checkpoint=PATH)`` saves the run's state (weights, optimizer state, epoch, history and
probes so far, the mini-batch generator) to ``PATH`` as it trains, and a later call with the same
arguments resumes from it, ending with the same numbers bit for bit as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ._dist import all_reduce, group_of, model_signature, ranks_agree
from ._io import atomic_open
from .ops import autocast_off
from .reference import LOSSES, eigen_eps, loss_fn

OPTIMIZERS = ("gd", "sgd", "adam")
# the matrices a probe can add beside the Hessian (HessianOperator(matrix=...)): its two parts, and the empirical
# Fisher (not a part of H)
PROBE_PARTS = ("ggn", "functional", "empirical_fisher")
__all__ = [
    "OPTIMIZERS",
    "TrainConfig",
    "TrainResult",
    "best_run",
    "dense_hessian",
    "hessian_probes",
    "log_grid",
    "lr_sweep",
    "sharpness",
    "spectrum_probes",
    "train",
]


# --------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """What :func:`train` does.

    Attributes:
        epochs: number of updates (full passes over the data).
        lr: learning rate.
        optimizer: ``"gd"`` (full batch, the paper), ``"sgd"`` (mini-batches) or ``"adam"``.
        batch_size: mini-batch size for ``sgd``/``adam``; ``None`` means full batch.
        momentum: momentum of ``sgd``.
        loss: ``"mse"`` (the paper: ``1/(2m) sum ||f - y||^2``) or ``"cross_entropy"``.
        probe_every: Hessian probes every this many epochs (0: none) ...
        probe_epochs: ... or at exactly these epochs (overrides ``probe_every``).
        exact_max_params: largest parameter count probed with an exact dense Hessian.
        probe_parts: also probe these matrices at each probe, ``"ggn"`` (the Hessian's Gauss-Newton part
            ``G = J^T H_l J``), ``"functional"`` (the rest, ``H - G``) and / or ``"empirical_fisher"`` (``(1/m)
            sum_i g_i g_i^T``): the same numbers under the keys ``ggn_lam_max``, ``functional_index``,
            ``empirical_fisher_lam_max``, ... (see ``HessianOperator(matrix=...)``).
        sharpness_every: every this many epochs (0: never) the sharpness, the largest eigenvalue of the loss
            Hessian on the probes' data (``train``'s ``probe_data``, by default all the data), by Lanczos
            (:func:`sharpness`): the history's ``sharpness`` series (nan at the other epochs).  Much cheaper than a
            probe at depth; for full-batch gradient descent the stability threshold is ``2 / lr`` (Cohen et al. 2021,
            "the edge of stability"), for full-batch heavy-ball momentum ``(2 + 2 momentum) / lr``
            (:func:`stability_threshold`).
        divergence_factor: a loss above ``divergence_factor * max(initial loss, 1)`` counts as diverged.
        seed: seeds the mini-batch order and the random vectors of the Hessian probes (Lanczos, SLQ).
            Any integer in [0, 2^63); torch's CPU generator keeps its low 32 bits, so seeds equal
            modulo 2^32 give the same draws.
    """

    epochs: int = 1000
    lr: float = 0.01
    optimizer: str = "gd"
    batch_size: int | None = None
    momentum: float = 0.0
    loss: str = "mse"
    probe_every: int = 0
    probe_epochs: Sequence[int] | None = None
    exact_max_params: int = 4000
    divergence_factor: float = 1e8
    seed: int = 0
    probe_parts: Sequence[str] = ()
    sharpness_every: int = 0

    def __post_init__(self):
        # numpy scalars (a value from a grid or an array) as their Python values, as elsewhere in the API
        for name in ("epochs", "batch_size", "probe_every", "exact_max_params", "seed", "sharpness_every"):
            if isinstance(getattr(self, name), np.integer):
                setattr(self, name, int(getattr(self, name)))
        for name in ("lr", "momentum", "divergence_factor"):
            if isinstance(getattr(self, name), (np.integer, np.floating)) and not isinstance(getattr(self, name), bool):
                setattr(self, name, float(getattr(self, name)))
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size must be None or an integer >= 1, got {self.batch_size!r}")
        if self.batch_size is not None and self.optimizer == "gd":
            raise ValueError(f"batch_size needs optimizer 'sgd' or 'adam' (gd takes full-batch steps), got "
                             f"batch_size={self.batch_size} with optimizer='gd'")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or \
                not math.isfinite(self.momentum) or self.momentum < 0:
            raise ValueError(f"momentum must be a finite number >= 0, got {self.momentum!r}")
        if self.momentum != 0 and self.optimizer != "sgd":
            raise ValueError(f"momentum needs optimizer 'sgd' (gd takes plain steps, adam keeps its own moments), "
                             f"got momentum={self.momentum} with optimizer={self.optimizer!r}")
        if isinstance(self.exact_max_params, bool) or not isinstance(self.exact_max_params, int) or \
                self.exact_max_params < 0:
            raise ValueError(f"exact_max_params must be an integer >= 0, got {self.exact_max_params!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {self.seed!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if isinstance(self.probe_every, bool) or not isinstance(self.probe_every, int) or self.probe_every < 0:
            raise ValueError(f"probe_every must be an integer >= 0, got {self.probe_every!r}")
        if isinstance(self.sharpness_every, bool) or not isinstance(self.sharpness_every, int) or self.sharpness_every < 0:
            raise ValueError(f"sharpness_every must be an integer >= 0, got {self.sharpness_every!r}")
        if self.probe_epochs is not None:
            try:
                epochs = list(self.probe_epochs)
            except TypeError:
                raise ValueError(f"probe_epochs must be a sequence of integers, got {self.probe_epochs!r}") from None
            bad = [e for e in epochs if isinstance(e, bool) or not isinstance(e, (int, np.integer))]
            if bad:
                raise ValueError(f"probe_epochs must hold integers, got {bad[:3]}")
            self.probe_epochs = tuple(sorted({int(e) for e in epochs}))
            if any(e < 0 for e in self.probe_epochs):
                raise ValueError(f"probe_epochs must be >= 0, got {self.probe_epochs}")
        if isinstance(self.divergence_factor, bool) or not isinstance(self.divergence_factor, (int, float)) or \
                not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor!r}")
        parts = [self.probe_parts] if isinstance(self.probe_parts, str) else self.probe_parts
        try:
            parts = list(parts)
        except TypeError:
            parts = None
        if parts is None or any(p not in PROBE_PARTS for p in parts):
            raise ValueError(f"probe_parts must be a sequence of {PROBE_PARTS} (the Hessian's Gauss-Newton part, the "
                             f"rest, the empirical Fisher), got {self.probe_parts!r}")
        self.probe_parts = tuple(p for p in PROBE_PARTS if p in parts)

    def probes_at(self, epoch: int) -> bool:
        if self.probe_epochs is not None:
            return epoch in self.probe_epochs
        return self.probe_every > 0 and epoch % self.probe_every == 0

    def sharpness_at(self, epoch: int) -> bool:
        return self.sharpness_every > 0 and epoch % self.sharpness_every == 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["probe_epochs"] is not None:
            d["probe_epochs"] = list(d["probe_epochs"])
        if d["probe_parts"]:
            d["probe_parts"] = list(d["probe_parts"])
        else:  # the default: the configurations (and run-store keys, checkpoints) of earlier versions stay valid
            del d["probe_parts"]
        if not d["sharpness_every"]:  # likewise
            del d["sharpness_every"]
        return d


def log_grid(lo: float, hi: float, per_decade: int = 2) -> list[float]:
    """Learning rates from ``lo`` to ``hi`` with ``per_decade`` points per decade (log-spaced from ``lo``),
    3 digits; a point within 1% of ``10^(k / per_decade)`` is that power (``3.16e-3`` steps through
    ``0.01``, ``0.0316``, not ``0.00999``, ``0.0316``).

    >>> log_grid(0.01, 1, per_decade=2)
    [0.01, 0.0316, 0.1, 0.316, 1.0]
    >>> log_grid(3.16e-3, 3.16, per_decade=2)
    [0.00316, 0.01, 0.0316, 0.1, 0.316, 1.0, 3.16]
    """
    if not (0 < lo <= hi < math.inf):
        raise ValueError(f"need 0 < lo <= hi < inf, got lo={lo!r}, hi={hi!r}")
    if isinstance(per_decade, (bool, np.bool_)) or not isinstance(per_decade, (int, np.integer)) or per_decade < 1:
        raise ValueError(f"per_decade must be an integer >= 1, got {per_decade!r}")
    per_decade = int(per_decade)
    a, b = math.log10(lo), math.log10(hi)
    tol = math.log10(1.01) * per_decade  # 1%, in grid steps
    steps = int(math.floor((b - a) * per_decade + tol))  # never past hi (by more than the 1% snap)
    out = []
    for i in range(steps + 1):
        e = a * per_decade + i  # exponent in grid steps
        if abs(e - round(e)) < tol:
            e = round(e)
        out.append(float(f"{10 ** (e / per_decade):.3g}"))
    return out


# --------------------------------------------------------------------------- results
def _check_max_points(max_points) -> None:
    if max_points is not None and (isinstance(max_points, (bool, np.bool_))
                                   or not isinstance(max_points, (int, np.integer)) or max_points < 2):
        raise ValueError(f"max_points must be None or an integer >= 2 (first and last epoch), got {max_points!r}")


def _finite_or_none(v):
    """``v`` as a strict-JSON number: nan is ``None``, +-inf the strings ``"inf"`` / ``"-inf"`` (as
    :func:`~shortcut_ext.experiments.store.json_safe` writes them), so that a singular Hessian's
    condition number stays apart from an undefined one."""
    if v is None:
        return None
    v = float(v)
    if math.isnan(v):
        return None
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


@dataclass
class TrainResult:
    """One training run: status, final numbers, the per-epoch history and the Hessian probes."""

    status: str  # "ok" | "diverged"
    lr: float
    epochs: int
    final_loss: float  # inf when diverged
    l_min: float | None
    diverged_epoch: int | None = None
    history: dict = field(default_factory=dict)  # epoch, loss, excess, grad_norm, weight_norm (lists)
    probes: list = field(default_factory=list)  # dicts: epoch, loss, lam_max, lam_top, lam_q10, index, cond, cond_q10, method
    seconds: float = 0.0
    probe_seconds: float = 0.0

    @property
    def final_excess(self) -> float:
        if self.l_min is None:
            return math.nan
        return self.final_loss - self.l_min

    @property
    def final_weight_norm(self) -> float:
        w = self.history.get("weight_norm") or [math.nan]
        return w[-1]

    def to_dict(self, max_points: int | None = None) -> dict:
        """JSON-safe dict (nan becomes ``None``, +-inf the strings ``"inf"`` / ``"-inf"``: a diverged run's
        final loss, a singular Hessian's condition number; ``shortcut_ext.experiments.store.json_float``
        reads them back, as :meth:`from_dict` does); ``max_points`` thins the history to
        about that many epochs (evenly and log-spaced, first and last kept; probes are always kept, and so is
        every epoch with a ``sharpness``)."""
        _check_max_points(max_points)
        hist = self.history
        n = len(hist.get("epoch", []))
        if max_points is not None and n > max_points:  # evenly spaced and log-spaced epochs, first and last
            half = max(max_points // 2, 2)
            sharp = [i for i, v in enumerate(hist.get("sharpness", [])) if isinstance(v, float) and not math.isnan(v)]
            keep = np.unique(np.concatenate([np.round(np.linspace(0, n - 1, half)),
                                             np.round(np.geomspace(1, n - 1, half)), [0], sharp]).astype(int))
            hist = {k: [v[i] for i in keep] for k, v in hist.items()}
        clean = lambda xs: [_finite_or_none(x) if not isinstance(x, int) else x for x in xs]  # noqa: E731
        return {
            "status": self.status,
            "lr": self.lr,
            "epochs": self.epochs,
            "final_loss": _finite_or_none(self.final_loss),
            "final_excess": _finite_or_none(self.final_excess),
            "final_weight_norm": _finite_or_none(self.final_weight_norm),
            "l_min": self.l_min,
            "diverged_epoch": self.diverged_epoch,
            "seconds": self.seconds,
            "probe_seconds": self.probe_seconds,
            "history": {k: clean(v) for k, v in hist.items()},
            "probes": [{k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in p.items()} for p in self.probes],
        }

    # what every record written by to_dict holds; a record without one of them (hand-edited, or of another
    # program) is not a finished run: stores recompute it instead of reading defaults into it
    RECORD_FIELDS = ("status", "lr", "epochs", "final_loss", "l_min", "history", "probes")
    HISTORY_FIELDS = ("epoch", "loss", "excess", "grad_norm", "weight_norm")
    OPTIONAL_HISTORY_FIELDS = ("sharpness",)

    @classmethod
    def is_record(cls, d) -> bool:
        """True when ``d`` is a finished run as :meth:`to_dict` writes it: every field of ``RECORD_FIELDS``, a
        ``history`` with every series of ``HISTORY_FIELDS`` and at least one epoch."""
        if not (isinstance(d, dict) and all(k in d for k in cls.RECORD_FIELDS)):
            return False
        h = d["history"]
        if not (isinstance(h, dict) and all(isinstance(h.get(k), list) for k in cls.HISTORY_FIELDS)
                and len(h["epoch"]) > 0):
            return False
        # the types to_dict writes (a damaged record's strings failed later, far from the file)
        # (an integer literal beyond float's range, which JSON allows, would overflow where it is used)
        num = lambda v: (isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
                                                   and abs(v) < 2**1023))
        value = lambda v: v is None or num(v) or v in ("inf", "-inf")  # noqa: E731
        # optional series (the sharpness, where the run tracked it): as long as the epochs, numbers
        extra = [k for k in cls.OPTIONAL_HISTORY_FIELDS if k in h]
        return (isinstance(d["status"], str) and num(d["lr"]) and isinstance(d["epochs"], int)
                and not isinstance(d["epochs"], bool) and value(d["final_loss"]) and value(d["l_min"])
                and isinstance(d["probes"], list) and all(isinstance(p, dict) for p in d["probes"])
                and all(value(v) for k in cls.HISTORY_FIELDS for v in h[k])
                and all(isinstance(h[k], list) and len(h[k]) == len(h["epoch"]) and all(value(v) for v in h[k])
                        for k in extra))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainResult":
        from .experiments.store import json_float as nan_if_none  # None -> nan, "inf" -> inf

        if not cls.is_record(d):
            missing = [k for k in cls.RECORD_FIELDS if not isinstance(d, dict) or k not in d]
            if not missing:
                h = d["history"]
                missing = [f"history[{k!r}]" for k in cls.HISTORY_FIELDS
                           if not isinstance(h, dict) or not isinstance(h.get(k), list)]
                if not missing:
                    raise ValueError("not a TrainResult record: no epochs in its history, or a field of another "
                                     "type than to_dict writes")
            raise ValueError(f"not a TrainResult record: it lacks {', '.join(missing)}")
        return cls(
            status=d["status"], lr=d["lr"], epochs=d["epochs"],
            final_loss=math.inf if d.get("final_loss") is None else nan_if_none(d["final_loss"]),
            l_min=None if d.get("l_min") is None else nan_if_none(d["l_min"]), diverged_epoch=d.get("diverged_epoch"),
            history={k: [nan_if_none(x) for x in v] for k, v in d.get("history", {}).items()},
            probes=[{k: nan_if_none(v) for k, v in p.items()} for p in d.get("probes", [])],
            seconds=d.get("seconds", 0.0), probe_seconds=d.get("probe_seconds", 0.0),
        )


# --------------------------------------------------------------------------- Hessian probes
def spectrum_probes(eigenvalues, method: str = "dense", dtype: torch.dtype | None = None) -> dict:
    """The paper's curvature numbers from Hessian eigenvalues (docs/science.md section 3).

    - ``lam_max``: ``|lambda|max``; ``lam_top``: the largest eigenvalue, with its sign (the sharpness: gradient
      descent at rate ``lr`` is stable near a point only where it is at most ``2 / lr``); ``lam_q10``: the 10th
      percentile of ``|lambda|``;
    - ``index``: fraction of negative eigenvalues (``|lambda| <= P * eps * |lambda|max`` counts as 0; ``eps``
      of ``dtype``, the precision the eigenvalues were computed in, default theirs: float32's for a float32
      tensor or array);
    - ``cond``: ``|lambda|max / |lambda|min`` (``inf`` if singular); ``cond_q10``: ``|lambda|max / |lambda|(0.1)``.

    >>> p = spectrum_probes([-2.0, 1.0, 1.0, 4.0]); (p["lam_max"], p["index"], p["cond"])
    (4.0, 0.25, 4.0)
    """
    ev = np.asarray(torch.as_tensor(eigenvalues, dtype=torch.float64).detach().cpu(), dtype=np.float64).ravel()
    if ev.size == 0:
        raise ValueError("eigenvalues must not be empty")
    a = np.abs(ev)
    lam_max = float(a.max())
    tol = ev.size * eigen_eps(eigenvalues, dtype) * lam_max  # numerical-rank tolerance, as shortcut_ext.curvature
    lam_min = float(a.min())
    lam_q10 = float(np.quantile(a, 0.1, method="inverted_cdf"))
    div = lambda x, y: (x / y) if y > tol else (math.nan if x <= tol else math.inf)  # noqa: E731
    return {
        "lam_max": lam_max,
        "lam_top": float(ev.max()),
        "lam_q10": lam_q10,
        "index": float(np.mean(ev < -tol)),
        "cond": div(lam_max, lam_min),
        "cond_q10": div(lam_max, lam_q10),
        "method": method,
    }


def _loss_of(model, X, Y, loss: str, backend=None):
    return lambda w: loss_fn(loss, model.forward_with(w, X, backend=backend), Y)


def _direct_loss_and_grad(model, loss: str):
    """``(x, y) -> (loss, d loss / d model.weight)`` that calls the fused stack's forward and backward ops
    directly, or ``None`` where that would not be the computation ``model(x)`` and autograd do.

    The stack's autograd wrapper and argument checks cost 0.1-0.2 ms of Python a step, as much as the
    kernels of a small net (d = 10, 1797 samples, 6 layers: 0.33 ms a step through autograd).  Only the
    head (the frozen read-out and the loss) still goes through autograd, and the stack's backward gets
    the same ``grad_y`` and returns the same ``grad_w`` as under autograd: the gradient is the same, bit for
    bit.  Taken for a :class:`~shortcut_ext.models.StackNet` whose forward is its own (no override, no
    hooks; see ``function_differs``) on the fused backend, with no gradient hooks on its weight."""
    from torch.nn.modules import module as nn_module

    from . import _build, ops
    from .models import StackNet

    w = getattr(model, "weight", None)
    if not isinstance(model, StackNet) or type(w) is not torch.nn.Parameter or w.device.type not in ("cpu", "cuda"):
        return None
    if model.function_differs() is not None or w._backward_hooks or model._backward_hooks or \
            model._backward_pre_hooks or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks:
        return None
    if ops.check_backend(model.backend) != "fused":
        return None
    forward, backward = torch.ops.shortcut_ext.residual_stack_forward, torch.ops.shortcut_ext.residual_stack_backward
    args = (model.shortcut, *model.activations)
    # the mean squared error's gradient without autograd where y is the output (no read-out): autograd's own
    # arithmetic, so the same bits: d/dy of 0.5 * sum((y - t)^2) / m is (1 / m) * 0.5 times 2 (y - t), with 1 / m
    # rounded in the dtype (DivBackward, MulBackward, then pow's backward: grad * (2 * (y - t)))
    plain_mse = loss == "mse" and model.readout is None
    mse_step = getattr(_build._C, "mse_step", None) if loss == "mse" else None
    shape = tuple(model.stack_weights(w.detach()).shape)
    readout = None if model.readout is None else model.readout.detach()  # frozen: a constant of the loss

    def loss_and_grad(xb, yb):
        if mse_step is not None and yb.dtype == w.dtype and yb.device == w.device:
            # the whole step in one C++ call (forward, the read-out, loss, grad_y, backward; the same bits): the
            # Python below costs 35-40 us a step, a third of a d = 10, 6-layer float32 step (with a read-out,
            # 120 us, half of a d = 16 one)
            with autocast_off(w):  # the projection in the model's dtype, as model(x) computes it
                h = model.embed(xb)
            q = h.shape[-1] if readout is None else readout.shape[0]
            if h.dim() == 2 and yb.shape == (h.shape[0], q) and h.dtype == w.dtype and \
                    (readout is None or readout.dtype == w.dtype):
                wv = w.detach().reshape(shape)  # a view; mse_step makes a non-contiguous one contiguous
                L, gw = mse_step(h, wv, yb, *args, ops._save_layers(h, wv, model.recompute), readout)
                return L, gw.view_as(w)
        wv = model.stack_weights(w.detach()).contiguous()
        with autocast_off(w):  # the head in the model's dtype, as model(x) computes it
            with torch.no_grad():
                h = model.embed(xb).contiguous()
                y, saved = forward(h, wv, *args, True, ops._save_layers(h, wv, model.recompute))
                if plain_mse:
                    L = loss_fn(loss, y, yb)
                    half = torch.ones((), dtype=y.dtype, device=y.device).div_(max(y.shape[0], 1)).mul_(0.5)
                    grad_y = torch.sub(y, yb).mul_(2.0).mul_(half)
            if not plain_mse:
                with torch.enable_grad():
                    y.requires_grad_()
                    L = loss_fn(loss, model.read(y), yb)
                    (grad_y,) = torch.autograd.grad(L, y)
            _, grad_w = backward(grad_y.contiguous(), wv, saved, *args)
        return float(L.detach()), grad_w.view_as(w)

    return loss_and_grad


def dense_hessian(model, data, loss: str = "mse", max_bytes: float = 2.5e8) -> torch.Tensor:
    """Exact ``[P, P]`` Hessian of the loss w.r.t. the flat trunk weights, in float64.

    Forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``, as ``torch.func.hessian``),
    vmapped over the ``P`` unit vectors in chunks that keep memory under ``max_bytes``; the forward
    is the pure-PyTorch reference (double backward through the fused op is not supported).
    """
    from torch.func import grad, jvp, vmap

    X, Y = data
    net = model if model.weight.dtype == torch.float64 else copy.deepcopy(model).double()
    dev = net.weight.device  # data on another device moves to the model's
    X = X.detach().to(device=dev, dtype=torch.float64)  # values: targets of a teacher net keep no history
    Y = Y.detach().to(dev) if Y.dtype in (torch.long, torch.int64) else Y.detach().to(device=dev, dtype=torch.float64)
    w0 = net.weight.detach().reshape(-1).clone()
    P = w0.numel()
    g = grad(_loss_of(net, X, Y, loss, backend="torch"))
    hvp = lambda v: jvp(g, (w0,), (v,))[1]  # noqa: E731
    per_dir = 8.0 * 6 * X.shape[0] * max(net.width, X.shape[1]) * (net.depth + 2)
    chunk = int(max(1, min(P, max_bytes // per_dir)))
    H = vmap(hvp, chunk_size=chunk)(torch.eye(P, dtype=torch.float64, device=dev))
    return 0.5 * (H + H.T)


def _dense_probes(model, data, loss: str, exact_max_params: int) -> dict:
    P = model.weight.numel()
    if P > exact_max_params:
        out = {k: math.nan for k in ("lam_max", "lam_top", "lam_q10", "index", "cond", "cond_q10")}
        out["method"] = f"skipped: {P} parameters > exact_max_params={exact_max_params} and shortcut_ext.curvature unavailable"
        return out
    ev = torch.linalg.eigvalsh(dense_hessian(model, data, loss))
    return spectrum_probes(ev, method="dense (torch.func fallback)")


def hessian_probes(model, data, loss: str = "mse", exact_max_params: int = 4000, distributed: bool = False,
                   process_group=None, seed: int = 0, matrix: str = "hessian", parts=()) -> dict:
    """``{lam_max, lam_top, lam_q10, index, cond, cond_q10, method, ...}`` of the loss Hessian at the model's weights
    (with the curvature package also ``resolved``: see :func:`shortcut_ext.curvature.hessian_probes`).

    Uses :func:`shortcut_ext.curvature.hessian_probes` where it exists (exact below
    ``exact_max_params``, stochastic Lanczos quadrature above); otherwise an exact dense Hessian
    (:func:`dense_hessian`) for nets of at most ``exact_max_params`` parameters.  ``seed`` seeds the
    Lanczos start and the SLQ probes of the stochastic path (train passes the run's seed, so that seeds
    average the probes' error out too).  A model with ``backend="torch"`` is probed without the fused
    kernels (autograd Hessian-vector products), as it trains.  ``matrix``: ``"hessian"``, or one of its parts,
    ``"ggn"`` / ``"functional"``; ``parts``: also these parts, under prefixed keys (``ggn_lam_max``, ...); both
    need the curvature package.
    """
    try:
        from .curvature import hessian_probes as curvature_probes
    except ImportError:
        curvature_probes = None
    if curvature_probes is not None:
        kw = {"seed": int(seed)}
        if getattr(model, "backend", None) == "torch" and "backend" in inspect.signature(curvature_probes).parameters:
            kw["backend"] = "autograd"  # a model run without the fused kernels is probed without them too
        if model.weight.dtype != torch.float64 and "dtype" in inspect.signature(curvature_probes).parameters:
            kw["dtype"] = torch.float64  # eigenvalues near 0 (|lambda|(0.1), the index) need float64
        if distributed:
            kw.update(distributed=True, process_group=process_group)
        if matrix != "hessian":
            kw["matrix"] = matrix
        if parts:
            kw["parts"] = tuple(parts)
        return dict(curvature_probes(model, data, loss, exact_max_params=exact_max_params, **kw))
    if matrix != "hessian" or parts:
        raise ValueError(f"probes of the Hessian's parts ({matrix if matrix != 'hessian' else ', '.join(parts)}) need "
                         "shortcut_ext.curvature")
    if distributed:
        raise ValueError("distributed Hessian probes need shortcut_ext.curvature")
    return _dense_probes(model, data, loss, exact_max_params)


SHARPNESS_STEPS = 200  # Lanczos basis of sharpness() (at most; fewer where the basis would exceed 3 GiB)
SHARPNESS_TOL = 1e-4  # residual relative to |lambda|max: the Ritz value is a lower bound of lambda_top, within about this


def stability_threshold(optimizer: str, lr: float, momentum: float = 0.0, full_batch: bool = True) -> float | None:
    """The sharpness above which ``optimizer``'s full-batch steps at rate ``lr`` diverge on the loss's quadratic
    model: ``2 / lr`` for gradient descent, ``(2 + 2 momentum) / lr`` for ``"sgd"``'s heavy-ball momentum on full
    batches (``torch.optim.SGD``, no dampening: along an eigenvector of curvature ``lam`` the step
    ``w' = w - lr lam w + momentum (w - w_prev)`` is stable iff ``0 < lr lam < 2 + 2 momentum``; Cohen et al. 2021,
    appendix); ``None`` where no such number exists: mini-batches (the step's noise) and ``"adam"`` (its
    preconditioner changes the matrix whose sharpness counts).

    >>> stability_threshold("gd", 0.5), stability_threshold("sgd", 0.25, momentum=0.5)
    (4.0, 12.0)
    >>> stability_threshold("sgd", 0.1, full_batch=False) is None, stability_threshold("adam", 1e-3) is None
    (True, True)
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    for name, v in (("lr", lr), ("momentum", momentum)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.floating, np.integer)) \
                or not math.isfinite(v) or v < 0 or (name == "lr" and v == 0):
            raise ValueError(f"{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
    if optimizer == "adam" or (optimizer == "sgd" and not full_batch):
        return None
    if optimizer == "gd" and momentum:
        raise ValueError(f"momentum needs optimizer 'sgd' (gd takes plain steps), got momentum={momentum!r}")
    return (2.0 + 2.0 * float(momentum)) / float(lr)


def sharpness(model, data, loss: str = "mse", distributed: bool = False, process_group=None, seed: int = 0,
              max_steps: int = SHARPNESS_STEPS) -> dict:
    """``{"lam_top", "converged", "residual", "products"}``: the largest eigenvalue of the loss Hessian at the
    model's weights (the sharpness, with its sign), by single-vector Lanczos on fused Hessian-vector products in the
    model's dtype, from a start vector seeded by ``seed``, until the pair's residual is below ``1e-4 |lambda|max``
    (``SHARPNESS_TOL``) or ``max_steps`` basis vectors (then ``converged`` is False).  A Ritz value never exceeds
    ``lambda_top``, and a converged one lies within about the residual of it (the error is often the residual's
    square over the spectral gap).  A model with ``backend="torch"`` uses autograd products, as it trains.  Gradient descent at rate
    ``lr`` is stable on the loss's quadratic model only where ``lr * lam_top / 2 <= 1``.
    """
    if isinstance(max_steps, (bool, np.bool_)) or not isinstance(max_steps, (int, np.integer)) or max_steps < 2:
        raise ValueError(f"max_steps must be an integer >= 2 (Lanczos basis vectors), got {max_steps!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    try:
        from .curvature import HessianOperator, lanczos
        from .curvature.lanczos import basis_capacity
    except ImportError:  # pragma: no cover - the package ships with its curvature part
        raise ValueError("the sharpness needs shortcut_ext.curvature") from None
    backend = "autograd" if getattr(model, "backend", None) == "torch" else "fused"
    op = HessianOperator(model, data, loss=loss, backend=backend, distributed=distributed, process_group=process_group)
    steps = max(2, min(op.P, int(max_steps), basis_capacity(op.P, op.dtype)))
    r = lanczos(op, k=1, which="largest", max_iter=steps, seed=int(seed), verify=False,
                return_vectors=False, compute_residuals=False, tol=SHARPNESS_TOL)
    return {"lam_top": float(r.largest[0]), "converged": bool(r.converged), "residual": float(r.largest_residuals[0]),
            "products": int(r.num_products)}


# --------------------------------------------------------------------------- training
def _check_data(name, data):
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{name} must be a pair (X [m, d], Y [m, q]), got {type(data).__name__}")
    X, Y = data
    if not isinstance(X, torch.Tensor) or not isinstance(Y, torch.Tensor):
        raise TypeError(f"{name} must hold torch tensors, got {type(X).__name__}, {type(Y).__name__}")
    if X.dim() != 2 or Y.shape[0] != X.shape[0]:
        raise ValueError(f"{name} must be X [m, d] and Y [m, q] with the same m, got {list(X.shape)} and {list(Y.shape)}")
    for t, what in ((X, "X"), (Y, "Y")):  # else the run would be reported diverged at epoch 0
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: {what} must be finite, got nan or inf entries")
    return X, Y


def _check_targets(name, model, X, Y, loss: str) -> None:
    """``X`` and ``Y`` against the model's input and output widths and the loss (a clear error, not a
    broadcast or an index error deep in the loss)."""
    p, q = getattr(model, "in_features", model.width), getattr(model, "out_features", model.width)
    m = X.shape[0]
    if X.shape[1] != p:
        raise ValueError(f"{name}: X must have shape [m, {p}] (the model's in_features), got {list(X.shape)}")
    if loss == "mse":
        if Y.dim() != 2 or Y.shape[1] != q or not Y.is_floating_point():
            raise ValueError(f"{name}: Y must be a float tensor of shape [m, {q}] = [{m}, {q}] (the model's "
                             f"out_features) for loss='mse', got {list(Y.shape)} {str(Y.dtype).replace('torch.', '')}")
    elif Y.dim() == 1:
        if Y.is_floating_point() or Y.is_complex() or Y.dtype == torch.bool:
            raise ValueError(f"{name}: class-index targets Y [m] must be integers, got {str(Y.dtype).replace('torch.', '')}")
        if m and (int(Y.min()) < 0 or int(Y.max()) >= q):
            raise ValueError(f"{name}: class indices must lie in [0, {q}) (the model's out_features), got range "
                             f"[{int(Y.min())}, {int(Y.max())}]")
    elif not (Y.dim() == 2 and Y.shape[1] == q and Y.is_floating_point()):
        raise ValueError(f"{name}: Y must be class indices [{m}] or probabilities [{m}, {q}] for "
                         f"loss='cross_entropy', got {list(Y.shape)} {str(Y.dtype).replace('torch.', '')}")


def train(
    model,
    data,  # (X [m, d], Y [m, q])
    config: TrainConfig | None = None,
    l_min: float | None = None,
    probe_data=None,  # (X, Y) for Hessian probes, default ``data``
    progress: bool = False,
    distributed: bool = False,
    process_group=None,
    checkpoint=None,
    checkpoint_every: int = 10,
    checkpoint_every_s: float = 30.0,
    checkpoint_key=None,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
    on_update: Callable[[int], None] | None = None,
    **overrides,
) -> TrainResult:
    """Train ``model`` (a :class:`~shortcut_ext.models.ShortcutNet` / ``PlainNet``) in place.

    Args:
        model: the network; its ``weight`` is updated.
        data: ``(X [m, d], Y [m, q])`` in the model's dtype.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        l_min: best linear loss (:func:`shortcut_ext.data.best_linear_loss`) for ``loss - L_min``.
        probe_data: data for the Hessian probes (e.g. :func:`~shortcut_ext.data.second_moment_compress`
            of ``data`` for linear nets, which gives the same Hessian much faster).
        progress: show a tqdm bar over epochs (rank 0 only when distributed).
        distributed: data-parallel full-batch training over ``torch.distributed`` (an initialised process
            group, e.g. under torchrun): ``data`` (and ``probe_data``) are this rank's shards, which may
            be empty; losses and gradients are the sample-weighted sums over the ranks, so every rank
            takes the same steps as one process on all the data (the model must be the same on every
            rank: checked), and the Hessian probes use the distributed ``HessianOperator``.
            Mini-batch updates are refused.
        process_group: the group for ``distributed`` (default: the default group).
        checkpoint: a file (e.g. ``run.ckpt.pt``) for the run's state: the weights, the optimizer state,
            the next epoch, the history and probes so far, the mini-batch generator's state and a
            fingerprint of the run (``config``, the model, its initial weights, the data and the probe
            data, ``l_min``, ``checkpoint_key``).  It is written (atomically) after an update once ``checkpoint_every``
            epochs *and* ``checkpoint_every_s`` seconds have passed since the last write.  If the file
            holds a checkpoint of the same fingerprint, training resumes from it and ends with the same
            numbers, bit for bit, as an uninterrupted run; one of another run (or an unreadable file) is
            ignored, with a note to ``log`` (a warning without one), and replaced; one of the same fingerprint
            whose optimizer or generator state cannot be loaded stops the call with a ``ValueError`` that
            names the file (the model left as it was; delete the file to start afresh).  If the run is
            interrupted (an exception, e.g. ``KeyboardInterrupt``), the model's weights are put back as
            they were at the call, so that the same call resumes from the last checkpoint.  The file is
            left in place when ``train`` returns: delete it once the result is saved.  The file is not
            locked: two runs given one path overwrite each other's checkpoints (the ``train`` command
            locks its ``--out``).  Distributed: every rank passes the same path,
            rank 0 writes it, and the ranks resume only if all of them read the same epoch.
        checkpoint_every, checkpoint_every_s: the least epochs and seconds between two writes.
        checkpoint_key: anything JSON-serialisable that the checkpoint must also match (e.g. the options
            of a command that built the model and data).
        log: receives one-line notes (resuming, a checkpoint replaced); default: none, and a checkpoint
            replaced becomes a warning.
        on_epoch: called as ``on_epoch(epoch)`` after each update (after any checkpoint write); an
            exception it raises (e.g. ``KeyboardInterrupt``) ends the run.
        on_update: called as ``on_update(epoch)`` after each update, before that epoch's checkpoint is written:
            for outputs that must never lag the checkpoint (``train --save-weights-every``'s files: a run resumed
            from a checkpoint has had ``on_update`` called for every epoch before it).

    Returns:
        A :class:`TrainResult`; a diverged run has ``status="diverged"`` and ``final_loss=inf``.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("train() needs autograd, which torch.inference_mode() turns off: call it outside "
                           "inference mode (HessianOperator and the spectra work inside it)")
    w = getattr(model, "weight", None)
    if isinstance(w, torch.Tensor) and (not w.requires_grad or w.is_inference()):
        raise ValueError("model.weight must be trainable, got " + (
            "a tensor made under torch.inference_mode (build the model outside it)" if w.is_inference()
            else "requires_grad=False (call model.weight.requires_grad_(True) to train it)"))
    if isinstance(w, torch.Tensor) and not w.is_leaf:
        raise ValueError("model.weight must be a leaf tensor that train() updates in place, got one computed from "
                         "other tensors (a torch.nn.utils.parametrize parametrization or pruning of it?): train "
                         "the model with your own loop, or remove the parametrization first")
    differs = getattr(model, "function_differs", None)
    reason = (differs() if callable(differs) and (config.probe_every or config.probe_epochs or config.sharpness_every)
              else None)
    quiet: list = []  # warning categories the probes keep quiet
    if reason:
        from .models import ForwardNotSeenWarning

        quiet.append(ForwardNotSeenWarning)
        warnings.warn(f"train(): the Hessian probes (and the sharpness) differentiate the network that model.weight "
                      f"and the frozen projections define, while training uses model(x): {reason}, which they do not "
                      "see",
                      ForwardNotSeenWarning, stacklevel=2)
    rank, world = group_of(distributed, process_group, "train")
    local_error = None
    try:
        X, Y = _check_data("data", data)
        probe_data = (X, Y) if probe_data is None else _check_data("probe_data", probe_data)
        _check_targets("data", model, X, Y, config.loss)
        if probe_data is not data:
            _check_targets("probe_data", model, *probe_data, config.loss)
        if not distributed and X.shape[0] == 0:
            raise ValueError("data must hold at least one sample, got X of shape " + str(list(X.shape)))
        if X.dtype != model.weight.dtype:
            raise TypeError(f"data must have the model's dtype {model.weight.dtype}, got X: {X.dtype}")
        if distributed and not (config.optimizer == "gd" or config.batch_size is None):
            raise ValueError(f"train(distributed=True) takes full-batch updates (optimizer 'gd', or batch_size=None); "
                             f"got optimizer={config.optimizer!r}, batch_size={config.batch_size}")
    except (TypeError, ValueError) as e:
        if not distributed:
            raise
        local_error = e  # raised after the other ranks learn of it: none may wait in a collective
    total = None
    if distributed:
        # one check on every rank alike: a rank's bad data, or another model or configuration, raises everywhere
        # (the mini-batch seed is left out: full-batch updates do not use it)
        settings = {k: v for k, v in config.to_dict().items() if k != "seed"}
        # a checkpoint on some ranks only would put the fingerprint's collective beside the others' gradient
        # (a gloo abort); l_min sets every rank's recorded excess loss
        settings.update(checkpoint=checkpoint is not None, l_min=l_min)
        total = ranks_agree(model.weight, 0 if local_error is not None else X.shape[0], local_error, process_group,
                            rank, "train", extra=model_signature(model, **settings))
    device = model.weight.device  # data on another device (CPU data, a GPU model) moves once, here
    # values only: targets from a teacher net keep no history, and tensors made under torch.inference_mode
    # (which autograd cannot save for backward) become normal ones
    X, Y = _values(X.to(device)), _values(Y.to(device))
    probe_data = tuple(_values(t.to(device)) for t in probe_data)
    w = model.weight
    m = X.shape[0]
    share = 1.0  # this rank's part of the mean loss
    if distributed:
        if total == 0:
            raise ValueError(f"data must hold at least one sample over all {world} ranks, got none")
        share = m / total
        progress = progress and rank == 0
    params = [w]
    opt = None  # "gd" updates in place: the per-epoch cost of a small net is mostly overhead
    if config.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=config.lr)
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    full_batch = config.optimizer == "gd" or config.batch_size is None or config.batch_size >= m
    gen = torch.Generator().manual_seed(int(config.seed))
    lm = None if l_min is None else float(l_min)
    hist = {"epoch": [], "loss": [], "excess": [], "grad_norm": [], "weight_norm": []}
    if config.sharpness_every:
        hist["sharpness"] = []  # nan at the epochs between
    probes: list[dict] = []
    status, diverged_epoch, final_loss = "ok", None, math.inf
    limit = None
    t0 = time.perf_counter()
    probe_time = 0.0
    start, seconds_before = 0, 0.0
    if log is not None:
        say = log
    else:  # a checkpoint that cannot be used is worth a warning even without a log
        def say(msg):
            if msg.startswith("note:"):
                warnings.warn(msg, stacklevel=3)
    w_start = None
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
        if not (isinstance(checkpoint_every_s, (int, float)) and math.isfinite(checkpoint_every_s)
                and checkpoint_every_s >= 0):
            raise ValueError(f"checkpoint_every_s must be a finite number >= 0, got {checkpoint_every_s!r}")
        fingerprint = _fingerprint(model, X, Y, config, lm, checkpoint_key, distributed, process_group, world,
                                   probe_data)
        w_start = w.detach().clone()  # put back if the run is interrupted: the same call then resumes
        state = _load_checkpoint(checkpoint, fingerprint, say)
        damaged = None if state is None else _checkpoint_damage(state, w, config, opt is not None)
        if damaged:  # hand-edited or corrupted with its fingerprint intact: not resumed
            say(f"note: the checkpoint {checkpoint} holds damaged entries ({damaged}); starting afresh and replacing it")
            state = None
        if distributed:  # resume only if every rank read the same epoch (e.g. the file is on a shared disk)
            import torch.distributed as dist

            e = float(state["epoch"]) if state is not None else -1.0
            t = all_reduce(torch.tensor([e, -e], dtype=torch.float64, device=device), process_group,
                           dist.ReduceOp.MAX)
            if float(t[0]) != -float(t[1]):
                if state is not None or rank == 0:  # rank 0 says it too when only another rank found one
                    say(f"note: the ranks read different checkpoints from {checkpoint} (each node's own disk?); "
                        "starting afresh")
                state = None
        if state is not None:
            try:
                if opt is not None:  # before the weights: a failure leaves the model as it was
                    opt.load_state_dict(state["optimizer"])
                gen.set_state(state["generator"])
            except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as err:
                raise ValueError(f"the checkpoint {checkpoint} matches this run but its optimizer or generator state "
                                 f"cannot be loaded ({err}): delete it to start afresh") from None
            with torch.no_grad():
                w.copy_(state["weight"].to(device=w.device, dtype=w.dtype))
            hist, probes, limit = state["history"], state["probes"], state["limit"]
            start, seconds_before, probe_time = state["epoch"], state["seconds"], state["probe_seconds"]
            say(f"resuming from epoch {start} of {config.epochs} ({checkpoint})")
            was, now_threads = state.get("threads"), torch.get_num_threads()
            if w.device.type == "cpu" and isinstance(was, int) and was != now_threads:
                # the CPU kernels split their sums by thread: another count rounds differently
                say(f"note: the checkpoint was written with {was} CPU threads and this run has {now_threads}: the "
                    "result agrees with an uninterrupted run to rounding, not bit for bit (resume with "
                    f"OMP_NUM_THREADS={was} for the same bits)")
    saved_epoch, saved_t = start, t0
    unresolved_said = False  # one note per run on SLQ probes that could not resolve the spectrum near 0
    sharpness_said = False  # and one on a sharpness that did not converge or failed
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, initial=start, desc="train", leave=False)

    direct = _direct_loss_and_grad(model, config.loss)

    def loss_and_grad(xb, yb):
        if direct is not None:
            return direct(xb, yb)
        with torch.enable_grad(), autocast_off(w):  # the backward too: under autocast it ran in bfloat16
            L = loss_fn(config.loss, model(xb), yb)
            (g,) = torch.autograd.grad(L, w)
        return float(L.detach()), g

    def full_loss_and_grad():
        if not distributed:
            return loss_and_grad(X, Y)
        buf = torch.zeros(w.numel() + 1, dtype=w.dtype, device=device)  # [gradient, loss], one all-reduce
        if m:
            L, g = loss_and_grad(X, Y)
            buf[:-1] = g.reshape(-1) * share
            buf[-1] = L * share
        all_reduce(buf, process_group)
        return float(buf[-1]), buf[:-1].view_as(w)

    def measured(compute):
        """``(compute(), None)``, or ``(None, error)`` for a failure of the curvature computation (a probe's or the
        sharpness's), with the warnings said once kept quiet, its time counted in ``probe_seconds``."""
        nonlocal probe_time
        tp = time.perf_counter()
        try:
            # ForwardNotSeenWarning was said at the start, and the operator's notes (e.g. its autograd fallback) at
            # the first probe: quiet after that (catch_warnings only then: entering it resets the registry of
            # warnings already shown)
            with warnings.catch_warnings() if quiet else contextlib.nullcontext():
                for category in quiet:
                    warnings.simplefilter("ignore", category)
                out, err = compute(), None
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as e:
            if world > 1:  # the failure itself is every rank's (the same all-reduced products); a collective that
                # failed (a rank stopped or died) is not a result: it must end the run before this epoch's
                # checkpoint, not be saved as a failed probe and resumed
                all_reduce(torch.zeros(1, dtype=torch.float64, device=device), process_group)
            out, err = None, e
        probe_time += time.perf_counter() - tp
        try:  # the operator's notes were said at this (the first) computation: once per run
            from .curvature.hessian import FallbackWarning
        except ImportError:  # pragma: no cover - without the curvature package
            FallbackWarning = None
        if FallbackWarning is not None and FallbackWarning not in quiet:
            quiet.append(FallbackWarning)
        return out, err

    try:
        for epoch in range(start, config.epochs + 1):
            L, g = full_loss_and_grad()
            gn = float(g.norm())
            wn = model.mean_frobenius_norm()
            if limit is None:
                limit = config.divergence_factor * max(L, 1.0) if math.isfinite(L) else 0.0
            hist["epoch"].append(epoch)
            hist["loss"].append(L)
            hist["excess"].append(L - lm if lm is not None else math.nan)
            hist["grad_norm"].append(gn)
            hist["weight_norm"].append(wn)
            if config.sharpness_every:
                hist["sharpness"].append(math.nan)
            if not (math.isfinite(L) and math.isfinite(gn) and math.isfinite(wn)) or L > limit:
                status, diverged_epoch = "diverged", epoch
                break
            if config.probes_at(epoch):
                p, e = measured(lambda: hessian_probes(
                    model, probe_data, config.loss, config.exact_max_params, distributed=distributed,
                    process_group=process_group, seed=config.seed,
                    **({"parts": config.probe_parts} if config.probe_parts else {})))
                if e is not None:  # e.g. eigh fails on an overflowed Hessian
                    p = {k: math.nan for k in ("lam_max", "lam_top", "lam_q10", "index", "cond", "cond_q10")}
                    p["method"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                probes.append({"epoch": epoch, "loss": L, "excess": hist["excess"][-1], "grad_norm": gn, **p})
                if p.get("resolved") is False and not unresolved_said:
                    unresolved_said = True
                    msg = (f"note: the Hessian probe at epoch {epoch} ({p.get('method')}, {model.weight.numel()} "
                           f"weights > exact_max_params = {config.exact_max_params}) could not resolve the "
                           f"eigenvalues near 0: |lambda|(0.1), cond_q10 and the index (up to "
                           f"~{p.get('index_unresolved_mass', math.nan):.2f} off) are unreliable, by factors; they are "
                           "saved with \"resolved\": false. Raise exact_max_params (--exact-max-params) for "
                           "the exact values")
                    say(msg)  # to log, or a warning without one
            if config.sharpness_at(epoch):
                sh, e = measured(lambda: sharpness(model, probe_data, config.loss, distributed=distributed,
                                                   process_group=process_group, seed=config.seed))
                if e is not None:
                    sh = {"lam_top": math.nan, "converged": False,
                          "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                hist["sharpness"][-1] = sh["lam_top"]
                if not sh["converged"] and not sharpness_said:
                    sharpness_said = True
                    say(f"note: the sharpness at epoch {epoch} " + (
                        f"failed ({sh['error']}); it is nan there" if "error" in sh else
                        f"stopped at {sh['products']} Lanczos steps with a residual of {sh['residual']:.2g} against "
                        f"{sh['lam_top']:.6g} (above {SHARPNESS_TOL:g} of |lambda|max): a lower bound there, and usually much "
                        "closer than the residual (the top eigenvalues lie close together)") + " (said once per run)")
            if epoch == config.epochs:
                final_loss = L
                break
            if opt is None:
                with torch.no_grad():
                    w.sub_(g, alpha=config.lr)
            elif full_batch:
                w.grad = g
                opt.step()
            else:
                perm = torch.randperm(m, generator=gen, device="cpu").to(X.device)
                for i in range(0, m, config.batch_size):
                    idx = perm[i: i + config.batch_size]
                    w.grad = loss_and_grad(X[idx], Y[idx])[1]
                    opt.step()
            if bar is not None:
                bar.update(1)
            if on_update is not None:
                on_update(epoch)
            if checkpoint is not None and rank == 0:
                now = time.perf_counter()
                if epoch + 1 - saved_epoch >= checkpoint_every and now - saved_t >= checkpoint_every_s:
                    _save_checkpoint(checkpoint, {
                        "format": _CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": epoch + 1,
                        "weight": w.detach().cpu(), "optimizer": None if opt is None else opt.state_dict(),
                        "generator": gen.get_state(), "history": hist, "probes": probes, "limit": limit,
                        "seconds": seconds_before + now - t0, "probe_seconds": probe_time,
                        "threads": torch.get_num_threads() if w.device.type == "cpu" else None})
                    saved_epoch, saved_t = epoch + 1, time.perf_counter()
            if on_epoch is not None:
                on_epoch(epoch)
    except BaseException:  # e.g. KeyboardInterrupt: the weights as at the call, so that the same call resumes
        if w_start is not None:
            with torch.no_grad():
                w.copy_(w_start)
        if bar is not None:
            bar.close()
        raise
    if bar is not None:
        bar.close()
    w.grad = None
    return TrainResult(
        status=status, lr=float(config.lr), epochs=config.epochs, final_loss=final_loss, l_min=lm,
        diverged_epoch=diverged_epoch, history=hist, probes=probes,
        seconds=seconds_before + time.perf_counter() - t0, probe_seconds=probe_time,
    )


# --------------------------------------------------------------------------- checkpoints
_CHECKPOINT_FORMAT = 3  # 3: data also by a rounding-tolerant summary (2: by its hash only; 1 summed it)
_DATA_RTOL = 1e-5  # data (and l_min) this close to the checkpoint's: the same data, rounded differently


def _digest(*tensors) -> str:
    """SHA-1 of the tensors' dtypes, shapes and values (order-sensitive; ``None`` entries count too)."""
    h = hashlib.sha1()
    for t in tensors:
        if t is None:
            h.update(b"none|")
            continue
        t = t.detach()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1)
        chunk = 1 << 22  # elements at a time: no full-size host copy of device data
        for i in range(0, flat.numel(), chunk):
            h.update(flat[i:i + chunk].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _values(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, copied if it was made under ``torch.inference_mode``."""
    t = t.detach()
    return t.clone() if t.is_inference() else t


def _fingerprint(model, X, Y, config: TrainConfig, l_min, key, distributed: bool, process_group, world: int,
                 probe_data=None) -> str:
    """What a run's numbers depend on, as a JSON string: a checkpoint is resumed only under the same one.
    The data (and the probe data) enter by a hash of their values (each rank's hash, summed over the ranks
    in 48-bit parts when distributed), the model by a hash of its initial weight and frozen projections."""
    pd = (None, None) if probe_data is None else tuple(probe_data)
    hx = _digest(X, Y, *pd)
    parts = torch.tensor([float(int(hx[i:i + 12], 16)) for i in (0, 12, 24)] + [float(X.shape[0])],
                         dtype=torch.float64, device=X.device)  # 48-bit parts: sums over ranks stay exact
    # the same data prepared under another BLAS thread count or numpy version (PCA whitening) differs in its
    # last bits, which the hash tells apart: a summary compared to a tolerance tells it is the same data
    summary = torch.tensor([v for t in (X, Y, *pd) for v in _data_summary(t)], dtype=torch.float64,
                           device=X.device)
    if distributed:
        all_reduce(parts, process_group)
        all_reduce(summary, process_group)
    w = model.weight
    fp = {"key": key, "config": config.to_dict(), "model": repr(model), "weight_shape": list(w.shape),
          "dtype": str(w.dtype), "weights": _digest(w, getattr(model, "input_proj", None), getattr(model, "readout", None)),
          "data": [float(v) for v in parts.cpu()], "data_summary": [float(v) for v in summary.cpu()],
          "l_min": l_min, "world": world}
    return json.dumps(fp, sort_keys=True, default=str)


def _data_summary(t, k: int = 4) -> list:
    """``[count, sum of squares, k seeded random projections]`` of ``t``'s values (zeros for ``None``): equal to
    rounding for the same data, far apart for other data (a changed sample moves a projection by its size)."""
    if t is None:
        return [0.0] * (k + 2)
    flat = t.detach().reshape(-1)
    g = torch.Generator().manual_seed(20161104)
    out = torch.zeros(k + 2, dtype=torch.float64)
    out[0] = flat.numel()
    chunk = 1 << 20
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk].to(device="cpu", dtype=torch.float64)
        out[1] += part.square().sum()
        out[2:] += torch.randn(part.numel(), k, generator=g, dtype=torch.float64, device="cpu").T @ part
    return out.tolist()


def _same_data_to_rounding(a: dict, b: dict) -> bool:
    """The data summaries and ``l_min`` of two fingerprints agree within ``_DATA_RTOL`` (of each tensor's norm)."""
    sa, sb = a.get("data_summary"), b.get("data_summary")
    if not (isinstance(sa, list) and isinstance(sb, list) and len(sa) == len(sb) and len(sa) % 6 == 0):
        return False
    for i in range(0, len(sa), 6):
        if sa[i] != sb[i]:
            return False
        na, nb = math.sqrt(max(sa[i + 1], 0.0)), math.sqrt(max(sb[i + 1], 0.0))
        scale = max(na, nb) or 1.0
        if abs(na - nb) > _DATA_RTOL * scale:  # norms, compared in norm units
            return False
        if any(abs(x - y) > _DATA_RTOL * scale for x, y in zip(sa[i + 2:i + 6], sb[i + 2:i + 6])):
            return False
    la, lb = a.get("l_min"), b.get("l_min")
    if la is None or lb is None:
        return la is None and lb is None
    # relative to L_min, with a floor far below the targets' scale (a noise-free teacher's L_min is rounding
    # itself, ~1e-31) and far below any L_min a user sets apart
    y_scale = sa[7] / max(sa[6], 1.0)  # Y's mean square (the second summary is Y's)
    return abs(float(la) - float(lb)) <= _DATA_RTOL * max(abs(float(la)), abs(float(lb))) + 1e-12 * y_scale


def _state_digest(state) -> str:
    """SHA-256 of a checkpoint's values (tensors by dtype, shape and bytes; containers in order, dict keys
    sorted; scalars by ``repr``, exact for floats): what ``torch.load`` gives back of them, so that a file
    damaged inside a tensor, where the zip format does not look, is known on reading."""
    h = hashlib.sha256()

    def walk(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode() + b":")
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode() + b"|")

    walk(state)
    return h.hexdigest()


def _save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file, fsync, ``os.replace``), with the digest of its
    values (``checksum``)."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    state = {**state, "checksum": _state_digest(state)}
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def _checkpoint_damage(state: dict, w: torch.Tensor, config: TrainConfig, with_optimizer: bool) -> str | None:
    """What makes a checkpoint that matched the fingerprint unusable (a missing entry, a wrong type or shape),
    or None."""
    need = ["weight", "history", "probes", "limit", "epoch", "seconds", "probe_seconds", "generator"]
    need += ["optimizer"] if with_optimizer else []
    missing = [k for k in need if k not in state]
    if missing:
        return "it lacks " + ", ".join(missing)
    if not isinstance(state["weight"], torch.Tensor) or tuple(state["weight"].shape) != tuple(w.shape):
        got = list(state["weight"].shape) if isinstance(state["weight"], torch.Tensor) else type(state["weight"]).__name__
        return f"weight is {got}, the model's is {list(w.shape)}"
    e = state["epoch"]
    if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e <= config.epochs:
        return f"epoch {e!r} is not an integer in [0, {config.epochs}]"
    h = state["history"]
    if not isinstance(h, dict) or not all(isinstance(h.get(k), list) for k in TrainResult.HISTORY_FIELDS):
        return "its history lacks a series"
    series = TrainResult.HISTORY_FIELDS + (("sharpness",) if config.sharpness_every else ())
    if not isinstance(h.get("sharpness", []), list) or (config.sharpness_every and "sharpness" not in h):
        return "its history lacks a series"
    if h["epoch"] != list(range(e)) or any(len(h[k]) != e for k in series):
        return f"its history does not hold epochs 0 to {e - 1}"
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not all(v is None or num(v) for k in series for v in h[k]):
        return "its history holds values that are not numbers"
    if not isinstance(state["probes"], list) or not all(
            isinstance(p, dict) and all(v is None or isinstance(v, (int, float, str, bool)) for v in p.values())
            for p in state["probes"]):
        return "its probes are not a list of records of numbers"
    nonneg = lambda v: num(v) and math.isfinite(v) and v >= 0  # noqa: E731
    if not (nonneg(state["seconds"]) and nonneg(state["probe_seconds"])
            and (state["limit"] is None or nonneg(state["limit"]))):
        return "seconds, probe_seconds or the divergence limit is not a finite number >= 0"
    gen_size = torch.Generator().get_state().numel()
    g = state["generator"]
    if not isinstance(g, torch.Tensor) or g.dtype != torch.uint8 or g.numel() != gen_size:
        return "the mini-batch generator state is not a CPU generator's"
    if with_optimizer:
        o = state["optimizer"]
        if not (isinstance(o, dict) and isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)):
            return "the optimizer state is not an optimizer's state_dict"
        for per_param in o["state"].values():  # moment and momentum buffers have the weight's shape
            if not isinstance(per_param, dict):
                return "the optimizer state is not an optimizer's state_dict"
            for name, v in per_param.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(w.shape):
                    return f"the optimizer's {name} is {list(v.shape)}, the weight's {list(w.shape)}"
    return None


def _load_checkpoint(path: str, fingerprint: str, say: Callable[[str], None]) -> dict | None:
    """The checkpoint at ``path`` if it holds a run of ``fingerprint``; ``None`` (with a note) otherwise."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder: it must name a file (the run would fail at its first save)")
    for parent in Path(path).parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"checkpoint {path} lies under {parent}, which is a file (the run would fail at its "
                             "first save)")
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path):  # a FIFO or a device would hang or never end the read
        say(f"note: the checkpoint path {path} is not a regular file; starting afresh and replacing it")
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and "format" in state and "fingerprint" in state):
            raise ValueError("not a train() checkpoint")
    except Exception as e:  # noqa: BLE001 -- an interrupted first write, or another file: start afresh
        say(f"note: cannot read the checkpoint {path} ({type(e).__name__}); starting afresh and replacing it")
        return None
    if state.get("format") != _CHECKPOINT_FORMAT:
        say(f"note: the checkpoint {path} was written by another version of shortcut_ext (checkpoint format "
            f"{state.get('format')!r}, this version reads {_CHECKPOINT_FORMAT}), whose run it cannot check against "
            "this one; starting afresh and replacing it (finish that run with the version that started it)")
        return None
    if state.get("fingerprint") != fingerprint:
        try:  # the same run on data rounded differently resumes (with a note); else name what differs
            a, b = json.loads(state.get("fingerprint") or "{}"), json.loads(fingerprint)
            data_keys = ("data", "data_summary", "l_min")
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            # l_min alone differing (the data hash equal) is the caller's other l_min, not rounding
            if diff and set(diff) <= set(data_keys) and "data" in diff and _same_data_to_rounding(a, b):
                say(f"note: the data agree with those of the checkpoint {path} to rounding only (prepared under "
                    "another thread count or numpy version): the result agrees with an uninterrupted run to "
                    "rounding, not bit for bit")
                return _checked(state, path, say)
            if "data_summary" in diff:
                diff.remove("data_summary")
                if "data" not in diff:
                    diff.append("data")
            if "config" in diff and isinstance(a.get("config"), dict):
                diff.remove("config")
                diff += [f"config.{k}" for k in sorted(set(a["config"]) | set(b["config"]))
                         if a["config"].get(k) != b["config"].get(k)]
            what = {"world": "number of ranks", "weights": "initial weights or projections",
                    "data": "data or probe data", "key": "command options"}
            names = ", ".join(what.get(k, k) for k in diff) or "other options or data"
        except (TypeError, ValueError):
            names = "other options or data"
        say(f"note: the checkpoint {path} is of another run (it differs in: {names}); starting afresh and "
            "replacing it")
        return None
    return _checked(state, path, say)


def _checked(state: dict, path: str, say: Callable[[str], None]) -> dict | None:
    """``state`` without its checksum if its values match it (a checkpoint of an earlier version has none);
    ``None`` with a note if they do not: the file was damaged after it was written."""
    state = dict(state)
    checksum = state.pop("checksum", None)
    if checksum is not None and checksum != _state_digest(state):
        say(f"note: the checkpoint {path} is damaged (its values do not match the checksum written with them); "
            "starting afresh and replacing it")
        return None
    return state


# --------------------------------------------------------------------------- learning-rate sweep
def best_run(results: Iterable) -> TrainResult | dict | None:
    """The run with the lowest final loss (the paper's "best learning rate"); ``None`` if all diverged.

    Accepts :class:`TrainResult` objects or their dicts; ties go to the first in order.
    """
    best, best_loss = None, math.inf
    for r in results:
        fl = r.final_loss if isinstance(r, TrainResult) else r.get("final_loss")
        fl = math.inf if fl is None else float(fl)
        if math.isfinite(fl) and fl < best_loss:
            best, best_loss = r, fl
    return best


def lr_sweep(
    make_model: Callable[[], torch.nn.Module],
    data,
    lrs: Sequence[float],
    config: TrainConfig | None = None,
    l_min: float | None = None,
    probe_data=None,
    store=None,
    key: str | None = None,
    max_points: int | None = 500,
) -> tuple[TrainResult | None, list[TrainResult]]:
    """Train a fresh ``make_model()`` at every rate of ``lrs``; return ``(best, all_runs)``.

    Divergent rates are results (``status="diverged"``).  With ``store`` (``get(key) -> dict | None``,
    ``put(key, dict)``) each finished run is saved under ``sweep_run_key(key, lr)`` (``f"{key}/lr={lr:.6g}"``: ``"k/lr=1"``
    for ``lr = 1.0``) as soon as it ends, and
    runs already in the store are loaded instead of retrained: an interrupted sweep resumes.
    """
    config = config or TrainConfig()
    _check_max_points(max_points)  # before any run, not after the first
    if not lrs:
        raise ValueError("lrs must hold at least one learning rate")
    if store is not None and key is None:
        raise ValueError("key must name the sweep when a store is given")
    runs = []
    for lr in lrs:
        run_key = sweep_run_key(key, lr) if key is not None else None
        rec = store.get(run_key) if store is not None else None
        if TrainResult.is_record(rec):  # a record without its fields is run again (the new line wins)
            runs.append(TrainResult.from_dict(rec))
            continue
        res = train(make_model(), data, dataclasses.replace(config, lr=float(lr)), l_min=l_min, probe_data=probe_data)
        if store is not None:
            rec = res.to_dict(max_points)
            store.put(run_key, rec)
            res = TrainResult.from_dict(rec)  # what a resumed sweep reads back: fresh and resumed runs agree
        runs.append(res)
    return best_run(runs), runs


def sweep_run_key(key: str, lr: float) -> str:
    """The store key of one run of :func:`lr_sweep` ``key`` at rate ``lr``."""
    return f"{key}/lr={float(lr):.6g}"


def sweep_run_record(make_model, data, lr: float, config: TrainConfig | None = None, l_min=None, probe_data=None,
                     max_points: int | None = 500) -> dict:
    """The record :func:`lr_sweep` stores for rate ``lr`` (for runs computed ahead, e.g. by other ranks)."""
    config = config or TrainConfig()
    _check_max_points(max_points)
    res = train(make_model(), data, dataclasses.replace(config, lr=float(lr)), l_min=l_min, probe_data=probe_data)
    return res.to_dict(max_points)
