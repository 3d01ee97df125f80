// CUDA Hessian-vector products of a residual stack: loss, gradient and K HVPs in one call.
//
// The maths is Pearlmutter's R-operator exactly as in csrc/cpu/residual_stack_hvp_cpu.cpp (see its
// header comment): forward + tangent forward of the K directions, loss seeds g = dL/df and R{g},
// backward + tangent backward, weight-gradient and HVP terms
//   grad W_l = sum_b gz_l^T a_l,   hvp_l = sum_b R{gz_l}^T a_l + gz_l^T R{a_l}.
//
// The same kernels give the products with the Hessian's parts and the empirical Fisher (the `matrix` of
// launch_residual_stack_hvp, the CPU kernel's Net::gn and seeds): G V = J^T H_l J V keeps the tangent backward's
// terms of the output seed R{g} only (no g s''(z) R{z}, gz V, gz^T R{a}: the reverse pass recomputes no
// tangents), F V = H V - G V zeroes that seed, the empirical Fisher is G with the seed R{g}_i = B g_i (g_i . R{f}_i).
//
// A simple generic design (any d, float32 and float64), correctness first:
//   1. hvp_forward_kernel: one block per batch tile of kTileRows rows carries the tile's unit input
//      h and its K tangents through all R units; every unit input and its tangents are saved to a
//      global workspace sh [R + 1, B, d], srho [R + 1, B, K, d] (slot R: the output f, R{f}).
//      Inner activations of a unit go to a per-row record (act, z, R{act}, R{z}, [n] slices of
//      [B, d] / [B, K, d]); block-strided loops, __syncthreads between dependent steps.
//   2. hvp_loss_seed_kernel (one thread per row) and hvp_loss_sum_kernel (one block, fixed order):
//      the loss, g [B, d] and R{g} [B, K, d].  With a frozen read-out P [q, d] the loss is that of
//      z = f P^T [B, q] (targets [B, q] or classes in [0, q)): the row's thread forms z and
//      R{z} = R{f} P^T, seeds them as without one (width q), and maps the seeds back,
//      g = (dL/dz) P and R{g} = R{dL/dz} P (loss_seed_readout of the CPU kernel).
//   3. for r = R-1 .. 0: hvp_reverse_unit_kernel (one block per tile) recomputes unit r's record
//      from the saved input and walks it backwards, carrying g, R{g} in place and storing each
//      layer's gz, R{gz}; then hvp_unit_reduce_kernel (one thread per output element) sums the
//      weight-gradient and HVP terms of unit r over the batch in row order: deterministic, no
//      atomics.
// Memory (elements of T): (R + 1) (1 + K) B d saved inputs (for G and the empirical Fisher (R + 1) B d + 2 K B d:
// their reverse pass needs no tangents, the forward keeps two units' only) + (3n + 2) (1 + K) B d records and
// carried values (+ (3 + 2K) B q for a read-out's z, R{z}, their seeds and the softmax), and
// (1 + K) R n d d for transposed copies of the weights and directions.  2 + (2 R + 3)
// launches per row chunk.  No checkpointing and no shared-memory tiling of the GEMMs:
// each output element is one dot product read from global memory (L1/L2 cached).  Rows are
// independent until the sums over the batch, so a batch larger than max_rows runs in row chunks of
// at most max_rows (the scratch above for B = max_rows, reused): every chunk seeds with 1/B of the
// whole batch and adds its sums to the outputs, in chunk order (deterministic for a given chunk size;
// another chunk size sums in another order, so the bits can differ at rounding level).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

#include "common.h"
#include "cuda/device_utils.cuh"
#include "cuda/residual_stack_cuda.h"

