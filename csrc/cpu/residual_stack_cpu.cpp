// Fused CPU kernels of a residual stack: one op call runs all R units.
//
// Schedule: the batch is cut into row tiles; tiles are grouped into P <= num_threads contiguous
// slots, and each slot is one task of at::parallel_for that carries its tiles through every unit
// with no barrier per layer.  A tile of `m` rows stays in scratch (L1/L2) across units; weights are
// streamed once per tile.  A layer maps a -> W a (rows of the input are samples).  Two tile layouts
// (cpu_schedule.h): batch-major tiles [m, d] multiply by W^T from one transposed copy of the
// weights made per call (cheap for small d); feature-major tiles [d, m] multiply by W as stored,
// z^T = W a^T, and the backward's data gradient (ga = gz W) runs batch-major, also on W as stored,
// so no weight is ever transposed: the kernels transpose m x d tiles in cache instead, and the
// weight gradients accumulate transposed (dW^T = a^T gz) and are transposed back while the slots
// are reduced.  Every small GEMM is a plain row-major C = A @ B (oneDNN brgemm for float32).
//
// Memory: the forward saves either the input of every unit (saved [R, B, d]; the backward then
// recomputes a unit's inner activations from it, in per-thread scratch of (2n + 4) m d elements) or
// the input of every layer (save_layers: [R, n, B, d]; nothing is recomputed).  With feature-major
// tiles either is stored feature-major (strides [B d, 1, B] / [n d B, d B, 1, B], i.e. [R, d, B] /
// [R, n, d, B] in memory), so that the forward's store is a row copy and the backward's GEMMs read
// the saved panels in place, with no transposes.  Saves beyond kCachedSaveBytes in all go out with
// non-temporal stores.  Output buffers come from
// cpu_buffer_pool.h.  The backward accumulates weight gradients per slot in chunks of units
// ([P, U, n, d, d], U chosen to bound it; each slot's first tile writes, later tiles add, so the
// buffers are never zero-filled), then reduces the slots in a fixed order: results are
// deterministic for a given number of threads.  Without weight gradients (grad_weights=false: the weights
// are frozen, only dL/dx is wanted) `dw` is null and the weight-gradient GEMMs, the slot buffers and
// their reduction are skipped; the data gradient runs the same operations, so grad_x has the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common.h"
#include "cpu/cpu_buffer_pool.h"
#include "cpu/cpu_gemm.h"
#include "cpu/cpu_schedule.h"

