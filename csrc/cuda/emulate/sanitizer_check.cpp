// The emulated CUDA kernels (emulation.h) under the compilers' sanitizers.  Not part of any build;
// tests/test_cuda.py::test_emulated_kernels_under_asan runs `sweep` under ASan + UBSan (slow suite).
//
//   race   a few fused (float32, float64, TF32, 3xTF32), generic and HVP launches, for ThreadSanitizer:
//          it reports any shared-memory access between two emulated threads of a block that no
//          __syncthreads() orders (a missing barrier).  It found a barrier removed on purpose from
//          forward_fused_kernel; the kernels as committed run clean (10-20 min on 2 cores).
//   sweep  edge shapes for AddressSanitizer + UndefinedBehaviorSanitizer: d = 1, 3, odd, above 128;
//          B = 1 and tiles +- a few rows; every forced fused tile; TF32 and 3xTF32; deterministic and
//          atomic weight gradients; a workspace small enough to split the units; the HVP with row
//          chunks, with and without a read-out, and its products with G, F and the empirical Fisher; grid-stride launches capped at 2 blocks.  Inputs, outputs and workspace are sized
//          exactly, and the launch's shared memory is followed by a poisoned guard, so any read or
//          write out of bounds aborts with a report (on a
//          GPU: what compute-sanitizer's memcheck reports, or a silent wrong result).  Every result is
//          also compared with the float64 generic path (the HVP: with the float64 unchunked call).
//          Launches the planner refuses (a tile that is not compiled for that d) are counted, not run.
//          `sweep quick` is the subset the test runs (2-4 min under ASan on 2 cores); `sweep stack` and
//          `sweep hvp` are its two halves.
//
//   TP=$(python -c 'import torch,os;print(os.path.dirname(torch.__file__))')
//   SAN=thread            # or: SAN=address,undefined
//   g++ -std=c++17 -O1 -g -fsanitize=$SAN -fno-sanitize-recover=all -pthread -fno-strict-aliasing -w \
//       -DSHORTCUT_EXT_CUDA_EMULATE -Icsrc -I$TP/include -I$TP/include/torch/csrc/api/include \
//       csrc/cuda/emulate/sanitizer_check.cpp -L$TP/lib -lc10 -Wl,-rpath,$TP/lib -o /tmp/sanitizer_check
//   setarch $(uname -m) -R /tmp/sanitizer_check race             # TSan needs ASLR off on some kernels
//   ASAN_OPTIONS=detect_leaks=0 /tmp/sanitizer_check sweep       # ASan: ~50 min on 2 cores
// Exit status 0: every launch ran and matched; 1: a mismatch or a failed launch (printed).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/emulate/emulate_api.cpp"
#include "cuda/residual_stack_hvp_cuda.cu"

namespace {

int n_ok = 0, n_refused = 0, n_bad = 0;

// Forward then backward; activations pre, mid, post (Act codes).  Returns 0, or 1 with `err`.
template <typename T>
int fwd_bwd(const std::vector<T>& x, const std::vector<T>& w, const std::vector<T>& gy, std::vector<T>& y,
            std::vector<T>& gx, std::vector<T>& gw, int64_t B, int64_t d, int64_t R, int64_t n, int shortcut, int pre,
            int mid, int post, int path, int tile, int atomic, int64_t ws, char* err, bool want_w = true) {
  std::vector<T> saved(size_t(R * B * d));
  y.assign(size_t(B * d), T(0));
  gx.assign(size_t(B * d), T(0));
  gw.assign(size_t(R * n * d * d), T(0));
  const int dbl = sizeof(T) == 8;
  return se_emu_forward(dbl, x.data(), w.data(), y.data(), saved.data(), B, d, R, n, shortcut, pre, mid, post, path, tile,
                        err, 512) ||
         se_emu_backward(dbl, gy.data(), w.data(), saved.data(), gx.data(), want_w ? gw.data() : nullptr, B, d, R, n,
                         shortcut, pre, mid, post, path, tile, atomic, ws, err, 512);
}

// max |a - b| / max |b| (infinite if a has a NaN)
template <typename T>
double rel_err(const std::vector<T>& a, const std::vector<double>& b) {
  double m = 0, s = 1e-300;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs(double(a[i]) - b[i]);
    if (std::isnan(e)) return INFINITY;
    m = std::max(m, e);
    s = std::max(s, std::fabs(b[i]));
  }
  return m / s;
}

