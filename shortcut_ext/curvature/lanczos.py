"""Extreme eigenpairs of a symmetric operator: Lanczos with full reorthogonalisation.

The basis ``V`` is kept and every new block is orthogonalised against all of it.  Every projection
coefficient is recorded, so the projected matrix ``Hp = V^T A V`` is exact (to rounding) even across
restarts, and the Ritz values are a Rayleigh-Ritz of the whole basis.  :func:`lanczos` is the
single-vector method; :func:`block_lanczos` runs blocks of ``b`` vectors with one batched product per
step (``A.matmat`` of ``b`` columns).

**Orthogonalisation.**  ``A x`` is first projected against the last two blocks (the three-term
recurrence; it cancels most of the norm), then once against the whole basis (classical Gram-Schmidt),
and a second time only where that pass still removed more than ``1 - 1/sqrt(2)`` of the norm (the
Daniel-Gragg-Kaufman-Stewart criterion, "twice is enough").  A pass reads the basis twice (one
``[c, j] = W V^T``, one ``W -= C V``); there are no copies of the basis, no float64 copy of it, and no
``P x P`` or ``P x j`` products other than the basis itself: float64 is used for the small
``j x j`` projected matrix only.

**Memory.**  The basis takes ``max_iter * P`` numbers.  By default ``max_iter`` is chosen from a
budget, ``max_basis_bytes`` (:data:`DEFAULT_MAX_BASIS_BYTES` = 3 GiB: 157 float32 vectors at
``P = 5.12e6``).  With ``max_products`` larger than the basis, a full basis is *thick-restarted*
(Wu and Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems", SIAM J.
Matrix Anal. Appl. 22, 2000; Stewart's Krylov-Schur form): it is compressed to the Ritz vectors of
the wanted ends, ``Hp`` becomes their Ritz values, and the next Lanczos vector (the common direction
of their residuals) continues the Krylov space, so the iteration runs on within the same memory.

**Invariant subspaces and multiplicities.** A Krylov space from one start vector holds one direction
of each eigenspace, so single-vector Lanczos breaks down after as many steps as the operator has
distinct eigenvalues (in exact arithmetic), and it can never see a multiplicity.  The 2-shortcut zero
point is the extreme case (``2d`` distinct values, each ``d*R`` times).  In floating point the
breakdown shows (``beta ~ 1e-14``) only while the distinct values are few: the degree-``m`` Krylov
polynomial multiplies rounding by the product of the eigenvalue gaps over the product of the
``beta``'s, so at ``d = 4`` (8 values) the recursion stops after 8 steps, but at ``d = 16`` (32
values) ``beta_32`` is about ``1e-3`` and it runs on to convergence, with the same Ritz values.  Here a run is a sequence of
*segments*.  A segment ends at a breakdown (the basis spans an invariant subspace) or once its own
extreme Ritz pairs have converged; the next segment starts from a fresh random vector orthogonal to
the whole basis, i.e. it runs Lanczos on the deflated operator ``(I - V V^T) A (I - V V^T)``.  When a
segment's extremes converge without reaching the wanted ends found before it (they cannot change
the ``k`` largest / smallest Ritz values), the run stops; otherwise it found another copy of a
wanted eigenvalue, and a new segment starts.  With ``verify=False`` a segment that converged without
a breakdown ends the run (cheaper; multiplicities may be missed, as with ARPACK).  A thick restart
merges all segments into one (the wanted Ritz vectors of all of them are kept).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ._linop import as_torch_operator, check_count, default_tol, project_out, seeded_generator, zero_tol_rel

WHICH = ("both", "largest", "smallest")
DEFAULT_MAX_BASIS_BYTES = 3 * 2**30  # budget of an automatically sized Krylov basis (Lanczos, SLQ groups)
_ETA = 1.0 / math.sqrt(2.0)  # DGKS: orthogonalise again when a pass leaves less than this fraction of the norm


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
        num_vectors: size of the final Krylov basis; num_products: operator-vector products used
            (including the residual check).
        segments: ``(start, end, reason)`` of each segment (reason: ``"breakdown"``, ``"converged"``,
            ``"max_iter"``, ``"max_products"``, ``"exhausted"``, or ``"restart"`` where the basis was
            compressed; indices count from the last restart).
        breakdowns: how many segments ended at an invariant subspace.
        converged: every returned pair's residual is within ``tol * norm_estimate`` (with the default
            ``tol``, the computed residuals within ``sqrt(eps) * norm_estimate``: the loop stops on the
            recurrence's estimates at ``eps**(2/3)``, which the products' rounding and the coupling of
            restarted segments can keep the true residuals above; a Ritz value's error is then still
            about ``residual**2 / gap``).
        stop_reason: ``"converged"`` (the last segment added nothing at the wanted ends),
            ``"max_iter"`` (the basis is full, no restart allowed), ``"max_products"`` or ``"exhausted"``
            (the basis spans the whole space).
        norm_estimate: ``max |Ritz value|``, the scale residuals are measured against.
        restarts: thick restarts done.
        max_vectors: the basis capacity (``min(P, max_iter)``); basis_bytes: its size in bytes.
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
    restarts: int = 0
    max_vectors: int = 0
    basis_bytes: int = 0

    @property
    def abs_max(self) -> float:
        """``|lambda|max`` from the two ends (``nan`` unless both ends were computed, ``which="both"``)."""
        if not (len(self.largest) and len(self.smallest)):
            return float("nan")
        return max(abs(float(self.largest[0])), abs(float(self.smallest[0])))

    @property
    def abs_max_residual(self) -> float:
        """The residual of the pair that gives :attr:`abs_max` (``nan`` with it)."""
        if not (len(self.largest) and len(self.smallest)):
            return float("nan")
        best, res = -1.0, float("nan")
        for v, r in ((self.largest, self.largest_residuals), (self.smallest, self.smallest_residuals)):
            if len(v) and abs(float(v[0])) > best:
                best, res = abs(float(v[0])), float(r[0])
        return res


def lanczos(op, k: int = 6, which: str = "both", max_iter: int | None = None, tol: float | None = None,
            verify: bool = True, seed: int = 0, v0: torch.Tensor | None = None, return_vectors: bool = True,
            compute_residuals: bool = True, breakdown_tol: float | None = None, callback=None,
            max_basis_bytes: int | None = None, max_products: int | None = None) -> LanczosResult:
    """The ``k`` largest and/or smallest eigenpairs of a symmetric operator (single-vector Lanczos).

    Args:
        op: any operator :func:`~shortcut_ext.curvature._linop.as_torch_operator` accepts.
        k: eigenpairs wanted at each end.
        which: ``"both"``, ``"largest"`` or ``"smallest"``.
        max_iter: most basis vectors held at once (memory ``max_iter * P`` numbers).  Default
            ``min(max(300, 20 k), max_basis_bytes // (P * itemsize))``.
        tol: residual tolerance relative to ``|lambda|max`` (default ``eps**(2/3)`` of the dtype).
        verify: after convergence, look for hidden multiplicities with a fresh segment (see module).
        seed: seeds the start vector and every restart.
        v0: optional start vector ``[P]``.
        return_vectors: return Ritz vectors.
        compute_residuals: compute true residuals with one extra batched product of ``2k`` columns.
        breakdown_tol: a new direction shorter than this (relative to ``|lambda|max``) is a breakdown
            (default ``eps**(2/3)``).
        callback: called as ``callback(done, total)`` after every step (progress bars): basis vectors
            and ``max_iter``, or products and ``max_products`` when that is given.
        max_basis_bytes: memory budget of the basis when ``max_iter`` is chosen automatically (default
            :data:`DEFAULT_MAX_BASIS_BYTES`, 3 GiB); given with ``max_iter``, the two must agree.
        max_products: most operator products for the iteration (the residual check comes on top).
            Default ``None``: no restarts, the run stops when the basis is full.  Larger than the
            basis: thick restarts (see module) until converged or spent.

    Raises:
        ValueError: bad ``k``, ``which``, ``max_iter``, ``max_products``, ``max_basis_bytes``, or a
            ``max_iter`` whose basis exceeds ``max_basis_bytes``.

    >>> A = torch.diag(torch.tensor([3., 3., 3., 1., 1., -2., -2., -2.], dtype=torch.float64))
    >>> r = lanczos(A, k=3)
    >>> r.largest.round(12).tolist(), r.smallest.round(12).tolist()
    ([3.0, 3.0, 3.0], [-2.0, -2.0, -2.0])
    """
    return _krylov(op, k, 1, which, max_iter, tol, verify, seed, v0, return_vectors, compute_residuals,
                   breakdown_tol, callback, max_basis_bytes, max_products)


def block_lanczos(op, k: int = 6, block_size: int | None = None, which: str = "both", max_iter: int | None = None,
                  tol: float | None = None, verify: bool = True, seed: int = 0, v0: torch.Tensor | None = None,
                  return_vectors: bool = True, compute_residuals: bool = True, breakdown_tol: float | None = None,
                  callback=None, max_basis_bytes: int | None = None, max_products: int | None = None
                  ) -> LanczosResult:
    """Block Lanczos: ``block_size`` (default ``k``) vectors per step, one batched product each.

    A block of ``b`` start vectors sees multiplicities up to ``b`` directly; a rank-deficient block
    (partial breakdown) has its lost directions replaced by fresh random ones.  Other arguments as
    in :func:`lanczos` (``v0`` may be ``[P]`` or ``[P, b]``; ``max_iter`` counts vectors).
    """
    b = k if block_size is None else block_size
    if isinstance(b, bool) or not isinstance(b, int) or b < 1:
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    return _krylov(op, k, b, which, max_iter, tol, verify, seed, v0, return_vectors, compute_residuals,
                   breakdown_tol, callback, max_basis_bytes, max_products)


def basis_capacity(P: int, dtype: torch.dtype = torch.float32, max_basis_bytes: int | None = None) -> int:
    """How many ``P``-vectors of ``dtype`` fit in ``max_basis_bytes`` (default :data:`DEFAULT_MAX_BASIS_BYTES`).

    >>> basis_capacity(5_120_000, torch.float32)  # the scale target: 3 GiB hold 157 vectors
    157
    """
    budget = DEFAULT_MAX_BASIS_BYTES if max_basis_bytes is None else _check_bytes(max_basis_bytes)
    return int(budget // (P * (torch.finfo(dtype).bits // 8)))


def _check_bytes(value) -> int:
    return check_count("max_basis_bytes (bytes)", value)


# ---------------------------------------------------------------------------------------- core
def _krylov(op, k, b, which, max_iter, tol, verify, seed, v0, return_vectors, compute_residuals, breakdown_tol,
            callback, max_basis_bytes=None, max_products=None) -> LanczosResult:
    A = as_torch_operator(op)
    P, dt, dev = A.P, A.dtype, A.device
    k = check_count("k", k)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    itemsize = torch.finfo(dt).bits // 8
    if max_basis_bytes is not None:
        _check_bytes(max_basis_bytes)
    if max_iter is None:
        cap = basis_capacity(P, dt, max_basis_bytes)
        if min(cap, P) < 1:
            got = DEFAULT_MAX_BASIS_BYTES if max_basis_bytes is None else max_basis_bytes
            raise ValueError(f"max_basis_bytes must hold at least one basis vector of P = {P} {dt} numbers "
                             f"({P * itemsize} bytes), got {got}")
        max_iter = min(max(300, 20 * k, 4 * b), cap)
    else:
        max_iter = check_count("max_iter", max_iter)
        need = min(P, max_iter) * P * itemsize
        if max_basis_bytes is not None and need > max_basis_bytes:
            raise ValueError(
                f"max_iter={max_iter} needs a basis of {min(P, max_iter)} x {P} x {itemsize} bytes = "
                f"{need / 2**30:.2f} GiB, above max_basis_bytes = {max_basis_bytes / 2**30:.2f} GiB; lower max_iter "
                f"to {basis_capacity(P, dt, max_basis_bytes)} or leave it to the budget")
    if max_products is not None:
        max_products = check_count("max_products", max_products)
    m = min(P, max_iter)
    b = min(b, m)
    acc = A.precision  # tolerances follow the products' accuracy (a float32 operator seen in float64: float32)
    final_tol = max(default_tol(acc), zero_tol_rel(acc)) if tol is None else None
    tol = default_tol(acc) if tol is None else float(tol)
    final_tol = tol if final_tol is None else final_tol  # the returned pairs' check (see LanczosResult)
    btol = default_tol(acc) if breakdown_tol is None else float(breakdown_tol)
    if not (tol > 0 and btol > 0):
        raise ValueError(f"tol and breakdown_tol must be positive, got {tol}, {btol}")
    want_top, want_bot = which in ("both", "largest"), which in ("both", "smallest")
    n_ends = int(want_top) + int(want_bot)
    if max_products is not None and max_products > m and m < P and n_ends * k + 2 * b > m:
        raise ValueError(
            f"max_products={max_products} asks for thick restarts, but a basis of max_iter = {m} vectors cannot "
            f"hold the {n_ends} x k = {n_ends * k} kept Ritz vectors plus two blocks of {b}: raise max_iter to at "
            f"least {n_ends * k + 2 * b}, lower k, or leave max_products at None")
    gen = seeded_generator(seed, "lanczos")
    V = torch.empty(m, P, dtype=dt, device=dev)  # basis, one vector per row
    Hp = torch.zeros(m, m, dtype=torch.float64, device="cpu")  # V^T A V (small dense algebra in float64 on the CPU)
    blocks = []  # (start, end) of each block in V since the last restart
    defl = []  # norm of the residual part dropped after each block (enters residual bounds)
    extra = np.zeros(m)  # per-vector bound of dropped parts carried through a restart
    anorm = 0.0
    j = 0
    tiny = float(torch.finfo(dt).tiny)
    p0 = A.num_products
    restarts = 0

    def used():
        return A.num_products - p0

    def project(X, lo, upto):  # one classical Gram-Schmidt pass of X[c, P] against V[lo:upto], in place
        return project_out(X, V[lo:upto])  # [c, upto - lo]

    def orth_against_basis(X, upto):  # [c, P]: project out V[:upto] twice (rare paths: starts, restarts)
        X = X.clone(memory_format=torch.contiguous_format)
        if upto:
            for _ in range(2):
                project(X, 0, upto)
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
        if not isinstance(v0, torch.Tensor) or v0.dim() not in (1, 2) or v0.shape[0] != P:
            raise ValueError(f"v0 must be a tensor of shape [{P}] or [{P}, c], got "
                             f"{list(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__}")
        if not v0.is_floating_point():
            raise TypeError(f"v0 must be a floating-point tensor, got {v0.dtype}")
        X0 = v0.to(device=dev, dtype=dt).reshape(P, -1).T[:b]
        if not torch.isfinite(X0).all() or float(X0.norm()) == 0:
            raise ValueError("v0 must be finite and non-zero")
        Q, _ = torch.linalg.qr(X0.T)
        X = Q.T
        if X.shape[0] < b:  # fill the block with random directions orthogonal to v0
            extra_dirs = fresh(b - X.shape[0], 0)
            extra_dirs = extra_dirs - (extra_dirs @ X.T) @ X
            Q, _ = torch.linalg.qr(torch.cat([X, extra_dirs]).T)
            X = Q.T
    else:
        X = fresh(b, 0)

    seg_start = 0
    prev_ritz = np.empty(0)
    merged = False  # a restart merged a verification segment into the earlier ones
    segments = []
    breakdowns = 0
    W_last = None  # residual block after the last block (c x P), for residual estimates
    W = None
    check_next = 1

    def ritz(lo, hi):
        T = Hp[lo:hi, lo:hi]
        th, S = torch.linalg.eigh(0.5 * (T + T.T))
        return th.numpy(), S.numpy()

    def dropped_bound(S, lo):  # residual bound from dropped directions, per Ritz vector S[:, i] of V[lo:]
        res = np.abs(S).T @ extra[lo:lo + S.shape[0]]
        for (bs, be), dn in zip(blocks, defl):
            if dn and be > lo:
                res = res + dn * np.linalg.norm(S[max(bs, lo) - lo:be - lo], axis=0)
        return res

    def seg_residuals(S, lo):  # residual of Ritz vectors of V[lo:j] w.r.t. the (deflated) operator
        if W_last is None or not blocks:
            res = np.zeros(S.shape[1])
        else:
            bs, be = blocks[-1]
            G = (W_last @ W_last.T).double().cpu().numpy()
            s_last = S[bs - lo:be - lo]
            res = np.sqrt(np.maximum(np.einsum("ik,ij,jk->k", s_last, G, s_last), 0.0))
        return res + dropped_bound(S, lo)

    def restart_possible(c_next):
        if max_products is None or j >= P or used() + c_next > max_products:
            return False
        return n_ends * k + c_next + b <= m  # keep k per wanted end, the next block and room for one more

    def restart(c_next):
        """Compress V[:j] to the Ritz vectors of the wanted ends (thick restart); keeps V's memory."""
        nonlocal j, blocks, defl, seg_start, restarts, merged
        theta, S = ritz(0, j)
        ke = max(k, m // (6 if n_ends == 2 else 3))
        ke = max(k, min(ke, (m - c_next - b) // n_ends))
        keep = set()
        if want_bot:
            keep.update(range(min(ke, j)))
        if want_top:
            keep.update(range(max(0, j - ke), j))
        keep = sorted(keep)
        kk = len(keep)
        Sk_np = S[:, keep]
        new_extra = dropped_bound(Sk_np, 0)
        Sk = torch.as_tensor(Sk_np, dtype=dt, device=dev)  # [j, kk]
        step = max(1, (1 << 22) // max(kk, 1))  # column chunks: a [kk, step] temporary only
        for c0 in range(0, P, step):
            V[:kk, c0:c0 + step] = Sk.T @ V[:j, c0:c0 + step]
        Hp.zero_()
        Hp[:kk, :kk] = torch.diag(torch.as_tensor(theta[keep], device="cpu"))
        extra[:] = 0.0
        extra[:kk] = new_extra
        segments.append((seg_start, j, "restart"))
        blocks, defl = [], []
        merged = merged or seg_start > 0
        seg_start, j = 0, kk
        restarts += 1

    def limit_reason():
        if j >= P:
            return "exhausted"
        if max_products is not None and used() >= max_products:
            return "max_products"
        return "max_iter"

    stop_reason = None
    while True:
        c = X.shape[0]
        if c == 0:
            stop_reason = limit_reason() if j < P else "exhausted"
            break
        if max_products is not None and used() + c > max_products:
            X = X[: max_products - used()]
            c = X.shape[0]
            if c == 0:
                stop_reason = "max_products"
                break
        if j + c > m:
            if restart_possible(c):
                restart(c)
            else:
                X = X[: m - j]
                c = X.shape[0]
                if c == 0:
                    stop_reason = limit_reason()
                    break
        V[j:j + c] = X
        W = A.matmat(V[j:j + c].T).T.contiguous()  # [c, P]
        # three-term part against the last two blocks, then the whole basis once, again where needed
        lo = blocks[-1][0] if blocks else 0
        h = torch.zeros(c, j + c, dtype=torch.float64, device="cpu")
        n_prev = W.norm(dim=1)
        h[:, lo:] += project(W, lo, j + c).double().cpu()
        n_cur = W.norm(dim=1)
        full_passes = int(lo == 0)
        while full_passes < 2 and (full_passes == 0 or bool((n_cur < _ETA * n_prev).any())):
            h += project(W, 0, j + c).double().cpu()
            n_prev, n_cur = n_cur, W.norm(dim=1)
            full_passes += 1
        Hp[j:j + c, :j + c] = h
        Hp[:j + c, j:j + c] = h.T
        colnorm = ((h ** 2).sum(dim=1) + n_cur.double().cpu() ** 2).sqrt()
        anorm = max(anorm, float(colnorm.max()))
        blocks.append((j, j + c))
        j += c
        if callback is not None:
            callback(*((used(), max_products) if max_products is not None else (j, m)))

        # next block: keep the well-conditioned directions of W, replace the rest
        G = (W @ W.T).double().cpu()
        if c == 1:
            e, U = G.reshape(1), torch.ones(1, 1, dtype=torch.float64, device="cpu")
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
            if c == 1:  # W is orthogonal to the basis already (DGKS above): just normalise
                Xn = W / math.sqrt(float(e[0]))
            else:
                Uk = torch.as_tensor(U[:, keep] / np.sqrt(e[keep]), dtype=dt, device=dev)
                Xn = Uk.T @ W
                if e[keep].min() < 0.5 * e[keep].max():  # combinations with cancellation: clean once more
                    project(Xn, 0, j)
                Q, _ = torch.linalg.qr(Xn.T)
                Xn = Q.T.contiguous()
        else:
            Xn = V.new_empty(0, P)
        if not invariant and Xn.shape[0] < c and j < P:  # partial breakdown of a block
            extra_dirs = fresh(c - Xn.shape[0], j)
            extra_dirs = extra_dirs - (extra_dirs @ Xn.T) @ Xn
            Q, _ = torch.linalg.qr(torch.cat([Xn, extra_dirs]).T)
            Xn = orth_against_basis(Q.T, j)

        # convergence checks: at a breakdown, at the end, before a restart, and on a geometric schedule
        c_next = Xn.shape[0] if Xn.shape[0] else b
        if max_products is not None:
            boundary = j + c_next > m
            full = j >= P or (boundary and not restart_possible(c_next)) or used() >= max_products
        else:
            boundary = False
            full = j >= m or j >= P
        if not (invariant or full or boundary or j >= check_next):
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
            stop_reason = limit_reason()
            segments.append((seg_start, j, stop_reason))
            break
        if not resolved:  # (at a boundary the loop top restarts)
            X = Xn
            continue
        if merged:  # theta is the whole basis (it holds the ends found before): did any of the k ends move?
            kp = min(k, len(prev_ritz), len(theta))
            contributes = (want_top and any(theta[-1 - i] > prev_ritz[-1 - i] + atol for i in range(kp))) or (
                want_bot and any(theta[i] < prev_ritz[i] - atol for i in range(kp)))
        else:  # theta is the new segment's: does it reach into the k ends found before?
            contributes = (want_top and theta[-1] > top_thr + atol) or (want_bot and theta[0] < bot_thr - atol)
        segments.append((seg_start, j, "breakdown" if invariant else "converged"))
        breakdowns += int(invariant)
        if full and (j >= P or max_products is None or used() >= max_products):
            stop_reason = limit_reason()
            break
        if not contributes or (not verify and not invariant):
            stop_reason = "converged"
            break
        # new segment: a fresh start orthogonal to the whole basis
        seg_start, merged = j, False
        prev_ritz = torch.linalg.eigvalsh(0.5 * (Hp[:j, :j] + Hp[:j, :j].T)).numpy()
        W_last = None
        X = fresh(b, j)
        if X.shape[0] == 0:
            stop_reason = "exhausted"
            break

    # Rayleigh-Ritz on the whole basis
    theta, S = ritz(0, j)
    scale = max(anorm, float(np.abs(theta).max(initial=0.0)), tiny)
    est = seg_residuals(S, 0)  # last block's residual + dropped parts
    kk = min(k, len(theta))
    top_idx = list(range(len(theta) - 1, len(theta) - 1 - kk, -1)) if want_top else []
    bot_idx = list(range(kk)) if want_bot else []
    sel = top_idx + bot_idx
    vectors = None
    residuals = est[sel]
    nvec = j
    if sel and (return_vectors or compute_residuals):
        Ssel = torch.as_tensor(S[:, sel], dtype=dt, device=dev)
        Yt = Ssel.T @ V[:j]  # [len(sel), P]: rows, so that the product below needs no transposed copy
        del V, W, W_last, X  # free the basis before the residual product
        Yt /= Yt.norm(dim=1, keepdim=True).clamp_min(tiny)
        vectors = Yt.T  # [P, len(sel)]
        if compute_residuals:
            AY = A.matmat(vectors)
            th = torch.as_tensor(theta[sel], dtype=dt, device=dev)
            residuals = (AY - vectors * th).norm(dim=0).double().cpu().numpy()
            del AY
    converged = bool(np.all(residuals <= final_tol * scale)) if sel else True
    nt = len(top_idx)
    return LanczosResult(
        largest=theta[top_idx].copy(), smallest=theta[bot_idx].copy(),
        largest_residuals=np.asarray(residuals[:nt]), smallest_residuals=np.asarray(residuals[nt:]),
        largest_vectors=vectors[:, :nt] if (vectors is not None and return_vectors) else None,
        smallest_vectors=vectors[:, nt:] if (vectors is not None and return_vectors) else None,
        ritz_values=theta, num_vectors=nvec, num_products=used(), segments=segments,
        breakdowns=breakdowns, converged=converged, norm_estimate=scale, stop_reason=stop_reason,
        restarts=restarts, max_vectors=m, basis_bytes=m * P * itemsize,
    )
