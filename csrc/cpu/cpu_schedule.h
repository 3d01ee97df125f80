// Scheduling and elementwise helpers shared by the fused CPU kernels (forward/backward and HVP).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

// AVX2 builds (AVX2 and FMA, no AVX-512: most AMD CPUs before Zen 4, Intel's client CPUs) get register kernels and
// a vector tanh of their own: where the AVX-512 code is compiled out, the portable loops, the BLAS dgemm and
// std::tanh took their place (float64 and tanh nets 2.6-4.6x slower than with these, d = 10 to 64).
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define SHORTCUT_EXT_AVX2_KERNELS 1
#endif
#if defined(__AVX512F__) || defined(SHORTCUT_EXT_AVX2_KERNELS)
#include <immintrin.h>
#endif

#include "common.h"

namespace shortcut_ext {

// How many slots (parallel tasks) to cut B rows into.
inline int64_t num_slots(int64_t B, int64_t work_per_row) {
  const int64_t threads = at::get_num_threads();
  // Below ~64k multiply-adds a task the fork/join costs more than it saves.
  const int64_t by_work = std::max<int64_t>(1, (B * work_per_row) / 65536);
  return std::max<int64_t>(1, std::min({threads, B, by_work}));
}

// Rows per tile for B rows cut into `slots` parallel tasks, tiles of at most `cap` rows: the same
// number of tiles for every slot, of (nearly) equal rows.  Tiles of `cap` rows and a short last one
// left the slots unequal (B = 256, 2 slots, cap 96: 96 rows in one slot, 160 in the other).
inline int64_t balanced_tile_rows(int64_t B, int64_t slots, int64_t cap) {
  const int64_t per_slot = (B + slots - 1) / slots;
  const int64_t tiles_per_slot = (per_slot + cap - 1) / cap;
  return std::max<int64_t>(1, (per_slot + tiles_per_slot - 1) / tiles_per_slot);
}

// The row tiles of the fused CPU kernels at the current thread count: rows per tile, tiles, slots (parallel
// tasks), units per chunk of the weight-gradient buffers (the backward's). Each kernel computes its schedule
// here, and tests read it (shortcut_ext._C.cpu_schedule) to know which paths their shapes reach.
struct CpuSchedule {
  int64_t tile_rows, tiles, slots, chunk_units;
};
CpuSchedule cpu_backward_schedule(int64_t B, int64_t d, int64_t R, int64_t n);  // B >= 1
CpuSchedule cpu_hvp_schedule(int64_t B, int64_t d, int64_t R, int64_t n, int64_t K);  // B >= 1; chunk_units 0

// Runs f(0, slots) inline for one slot (no parallel region: tiny problems stay microseconds even
// when other processes hold the cores), else one at::parallel_for task per slot.
template <typename F>
inline void for_each_slot(int64_t slots, const F& f) {
  if (slots <= 1) {
    f(0, slots);
  } else {
    at::parallel_for(0, slots, 1, f);
  }
}

#if defined(__AVX512F__)
// SLEEF's vector tanh (1.0 ULP), which libtorch carries for torch.tanh.  Weak: where a libtorch exports
// none, tanh_scaled falls back to std::tanh.
extern "C" __m512 Sleef_tanhf16_u10(__m512) __attribute__((weak));
extern "C" __m512d Sleef_tanhd8_u10(__m512d) __attribute__((weak));
#elif defined(SHORTCUT_EXT_AVX2_KERNELS)
// AVX2 builds: SLEEF's AVX2 tanh (8 floats, 4 doubles; libtorch carries it for its AVX2 kernels).  std::tanh
// element by element made tanh nets 2-4.6x slower than this on such a build (d = 10 to 64).
extern "C" __m256 Sleef_tanhf8_u10avx2(__m256) __attribute__((weak));
extern "C" __m256d Sleef_tanhd4_u10avx2(__m256d) __attribute__((weak));
// lanes [0, count) of 8 (32-bit lanes) or 4 (64-bit lanes): the masks of AVX2's maskload / maskstore
inline __m256i avx2_mask32(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(count, 8))), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i avx2_mask64(int64_t count) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(std::min<int64_t>(count, 4)), _mm256_setr_epi64x(0, 1, 2, 3));
}
#endif

