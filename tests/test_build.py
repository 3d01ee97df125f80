"""What a user sees when the compiled kernels are missing or cannot be used: a warning at import, the torch
backend, NotBuiltError with the build hint, one line from the commands; never a crash."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import shortcut_ext
from shortcut_ext._build import choose_variant, missing_isa

PKG = os.path.dirname(os.path.abspath(shortcut_ext.__file__))


def test_missing_isa():
    assert missing_isa(("avx2", "avx512f", "fma"), {"avx2", "fma", "sse2"}) == ["avx512f"]
    assert missing_isa(("avx2",), {"avx2", "avx512f"}) == []
    assert missing_isa(None, {"avx2"}) == [] and missing_isa(("avx2",), None) == []  # portable build; not Linux


def _setup_py(*names):
    """Definitions of setup.py (functions and constants) without running it: importing it builds."""
    import ast

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")  # the checkout's
    if not os.path.exists(path):
        pytest.skip("no setup.py beside the tests")
    tree = ast.parse(open(path, encoding="utf-8").read())
    keep = [node for node in tree.body
            if (isinstance(node, ast.FunctionDef) and node.name in names)
            or (isinstance(node, ast.Assign) and any(getattr(t, "id", "") in names for t in node.targets))]
    import re

    import platform

    ns = {"os": os, "subprocess": subprocess, "re": re, "platform": platform, "torch": torch}
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), ns)
    return ns


def test_a_named_march_records_the_flags_its_code_needs():
    """SHORTCUT_EXT_MARCH=ARCH builds for a family of CPUs: the flags recorded (which decide whether a CPU may load
    the kernels) are the target's, from the compiler, not the build CPU's: x86-64-v3 needs AVX2 and FMA and no
    AVX-512, x86-64-v4 AVX-512; an unknown target stops the build with a message that names the variable."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64") or shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("needs an x86-64 C++ compiler")
    ns = _setup_py("_MACRO_ISA", "_march_isa")
    v3, v4 = ns["_march_isa"]("x86-64-v3"), ns["_march_isa"]("x86-64-v4")
    assert {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "sse4_2"} <= set(v3), v3
    assert not any(f.startswith("avx512") for f in v3), v3
    assert {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"} <= set(v4), v4
    assert v3 == sorted(v3) and set(v3) < set(v4)
    with pytest.raises(RuntimeError, match="SHORTCUT_EXT_MARCH must be a target that .* got 'no-such-cpu'"):
        ns["_march_isa"]("no-such-cpu")


def test_march_lists_several_targets_best_first():
    """SHORTCUT_EXT_MARCH=A,B,... builds one module per target (shortcut_ext/_targets/<folder>/_C); a target that
    no CPU would load (an earlier one needs no more) stops the build, as does a malformed list."""
    ns = _setup_py("_march_targets", "_unreachable_targets")
    targets, unreachable = ns["_march_targets"], ns["_unreachable_targets"]
    assert targets("") == [] and targets("  ") == []
    assert targets("x86-64-v3") == [("x86-64-v3", "x86_64_v3")]
    assert targets("x86-64-v4, x86-64-v3,x86-64") == [("x86-64-v4", "x86_64_v4"), ("x86-64-v3", "x86_64_v3"),
                                                       ("x86-64", "x86_64")]
    for bad in ("x86-64-v3,", ",x86-64", "x86-64-v3,,x86-64", "x86-64 -mavx", "a;b"):
        with pytest.raises(RuntimeError, match="SHORTCUT_EXT_MARCH must be -march targets separated by commas"):
            targets(bad)
    with pytest.raises(RuntimeError, match="SHORTCUT_EXT_MARCH names a target twice"):
        targets("x86-64-v3,x86_64_v3")  # the same folder
    v4, v3, v1 = ("sse2", "avx2", "avx512f"), ("sse2", "avx2"), ("sse2",)
    assert unreachable([("v4", v4), ("v3", v3), ("v1", v1)]) == []
    assert unreachable([("v1", v1), ("v3", v3), ("v4", v4)]) == ["v3", "v4"]  # worst first: the rest never load
    assert unreachable([("v3", v3), ("v3b", v3)]) == ["v3b"]
    assert unreachable([("a", ("sse2", "x")), ("b", ("sse2", "y")), ("c", v1)]) == []  # neither needs less


def test_choose_variant_takes_the_first_target_this_cpu_runs():
    v4 = ("x86_64_v4", "x86-64-v4", ("avx2", "avx512f", "sse2"))
    v3 = ("x86_64_v3", "x86-64-v3", ("avx2", "sse2"))
    v1 = ("x86_64", "x86-64", ("sse2",))
    variants = (v4, v3, v1)
    assert choose_variant(variants, {"sse2", "avx2", "avx512f"}) == (v4, None)
    assert choose_variant(variants, {"sse2", "avx2"}) == (v3, None)
    assert choose_variant(variants, {"sse2"}) == (v1, None)
    assert choose_variant(variants, None) == (v4, None)  # flags unknown (not Linux): the first
    # SHORTCUT_EXT_CPU_VARIANT: by target or folder name; never one this CPU cannot run
    assert choose_variant(variants, {"sse2", "avx2", "avx512f"}, "x86-64") == (v1, None)
    assert choose_variant(variants, {"sse2", "avx2", "avx512f"}, "x86_64_v3") == (v3, None)
    none, why = choose_variant(variants, {"sse2", "avx2"}, "x86-64-v4")
    assert none is None and "SHORTCUT_EXT_CPU_VARIANT='x86-64-v4' asks for code built (-march=x86-64-v4)" in why
    assert "lacks (avx512f)" in why
    none, why = choose_variant(variants, {"sse2"}, "znver9")
    assert none is None and why.startswith("SHORTCUT_EXT_CPU_VARIANT='znver9' is not a target of this build "
                                           "(it has: x86-64-v4, x86-64-v3, x86-64)")
    none, why = choose_variant((v4, v3), {"sse2"})
    assert none is None and "none of this build's targets (x86-64-v4, x86-64-v3) runs on this CPU" in why
    assert "x86-64-v4 needs avx2, avx512f; x86-64-v3 needs avx2" in why and "ending in x86-64" in why
    # a module that is not there (a damaged install): the next target this CPU runs, never a foreign one
    assert choose_variant(variants, {"sse2", "avx2", "avx512f"}, present={"x86_64_v3", "x86_64"}) == (v3, None)
    none, why = choose_variant(variants, {"sse2", "avx2"}, present={"x86_64_v4"})
    assert none is None and why == ("the modules of this build's targets that this CPU runs (_targets/x86_64_v3/_C, "
                                    "_targets/x86_64/_C) are missing from the package: rebuild it")
    none, why = choose_variant(variants, {"sse2"}, "x86-64", present=set())
    assert none is None and "SHORTCUT_EXT_CPU_VARIANT='x86-64': its module (_targets/x86_64/_C) is missing" in why


def test_a_compiler_without_openmp_builds_kernels_without_threads(tmp_path, monkeypatch, capsys):
    """setup.py passed -fopenmp whatever the compiler: with one that has no OpenMP (Apple's clang, a clang
    without libomp) the build stopped at the first file.  It now asks the compiler: -fopenmp where an OpenMP
    program compiles and links, else -fopenmp-simd (the kernels then run on one thread), else nothing."""
    cxx = shutil.which(os.environ.get("CXX") or "c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    ns = _setup_py("_OMP_PROBE", "_SIMD_PROBE", "_openmp_flags")
    flags = ns["_openmp_flags"]()
    assert flags in ((["-fopenmp"], ["-fopenmp"]), (["-fopenmp-simd"], []), ([], [])), flags
    info = shortcut_ext.build_info()
    if info.get("built") and not os.environ.get("CXX"):  # this build's compiler: its answer is the build's
        assert (flags[0] == ["-fopenmp"]) == bool(info["openmp"]), (flags, info["openmp"])
    # a compiler that refuses -fopenmp (as Apple's clang does), and one that is not there
    fake = tmp_path / "no-openmp-c++"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {cxx} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    capsys.readouterr()
    assert ns["_openmp_flags"]() == (["-fopenmp-simd"], [])
    assert "cannot build OpenMP code" in capsys.readouterr().out
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert ns["_openmp_flags"]() == ([], [])


def test_a_windows_build_stops_at_once_and_says_what_works():
    """The kernels are GCC/clang C++ (inline assembly, weak symbols); MSVC stopped deep inside the sources with
    errors that named none of this.  setup.py now stops first, naming the platforms that build and WSL2."""
    ns = _setup_py("_check_platform")
    with pytest.raises(RuntimeError, match=r"GCC or clang on Linux or macOS.*MSVC on Windows.*WSL2"):
        ns["_check_platform"]("Windows")
    for system in ("Linux", "Darwin"):
        assert ns["_check_platform"](system) is None
    assert ns["_check_platform"]() is None  # this machine

def test_apple_clang_builds_threads_against_torchs_own_libomp(tmp_path, monkeypatch, capsys):
    """Apple's clang takes no -fopenmp, so a Mac build ran every kernel call on one thread (and the warning's
    advice, Homebrew's libomp, would not have changed that).  torch's macOS wheels carry lib/libomp.dylib and
    include/omp.h: there the build compiles with -Xclang -fopenmp against that omp.h and links with
    -undefined dynamic_lookup, so the OpenMP calls bind to the libomp torch loaded.  A fake Apple clang (it
    refuses -fopenmp, accepts -Xclang -fopenmp only with an -I folder that holds omp.h) stands in for the real
    one, and a folder for torch's; elsewhere than macOS, and without torch's runtime, the build stays
    without threads and says why."""
    cxx = shutil.which(os.environ.get("CXX") or "c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    ns = _setup_py("_OMP_PROBE", "_SIMD_PROBE", "_openmp_flags")
    fake = tmp_path / "apple-clang++"
    fake.write_text(f"""#!{sys.executable}
import os, subprocess, sys
args, out, xomp, inc, i = sys.argv[1:], [], False, None, 0
while i < len(args):
    if args[i] == "-fopenmp":
        sys.exit("clang: error: unsupported option '-fopenmp'")
    if args[i:i + 2] == ["-Xclang", "-fopenmp"]:
        xomp, i = True, i + 2
    elif args[i] == "-I":
        inc, i = args[i + 1], i + 2
    else:
        out.append(args[i]); i += 1
if xomp and not (inc and os.path.isfile(os.path.join(inc, "omp.h"))):
    sys.exit("omp.h: file not found")
sys.exit(subprocess.call([{cxx!r}] + (["-fopenmp"] if xomp else []) + out))
""")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    torch_dir = tmp_path / "torch"
    (torch_dir / "lib").mkdir(parents=True)
    (torch_dir / "include").mkdir()
    # the fake passes its real compiler -fopenmp instead of -Xclang -fopenmp, so that compiler's omp.h serves
    (torch_dir / "include" / "omp.h").write_text("#pragma once\n")
    (torch_dir / "lib" / "libomp.dylib").write_bytes(b"")
    capsys.readouterr()
    assert ns["_openmp_flags"](system="Darwin", torch_dir=str(torch_dir)) == (
        ["-Xclang", "-fopenmp"], ["-undefined", "dynamic_lookup"])
    assert "OpenMP from torch's own runtime" in capsys.readouterr().out
    # not macOS: the same compiler and folder give no threads, and the advice is the compiler's runtime
    assert ns["_openmp_flags"](system="Linux", torch_dir=str(torch_dir)) == (["-fopenmp-simd"], [])
    out = capsys.readouterr().out
    assert "cannot build OpenMP code" in out and "libomp-dev" in out, out
    # macOS, but a torch without its libomp: no threads, and the warning says what is missing
    (torch_dir / "lib" / "libomp.dylib").unlink()
    assert ns["_openmp_flags"](system="Darwin", torch_dir=str(torch_dir)) == (["-fopenmp-simd"], [])
    out = capsys.readouterr().out
    assert "cannot build OpenMP code" in out and "no such pair" in out and str(torch_dir) in out, out


def test_build_info_says_what_the_code_was_built_for():
    """cpu_target: "native" (-march=native, the default; native_isa the build CPU's flags), a SHORTCUT_EXT_MARCH
    value (native_isa that target's flags), or None for a portable build (no flags recorded)."""
    info = shortcut_ext.build_info()
    if not info["built"]:
        pytest.skip("not built")
    assert (info["cpu_target"] is None) == (info["native_isa"] is None), info
    assert info["cpu_target"] is None or isinstance(info["cpu_target"], str) and info["cpu_target"], info


def _copy_package(tmp_path, isa=None, c_bytes=None):
    """A copy of the built package with another recorded ISA, or a _C replaced by ``c_bytes``.  The copy is a
    build of one module (_C beside the package): of a multi-target build, the module this process loaded."""
    dst = tmp_path / "pkg" / "shortcut_ext"
    shutil.copytree(PKG, dst, ignore=shutil.ignore_patterns("__pycache__", "_targets"))
    if os.path.isdir(os.path.join(PKG, "_targets")):
        loaded = sys.modules["shortcut_ext._C"].__file__
        shutil.copy(loaded, dst / os.path.basename(loaded))
        (dst / "_build_cpu.py").write_text(f"ISA = {tuple(shortcut_ext.build_info()['native_isa'] or ()) or None!r}\n")
    if isa is not None:
        (dst / "_build_cpu.py").write_text(f"ISA = {tuple(isa)!r}\n")
    if c_bytes is not None:
        for so in dst.glob("_C*.so"):
            so.write_bytes(c_bytes)
    return dst.parent


def _env(root):
    """The environment of a process that imports the copy at ``root`` (and not a target of this build)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("SHORTCUT_EXT_CPU_VARIANT", None)
    return env


_PROBE = """
import warnings, torch
with warnings.catch_warnings(record=True) as got:
    warnings.simplefilter("always")
    import shortcut_ext as se
print("WARN", [str(w.message) for w in got if "compiled kernels are not used" in str(w.message)])
print("BUILT", se.is_built(), se.build_info().get("error"))
print("BACKEND", se.ShortcutNet(width=3, units=2, shortcut=2).backend)
try:
    se.residual_stack(torch.randn(4, 3), torch.zeros(2, 2, 3, 3), backend="fused")
except se.NotBuiltError as e:
    print("RAISED", str(e).splitlines()[0])
"""


@pytest.mark.skipif(not shortcut_ext.is_built(), reason="needs a built _C to copy")
@pytest.mark.parametrize("case", ["foreign_cpu", "broken_so", "other_python"])
def test_an_unusable_build_warns_and_falls_back(tmp_path, case):
    """A native build on a CPU without its instructions died with SIGILL at `import shortcut_ext`; a _C that
    failed to import (built against another torch) was ignored without a word."""
    if case == "foreign_cpu":
        root = _copy_package(tmp_path, isa=["sse2", "avx9999_not_a_real_flag"])
        if not os.path.exists("/proc/cpuinfo"):
            pytest.skip("the CPU check reads /proc/cpuinfo")
        want = "avx9999_not_a_real_flag"
        hint = "SHORTCUT_EXT_MARCH=x86-64-v3"  # the rebuild hint names both ways to a shared build
    elif case == "broken_so":
        root = _copy_package(tmp_path, c_bytes=b"not an ELF file")
        want = "importing it failed"
        hint = ""
    else:  # a _C built for another Python (an in-place build used from another interpreter): nothing said
        root = _copy_package(tmp_path)
        for so in (root / "shortcut_ext").glob("_C*.so"):
            so.rename(so.with_name("_C.cpython-39-x86_64-linux-gnu.so"))
        want = "built for another Python"
        hint = ""
    env = _env(root)
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert want in out["WARN"] and "backend='torch'" in out["WARN"]
    assert out["BUILT"].startswith("False") and want in out["BUILT"] and hint in out["BUILT"]
    assert out["BACKEND"] == "torch"
    assert out["RAISED"].startswith("backend='fused' cannot run: the compiled extension shortcut_ext._C is not")
    # the commands: one clear message and exit status 2, no traceback
    r = subprocess.run([sys.executable, "-m", "shortcut_ext", "train", "--backend", "fused", "--depth", "4",
                        "--width", "3", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "t.json")],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "shortcut-ext train: error: backend='fused' cannot run" in r.stderr


_VARIANT_PROBE = """
import sys, warnings, torch
with warnings.catch_warnings(record=True) as got:
    warnings.simplefilter("always")
    import shortcut_ext as se
print("WARN", [str(w.message) for w in got if "shortcut_ext" in str(w.message)])
info = se.build_info()
print("BUILT", se.is_built(), info.get("error"))
print("TARGET", info.get("cpu_target"), info.get("cpu_variants"))
print("LOADED", getattr(sys.modules.get("shortcut_ext._C"), "__file__", None))
if se.is_built():
    x, w = torch.randn(5, 3, dtype=torch.float64), 0.3 * torch.randn(2, 2, 3, 3, dtype=torch.float64)
    print("SAME", bool(torch.allclose(se.residual_stack(x, w, backend="fused"), se.residual_stack(x, w, backend="torch"))))
"""


@pytest.mark.skipif(not shortcut_ext.is_built() or not os.path.exists("/proc/cpuinfo"),
                    reason="needs a built _C to copy, and the CPU's flags")
@pytest.mark.parametrize("case", ["best", "forced", "missing_module", "forced_foreign", "forced_unknown", "none_fits",
                                  "single"])
def test_a_multi_target_build_loads_the_first_target_this_cpu_runs(tmp_path, case):
    """SHORTCUT_EXT_MARCH=A,B,...: the loader imports _targets/<folder>/_C of the first target whose flags this CPU
    has, as shortcut_ext._C; SHORTCUT_EXT_CPU_VARIANT picks another, but never one this CPU cannot run.  The
    modules here are copies of this build's _C, with made-up targets."""
    root = _copy_package(tmp_path)
    pkg = root / "shortcut_ext"
    so = sorted(pkg.glob("_C.*.so"))[0]
    for folder in ("fake_v9", "base"):
        (pkg / "_targets" / folder).mkdir(parents=True)
        shutil.copy(so, pkg / "_targets" / folder / so.name)
    so.unlink()  # nothing beside the package: only the chosen target's module can load
    foreign = ("_targets_test_not_a_real_flag",)
    variants = (("fake_v9", "fake-v9", ("sse2",) + foreign), ("base", "x86-64", ("sse2",)))
    env = _env(root)
    if case == "none_fits":
        variants = variants[:1]
    elif case == "missing_module":  # a target this CPU runs, whose module is not there: the next one
        variants = (("gone", "gone-v2", ("sse2",)),) + variants[1:]
    if case == "forced":
        env["SHORTCUT_EXT_CPU_VARIANT"] = "base"  # the folder name works too
    elif case == "forced_foreign":
        env["SHORTCUT_EXT_CPU_VARIANT"] = "fake-v9"
    elif case == "forced_unknown":
        env["SHORTCUT_EXT_CPU_VARIANT"] = "znver9"
    record = f"ISA = None\nTARGET = None\nVARIANTS = {variants!r}\n"
    if case == "single":  # a build of one module with SHORTCUT_EXT_CPU_VARIANT set: loaded, with a warning
        shutil.copy(pkg / "_targets" / "base" / so.name, so)
        record = "ISA = ('sse2',)\nTARGET = 'x86-64'\n"
        env["SHORTCUT_EXT_CPU_VARIANT"] = "x86-64-v3"
    (pkg / "_build_cpu.py").write_text(record)
    r = subprocess.run([sys.executable, "-c", _VARIANT_PROBE], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    if case in ("best", "forced", "missing_module"):
        assert out["BUILT"] == "True None" and out["SAME"] == "True" and out["WARN"] == "[]", out
        assert out["TARGET"] == f"x86-64 ['{variants[0][1]}', 'x86-64']"
        assert out["LOADED"].startswith(str(pkg / "_targets" / "base" / "_C."))
    elif case == "single":
        assert out["BUILT"] == "True None" and out["TARGET"] == "x86-64 None" and out["SAME"] == "True"
        assert "SHORTCUT_EXT_CPU_VARIANT='x86-64-v3' is set, but this is not a multi-target build" in out["WARN"]
        assert out["LOADED"] == str(so)
    else:
        want = {"forced_foreign": "asks for code built (-march=fake-v9) for a CPU with instructions this CPU lacks "
                                  "(_targets_test_not_a_real_flag)",
                "forced_unknown": "SHORTCUT_EXT_CPU_VARIANT='znver9' is not a target of this build (it has: "
                                  "fake-v9, x86-64)",
                "none_fits": "none of this build's targets (fake-v9) runs on this CPU (fake-v9 needs "
                             "_targets_test_not_a_real_flag)"}[case]
        assert out["BUILT"].startswith("False") and want in out["BUILT"], out
        assert want in out["WARN"] and "backend='torch'" in out["WARN"]
        assert out["LOADED"] == "None" and out["TARGET"] == "None None"


@pytest.mark.skipif(not shortcut_ext.is_built(), reason="needs a built _C elsewhere")
def test_a_copy_without_a_build_does_not_load_another_trees(tmp_path):
    """Beside an editable install (pip install -e), a copy of the package without _C silently loaded the other
    tree's kernels: the editable install's finder, after sys.path's, answered for shortcut_ext._C."""
    root = _copy_package(tmp_path)
    for f in list((root / "shortcut_ext").glob("_C*")) + list((root / "shortcut_ext").glob("_build_cpu.py")):
        f.unlink()
    probe = f"""
import importlib.machinery, sys
class Editable:  # what an editable install's finder does: the package's modules from the original tree
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.startswith("shortcut_ext."):
            return importlib.machinery.PathFinder.find_spec(name, [{PKG!r}])
sys.meta_path.append(Editable)
import shortcut_ext as se
print("FILE", se.__file__)
print("BUILT", se.is_built(), se.build_info().get("error"))
print("LOADED", getattr(sys.modules.get("shortcut_ext._C"), "__file__", None))
"""
    r = subprocess.run([sys.executable, "-c", probe], env=_env(root), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert out["FILE"].startswith(str(root))
    assert out["BUILT"].startswith("False no compiled module _C next to " + str(root)), out["BUILT"]
    assert out["LOADED"] == "None"


def test_the_operator_says_when_it_cannot_run_the_fused_kernel(monkeypatch):
    """HessianOperator(backend='fused') ran autograd products without a word when the kernel was missing."""
    import torch

    import shortcut_ext.curvature.hessian as hessian
    from shortcut_ext.curvature import HessianOperator
    from shortcut_ext.curvature.hessian import FallbackWarning

    monkeypatch.setattr(hessian, "fused_hvp_available", lambda: False)
    X = torch.randn(6, 3, dtype=torch.float64)
    net = shortcut_ext.ShortcutNet(width=3, units=2, shortcut=2, dtype=torch.float64, backend="torch")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        H = HessianOperator(net, (X, X), backend="fused")
    assert H.backend_used == "autograd" and "not available" in H.fallback_reason
    assert any(issubclass(w.category, FallbackWarning) and "not available" in str(w.message) for w in got)


@pytest.mark.skipif(not shortcut_ext.is_built(), reason="fused kernels not built")
def test_the_fused_op_runs_on_a_torch_without_is_exporting(monkeypatch):
    """torch.compiler.is_exporting came with torch 2.7; the package's floor is 2.6, where every fused forward
    failed with "module 'torch.compiler' has no attribute 'is_exporting'"."""
    import torch

    monkeypatch.delattr(torch.compiler, "is_exporting", raising=False)
    net = shortcut_ext.ShortcutNet(width=4, units=3, shortcut=2, init="small", dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = net(x)
    y.sum().backward()
    ref = shortcut_ext.ShortcutNet(width=4, units=3, shortcut=2, init="small", dtype=torch.float64, backend="torch")
    torch.testing.assert_close(y, ref(x))
