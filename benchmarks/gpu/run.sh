#!/usr/bin/env bash
# GPU check of shortcut_ext in one run of at most 8 minutes, for a machine with one NVIDIA GPU (an H200:
# torch 2.11 + CUDA 13.0, nvcc, no network):
#   1. build and install the package with its CUDA kernels (sm_90);
#   2. the CUDA tests: tests/test_cuda.py (ops, and end to end: models, training, torch.compile, the
#      Hessian operator, the spectrum command) and the CUDA half of tests/test_ops.py and test_errors.py;
#   3. compute-sanitizer memcheck / racecheck / initcheck on a small case, where the tool works;
#   4. the GPU benchmarks: bench_gpu.py (the stack: fused vs eager, CUDA graphs, torch.compile) and
#      bench_gpu_hvp.py (Hessian-vector products: fused vs double backward, torch.func, is_grads_batched; and
#      the fused Gauss-Newton products).
# Then, if time is left, an informational run of spectrum --distributed on NCCL (one rank).
# The output folder gets at most 6 files (the device tool brings back 8): run.log (written as it goes),
# bench_gpu.csv, bench_gpu_hvp.csv, junit.xml and results.tar.gz, the whole work folder (build.log, tests.log,
# sanitizer.log, the benchmarks' JSON and logs, the NCCL run), all refreshed after every stage and on exit.
#
#   benchmarks/gpu/run.sh [OUT_DIR]      (default: $OUT, else benchmarks/gpu/out, git-ignored)
set -u -o pipefail

START=$(date +%s)
TOTAL=${SHORTCUT_EXT_GPU_BUDGET_S:-480}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUTDIR=${1:-${OUT:-$REPO/benchmarks/gpu/out}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
exec > >(tee -a "$OUTDIR/run.log") 2>&1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/se_gpu.XXXXXX")  # every other output; published to OUTDIR by publish()
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
STATUS=0

# copy the key tables and a tarball of WORK into OUTDIR (each written under a temporary name, then renamed)
publish() {
  local f
  for f in bench_gpu.csv bench_gpu_hvp.csv junit.xml; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUTDIR/.$f.tmp" && mv -f "$OUTDIR/.$f.tmp" "$OUTDIR/$f"
  done
  # GNU tar exits 1 for "file changed as we read it" (a log still being written): the archive is valid
  tar -czf "$OUTDIR/.results.tmp" -C "$WORK" . ; local rc=$?
  if [ "$rc" -le 1 ]; then mv -f "$OUTDIR/.results.tmp" "$OUTDIR/results.tar.gz"; else rm -f "$OUTDIR/.results.tmp"; fi
  return 0
}
finish() { publish; rm -rf "$WORK" "${SCRATCH:-}" "${SITE:-}"; }
trap finish EXIT
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL - $(elapsed) )); }
stage() { publish; echo; echo "=== $* (t=$(elapsed)s, $(left)s left)"; }
# seconds for a stage: at most $1, leaving $2 for the stages after it (never below 10)
budget() { local b=$(( $(left) - $2 )); (( b > $1 )) && b=$1; (( b < 10 )) && b=10; echo $b; }

stage "environment"
timeout -k 5 30 nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>&1 | head -3
command -v nvcc && nvcc --version | tail -2
# without ninja on PATH, torch's extension build compiles one file at a time and ignores MAX_JOBS
if command -v ninja > /dev/null; then echo "ninja $(ninja --version)"
else echo "WARNING: no ninja on PATH: the build compiles serially and may not fit its time"; fi
timeout -k 5 60 $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
if [ -z "${CUDA_HOME:-}" ]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")"; do
    if [ -f "$c/include/cuda.h" ]; then export CUDA_HOME=$c; break; fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}  repo=$REPO  out=$OUTDIR  work=$WORK"

stage "build: pip install --no-build-isolation --no-deps ."
cd "$REPO" || exit 1
export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FORCE_CUDA=1
T=$(budget 270 210)
t0=$(date +%s)
TARGET=()  # where python's site-packages is read-only (not root), install into a folder on PYTHONPATH
if ! $PY -c 'import os, sys, sysconfig; sys.exit(0 if os.access(sysconfig.get_paths()["purelib"], os.W_OK) else 1)'; then
  SITE=$(mktemp -d)
  TARGET=(--target "$SITE")
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "site-packages is not writable: installing into $SITE"
fi
if ! timeout -k 10 "$T" $PY -m pip install --no-build-isolation --no-deps -v "${TARGET[@]}" . > "$WORK/build.log" 2>&1; then
  tail -40 "$WORK/build.log"
  echo "BUILD FAILED (or exceeded ${T}s): see build.log in results.tar.gz"
  exit 1