namespace shortcut_ext {
namespace {

struct Acts {
  Act pre, mid, post;
};

// Rows per tile: small enough that a tile's scratch stays in cache.
int64_t tile_rows(int64_t B, int64_t d, int64_t n, int64_t slots, bool backward) {
  int64_t per_slot = (B + slots - 1) / slots;
  int64_t cap = std::max<int64_t>(8, 16384 / d);
  if (backward) cap = std::min(cap, std::max<int64_t>(8, (int64_t(1) << 19) / (2 * n * d)));
  return std::max<int64_t>(1, std::min(per_slot, cap));
}

// Forward of units [0, R) for one tile of m rows held in `h` [m, d].
template <typename T>
void forward_tile(T* h, int64_t m, int64_t row0, int64_t B, const T* wt, int64_t R, int64_t n, int64_t d,
                  bool shortcut, Acts acts, T* saved, bool layers, bool stream, T* bufA, T* bufZ0, T* bufZ1) {
  const auto save = stream ? stream_panel<T> : copy_panel<T>;
  const int64_t md = m * d, dd = d * d, S = layers ? n : 1;
  for (int64_t r = 0; r < R; ++r) {
    if (saved) save(h, 1, md, md, saved + (r * S * B + row0) * d, md);
    const T* cur = h;
    if (acts.pre != Act::Identity) {
      std::copy(h, h + md, bufA);
      apply_act(acts.pre, bufA, md);
      cur = bufA;
    }
    T* z = bufZ0;
    for (int64_t k = 0; k < n; ++k) {
      z = (k % 2 == 0) ? bufZ0 : bufZ1;
      gemm_nn<T>(m, d, d, cur, d, wt + (r * n + k) * dd, d, z, d, false);
      if (k < n - 1) {
        apply_act(acts.mid, z, md);
        if (saved && layers) save(z, 1, md, md, saved + ((r * n + k + 1) * B + row0) * d, md);
      }
      cur = z;
    }
    apply_act(acts.post, z, md);
    if (shortcut) {
#pragma omp simd
      for (int64_t i = 0; i < md; ++i) h[i] += z[i];
    } else {
      std::copy(z, z + md, h);
    }
  }
}

// Feature-major forward of units [0, R) for one tile: `h` [d, m] (leading dimension m).  The unit
// inputs (or with `layers` every layer's input) go to `saved` feature-major: [R, d, B] ([R, n, d, B])
// in memory.
template <typename T>
void forward_tile_fm(T* h, int64_t m, int64_t row0, int64_t B, const T* w, int64_t R, int64_t n, int64_t d,
                     bool shortcut, Acts acts, T* saved, bool layers, bool stream, T* bufA, T* bufZ0, T* bufZ1) {
  const auto save = stream ? stream_panel<T> : copy_panel<T>;
  const int64_t md = m * d, dd = d * d, S = layers ? n : 1;
  for (int64_t r = 0; r < R; ++r) {
    if (saved) save(h, d, m, m, saved + r * S * d * B + row0, B);
    const T* cur = h;
    if (acts.pre != Act::Identity) {
      std::copy(h, h + md, bufA);
      apply_act(acts.pre, bufA, md);
      cur = bufA;
    }
    T* z = bufZ0;
    // the next unit's weights, requested a share before each GEMM: a burst of them all stalls (at d = 64,
    // R = 1000, B = 256: 11.7 -> 9.6 ms)
    Prefetch next = r + 1 < R ? Prefetch(w + (r + 1) * n * dd, n * dd) : Prefetch();
    next.parts = n;
    for (int64_t k = 0; k < n; ++k) {
      z = (k % 2 == 0) ? bufZ0 : bufZ1;
      gemm_nn<T>(d, m, d, w + (r * n + k) * dd, d, cur, m, z, m, false, next);
      if (k < n - 1) {
        apply_act(acts.mid, z, md);
        if (saved && layers) save(z, d, m, m, saved + (r * n + k + 1) * d * B + row0, B);
      }
      cur = z;
    }
    apply_act(acts.post, z, md);
    if (shortcut) {
#pragma omp simd
      for (int64_t i = 0; i < md; ++i) h[i] += z[i];
    } else {
      std::copy(z, z + md, h);
    }
  }
}

// The forward's saves go out with non-temporal stores (stream_panel), which skip the read of each line,
// unless all of them fit this many bytes: then plain stores leave them in the cache for the backward that
// reads them soon.  d = 10, B = 1797, saves of 1 to 7 MB (depth 6 to 48, float32 and float64, one
// thread): a training step 3-10% faster; at 32-64 MB (d = 32 and 64, feature-major) 4-5% slower.
constexpr int64_t kCachedSaveBytes = int64_t(8) << 20;

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& weights, bool shortcut, Acts acts, bool fm, at::Tensor& y,
                  T* saved, bool layers) {
  const int64_t B = x.size(0), d = x.size(1), R = weights.size(0), n = weights.size(1);
  if (B == 0) return;
  const at::Tensor wt = fm ? weights : transpose_weights<T>(weights);  // batch-major: [R, n, d_in, d_out]
  const T* w_p = wt.data_ptr<T>();
  const T* x_p = x.data_ptr<T>();
  T* y_p = y.data_ptr<T>();
  const int64_t P = num_slots(B, R * n * d * d);
  const int64_t m_max = tile_rows(B, d, n, P, false);
  const int64_t tiles = (B + m_max - 1) / m_max;
  const int64_t slots = std::min(P, tiles);
  const bool stream = saved && R * (layers ? n : 1) * B * d * int64_t(sizeof(T)) > kCachedSaveBytes;
  for_each_slot(slots, [&](int64_t s0, int64_t s1) {
    std::unique_ptr<T[]> scratch(new T[4 * m_max * d]);
    T* h = scratch.get();
    T* bufA = h + m_max * d;
    T* z0 = bufA + m_max * d;
    T* z1 = z0 + m_max * d;
    for (int64_t s = s0; s < s1; ++s) {
      for (int64_t t = s * tiles / slots; t < (s + 1) * tiles / slots; ++t) {
        const int64_t row0 = t * m_max, m = std::min(m_max, B - row0);
        if (fm) {
          transpose_tile(x_p + row0 * d, m, d, d, h, m);
          forward_tile_fm<T>(h, m, row0, B, w_p, R, n, d, shortcut, acts, saved, layers, stream, bufA, z0, z1);
          transpose_tile(h, d, m, m, y_p + row0 * d, d);
          stream_fence();
        } else {
          std::copy(x_p + row0 * d, x_p + (row0 + m) * d, h);
          forward_tile<T>(h, m, row0, B, w_p, R, n, d, shortcut, acts, saved, layers, stream, bufA, z0, z1);
          std::copy(h, h + m * d, y_p + row0 * d);
          stream_fence();
        }
      }
    }
    gemm_release();
  });
}

// Backward through units [r_end, r_begin) in reverse for one tile; `g` [m, d] is dL/d(output of
// unit r_begin - 1) on entry and dL/d(input of unit r_end) on exit.  Weight gradients go to `dw`
// (the chunk's slot buffer, unit r at dw + (r - r_end) * n * d * d): written by the slot's first
// tile, added by the others (`accumulate`); `dw` null: no weight gradients.
template <typename T>
void backward_tile(T* g, int64_t m, int64_t row0, int64_t B, const T* w, const T* wt, const T* saved,
                   int64_t r_begin, int64_t r_end, int64_t n, int64_t d, bool shortcut, Acts acts, T* dw,
                   bool accumulate, T* act, T* zs, T* gz, T* ga, T* tscratch) {
  const int64_t md = m * d, dd = d * d;
  // recompute: in[k] is the input of layer k, zs[k] its output before the activation; with an
  // identity activation in[k] aliases the buffer it would copy
  const T* in[64];
  std::vector<const T*> in_heap;
  const T** ins = in;
  if (n > 64) {
    in_heap.resize(n);
    ins = in_heap.data();
  }
  for (int64_t r = r_begin - 1; r >= r_end; --r) {
    const T* hin = saved + (r * B + row0) * d;
    // the next unit's input (requested during the first weight-gradient GEMM), weights and gradient slot
    const Prefetch next = r > 0 ? Prefetch(hin - B * d, md) : Prefetch();
    if (r > 0) Prefetch(w + (r - 1) * n * dd, n * dd).all(), Prefetch(wt + (r - 1) * n * dd, n * dd).all();
    if (dw != nullptr && r > r_end) Prefetch(dw + (r - 1 - r_end) * n * dd, n * dd).all_for_write();
    if (acts.pre == Act::Identity) {
      ins[0] = hin;
    } else {
      std::copy(hin, hin + md, act);
      apply_act(acts.pre, act, md);
      ins[0] = act;
    }
    for (int64_t k = 0; k < n; ++k) {
      T* zk = zs + k * md;
      gemm_nn<T>(m, d, d, ins[k], d, wt + (r * n + k) * dd, d, zk, d, false);
      if (k < n - 1) {
        if (acts.mid == Act::Identity) {
          ins[k + 1] = zk;
        } else {
          T* next = act + (k + 1) * md;
          std::copy(zk, zk + md, next);
          apply_act(acts.mid, next, md);
          ins[k + 1] = next;
        }
      }
    }
    // gz = g * s_post'(z_{n-1})
    std::copy(g, g + md, gz);
    mul_act_deriv(acts.post, gz, zs + (n - 1) * md, md);
    T* dwr = dw != nullptr ? dw + (r - r_end) * n * dd : nullptr;
    for (int64_t k = n - 1; k >= 0; --k) {
      // dW[r, k] += gz^T @ act[k]   ([d_out, d_in])
      if (dwr != nullptr) gemm_tn<T>(d, d, m, gz, d, ins[k], d, dwr + k * dd, d, accumulate, tscratch, next);
      // ga = gz @ W[r, k]           ([m, d_in]); without weight gradients it requests the next unit's input
      gemm_nn<T>(m, d, d, gz, d, w + (r * n + k) * dd, d, ga, d, false, dwr != nullptr ? kNoPrefetch : next);
      if (k > 0) {
        mul_act_deriv(acts.mid, ga, zs + (k - 1) * md, md);
        std::swap(gz, ga);
      }
    }
    mul_act_deriv(acts.pre, ga, hin, md);
    if (shortcut) {
#pragma omp simd
      for (int64_t i = 0; i < md; ++i) g[i] += ga[i];
    } else {
      std::copy(ga, ga + md, g);
    }
  }
}

// g *= s'(z) row by row: g [rows, cols] (ld cols), z [rows, cols] with leading dimension ldz
template <typename T>
inline void mul_act_deriv_rows(Act a, T* g, const T* z, int64_t rows, int64_t cols, int64_t ldz) {
  if (a == Act::Identity) return;
  if (ldz == cols) return mul_act_deriv(a, g, z, rows * cols);
  for (int64_t i = 0; i < rows; ++i) mul_act_deriv(a, g + i * cols, z + i * ldz, cols);
}

// g *= s'(z) from the activation's output a = s(z), row by row (out with leading dimension ldo)
template <typename T>
inline void mul_act_deriv_from_output_rows(Act a, T* g, const T* out, int64_t rows, int64_t cols, int64_t ldo) {
  if (a == Act::Identity) return;
  if (ldo == cols) return mul_act_deriv_from_output(a, g, out, rows * cols);
  for (int64_t i = 0; i < rows; ++i) mul_act_deriv_from_output(a, g + i * cols, out + i * ldo, cols);
}

// Feature-major backward (see the top of the file).  With `fm_grad` (d < 32) everything runs on [d, m]
// tiles (features x samples), vectorised over the samples: the recompute z = W a, the data gradient
// ga = W^T gz (gemm_tn, W as stored), the activation derivatives elementwise in place; only the weight
// gradients take gz batch-major, dW^T (+)= a^T gz, from one in-cache transpose per layer; `g` is the
// tile's gradient, feature-major [d, m].  Without it (d >= 32: full lanes either way, and no transpose of
// gz) the data gradient runs batch-major, ga = gz W, on a batch-major `g`, the mid derivatives transposing
// the saved outputs on the fly.  `dwt` receives dW^T.  `saved_fm`: the unit inputs are stored
// feature-major ([R, d, B]) and the GEMMs read them in place; else batch-major ([R, B, d]) and each is
// transposed into `hT`.  `wscr`: d * d elements (gemm_tn's transposed W).
template <typename T>
void backward_tile_fm(T* g, int64_t m, int64_t row0, int64_t B, const T* w, const T* saved, bool saved_fm,
                      int64_t r_begin, int64_t r_end, int64_t n, int64_t d, bool shortcut, Acts acts, bool fm_grad,
                      T* dwt, bool accumulate, T* hT, T* act, T* zs, T* zb, T* gz, T* ga, T* wscr) {
  const int64_t md = m * d, dd = d * d;
  const T* in[64];
  std::vector<const T*> in_heap;
  const T** ins = in;
  if (n > 64) {
    in_heap.resize(n);
    ins = in_heap.data();
  }
  for (int64_t r = r_begin - 1; r >= r_end; --r) {
    // the unit input, feature-major: [d, m] with leading dimension ld_in
    const T* hin_fm = saved_fm ? saved + r * d * B + row0 : hT;
    const int64_t ld_in = saved_fm ? B : m;
    int64_t ld0 = ld_in;
    // the next unit's input (requested over the weight-gradient GEMMs), weights and gradient slot
    Prefetch next = r == 0 ? Prefetch() : saved_fm ? Prefetch(hin_fm - d * B, d, m, B) : Prefetch(saved + ((r - 1) * B + row0) * d, md);
    next.parts = dwt != nullptr ? 2 * n : n;
    if (r > 0) Prefetch(w + (r - 1) * n * dd, n * dd).all();
    if (dwt != nullptr && r > r_end) Prefetch(dwt + (r - 1 - r_end) * n * dd, n * dd).all_for_write();
    if (!saved_fm) transpose_tile(saved + (r * B + row0) * d, m, d, d, hT, m);
    if (acts.pre == Act::Identity) {
      ins[0] = hin_fm;
    } else {
      copy_panel(hin_fm, d, m, ld0, act, m);
      apply_act(acts.pre, act, md);
      ins[0] = act;
      ld0 = m;
    }
    for (int64_t k = 0; k < n; ++k) {
      T* zk = zs + k * md;  // [d, m]
      gemm_nn<T>(d, m, d, w + (r * n + k) * dd, d, ins[k], k == 0 ? ld0 : m, zk, m, false);
      if (k < n - 1) {
        if (acts.mid == Act::Identity) {
          ins[k + 1] = zk;
        } else {
          T* next_in = act + (k + 1) * md;
          std::copy(zk, zk + md, next_in);
          apply_act(acts.mid, next_in, md);
          ins[k + 1] = next_in;
        }
      }
    }
    // gz = g * s_post'(z_{n-1})
    std::copy(g, g + md, gz);
    if (fm_grad) {
      mul_act_deriv(acts.post, gz, zs + (n - 1) * md, md);
    } else if (acts.post != Act::Identity) {
      transpose_tile(zs + (n - 1) * md, d, m, m, zb, d);
      mul_act_deriv(acts.post, gz, zb, md);
    }
    T* dwr = dwt != nullptr ? dwt + (r - r_end) * n * dd : nullptr;  // null: no weight gradients
    for (int64_t k = n - 1; k >= 0; --k) {
      if (fm_grad) {
        if (dwr != nullptr) {
          transpose_tile(gz, d, m, m, zb, d);  // zb [m, d_out] = gz^T
          // dW[r, k]^T (+)= a_k^T zb   ([d_in, d_out]; a_k feature-major is a_k^T batch-major)
          gemm_nn<T>(d, d, m, ins[k], k == 0 ? ld0 : m, zb, d, dwr + k * dd, d, accumulate, next);
        }
        // ga = W[r, k]^T gz          ([d_in, m])
        gemm_tn<T>(d, m, d, w + (r * n + k) * dd, d, gz, m, ga, m, false, wscr, next);
        if (k > 0) mul_act_deriv_from_output(acts.mid, ga, ins[k], md);  // ins[k] = s_mid(z_{k-1}), [d, m]
      } else {
        // dW[r, k]^T (+)= a_k^T gz     ([d_in, d_out])
        if (dwr != nullptr) gemm_nn<T>(d, d, m, ins[k], k == 0 ? ld0 : m, gz, d, dwr + k * dd, d, accumulate, next);
        // ga = gz @ W[r, k]             ([m, d_in])
        gemm_nn<T>(m, d, d, gz, d, w + (r * n + k) * dd, d, ga, d, false, next);
        if (k > 0) mul_act_deriv_from_output_fm(acts.mid, ga, ins[k], m, d, m, zb);
      }
      if (k > 0) std::swap(gz, ga);
    }
    if (fm_grad) {
      mul_act_deriv_rows(acts.pre, ga, hin_fm, d, m, ld_in);  // ga *= s_pre'(unit input)
    } else if (acts.pre != Act::Identity) {  // batch-major
      if (saved_fm) {
        transpose_tile(hin_fm, d, m, B, zb, d);
        mul_act_deriv(acts.pre, ga, zb, md);
      } else {
        mul_act_deriv(acts.pre, ga, saved + (r * B + row0) * d, md);
      }
    }
    if (shortcut) {
#pragma omp simd
      for (int64_t i = 0; i < md; ++i) g[i] += ga[i];
    } else {
      std::copy(ga, ga + md, g);
    }
  }
}

// Backward from saved layer inputs (saved [R, n, B, d], see the top of the file): nothing is
// recomputed but the last layer's pre-activation where act_post is not the identity; the mid
// derivatives come from the saved outputs.  Batch-major, on W as stored: ga = gz W, and the weight
// gradients accumulate transposed, dW^T = a^T gz (gemm_tn: the d <= 16 register kernel, or one
// in-cache transpose of a and brgemm).
template <typename T>
void backward_tile_layers(T* g, int64_t m, int64_t row0, int64_t B, const T* w, const T* saved, int64_t r_begin,
                          int64_t r_end, int64_t n, int64_t d, bool shortcut, Acts acts, T* dwt, bool accumulate,
                          T* act, T* aT, T* zT, T* zb, T* gz, T* ga) {
  const int64_t md = m * d, dd = d * d;
  const T* in[64];
  std::vector<const T*> in_heap;
  const T** ins = in;
  if (n > 64) {
    in_heap.resize(n);
    ins = in_heap.data();
  }
  for (int64_t r = r_begin - 1; r >= r_end; --r) {
    // the next unit's weights and gradient slot (its layer inputs: requested by the weight-gradient GEMMs)
    if (r > 0) Prefetch(w + (r - 1) * n * dd, n * dd).all();
    if (dwt != nullptr && r > r_end) Prefetch(dwt + (r - 1 - r_end) * n * dd, n * dd).all_for_write();
    for (int64_t k = 0; k < n; ++k) ins[k] = saved + ((r * n + k) * B + row0) * d;
    const T* hin = ins[0];
    if (acts.pre != Act::Identity) {
      std::copy(hin, hin + md, act);
      apply_act(acts.pre, act, md);
      ins[0] = act;
    }
    std::copy(g, g + md, gz);
    if (acts.post != Act::Identity) {  // z_{n-1} = W a_{n-1}, feature-major on W as stored
      transpose_tile(ins[n - 1], m, d, d, aT, m);
      gemm_nn<T>(d, m, d, w + (r * n + n - 1) * dd, d, aT, m, zT, m, false);
      transpose_tile(zT, d, m, m, zb, d);
      mul_act_deriv(acts.post, gz, zb, md);
    }
    T* dwr = dwt != nullptr ? dwt + (r - r_end) * n * dd : nullptr;  // null: no weight gradients
    for (int64_t k = n - 1; k >= 0; --k) {
      // dW[r, k]^T (+)= a_k^T gz, requesting the next unit's input of layer k
      const Prefetch next = r > 0 ? Prefetch(saved + (((r - 1) * n + k) * B + row0) * d, md) : Prefetch();
      if (dwr != nullptr) gemm_tn<T>(d, d, m, ins[k], d, gz, d, dwr + k * dd, d, accumulate, aT, next);
      gemm_nn<T>(m, d, d, gz, d, w + (r * n + k) * dd, d, ga, d, false,  // ga = gz W[r, k]
                 dwr != nullptr ? kNoPrefetch : next);
      if (k > 0) {
        mul_act_deriv_from_output(acts.mid, ga, ins[k], md);
        std::swap(gz, ga);
      }
    }
    mul_act_deriv(acts.pre, ga, hin, md);
    if (shortcut) {
#pragma omp simd
      for (int64_t i = 0; i < md; ++i) g[i] += ga[i];
    } else {
      std::copy(ga, ga + md, g);
    }
  }
}

// Backward from every layer's input stored feature-major (saved [R, n, d, B] in memory, the
// feature-major forward's output), on feature-major tiles like backward_tile_fm: the weight gradients
// dW^T (+)= a^T gz read the saved panels in place, the mid derivatives come from the saved outputs, and
// with `fm_grad` the data gradient is ga = W^T gz on a feature-major `g` [d, m] (gz transposed in cache for
// the weight gradients); else ga = gz W on a batch-major `g`.  Nothing is recomputed but the last
// pre-activation where act_post is not the identity.
template <typename T>
void backward_tile_layers_fm(T* g, int64_t m, int64_t row0, int64_t B, const T* w, const T* saved, int64_t r_begin,
                             int64_t r_end, int64_t n, int64_t d, bool shortcut, Acts acts, bool fm_grad, T* dwt,
                             bool accumulate, T* act, T* zT, T* zb, T* gz, T* ga, T* wscr) {
  const int64_t md = m * d, dd = d * d;
  for (int64_t r = r_begin - 1; r >= r_end; --r) {
    const T* panel = saved + r * n * d * B + row0;  // layer k's input: panel + k * d * B, [d, m], ld B
    // the next unit's layer inputs (requested over the GEMMs), weights and gradient slot
    Prefetch next = r > 0 ? Prefetch(panel - n * d * B, n * d, m, B) : Prefetch();
    next.parts = dwt != nullptr ? 2 * n : n;
    if (r > 0) Prefetch(w + (r - 1) * n * dd, n * dd).all();
    if (dwt != nullptr && r > r_end) Prefetch(dwt + (r - 1 - r_end) * n * dd, n * dd).all_for_write();
    const T* in0 = panel;
    int64_t ld0 = B;
    if (acts.pre != Act::Identity) {
      copy_panel(panel, d, m, B, act, m);
      apply_act(acts.pre, act, md);
      in0 = act;
      ld0 = m;
    }
    std::copy(g, g + md, gz);
    if (acts.post != Act::Identity) {  // z_{n-1} = W a_{n-1}, then gz *= s_post'(z_{n-1})
      const T* a_last = n == 1 ? in0 : panel + (n - 1) * d * B;
      gemm_nn<T>(d, m, d, w + (r * n + n - 1) * dd, d, a_last, n == 1 ? ld0 : B, zT, m, false);
      if (fm_grad) {
        mul_act_deriv(acts.post, gz, zT, md);
      } else {
        transpose_tile(zT, d, m, m, zb, d);
        mul_act_deriv(acts.post, gz, zb, md);
      }
    }
    T* dwr = dwt != nullptr ? dwt + (r - r_end) * n * dd : nullptr;  // null: no weight gradients
    for (int64_t k = n - 1; k >= 0; --k) {
      const T* a = k == 0 ? in0 : panel + k * d * B;
      const int64_t lda = k == 0 ? ld0 : B;
      if (fm_grad) {
        if (dwr != nullptr) {
          transpose_tile(gz, d, m, m, zb, d);  // zb [m, d_out] = gz^T
          gemm_nn<T>(d, d, m, a, lda, zb, d, dwr + k * dd, d, accumulate, next);     // dW[r, k]^T (+)= a_k^T zb
        }
        gemm_tn<T>(d, m, d, w + (r * n + k) * dd, d, gz, m, ga, m, false, wscr, next);  // ga = W[r, k]^T gz
        if (k > 0) mul_act_deriv_from_output_rows(acts.mid, ga, a, d, m, B);        // a = s_mid(z_{k-1})
      } else {
        if (dwr != nullptr) gemm_nn<T>(d, d, m, a, lda, gz, d, dwr + k * dd, d, accumulate, next);  // dW^T (+)= a^T gz
        gemm_nn<T>(m, d, d, gz, d, w + (r * n + k) * dd, d, ga, d, false, next);  // ga = gz W[r, k]
        if (k > 0) mul_act_deriv_from_output_fm(acts.mid, ga, a, m, d, B, zb);
      }
      if (k > 0) std::swap(gz, ga);
    }
    if (fm_grad) {
      mul_act_deriv_rows(acts.pre, ga, panel, d, m, B);  // ga *= s_pre'(unit input)
    } else if (acts.pre != Act::Identity) {
      transpose_tile(panel, d, m, B, zb, d);
      mul_act_deriv(acts.pre, ga, zb, md);
    }
    if (shortcut) {
#pragma omp simd
      for (int64_t i = 0; i < md; ++i) g[i] += ga[i];
    } else {
      std::copy(ga, ga + md, g);
    }
  }
}

// `grad_w` undefined: no weight gradients (grad_x only).
template <typename T>
void backward_impl(const at::Tensor& grad_y, const at::Tensor& weights, const at::Tensor& saved_in, bool shortcut,
                   Acts acts, at::Tensor& grad_x, at::Tensor& grad_w) {
  const int64_t B = grad_y.size(0), d = grad_y.size(1), R = weights.size(0), n = weights.size(1);
  const int64_t dd = d * d;
  const bool want_w = grad_w.defined();
  if (B == 0) {
    if (want_w) grad_w.zero_();
    return;
  }
  const bool layers = saved_in.dim() == 4;  // every layer's input was saved: nothing to recompute
  const bool fm = cpu_tile_layout(d, std::is_same<T, double>::value) == TileLayout::FeatureMajor;
  // activations stored feature-major (the feature-major forward's output); the batch-major tiles
  // read them batch-major
  const bool saved_fm = !saved_in.is_contiguous() && fm;
  at::Tensor saved = saved_in;
  if (!saved_in.is_contiguous() && !fm) {  // (SHORTCUT_EXT_CPU_LAYOUT=batch from d = 32 on) a cached copy
    saved = pooled_empty(saved_in.sizes(), saved_in.options());
    saved.copy_(saved_in);
  }
  const bool dw_transposed = fm || layers;  // slot buffers hold dW^T
  // below d = 32 the feature-major tile kernels run the data gradient feature-major too (a batch-major one
  // would fill d of a multiple of 16 lanes) and carry the tile's gradient feature-major
  const bool fm_grad = d < cpu_fm_gradient_below();
  const bool g_fm = fm_grad && (layers ? saved_fm : fm);
  // the batch-major recompute multiplies by W^T: [R, n, d_in, d_out]
  const at::Tensor wt = dw_transposed ? at::Tensor() : transpose_weights<T>(weights);
  const T* w_p = weights.data_ptr<T>();
  const T* wt_p = wt.defined() ? wt.data_ptr<T>() : nullptr;
  const T* saved_p = saved.data_ptr<T>();
  T* g_all = grad_x.data_ptr<T>();  // carries each tile's gradient between chunks of units
  std::copy(grad_y.data_ptr<T>(), grad_y.data_ptr<T>() + B * d, g_all);
  T* gw_p = want_w ? grad_w.data_ptr<T>() : nullptr;

  const CpuSchedule sch = cpu_backward_schedule(B, d, R, n);
  const int64_t m_max = sch.tile_rows, tiles = sch.tiles, slots = sch.slots, U = sch.chunk_units;
  const int64_t stride = U * n * dd;  // one slot's buffer
  std::unique_ptr<T[]> partial(want_w ? new T[slots * stride] : nullptr);

  for (int64_t r_begin = R; r_begin > 0; r_begin -= U) {
    const int64_t r_end = std::max<int64_t>(0, r_begin - U);
    const int64_t chunk = (r_begin - r_end) * n * dd;
    for_each_slot(slots, [&](int64_t s0, int64_t s1) {
      std::unique_ptr<T[]> scratch(new T[(2 * n + 4) * m_max * d + dd]);
      T* act = scratch.get();
      T* zs = act + n * m_max * d;
      T* gz = zs + n * m_max * d;
      T* ga = gz + m_max * d;
      T* t0 = ga + m_max * d;   // batch-major: transposed activations for gemm_tn; feature-major: hT
      T* t1 = t0 + m_max * d;   // feature-major: batch-major copy of gz
      T* wscr = t1 + m_max * d;  // feature-major: gemm_tn's W^T
      for (int64_t s = s0; s < s1; ++s) {
        T* dw = want_w ? partial.get() + s * stride : nullptr;
        const int64_t first = s * tiles / slots;
        for (int64_t t = first; t < (s + 1) * tiles / slots; ++t) {
          const int64_t row0 = t * m_max, m = std::min(m_max, B - row0);
          T* g = g_all + row0 * d;  // the tile's gradient: [m, d], feature-major [d, m] between the chunks of g_fm
          if (g_fm && r_begin == R) {
            transpose_tile(g, m, d, d, t0, m);
            std::copy(t0, t0 + m * d, g);
          }
          if (layers && saved_fm)
            backward_tile_layers_fm<T>(g, m, row0, B, w_p, saved_p, r_begin, r_end, n, d, shortcut, acts, fm_grad, dw,
                                       t != first, act, zs, t1, gz, ga, wscr);
          else if (layers)
            backward_tile_layers<T>(g, m, row0, B, w_p, saved_p, r_begin, r_end, n, d, shortcut, acts, dw, t != first,
                                    act, t0, t1, zs, gz, ga);
          else if (fm)
            backward_tile_fm<T>(g, m, row0, B, w_p, saved_p, saved_fm, r_begin, r_end, n, d, shortcut, acts, fm_grad,
                                dw, t != first, t0, act, zs, t1, gz, ga, wscr);
          else
            backward_tile<T>(g, m, row0, B, w_p, wt_p, saved_p, r_begin, r_end, n, d, shortcut, acts, dw, t != first,
                             act, zs, gz, ga, t0);
          if (g_fm && r_end == 0) {
            transpose_tile(g, d, m, m, t0, d);
            std::copy(t0, t0 + m * d, g);
          }
        }
      }
      gemm_release();
    });
    if (!want_w) continue;
    // fixed-order reduction of the slots into grad_w[r_end:r_begin] (transposing dW^T back when
    // feature-major)
    T* out = gw_p + r_end * n * dd;
    const T* part = partial.get();
    if (dw_transposed) {
      at::parallel_for(0, chunk / dd, std::max<int64_t>(1, 65536 / dd), [&](int64_t q0, int64_t q1) {
        T* acc = partial.get();  // slot 0's buffer takes the sum, then one in-cache transpose
        for (int64_t q = q0; q < q1; ++q) {
          for (int64_t sl = 1; sl < slots; ++sl) {
            const T* src = part + sl * stride + q * dd;
#pragma omp simd
            for (int64_t e = 0; e < dd; ++e) acc[q * dd + e] += src[e];
          }
          transpose_tile(acc + q * dd, d, d, d, out + q * dd, d);
        }
      });
    } else {
      at::parallel_for(0, chunk, 65536, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          T acc = part[i];
          for (int64_t sl = 1; sl < slots; ++sl) acc += part[sl * stride + i];
          out[i] = acc;
        }
      });
    }
  }
}

