"""The paper's networks (docs/science.md section 1): n-shortcut residual nets and plain nets.

All trunk weights live in one ``Parameter`` so that the whole stack is one op call:
``ShortcutNet.weight`` is ``[R, n, d, d]`` (units x layers x out x in) and ``PlainNet.weight`` is
``[D, d, d]`` (layers x out x in), run as one unit of ``D`` layers without a shortcut.

Optional frozen input projection / read-out: when data lives in ``R^p`` with ``p != d``, pass
``in_features=p`` (and/or ``out_features=q``).  A fixed random matrix with orthonormal rows or
columns (seeded, ``requires_grad=False``, a buffer) maps ``R^p -> R^d`` before the trunk and
``R^d -> R^q`` after it.  Every result in docs/science.md is stated for the trunk; the projections are
constants of the loss and carry no parameters, so Hessians stay those of the trunk weights.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .ops import autocast_off, check_backend, residual_stack
from .reference import check_activation

INITS = ("zero", "small", "xavier", "orthogonal", "he")


def init_weights(shape, init: str, scale: float = 0.01, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Weights of ``shape[..., d, d]`` for one of ``INITS``, seeded.

    - ``zero``: all zeros (every residual unit is the identity; a saddle of the loss);
    - ``small``: Xavier-normal times ``scale`` (the paper's "zero with small perturbation");
    - ``xavier``: Glorot normal, std ``sqrt(2 / (fan_in + fan_out))``;
    - ``orthogonal``: each ``d x d`` matrix a random orthogonal matrix (Saxe et al.);
    - ``he``: normal with std ``sqrt(2 / fan_in)``.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if isinstance(scale, (bool, np.bool_)) or not (isinstance(scale, (int, float, np.integer, np.floating))
                                                    and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    scale = float(scale)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    d_out, d_in = shape[-2], shape[-1]
    if init == "zero":
        return torch.zeros(shape, dtype=dtype)  # on the default device, like every other init
    if init == "orthogonal":
        a = torch.randn(tuple(shape), generator=g, dtype=torch.float64, device="cpu")
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
        # QR's q is column-major: a row-major copy, as every other init (the fused ops would copy it each call)
        return q.to(dtype=dtype, device=torch.get_default_device()).contiguous()
    std = {"small": math.sqrt(2.0 / (d_in + d_out)) * scale,
           "xavier": math.sqrt(2.0 / (d_in + d_out)),
           "he": math.sqrt(2.0 / d_in)}[init]
    # drawn on the CPU (the generator's device: the same weights on every device), then placed on torch's
    # default device, as nn.Linear's parameters are under `with torch.device(...)`
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64, device="cpu") * std).to(
        dtype=dtype, device=torch.get_default_device())


class ForwardNotSeenWarning(UserWarning):
    """A curvature tool met a model whose ``model(x)`` it cannot see (see :meth:`StackNet.function_differs`)."""


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _resolve_dtype(dtype) -> torch.dtype:
    """``dtype``, or torch's default dtype for ``None`` (as ``nn.Linear``); float32 or float64 only."""
    if dtype is None:
        dtype = torch.get_default_dtype()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64; torch's default dtype is {dtype}: pass "
                            "dtype=torch.float32 or torch.float64")
    return dtype


