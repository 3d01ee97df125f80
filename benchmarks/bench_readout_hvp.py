"""HessianOperator products of a net with a frozen read-out: the fused HVP (targets ``y P``) against
autograd's batched double backward, which the operator used for every such net before.

Problem: 2-shortcut net, ReLU at the mid position, d = 16, q = 40 targets (read-out ``P [40, 16]``
with orthonormal columns, as the models make it), B = 256 samples, R = 200 units, float32, 2 threads,
mse.  ``matmat`` of ``k`` in {1, 8} random directions, each timed as a whole call (forward included).
Both backends are checked against each other before timing.

    python benchmarks/bench_readout_hvp.py                      # medians, ratio autograd / fused
    pytest benchmarks/bench_readout_hvp.py -o addopts="" --benchmark-only
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from shortcut_ext.curvature import HessianOperator  # noqa: E402
from shortcut_ext.curvature.hessian import fused_hvp_available  # noqa: E402
from shortcut_ext.models import ShortcutNet  # noqa: E402

BACKENDS = ("fused", "autograd")
KS = (1, 8)


def make_operators(units: int = 200, width: int = 16, targets: int = 40, batch: int = 256, k: int = 1):
    net = ShortcutNet(width=width, units=units, shortcut=2, mid="relu", init="xavier", out_features=targets)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(batch, width, generator=g), torch.randn(batch, targets, generator=g)
    V = torch.randn(net.weight.numel(), k, generator=g)
    ops = {be: HessianOperator(net, (X, Y), backend=be) for be in BACKENDS}
    if ops["fused"].backend_used != "fused":
        return None, V
    ref = ops["autograd"].matmat(V)
    err = float((ops["fused"].matmat(V) - ref).abs().max() / ref.abs().max())
    if not err <= 1e-4:  # (a nan is never greater than anything)
        raise AssertionError(f"fused and autograd products differ by {err:.2g} (relative)")
    return ops, V


def main() -> int:
    torch.set_num_threads(2)
    if not fused_hvp_available():
        print("the fused HVP kernel is not built")
        return 1
    print(common.environment())
    for k in KS:
        ops, V = make_operators(k=k)
        med = {}
        for be in BACKENDS:
            ops[be].matmat(V)
            ts = []
            for _ in range(7):
                t = time.perf_counter()
                ops[be].matmat(V)
                ts.append(time.perf_counter() - t)
            med[be] = statistics.median(ts) * 1e3
        print(f"k = {k}: fused {med['fused']:.1f} ms, autograd {med['autograd']:.1f} ms per call "
              f"(median of 7): autograd / fused = {med['autograd'] / med['fused']:.1f}x")
    return 0


try:
    import pytest
    from bench_hvp import _threads  # noqa: F401  (2 threads in the pytest mode too)
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("k", KS)
    @pytest.mark.parametrize("backend", BACKENDS)
    def test_readout_matmat(benchmark, backend, k):
        ops, V = make_operators(k=k)
        if ops is None:
            pytest.skip("the fused HVP kernel is not built")
        benchmark.group = f"read-out matmat k={k}"
        benchmark.extra_info.update(k=k, backend=backend, **common.environment())
        benchmark.pedantic(ops[backend].matmat, args=(V,), rounds=7, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