Acts parse_acts(c10::string_view pre, c10::string_view mid, c10::string_view post) {
  return {parse_activation("act_pre", pre), parse_activation("act_mid", mid), parse_activation("act_post", post)};
}

std::tuple<at::Tensor, at::Tensor> residual_stack_forward_cpu(const at::Tensor& x_arg, const at::Tensor& weights_arg,
                                                              bool shortcut, c10::string_view act_pre,
                                                              c10::string_view act_mid, c10::string_view act_post,
                                                              bool save_inputs, bool save_layers) {
  const StackShape s = check_stack(x_arg, weights_arg, "x");
  const at::Tensor x = x_arg.contiguous(), weights = weights_arg.contiguous();
  const Acts acts = parse_acts(act_pre, act_mid, act_post);
  at::Tensor y = at::empty_like(x);
  // the unit inputs [R, B, d] (layer inputs [R, n, B, d]): feature-major in memory ([R, d, B],
  // [R, n, d, B]) with feature-major tiles
  const bool fm = cpu_forward_tile_layout(s.d, x.scalar_type() == at::kDouble, save_inputs) == TileLayout::FeatureMajor;
  const int64_t B = s.B, d = s.d;
  auto saved_empty = [&](bool feature_major) {
    return save_layers ? (feature_major ? pooled_empty({s.R, s.n, B, d}, {s.n * d * B, d * B, 1, B}, x.options())
                                        : pooled_empty({s.R, s.n, B, d}, x.options()))
                       : (feature_major ? pooled_empty({s.R, B, d}, {B * d, 1, B}, x.options())
                                        : pooled_empty({s.R, B, d}, x.options()));
  };
  at::Tensor saved = save_inputs ? saved_empty(fm) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_stack_forward_cpu", [&] {
    forward_impl<scalar_t>(x, weights, shortcut, acts, fm, y, save_inputs ? saved.data_ptr<scalar_t>() : nullptr,
                           save_layers);
  });
  const bool saved_fm = cpu_saved_layout(d, x.scalar_type() == at::kDouble) == TileLayout::FeatureMajor;
  if (save_inputs && fm != saved_fm) {  // SHORTCUT_EXT_CPU_LAYOUT chose the other tiles: a copy into the layout
    at::Tensor out = saved_empty(saved_fm);  // that the width implies (and the fake kernel predicts)
    out.copy_(saved);
    saved = out;
  }
  return {y, saved};
}

