"""Builds shortcut_ext._C with torch.utils.cpp_extension (ninja).

Environment switches:
  FORCE_CUDA=1       build the CUDA kernels even when no GPU is visible (needs CUDA torch + nvcc)
  FORCE_ONLY_CPU=1   never build CUDA kernels
  DEBUG=1            -O0 -g, no NDEBUG
  MAX_JOBS=N         parallel compile jobs (read by torch's ninja builder)
  SHORTCUT_EXT_NATIVE=0  no -march=native (for a build that must run on other x86 CPUs)
  SHORTCUT_EXT_MARCH=ARCH  -march=ARCH instead of native, e.g. x86-64-v3 (any CPU with AVX2 and FMA: the
                     AVX2 register kernels) or x86-64-v4 (AVX-512), for a build shared by several machines
  SHORTCUT_EXT_MARCH=A,B,...  one build of the kernels per target, best first, e.g.
                     x86-64-v4,x86-64-v3,x86-64: `import shortcut_ext` loads the first that this CPU runs
                     (one package, fast on every x86-64 CPU; the build takes as long as that many builds)
  SANITIZE=LIST      the C++ sources built -O1 -g with -fsanitize=LIST, e.g. address,undefined (a
                     check build: run it with the sanitizer runtime preloaded, as the README says)
  CUDA_HOME=DIR      the CUDA toolkit root (the folder whose include/ holds cuda.h); a CUDA_HOME without
                     it is an error where CUDA would be built (not silently replaced by another toolkit)

A multi-target build puts each target's module at shortcut_ext/_targets/<target>/_C*.so and records the
targets and their flags in shortcut_ext/_build_cpu.py (VARIANTS); SHORTCUT_EXT_CPU_VARIANT=<target> at run
time loads another of them (to compare them; never one this CPU cannot run).

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
import re
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


_OMP_PROBE = """#include <omp.h>
int main() {
  int n = 0;
#pragma omp parallel
  { n = omp_get_num_threads(); }
  return n > 0 ? 0 : 1;
}
"""
_SIMD_PROBE = """int main() {
  float a[8] = {0};
#pragma omp simd
  for (int i = 0; i < 8; ++i) a[i] += 1.0f;
  return a[7] == 1.0f ? 0 : 1;
}
"""


def _openmp_flags(system=None, torch_dir=None):
    """(compile, link) flags for OpenMP: -fopenmp where the C++ compiler ($CXX, else c++) compiles and links an
    OpenMP program (the kernels' threads come from at::parallel_for, an OpenMP region in torch's headers).

    Apple's clang takes no -fopenmp (Homebrew's libomp does not change that), but torch's macOS wheels carry
    their OpenMP runtime, lib/libomp.dylib, and its omp.h: there the kernels are compiled with
    `-Xclang -fopenmp` against that omp.h (torch's include folder, on every extension's include path) and
    linked with `-undefined dynamic_lookup`, so that their OpenMP calls bind, at import, to the libomp that
    libtorch_cpu loaded (torch's inductor builds its C++ kernels there the same way).  Linking libomp itself
    would record the path it was built at (/opt/llvm-openmp/lib/libomp.dylib in torch 2.11's wheel), and a
    second OpenMP runtime in the process (Homebrew's) is the known "OMP: Error #15" abort.

    Else -fopenmp-simd (the loops' simd pragmas only: the kernels then run on one thread, as at::parallel_for
    runs its range in the calling thread), or nothing where even that is unknown.  ``system`` (platform.system())
    and ``torch_dir`` (torch's package folder) are for the tests."""
    import tempfile

    cxx = os.environ.get("CXX") or "c++"
    system = system or platform.system()
    torch_dir = torch_dir or os.path.dirname(torch.__file__)

    def builds(source, flags, link):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w", encoding="utf-8") as f:
                f.write(source)
            cmd = [cxx, *flags, "-Werror", src] + (["-o", os.path.join(tmp, "probe")] if link else
                                                   ["-c", "-o", os.path.join(tmp, "probe.o")])
            try:
                return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
            except (OSError, subprocess.SubprocessError):
                return False

    if builds(_OMP_PROBE, ["-fopenmp"], link=True):
        return ["-fopenmp"], ["-fopenmp"]
    include = os.path.join(torch_dir, "include")
    torch_omp = (system == "Darwin" and os.path.isfile(os.path.join(torch_dir, "lib", "libomp.dylib"))
                 and os.path.isfile(os.path.join(include, "omp.h")))
    if torch_omp and builds(_OMP_PROBE, ["-Xclang", "-fopenmp", "-I", include], link=False):
        print(f"shortcut_ext: OpenMP from torch's own runtime ({os.path.join(torch_dir, 'lib', 'libomp.dylib')}): "
              f"{cxx!r} takes no -fopenmp, so the kernels are compiled with -Xclang -fopenmp and bind to the "
              "libomp that torch loads")
        return ["-Xclang", "-fopenmp"], ["-undefined", "dynamic_lookup"]
    simd = ["-fopenmp-simd"] if builds(_SIMD_PROBE, ["-fopenmp-simd"], link=False) else []
    if system == "Darwin":
        fix = ("Apple's clang builds OpenMP code only against the libomp that torch's macOS wheels carry "
               f"(lib/libomp.dylib and include/omp.h), and {torch_dir} has "
               + ("them, but the compiler refused -Xclang -fopenmp" if torch_omp else "no such pair")
               + ": use a torch wheel from PyPI, or a compiler with OpenMP (CXX=...), and rebuild for threads.")
    else:
        fix = "Install the compiler's OpenMP runtime (libomp-dev for clang) and rebuild for threads."
    print(f"shortcut_ext: WARNING: the C++ compiler {cxx!r} cannot build OpenMP code (no omp.h or no OpenMP "
          "runtime), so the kernels are built without threads: each call runs on one CPU thread "
          f"(build_info()['openmp'] is False). {fix}")
    return simd, []


def _march_targets(value):
    """SHORTCUT_EXT_MARCH's targets (comma-separated, best first) and each one's folder name under
    shortcut_ext/_targets/ (``[(target, folder), ...]``; empty when unset)."""
    if not value.strip():
        return []
    targets = [t.strip() for t in value.split(",")]
    if any(not t or not re.fullmatch(r"[A-Za-z0-9_.+-]+", t) for t in targets):
        raise RuntimeError(f"SHORTCUT_EXT_MARCH must be -march targets separated by commas (e.g. x86-64-v3, or "
                           f"x86-64-v4,x86-64-v3,x86-64), got {value!r}")
    folders = [re.sub(r"[^A-Za-z0-9]", "_", t) for t in targets]
    if len(set(folders)) != len(folders):
        raise RuntimeError(f"SHORTCUT_EXT_MARCH names a target twice, got {value!r}")
    return list(zip(targets, folders))


def _unreachable_targets(variants):
    """The targets of ``[(target, flags), ...]`` (best first) that no CPU would load: an earlier target needs
    no more than they do, and every CPU that runs them runs it."""
    return [t for i, (t, isa) in enumerate(variants) if any(set(prev) <= set(isa) for _, prev in variants[:i])]


def _record_build_cpu(isa, target=None, variants=None):
    """shortcut_ext/_build_cpu.py: the flags a native build needs at run time (None: a portable build), the
    -march target ("native", a SHORTCUT_EXT_MARCH value, or None), and a multi-target build's variants
    (``((folder, target, flags), ...)``, best first, or None)."""
    text = ('"""Written by setup.py: the instruction-set flags of the CPU a native (-march=native) build was made\n'
            'on, or of its SHORTCUT_EXT_MARCH target, or None for a portable build.  The package does not load its\n'
            'kernels on a CPU that lacks one.  VARIANTS: a multi-target build\'s modules\n'
            '(shortcut_ext/_targets/<folder>/_C), best first, each with its target and flags."""\n'
            f"ISA = {None if isa is None else tuple(isa)!r}\n"
            f"TARGET = {target!r}\n"
            f"VARIANTS = {None if variants is None else tuple((f, t, tuple(i)) for f, t, i in variants)!r}\n")
    global _BUILD_RECORD
    _BUILD_RECORD = text  # written by BuildExt once the modules are built: not by sdist or egg_info


_BUILD_RECORD = None


def _write_build_record(path):
    try:
        if open(path, encoding="utf-8").read() == _BUILD_RECORD:
            return
    except OSError:
        pass
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_BUILD_RECORD)


def _check_platform(system=None):
    """The kernels are GCC/clang C++ (inline assembly, weak symbols, GCC's pragmas) and the worker pool forks:
    Linux, and macOS with Apple's clang.  MSVC would stop deep inside the sources with errors that name none of
    this, so a Windows build stops here and says what works.  ``system`` (platform.system()) is for the tests."""
    system = system or platform.system()
    if system == "Windows":
        raise RuntimeError("shortcut_ext's kernels build with GCC or clang on Linux or macOS, not with MSVC on "
                           "Windows: install it in WSL2 (a Linux there, where `pip install .` builds them, and a "
                           "CUDA GPU is usable too)")


def extensions():
    _check_platform()
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
    omp_cxx, omp_link = _openmp_flags()
    cxx += omp_cxx + ["-fvisibility=hidden"]
    link = list(omp_link)
    if sanitize:
        cxx += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={sanitize}"]
    x86 = platform.machine() in ("x86_64", "AMD64")
    targets = _march_targets(os.environ.get("SHORTCUT_EXT_MARCH", ""))
    march = targets[0][0] if len(targets) == 1 else ""
    native = os.environ.get("SHORTCUT_EXT_NATIVE", "1") != "0" and x86 and not targets
    variants = None
    if len(targets) > 1:
        if not x86:
            raise RuntimeError(f"SHORTCUT_EXT_MARCH with several targets is for x86-64 (the loader checks the CPU's "
                               f"flags), this is {platform.machine()}")
        variants = [(folder, t, (_cpu_isa() or []) if t == "native" else _march_isa(t)) for t, folder in targets]
        dead = _unreachable_targets([(t, isa) for _, t, isa in variants])
        if dead:
            raise RuntimeError(f"SHORTCUT_EXT_MARCH lists the targets best first, and no CPU would load "
                               f"{', '.join(dead)}: an earlier target needs no more instructions; got "
                               f"{os.environ['SHORTCUT_EXT_MARCH']!r}")
        for folder, t, isa in variants:
            print(f"shortcut_ext: -march={t} -> shortcut_ext/_targets/{folder} (needs {', '.join(isa) or 'no recorded extension'})")
        _record_build_cpu(None, None, variants)
    elif march:
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
            "--expt-relaxed-constexpr"] + [a for f in omp_link for a in ("-Xcompiler", f)]
        ext_cls = CUDAExtension
    else:
        ext_cls = CppExtension
    if not debug:
        define_macros.append(("NDEBUG", None))
    if variants is None:
        return [ext_cls(name="shortcut_ext._C", sources=sources, include_dirs=[os.path.join(ROOT, "csrc")],
                        define_macros=define_macros, extra_compile_args=extra, extra_link_args=link)]
    # one module _C per target, each in its own folder (so each exports PyInit__C, and the loader imports the
    # one it chose as shortcut_ext._C)
    return [ext_cls(name=f"shortcut_ext._targets.{folder}._C", sources=sources,
                    include_dirs=[os.path.join(ROOT, "csrc")], define_macros=define_macros,
                    extra_compile_args={**extra, "cxx": extra["cxx"] + [f"-march={t}"]}, extra_link_args=link)
            for folder, t, _ in variants]


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's ninja build, with each module's objects in a folder of its own (a multi-target build compiles
    the same sources once per target, and their objects must not overwrite each other), and the build's record
    (shortcut_ext/_build_cpu.py) written once the modules are built, beside them: in the source tree, and in
    the build folder that a wheel is made from (build_py copied the package before this command ran)."""

    def run(self):
        super().run()
        if _BUILD_RECORD is not None:
            _write_build_record(os.path.join(ROOT, "shortcut_ext", "_build_cpu.py"))
            if not self.inplace:
                _write_build_record(os.path.join(self.build_lib, "shortcut_ext", "_build_cpu.py"))

    def build_extension(self, ext):
        base = self.build_temp
        if len(self.extensions) > 1:
            self.build_temp = os.path.join(base, ext.name.replace(".", "_"))
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = base

    def copy_extensions_to_source(self):
        # --inplace (and editable installs): the targets' folders hold no package, so nothing made them yet
        for ext in self.extensions:
            os.makedirs(os.path.join(ROOT, *ext.name.split(".")[:-1]), exist_ok=True)
        super().copy_extensions_to_source()


setup(
    packages=find_packages(include=["shortcut_ext", "shortcut_ext.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
