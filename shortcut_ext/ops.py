"""Public ops: one call runs a whole residual stack.

``residual_stack`` dispatches to the fused C++/CUDA kernels (``backend="fused"``, the default where
built) or to the pure-PyTorch reference (``backend="torch"``).  Autograd and ``torch.compile`` support
for the fused ops are registered here with ``torch.library``.

Memory of the fused path (see ``residual_stack``'s ``recompute``): the forward saves the input of
every layer (``[R, n, B, d]``, CPU, within ``SHORTCUT_EXT_SAVE_LAYERS_MB``) and the backward
recomputes nothing, or the input of every unit (``[R, B, d]``) and the backward recomputes each
unit's inner activations, one unit at a time, in scratch of ``(2n + 4) * tile * d`` elements per
thread.  On CPU with feature-major tiles (d >= 17 in float32, d >= 32 in float64) either is stored
feature-major (strides ``[B*d, 1, B]`` / ``[n*d*B, d*B, 1, B]``).  Inference (no grad) saves nothing.  Large CPU outputs
come from a buffer cache (``empty_cache``, ``cache_stats``).
"""
from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD

from . import reference
from ._build import BUILD_HINT, _C, build_info, require_built
from .reference import ACTIVATIONS, LOSSES, MATRICES, check_activation

BACKENDS = ("fused", "torch")
_LIB = "shortcut_ext"


def default_backend() -> str:
    """``"fused"`` where the kernels are built, else ``"torch"``."""
    return "fused" if _C is not None else "torch"


def check_backend(backend) -> str:
    if backend is None:
        return default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "fused":
        require_built("backend='fused'")
    return backend


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _check_dense(**tensors) -> None:
    """The fused kernels take dense (strided) tensors; the torch backend takes sparse ones too."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor for backend='fused', got layout {t.layout} "
                             f"(call .to_dense())")


def check_stack_args(x, weights, arg_x: str = "x") -> None:
    """Checks in Python what the dispatcher cannot explain well (types, devices, unbuilt CUDA).

    Shape and dtype checks live in the C++ host code so that direct op calls get them too.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg_x} must be a torch.Tensor of shape [B, d], got {type(x).__name__}")
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor of shape [R, n, d, d], got {type(weights).__name__}")
    for name, t in ((arg_x, x), ("weights", weights)):
        if t.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {_dtype(t)}")
    if x.dim() != 2:
        raise ValueError(f"{arg_x} must have shape [B, d], got {list(x.shape)}")
    if weights.dim() != 4 or weights.shape[2] != weights.shape[3] or weights.shape[3] != x.shape[1]:
        raise ValueError(
            f"weights must have shape [R, n, d, d] with d == {arg_x}.size(1) == {x.shape[1]}, "
            f"got {list(weights.shape)}"
        )
    if weights.shape[0] < 1 or weights.shape[1] < 1:
        raise ValueError(f"weights must have R >= 1 units and n >= 1 layers per unit, got {list(weights.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{arg_x} must have d >= 1 features (shape [B, d]), got {list(x.shape)}")
    if x.dtype != weights.dtype:
        raise TypeError(f"{arg_x} and weights must have the same dtype, got {arg_x}: {_dtype(x)}, weights: {_dtype(weights)}")
    if x.device != weights.device:
        raise ValueError(f"{arg_x} and weights must be on the same device, got {arg_x}: {x.device}, weights: {weights.device}")
    if x.device.type == "cuda" and _C is not None and not build_info().get("cuda", False):
        raise RuntimeError(
            f"{arg_x} is a CUDA tensor but shortcut_ext was built without CUDA kernels; rebuild on a machine "
            "with CUDA torch and nvcc (FORCE_CUDA=1 pip install --no-build-isolation .) or use backend='torch'"
        )
    if x.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{arg_x} must be on a cpu or cuda device, got {x.device}")


def _one_thread_after_fork() -> None:
    """A child forked from this process computes with one CPU thread: OpenMP (libgomp) cannot start its
    thread pool again after a fork, and the child's first parallel region (a fused op from about 131k
    multiply-adds; torch's own larger ops too) hung for good.  DataLoader workers do the same; a child
    that wants more threads is started with the spawn or forkserver method."""
    try:
        if torch.get_num_threads() > 1:
            torch.set_num_threads(1)
    except Exception:  # noqa: BLE001 -- never fail a fork
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)


