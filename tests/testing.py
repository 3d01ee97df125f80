"""Shared test helpers: which devices and dtypes to run on, tolerances, seeded inputs."""
from __future__ import annotations

import os

import pytest
import torch

import shortcut_ext

DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny ops: on 2 shared cores a second thread only adds contention.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` and ``from testing import one_thread``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cuda_built() -> bool:
    return shortcut_ext.is_built() and bool(shortcut_ext.build_info().get("cuda", False))


def devices() -> list:
    """``cpu`` always; ``cuda`` where a GPU and the CUDA kernels are both present.

    ``SHORTCUT_EXT_REQUIRE_CUDA=1`` (benchmarks/gpu/run.sh sets it) turns a missing GPU or a build
    without the CUDA kernels into an error at collection, so that a GPU run cannot pass by skipping.
    """
    out = ["cpu"]
    if torch.cuda.is_available() and cuda_built():
        out.append("cuda")
    elif os.environ.get("SHORTCUT_EXT_REQUIRE_CUDA", "0") not in ("", "0"):
        raise RuntimeError(
            "SHORTCUT_EXT_REQUIRE_CUDA is set, but the CUDA tests cannot run: "
            f"torch.cuda.is_available()={torch.cuda.is_available()} (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}), CUDA kernels built={cuda_built()} (shortcut_ext from {shortcut_ext.__file__})")
    return out


DEVICES = devices()

requires_fused = pytest.mark.skipif(not shortcut_ext.is_built(), reason="shortcut_ext._C is not built")


def tol(dtype: torch.dtype) -> dict:
    """Tolerances of the fused kernels against the reference (same maths, different summation order)."""
    # float32: ~250 ulp elementwise, ~25 ulp of the largest value absolute (measured errors: a few ulp; the
    # earlier 1e-4 / 1e-5 passed a systematic 67-ulp error in every output)
    return dict(rtol=3e-5, atol=3e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)


def stack_inputs(B, d, R, n, dtype=torch.float64, device="cpu", scale=None, seed=0, requires_grad=False):
    """Seeded ``x [B, d]`` and ``weights [R, n, d, d]`` scaled so that deep stacks stay finite."""
    g = torch.Generator().manual_seed(seed)
    if scale is None:
        scale = 0.5 / (d ** 0.5 * max(R, 1) ** 0.5)
    x = torch.randn(B, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = (torch.randn(R, n, d, d, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad)


def assert_close_lowp(out: torch.Tensor, ref_same: torch.Tensor, ref64: torch.Tensor, factor: float = 5.0) -> None:
    """For float32: the kernel's error against a float64 reference stays within a small multiple of
    PyTorch's own float32 error (flash-attention's rule), plus a floor at float32 resolution."""
    ref64 = ref64.to(torch.float64)
    err = (out.to(torch.float64) - ref64).abs().max().item() if out.numel() else 0.0
    base = (ref_same.to(torch.float64) - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    bound = factor * base + 2e-6 * scale + 1e-12  # floor: ~17 ulp of the largest value (1e-5 hid 67-ulp errors)
    assert err <= bound, f"float32 error {err:.3e} exceeds {factor} x torch's own {base:.3e} (+ floor) = {bound:.3e}"


class DispatchCalls:
    """A context that records the name of every op dispatched inside it (``calls.names``): which kernels a call
    ran, not only what it returned (a silent fallback to a reference gives the same values)."""

    def __new__(cls):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Calls(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.names = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.names.append(str(func))
                return func(*args, **(kwargs or {}))

        return _Calls()


def unsigned_checkpoint(path) -> dict:
    """A train() checkpoint's state without its checksum: what an earlier version wrote, whose entries the
    resume still checks one by one (a test that damages entries by hand would otherwise meet the checksum)."""
    state = torch.load(path, weights_only=True)
    assert isinstance(state.pop("checksum", None), str)
    return state
