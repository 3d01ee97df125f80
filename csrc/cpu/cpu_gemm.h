// Small row-major GEMMs for the fused CPU kernels.
//
// float32 goes through ATen's batch-reduce GEMM (oneDNN brgemm ukernels, AVX-512 where the CPU has
// it); that symbol is exported by libtorch but internal, so SHORTCUT_EXT_NO_BRGEMM=1 (compile
// time) or SHORTCUT_EXT_CPU_GEMM=portable (run time) switch to the portable loops below, which are
// also the float64 path.
#pragma once

#include <ATen/native/CPUBlas.h>

#include "cpu/cpu_schedule.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace shortcut_ext {

// "brgemm" or "portable": which float32 path the CPU kernels use in this process.
std::string cpu_gemm_path();
bool use_brgemm();

// C[M, N] (+)= A[M, K] @ B[K, N]; all row-major with leading dimensions lda, ldb, ldc.
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
inline void gemm_nn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate) {
  gemm_nn_portable(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <>
inline void gemm_nn<float>(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#ifndef SHORTCUT_EXT_NO_BRGEMM
  if (use_brgemm() && M > 0 && N > 0 && K > 0) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
    return;
  }
#endif
  gemm_nn_portable(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// C[M, N] (+)= A[K, M]^T @ B[K, N] (A stored row-major as [K, M]).  Used for weight gradients,
// where K is the batch tile.  `scratch` holds M*K elements (the transposed A for brgemm).
template <typename T>
inline void gemm_tn(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, bool accumulate, T* scratch) {
#ifndef SHORTCUT_EXT_NO_BRGEMM
  if (std::is_same<T, float>::value && use_brgemm() && M > 0 && N > 0 && K > 0) {
    transpose_tile(A, K, M, lda, scratch, K);  // scratch [M, K] = A^T
    gemm_nn<T>(M, N, K, scratch, K, B, ldb, C, ldc, accumulate);
    return;
  }
#endif
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
}

// Releases per-thread ukernel state (a no-op for float32 on most CPUs); call at the end of a task.
inline void gemm_release() {
#ifndef SHORTCUT_EXT_NO_BRGEMM
  if (use_brgemm()) at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
}

}  // namespace shortcut_ext
