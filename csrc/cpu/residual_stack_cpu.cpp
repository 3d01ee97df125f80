// Fused CPU kernels of a residual stack: one op call runs all R units.
//
// Schedule: the batch is cut into row tiles; tiles are grouped into P <= num_threads contiguous
// slots, and each slot is one task of at::parallel_for that carries its tiles through every unit
// with no barrier per layer.  A tile of `m` rows stays in scratch (L1/L2) across units; weights are
// streamed once per tile.  Rows are samples and a layer maps a -> a @ W^T, so the forward multiplies
// by W^T: the host makes one transposed copy of the weights per call (R*n*d*d elements) so that every
// small GEMM is a plain row-major C = A @ B (oneDNN brgemm for float32).
//
// Memory: the forward saves the input of every unit (saved [R, B, d]) and nothing else.  The
// backward recomputes a unit's inner activations from its saved input, in per-thread scratch of
// 2*n*m*d elements, and accumulates weight gradients per slot in chunks of units
// ([P, U, n, d, d], U chosen to bound it), then reduces the slots in a fixed order: results are
// deterministic for a given number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"
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
                  bool shortcut, Acts acts, T* saved, T* bufA, T* bufZ0, T* bufZ1) {
  const int64_t md = m * d, dd = d * d;
  for (int64_t r = 0; r < R; ++r) {
    if (saved) std::copy(h, h + md, saved + (r * B + row0) * d);
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
      if (k < n - 1) apply_act(acts.mid, z, md);
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

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& weights, bool shortcut, Acts acts, at::Tensor& y,
                  T* saved) {
  const int64_t B = x.size(0), d = x.size(1), R = weights.size(0), n = weights.size(1);
  if (B == 0) return;
  const at::Tensor wt = transpose_weights<T>(weights);  // [R, n, d_in, d_out]
  const T* wt_p = wt.data_ptr<T>();
  const T* x_p = x.data_ptr<T>();
  T* y_p = y.data_ptr<T>();
  const int64_t P = num_slots(B, R * n * d * d);
  const int64_t m_max = tile_rows(B, d, n, P, false);
  const int64_t tiles = (B + m_max - 1) / m_max;
  const int64_t slots = std::min(P, tiles);
  for_each_slot(slots, [&](int64_t s0, int64_t s1) {
    std::vector<T> scratch(4 * m_max * d);
    T* h = scratch.data();
    T* bufA = h + m_max * d;
    T* z0 = bufA + m_max * d;
    T* z1 = z0 + m_max * d;
    for (int64_t s = s0; s < s1; ++s) {
      for (int64_t t = s * tiles / slots; t < (s + 1) * tiles / slots; ++t) {
        const int64_t row0 = t * m_max, m = std::min(m_max, B - row0);
        std::copy(x_p + row0 * d, x_p + (row0 + m) * d, h);
        forward_tile<T>(h, m, row0, B, wt_p, R, n, d, shortcut, acts, saved, bufA, z0, z1);
        std::copy(h, h + m * d, y_p + row0 * d);
      }
    }
    gemm_release();
  });
}

// Backward through units [r_end, r_begin) in reverse for one tile; `g` [m, d] is dL/d(output of
// unit r_begin - 1) on entry and dL/d(input of unit r_end) on exit.  Weight gradients are added to
// `dw` (the chunk's slot buffer, unit r at dw + (r - r_end) * n * d * d).
template <typename T>
void backward_tile(T* g, int64_t m, int64_t row0, int64_t B, const T* w, const T* wt, const T* saved,
                   int64_t r_begin, int64_t r_end, int64_t n, int64_t d, bool shortcut, Acts acts, T* dw,
                   T* act, T* zs, T* gz, T* ga, T* tscratch) {
  const int64_t md = m * d, dd = d * d;
  for (int64_t r = r_begin - 1; r >= r_end; --r) {
    const T* hin = saved + (r * B + row0) * d;
    // recompute: in[k] is the input of layer k, zs[k] its output before the activation; with an
    // identity activation in[k] aliases the buffer it would copy
    const T* in[64];
    std::vector<const T*> in_heap;
    const T** ins = in;
    if (n > 64) {
      in_heap.resize(n);
      ins = in_heap.data();
    }
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
    T* dwr = dw + (r - r_end) * n * dd;
    for (int64_t k = n - 1; k >= 0; --k) {
      // dW[r, k] += gz^T @ act[k]   ([d_out, d_in])
      gemm_tn<T>(d, d, m, gz, d, ins[k], d, dwr + k * dd, d, true, tscratch);
      // ga = gz @ W[r, k]           ([m, d_in])
      gemm_nn<T>(m, d, d, gz, d, w + (r * n + k) * dd, d, ga, d, false);
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

template <typename T>
void backward_impl(const at::Tensor& grad_y, const at::Tensor& weights, const at::Tensor& saved, bool shortcut,
                   Acts acts, at::Tensor& grad_x, at::Tensor& grad_w) {
  const int64_t B = grad_y.size(0), d = grad_y.size(1), R = weights.size(0), n = weights.size(1);
  const int64_t dd = d * d;
  if (B == 0) {
    grad_w.zero_();
    return;
  }
  const at::Tensor wt = transpose_weights<T>(weights);  // [R, n, d_in, d_out]
  const T* w_p = weights.data_ptr<T>();
  const T* wt_p = wt.data_ptr<T>();
  const T* saved_p = saved.data_ptr<T>();
  T* g_all = grad_x.data_ptr<T>();  // carries each tile's gradient between chunks of units
  std::copy(grad_y.data_ptr<T>(), grad_y.data_ptr<T>() + B * d, g_all);
  T* gw_p = grad_w.data_ptr<T>();

  const int64_t P = num_slots(B, 3 * R * n * dd);
  const int64_t m_max = tile_rows(B, d, n, P, true);
  const int64_t tiles = (B + m_max - 1) / m_max;
  const int64_t slots = std::min(P, tiles);
  // Units per chunk: bound the slot buffers to ~16M elements in all.
  const int64_t U = std::max<int64_t>(1, std::min<int64_t>(R, (int64_t(1) << 24) / (slots * n * dd)));
  std::vector<T> partial(slots * U * n * dd);

  for (int64_t r_begin = R; r_begin > 0; r_begin -= U) {
    const int64_t r_end = std::max<int64_t>(0, r_begin - U);
    const int64_t chunk = (r_begin - r_end) * n * dd;
    for_each_slot(slots, [&](int64_t s0, int64_t s1) {
      std::vector<T> scratch((2 * n + 2) * m_max * d + m_max * d);
      T* act = scratch.data();
      T* zs = act + n * m_max * d;
      T* gz = zs + n * m_max * d;
      T* ga = gz + m_max * d;
      T* tscratch = ga + m_max * d;
      for (int64_t s = s0; s < s1; ++s) {
        T* dw = partial.data() + s * U * n * dd;
        std::fill(dw, dw + chunk, T(0));
        for (int64_t t = s * tiles / slots; t < (s + 1) * tiles / slots; ++t) {
          const int64_t row0 = t * m_max, m = std::min(m_max, B - row0);
          // each tile uses packed [m, d] scratch; the layer loops need tile-local `md` strides
          backward_tile<T>(g_all + row0 * d, m, row0, B, w_p, wt_p, saved_p, r_begin, r_end, n, d, shortcut, acts,
                           dw, act, zs, gz, ga, tscratch);
        }
      }
      gemm_release();
    });
    // fixed-order reduction of the slots into grad_w[r_end:r_begin]
    T* out = gw_p + r_end * n * dd;
    at::parallel_for(0, chunk, 65536, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T acc = partial[i];
        for (int64_t s = 1; s < slots; ++s) acc += partial[s * U * n * dd + i];
        out[i] = acc;
      }
    });
  }
}

Acts parse_acts(c10::string_view pre, c10::string_view mid, c10::string_view post) {
  return {parse_activation("act_pre", pre), parse_activation("act_mid", mid), parse_activation("act_post", post)};
}

std::tuple<at::Tensor, at::Tensor> residual_stack_forward_cpu(const at::Tensor& x, const at::Tensor& weights,
                                                              bool shortcut, c10::string_view act_pre,
                                                              c10::string_view act_mid, c10::string_view act_post,
                                                              bool save_inputs) {
  const StackShape s = check_stack(x, weights, "x");
  const Acts acts = parse_acts(act_pre, act_mid, act_post);
  at::Tensor y = at::empty_like(x);
  at::Tensor saved = save_inputs ? at::empty({s.R, s.B, s.d}, x.options()) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_stack_forward_cpu", [&] {
    forward_impl<scalar_t>(x, weights, shortcut, acts, y, save_inputs ? saved.data_ptr<scalar_t>() : nullptr);
  });
  return {y, saved};
}

std::tuple<at::Tensor, at::Tensor> residual_stack_backward_cpu(const at::Tensor& grad_y, const at::Tensor& weights,
                                                               const at::Tensor& saved, bool shortcut,
                                                               c10::string_view act_pre, c10::string_view act_mid,
                                                               c10::string_view act_post) {
  const StackShape s = check_stack(grad_y, weights, "grad_y");
  check_saved(saved, weights, s);
  const Acts acts = parse_acts(act_pre, act_mid, act_post);
  at::Tensor grad_x = at::empty_like(grad_y);
  at::Tensor grad_w = at::empty_like(weights);
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "residual_stack_backward_cpu", [&] {
    backward_impl<scalar_t>(grad_y, weights, saved, shortcut, acts, grad_x, grad_w);
  });
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_ext, CPU, m) {
  m.impl("residual_stack_forward", &residual_stack_forward_cpu);
  m.impl("residual_stack_backward", &residual_stack_backward_cpu);
}

}  // namespace shortcut_ext
