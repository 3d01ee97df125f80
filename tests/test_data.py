"""Data preparation (docs/science.md section 4): synthetic teacher, digits / MNIST whitening, L_min, compression."""
from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from shortcut_ext.data import (best_linear_loss, digits, mnist, prepare_classification, read_idx,
                               second_moment_compress, synthetic_teacher)
from shortcut_ext.models import ShortcutNet
from shortcut_ext.reference import loss_fn


# --------------------------------------------------------------------------- synthetic
def test_synthetic_shapes_seed_and_identity_teacher():
    X, Y = synthetic_teacher(7, 3, seed=1)
    assert X.shape == (7, 3) and Y.shape == (7, 3) and X.dtype == torch.float64
    X2, Y2 = synthetic_teacher(7, 3, seed=1)
    assert torch.equal(X, X2) and torch.equal(Y, Y2)
    assert not torch.equal(X, synthetic_teacher(7, 3, seed=2)[0])
    X, Y = synthetic_teacher(5, 3, teacher=np.eye(3))
    assert torch.equal(X, Y)
    T = np.arange(6.0).reshape(2, 3)
    X, Y = synthetic_teacher(4, 3, teacher=T, dtype=torch.float32)
    assert Y.shape == (4, 2) and Y.dtype == torch.float32
    torch.testing.assert_close(Y, X @ torch.as_tensor(T, dtype=torch.float32).T)


def test_synthetic_covariance_and_noise():
    cov = np.array([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])  # singular is allowed
    X, Y = synthetic_teacher(40000, 3, seed=0, cov=cov, noise=0.5, teacher=np.eye(3))
    S = (X.T @ X / X.shape[0]).numpy()
    np.testing.assert_allclose(S, cov, atol=0.08)
    noise_var = ((Y - X) ** 2).mean().item()
    assert abs(noise_var - 0.25) < 0.01


@pytest.mark.parametrize("kwargs, match", [
    (dict(cov=np.eye(2)), "cov must have shape"),
    (dict(cov=np.array([[1.0, 2.0, 0], [0, 1.0, 0], [0, 0, 1.0]])), "symmetric"),
    (dict(cov=-np.eye(3)), "positive semi-definite"),
    (dict(teacher=np.eye(2)), "teacher must have shape"),
    (dict(noise=-1.0), "noise"),
])
def test_synthetic_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_teacher(5, 3, **kwargs)


def test_synthetic_bad_sizes():
    with pytest.raises(ValueError, match="m must be"):
        synthetic_teacher(0, 3)
    with pytest.raises(TypeError, match="dtype"):
        synthetic_teacher(3, 3, dtype=torch.int64)


# --------------------------------------------------------------------------- digits
def _check_prepared(X, Y, m, d, classes=10):
    assert X.shape == (m, d) and Y.shape == (m, classes)
    torch.testing.assert_close(X.T @ X / m, torch.eye(d, dtype=X.dtype), atol=1e-10, rtol=0)
    torch.testing.assert_close(X.mean(0), torch.zeros(d, dtype=X.dtype), atol=1e-12, rtol=0)
    assert set(torch.unique(Y).tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(Y.sum(1), torch.ones(m, dtype=Y.dtype))


def test_digits_whitened_top10_one_hot():
    from sklearn.datasets import load_digits

    X, Y = digits()
    _check_prepared(X, Y, 1797, 10)
    assert torch.equal(Y.argmax(1), torch.as_tensor(load_digits().target))
    # the 10 leading principal components: their span holds more variance than any other 10 directions
    raw = load_digits().data
    raw = raw - raw.mean(0)
    e = np.linalg.eigvalsh(raw.T @ raw / raw.shape[0])[::-1]
    proj = raw @ np.linalg.lstsq(raw, X.numpy(), rcond=None)[0]  # X is a linear image of the centred data
    np.testing.assert_allclose(proj, X.numpy(), atol=1e-8)
    Q = np.linalg.qr(np.linalg.lstsq(raw, X.numpy(), rcond=None)[0])[0]
    captured = np.trace(Q.T @ (raw.T @ raw / raw.shape[0]) @ Q)
    np.testing.assert_allclose(captured, e[:10].sum(), rtol=1e-8)


def test_digits_subsample_and_dims():
    X, Y = digits(d=5, m=300, seed=3)
    _check_prepared(X, Y, 300, 5)
    X2, _ = digits(d=5, m=300, seed=3)
    assert torch.equal(X, X2)
    with pytest.raises(ValueError, match="m must be <="):
        digits(m=5000)
    with pytest.raises(ValueError, match="d must be <="):
        digits(d=65)


def test_prepare_classification_errors():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 6))
    with pytest.raises(ValueError, match="labels must have shape"):
        prepare_classification(img, np.zeros(19, int), d=3)
    with pytest.raises(ValueError, match="only 2 principal components"):
        prepare_classification(np.repeat(img[:, :2], 3, axis=1), np.zeros(20, int), d=3)
    with pytest.raises(ValueError, match="< num_classes"):
        prepare_classification(img, np.full(20, 7), d=3, num_classes=5)
    with pytest.raises(ValueError, match="more samples than components"):
        prepare_classification(img[:3], np.zeros(3, int), d=3)