namespace shortcut_ext {
namespace cuda_detail {

#if defined(SHORTCUT_EXT_CUDA_EMULATE) && defined(SE_EMU_HVP_THREADS)
constexpr int kHvpThreads = SE_EMU_HVP_THREADS;  // tests: the GPU's 256 threads per block, emulated
#elif defined(SHORTCUT_EXT_CUDA_EMULATE)
constexpr int kHvpThreads = 32;  // OS threads per emulated block: keep small
#else
constexpr int kHvpThreads = 256;
#endif
constexpr int64_t kHvpTileRows = 8;
constexpr int kHvpSumThreads = 256;

template <typename T>
struct HvpParams {
  const T* x;        // [B, d]
  const T* w;        // [R, n, d, d]
  const T* v;        // [K, R, n, d, d]
  const T* wt;       // [R, n, d, d]       every layer's W^T (the forward reads columns of W: coalesced)
  const T* vt;       // [K, R, n, d, d]    every direction's V^T
  const T* y;        // [B, d] ([B, q] with a read-out) or null
  const int64_t* cls;  // [B] or null
  const T* P;        // [q, d] frozen read-out, or null (the loss of the stack's output f)
  T* zq;             // [B, q]             z = f P^T            (read-out only)
  T* rzq;            // [B, K, q]          R{z}
  T* gq;             // [B, q]             dL/dz
  T* rgq;            // [B, K, q]          R{dL/dz}
  T* prq;            // [B, q]             softmax scratch
  T* sh;             // [R + 1, B, d]      unit inputs (slot R: output f)
  T* srho;           // [R + 1, B, K, d]   their tangents ([2, B, K, d] for G: see rho_slot)
  T* act;            // [n][B, d]          layer inputs a_l of the current unit
  T* z;              // [n][B, d]          layer outputs z_l
  T* ract;           // [n][B, K, d]
  T* rz;             // [n][B, K, d]
  T* gz;             // [n][B, d]          dL/dz_l
  T* rgz;            // [n][B, K, d]
  T* g;              // [B, d]             carried dL/dh
  T* rg;             // [B, K, d]
  T* ga;             // [B, d]             dL/da_l scratch (softmax scratch in the loss kernel)
  T* rga;            // [B, K, d]
  double* row_loss;  // [B]
  T* loss_out;       // []
  T* grad_w;         // [R, n, d, d]
  T* hvps;           // [K, R, n, d, d]
  int64_t B, d, R, n, K;
  int64_t q;         // the loss's width: d, or the read-out's rows
  int64_t B_total;   // rows of the whole batch (the loss is a mean over them); B: this chunk's rows
  bool accumulate;   // add to loss_out, grad_w, hvps (a later chunk) instead of storing
  bool shortcut;
  Act pre, mid, post;
  Loss loss;
  // The matrix (launch_residual_stack_hvp's `matrix`; the CPU kernel's Net::gn and its seeds):
  //   gn          G V = J^T H_l J V (and the empirical Fisher): the tangent backward keeps only the terms of the
  //               output seed R{g}, none of g (the net's second derivatives): no g s''(z) R{z}, gz V nor
  //               gz^T R{a}; the reverse pass recomputes no tangents.
  //   functional  F V = H V - G V: the output seed R{g} is zero, only g's terms remain.
  //   fisher      the empirical Fisher: gn with the seed R{g}_i = B g_i (g_i . R{f}_i) in place of H_l R{f}_i.
  bool gn, functional, fisher;
};

// The tangents of unit r's input (r = R: of the output f) for row 0 of the chunk.  G's reverse pass needs no
// tangents, only R{f} for the output seed: its forward keeps the tangents of two unit inputs, alternately (unit r
// reads slot r % 2 and writes (r + 1) % 2; a tile's rows are its block's alone).
template <typename T>
__device__ __forceinline__ T* rho_slot(const HvpParams<T>& p, int64_t r) {
  return p.srho + (p.gn ? r % 2 : r) * p.B * p.K * p.d;
}

// x * s'(z) (s = s(z)): a select for ReLU, 0 where inactive even for a NaN or inf x, as autograd's
// threshold_backward (the CPU kernel's times_deriv); x itself for the identity; a product otherwise.
template <typename T>
__device__ __forceinline__ T times_d1(Act a, T x, T z, T s) {
  if (a == Act::Identity) return x;
  if (a == Act::Relu) return z <= T(0) ? T(0) : x;
  return x * act_deriv<T>(a, z, s);
}

// x * s''(z) * y: 0 for ReLU and the identity (s'' = 0, and no 0 * NaN), the product otherwise.
template <typename T>
__device__ __forceinline__ T times_d2(Act a, T x, T z, T s, T y) {
  return (a == Act::Identity || a == Act::Relu) ? T(0) : x * act_deriv2<T>(a, z, s) * y;
}

// Forward and tangent forward of unit r for rows [row0, row0 + m): reads hin [m, d], rho [m, K, d]
// (tile views), fills the record; writes h_out, rho_out (tile views) unless null.
// tangents false: the values only (the reverse pass of G, which needs no tangents; rho and rho_out unused).
template <typename T>
__device__ void hvp_unit_forward(const HvpParams<T>& p, int64_t r, int64_t row0, int64_t m, const T* hin,
                                 const T* rho, T* h_out, T* rho_out, bool tangents = true) {
  const int64_t B = p.B, d = p.d, K = p.K, n = p.n, dd = d * d, Kd = K * d;
  const int64_t md = m * d, mkd = m * Kd;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  {
    T* a0 = p.act + row0 * d;
    T* ra0 = p.ract + row0 * Kd;
    for (int64_t e = tid; e < md; e += nt) a0[e] = act_apply<T>(p.pre, hin[e]);
    for (int64_t e = tid; tangents && e < mkd; e += nt) {
      const int64_t i = e / Kd, c = e % d;
      const T h = hin[i * d + c];
      ra0[e] = times_d1<T>(p.pre, rho[e], h, act_apply<T>(p.pre, h));
    }
  }
  __syncthreads();
  for (int64_t l = 0; l < n; ++l) {
    const T* a = p.act + l * B * d + row0 * d;
    const T* ra = p.ract + l * B * Kd + row0 * Kd;
    T* z = p.z + l * B * d + row0 * d;
    T* rz = p.rz + l * B * Kd + row0 * Kd;
    // consecutive threads take consecutive outputs o: W^T[c, o] and V^T[c, o] are read along rows
    const T* Wt = p.wt + (r * n + l) * dd;
    for (int64_t e = tid; e < md; e += nt) {
      const int64_t i = e / d, o = e % d;
      const T* ai = a + i * d;
      T acc = 0;
      for (int64_t c = 0; c < d; ++c) acc += ai[c] * Wt[c * d + o];
      z[e] = acc;
    }
    for (int64_t e = tid; tangents && e < mkd; e += nt) {
      const int64_t i = e / Kd, j = (e / d) % K, o = e % d;
      const T* ai = a + i * d;
      const T* rai = ra + (i * K + j) * d;
      const T* Vt = p.vt + ((j * p.R + r) * n + l) * dd;
      T acc = 0;
      for (int64_t c = 0; c < d; ++c) acc += rai[c] * Wt[c * d + o] + ai[c] * Vt[c * d + o];
      rz[e] = acc;
    }
    __syncthreads();
    if (l + 1 < n) {
      T* an = p.act + (l + 1) * B * d + row0 * d;
      T* ran = p.ract + (l + 1) * B * Kd + row0 * Kd;
      for (int64_t e = tid; e < md; e += nt) an[e] = act_apply<T>(p.mid, z[e]);
      for (int64_t e = tid; tangents && e < mkd; e += nt) {
        const int64_t i = e / Kd, c = e % d;
        const T zz = z[i * d + c];
        ran[e] = times_d1<T>(p.mid, rz[e], zz, act_apply<T>(p.mid, zz));
      }
      __syncthreads();
    }
  }
  if (h_out == nullptr) return;
  const T* z = p.z + (n - 1) * B * d + row0 * d;
  const T* rz = p.rz + (n - 1) * B * Kd + row0 * Kd;
  for (int64_t e = tid; e < md; e += nt) {
    const T s = act_apply<T>(p.post, z[e]);
    h_out[e] = p.shortcut ? hin[e] + s : s;
  }
  for (int64_t e = tid; e < mkd; e += nt) {
    const int64_t i = e / Kd, c = e % d;
    const T zz = z[i * d + c];
    const T t = times_d1<T>(p.post, rz[e], zz, act_apply<T>(p.post, zz));
    rho_out[e] = p.shortcut ? rho[e] + t : t;
  }
  __syncthreads();
}

// Forward of every unit for one tile; saves the unit inputs and tangents.
template <typename T>
__global__ void __launch_bounds__(kHvpThreads) hvp_forward_kernel(HvpParams<T> p) {
  const int64_t row0 = int64_t(blockIdx.x) * kHvpTileRows;
  const int64_t m = p.B - row0 < kHvpTileRows ? p.B - row0 : kHvpTileRows;  // (no reference to the constant)
  const int64_t d = p.d, Kd = p.K * p.d, B = p.B;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  for (int64_t e = tid; e < m * d; e += nt) p.sh[row0 * d + e] = p.x[row0 * d + e];
  for (int64_t e = tid; e < m * Kd; e += nt) rho_slot<T>(p, 0)[row0 * Kd + e] = T(0);
  __syncthreads();
  for (int64_t r = 0; r < p.R; ++r) {
    hvp_unit_forward<T>(p, r, row0, m, p.sh + (r * B + row0) * d, rho_slot<T>(p, r) + row0 * Kd,
                        p.sh + ((r + 1) * B + row0) * d, rho_slot<T>(p, r + 1) + row0 * Kd);
  }
}

// The loss of one row of logits / outputs f [w] (not yet divided by B) and its seeds g = dL/df [w] and
// R{g} [K, w] from R{f} [K, w] (as loss_seed of the CPU kernel).  y: the row's targets [w] (mse, or
// cross-entropy probabilities), or null with class index t; pr [w]: softmax scratch.
template <typename T>
__device__ double hvp_row_seed(Loss loss, const T* f, const T* rf, const T* y, int64_t t, int64_t w, int64_t K,
                               T ib, T* g, T* rg, T* pr) {
  if (loss == Loss::Mse) {
    double total = 0.0;
    for (int64_t c = 0; c < w; ++c) {
      const T diff = f[c] - y[c];
      total += 0.5 * static_cast<double>(diff) * static_cast<double>(diff);
      g[c] = diff * ib;
    }
    for (int64_t e = 0; e < K * w; ++e) rg[e] = rf[e] * ib;
    return total;
  }
  T mx = f[0];
  for (int64_t c = 1; c < w; ++c) mx = f[c] > mx ? f[c] : mx;
  T se = 0;
  for (int64_t c = 0; c < w; ++c) {
    pr[c] = std::exp(f[c] - mx);
    se += pr[c];
  }
  for (int64_t c = 0; c < w; ++c) pr[c] /= se;
  // the loss from the shifted logits f - mx, as log_softmax: mx + log(se) would round log(se) away
  // against a large mx before f_t were subtracted
  const double lse = std::log(static_cast<double>(se));
  T mass;
  double total;
  if (y == nullptr) {
    mass = T(1);
    total = lse - (static_cast<double>(f[t]) - static_cast<double>(mx));
    for (int64_t c = 0; c < w; ++c) g[c] = pr[c] * ib;
    g[t] -= ib;
  } else {
    mass = 0;
    double yf = 0.0;
    for (int64_t c = 0; c < w; ++c) {
      mass += y[c];
      yf += static_cast<double>(y[c]) * (static_cast<double>(f[c]) - static_cast<double>(mx));
    }
    total = static_cast<double>(mass) * lse - yf;
    for (int64_t c = 0; c < w; ++c) g[c] = (mass * pr[c] - y[c]) * ib;
  }
  const T scale = mass * ib;
  for (int64_t j = 0; j < K; ++j) {
    const T* rfj = rf + j * w;
    T* rgj = rg + j * w;
    T dot = 0;
    for (int64_t c = 0; c < w; ++c) dot += pr[c] * rfj[c];
    for (int64_t c = 0; c < w; ++c) rgj[c] = scale * pr[c] * (rfj[c] - dot);
  }
  return total;
}

// With a read-out P: the loss of row b's z = f P^T, and its seeds mapped back through P into g, R{g}.
template <typename T>
__device__ double hvp_readout_seed(const HvpParams<T>& p, const T* f, const T* rf, const T* y, int64_t t, T ib, T* g,
                                   T* rg, int64_t b) {
  const int64_t d = p.d, K = p.K, q = p.q;
  const T* P = p.P;
  T* z = p.zq + b * q;
  T* rz = p.rzq + b * K * q;
  T* gz = p.gq + b * q;
  T* rgz = p.rgq + b * K * q;
  for (int64_t c = 0; c < q; ++c) {  // z = f P^T, R{z} = R{f} P^T
    const T* pc = P + c * d;
    T acc = 0;
    for (int64_t k = 0; k < d; ++k) acc += f[k] * pc[k];
    z[c] = acc;
    for (int64_t j = 0; j < K; ++j) {
      const T* rfj = rf + j * d;
      T racc = 0;
      for (int64_t k = 0; k < d; ++k) racc += rfj[k] * pc[k];
      rz[j * q + c] = racc;
    }
  }
  const double row_loss = hvp_row_seed<T>(p.loss, z, rz, y, t, q, K, ib, gz, rgz, p.prq + b * q);
  for (int64_t k = 0; k < d; ++k) {  // g = gz P, R{g} = R{gz} P
    T acc = 0;
    for (int64_t c = 0; c < q; ++c) acc += gz[c] * P[c * d + k];
    g[k] = acc;
    for (int64_t j = 0; j < K; ++j) {
      const T* rgzj = rgz + j * q;
      T racc = 0;
      for (int64_t c = 0; c < q; ++c) racc += rgzj[c] * P[c * d + k];
      rg[j * d + k] = racc;
    }
  }
  return row_loss;
}

// Loss of row b (row_loss, not yet divided by B), g = dL/df and R{g}; with a read-out P, those of
// z = f P^T, mapped back through P.
template <typename T>
__global__ void __launch_bounds__(kHvpThreads) hvp_loss_seed_kernel(HvpParams<T> p) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= p.B) return;
  const int64_t d = p.d, K = p.K, q = p.q;
  const T* f = p.sh + (p.R * p.B + b) * d;
  const T* rf = rho_slot<T>(p, p.R) + b * K * d;
  T* g = p.g + b * d;
  T* rg = p.rg + b * K * d;
  const T ib = static_cast<T>(1.0 / double(p.B_total));
  const T* y = p.y != nullptr ? p.y + b * q : nullptr;
  const int64_t t = p.cls != nullptr ? p.cls[b] : -1;
  if (p.P == nullptr) {
    p.row_loss[b] = hvp_row_seed<T>(p.loss, f, rf, y, t, d, K, ib, g, rg, p.ga + b * d);
  } else {
    p.row_loss[b] = hvp_readout_seed<T>(p, f, rf, y, t, ib, g, rg, b);
  }
  if (p.functional) {  // F: g's terms alone
    for (int64_t e = 0; e < K * d; ++e) rg[e] = T(0);
  } else if (p.fisher) {  // R{g} = B g (g . R{f}): the sample's gradient outer product, not H_l
    for (int64_t j = 0; j < K; ++j) {
      const T* rfj = rf + j * d;
      T dot = 0;
      for (int64_t c = 0; c < d; ++c) dot += g[c] * rfj[c];
      dot *= static_cast<T>(p.B_total);
      for (int64_t c = 0; c < d; ++c) rg[j * d + c] = dot * g[c];
    }
  }
}

