"""Reproduces Figs. 2-3 of "Demystifying ResNet" (Li, Jiao, Han, Weissman, arXiv:1611.01186):
the mean Frobenius norm of the trained weights of 2-shortcut (and 1-, 3-shortcut) nets shrinks with depth, during and after training (best learning rate per net).

    python python/fig2_3_weight_norm.py --out runs/fig2_3_weight_norm              # small CPU defaults (the QUICK sizes)
    python python/fig2_3_weight_norm.py --full --out runs/fig2_3_weight_norm       # the paper's scale and beyond
    python python/fig2_3_weight_norm.py --data mnist ~/mnist --out runs/fig2_3_weight_norm_mnist

Same as ``shortcut-ext reproduce --only fig2-3 ...``: writes ``report_<group>.html``, ``figures/*.png``
and ``results/`` (CSV, JSON, and ``runs.jsonl``: a rerun with the same ``--out`` skips finished runs).
"""
import sys

from shortcut_ext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.split("=")[0] in ("--ou", "--out") for a in args):  # --out DIR, --out=DIR, --ou DIR
        args += ["--out", "runs/fig2_3_weight_norm"]
    sys.exit(main(["reproduce", "--only", "fig2-3", *args]))
