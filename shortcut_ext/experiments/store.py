"""Result store of the sweeps: one JSON line per finished run, appended as each run ends.

A line is written with a single ``os.write`` on a file opened with ``O_APPEND`` and then
``fsync``-ed, so a finished run is on disk before the next one starts.  An interruption can leave
at most one partial last line; :class:`RunStore` skips lines that do not parse (and starts the next
record on a fresh line), so a rerun keeps every finished run and redoes only the unfinished ones.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["RunStore", "json_safe"]


def json_safe(obj):
    """``obj`` with non-finite floats replaced by ``None`` (strict JSON has no NaN/inf)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        try:
            return json_safe(obj.item())
        except (TypeError, ValueError):
            pass
    return obj


class RunStore:
    """Append-only ``key -> record`` store in a JSON-lines file (later lines win).

    Args:
        path: the ``.jsonl`` file (created with its folder if missing).

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "runs.jsonl")
    >>> s = RunStore(p); s.put("a", {"loss": 1.0}); RunStore(p).get("a")
    {'loss': 1.0}
    """

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[str, dict] = {}
        self.skipped_lines = 0
        if self.path.exists():
            with open(self.path, "r", encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        item = json.loads(line)
                        self._records[item["key"]] = item["record"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.skipped_lines += 1  # a partial line from an interrupted write

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def keys(self):
        return list(self._records)

    def items(self):
        return list(self._records.items())

    def get(self, key: str):
        """The record saved under ``key``, or ``None``."""
        return self._records.get(key)

    def put(self, key: str, record: dict) -> None:
        """Save ``record`` under ``key`` durably (one atomic append, then fsync)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        record = json_safe(record)
        line = json.dumps({"key": key, "record": record}, allow_nan=False, separators=(",", ":")) + "\n"
        data = line.encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as f:  # a partial last line must not swallow this record
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._records[key] = record
