"""Data for the paper's experiments (docs/science.md section 4).

- :func:`synthetic_teacher`: Gaussian inputs with a chosen covariance, targets from a linear teacher
  plus noise: the setting of the theory.
- :func:`digits`: scikit-learn's bundled 8x8 digits (no download), prepared as the paper prepared
  MNIST: centred, projected on the ``d`` largest principal components and whitened, with one-hot
  labels as targets, so that ``d = 10`` for the default.
- :func:`mnist`: the same preparation of real MNIST read from the user's files (IDX, gzipped IDX or
  ``.npz``).
- :func:`best_linear_loss`: ``L_min``, the loss of the best linear map, against which final losses
  are reported.
- :func:`second_moment_compress`: an exact stand-in data set of ``rank([X, Y])`` rows with the same
  second moments, hence the same loss, gradient and Hessian for every *linear* network **(ours)**.

Rows are samples throughout: ``X`` is ``[m, d]``, ``Y`` is ``[m, q]``.
"""
from __future__ import annotations

import gzip
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "best_linear_loss",
    "digits",
    "load_mnist_arrays",
    "mnist",
    "prepare_classification",
    "read_idx",
    "second_moment_compress",
    "synthetic_teacher",
]


def _check_pos_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


_SHAPES = {"input_proj": "[d, p]", "readout": "[q, d]"}