def _frozen_projection(rows: int, cols: int, seed: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed((int(seed) + 7919) % 2**63)  # any integer seed, as init_weights
    a = torch.randn(max(rows, cols), min(rows, cols), generator=g, dtype=torch.float64, device="cpu")
    q, _ = torch.linalg.qr(a)
    q = q if rows >= cols else q.T
    return q.to(dtype=dtype, device=torch.get_default_device()).contiguous()


class StackNet(nn.Module):
    """Common base: a trunk of residual units run by one ``residual_stack`` call."""

    shortcut: bool
    n: int

    def __init__(self, width, act_pre, act_mid, act_post, backend, in_features, out_features, seed, dtype,
                 act_names=("pre", "mid", "post")):
        super().__init__()
        self.width = _check_int("width", width, 1)
        self.act_pre = check_activation(act_names[0], act_pre)
        self.act_mid = check_activation(act_names[1], act_mid)
        self.act_post = check_activation(act_names[2], act_post)
        self.backend = check_backend(backend)
        # what the fused forward keeps for the backward (see shortcut_ext.residual_stack): None picks,
        # True keeps unit inputs only (least memory), False keeps every layer's input (no recompute)
        self.recompute: bool | None = None
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = width if in_features is None else _check_int("in_features", in_features, 1)
        self.out_features = width if out_features is None else _check_int("out_features", out_features, 1)
        if self.in_features != width:
            self.register_buffer("input_proj", _frozen_projection(width, self.in_features, seed, dtype))  # [d, p]
        else:
            self.input_proj = None
        if self.out_features != width:
            self.register_buffer("readout", _frozen_projection(self.out_features, width, seed + 1, dtype))  # [q, d]
        else:
            self.readout = None

    # --- the trunk as a function of its weights: what curvature tools differentiate
    @property
    def activations(self) -> tuple[str, str, str]:
        return (self.act_pre, self.act_mid, self.act_post)

    def stack_weights(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (default: the parameter) viewed as ``[R, n, d, d]``; it must hold as many values as the
        parameter (a weight of another depth is refused, not run as a deeper or shallower net)."""
        w = self.weight if weight is None else weight
        R = getattr(self, "units", 1)
        if self.weight.numel() != R * self.n * self.width * self.width:  # e.g. functional_call with another net's
            shape = [R, self.n, self.width, self.width] if hasattr(self, "units") else [self.n, self.width, self.width]
            raise ValueError(f"{type(self).__name__}.weight must have shape {shape}, got {list(self.weight.shape)} "
                             "(a weight of another net, e.g. through torch.func.functional_call?)")
        if weight is not None:
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"weight must be a torch.Tensor of {self.weight.numel()} values "
                                f"(shape {list(self.weight.shape)} or flat), got {type(weight).__name__}")
            if weight.numel() != self.weight.numel():
                raise ValueError(f"weight must hold {self.weight.numel()} values like the parameter (shape "
                                 f"{list(self.weight.shape)}, or flat), got shape {list(weight.shape)}")
        return w.reshape(R, self.n, self.width, self.width)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the frozen input projection, if any: ``[B, p] -> [B, d]``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape [B, {self.in_features}], got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape [B, {self.in_features}], got {list(x.shape)}")
        return x if self.input_proj is None else x @ self.input_proj.T

    def _repr_tail(self) -> str:
        """The rest of ``extra_repr``: the projections (when there are any), dtype and backend; ``init`` names
        the initialisation at construction (a later load_state_dict or re-initialisation does not change it)."""
        feats = "".join(f", {name}={getattr(self, name)}" for name in ("in_features", "out_features")
                        if getattr(self, name) != self.width)
        return f"{feats}, dtype={self.weight.dtype}, backend={self.backend}"

    def function_differs(self) -> str | None:
        """Why ``model(x)`` may not be the network its weights define, or ``None``.

        The curvature tools (:class:`~shortcut_ext.curvature.HessianOperator`, the probes of
        :func:`~shortcut_ext.train.train`) rebuild the network from ``weight`` and the frozen
        projections: an overridden ``forward`` (``forward_with``, ``embed``, ``read``), on the class or on
        the instance, or forward hooks (the model's or global ones) are not part of it."""
        from torch.nn.modules import module as nn_module

        cls = type(self)
        for name in ("forward", "forward_with", "embed", "read"):
            if name in vars(self):
                return f"the model's {name} is replaced on the instance"
            if getattr(cls, name) is not getattr(StackNet, name):
                return f"{cls.__name__} overrides {name}"
        hooks = [name for name, d in (("forward hooks", self._forward_hooks),
                                      ("forward pre-hooks", self._forward_pre_hooks)) if d]
        if hooks:
            return "the model has " + " and ".join(hooks)
        hooks = [name for name, d in (("global forward hooks", nn_module._global_forward_hooks),
                                      ("global forward pre-hooks", nn_module._global_forward_pre_hooks)) if d]
        if hooks:
            return "torch.nn has " + " and ".join(hooks) + " (register_module_forward_hook / _pre_hook)"
        return None

    def read(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.readout is None else h @ self.readout.T

    def forward_with(self, weight: torch.Tensor, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """The network's output with ``weight`` in place of the parameter (any shape that views as
        ``[R, n, d, d]``, e.g. the flat parameter vector)."""
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor of {self.weight.numel()} values "
                            f"(shape {list(self.weight.shape)} or flat), got {type(weight).__name__}")
        if weight.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the model computes in float32 or float64, but its weights are "
                            f"{str(weight.dtype).replace('torch.', '')}: convert it with .float() or .double() "
                            f"(half precision is not supported; under autocast the model stays in its dtype)")
        if isinstance(x, torch.Tensor) and x.dtype != weight.dtype:
            raise TypeError(f"x must have the model's dtype {str(weight.dtype).replace('torch.', '')}, got "
                            f"{str(x.dtype).replace('torch.', '')} (convert x, or the model with .double() / .float())")
        with autocast_off(weight):  # the projections too: one dtype through the whole net
            h = self.embed(x)
            h = residual_stack(h, self.stack_weights(weight), self.shortcut, *self.activations,
                               backend=self.backend if backend is None else backend, recompute=self.recompute)
            return self.read(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(self.weight, x)

    @property
    def depth(self) -> int:
        """Number of weight layers (docs/science.md: an n-shortcut net with R units has depth n*R)."""
        return self.weight.numel() // (self.width * self.width)

    def num_parameters(self) -> int:
        return self.weight.numel()

    def mean_frobenius_norm(self) -> float:
        """Mean Frobenius norm of the ``d x d`` weight matrices (the paper's Figs. 2-3)."""
        w = self.weight.detach().reshape(-1, self.width, self.width)
        return float(torch.linalg.matrix_norm(w).mean())


class ShortcutNet(StackNet):
    """n-shortcut residual network: ``R`` units, each ``h -> h + s_post(W_n ... s_mid(W_1 s_pre(h)))``.

    Args:
        width: ``d``, the width of every layer.
        units: ``R``, the number of residual units (depth ``n * R``).
        shortcut: ``n >= 1``, how many layers each shortcut skips.
        pre, mid, post: activation at each position (``identity | relu | tanh | ssigmoid``).
        init: one of ``zero | small | xavier | orthogonal | he``; ``scale`` scales ``small``.
        seed: seeds the initialisation (and the frozen projections).
        backend: ``"fused"`` (default where built), ``"torch"`` (reference), or ``None``.
        in_features, out_features: data dimensions if not ``width`` (frozen projections).
        dtype: ``torch.float32`` or ``torch.float64``; default ``torch.get_default_dtype()``, as for
            ``nn.Linear`` (float32 unless ``torch.set_default_dtype`` changed it).

    >>> net = ShortcutNet(width=4, units=3, shortcut=2, init="zero", backend="torch")
    >>> tuple(net.weight.shape), net.depth
    ((3, 2, 4, 4), 6)
    """

    def __init__(self, width: int, units: int, shortcut: int = 2, pre: str = "identity", mid: str = "identity",
                 post: str = "identity", init: str = "small", scale: float = 0.01, seed: int = 0,
                 backend: str | None = None, in_features: int | None = None, out_features: int | None = None,
                 dtype: torch.dtype | None = None):
        dtype = _resolve_dtype(dtype)
        super().__init__(width, pre, mid, post, backend, in_features, out_features, seed, dtype)
        self.units = _check_int("units", units, 1)
        self.n = _check_int("shortcut", shortcut, 1)
        self.shortcut = True
        self.init = init
        self.weight = nn.Parameter(init_weights((self.units, self.n, self.width, self.width), init, scale, seed, dtype))

    def extra_repr(self) -> str:
        return (f"width={self.width}, units={self.units}, shortcut={self.n}, pre={self.act_pre}, "
                f"mid={self.act_mid}, post={self.act_post}, init={self.init}{self._repr_tail()}")


class PlainNet(StackNet):
    """Plain network ``h -> W_D s(... s(W_1 h))`` with activation ``s`` between layers.

    ``weight`` is ``[D, d, d]``; it runs as one unit of ``D`` layers with the shortcut off.

    >>> net = PlainNet(width=3, depth=5, init="orthogonal", backend="torch")
    >>> tuple(net.weight.shape), net.depth
    ((5, 3, 3), 5)
    """

    def __init__(self, width: int, depth: int, activation: str = "identity", init: str = "xavier",
                 scale: float = 0.01, seed: int = 0, backend: str | None = None, in_features: int | None = None,
                 out_features: int | None = None, dtype: torch.dtype | None = None):
        dtype = _resolve_dtype(dtype)
        super().__init__(width, "identity", activation, "identity", backend, in_features, out_features, seed, dtype,
                         act_names=("pre", "activation", "post"))
        self.n = _check_int("depth", depth, 1)
        self.shortcut = False
        self.init = init
        self.weight = nn.Parameter(init_weights((self.n, self.width, self.width), init, scale, seed, dtype))

    def extra_repr(self) -> str:
        return f"width={self.width}, depth={self.n}, activation={self.act_mid}, init={self.init}{self._repr_tail()}"
