// Small row-major GEMMs for the fused CPU kernels.
//
// float32 goes through a register kernel for the weight gradients of d <= 16 (AVX-512 and AVX2 builds) and
// otherwise ATen's batch-reduce GEMM (oneDNN brgemm ukernels, AVX-512 where the CPU has it); that symbol is
// exported by libtorch but internal, so SHORTCUT_EXT_NO_BRGEMM=1 (compile time) or
// SHORTCUT_EXT_CPU_GEMM=portable (run time) switch to the portable loops below, which are also the float64
// path where no BLAS is found.
//
// float64 runs a register kernel (dgemm_avx512 on AVX-512 builds, gemm_avx2 on AVX2 builds), else the BLAS
// `dgemm_` that libtorch carries (MKL in the x86 wheels), else the portable loops.  The portable loops ran at 19-30
// GFLOP/s on 2 cores, and the fused float64 ops lost to pure PyTorch (MKL) from d = 32 on; `dgemm_` was
// 1.3-5x faster than the loops, and the register kernel is 1.8-3.5x faster than `dgemm_` again on whole
// fused ops, d = 2 to 128 (2-core AVX-512 AMD EPYC, where MKL takes its AVX2 path; MKL also pays a
// per-call cost that the stack's small products feel).  SHORTCUT_EXT_CPU_GEMM=brgemm selects the
// libraries only (oneDNN for float32, `dgemm_` for float64), =portable the loops only.  The `dgemm_`
// symbol is weak: where libtorch exports none, the loops stand in for it.
#pragma once

#include <ATen/native/CPUBlas.h>

// Hides a value from the optimiser (no instruction): it must keep it in a register as it is.
#if defined(__GNUC__)
#define SE_OPAQUE(x) asm("" : "+r"(x))
#else
#define SE_OPAQUE(x) ((void)0)
#endif

#include "cpu/cpu_schedule.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc) __attribute__((weak));

