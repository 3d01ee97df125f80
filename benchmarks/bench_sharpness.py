"""The sharpness (``shortcut_ext.train.sharpness``: the loss Hessian's largest eigenvalue, by single-vector Lanczos)
on the fused Hessian-vector products against the same Lanczos on autograd's, and against a training epoch.

Problem: 2-shortcut net, tanh between each unit's layers (``--act relu | ssigmoid`` for another), d = 16, 512
samples of a linear teacher (``shortcut_ext.data.synthetic_teacher``, seed 0), R in {100, 1000} units, float32,
2 threads, the "small" init (scale 0.01, seed 0), the paper's mse.  Variants, per R:

- ``fused``: ``sharpness(net)``, the products by the fused HVP kernel (what ``train --sharpness-every`` runs);
- ``autograd``: ``sharpness`` of the same weights in a net with ``backend="torch"``: the products by double
  backward through the pure-PyTorch reference;
- ``epoch``: one full-batch gradient-descent step of the fused net (forward, backward, update), for the price of a
  sharpness in epochs of training.

Both sharpness variants must converge and agree (``lam_top`` within ``2e-4 |lam_top|``, twice the Lanczos
tolerance) before anything is timed.  Times are medians (``--repeats`` calls of a sharpness, 15 of an epoch); the
report gives the products, the time per product, ``autograd / fused`` and ``fused / epoch`` measured in the same run.
The rows go to ``benchmarks/results/sharpness_<act>.{csv,json}`` (``SHORTCUT_EXT_BENCH_OUT`` moves the folder),
rewritten after every row.

    python benchmarks/bench_sharpness.py                     # tanh, R = 100 and 1000
    python benchmarks/bench_sharpness.py --act relu --units 1000 --repeats 5
    pytest benchmarks/bench_sharpness.py -o addopts="" --benchmark-only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
try:  # the installed package (or the one on PYTHONPATH): the source tree has no kernels unless built in place
    import shortcut_ext  # noqa: F401
except ImportError:  # a source checkout without an install
    sys.path.insert(0, os.path.dirname(HERE))

from shortcut_ext.curvature.hessian import fused_hvp_available  # noqa: E402
from shortcut_ext.data import synthetic_teacher  # noqa: E402
from shortcut_ext.models import ShortcutNet  # noqa: E402
from shortcut_ext.train import SHARPNESS_TOL, sharpness  # noqa: E402

sys.path.insert(0, HERE)  # benchmarks/common.py
import common  # noqa: E402

WIDTH, BATCH = 16, 512
UNITS = (100, 1000)
ACTS = ("tanh", "relu", "ssigmoid")
VARIANTS = ("fused", "autograd", "epoch")
EPOCH_REPEATS = 15


def make_problem(units: int, act: str = "tanh"):
    """The fused net, the same weights under ``backend="torch"``, and the data (float32)."""
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    fused = ShortcutNet(WIDTH, units, 2, mid=act, init="small", seed=0, dtype=torch.float32)
    ref = ShortcutNet(WIDTH, units, 2, mid=act, init="small", seed=0, dtype=torch.float32, backend="torch")
    with torch.no_grad():
        ref.weight.copy_(fused.weight)
    X, Y = synthetic_teacher(BATCH, WIDTH, seed=0, dtype=torch.float32)
    return fused, ref, (X, Y)


def check(fused, ref, data) -> tuple[dict, dict]:
    """Both sharpnesses, converged and within twice the Lanczos tolerance of each other (else AssertionError)."""
    a, b = sharpness(fused, data), sharpness(ref, data)
    for name, r in (("fused", a), ("autograd", b)):
        if not r["converged"]:
            raise AssertionError(f"the {name} sharpness did not converge: {r}")
    scale = max(abs(a["lam_top"]), abs(b["lam_top"]))
    if not abs(a["lam_top"] - b["lam_top"]) <= 2 * SHARPNESS_TOL * scale:  # (a nan fails)
        raise AssertionError(f"fused and autograd sharpness differ: {a['lam_top']!r} against {b['lam_top']!r}")
    return a, b


def epoch_fn(net, data, lr: float = 0.1):
    """One full-batch gradient-descent step of ``net`` on the paper's mse (the weights move: a training epoch)."""
    X, Y = data

    def step():
        net.zero_grad(set_to_none=True)
        loss = 0.5 * (net(X) - Y).pow(2).sum(1).mean()
        loss.backward()
        with torch.no_grad():
            net.weight.sub_(lr * net.weight.grad)
        return loss
    return step


