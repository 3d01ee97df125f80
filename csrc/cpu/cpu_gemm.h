// Small row-major GEMMs for the fused CPU kernels.
//
// float32 goes through a register kernel for 16 x 16 weight gradients (AVX-512 builds) and otherwise ATen's batch-reduce GEMM (oneDNN brgemm ukernels, AVX-512 where the CPU has
// it); that symbol is exported by libtorch but internal, so SHORTCUT_EXT_NO_BRGEMM=1 (compile
// time) or SHORTCUT_EXT_CPU_GEMM=portable (run time) switch to the portable loops below, which are
// also the float64 path where no BLAS is found.
//
// float64 runs an AVX-512 register kernel (dgemm_avx512, AVX-512 builds), else the BLAS `dgemm_` that
// libtorch carries (MKL in the x86 wheels), else the portable loops.  The portable loops ran at 19-30
// GFLOP/s on 2 cores, and the fused float64 ops lost to pure PyTorch (MKL) from d = 32 on; `dgemm_` was
// 1.3-5x faster than the loops, and the register kernel is 1.8-3.5x faster than `dgemm_` again on whole
// fused ops, d = 2 to 128 (2-core AVX-512 AMD EPYC, where MKL takes its AVX2 path; MKL also pays a
// per-call cost that the stack's small products feel).  SHORTCUT_EXT_CPU_GEMM=brgemm selects the
// libraries only (oneDNN for float32, `dgemm_` for float64), =portable the loops only.  The `dgemm_`
// symbol is weak: where libtorch exports none, the loops stand in for it.
#pragma once

#include <ATen/native/CPUBlas.h>

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

// The float64 path: "kernel64" (the AVX-512 register kernel: SHORTCUT_EXT_CPU_GEMM unset or auto, AVX-512
// builds), "blas" (dgemm_: =brgemm, or no AVX-512) or "portable" (=portable, or no dgemm_ in libtorch).
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
// "auto" (default): the d = 16 register kernel below where it applies (AVX-512 builds), oneDNN
// brgemm otherwise; "brgemm": brgemm only; "portable": the portable loops only.
std::string cpu_gemm_path();
bool use_brgemm();
bool use_kernel16();

#if defined(__AVX512F__)
// C[16, 16] (+)= A[K, 16]^T @ B[K, 16]: 16 accumulator rows, one row of B per step, so the
// weight gradients of d = 16 stacks need no transpose of A.  Measured against transpose + brgemm
// (1 thread, K = 128 / 2048): 110 / 117 vs 76 / 33 GFLOP/s.  (A register kernel for
// C[M, 16] = A[M, 16] @ B[16, 16] lost to brgemm, 72 vs 95 GFLOP/s, so there is none.)
inline void gemm16_tn(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                      bool accumulate) {
  __m512 c[16];
  for (int o = 0; o < 16; ++o) c[o] = accumulate ? _mm512_loadu_ps(C + o * ldc) : _mm512_setzero_ps();
  for (int64_t i = 0; i < K; ++i) {
    const __m512 bi = _mm512_loadu_ps(B + i * ldb);
    for (int o = 0; o < 16; ++o) c[o] = _mm512_fmadd_ps(_mm512_set1_ps(A[i * lda + o]), bi, c[o]);
  }
  for (int o = 0; o < 16; ++o) _mm512_storeu_ps(C + o * ldc, c[o]);
}
#endif