namespace shortcut_ext {

// The float64 path: "kernel64" (the register kernel: SHORTCUT_EXT_CPU_GEMM unset or auto, AVX-512 or AVX2
// builds), "blas" (dgemm_: =brgemm, or neither) or "portable" (=portable, or no dgemm_ in libtorch).
// Measured at R = 300, B = 256, 2 threads, whole fused ops (forward, forward+backward, HVPs): dgemm_ 1.3-5x
// faster than the loops at every d from 2 to 64; the register kernel 1.8-3.5x faster than dgemm_ at every d
// from 2 to 128.
std::string cpu_gemm64_path();
bool use_blas64();
bool use_kernel64();

// C[M, N] (+)= op(A) @ B, row-major, by the column-major BLAS: C^T = B^T op(A)^T.
inline void blas_dgemm(bool a_transposed, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                       const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
  const double one = 1.0, beta = accumulate ? 1.0 : 0.0;
  dgemm_("N", a_transposed ? "T" : "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
}

// Which float32 path the CPU kernels use in this process (SHORTCUT_EXT_CPU_GEMM):
// "auto" (default): the d <= 16 register kernel below where it applies (AVX-512 and AVX2 builds), oneDNN
// brgemm otherwise; "brgemm": brgemm only; "portable": the portable loops only.
std::string cpu_gemm_path();
bool use_brgemm();
bool use_kernel16();

// Requests one cache line for reading (prefetcht0) or writing (prefetchw).  Inline asm: GCC 12 deletes
// __builtin_prefetch in some inlined contexts (a helper whose loop does nothing else; the kernels' K loops
// once the request is inlined into them), and the requests are then silently gone.
__attribute__((always_inline)) inline void prefetch_line(const char* line) {
#if defined(__x86_64__)
  asm volatile("prefetcht0 (%0)" : : "r"(line));
#else
  __builtin_prefetch(line, 0, 3);
#endif
}
__attribute__((always_inline)) inline void prefetch_line_for_write(const char* line) {
#if defined(__x86_64__) && defined(__PRFCHW__)
  asm volatile("prefetchw (%0)" : : "r"(line));
#elif defined(__x86_64__)
  asm volatile("prefetcht0 (%0)" : : "r"(line));
#else
  __builtin_prefetch(line, 1, 3);
#endif
}

// Cache lines that a GEMM requests while it runs: the next unit's saved activations in the backward.  They
// come from memory (written with non-temporal stores, and too large for the caches at depth), a new
// stream of a few KB per unit that the hardware prefetchers never learn; the weight-gradient GEMMs
// consume a row of them in a few cycles and stalled on each line.  The register kernels issue these one
// line (or a few) per step of their K loop, so that they arrive while the GEMM computes; requested all at
// once between GEMMs they stall on the core's outstanding-miss slots instead.  Measured on one core,
// the d = 16 weight-gradient GEMM (K = 128) reading its A from memory: 0.93 us, 0.57 us with a burst
// prefetch a GEMM ahead, 0.31 us with the lines spread over the K loop (0.29 us from cache); a d = 16
// forward + backward at R = 1000, B = 256: 4.4 -> 2.9 ms.
//
// A panel of `rows` rows of `cols` elements (leading dimension ld) and a cursor: the requests go out in
// order over the calls that take it, lines() / `parts` per call (the caller says over how many calls it
// spreads them).  The routines that take no requests (brgemm, BLAS, the loops) issue their share at once
// before they run.
struct Prefetch {
  const char* first = nullptr;                    // row 0's first element
  int64_t rows = 0, bytes = 0, ld = 0, parts = 1;  // bytes of a row, ld in bytes
  int64_t row_lines = 0;                           // the most lines a row spans
  Prefetch() = default;
  template <typename T>
  Prefetch(const T* first_, int64_t count) : Prefetch(first_, 1, count, count) {}
  template <typename T>
  Prefetch(const T* first_, int64_t rows_, int64_t cols, int64_t ld_) {
    if (first_ == nullptr || rows_ <= 0 || cols <= 0) return;
    first = reinterpret_cast<const char*>(first_);
    rows = rows_;
    bytes = cols * int64_t(sizeof(T));
    ld = ld_ * int64_t(sizeof(T));
    row_lines = rows == 1 || ld % 64 == 0 ? (int64_t(reinterpret_cast<uintptr_t>(first) & 63) + bytes + 63) / 64
                                          : (bytes + 63) / 64 + 1;
    r_ = -1;  // advance() starts row 0
  }
  int64_t lines() const { return rows * row_lines; }
  int64_t share() const { return parts > 1 ? (lines() + parts - 1) / parts : lines(); }  // per call
  // A kernel's share over its K loop, evenly: `share` lines over `steps` steps (a running sum, no division).
  struct Pacer {
    const Prefetch& pf;
    const int64_t share, steps;
    int64_t acc = 0;
    template <typename F>
    __attribute__((always_inline)) void step(F&& request) {  // request(line) for the lines due at this step
      for (acc += share; acc >= steps; acc -= steps)
        if (const char* line = pf.next_line()) request(line);
    }
    __attribute__((always_inline)) void step() {
      step([](const char* line) { prefetch_line(line); });
    }
  };
  Pacer pacer(int64_t steps) const { return {*this, steps > 0 ? share() : 0, std::max<int64_t>(steps, 1)}; }
  void some(int64_t count) const {
    for (int64_t j = 0; j < count; ++j)
      if (const char* line = next_line()) prefetch_line(line); else return;
  }
  void for_routine() const { some(share()); }  // before a routine that takes no requests
  void all() const { some(INT64_MAX); }
  // a few lines that will be written (the next unit's weight-gradient slot), at once
  void all_for_write() const {
    while (const char* line = next_line()) prefetch_line_for_write(line);
  }
  // the next line to request, or nullptr once all were (what the calls above request; tests walk it)
  const char* next_line() const { return advance() ? q_ - 64 : nullptr; }

 private:
  // the cursor: q_ is the next line, end_ the end of row r_'s lines
  mutable const char* q_ = nullptr;
  mutable const char* end_ = nullptr;
  mutable int64_t r_ = 0;
  // moves the cursor past the next line (q_ - 64 is it); false when all are requested.  A row's lines run
  // from the one that holds its first element to the one that holds its last.
  bool advance() const {
    if (q_ == end_) {
      if (r_ + 1 >= rows) return false;
      ++r_;
      const uintptr_t s = reinterpret_cast<uintptr_t>(first + r_ * ld);
      q_ = reinterpret_cast<const char*>(s & ~uintptr_t(63));
      end_ = reinterpret_cast<const char*>((s + uintptr_t(bytes) + 63) & ~uintptr_t(63));
    }
    q_ += 64;
    return true;
  }
};
inline const Prefetch kNoPrefetch{};

#if defined(__AVX512F__)
// C[MR, N] (+)= A[K, MR]^T @ B[K, N] for N <= 16 (`mask`: the N columns): MR accumulator rows of one
// vector, one row of B per step, so the weight gradients of d <= 16 stacks need no transpose of A.  With
// MR <= 8 rows the accumulators alternate between two sets over k (even, odd), summed at the end, so that
// enough FMAs are in flight.  At MR = N = 16, against transpose + brgemm (1 thread, K = 128 / 2048): 110 /
// 117 vs 76 / 33 GFLOP/s; at M = N = 10, K = 1638: 3.1 vs 7.6 us a call (the transpose of a 10-wide tile
// runs scalar, and took more time than brgemm).
// (A register kernel for C[M, 16] = A[M, 16] @ B[16, 16] lost to brgemm, 72 vs 95 GFLOP/s, so there is none.)
template <int MR>
inline void sgemm_small_tn(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                           int64_t ldc, __mmask16 mask, bool accumulate, const Prefetch& pf) {
  constexpr bool kTwo = MR <= 8;
  __m512 c[MR], e[kTwo ? MR : 1];
#pragma GCC unroll 16
  for (int o = 0; o < MR; ++o) c[o] = accumulate ? _mm512_maskz_loadu_ps(mask, C + o * ldc) : _mm512_setzero_ps();
  if (kTwo)
#pragma GCC unroll 8
    for (int o = 0; o < MR; ++o) e[kTwo ? o : 0] = _mm512_setzero_ps();
  Prefetch::Pacer pace = pf.pacer(kTwo ? K / 2 + K % 2 : K);
  int64_t i = 0;
  if (kTwo) {
    for (; i + 2 <= K; i += 2) {
      pace.step();
      const __m512 b0 = _mm512_maskz_loadu_ps(mask, B + i * ldb);
      const __m512 b1 = _mm512_maskz_loadu_ps(mask, B + (i + 1) * ldb);
#pragma GCC unroll 8
      for (int o = 0; o < MR; ++o) {
        c[o] = _mm512_fmadd_ps(_mm512_set1_ps(A[i * lda + o]), b0, c[o]);
        e[kTwo ? o : 0] = _mm512_fmadd_ps(_mm512_set1_ps(A[(i + 1) * lda + o]), b1, e[kTwo ? o : 0]);
      }
    }
  }
  for (; i < K; ++i) {
    pace.step();
    const __m512 bi = _mm512_maskz_loadu_ps(mask, B + i * ldb);
#pragma GCC unroll 16
    for (int o = 0; o < MR; ++o) c[o] = _mm512_fmadd_ps(_mm512_set1_ps(A[i * lda + o]), bi, c[o]);
  }
#pragma GCC unroll 16
  for (int o = 0; o < MR; ++o)
    _mm512_mask_storeu_ps(C + o * ldc, mask, kTwo ? _mm512_add_ps(c[o], e[kTwo ? o : 0]) : c[o]);
}

// The kernel above for any M, N <= 16.  (Swept over 16-column panels it also took N > 16 as fast as
// transpose + brgemm, d = 10 to 16 and N = 20 to 256, but the HVP that calls it so ran no faster.)
inline void gemm16_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                      float* C, int64_t ldc, bool accumulate, const Prefetch& pf = kNoPrefetch) {
  const __mmask16 mask = __mmask16((1u << N) - 1u);
  switch (M) {
#define SHORTCUT_EXT_SMALL_TN(R) \
  case R: return sgemm_small_tn<R>(K, A, lda, B, ldb, C, ldc, mask, accumulate, pf);
    SHORTCUT_EXT_SMALL_TN(1) SHORTCUT_EXT_SMALL_TN(2) SHORTCUT_EXT_SMALL_TN(3) SHORTCUT_EXT_SMALL_TN(4)
    SHORTCUT_EXT_SMALL_TN(5) SHORTCUT_EXT_SMALL_TN(6) SHORTCUT_EXT_SMALL_TN(7) SHORTCUT_EXT_SMALL_TN(8)
    SHORTCUT_EXT_SMALL_TN(9) SHORTCUT_EXT_SMALL_TN(10) SHORTCUT_EXT_SMALL_TN(11) SHORTCUT_EXT_SMALL_TN(12)
    SHORTCUT_EXT_SMALL_TN(13) SHORTCUT_EXT_SMALL_TN(14) SHORTCUT_EXT_SMALL_TN(15) SHORTCUT_EXT_SMALL_TN(16)
#undef SHORTCUT_EXT_SMALL_TN
    default: break;
  }
}
#endif

#if defined(__AVX512F__)
// float64 register kernel: C[MR rows, NV * 8 columns] (+)= op(A) @ B over K, MR x NV accumulators in zmm
// registers, one row of B (NV vectors, the last one masked) per step and one broadcast of op(A) per row.
// op(A) = A [M, K] (lda), or A^T for A stored [K, M] (AT: the weight-gradient products).
template <int MR, int NV, bool AT>
inline void dgemm_block(int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                        int64_t ldc, __mmask8 last, bool accumulate, const Prefetch& pf) {
  // Rows of C (and of A when AT is false) by two bases (rows 0 and 4) and three opaque row strides, addressed
  // base + stride * 8: left to itself GCC kept a pointer per row (16 of them for an 8-row block), parked them
  // in vector registers and spilled; clang did not, and its build ran a float64 d = 10 step 10% faster.
  int64_t c1 = ldc, c2 = 2 * ldc, c3 = 3 * ldc;
  SE_OPAQUE(c1);
  SE_OPAQUE(c2);
  SE_OPAQUE(c3);
  double* const c4p = MR > 4 ? C + 4 * ldc : C;
  auto crow = [&](int i) {
    const int r = i & 3;
    double* const base = i < 4 ? C : c4p;
    return r == 0 ? base : base + (r == 1 ? c1 : r == 2 ? c2 : c3);
  };
  __m512d c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask8 mk = v == NV - 1 ? last : __mmask8(0xff);
      c[i][v] = accumulate ? _mm512_maskz_loadu_pd(mk, crow(i) + 8 * v) : _mm512_setzero_pd();
    }
  Prefetch::Pacer pace = pf.pacer(K);
  int64_t l1 = lda, l2 = 2 * lda, l3 = 3 * lda;
  SE_OPAQUE(l1);
  SE_OPAQUE(l2);
  SE_OPAQUE(l3);
  for (int64_t k = 0; k < K; ++k) {
    pace.step();
    __m512d b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_pd(last, B + k * ldb + 8 * v) : _mm512_loadu_pd(B + k * ldb + 8 * v);
    const double* p0 = A + k;  // AT false: row 0 of A at column k, and row 4
    SE_OPAQUE(p0);
    const double* p4 = MR > 4 && !AT ? p0 + 4 * lda : p0;
    SE_OPAQUE(p4);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const double* pr = i < 4 ? p0 : p4;
      const int ir = i & 3;
      const double ai = AT ? A[k * lda + i] : pr[ir == 0 ? 0 : ir == 1 ? l1 : ir == 2 ? l2 : l3];
      const __m512d a = _mm512_set1_pd(ai);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_pd(a, b[v], c[i][v]);
    }
  }
  SE_OPAQUE(c1);  // and not kept from before the loop in registers it needs
  SE_OPAQUE(c2);
  SE_OPAQUE(c3);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask8 mk = v == NV - 1 ? last : __mmask8(0xff);
      _mm512_mask_storeu_pd(crow(i) + 8 * v, mk, c[i][v]);
    }
}