// out[i] = tanh(scale * in[i]) (in == out allowed): 16 floats or 8 doubles at a time by SLEEF on AVX-512
// builds (8 or 4 on AVX2 builds), the last ones too (masked), so that every element goes the same way; else
// std::tanh.  std::tanh element by element made a d = 10 net with tanh between its layers 4.6x slower than one
// with relu.
template <typename T>
inline void tanh_scaled(const T* in, T* out, int64_t count, T scale) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (Sleef_tanhf16_u10 != nullptr) {
      const __m512 c = _mm512_set1_ps(scale);
      for (int64_t i = 0; i < count; i += 16) {
        const __mmask16 k = count - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (count - i)) - 1u);
        _mm512_mask_storeu_ps(out + i, k, Sleef_tanhf16_u10(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, in + i), c)));
      }
      return;
    }
  } else if constexpr (std::is_same<T, double>::value) {
    if (Sleef_tanhd8_u10 != nullptr) {
      const __m512d c = _mm512_set1_pd(scale);
      for (int64_t i = 0; i < count; i += 8) {
        const __mmask8 k = count - i >= 8 ? __mmask8(0xff) : __mmask8((1u << (count - i)) - 1u);
        _mm512_mask_storeu_pd(out + i, k, Sleef_tanhd8_u10(_mm512_mul_pd(_mm512_maskz_loadu_pd(k, in + i), c)));
      }
      return;
    }
  }
#elif defined(SHORTCUT_EXT_AVX2_KERNELS)
  if constexpr (std::is_same<T, float>::value) {
    if (Sleef_tanhf8_u10avx2 != nullptr) {
      const __m256 c = _mm256_set1_ps(scale);
      int64_t i = 0;
      for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, Sleef_tanhf8_u10avx2(_mm256_mul_ps(_mm256_loadu_ps(in + i), c)));
      if (i < count) {
        const __m256i k = avx2_mask32(count - i);
        _mm256_maskstore_ps(out + i, k, Sleef_tanhf8_u10avx2(_mm256_mul_ps(_mm256_maskload_ps(in + i, k), c)));
      }
      return;
    }
  } else if constexpr (std::is_same<T, double>::value) {
    if (Sleef_tanhd4_u10avx2 != nullptr) {
      const __m256d c = _mm256_set1_pd(scale);
      int64_t i = 0;
      for (; i + 4 <= count; i += 4) _mm256_storeu_pd(out + i, Sleef_tanhd4_u10avx2(_mm256_mul_pd(_mm256_loadu_pd(in + i), c)));
      if (i < count) {
        const __m256i k = avx2_mask64(count - i);
        _mm256_maskstore_pd(out + i, k, Sleef_tanhd4_u10avx2(_mm256_mul_pd(_mm256_maskload_pd(in + i, k), c)));
      }
      return;
    }
  }
#endif
  for (int64_t i = 0; i < count; ++i) out[i] = std::tanh(scale * in[i]);
}

// Which tanh the CPU kernels use: "sleef" (AVX-512 or AVX2 builds, where libtorch exports it) or "std".
inline const char* cpu_tanh_path() {
#if defined(__AVX512F__)
  if (Sleef_tanhf16_u10 != nullptr && Sleef_tanhd8_u10 != nullptr) return "sleef";
#elif defined(SHORTCUT_EXT_AVX2_KERNELS)
  if (Sleef_tanhf8_u10avx2 != nullptr && Sleef_tanhd4_u10avx2 != nullptr) return "sleef";
#endif
  return "std";
}

// s(z) = tanh(scale * z): scale 1 for tanh, 1/2 for ssigmoid.
inline double tanh_scale(Act a) { return a == Act::SSigmoid ? 0.5 : 1.0; }

// f(i0, s, len) for chunks of z: s[j] = tanh(scale * z[i0 + j]), j < len.
template <typename T, typename F>
inline void for_tanh_chunks(const T* z, int64_t count, T scale, const F& f) {
  constexpr int64_t C = 256;
  alignas(64) T s[C];
  for (int64_t i0 = 0; i0 < count; i0 += C) {
    const int64_t len = std::min(C, count - i0);
    tanh_scaled(z + i0, s, len, scale);
    f(i0, s, len);
  }
}

// Elementwise passes, specialised per activation outside the loop so that each loop vectorises.
template <typename T>
inline void apply_act(Act a, T* z, int64_t count) {
  switch (a) {
    case Act::Relu:
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) z[i] = z[i] < T(0) ? T(0) : z[i];  // NaN propagates
      break;
    case Act::Tanh:
    case Act::SSigmoid:
      tanh_scaled(z, z, count, T(tanh_scale(a)));
      break;
    default:
      break;
  }
}