def check_shortcut(shortcut) -> bool:
    """``shortcut`` as a bool: ``True``/``False`` (or 0 / 1, numpy bools); anything else is an error
    (``bool("False")`` is ``True``: a string must not switch the shortcut on silently)."""
    if isinstance(shortcut, (bool, np.bool_)) or (isinstance(shortcut, (int, np.integer)) and shortcut in (0, 1)):
        return bool(shortcut)
    raise TypeError(f"shortcut must be True or False, got {shortcut!r}")


_FORWARD_MODE_HINT = (
    "the fused residual stack has a fused backward only: forward-mode AD (torch.func.jvp, "
    "torch.autograd.forward_ad) and torch.func.grad / jacrev / hessian do not run through it; use "
    "backend='torch' for those transforms, and shortcut_ext.residual_stack_hvp or "
    "shortcut_ext.curvature.HessianOperator(backend='fused') for Hessian-vector products")


_HVP_NOT_DIFFERENTIABLE = (
    "residual_stack_hvp's loss, gradient and products are values, not functions to differentiate further "
    "(torch.func.grad / jvp, forward-mode AD and backward through them are not supported): differentiate "
    "residual_stack(..., backend='torch') for the gradient, or take the products' own derivatives by finite "
    "differences of residual_stack_hvp")


def _compiled_transform():
    """Under torch.compile: ``(type, level)`` of the innermost torch.func transform dynamo is tracing
    through, or None.  Dynamo traces the interpreters as pushed, but only in these forms: an isinstance
    test of the C interpreter (``is None`` on it is not traced right), ``key()`` and ``level()`` of its
    Python wrapper (get_interpreter_stack, and popping one to see the next, are not traced)."""
    ci = torch._C._functorch.peek_interpreter_stack()
    if not isinstance(ci, torch._C._functorch.CInterpreter):
        return None
    from torch._functorch.pyfunctorch import coerce_cinterpreter

    py = coerce_cinterpreter(ci)
    return py.key(), py.level()


def _refuse_transforms(hint: str, *tensors) -> None:
    """A clear error instead of a silently zero tangent or gradient (forward AD, torch.func.grad / jvp)
    or an internal functorch error."""
    if torch.compiler.is_compiling():
        # dynamo traces torch.func transforms with their interpreters pushed, and sees the innermost one (it
        # cannot trace get_interpreter_stack); a forward-AD level is guarded on, so any is refused
        # only the innermost transform is visible here: grad(vmap(...)) meets PyTorch's own error (loud,
        # not a zero); and inputs the transform does not track are refused too (eager runs them)
        inner = _compiled_transform()
        if inner is not None and inner[0] in (torch._C._functorch.TransformType.Grad,
                                              torch._C._functorch.TransformType.Jvp):
            raise NotImplementedError(f"torch.func {inner[0].name.lower()} transform: {hint}")
        if fwAD._current_level >= 0:
            raise NotImplementedError(f"forward-mode AD (a dual level) under torch.compile: {hint}")
        return
    stack = torch._C._functorch.get_interpreter_stack() or ()
    for key in (i.key() for i in stack):
        # only where an input is tracked by the transform: tensors the function captured from outside are
        # constants to it, and the result is right (a step size 1 / lambda_max inside a torch.func step)
        if key in (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp) and any(
                _tracked(t) for t in tensors):
            raise NotImplementedError(f"torch.func {key.name.lower()} transform: {hint}")
    if fwAD._current_level >= 0 and any(fwAD.unpack_dual(t).tangent is not None for t in tensors
                                        if isinstance(t, torch.Tensor)):
        raise NotImplementedError(f"a dual tensor (forward-mode AD): {hint}")


def _tracked(t) -> bool:
    """Whether ``t`` is differentiated by a torch.func grad / jvp transform (a grad-tracking wrapper at
    some level, under any vmap wrappers)."""
    f = torch._C._functorch
    while isinstance(t, torch.Tensor) and f.is_functorch_wrapped_tensor(t):
        if f.is_gradtrackingtensor(t):
            return True
        t = f.get_unwrapped(t)
    return False


def _refuse_forward_mode(*tensors) -> None:
    _refuse_transforms(_FORWARD_MODE_HINT, *tensors)


def _needs_grad(t: torch.Tensor) -> bool:
    """``t.requires_grad``, seen through vmap: a batched tensor says False while the tensor it wraps
    requires grad (an ensemble's stacked weights)."""
    if t.requires_grad:
        return True
    if torch.compiler.is_compiling():  # under a transform (vmap) keep what the backward needs; grad mode decides
        return _compiled_transform() is not None
    f = torch._C._functorch
    while f.is_batchedtensor(t) or f.is_functorch_wrapped_tensor(t):
        t = f.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def autocast_off(t: torch.Tensor):
    """A context that turns autocast off on ``t``'s device where it is on (else a no-op).

    The stack computes in its inputs' dtype (float32 or float64) on both backends: the fused kernels have
    no low-precision path, and the reference must not drop to bfloat16 under autocast where they do not.
    """
    dev = t.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return contextlib.nullcontext()
    return torch.autocast(dev, enabled=False) if on else contextlib.nullcontext()