template <int NV, bool AT>
inline void dgemm_rows(int64_t M, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                       int64_t ldc, __mmask8 last, bool accumulate, const Prefetch& pf) {
  constexpr int MR = NV <= 2 ? 8 : 6;  // 16 or 24 accumulators of the 32 registers
  const Prefetch& none = kNoPrefetch;
  int64_t i0 = 0;
  for (; i0 + MR <= M; i0 += MR)  // the first block takes the requests
    dgemm_block<MR, NV, AT>(K, AT ? A + i0 : A + i0 * lda, lda, B, ldb, C + i0 * ldc, ldc, last, accumulate,
                            i0 == 0 ? pf : none);
  const Prefetch& rest_pf = i0 == 0 ? pf : none;
  const int64_t rest = M - i0;
  const double* a = AT ? A + i0 : A + i0 * lda;
  double* c = C + i0 * ldc;
  switch (rest) {
    case 0: break;
    case 1: dgemm_block<1, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate, rest_pf); break;
    case 2: dgemm_block<2, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate, rest_pf); break;
    case 3: dgemm_block<3, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate, rest_pf); break;
    case 4: dgemm_block<4, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate, rest_pf); break;
    case 5: dgemm_block<5, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate, rest_pf); break;
    case 6: dgemm_block<6, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate, rest_pf); break;
    default: dgemm_block<7, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate, rest_pf); break;
  }
}

