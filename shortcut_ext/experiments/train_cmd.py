"""``shortcut-ext train``: train one network from command-line options and write its metrics.

    shortcut-ext train --arch 2-shortcut --depth 20 --lr 0.3 --epochs 1000 --out run.json
    shortcut-ext train --arch plain-xavier --act relu-mid --depth 10 --probe-every 50 --out run.json
    shortcut-ext train --arch 2-shortcut --depth 8 --data mnist ~/mnist --samples 10000 --out run.json

Writes ``--out`` (JSON: configuration, final numbers, per-epoch history, Hessian probes) and a CSV of
the per-epoch history beside it (``run.csv``).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
from pathlib import Path

import torch

from .._device import init_distributed, parse_device
from ..train import OPTIMIZERS, TrainConfig, train
from .store import json_safe
from .sweeps import ACT_VARIANTS, ARCHS, build_model, check_arch, load_data


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one network and write its metrics (JSON + CSV)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="2-shortcut", help="network family and init")
    p.add_argument("--act", choices=sorted(ACT_VARIANTS), default="linear", help="activation variant")
    p.add_argument("--depth", type=int, default=10, help="weight layers (a multiple of the shortcut depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="gd")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size for sgd/adam")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--probe-every", type=int, default=0, help="Hessian probes every N epochs (0: none)")
    p.add_argument("--exact-max-params", type=int, default=4000)
    p.add_argument("--data", nargs="+", default=["digits"], metavar="KIND",
                   help="digits (default) | synthetic | mnist PATH")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--width", type=int, default=10, help="principal components / synthetic dimension")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    p.add_argument("--backend", choices=("fused", "torch"), default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the network trains")
    p.add_argument("--tf32", nargs="?", const="tf32", choices=("tf32", "3xtf32"), default=None,
                   help="float32 on cuda: the fused kernels' products on tensor cores (shortcut_ext.cuda_tf32): "
                        "tf32 (the default of the bare flag; ~1e-3 relative error per product, the fastest) or 3xtf32 "
                        "(float32 accuracy); Hessian probes stay float32")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel full-batch training under torchrun (gloo on cpu, NCCL on cuda: each rank "
                        "takes cuda:LOCAL_RANK); rank r holds samples r, r + world, ...; rank 0 writes")
    p.add_argument("--no-compress", action="store_true",
                   help="linear nets: train on all rows instead of the exact second-moment compression")
    p.add_argument("--out", required=True, help="JSON file for the metrics (a .csv of the history goes beside it)")
    p.set_defaults(func=main)


def main(args) -> int:
    device = parse_device(args.device, "train")
    if getattr(args, "tf32", None) and (args.dtype != "float32" or not device.startswith("cuda")):
        raise SystemExit(f"shortcut-ext train: --tf32 needs --dtype float32 and --device cuda, got --dtype "
                         f"{args.dtype} --device {device}")
    if not getattr(args, "distributed", False):
        return _main(args, device, 0, 1)
    created, rank, world, device = init_distributed("train", device)
    try:
        return _main(args, device, rank, world)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _main(args, device, rank, world) -> int:
    from .reproduce import _parse_data

    lead = rank == 0  # prints and writes
    kind, path = _parse_data(args.data)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    bundle = load_data(kind, path, d=args.width, samples=args.samples, dtype=dtype)
    depth = args.depth
    a = check_arch(args.arch)
    if a.valid_depth(depth) != depth:
        raise SystemExit(f"--depth of a {a.name} net must be a multiple of {a.shortcut}, got {depth}")
    net = build_model(args.arch, args.act, depth, bundle.width, args.seed, dtype, args.backend,
                      out_features=None if bundle.out_features == bundle.width else bundle.out_features).to(device)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, batch_size=args.batch_size,
                      momentum=args.momentum, probe_every=args.probe_every, exact_max_params=args.exact_max_params,
                      seed=args.seed)
    compress = args.act == "linear" and not args.no_compress and cfg.optimizer == "gd"
    data = (bundle.Xc, bundle.Yc) if compress else (bundle.X, bundle.Y)
    if world > 1:  # this rank's rows (the compressed rows also average to the same loss)
        data = tuple(t[rank::world] for t in data)
    if lead:
        print(f"training {net!r} ({net.num_parameters()} weights) on {bundle.tag}"
              f"{' (second-moment compression)' if compress else ''}; L_min = {bundle.l_min:.6g}"
              f"{f'; {world} ranks' if world > 1 else ''}")
    from ..ops import cuda_tf32

    with cuda_tf32(args.tf32) if getattr(args, "tf32", None) else contextlib.nullcontext():
        res = train(net, data, cfg, l_min=bundle.l_min, progress=lead,
                    distributed=bool(getattr(args, "distributed", False)))
    if not lead:
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = {"arch": args.arch, "act": args.act, "depth": depth, "seed": args.seed, "data": bundle.tag,
           "backend": net.backend, "device": device, "world_size": world, "dtype": args.dtype,
           "tf32": getattr(args, "tf32", None) or "off", "compressed": compress, "config": cfg.to_dict(),
           **res.to_dict()}
    out.write_text(json.dumps(json_safe(rec), indent=1))
    h = res.history
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(h))
        w.writerows(zip(*h.values()))
    msg = (f"{res.status}: final loss {res.final_loss:.6g}, loss - L_min {res.final_excess:.3g}, "
           f"mean |W|_F {res.final_weight_norm:.4g}, {res.seconds:.1f} s")
    if res.probes:
        p = res.probes[-1]
        msg += f"; last probe: |lambda|max {p['lam_max']:.4g}, cond_q10 {p['cond_q10']:.4g}, index {p['index']:.3f}"
    print(msg)
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0
