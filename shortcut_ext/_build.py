"""Loads the compiled extension ``shortcut_ext._C`` and says plainly when it is missing."""
from __future__ import annotations

import warnings

import torch

_C = None
_LOAD_ERROR: str | None = None

BUILD_HINT = (
    "the compiled extension shortcut_ext._C is not available ({err}); the pure-PyTorch backend "
    "(backend='torch') still works. Build the kernels with:\n"
    "    pip install setuptools wheel ninja   (with the torch you run already installed)\n"
    "    pip install --no-build-isolation .\n"
    "(and run from outside the source tree, so that the installed package is imported)"
)

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _own_spec(name: str):
    """The spec of module ``name`` beside this file, or None. Only here: an editable install's finder, later on
    ``sys.meta_path``, would give another source tree's build to a copy of the package that has none."""
    return importlib.machinery.PathFinder.find_spec(f"{__package__}.{name}", [_HERE])


def _load_own(name: str):
    """Imports module ``name`` from beside this file (the spec :func:`_own_spec` found), or returns None."""
    spec = _own_spec(name)
    if spec is None:
        return None
    full = f"{__package__}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    mod = importlib.util.module_from_spec(spec)
    sys.modules[full] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[full]
        raise
    setattr(sys.modules[__package__], name, mod)
    return mod


class NotBuiltError(RuntimeError):
    """The fused backend was asked for, and the compiled kernels are not available (see ``build_info()``)."""


def _cpu_flags():
    """The flags every core of this machine has (/proc/cpuinfo, one line per core: the process may run on
    any of them), or None where they cannot be read (not Linux)."""
    common = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                    common = flags if common is None else common & flags
    except OSError:
        return None
    return common


def missing_isa(built, have) -> list:
    """The instruction-set flags a native build needs (``built``) that this CPU (``have``) lacks."""
    if not built or have is None:
        return []
    return sorted(set(built) - set(have))


try:  # written by setup.py; absent in a tree that was never built
    _record = _load_own("_build_cpu")
    _BUILD_ISA = getattr(_record, "ISA", None)
    _BUILD_TARGET = getattr(_record, "TARGET", "native" if _BUILD_ISA is not None else None)  # older records: no TARGET
except Exception:  # a damaged record: no check, as for a tree that was never built
    _BUILD_ISA = _BUILD_TARGET = None

def _other_builds() -> list:
    """Compiled ``_C`` files beside the package that this Python cannot import (built for another one)."""
    import glob

    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(_HERE, "_C.*")) if p.endswith((".so", ".pyd")))


if _own_spec("_C") is None:
    _LOAD_ERROR = f"no compiled module _C next to {_HERE}"
    if _other_builds():  # e.g. _C.cpython-311-...so under Python 3.12: say so, it is not silently unused
        _LOAD_ERROR += (f" for Python {sys.version_info[0]}.{sys.version_info[1]} (found "
                        f"{', '.join(_other_builds())}: built for another Python; rebuild with this one)")
        warnings.warn(f"shortcut_ext: the compiled kernels are not used: {_LOAD_ERROR}; the fused backend is "
                      "unavailable and the models default to backend='torch' (slower)", RuntimeWarning,
                      stacklevel=2)
elif missing_isa(_BUILD_ISA, _cpu_flags()):
    # loading it would stop the process with an illegal instruction (SIGILL), in its static initialisers
    _LOAD_ERROR = (f"it was built (-march={_BUILD_TARGET or 'native'}) for a CPU with instructions this CPU lacks "
                   f"({', '.join(missing_isa(_BUILD_ISA, _cpu_flags()))}), so it is not loaded: rebuild it on this "
                   "machine, or build with SHORTCUT_EXT_MARCH=x86-64-v3 for a package that runs on any CPU with AVX2 "
                   "and FMA, or SHORTCUT_EXT_NATIVE=0 for one that runs on any x86-64 CPU")
else:
    try:  # importing _C runs TORCH_LIBRARY registration of every op schema and CPU/CUDA kernel
        _C = _load_own("_C")
    except ImportError as e:  # e.g. built against another torch: undefined symbols
        _LOAD_ERROR = f"importing it failed: {e}"
        _C = None
if _C is None and _own_spec("_C") is not None:
    # a build is there and cannot be used: say so now (the models' default backend becomes "torch")
    warnings.warn(f"shortcut_ext: the compiled kernels are not used: {_LOAD_ERROR}; the fused backend is "
                  "unavailable and the models default to backend='torch' (slower)", RuntimeWarning, stacklevel=2)

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
    info["native_isa"] = None if _BUILD_ISA is None else list(_BUILD_ISA)  # None: a portable build
    info["cpu_target"] = _BUILD_TARGET  # the -march target: "native", a SHORTCUT_EXT_MARCH value, or None
    return info


def require_built(what: str = "the fused backend") -> None:
    if _C is None:
        raise NotBuiltError(f"{what} cannot run: " + BUILD_HINT.format(err=_LOAD_ERROR))
