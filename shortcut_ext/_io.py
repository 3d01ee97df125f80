"""Files written whole or not at all: results and checkpoints survive a kill at any moment."""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager


def _remove_stale_temporaries(path: str) -> None:
    """Removes the temporaries of ``path`` left by writers that were killed (SIGKILL, the OOM killer:
    no cleanup ran), each named by its process id: a checkpoint's worth of disk per kill otherwise."""
    import glob

    for tmp in glob.glob(glob.escape(path) + ".*-*.tmp"):
        try:
            pid = int(tmp[len(path) + 1:].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)  # alive (or not ours to signal): leave it
        except ProcessLookupError:
            try:
                os.remove(tmp)
            except OSError:
                pass
        except OSError:
            pass


@contextmanager
def atomic_open(path, mode: str = "w", tmp=None, **kwargs):
    """Opens a temporary file beside ``path`` (``tmp``, or ``path`` + ``".PID-THREAD.tmp"``, its own per
    writer: two writers of one path, two processes of a duplicated job, used to share one temporary
    name, so that one's rename took the other's file away, a bare FileNotFoundError) and moves it onto
    ``path`` (flushed and fsynced) when the block ends without an error.  On any failure, an
    interrupt included, the temporary file is removed, so that a full disk does not stay full of it,
    and an OSError of the writing names ``path`` (a bare "[Errno 28] No space left on device" did
    not say which file)."""
    path = os.fspath(path)
    if tmp is None:
        _remove_stale_temporaries(path)
        tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
    tmp = os.fspath(tmp)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise


def save_figure(fig, path, **savefig_kwargs) -> None:
    """``fig.savefig`` through :func:`atomic_open`: a kill or a full disk leaves the previous PNG or none
    (not a truncated one), and the error names the file."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)