def residual_stack(
    x: torch.Tensor,  # [B, d]
    weights: torch.Tensor,  # [R, n, d, d]
    shortcut: bool = True,
    act_pre: str = "identity",
    act_mid: str = "identity",
    act_post: str = "identity",
    backend: str | None = None,
    recompute: bool | None = None,
) -> torch.Tensor:  # [B, d]
    """Run a residual stack of ``R`` units with ``n`` layers each (see ``reference``).

    Args:
        x: ``[B, d]`` float32 or float64 inputs, one row per sample; any strides.
        weights: ``[R, n, d, d]`` branch weights (units x layers x out x in), same dtype and device.
        shortcut: identity shortcut around each unit; ``False`` gives a plain stack.
        act_pre, act_mid, act_post: one of ``identity | relu | tanh | ssigmoid`` at each position.
        backend: ``"fused"`` (C++/CUDA kernels), ``"torch"`` (reference) or ``None`` (fused if built).
        recompute: what the fused forward keeps for the backward.  ``True``: the input of every
            unit (``R*B*d`` elements), and the backward recomputes each unit's inner layers (one
            more forward's worth of GEMMs).  ``False``: the input of every layer (``R*n*B*d``),
            nothing recomputed (CPU; the CUDA backward always recomputes, on chip).  ``None``
            (default): ``False`` on CPU while the layer inputs take at most
            ``SHORTCUT_EXT_SAVE_LAYERS_MB`` (default 1024) MB, else ``True``.  Measured at R = 1000,
            B = 256, 2 threads, forward+backward through autograd: saving every layer's input is
            7% / 18% / 19% faster at d = 16 / 64 / 128.

    Returns:
        ``[B, d]`` outputs.  Differentiable once w.r.t. ``x`` and ``weights`` through the fused
        backward; for second derivatives use :func:`residual_stack_hvp`.  Computed in the inputs'
        dtype on both backends: an autocast region around the call does not lower it.

    >>> import torch
    >>> x = torch.ones(3, 2, dtype=torch.float64)
    >>> residual_stack(x, torch.zeros(5, 2, 2, 2, dtype=torch.float64), backend="torch").equal(x)
    True
    """
    for arg, name in (("act_pre", act_pre), ("act_mid", act_mid), ("act_post", act_post)):
        check_activation(arg, name)
    check_stack_args(x, weights)
    shortcut = check_shortcut(shortcut)
    if recompute is not None and not isinstance(recompute, bool):
        raise TypeError(f"recompute must be True, False or None, got {recompute!r}")
    if check_backend(backend) == "torch":
        with autocast_off(x):
            return reference.residual_stack_forward(x, weights, shortcut, act_pre, act_mid, act_post)
    _check_dense(x=x, weights=weights)
    _refuse_forward_mode(x, weights)
    if torch.jit.is_tracing():
        raise NotImplementedError(
            "torch.jit.trace of the fused residual stack is not supported (what the forward keeps for the "
            "backward depends on grad mode, which a trace would fix): use torch.compile or torch.export, or "
            "backend='torch'")
    # torch.export fixes this choice in the graph: an exported program (grad mode on) saves for a backward
    # whatever its example inputs required (frozen weights, an input gradient taken later)
    save = torch.is_grad_enabled() and (_needs_grad(x) or _needs_grad(weights) or _is_exporting())
    layers = _save_layers(x, weights, recompute) and save
    y, _ = torch.ops.shortcut_ext.residual_stack_forward(
        x.contiguous(), weights.contiguous(), shortcut, act_pre, act_mid, act_post, save, layers
    )
    return y


def empty_cache() -> None:
    """Frees the CPU output buffers the fused ops keep for reuse (see ``cache_stats``).

    Large outputs of the CPU kernels (saved activations, weight gradients, HVPs) come from a cache so
    that a training loop does not pay fresh page faults every step; like PyTorch's CUDA caching
    allocator it keeps freed buffers, up to ``SHORTCUT_EXT_CPU_CACHE_MB`` (default 2048; 0 disables
    it).  Buffers still in use are freed when their tensors die.
    """
    require_built("empty_cache()")
    _C.cpu_empty_cache()


