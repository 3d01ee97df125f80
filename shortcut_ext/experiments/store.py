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
import signal
import sys
from pathlib import Path

__all__ = ["DistributedRunStore", "PoolRunStore", "RunStore", "json_float", "json_safe", "usable_cpus"]

_INF = {"inf": math.inf, "-inf": -math.inf}


def json_safe(obj):
    """``obj`` as strict JSON values (which have no NaN or inf): nan becomes ``None`` and +-inf the
    strings ``"inf"`` / ``"-inf"``, so that an infinite condition number (a singular Hessian) stays
    apart from an undefined one; :func:`json_float` reads them back."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        return obj if math.isfinite(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy / torch scalars and arrays: numbers and lists
        try:
            value = obj.tolist()
        except (TypeError, ValueError, RuntimeError):
            pass
        else:
            if value is not obj:
                return json_safe(value)
    return obj


def json_float(v):
    """A number written by :func:`json_safe` read back: ``None`` is nan, ``"inf"`` / ``"-inf"`` are
    +-inf; anything else is returned as it is."""
    if v is None:
        return math.nan
    if isinstance(v, str) and v in _INF:
        return _INF[v]
    return v


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
        self._in_main: set[str] = set()  # keys whose record is in the main file (not only in a rank's shard)
        self.skipped_lines = 0
        # the shards other ranks of a distributed run wrote (DistributedRunStore) first, so that a run
        # interrupted before rank 0 merged them keeps their finished runs; the main file wins
        for shard in self._shards():
            self._load(shard)
        self._load(self.path, main=True)

    def _shards(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.rank*{self.path.suffix}"))

    def absorb_shards(self) -> int:
        """Write the runs found only in ranks' shards (``<stem>.rank<r>.jsonl``, left by a distributed run
        that was interrupted before rank 0 merged them) into the main file, then remove the shards: the
        main file holds every finished run.  Call it where no other process writes the store.

        Returns:
            The number of runs written into the main file.
        """
        moved = [k for k in self._records if k not in self._in_main]
        for key in moved:
            self.put(key, self._records[key])
        for shard in self._shards():
            shard.unlink(missing_ok=True)
        return len(moved)

    def _load(self, path: Path, main: bool = False) -> None:
        if not path.exists():
            return
        if not path.is_file():
            raise ValueError(f"the run store {path} is not a regular file: move it away, or use another --out")
        with open(path, "rb") as f:
            for raw in f:
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    item = json.loads(raw.decode("utf-8"))
                    if not isinstance(item["record"], dict) or not isinstance(item["key"], str):
                        raise TypeError("not a run record")
                    self._records[item["key"]] = item["record"]
                    if main:
                        self._in_main.add(item["key"])
                except (ValueError, KeyError, TypeError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
                    self.skipped_lines += 1  # a partial line from an interrupted write, or a damaged one

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
            view = memoryview(data)
            while view:  # os.write may write part of it
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:  # a full disk: say which file (a partial line is skipped when read back)
            if e.filename is None:
                raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e
            raise
        finally:
            os.close(fd)
        self._records[key] = record
        self._in_main.add(key)


class _SharedStore:
    """The :class:`RunStore` interface of a store that shares the runs among processes, read from ``base``."""

    base: RunStore

    @property
    def path(self) -> Path:
        return self.base.path

    @property
    def skipped_lines(self) -> int:
        return self.base.skipped_lines

    def __contains__(self, key: str) -> bool:
        return key in self.base

    def __len__(self) -> int:
        return len(self.base)

    def keys(self):
        return self.base.keys()

    def items(self):
        return self.base.items()

    def get(self, key: str):
        return self.base.get(key)


class DistributedRunStore(_SharedStore):
    """A :class:`RunStore` shared by the ranks of a ``torch.distributed`` group that split the runs.

    Every rank opens the same store folder.  :meth:`fill` takes the runs a phase needs, ``(key,
    compute, cost)``, deals the missing ones to the ranks (longest first, each to the least loaded
    rank: the same plan on every rank), runs this rank's share, and exchanges the records, so that
    afterwards every rank holds every record and the phase's own loop only reads them.  Rank 0 writes
    the main file; the other ranks write their finished runs at once to ``<stem>.rank<r>.jsonl``
    beside it (which :class:`RunStore` also reads), so an interruption loses no finished run.

    Args:
        base: the rank's :class:`RunStore` (the same path on every rank).
        group: the process group (default: the default group).
    """

    def __init__(self, base: RunStore, group=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("DistributedRunStore needs an initialised torch.distributed process group")
        self.base, self.group = base, group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self._merge()  # the shards of an interrupted run into the main file first
        self._shard = None if self.rank == 0 else RunStore(
            base.path.with_name(f"{base.path.stem}.rank{self.rank}{base.path.suffix}"))

    def _merge(self) -> None:
        """Rank 0 writes the runs held only in shards into the main file and removes the shards, once every
        rank has read the store and before any rank adds to it (a collective: every rank calls it)."""
        import torch.distributed as dist

        dist.barrier(self.group)
        if self.rank == 0:
            self.base.absorb_shards()
        dist.barrier(self.group)

    def close(self) -> None:
        """At the end of a distributed run (every rank calls it): the main file then holds every finished
        run, and no shard is left beside it."""
        self._merge()

    def put(self, key: str, record: dict) -> None:
        """Save durably: rank 0 in the main file, another rank in its shard."""
        if self._shard is None:
            self.base.put(key, record)
        else:
            self._shard.put(key, record)
            self.base._records[key] = self._shard.get(key)

    def plan(self, jobs, usable=None) -> list[list[str]]:
        """The keys of the missing ``jobs`` each rank runs (the same answer on every rank); a stored record
        for which ``usable(record)`` is False counts as missing."""
        missing, seen = [], set()
        for i, (key, _, cost) in enumerate(jobs):
            absent = key not in self or (usable is not None and not usable(self.get(key)))
            if absent and key not in seen:
                seen.add(key)
                missing.append((-float(cost), i, key))
        load = [0.0] * self.world_size
        share: list[list[str]] = [[] for _ in range(self.world_size)]
        for neg_cost, _, key in sorted(missing):
            r = min(range(self.world_size), key=lambda q: (load[q], q))
            load[r] -= neg_cost
            share[r].append(key)
        return share

    def fill(self, jobs, progress=None, usable=None) -> int:
        """Run the missing ``jobs`` (``(key, compute() -> record, cost)``) across the ranks; every rank
        then holds all their records.  A job that fails on one rank fails the call on every rank.

        Args:
            progress: ``None`` or a callable ``(done, total)`` called after each of this rank's runs.

        Returns:
            The number of runs this rank computed.
        """
        import torch.distributed as dist

        jobs = list(jobs)
        share = self.plan(jobs, usable)
        compute = {key: fn for key, fn, _ in jobs}
        mine, error = [], None
        for i, key in enumerate(share[self.rank]):
            try:
                self.put(key, compute[key]())
            except Exception as e:  # noqa: BLE001 - reported on every rank below, not swallowed
                error = f"rank {self.rank}, run {key}: {type(e).__name__}: {e}"
                break
            mine.append((key, self.get(key)))
            if progress is not None:
                progress(i + 1, len(share[self.rank]))
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, (mine, error), group=self.group)
        errors = [e for _, e in gathered if e]
        for r, (records, _) in enumerate(gathered):
            if r == self.rank:
                continue
            for key, record in records:
                if self.rank == 0:
                    self.base.put(key, record)  # the main file ends complete
                else:
                    self.base._records[key] = record
        if errors:
            raise RuntimeError("distributed sweep failed: " + "; ".join(errors))
        return len(mine)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, bounded by a cgroup (v2) CPU quota where one is
    set (a container's ``--cpus``)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def fork_workers_possible() -> str | None:
    """Why this process cannot fork workers for :class:`PoolRunStore`, or ``None`` if it can."""
    import multiprocessing

    if not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods():
        return f"worker processes are forked, which this platform ({sys.platform}) does not do safely"
    import torch

    if torch.cuda.is_initialized():  # (is_available() would start the driver: asked only once it runs)
        return "CUDA is initialised in this process, and a forked child cannot use it"
    return None


def _take(counter, n: int):
    """The next job's index from the shared counter, or ``None`` when there is none (or the pool stopped)."""
    with counter.get_lock():
        i = counter.value
        if i >= n:
            return None
        counter.value = i + 1
        return i


