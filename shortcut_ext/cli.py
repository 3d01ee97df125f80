"""The ``shortcut-ext`` command.  Each subcommand lives in its own module and registers itself
through an ``add_parser(subparsers)`` function; imports are lazy so that ``--help`` is fast."""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from ._build import NotBuiltError

# subcommand -> module that defines add_parser(subparsers) (which sets func=...)
SUBCOMMANDS = {
    "demo": "shortcut_ext.experiments.demo",
    "reproduce": "shortcut_ext.experiments.reproduce",
    "train": "shortcut_ext.experiments.train_cmd",
    "spectrum": "shortcut_ext.curvature.spectrum_cmd",
    "landscape": "shortcut_ext.curvature.landscape_cmd",
    "bench": "shortcut_ext.experiments.bench",
    "info": "shortcut_ext.experiments.info",
}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line that names the flag, what it expects and what arrived (as the
    commands' own refusals are), not argparse's usage block before it; exit status 2, as argparse's."""

    commands: tuple = ()  # the top parser's: named where the command is missing

    def error(self, message):
        if self.commands and "choice" not in message:
            message += f" (one of: {', '.join(self.commands)})"
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="shortcut-ext",
        description="Train and analyse very deep n-shortcut residual networks (Li et al., arXiv:1611.01186).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # not written yet
                continue
            raise
        mod.add_parser(sub)
    parser.commands = tuple(sub.choices)
    return parser


def _peer_failure(e: BaseException) -> bool:
    """A collective of a distributed run that failed because a peer went away (gloo: "Connection closed by peer",
    "Connection reset by peer"; NCCL: a DistBackendError).  (The group is gone by the time the error gets here:
    the commands destroy it on the way out.)"""
    import torch.distributed as dist

    backend_error = getattr(dist, "DistBackendError", None)
    if backend_error is not None and isinstance(e, backend_error):
        return True
    msg = str(e)
    return "gloo" in msg and any(w in msg for w in ("Connection closed by peer", "Connection reset by peer",
                                                       "Read error", "Socket closed", "Timed out"))


def _first_line(e: BaseException) -> str:
    """An exception's first line without a source-path prefix (gloo's ``[/path/pair.cc:553] ...``)."""
    import re

    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    line = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", line)
    return line.split(". ", 1)[0][:200]  # gloo's first sentence ("Connection closed by peer [addr]:port")


def _saved(args) -> str:
    """What an interrupted command leaves to resume from, as the end of its message."""
    from pathlib import Path

    out = getattr(args, "out", None)
    if out is None or args.command not in ("reproduce", "spectrum", "landscape", "train", "bench"):
        return ""
    if args.command == "bench":
        import json

        try:  # this run's file (an earlier run's complete one stays until this run writes)
            mine = json.loads(Path(out).read_text()).get("complete") is False
        except (OSError, ValueError, AttributeError):
            mine = False
        if not mine:
            return "; nothing was measured yet"
        return (f"; the rows measured so far are in {out} (\"complete\": false), and a rerun measures everything "
                "again (times from two processes do not compare)")
    if args.command == "train":
        from .experiments.train_cmd import checkpoint_path

        ck = checkpoint_path(out)
        if ck.exists() and getattr(args, "checkpoint_every", 1):
            return (f"; the checkpoint {ck} is saved: rerun the same command to resume from it (a checkpoint of "
                    "other options is not resumed)")
        return ("; no checkpoint was written yet (--checkpoint-every / --checkpoint-seconds; 0 writes none): a "
                "rerun starts over")
    if args.command == "landscape":
        from .curvature.landscape_cmd import CHECKPOINT, CURVE_FILE

        curve = (f"; the Bezier curve's control point and its steps so far are saved in {Path(out) / CURVE_FILE}"
                 if getattr(args, "curve", 0) and (Path(out) / CURVE_FILE).exists() else "")
        if (Path(out) / CHECKPOINT).exists():
            return (f"; the finished rows of the grid (and points of a training path) are saved in "
                    f"{Path(out) / CHECKPOINT}{curve}: the same command resumes from them")
        if curve:
            return f"{curve}: the same command goes on from there"
        return "; no row of the grid (or point of a training path) had finished: a rerun starts over"
    if args.command == "spectrum":
        has = (Path(out) / "spectrum.checkpoint.json").exists()
        return ("; what had finished (a finished Lanczos run, SLQ probe groups) is checkpointed in --out: the same "
                "command resumes from it (a checkpoint of other options is not resumed)" if has else
                "; nothing is saved yet (Lanczos and each SLQ probe group are saved as they finish): a rerun "
                "starts over")
    return "; finished runs are saved: rerun the same command (same --out) to resume"


# OSErrors that are the machine's failure, not the input's: no space or quota left, an I/O error, a file
# over the file system's size limit
_ENVIRONMENT_ERRNOS = frozenset(getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EIO", "EFBIG") if hasattr(errno, n))


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit or preemption), raised in the main thread so that the command
    ends as after Ctrl-C: finished results and checkpoints stay, and it says how to resume."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def _catch_sigterm():
    """Turns SIGTERM into _Terminated while a command runs, unless someone else handles it; returns
    the handler to put back (None: nothing was changed)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _bad_input(args, e) -> int:
    """Bad input found below the argument parser (data files, sizes, combinations of options, an --out that
    cannot be written): one clear line, not a traceback, exit status 2; SHORTCUT_EXT_TRACEBACK=1 shows where
    it came from."""
    if os.environ.get("SHORTCUT_EXT_TRACEBACK", "") not in ("", "0"):
        raise e
    print(f"shortcut-ext {args.command}: error: {e} ({type(e).__name__}; SHORTCUT_EXT_TRACEBACK=1 shows the "
          "traceback)", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    try:  # building the parser imports the commands' modules (matplotlib, scipy): a second or so
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C before any work: one line, as later
        print("\nshortcut-ext: interrupted (before it started)", file=sys.stderr)
        return 130
    previous = _catch_sigterm()
    try:
        return int(args.func(args) or 0)
    except SystemExit as e:  # a subcommand's own refusal, SystemExit("message"): exit status 2, as argparse's
        if not isinstance(e.code, str):
            raise
        msg = e.code if e.code.startswith("shortcut-ext") else f"shortcut-ext {args.command}: {e.code}"
        print(msg, file=sys.stderr)
        e.code = 2  # the message stays the exception's text; the process exits with status 2, silently
        raise
    except KeyboardInterrupt as e:
        term = isinstance(e, _Terminated)
        print(f"\nshortcut-ext {args.command}: {'terminated (SIGTERM)' if term else 'interrupted'}{_saved(args)}",
              file=sys.stderr)
        return 143 if term else 130  # 128 + the signal's number, as a shell reports it
    except BrokenPipeError:
        # the reader of stdout went away (`shortcut-ext info | head`): stop quietly, as other command-line tools
        # do; a long command says on stderr what it leaves to resume from
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError):
            pass
        saved = _saved(args)
        try:
            if saved:
                print(f"shortcut-ext {args.command}: stopped, its output pipe was closed{saved}", file=sys.stderr)
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr went with it (`... 2>&1 | head`)
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
            except (OSError, ValueError):
                pass
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe stopped
    except OSError as e:
        if e.errno not in _ENVIRONMENT_ERRNOS:
            return _bad_input(args, e)
        # the machine failed the run, not its input (a full disk or quota, an I/O error): status 1, as for
        # the computation's own failures, and what is finished stays to resume from
        if os.environ.get("SHORTCUT_EXT_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"shortcut-ext {args.command}: failed: {e}{_saved(args)} ({type(e).__name__}; SHORTCUT_EXT_TRACEBACK=1 "
              "shows the traceback)", file=sys.stderr)
        return 1
    except (ValueError, TypeError, NotBuiltError) as e:  # NotBuiltError: --backend fused without the kernels
        return _bad_input(args, e)
    except (FloatingPointError, MemoryError, RuntimeError) as e:
        if _peer_failure(e) and os.environ.get("SHORTCUT_EXT_TRACEBACK", "") in ("", "0"):
            # --distributed: a collective failed because another rank stopped (Ctrl-C, SIGTERM, a failure of its
            # own that it reports itself) or died: one line here too, not gloo's traceback
            print(f"shortcut-ext {args.command}: stopped: another rank stopped or failed ({_first_line(e)}){_saved(args)}",
                  file=sys.stderr)
            return 1
        # failures of the computation itself: non-finite products (an overflowing net), out of memory.  Other
        # runtime errors are bugs: their traceback is what a report needs
        oom = isinstance(e, MemoryError) or any(s in str(e) for s in (
            "out of memory", "out of CPU memory", "DefaultCPUAllocator", "not enough memory"))
        if not (isinstance(e, FloatingPointError) or oom) or os.environ.get("SHORTCUT_EXT_TRACEBACK", "") not in ("", "0"):
            raise
        hint = ("; the run needs more memory than there is: lower the sizes (--units / --depth, --width, --samples, "
                "--basis-gib, --batch-size)" if oom else "")
        print(f"shortcut-ext {args.command}: failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}{hint} "
              f"({type(e).__name__}; SHORTCUT_EXT_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
