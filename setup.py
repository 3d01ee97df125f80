"""Builds shortcut_ext._C with torch.utils.cpp_extension (ninja).

Environment switches:
  FORCE_CUDA=1       build the CUDA kernels even when no GPU is visible (needs CUDA torch + nvcc)
  FORCE_ONLY_CPU=1   never build CUDA kernels
  DEBUG=1            -O0 -g, no NDEBUG
  MAX_JOBS=N         parallel compile jobs (read by torch's ninja builder)
  SHORTCUT_EXT_NATIVE=0  no -march=native (for a build that must run on other x86 CPUs)
  SANITIZE=LIST      the C++ sources built -O1 -g with -fsanitize=LIST, e.g. address,undefined (a
                     check build: run it with the sanitizer runtime preloaded, as the README says)
  CUDA_HOME=DIR      the CUDA toolkit root (the folder whose include/ holds cuda.h)

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


def extensions():
    debug = _flag("DEBUG")
    with_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("SHORTCUT_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    sanitize = os.environ.get("SANITIZE", "").strip()
    cxx = ["-O0", "-g"] if debug else ["-O1", "-g"] if sanitize else ["-O3"]
    cxx += ["-fopenmp", "-fvisibility=hidden"]
    link = ["-fopenmp"]
    if sanitize:
        cxx += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={sanitize}"]
    if os.environ.get("SHORTCUT_EXT_NATIVE", "1") != "0" and platform.machine() in ("x86_64", "AMD64"):
        # the portable loops (float64, elementwise passes) vectorise for this CPU; the package is
        # built where it runs.  SHORTCUT_EXT_NATIVE=0 for a build that must run on other CPUs.
        cxx += ["-march=native"]
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
