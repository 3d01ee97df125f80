"""Reproduces beyond the paper of "Demystifying ResNet" (Li, Jiao, Han, Weissman, arXiv:1611.01186):
the Fig. 10 comparison with tanh, symmetric sigmoid and ReLU / tanh at pre positions.

    python python/beyond_activations.py --out runs/beyond_activations              # small CPU defaults (the QUICK sizes)
    python python/beyond_activations.py --full --out runs/beyond_activations       # the paper's scale and beyond
    python python/beyond_activations.py --data mnist ~/mnist --out runs/beyond_activations_mnist

Same as ``shortcut-ext reproduce --only ext ...``: writes ``report_<group>.html``, ``figures/*.png``
and ``results/`` (CSV, JSON, and ``runs.jsonl``: a rerun with the same ``--out`` skips finished runs).
"""
import sys

from shortcut_ext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.split("=")[0] in ("--ou", "--out") for a in args):  # --out DIR, --out=DIR, --ou DIR
        args += ["--out", "runs/beyond_activations"]
    sys.exit(main(["reproduce", "--only", "ext", *args]))