// C[M, N] (+)= op(A) @ B in float64 by the register kernel, 32-column panels of B (they stay in L1 for
// K up to ~160 rows) swept over all rows of A.  Each element's sum runs over k in order: the result does
// not depend on M, N or the blocking.
template <bool AT>
inline void dgemm_avx512(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                         int64_t ldb, double* C, int64_t ldc, bool accumulate, const Prefetch& pf) {
  for (int64_t j0 = 0; j0 < N; j0 += 32) {
    const Prefetch& panel_pf = j0 == 0 ? pf : kNoPrefetch;  // the first panel's first block takes the requests
    const int64_t nj = std::min<int64_t>(32, N - j0);
    const int nv = int((nj + 7) / 8);
    const __mmask8 last = __mmask8((1u << (nj - 8 * (nv - 1))) - 1u);
    switch (nv) {
      case 1: dgemm_rows<1, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate, panel_pf); break;
      case 2: dgemm_rows<2, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate, panel_pf); break;
      case 3: dgemm_rows<3, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate, panel_pf); break;
      default: dgemm_rows<4, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate, panel_pf); break;
    }
  }
}
#endif

#if defined(SHORTCUT_EXT_AVX2_KERNELS)
// The register kernels of AVX2 builds (16 ymm registers, no mask registers): C[MR rows, NV vectors] (+)= op(A) @ B
// over K, float (8 lanes) or double (4 lanes), MR x NV accumulators, one row of B (NV vectors, the last one by
// maskload) per step and one broadcast of op(A) per row.  op(A) = A [M, K] (lda), or A^T for A stored [K, M] (AT:
// the weight-gradient products).  float takes the transposed products up to 16 x 16 (kernel16), double every
// product (kernel64).  Each element's sum runs over k in order: the result does not depend on the blocking.
template <typename T>
struct Avx2Vec;
template <>
struct Avx2Vec<float> {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const float* p, __m256i m) { return _mm256_maskload_ps(p, m); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(float* p, __m256i m, V v) { _mm256_maskstore_ps(p, m, v); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  // t where f != 0 (or NaN), else 0: a ReLU derivative's select
  static V select_nonzero(V f, V t) { return _mm256_and_ps(_mm256_cmp_ps(f, zero(), _CMP_NEQ_UQ), t); }
  static __m256i mask(int64_t n) { return avx2_mask32(n); }
};
template <>
struct Avx2Vec<double> {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(double a) { return _mm256_set1_pd(a); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static V load(const double* p, __m256i m) { return _mm256_maskload_pd(p, m); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static void store(double* p, __m256i m, V v) { _mm256_maskstore_pd(p, m, v); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
  static V select_nonzero(V f, V t) { return _mm256_and_pd(_mm256_cmp_pd(f, zero(), _CMP_NEQ_UQ), t); }
  static __m256i mask(int64_t n) { return avx2_mask64(n); }
};

template <typename T, int MR, int NV, bool AT>
inline void gemm_block_avx2(int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                            __m256i last, bool accumulate, const Prefetch& pf) {
  using X = Avx2Vec<T>;
  using V = typename X::V;
  constexpr int L = X::kLanes;
  V c[MR][NV];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      c[i][v] = !accumulate ? X::zero() : v == NV - 1 ? X::load(C + i * ldc + L * v, last) : X::load(C + i * ldc + L * v);
  Prefetch::Pacer pace = pf.pacer(K);
  for (int64_t k = 0; k < K; ++k) {
    pace.step();
    V b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) b[v] = v == NV - 1 ? X::load(B + k * ldb + L * v, last) : X::load(B + k * ldb + L * v);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const V a = X::set1(AT ? A[k * lda + i] : A[i * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = X::fmadd(a, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1)
        X::store(C + i * ldc + L * v, last, c[i][v]);
      else
        X::store(C + i * ldc + L * v, c[i][v]);
    }
}

// All M rows of one panel of NV vectors: blocks of MR rows (MR x NV accumulators: 12 of the 16 registers), the
// rest in blocks of 8, 4, 2 and 1 rows.
template <typename T, int NV, bool AT>
inline void gemm_rows_avx2(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                           __m256i last, bool accumulate, const Prefetch& pf) {
  constexpr int MR = NV == 1 ? 12 : NV == 2 ? 6 : NV == 3 ? 4 : 3;
  int64_t i0 = 0;
  auto block = [&](auto rows) {  // the first block takes the requests
    constexpr int R = decltype(rows)::value;
    gemm_block_avx2<T, R, NV, AT>(K, AT ? A + i0 : A + i0 * lda, lda, B, ldb, C + i0 * ldc, ldc, last, accumulate,
                                  i0 == 0 ? pf : kNoPrefetch);
    i0 += R;
  };
  while (i0 + MR <= M) block(std::integral_constant<int, MR>{});
  if constexpr (MR > 8) if (M - i0 >= 8) block(std::integral_constant<int, 8>{});
  if constexpr (MR > 4) if (M - i0 >= 4) block(std::integral_constant<int, 4>{});
  if constexpr (MR > 2) if (M - i0 >= 2) block(std::integral_constant<int, 2>{});
  if (M - i0 >= 1) block(std::integral_constant<int, 1>{});
}

// C[M, N] (+)= op(A) @ B by the AVX2 register kernel, panels of 4 vectors of B's columns swept over all rows of A.
template <typename T, bool AT>
inline void gemm_avx2(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate, const Prefetch& pf) {
  constexpr int64_t L = Avx2Vec<T>::kLanes;
  for (int64_t j0 = 0; j0 < N; j0 += 4 * L) {
    const Prefetch& panel_pf = j0 == 0 ? pf : kNoPrefetch;  // the first panel's first block takes the requests
    const int64_t nj = std::min<int64_t>(4 * L, N - j0);
    const int nv = int((nj + L - 1) / L);
    const __m256i last = Avx2Vec<T>::mask(nj - L * (nv - 1));
    switch (nv) {
      case 1: gemm_rows_avx2<T, 1, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate, panel_pf); break;
      case 2: gemm_rows_avx2<T, 2, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate, panel_pf); break;
      case 3: gemm_rows_avx2<T, 3, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate, panel_pf); break;
      default: gemm_rows_avx2<T, 4, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate, panel_pf); break;
    }
  }
}
#endif

// C[M, N] (+)= A[M, K] @ B[K, N]; all row-major with leading dimensions lda, ldb, ldc.  gemm_nn and gemm_tn
// return the routine that ran ("kernel16", "brgemm", "kernel64", "blas", "portable"; tests read it).
template <typename T>
inline void gemm_nn_portable(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                             T* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < M; ++i) {
    T* c = C + i * ldc;
    if (!accumulate) std::memset(c, 0, sizeof(T) * N);
    const T* a = A + i * lda;
    for (int64_t k = 0; k < K; ++k) {
      const T aik = a[k];
      const T* b = B + k * ldb;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] += aik * b[j];
    }
  }
}

