"""The README opens with exactly two commands, and .ci/run runs the second one; the sdist builds."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert text.startswith("# shortcut_ext\n\n```bash\n"), "the README must open with the command block"
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    lines = [ln for ln in first_block.group(1).splitlines() if ln.strip()]
    assert len(lines) == 2, lines
    assert "shortcut-ext reproduce" in lines[0] and "pytest tests" in lines[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "sed -n '3p'" in ci and 'bash -c "$test_cmd"' in ci


def test_source_distribution_carries_every_build_input(tmp_path):
    """`python -m build` and `pip wheel` build from the sdist: it must carry the C++ headers, every
    CUDA source (a CPU machine's sdist is built on GPU machines too), the CMake build and its C++
    test, and the tests.  Without MANIFEST.in it had the CPU .cpp files only and did not compile.

    It builds nothing, so it must not touch the build's record (shortcut_ext/_build_cpu.py, which decides what
    `import shortcut_ext` loads): setup.py wrote it whenever it ran, so an sdist made with other build switches
    (here SHORTCUT_EXT_NATIVE=0) left a record that did not describe the modules beside it."""
    import glob
    import subprocess
    import sys
    import tarfile

    record = os.path.join(ROOT, "shortcut_ext", "_build_cpu.py")
    before = open(record, "rb").read() if os.path.exists(record) else None
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path), "sdist", "-d",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "FORCE_ONLY_CPU": "1", "SHORTCUT_EXT_NATIVE": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (open(record, "rb").read() if os.path.exists(record) else None) == before
    (sdist,) = glob.glob(str(tmp_path / "*.tar.gz"))
    with tarfile.open(sdist) as tar:
        carried = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {os.path.relpath(p, ROOT) for pattern in ("csrc/**/*.h", "csrc/**/*.cuh", "csrc/**/*.cu", "csrc/**/*.cpp",
                                                       "tests/*.py", "tests/cpp/*.cpp", "benchmarks/**/*.py",
                                                       "benchmarks/gpu/*.sh", "python/*.py", "shortcut_ext/**/*.py")
              for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)}
    needed |= {"setup.py", "pyproject.toml", "CMakeLists.txt", "README.md"}
    assert any(n.endswith(".cu") for n in needed) and "csrc/common.h" in needed
    missing = sorted(needed - carried)
    assert not missing, f"the sdist lacks {missing[:10]}"
