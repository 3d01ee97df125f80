"""The Hessian of a network's loss w.r.t. its trunk weights, as a linear operator.

The operator acts on the flat trunk parameter vector ``w = model.weight.flatten()`` (``P`` entries,
in the row-major order of ``weight[R, n, d, d]``).  Over a data set split into mini-batches ``b`` of
``m_b`` samples (``m = sum_b m_b``), the loss is the mean over samples, so

    H = sum_b (m_b / m) * H_b,      H_b = Hessian of the batch's mean loss,

which is *exactly* the full-data Hessian (docs/science.md: ``L = 1/(2m) sum_i ||f(x_i) - y_i||^2``).

Backends:
- ``"fused"``: :func:`shortcut_ext.ops.residual_stack_hvp` (one fused R-operator pass for ``k``
  directions).  The fused op computes the loss on the trunk output.  A frozen read-out ``P [q, d]``
  with orthonormal columns (``q >= d``, as the models make it) under ``mse`` runs fused all the same:
  ``||P h - y||^2 = ||h - P^T y||^2 + ||(I - P P^T) y||^2``, so the Hessian is that of the trunk with
  targets ``P^T y``.  Other read-outs (``q < d``, cross-entropy, columns not orthonormal) go into the
  kernel itself (``residual_stack_hvp(..., readout=P)``: the loss of ``h P^T``), CPU or CUDA.  Where the
  fused HVP kernel is not built, the operator uses ``"autograd"`` instead, with a warning, and says so in
  :attr:`HessianOperator.backend_used`.
- ``"autograd"``: double backward through the pure-PyTorch reference stack, all ``k`` directions in
  one ``torch.autograd.grad(..., is_grads_batched=True)`` call.
- ``"func"``: ``torch.func.jvp`` of ``torch.func.grad`` (forward-over-reverse), ``vmap``-ed over
  the ``k`` directions.  The loss is written out by hand (``reference.loss_fn``): in torch 2.13
  ``jvp(grad(F.mse_loss))`` fails with "ZeroTensors are immutable".

The two parts of the Hessian (``matrix=``).  With ``z = f(x; w)`` the network's outputs (after the
read-out) and ``l(z, y)`` the per-sample loss,

    H = G + F,   G = J^T H_l J  (the generalised Gauss-Newton matrix, GGN),   F = sum_i dl/dz_i . d2 z_i / dw2,

``J = dz/dw``, ``H_l = d2 l / dz2`` (``I / m`` for mse; ``c_i (diag(s) - s s^T) / m`` for softmax
cross-entropy, ``s = softmax(z)``, ``c_i`` the sum of sample i's target probabilities, 1 for class indices).
``G`` is positive semi-definite and is what Gauss-Newton, natural-gradient and K-FAC methods see; ``F`` (the
"functional Hessian", Singh et al. 2021) carries every negative eigenvalue.  How each backend computes ``G v``:

- ``"fused"`` (CPU and CUDA): the fused kernel's own parts (:func:`shortcut_ext.residual_stack_hvp` with
  ``matrix=``): ``G`` by the R-operator without the net's second derivatives (about half an ``H v``'s
  arithmetic at many directions), ``F`` by the R-operator with the output's tangent seed ``H_l J v`` set to zero
  (an ``H v``'s cost); one call each.
- ``"autograd"``: ``F`` is linear in the residual ``dl/dz``, which is zero where the
  targets are the network's own predictions (``y = z`` under mse, ``c_i softmax(z)`` as probabilities under
  cross-entropy, whose ``H_l`` depends on ``y`` through ``c_i`` alone), so ``G`` is the Hessian with those
  targets: one HVP call per product, the targets from the same backend's forward (the residual is exactly
  zero there).
- ``"func"``: ``J^T (H_l (J v))`` directly (``jvp`` and ``vjp`` of the outputs).

Elsewhere ``F v = H v - G v`` (two products each).  At an n-shortcut
net's zero point with n >= 2 (and a plain net's of depth >= 2) ``J = 0``, so ``G = 0``: the whole zero-point
Hessian of Theorem 1 is ``F`` (docs/science.md).

``matrix="empirical_fisher"`` is not a part of ``H``: ``(1/m) sum_i g_i g_i^T`` of the per-sample gradients
``g_i = J_i^T e_i`` (``e_i = dl_i/dz_i``), i.e. ``G`` with ``e_i e_i^T`` in place of ``H_l``; for mse and
cross-entropy the true Fisher is ``G``, and the empirical one differs from it (Kunstner et al. 2019).  The fused
backend computes it as ``G`` with that output seed (one call); the other backends by
``torch.func`` (``jvp``, ``vjp``); ``dense_empirical_fisher_func`` is the dense reference.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable

import numpy as np
import torch

from .. import ops, reference
from .._dist import all_reduce, group_of, model_signature, ranks_agree
from ..reference import LOSSES, MATRICES

BACKENDS = ("fused", "autograd", "func")
PARTS = ("ggn", "functional")  # the Hessian's two parts, H = G + F


class FallbackWarning(UserWarning):
    """``HessianOperator(backend="fused")`` runs autograd products instead (see ``fallback_reason``)."""

MAX_DENSE_PARAMS = 8192  # to_dense() refuses above this (P^2 float64 = 512 MiB) unless force=True


def fused_hvp_available() -> bool:
    """True when the compiled extension provides the fused ``residual_stack_hvp`` kernel."""
    if getattr(ops, "_C", None) is None:
        return False
    try:
        return hasattr(torch.ops.shortcut_ext, "residual_stack_hvp")
    except (AttributeError, RuntimeError):
        return False


def _as_batches(data, allow_empty: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` or an iterable of ``(x, y)`` -> list of batches (materialised: the operator makes many passes).
    ``allow_empty``: an empty iterable is no batches (a rank's empty shard), not an error."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [(data[0], data[1])]
    if (isinstance(data, (tuple, list)) and len(data) == 2 and any(isinstance(t, np.ndarray) for t in data)
            and all(isinstance(t, (np.ndarray, torch.Tensor)) for t in data)):
        raise TypeError(f"data (x, y) must be torch tensors, got ({type(data[0]).__name__}, {type(data[1]).__name__}): "
                        "convert numpy arrays with torch.from_numpy")
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be one batch (x, y) of tensors or an iterable of (x, y) mini-batches, "
            f"got {type(data).__name__}"
        )
    if (isinstance(data, tuple) and len(data) == 2 and all(isinstance(s, (list, tuple)) for s in data)
            and len(data[0]) == len(data[1]) and all(isinstance(t, torch.Tensor) for s in data for t in s)):
        # ([x1, x2, ...], [y1, y2, ...]) or (torch.split(X, b), torch.split(Y, b)) reads as the mini-batches
        # (x1, x2), (y1, y2) under the documented form when there are two of each, and silently so when x and y
        # have the same width: a tuple of two equal-length sequences of tensors is refused (a list of batches,
        # e.g. list(DataLoader) or list(zip(xs, ys)), is the documented form and stays accepted)
        raise TypeError(
            f"data is a tuple of two sequences of {len(data[0])} tensors: (xs, ys) as from torch.split, or two "
            "(x, y) mini-batches? It is ambiguous: give mini-batches as a list of (x, y) pairs, e.g. "
            "list(zip(xs, ys)), or one batch as (x, y)")
    batches = []
    for i, b in enumerate(data):
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(t, torch.Tensor) for t in b)):
            got = (f"({', '.join(type(t).__name__ for t in b)})" if isinstance(b, (tuple, list))
                   else type(b).__name__)
            raise TypeError(f"data[{i}] must be a pair (x, y) of torch tensors, got {got}")
        batches.append((b[0], b[1]))
    if not batches and not allow_empty:
        raise ValueError("data must hold at least one batch (x, y), got an empty iterable")
    return batches


@contextlib.contextmanager
def _exact(t: torch.Tensor):
    """Products and gradients in the operator's dtype with autograd available: autocast off (the double
    backward and the read-out would drop to bfloat16 under it) and inference mode lifted."""
    with torch.inference_mode(False), ops.autocast_off(t):
        yield


def _owned(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``t``, copied if it shares memory with the caller's ``src``."""
    if t.device == src.device and t.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
        return t.clone()
    return t


