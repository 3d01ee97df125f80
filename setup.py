"""Builds shortcut_ext._C with torch.utils.cpp_extension (ninja).

Environment switches:
  FORCE_CUDA=1       build the CUDA kernels even when no GPU is visible (needs CUDA torch + nvcc)
  FORCE_ONLY_CPU=1   never build CUDA kernels
  DEBUG=1            -O0 -g, no NDEBUG
  MAX_JOBS=N         parallel compile jobs (read by torch's ninja builder)
  SHORTCUT_EXT_NATIVE=0  no -march=native (for a build that must run on other x86 CPUs)
  SHORTCUT_EXT_MARCH=ARCH  -march=ARCH instead of native, e.g. x86-64-v3 (any CPU with AVX2 and FMA: the
                     AVX2 register kernels) or x86-64-v4 (AVX-512), for a build shared by several machines
  SANITIZE=LIST      the C++ sources built -O1 -g with -fsanitize=LIST, e.g. address,undefined (a
                     check build: run it with the sanitizer runtime preloaded, as the README says)
  CUDA_HOME=DIR      the CUDA toolkit root (the folder whose include/ holds cuda.h); a CUDA_HOME without
                     it is an error where CUDA would be built (not silently replaced by another toolkit)

A native build (the default on x86-64) records the build CPU's instruction-set flags in
shortcut_ext/_build_cpu.py (a SHORTCUT_EXT_MARCH build: the flags of that target, from the compiler's
feature macros): on a CPU that lacks one of them, `import shortcut_ext` does not load the kernels (they
would stop the process with an illegal instruction) and says how to rebuild.

CUDA is built when torch itself is a CUDA build (``torch.version.cuda``) and nvcc is found, or
when FORCE_CUDA=1; a GPU need not be present (``torch.cuda.is_available()`` is not consulted).
"""
import glob
import os
import platform
import shutil
import subprocess

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_home():
    """The real toolkit root: nvcc on PATH may be a wrapper script far from the toolkit."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "include", "cuda.h")):
        return home
    for cand in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(cand, "include", "cuda.h")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            text = open(nvcc, "rb").read(4096).decode("utf-8", "ignore")
        except OSError:
            text = ""
        for tok in text.split():  # a wrapper: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            if tok.endswith("/bin/nvcc"):
                root = tok[: -len("/bin/nvcc")]
                if os.path.exists(os.path.join(root, "include", "cuda.h")):
                    return root
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(root, "include", "cuda.h")):
            return root
    return None


def want_cuda():
    if _flag("FORCE_ONLY_CPU"):
        return False
    named = [(k, os.environ[k]) for k in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(k)]
    if named and (torch.version.cuda is not None or _flag("FORCE_CUDA")):
        k, v = named[0]
        if not os.path.exists(os.path.join(v, "include", "cuda.h")):
            raise RuntimeError(f"{k}={v} has no include/cuda.h: set {k} to the CUDA toolkit root (the folder "
                               f"whose include/ holds cuda.h), or unset it to let the build find nvcc")
    home = _cuda_home()
    if _flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch; this torch is CPU-only "
                               f"({torch.__version__}). Unset FORCE_CUDA or install CUDA torch.")
        if home is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the folder whose "
                               "include/ holds cuda.h")
        return True
    return torch.version.cuda is not None and home is not None


# instruction-set flags of /proc/cpuinfo that -march=native lets the compiler use in vector code
_ISA_PREFIXES = ("sse", "ssse3", "avx", "fma", "f16c", "bmi", "abm", "popcnt", "movbe", "amx", "gfni", "vaes",
                 "vpclmulqdq")


def _cpu_isa():
    """The build CPU's instruction-set flags (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(t for t in line.split(":", 1)[1].split() if t.startswith(_ISA_PREFIXES))
    except OSError:
        pass
    return None


# the compiler's instruction-set macros and the /proc/cpuinfo flags they need (a SHORTCUT_EXT_MARCH target)
_MACRO_ISA = {
    "__SSE__": "sse", "__SSE2__": "sse2", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__SSE4A__": "sse4a", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__FMA4__": "fma4",
    "__F16C__": "f16c", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__LZCNT__": "abm", "__POPCNT__": "popcnt",
    "__MOVBE__": "movbe", "__GFNI__": "gfni", "__VAES__": "vaes", "__VPCLMULQDQ__": "vpclmulqdq",
    "__AVXVNNI__": "avx_vnni", "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd", "__AVX512DQ__": "avx512dq",
    "__AVX512BW__": "avx512bw", "__AVX512VL__": "avx512vl", "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BITALG__": "avx512_bitalg", "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16",
    "__AVX512FP16__": "avx512_fp16", "__AVX512VP2INTERSECT__": "avx512_vp2intersect", "__AMX_TILE__": "amx_tile",
    "__AMX_INT8__": "amx_int8", "__AMX_BF16__": "amx_bf16",
}