# --------------------------------------------------------------------------- MNIST files
def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _fake_mnist(m=60, side=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(m, side, side), dtype=np.uint8), rng.integers(0, 10, size=m, dtype=np.uint8)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_folder(tmp_path, gz):
    img, lab = _fake_mnist()
    for name, arr in (("train-images-idx3-ubyte", img), ("train-labels-idx1-ubyte", lab)):
        raw = _idx_bytes(arr)
        if gz:
            (tmp_path / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (tmp_path / name).write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else ""))), img)
    X, Y = mnist(tmp_path, d=10)
    _check_prepared(X, Y, 60, 10)
    assert torch.equal(Y.argmax(1), torch.as_tensor(lab, dtype=torch.long))
    Xs, Ys = mnist(tmp_path, d=4, m=30, seed=1)
    _check_prepared(Xs, Ys, 30, 4)


def test_mnist_images_file_and_npz(tmp_path):
    img, lab = _fake_mnist(seed=1)
    (tmp_path / "my-images-idx3-ubyte").write_bytes(_idx_bytes(img))
    (tmp_path / "my-labels-idx1-ubyte").write_bytes(_idx_bytes(lab))
    X1, Y1 = mnist(tmp_path / "my-images-idx3-ubyte", d=6)
    np.savez(tmp_path / "mnist.npz", x_train=img, y_train=lab, x_test=img[:20], y_test=lab[:20])
    X2, Y2 = mnist(tmp_path / "mnist.npz", d=6)
    torch.testing.assert_close(X1, X2)
    assert torch.equal(Y1, Y2)
    X3, _ = mnist(tmp_path / "mnist.npz", d=6, split="test")
    assert X3.shape == (20, 6)


def test_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        mnist(tmp_path)
    img, _ = _fake_mnist()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(img))
    with pytest.raises(FileNotFoundError, match="labels not found.*train-labels-idx1-ubyte"):
        mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        mnist(tmp_path / "nothere.npz")
    with pytest.raises(FileNotFoundError, match="nothere"):
        mnist(tmp_path / "nothere")


def test_mnist_truncated_and_corrupt(tmp_path):
    img, lab = _fake_mnist()
    good_lab = _idx_bytes(lab)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(good_lab)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(img)[:-10])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: truncated IDX data, header says shape \[60, 6, 6\]"):
        mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(img)[:7])
    with pytest.raises(ValueError, match="truncated IDX header"):
        mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + _idx_bytes(img)[4:])
    with pytest.raises(ValueError, match="not an IDX file, magic number is 12345678"):
        mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(img) + b"\0")
    with pytest.raises(ValueError, match="longer than its header"):
        mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(img))[:-20])
    with pytest.raises(ValueError, match="gzip data is truncated or corrupt"):
        mnist(tmp_path)


def test_mnist_mismatched(tmp_path):
    img, lab = _fake_mnist()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(img))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(lab[:50]))
    with pytest.raises(ValueError, match="60 images but 50 labels"):
        mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.full(60, 12)))
    with pytest.raises(ValueError, match="labels must be digits 0..9"):
        mnist(tmp_path)
    np.savez(tmp_path / "bad.npz", a=img, b=lab)
    with pytest.raises(ValueError, match=r"has arrays \['a', 'b'\], expected \(x_train, y_train\)"):
        mnist(tmp_path / "bad.npz")
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "bad.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="trunc.npz"):
        mnist(tmp_path / "trunc.npz")
    with pytest.raises(ValueError, match="split"):
        mnist(tmp_path, split="valid")


# --------------------------------------------------------------------------- L_min and compression
def test_best_linear_loss_matches_least_squares():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4))
    Y = rng.normal(size=(50, 3))
    W, *_ = np.linalg.lstsq(X, Y, rcond=None)
    ref = 0.5 * np.sum((Y - X @ W) ** 2) / 50
    assert best_linear_loss(torch.as_tensor(X), torch.as_tensor(Y)) == pytest.approx(ref, rel=1e-10)
    Xr = np.concatenate([X, X[:, :1]], axis=1)  # rank deficient S_xx: the pseudo-inverse still gives the optimum
    assert best_linear_loss(Xr, Y) == pytest.approx(ref, rel=1e-8)
    X, Y = synthetic_teacher(30, 4, noise=0.0)
    assert best_linear_loss(X, Y) < 1e-20
    with pytest.raises(ValueError, match="same number of rows"):
        best_linear_loss(X, Y[:3])


