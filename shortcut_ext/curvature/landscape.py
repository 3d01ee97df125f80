"""The loss along lines and planes through the weights, and the order of a stationary point.

Theorem 1 (docs/science.md section 2) says more than the Hessian's spectrum: at ``W = 0`` an
n-shortcut net is a stationary point of order ``n - 1``.  Along a generic direction ``v`` the loss
then changes as ``L(t v) - L(0) ~ c t^n``: linearly for ``n = 1`` (the gradient is not 0), as a
saddle of the Hessian for ``n = 2``, and for ``n >= 3`` flatter than any quadratic model can say
(gradient and Hessian vanish).  :func:`stationary_order` measures that exponent; :func:`loss_slice`
evaluates the loss on a line or a plane of weights (Goodfellow et al. 2015; Li et al., "Visualizing
the Loss Landscape of Neural Nets", NeurIPS 2018, for filter-normalised random directions) beside the
exact quadratic model ``L + t g.v + t^2/2 v^T H v`` from the gradient and Hessian-vector products.

Every function takes a :class:`~shortcut_ext.curvature.HessianOperator`: its snapshot of the weights,
data (one batch or mini-batches, summed exactly), loss, read-out and backend, and with
``distributed=True`` its process group (each loss is all-reduced; every rank must make the same
calls).  A loss is one fused forward per mini-batch, no autograd graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ._linop import check_count, seeded_generator
from .hessian import HessianOperator, _exact

NORMALIZE = ("unit", "layer", "filter")
_PATH_BLOCK = 1 << 22  # path_directions works on [T, this / T] float64 slices of the path's offsets (32 MiB)


def _check_op(op) -> HessianOperator:
    if not isinstance(op, HessianOperator):
        raise TypeError(f"op must be a HessianOperator (it holds the weights, data and loss), got {type(op).__name__}")
    return op


def _check_grid(name: str, values) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D sequence of real numbers, got {type(values).__name__}") from None
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} must be finite, got {a[~np.isfinite(a)][:3].tolist()}")
    return a


def _check_direction_matrix(op: HessianOperator, V, what: str = "directions") -> torch.Tensor:
    """``V`` as ``[P, k]`` in the operator's dtype and device (a ``[P]`` vector is one direction)."""
    if not isinstance(V, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape [{op.P}] or [{op.P}, k], got {type(V).__name__}")
    if V.dim() == 1:
        V = V[:, None]
    if V.dim() != 2 or V.shape[0] != op.P:
        raise ValueError(f"{what} must have shape [{op.P}] or [{op.P}, k] (P = number of trunk weights), "
                         f"got {list(V.shape)}")
    if not V.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {V.dtype}")
    V = V.detach().to(device=op.device, dtype=op.dtype)
    if not bool(torch.isfinite(V).all()):
        raise ValueError(f"{what} must be finite, got nan or inf entries")
    return V


def loss_at(op: HessianOperator, shift: torch.Tensor | None = None) -> float:
    """The mean loss over the operator's data at its weights plus ``shift`` (``[P]``, or ``None``: at the weights)."""
    _check_op(op)
    W = op._W
    if shift is not None:
        s = _check_direction_matrix(op, shift, "shift")
        if s.shape[1] != 1:
            raise ValueError(f"shift must have shape [{op.P}], got {list(shift.shape)}")
        W = W + s[:, 0].view_as(W)
    return _loss(op, W)


def _loss(op: HessianOperator, W: torch.Tensor) -> float:
    fwd = None if op.backend_used == "fused" else "torch"
    total = torch.zeros((), dtype=op.dtype, device=op.device)
    with torch.no_grad(), _exact(W):
        for h0, y, wt in op._batches:
            total += wt * op._forward_loss(W, h0, y, backend=fwd)
    op._all_reduce(total)
    return float(total)


def random_directions(op: HessianOperator, k: int = 1, seed: int = 0, normalize: str = "unit") -> torch.Tensor:
    """``k`` Gaussian directions ``[P, k]`` in the operator's dtype, the same on every machine for a seed.

    Args:
        normalize: ``"unit"``: each column has norm 1 (the scale to use at the zero point, where the
            weights give none); ``"layer"``: each ``d x d`` block of a column has the Frobenius norm of
            the same block of the weights; ``"filter"``: each row (one output unit of one layer) has the
            norm of that row of the weights (Li et al. 2018's filter normalisation, which makes slices of
            differently scaled nets comparable).  Blocks or rows whose weights are 0 get 0.

    Raises:
        ValueError: bad ``k`` or ``normalize``; ``"layer"`` / ``"filter"`` at weights that are all 0.
    """
    _check_op(op)
    k = check_count("k", k)
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    g = seeded_generator(seed, "landscape")
    V = torch.randn(k, op.P, generator=g, dtype=torch.float64)
    if normalize == "unit":
        V /= V.norm(dim=1, keepdim=True)
    else:
        W = op._W.detach().to(device="cpu", dtype=torch.float64)
        if not bool(W.any()):
            raise ValueError(f"normalize={normalize!r} scales directions by the weights, which are all 0 here "
                             "(the zero point): use normalize='unit'")
        d = W.shape[-1]
        Vb = V.view(k, -1, d) if normalize == "filter" else V.view(k, -1, d * d)  # rows or blocks
        Wb = W.reshape(-1, d) if normalize == "filter" else W.reshape(-1, d * d)
        Vb *= (Wb.norm(dim=-1) / Vb.norm(dim=-1).clamp_min(torch.finfo(torch.float64).tiny)).unsqueeze(-1)
    return V.T.contiguous().to(device=op.device, dtype=op.dtype)


@dataclass
class LossSlice:
    """The loss on a line (``L(w + t v)``) or a plane (``L(w + t u + s v)``) of weights.

    Attributes:
        ts: ``[a]`` steps along the first direction; ss: ``[b]`` along the second (``None`` on a line).
        loss: ``[a]`` or ``[a, b]`` mean losses.
        center: the loss at the weights themselves.
        slopes: ``[k]`` exact directional derivatives ``g . v_i`` (``None`` without ``quadratic``).
        curvature: ``[k, k]`` exact ``v_i^T H v_j`` from Hessian-vector products (``None`` without it).
        direction_norms: ``[k]`` norms of the directions (steps are in units of the direction given).
    """

    ts: np.ndarray
    ss: np.ndarray | None
    loss: np.ndarray
    center: float
    slopes: np.ndarray | None = None
    curvature: np.ndarray | None = None
    direction_norms: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def quadratic(self) -> np.ndarray:
        """The second-order Taylor model ``L + sum_i t_i g.v_i + 1/2 sum_ij t_i t_j v_i^T H v_j`` on the grid."""
        if self.slopes is None or self.curvature is None:
            raise ValueError("this slice was computed with quadratic=False: no gradient or curvature to model")
        g, C = self.slopes, self.curvature
        if self.ss is None:
            t = self.ts
            return self.center + t * g[0] + 0.5 * t * t * C[0, 0]
        t, s = self.ts[:, None], self.ss[None, :]
        return self.center + t * g[0] + s * g[1] + 0.5 * (t * t * C[0, 0] + 2 * t * s * C[0, 1] + s * s * C[1, 1])

    def to_dict(self) -> dict:
        lst = lambda a: None if a is None else np.asarray(a).tolist()  # noqa: E731
        return {"ts": lst(self.ts), "ss": lst(self.ss), "loss": lst(self.loss), "center": self.center,
                "slopes": lst(self.slopes), "curvature": lst(self.curvature),
                "direction_norms": lst(self.direction_norms)}


def loss_slice(op: HessianOperator, directions: torch.Tensor, ts, ss=None, quadratic: bool = True,
               callback=None) -> LossSlice:
    """The loss along one direction (``directions[P]`` or ``[P, 1]``, grid ``ts``) or on the plane of two
    (``[P, 2]``, grids ``ts`` x ``ss``), at the operator's weights plus steps along them.

    ``quadratic``: also the exact gradient and ``v_i^T H v_j`` (one batched Hessian-vector product of the
    ``k`` directions), for :meth:`LossSlice.quadratic`.  ``callback(done, total)`` after each loss.

    >>> import torch
    >>> from shortcut_ext.models import ShortcutNet
    >>> net = ShortcutNet(width=2, units=2, shortcut=2, init="zero", backend="torch", dtype=torch.float64)
    >>> x = torch.eye(2, dtype=torch.float64); y = 2 * x
    >>> op = HessianOperator(net, (x, y), backend="autograd")
    >>> v = random_directions(op, seed=1)
    >>> sl = loss_slice(op, v, [-1e-3, 0.0, 1e-3])
    >>> bool(abs(sl.loss - sl.quadratic()).max() < 1e-9), sl.center
    (True, 0.5)
    """
    _check_op(op)
    V = _check_direction_matrix(op, directions)
    k = V.shape[1]
    ts = _check_grid("ts", ts)
    if k == 1:
        if ss is not None:
            raise ValueError(f"ss is the grid along a second direction, and directions has one (shape "
                             f"{list(directions.shape)}): give directions as [{op.P}, 2] or leave ss out")
        grid = [(t,) for t in ts]
    elif k == 2:
        if ss is None:
            raise ValueError("directions has two columns (a plane): give the grid along the second as ss")
        ss = _check_grid("ss", ss)
        grid = [(t, s) for t in ts for s in ss]
    else:
        raise ValueError(f"directions must hold one direction (a line) or two (a plane), got {k}")
    if not isinstance(quadratic, bool):
        raise TypeError(f"quadratic must be True or False, got {quadratic!r}")
    center = _loss(op, op._W)
    out = _losses(op, V, np.asarray(grid, dtype=np.float64), center, callback)
    slopes = curv = None
    if quadratic:
        slopes, curv = _taylor(op, V)
    return LossSlice(ts=ts, ss=None if k == 1 else ss, loss=out if k == 1 else out.reshape(len(ts), len(ss)),
                     center=center, slopes=slopes, curvature=curv,
                     direction_norms=V.double().norm(dim=0).cpu().numpy())


def losses_at(op: HessianOperator, directions: torch.Tensor, coords, callback=None) -> np.ndarray:
    """The mean loss at ``w + sum_i c_i v_i`` for each row ``c`` of ``coords`` (``[N, k]``, or ``[N]`` for one
    direction), ``directions`` ``[P, k]`` (or ``[P]``): ``[N]`` losses, one fused forward per mini-batch each.
    The building block of :func:`loss_slice`, for any set of points (a grid in pieces, to save as they finish;
    a path).  ``callback(done, total)`` after each loss."""
    _check_op(op)
    V = _check_direction_matrix(op, directions)
    try:
        c = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"coords must be real numbers of shape [N, {V.shape[1]}], got {type(coords).__name__}") from None
    if c.ndim == 1 and V.shape[1] == 1:
        c = c[:, None]
    if c.ndim != 2 or c.shape[1] != V.shape[1] or c.shape[0] == 0:
        raise ValueError(f"coords must have shape [N, {V.shape[1]}] with N >= 1 (one column per direction), got "
                         f"{list(c.shape)}")
    if not np.isfinite(c).all():
        raise ValueError(f"coords must be finite, got {c[~np.isfinite(c)][:3].tolist()}")
    return _losses(op, V, c, None, callback)


