"""Reproduces Figs. 6-8 of "Demystifying ResNet" (Li, Jiao, Han, Weissman, arXiv:1611.01186):
|lambda|max, |lambda|(0.1) and their ratio against the loss along training (Figs. 6-7); the index and the gradient norm along training (Fig. 8), each net at its best rate.

    python python/fig6_8_hessian_along_training.py --out runs/fig6_8_hessian_along_training              # small CPU defaults (the QUICK sizes)
    python python/fig6_8_hessian_along_training.py --full --out runs/fig6_8_hessian_along_training       # the paper's scale and beyond
    python python/fig6_8_hessian_along_training.py --data mnist ~/mnist --out runs/fig6_8_hessian_along_training_mnist

Same as ``shortcut-ext reproduce --only fig6-8 ...``: writes ``report_<group>.html``, ``figures/*.png``
and ``results/`` (CSV, JSON, and ``runs.jsonl``: a rerun with the same ``--out`` skips finished runs).
"""
import sys

from shortcut_ext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.split("=")[0] in ("--ou", "--out") for a in args):  # --out DIR, --out=DIR, --ou DIR
        args += ["--out", "runs/fig6_8_hessian_along_training"]
    sys.exit(main(["reproduce", "--only", "fig6-8", *args]))
