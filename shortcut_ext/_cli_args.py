"""Argument types and checks shared by the ``shortcut-ext`` subcommands.

Each type is an ``argparse`` ``type=`` callable: a bad value is reported by argparse as
``argument --flag: ...`` (the flag, what was expected, what arrived) with exit status 2, before any
work starts.  :func:`out_file` / :func:`out_dir` check an output path up front, so that a long run
does not end in an error about where to write its result.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
from pathlib import Path

MAX_SEED = 2**63 - 1


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return v


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return v


def seed(text: str) -> int:
    """A seed: an integer in [0, 2**63) (torch's CPU generator keeps its low 32 bits: seeds equal modulo
    2**32 give the same draws)."""
    v = _int(text)
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer seed in [0, 2**63), got {text}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = _float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def finite_float(text: str) -> float:
    """A finite number (of either sign)."""
    v = _float(text)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    v = _float(text)
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def add_activation_args(group, mid: str = "identity", mid_help: str = "") -> None:
    """``--pre``, ``--mid``, ``--post``: a residual net's activations at each position, a plain net's
    (``--shortcut 0``) at ``--mid``; :func:`activation_positions_error` refuses what the net would ignore."""
    from .reference import ACTIVATIONS

    group.add_argument("--pre", choices=ACTIVATIONS, default="identity",
                       help="activation before a unit's first layer (residual nets only)")
    group.add_argument("--mid", choices=ACTIVATIONS, default=mid,
                       help=f"activation between a unit's layers (--shortcut >= 2; a plain net's activation{mid_help})")
    group.add_argument("--post", choices=ACTIVATIONS, default="identity",
                       help="activation after a unit's last layer (residual nets only)")


def activation_positions_error(args) -> str | None:
    """Why ``args.pre`` / ``mid`` / ``post`` do not fit ``args.shortcut`` (a flag the net would ignore), or
    None."""
    if args.shortcut == 0:  # PlainNet: one activation, between layers (at mid)
        for flag in ("pre", "post"):
            if getattr(args, flag) != "identity":
                return (f"--{flag} {getattr(args, flag)} has no effect on a plain net (--shortcut 0): its activation "
                        "sits between layers; set it with --mid (and leave --pre / --post at identity)")
    elif args.shortcut == 1 and args.mid != "identity":  # one layer per unit: no position between layers
        return (f"--mid {args.mid} has no effect with --shortcut 1: a 1-shortcut unit has a single layer, so "
                "there is nothing between layers; use --pre / --post (or --shortcut >= 2)")
    return None


def device_memory(device: str) -> tuple[int, str]:
    """``(bytes, "this machine's" / "cuda:0's")``: the memory a command's sizes are checked against."""
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory, f"{device}'s"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's"


def out_dir(path, command: str, given=None) -> Path:
    """``path`` as an output folder: created if missing; a clear SystemExit if it is a file, lies under
    a file, or cannot be written.  ``given``: the --out file whose folder ``path`` is, for the message."""
    if not str(path).strip():  # an unset $OUT: the current folder would silently receive the outputs
        raise SystemExit(f"shortcut-ext {command}: --out must name a folder, got an empty string")
    p = Path(path)
    what = f"--out {path}" if given is None else f"the folder {path} of --out {given}"
    for parent in [p, *p.parents]:
        if parent.exists() and not parent.is_dir():
            raise SystemExit(f"shortcut-ext {command}: {what} must be a folder, but {parent} is a file")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"shortcut-ext {command}: cannot create {what} ({e.strerror})") from None
    if not os.access(p, os.W_OK):
        raise SystemExit(f"shortcut-ext {command}: {what} is not writable")
    return p


def out_file(path, command: str, suffix: str | None = None) -> Path:
    """``path`` as an output file, checked before any work: not a folder, its folder creatable and
    writable; ``suffix`` (e.g. ``".json"``), when given, is required."""
    p = Path(path)
    if suffix is not None and p.suffix != suffix:
        raise SystemExit(f"shortcut-ext {command}: --out must name a {suffix} file, got {path}")
    if p.is_dir():
        raise SystemExit(f"shortcut-ext {command}: --out {path} is a folder; it must name a file")
    out_dir(p.parent if str(p.parent) else ".", command, given=path)
    return p


def _acquire(path: Path, command: str, hint: str = "", target: str | None = None):
    """Open and ``flock`` ``path`` (exclusive, non-blocking); the open descriptor holds the lock.

    Returns the descriptor, or ``None`` where the file system cannot lock (the run then goes on unlocked,
    with a warning); raises ``SystemExit`` naming the holder when another process holds the lock.  ``target``:
    what the lock guards, for the message (default: the lock file's folder)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise SystemExit(f"another run (shortcut-ext {holder}) is writing to {target or path.parent}: two runs into one "
                         "output would overwrite each other's files; wait for it to end or choose another "
                         f"--out{hint}") from None
    except OSError as e:  # no flock on this file system (some network or FUSE mounts)
        os.close(fd)
        import warnings

        warnings.warn(f"cannot lock {path} ({e.strerror or e}): running without the one-run-per-output check",
                      stacklevel=4)
        return None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command}, pid {os.getpid()}".encode(), 0)
    except OSError:  # the lock holds without the note
        pass
    return fd


@contextlib.contextmanager
def out_lock(path, command: str, lead: bool = True, distributed: bool = False, device=None, target: str | None = None):
    """Hold an exclusive lock on the lock file ``path`` while a command writes its outputs beside it; a
    second process on the same output is refused with one line (``SystemExit``) before any work.

    Only ``lead`` (the writing rank) locks.  With ``distributed=True`` the outcome is shared in one
    all-reduce (on ``device``), so that every rank stops together rather than wait in a collective.
    The lock is released when the process ends, however it ends (``flock`` on the open file).  ``target``: what
    the lock guards, as the refusal names it (default: the folder of ``path``).
    """
    fd, err = None, None
    if lead:
        try:
            hint = ""
            if not distributed and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # torchrun, no --distributed
                hint = " (under torchrun, pass --distributed: without it every rank runs the whole command)"
            fd = _acquire(Path(path), command, hint, target)
        except SystemExit as e:
            err = e
        except OSError as e:  # the lock file cannot be created: the outputs could not be written either
            err = SystemExit(f"cannot create {path} in the output folder: {e.strerror or e}")
        except ImportError:  # no fcntl (not a POSIX system): run unlocked
            fd = None
    try:
        if distributed:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([float(err is not None)], device=device if device is not None else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if err is None and flag.item() > 0:
                raise SystemExit(f"the writing rank could not lock {target or Path(path).parent} (another run is writing "
                                 "there); this rank stops too")
        if err is not None:
            raise err
        yield
    finally:
        if fd is not None:
            os.close(fd)