def test_best_linear_loss_through_a_nets_projections_is_its_floor():
    """A read-out of rank d < q targets keeps every linear net of width d above L_min: with the projections
    given, best_linear_loss is the loss a fully trained linear net of that width reaches (train's reported
    "loss - L_min" stayed at 0.07 for a converged digits run at width 4)."""
    from shortcut_ext.train import train

    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(40, 3, dtype=torch.float64, generator=g), torch.randn(40, 5, dtype=torch.float64, generator=g)
    net = ShortcutNet(3, 1, 2, init="xavier", out_features=5, backend="torch", dtype=torch.float64)
    floor = best_linear_loss(X, Y, readout=net.readout)
    assert floor > best_linear_loss(X, Y) + 1e-3
    res = train(net, (X, Y), epochs=4000, lr=0.2)
    assert res.final_loss == pytest.approx(floor, rel=1e-6)
    # full-rank projections change nothing; wrong shapes are named
    P = torch.randn(5, 5, dtype=torch.float64, generator=g)
    assert best_linear_loss(X, Y, readout=P) == pytest.approx(best_linear_loss(X, Y), rel=1e-9)
    with pytest.raises(ValueError, match=r"readout must have shape \[5, d\]"):
        best_linear_loss(X, Y, readout=P[:4])
    with pytest.raises(ValueError, match=r"input_proj must have shape \[d, 3\]"):
        best_linear_loss(X, Y, input_proj=P)
    with pytest.raises(ValueError, match="input_proj must be finite"):  # an inf hung LAPACK's least squares
        best_linear_loss(X, Y, input_proj=torch.full((3, 3), math.inf, dtype=torch.float64))