def _march_isa(march):
    """The /proc/cpuinfo flags that code built with -march=``march`` needs (the compiler's predefined macros)."""
    cxx = os.environ.get("CXX") or "c++"
    try:
        r = subprocess.run([cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"SHORTCUT_EXT_MARCH={march}: could not run the C++ compiler {cxx!r} ({e})") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["no message"])[0]
        raise RuntimeError(f"SHORTCUT_EXT_MARCH must be a target that {cxx} knows for -march (e.g. x86-64-v3, "
                           f"x86-64-v4, znver3, skylake-avx512), got {march!r}: {why}")
    macros = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("#define ") and len(line.split()) > 1}
    return sorted({flag for macro, flag in _MACRO_ISA.items() if macro in macros})


def _record_build_cpu(isa, target=None):
    """shortcut_ext/_build_cpu.py: the flags a native build needs at run time (None: a portable build), and the
    -march target ("native", a SHORTCUT_EXT_MARCH value, or None)."""
    text = ('"""Written by setup.py: the instruction-set flags of the CPU a native (-march=native) build was made\n'
            'on, or of its SHORTCUT_EXT_MARCH target, or None for a portable build.  The package does not load its\n'
            'kernels on a CPU that lacks one."""\n'
            f"ISA = {None if isa is None else tuple(isa)!r}\n"
            f"TARGET = {target!r}\n")
    path = os.path.join(ROOT, "shortcut_ext", "_build_cpu.py")
    try:
        if open(path, encoding="utf-8").read() == text:
            return
    except OSError:
        pass
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def extensions():
    debug = _flag("DEBUG")
    with_cuda = want_cuda()
    if with_cuda:
        print(f"shortcut_ext: building the CPU and CUDA kernels (torch {torch.__version__}, CUDA {torch.version.cuda})")
    else:
        why = ("FORCE_ONLY_CPU=1" if _flag("FORCE_ONLY_CPU") else
               f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else "nvcc was not found")
        print(f"shortcut_ext: building the CPU kernels only ({why}; `shortcut-ext info` tells what was built)")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("SHORTCUT_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    sanitize = os.environ.get("SANITIZE", "").strip()
    cxx = ["-O0", "-g"] if debug else ["-O1", "-g"] if sanitize else ["-O3"]
    cxx += ["-fopenmp", "-fvisibility=hidden"]
    link = ["-fopenmp"]
    if sanitize:
        cxx += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={sanitize}"]
    x86 = platform.machine() in ("x86_64", "AMD64")
    march = os.environ.get("SHORTCUT_EXT_MARCH", "").strip()
    native = os.environ.get("SHORTCUT_EXT_NATIVE", "1") != "0" and x86 and not march
    if march:
        # a named target: the flags it needs come from the compiler, not from this CPU
        isa = _march_isa(march)
        print(f"shortcut_ext: -march={march} (needs {', '.join(isa) or 'no recorded extension'})")
        cxx += [f"-march={march}"]
        _record_build_cpu(isa if x86 else None, march)
    else:
        if native:
            # the portable loops (float64, elementwise passes) vectorise for this CPU, and the register kernels
            # (AVX-512 or AVX2) are compiled in; the package is built where it runs.  SHORTCUT_EXT_NATIVE=0 for a
            # build that must run on other CPUs, SHORTCUT_EXT_MARCH for one that runs on a family of them.
            cxx += ["-march=native"]
        _record_build_cpu(_cpu_isa() if native else None, "native" if native else None)
    extra = {"cxx": cxx}
    if with_cuda:
        home = _cuda_home()
        os.environ["CUDA_HOME"] = home
        import torch.utils.cpp_extension as ce

        ce.CUDA_HOME = home
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        define_macros += [("SHORTCUT_EXT_WITH_CUDA", None), ("SHORTCUT_EXT_CUDA_VERSION", f'"{torch.version.cuda}"')]
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]) + [
            "--expt-relaxed-constexpr", "-Xcompiler", "-fopenmp"]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    if not debug:
        define_macros.append(("NDEBUG", None))
    return [ext_cls(
        name="shortcut_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link,
    )]


setup(
    packages=find_packages(include=["shortcut_ext", "shortcut_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