// g *= s'(z), with s(z) recomputed (relu'(0) = 0, as autograd).
template <typename T>
inline void mul_act_deriv(Act a, T* g, const T* z, int64_t count) {
  switch (a) {
    case Act::Relu:
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) g[i] = z[i] <= T(0) ? T(0) : g[i];
      break;
    case Act::Tanh:
      for_tanh_chunks(z, count, T(1), [g](int64_t i0, const T* t, int64_t len) {
        T* gi = g + i0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) gi[j] *= T(1) - t[j] * t[j];
      });
      break;
    case Act::SSigmoid:
      for_tanh_chunks(z, count, T(0.5), [g](int64_t i0, const T* t, int64_t len) {
        T* gi = g + i0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) gi[j] *= T(0.5) * (T(1) - t[j] * t[j]);
      });
      break;
    default:
      break;
  }
}

#if defined(__AVX512F__)
// r[j][i] = src[i, j] for one 16 x 16 float block, in registers (unpack 32/64-bit, then 128-bit
// lanes).
inline void transpose16x16_in_registers(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

inline void load_transposed16x16(const float* src, int64_t lds, __m512 r[16]) {
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  transpose16x16_in_registers(r);
}

// One 16 x 16 float block: dst[j, i] = src[i, j].
inline void transpose16x16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16];
  load_transposed16x16(src, lds, r);
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, r[i]);
}

// A block's first `rows` x `cols` (1 to 16 each) the same way, with masked loads and stores: nothing
// outside it is read or written.  (Element by element, the 10-wide tiles of a d = 10 stack took more
// time to transpose than to multiply.)
inline void transpose16x16_part(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  const __mmask16 cm = __mmask16((1u << cols) - 1u), rm = __mmask16((1u << rows) - 1u);
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_maskz_loadu_ps(cm, src + i * lds) : _mm512_setzero_ps();
  transpose16x16_in_registers(r);
  for (int j = 0; j < cols; ++j) _mm512_mask_storeu_ps(dst + j * ldd, rm, r[j]);
}
#endif

