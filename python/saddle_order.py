"""Beyond the paper's figures, Theorem 1 of "Demystifying ResNet" (Li, Jiao, Han, Weissman, arXiv:1611.01186)
checked directly: the zero point of an n-shortcut net is a stationary point of order n - 1, so along a
random direction the loss leaves it as t^n (1-, 2-, 3- and 4-shortcut, linear and tanh-mid), while plain
nets at their Xavier / orthogonal inits are not stationary (t^1).  For n >= 3 gradient and Hessian
vanish and every spectral tool sees a flat Hessian; the order tells those saddles apart.

    python python/saddle_order.py --out runs/saddle_order              # depths 12 and 48, seconds
    python python/saddle_order.py --full --out runs/saddle_order_full  # depths up to 768

Same as ``shortcut-ext reproduce --only saddle ...``: writes ``report_saddle.html``, ``figures/saddle_order.png``,
``figures/saddle_planes.png`` (the loss on a plane through each zero point, beside its quadratic model) and
``results/`` (``saddle_orders.csv``, ``saddle_curves.csv``, ``saddle_planes.csv``, verdicts and summary JSON).
"""
import sys

from shortcut_ext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.split("=")[0] in ("--ou", "--out") for a in args):  # --out DIR, --out=DIR, --ou DIR
        args += ["--out", "runs/saddle_order"]
    sys.exit(main(["reproduce", "--only", "saddle", *args]))