def release_cache() -> None:
    """:func:`empty_cache` where the kernels are built (else nothing to free): between phases whose outputs
    have other sizes, whose buffers the cache could not reuse but would keep."""
    if _C is not None:
        empty_cache()


def cache_stats() -> dict:
    """The CPU output-buffer cache: ``cached_bytes`` / ``cached_blocks`` (free, kept for reuse),
    ``in_use_bytes`` / ``in_use_blocks``, ``hits``, ``misses`` and ``limit_bytes``."""
    require_built("cache_stats()")
    return dict(_C.cpu_cache_stats())


_TF32_MODES = ("off", "tf32", "3xtf32")


def _tf32_mode(mode, where: str) -> str:
    if mode is True or mode is False:
        return "tf32" if mode else "off"
    if isinstance(mode, str) and mode in _TF32_MODES:
        return mode
    raise ValueError(f"{where}: mode must be True, False, 'tf32', '3xtf32' or 'off', got {mode!r}")


class cuda_tf32:
    """Runs float32 products of the CUDA residual-stack kernels on TF32 tensor cores.

    Off by default: float32 stays float32 FMA (relative error ~1e-7 per product), and neither
    ``torch.backends.cuda.matmul.allow_tf32`` nor ``torch.set_float32_matmul_precision`` changes that,
    so curvature measurements never lose precision silently.  The fused forward and backward kernels
    (d <= 128, sm_80 or newer) then run every product on ``mma.sync`` tensor cores:

    * ``"tf32"`` (or ``True``): inputs rounded to TF32 (10 mantissa bits), float32 accumulation:
      relative error ~1e-3 per product, the highest throughput;
    * ``"3xtf32"``: each input split into two TF32 parts and three products (the small x small one
      dropped, ~2^-22): float32 accuracy, from tensor cores.

    Activations, the residual stream, the saved unit inputs and the weight-gradient sums stay float32;
    float64, the CPU kernels, the generic CUDA path (d > 128) and ``residual_stack_hvp`` are
    unaffected.  The setting is process-wide (the backward runs on autograd's own threads) and is read
    when each kernel is launched, so a captured CUDA graph keeps the setting of its capture.

    Usage: ``with shortcut_ext.cuda_tf32(): loss = ...; loss.backward()``;
    ``with shortcut_ext.cuda_tf32("3xtf32"): ...``; ``with shortcut_ext.cuda_tf32(False): ...`` inside
    an enabled region turns it off for that block.  Blocks open in several threads at once: the newest
    one's mode holds for the whole process, and when the last has exited the mode from before the first
    is back, in whatever order they exit.  A bare ``cuda_tf32(mode)`` outside a ``with`` changes
    nothing: ``cuda_tf32.set(mode)`` is the bare switch (it returns the previous mode), and
    ``cuda_tf32.current()`` the mode now (``"off"``, ``"tf32"`` or ``"3xtf32"``).
    """

    # the blocks open now, oldest first, across threads, each with the mode it found on entry.  The newest
    # block's exit puts back the mode it found (a set() inside an outer block included), as a stack does;
    # an older block exiting first (another thread's) changes nothing now and hands the mode it found to
    # the block after it.  Each block used to put back the mode it found whatever the order, so that A
    # enters, B enters, A exits, B exits left A's mode on after both.
    _lock = threading.Lock()
    _open: list = []  # [token, mode found on entry]

    def __init__(self, mode: bool | str = True):
        self.mode = _tf32_mode(mode, "cuda_tf32")
        self._tokens: list[object] = []

    def __enter__(self):
        token = object()
        with cuda_tf32._lock:
            cuda_tf32._open.append([token, cuda_tf32.set(self.mode)])
        self._tokens.append(token)
        return self

    def __exit__(self, *exc):
        with cuda_tf32._lock:
            token = self._tokens.pop()
            opened = cuda_tf32._open
            i = next(j for j, e in enumerate(opened) if e[0] is token)
            found = opened.pop(i)[1]
            if i == len(opened):  # the newest block: back to what it found
                cuda_tf32.set(found)
            else:  # a newer block holds the mode; it will put back what this one found
                opened[i][1] = found
        return False

    @staticmethod
    def set(mode: bool | str) -> str:
        """Sets the mode of every later launch; returns the previous one."""
        mode = _tf32_mode(mode, "cuda_tf32.set")
        require_built("cuda_tf32")
        return _TF32_MODES[_C.set_cuda_tf32_mode(_TF32_MODES.index(mode))]

    @staticmethod
    def current() -> str:
        """The mode now: ``"off"``, ``"tf32"`` or ``"3xtf32"``."""
        require_built("cuda_tf32")
        return _TF32_MODES[_C.cuda_tf32_mode()]