def test_second_moment_compress_is_exact_for_linear_nets():
    X, Y = synthetic_teacher(200, 4, seed=2, noise=0.3)
    Xc, Yc = second_moment_compress(X, Y)
    assert Xc.shape == (8, 4) and Yc.shape == (8, 4)
    assert best_linear_loss(Xc, Yc) == pytest.approx(best_linear_loss(X, Y), rel=1e-10)
    net = ShortcutNet(4, 3, 2, init="xavier", seed=1, backend="torch", dtype=torch.float64)

    def lg(x, y):
        L = loss_fn("mse", net(x), y)
        (g,) = torch.autograd.grad(L, net.weight)
        return L.detach(), g

    (L1, g1), (L2, g2) = lg(X, Y), lg(Xc, Yc)
    torch.testing.assert_close(L1, L2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11)
    # a nonlinear net sees the difference: the compression is for linear nets only
    relu = ShortcutNet(4, 3, 2, mid="relu", init="xavier", seed=1, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        assert abs(float(loss_fn("mse", relu(X), Y) - loss_fn("mse", relu(Xc), Yc))) > 1e-6


def test_mnist_labels_must_be_whole_digits(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (12, 4, 4)).astype(np.uint8)
    labs = np.arange(12) % 9
    for name, y, pattern in (("frac", labs + 0.3, "non-integer values"), ("nan", np.full(12, np.nan), "non-integer"),
                             ("bool", labs > 3, "dtype bool"), ("str", labs.astype(str), "dtype <U")):
        np.savez(tmp_path / f"{name}.npz", x=imgs, y=y)
        with pytest.raises(ValueError, match=f"{name}.npz.*labels must be integers 0..9, got {pattern}"):
            mnist(tmp_path / f"{name}.npz", d=5)
    np.savez(tmp_path / "whole.npz", x=imgs, y=labs.astype(np.float32))  # whole numbers stored as floats are fine
    X, Y = mnist(tmp_path / "whole.npz", d=5)
    assert torch.equal(Y.argmax(1), torch.as_tensor(labs))
    np.savez(tmp_path / "empty.npz", x=imgs[:0], y=labs[:0])
    with pytest.raises(ValueError, match="holds no images"):
        mnist(tmp_path / "empty.npz", d=5)


def test_linear_helpers_refuse_non_finite_and_empty_data():
    X, Y = torch.tensor([[float("nan")], [1.0]]), torch.tensor([[1.0], [2.0]])
    for f in (second_moment_compress, best_linear_loss):
        with pytest.raises(ValueError, match="must be finite"):
            f(X, Y)
        with pytest.raises(ValueError, match="at least one sample"):
            f(torch.zeros(0, 3), torch.zeros(0, 2))


def test_synthetic_teacher_accepts_numpy_scalars():
    a = synthetic_teacher(6, 3, noise=np.float32(0.25), seed=np.int64(4))
    b = synthetic_teacher(6, 3, noise=float(np.float32(0.25)), seed=4)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        synthetic_teacher(6, 3, seed=-1)


def test_best_linear_loss_with_input_projection_and_readout_is_the_least_squares_over_the_nets_maps():
    """Not tested: ``best_linear_loss(X, Y, input_proj=E, readout=P)`` (only the plain ``L_min`` was).  Reference:
    brute-force least squares over every map ``P A E`` of a linear net of width d (``vec(U A^T P^T) = (P kron
    U) vec(A^T)``, ``U = X E^T``), with E and P the frozen projections of a ShortcutNet with p = 7 inputs, width
    3 and q = 5 targets (both lose rank, so the value lies above the plain L_min)."""
    rng = np.random.default_rng(0)
    m, p, d, q = 50, 7, 3, 5
    X, Y = torch.tensor(rng.standard_normal((m, p))), torch.tensor(rng.standard_normal((m, q)))
    net = ShortcutNet(d, 2, 2, in_features=p, out_features=q, init="small", seed=0, dtype=torch.float64)
    E, P = net.input_proj, net.readout
    assert tuple(E.shape) == (d, p) and tuple(P.shape) == (q, d)
    U, Pn = (X @ E.T).numpy(), P.numpy()
    K = np.kron(Pn, U)
    yv = Y.numpy().reshape(-1, order="F")
    a, *_ = np.linalg.lstsq(K, yv, rcond=None)
    r = yv - K @ a
    ref = 0.5 * float(r @ r) / m
    got = best_linear_loss(X, Y, input_proj=E, readout=P)
    assert got == pytest.approx(ref, rel=1e-12)
    assert got > best_linear_loss(X, Y) * 1.05  # the projections cost something here
    # the loss of the net's own maps P A E never goes below it: at the least-squares A it equals it
    A = torch.tensor(a.reshape(d, d, order="F").T)  # vec(A^T) -> A
    fit = X @ E.T @ A.T @ P.T
    assert float(0.5 * ((Y - fit) ** 2).sum() / m) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match=r"input_proj \[d, p\] and readout \[q, d\] must have one width d, got "
                                         r"\[3, 7\] and \[5, 4\]"):
        best_linear_loss(X, Y, input_proj=E, readout=torch.zeros(5, 4, dtype=torch.float64))


def test_whole_number_float_labels_are_the_integer_labels():
    """Not tested: ``prepare_classification`` with float labels: whole numbers give the same result as the
    integers, a fraction or a NaN is refused."""
    rng = np.random.default_rng(0)
    imgs = rng.standard_normal((30, 8))
    labs = rng.integers(0, 10, 30)
    a = prepare_classification(imgs, labs, d=3, num_classes=10)
    b = prepare_classification(imgs, labs.astype(np.float64), d=3, num_classes=10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a[1].argmax(1), torch.as_tensor(labs))
    with pytest.raises(ValueError, match="labels must be integers, got dtype float64"):
        prepare_classification(imgs, labs + 0.5, d=3, num_classes=10)
    with pytest.raises(ValueError, match="labels must be integers"):
        prepare_classification(imgs, np.where(labs > 4, np.nan, labs), d=3, num_classes=10)



def test_mnist_npz_column_labels_and_max_m(tmp_path):
    """Not tested: an ``.npz`` whose labels are a column ``[m, 1]`` (some writers save them so: the same as
    ``[m]``) and ``mnist(max_m=...)``: the seeded subsample ``m = max_m`` when there are more images, all of
    them when there are fewer."""
    rng = np.random.default_rng(1)
    imgs = rng.standard_normal((30, 2, 4))
    labs = rng.integers(0, 10, 30)
    np.savez(tmp_path / "col.npz", x_train=imgs, y_train=labs.reshape(-1, 1))
    np.savez(tmp_path / "flat.npz", x_train=imgs, y_train=labs)
    Xc, Yc = mnist(tmp_path / "col.npz", d=3)
    Xf, Yf = mnist(tmp_path / "flat.npz", d=3)
    assert torch.equal(Xc, Xf) and torch.equal(Yc, Yf) and torch.equal(Yc.argmax(1), torch.as_tensor(labs))
    X2, Y2 = mnist(tmp_path / "col.npz", d=3, max_m=20, seed=4)
    X3, Y3 = mnist(tmp_path / "col.npz", d=3, m=20, seed=4)
    assert X2.shape == (20, 3) and torch.equal(X2, X3) and torch.equal(Y2, Y3)
    X4, Y4 = mnist(tmp_path / "col.npz", d=3, max_m=40)
    assert torch.equal(X4, Xf) and torch.equal(Y4, Yf)