// loss = sum_b row_loss[b] / B, one block of kHvpSumThreads threads, fixed summation order.
template <typename T>
__global__ void __launch_bounds__(kHvpSumThreads) hvp_loss_sum_kernel(HvpParams<T> p) {
  SE_DYNAMIC_SMEM(double, buf);
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  double acc = 0.0;
  for (int64_t b = tid; b < p.B; b += nt) acc += p.row_loss[b];
  buf[tid] = acc;
  __syncthreads();
  if (tid == 0) {
    double total = 0.0;
    for (int64_t t = 0; t < nt; ++t) total += buf[t];
    const T part = static_cast<T>(total / double(p.B_total));
    p.loss_out[0] = p.accumulate ? p.loss_out[0] + part : part;
  }
}

// Reverse (backward + tangent backward) through unit r for one tile: recomputes the unit's record
// from its saved input, updates g, R{g} in place and stores gz_l, R{gz_l} of every layer.  For G (p.gn) the
// record has no tangents and R{g} is carried back like a gradient: R{gz} = R{g} s'(z), R{ga} = R{gz} W.
template <typename T>
__global__ void __launch_bounds__(kHvpThreads) hvp_reverse_unit_kernel(HvpParams<T> p, int64_t r) {
  const int64_t row0 = int64_t(blockIdx.x) * kHvpTileRows;
  const int64_t m = p.B - row0 < kHvpTileRows ? p.B - row0 : kHvpTileRows;  // (no reference to the constant)
  const int64_t B = p.B, d = p.d, K = p.K, n = p.n, dd = d * d, Kd = K * d;
  const int64_t md = m * d, mkd = m * Kd;
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  const T* hin = p.sh + (r * B + row0) * d;
  const bool gn = p.gn;
  const T* rho = gn ? nullptr : rho_slot<T>(p, r) + row0 * Kd;  // (G: no tangents in the reverse pass)
  hvp_unit_forward<T>(p, r, row0, m, hin, rho, nullptr, nullptr, !gn);
  __syncthreads();
  T* g = p.g + row0 * d;
  T* rg = p.rg + row0 * Kd;
  T* ga = p.ga + row0 * d;
  T* rga = p.rga + row0 * Kd;
  // seed: gz = g s_post'(z), R{gz} = R{g} s_post'(z) + g s_post''(z) R{z}
  {
    const T* z = p.z + (n - 1) * B * d + row0 * d;
    const T* rz = p.rz + (n - 1) * B * Kd + row0 * Kd;
    T* gz = p.gz + (n - 1) * B * d + row0 * d;
    T* rgz = p.rgz + (n - 1) * B * Kd + row0 * Kd;
    for (int64_t e = tid; e < md; e += nt) gz[e] = times_d1<T>(p.post, g[e], z[e], act_apply<T>(p.post, z[e]));
    for (int64_t e = tid; e < mkd; e += nt) {
      const int64_t i = e / Kd, c = e % d;
      const T zz = z[i * d + c], s = act_apply<T>(p.post, zz);
      rgz[e] = times_d1<T>(p.post, rg[e], zz, s);
      if (!gn) rgz[e] += times_d2<T>(p.post, g[i * d + c], zz, s, rz[e]);
    }
  }
  __syncthreads();
  for (int64_t l = n - 1; l >= 0; --l) {
    const T* gz = p.gz + l * B * d + row0 * d;
    const T* rgz = p.rgz + l * B * Kd + row0 * Kd;
    const T* W = p.w + (r * n + l) * dd;
    // ga = gz W, R{ga} = R{gz} W + gz V
    for (int64_t e = tid; e < md; e += nt) {
      const int64_t i = e / d, c = e % d;
      const T* gi = gz + i * d;
      T acc = 0;
      for (int64_t o = 0; o < d; ++o) acc += gi[o] * W[o * d + c];
      ga[e] = acc;
    }
    for (int64_t e = tid; e < mkd; e += nt) {
      const int64_t i = e / Kd, j = (e / d) % K, c = e % d;
      const T* gi = gz + i * d;
      const T* rgi = rgz + (i * K + j) * d;
      const T* V = p.v + ((j * p.R + r) * n + l) * dd;
      T acc = 0;
      if (gn) {
        for (int64_t o = 0; o < d; ++o) acc += rgi[o] * W[o * d + c];
      } else {
        for (int64_t o = 0; o < d; ++o) acc += rgi[o] * W[o * d + c] + gi[o] * V[o * d + c];
      }
      rga[e] = acc;
    }
    __syncthreads();
    if (l > 0) {
      const T* zp = p.z + (l - 1) * B * d + row0 * d;
      const T* rzp = p.rz + (l - 1) * B * Kd + row0 * Kd;
      T* gzp = p.gz + (l - 1) * B * d + row0 * d;
      T* rgzp = p.rgz + (l - 1) * B * Kd + row0 * Kd;
      for (int64_t e = tid; e < md; e += nt)
        gzp[e] = times_d1<T>(p.mid, ga[e], zp[e], act_apply<T>(p.mid, zp[e]));
      for (int64_t e = tid; e < mkd; e += nt) {
        const int64_t i = e / Kd, c = e % d;
        const T zz = zp[i * d + c], s = act_apply<T>(p.mid, zz);
        rgzp[e] = times_d1<T>(p.mid, rga[e], zz, s);
        if (!gn) rgzp[e] += times_d2<T>(p.mid, ga[i * d + c], zz, s, rzp[e]);
      }
      __syncthreads();
    }
  }
  // through s_pre and the shortcut
  for (int64_t e = tid; e < md; e += nt) {
    const T h = hin[e];
    const T gi = times_d1<T>(p.pre, ga[e], h, act_apply<T>(p.pre, h));
    g[e] = p.shortcut ? g[e] + gi : gi;
  }
  for (int64_t e = tid; e < mkd; e += nt) {
    const int64_t i = e / Kd, c = e % d;
    const T h = hin[i * d + c], s = act_apply<T>(p.pre, h);
    T t = times_d1<T>(p.pre, rga[e], h, s);
    if (!gn) t += times_d2<T>(p.pre, ga[i * d + c], h, s, rho[e]);
    rg[e] = p.shortcut ? rg[e] + t : t;
  }
}

