"""Loads the compiled extension ``shortcut_ext._C`` and says plainly when it is missing."""
from __future__ import annotations

import warnings

import torch

_C = None
_LOAD_ERROR: str | None = None

BUILD_HINT = (
    "the compiled extension shortcut_ext._C is not available ({err}); the pure-PyTorch backend "
    "(backend='torch') still works. Build the kernels with:\n"
    "    pip install torch==2.13.0 setuptools wheel ninja\n"
    "    pip install --no-build-isolation .\n"
    "(and run from outside the source tree, so that the installed package is imported)"
)

import importlib.util
import os

if importlib.util.find_spec(f"{__package__}._C") is None:
    _LOAD_ERROR = f"no compiled module _C next to {os.path.dirname(os.path.abspath(__file__))}"
else:
    try:  # importing _C runs TORCH_LIBRARY registration of every op schema and CPU/CUDA kernel
        from . import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as e:  # e.g. built against another torch: undefined symbols
        _LOAD_ERROR = f"importing it failed: {e}"
        _C = None

if _C is not None:
    _built_with = _C.build_info().get("torch_version", "")
    if _built_with and _built_with.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(
            f"shortcut_ext._C was built against torch {_built_with} but torch {torch.__version__} "
            "is running; rebuild with `pip install --no-build-isolation .` if ops fail to load",
            RuntimeWarning,
            stacklevel=2,
        )


def is_built() -> bool:
    """True when the compiled kernels are importable."""
    return _C is not None


def build_info() -> dict:
    """How the extension was built: ``{'cuda': bool, 'cuda_version': str, 'cpu_gemm': str, ...}``."""
    if _C is None:
        return {"built": False, "error": _LOAD_ERROR}
    info = dict(_C.build_info())
    info["built"] = True
    return info


def require_built(what: str = "the fused backend") -> None:
    if _C is None:
        raise RuntimeError(f"{what} cannot run: " + BUILD_HINT.format(err=_LOAD_ERROR))