fi
echo "built in $(( $(date +%s) - t0 ))s"
SCRATCH=$(mktemp -d)  # run everything against the installed package, not the source tree; keep OUTDIR
cd "$SCRATCH" || exit 1  # free of pytest's and hypothesis' caches
timeout -k 5 60 $PY -c 'import shortcut_ext as s; i = s.build_info(); print(i); assert i["cuda"], "CUDA kernels missing"' || exit 1
timeout -k 5 60 $PY -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch sees the GPU:", ok); sys.exit(0 if ok else 1)' \
  || { echo "NO GPU VISIBLE TO TORCH: the CUDA tests and benchmarks cannot run"; exit 1; }

stage "CUDA tests"
T=$(budget 110 200)
# a GPU run must not pass by skipping: tests/testing.py raises at collection if CUDA cannot run; the CPU
# emulation tests (test_*emulat*, and the h200 plan check on the emulator) ran in CI already and would
# spend a g++ build (about 30 s) of this stage's budget
# tests.log has one line per test (-v), so a stage cut short by its timeout still shows the test that hung;
# a test running over 45 s dumps every thread's stack there (faulthandler)
SHORTCUT_EXT_REQUIRE_CUDA=1 timeout -k 10 "$T" $PY -m pytest "$REPO/tests/test_cuda.py" "$REPO/tests/test_ops.py" "$REPO/tests/test_errors.py" \
  -k "cuda and not emulat and not h200" -v -rs -p no:cacheprovider -o faulthandler_timeout=45 --durations=10 \
  --junitxml="$WORK/junit.xml" -o junit_family=xunit2 > "$WORK/tests.log" 2>&1
rc=$?
grep -E "(FAILED|ERROR)( |$)" "$WORK/tests.log" | head -30
tail -25 "$WORK/tests.log"
if [ "$rc" != 0 ]; then
  echo "TESTS FAILED (rc=$rc; 124 = timed out after ${T}s)"; STATUS=1
  [ "$rc" = 124 ] && { echo "last tests started:"; grep -E "::" "$WORK/tests.log" | tail -3; }
fi

stage "compute-sanitizer on a small case"
cat > /tmp/se_sanitize_case.py <<'EOF'
# Small fused/generic/TF32 forward+backward and HVP calls (with and without a read-out) for compute-sanitizer
# (each checked against the reference).
import os, torch, shortcut_ext
from shortcut_ext import reference as ref
def check(B, d, R, n, dtype, env, tf32=False, frozen=False):
    for k in ("SHORTCUT_EXT_CUDA_PATH", "SHORTCUT_EXT_CUDA_TILE_ROWS", "SHORTCUT_EXT_CUDA_WORKSPACE_MB",
              "SHORTCUT_EXT_CUDA_ATOMIC_GRAD"):
        os.environ.pop(k, None)
    os.environ.update(env)
    g = torch.Generator().manual_seed(B + d)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    w = torch.randn(R, n, d, d, generator=g, dtype=dtype) * (0.7 / d ** 0.5)
    gy = torch.randn(B, d, generator=g, dtype=dtype)
    with shortcut_ext.cuda_tf32(tf32):
        y, s = torch.ops.shortcut_ext.residual_stack_forward(x.cuda(), w.cuda(), True, "relu", "tanh", "identity", True)
        gx, gw = torch.ops.shortcut_ext.residual_stack_backward(gy.cuda(), w.cuda(), s, True, "relu", "tanh", "identity")
        if frozen:  # without weight gradients (frozen weights): all units in one launch, the same grad_x bits
            gx0, gw0 = torch.ops.shortcut_ext.residual_stack_backward(gy.cuda(), w.cuda(), s, True, "relu", "tanh",
                                                                      "identity", False)
    torch.cuda.synchronize()
    if frozen:
        assert gw0.numel() == 0 and torch.equal(gx0, gx), ("frozen", B, d, env, tf32)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    yr = ref.residual_stack_forward(xr, wr, True, "relu", "tanh", "identity")
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), gy.double())
    for a, b in ((y, yr), (gx, gxr), (gw, gwr)):
        e = ((a.cpu().double() - b).norm() / b.norm()).item()
        assert e < (2e-2 if tf32 in (True, "tf32") else 1e-4), (B, d, env, tf32, e)
    print("ok", B, d, R, n, dtype, env, tf32 or "", flush=True)
