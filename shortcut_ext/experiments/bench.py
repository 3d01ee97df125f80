"""``shortcut-ext bench``: the fused kernels against pure PyTorch on this machine, in one command.

    shortcut-ext bench                                        # 2-shortcut ReLU, R = 1000, d = 64, B = 256
    shortcut-ext bench --units 2000 --width 16 --ops hvp --directions 16 --out bench.json
    shortcut-ext bench --device cuda --batch 65536 --ops forward forward+backward --compile   # a GPU

For one residual stack (``--shortcut`` layers per unit, ``--units`` units, width ``--width``, ``--batch``
rows) it times, in this process and on the same inputs:

- ``forward``: the fused forward against the pure-PyTorch reference (``backend="torch"``), no grad;
- ``forward+backward``: the output and the gradients of ``sum(y^2)`` w.r.t. the input and the weights,
  through autograd (the fused backward against autograd's); on the CPU also the fused op with
  ``recompute=True`` (it keeps unit inputs only);
- ``input-gradient``: the output and the gradient of ``sum(y^2)`` w.r.t. the input only, the weights frozen
  (``requires_grad=False``: input-output Jacobians, saliency, a frozen random stack): the fused backward then
  skips the weight gradients; on the CPU also with ``recompute=True``;
- ``hvp``: loss, gradient and Hessian-vector products of the ``--loss`` of the stack's output against
  random targets: :func:`shortcut_ext.residual_stack_hvp` with one and with ``--directions`` directions,
  against the reference (double backward: one graph, then one ``grad`` call per direction).

``--compile`` adds ``torch.compile`` of the reference (forward, forward+backward, input-gradient; its cold compile
time is reported apart).  Before it is timed, every variant is checked against the reference on the same
inputs: a variant that gives a wrong answer is marked FAILED and the command exits with status 1.  The
error of each output is ``||o - r|| / ||r||``; it must stay within 16 times the reference's own rounding
noise for this problem, measured as how far the reference moves when its input and weights move by up to
one unit in the last place of the variant's arithmetic (2^-23 relative in float32 and 3xTF32, 2^-10 in TF32,
2^-52 in float64; the largest of 3 draws), and at least ``max(1e-6, eps sqrt(B))`` (float64 1e-13): the
reference's own sums over B rows round by about that much, which no perturbation shows.  The noise is what
rounding does on this problem: ~1e-7 on a residual stack's outputs, more on a deep plain net, and up to
1e-2 or more for the gradients of deep ReLU nets, where an activation within rounding of 0 switches a
sample's gradient on or off (two correct float32 implementations differ there by that much).  A bound
above 1e-2 checks little: such a row says ``loose`` (not ``ok``) and the command warns.  TF32 applies to the
fused stack at d <= 128 only (tensor-core tiles); HVPs always run in float32 and are checked as such.
``error_ratio`` is the largest error over its bound (<= 1 passes).

Times are medians over ``--repeats`` calls after one warm-up call (the interquartile range and the
fastest call too), with ``torch.cuda.synchronize`` around each call on a GPU.  ``speedup`` is the
reference's median over the variant's, per Hessian-vector product for ``hvp`` (the reference with one
direction is the baseline).  GFLOP/s count ``2 B R n d^2`` for a forward and three times that for a
forward+backward (the multiply-adds of the data and the weight gradients), twice that for an
``input-gradient`` (the data gradient's only), ``3 + 6k`` times it for an ``hvp``
call with k directions (the gradient's three products and six per direction: tangent forward, tangent backward
and the Hessian's weight term; recomputation not counted), and are set against the rate of one large square
matmul measured in the same run.  On a GPU each variant's peak memory is reported too
(``peak_mib``: the most torch allocated during its calls, above what was allocated before them).

Times depend on what else runs: run it on a quiet machine (two processes timing on the same cores wreck
each other's figures).  ``--out FILE.json`` writes the environment, the options and the rows (strict JSON)
and a CSV beside it, rewritten after every row, so that an interrupted run keeps what it measured
(``"complete": false``); a rerun measures everything again, since times from two processes do not compare.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from .._cli_args import activation_positions_error, add_activation_args, device_memory, nonneg_int, out_file, positive_int
from .._device import parse_device

CMD = "shortcut-ext bench"
OPS = ("forward", "forward+backward", "input-gradient", "hvp")
FLOPS = {"forward": 1, "forward+backward": 3, "input-gradient": 2}  # stack products per call
GEMM_SIZE = {"cpu": 4096, "cuda": 8192}  # the large matmul's n, float32
COLUMNS = ("op", "impl", "k", "median_ms", "q1_ms", "q3_ms", "min_ms", "per_product_ms", "speedup", "gflops",
           "fraction_of_gemm", "max_rel_err", "noise", "perturbation", "error_ratio", "check", "peak_mib", "compile_s",
           "repeats")
CHECK_FACTOR = 16  # a variant's error may be this many times the reference's rounding noise
CHECK_DRAWS = 3  # perturbed reference runs; the noise is their largest
LOOSE = 1e-2  # a bound above this checks little: the row says "loose"


def add_parser(subparsers) -> None:
    from ..reference import LOSSES

    p = subparsers.add_parser("bench", help="time the fused kernels against pure PyTorch (and torch.compile) on "
                                            "this machine; checks every answer first",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("network")
    g.add_argument("--shortcut", type=nonneg_int, default=2,
                   help="layers per residual unit n (0: a plain net of depth --units; default 2)")
    g.add_argument("--units", type=positive_int, default=1000, help="residual units R (plain net: depth; default 1000)")
    g.add_argument("--width", type=positive_int, default=64, help="width d (default 64)")
    g.add_argument("--batch", type=positive_int, default=256, help="rows B of the input (default 256)")
    add_activation_args(g, mid=None, mid_help="; default relu, identity with --shortcut 1")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g = p.add_argument_group("what to time")
    g.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="default: all four")
    g.add_argument("--directions", type=positive_int, default=None,
                   help="k of the batched Hessian-vector products (--ops hvp; default 16; k = 1 is always timed)")
    g.add_argument("--loss", choices=LOSSES, default="mse", help="the loss of --ops hvp (default mse)")
    g.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the reference (its cold compile takes minutes at 1000 units)")
    g.add_argument("--repeats", type=positive_int, default=5, help="timed calls per variant (default 5)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch's CPU threads (default: torch's choice)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--tf32", choices=("tf32", "3xtf32"), default=None,
                   help="float32 on cuda: the fused kernels on tensor cores (shortcut_ext.cuda_tf32); the reference "
                        "stays float32 (torch's own TF32 switches are left as they are)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seeds the inputs, weights, targets and directions")
    g.add_argument("--out", default=None, help="a .json file for the results (a .csv goes beside it)")
    p.set_defaults(func=main)


# ----------------------------------------------------------------------------------------------- problem

class Problem:
    """The inputs every variant shares, drawn on the CPU in float64 (the same numbers on every device) and
    placed on ``device`` in ``dtype``."""

    def __init__(self, args, device: str, dtype: torch.dtype):
        from ..models import init_weights

        _default_mid(args)
        self.shortcut = args.shortcut > 0
        n, R = (args.shortcut, args.units) if self.shortcut else (args.units, 1)
        d, B = args.width, args.batch
        self.acts = (args.pre, args.mid, args.post)
        g = torch.Generator().manual_seed(args.seed)
        place = dict(dtype=dtype, device=device)
        self.x = torch.randn(B, d, generator=g, dtype=torch.float64).to(**place)
        # residual nets: Xavier scaled so that the R branches add up to O(1); a plain net: orthogonal layers times
        # the activation's gain (relu sqrt(2), ssigmoid 2: slope 1/2 at 0), so that a signal neither vanishes nor
        # underflows over thousands of layers (a reference of zeros would check nothing, and denormals are slow)
        if self.shortcut:
            w = init_weights((R, n, d, d), "xavier", seed=args.seed, dtype=torch.float64) / math.sqrt(R)
        else:
            gain = {"relu": math.sqrt(2.0), "ssigmoid": 2.0}.get(args.mid, 1.0)
            w = init_weights((R, n, d, d), "orthogonal", seed=args.seed, dtype=torch.float64) * gain
        self.w = w.to(**place)
        if args.loss == "cross_entropy":
            self.targets = torch.randint(0, d, (B,), generator=g).to(device)
        else:
            self.targets = torch.randn(B, d, generator=g, dtype=torch.float64).to(**place)
        k = _directions(args) if "hvp" in args.ops else 0
        self.directions = torch.randn((k, R, n, d, d), generator=g, dtype=torch.float64).to(**place)
        self.loss = args.loss
        self.stack_flops = 2.0 * B * R * n * d * d  # one forward's multiply-adds, times 2

    def hvp_flops(self, k: int) -> float:
        """The products of one call for the loss, the gradient and ``k`` HVPs: the forward and the backward's two
        (data and weight gradients), and six per direction (tangent forward ``R{a} W^T + a V^T``, tangent backward
        ``R{g} W + g V``, the Hessian's weight term ``R{g}^T a + g^T R{a}``).  Recomputation is not counted."""
        return self.stack_flops * (3 + 6 * k)

    def perturbed(self, eps: float, generator: torch.Generator) -> "Problem":
        """This problem with the input and the weights each moved to ``t + t * eps * u``, ``u`` uniform in
        [-1, 1] (drawn and added in float64 on the CPU, rounded once to the dtype): up to one unit in the last
        place at relative precision ``eps``, in either direction."""
        other = object.__new__(Problem)
        other.__dict__.update(self.__dict__)

        def jiggle(t):
            u = 2 * torch.rand(t.shape, generator=generator, dtype=torch.float64) - 1
            t64 = t.double().cpu()
            return (t64 + t64 * (eps * u)).to(dtype=t.dtype, device=t.device)
        other.x, other.w = jiggle(self.x), jiggle(self.w)
        return other

    def forward(self, backend: str, recompute=None, fn=None):
        from ..ops import residual_stack

        sc, (pre, mid, post) = self.shortcut, self.acts
        if fn is None:
            fn = lambda x, w: residual_stack(x, w, sc, pre, mid, post, backend=backend, recompute=recompute)  # noqa: E731

        def run():
            with torch.no_grad():
                return (fn(self.x, self.w),)
        return run

    def forward_backward(self, backend: str, recompute=None, fn=None, frozen=False):
        """Output and gradients of ``sum(y^2)``: w.r.t. the input and the weights, or with ``frozen`` w.r.t. the
        input only (the weights do not require grad)."""
        from ..ops import residual_stack

        sc, (pre, mid, post) = self.shortcut, self.acts
        if fn is None:
            fn = lambda x, w: residual_stack(x, w, sc, pre, mid, post, backend=backend, recompute=recompute)  # noqa: E731
        x, w = self.x.clone().requires_grad_(True), self.w.clone().requires_grad_(not frozen)
        wrt = (x,) if frozen else (x, w)

        def run():
            y = fn(x, w)
            return (y.detach(), *torch.autograd.grad(y.square().sum(), wrt))
        return run

    def input_gradient(self, backend: str, recompute=None, fn=None):
        return self.forward_backward(backend, recompute, fn, frozen=True)

    def hvp(self, backend: str, k: int):
        from ..ops import residual_stack_hvp

        sc, (pre, mid, post) = self.shortcut, self.acts
        D = self.directions[:k].contiguous()
        return lambda: residual_stack_hvp(self.x, self.w, self.targets, D, sc, pre, mid, post, loss=self.loss,
                                          backend=backend)

    def compiled(self):
        """The reference forward under ``torch.compile`` (a static graph for this problem)."""
        from .. import reference

        sc, (pre, mid, post) = self.shortcut, self.acts
        # inductor walks a 1000-unit backward graph recursively (RecursionError at Python's default limit)
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 20 * self.w.shape[0] * self.w.shape[1] + 10000))
        torch._dynamo.reset()
        return torch.compile(lambda x, w: reference.residual_stack_forward(x, w, sc, pre, mid, post), dynamic=False)