def _runs_taken(todo, counter):
    """The runs (``(key, compute)``) this process takes from the shared counter, one at a time, until none
    is left or the pool stopped."""
    while True:
        i = _take(counter, len(todo))
        if i is None:
            return
        yield todo[i]


def _stop(counter, n: int) -> None:
    with counter.get_lock():
        counter.value = max(counter.value, n)


def _pool_worker(rank: int, shard: str, todo, counter, conn, parent: int) -> None:
    """A forked worker of :meth:`PoolRunStore.fill`: takes jobs from the counter until none is left, saves
    each record at once to its shard and says so through ``conn``."""
    # the signals end a worker outright: the parent turns them into the command's exit and cleans up; a
    # finished run is already on disk (a write cut short leaves a partial line, skipped when read)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    try:  # end with the parent, whatever ends it (a kill -9 too): no orphan keeps computing
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it ended before the request above was made
        os._exit(1)
    store = RunStore(shard)
    for key, fn in _runs_taken(todo, counter):
        try:
            record = fn()
            store.put(key, record)
        except Exception as e:  # noqa: BLE001 - reported by the parent
            _stop(counter, len(todo))
            conn.send(("error", key, f"{type(e).__name__}: {e}"))
            break
        conn.send(("done", key))
    conn.close()


class PoolRunStore(_SharedStore):
    """A :class:`RunStore` whose phases run their missing runs in ``workers`` processes of this machine.

    :meth:`fill` (the interface of :class:`DistributedRunStore`, which the sweeps call) forks ``workers``
    children; they take the missing runs one at a time, longest first, from a shared counter, so that a
    free process always takes the next run.  A child saves each finished run at once to its shard
    ``<stem>.rank<r>.jsonl`` beside the main file (which :class:`RunStore` also reads, so an interruption
    loses no finished run) and tells this process, which only oversees: it hears every finished run as it
    happens (the progress bar moves with the runs), and merges the shards into the main file when the
    phase ends, or is interrupted.  A phase with one missing run runs it here, without a fork.

    Every child computes with one CPU thread (a forked child cannot start OpenMP's thread pool again),
    so the runs are the same, bit for bit, as those of one process with one thread.  Linux only (fork).

    Args:
        base: the store (the main file).
        workers: the number of processes that compute (>= 1; 1 runs everything here).
    """

    rank = 0

    def __init__(self, base: RunStore, workers: int):
        self.check_workers(workers)
        self.base, self.workers = base, workers
        base.absorb_shards()  # an interrupted pool's (or distributed run's) finished runs into the main file

    @staticmethod
    def check_workers(workers) -> None:
        """``ValueError`` unless this process can run a pool of ``workers`` processes."""
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if workers > 1:
            why = fork_workers_possible()
            if why:
                raise ValueError(f"workers={workers} needs forked worker processes: {why}; use workers=1")
            import torch

            if torch.get_num_threads() != 1:
                raise ValueError(f"workers={workers} needs torch.get_num_threads() == 1 (a forked worker computes "
                                 f"with one thread, and the runs must not depend on which process ran them), got "
                                 f"{torch.get_num_threads()}")

    @property
    def world_size(self) -> int:
        return self.workers

    def put(self, key: str, record: dict) -> None:
        self.base.put(key, record)

    def absorb_shards(self) -> int:
        return self.base.absorb_shards()

    def missing(self, jobs, usable=None) -> list:
        """``(key, compute)`` of the ``jobs`` without a (usable) stored record, longest first (ties in the
        jobs' order), each key once."""
        todo, seen = [], set()
        for i, (key, fn, cost) in enumerate(jobs):
            absent = key not in self or (usable is not None and not usable(self.get(key)))
            if absent and key not in seen:
                seen.add(key)
                todo.append((-float(cost), i, key, fn))
        return [(key, fn) for _, _, key, fn in sorted(todo, key=lambda t: t[:2])]

    def plan(self, jobs, usable=None) -> list[list[str]]:
        """As :meth:`DistributedRunStore.plan`: this process oversees every missing run (the workers take
        them as they come free), so its list holds them all."""
        return [[key for key, _ in self.missing(jobs, usable)]] + [[] for _ in range(self.workers - 1)]

    def _shard(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.rank{rank}{self.path.suffix}")

    def _merge(self) -> int:
        """The children's shards into the main file (the runs not in it yet), then the shards removed."""
        moved = 0
        for r in range(1, self.workers + 1):
            shard = self._shard(r)
            if not shard.exists():
                continue
            for key, record in RunStore(shard).items():
                if key not in self.base or self.base.get(key) != record:
                    self.base.put(key, record)
                    moved += 1
            shard.unlink(missing_ok=True)
        return moved

    def fill(self, jobs, progress=None, usable=None) -> int:
        """Run the missing ``jobs`` (``(key, compute() -> record, cost)``) in the pool; afterwards this
        store holds all their records.  A job that fails stops the pool (the runs in flight finish) and
        raises ``RuntimeError`` naming it; the finished runs are kept.  A worker that dies is reported
        the same way, after the others have taken the runs left.

        Args:
            progress: ``None`` or a callable ``(done, total)``, called in this process (its main thread)
                as each run finishes.

        Returns:
            The number of runs computed.
        """
        import multiprocessing
        from multiprocessing.connection import wait

        todo = self.missing(list(jobs), usable)
        n = len(todo)
        done = 0

        def finished():
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, n)

        workers = min(self.workers, n)
        if workers <= 1:
            for key, fn in todo:
                self.base.put(key, fn())
                finished()
            return n
        ctx = multiprocessing.get_context("fork")
        counter = ctx.Value("q", 0)
        procs, readers, errors = {}, {}, []
        for r in range(1, self.workers + 1):
            self._shard(r).unlink(missing_ok=True)  # absorbed at construction; a stale one must not mix in
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            for r in range(1, workers + 1):
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_pool_worker, args=(r, str(self._shard(r)), todo, counter, send, os.getpid()),
                                name=f"shortcut-ext worker {r}", daemon=True)
                p.start()
                send.close()
                procs[r], readers[recv] = p, r
            while readers:  # every finished run as it happens
                for conn in wait(list(readers)):
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):  # the worker ended (its exit status is read below)
                        del readers[conn]
                        continue
                    if msg[0] == "done":
                        finished()
                    else:
                        errors.append(f"run {msg[1]} (worker {readers[conn]}): {msg[2]}")
            for r, p in procs.items():
                p.join()
                if p.exitcode != 0:
                    how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit status {p.exitcode}"
                    errors.append(f"worker {r} ended with {how}")
        finally:
            _stop(counter, n)
            for p in procs.values():
                if p.is_alive():
                    p.terminate()
            for p in procs.values():
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
            self._merge()
        if errors:
            raise RuntimeError("a run of the worker pool failed (the finished runs are kept): " + "; ".join(errors))
        return n
