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

// 16 bytes global -> shared without going through registers; completes at cp_async_wait (it may land any time
// before: the emulation lands it at the wait, or at issue under se_emu_set_cp_async_at_issue).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
#if defined(SHORTCUT_EXT_CUDA_EMULATE)
  se_emu::check_aligned16(gmem_src, "cp.async: a 16-byte copy from a misaligned global address");
  se_emu::check_aligned16(smem_dst, "cp.async: a 16-byte copy to a misaligned shared address");
  se_emu::check_smem(smem_dst, 16, "cp.async: a copy to outside the dynamic shared memory");
  se_emu::PendingCopy c;
  c.dst = smem_dst;
  c.n = 16;
  std::memcpy(c.bytes, gmem_src, 16);
  if (se_emu::cp_async_at_issue()) {  // lands now (the earliest a GPU may land it); the group's wait is still owed
    std::memcpy(smem_dst, gmem_src, 16);
    c.n = 0;
  }
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

// ------------------------------------------------------------------------- TF32 tensor cores
// The bits of x (an mma operand register holding a value already rounded to TF32).
__device__ __forceinline__ uint32_t f32_bits(float x) {
#if defined(SHORTCUT_EXT_CUDA_EMULATE)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
#else
  return __float_as_uint(x);
#endif
}

// x rounded to TF32 (10 mantissa bits, to nearest, ties away from zero: cvt.rna.tf32.f32), as the
// bit pattern an mma .tf32 operand register holds; inf and NaN pass through.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(SHORTCUT_EXT_CUDA_EMULATE)
  const uint32_t u = f32_bits(x);
  return (u & 0x7F800000u) != 0x7F800000u ? (u + 0x1000u) & 0xFFFFE000u : u;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(x));
  return u;
#else
  return __float_as_uint(x);
#endif
}

// The float whose bits are u.
__device__ __forceinline__ float f32_from_bits(uint32_t u) {
#if defined(SHORTCUT_EXT_CUDA_EMULATE)
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(u);
#endif
}

// x = big + small + O(2^-22 |x|), both TF32 (3xTF32: small is x - big rounded to TF32).
__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  big = to_tf32(x);
  // inf or nan (x itself, or x within half a TF32 ulp of FLT_MAX rounding up): no small part, since
  // inf - inf would be nan where float32 products give +-inf
  small = ((big >> 23) & 0xFFu) == 0xFFu ? 0u : to_tf32(x - f32_from_bits(big));
}

// x rounded to TF32, as a float (for weights rounded once before the kernels read them).
__device__ __forceinline__ float round_tf32(float x) {
#if defined(SHORTCUT_EXT_CUDA_EMULATE)
  const uint32_t u = to_tf32(x);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#else
  return __uint_as_float(to_tf32(x));
#endif
}
__device__ __forceinline__ double round_tf32(double x) { return x; }  // TF32 applies to float32 only

// d += A B for one warp: mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 (sm_80+).  Fragment
// layout (groupID g = lane / 4, t = lane % 4), from the PTX ISA:
//   A 16x8 row-major: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
//   B 8x8 (k x n):    b0 (k = t, n = g), b1 (k = t + 4, n = g)
//   C/D 16x8:         d0 (g, 2t), d1 (g, 2t + 1), d2 (g + 8, 2t), d3 (g + 8, 2t + 1)
// Every lane of the warp must execute it together.
__device__ __forceinline__ void mma_tf32_16x8x8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(SHORTCUT_EXT_CUDA_EMULATE)
  se_emu::warp_mma_tf32(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(__CUDA_ARCH__)
  __trap();  // the planner never picks the tensor-core kernels below sm_80
#endif
}

// Most blocks of a launch of the grid-stride kernels (weight preparation, partial sums, transposes): each
// thread loops over the elements with stride gridDim.x * blockDim.x, so any grid covers them.  On a GPU
// 65,535 blocks; the emulation can lower it (se_emu::grid_stride_cap) so that the loops run several rounds on
// small problems, which the GPU does only from 65,535 x 256 = 16.7M elements on.
inline int64_t grid_stride_blocks_cap() {
#ifdef SHORTCUT_EXT_CUDA_EMULATE
  return se_emu::grid_stride_cap();
#else
  return 65535;
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