def _is_exporting() -> bool:
    """``torch.compiler.is_exporting()`` where this torch has it (2.7 and later); False on torch 2.6."""
    f = getattr(torch.compiler, "is_exporting", None)
    return bool(f()) if f is not None else False


def _save_layers(x: torch.Tensor, weights: torch.Tensor, recompute: bool | None) -> bool:
    """Whether the fused forward saves every layer's input (see ``residual_stack``'s ``recompute``)."""
    if recompute is not None:
        return not recompute
    if x.device.type != "cpu" or _is_exporting():  # export: no guard on a symbolic batch size
        return False
    env = os.environ.get("SHORTCUT_EXT_SAVE_LAYERS_MB", "1024")
    try:
        budget_mb = float(env)
    except ValueError:
        budget_mb = float("nan")
    if not budget_mb >= 0:
        raise ValueError(f"SHORTCUT_EXT_SAVE_LAYERS_MB must be a number of megabytes >= 0, got {env!r}")
    R, n = weights.shape[0], weights.shape[1]
    return R * n * x.shape[0] * x.shape[1] * x.element_size() <= budget_mb * 2**20


def residual_stack_hvp(
    x: torch.Tensor,  # [B, d]
    weights: torch.Tensor,  # [R, n, d, d]
    targets: torch.Tensor,  # [B, d], or [B] class indices with loss="cross_entropy"
    directions: torch.Tensor,  # [k, R, n, d, d]
    shortcut: bool = True,
    act_pre: str = "identity",
    act_mid: str = "identity",
    act_post: str = "identity",
    loss: str = "mse",
    backend: str | None = None,
    readout: torch.Tensor | None = None,  # [q, d]
    matrix: str = "hessian",
):
    """Loss, gradient ``[R, n, d, d]`` and ``k`` Hessian-vector products ``[k, R, n, d, d]``.

    The Hessian is that of ``loss(residual_stack(x, weights), targets)`` w.r.t. ``weights``.
    ``backend="fused"`` uses the fused R-operator kernel where it is built, else the reference.

    ``readout``: a frozen linear read-out ``P [q, d]`` (a classifier's last layer, say): the loss is then
    that of ``residual_stack(x, weights) @ P.T``, with targets ``[B, q]`` or class indices in ``[0, q)``.
    ``P`` is a constant (no gradient or product for it).  The fused kernels take it on both backends.

    ``matrix``: the products with the Hessian (``"hessian"``) or with one of its two parts ``H = G + F``:
    ``"ggn"``, the generalised Gauss-Newton matrix ``G = J^T H_l J`` (``J`` the Jacobian of the outputs after
    ``readout``, ``H_l`` the loss's Hessian in them: ``I / m`` for mse, ``c_i (diag(p_i) - p_i p_i^T) / m`` for
    cross-entropy with ``p_i`` the softmax and ``c_i`` the mass of sample i's target row, 1 for class indices),
    or ``"functional"``, ``F = H - G`` (the net's second derivatives weighted by the residual ``dl/dz``); or
    ``"empirical_fisher"``, ``(1/m) sum_i grad l_i grad l_i^T`` (the per-sample gradients' outer products: ``G``
    with ``H_l`` replaced by ``e_i e_i^T``, ``e_i = dl_i/dz``; for mse and cross-entropy the true Fisher is
    ``G``).  The loss and gradient are the loss's either way.  The fused kernels (CPU and CUDA) compute any of them
    in one call: ``G`` without the net's second derivatives (no tangent recompute in the reverse pass: on the
    CPU about ``4 + 4k`` small GEMMs a layer against ``4 + 8k``), ``F`` with the output's tangent seed
    ``H_l J v`` set to zero (an ``H`` product's cost), the empirical Fisher as ``G`` with another output seed.
    ``backend="torch"``: ``G`` (and the empirical Fisher) by ``torch.func.jvp`` of the outputs and one ``vjp``
    per direction, ``F`` as the double-backward ``H`` less that.

    The outputs are values, detached from the inputs (they never require grad): a loss built on them
    (``L + penalty``, ``v^T H v`` as a sharpness term) gets no gradient through them from autograd, and
    ``torch.func.grad`` / ``jvp`` and forward-mode AD through this function raise.  ``torch.func.vmap``
    over it runs the fused kernel once per slice (``backend="torch"`` cannot run under vmap).
    """
    if not isinstance(matrix, str) or matrix not in MATRICES:
        raise ValueError(f"matrix must be one of {', '.join(MATRICES)}, got {matrix!r}")
    for arg, name in (("act_pre", act_pre), ("act_mid", act_mid), ("act_post", act_post)):
        check_activation(arg, name)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    check_stack_args(x, weights)
    shortcut = check_shortcut(shortcut)
    if not isinstance(directions, torch.Tensor) or directions.dim() != 5 or tuple(directions.shape[1:]) != tuple(weights.shape):
        got = list(directions.shape) if isinstance(directions, torch.Tensor) else type(directions).__name__
        raise ValueError(f"directions must have shape [k, {', '.join(map(str, weights.shape))}], got {got}")
    if directions.shape[0] < 1:
        raise ValueError(f"directions must hold k >= 1 directions (shape [k, R, n, d, d]), got {list(directions.shape)}")
    if directions.dtype != weights.dtype:
        raise TypeError(f"directions must have dtype {_dtype(weights)} like weights, got {_dtype(directions)}")
    if directions.device != weights.device:
        raise ValueError(f"directions must be on {weights.device} like weights, got {directions.device}")
    backend = check_backend(backend)
    if readout is not None:
        check_readout(x, readout)
    if backend == "fused":
        _check_dense(x=x, weights=weights, targets=targets, directions=directions,
                     **({} if readout is None else {"readout": readout}))
    targets = check_hvp_targets(x, targets, loss, q=None if readout is None else readout.shape[0])
    _refuse_transforms(_HVP_NOT_DIFFERENTIABLE, x, weights, targets, directions,
                       *(() if readout is None else (readout,)))
    # the products are values, not functions of the inputs to differentiate further: detached outputs
    # (they do not require grad, like .item()'s), and the torch.func transforms are refused above
    x, weights, targets, directions = x.detach(), weights.detach(), targets.detach(), directions.detach()
    if readout is not None:
        readout = readout.detach()
    lib = torch.ops.shortcut_ext
    if backend == "fused" and hasattr(lib, "residual_stack_hvp"):
        args = (x.contiguous(), weights.contiguous(), targets.contiguous(), directions.contiguous(),
                shortcut, act_pre, act_mid, act_post, loss)
        P = None if readout is None else readout.contiguous()
        if matrix == "hessian":
            return lib.residual_stack_hvp(*args, P)
        return lib.residual_stack_hvp_part(*args, matrix, P)
    stack = () if torch.compiler.is_compiling() else (torch._C._functorch.get_interpreter_stack() or ())
    if stack:
        names = ", ".join(i.key().name.lower() for i in stack)
        raise NotImplementedError(
            f"residual_stack_hvp(backend='torch') runs autograd inside, which cannot run under a torch.func "
            f"transform (here: {names}); use backend='fused' (built here: "
            + str(hasattr(lib, "residual_stack_hvp")) + "), or batch the directions [k, ...] in one call")
    with autocast_off(x):
        return reference.residual_stack_hvp(x, weights, targets, directions, shortcut, act_pre, act_mid, act_post,
                                            loss, readout, matrix)