def _normal(t):
    """A tensor made under ``torch.inference_mode`` cannot be saved for backward: a normal copy of it."""
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


class HessianOperator:
    """Hessian of the mean loss w.r.t. the flat trunk weights, as a symmetric ``P x P`` operator.

    The weights and the data are read once, at construction, and copied where they are not already
    (the operator is the Hessian at that point: changing the model or the data tensors afterwards
    does not change it).  Data already in the operator's dtype and device are therefore held twice
    while the operator lives; ``copy_data=False`` holds them by reference instead.

    Args:
        model: a :class:`~shortcut_ext.models.ShortcutNet` or :class:`~shortcut_ext.models.PlainNet`.  The
            operator rebuilds the network from ``model.weight`` (under a parametrization: its current
            value) and the frozen projections; a subclass's own ``forward`` and forward hooks are not
            part of it (a ``ForwardNotSeenWarning`` says so).
        data: one batch ``(x[B, p], y)`` or an iterable of such mini-batches (materialised once).
            ``y`` is ``[B, q]`` for ``mse``; class indices ``[B]`` or probabilities ``[B, q]`` for
            ``cross_entropy``.  A tuple of two equal-length sequences of tensors (``([x1, x2], [y1, y2])``,
            ``(torch.split(X, b), torch.split(Y, b))``, ``((x1, y1), (x2, y2))``) is refused as ambiguous:
            give mini-batches as a list, e.g. ``list(zip(xs, ys))``.
        loss: ``"mse"`` (``1/(2m) sum ||f - y||^2``) or ``"cross_entropy"`` (mean).
        backend: ``"fused"``, ``"autograd"`` or ``"func"`` (see module docstring).
        dtype: working dtype (default: the model's); weights, data and directions are cast to it.
        max_directions: split a ``matmat`` into chunks of at most this many directions (memory).
        distributed: data-parallel over ``torch.distributed`` (an initialised process group, e.g. under
            ``torchrun``; gloo on CPU, NCCL on GPUs): ``data`` is this rank's shard (it may be empty),
            the weights must be the same on every rank (checked), and every product is all-reduced, so
            every rank gets the Hessian of the mean loss over the union of the shards.  Every rank must
            make the same calls with the same directions (as Lanczos and SLQ with the same seed do).
        process_group: the group for ``distributed`` (default: the default group).
        copy_data: copy the data that no cast copied (default); ``False`` keeps references (no extra
            memory for a large data set on the GPU; then do not change the tensors while the operator is
            in use).
        matrix: ``"hessian"`` (default), ``"ggn"`` (the generalised Gauss-Newton part ``G = J^T H_l J``) or
            ``"functional"`` (the rest, ``H - G``); see the module docstring.  Or ``"empirical_fisher"``, ``(1/m)
            sum_i grad l_i grad l_i^T`` (not a part of ``H``: ``G`` with the per-sample ``e_i e_i^T`` in place of
            ``H_l``, ``e_i = dl_i/dz_i``; fused on the CPU, by ``torch.func`` elsewhere).  ``loss_and_grad`` is
            the loss's either way.

    >>> import torch
    >>> from shortcut_ext.models import ShortcutNet
    >>> net = ShortcutNet(width=2, units=1, shortcut=2, init="zero", backend="torch", dtype=torch.float64)
    >>> x = torch.eye(2, dtype=torch.float64); y = torch.zeros(2, 2, dtype=torch.float64)
    >>> H = HessianOperator(net, (x, y), backend="autograd")
    >>> H.shape, sorted(set(torch.linalg.eigvalsh(H.to_dense()).round(decimals=6).tolist()))
    ((8, 8), [-0.5, 0.5])
    """

    _fresh_products = True  # every matmat returns new memory (the spectral tools need not copy it)

    def __init__(self, model, data, loss: str = "mse", backend: str = "fused", dtype: torch.dtype | None = None,
                 max_directions: int | None = None, distributed: bool = False, process_group=None,
                 copy_data: bool = True, matrix: str = "hessian"):
        if not isinstance(copy_data, bool):
            raise TypeError(f"copy_data must be True or False, got {copy_data!r}")
        if not isinstance(matrix, str) or matrix not in MATRICES:
            raise ValueError(f"matrix must be one of {MATRICES} (the Hessian, its Gauss-Newton part G = J^T H_l J, "
                             f"the rest H - G, or the empirical Fisher), got {matrix!r}")
        self._copy_data = copy_data
        self.matrix = matrix
        w = getattr(model, "weight", None)
        with _exact(w) if isinstance(w, torch.Tensor) else contextlib.nullcontext():
            self._setup(model, data, loss, backend, dtype, max_directions, distributed, process_group)

    def _setup(self, model, data, loss, backend, dtype, max_directions, distributed, process_group):
        for attr in ("weight", "stack_weights", "shortcut", "activations", "width", "n"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"model must be a ShortcutNet or PlainNet (with .{attr}), got {type(model).__name__}"
                )
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        differs = getattr(model, "function_differs", None)
        reason = differs() if callable(differs) else None
        if reason:
            from ..models import ForwardNotSeenWarning

            warnings.warn(f"HessianOperator differentiates the network that model.weight and the frozen projections "
                          f"define, not model(x): {reason}, which it does not see", ForwardNotSeenWarning, stacklevel=3)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        dtype = model.weight.dtype if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if max_directions is not None and (isinstance(max_directions, bool) or not isinstance(max_directions, int)
                                           or max_directions < 1):
            raise ValueError(f"max_directions must be a positive integer or None, got {max_directions!r}")
        self.rank, self.world_size = group_of(distributed, process_group, "HessianOperator")
        self.group = process_group
        self._dist = distributed
        self.model = model
        self.loss = loss
        self.backend = backend
        self.max_directions = max_directions
        self.dtype = dtype
        self.device = model.weight.device
        if self.device.type == "meta" or ops._is_fake(model.weight):
            raise ValueError("model.weight must hold values (the operator is the Hessian at the model's weights), "
                             f"got a {'meta' if self.device.type == 'meta' else 'fake'} tensor: load or initialise "
                             "the model first (e.g. to_empty() and load_state_dict())")
        self._W = model.stack_weights(model.weight.detach()).to(dtype).clone()  # [R, n, d, d]
        self.P = self._W.numel()
        self.shape = (self.P, self.P)
        self.size = self.P
        self.shortcut = bool(model.shortcut)
        self.activations = tuple(model.activations)
        proj = getattr(model, "input_proj", None)
        readout = getattr(model, "readout", None)
        # copies, like the weights: a later load_state_dict of the model must not change the operator
        self._input_proj = None if proj is None else _owned(_normal(proj.detach().to(dtype)), proj)  # [d, p]
        self._readout = None if readout is None else _owned(_normal(readout.detach().to(dtype)), readout)  # [q, d]
        self.in_features = getattr(model, "in_features", model.width)
        self.out_features = getattr(model, "out_features", model.width)

        self._batches = []  # (h0[B, d], y, weight m_b / m)
        sizes = []
        local_error = None
        try:
            for i, (x, y) in enumerate(_as_batches(data, allow_empty=distributed)):
                h0, y = self._check_batch(i, x, y)
                self._batches.append([h0, y])
                sizes.append(x.shape[0])
        except (TypeError, ValueError) as e:
            if not distributed:
                raise
            local_error = e  # raised after the other ranks learn of it: none may wait in a collective
        self.local_samples = int(sum(sizes))
        self.num_samples = self.local_samples
        if distributed:
            self.num_samples = ranks_agree(self._W, self.local_samples, local_error, self.group, self.rank,
                                           "distributed HessianOperator",
                                           extra={"in_features": self.in_features, **model_signature(
                                               model, loss=loss, dtype=str(self.dtype),
                                               max_directions=self.max_directions, matrix=self.matrix)})
        if self.num_samples == 0:
            raise ValueError("data must hold at least one sample, got batches with 0 rows in total"
                             + (f" over all {self.world_size} ranks" if distributed else ""))
        self._batches = [(h0, y, m_b / self.num_samples) for (h0, y), m_b in zip(self._batches, sizes) if m_b > 0]
        self.num_batches = len(self._batches)

        self.fallback_reason = None
        self.backend_used = backend
        self._target_map = None  # P [q, d]: the fused HVP's targets are y P (an orthonormal read-out, mse)
        self._kernel_readout = None  # P [q, d] given to the fused HVP kernel: the loss of h P^T
        if backend == "fused":
            # the kernels take any read-out themselves; one the targets can absorb keeps the plain loss
            in_kernel = self._readout is not None and bool(self._readout_not_absorbed())
            if not fused_hvp_available():
                from .._build import build_info

                self.backend_used, self.fallback_reason = "autograd", (
                    f"the fused HVP kernel is not available ({build_info().get('error') or 'not built'})")
                warnings.warn(f"HessianOperator(backend='fused') runs autograd Hessian-vector products (slower): "
                              f"{self.fallback_reason}", FallbackWarning, stacklevel=3)
            elif in_kernel:
                self._kernel_readout = self._readout
            elif self._readout is not None:
                self._target_map = self._readout
        # the GGN's targets: each batch's own predictions (zero residual), in the form the products take them,
        # where G is a Hessian at other targets (the autograd backend's; not the func backend's J^T H_l J, nor the
        # fused kernels' own parts)
        self._ggn_kernel = self.backend_used == "fused"
        self._ggn_y = None if self.matrix not in PARTS or self.backend_used == "func" or self._ggn_kernel else [
            self._prediction_targets(h0, y) for h0, y, _ in self._batches]
        self.num_products = 0

    # ------------------------------------------------------------------ checks and helpers
    @property
    def distributed(self) -> bool:
        """True when products are all-reduced over a process group (``distributed=True``)."""
        return self._dist

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over the operator's group; a no-op when not distributed."""
        return all_reduce(t, self.group) if self._dist else t

    def _check_batch(self, i: int, x, y):
        src_x, src_y = x, y  # the caller's tensors: what is kept must not share their memory
        # values only: targets from a teacher net, or an x that requires grad, must not carry their history
        # into the products (which then required grad, and the eigensolvers' numpy() calls failed)
        x, y = x.detach(), y.detach()
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"data[{i}] x must have shape [B, {self.in_features}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"data[{i}] x must be a floating-point tensor, got {x.dtype}")
        B = x.shape[0]
        for name, t in (("x", x), ("targets", y)):
            if t.device.type == "meta" or ops._is_fake(t):
                raise ValueError(f"data[{i}] {name} must hold values (the operator checks and copies them), got a "
                                 f"{'meta' if t.device.type == 'meta' else 'fake'} tensor")
            if t.layout != torch.strided:
                raise ValueError(f"data[{i}] {name} must be a dense (strided) tensor, got layout {t.layout} "
                                 "(call .to_dense())")
        if y.dim() == 0 or y.shape[0] != B:
            raise ValueError(f"data[{i}] targets must have {B} rows like x, got shape {list(y.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"data[{i}] x must be finite, got nan or inf entries")
        q = self.out_features
        if self.loss == "mse":
            if y.dim() != 2 or y.shape[1] != q:
                raise ValueError(f"data[{i}] targets must have shape [{B}, {q}] for loss='mse', got {list(y.shape)}")
            if not y.is_floating_point():
                raise TypeError(f"data[{i}] targets must be floating point for loss='mse', got {y.dtype}")
            if not bool(torch.isfinite(y).all()):
                raise ValueError(f"data[{i}] targets must be finite, got nan or inf entries")
            y = y.to(device=self.device, dtype=self.dtype)
        else:
            if y.dim() == 1:
                if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                    raise TypeError(f"data[{i}] class-index targets must be integers, got {y.dtype}")
                if B and (int(y.min()) < 0 or int(y.max()) >= q):
                    raise ValueError(f"data[{i}] class indices must lie in [0, {q}), got range "
                                     f"[{int(y.min())}, {int(y.max())}]")
                y = y.to(device=self.device, dtype=torch.long)
            elif y.dim() == 2 and y.shape[1] == q and y.is_floating_point():
                if not bool(torch.isfinite(y).all()) or bool((y < 0).any()):
                    raise ValueError(f"data[{i}] probability targets must be finite and >= 0, got "
                                     f"min {float(y.min()):.3g}" + (" and nan/inf entries"
                                                                     if not bool(torch.isfinite(y).all()) else ""))
                y = y.to(device=self.device, dtype=self.dtype)
            else:
                raise ValueError(f"data[{i}] targets must be class indices [{B}] or probabilities [{B}, {q}] "
                                 f"for loss='cross_entropy', got {list(y.shape)} {y.dtype}")
        x = x.to(device=self.device, dtype=self.dtype)
        h0 = x if self._input_proj is None else x @ self._input_proj.T
        # a snapshot, like the weights: the caller's tensors (or views of them) edited in place afterwards
        # must not change the operator, whatever the dtype (a cast already copied, a float64 x did not)
        if not self._copy_data:
            return _normal(h0.contiguous()), _normal(y)
        return _owned(_normal(h0.contiguous()), src_x), _owned(_normal(y), src_y)

    def _readout_not_absorbed(self) -> str | None:
        """Why the targets cannot absorb the frozen read-out ``P [q, d]`` (the fused kernel then takes it: the
        loss of ``h P^T``), or ``None``: they do under mse when ``P`` has orthonormal columns to the operator's
        precision (targets ``y P``, the same Hessian; the models' read-outs for ``q >= d`` are, rounded to
        their dtype), which keeps the plain loss of the trunk's output."""
        P = self._readout
        q, d = P.shape
        if self.loss != "mse":
            return "this model's read-out comes before a cross-entropy loss"
        if q < d:
            return f"this model's read-out [{q}, {d}] has fewer targets than the width (no orthonormal columns)"
        gram = P.T.double() @ P.double()
        err = float((gram - torch.eye(d, dtype=torch.float64, device=P.device)).abs().max())
        # rounding of the QR and of P^T P grows with q: up to ~1 of 4 sqrt(q) eps measured (float64 models'
        # read-outs at d = 1..256, q to 4096); a float32 model's is ~1e-8 off in float64
        tol = lambda dt: 4 * math.sqrt(q) * torch.finfo(dt).eps  # noqa: E731
        if err <= tol(self.dtype):
            return None
        if err <= tol(torch.float32):
            return ("this model's read-out has orthonormal columns to float32 precision only (a float32 model's) "
                    "and the operator computes in float64")
        return f"this model's read-out does not have orthonormal columns (max |P^T P - I| = {err:.2g})"

    def _read(self, h):
        return h if self._readout is None else h @ self._readout.T

    def _prediction_targets(self, h0, y) -> torch.Tensor:
        """Targets that make the loss's residual zero at the operator's weights, so that the Hessian with them
        is the GGN (:func:`shortcut_ext.ops.prediction_targets` of the outputs, from the forward of the backend
        that computes the products: the same bits where it is the same computation)."""
        with torch.no_grad(), _exact(self._W):
            fused = self.backend_used == "fused"
            h = ops.residual_stack(h0, self._W, self.shortcut, *self.activations, backend="fused" if fused else "torch")
            if fused and self._target_map is not None:  # the products' loss is that of h itself (targets y P)
                return h
            return ops.prediction_targets(self._read(h), y, self.loss)  # z: what the loss compares with targets

    def _forward_loss(self, w4, h0, y, backend="torch"):
        h = ops.residual_stack(h0, w4, self.shortcut, *self.activations, backend=backend)
        return reference.loss_fn(self.loss, self._read(h), y)

    def _check_directions(self, V) -> torch.Tensor:
        if not isinstance(V, torch.Tensor):
            raise TypeError(f"V must be a torch.Tensor of shape [{self.P}, k], got {type(V).__name__}")
        if V.dim() != 2 or V.shape[0] != self.P:
            raise ValueError(f"V must have shape [{self.P}, k] (P = number of trunk weights), got {list(V.shape)}")
        if V.shape[1] == 0:
            raise ValueError(f"V must hold k >= 1 directions, got shape {list(V.shape)}")
        if V.dtype != self.dtype:
            raise TypeError(f"V must have dtype {self.dtype} (the operator's dtype), got {V.dtype}")
        return V.to(self.device)

    # ------------------------------------------------------------------ products
    def matvec(self, v: torch.Tensor) -> torch.Tensor:  # [P] -> [P]
        """``H v`` for one direction ``v[P]``."""
        if not isinstance(v, torch.Tensor) or v.dim() != 1:
            got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"v must be a 1-D tensor of shape [{self.P}], got {got}")
        return self.matmat(v.unsqueeze(1)).squeeze(1)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:  # [P, k] -> [P, k]
        """``H V`` for ``k`` directions at once (columns of ``V[P, k]``)."""
        V = self._check_directions(V)
        k = V.shape[1]
        step = k if self.max_directions is None else self.max_directions
        with _exact(self._W):
            outs = [self._hvp_all_batches(V[:, c:c + step]) for c in range(0, k, step)]
        self.num_products += k
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _hvp_all_batches(self, V):  # [P, k] -> [P, k]
        D = V.T.reshape((V.shape[1],) + tuple(self._W.shape))  # [k, R, n, d, d]
        fn = {"fused": self._hvp_fused, "autograd": self._hvp_autograd, "func": self._hvp_func}[self.backend_used]
        out = None
        for i, (h0, y, wt) in enumerate(self._batches):
            hv = self._product(fn, i, h0, y, D)  # a new tensor: summed into in place, no [k, P] zeros (at P = 5M
            if out is None:    # a fresh zeroed block costs its page faults on every product)
                out = hv if wt == 1.0 else hv.mul_(wt)
            else:
                out.add_(hv, alpha=wt)
        # contiguous on every rank: the all-reduce sums raw memory, so the ranks' layouts must agree (D is often a
        # permuted view of V, whose zeros_like keeps its strides)
        out = torch.zeros(D.shape, dtype=D.dtype, device=D.device) if out is None else out.contiguous()
        self._all_reduce(out)
        return out.reshape(V.shape[1], self.P).T

    def _product(self, fn, i, h0, y, D):
        """One batch's product with the operator's matrix: ``H D``, ``G D``, ``(H - G) D`` or the empirical
        Fisher's."""
        if self.matrix == "hessian":
            return fn(h0, y, D)
        if self._ggn_kernel:  # any of them in one call of the fused kernel
            return self._hvp_fused(h0, y, D, matrix=self.matrix)
        if self.matrix == "empirical_fisher":
            return self._ggn_func(h0, y, D, fisher=True)
        if self.backend_used == "func":
            g = self._ggn_func(h0, y, D)
        else:  # the Hessian at the batch's own predictions
            g = fn(h0, self._ggn_y[i], D, mapped=True)
        return g if self.matrix == "ggn" else fn(h0, y, D).sub_(g)

    def _hvp_fused(self, h0, y, D, mapped=False, matrix="hessian"):
        # ||P h - y||^2 = ||h - y P||^2 + a constant: the same Hessian, G and F
        if self._target_map is not None and not mapped:
            y = y @ self._target_map
        _, _, hv = ops.residual_stack_hvp(h0, self._W, y, D.contiguous(), self.shortcut, *self.activations,
                                          loss=self.loss, backend="fused", readout=self._kernel_readout, matrix=matrix)
        return hv

    def _hvp_autograd(self, h0, y, D, mapped=False):
        w = self._W.detach().requires_grad_(True)
        with torch.enable_grad():
            L = self._forward_loss(w, h0, y)
            (g,) = torch.autograd.grad(L, w, create_graph=True)
            if not g.requires_grad:  # the gradient does not depend on w: H = 0
                return torch.zeros_like(D)
            if D.shape[0] == 1:  # vmap over one direction only adds overhead
                return torch.autograd.grad(g, w, grad_outputs=D[0], materialize_grads=True)[0].detach().unsqueeze(0)
            try:
                (hv,) = torch.autograd.grad(g, w, grad_outputs=D, is_grads_batched=True, retain_graph=True,
                                            materialize_grads=True)
            except RuntimeError:  # an op without a batching rule: one direction at a time
                hv = torch.stack([torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True,
                                                      materialize_grads=True)[0] for v in D])
        return hv.detach()

    def _hvp_func(self, h0, y, D):
        from torch.func import grad, jvp, vmap

        shape = self._W.shape

        def loss_of(w4):
            return self._forward_loss(w4.reshape(shape), h0, y)

        def hvp(v):
            return jvp(grad(loss_of), (self._W,), (v,))[1]

        return vmap(hvp)(D)

    def _ggn_func(self, h0, y, D, fisher=False):
        """``G D = J^T H_l J D`` directly: ``jvp`` of the outputs, the loss's Hessian in the outputs, ``vjp``;
        ``fisher``: the empirical Fisher's, ``e_i e_i^T`` in place of ``H_l`` (``e_i = dl_i/dz_i``)."""
        from torch.func import grad, jvp, vjp, vmap

        shape, m = self._W.shape, h0.shape[0]

        def outputs(w4):
            return self._read(ops.residual_stack(h0, w4.reshape(shape), self.shortcut, *self.activations,
                                                 backend="torch"))

        z, back = vjp(outputs, self._W)
        s = torch.softmax(z, dim=1) if self.loss == "cross_entropy" else None
        c = 1.0 if s is None or y.dim() == 1 else y.sum(dim=1, keepdim=True)  # the targets' mass per sample
        e = grad(lambda zz: reference.loss_fn(self.loss, zz, y))(z.detach()) * m if fisher else None

        def one(v):
            jv = jvp(outputs, (self._W,), (v,))[1]  # [B, q]
            if fisher:
                return back(e * (e * jv).sum(dim=1, keepdim=True) / m)[0]
            u = jv if s is None else c * (s * jv - s * (s * jv).sum(dim=1, keepdim=True))  # H_l (J v), times m
            return back(u / m)[0]

        return vmap(one)(D)

    # ------------------------------------------------------------------ other views
    def loss_and_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss (0-dim) and its gradient ``[P]`` over all the data."""
        total, grad = self._loss_and_grad_at(self._W)
        return total, grad.reshape(-1)

    def _loss_and_grad_at(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean loss (0-dim) and its gradient (``W``'s shape ``[R, n, d, d]``) at weights ``W``, over all the
        data (the mini-batches and, distributed, the ranks summed)."""
        fwd = None if self.backend_used == "fused" else "torch"
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros_like(W)
        for h0, y, wt in self._batches:
            w = W.detach().requires_grad_(True)
            with torch.enable_grad(), _exact(w):
                L = self._forward_loss(w, h0, y, backend=fwd)
                (g,) = torch.autograd.grad(L, w)
            total += wt * L.detach()
            grad += wt * g
        self._all_reduce(total)
        self._all_reduce(grad)
        return total, grad

    def to_dense(self, force: bool = False, chunk: int = 256) -> torch.Tensor:  # [P, P]
        """The full Hessian, assembled from batched HVPs with ``chunk`` directions each.

        Refuses when ``P > MAX_DENSE_PARAMS`` (8192) unless ``force=True``.
        """
        if self.P > MAX_DENSE_PARAMS and not force:
            raise ValueError(
                f"to_dense() refuses P = {self.P} > MAX_DENSE_PARAMS = {MAX_DENSE_PARAMS} parameters "
                f"({self.P ** 2 * torch.finfo(self.dtype).bits // 8 / 2**30:.1f} GiB); pass force=True, or use "
                "lanczos / slq on the operator itself"
            )
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        # filled in place, one block of unit vectors at a time: the peak is the result plus one chunk (an
        # identity, a list of chunks and their concatenation alive at once took 3.3x the result)
        out = torch.empty(self.P, self.P, dtype=self.dtype, device=self.device)
        for c in range(0, self.P, chunk):
            k = min(chunk, self.P - c)
            E = torch.zeros(self.P, k, dtype=self.dtype, device=self.device)
            E[torch.arange(c, c + k, device=self.device), torch.arange(k, device=self.device)] = 1
            out[:, c:c + k] = self.matmat(E)
            del E
        return out

    def as_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` view (numpy in, numpy out, in the operator's dtype)."""
        from scipy.sparse.linalg import LinearOperator

        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32

        def mm(X):
            X = np.asarray(X)
            one = X.ndim == 1
            t = torch.as_tensor(np.ascontiguousarray(X.reshape(self.P, -1)), dtype=self.dtype, device=self.device)
            out = self.matmat(t).cpu().numpy()
            return out[:, 0] if one else out

        return LinearOperator(shape=self.shape, dtype=np_dtype, matvec=mm, rmatvec=mm, matmat=mm, rmatmat=mm)

    def __repr__(self) -> str:
        return (f"HessianOperator(P={self.P}, loss={self.loss!r}, "
                f"{'' if self.matrix == 'hessian' else f'matrix={self.matrix!r}, '}backend={self.backend!r}"
                f"{'' if self.backend_used == self.backend else f' -> {self.backend_used!r}'}, dtype={self.dtype}, "
                f"samples={self.num_samples}, batches={self.num_batches}"
                f"{f', rank={self.rank}/{self.world_size}' if self._dist else ''})")


def _dense_reference_setup(model, data, loss: str, dtype: torch.dtype):
    """What the dense references share: a copy of the net in ``dtype``, its flat weights, the batches, the sample
    count; the data's own checks, all before any matrix (not the operator's: tests compare the two)."""
    import copy

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    net = copy.deepcopy(model).to(dtype)
    w0 = net.weight.detach().reshape(-1)
    batches = [(x.detach(), y.detach()) for x, y in _as_batches(data)]
    m = sum(x.shape[0] for x, _ in batches)
    if m == 0:
        raise ValueError("data must hold at least one sample")
    p_in = getattr(net, "in_features", getattr(net, "width", None))
    q = getattr(net, "out_features", getattr(net, "width", None))
    for x, y in batches:
        if x.dim() != 2 or x.shape[1] != p_in:
            raise ValueError(f"x must have shape [B, {p_in}], got {list(x.shape)}")
        if loss == "cross_entropy" and y.dim() == 1:
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"class-index targets must be integers, got {y.dtype}")
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"class-index targets must have {x.shape[0]} entries like x, got {y.shape[0]}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= q):
                raise ValueError(f"class indices must lie in [0, {q}), got values in [{int(y.min())}, {int(y.max())}]")
        elif y.dim() != 2 or tuple(y.shape) != (x.shape[0], q):
            raise ValueError(f"targets must have shape [{x.shape[0]}, {q}]"
                             + (f" (or [{x.shape[0]}] class indices)" if loss == "cross_entropy" else "")
                             + f", got {list(y.shape)}")
        elif not y.is_floating_point():
            raise TypeError(f"targets of shape [B, {q}] must be floating point, got {y.dtype}")
    return net, w0, batches, m


def dense_hessian_func(model, data, loss: str = "mse", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference: the full-data Hessian ``[P, P]`` by ``torch.func.hessian`` of the hand-written loss.

    Built apart from :class:`HessianOperator`: the model's own ``forward_with`` (projections included, on
    the torch backend) and :func:`~shortcut_ext.reference.loss_fn` on the raw data, each mini-batch
    weighted by its share of the samples; none of the operator's preparation of the data (embedding,
    target maps, batch weights) is reused, so that tests comparing the two check it.  Slow and memory
    hungry (``P^2``); for tests and tiny nets only.
    """
    from torch.func import hessian

    net, w0, batches, m = _dense_reference_setup(model, data, loss, dtype)
    H = torch.zeros(w0.numel(), w0.numel(), dtype=dtype, device=w0.device)
    for x, y in batches:
        x = x.to(device=w0.device, dtype=dtype)
        y = y.to(device=w0.device, dtype=dtype) if y.is_floating_point() else y.to(w0.device)

        def f(w, x=x, y=y):
            return reference.loss_fn(loss, net.forward_with(w, x, backend="torch"), y)

        H += (x.shape[0] / m) * hessian(f)(w0)
    return H


def dense_ggn_func(model, data, loss: str = "mse", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference: the full-data generalised Gauss-Newton matrix ``G = (1/m) sum_i J_i^T H_l,i J_i`` ``[P, P]``.

    ``J_i = dz_i/dw`` by ``torch.func.jacrev`` of the model's own ``forward_with`` (torch backend), ``H_l,i`` the
    loss's Hessian in sample i's outputs times ``m`` (``I`` for mse, ``c_i (diag(s) - s s^T)`` for cross-entropy,
    ``c_i`` the sum of sample i's target probabilities, 1 for class indices).  Built apart from
    :class:`HessianOperator`, for tests and tiny nets only.  ``dense_hessian_func(...) - dense_ggn_func(...)`` is the functional part ``F``.
    """
    from torch.func import jacrev

    net, w0, batches, m = _dense_reference_setup(model, data, loss, dtype)
    G = torch.zeros(w0.numel(), w0.numel(), dtype=dtype, device=w0.device)
    for x, y in batches:
        x = x.to(device=w0.device, dtype=dtype)
        z = net.forward_with(w0, x, backend="torch")  # [B, q]
        J = jacrev(lambda w, x=x: net.forward_with(w, x, backend="torch"))(w0)  # [B, q, P]
        if loss == "mse":
            HJ = J
        else:
            s = torch.softmax(z, dim=1).unsqueeze(2)  # [B, q, 1]
            c = 1.0 if y.dim() == 1 else y.to(device=z.device, dtype=dtype).sum(dim=1).reshape(-1, 1, 1)
            HJ = c * (s * J - s * (s * J).sum(dim=1, keepdim=True))
        G += torch.einsum("bqp,bqr->pr", J, HJ) / m
    return G


def dense_empirical_fisher_func(model, data, loss: str = "mse", dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Reference: the full-data empirical Fisher ``(1/m) sum_i g_i g_i^T`` ``[P, P]``, ``g_i`` the gradient of
    sample i's own loss (by ``torch.func.jacrev`` of the per-sample losses of the model's ``forward_with``).
    Built apart from :class:`HessianOperator` (``matrix="empirical_fisher"``), for tests and tiny nets only."""
    from torch.func import jacrev

    net, w0, batches, m = _dense_reference_setup(model, data, loss, dtype)
    Fm = torch.zeros(w0.numel(), w0.numel(), dtype=dtype, device=w0.device)
    for x, y in batches:
        x = x.to(device=w0.device, dtype=dtype)
        y = y.to(device=w0.device, dtype=dtype if y.is_floating_point() else y.dtype)

        def per_sample(w, x=x, y=y):  # [B]: each sample's loss (a batch of one is its own mean)
            z = net.forward_with(w, x, backend="torch")
            return torch.stack([reference.loss_fn(loss, z[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])])

        g = jacrev(per_sample)(w0)  # [B, P]
        Fm += g.T @ g / m
    return Fm
