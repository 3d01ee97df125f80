"""The ``shortcut-ext`` command.  Each subcommand lives in its own module and registers itself
through an ``add_parser(subparsers)`` function; imports are lazy so that ``--help`` is fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines add_parser(subparsers) (which sets func=...)
SUBCOMMANDS = {
    "demo": "shortcut_ext.experiments.demo",
    "reproduce": "shortcut_ext.experiments.reproduce",
    "train": "shortcut_ext.experiments.train_cmd",
    "spectrum": "shortcut_ext.curvature.spectrum_cmd",
    "info": "shortcut_ext.experiments.info",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shortcut-ext",
        description="Train and analyse very deep n-shortcut residual networks (Li et al., arXiv:1611.01186).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # not written yet
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