check(70, 16, 3, 2, torch.float32, {})
check(40, 100, 2, 2, torch.float32, {"SHORTCUT_EXT_CUDA_TILE_ROWS": "32"})
check(300, 64, 3, 2, torch.float32, {"SHORTCUT_EXT_CUDA_WORKSPACE_MB": "1", "SHORTCUT_EXT_CUDA_TILE_ROWS": "32"},
      frozen=True)
check(50, 20, 2, 3, torch.float64, {"SHORTCUT_EXT_CUDA_ATOMIC_GRAD": "1"}, frozen=True)
check(45, 40, 2, 2, torch.float32, {"SHORTCUT_EXT_CUDA_PATH": "generic"}, frozen=True)
check(70, 64, 3, 2, torch.float32, {}, tf32=True)
check(150, 100, 2, 2, torch.float32, {"SHORTCUT_EXT_CUDA_WORKSPACE_MB": "1"}, tf32=True, frozen=True)
check(90, 48, 2, 3, torch.float32, {}, tf32="3xtf32")
# the large row tiles the benchmarks use at B = 65536 (the planner picks 16- and 32-row tiles for these small
# batches; one tile size is forced for forward and backward alike): 128 rows at d = 64 (FMA and TF32), 64 rows
# in the d = 128 backward (with row chunks from a small workspace), 128 rows in the d = 128 forward (n = 1,
# where the backward's 128-row tile fits too; at n = 2 it does not, and the forced size would be refused)
check(260, 64, 2, 2, torch.float32, {"SHORTCUT_EXT_CUDA_TILE_ROWS": "128"})
check(260, 64, 2, 2, torch.float32, {"SHORTCUT_EXT_CUDA_TILE_ROWS": "128"}, tf32=True)
check(200, 128, 2, 2, torch.float32, {"SHORTCUT_EXT_CUDA_TILE_ROWS": "64", "SHORTCUT_EXT_CUDA_WORKSPACE_MB": "1"})
check(140, 32, 2, 2, torch.float64, {"SHORTCUT_EXT_CUDA_TILE_ROWS": "64"})
check(260, 128, 2, 1, torch.float32, {"SHORTCUT_EXT_CUDA_TILE_ROWS": "128"}, tf32=True)
def check_hvp(B, d, R, n, K, dtype, loss, q=None, matrix="hessian"):  # the HVP kernel: loss, gradient, K products
    g = torch.Generator().manual_seed(B + K)
    x = torch.randn(B, d, generator=g, dtype=dtype)
    w = torch.randn(R, n, d, d, generator=g, dtype=dtype) * (0.8 / d ** 0.5)
    P = None if q is None else torch.randn(q, d, generator=g, dtype=dtype) / d ** 0.5  # a read-out [q, d]
    c = d if q is None else q
    y = torch.randn(B, c, generator=g, dtype=dtype) if loss == "mse" else torch.randint(0, c, (B,), generator=g)
    v = torch.randn(K, R, n, d, d, generator=g, dtype=dtype)
    acts = ("tanh", "relu", "ssigmoid")
    args = (x.cuda(), w.cuda(), y.cuda(), v.cuda(), True, *acts, loss)
    Pc = None if P is None else P.cuda()
    outs = torch.ops.shortcut_ext.residual_stack_hvp(*args, Pc) if matrix == "hessian" else \
        torch.ops.shortcut_ext.residual_stack_hvp_part(*args, matrix, Pc)
    torch.cuda.synchronize()
    f64 = lambda t: t.double() if t is not None and t.is_floating_point() else t
    exact = ref.residual_stack_hvp(f64(x), f64(w), f64(y), f64(v), True, *acts, loss, f64(P), matrix)
    for a, b in zip(outs, exact):
        e = ((a.cpu().double() - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert e < 1e-4, ("hvp", B, d, K, loss, q, matrix, e)
    print("ok hvp", B, d, R, n, K, dtype, loss, f"readout [{q}, {d}]" if q else "", matrix, flush=True)
check_hvp(33, 16, 2, 2, 3, torch.float32, "mse")
check_hvp(20, 7, 3, 3, 1, torch.float64, "cross_entropy")
check_hvp(21, 16, 2, 2, 3, torch.float32, "cross_entropy", q=10)  # a classifier's read-out
check_hvp(19, 5, 2, 2, 2, torch.float64, "mse", q=8)
check_hvp(33, 16, 2, 2, 3, torch.float32, "mse", matrix="ggn")  # the parts: G (no tangent recompute), F, the
check_hvp(20, 7, 3, 3, 1, torch.float64, "cross_entropy", matrix="functional")  # empirical Fisher
check_hvp(21, 16, 2, 2, 3, torch.float32, "cross_entropy", q=10, matrix="empirical_fisher")
EOF
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck initcheck; do
    T=$(budget 50 190)
    # python, torch and the CUDA context start under the tool: a budget under 30 s is a skip, not a check
    if (( T < 30 )); then echo "compute-sanitizer $tool: skipped (${T}s left for it; the benchmarks come first)"; continue; fi
    echo "--- $tool" >> "$WORK/sanitizer.log"
    # without PyTorch's caching allocator every tensor is its own allocation: memcheck sees an overrun past
    # a buffer's end and initcheck a read of memory never written, which 2 MiB cached blocks would hide
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 "$T" compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 \
      $PY /tmp/se_sanitize_case.py > /tmp/se_sanitizer_$tool.log 2>&1
    rc=$?
    cat /tmp/se_sanitizer_$tool.log >> "$WORK/sanitizer.log"
    tail -4 /tmp/se_sanitizer_$tool.log
    log=/tmp/se_sanitizer_$tool.log
    # errors first: racecheck reports hazards without failing the launch, and a run cut short by its
    # timeout may have reported some before it (racecheck's warnings, "Warning: Race reported", are listed
    # in sanitizer.log but do not fail the run)
    if grep -q -E "Invalid __(global|shared|local)__|Error: Race reported|Uninitialized __global__|ERROR SUMMARY: [1-9]|RACECHECK SUMMARY: [0-9]+ hazards? displayed \([1-9]" "$log"; then
      echo "compute-sanitizer $tool: ERRORS REPORTED (rc=$rc)"; STATUS=1
    elif [ "$rc" = 0 ]; then echo "compute-sanitizer $tool: clean"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "compute-sanitizer $tool: timed out after ${T}s with no error reported (not a failure of the kernels)"
    elif grep -q -E "Device not supported|LibraryNotLoaded" "$log"; then
      echo "compute-sanitizer $tool: could not run on this runtime (the tool refused the device)"
    elif [ "$rc" = 3 ]; then echo "compute-sanitizer $tool: ERRORS REPORTED"; STATUS=1
    elif grep -q "AssertionError" "$log"; then echo "compute-sanitizer $tool: the case's values disagree"; STATUS=1
    elif grep -q "Traceback" "$log"; then echo "compute-sanitizer $tool: the case failed (rc=$rc): see sanitizer.log"; STATUS=1
    else echo "compute-sanitizer $tool: could not run (rc=$rc; unsupported on this runtime?)"
    fi
  done
else
  echo "compute-sanitizer not found: skipped"
fi

stage "benchmarks: residual stack"
T=$(budget 400 70)
# the script's own budget stops new measurements 30 s before the timeout (a compile or the last variant
# finishes inside it), or at half the stage where the earlier stages left it under a minute
BUDGET=$(( T - 30 > T / 2 ? T - 30 : T / 2 ))
# the issue's target cell first (fwdbwd, d = 64, B = 65536), so that a short budget still measures it; the input
# gradient with frozen weights (fwddx) last, where the budget allows
timeout -k 10 "$T" $PY "$REPO/benchmarks/gpu/bench_gpu.py" --out "$WORK" --budget-s "$BUDGET" --compile-budget-s 100 \
  --modes fwdbwd,fwd,fwddx --ds 64,128,16 --bs 65536,4096 --target-s 0.3
rc=$?
[ "$rc" = 0 ] || { echo "BENCHMARK rc=$rc (1: a variant disagreed or failed; 124: timed out)"; STATUS=1; }

stage "benchmarks: Hessian-vector products"
T=$(budget 60 10)
timeout -k 10 "$T" $PY "$REPO/benchmarks/gpu/bench_gpu_hvp.py" --out "$WORK" --budget-s $(( T - 15 > 10 ? T - 15 : 10 )) \
  --target-s 0.2
rc=$?
[ "$rc" = 0 ] || { echo "HVP BENCHMARK rc=$rc (1: a variant disagreed or failed; 124: timed out)"; STATUS=1; }

stage "informational (never fails the run): spectrum --distributed on NCCL, one rank"
T=$(budget 40 0)
if (( T > 15 )); then
  timeout -k 5 "$T" $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m shortcut_ext spectrum --units 50 \
    --width 8 --init zero --samples 64 --probes 2 --steps 10 --top 3 --device cuda --distributed --no-progress \
    --no-plots --out "$WORK/spectrum_nccl" > "$WORK/spectrum_nccl.log" 2>&1
  echo "spectrum --distributed (NCCL): rc=$? (log: spectrum_nccl.log)"; tail -2 "$WORK/spectrum_nccl.log"
else
  echo "skipped: ${T}s left"
fi

stage "done (status $STATUS)"
ls -la "$OUTDIR" "$WORK"
exit $STATUS