def _losses(op: HessianOperator, V: torch.Tensor, coords: np.ndarray, center, callback) -> np.ndarray:
    """Losses at ``w + V c`` for the rows ``c`` of ``coords``; ``center`` (or ``None``) stands for the origin's."""
    W = op._W
    Vw = V.T.reshape((V.shape[1],) + tuple(W.shape))
    out = np.empty(len(coords))
    for i, c in enumerate(coords):
        if center is not None and not c.any():
            out[i] = center
        else:
            shift = Vw[0] * float(c[0])
            for j in range(1, len(c)):
                shift = shift + Vw[j] * float(c[j])
            out[i] = _loss(op, W + shift)
        if callback is not None:
            callback(i + 1, len(coords))
    return out


def _taylor(op: HessianOperator, V: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``([k] g.v_i, [k, k] v_i^T H v_j)``: the exact gradient along the directions and the curvature between
    them (one batched Hessian-vector product), symmetrised."""
    _, g = op.loss_and_grad()
    slopes = (g.double() @ V.double()).cpu().numpy()
    HV = op.matmat(V)
    curv = (V.double().T @ HV.double()).cpu().numpy()
    return slopes, 0.5 * (curv + curv.T)


@dataclass
class PathPlane:
    """The principal directions of a path of weights (a training run's snapshots) and the path on them.

    Attributes:
        directions: ``[P, k]`` orthonormal directions, in the operator's dtype and device.
        coords: ``[T, k]`` each point's coordinates ``V^T (w_e - w)`` on them, relative to the operator's weights.
        explained: ``[k]`` the fraction of the path's variance (about its mean) along each direction.
        off_plane: ``[T]`` how far each point lies off the directions' span through ``w``, as a fraction of the
            path's farthest distance from ``w``: ``|w_e - w - V c_e| / max_f |w_f - w|``.
    """

    directions: torch.Tensor
    coords: np.ndarray
    explained: np.ndarray
    off_plane: np.ndarray


def path_directions(op: HessianOperator, path, k: int = 2) -> PathPlane:
    """The ``k`` principal directions of a path of weights, for a slice that shows the path (Li et al. 2018,
    section 7: the loss on the plane of the two most explanatory directions of a training trajectory, with the
    trajectory drawn on it).

    ``path``: ``[T, P]`` (or a sequence of ``T`` tensors of ``P`` values, e.g. ``[R, n, d, d]`` weights), the
    points in order, for example the weights every few epochs of a run whose final weights are the operator's.
    The directions are the top right singular vectors of the centred matrix of the ``w_e - w`` (PCA, as Li et
    al.'s code fits it), from the eigenvectors of its ``T x T`` Gram matrix in float64, computed over slices of
    the weights: the points may be in any floating dtype, or memory-mapped files, and no ``[T, P]`` float64
    matrix is held.  Each direction is signed so that the path's first point has a negative coordinate on it.  Give them to :func:`loss_slice` (steps from the operator's weights) or
    :func:`losses_at`.

    Raises:
        ValueError: fewer than ``k + 1`` points, points of the wrong size or not finite, or a path that spans
            fewer than ``k`` directions (all its points on a line, for ``k = 2``).
    """
    _check_op(op)
    k = check_count("k", k)
    if isinstance(path, torch.Tensor):
        if path.dim() != 2 or path.shape[1] != op.P:
            raise ValueError(f"path given as one tensor must have shape [T, {op.P}] (a point a row), got "
                             f"{list(path.shape)}")
        pts = list(path)
    else:
        try:
            pts = list(path)
        except TypeError:
            raise TypeError(f"path must be a [T, {op.P}] tensor or a sequence of weight tensors, got "
                            f"{type(path).__name__}") from None
    for i, p in enumerate(pts):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point() or p.numel() != op.P:
            got = (f"{list(p.shape)} {p.dtype}" if isinstance(p, torch.Tensor) else type(p).__name__)
            raise ValueError(f"path[{i}] must be floating-point weights of {op.P} values (the operator's net), got {got}")
    if len(pts) < k + 1:
        raise ValueError(f"path must hold at least k + 1 = {k + 1} points to span {k} direction"
                         f"{'s' if k > 1 else ''} about its mean, got {len(pts)}")
    f64, w = torch.float64, op._W.detach().reshape(-1)
    flat = [p.detach().reshape(-1) for p in pts]
    T, P = len(flat), op.P
    step = max(1, _PATH_BLOCK // T)
    spans = [(a, min(a + step, P)) for a in range(0, P, step)]

    def offsets(a, b):  # [T, b - a]: the points' offsets w_e - w over a slice of the weights, in float64
        return torch.stack([f[a:b].to(device=w.device, dtype=f64) for f in flat]) - w[a:b].to(f64)

    # over slices of the weights, so that no [T, P] float64 matrix is ever held (the points may be memory-mapped
    # files): the mean offset; the Gram matrix of the centred offsets; its top eigenvectors as directions
    mean = torch.empty(P, dtype=f64, device=w.device)
    for a, b in spans:
        D = offsets(a, b)
        if not bool(torch.isfinite(D).all()):
            raise ValueError("path must be finite, got nan or inf entries")
        mean[a:b] = D.mean(dim=0)
    G = torch.zeros(T, T, dtype=f64, device=w.device)
    for a, b in spans:
        D = offsets(a, b) - mean[a:b]
        G += D @ D.T
    lam, U = torch.linalg.eigh(G)
    lam, U = lam.flip(0).clamp_min(0), U.flip(1)  # descending
    if float(lam[0]) == 0 or float(lam[k - 1]) <= 1e-12 * float(lam[0]):
        shape = ("are all one point (the weights never moved)" if float(lam[0]) == 0 else
                 "lie on a line" if k == 2 else "lie in fewer dimensions")
        raise ValueError(f"the path spans fewer than {k} direction{'s' if k > 1 else ''} (singular values "
                         f"{[math.sqrt(float(x)) for x in lam[:k + 1]]}): its points {shape}")
    proj = U[:, :k] / lam[:k].sqrt()
    V = torch.empty(P, k, dtype=f64, device=w.device)
    for a, b in spans:
        V[a:b] = (offsets(a, b) - mean[a:b]).T @ proj
    Q, R = torch.linalg.qr(V)  # orthonormal to rounding, whatever the spread of the variances
    V = Q * torch.sign(torch.diagonal(R)).masked_fill(torch.diagonal(R) == 0, 1)
    C = torch.zeros(T, k, dtype=f64, device=w.device)
    reach = torch.zeros(T, dtype=f64, device=w.device)
    for a, b in spans:
        D = offsets(a, b)
        C += D @ V[a:b]
        reach += (D * D).sum(dim=1)
    for j in range(k):  # a sign of one's own: the path starts at negative coordinates
        first = float(C[0, j])
        if (first > 0) if first != 0 else float(V[int(V[:, j].abs().argmax()), j]) < 0:
            V[:, j].neg_()
            C[:, j].neg_()
    off = torch.zeros(T, dtype=f64, device=w.device)
    for a, b in spans:
        D = offsets(a, b) - C @ V[a:b].T
        off += (D * D).sum(dim=1)
    off = off.sqrt() / reach.max().sqrt()  # > 0: lam[0] > 0 above
    return PathPlane(directions=V.to(device=op.device, dtype=op.dtype).contiguous(), coords=C.cpu().numpy(),
                     explained=(lam[:k] / lam.sum()).cpu().numpy(), off_plane=off.cpu().numpy())


@dataclass
class StationaryOrder:
    """How the loss leaves a point along one direction: ``|L(w + t v) - L(w)| ~ c t^order``.

    Attributes:
        order: the exponent, from the smallest steps whose change rises clear of rounding (``nan`` if none).
        ts: ``[a]`` steps (ascending); changes: ``[a]`` ``L(w + t v) - L(w)``.
        local_orders: ``[a - 1]`` slopes of ``log|change|`` vs ``log t`` between neighbouring steps (``nan``
            where either change is within rounding of 0).
        noise: the size of change rounding alone can make (``|L(w)|`` times 1000 eps of the dtype).
        coefficient: ``change / t^round(order)`` at the largest step used (the leading Taylor term's
            coefficient along ``v``).
        center: ``L(w)``.
    """

    order: float
    ts: np.ndarray
    changes: np.ndarray
    local_orders: np.ndarray
    noise: float
    coefficient: float
    center: float = math.nan

    def to_dict(self) -> dict:
        return {"order": self.order, "ts": self.ts.tolist(), "changes": self.changes.tolist(),
                "local_orders": self.local_orders.tolist(), "noise": self.noise, "coefficient": self.coefficient,
                "center": self.center}


def stationary_order(op: HessianOperator, direction: torch.Tensor, ts=None, use: int = 3) -> StationaryOrder:
    """The order ``p`` of the first Taylor term of the loss that does not vanish along ``direction``:
    ``L(w + t v) - L(w) ~ c t^p`` as ``t -> 0``.  ``p = 1`` where the gradient is not orthogonal to ``v``,
    ``p = 2`` at a stationary point with ``v^T H v != 0``, ``p >= 3`` where gradient and curvature along
    ``v`` vanish (at an n-shortcut net's zero point, ``p = n`` for a generic ``v``: Theorem 1).

    The exponent is the median slope of ``log|L(w + t v) - L(w)|`` against ``log t`` over the ``use``
    smallest neighbouring pairs of steps whose changes rise above rounding (1000 eps |L(w)|); ``nan`` where
    none does (a loss that does not move along ``v``, or is not finite at ``w``).

    Args:
        ts: steps, positive (default: 19 steps from 1e-6 to 1 in geometric progression, 3 a decade, times
            ``1 / ||v||``, so that ``t v`` has norms 1e-6 .. 1).  In float32 the changes of orders above 2
            drown in rounding at small steps; use float64.
        use: neighbouring pairs to take the median over.
    """
    _check_op(op)
    V = _check_direction_matrix(op, direction, "direction")
    if V.shape[1] != 1:
        raise ValueError(f"direction must be one direction [{op.P}], got {list(direction.shape)}")
    use = check_count("use", use)
    nv = float(V.double().norm())
    if nv == 0:
        raise ValueError("direction must not be 0")
    if ts is None:
        ts = np.geomspace(1e-6, 1.0, 19) / nv
    ts = np.sort(_check_grid("ts", ts))
    if ts[0] <= 0:
        raise ValueError(f"ts must be positive steps, got {ts[0]!r}")
    if len(ts) < 2:
        raise ValueError("ts must hold at least 2 steps")
    sl = loss_slice(op, V, ts, quadratic=False)
    ch = sl.loss - sl.center
    noise = 1000 * float(torch.finfo(op.dtype).eps) * max(abs(sl.center), float(torch.finfo(op.dtype).tiny))
    a = np.abs(ch)
    ok = a > noise
    loc = np.full(len(ts) - 1, math.nan)
    for i in range(len(ts) - 1):
        if ok[i] and ok[i + 1]:
            loc[i] = math.log(a[i + 1] / a[i]) / math.log(ts[i + 1] / ts[i])
    good = np.flatnonzero(np.isfinite(loc))[:use]
    if good.size == 0:
        return StationaryOrder(math.nan, ts, ch, loc, noise, math.nan, sl.center)
    order = float(np.median(loc[good]))
    # at the largest step of the pairs used: its change is furthest above rounding (at the first step clear of it,
    # rounding is up to 1e-3 of the change), while higher Taylor terms are still small there
    i0 = int(good[-1]) + 1
    coef = float(ch[i0] / ts[i0] ** round(order))
    return StationaryOrder(order, ts, ch, loc, noise, coef, sl.center)


def permute_hidden_units(weights: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``weights`` ``[R, n, d, d]`` with the hidden units inside each residual unit permuted: the ``n - 1``
    layers between a unit's ``n`` weight matrices (``perms`` ``[R, n - 1, d]``, each row a permutation of
    ``0..d-1``: the permuted unit's hidden unit ``i`` after layer ``k`` is the original's ``perms[r, k, i]``).
    Layer ``k``'s rows and layer ``k + 1``'s columns move together, so the net computes the same function
    (the mid activation is elementwise; the residual stream, which the shortcut and the frozen projections
    pin, is not touched).  A plain net is one unit of ``D`` layers (``[1, D, d, d]``).  Returns a new tensor."""
    W = _check_stack("weights", weights)
    R, n, d = W.shape[0], W.shape[1], W.shape[2]
    if not isinstance(perms, torch.Tensor) or perms.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"perms must be an integer torch.Tensor [R, n - 1, d] = [{R}, {n - 1}, {d}], got "
                        f"{perms.dtype if isinstance(perms, torch.Tensor) else type(perms).__name__}")
    if tuple(perms.shape) != (R, n - 1, d):
        raise ValueError(f"perms must have shape [R, n - 1, d] = [{R}, {n - 1}, {d}] for weights "
                         f"{list(W.shape)}, got {list(perms.shape)}")
    p = perms.to(device=W.device, dtype=torch.int64)
    if n > 1 and not bool((p.sort(dim=-1).values == torch.arange(d, device=W.device)).all()):
        raise ValueError("perms must hold a permutation of 0..d-1 in every row [r, k, :]")
    out = W.clone()
    for k in range(n - 1):
        idx = p[:, k, :]  # [R, d]
        out[:, k] = torch.gather(out[:, k], 1, idx[:, :, None].expand(R, d, d))  # rows of layer k
        out[:, k + 1] = torch.gather(out[:, k + 1], 2, idx[:, None, :].expand(R, d, d))  # columns of layer k+1
    return out


def _check_stack(name: str, W) -> torch.Tensor:
    if not isinstance(W, torch.Tensor) or not W.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor [R, n, d, d], got "
                        f"{W.dtype if isinstance(W, torch.Tensor) else type(W).__name__}")
    if W.dim() != 4 or W.shape[2] != W.shape[3] or 0 in W.shape:
        raise ValueError(f"{name} must have shape [R, n, d, d] (a net's stacked weights), got {list(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name} holds nan or inf")
    return W


@dataclass
class Alignment:
    """:func:`align_hidden_units`'s result: ``weights`` (``other`` with its hidden units permuted), the
    permutations ``perms`` ``[R, n - 1, d]`` (for :func:`permute_hidden_units`), the distance to the
    reference before and after, the sweeps taken and whether the last changed nothing."""

    weights: torch.Tensor
    perms: torch.Tensor
    distance_before: float
    distance_after: float
    sweeps: int
    converged: bool
    moved_units: int  # residual units whose permutations are not all the identity

    def to_dict(self) -> dict:
        return {"method": "weight matching", "distance_before": self.distance_before,
                "distance_after": self.distance_after, "sweeps": self.sweeps, "converged": self.converged,
                "moved_units": self.moved_units, "units": int(self.perms.shape[0])}


def align_hidden_units(reference: torch.Tensor, other: torch.Tensor, max_sweeps: int = 100) -> Alignment:
    """Permute the hidden units inside each residual unit of ``other`` (``[R, n, d, d]``, ``n >= 2``) to
    bring its weights as close as they can come to ``reference``'s: weight matching (Ainsworth, Hayase and
    Srinivasa, "Git Re-Basin", ICLR 2023), which maximises ``sum_k <A_k, P_k B_k P_{k-1}^T>`` over the
    permutations ``P_k`` (equivalently, minimises ``||reference - permuted other||``).  The function ``other``
    computes does not change (:func:`permute_hidden_units`).  Units are independent; within one, each
    ``P_k`` given its neighbours is a linear assignment problem (``scipy.optimize.linear_sum_assignment``),
    solved in turn for ``k = 0 .. n - 2`` until a sweep changes nothing (or ``max_sweeps``): for ``n = 2``
    (one hidden layer a unit) one sweep is the exact optimum; longer chains (``n >= 3``, a plain net's
    ``[1, D, d, d]``) reach a point no single permutation improves, as in Git Re-Basin.  The first sweep
    matches layer by layer from the input (each ``P_k`` from ``P_{k-1}`` alone), which takes a net with
    permuted hidden units back to the original where a sweep from the identity can stop short.

    The residual stream is not permuted: the shortcut adds it to itself and the data (or the frozen
    projections) fix its coordinates, so two nets' streams share one basis already."""
    from scipy.optimize import linear_sum_assignment

    A, B = _check_stack("reference", reference), _check_stack("other", other)
    if A.shape != B.shape:
        raise ValueError(f"reference and other must have the same shape, got {list(A.shape)} and {list(B.shape)}")
    R, n, d = A.shape[0], A.shape[1], A.shape[2]
    if n < 2:
        raise ValueError(f"a unit of n = {n} layer has no hidden units to permute (n >= 2 needed: the shortcut "
                         "pins the residual stream)")
    max_sweeps = check_count("max_sweeps", max_sweeps)
    A64, B64 = A.detach().to("cpu", torch.float64), B.detach().to("cpu", torch.float64)
    perms = torch.arange(d).repeat(R, n - 1, 1)  # [R, n - 1, d], the identity
    sweeps, converged = 0, False
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for k in range(n - 1):
            # <P_k, A_k P_{k-1} B_k^T + A_{k+1}^T P_{k+1} B_{k+1}> with the neighbours' permutations applied:
            # B_k's columns by P_{k-1}, B_{k+1}'s rows by P_{k+1}
            Bk = B64[:, k] if k == 0 else torch.gather(B64[:, k], 2, perms[:, k - 1, None, :].expand(R, d, d))
            C = A64[:, k] @ Bk.mT  # [R, d, d]
            if sweeps > 1 or k + 1 == n - 1:  # the first sweep goes forward from the input, layer by layer
                Bk1 = (B64[:, k + 1] if k + 1 == n - 1 else  # (a later permutation is not known yet)
                       torch.gather(B64[:, k + 1], 1, perms[:, k + 1, :, None].expand(R, d, d)))
                C = C + A64[:, k + 1].mT @ Bk1
            Cn = C.numpy()
            for r in range(R):
                _, col = linear_sum_assignment(Cn[r], maximize=True)
                # only a gain above rounding moves it (a tie keeps the current one: sweeps end)
                now = float(Cn[r][np.arange(d), perms[r, k].numpy()].sum())
                if float(Cn[r][np.arange(d), col].sum()) - now > 1e-12 * abs(now):
                    perms[r, k] = torch.from_numpy(col)
                    changed = True
        if n == 2 or (sweeps > 1 and not changed):  # n = 2: one assignment a unit, exact; else a full sweep
            converged = True                           # that changed nothing
            break
    aligned = permute_hidden_units(B, perms.to(B.device))
    moved = int((perms != torch.arange(d)).any(dim=2).any(dim=1).sum())
    before = float((A64 - B64).norm())
    after = float((A64 - permute_hidden_units(B64, perms)).norm())
    return Alignment(aligned, perms, before, after, sweeps, converged, moved)


def _loss_and_grad(op: HessianOperator, W: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The mean loss over the operator's data at weights ``W`` (``[R, n, d, d]``) and its gradient (same
    shape), summed over the mini-batches and ranks as :meth:`HessianOperator.loss_and_grad` sums them."""
    total, grad = op._loss_and_grad_at(W)
    return float(total), grad


def bezier_point(end0: torch.Tensor, bend: torch.Tensor, end1: torch.Tensor, t: float) -> torch.Tensor:
    """The quadratic Bezier curve ``(1 - t)^2 end0 + 2 t (1 - t) bend + t^2 end1`` at ``t`` (``t = 0``: ``end0``,
    ``t = 1``: ``end1``; ``bend = (end0 + end1) / 2`` is the straight line)."""
    return end0 * (1 - t) ** 2 + bend * (2 * t * (1 - t)) + end1 * (t * t)


@dataclass
class BezierCurve:
    """:func:`fit_bezier_curve`'s result: the curve's control point ``bend`` (the weights' shape), the steps
    taken, and the objective's estimate at each (the mean loss over the step's points of the curve)."""

    bend: torch.Tensor
    steps: int
    objective: list = field(default_factory=list)


def fit_bezier_curve(op: HessianOperator, end0: torch.Tensor, end1: torch.Tensor, steps: int, lr: float,
                     samples: int = 4, seed: int = 0, bend: torch.Tensor | None = None, start: int = 0,
                     objective=None, callback=None) -> BezierCurve:
    """A low-loss path between two weights: the quadratic Bezier curve from ``end0`` to ``end1`` whose control
    point ``bend`` minimises the loss averaged along it, ``E_{t ~ U(0, 1)} L(phi(t))`` (Garipov et al.,
    "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018), by gradient descent on
    ``bend`` from the straight line's midpoint (or from ``bend``).  Each step takes ``samples`` points of the
    curve, one in each of ``samples`` equal parts of ``[0, 1]`` (stratified, seeded by ``seed`` and the step's
    index: a run resumed at ``start`` with the same ``bend`` takes the same points), and the step
    ``bend -= lr * mean_j 2 t_j (1 - t_j) grad L(phi(t_j))``.

    ``end0``, ``end1`` and ``bend`` are weights of the operator's net (``[R, n, d, d]`` or ``[P]``); the
    ends are not moved.  ``callback(step, steps, bend, objective)`` runs after each step (a checkpoint, a
    progress bar).  Under ``distributed=True`` every rank must make the same call (each loss and gradient is
    all-reduced)."""
    _check_op(op)
    shape = tuple(op._W.shape)

    def weights(name, w):
        w = _check_direction_matrix(op, w.reshape(-1) if isinstance(w, torch.Tensor) else w, name)
        if w.shape[1] != 1:
            raise ValueError(f"{name} must be one point of weights [{op.P}], got {w.shape[1]} columns")
        return w[:, 0].reshape(shape)

    A, B = weights("end0", end0), weights("end1", end1)
    steps, samples = check_count("steps", steps, 0), check_count("samples", samples)
    start = check_count("start", start, 0)
    if start > steps:
        raise ValueError(f"start must be <= steps, got start={start} > steps={steps}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    theta = (A + B) / 2 if bend is None else weights("bend", bend).clone()
    hist = [] if objective is None else [float(v) for v in objective][:start]
    for s in range(start, steps):
        u = float(np.random.default_rng([int(seed), s]).random())
        g, mean = torch.zeros_like(theta), 0.0
        for j in range(samples):
            t = (j + u) / samples
            L, grad = _loss_and_grad(op, bezier_point(A, theta, B, t))
            g.add_(grad, alpha=2 * t * (1 - t) / samples)
            mean += L / samples
        theta.sub_(g, alpha=lr)
        hist.append(mean)
        if callback is not None:
            callback(s + 1, steps, theta, hist)
    return BezierCurve(theta, steps, hist)
