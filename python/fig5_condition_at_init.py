"""Reproduces Fig. 5 of "Demystifying ResNet" (Li, Jiao, Han, Weissman, arXiv:1611.01186):
the condition number of the Hessian at initialisation vs depth: 2-shortcut at zero / small init (flat, equal to Theorem 1's sigma_max(M)/sigma_min(M)), plain Xavier and orthogonal (grow, orthogonal slower), 1- and 3-shortcut.

    python python/fig5_condition_at_init.py --out runs/fig5_condition_at_init              # small CPU defaults (the QUICK sizes)
    python python/fig5_condition_at_init.py --full --out runs/fig5_condition_at_init       # the paper's scale and beyond
    python python/fig5_condition_at_init.py --data mnist ~/mnist --out runs/fig5_condition_at_init_mnist

Same as ``shortcut-ext reproduce --only fig5 ...``: writes ``report_<group>.html``, ``figures/*.png``
and ``results/`` (CSV, JSON, and ``runs.jsonl``: a rerun with the same ``--out`` skips finished runs).
"""
import sys

from shortcut_ext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.split("=")[0] in ("--ou", "--out") for a in args):  # --out DIR, --out=DIR, --ou DIR
        args += ["--out", "runs/fig5_condition_at_init"]
    sys.exit(main(["reproduce", "--only", "fig5", *args]))