def run(units: int, act: str, repeats: int) -> list[dict]:
    """The three variants' rows for one R (checked first, then timed on fresh copies of the initial weights)."""
    fused, ref, data = make_problem(units, act)
    a, b = check(fused, ref, data)
    rows = []
    for name, net, res in (("fused", fused, a), ("autograd", ref, b)):
        ts = common.call_times(lambda net=net: sharpness(net, data), repeats, warmup=0)
        rows.append({"variant": name, "units": units, "act": act, "median_s": statistics.median(ts),
                     "lam_top": res["lam_top"], "products": res["products"],
                     "per_product_ms": statistics.median(ts) / res["products"] * 1e3})
    trained = make_problem(units, act)[0]
    ts = common.call_times(epoch_fn(trained, data), EPOCH_REPEATS, warmup=1)
    rows.append({"variant": "epoch", "units": units, "act": act, "median_s": statistics.median(ts)})
    f = rows[0]["median_s"]
    rows[1]["speedup_of_fused"] = rows[1]["median_s"] / f
    rows[0]["epochs_per_sharpness"] = f / rows[2]["median_s"]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--units", type=int, nargs="+", default=list(UNITS))
    p.add_argument("--act", choices=ACTS, default="tanh", help="the activation between each unit's layers")
    p.add_argument("--repeats", type=int, default=3, help="timed sharpness calls per variant")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or min(args.units) < 1:
        p.error(f"--repeats, --threads and --units must be >= 1, got {args.repeats}, {args.threads}, {args.units}")
    if not fused_hvp_available():
        print("the fused HVP kernel is not built: nothing to compare")
        return 1
    torch.set_num_threads(args.threads)
    rows = []
    for units in args.units:
        new = run(units, args.act, args.repeats)
        rows += new
        f, g, e = new
        print(f"R = {units:5d} ({args.act}): fused {f['median_s']:.3f} s ({f['products']} products, "
              f"{f['per_product_ms']:.1f} ms each), autograd {g['median_s']:.3f} s ({g['products']} products, "
              f"{g['per_product_ms']:.1f} ms each): {g['speedup_of_fused']:.1f}x; an epoch {e['median_s'] * 1e3:.2f} ms: "
              f"a sharpness costs {f['epochs_per_sharpness']:.0f} epochs; lam_top {f['lam_top']:.6g}", flush=True)
        paths = common.write_results(f"sharpness_{args.act}", rows, {"width": WIDTH, "batch": BATCH, "dtype": "float32",
                                                                     "act": args.act, "tol": SHARPNESS_TOL})
    print("wrote " + " and ".join(paths))
    return 0


from common import pytest  # noqa: E402  (None without pytest)

if pytest is not None:
    from common import two_threads  # noqa: E402,F401  (2 threads in the pytest mode too)

    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("units", UNITS)
    def test_sharpness(benchmark, units, variant):
        if not fused_hvp_available():
            pytest.skip("the fused HVP kernel is not built")
        fused, ref, data = make_problem(units)
        a, _ = check(fused, ref, data)
        benchmark.group = f"sharpness R={units} (tanh)"
        benchmark.extra_info.update(units=units, variant=variant, products=a["products"], **common.environment())
        if variant == "epoch":
            benchmark.pedantic(epoch_fn(fused, data), rounds=EPOCH_REPEATS, warmup_rounds=1)
        else:
            benchmark.pedantic(sharpness, args=(fused if variant == "fused" else ref, data), rounds=3)


if __name__ == "__main__":
    sys.exit(main())
