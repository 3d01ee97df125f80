"""Extreme eigenpairs of a symmetric operator: Lanczos with full reorthogonalisation.

The basis ``V`` is kept and every new block is orthogonalised against all of it twice (classical
Gram-Schmidt twice, "twice is enough").  Every projection coefficient is recorded, so the projected
matrix ``Hp = V^T A V`` is exact (to rounding) even across restarts, and the Ritz values are a
Rayleigh-Ritz of the whole basis.  :func:`lanczos` is the single-vector method; :func:`block_lanczos`
runs blocks of ``b`` vectors with one batched product per step (``A.matmat`` of ``b`` columns).

**Invariant subspaces and multiplicities.** A Krylov space from one start vector holds one direction
of each eigenspace, so single-vector Lanczos breaks down (``beta ~ 1e-14``) after as many steps as
the operator has distinct eigenvalues, and it can never see a multiplicity.  The 2-shortcut zero
point is the extreme case (``2d`` distinct values, each ``d*R`` times).  Here a run is a sequence of
*segments*.  A segment ends at a breakdown (the basis spans an invariant subspace) or once its own
extreme Ritz pairs have converged; the next segment starts from a fresh random vector orthogonal to
the whole basis, i.e. it runs Lanczos on the deflated operator ``(I - V V^T) A (I - V V^T)``.  When a
segment's extremes converge without reaching the wanted ends found before it (they cannot change
the ``k`` largest / smallest Ritz values), the run stops; otherwise it found another copy of a
wanted eigenvalue, and a new segment starts.  With ``verify=False`` a segment that converged without
a breakdown ends the run (cheaper; multiplicities may be missed, as with ARPACK).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ._linop import as_torch_operator, default_tol

WHICH = ("both", "largest", "smallest")


@dataclass
class LanczosResult:
    """Extreme eigenpairs.

    Attributes:
        largest: the ``k`` largest Ritz values, descending (``[k]``, numpy float64).
        smallest: the ``k`` smallest Ritz values, ascending.
        largest_residuals, smallest_residuals: ``||A y - theta y||`` of each pair: computed with one
            batched product when ``compute_residuals=True``, else the Lanczos estimate.
        largest_vectors, smallest_vectors: ``[P, k]`` unit Ritz vectors (``None`` if not requested).
        ritz_values: all Ritz values of the final basis (ascending).
        num_vectors: size of the Krylov basis; num_products: operator-vector products used.
        segments: ``(start, end, reason)`` of each segment (reason: ``"breakdown"``, ``"converged"``,
            ``"max_iter"`` or ``"exhausted"``).
        breakdowns: how many segments ended at an invariant subspace.
        converged: every returned pair's residual is within ``tol * norm_estimate``.
        stop_reason: ``"converged"`` (the last segment added nothing at the wanted ends),
            ``"max_iter"`` or ``"exhausted"`` (the basis spans the whole space).
        norm_estimate: ``max |Ritz value|``, the scale residuals are measured against.
    """

    largest: np.ndarray
    smallest: np.ndarray
    largest_residuals: np.ndarray
    smallest_residuals: np.ndarray
    largest_vectors: torch.Tensor | None
    smallest_vectors: torch.Tensor | None
    ritz_values: np.ndarray
    num_vectors: int
    num_products: int
    segments: list = field(default_factory=list)
    breakdowns: int = 0
    converged: bool = False
    norm_estimate: float = 0.0
    stop_reason: str = ""

    @property
    def abs_max(self) -> float:
        """``|lambda|max`` from the two ends."""
        vals = [abs(float(v[0])) for v in (self.largest, self.smallest) if len(v)]
        return max(vals) if vals else float("nan")

    @property
    def abs_max_residual(self) -> float:
        """The residual of the pair that gives :attr:`abs_max`."""
        best, res = -1.0, float("nan")
        for v, r in ((self.largest, self.largest_residuals), (self.smallest, self.smallest_residuals)):
            if len(v) and abs(float(v[0])) > best:
                best, res = abs(float(v[0])), float(r[0])
        return res


def lanczos(op, k: int = 6, which: str = "both", max_iter: int | None = None, tol: float | None = None,
            verify: bool = True, seed: int = 0, v0: torch.Tensor | None = None, return_vectors: bool = True,
            compute_residuals: bool = True, breakdown_tol: float | None = None, callback=None) -> LanczosResult:
    """The ``k`` largest and/or smallest eigenpairs of a symmetric operator (single-vector Lanczos).

    Args:
        op: any operator :func:`~shortcut_ext.curvature._linop.as_torch_operator` accepts.
        k: eigenpairs wanted at each end.
        which: ``"both"``, ``"largest"`` or ``"smallest"``.
        max_iter: most basis vectors (memory ``max_iter * P``); default ``min(P, max(300, 20 k))``.
        tol: residual tolerance relative to ``|lambda|max`` (default ``eps**(2/3)`` of the dtype).
        verify: after convergence, look for hidden multiplicities with a fresh segment (see module).
        seed: seeds the start vector and every restart.
        v0: optional start vector ``[P]``.
        return_vectors: return Ritz vectors.
        compute_residuals: compute true residuals with one extra batched product of ``2k`` columns.
        breakdown_tol: a new direction shorter than this (relative to ``|lambda|max``) is a breakdown
            (default ``eps**(2/3)``).
        callback: called as ``callback(num_vectors, max_vectors)`` after every step (progress bars).

    >>> A = torch.diag(torch.tensor([3., 3., 3., 1., 1., -2., -2., -2.], dtype=torch.float64))
    >>> r = lanczos(A, k=3)
    >>> r.largest.round(12).tolist(), r.smallest.round(12).tolist()
    ([3.0, 3.0, 3.0], [-2.0, -2.0, -2.0])
    """
    return _krylov(op, k, 1, which, max_iter, tol, verify, seed, v0, return_vectors, compute_residuals,
                   breakdown_tol, callback)


def block_lanczos(op, k: int = 6, block_size: int | None = None, which: str = "both", max_iter: int | None = None,
                  tol: float | None = None, verify: bool = True, seed: int = 0, v0: torch.Tensor | None = None,
                  return_vectors: bool = True, compute_residuals: bool = True, breakdown_tol: float | None = None,
                  callback=None) -> LanczosResult:
    """Block Lanczos: ``block_size`` (default ``k``) vectors per step, one batched product each.

    A block of ``b`` start vectors sees multiplicities up to ``b`` directly; a rank-deficient block
    (partial breakdown) has its lost directions replaced by fresh random ones.  Other arguments as
    in :func:`lanczos` (``v0`` may be ``[P]`` or ``[P, b]``; ``max_iter`` counts vectors).
    """
    b = k if block_size is None else block_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    return _krylov(op, k, b, which, max_iter, tol, verify, seed, v0, return_vectors, compute_residuals,
                   breakdown_tol, callback)


# ---------------------------------------------------------------------------------------- core
def _krylov(op, k, b, which, max_iter, tol, verify, seed, v0, return_vectors, compute_residuals, breakdown_tol,
            callback) -> LanczosResult:
    A = as_torch_operator(op)
    P, dt, dev = A.P, A.dtype, A.device
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if max_iter is None:
        max_iter = max(300, 20 * k, 4 * b)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    m = min(P, max_iter)
    b = min(b, m)
    tol = default_tol(dt) if tol is None else float(tol)
    btol = default_tol(dt) if breakdown_tol is None else float(breakdown_tol)
    if not (tol > 0 and btol > 0):
        raise ValueError(f"tol and breakdown_tol must be positive, got {tol}, {btol}")
    want_top, want_bot = which in ("both", "largest"), which in ("both", "smallest")
    gen = torch.Generator().manual_seed(int(seed))
    V = torch.empty(m, P, dtype=dt, device=dev)  # basis, one vector per row
    Hp = torch.zeros(m, m, dtype=torch.float64)  # V^T A V (small dense algebra in float64 on the CPU)
    blocks = []  # (start, end) of each block in V
    defl = []  # norm of the residual part dropped after each block (enters residual bounds)
    anorm = 0.0
    j = 0
    tiny = float(torch.finfo(dt).tiny)

    def orth_against_basis(X, upto):  # [c, P]: project out V[:upto] twice
        if upto:
            Vb = V[:upto]
            for _ in range(2):
                X = X - (X @ Vb.T) @ Vb
        return X

    def fresh(c, upto):  # c random unit vectors orthogonal to V[:upto] and to each other
        c = min(c, P - upto)
        if c <= 0:
            return V.new_empty(0, P)
        X = orth_against_basis(A.randn(c, gen).T, upto)
        Q, _ = torch.linalg.qr(X.T)
        return orth_against_basis(Q.T, upto)

    # start block
    if v0 is not None:
        if not isinstance(v0, torch.Tensor) or v0.shape[0] != P or v0.dim() not in (1, 2):
            raise ValueError(f"v0 must be a tensor of shape [{P}] or [{P}, c], got "
                             f"{list(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__}")
        X0 = v0.to(dt, device=dev).reshape(P, -1).T[:b]
        if not torch.isfinite(X0).all() or float(X0.norm()) == 0:
            raise ValueError("v0 must be finite and non-zero")
        Q, _ = torch.linalg.qr(X0.T)
        X = Q.T
        if X.shape[0] < b:  # fill the block with random directions orthogonal to v0
            extra = fresh(b - X.shape[0], 0)
            extra = extra - (extra @ X.T) @ X
            Q, _ = torch.linalg.qr(torch.cat([X, extra]).T)
            X = Q.T
    else:
        X = fresh(b, 0)

    seg_start = 0
    prev_ritz = np.empty(0)
    segments = []
    breakdowns = 0
    W_last = None  # residual block after the last block (b x P), for residual estimates
    check_next = 1

    def ritz(lo, hi):
        T = Hp[lo:hi, lo:hi]
        th, S = torch.linalg.eigh(0.5 * (T + T.T))
        return th.numpy(), S.numpy()

    def seg_residuals(S, lo):  # residual of segment Ritz vectors w.r.t. the deflated operator
        if W_last is None:
            res = np.zeros(S.shape[1])
        else:
            bs, be = blocks[-1]
            G = (W_last @ W_last.T).double().cpu().numpy()
            s_last = S[bs - lo:be - lo]
            res = np.sqrt(np.maximum(np.einsum("ik,ij,jk->k", s_last, G, s_last), 0.0))
        for (bs, be), dn in zip(blocks, defl):
            if dn and be > lo:
                res += dn * np.linalg.norm(S[max(bs, lo) - lo:be - lo], axis=0)
        return res

    stop_reason = None
    while True:
        c = X.shape[0]
        if j + c > m:
            X = X[: m - j]
            c = X.shape[0]
        if c == 0:
            stop_reason = "exhausted" if j >= P else "max_iter"
            break
        V[j:j + c] = X
        AX = A.matmat(X.T.contiguous()).T  # [c, P]
        Vb = V[:j + c]
        h = AX @ Vb.T  # [c, j+c]
        W = AX - h @ Vb
        h2 = W @ Vb.T
        W = W - h2 @ Vb
        h = (h + h2).double().cpu()
        Hp[j:j + c, :j + c] = h
        Hp[:j + c, j:j + c] = h.T
        colnorm = ((h ** 2).sum(dim=1) + (W.double() ** 2).sum(dim=1).cpu()).sqrt()
        anorm = max(anorm, float(colnorm.max()))
        blocks.append((j, j + c))
        j += c
        if callback is not None:
            callback(j, m)

        # next block: keep the well-conditioned directions of W, replace the rest
        G = (W @ W.T).double().cpu()
        if c == 1:
            e, U = G.reshape(1), torch.ones(1, 1, dtype=torch.float64)
        else:
            e, U = torch.linalg.eigh(0.5 * (G + G.T))
        e, U = e.numpy(), U.numpy()
        thr = (btol * max(anorm, tiny)) ** 2
        keep = e > thr
        dropped = float(np.sqrt(np.clip(e[~keep], 0, None).sum()))
        defl.append(dropped)
        invariant = not keep.any()
        W_last = None if invariant else W
        if keep.any():
            Uk = torch.as_tensor(U[:, keep] / np.sqrt(e[keep]), dtype=dt, device=dev)
            Xn = orth_against_basis(Uk.T @ W, j)
            Q, _ = torch.linalg.qr(Xn.T)
            Xn = orth_against_basis(Q.T, j)
        else:
            Xn = V.new_empty(0, P)
        if not invariant and Xn.shape[0] < c and j < P:  # partial breakdown of a block
            extra = fresh(c - Xn.shape[0], j)
            extra = extra - (extra @ Xn.T) @ Xn
            Q, _ = torch.linalg.qr(torch.cat([Xn, extra]).T)
            Xn = orth_against_basis(Q.T, j)

        # convergence checks: at a breakdown, at the end, and on a geometric schedule
        full = j >= m or j >= P
        if not (invariant or full or j >= check_next):
            X = Xn
            continue
        check_next = j + max(b, int(0.1 * j))
        theta, S = ritz(seg_start, j)
        res = np.zeros(len(theta)) if invariant else seg_residuals(S, seg_start)
        scale = max(anorm, float(np.abs(theta).max(initial=0.0)), tiny)
        atol = tol * scale
        kk = min(k, len(prev_ritz))
        top_thr = prev_ritz[-kk] if (kk == k and want_top) else -math.inf
        bot_thr = prev_ritz[kk - 1] if (kk == k and want_bot) else math.inf
        idx = []
        if want_top:
            idx += [len(theta) - 1 - i for i in range(min(k, len(theta))) if i == 0 or theta[-1 - i] >= top_thr - atol]
        if want_bot:
            idx += [i for i in range(min(k, len(theta))) if i == 0 or theta[i] <= bot_thr + atol]
        resolved = invariant or bool(np.all(res[idx] <= atol))
        if full and not resolved:
            stop_reason = "max_iter" if j < P else "exhausted"
            segments.append((seg_start, j, stop_reason))
            break
        if not resolved:
            X = Xn
            continue
        contributes = (want_top and theta[-1] > top_thr + atol) or (want_bot and theta[0] < bot_thr - atol)
        segments.append((seg_start, j, "breakdown" if invariant else "converged"))
        breakdowns += int(invariant)
        if full:
            stop_reason = "exhausted" if j >= P else "max_iter"
            break
        if not contributes or (not verify and not invariant):
            stop_reason = "converged"
            break
        # new segment: a fresh start orthogonal to the whole basis
        seg_start = j
        prev_ritz = torch.linalg.eigvalsh(0.5 * (Hp[:j, :j] + Hp[:j, :j].T)).numpy()
        W_last = None
        X = fresh(b, j)
        if X.shape[0] == 0:
            stop_reason = "exhausted"
            break

    # Rayleigh-Ritz on the whole basis
    theta, S = ritz(0, j)
    scale = max(anorm, float(np.abs(theta).max(initial=0.0)), tiny)
    # residual estimates on the full basis (last block's residual + dropped parts)
    est = np.zeros(len(theta))
    if W_last is not None:
        bs, be = blocks[-1]
        G = (W_last @ W_last.T).double().cpu().numpy()
        sl = S[bs:be]
        est = np.sqrt(np.maximum(np.einsum("ik,ij,jk->k", sl, G, sl), 0.0))
    for (bs, be), dn in zip(blocks, defl):
        if dn:
            est += dn * np.linalg.norm(S[bs:be], axis=0)
    kk = min(k, len(theta))
    top_idx = list(range(len(theta) - 1, len(theta) - 1 - kk, -1)) if want_top else []
    bot_idx = list(range(kk)) if want_bot else []
    sel = top_idx + bot_idx
    vectors = None
    residuals = est[sel]
    if sel and (return_vectors or compute_residuals):
        Ssel = torch.as_tensor(S[:, sel], dtype=dt, device=dev)
        vectors = V[:j].T @ Ssel  # [P, len(sel)]
        vectors = vectors / vectors.norm(dim=0, keepdim=True).clamp_min(tiny)
        if compute_residuals:
            AY = A.matmat(vectors)
            th = torch.as_tensor(theta[sel], dtype=dt, device=dev)
            residuals = (AY - vectors * th).norm(dim=0).double().cpu().numpy()
    converged = bool(np.all(residuals <= tol * scale)) if sel else True
    nt = len(top_idx)
    return LanczosResult(
        largest=theta[top_idx].copy(), smallest=theta[bot_idx].copy(),
        largest_residuals=np.asarray(residuals[:nt]), smallest_residuals=np.asarray(residuals[nt:]),
        largest_vectors=vectors[:, :nt] if (vectors is not None and return_vectors) else None,
        smallest_vectors=vectors[:, nt:] if (vectors is not None and return_vectors) else None,
        ritz_values=theta, num_vectors=j, num_products=A.num_products, segments=segments,
        breakdowns=breakdowns, converged=converged, norm_estimate=scale, stop_reason=stop_reason,
    )
