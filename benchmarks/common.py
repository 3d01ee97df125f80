"""Helpers shared by the CPU benchmarks: the machine's large-GEMM rate, environment, result files."""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import time

import torch

import shortcut_ext
from shortcut_ext.experiments.store import json_safe

RESULTS_DIR = os.environ.get("SHORTCUT_EXT_BENCH_OUT", os.path.join(os.path.dirname(__file__), "results"))

try:  # the pytest-benchmark modes; the command-line modes need no pytest
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:
    @pytest.fixture(scope="module", autouse=True)
    def two_threads():
        """A benchmark module's pytest mode runs on 2 threads, as its command line does (restored after); a
        module takes it with ``from common import two_threads``."""
        n = torch.get_num_threads()
        torch.set_num_threads(2)
        yield
        torch.set_num_threads(n)


def worst_error(errors) -> float:
    """The largest of the errors, nan if any is nan (Python's max() keeps a nan only when it comes first,
    so a correctness check on max() passes a nan in a later output)."""
    errors = [float(e) for e in errors]
    return math.nan if any(e != e for e in errors) else max(errors)


def call_times(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` (CPU: no synchronisation), after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """The median of :func:`call_times` (the upper one of an even count)."""
    ts = sorted(call_times(fn, repeats, warmup))
    return ts[len(ts) // 2]


def gemm_rate(n: int = 4096, reps: int = 5, dtype=torch.float32, device="cpu") -> float:
    """Median GFLOP/s of one large ``n x n`` ``torch.matmul`` (the best case of dense GEMM)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)
    times = []
    for _ in range(reps):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 2.0 * n ** 3 / times[len(times) // 2] / 1e9


def _cpu_name() -> str:
    """The processor's model name (platform.processor() says only "x86_64" on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "shortcut_ext": shortcut_ext.build_info(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(name: str, rows: list[dict], extra: dict) -> tuple[str, str]:
    """Write ``rows`` as CSV and ``{environment, extra, rows}`` as JSON under the results folder."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    csv_path = os.path.join(RESULTS_DIR, f"{name}.csv")
    json_path = os.path.join(RESULTS_DIR, f"{name}.json")
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("case", "impl"), k))
    with open(csv_path + ".tmp", "w", newline="") as f:  # written whole, then renamed: never half a file
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(csv_path + ".tmp", csv_path)
    with open(json_path + ".tmp", "w") as f:
        # strict JSON (a failed variant's nan as null), as the commands write
        json.dump(json_safe({"environment": environment(), **extra, "rows": rows}), f, indent=2, allow_nan=False)
    os.replace(json_path + ".tmp", json_path)
    return csv_path, json_path