//
// `pf`: cache lines to request meanwhile (see Prefetch): spread over the K loop by the float64 register
// kernel, all at once before the other routines.
template <typename T>
inline const char* gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate, const Prefetch& pf = kNoPrefetch) {
  pf.for_routine();
  gemm_nn_portable(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  return "portable";
}

template <>
inline const char* gemm_nn<double>(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                            int64_t ldb, double* C, int64_t ldc, bool accumulate, const Prefetch& pf) {
#if defined(__AVX512F__)
  if (M > 0 && N > 0 && K > 0 && use_kernel64()) {
    dgemm_avx512<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate, pf);
    return "kernel64";
  }
#elif defined(SHORTCUT_EXT_AVX2_KERNELS)
  if (M > 0 && N > 0 && K > 0 && use_kernel64()) {
    gemm_avx2<double, false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate, pf);
    return "kernel64";
  }
#endif
  pf.for_routine();
  if (M > 0 && N > 0 && K > 0 && use_blas64()) {
    blas_dgemm(false, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return "blas";
  }
  gemm_nn_portable(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  return "portable";
}

template <>
inline const char* gemm_nn<float>(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate, const Prefetch& pf) {
  pf.for_routine();
#ifndef SHORTCUT_EXT_NO_BRGEMM
  if (use_brgemm() && M > 0 && N > 0 && K > 0) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
    return "brgemm";
  }
#endif
  gemm_nn_portable(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  return "portable";
}

// C[M, N] (+)= A[K, M]^T @ B[K, N] (A stored row-major as [K, M]).  Used for weight gradients,
// where K is the batch tile.  `scratch` holds M*K elements (the transposed A for brgemm).
template <typename T>
inline const char* gemm_tn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate, T* scratch, const Prefetch& pf = kNoPrefetch) {
#if defined(__AVX512F__)
  if (std::is_same<T, float>::value && M > 0 && M <= 16 && N > 0 && N <= 16 && K > 0 && use_kernel16()) {
    gemm16_tn(M, N, K, reinterpret_cast<const float*>(A), lda, reinterpret_cast<const float*>(B), ldb,
              reinterpret_cast<float*>(C), ldc, accumulate, pf);
    return "kernel16";
  }
#elif defined(SHORTCUT_EXT_AVX2_KERNELS)
  if (std::is_same<T, float>::value && M > 0 && M <= 16 && N > 0 && N <= 16 && K > 0 && use_kernel16()) {
    gemm_avx2<float, true>(M, N, K, reinterpret_cast<const float*>(A), lda, reinterpret_cast<const float*>(B), ldb,
                           reinterpret_cast<float*>(C), ldc, accumulate, pf);
    return "kernel16";
  }
#endif
  if (!(std::is_same<T, double>::value && M > 0 && N > 0 && K > 0 && use_kernel64()))
    pf.for_routine();  // the other routines take no requests
#ifndef SHORTCUT_EXT_NO_BRGEMM
  if (std::is_same<T, float>::value && use_brgemm() && M > 0 && N > 0 && K > 0) {
    transpose_tile(A, K, M, lda, scratch, K);  // scratch [M, K] = A^T
    return gemm_nn<T>(M, N, K, scratch, K, B, ldb, C, ldc, accumulate);
  }
#endif
#if defined(__AVX512F__)
  if (std::is_same<T, double>::value && M > 0 && N > 0 && K > 0 && use_kernel64()) {
    dgemm_avx512<true>(M, N, K, reinterpret_cast<const double*>(A), lda, reinterpret_cast<const double*>(B), ldb,
                       reinterpret_cast<double*>(C), ldc, accumulate, pf);
    return "kernel64";
  }
#elif defined(SHORTCUT_EXT_AVX2_KERNELS)
  if (std::is_same<T, double>::value && M > 0 && N > 0 && K > 0 && use_kernel64()) {
    gemm_avx2<double, true>(M, N, K, reinterpret_cast<const double*>(A), lda, reinterpret_cast<const double*>(B), ldb,
                            reinterpret_cast<double*>(C), ldc, accumulate, pf);
    return "kernel64";
  }
#endif
  if (std::is_same<T, double>::value && M > 0 && N > 0 && K > 0 && use_blas64()) {
    blas_dgemm(true, M, N, K, reinterpret_cast<const double*>(A), lda, reinterpret_cast<const double*>(B), ldb,
               reinterpret_cast<double*>(C), ldc, accumulate);
    return "blas";
  }
  (void)scratch;
  if (!accumulate)
    for (int64_t i = 0; i < M; ++i) std::memset(C + i * ldc, 0, sizeof(T) * N);
  for (int64_t k = 0; k < K; ++k) {
    const T* a = A + k * lda;
    const T* b = B + k * ldb;
    for (int64_t i = 0; i < M; ++i) {
      const T aki = a[i];
      T* c = C + i * ldc;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) c[j] += aki * b[j];
    }
  }
  return "portable";
}

// Releases per-thread ukernel state (a no-op for float32 on most CPUs); call at the end of a task.
inline void gemm_release() {
#ifndef SHORTCUT_EXT_NO_BRGEMM
  if (use_brgemm()) at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
}

}  // namespace shortcut_ext
