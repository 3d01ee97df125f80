"""A self-contained HTML report: figures embedded as base64 PNG, verdict and summary tables,
configuration, environment and timings.  One file, no external assets."""
from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_open


@dataclass
class Section:
    """One figure group of the report."""

    key: str
    title: str
    expected: str  # the paper's expected shape
    figures: list = field(default_factory=list)  # PNG paths
    verdicts: list = field(default_factory=list)  # Verdict objects
    tables: dict = field(default_factory=dict)  # caption -> list of row dicts
    notes: str = ""


def _package():
    import shortcut_ext

    return shortcut_ext


def environment() -> dict:
    """What the numbers were measured on: torch, the extension's build, threads, machine."""
    from .. import build_info
    from ..ops import default_backend

    try:
        from ..curvature import fused_hvp_available

        fused_hvp = bool(fused_hvp_available())
    except ImportError:
        fused_hvp = False
    try:
        import importlib

        importlib.import_module("shortcut_ext.curvature.condition")
        curvature = True
    except ImportError:
        curvature = False
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        # the data's whitening (eigh) and the spectra's small algebra run in numpy / scipy: their versions
        # (and the thread count) can move the last bits, which long training runs can amplify
        "libraries": _library_versions(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda_available": torch.cuda.is_available(),
        "shortcut_ext_version": _package().__version__,
        "shortcut_ext_path": os.path.dirname(os.path.abspath(_package().__file__)),  # spots a stale install
        "shortcut_ext_build_info": build_info(),
        "default_backend": default_backend(),
        "fused_hvp_kernel": fused_hvp,
        "curvature_module": curvature,
        "distributed_backends": _distributed_backends(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _library_versions() -> dict:
    """numpy, scipy, scikit-learn and matplotlib versions (None: not installed)."""
    import importlib.metadata as md

    out = {}
    for name in ("numpy", "scipy", "scikit-learn", "matplotlib"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _distributed_backends() -> str:
    """The torch.distributed backends this torch has (for --distributed: gloo on CPU, NCCL on GPUs)."""
    import torch.distributed as dist

    if not dist.is_available():
        return "none (torch.distributed unavailable)"
    have = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available()),
                                  ("mpi", dist.is_mpi_available())) if ok]
    return ", ".join(have) or "none"


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], max_rows: int = 200) -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    cols = [c for c in rows[0] if c != "result"]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = []
    for r in rows[:max_rows]:
        body.append("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>")
    more = f"<p><em>{len(rows) - max_rows} more rows in the CSV files</em></p>" if len(rows) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def _verdict_table(verdicts) -> str:
    if not verdicts:
        return "<p><em>not run</em></p>"
    rows = []
    for v in verdicts:
        mark = ('<span class="na">measured</span>' if getattr(v, "measured_only", False) else
                {True: '<span class="ok">holds</span>', False: '<span class="bad">does not hold</span>',
                 None: '<span class="na">n/a</span>'}[v.holds])
        rows.append(f"<tr><td>{html.escape(v.figure)}</td><td>{html.escape(v.claim)}</td><td>{mark}</td>"
                    f"<td>{html.escape(v.measured)}</td><td class='small'>{html.escape(v.test)}</td></tr>")
    return ("<table><thead><tr><th>figure</th><th>expected shape (paper)</th><th>verdict</th><th>measured</th>"
            "<th>test</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _img(path) -> str:
    p = Path(path)
    if not p.exists():
        return f"<p><em>figure {html.escape(p.name)} missing</em></p>"
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(p.name)}" src="data:image/png;base64,{data}"/><figcaption>{html.escape(p.name)}</figcaption></figure>'


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1250px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.6em 0;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f3f3f3}.ok{color:#137333;font-weight:bold}.bad{color:#b3261e;font-weight:bold}.na{color:#777}
.small{font-size:0.8em;color:#555}img{max-width:100%}pre{background:#f6f6f6;padding:0.6em;overflow:auto;font-size:0.8em}
figure{margin:0.5em 0}figcaption{font-size:0.75em;color:#666}
"""


def write_report(path, title: str, sections: list[Section], config: dict, env: dict, timings: dict,
                 intro: str = "") -> Path:
    """Write the HTML report to ``path`` and return it."""
    path = Path(path)
    all_v = [v for s in sections for v in s.verdicts]
    n_ok = sum(v.holds is True for v in all_v)
    n_bad = sum(v.holds is False for v in all_v)
    n_na = sum(v.holds is None for v in all_v)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")  # it names the data (an MNIST path is the user's text)
    n_meas = sum(bool(getattr(v, "measured_only", False)) for v in all_v)
    parts.append(f"<h2>Summary</h2><p>{n_ok} expected shapes hold, {n_bad} do not, {n_na - n_meas} not decided "
                 f"(not run or reference only)" + (f", {n_meas} measured beyond the paper and not tested" if n_meas
                                                    else "") + ".</p>")
    parts.append(_verdict_table(all_v))
    parts.append("<ul>" + "".join(f"<li><a href='#{html.escape(s.key)}'>{html.escape(s.title)}</a></li>" for s in sections) + "</ul>")
    for s in sections:
        parts.append(f"<h2 id='{html.escape(s.key)}'>{html.escape(s.title)}</h2>")
        parts.append(f"<p><b>Expected (paper):</b> {html.escape(s.expected)}</p>")
        if s.notes:
            parts.append(f"<p class='small'>{html.escape(s.notes)}</p>")
        for f in s.figures:
            parts.append(_img(f))
        parts.append(_verdict_table(s.verdicts))
        for cap, rows in s.tables.items():
            parts.append(f"<h4>{html.escape(cap)}</h4>{_table(rows)}")
    parts.append("<h2>Timings</h2><p class='small'>Of this invocation: runs a resumed invocation read back from "
                 "<code>results/runs.jsonl</code> cost it almost nothing.</p>"
                 + _table([{"phase": k, "seconds": v} for k, v in timings.items()]))
    parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(config, indent=2, default=str)) + "</pre>")
    parts.append("<h2>Environment</h2><pre>" + html.escape(json.dumps(env, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, tmp=path.with_suffix(".tmp"), encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path


__all__ = ["Section", "environment", "write_report"]