// Weight gradient and HVPs of unit r, summed over the batch in row order.  One thread per output
// element q of [n][1 + K][d, d]: slot 0 grad_w[r, l], slot 1 + j hvps[j, r, l].
template <typename T>
__global__ void __launch_bounds__(kHvpThreads) hvp_unit_reduce_kernel(HvpParams<T> p, int64_t r) {
  const int64_t B = p.B, d = p.d, K = p.K, n = p.n, dd = d * d, Kd = K * d;
  const int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= n * (1 + K) * dd) return;
  const int64_t l = q / ((1 + K) * dd), t = (q / dd) % (1 + K), oi = q % dd, o = oi / d, i = oi % d;
  const T* a = p.act + l * B * d;
  const T* gz = p.gz + l * B * d;
  if (t == 0) {
    T acc = 0;
    for (int64_t b = 0; b < B; ++b) acc += gz[b * d + o] * a[b * d + i];
    T& out = p.grad_w[(r * n + l) * dd + oi];
    out = p.accumulate ? out + acc : acc;
    return;
  }
  const int64_t j = t - 1;
  const T* ra = p.ract + l * B * Kd;
  const T* rgz = p.rgz + l * B * Kd;
  T acc = 0;
  if (p.gn) {  // G: no gz^T R{a} (R{a} was not recomputed)
    for (int64_t b = 0; b < B; ++b) acc += rgz[(b * K + j) * d + o] * a[b * d + i];
  } else {
    for (int64_t b = 0; b < B; ++b)
      acc += rgz[(b * K + j) * d + o] * a[b * d + i] + gz[b * d + o] * ra[(b * K + j) * d + i];
  }
  T& out = p.hvps[((j * p.R + r) * n + l) * dd + oi];
  out = p.accumulate ? out + acc : acc;
}

