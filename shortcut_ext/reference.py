"""Pure-PyTorch definitions of every op: the ground truth the fused kernels are tested against.

Notation (docs/science.md section 1).  A residual stack has ``R`` units of ``n`` layers each; all branch
weights live in one tensor ``weights[R, n, d, d]`` (units x layers x out x in).  Rows of ``x`` are
samples, so a layer maps ``a -> a @ W.T``.  Unit ``r`` maps::

    h -> h + s_post(W[r, n-1] s_mid( ... s_mid(W[r, 0] s_pre(h)) ... ))     (shortcut=True)
    h ->     s_post(W[r, n-1] s_mid( ... s_mid(W[r, 0] s_pre(h)) ... ))     (shortcut=False)

A plain network of depth ``D`` is one unit of ``n = D`` layers with the shortcut switched off, so its
activation sits between layers (``s_mid``), as in the paper.
"""
from __future__ import annotations

import torch

ACTIVATIONS = ("identity", "relu", "tanh", "ssigmoid")
LOSSES = ("mse", "cross_entropy")
# the matrices of residual_stack_hvp(matrix=): the Hessian, its Gauss-Newton and functional parts, the empirical Fisher
MATRICES = ("hessian", "ggn", "functional", "empirical_fisher")


def eigen_eps(values, dtype: torch.dtype | None = None) -> float:
    """Machine epsilon of the precision eigenvalues were computed in: ``dtype``'s if given, else that of
    ``values`` (a float32 tensor or array: float32's), float64's for anything else (lists, float64)."""
    if dtype is not None:
        return float(torch.finfo(dtype).eps)
    dt = getattr(values, "dtype", None)
    eps = float(torch.finfo(torch.float64).eps)
    if isinstance(dt, torch.dtype) and dt.is_floating_point:
        return max(eps, float(torch.finfo(dt).eps))
    try:
        import numpy as np

        if isinstance(dt, np.dtype) and np.issubdtype(dt, np.floating):
            return max(eps, float(np.finfo(dt).eps))
    except ImportError:
        pass
    return eps