# ------------------------------------------------------------------------------------------------ timing

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_calls(fn, repeats: int, device: str) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` (after the warm-up the caller made), each synchronised."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def gemm_rate(device: str, dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of one large square ``torch.matmul`` (the median of ``repeats``): the best case of dense GEMM
    here (4096 on a CPU, 8192 on a GPU; half in float64).  The fused kernels' small GEMMs, whose operands stay
    in cache, can run faster than it on a CPU."""
    n = GEMM_SIZE["cuda" if device.startswith("cuda") else "cpu"]
    if dtype == torch.float64:
        n //= 2
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype=dtype, device=device)
    b = torch.randn(n, n, generator=g).to(dtype=dtype, device=device)
    fn = lambda: torch.matmul(a, b)  # noqa: E731
    fn()
    return 2.0 * n ** 3 / statistics.median(time_calls(fn, repeats, device)) / 1e9


def rel_errors(outs, refs) -> list[float]:
    """``||o - r|| / ||r||`` for each output (the absolute norm where the reference is 0); inf for a shape
    that differs, nan where the output is not finite."""
    errs = []
    for o, r in zip(outs, refs):
        o, r = o.detach().double().cpu(), r.detach().double().cpu()
        if o.shape != r.shape:
            errs.append(math.inf)
            continue
        if not bool(torch.isfinite(o).all()):
            errs.append(math.nan)
            continue
        scale = float(r.norm())
        errs.append(float((o - r).norm()) / (scale if scale > 0 else 1.0))
    return errs


def rounding(dtype: torch.dtype, tf32: str | None, batch: int) -> tuple[float, float]:
    """``(eps, floor)`` of a variant's arithmetic: one unit in the last place, relative (the reference's noise
    is measured at it), and the smallest error bound, which grows as ``eps sqrt(B)`` with the rows the
    reference sums over (a float32 weight gradient over 10^6 rows was off by 2e-5 in pure PyTorch)."""
    if dtype == torch.float64:
        return 2.0 ** -52, max(1e-13, 2.0 ** -52 * math.sqrt(batch))
    return (2.0 ** -10 if tf32 == "tf32" else 2.0 ** -23), max(1e-6, 2.0 ** -23 * math.sqrt(batch))


def bounds(noise: list[float], floor: float) -> list[float]:
    """Each output's error bound: ``max(floor, CHECK_FACTOR * noise)``."""
    return [max(floor, CHECK_FACTOR * n) for n in noise]


def check_errors(errs: list[float], noise: list[float], floor: float) -> float:
    """The largest ratio of an output's error to its bound: <= 1 passes (nan fails)."""
    ratios = [e / b for e, b in zip(errs, bounds(noise, floor))]
    return math.nan if any(r != r for r in ratios) else max(ratios, default=0.0)


# -------------------------------------------------------------------------------------------------- main

def _directions(args) -> int:
    return 16 if args.directions is None else args.directions


def _default_mid(args) -> None:
    """``--mid`` not given: relu where a unit has a position between layers, identity for 1-shortcut units."""
    if args.mid is None:
        args.mid = "identity" if args.shortcut == 1 else "relu"


def memory_need(args) -> dict:
    """Bytes each of ``--ops`` needs at most, about: the pure-PyTorch reference's autograd keeps about 2
    activation-sized tensors per layer for a backward and about 8 for a double backward (the first backward's
    graph and the second backward); plus the weights, their gradients and the directions with their products."""
    n, R = (args.shortcut, args.units) if args.shortcut else (args.units, 1)
    elt = 4 if args.dtype == "float32" else 8
    layers = R * n * args.batch * args.width * elt  # one activation-sized tensor per layer, all layers
    weights = R * n * args.width ** 2 * elt
    return {"forward": weights + 2 * args.batch * args.width * elt, "forward+backward": 2 * layers + 3 * weights,
            "input-gradient": 2 * layers + weights, "hvp": 8 * layers + (4 + 2 * _directions(args)) * weights}


def _check_args(args, device: str) -> None:
    def refuse(msg):
        raise SystemExit(f"{CMD}: {msg}")

    _default_mid(args)
    positions = activation_positions_error(args)
    if positions:
        refuse(positions)
    if args.tf32 and (args.dtype != "float32" or not device.startswith("cuda")):
        refuse(f"--tf32 needs --dtype float32 and --device cuda, got --dtype {args.dtype} --device {device}")
    if "hvp" not in args.ops:
        for flag, given in (("--loss cross_entropy", args.loss != "mse"),
                            (f"--directions {args.directions}", args.directions is not None)):
            if given:
                refuse(f"{flag} has no effect without --ops hvp")
    if args.compile and not set(FLOPS) & set(args.ops):
        refuse("--compile times torch.compile of the reference's forward, forward+backward and input-gradient: add "
               "one of them to --ops (HVPs cannot be compiled: double backward does not run through torch.compile)")
    from .._build import is_built

    if not is_built():
        refuse("the fused kernels are not built in this install, so there is nothing to compare with pure PyTorch "
               "(`shortcut-ext info` says how it was built; reinstall with `pip install --no-build-isolation .`)")
    need = memory_need(args)
    op = max(args.ops, key=need.get)
    total, where = device_memory(device)
    if need[op] > 0.9 * total:
        refuse(f"--ops {op} needs about {need[op] / 2**30:.1f} GiB at --units {args.units} --width {args.width} "
               f"--batch {args.batch}{f' --directions {_directions(args)}' if op == 'hvp' else ''}, more than 90% of {where} "
               f"{total / 2**30:.1f} GiB (most of it the pure-PyTorch reference's autograd graph): lower the sizes"
               + (", or leave it out of --ops" if len(args.ops) > 1 else ""))


def reference_noise(prob: Problem, op: str, ref_out, eps: float, seed: int) -> list[float]:
    """How far the reference's outputs ``ref_out`` of ``op`` (an HVP's with one direction) move when the input
    and the weights are perturbed by one rounding ``eps``: the largest of ``CHECK_DRAWS`` draws, per output."""
    g = torch.Generator().manual_seed(seed)
    worst = [0.0] * len(ref_out)
    for _ in range(CHECK_DRAWS):
        pp = prob.perturbed(eps, g)
        fn = {"forward": lambda: pp.forward("torch"), "forward+backward": lambda: pp.forward_backward("torch"),
              "input-gradient": lambda: pp.input_gradient("torch"), "hvp": lambda: pp.hvp("torch", 1)}[op]()
        worst = [max(w, e) for w, e in zip(worst, rel_errors(fn(), ref_out))]
    return worst


def _row(op: str, impl: str, times: list[float], k: int | None = None) -> dict:
    # "inclusive": quartiles within the measured times ("exclusive", the default, extrapolates from few samples:
    # q1 < 0 for two calls)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    row = {"op": op, "impl": impl, "k": k, "repeats": len(times), "median_ms": 1e3 * statistics.median(times),
           "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2], "min_ms": 1e3 * min(times)}
    if k:
        row["per_product_ms"] = row["median_ms"] / k
    return row


def _write(out: Path | None, doc: dict) -> None:
    if out is None:
        return
    import json

    from .._io import atomic_open
    from .store import json_safe

    with atomic_open(out) as f:
        json.dump(json_safe(doc), f, indent=2, allow_nan=False)
    with atomic_open(out.with_suffix(".csv"), newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in doc["rows"]:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in COLUMNS})


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict]) -> str:
    cols = ("op", "impl", "k", "median_ms", "per_product_ms", "speedup", "gflops", "fraction_of_gemm", "max_rel_err",
            "error_ratio", "check")
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(args) -> int:
    device = parse_device(args.device, "bench")
    _check_args(args, device)
    out = out_file(args.out, "bench", suffix=".json") if args.out is not None else None
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _bench(args, device, out)
    finally:
        torch.set_num_threads(threads)


def _bench(args, device: str, out: Path | None) -> int:
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    from .. import cuda_tf32
    from .report import environment

    rows: list[dict] = []
    eps_ref, floor = rounding(dtype, None, args.batch)
    # TF32 runs the fused stack's tensor-core tiles (d <= 128); wider stacks and the HVP kernel stay float32
    eps_fused = rounding(dtype, args.tf32 if args.width <= 128 else None, args.batch)[0]
    doc = {"command": "bench", "complete": False,
           "options": {**{k: v for k, v in vars(args).items() if k != "func"},
                       "directions": _directions(args) if "hvp" in args.ops else None},
           "environment": environment(),
           "check": {"error": "||o - r|| / ||r|| per output", "factor": CHECK_FACTOR, "floor": floor,
                     "draws": CHECK_DRAWS, "loose_above": LOOSE,
                     "perturbation": {"fused": eps_fused, "fused hvp": eps_ref, "torch.compile": eps_ref}},
           "gemm_gflops": None, "rows": rows}
    _write(out, doc)  # from the start: an interrupted run leaves its options and the rows it measured
    prob = Problem(args, device, dtype)

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    rate = gemm_rate(device, dtype)
    doc["gemm_gflops"] = rate
    log(f"large matmul: {rate:.1f} GFLOP/s ({args.dtype}, {device}, {torch.get_num_threads()} threads)")
    cuda = device.startswith("cuda")
    failed, unchecked = [], []
    noises: dict = {}

    def noise(op: str, ref_out, eps: float) -> list[float]:
        if (op, eps) not in noises:
            noises[(op, eps)] = reference_noise(prob, op, ref_out, eps, args.seed + 1)
            log(f"{op:<17} the reference's rounding noise at {eps:.1e}: "
                + ", ".join(f"{e:.1e}" for e in noises[(op, eps)]))
        return noises[(op, eps)]

    def measure(op: str, impl: str, fn, ref_out, k=None, flops=None, baseline=None, compile_s=None, eps=None):
        """Check ``fn`` against ``ref_out`` (with the noise at ``eps``), time it and add its row; returns its
        outputs (the reference's, for the variants after it)."""
        outs = fn()  # the warm-up call, checked
        err = ratio = nz = None
        if ref_out is None:
            check = "reference"
            # all zeros or denormal (a deep plain ReLU net's signal can fade to that): a check of nothing
            if any(float(o.abs().max()) < torch.finfo(o.dtype).tiny * 2**24 for o in outs if o.numel()):
                unchecked.append(f"{op}: an output of the reference is zero or within 2^24 of the smallest normal "
                                 "number (underflow)")
        else:
            errs = rel_errors(outs, ref_out)
            noise_k = noise(op, ref_out if k in (None, 1) else ref_k1[op], eps)
            err, nz = max(errs), max(noise_k)
            ratio = check_errors(errs, noise_k, floor)
            loose = max(bounds(noise_k, floor)) > LOOSE
            check = ("loose" if loose else "ok") if ratio <= 1 else "FAILED"  # nan fails
            if loose and not any(u.startswith(f"{op} ") for u in unchecked):
                unchecked.append(f"{op} {impl}: the reference's own rounding noise is {nz:.1e} here (deep ReLU "
                                 f"units switching under rounding?), so the check only catches errors above "
                                 f"{max(bounds(noise_k, floor)):.1e}")
            outs = None  # not needed after the check: not held while the variant is timed
        if cuda:  # the peak of one call's working memory, above what is held now (the reference's outputs)
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        times = time_calls(fn, args.repeats, device)
        row = _row(op, impl, times, k)
        row.update(max_rel_err=err, noise=nz, error_ratio=ratio, check=check, compile_s=compile_s,
                   perturbation=eps)
        if cuda:
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        if flops is not None:
            row["gflops"] = flops / (row["median_ms"] / 1e3) / 1e9
            row["fraction_of_gemm"] = row["gflops"] / rate
        if baseline is not None:
            per = row.get("per_product_ms", row["median_ms"])
            row["speedup"] = baseline / per
        rows.append(row)
        _write(out, doc)
        log(f"{op:<17} {impl:<23} median {row['median_ms']:9.2f} ms"
            + (f" ({row['per_product_ms']:.2f} per product)" if k else "")
            + (f"  {row['speedup']:.2f}x" if baseline is not None else "")
            + (f"  err {err:.1e} ({ratio:.2g} of its bound)" if err is not None else "") + f" {check}")
        if check == "FAILED":
            failed.append(f"{op} {impl}{f' k={k}' if k else ''}: error {err:.3g}, {ratio:.3g} times its bound")
        return outs

    def fused():
        return cuda_tf32(args.tf32) if args.tf32 else contextlib.nullcontext()

    K = _directions(args)
    ref_k1: dict = {}
    for op in [o for o in OPS if o in args.ops]:
        if op == "hvp":
            ref_out = ref_k1[op] = measure(op, "torch (double backward)", prob.hvp("torch", 1), None, k=1,
                                           flops=prob.hvp_flops(1))
            base = rows[-1]["per_product_ms"]
            ref_k_out = measure(op, "torch (double backward)", prob.hvp("torch", K), None, k=K,
                                flops=prob.hvp_flops(K), baseline=base) if K > 1 else ref_out
            with fused():
                measure(op, "fused", prob.hvp("fused", 1), ref_out, k=1, flops=prob.hvp_flops(1), baseline=base,
                        eps=eps_ref)
                if K > 1:
                    measure(op, "fused", prob.hvp("fused", K), ref_k_out, k=K, flops=prob.hvp_flops(K),
                            baseline=base, eps=eps_ref)
            continue
        make = {"forward": prob.forward, "forward+backward": prob.forward_backward,
                "input-gradient": prob.input_gradient}[op]
        flops = prob.stack_flops * FLOPS[op]
        ref_out = measure(op, "torch", make("torch"), None, flops=flops)
        base = rows[-1]["median_ms"]
        with fused():
            measure(op, "fused", make("fused"), ref_out, flops=flops, baseline=base, eps=eps_fused)
            if op != "forward" and not cuda:  # the CUDA backward always recomputes
                measure(op, "fused (recompute)", make("fused", recompute=True), ref_out, flops=flops, baseline=base,
                        eps=eps_fused)
        if args.compile:
            t0 = time.perf_counter()
            fn = make("torch", fn=prob.compiled())
            fn()  # the cold compile (and its first run)
            _sync(device)
            measure(op, "torch.compile", fn, ref_out, flops=flops, baseline=base,
                    compile_s=time.perf_counter() - t0, eps=eps_ref)

    doc["complete"] = True
    if unchecked:
        doc["unchecked"] = unchecked
    _write(out, doc)
    net = (f"plain net of {args.units} layers" if not prob.shortcut else
           f"{args.shortcut}-shortcut net, R={args.units}")
    print(f"{args.dtype} on {device} ({torch.get_num_threads()} threads{', ' + args.tf32 if args.tf32 else ''}), "
          f"{net} d={args.width} B={args.batch}; large matmul {rate:.1f} GFLOP/s")
    print(table(rows))
    if out is not None:
        print(f"results: {out} and {out.with_suffix('.csv')}")
    for u in unchecked:
        print(f"{CMD}: warning: the answer check means little here: {u}", file=sys.stderr)
    if failed:
        print(f"{CMD}: wrong answers (checked against the reference before timing): " + "; ".join(failed),
              file=sys.stderr)
        return 1
    return 0
