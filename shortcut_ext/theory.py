"""The Hessian at the zero point in closed form (docs/science.md section 2, Theorem 1), any depth.

At zero branch weights every residual unit is the identity, so the net computes ``f(x) = x`` and
the loss depends on the data only through

    e_i = d l_i / d f  at f = x_i       (x_i - y_i for mse)          -- the residual at zero,
    p_i = s_pre(x_i)                                                  -- the branch input,
    G_i = d^2 l_i / d f^2 at f = x_i    (I for mse)                   -- the output curvature,

with trunk inputs ``x_i`` (after the frozen input projection, if any; a frozen read-out ``Q`` turns
``e_i`` into ``Q^T e_i`` and ``G_i`` into ``Q^T G_i Q``).  Write ``M = (1/m) sum_i e_i p_i^T`` (the
paper's ``M = S_xx - S_yx`` for linear nets and mse), and ``c = s'_mid(0) s'_post(0)``.

Theorem 1, assuming ``s_mid(0) = s_post(0) = 0`` (true for identity, relu, tanh, ssigmoid):

- ``n >= 3``: gradient 0 and Hessian 0.
- ``n = 2``: gradient 0; the loss is ``L(0) + c sum_r tr(A_r B_r M^T) + O(|w|^3)`` over units ``r``
  (``B_r``, ``A_r`` the first and second matrix), so the Hessian is block diagonal over units with
  eigenvalues ``+- c sigma_i(M)``, each ``d`` times per unit: ``d * R`` times in all, for any ``R``.
- ``n = 1`` (derived here; ``c = s'_post(0)``, ``c2 = s''_post(0)``, ``D_i = diag(s'_pre(x_i))``):
  ``f(x) = x + c sum_r W_r p + c^2 sum_{q<r} W_r D W_q p + (c2/2) sum_r (W_r p)^2 + O(|w|^3)``, so
  the gradient is ``c M`` for every layer and, indexing layer ``r``'s weights by ``(a, b)`` (out, in),

      H_rq = A + C        (r > q),     H_qr = A + C^T,     H_rr = A + c2 E,
      A[(a,j),(a',j')] = c^2 (1/m) sum_i G_i[a,a'] p_ij p_ij'            (= c^2 I (x) S_pp for mse),
      C[(a,b),(b',k)]  = c^2 delta_bb' (1/m) sum_i e_ia D_i[b] p_ik,
      E[(a,j),(a',j')] = delta_aa' (1/m) sum_i e_ia p_ij p_ij',

  i.e. ``H = J (x) A + L (x) C + L^T (x) C^T + c2 I (x) E`` with ``J`` all ones and ``L`` strictly
  lower triangular ones (``L[r, q] = 1`` for ``r > q``) -- the paper's block-Toeplitz form.  The
  gradient is not 0.

The Hessian's two parts, ``H = G + F`` (``G = J^T H_l J`` the generalised Gauss-Newton matrix, ``F`` the rest;
``matrix=`` below): at ``n >= 2`` the outputs do not move to first order, so ``G = 0`` and ``F = H``.  At
``n = 1`` every unit sees the same input ``x_i`` and ``J v = c sum_r V_r p_i`` (read out by ``Q``), so
``G = J (x) A`` -- the ``A`` term above -- with eigenvalues ``R eig(A)`` and ``(R - 1) d^2`` zeros, in closed
form at any depth; ``F = L (x) C + L^T (x) C^T + c2 I (x) E`` (assembled, as ``H``).  The empirical Fisher
``(1/m) sum_i grad l_i grad l_i^T`` is ``G`` with ``e_i e_i^T`` in place of ``G_i``: 0 at ``n >= 2``, and at
``n = 1`` ``J (x) A_ef``, ``A_ef[(a,j),(a',j')] = c^2 (1/m) sum_i e_ia e_ia' p_ij p_ij'``.

ReLU: autograd uses ``relu'(0) = 0``, so at exactly zero weights a ReLU at a mid/post position
gives ``c = 0`` and a zero Hessian, which is what autograd computes; the theorem's smooth-activation
statement does not cover ReLU (see :func:`check_assumptions`).  A ReLU at the *pre* position is
fine: only ``s_pre(x_i)`` and ``s'_pre(x_i)`` at the (generically non-zero) data enter.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .reference import ACTIVATIONS, LOSSES, MATRICES, activation, check_activation


# (s(0), s'(0), s''(0)); relu'(0) = 0 is autograd's convention (relu is not differentiable at 0)
ACTIVATION_AT_ZERO = {
    "identity": (0.0, 1.0, 0.0),
    "relu": (0.0, 0.0, 0.0),
    "tanh": (0.0, 1.0, 0.0),
    "ssigmoid": (0.0, 0.5, 0.0),  # 2 sigmoid(z) - 1 = tanh(z / 2)
}
SMOOTH_AT_ZERO = {"identity": True, "relu": False, "tanh": True, "ssigmoid": True}


def activation_taylor(name: str) -> tuple[float, float, float]:
    """``(s(0), s'(0), s''(0))`` of an activation (ReLU with autograd's ``relu'(0) = 0``)."""
    return ACTIVATION_AT_ZERO[check_activation("activation", name)]


def activation_derivative(name: str, z: torch.Tensor) -> torch.Tensor:
    """``s'(z)`` elementwise (ReLU: ``1[z > 0]``, autograd's convention)."""
    check_activation("activation", name)
    if name == "identity":
        return torch.ones_like(z)
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "tanh":
        return 1.0 - torch.tanh(z) ** 2
    t = torch.tanh(z / 2)
    return 0.5 * (1.0 - t * t)


@dataclass
class AssumptionCheck:
    """Whether Theorem 1's assumption ``s_mid(0) = s_post(0) = 0`` (and smoothness at 0) holds.

    Attributes:
        holds: ``s_mid(0) = s_post(0) = 0`` and the activations that matter are smooth at 0.
        values_zero: ``s_mid(0) = s_post(0) = 0``.
        smooth: the mid/post activations (those evaluated at 0) are differentiable there.
        slope: ``c = s'_mid(0) s'_post(0)`` for ``n >= 2`` (``s'_post(0)`` for ``n = 1``).
        notes: human-readable caveats.
    """

    holds: bool
    values_zero: bool
    smooth: bool
    slope: float
    notes: list = field(default_factory=list)


def check_assumptions(pre: str = "identity", mid: str = "identity", post: str = "identity",
                      shortcut: int = 2) -> AssumptionCheck:
    """Check Theorem 1's assumptions for an activation placement (see module docstring)."""
    for arg, name in (("pre", pre), ("mid", mid), ("post", post)):
        check_activation(arg, name)
    _check_int("shortcut", shortcut, 1)
    at_zero = [post] if shortcut == 1 else [mid, post]
    values_zero = all(ACTIVATION_AT_ZERO[a][0] == 0.0 for a in at_zero)
    smooth = all(SMOOTH_AT_ZERO[a] for a in at_zero)
    slope = math.prod(ACTIVATION_AT_ZERO[a][1] for a in at_zero)
    notes = []
    if not smooth:
        notes.append("relu is not differentiable at 0: the closed form uses autograd's relu'(0) = 0 "
                     "(a zero Hessian at exactly zero weights); the theorem's smooth case does not apply")
    if shortcut >= 3:
        notes.append("n >= 3: gradient and Hessian vanish at zero (a high-order saddle)")
    return AssumptionCheck(values_zero and smooth, values_zero, smooth, slope, notes)


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------ the data at zero
@dataclass
class ZeroPointData:
    """The data as the trunk sees it at zero weights (float64).

    Attributes:
        x: ``[m, d]`` trunk inputs (after any input projection).
        residual: ``[m, d]`` ``e_i = d l_i / d f`` at ``f = x_i``, pulled back through any read-out.
        out_hessian: ``[m, d, d]`` ``G_i``, or ``None`` meaning the identity (mse, no read-out).
    """

    x: torch.Tensor
    residual: torch.Tensor
    out_hessian: torch.Tensor | None

    @property
    def m(self) -> int:
        return self.x.shape[0]

    @property
    def d(self) -> int:
        return self.x.shape[1]


def zero_point_data(X: torch.Tensor, Y: torch.Tensor, loss: str = "mse", input_proj: torch.Tensor | None = None,
                    readout: torch.Tensor | None = None) -> ZeroPointData:
    """Residuals and output curvature at zero weights.

    Args:
        X: ``[m, p]`` inputs.
        Y: ``[m, q]`` targets (mse); class indices ``[m]`` or probabilities ``[m, q]`` (cross_entropy).
        loss: ``"mse"`` or ``"cross_entropy"``.
        input_proj: optional frozen ``[d, p]`` input projection (``x -> x @ input_proj.T``).
        readout: optional frozen ``[q, d]`` read-out (``h -> h @ readout.T``).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.shape[0] < 1:
        raise ValueError(f"X must be a tensor of shape [m, p] with m >= 1, got "
                         f"{list(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
    if not isinstance(Y, torch.Tensor) or Y.dim() == 0 or Y.shape[0] != X.shape[0]:
        raise ValueError(f"Y must be a tensor with {X.shape[0]} rows like X, got "
                         f"{list(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__}")
    x = X.detach().to(torch.float64).cpu()
    if input_proj is not None:
        x = x @ input_proj.detach().to(torch.float64).cpu().T
    d = x.shape[1]
    Q = None if readout is None else readout.detach().to(torch.float64).cpu()  # [q, d]
    f = x if Q is None else x @ Q.T  # [m, q] output at zero
    q = f.shape[1]
    if loss == "mse":
        if Y.dim() != 2 or Y.shape[1] != q:
            raise ValueError(f"Y must have shape [{X.shape[0]}, {q}] for loss='mse', got {list(Y.shape)}")
        g = f - Y.detach().to(torch.float64).cpu()
        G = None if Q is None else (Q.T @ Q).expand(x.shape[0], d, d).clone()
    else:
        prob = torch.softmax(f, dim=1)
        if Y.dim() == 1:
            if Y.is_floating_point() or Y.is_complex() or Y.dtype == torch.bool:
                raise TypeError(f"Y: class-index targets must be integers, got {Y.dtype}")
            lo, hi = int(Y.min()), int(Y.max())
            if lo < 0 or hi >= q:
                raise ValueError(f"Y: class indices must lie in [0, {q}), got range [{lo}, {hi}]")
            target = torch.nn.functional.one_hot(Y.long().cpu(), q).to(torch.float64)
        elif Y.dim() == 2 and Y.shape[1] == q and Y.is_floating_point():
            target = Y.detach().to(torch.float64).cpu()
            if not bool(torch.isfinite(target).all()) or bool((target < 0).any()):
                raise ValueError("Y: probability targets must be finite and >= 0")
        else:
            raise ValueError(f"Y must be class indices [{X.shape[0]}] or probabilities [{X.shape[0]}, {q}] "
                             f"for loss='cross_entropy', got {list(Y.shape)}")
        # l = -sum_c t_c log softmax(f)_c: gradient (sum t) p - t, Hessian (sum t)(diag p - p p^T)
        mass = target.sum(dim=1, keepdim=True)
        g = mass * prob - target
        Gout = mass.unsqueeze(2) * (torch.diag_embed(prob) - prob.unsqueeze(2) * prob.unsqueeze(1))
        G = Gout if Q is None else Q.T @ Gout @ Q
    e = g if Q is None else g @ Q
    return ZeroPointData(x=x, residual=e, out_hessian=G)


def zero_point_data_from_model(model, X: torch.Tensor, Y: torch.Tensor, loss: str = "mse") -> ZeroPointData:
    """:func:`zero_point_data` with the model's frozen projections (its weights are not used)."""
    return zero_point_data(X, Y, loss, getattr(model, "input_proj", None), getattr(model, "readout", None))


def branch_moment(zp: ZeroPointData, pre: str = "identity") -> torch.Tensor:  # [d, d]
    """``M = (1/m) sum_i e_i s_pre(x_i)^T`` (the paper's ``S_xx - S_yx`` for linear nets and mse)."""
    p = activation(check_activation("pre", pre), zp.x)
    return zp.residual.T @ p / zp.m


# ------------------------------------------------------------------------------------ spectra
@dataclass
class ZeroPointSpectrum:
    """The Hessian spectrum at the zero point, as values with multiplicities.

    Attributes:
        values: eigenvalues (not necessarily distinct), each ``multiplicities[i]`` times.
        multiplicities: ``int`` array like ``values``; sums to ``num_params``.
        num_params: ``P = R * n * d * d``.
        shortcut, units, width: ``n``, ``R``, ``d``.
        method: ``"closed_form"`` (n = 2; the Gauss-Newton part at n = 1), ``"zero"`` (n >= 3; the Gauss-Newton
            part at n >= 2) or ``"assembled"`` (n = 1, eigenvalues of the assembled block-Toeplitz matrix).
        singular_values: ``sigma(M)`` (descending) for ``n = 2``, else ``None``.
        slope: the activation factor ``c``.
        gradient_norm: ``||grad L(0)||`` (0 for ``n >= 2``).
        assumptions: :class:`AssumptionCheck`.
        matrix: ``"hessian"``, or the part ``"ggn"`` / ``"functional"`` whose spectrum this is.
    """

    values: np.ndarray
    multiplicities: np.ndarray
    num_params: int
    shortcut: int
    units: int
    width: int
    method: str
    singular_values: np.ndarray | None
    slope: float
    gradient_norm: float
    assumptions: AssumptionCheck
    matrix: str = "hessian"

    def eigenvalues(self) -> np.ndarray:
        """All ``P`` eigenvalues, ascending."""
        return np.sort(np.repeat(self.values, self.multiplicities))

    def distinct(self, decimals: int = 12) -> tuple[np.ndarray, np.ndarray]:
        """Distinct eigenvalues (rounded to ``decimals`` relative to the largest) and their multiplicities."""
        scale = float(np.abs(self.values).max(initial=0.0)) or 1.0
        key = np.round(self.values / scale, decimals)
        uniq, inv = np.unique(key, return_inverse=True)
        mult = np.bincount(inv, weights=self.multiplicities).astype(np.int64)
        vals = np.array([self.values[inv == i].mean() for i in range(len(uniq))])
        return vals, mult

    def report(self, q: float = 0.1, k: int = 5):
        """The exact :class:`~shortcut_ext.curvature.condition.ConditionReport` of this spectrum."""
        from .curvature.condition import report_from_eigenvalues

        rep = report_from_eigenvalues(self.eigenvalues(), q=q, k=k, method=f"theory:{self.method}")
        return rep


def two_shortcut_spectrum(zp: ZeroPointData, units: int, pre: str = "identity", mid: str = "identity",
                          post: str = "identity") -> ZeroPointSpectrum:
    """Closed-form zero-point spectrum of a 2-shortcut net: ``+- c sigma_i(M)``, each ``d * R`` times."""
    R = _check_int("units", units, 1)
    chk = check_assumptions(pre, mid, post, 2)
    d = zp.d
    sigma = torch.linalg.svdvals(branch_moment(zp, pre)).numpy()
    c = chk.slope
    vals = np.concatenate([c * sigma, -c * sigma])
    mult = np.full(2 * d, d * R, dtype=np.int64)
    return ZeroPointSpectrum(vals, mult, R * 2 * d * d, 2, R, d, "closed_form", sigma, c, 0.0, chk)


def one_shortcut_blocks(zp: ZeroPointData, pre: str = "identity", post: str = "identity"):
    """The ``d^2 x d^2`` blocks ``(A, C, E)`` of the 1-shortcut zero-point Hessian and the slopes
    ``(c, c2)`` (see the module docstring); rows index ``(out, in)`` of a layer's weight."""
    check_activation("pre", pre)
    _, c, c2 = activation_taylor(post)
    m, d = zp.m, zp.d
    p = activation(pre, zp.x)  # [m, d]
    Dp = activation_derivative(pre, zp.x)  # [m, d]
    e = zp.residual
    if zp.out_hessian is None:
        A = torch.kron(torch.eye(d, dtype=torch.float64, device=p.device), p.T @ p / m)
    else:
        A = torch.einsum("iab,ij,ik->ajbk", zp.out_hessian, p, p).reshape(d * d, d * d) / m
    A = c * c * A
    T = torch.einsum("ia,ib,ik->abk", e, Dp, p) / m  # [a, b, k]
    C = c * c * torch.einsum("abk,bc->abck", T, torch.eye(d, dtype=torch.float64, device=p.device)).reshape(d * d, d * d)
    E = torch.einsum("ia,ij,ik,ab->ajbk", e, p, p, torch.eye(d, dtype=torch.float64, device=p.device)).reshape(d * d, d * d) / m
    return A, C, E, c, c2


def one_shortcut_gradient(zp: ZeroPointData, units: int, pre: str = "identity",
                          post: str = "identity") -> torch.Tensor:  # [R, 1, d, d]
    """Gradient at zero of a 1-shortcut net: ``s'_post(0) M`` for every layer."""
    R = _check_int("units", units, 1)
    c = activation_taylor(post)[1]
    return (c * branch_moment(zp, pre)).expand(R, 1, zp.d, zp.d).clone()


def _check_matrix(matrix, allowed=MATRICES) -> str:
    if not isinstance(matrix, str) or matrix not in allowed:
        raise ValueError(f"matrix must be one of {', '.join(allowed)} (the Hessian, its Gauss-Newton part G = J^T "
                         f"H_l J, the rest H - G{', or the empirical Fisher' if len(allowed) > 3 else ''}), got "
                         f"{matrix!r}")
    return matrix


class OneShortcutHessian:
    """The 1-shortcut zero-point Hessian as a structured operator (``O(R d^4 k)`` per ``matmat``).

    Same interface as :class:`~shortcut_ext.curvature.HessianOperator` (``matmat``, ``matvec``,
    ``to_dense``, ``shape``, ``dtype``), so Lanczos / SLQ run on it at any depth.  ``matrix="ggn"``: its
    Gauss-Newton part ``J (x) A``; ``"functional"``: the rest (module docstring).
    """

    def __init__(self, zp: ZeroPointData, units: int, pre: str = "identity", post: str = "identity",
                 matrix: str = "hessian"):
        self.units = _check_int("units", units, 1)
        self.matrix = _check_matrix(matrix, MATRICES[:3])
        self.A, self.C, self.E, self.c, self.c2 = one_shortcut_blocks(zp, pre, post)
        self.d2 = self.A.shape[0]
        self.P = self.units * self.d2
        self.shape = (self.P, self.P)
        self.dtype = torch.float64
        self.device = torch.device("cpu")

    def matmat(self, V: torch.Tensor) -> torch.Tensor:  # [P, k] -> [P, k]
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.P or V.shape[1] < 1:
            raise ValueError(f"V must be a tensor of shape [{self.P}, k] with k >= 1, got "
                             f"{list(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__}")
        X = V.to(torch.float64).reshape(self.units, self.d2, -1)  # [R, d^2, k]
        total = X.sum(dim=0)
        before = torch.cumsum(X, dim=0) - X  # sum over q < r
        after = total - before - X  # sum over q > r
        Y = torch.zeros_like(X)
        if self.matrix != "functional":
            Y += (self.A @ total).unsqueeze(0)
        if self.matrix != "ggn":
            Y += self.c2 * (self.E @ X) + self.C @ before + self.C.T @ after
        return Y.reshape(self.P, -1).to(V.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def to_dense(self, force: bool = False) -> torch.Tensor:  # [P, P]
        """The assembled matrix; refuses ``P > 8192`` (as ``HessianOperator.to_dense``) unless ``force=True``."""
        limit = 8192
        if self.P > limit and not force:
            raise ValueError(f"to_dense() refuses P = {self.P} > {limit} parameters "
                             f"({self.P ** 2 * 8 / 2**30:.1f} GiB in float64); pass force=True, or use its matvec / "
                             "matmat (Lanczos, SLQ)")
        R = self.units
        J = torch.ones(R, R, dtype=torch.float64, device=self.A.device)
        Lw = torch.tril(J, -1)
        out = torch.zeros(self.P, self.P, dtype=torch.float64, device=self.A.device)
        if self.matrix != "functional":
            out += torch.kron(J, self.A)
        if self.matrix != "ggn":
            out += (torch.kron(Lw, self.C) + torch.kron(Lw.T, self.C.T)
                    + self.c2 * torch.kron(torch.eye(R, dtype=torch.float64, device=self.A.device), self.E))
        return out


def one_shortcut_hessian(zp: ZeroPointData, units: int, pre: str = "identity",
                         post: str = "identity") -> torch.Tensor:  # [P, P]
    """The assembled block-Toeplitz Hessian ``[R d^2, R d^2]`` of a 1-shortcut net at zero."""
    return OneShortcutHessian(zp, units, pre, post).to_dense(force=True)


def zero_point_spectrum(zp: ZeroPointData, shortcut: int, units: int, pre: str = "identity",
                        mid: str = "identity", post: str = "identity",
                        max_dense_params: int = 8192, matrix: str = "hessian") -> ZeroPointSpectrum:
    """The zero-point Hessian spectrum of an ``n``-shortcut net with ``R`` units, without building it.

    ``n = 2``: closed form; ``n >= 3``: all zero; ``n = 1``: ``eigvalsh`` of the assembled Hessian
    (refused above ``max_dense_params``; use :class:`OneShortcutHessian` with Lanczos / SLQ there).

    ``matrix="ggn"``: the Gauss-Newton part's, ``0`` at ``n >= 2`` and ``R eig(A)`` with ``(R - 1) d^2`` zeros at
    ``n = 1`` (closed form at any depth); ``"functional"``: the rest's, the Hessian's at ``n >= 2`` and
    assembled at ``n = 1``; ``"empirical_fisher"``: 0 at ``n >= 2`` and ``R eig(A_ef)`` with ``(R - 1) d^2`` zeros
    at ``n = 1`` (module docstring).
    """
    n = _check_int("shortcut", shortcut, 1)
    R = _check_int("units", units, 1)
    matrix = _check_matrix(matrix)
    for arg, name in (("pre", pre), ("mid", mid), ("post", post)):
        check_activation(arg, name)
    d = zp.d
    P = R * n * d * d
    chk = check_assumptions(pre, mid, post, n)
    if n >= 2 and matrix in ("ggn", "empirical_fisher"):  # J = 0
        return ZeroPointSpectrum(np.zeros(1), np.array([P]), P, n, R, d, "zero", None, chk.slope, 0.0, chk, matrix)
    if n == 2:
        spec = two_shortcut_spectrum(zp, R, pre, mid, post)
        spec.matrix = matrix
        return spec
    if n >= 3:
        return ZeroPointSpectrum(np.zeros(1), np.array([P]), P, n, R, d, "zero", None, chk.slope, 0.0, chk, matrix)
    gnorm = float(one_shortcut_gradient(zp, R, pre, post).norm())
    if matrix in ("ggn", "empirical_fisher"):  # J (x) A: R eig(A), and zeros for the R - 1 directions that sum to
        if matrix == "ggn":                   # zero over the units
            A = one_shortcut_blocks(zp, pre, post)[0]
        else:
            p = activation(pre, zp.x)
            e = zp.residual
            A = chk.slope ** 2 * torch.einsum("ia,ib,ij,ik->ajbk", e, e, p, p).reshape(d * d, d * d) / zp.m
        ev = np.concatenate([R * torch.linalg.eigvalsh(A).numpy(), np.zeros(1)])
        mult = np.concatenate([np.ones(d * d, dtype=np.int64), np.array([(R - 1) * d * d], dtype=np.int64)])
        return ZeroPointSpectrum(ev, mult, P, 1, R, d, "closed_form", None, chk.slope, gnorm, chk, matrix)
    if P > max_dense_params:
        part = "Hessian" if matrix == "hessian" else "Hessian's functional part"
        raise ValueError(f"the 1-shortcut {part} has P = {P} > max_dense_params = {max_dense_params} rows; "
                         "raise max_dense_params or run lanczos / slq on OneShortcutHessian")
    ev = torch.linalg.eigvalsh(OneShortcutHessian(zp, R, pre, post, matrix).to_dense(force=True)).numpy()
    return ZeroPointSpectrum(ev, np.ones(P, dtype=np.int64), P, 1, R, d, "assembled", None, chk.slope, gnorm, chk,
                             matrix)


def model_zero_point_spectrum(model, X: torch.Tensor, Y: torch.Tensor, loss: str = "mse",
                              max_dense_params: int = 8192, matrix: str = "hessian") -> ZeroPointSpectrum:
    """:func:`zero_point_spectrum` for a :class:`~shortcut_ext.models.ShortcutNet`'s configuration
    (architecture, activations, projections; its current weights are ignored)."""
    if not getattr(model, "shortcut", False):
        raise ValueError("model must be a ShortcutNet: Theorem 1 is about residual nets at zero branch weights")
    zp = zero_point_data_from_model(model, X, Y, loss)
    return zero_point_spectrum(zp, model.n, model.units, *model.activations, max_dense_params=max_dense_params,
                               matrix=matrix)


# ------------------------------------------------------------------------------------ condition vs depth
CURVE_KINDS = ("shortcut1", "shortcut2", "shortcut3", "plain_xavier", "plain_orthogonal")


def condition_vs_depth(X: torch.Tensor, Y: torch.Tensor, depths, kinds=CURVE_KINDS, pre: str = "identity",
                       mid: str = "identity", post: str = "identity", loss: str = "mse", seeds=(0,),
                       q: float = 0.1, max_dense_params: int = 4096) -> dict:
    """Condition numbers at initialisation against depth (the paper's Fig. 5).

    ``shortcutN`` is an N-shortcut net at zero weights with ``depth // N`` units (``layers`` =
    ``N * (depth // N)``, the depth actually used when ``N`` does not divide it), from the theory
    (``n = 1`` through the assembled Hessian, or Lanczos + SLQ on :class:`OneShortcutHessian` above
    ``max_dense_params``).  ``plain_xavier`` / ``plain_orthogonal`` have no closed form: they are
    computed **numerically**, from the dense Hessian (``HessianOperator.to_dense``, float64) of
    small plain nets (``activation = mid``) at that initialisation, averaged over ``seeds``; depths
    with ``depth * d^2 > max_dense_params`` are skipped (``nan``).

    Returns:
        ``{kind: {"depth", "units", "layers", "lam_max", "lam_min", "lam_q10", "cond", "cond_q10", "index",
        "std" (over seeds, plain nets), "method", "resolved"}}`` with lists over ``depths``; ``resolved`` is
        ``False`` where SLQ (the 1-shortcut net above ``max_dense_params``) could not resolve the eigenvalues
        near 0, so that ``lam_q10``, ``cond_q10`` and the index there are unreliable (with a warning).
    """
    from .curvature.condition import condition_report, report_resolved
    from .curvature.hessian import HessianOperator
    from .models import PlainNet

    keys = ("lam_max", "lam_min", "lam_q10", "cond", "cond_q10", "index")
    if any(not str(kd).startswith("shortcut") for kd in kinds) and len(tuple(seeds)) == 0:
        raise ValueError(f"seeds must hold at least one seed for the plain kinds, got {tuple(seeds)!r}")
    zp = zero_point_data(X, Y, loss)
    d = zp.d
    out = {}
    for kind in kinds:
        if kind not in CURVE_KINDS:
            raise ValueError(f"kinds must be drawn from {CURVE_KINDS}, got {kind!r}")
        rows = {k: [] for k in keys}
        rows.update(depth=[], units=[], layers=[], method=[], std=[], resolved=[])
        for D in depths:
            D = _check_int("depth", D, 1)
            rows["depth"].append(D)
            if kind.startswith("shortcut"):
                n = int(kind[-1])
                R = D // n
                rows["units"].append(R)
                rows["layers"].append(R * n)
                rows["std"].append(None)
                if R < 1:
                    for k in keys:
                        rows[k].append(float("nan"))
                    rows["method"].append("skipped")
                    rows["resolved"].append(None)
                    continue
                resolved = True
                if n == 1 and R * d * d > max_dense_params:
                    rep = condition_report(OneShortcutHessian(zp, R, pre, post), method="lanczos+slq", q=q)
                    resolved = report_resolved(rep)
                    if not resolved:
                        warnings.warn(
                            f"condition_vs_depth: {kind} at depth {D}: SLQ could not resolve the eigenvalues near 0 "
                            f"({R * d * d} weights > max_dense_params = {max_dense_params}), so lam_q10, cond_q10 and "
                            "the index there are unreliable, by factors (resolved = False); raise max_dense_params "
                            "for the exact spectrum", stacklevel=2)
                else:
                    rep = zero_point_spectrum(zp, n, R, pre, mid, post, max_dense_params=max(max_dense_params,
                                                                                            R * d * d)).report(q)
                for k in keys:
                    rows[k].append(float(getattr(rep, k)))
                rows["method"].append(rep.method)
                rows["resolved"].append(resolved)
            else:
                init = kind.split("_", 1)[1]
                rows["units"].append(1)
                rows["layers"].append(D)
                if D * d * d > max_dense_params:
                    for k in keys:
                        rows[k].append(float("nan"))
                    rows["method"].append("skipped")
                    rows["std"].append(None)
                    rows["resolved"].append(None)
                    continue
                reps = []
                for s in seeds:
                    net = PlainNet(d, D, activation=mid, init=init, seed=int(s), backend="torch", dtype=torch.float64)
                    op = HessianOperator(net, (X.to(torch.float64), Y if loss != "mse" else Y.to(torch.float64)),
                                         loss=loss, backend="autograd")
                    reps.append(condition_report(op, method="exact", q=q))
                for k in keys:
                    rows[k].append(float(np.mean([getattr(r, k) for r in reps])))
                rows["std"].append({k: _spread([getattr(r, k) for r in reps]) for k in keys})
                rows["method"].append("dense (numerical)")
                rows["resolved"].append(True)
        if kind in ("shortcut1", "shortcut2") and any(v == 0.0 for v in rows["lam_max"]):
            # a zero Hessian has no condition number: say why, instead of bare nan rows (n >= 3 is the
            # documented saddle)
            chk = check_assumptions(pre, mid, post, int(kind[-1]))
            why = chk.notes or (["the activations' slopes at 0 multiply to zero"] if chk.slope == 0 else [
                "the data make it zero, as the activation at pre passes them (targets equal to the inputs, say: "
                "the identity map that the zero-weight net computes is then optimal; or relu at pre with inputs "
                "that are all negative)"])
            warnings.warn(f"condition_vs_depth: {kind} (pre={pre}, mid={mid}, post={post}) has a zero Hessian at zero "
                          f"weights, so its cond, cond_q10 and index are nan: {'; '.join(why)}", stacklevel=2)
        out[kind] = rows
    return out


def _spread(vals) -> float:
    """Standard deviation over seeds; 0 when every value is the same (all inf: singular for every seed,
    where numpy's std warns and gives nan), nan when they differ but some are not finite."""
    a = np.asarray(vals, dtype=float)
    if a.size and np.all(a == a[0]):
        return 0.0
    return float(np.std(a)) if np.all(np.isfinite(a)) else float("nan")


__all__ = [
    "ACTIVATIONS", "ACTIVATION_AT_ZERO", "AssumptionCheck", "CURVE_KINDS", "OneShortcutHessian", "ZeroPointData",
    "ZeroPointSpectrum", "activation_derivative", "activation_taylor", "branch_moment", "check_assumptions",
    "condition_vs_depth", "model_zero_point_spectrum", "one_shortcut_blocks", "one_shortcut_gradient",
    "one_shortcut_hessian", "two_shortcut_spectrum", "zero_point_data", "zero_point_data_from_model",
    "zero_point_spectrum",
]
