"""``shortcut-ext info``: how the extension was built and what it runs on."""
from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="print build_info() and the environment (torch, threads, backends)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=main)


def main(args) -> int:
    from .report import environment

    env = environment()
    if getattr(args, "json", False):
        print(json.dumps(env, indent=2, default=str))
        return 0
    width = max(len(k) for k in env)
    for k, v in env.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk:<{width}} {vv}")
        else:
            print(f"{k:<{width}} {v}")
    return 0
