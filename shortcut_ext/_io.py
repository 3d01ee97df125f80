"""Files written whole or not at all: results and checkpoints survive a kill at any moment."""
from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def atomic_open(path, mode: str = "w", tmp=None, **kwargs):
    """Opens a temporary file beside ``path`` (``tmp``, or ``path + ".tmp"``) and moves it onto
    ``path`` (flushed and fsynced) when the block ends without an error.  On any failure, an
    interrupt included, the temporary file is removed, so that a full disk does not stay full of it,
    and an OSError of the writing names ``path`` (a bare "[Errno 28] No space left on device" did
    not say which file)."""
    path = os.fspath(path)
    tmp = os.fspath(tmp) if tmp is not None else path + ".tmp"
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