#if defined(__AVX512F__)
// float64 register kernel: C[MR rows, NV * 8 columns] (+)= op(A) @ B over K, MR x NV accumulators in zmm
// registers, one row of B (NV vectors, the last one masked) per step and one broadcast of op(A) per row.
// op(A) = A [M, K] (lda), or A^T for A stored [K, M] (AT: the weight-gradient products).
template <int MR, int NV, bool AT>
inline void dgemm_block(int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                        int64_t ldc, __mmask8 last, bool accumulate) {
  __m512d c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask8 mk = v == NV - 1 ? last : __mmask8(0xff);
      c[i][v] = accumulate ? _mm512_maskz_loadu_pd(mk, C + i * ldc + 8 * v) : _mm512_setzero_pd();
    }
  for (int64_t k = 0; k < K; ++k) {
    __m512d b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = v == NV - 1 ? _mm512_maskz_loadu_pd(last, B + k * ldb + 8 * v) : _mm512_loadu_pd(B + k * ldb + 8 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512d a = _mm512_set1_pd(AT ? A[k * lda + i] : A[i * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) c[i][v] = _mm512_fmadd_pd(a, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask8 mk = v == NV - 1 ? last : __mmask8(0xff);
      _mm512_mask_storeu_pd(C + i * ldc + 8 * v, mk, c[i][v]);
    }
}

template <int NV, bool AT>
inline void dgemm_rows(int64_t M, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
                       int64_t ldc, __mmask8 last, bool accumulate) {
  constexpr int MR = NV <= 2 ? 8 : 6;  // 16 or 24 accumulators of the 32 registers
  int64_t i0 = 0;
  for (; i0 + MR <= M; i0 += MR)
    dgemm_block<MR, NV, AT>(K, AT ? A + i0 : A + i0 * lda, lda, B, ldb, C + i0 * ldc, ldc, last, accumulate);
  const int64_t rest = M - i0;
  const double* a = AT ? A + i0 : A + i0 * lda;
  double* c = C + i0 * ldc;
  switch (rest) {
    case 0: break;
    case 1: dgemm_block<1, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate); break;
    case 2: dgemm_block<2, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate); break;
    case 3: dgemm_block<3, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate); break;
    case 4: dgemm_block<4, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate); break;
    case 5: dgemm_block<5, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate); break;
    case 6: dgemm_block<6, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate); break;
    default: dgemm_block<7, NV, AT>(K, a, lda, B, ldb, c, ldc, last, accumulate); break;
  }
}

// C[M, N] (+)= op(A) @ B in float64 by the register kernel, 32-column panels of B (they stay in L1 for
// K up to ~160 rows) swept over all rows of A.  Each element's sum runs over k in order: the result does
// not depend on M, N or the blocking.
template <bool AT>
inline void dgemm_avx512(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                         int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  for (int64_t j0 = 0; j0 < N; j0 += 32) {
    const int64_t nj = std::min<int64_t>(32, N - j0);
    const int nv = int((nj + 7) / 8);
    const __mmask8 last = __mmask8((1u << (nj - 8 * (nv - 1))) - 1u);
    switch (nv) {
      case 1: dgemm_rows<1, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate); break;
      case 2: dgemm_rows<2, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate); break;
      case 3: dgemm_rows<3, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate); break;
      default: dgemm_rows<4, AT>(M, K, A, lda, B + j0, ldb, C + j0, ldc, last, accumulate); break;
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

template <typename T>
inline const char* gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate) {
  gemm_nn_portable(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  return "portable";
}

template <>
inline const char* gemm_nn<double>(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                            int64_t ldb, double* C, int64_t ldc, bool accumulate) {
#if defined(__AVX512F__)
  if (M > 0 && N > 0 && K > 0 && use_kernel64()) {
    dgemm_avx512<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return "kernel64";
  }
#endif
  if (M > 0 && N > 0 && K > 0 && use_blas64()) {
    blas_dgemm(false, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    return "blas";
  }
  gemm_nn_portable(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  return "portable";
}

template <>
inline const char* gemm_nn<float>(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
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
                    int64_t ldc, bool accumulate, T* scratch) {
#if defined(__AVX512F__)
  if (std::is_same<T, float>::value && M == 16 && N == 16 && K > 0 && use_kernel16()) {
    gemm16_tn(K, reinterpret_cast<const float*>(A), lda, reinterpret_cast<const float*>(B), ldb,
              reinterpret_cast<float*>(C), ldc, accumulate);
    return "kernel16";
  }
#endif
#ifndef SHORTCUT_EXT_NO_BRGEMM
  if (std::is_same<T, float>::value && use_brgemm() && M > 0 && N > 0 && K > 0) {
    transpose_tile(A, K, M, lda, scratch, K);  // scratch [M, K] = A^T
    return gemm_nn<T>(M, N, K, scratch, K, B, ldb, C, ldc, accumulate);
  }
#endif
#if defined(__AVX512F__)
  if (std::is_same<T, double>::value && M > 0 && N > 0 && K > 0 && use_kernel64()) {
    dgemm_avx512<true>(M, N, K, reinterpret_cast<const double*>(A), lda, reinterpret_cast<const double*>(B), ldb,
                       reinterpret_cast<double*>(C), ldc, accumulate);
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