std::tuple<at::Tensor, at::Tensor> residual_stack_backward_cpu(const at::Tensor& grad_y_arg, const at::Tensor& weights_arg,
                                                               const at::Tensor& saved, bool shortcut,
                                                               c10::string_view act_pre, c10::string_view act_mid,
                                                               c10::string_view act_post, bool grad_weights) {
  const StackShape s = check_stack(grad_y_arg, weights_arg, "grad_y");
  check_saved(saved, weights_arg, s, /*allow_layers=*/true);
  const at::Tensor grad_y = grad_y_arg.contiguous(), weights = weights_arg.contiguous();
  const Acts acts = parse_acts(act_pre, act_mid, act_post);
  at::Tensor grad_x = at::empty_like(grad_y);
  at::Tensor grad_w = grad_weights ? pooled_empty(weights.sizes(), weights.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "residual_stack_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_y, weights, saved, shortcut, acts, grad_x, grad_w);
  });
  // without weight gradients the second output is empty ([0]), as the fake kernel says
  return {grad_x, grad_weights ? grad_w : at::empty({0}, weights.options())};
}

}  // namespace

CpuSchedule cpu_backward_schedule(int64_t B, int64_t d, int64_t R, int64_t n) {
  const int64_t dd = d * d;
  const int64_t P = num_slots(B, 3 * R * n * dd);
  const int64_t m_max = tile_rows(B, d, n, P, true);
  const int64_t tiles = (B + m_max - 1) / m_max;
  const int64_t slots = std::min(P, tiles);
  // Units per chunk: the slot buffers hold ~2M elements in all (they stay in cache and are reused;
  // a chunk costs one fork/join).
  const int64_t U = std::max<int64_t>(1, std::min<int64_t>(R, (int64_t(1) << 21) / (slots * n * dd)));
  return {m_max, tiles, slots, U};
}

TORCH_LIBRARY_IMPL(shortcut_ext, CPU, m) {
  m.impl("residual_stack_forward", &residual_stack_forward_cpu);
  m.impl("residual_stack_backward", &residual_stack_backward_cpu);
}

}  // namespace shortcut_ext