// dst[m] = src[m]^T for mats d x d matrices (once per call: the forward's reads of W and V coalesce).
template <typename T>
__global__ void __launch_bounds__(kHvpThreads) hvp_transpose_kernel(const T* src, T* dst, int64_t mats, int64_t d) {
  const int64_t dd = d * d, total = mats * dd;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t mat = e / dd, c = (e % dd) / d, o = e % d;  // dst[mat][c, o] = src[mat][o, c]
    dst[e] = src[mat * dd + o * d + c];
  }
}

template <typename T>
T* hvp_alloc(const cuda::Allocator& alloc, int64_t count) {
  return static_cast<T*>(alloc(size_t(std::max<int64_t>(count, 1)) * sizeof(T)));
}

}  // namespace cuda_detail

namespace cuda {

template <typename T>
cudaError_t launch_residual_stack_hvp(const StackArgs& a, int64_t K, Loss loss, const T* x, const T* weights,
                                      const T* targets, const int64_t* classes, const T* directions, T* loss_out,
                                      T* grad_w, T* hvps, const Allocator& alloc, cudaStream_t stream,
                                      int64_t max_rows, const T* readout, int64_t q, HvpMatrix matrix) {
  using namespace cuda_detail;
  if (a.B == 0 || a.d == 0) return cudaSuccess;  // the host returns zeros
  const int64_t d = a.d, R = a.R, n = a.n;
  if (readout == nullptr) q = d;  // the loss's width
  const int64_t B = max_rows > 0 ? std::min(a.B, max_rows) : a.B;  // rows per chunk: the scratch is for B
  HvpParams<T> p;
  p.x = x;
  p.w = weights;
  p.v = directions;
  T* wt = hvp_alloc<T>(alloc, R * n * d * d);
  T* vt = hvp_alloc<T>(alloc, K * R * n * d * d);
  p.wt = wt;
  p.vt = vt;
  p.y = targets;
  p.cls = classes;
  p.sh = hvp_alloc<T>(alloc, (R + 1) * B * d);
  const bool gn = matrix == HvpMatrix::Ggn || matrix == HvpMatrix::EmpiricalFisher;
  p.srho = hvp_alloc<T>(alloc, (gn ? 2 : R + 1) * B * K * d);
  p.act = hvp_alloc<T>(alloc, n * B * d);
  p.z = hvp_alloc<T>(alloc, n * B * d);
  p.ract = hvp_alloc<T>(alloc, n * B * K * d);
  p.rz = hvp_alloc<T>(alloc, n * B * K * d);
  p.gz = hvp_alloc<T>(alloc, n * B * d);
  p.rgz = hvp_alloc<T>(alloc, n * B * K * d);
  p.g = hvp_alloc<T>(alloc, B * d);
  p.rg = hvp_alloc<T>(alloc, B * K * d);
  p.ga = hvp_alloc<T>(alloc, B * d);
  p.rga = hvp_alloc<T>(alloc, B * K * d);
  p.row_loss = hvp_alloc<double>(alloc, B);
  p.P = readout;
  p.q = q;
  const bool ro = readout != nullptr;
  p.zq = ro ? hvp_alloc<T>(alloc, B * q) : nullptr;
  p.rzq = ro ? hvp_alloc<T>(alloc, B * K * q) : nullptr;
  p.gq = ro ? hvp_alloc<T>(alloc, B * q) : nullptr;
  p.rgq = ro ? hvp_alloc<T>(alloc, B * K * q) : nullptr;
  p.prq = ro ? hvp_alloc<T>(alloc, B * q) : nullptr;
  p.loss_out = loss_out;
  p.grad_w = grad_w;
  p.hvps = hvps;
  p.B_total = a.B;
  p.d = d;
  p.R = R;
  p.n = n;
  p.K = K;
  p.shortcut = a.shortcut;
  p.pre = a.pre;
  p.mid = a.mid;
  p.post = a.post;
  p.loss = loss;
  p.gn = gn;
  p.functional = matrix == HvpMatrix::Functional;
  p.fisher = matrix == HvpMatrix::EmpiricalFisher;
  const int64_t outs = n * (1 + K) * d * d;
  const unsigned red_blocks = unsigned((outs + kHvpThreads - 1) / kHvpThreads);
  cudaError_t err;
  for (const auto& [src, dst, mats] : {std::tuple<const T*, T*, int64_t>{weights, wt, R * n},
                                       std::tuple<const T*, T*, int64_t>{directions, vt, K * R * n}}) {
    const int64_t need = (mats * d * d + kHvpThreads - 1) / kHvpThreads;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(need, grid_stride_blocks_cap()));
    SE_LAUNCH(hvp_transpose_kernel<T>, dim3(unsigned(blocks)), dim3(kHvpThreads), 0, stream, src, dst, mats, d);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  for (int64_t b0 = 0; b0 < a.B; b0 += B) {  // row chunks, in order
    const int64_t rows = std::min(B, a.B - b0);
    p.B = rows;
    p.accumulate = b0 > 0;
    p.x = x + b0 * d;
    p.y = targets != nullptr ? targets + b0 * q : nullptr;  // [B, q] (q = d without a read-out)
    p.cls = classes != nullptr ? classes + b0 : nullptr;
    const unsigned tiles = unsigned((rows + kHvpTileRows - 1) / kHvpTileRows);
    SE_LAUNCH(hvp_forward_kernel<T>, dim3(tiles), dim3(kHvpThreads), 0, stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    SE_LAUNCH(hvp_loss_seed_kernel<T>, dim3(unsigned((rows + kHvpThreads - 1) / kHvpThreads)), dim3(kHvpThreads), 0,
              stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    SE_LAUNCH(hvp_loss_sum_kernel<T>, dim3(1), dim3(kHvpSumThreads), kHvpSumThreads * sizeof(double), stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    for (int64_t r = R - 1; r >= 0; --r) {
      SE_LAUNCH(hvp_reverse_unit_kernel<T>, dim3(tiles), dim3(kHvpThreads), 0, stream, p, r);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
      SE_LAUNCH(hvp_unit_reduce_kernel<T>, dim3(red_blocks), dim3(kHvpThreads), 0, stream, p, r);
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

int64_t hvp_bytes_per_row(const StackArgs& a, int64_t K, size_t itemsize, int64_t q, HvpMatrix matrix) {
  const bool gn = matrix == HvpMatrix::Ggn || matrix == HvpMatrix::EmpiricalFisher;
  const int64_t rho_units = gn ? 2 : a.R + 1;  // G keeps the tangents of two unit inputs only (rho_slot)
  return ((a.R + 1) * a.d + rho_units * K * a.d + (3 * a.n + 2) * (1 + K) * a.d + (3 + 2 * K) * q) *
             int64_t(itemsize) +
         int64_t(sizeof(double));
}

template cudaError_t launch_residual_stack_hvp<float>(const StackArgs&, int64_t, Loss, const float*, const float*,
                                                      const float*, const int64_t*, const float*, float*, float*,
                                                      float*, const Allocator&, cudaStream_t, int64_t, const float*,
                                                      int64_t, HvpMatrix);
template cudaError_t launch_residual_stack_hvp<double>(const StackArgs&, int64_t, Loss, const double*,
                                                       const double*, const double*, const int64_t*,
                                                       const double*, double*, double*, double*, const Allocator&,
                                                       cudaStream_t, int64_t, const double*, int64_t, HvpMatrix);

}  // namespace cuda
}  // namespace shortcut_ext
