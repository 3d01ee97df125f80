"""Gauss-Newton products ``G V`` (``HessianOperator(matrix="ggn")``): the fused kernel against pure PyTorch.

Problem (as ``bench_hvp.py``): 2-shortcut net, ReLU at the mid position, d = 16, B = 512, R in {128, 1024},
float32, 2 threads, "small" init (scale 0.05), mse.  ``matmat`` of ``k`` in {1, 16} random directions, each
timed as a whole call.  Variants:

- ``fused``: the fused kernel's Gauss-Newton part (``residual_stack_hvp(..., matrix="ggn")``: the R-operator
  without the net's second derivatives, no tangent recompute in the reverse pass);
- ``fused_hvp``: the fused HVP kernel at the batch's own predictions (zero residual: the Hessian there is ``G``),
  what the autograd backend does (by double backward) and what the fused backend ran before the kernels of its own;
- ``func``: ``torch.func`` ``J^T (H_l (J v))`` directly (``jvp`` of the outputs, ``vmap``-ed, then one ``vjp``);
- ``autograd``: double backward at the predictions, ``is_grads_batched`` over the directions;
- ``hessian_fused``: the Hessian's own fused product, for the cost of ``G`` beside ``H``;
- ``functional_fused``: the other part, ``F = H - G``, fused in one call (the R-operator with a zero output seed);
- ``fisher_fused`` / ``fisher_func``: the empirical Fisher ``(1/m) sum_i g_i g_i^T`` (``G`` with the per-sample
  ``e_i e_i^T`` in place of ``H_l``), fused and by ``torch.func``.

Every variant is checked against ``func`` before it is timed.  Times are medians of 5 calls per product
(time / k), with the ratio of each pure-PyTorch variant to ``fused`` measured in the same run.

    python benchmarks/bench_ggn.py                   # medians and ratios
    pytest benchmarks/bench_ggn.py -o addopts="" --benchmark-only
"""
from __future__ import annotations

import itertools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from shortcut_ext.curvature import HessianOperator  # noqa: E402
from shortcut_ext.curvature.hessian import fused_hvp_available  # noqa: E402
from shortcut_ext.models import ShortcutNet  # noqa: E402

VARIANTS = ("fused", "fused_hvp", "func", "autograd", "hessian_fused", "functional_fused", "fisher_fused", "fisher_func")
UNITS = (128, 1024)
KS = (1, 16)
WIDTH, BATCH = 16, 512


def make_operators(units: int, k: int):
    net = ShortcutNet(WIDTH, units, 2, mid="relu", init="small", scale=0.05, seed=0, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(BATCH, WIDTH, generator=g)
    Y = X @ torch.randn(WIDTH, WIDTH, generator=g) / WIDTH ** 0.5 + 0.1 * torch.randn(BATCH, WIDTH, generator=g)
    V = torch.randn(net.weight.numel(), k, generator=g)
    # variant: (backend, matrix)
    kinds = {"fused": ("fused", "ggn"), "fused_hvp": ("fused", "ggn"), "func": ("func", "ggn"),
             "autograd": ("autograd", "ggn"), "hessian_fused": ("fused", "hessian"),
             "functional_fused": ("fused", "functional"), "fisher_fused": ("fused", "empirical_fisher"),
             "fisher_func": ("func", "empirical_fisher")}
    ops = {v: HessianOperator(net, (X, Y), backend=kinds[v][0], matrix=kinds[v][1]) for v in VARIANTS}
    if ops["fused"].backend_used != "fused":
        return None, V
    hvp_path = ops["fused_hvp"]  # the autograd backend's route to G, on the fused HVP kernel: H at the predictions
    hvp_path._ggn_kernel = False
    hvp_path._ggn_y = [hvp_path._prediction_targets(h0, y) for h0, y, _ in hvp_path._batches]
    ref = ops["func"].matmat(V)
    for v in ("fused", "fused_hvp", "autograd"):
        err = float((ops[v].matmat(V) - ref).abs().max() / ref.abs().max())
        if not err <= 1e-4:  # (a nan is never greater than anything)
            raise AssertionError(f"R={units}, k={k}: {v} and func Gauss-Newton products differ by {err:.2g}")
    hv = ops["hessian_fused"].matmat(V)
    err = float((ops["functional_fused"].matmat(V) - (hv - ref)).abs().max() / hv.abs().max())
    if not err <= 1e-4:
        raise AssertionError(f"R={units}, k={k}: the fused F and H - G products differ by {err:.2g}")
    ef = ops["fisher_func"].matmat(V)
    err = float((ops["fisher_fused"].matmat(V) - ef).abs().max() / ef.abs().max())
    if not err <= 1e-4:
        raise AssertionError(f"R={units}, k={k}: the fused and func empirical Fisher products differ by {err:.2g}")
    return ops, V


def main() -> int:
    torch.set_num_threads(2)
    if not fused_hvp_available():
        print("the fused HVP kernel is not built")
        return 1
    print(common.environment())
    for units, k in itertools.product(UNITS, KS):
        ops, V = make_operators(units, k)
        med = {}
        for v in VARIANTS:
            reps = 5 if v not in ("autograd", "fisher_func") or units < 1024 else 3
            med[v] = statistics.median(common.call_times(lambda v=v: ops[v].matmat(V), reps)) / k * 1e3
        print(f"R = {units}, k = {k}: ms per product  " + "  ".join(f"{v} {med[v]:.2f}" for v in VARIANTS)
              + "  |  fused_hvp / fused {:.2f}x, func / fused {:.1f}x, autograd / fused {:.1f}x, fused G / fused H {:.2f}, "
              "fused F / fused H {:.2f}, fisher_func / fisher_fused {:.1f}x".format(
                  med["fused_hvp"] / med["fused"], med["func"] / med["fused"], med["autograd"] / med["fused"],
                  med["fused"] / med["hessian_fused"], med["functional_fused"] / med["hessian_fused"],
                  med["fisher_func"] / med["fisher_fused"]))
    return 0


from common import pytest  # noqa: E402  (None without pytest)

if pytest is not None:
    from common import two_threads  # noqa: E402,F401  (2 threads in the pytest mode too)

    @pytest.mark.parametrize("variant", VARIANTS)
    @pytest.mark.parametrize("k", KS)
    @pytest.mark.parametrize("units", UNITS)
    def test_ggn_matmat(benchmark, units, k, variant):
        ops, V = make_operators(units, k)
        if ops is None:
            pytest.skip("the fused HVP kernel is not built")
        benchmark.group = f"Gauss-Newton matmat R={units} k={k}"
        benchmark.extra_info.update(units=units, k=k, variant=variant, products_per_call=k, **common.environment())
        benchmark.pedantic(ops[variant].matmat, args=(V,), rounds=5, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