def activation(name: str, z: torch.Tensor) -> torch.Tensor:
    """Apply activation ``name`` elementwise.

    ``ssigmoid`` is the symmetric sigmoid ``2*sigmoid(z) - 1 == tanh(z/2)``.
    """
    if name == "identity":
        return z
    if name == "relu":
        return torch.relu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "ssigmoid":  # as tanh(z/2): 2*sigmoid(z) - 1 cancels catastrophically near z = 0
        return torch.tanh(0.5 * z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def activation_slope_at_zero(name: str) -> float:
    """``s'(0)`` of each activation (ReLU uses autograd's convention ``relu'(0) = 0``)."""
    return {"identity": 1.0, "relu": 0.0, "tanh": 1.0, "ssigmoid": 0.5}[check_activation("act", name)]


def check_activation(arg: str, name) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{arg} must be one of {ACTIVATIONS}, got {name!r}")
    return name


def residual_stack_forward(
    x: torch.Tensor,  # [B, d]
    weights: torch.Tensor,  # [R, n, d, d]
    shortcut: bool = True,
    act_pre: str = "identity",
    act_mid: str = "identity",
    act_post: str = "identity",
) -> torch.Tensor:  # [B, d]
    """Reference forward of a residual stack (differentiable to any order by autograd)."""
    h = x
    n = weights.shape[1]
    # unbind, not weights[r, k]: indexing's backward would add a full-size zero tensor per layer
    for unit in weights.unbind(0):
        a = activation(act_pre, h)
        for k, w in enumerate(unit.unbind(0)):
            a = a @ w.transpose(0, 1)
            if k < n - 1:
                a = activation(act_mid, a)
        a = activation(act_post, a)
        h = h + a if shortcut else a
    return h


def residual_stack_unit_inputs(x, weights, shortcut=True, act_pre="identity", act_mid="identity", act_post="identity"):
    """The input of every unit, ``[R, B, d]``: what the fused forward saves for its backward."""
    hs = []
    h = x
    R = weights.shape[0]
    for r in range(R):
        hs.append(h)
        h = residual_stack_forward(h, weights[r : r + 1], shortcut, act_pre, act_mid, act_post)
    return torch.stack(hs) if hs else x.new_empty((0,) + tuple(x.shape))


def loss_fn(name: str, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Loss of the paper: ``mse`` is ``1/(2m) sum_i ||f(x_i) - y_i||^2``; ``cross_entropy`` is the
    mean softmax cross-entropy with ``targets`` either class indices ``[B]`` or probabilities ``[B, d]``."""
    m = out.shape[0]
    if name == "mse":
        return 0.5 * ((out - targets) ** 2).sum() / max(m, 1)
    if name == "cross_entropy":
        logp = torch.log_softmax(out, dim=1)
        if targets.dim() == 1:
            return -logp.gather(1, targets.long().unsqueeze(1)).sum() / max(m, 1)
        return -(targets * logp).sum() / max(m, 1)
    raise ValueError(f"loss must be one of {LOSSES}, got {name!r}")


def residual_stack_hvp(
    x: torch.Tensor,  # [B, d]
    weights: torch.Tensor,  # [R, n, d, d]
    targets: torch.Tensor,  # [B, d] (or [B] class indices for cross_entropy)
    directions: torch.Tensor,  # [k, R, n, d, d]
    shortcut: bool = True,
    act_pre: str = "identity",
    act_mid: str = "identity",
    act_post: str = "identity",
    loss: str = "mse",
    readout: torch.Tensor | None = None,  # [q, d]: the loss is then of out @ readout.T, targets [B, q]
    matrix: str = "hessian",
):
    """Reference loss, gradient ``[R, n, d, d]`` and Hessian-vector products ``[k, R, n, d, d]``
    by double backward.  With a frozen ``readout`` ``P [q, d]`` the loss is that of ``f P^T``.
    ``matrix="ggn"``: the products with the Gauss-Newton part ``G = J^T H_l J`` instead (:func:`ggn_products`);
    ``"functional"``: with ``F = H - G``; ``"empirical_fisher"``: with ``(1/m) sum_i grad l_i grad l_i^T``."""
    if matrix != "hessian":
        L, g, gv = ggn_products(x, weights, targets, directions, shortcut, act_pre, act_mid, act_post, loss, readout,
                                fisher=matrix == "empirical_fisher")
        if matrix in ("ggn", "empirical_fisher"):
            return L, g, gv
        if matrix != "functional":
            raise ValueError(f"matrix must be one of {', '.join(MATRICES)}, got {matrix!r}")
        _, _, hv = residual_stack_hvp(x, weights, targets, directions, shortcut, act_pre, act_mid, act_post, loss,
                                      readout)
        return L, g, hv - gv
    with torch.inference_mode(False), torch.enable_grad():
        # inference tensors (made under torch.inference_mode) cannot enter autograd: normal copies
        x, weights, targets, directions = (t.clone() if t.is_inference() else t
                                           for t in (x, weights, targets, directions))
        if readout is not None and readout.is_inference():
            readout = readout.clone()
        w = weights.detach().requires_grad_(True)
        out = residual_stack_forward(x, w, shortcut, act_pre, act_mid, act_post)
        if readout is not None:
            out = out @ readout.detach().T
        L = loss_fn(loss, out, targets)
        (g,) = torch.autograd.grad(L, w, create_graph=True)
        hv = []
        for v in directions:
            (h,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True, allow_unused=True)
            hv.append(torch.zeros_like(w) if h is None else h)
    hv = torch.stack(hv) if hv else weights.new_empty((0,) + tuple(weights.shape))
    return L.detach(), g.detach(), hv.detach()


def ggn_products(
    x: torch.Tensor,  # [B, d]
    weights: torch.Tensor,  # [R, n, d, d]
    targets: torch.Tensor,  # [B, d] (or [B] class indices for cross_entropy)
    directions: torch.Tensor,  # [k, R, n, d, d]
    shortcut: bool = True,
    act_pre: str = "identity",
    act_mid: str = "identity",
    act_post: str = "identity",
    loss: str = "mse",
    readout: torch.Tensor | None = None,  # [q, d]
    fisher: bool = False,
):
    """Reference loss, gradient ``[R, n, d, d]`` and generalised Gauss-Newton products ``G v = J^T H_l J v``
    ``[k, R, n, d, d]``: ``J v`` by ``torch.func.jvp`` of the outputs, ``H_l`` in closed form (``I / m`` for
    mse, ``c_i (diag(p_i) - p_i p_i^T) / m`` for cross-entropy, ``c_i = sum_j y_ij``, 1 for class indices),
    then one ``vjp`` by autograd per direction.  ``fisher=True``: the empirical Fisher's products, with
    ``e_i e_i^T / m`` in place of ``H_l`` (``e_i = dl_i/dz_i``, the sample's loss gradient in its outputs)."""
    from torch.func import jvp

    with torch.inference_mode(False), torch.enable_grad():
        x, weights, targets, directions = (t.clone() if t.is_inference() else t
                                           for t in (x, weights, targets, directions))
        if readout is not None and readout.is_inference():
            readout = readout.clone()
        P = None if readout is None else readout.detach()

        def outputs(w):
            out = residual_stack_forward(x, w, shortcut, act_pre, act_mid, act_post)
            return out if P is None else out @ P.T

        w = weights.detach().requires_grad_(True)
        z = outputs(w)
        L = loss_fn(loss, z, targets)
        (g,) = torch.autograd.grad(L, w, retain_graph=True)
        m = max(z.shape[0], 1)
        if loss == "cross_entropy":
            p = torch.softmax(z.detach(), dim=1)
            c = 1.0 if targets.dim() == 1 else targets.to(z.dtype).sum(dim=1, keepdim=True)
        if fisher:  # e_i = dl_i/dz_i: m times the mean loss's gradient in the outputs
            (e,) = torch.autograd.grad(L, z, retain_graph=True)
            e = e.detach() * m
        gv = []
        for v in directions:
            jv = jvp(outputs, (weights.detach(),), (v.detach(),))[1]  # [B, q]
            if fisher:
                u = e * (e * jv).sum(dim=1, keepdim=True) / m
            else:
                u = jv / m if loss == "mse" else c * (p * jv - p * (p * jv).sum(dim=1, keepdim=True)) / m
            (h,) = torch.autograd.grad(z, w, grad_outputs=u, retain_graph=True, allow_unused=True)
            gv.append(torch.zeros_like(w) if h is None else h)
    gv = torch.stack(gv) if gv else weights.new_empty((0,) + tuple(weights.shape))
    return L.detach(), g.detach(), gv.detach()