def prediction_targets(outputs: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    """Targets at which the loss's residual at ``outputs [B, q]`` is zero and its Hessian in the outputs is that
    of ``targets``: the Hessian there is the Gauss-Newton matrix.  mse: the outputs; cross-entropy: ``c_i
    softmax(outputs_i)`` as probabilities, ``c_i`` the mass of sample i's target row (1 for class indices),
    since the loss's Hessian in the outputs is ``c_i (diag(p) - p p^T)``."""
    if loss == "mse":
        return outputs
    p = torch.softmax(outputs, dim=1)
    return p if targets.dim() == 1 else p * targets.to(p.dtype).sum(dim=1, keepdim=True)


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - older torch
        return False
    return bool(is_fake(t))


def check_readout(x: torch.Tensor, readout) -> None:
    """Checks a read-out ``P [q, d]`` for ``residual_stack_hvp`` (both backends give the same errors)."""
    d = x.shape[1]
    if not isinstance(readout, torch.Tensor):
        raise TypeError(f"readout must be a torch.Tensor [q, d] = [q, {d}] or None, got {type(readout).__name__}")
    if readout.dim() != 2 or readout.shape[1] != d or readout.shape[0] < 1:
        raise ValueError(f"readout must have shape [q, d] = [q, {d}] with q >= 1 (it maps the stack's output to "
                         f"the loss's q columns), got {list(readout.shape)}")
    if readout.dtype != x.dtype:
        raise TypeError(f"readout must have dtype {_dtype(x)} like x, got {_dtype(readout)}")
    if readout.device != x.device:
        raise ValueError(f"readout must be on {x.device} like x, got {readout.device}")


def check_hvp_targets(x: torch.Tensor, targets, loss: str, q: int | None = None) -> torch.Tensor:
    """Checks ``targets`` for ``loss`` (both backends give the same errors); class indices of any integer
    dtype become int64.  ``q``: the loss's columns where a read-out ``[q, d]`` precedes it (else ``d``)."""
    B, d = x.shape
    w, width = ("d", d) if q is None else ("q", q)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor ([B, {w}], or class indices [B] for loss='cross_entropy'), "
                        f"got {type(targets).__name__}")
    if targets.device != x.device:
        raise ValueError(f"targets must be on {x.device} like x, got {targets.device}")
    if targets.dim() == 1 and targets.layout != torch.strided:
        raise ValueError(f"class-index targets must be a dense (strided) tensor, got layout {targets.layout} "
                         "(call .to_dense())")
    if targets.dim() == 1:
        if loss != "cross_entropy":
            raise ValueError(f"targets must have shape [B, {w}] = [{B}, {width}] for loss='mse', got "
                             f"{list(targets.shape)} (class indices [B] need loss='cross_entropy')")
        if targets.shape[0] != B:
            raise ValueError(f"targets must have shape [B] = [{B}] (class indices), got {list(targets.shape)}")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise TypeError(f"class-index targets [B] must be integers, got {_dtype(targets)}")
        # (the kernels check the range too; under torch.compile a data-dependent check would break the graph)
        if (B and targets.device.type != "meta" and not torch.compiler.is_compiling()
                and not torch._C._functorch.is_functorch_wrapped_tensor(targets)  # vmap: the kernels check
                and not _is_fake(targets)):  # FakeTensorMode: no values to check
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 0 or hi >= width:
                raise ValueError(f"class-index targets must lie in [0, {w}) = [0, {width}), got values in [{lo}, {hi}]")
        return targets.long()
    if targets.dim() != 2 or tuple(targets.shape) != (B, width):
        what = f"probabilities [B, {w}]" if loss == "cross_entropy" else f"[B, {w}]"
        raise ValueError(f"targets must have shape {what} = [{B}, {width}]"
                         + (" or class indices [B]" if loss == "cross_entropy" else "") + f", got {list(targets.shape)}")
    if targets.dtype != x.dtype:
        raise TypeError(f"targets [B, {w}] must have dtype {_dtype(x)} like x, got {_dtype(targets)}")
    return targets


