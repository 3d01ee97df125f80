"""``shortcut-ext demo``: a 2-shortcut net and a plain Xavier net of the same depth on a linear teacher.

Both train by full-batch gradient descent at the best rate of a small grid (the paper's protocol,
docs/science.md section 4); the demo prints where each loss curve starts and ends, against ``L_min``.
About 3 seconds on 2 CPU cores (1 s of training, the rest starting Python and torch).
"""
from __future__ import annotations

import argparse
import time

import torch

from .._cli_args import nonneg_int, positive_int, seed


def even_depth(text: str) -> int:
    """``--depth``: an even integer >= 2 (a 2-shortcut unit has 2 layers)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an even integer >= 2, got {text!r}") from None
    if v < 2 or v % 2:
        raise argparse.ArgumentTypeError(f"expected an even integer >= 2 (a 2-shortcut unit has 2 layers), got {text}")
    return v


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a 2-shortcut and a plain Xavier net on a linear teacher (~3 s)",
                              description=__doc__)
    p.add_argument("--depth", type=even_depth, default=20, help="weight layers of both nets (even, >= 2; default 20)")
    p.add_argument("--width", type=positive_int, default=10, help="width d (>= 1; default 10)")
    p.add_argument("--epochs", type=nonneg_int, default=300, help="gradient-descent epochs (>= 0; default 300)")
    p.add_argument("--seed", type=seed, default=0, help="seeds the teacher data and the inits (default 0)")
    p.add_argument("--backend", choices=("fused", "torch"), default=None)
    p.set_defaults(func=main)


def run(depth: int = 20, width: int = 10, epochs: int = 300, seed: int = 0, backend: str | None = None,
        lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0), log=print) -> dict:
    """Train both nets; return ``{arch: TrainResult}`` of the best rate each."""
    from ..data import best_linear_loss, second_moment_compress, synthetic_teacher
    from ..ops import check_backend
    from ..train import TrainConfig, lr_sweep
    from .sweeps import build_model

    if depth < 2 or depth % 2:
        raise ValueError(f"depth must be an even integer >= 2 (a 2-shortcut net has 2 layers per unit), got {depth}")
    X, Y = synthetic_teacher(1000, width, seed=seed, noise=0.1)
    l_min = best_linear_loss(X, Y)
    data = second_moment_compress(X, Y)  # exact for linear nets: same loss function of the weights
    log(f"linear teacher: m=1000, d={width}, noise 0.1, L_min = {l_min:.5f}; depth {depth}, {epochs} epochs of "
        f"full-batch GD, best rate of {list(lrs)}; backend {check_backend(backend)}")
    out = {}
    for arch in ("2-shortcut", "plain-xavier"):
        t = time.perf_counter()
        best, runs = lr_sweep(lambda: build_model(arch, "linear", depth, width, seed, torch.float64, backend),
                              data, list(lrs), TrainConfig(epochs=epochs), l_min=l_min)
        dt = time.perf_counter() - t
        ndiv = sum(r.status == "diverged" for r in runs)
        if best is None:
            log(f"{arch:>13}: every rate diverged ({dt:.1f} s)")
            out[arch] = None
            continue
        h = best.history
        marks = sorted({e for e in (0, 10, 100, epochs) if e <= epochs})  # each epoch once
        pts = ", ".join(f"epoch {e}: {h['loss'][e]:.5f}" for e in marks)
        log(f"{arch:>13}: best lr {best.lr:g} ({ndiv} of {len(runs)} rates diverged) | {pts} | "
            f"final - L_min = {best.final_excess:.2e} ({dt:.1f} s)")
        out[arch] = best
    return out


def main(args) -> int:
    run(args.depth, args.width, args.epochs, args.seed, args.backend)
    return 0
