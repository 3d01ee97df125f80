// Device helpers of the residual-stack kernels: asynchronous global->shared copies (cp.async,
// sm_80+), 16-byte shared-memory vector access, dynamic shared memory and kernel launch.
//
// Everything here also compiles with a host C++ compiler under SHORTCUT_EXT_CUDA_EMULATE, where
// emulate/emulation.h supplies a CPU stand-in for the CUDA runtime (tests run the kernels that way).
#pragma once

#ifdef SHORTCUT_EXT_CUDA_EMULATE
#include "emulate/emulation.h"
#else
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <cstring>

namespace shortcut_ext {
namespace cuda_detail {

// One 16-byte access: 4 floats or 2 doubles.
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
  static constexpr int lanes = 4;
};
template <>
struct Vec16<double> {
  using type = double2;
  static constexpr int lanes = 2;
};

// dst[0, N) = src[0, N) from shared memory; src is 16-byte aligned and N * sizeof(T) % 16 == 0.
template <int N, typename T>
__device__ __forceinline__ void load_vec(T* dst, const T* src) {
  using V = typename Vec16<T>::type;
  constexpr int L = Vec16<T>::lanes;
  static_assert(N % L == 0, "load_vec needs whole 16-byte vectors");
#ifdef SHORTCUT_EXT_CUDA_EMULATE
  se_emu::check_aligned16(src, "load_vec: a 16-byte load from a misaligned address");
  if (se_emu::in_smem(src)) se_emu::check_smem(src, N * sizeof(T), "load_vec: outside the dynamic shared memory");
#endif
#pragma unroll
  for (int q = 0; q < N / L; ++q) {
    const V v = reinterpret_cast<const V*>(src)[q];
    std::memcpy(dst + q * L, &v, sizeof(V));
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* dst, const T* src) {
  using V = typename Vec16<T>::type;
  constexpr int L = Vec16<T>::lanes;
  static_assert(N % L == 0, "store_vec needs whole 16-byte vectors");
#ifdef SHORTCUT_EXT_CUDA_EMULATE
  se_emu::check_aligned16(dst, "store_vec: a 16-byte store to a misaligned address");
  if (se_emu::in_smem(dst)) se_emu::check_smem(dst, N * sizeof(T), "store_vec: outside the dynamic shared memory");
#endif
#pragma unroll
  for (int q = 0; q < N / L; ++q) {
    V v;
    std::memcpy(&v, src + q * L, sizeof(V));
    reinterpret_cast<V*>(dst)[q] = v;
  }
}

// 16 bytes global -> shared without going through registers; completes at cp_async_wait.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(SHORTCUT_EXT_CUDA_EMULATE)
  se_emu::check_aligned16(gmem_src, "cp.async: a 16-byte copy from a misaligned global address");
  se_emu::check_aligned16(smem_dst, "cp.async: a 16-byte copy to a misaligned shared address");
  se_emu::check_smem(smem_dst, 16, "cp.async: a copy to outside the dynamic shared memory");
  se_emu::PendingCopy c;
  c.dst = smem_dst;
  c.n = 16;
  std::memcpy(c.bytes, gmem_src, 16);
  se_emu::tls().open.push_back(c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  // .cg: cache in L2 only; every block streams the same weights, L1 would only be polluted.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem_src) : "memory");
#elif defined(__CUDA_ARCH__)
  *reinterpret_cast<float4*>(smem_dst) = *reinterpret_cast<const float4*>(gmem_src);
#endif
}

// Closes the group of copies issued since the last commit (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() {
#if defined(SHORTCUT_EXT_CUDA_EMULATE)
  auto& s = se_emu::tls();
  s.groups.push_back(std::move(s.open));
  s.open.clear();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N committed groups of this thread are still in flight.  Other threads see
// the copied data only after a following __syncthreads().
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SHORTCUT_EXT_CUDA_EMULATE)
  auto& s = se_emu::tls();
  while (s.groups.size() > size_t(N)) {
    se_emu::retire(s.groups.front());
    s.groups.erase(s.groups.begin());
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace cuda_detail
}  // namespace shortcut_ext

// Pointer `name` of type T* to the block's dynamic shared memory (16-byte aligned).
#ifdef SHORTCUT_EXT_CUDA_EMULATE
#define SE_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(se_emu::tls().smem)
#define SE_LAUNCH(kernel, grid, block, smem, stream, ...) se_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
#else
#define SE_DYNAMIC_SMEM(T, name)                                  \
  extern __shared__ __align__(16) unsigned char se_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(se_dynamic_smem_)
#define SE_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