#if defined(SHORTCUT_EXT_AVX2_KERNELS)
// One 8 x 8 float block, dst[j, i] = src[i, j], in registers (AVX2 builds: unpack, shuffle, then 128-bit lanes).
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    r[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
    r[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
    r[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    r[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// dst[i, :cols] = src[i, :cols] for i < rows (leading dimensions lds, ldd).
template <typename T>
inline void copy_panel(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t i = 0; i < rows; ++i) std::copy(src + i * lds, src + i * lds + cols, dst + i * ldd);
}

// copy_panel for a destination that will not be read again soon (activations saved for the
// backward): non-temporal stores where rows are 64-byte aligned, so that the store does not first
// read the line (halves the memory traffic of the forward's saves).  Callers end their task with
// stream_fence().
template <typename T>
inline void stream_panel(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
#if defined(__AVX512F__) || defined(SHORTCUT_EXT_AVX2_KERNELS)
  constexpr int64_t L = 64 / sizeof(T);  // a cache line: one zmm store, or two ymm stores on AVX2 builds
  for (int64_t i = 0; i < rows; ++i) {
    const T* s = src + i * lds;
    T* t = dst + i * ldd;
    int64_t j = 0;
    for (; j < cols && (reinterpret_cast<uintptr_t>(t + j) & 63) != 0; ++j) t[j] = s[j];
    for (; j + L <= cols; j += L) {
#if defined(__AVX512F__)
      if constexpr (std::is_same<T, float>::value)
        _mm512_stream_ps(t + j, _mm512_loadu_ps(s + j));
      else
        _mm512_stream_pd(reinterpret_cast<double*>(t + j), _mm512_loadu_pd(reinterpret_cast<const double*>(s + j)));
#else
      if constexpr (std::is_same<T, float>::value) {
        _mm256_stream_ps(t + j, _mm256_loadu_ps(s + j));
        _mm256_stream_ps(t + j + 8, _mm256_loadu_ps(s + j + 8));
      } else {
        double* td = reinterpret_cast<double*>(t + j);
        const double* sd = reinterpret_cast<const double*>(s + j);
        _mm256_stream_pd(td, _mm256_loadu_pd(sd));
        _mm256_stream_pd(td + 4, _mm256_loadu_pd(sd + 4));
      }
#endif
    }
    for (; j < cols; ++j) t[j] = s[j];
  }
#else
  copy_panel(src, rows, cols, lds, dst, ldd);
#endif
}

inline void stream_fence() {
#if defined(__AVX512F__) || defined(SHORTCUT_EXT_AVX2_KERNELS)
  _mm_sfence();
#endif
}

// dst[j, i] = src[i, j] for an in-cache tile of rows x cols (leading dimensions lds, ldd), in
// 16 x 16 blocks so that both sides stay in a few cache lines (in registers for float with AVX-512).
template <typename T>
inline void transpose_tile(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  constexpr int64_t blk = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += blk) {
    const int64_t i1 = std::min(rows, i0 + blk);
    for (int64_t j0 = 0; j0 < cols; j0 += blk) {
      const int64_t j1 = std::min(cols, j0 + blk);
#if defined(__AVX512F__)
      if (std::is_same<T, float>::value) {
        const float* s = reinterpret_cast<const float*>(src) + i0 * lds + j0;
        float* t = reinterpret_cast<float*>(dst) + j0 * ldd + i0;
        if (i1 - i0 == blk && j1 - j0 == blk)
          transpose16x16(s, lds, t, ldd);
        else
          transpose16x16_part(s, lds, t, ldd, i1 - i0, j1 - j0);
        continue;
      }
#elif defined(SHORTCUT_EXT_AVX2_KERNELS)
      if (std::is_same<T, float>::value) {  // whole 8 x 8 blocks in registers, the edges element by element
        const float* s = reinterpret_cast<const float*>(src);
        float* t = reinterpret_cast<float*>(dst);
        for (int64_t a = i0; a < i1; a += 8)
          for (int64_t b = j0; b < j1; b += 8) {
            if (a + 8 <= i1 && b + 8 <= j1) {
              transpose8x8(s + a * lds + b, lds, t + b * ldd + a, ldd);
              continue;
            }
            for (int64_t j = b; j < std::min(b + 8, j1); ++j)
              for (int64_t i = a; i < std::min(a + 8, i1); ++i) t[j * ldd + i] = s[i * lds + j];
          }
        continue;
      }
#endif
      for (int64_t j = j0; j < j1; ++j) {
        T* out = dst + j * ldd;
        for (int64_t i = i0; i < i1; ++i) out[i] = src[i * lds + j];
      }
    }
  }
}

// Tile layout of the fused CPU kernels.  Batch-major tiles ([m, d], rows are samples) multiply by
// W^T and need one transposed copy of the weights per call; feature-major tiles ([d, m]) multiply
// by W as stored (z^T = W a^T) and instead transpose in-cache tiles.  The copy costs a full pass
// over R*n*d*d weights (page faults included), so feature-major wins once weights are large.
enum class TileLayout { BatchMajor, FeatureMajor };

// SHORTCUT_EXT_CPU_LAYOUT=batch|feature overrides the default (feature-major from d = 17 on in float32,
// from d = 32 on in float64).
TileLayout cpu_tile_layout(int64_t d, bool is_double);
// The forward's tiles: as cpu_tile_layout where it saves activations for a backward; where it saves none
// (inference) feature-major at every width in float32 and below d = 16 in float64, where vectorising over
// the samples beats filling d of a multiple of 16 (8) lanes: up to 2.5x faster at d = 2..16 in float32 (d = 4),
// about 1.15x at d = 16 (equal at B = 4096).
TileLayout cpu_forward_tile_layout(int64_t d, bool is_double, bool saves);

// The layout of the unit (layer) inputs the forward returns for the backward: the default tile layout of
// width d and the dtype, whatever the variable says (tiles of the other layout are copied into it). Saved
// strides thus depend on the shape and dtype alone, as the op's fake kernel predicts them: a graph compiled
// in one process stays valid in another that sets the variable otherwise (Inductor asserts the strides it
// recorded).  float32 from d = 17 (forward 1.35-1.9x, forward+backward 1.0-1.27x, with recompute 1.25-1.45x
// faster at d = 17..31 than batch-major); float64 from 32 (at 17..31 its batch-major register kernel makes a
// training step 6-12% faster than feature-major tiles).
TileLayout cpu_saved_layout(int64_t d, bool is_double);
constexpr int64_t cpu_saved_feature_major_from(bool is_double) { return is_double ? 32 : 17; }
// Below this width the feature-major backward runs its data gradient feature-major as well (ga = W^T gz,
// vectorised over the samples; batch-major it would fill d of a multiple of 16 lanes); from it on, batch-major
// (ga = gz W: full lanes, and the mid derivatives transpose the saved outputs on the fly).
constexpr int64_t cpu_fm_gradient_below() { return 32; }

// g *= s'(z) computed from the activation's output a = s(z): relu a > 0, tanh 1 - a^2,
// ssigmoid (1 - a^2) / 2 (the backward of stacks that saved every layer's input).
template <typename T>
inline void mul_act_deriv_from_output(Act a, T* g, const T* out, int64_t count) {
  switch (a) {
    case Act::Relu:
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) g[i] = out[i] <= T(0) ? T(0) : g[i];
      break;
    case Act::Tanh:
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) g[i] *= T(1) - out[i] * out[i];
      break;
    case Act::SSigmoid:
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) g[i] *= T(0.5) * (T(1) - out[i] * out[i]);
      break;
    default:
      break;
  }
}

