"""Reproduces Fig. 10 of "Demystifying ResNet" (Li, Jiao, Han, Weissman, arXiv:1611.01186):
the final loss at the best learning rate vs depth with ReLU at mid positions.

    python python/fig10_final_loss_relu.py --out runs/fig10_final_loss_relu              # small CPU defaults (the QUICK sizes)
    python python/fig10_final_loss_relu.py --full --out runs/fig10_final_loss_relu       # the paper's scale and beyond
    python python/fig10_final_loss_relu.py --data mnist ~/mnist --out runs/fig10_final_loss_relu_mnist

Same as ``shortcut-ext reproduce --only fig10 ...``: writes ``report_<group>.html``, ``figures/*.png``
and ``results/`` (CSV, JSON, and ``runs.jsonl``: a rerun with the same ``--out`` skips finished runs).
"""
import sys

from shortcut_ext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.split("=")[0] in ("--ou", "--out") for a in args):  # --out DIR, --out=DIR, --ou DIR
        args += ["--out", "runs/fig10_final_loss_relu"]
    sys.exit(main(["reproduce", "--only", "fig10", *args]))
