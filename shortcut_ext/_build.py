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


def _own_spec(name: str, where: str = _HERE):
    """The spec of module ``name`` in folder ``where`` (beside this file by default), or None. Only there: an
    editable install's finder, later on ``sys.meta_path``, would give another source tree's build to a copy of
    the package that has none."""
    return importlib.machinery.PathFinder.find_spec(f"{__package__}.{name}", [where])


def _load_own(name: str, where: str = _HERE):
    """Imports module ``name`` (as ``shortcut_ext.<name>``) from folder ``where`` (the spec :func:`_own_spec`
    found), or returns None."""
    spec = _own_spec(name, where)
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


def choose_variant(variants, have, forced: str | None = None, present=None):
    """The module of a multi-target build (``SHORTCUT_EXT_MARCH=A,B,...``) to load on a CPU with flags
    ``have``: ``((folder, target, flags), None)``, or ``(None, why)`` when there is none.

    The first of ``variants`` (``(folder, target, flags)``, best first) whose flags the CPU has and whose
    module is there (its folder in ``present``; ``None``: all are), or the one whose target is ``forced``
    (``SHORTCUT_EXT_CPU_VARIANT``): refused, like any build, on a CPU that lacks one of its flags (it would
    stop the process with an illegal instruction).
    """
    names = ", ".join(t for _, t, _ in variants)
    there = (lambda v: True) if present is None else (lambda v: v[0] in present)
    if forced:
        chosen = [v for v in variants if forced in (v[1], v[0])]
        if not chosen:
            return None, (f"SHORTCUT_EXT_CPU_VARIANT={forced!r} is not a target of this build (it has: {names}); "
                          "unset it to load the best one for this CPU")
        lack = missing_isa(chosen[0][2], have)
        if lack:
            return None, (f"SHORTCUT_EXT_CPU_VARIANT={forced!r} asks for code built (-march={chosen[0][1]}) for a "
                          f"CPU with instructions this CPU lacks ({', '.join(lack)}), so it is not loaded; "
                          "unset it to load the best one for this CPU")
        if not there(chosen[0]):
            return None, (f"SHORTCUT_EXT_CPU_VARIANT={forced!r}: its module (_targets/{chosen[0][0]}/_C) is missing "
                          "from the package: rebuild it")
        return chosen[0], None
    runs = [v for v in variants if not missing_isa(v[2], have)]
    for v in runs:
        if there(v):
            return v, None
    if runs:
        return None, (f"the modules of this build's targets that this CPU runs "
                      f"({', '.join(f'_targets/{f}/_C' for f, _, _ in runs)}) are missing from the package: rebuild it")
    return None, (f"none of this build's targets ({names}) runs on this CPU (" +
                  "; ".join(f"{t} needs {', '.join(missing_isa(isa, have))}" for _, t, isa in variants) +
                  "), so none is loaded: rebuild with SHORTCUT_EXT_MARCH ending in x86-64 (every x86-64 CPU)")


try:  # written by setup.py; absent in a tree that was never built
    _record = _load_own("_build_cpu")
    _BUILD_ISA = getattr(_record, "ISA", None)
    _BUILD_TARGET = getattr(_record, "TARGET", "native" if _BUILD_ISA is not None else None)  # older records: no TARGET
    _VARIANTS = getattr(_record, "VARIANTS", None)  # a multi-target build's modules; older records: none
except Exception:  # a damaged record: no check, as for a tree that was never built
    _BUILD_ISA = _BUILD_TARGET = _VARIANTS = None

_C_DIR = _HERE  # the folder of the _C to load: beside this file, or a multi-target build's chosen target's
_VARIANT_ERROR = None
_forced = os.environ.get("SHORTCUT_EXT_CPU_VARIANT", "").strip()
if _VARIANTS:
    _present = {v[0] for v in _VARIANTS if _own_spec("_C", os.path.join(_HERE, "_targets", v[0])) is not None}
    _chosen, _VARIANT_ERROR = choose_variant(_VARIANTS, _cpu_flags(), _forced, _present)
    if _chosen is not None:
        _C_DIR = os.path.join(_HERE, "_targets", _chosen[0])
        _BUILD_TARGET, _BUILD_ISA = _chosen[1], tuple(_chosen[2])
elif _forced and _forced != _BUILD_TARGET:
    warnings.warn(f"shortcut_ext: SHORTCUT_EXT_CPU_VARIANT={_forced!r} is set, but this is not a multi-target "
                  f"build (SHORTCUT_EXT_MARCH=A,B,...): its one module (-march={_BUILD_TARGET or 'default'}) is "
                  "loaded", RuntimeWarning, stacklevel=2)


def _other_builds() -> list:
    """Compiled ``_C`` files in the folder it loads from that this Python cannot import (built for another one)."""
    import glob

    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(_C_DIR, "_C.*")) if p.endswith((".so", ".pyd")))


if _VARIANT_ERROR is not None:
    _LOAD_ERROR = _VARIANT_ERROR
elif _own_spec("_C", _C_DIR) is None:
    _LOAD_ERROR = f"no compiled module _C {'next to' if _C_DIR == _HERE else 'in'} {_C_DIR}"
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
                   "and FMA, or SHORTCUT_EXT_MARCH=x86-64-v4,x86-64-v3,x86-64 for one that runs on any x86-64 CPU "
                   "with the best kernels each has (SHORTCUT_EXT_NATIVE=0: one portable build)")
else:
    try:  # importing _C runs TORCH_LIBRARY registration of every op schema and CPU/CUDA kernel
        _C = _load_own("_C", _C_DIR)
    except ImportError as e:  # e.g. built against another torch: undefined symbols
        _LOAD_ERROR = f"importing it failed: {e}"
        _C = None
if _C is None and (_VARIANT_ERROR is not None or _own_spec("_C", _C_DIR) is not None):
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
    # a multi-target build's targets, best first (cpu_target: the one loaded); None for a build of one
    info["cpu_variants"] = None if not _VARIANTS else [t for _, t, _ in _VARIANTS]
    return info


def require_built(what: str = "the fused backend") -> None:
    if _C is None:
        raise NotBuiltError(f"{what} cannot run: " + BUILD_HINT.format(err=_LOAD_ERROR))