// g[b, i] *= s'(z[b, i]) with the activation's output stored feature-major: out[i, b] (leading
// dimension ldo) = s(z[b, i]); g [m, d] batch-major.  The transposed output never leaves registers
// (float with AVX-512; other cases transpose through `scratch`, m * d elements).
template <typename T>
inline void mul_act_deriv_from_output_fm(Act a, T* g, const T* out, int64_t m, int64_t d, int64_t ldo, T* scratch) {
  if (a == Act::Identity) return;
#if defined(__AVX512F__)
  if (std::is_same<T, float>::value && m % 16 == 0 && d % 16 == 0) {
    float* gf = reinterpret_cast<float*>(g);
    const float* of = reinterpret_cast<const float*>(out);
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f);
    for (int64_t i0 = 0; i0 < d; i0 += 16)
      for (int64_t b0 = 0; b0 < m; b0 += 16) {
        __m512 r[16];  // r[bb][ii] = out[i0 + ii, b0 + bb]
        load_transposed16x16(of + i0 * ldo + b0, ldo, r);
        for (int bb = 0; bb < 16; ++bb) {
          float* gr = gf + (b0 + bb) * d + i0;
          const __m512 gv = _mm512_loadu_ps(gr);
          __m512 res;
          if (a == Act::Relu) {
            res = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(r[bb], zero, _CMP_NLE_UQ), gv);
          } else {
            __m512 dv = _mm512_fnmadd_ps(r[bb], r[bb], one);  // 1 - a^2
            if (a == Act::SSigmoid) dv = _mm512_mul_ps(dv, half);
            res = _mm512_mul_ps(gv, dv);
          }
          _mm512_storeu_ps(gr, res);
        }
      }
    return;
  }
#endif
  transpose_tile(out, d, m, ldo, scratch, d);
  mul_act_deriv_from_output(a, g, scratch, m * d);
}

// wt[r, k] = w[r, k]^T for every d x d matrix, in parallel over matrices.
template <typename T>
at::Tensor transpose_weights(const at::Tensor& weights) {
  const int64_t mats = weights.size(0) * weights.size(1), d = weights.size(3);
  at::Tensor wt = at::empty_like(weights);
  const T* src = weights.data_ptr<T>();
  T* dst = wt.data_ptr<T>();
  constexpr int64_t blk = 16;
  // grain: ~64k elements a task, so that small stacks are transposed inline
  at::parallel_for(0, mats, std::max<int64_t>(1, 65536 / (d * d)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const T* a = src + m * d * d;
      T* b = dst + m * d * d;
#if defined(__AVX512F__)
      if (std::is_same<T, float>::value && d % 16 == 0) {  // in registers, 16 x 16 blocks
        for (int64_t i0 = 0; i0 < d; i0 += 16)
          for (int64_t j0 = 0; j0 < d; j0 += 16)
            transpose16x16(reinterpret_cast<const float*>(a) + i0 * d + j0, d,
                           reinterpret_cast<float*>(b) + j0 * d + i0, d);
        continue;
      }
#elif defined(SHORTCUT_EXT_AVX2_KERNELS)
      if (std::is_same<T, float>::value && d % 8 == 0) {  // in registers, 8 x 8 blocks
        for (int64_t i0 = 0; i0 < d; i0 += 8)
          for (int64_t j0 = 0; j0 < d; j0 += 8)
            transpose8x8(reinterpret_cast<const float*>(a) + i0 * d + j0, d, reinterpret_cast<float*>(b) + j0 * d + i0, d);
        continue;
      }
#endif
      for (int64_t i0 = 0; i0 < d; i0 += blk)
        for (int64_t j0 = 0; j0 < d; j0 += blk)
          for (int64_t i = i0; i < std::min(d, i0 + blk); ++i)
            for (int64_t j = j0; j < std::min(d, j0 + blk); ++j) b[j * d + i] = a[i * d + j];
    }
  });
  return wt;
}

}  // namespace shortcut_ext