// One launch pair in T (tf32: 0, 1 TF32, 2 3xTF32) against the float64 generic path on the same
// (rounded) inputs; `frozen`: once more without weight gradients (a null grad_w), whose grad_x must have
// the same bits.
template <typename T>
void stack_case(int64_t B, int64_t d, int64_t R, int64_t n, int shortcut, int pre, int mid, int post, int path,
                int tile, int tf32 = 0, int atomic = 0, int64_t ws = 0, bool frozen = false) {
  std::mt19937 gen(unsigned(B * 7919 + d * 131 + R * 17 + n));
  std::normal_distribution<double> nd;
  std::vector<T> x(size_t(B * d)), w(size_t(R * n * d * d)), gy(size_t(B * d)), y, gx, gw;
  for (auto& v : x) v = T(nd(gen));
  for (auto& v : gy) v = T(nd(gen));
  for (auto& v : w) v = T(nd(gen) * 0.4 / std::sqrt(double(d)));
  const std::vector<double> xr(x.begin(), x.end()), wr(w.begin(), w.end()), gyr(gy.begin(), gy.end());
  std::vector<double> yr, gxr, gwr;
  char err[512] = {0};
  se_emu_set_tf32(0);
  if (fwd_bwd<double>(xr, wr, gyr, yr, gxr, gwr, B, d, R, n, shortcut, pre, mid, post, 2, 0, 0, 0, err)) {
    std::printf("FAILED float64 generic reference B=%lld d=%lld: %s\n", (long long)B, (long long)d, err);
    ++n_bad;
    return;
  }
  se_emu_set_tf32(tf32);
  const int rc = fwd_bwd<T>(x, w, gy, y, gx, gw, B, d, R, n, shortcut, pre, mid, post, path, tile, atomic, ws, err);
  se_emu_set_tf32(0);
  char what[256];
  std::snprintf(what, sizeof what, "%s B=%lld d=%lld R=%lld n=%lld shortcut=%d acts=%d%d%d path=%d tile=%d tf32=%d "
                "atomic=%d ws=%lld", sizeof(T) == 8 ? "float64" : "float32", (long long)B, (long long)d, (long long)R,
                (long long)n, shortcut, pre, mid, post, path, tile, tf32, atomic, (long long)ws);
  if (rc) {
    // the planner's refusals name the tile or path; anything else is a failed launch
    const bool planner = std::strstr(err, "is not a fused tile size") || std::strstr(err, "fused path");
    std::printf("%s %s: %.200s\n", planner ? "refused" : "FAILED", what, err);
    ++(planner ? n_refused : n_bad);
    return;
  }
  const double e = std::max({rel_err(y, yr), rel_err(gx, gxr), rel_err(gw, gwr)});
  const double tol = sizeof(T) == 8 ? 1e-12 : (tf32 == 1 ? 3e-2 : 1e-4);
  const bool ok = e <= tol;
  std::printf("%s %s err=%.3g\n", ok ? "ok" : "MISMATCH", what, e);
  ++(ok ? n_ok : n_bad);
  if (frozen) {
    std::vector<T> y2, gx2, gw2;
    se_emu_set_tf32(tf32);
    const int rc2 = fwd_bwd<T>(x, w, gy, y2, gx2, gw2, B, d, R, n, shortcut, pre, mid, post, path, tile, atomic, ws,
                               err, /*want_w=*/false);
    se_emu_set_tf32(0);
    const bool same = rc2 == 0 && std::memcmp(gx2.data(), gx.data(), gx.size() * sizeof(T)) == 0;
    std::printf("%s frozen weights (no grad_w) %s%s%.200s\n", same ? "ok" : "MISMATCH", what, rc2 ? ": " : "",
                rc2 ? err : "");
    ++(same ? n_ok : n_bad);
  }
  std::fflush(stdout);
}