def _as_float64(name: str, a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array {_SHAPES.get(name, '[m, features]')}, got shape {list(a.shape)}")
    return a


# --------------------------------------------------------------------------- synthetic data
def synthetic_teacher(
    m: int,
    d: int,
    seed: int = 0,
    noise: float = 0.0,
    cov=None,  # [d, d] symmetric positive semi-definite, default identity
    teacher=None,  # [q, d], default Gaussian with entries N(0, 1/d), q = d
    dtype: torch.dtype = torch.float64,
):
    """Linear-teacher regression data: ``x ~ N(0, cov)``, ``y = T x + noise * N(0, I)``.

    Args:
        m: number of samples.
        d: input dimension.
        seed: seeds inputs, teacher (when not given) and noise.
        noise: standard deviation of the additive Gaussian label noise (>= 0).
        cov: ``[d, d]`` input covariance (PSD; singular allowed); default the identity.
        teacher: ``[q, d]`` teacher matrix ``T``; default a seeded Gaussian with variance ``1/d`` (drawn
            before the inputs, so one seed gives other inputs with a given teacher than with the default).
        dtype: ``torch.float32`` or ``torch.float64``.

    Returns:
        ``(X [m, d], Y [m, q])`` tensors.

    >>> X, Y = synthetic_teacher(5, 3, teacher=torch.eye(3, dtype=torch.float64))
    >>> bool(torch.equal(X, Y)), tuple(X.shape)
    (True, (5, 3))
    """
    m = _check_pos_int("m", m)
    d = _check_pos_int("d", d)
    dtype = _check_dtype(dtype)
    if (isinstance(noise, (bool, np.bool_)) or not isinstance(noise, (int, float, np.integer, np.floating))
            or not np.isfinite(noise) or noise < 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    if cov is None:
        root = np.eye(d)
    else:
        c = _as_float64("cov", cov)
        if c.shape != (d, d):
            raise ValueError(f"cov must have shape [d, d] = [{d}, {d}], got {list(c.shape)}")
        if not np.allclose(c, c.T, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(c).max())):
            raise ValueError("cov must be symmetric")
        e, v = np.linalg.eigh(c)
        if e.min() < -1e-10 * max(1.0, abs(e).max()):
            raise ValueError(f"cov must be positive semi-definite, its smallest eigenvalue is {e.min():.3g}")
        root = (v * np.sqrt(np.clip(e, 0, None))) @ v.T
    if teacher is None:
        T = rng.standard_normal((d, d)) / np.sqrt(d)
    else:
        T = _as_float64("teacher", teacher)
        if T.shape[1] != d:
            raise ValueError(f"teacher must have shape [q, d] with d = {d}, got {list(T.shape)}")
    X = rng.standard_normal((m, d)) @ root
    Y = X @ T.T
    if noise > 0:
        Y = Y + noise * rng.standard_normal(Y.shape)
    return torch.as_tensor(X, dtype=dtype), torch.as_tensor(Y, dtype=dtype)


# --------------------------------------------------------------------------- preparation
def prepare_classification(images, labels, d: int = 10, num_classes: int | None = None,
                           dtype: torch.dtype = torch.float64, name: str = "data"):
    """The paper's preparation of MNIST: PCA to ``d`` components, whitened, one-hot targets.

    Inputs are centred, projected on the ``d`` leading principal directions and scaled by
    ``1/sqrt(eigenvalue)`` so that ``S_xx = X^T X / m`` is exactly the identity.

    Args:
        images: ``[m, ...]`` raw samples (flattened to ``[m, p]``).
        labels: ``[m]`` integer class labels in ``[0, num_classes)``.
        d: number of principal components kept (``<= p``).
        num_classes: width of the one-hot targets; default ``max(labels) + 1``.
        dtype: output dtype.
        name: what to call the data in error messages.

    Returns:
        ``(X [m, d], Y [m, num_classes])``.
    """
    d = _check_pos_int("d", d)
    dtype = _check_dtype(dtype)
    x = np.asarray(images, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim < 2:
        raise ValueError(f"{name}: images must have shape [m, ...], got {list(x.shape)}")
    x = x.reshape(x.shape[0], -1)
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: labels must have shape [m] = [{x.shape[0]}] to match the images, got {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name}: labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
    m, p = x.shape
    if d > p:
        raise ValueError(f"{name}: d must be <= the number of input features {p}, got d = {d}")
    if m <= d:
        raise ValueError(f"{name}: need more samples than components (m > d), got m = {m}, d = {d}")
    if y.min(initial=0) < 0:
        raise ValueError(f"{name}: labels must be >= 0, got min {y.min()}")
    C = int(y.max()) + 1 if num_classes is None else _check_pos_int("num_classes", num_classes)
    if y.max() >= C:
        raise ValueError(f"{name}: labels must be < num_classes = {C}, got max {y.max()}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: images contain NaN or inf")
    xc = x - x.mean(axis=0)
    cov = xc.T @ xc / m
    e, v = np.linalg.eigh(cov)
    order = np.argsort(e)[::-1][:d]
    e, v = e[order], v[:, order]
    if e[-1] <= 1e-12 * max(e[0], 1e-300):
        rank = int(np.sum(e > 1e-12 * max(e[0], 1e-300)))
        raise ValueError(f"{name}: only {rank} principal components have nonzero variance, cannot whiten d = {d}")
    v = v * np.sign(v[np.abs(v).argmax(axis=0), range(d)])  # deterministic sign per component
    X = xc @ v / np.sqrt(e)
    Y = np.zeros((m, C))
    Y[np.arange(m), y] = 1.0
    return torch.as_tensor(X, dtype=dtype), torch.as_tensor(Y, dtype=dtype)


def _subsample(n_total: int, m, seed: int):
    if m is None:
        return None
    m = _check_pos_int("m", m)
    if m > n_total:
        raise ValueError(f"m must be <= the number of available samples {n_total}, got {m}")
    return np.sort(np.random.default_rng(int(seed)).choice(n_total, m, replace=False))


def digits(d: int = 10, seed: int = 0, m: int | None = None, dtype: torch.dtype = torch.float64):
    """scikit-learn's bundled 8x8 digits (1797 samples), prepared as the paper prepared MNIST.

    Args:
        d: principal components kept (the paper: 10).
        seed: seeds the subsample when ``m`` is given.
        m: optional number of samples (a seeded subset; whitening uses the subset).
        dtype: output dtype.

    Returns:
        ``(X [m, d], Y [m, 10])``: whitened inputs (``X^T X / m = I``) and one-hot targets.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = _subsample(bunch.data.shape[0], m, seed)
    images, labels = (bunch.data, bunch.target) if idx is None else (bunch.data[idx], bunch.target[idx])
    return prepare_classification(images, labels, d=d, num_classes=10, dtype=dtype, name="digits")


# --------------------------------------------------------------------------- MNIST files
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """The IDX file's bytes (decompressed if gzipped), read no further than its header says plus one byte:
    a gzip bomb, or a file far longer than its header, is refused without holding it in memory."""
    if not path.exists():
        raise FileNotFoundError(f"MNIST file not found: {path}")
    if not path.is_file():
        raise ValueError(f"MNIST path {path} is not a file")
    with open(path, "rb") as raw_f:
        gz = raw_f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) == 4 and head[0] == 0 and head[1] == 0 and head[2] in _IDX_TYPES and head[3] > 0:
                head += f.read(4 * head[3])
                if len(head) == 4 + 4 * head[3]:
                    shape = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(head[3])]
                    need = math.prod(shape) * np.dtype(_IDX_TYPES[head[2]]).itemsize  # Python ints: no overflow
                    # in chunks, one byte more than the header says (it tells a longer file): a header that claims
                    # terabytes allocates nothing up front, and a short file says "truncated"
                    parts, got = [head], 0
                    while got <= need:
                        chunk = f.read(min(need + 1 - got, 1 << 24))
                        if not chunk:
                            break
                        parts.append(chunk)
                        got += len(chunk)
                    return b"".join(parts)
            return head  # not an IDX header: read_idx names the problem
    except (EOFError, OSError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: gzip data is truncated or corrupt ({e})") from None


def read_idx(path) -> np.ndarray:
    """Read one IDX file (the MNIST format), plain or gzipped.

    Header: two zero bytes, a type code (``0x08`` = uint8, ...), the number of dimensions, then
    each dimension as a big-endian int32; the data follow.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: bad magic number, unknown type, or a file shorter or longer than its header says.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file, {len(raw)} bytes is shorter than the 4-byte magic number")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(
            f"{path}: not an IDX file, magic number is {raw[:4].hex()} "
            "(expected 0000 then a type code such as 08 and the number of dimensions, e.g. 00000803)"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header, need {header} bytes for {ndim} dimensions, found {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dt = np.dtype(_IDX_TYPES[raw[2]])
    need = math.prod(shape) * dt.itemsize
    have = len(raw) - header
    if have < need:
        raise ValueError(f"{path}: truncated IDX data, header says shape {list(shape)} ({need} bytes), found {have} bytes")
    if have > need:
        raise ValueError(f"{path}: IDX file longer than its header says: shape {list(shape)} needs {need} bytes, "
                         "found more")
    return np.frombuffer(raw, dtype=dt, count=math.prod(shape), offset=header).reshape(shape)


def _find_in_dir(folder: Path, split: str):
    prefix = {"train": "train", "test": "t10k"}[split]
    found = {}
    for kind, code in (("images", "idx3"), ("labels", "idx1")):
        names = [f"{prefix}-{kind}-{code}-ubyte", f"{prefix}-{kind}.{code}-ubyte"]
        names += [n + ".gz" for n in names]
        hit = next((folder / n for n in names if (folder / n).is_file()), None)
        if hit is None:
            raise FileNotFoundError(
                f"MNIST {split} {kind} not found in {folder}: looked for {', '.join(names)}"
            )
        found[kind] = hit
    return found["images"], found["labels"]


_NPZ_KEYS = {"train": [("x_train", "y_train"), ("images", "labels"), ("x", "y"), ("X", "y")],
             "test": [("x_test", "y_test"), ("images", "labels"), ("x", "y"), ("X", "y")]}


def _load_npz(path: Path, split: str):
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            for xk, yk in _NPZ_KEYS[split]:
                if xk in keys and yk in keys:
                    return z[xk], z[yk]
    except MemoryError as e:  # a header that claims more than there is memory for
        raise ValueError(f"{path}: its arrays do not fit in memory ({e})") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read as .npz ({e}); the file may be truncated or corrupt") from None
    wanted = " or ".join(f"({a}, {b})" for a, b in _NPZ_KEYS[split])
    raise ValueError(f"{path}: .npz file has arrays {sorted(keys)}, expected {wanted} for split={split!r}")


def load_mnist_arrays(path, split: str = "train", labels=None):
    """The raw MNIST ``(images [m, 28, 28] or [m, p], labels [m])`` from the user's files, checked.

    ``path`` and ``labels`` as in :func:`mnist`.  Returns ``(images, labels, source description)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        img_path, lab_path = _find_in_dir(p, split)
        images, labs = read_idx(img_path), read_idx(lab_path)
        src = f"{img_path} / {lab_path}"
    elif p.suffix.lower() == ".npz":
        images, labs = _load_npz(p, split)
        src = str(p)
    else:
        if not p.exists():
            raise FileNotFoundError(f"MNIST path not found: {p} (give a folder of IDX files, an images IDX file or an .npz file)")
        if labels is None:
            name = p.name
            if "images" not in name:
                raise ValueError(f"{p}: cannot infer the labels file from this name (it holds no 'images'): name "
                                 "it like train-images-idx3-ubyte[.gz] with train-labels-idx1-ubyte[.gz] beside it, "
                                 "give their folder or an .npz file (from Python: labels=PATH)")
            lab_path = p.with_name(name.replace("images", "labels").replace("idx3", "idx1"))
        else:
            lab_path = Path(labels)
        images, labs = read_idx(p), read_idx(lab_path)
        src = f"{p} / {lab_path}"
    images = np.asarray(images)
    labs = np.asarray(labs)
    if labs.ndim == 2 and 1 in labs.shape:  # column vectors from some .npz writers
        labs = labs.reshape(-1)
    if images.ndim < 2:
        raise ValueError(f"{src}: images must have shape [m, rows, cols] or [m, p], got {list(images.shape)}")
    if labs.ndim != 1:
        raise ValueError(f"{src}: labels must have shape [m], got {list(labs.shape)}")
    if labs.shape[0] != images.shape[0]:
        raise ValueError(f"{src}: images and labels disagree: {images.shape[0]} images but {labs.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError(f"{src}: holds no images (shape {list(images.shape)})")
    if labs.dtype == np.bool_ or not np.issubdtype(labs.dtype, np.number):
        raise ValueError(f"{src}: labels must be integers 0..9, got dtype {labs.dtype}")
    if not np.issubdtype(labs.dtype, np.integer):  # float labels: only whole numbers are classes
        if not np.all(np.isfinite(labs)) or np.any(labs != np.round(labs)):
            raise ValueError(f"{src}: labels must be integers 0..9, got non-integer values (dtype {labs.dtype})")
    if labs.min() < 0 or labs.max() > 9:
        raise ValueError(f"{src}: labels must be digits 0..9, got range [{labs.min()}, {labs.max()}]")
    return images, labs.astype(np.int64), src


def mnist(path, d: int = 10, split: str = "train", m: int | None = None, seed: int = 0,
          labels=None, dtype: torch.dtype = torch.float64, max_m: int | None = None):
    """Real MNIST from the user's files, prepared as :func:`digits` (PCA-``d``, whitened, one-hot).

    Args:
        path: a folder holding ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte`` (or the
            ``t10k-*`` files for ``split="test"``, each optionally ``.gz``), an images IDX file (its
            labels file is ``labels`` or found by name beside it), or an ``.npz`` file with arrays
            ``x_train, y_train`` (``x_test, y_test``), ``images, labels`` or ``x, y``.
        d: principal components kept.
        split: ``"train"`` or ``"test"``.
        m: optional seeded subsample size (whitening uses the subset).
        seed: seeds the subsample.
        labels: labels IDX file when ``path`` is an images IDX file with a non-standard name.
        dtype: output dtype.
        max_m: subsample to at most this many samples when there are more (and ``m`` is ``None``).

    Returns:
        ``(X [m, d], Y [m, 10])``.

    Raises:
        FileNotFoundError: a file is missing (the message names it).
        ValueError: a file is truncated, not in the expected format, or images and labels disagree.
    """
    images, labs, src = load_mnist_arrays(path, split, labels)
    if m is None and max_m is not None and images.shape[0] > max_m:
        m = max_m
    idx = _subsample(images.shape[0], m, seed)
    if idx is not None:
        images, labs = images[idx], labs[idx]
    return prepare_classification(images, labs, d=d, num_classes=10, dtype=dtype, name=f"mnist ({src})")


# --------------------------------------------------------------------------- linear baselines
def best_linear_loss(X, Y, input_proj=None, readout=None) -> float:
    """``L_min = 1/(2m) ||Y - X W*^T||_F^2`` with ``W* = S_yx S_xx^+`` (docs/science.md section 1).

    ``S_xx = X^T X / m`` and ``S_yx = Y^T X / m`` (rows are samples). Computed in float64.

    With a net's frozen projections (``input_proj`` ``E [d, p]``, ``readout`` ``P [q, d]``) the best
    loss of the maps ``P A E`` a linear net of width ``d`` can be: ``1/(2m) ||Y - Pi_U Y Pi_P||_F^2``
    (``U = X E^T``, ``Pi`` the orthogonal projections onto ``U``'s columns and ``P``'s columns).  It is
    ``L_min`` unless a projection loses rank (``d`` below the number of inputs or of targets).

    >>> X = torch.eye(3, dtype=torch.float64); best_linear_loss(X, 2 * X)
    0.0
    """
    x = _as_float64("X", X)
    y = _as_float64("Y", Y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows (samples), got {x.shape[0]} and {y.shape[0]}")
    m = x.shape[0]
    if m == 0:
        raise ValueError("X and Y must have at least one sample")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("X and Y must be finite, got nan or inf entries")
    if input_proj is not None:
        e = _as_float64("input_proj", input_proj)
        if not np.isfinite(e).all():
            raise ValueError("input_proj must be finite, got nan or inf entries")
        if readout is not None and np.ndim(readout) == 2 and np.shape(readout)[1] != e.shape[0]:
            raise ValueError(f"input_proj [d, p] and readout [q, d] must have one width d, got {list(e.shape)} and "
                             f"{list(np.shape(readout))}")
        if e.shape[1] != x.shape[1]:
            raise ValueError(f"input_proj must have shape [d, {x.shape[1]}] (X has {x.shape[1]} features), got "
                             f"{list(e.shape)}")
        x = x @ e.T  # [m, d]
    # least squares on X itself (the normal equations' pinv(S_xx) would square X's condition number)
    w, *_ = np.linalg.lstsq(x, y, rcond=None)  # [d, q]: the minimiser W*^T, minimum-norm where X is singular
    fit = x @ w
    if readout is not None:
        p = _as_float64("readout", readout)  # [q, d]
        if not np.isfinite(p).all():
            raise ValueError("readout must be finite, got nan or inf entries")
        if p.shape[0] != y.shape[1]:
            raise ValueError(f"readout must have shape [{y.shape[1]}, d] (Y has {y.shape[1]} targets), got "
                             f"{list(p.shape)}")
        fit = fit @ (p @ np.linalg.pinv(p))  # rows projected onto the read-out's range
    r = y - fit
    return float(max(0.5 * np.sum(r * r) / m, 0.0))


def second_moment_compress(X, Y, rtol: float = 1e-12):
    """An exact small stand-in for ``(X, Y)`` for **linear** networks **(ours)**.

    For a linear map ``A``, ``1/(2m) sum ||A x_i - y_i||^2 = 1/2 tr([A, -I] C [A, -I]^T)`` with
    ``C = Z^T Z / m`` and ``Z = [X, Y]``: the loss (hence its gradient and Hessian with respect to
    any factorisation of ``A``) depends on the data only through ``C``.  This returns
    ``(Xc [k, d], Yc [k, q])`` with ``k <= min(m, d + q)`` and ``Zc^T Zc / k = C``, so a linear
    net's loss, gradient and Hessian on ``(Xc, Yc)`` equal those on ``(X, Y)`` up to rounding.
    Nonlinear nets must use the full data.

    ``Zc`` is the triangular factor of a QR decomposition of ``Z`` (scaled), not a square root of
    ``C``: ``C`` would square the condition number of ``Z``, and with targets far larger than the
    inputs its small eigenvalues (the input directions) drop below rounding.  Rows of ``R`` shorter
    than ``rtol`` times the longest (directions ``Z`` does not span) are left out.
    """
    x = _as_float64("X", X)
    y = _as_float64("Y", Y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows (samples), got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("X and Y must have at least one sample")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("X and Y must be finite, got nan or inf entries")
    dtype = X.dtype if isinstance(X, torch.Tensor) else torch.float64
    z = np.concatenate([x, y], axis=1)
    m = z.shape[0]
    r = np.linalg.qr(z, mode="r")  # [min(m, d+q), d+q]: r^T r = z^T z
    norms = np.linalg.norm(r, axis=1)
    keep = norms > rtol * max(norms.max(), 1e-300)
    k = int(keep.sum())
    if k == 0:
        zc = np.zeros((1, z.shape[1]))
    else:
        zc = np.sqrt(k / m) * r[keep]  # [k, d+q]: zc^T zc / k = z^T z / m = c
    d = x.shape[1]
    return torch.as_tensor(zc[:, :d], dtype=dtype), torch.as_tensor(zc[:, d:], dtype=dtype)