# --------------------------------------------------------------------------- autograd / fake kernels
def _setup_forward(ctx, inputs, output):
    x, weights, shortcut, act_pre, act_mid, act_post, save = inputs[:7]
    y, saved = output
    ctx.save_for_backward(weights, saved)
    # x itself only as a graph dependency of grad_x (see _NoDoubleBackward): a plain reference, with no
    # version check, so an in-place change of x after the forward is no error where it was none before
    ctx.x = x if isinstance(x, torch.Tensor) and x.requires_grad else None
    ctx.args = (shortcut, act_pre, act_mid, act_post)
    ctx.saved_inputs = bool(save)
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(saved)
    # without this autograd hands the backward a zero-filled [R, B, d] gradient for `saved`
    # (tens of MB allocated and written per call, for nothing)
    ctx.set_materialize_grads(False)


def _backward_forward(ctx, grad_y, grad_saved):
    weights, saved = ctx.saved_tensors
    if grad_y is None:  # y took no part in the loss
        return (None,) * ctx.num_inputs
    if not ctx.saved_inputs:
        raise RuntimeError(
            "residual_stack_forward was called with save_inputs=False, so it kept nothing for the "
            "backward; call it with save_inputs=True (shortcut_ext.residual_stack does this when grad is needed; "
            "a program exported under torch.no_grad() has it fixed to False: export with grad enabled to "
            "differentiate it)"
        )
    # frozen weights (requires_grad=False: input gradients, a frozen stack under a trained head): the kernel
    # skips the weight-gradient products, about half the backward's arithmetic
    want_w = ctx.needs_input_grad[1]
    grad_x, grad_w = torch.ops.shortcut_ext.residual_stack_backward(
        grad_y.contiguous(), weights, saved, *ctx.args, want_w
    )
    if not want_w:
        grad_w = None
    x = ctx.x
    if x is not None and torch.is_grad_enabled() and grad_x is not None:
        # create_graph=True: grad_x depends on x through the saved unit inputs, which the graph does not
        # see (they are non-differentiable outputs); without this a second derivative through x (an input
        # Hessian, a Jacobian penalty) would silently come out as zero instead of raising
        grad_x = _NoDoubleBackward.apply(grad_x, x)
    if x is not None and torch.is_grad_enabled() and grad_w is not None:
        # the same for grad_w, a function of x through the saved inputs alone: d(grad_w)/dx (the input
        # derivative of J_w^T v, a linear read-out's weight gradient) must raise, not come out as zero
        grad_w = _NoDoubleBackward.apply(grad_w, x)
    return (grad_x, grad_w) + (None,) * (ctx.num_inputs - 2)