// Loss, gradient and K products (tanh / relu / ssigmoid) in T with `max_rows` row chunks, against
// the float64 call without chunks; P: a read-out [q, d] (empty: none); matrix: the Hessian, G, F or the
// empirical Fisher.
template <typename T>
int64_t hvp_call(const sc::StackArgs& a, int64_t K, bool ce, const std::vector<double>& x, const std::vector<double>& w,
                 const std::vector<double>& y, const std::vector<int64_t>& cls, const std::vector<double>& v,
                 const std::vector<double>& P, int64_t max_rows, std::vector<double>& out,
                 shortcut_ext::HvpMatrix matrix) {
  std::vector<T> xt(x.begin(), x.end()), wt(w.begin(), w.end()), yt(y.begin(), y.end()), vt(v.begin(), v.end());
  std::vector<T> pt(P.begin(), P.end());
  std::vector<T> gw(w.size()), hv(v.size());
  T loss = 0;
  HostAllocator alloc;
  const auto rc = sc::launch_residual_stack_hvp<T>(a, K, ce ? shortcut_ext::Loss::CrossEntropy : shortcut_ext::Loss::Mse,
                                                   xt.data(), wt.data(), ce ? nullptr : yt.data(),
                                                   ce ? cls.data() : nullptr, vt.data(), &loss, gw.data(), hv.data(),
                                                   alloc.get(), nullptr, max_rows, pt.empty() ? nullptr : pt.data(),
                                                   int64_t(P.size()) / a.d, matrix);
  out.assign(1, double(loss));
  out.insert(out.end(), gw.begin(), gw.end());
  out.insert(out.end(), hv.begin(), hv.end());
  return int64_t(rc);
}

// q > 0: with a read-out P [q, d] (targets [B, q] or classes in [0, q)); the inputs, targets and read-out are
// sized exactly, so a read past the read-out's width (or the targets' q columns) is reported.
template <typename T>
void hvp_case(int64_t B, int64_t d, int64_t R, int64_t n, int64_t K, bool ce, int64_t max_rows, bool shortcut,
              int64_t q = 0, shortcut_ext::HvpMatrix matrix = shortcut_ext::HvpMatrix::Hessian) {
  std::mt19937 gen(unsigned(B * 31 + d * 7 + K + 13 * q));
  std::normal_distribution<double> nd;
  const int64_t wy = q > 0 ? q : d;  // the targets' width
  std::vector<double> x(size_t(B * d)), w(size_t(R * n * d * d)), y(size_t(B * wy)), v(size_t(K * R * n * d * d));
  std::vector<double> P(size_t(q * d));
  std::vector<int64_t> cls(static_cast<size_t>(B));
  for (auto& e : x) e = double(T(nd(gen)));
  for (auto& e : y) e = double(T(nd(gen)));
  for (auto& e : v) e = double(T(nd(gen)));
  for (auto& e : w) e = double(T(nd(gen) * 0.5 / std::sqrt(double(d))));
  for (auto& e : P) e = double(T(nd(gen) / std::sqrt(double(d))));
  for (int64_t b = 0; b < B; ++b) cls[size_t(b)] = (b * 5) % wy;
  const sc::StackArgs a{B, d, R, n, shortcut, Act::Tanh, Act::Relu, Act::SSigmoid};
  std::vector<double> ref, got;
  char what[200];
  static const char* const kMatrix[] = {"hessian", "ggn", "functional", "empirical_fisher"};
  std::snprintf(what, sizeof what,
                "hvp %s B=%lld d=%lld R=%lld n=%lld K=%lld %s rows=%lld shortcut=%d readout=%lld matrix=%s",
                sizeof(T) == 8 ? "float64" : "float32", (long long)B, (long long)d, (long long)R, (long long)n,
                (long long)K, ce ? "cross_entropy" : "mse", (long long)max_rows, int(shortcut), (long long)q,
                kMatrix[int(matrix)]);
  try {
    if (hvp_call<double>(a, K, ce, x, w, y, cls, v, P, 0, ref, matrix) != 0 ||
        hvp_call<T>(a, K, ce, x, w, y, cls, v, P, max_rows, got, matrix) != 0) {
      std::printf("FAILED %s: launch error\n", what);
      ++n_bad;
      return;
    }
  } catch (const std::exception& e) {
    std::printf("FAILED %s: %.200s\n", what, e.what());
    ++n_bad;
    return;
  }
  const double e = rel_err(got, ref);
  const bool ok = e <= (sizeof(T) == 8 ? 1e-12 : 1e-4);
  std::printf("%s %s err=%.3g\n", ok ? "ok" : "MISMATCH", what, e);
  ++(ok ? n_ok : n_bad);
  std::fflush(stdout);
}

