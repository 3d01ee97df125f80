"""``shortcut-ext train``: train one network from command-line options and write its metrics.

    shortcut-ext train --arch 2-shortcut --depth 20 --lr 0.3 --epochs 1000 --out run.json
    shortcut-ext train --arch plain-xavier --act relu-mid --depth 10 --probe-every 50 --out run.json
    shortcut-ext train --arch 2-shortcut --depth 12 --lr 1 --sharpness-every 1 --out run.json   # the edge of stability
    shortcut-ext train --arch 2-shortcut --depth 8 --data mnist ~/mnist --samples 10000 --out run.json

Writes ``--out`` (a .json file: configuration, final numbers, per-epoch history, Hessian probes; strict
JSON, with nan as ``null`` and +-inf as ``"inf"`` / ``"-inf"``) and a CSV of the per-epoch history beside
it (``run.csv``); with ``--save-weights`` also the trained weights (``run.weights.pt``: the net's state, the
options that rebuild the net and the data with a key of their values; ``shortcut-ext landscape --weights``
reads it), and with ``--save-weights-every N`` the weights at epoch 0 and every N epochs
(``run.weights/epoch_NNNNNN.pt``, the same files, bit for bit, from a resumed run; a fresh run of other options
first removes another run's files there).  A second run into the same
``--out`` is refused while the first runs.

Resume: while it trains, the run keeps a checkpoint beside ``--out`` (``run.ckpt.pt``: the weights, the
optimizer state, the epoch, the history and probes so far, the mini-batch generator's state and the
options that change the result), rewritten atomically every ``--checkpoint-every`` epochs but at most
every ``--checkpoint-seconds`` seconds (whichever is later).  Rerunning the same command with the same
``--out`` after an interruption resumes from it ("resuming from epoch E of N") and writes the same
numbers, bit for bit, as an uninterrupted run; a checkpoint of other options is replaced (with a note).
The checkpoint is removed once the JSON is written.  Under ``--distributed`` rank 0 writes it and every
rank reads it (resuming needs the same file on every rank, e.g. on a shared disk).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
from pathlib import Path

import torch

from .._cli_args import (device_memory, nonneg_float, nonneg_int, out_file, out_lock, positive_float,
                         positive_int, seed)
from .._device import init_distributed, parse_device
from .._dist import together
from ..data import best_linear_loss
from .._io import atomic_open
from ..train import OPTIMIZERS, PROBE_PARTS, TrainConfig, stability_threshold, train
from .store import json_safe
from .sweeps import ACT_VARIANTS, ARCHS, arch_supports, build_model, check_arch, load_data
from .reproduce import _parse_data

CMD = "shortcut-ext train"
DEFAULT_SAMPLES = 1000  # the fewest samples a run without --samples uses (synthetic's default): a lower bound


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train one network and write its metrics (JSON + CSV); resumable",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="2-shortcut", help="network family and init")
    p.add_argument("--act", choices=sorted(ACT_VARIANTS), default="linear",
                   help="activation variant (a 1-shortcut unit has one layer: no *-mid variants)")
    p.add_argument("--depth", type=int, default=10,
                   help="weight layers: >= 1, a multiple of the shortcut depth (default 10)")
    p.add_argument("--seed", type=seed, default=0, help="seeds the init, the mini-batch order and the Hessian probes' random vectors (the data subset is the same for every seed; torch keeps the low 32 bits of a seed)")
    p.add_argument("--lr", type=positive_float, default=0.1, help="learning rate (default 0.1)")
    p.add_argument("--epochs", type=nonneg_int, default=1000, help="full passes over the data (gd: one update each; sgd / adam: one per mini-batch; default 1000)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="gd",
                   help="gd: full-batch gradient descent (the paper, default); sgd: mini-batches, optional "
                        "momentum; adam")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="mini-batch size for --optimizer sgd/adam (default: full batch)")
    p.add_argument("--momentum", type=nonneg_float, default=0.0,
                   help="momentum of --optimizer sgd (>= 0; default 0)")
    p.add_argument("--probe-every", type=nonneg_int, default=0, help="Hessian probes every N epochs (0: none)")
    p.add_argument("--probe-parts", nargs="+", choices=PROBE_PARTS, default=[], metavar="PART",
                   help="also probe these matrices at each probe: ggn (the Hessian's Gauss-Newton part G = J^T H_l "
                        "J), functional (H - G) and / or empirical_fisher ((1/m) sum_i g_i g_i^T); saved as "
                        "ggn_lam_max, functional_index, empirical_fisher_lam_max, ...")
    p.add_argument("--sharpness-every", type=nonneg_int, default=0, metavar="N",
                   help="every N epochs the sharpness, the Hessian's largest eigenvalue, by Lanczos (the history's "
                        "sharpness column; plain gd is stable near a point only where lr * sharpness / 2 <= 1, full-batch sgd "
                        "with momentum m where lr * sharpness / (2 + 2 m) <= 1); "
                        "cheaper than a probe: about 25-200 Hessian-vector products (0: none)")
    p.add_argument("--exact-max-params", type=nonneg_int, default=4000,
                   help="largest parameter count probed with an exact dense Hessian (SLQ above; default 4000)")
    p.add_argument("--data", nargs="+", default=["digits"], metavar="KIND",
                   help="digits (default) | synthetic | mnist PATH")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="a seeded subset of this many samples (synthetic: this many; default all / 1000)")
    p.add_argument("--width", type=positive_int, default=10,
                   help="principal components / synthetic dimension (digits: at most 61, the components with nonzero "
                        "variance, fewer with a small --samples; default 10)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    p.add_argument("--backend", choices=("fused", "torch"), default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the network trains")
    p.add_argument("--tf32", nargs="?", const="tf32", choices=("tf32", "3xtf32"), default=None,
                   help="float32 on cuda: the fused kernels' products on tensor cores (shortcut_ext.cuda_tf32): "
                        "tf32 (the default of the bare flag; ~1e-3 relative error per product, the fastest) or 3xtf32 "
                        "(float32 accuracy); the Hessian probes run in float64 all the same")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel full-batch training under torchrun (gloo on cpu, NCCL on cuda: each rank "
                        "takes cuda:LOCAL_RANK); rank r holds samples r, r + world, ...; rank 0 writes the "
                        "outputs and the checkpoint, which every rank reads to resume")
    p.add_argument("--no-compress", action="store_true",
                   help="linear nets: train on all rows instead of the exact second-moment compression")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=10, metavar="EPOCHS",
                   help="rewrite the checkpoint (OUT stem + .ckpt.pt) every this many epochs (default 10; 0: "
                        "no checkpoint, an interrupted run starts over)")
    p.add_argument("--checkpoint-seconds", type=nonneg_float, default=30.0, metavar="S",
                   help="... but at most every S seconds of wall time (default 30)")
    p.add_argument("--save-weights", action="store_true",
                   help="also write the trained weights beside --out (OUT stem + .weights.pt, with what rebuilds the "
                        "net and its data), for shortcut-ext landscape / spectrum --weights")
    p.add_argument("--save-weights-every", type=nonneg_int, default=0, metavar="EPOCHS",
                   help="also keep the weights along training: at epoch 0 and every EPOCHS epochs, in OUT stem + "
                        ".weights/epoch_NNNNNN.pt (implies --save-weights; 0: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. for logs of long runs)")
    p.add_argument("--out", required=True,
                   help="the .json file for the metrics (a .csv of the history and, while training, a .ckpt.pt "
                        "checkpoint go beside it; rerun with the same --out to resume)")
    p.set_defaults(func=main)


def checkpoint_path(out) -> Path:
    """The checkpoint beside ``--out``: ``run.json`` -> ``run.ckpt.pt``."""
    out = Path(out)
    return out.with_name(out.stem + ".ckpt.pt")


WEIGHTS_KIND = "shortcut-ext train weights"
WEIGHTS_FORMAT = 1


def weights_path(out) -> Path:
    """The trained weights beside ``--out`` (``--save-weights``): ``run.json`` -> ``run.weights.pt``."""
    out = Path(out)
    return out.with_name(out.stem + ".weights.pt")


def weights_dir(out) -> Path:
    """The weights along training (``--save-weights-every``): ``run.json`` -> ``run.weights/epoch_NNNNNN.pt``."""
    out = Path(out)
    return out.with_name(out.stem + ".weights")


def _save_weights(path: Path, args, net, bundle, kind: str, data_path, epoch: int, loss=None, run=None) -> None:
    """The net's state after ``epoch`` epochs and what rebuilds the net and its data (:func:`load_weights`);
    plain tensors, strings and numbers only, so that ``torch.load(weights_only=True)`` reads it.  ``run``: a
    digest of the options that make the run (the files of one run, resumed or not, share it)."""
    blob = {"kind": WEIGHTS_KIND, "format": WEIGHTS_FORMAT, "run": run,
            "net": {"arch": args.arch, "act": args.act, "depth": args.depth, "seed": args.seed, "width": args.width,
                    "out_features": None if bundle.out_features == bundle.width else bundle.out_features},
            "data": {"kind": kind, "path": None if data_path is None else str(Path(data_path).expanduser().resolve()),
                     "samples": args.samples, "tag": bundle.tag},
            "dtype": args.dtype, "epoch": int(epoch), "epochs": int(args.epochs),
            "train": {"optimizer": args.optimizer, "lr": float(args.lr)},  # (landscape --curve's default step)
            "loss": None if loss is None else float(loss),  # the loss at these weights where the run measured it
            "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}
    buf = io.BytesIO()
    torch.save(blob, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def _clear_other_runs(snaps: Path, run_id: str) -> None:
    """Remove the weights along training that another run (other options) left in ``snaps``: a fresh run into
    the same ``--out`` must not leave a folder that mixes two runs (a resumed one keeps its own files).  Files
    that cannot be read go too, and the temporaries of writers that were killed."""
    from .._io import _remove_stale_temporaries

    for base in sorted({t.name.split(".pt.", 1)[0] for t in snaps.glob("epoch_*.pt.*-*.tmp")}):
        _remove_stale_temporaries(str(snaps / f"{base}.pt"))
    other, unreadable = [], []
    for f in sorted(snaps.glob("epoch_*.pt")):
        try:
            blob = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 -- unreadable (a write cut short, a damaged disk): of no use
            unreadable.append(f.name)
            f.unlink()
            continue
        if not (isinstance(blob, dict) and blob.get("run") == run_id):
            other.append(f.name)
            f.unlink()
    for gone, why in ((other, "that another run (other options) had left there"), (unreadable, "that cannot be read")):
        if gone:
            print(f"note: removed {len(gone)} file{'s' if len(gone) > 1 else ''} of weights along training from "
                  f"{snaps} {why} ({gone[0]}{' ...' if len(gone) > 1 else ''})")


def _missing_snapshots(snaps: Path, every: int, last_epoch: int) -> list[str]:
    """The files of weights along training that a run to ``last_epoch`` should have left in ``snaps`` and did
    not: epoch 0 and every ``every``-th epoch."""
    want = [f"epoch_{e:06d}.pt" for e in range(0, last_epoch + 1, every)]
    return [name for name in want if not (snaps / name).is_file()]


def load_weights(path, command: str = "landscape", dtype=None, backend=None):
    """A ``--save-weights`` file: ``(net, bundle, info)``, the trained net (in ``dtype``, default the run's) and
    its data as the run loaded them.  A file that is not one, or data that changed since, is a ``SystemExit``
    naming ``--weights``."""
    where = f"shortcut-ext {command}: --weights {path}"
    p = Path(path).expanduser()
    if not p.is_file():
        raise SystemExit(f"{where}: no such file (train with --save-weights writes one beside its --out: "
                         "run.json -> run.weights.pt)")
    try:
        raw = p.read_bytes()  # read once: loaded from these bytes, known by their digest
        blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file: one line naming it
        beside = weights_path(p)
        hint = f"; the weights of the run {p} are in {beside}" if p.suffix == ".json" and beside.is_file() else ""
        raise SystemExit(f"{where}: not a weights file of shortcut-ext train --save-weights (torch.load cannot read "
                         f"it: {type(e).__name__}){hint}") from None
    if not (isinstance(blob, dict) and blob.get("kind") == WEIGHTS_KIND):
        raise SystemExit(f"{where}: not a weights file of shortcut-ext train --save-weights (expected a dict with "
                         f"kind {WEIGHTS_KIND!r}, got {type(blob).__name__})")
    if blob.get("format") != WEIGHTS_FORMAT:
        raise SystemExit(f"{where}: written in format {blob.get('format')!r}, this version reads {WEIGHTS_FORMAT}")
    try:
        n, d = blob["net"], blob["data"]
        dt = dtype or (torch.float64 if blob["dtype"] == "float64" else torch.float32)
        bundle = load_data(d["kind"], d["path"], d=n["width"], samples=d["samples"], dtype=dt)
        net = initial_net(blob, bundle.width, dt, backend)
        state = blob["state_dict"]
    except (KeyError, TypeError) as e:
        raise SystemExit(f"{where}: damaged, it lacks {e}") from None
    except (ValueError, OSError) as e:
        raise SystemExit(f"{where}: its data cannot be loaded again ({e})") from None
    if bundle.tag != d["tag"]:
        raise SystemExit(f"{where}: the data differ from those the run trained on ({bundle.tag} now, {d['tag']} "
                         "then): the landscape would not be the trained net's")
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise SystemExit(f"{where}: its weights do not fit the net it names ({str(e).splitlines()[0]})") from None
    blob["file_sha1"] = hashlib.sha1(raw).hexdigest()  # what a checkpoint of an analysis of it keys on
    return net, bundle, blob


def initial_net(info: dict, width: int, dtype, backend=None):
    """The net of a weights file (:func:`load_weights`'s ``info``) as its run initialised it: built from the
    run's seed, as ``train`` builds it (``width``: the data's, ``bundle.width``)."""
    n = info["net"]
    return build_model(n["arch"], n["act"], n["depth"], width, n["seed"], dtype, backend,
                       out_features=n["out_features"])


def main(args) -> int:
    device = parse_device(args.device, "train")
    if getattr(args, "tf32", None) and (args.dtype != "float32" or not device.startswith("cuda")):
        raise SystemExit(f"{CMD}: --tf32 needs --dtype float32 and --device cuda, got --dtype "
                         f"{args.dtype} --device {device}")
    if not getattr(args, "distributed", False):
        _check_args(args, device)  # before any work
        return _main(args, device, 0, 1)
    created, rank, world, device = init_distributed("train", device)
    try:
        with together(True, "train"):  # a refusal on one rank (its own disk) stops every rank
            _check_args(args, device)
        return _main(args, device, rank, world)
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _check_args(args, device: str) -> None:
    """Combinations of options the run would ignore or fail on, as ``SystemExit`` naming the flags."""
    if not arch_supports(args.arch, args.act):
        raise SystemExit(f"{CMD}: --arch {args.arch} does not support --act {args.act}: a 1-shortcut unit has "
                         "one layer, so there is no mid position and the net would be linear; use a *-pre "
                         "variant or another --arch")
    if args.optimizer == "gd" and args.batch_size is not None:
        raise SystemExit(f"{CMD}: --batch-size needs --optimizer sgd or adam (gd takes full-batch steps), got "
                         f"--batch-size {args.batch_size} with --optimizer gd")
    if args.momentum != 0 and args.optimizer != "sgd":
        raise SystemExit(f"{CMD}: --momentum needs --optimizer sgd (gd takes plain steps, adam keeps its own "
                         f"moment estimates), got --momentum {args.momentum:g} with --optimizer {args.optimizer}")
    if getattr(args, "probe_parts", None) and not args.probe_every:
        raise SystemExit(f"{CMD}: --probe-parts {' '.join(args.probe_parts)} needs --probe-every N (the parts are "
                         "probed beside the Hessian at each probe), got no --probe-every")
    if getattr(args, "distributed", False) and args.batch_size is not None:
        raise SystemExit(f"{CMD}: --distributed takes full-batch steps; drop --batch-size (got --batch-size "
                         f"{args.batch_size})")
    a = check_arch(args.arch)
    depth = args.depth
    if a.shortcut <= 1 and depth < 1:
        raise SystemExit(f"{CMD}: --depth must be >= 1, got {depth}")
    if a.shortcut > 1 and (depth < a.shortcut or depth % a.shortcut):
        raise SystemExit(f"{CMD}: --depth of a {a.name} net must be a positive multiple of {a.shortcut} "
                         f"(its shortcut depth), got {depth}")
    out = out_file(args.out, "train", ".json")
    _check_memory(args, device, a.shortcut)
    _parse_data(args.data, "train")
    for path, what in ((checkpoint_path(out), "checkpoint"), (out.with_suffix(".csv"), "history CSV")):
        if path.is_dir():  # found before training, not when the finished run is written
            raise SystemExit(f"{CMD}: the {what} path {path} (beside --out) is a folder")


def _check_memory(args, device: str, shortcut: int = 0) -> None:
    """Refuse, before allocating anything, sizes that cannot fit: a lower bound of what the run holds."""
    itemsize = 8 if args.dtype == "float64" else 4
    copies = 2 + {"adam": 2, "sgd": 1 if args.momentum else 0}.get(args.optimizer, 0)
    cpu = not str(device).startswith("cuda")
    threads = torch.get_num_threads() if cpu else 0
    wsize = args.depth * args.width * args.width * itemsize
    # the weights, their gradient and the optimizer state; on the CPU each thread of the fused backward also
    # sums its rows' weight gradient in a private copy (reduced in a fixed order: deterministic)
    # (a plain net is one unit: a full copy per thread; a shortcut net's per-thread sums are chunked to about
    # 2M elements in all, or one unit's n d^2 per thread)
    if shortcut >= 1:
        per_thread = min(threads * wsize, max(2**21, threads * shortcut * args.width ** 2) * itemsize)
    else:
        per_thread = threads * wsize
    weights = wsize * copies + per_thread
    samples = args.samples or DEFAULT_SAMPLES
    data = samples * 2 * args.width * itemsize  # X and Y of every sample (each rank loads all of them)
    rows = args.batch_size or samples  # the rows one forward pass holds
    if _compressed(args):
        rows = min(rows, 2 * args.width + 10)  # the second-moment compression: at most p + q rows
    local = 1
    if getattr(args, "distributed", False):
        rows = -(-rows // max(int(os.environ.get("WORLD_SIZE", "1")), 1))  # this rank's share
        if cpu:  # the ranks on this machine share its memory
            local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    if shortcut >= 1:  # every unit's input, kept for the backward
        units = args.depth // shortcut
        acts = (units + 1) * rows * args.width * itemsize
    else:  # a plain net is one unit: its input, and its layers recomputed in a row tile's scratch per thread
        acts = 2 * rows * args.width * itemsize + (2 * args.depth + 4) * min(rows, 16) * args.width * itemsize * threads
    need = (weights + data + acts) * local
    have, where = device_memory(device)
    if need > have:
        parts = [f"weights, gradient{' and optimizer state' if copies > 2 else ''}"
                 + (f" and {threads} per-thread gradient sums" if threads else "") + f" {weights / 2**30:.3g} GiB",
                 f"data {data / 2**30:.3g} GiB",
                 (f"unit inputs the backward keeps ({args.depth // shortcut} units x {rows} rows) " if shortcut >= 1
                  else "layer scratch ") + f"{acts / 2**30:.3g} GiB"]
        raise SystemExit(f"{CMD}: --depth {args.depth} --width {args.width} is too large: it needs at least "
                         f"{need / 2**30:.3g} GiB ({'; '.join(parts)}"
                         + (f"; x {local} ranks on this machine" if local > 1 else "") + f"), more than {where} {have / 2**30:.3g} GiB of "
                         f"memory; lower --depth, --width, --samples or --batch-size")


def _data_error(err: Exception, args, kind: str) -> str:
    """A data loader's error (its limits depend on the data set) as one line naming the flag behind it."""
    msg = str(err)
    if "input features" in msg or "principal components" in msg:
        flag = f"--width {args.width}"
    elif "available samples" in msg:
        flag = f"--samples {args.samples}"
    elif "more samples than components" in msg:
        flag = f"--samples {args.samples} / --width {args.width}"
    else:
        return f"{CMD}: --data {' '.join(args.data)}: {msg}"
    return f"{CMD}: {flag} does not fit --data {' '.join(args.data)}: {msg}"


def _compressed(args) -> bool:
    """Whether the run trains on the second-moment compression of its rows (linear nets under full-batch gd: at most
    ``p + q`` rows with the same loss, gradient, Hessian and Gauss-Newton part as all of them). Not when the probes
    take the empirical Fisher: it is a sum over samples of each one's gradient squared, which the compressed rows do
    not keep."""
    return (args.act == "linear" and not args.no_compress and args.optimizer == "gd"
            and "empirical_fisher" not in (getattr(args, "probe_parts", None) or ()))


def _uncompressed_why(args) -> str:
    if args.act == "linear" and not args.no_compress and args.optimizer == "gd":
        return " (all rows: the empirical Fisher's probes need each sample's gradient, not the second moments)"
    return ""


def _fingerprint(args, net, bundle, device: str, world: int, compress: bool) -> dict:
    """The options that change the result: a checkpoint is resumed only under the same values (where
    the outputs go and how often checkpoints are written do not count)."""
    return {"arch": args.arch, "act": args.act, "depth": args.depth, "seed": args.seed, "lr": args.lr,
            "epochs": args.epochs, "optimizer": args.optimizer, "batch_size": args.batch_size,
            "momentum": args.momentum, "probe_every": args.probe_every, "exact_max_params": args.exact_max_params,
            "data": bundle.tag, "width": args.width, "dtype": args.dtype, "backend": net.backend,
            "device": torch.device(device).type, "tf32": getattr(args, "tf32", None) or "off", "world": world,
            "compressed": compress,
            # only where given: a checkpoint from before the flag resumes
            **({"probe_parts": sorted(args.probe_parts)} if getattr(args, "probe_parts", None) else {}),
            **({"sharpness_every": args.sharpness_every} if getattr(args, "sharpness_every", 0) else {})}


def _write_atomic(path: Path, write) -> None:
    with atomic_open(path, "w", newline="") as f:
        write(f)


def _main(args, device, rank, world) -> int:
    out = Path(args.out)
    # one run per --out: a second would share the checkpoint and overwrite the JSON / CSV
    with out_lock(out.with_name(f".{out.name}.lock"), "train", lead=rank == 0,
                  distributed=bool(getattr(args, "distributed", False)), device=device,
                  target=f"{out} (and the checkpoint and files named after it; other --out files in {out.parent} "
                         "are free)"):
        return _main_locked(args, device, rank, world)


def _main_locked(args, device, rank, world) -> int:
    lead = rank == 0  # prints and writes
    out = Path(args.out)
    kind, path = _parse_data(args.data, "train")
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    distributed = bool(getattr(args, "distributed", False))
    with together(distributed, "train"):  # a data file one rank lacks stops every rank, not only that one
        try:
            bundle = load_data(kind, path, d=args.width, samples=args.samples, dtype=dtype)
        except (ValueError, OSError) as e:
            raise SystemExit(_data_error(e, args, kind)) from None
    depth = args.depth
    net = build_model(args.arch, args.act, depth, bundle.width, args.seed, dtype, args.backend,
                      out_features=None if bundle.out_features == bundle.width else bundle.out_features).to(device)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer=args.optimizer, batch_size=args.batch_size,
                      momentum=args.momentum, probe_every=args.probe_every, exact_max_params=args.exact_max_params,
                      seed=args.seed, probe_parts=getattr(args, "probe_parts", None) or (),
                      sharpness_every=getattr(args, "sharpness_every", 0) or 0)
    compress = _compressed(args)
    data = (bundle.Xc, bundle.Yc) if compress else (bundle.X, bundle.Y)
    if world > 1:  # this rank's rows (the compressed rows also average to the same loss)
        data = tuple(t[rank::world] for t in data)
    ckpt = checkpoint_path(out) if args.checkpoint_every else None
    # a read-out of rank d < q targets (or an input projection that loses rank) keeps every net of this
    # width above L_min: the best linear map through the projections is this run's floor
    l_floor = None  # linear nets only: a nonlinear net can go below L_min and below this
    if args.act == "linear" and (net.readout is not None or net.input_proj is not None):
        l_floor = best_linear_loss(bundle.X, bundle.Y, input_proj=net.input_proj, readout=net.readout)
        if l_floor <= bundle.l_min * (1 + 1e-9) + 1e-15:
            l_floor = None
    if lead:
        print(f"training {net!r} ({net.num_parameters()} weights) on {bundle.tag}"
              f"{' (second-moment compression)' if compress else _uncompressed_why(args)}; L_min = {bundle.l_min:.6g}"
              f"{f'; {world} ranks' if world > 1 else ''}")
        if l_floor is not None:
            print(f"note: width {net.width} < {max(net.in_features, net.out_features)} "
                  f"{'targets' if net.out_features > net.width else 'inputs'}: through its frozen projections a "
                  f"linear net of this width reaches at best {l_floor:.6g} (\"l_min_net\"), so loss - L_min "
                  f"stays >= {l_floor - bundle.l_min:.3g}; at --width {max(net.in_features, net.out_features)} a linear "
                  "net reaches its data's L_min (digits and MNIST are reduced to --width dimensions: another L_min)")
    from ..ops import cuda_tf32

    every = getattr(args, "save_weights_every", 0) or 0
    on_update = None
    key = _fingerprint(args, net, bundle, device, world, compress)
    run_id = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    with together(distributed and bool(every), "train"):  # rank 0's disk: every rank stops if it fails
        if every and lead:  # the weights along training: epoch 0 now, then after every `every`-th epoch's update
            snaps = weights_dir(out)
            snaps.mkdir(parents=True, exist_ok=True)
            _clear_other_runs(snaps, run_id)
            _save_weights(snaps / "epoch_000000.pt", args, net, bundle, kind, path, 0, run=run_id)
    if every and lead:

        def on_update(e: int) -> None:  # after epoch e's update, before its checkpoint: the weights of epoch e + 1
            if (e + 1) % every == 0:
                _save_weights(snaps / f"epoch_{e + 1:06d}.pt", args, net, bundle, kind, path, e + 1, run=run_id)
    with cuda_tf32(args.tf32) if getattr(args, "tf32", None) else contextlib.nullcontext():
        res = train(net, data, cfg, l_min=bundle.l_min, progress=lead and not args.no_progress,
                    **({} if on_update is None else {"on_update": on_update}),
                    distributed=distributed, checkpoint=ckpt,
                    checkpoint_every=max(args.checkpoint_every, 1), checkpoint_every_s=args.checkpoint_seconds,
                    checkpoint_key=key,
                    log=print if lead else (lambda msg: None))  # rank 0 says it, once
    if not lead:
        return 0
    from .report import environment

    rec = {"arch": args.arch, "act": args.act, "depth": depth, "seed": args.seed, "data": bundle.tag,
           "backend": net.backend, "device": device, "world_size": world, "dtype": args.dtype,
           "tf32": getattr(args, "tf32", None) or "off", "compressed": compress, "config": cfg.to_dict(),
           **res.to_dict(), "l_min_net": bundle.l_min if l_floor is None else l_floor,
           "environment": environment()}  # versions, build, threads, machine: what a reviewer asks
    text = json.dumps(json_safe(rec), indent=1)
    _write_atomic(out, lambda f: f.write(text))
    h = res.history

    def write_csv(f):
        w = csv.writer(f)
        w.writerow(list(h))
        w.writerows(zip(*h.values()))

    csv_path = out.with_suffix(".csv")
    _write_atomic(csv_path, write_csv)
    wrote = [str(out), str(csv_path)]
    if getattr(args, "save_weights", False) or every:
        # the weights as training left them: after the last epoch, or at the epoch a diverged run stopped
        _save_weights(weights_path(out), args, net, bundle, kind, path, res.history["epoch"][-1],
                      res.history["loss"][-1], run=run_id)
        wrote.append(str(weights_path(out)))
    if every:
        wrote.append(f"{weights_dir(out)}/ (the weights every {every} epochs)")
        missing = _missing_snapshots(weights_dir(out), every, int(res.history["epoch"][-1]))
        if missing:  # removed or damaged while the run was stopped: a resumed run cannot rewrite past epochs
            print(f"warning: {len(missing)} file{'s' if len(missing) > 1 else ''} of the weights along training "
                  f"{'are' if len(missing) > 1 else 'is'} missing from {weights_dir(out)} ({', '.join(missing[:3])}"
                  f"{' ...' if len(missing) > 3 else ''}): this run resumed from a checkpoint after "
                  f"{'them' if len(missing) > 1 else 'it'}, and the weights of past epochs are not kept; for the "
                  "full set run the same command again: the run has finished, so it starts afresh and writes them all")
    if ckpt is not None:  # the result is saved: the checkpoint has served, and killed writers' temporaries
        from .._io import _remove_stale_temporaries

        for p in (ckpt, ckpt.with_name(ckpt.name + ".tmp")):  # (.tmp: an older version's temporary)
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        _remove_stale_temporaries(str(ckpt))
    msg = (f"{res.status}: final loss {res.final_loss:.6g}, loss - L_min {res.final_excess:.3g}, "
           f"mean |W|_F {res.final_weight_norm:.4g}, {res.seconds:.1f} s")
    # the sharpness against the steps' stability threshold (gd: 2 / lr; full-batch heavy ball: (2 + 2 momentum) / lr)
    threshold = stability_threshold(args.optimizer, float(args.lr), float(args.momentum),
                                    full_batch=args.batch_size is None or args.batch_size >= len(data[0]))
    ratio_name = "2" if not args.momentum else f"(2 + 2 * {args.momentum:g})"

    def ratio(lam: float) -> float:  # lam / threshold, written as the closing line names it
        return float(args.lr) * lam / (2.0 + 2.0 * float(args.momentum))
    method = "gradient descent" if not args.momentum else "heavy-ball momentum"
    if res.probes:
        p = res.probes[-1]
        msg += f"; last probe: |lambda|max {p['lam_max']:.4g}, cond_q10 {p['cond_q10']:.4g}, index {p['index']:.3f}"
        if threshold is not None and isinstance(p.get("lam_top"), float) and math.isfinite(p["lam_top"]):
            # stable near a point only where lambda_top <= threshold
            msg += f", lr * lambda_top / {ratio_name} {ratio(p['lam_top']):.3g} ({method}'s threshold: 1)"
    sharp = [(e, v) for e, v in zip(res.history["epoch"], res.history.get("sharpness", [])) if math.isfinite(v)]
    if sharp:
        e, v = sharp[-1]
        msg += f"; sharpness at epoch {e}: {v:.4g}" + (
            f" (lr * sharpness / {ratio_name} {ratio(v):.3g}; most {ratio(max(x for _, x in sharp)):.3g} "
            "over the run)" if threshold is not None else "")
    print(msg)
    print(f"wrote {', '.join(wrote[:-1])} and {wrote[-1]}")
    return 0
