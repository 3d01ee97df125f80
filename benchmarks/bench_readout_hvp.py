"""HessianOperator products of a net with a frozen read-out: the fused HVP against autograd's batched double
backward, which the operator used for every such net before.

Two problems, 2-shortcut nets with ReLU at the mid position, "small" init (scale 0.2), float32, 2 threads:
- ``orthonormal``: d = 16, q = 40 targets (read-out ``P [40, 16]`` with orthonormal columns, as the models make
  it), B = 256, R = 200, mse: the fused kernel runs with targets ``y P``;
- ``classifier-d16`` / ``-d64``: q = 10 classes (``P [10, d]``: fewer targets than the width), d = 16 (R = 200,
  B = 256) and d = 64 (R = 100, B = 512), cross-entropy on class indices: the read-out goes into the fused CPU
  kernel (``readout=P``).
``matmat`` of ``k`` in {1, 8} random directions, each timed as a whole call (forward included).  Both backends
are checked against each other before timing.

    python benchmarks/bench_readout_hvp.py                      # medians, ratio autograd / fused
    pytest benchmarks/bench_readout_hvp.py -o addopts="" --benchmark-only
"""
from __future__ import annotations

import itertools
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


CASES = {  # name: (units, width, targets, batch, loss)
    "orthonormal": (200, 16, 40, 256, "mse"),
    "classifier-d16": (200, 16, 10, 256, "cross_entropy"),
    "classifier-d64": (100, 64, 10, 512, "cross_entropy"),
}


def make_operators(case: str = "orthonormal", k: int = 1):
    units, width, targets, batch, loss = CASES[case]
    # xavier weights make these deep stacks' outputs ~1e9 to 1e18 in float32 (products overflowed to nan);
    # the "small" init (scale 0.2) keeps the output O(1), as training would
    net = ShortcutNet(width=width, units=units, shortcut=2, mid="relu", init="small", scale=0.2, out_features=targets)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(batch, width, generator=g)
    Y = torch.randn(batch, targets, generator=g) if loss == "mse" else torch.randint(0, targets, (batch,), generator=g)
    V = torch.randn(net.weight.numel(), k, generator=g)
    ops = {be: HessianOperator(net, (X, Y), loss=loss, backend=be) for be in BACKENDS}
    if ops["fused"].backend_used != "fused":
        return None, V
    ref = ops["autograd"].matmat(V)
    err = float((ops["fused"].matmat(V) - ref).abs().max() / ref.abs().max())
    if not err <= 1e-4:  # (a nan is never greater than anything)
        raise AssertionError(f"{case}: fused and autograd products differ by {err:.2g} (relative)")
    return ops, V


def main() -> int:
    torch.set_num_threads(2)
    if not fused_hvp_available():
        print("the fused HVP kernel is not built")
        return 1
    print(common.environment())
    for case, k in itertools.product(CASES, KS):
        ops, V = make_operators(case, k=k)
        med = {}
        for be in BACKENDS:
            ops[be].matmat(V)
            ts = []
            for _ in range(7):
                t = time.perf_counter()
                ops[be].matmat(V)
                ts.append(time.perf_counter() - t)
            med[be] = statistics.median(ts) * 1e3
        print(f"{case}, k = {k}: fused {med['fused']:.1f} ms, autograd {med['autograd']:.1f} ms per call "
              f"(median of 7): autograd / fused = {med['autograd'] / med['fused']:.1f}x")
    return 0


from common import pytest  # noqa: E402  (None without pytest)

if pytest is not None:
    from common import two_threads  # noqa: E402,F401  (2 threads in the pytest mode too)

    @pytest.mark.parametrize("k", KS)
    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("case", list(CASES))
    def test_readout_matmat(benchmark, case, backend, k):
        ops, V = make_operators(case, k=k)
        if ops is None:
            pytest.skip("the fused HVP kernel is not built")
        benchmark.group = f"read-out matmat {case} k={k}"
        benchmark.extra_info.update(case=case, k=k, backend=backend, **common.environment())
        benchmark.pedantic(ops[backend].matmat, args=(V,), rounds=7, warmup_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