_DOUBLE_BACKWARD = (
    "double backward through the fused residual stack is not supported: for Hessian-vector "
    "products use shortcut_ext.residual_stack_hvp or "
    "shortcut_ext.curvature.HessianOperator(backend='fused'), or pass backend='torch'"
)


def _backward_backward(ctx, *grads):
    raise RuntimeError(_DOUBLE_BACKWARD)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on ``g`` that links it to ``deps`` in the graph, and whose backward raises: the
    second-order paths the fused backward cannot differentiate end in an error, not in a zero."""

    @staticmethod
    def forward(ctx, g, *deps):
        return g.view_as(g)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_DOUBLE_BACKWARD)


def _setup_backward(ctx, inputs, output):
    pass


def _same_device(op: str, **tensors) -> None:
    """The fake (meta) kernels' device check: a meta tensor among real ones dispatches to them, and
    they must not hand back uninitialised tensors where the real kernel would have refused."""
    (first, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{op}: {name} must be on {t0.device} like {first}, got {t.device}")


def _register() -> None:
    lib = torch.ops.shortcut_ext

    @torch.library.register_fake(f"{_LIB}::residual_stack_forward")
    def _(x, weights, shortcut, act_pre, act_mid, act_post, save_inputs, save_layers=False):
        _same_device("residual_stack_forward", x=x, weights=weights)
        R, n = weights.shape[0], weights.shape[1]
        B, d = x.shape
        if not save_inputs:
            saved = x.new_empty((0,))
        elif x.device.type == "cpu" and d >= _C.cpu_saved_feature_major_from(x.dtype == torch.float64):
            # stored feature-major (a guard on a symbolic width, not a constant: an export with a dynamic width
            # stays dynamic)
            if save_layers:
                saved = x.new_empty_strided((R, n, B, d), (n * d * B, d * B, 1, B))
            else:
                saved = x.new_empty_strided((R, B, d), (B * d, 1, B))
        elif save_layers and x.device.type != "cuda":
            saved = x.new_empty((R, n, B, d))
        else:
            saved = x.new_empty((R, B, d))
        return x.new_empty(x.shape), saved

    @torch.library.register_fake(f"{_LIB}::residual_stack_backward")
    def _(grad_y, weights, saved, shortcut, act_pre, act_mid, act_post, grad_weights=True):
        _same_device("residual_stack_backward", grad_y=grad_y, weights=weights, saved=saved)
        return grad_y.new_empty(grad_y.shape), weights.new_empty(weights.shape if grad_weights else (0,))

    if hasattr(lib, "residual_stack_hvp"):

        @torch.library.register_fake(f"{_LIB}::residual_stack_hvp")
        def _(x, weights, targets, directions, shortcut, act_pre, act_mid, act_post, loss, readout=None):
            _same_device("residual_stack_hvp", x=x, weights=weights, targets=targets, directions=directions,
                         **({} if readout is None else {"readout": readout}))
            return x.new_empty(()), weights.new_empty(weights.shape), directions.new_empty(directions.shape)

    if hasattr(lib, "residual_stack_hvp_part"):

        @torch.library.register_fake(f"{_LIB}::residual_stack_hvp_part")
        def _(x, weights, targets, directions, shortcut, act_pre, act_mid, act_post, loss, matrix, readout=None):
            _same_device("residual_stack_hvp_part", x=x, weights=weights, targets=targets, directions=directions,
                         **({} if readout is None else {"readout": readout}))
            return x.new_empty(()), weights.new_empty(weights.shape), directions.new_empty(directions.shape)

    torch.library.register_autograd(f"{_LIB}::residual_stack_forward", _backward_forward, setup_context=_setup_forward)
    torch.library.register_autograd(f"{_LIB}::residual_stack_backward", _backward_backward, setup_context=_setup_backward)
    del lib


if _C is not None:
    _register()

__all__ = [
    "ACTIVATIONS", "BACKENDS", "BUILD_HINT", "cache_stats", "default_backend", "empty_cache", "residual_stack",
    "residual_stack_hvp",
]
