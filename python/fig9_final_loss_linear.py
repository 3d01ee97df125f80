"""Reproduces Fig. 9 of "Demystifying ResNet" (Li, Jiao, Han, Weissman, arXiv:1611.01186):
the final loss at the best learning rate vs depth for linear nets, against L_min; the best and largest stable rates.

    python python/fig9_final_loss_linear.py --out runs/fig9_final_loss_linear              # small CPU defaults (the QUICK sizes)
    python python/fig9_final_loss_linear.py --full --out runs/fig9_final_loss_linear       # the paper's scale and beyond
    python python/fig9_final_loss_linear.py --data mnist ~/mnist --out runs/fig9_final_loss_linear_mnist

Same as ``shortcut-ext reproduce --only fig9 ...``: writes ``report_<group>.html``, ``figures/*.png``
and ``results/`` (CSV, JSON, and ``runs.jsonl``: a rerun with the same ``--out`` skips finished runs).
"""
import sys

from shortcut_ext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.split("=")[0] in ("--ou", "--out") for a in args):  # --out DIR, --out=DIR, --ou DIR
        args += ["--out", "runs/fig9_final_loss_linear"]
    sys.exit(main(["reproduce", "--only", "fig9", *args]))