def test_second_moment_compress_of_all_zero_data_is_one_zero_row():
    """Not tested: ``second_moment_compress`` of data with no direction at all (every row of R below the
    tolerance).  It returns one zero sample (k = 1, not an empty batch a net cannot train on), whose second
    moment is the data's (zero), so a linear net's loss and gradient on it equal those on the data."""
    X, Y = torch.zeros(6, 3, dtype=torch.float64), torch.zeros(6, 2, dtype=torch.float64)
    Xc, Yc = second_moment_compress(X, Y)
    assert Xc.shape == (1, 3) and Yc.shape == (1, 2) and Xc.dtype == torch.float64
    assert not Xc.any() and not Yc.any()
    net = ShortcutNet(3, 2, 2, out_features=2, init="xavier", seed=0, dtype=torch.float64)
    for data in ((X, Y), (Xc, Yc)):
        L = loss_fn("mse", net(data[0]), data[1])
        (g,) = torch.autograd.grad(L, net.weight)
        assert float(L.detach()) == 0.0 and not g.any()


def test_smallest_sizes_are_accepted():
    """Not pinned: the size checks' minimum is inclusive: ``synthetic_teacher(m, 1)`` (one feature) and
    ``digits(m=1797)`` (every sample, the whole set) are valid; one more sample is refused."""
    X, Y = synthetic_teacher(5, 1, seed=0)
    assert X.shape == (5, 1) and Y.shape == (5, 1)
    X, Y = digits(d=4, m=1797)
    assert X.shape == (1797, 4) and Y.shape == (1797, 10)
    with pytest.raises(ValueError, match="m must be <= the number of available samples 1797"):
        digits(d=4, m=1798)


def test_digits_targets_have_ten_columns_when_the_subset_lacks_a_digit():
    """Not pinned: digits' one-hot targets have 10 columns whatever digits a small subset holds (a subset
    without a 9 had 9 columns, another out_features than the full set's)."""
    X, Y = digits(d=5, m=12, seed=2)
    assert Y.shape == (12, 10) and torch.equal(Y.sum(1), torch.ones(12, dtype=Y.dtype))
    assert Y[:, 9].sum() == 0  # this seed's subset has no 9: the case the columns must not depend on


def test_prepare_classification_refuses_a_label_equal_to_num_classes():
    """Not pinned: labels must be < num_classes; a label equal to it fell through to the one-hot write (an
    IndexError, not the ValueError naming num_classes)."""
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(20, 5))
    with pytest.raises(ValueError, match="labels must be < num_classes = 3, got max 3"):
        prepare_classification(imgs, np.arange(20) % 4, d=2, num_classes=3)
    assert prepare_classification(imgs, np.arange(20) % 3, d=2, num_classes=3)[1].shape == (20, 3)


def test_mnist_test_split_reads_the_t10k_files(tmp_path):
    """Not pinned: ``split="test"`` reads MNIST's own names for the test files, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte`` (it looked for ``test-...``: FileNotFoundError on the real folder)."""
    from shortcut_ext.data import load_mnist_arrays

    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 2, 2))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + bytes(range(8)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + bytes([3, 4]))
    images, labels = load_mnist_arrays(tmp_path, split="test")[:2]
    assert images.shape == (2, 2, 2) and labels.tolist() == [3, 4]
    with pytest.raises(FileNotFoundError):
        load_mnist_arrays(tmp_path, split="train")


def test_mnist_label_10_is_refused(tmp_path):
    """Not pinned: MNIST labels are digits 0..9; a 10 (e.g. SVHN's label for 0) is refused, not made an
    eleventh class."""
    from shortcut_ext.data import load_mnist_arrays

    np.savez(tmp_path / "m.npz", x_train=np.zeros((3, 4)), y_train=np.array([1, 10, 2]))
    with pytest.raises(ValueError, match=r"labels must be digits 0\.\.9, got range \[1, 10\]"):
        load_mnist_arrays(tmp_path / "m.npz")
    np.savez(tmp_path / "ok.npz", x_train=np.zeros((3, 4)), y_train=np.array([1, 9, 2]))
    assert load_mnist_arrays(tmp_path / "ok.npz")[1].tolist() == [1, 9, 2]