void race() {
  hvp_case<float>(40, 12, 2, 2, 3, false, 0, true);
  hvp_case<double>(33, 7, 2, 3, 1, true, 0, true);
  hvp_case<float>(40, 12, 2, 2, 3, true, 0, true, 0, shortcut_ext::HvpMatrix::Ggn);  // no tangent recompute
  // relu before, tanh between, ssigmoid after the layers of each unit
  stack_case<float>(40, 16, 2, 2, 1, 1, 2, 3, 1, 32);
  stack_case<double>(40, 20, 2, 3, 1, 1, 2, 3, 1, 16);
  stack_case<float>(40, 64, 2, 2, 1, 1, 2, 3, 1, 32);
  stack_case<float>(40, 128, 2, 2, 1, 1, 2, 3, 1, 32);
  stack_case<float>(70, 40, 2, 2, 1, 1, 2, 3, 2, 0);
  for (int mode : {1, 2}) {  // TF32, 3xTF32 tensor-core kernels
    stack_case<float>(40, 16, 2, 2, 1, 1, 2, 3, 1, 32, mode);
    stack_case<float>(40, 64, 2, 2, 1, 1, 2, 3, 1, 32, mode);
    stack_case<float>(40, 100, 2, 2, 1, 1, 2, 3, 1, 32, mode);
  }
}

// The edge cases the test runs: the smallest and an odd d, a d above 128 (generic), a plain stack with
// atomic weight gradients, forced tiles with a partial last tile, TF32 and 3xTF32, chunked units and
// HVP row chunks.
void sweep_quick() {
  stack_case<float>(1, 1, 2, 2, 1, 1, 2, 3, 0, 0);
  stack_case<double>(37, 131, 2, 2, 1, 1, 2, 3, 0, 0);
  stack_case<float>(37, 20, 1, 3, 0, 2, 3, 1, 2, 0, 0, 1, 0, /*frozen=*/true);  // generic, atomic
  stack_case<float>(133, 64, 2, 1, 1, 1, 2, 3, 1, 128);
  stack_case<double>(29, 128, 1, 2, 1, 3, 0, 1, 1, 32, 0, 1);
  stack_case<float>(70, 24, 2, 2, 1, 1, 2, 3, 0, 0, 1);
  stack_case<float>(70, 64, 2, 2, 1, 1, 2, 3, 0, 0, 1);
  stack_case<float>(70, 128, 2, 2, 1, 1, 2, 3, 0, 0, 2);
  stack_case<float>(40, 20, 5, 2, 1, 1, 2, 3, 0, 0, 0, 0, 40 * 20 * 20 * 4 * 2, /*frozen=*/true);  // unit chunks
  stack_case<double>(40, 16, 5, 2, 1, 1, 2, 3, 2, 0, 0, 0, 40 * 16 * 16 * 8 * 3, /*frozen=*/true);
  // fused, atomic weight gradients, d = 20 padded to D = 32: the padding's rows add nothing (zeros) and must
  // add it nowhere (past the last layer's gradient: the end of grad_w)
  stack_case<double>(40, 20, 2, 2, 1, 1, 2, 3, 1, 16, 0, 1);
  hvp_case<double>(23, 33, 2, 2, 3, false, 7, true);
  hvp_case<float>(23, 64, 2, 1, 3, true, 0, false);
  hvp_case<double>(23, 1, 2, 2, 1, false, 7, true);
  hvp_case<double>(23, 9, 2, 2, 3, true, 7, true, 4);  // read-outs: fewer and more columns than d, row chunks
  hvp_case<float>(23, 5, 2, 1, 2, false, 0, false, 11);
  hvp_case<double>(23, 9, 2, 2, 3, true, 7, true, 4, shortcut_ext::HvpMatrix::Ggn);  // the parts
  hvp_case<float>(23, 33, 2, 2, 3, false, 7, true, 0, shortcut_ext::HvpMatrix::Functional);
  hvp_case<double>(23, 5, 2, 1, 2, true, 0, false, 11, shortcut_ext::HvpMatrix::EmpiricalFisher);
  // grid-stride launches (weight preparation, partial sums, HVP transposes) capped at 2 blocks: many rounds
  se_emu::grid_stride_cap() = 2;
  stack_case<float>(40, 20, 5, 2, 1, 1, 2, 3, 0, 0, 0, 0, 40 * 20 * 20 * 4 * 2);
  stack_case<double>(37, 33, 2, 2, 1, 1, 2, 3, 2, 0);
  hvp_case<float>(23, 9, 2, 2, 3, true, 7, true);
  se_emu::grid_stride_cap() = 65535;
}

void sweep_stack() {
  for (int64_t d : {1, 3, 16, 20, 32, 33, 64, 100, 128, 131})  // automatic plan; generic, plain, atomic
    for (int64_t B : {int64_t(1), int64_t(37)}) {
      stack_case<double>(B, d, 2, 2, 1, 1, 2, 3, 0, 0, 0, 0, 0, /*frozen=*/true);
      stack_case<float>(B, d, 2, 2, 1, 1, 2, 3, 0, 0);
      stack_case<float>(B, d, 1, 3, 0, 2, 3, 1, 2, 0, 0, 1, 0, /*frozen=*/true);
    }
  for (int64_t d : {16, 32, 64, 128})  // every forced fused tile, a partial last tile
    for (int tile : {16, 32, 64, 128}) {
      stack_case<float>(tile + 5, d, 2, 1, 1, 1, 2, 3, 1, tile);
      stack_case<double>(tile - 3, d, 1, 2, 1, 3, 0, 1, 1, tile, 0, 1);
    }
  for (int mode : {1, 2})  // TF32 and 3xTF32
    for (int64_t d : {8, 16, 24, 64, 100, 128})
      for (int64_t B : {int64_t(5), int64_t(70)}) stack_case<float>(B, d, 2, 2, 1, 1, 2, 3, 0, 0, mode);
  // a workspace that holds the partial weight gradients of only 2 or 3 units: units in chunks
  for (int64_t d : {16, 20, 64}) stack_case<float>(40, d, 5, 2, 1, 1, 2, 3, 0, 0, 0, 0, 40 * d * d * 4 * 2);
  for (int64_t d : {16, 20}) stack_case<double>(40, d, 5, 2, 1, 1, 2, 3, 2, 0, 0, 0, 40 * d * d * 8 * 3);
}

void sweep_hvp() {
  for (int64_t d : {1, 3, 16, 33, 64})
    for (int64_t K : {int64_t(1), int64_t(3)})
      for (bool ce : {false, true}) {
        if (ce && d == 1) continue;  // one class
        hvp_case<double>(23, d, 2, 2, K, ce, 7, true);
        hvp_case<float>(23, d, 2, 1, K, ce, 0, false);
        for (int64_t q : {int64_t(1), int64_t(10)}) {  // a read-out to 1 and to 10 columns
          if (ce && q == 1) continue;
          hvp_case<double>(23, d, 2, 2, K, ce, 7, true, q);
        }
        for (auto m : {shortcut_ext::HvpMatrix::Ggn, shortcut_ext::HvpMatrix::Functional,
                       shortcut_ext::HvpMatrix::EmpiricalFisher}) {
          hvp_case<double>(23, d, 2, 2, K, ce, 7, true, 0, m);
          hvp_case<float>(23, d, 2, 1, K, ce, 0, false, d + 2, m);
        }
      }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const std::string part = argc > 2 ? argv[2] : "";
  se_emu_set_sms(3);
  if (mode == "race") {
    race();
  } else if (mode == "sweep" && (part == "" || part == "quick" || part == "stack" || part == "hvp")) {
    if (part == "quick") sweep_quick();
    if (part == "" || part == "stack") sweep_stack();
    if (part == "" || part == "hvp") sweep_hvp();
  } else {
    std::fprintf(stderr, "usage: %s race | sweep [quick | stack | hvp]\n", argv[0]);
    return 2;
  }
  std::printf("ok=%d refused=%d bad=%d\n", n_ok, n_refused, n_bad);
  return n_bad != 0;
}
