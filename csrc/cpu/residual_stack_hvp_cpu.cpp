// Fused CPU Hessian-vector products of a residual stack: loss, gradient and K HVPs in one call.
//
// Pearlmutter's R-operator.  For a direction V (one [R, n, d, d] slice of `directions`) every
// quantity q of the forward and backward pass gets a tangent R{q} = d/dt q(weights + t V) at t = 0.
// Per unit (rows are samples, a layer maps a -> a @ W^T, s = activation):
//
//   forward           a_0 = s_pre(h)             z_l = a_l W_l^T      a_{l+1} = s_mid(z_l)
//                     h' = h + s_post(z_{n-1})   (h' = s_post(z_{n-1}) for a plain stack)
//   tangent forward   R{a_0} = s_pre'(h) R{h}    R{z_l} = R{a_l} W_l^T + a_l V_l^T
//                     R{a_{l+1}} = s_mid'(z_l) R{z_l}
//   backward          gz_{n-1} = g s_post'(z_{n-1})          grad W_l += gz_l^T a_l
//                     ga_l = gz_l W_l                        gz_{l-1} = ga_l s_mid'(z_{l-1})
//   tangent backward  R{gz_{n-1}} = R{g} s_post' + g s_post'' R{z_{n-1}}
//                     hvp_l += R{gz_l}^T a_l + gz_l^T R{a_l}
//                     R{ga_l} = R{gz_l} W_l + gz_l V_l
//                     R{gz_{l-1}} = R{ga_l} s_mid'(z_{l-1}) + ga_l s_mid''(z_{l-1}) R{z_{l-1}}
//
// and at the output f (m = B rows): mse  g = (f - y) / m, R{g} = R{f} / m; cross entropy with
// p = softmax(f) and c = sum_j y_j (1 for class indices)  g = (c p - y) / m,
// R{g} = c (diag(p) - p p^T) R{f} / m.  The input x and the targets are constants (R{x} = 0).  With a
// frozen read-out P [q, d] the loss is that of z = f P^T: the seeds above in z's q columns, then
// g = (dL/dz) P and R{g} = R{dL/dz} P, with R{z} = R{f} P^T (loss_seed_readout).
//
// The Hessian's two parts (residual_stack_hvp_part, matrix = "ggn" | "functional"), H = G + F.  The tangent
// backward is linear in two sources: the output seed R{g} = H_l R{f}, and g itself (gz^T R{a}, gz V and
// g s'' R{z}: the net's second derivatives).  The first alone, propagated like a gradient (R{gz} = R{g_out}
// s'(z), R{ga} = R{gz} W, G v_l += R{gz}^T a), is G V = J^T H_l J V (Net::gn); the second alone, with the seed
// R{g} set to zero, is F V.  G's reverse pass needs no tangents: it recomputes a segment's forward only and
// keeps no checkpoints of them, about (2 + 2K) + (2 + 2K) = 4 + 4K n d^2 multiply-adds per row and unit in all
// against 4 + 8K for H (K = 16: 68 against 132).  F costs what H does (not H + G).
// The empirical Fisher (matrix = "empirical_fisher"), (1/B) sum_i grad l_i grad l_i^T = J^T diag_i(e_i e_i^T / B) J
// with e_i = dl_i/df, is G's computation with the per-sample rank-one e_i e_i^T in place of the loss's Hessian
// H_l: the seed R{g}_i = B g_i (g_i . R{f}_i), g_i = e_i / B, read out or not (g and R{f} are f's).
//
// The K tangents of a tile are carried together, row-major as [m, K, d] (each sample's K tangent
// rows are adjacent).  That layout turns every K-fold product into one GEMM:
//   R{a} W^T:  [m*K, d] @ [d, d]            (the weight is shared by all directions)
//   a V^T:     [m, d] @ [d, K*d]            (the K directions of a layer side by side, `vin`)
//   gz V:      [m, d] @ [d, K*d]            (`vout`)
//   a^T R{gz}: [d, m] @ [m, K*d]  -> [d_in, K, d_out]    (only a, gz [m, d] are transposed, in cache)
//   gz^T R{a}: [d, m] @ [m, K*d]  -> [d_out, K, d_in]    both put in hvp [K, d_out, d_in] by the
//                                                        slot reduction.
//
// Schedule (as csrc/cpu/residual_stack_cpu.cpp): the batch is cut into row tiles, tiles are grouped
// into P <= num_threads slots, one at::parallel_for task per slot, no barrier per layer.
//   1. forward + tangent forward of every tile through all R units; the loss and its gradient and
//      R-derivative at the output seed g [B, d] and R{g} [B, K, d].  Unit inputs and their tangents
//      are checkpointed every C units only.
//   2. one reverse pass in chunks of U units (a multiple of C).  Per tile and per segment of C
//      units, the segment is recomputed from its checkpoint, storing each unit's inner activations
//      and tangents (a record), then walked backwards, adding weight-gradient and HVP terms into
//      the slot's chunk buffer; the slots are then reduced in a fixed order (deterministic for a
//      given number of threads).
//   Recomputing a segment costs one more forward + tangent forward, exactly what recomputing each
//   unit's inner activations from saved unit inputs would cost, so checkpointing saves memory at
//   no extra arithmetic: about (4 + 8K) n d^2 multiply-adds per row and unit in all.
//   Where every unit's record fits a budget (see hvp_store_records), pass 1 keeps them all instead
//   and pass 2 recomputes nothing: (3 + 6K) n d^2 multiply-adds, 25% fewer.  Measured at B = 512,
//   K = 1: 8% / 13% faster at d = 64 / 128; at d = 16 reading the records back costs more than
//   recomputing them (6.4 vs 5.5 ms at R = 128), so by default only stacks of d >= 32 keep them.
//
// Memory, elements (T = float or double), K directions, tile m rows, P slots:
//   checkpoints       (1 + K) * ceil(R / C) * B * d          (saving every unit: (1 + K) * R * B * d)
//   carried g, R{g}   (1 + K) * B * d
//   segment records   P * C * (1 + K) * (2n + 1) * m * d    (C ~ sqrt(R * tiles per slot / (2n+1)),
//                                                            bounded to 8 MB per slot while the
//                                                            checkpoints stay within 256 MB)
//   (or all records   R * (1 + K) * (2n + 1) * B * d, no checkpoints, within the store budget)
//   (a record is (n + 1) instead of (2n + 1) rows of (1 + K) * m * d where s_pre and s_mid are identities:
//   a layer's input is then h or the layer's z before it, used in place, not copied)
//   chunk buffers     P * U * n * (1 + 2K) * d^2             (U bounded to ~2M elements in all)
//   direction copies  2 * K * R * n * d^2, transposed weights R * n * d^2
// so the persistent cost per unit is (1 + K) * B * d / C + 3 * K * n * d^2 (+ the outputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
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


// Per-call constants of the kernel.
template <typename T>
struct Net {
  const T* w;     // [R, n, d_out, d_in]
  const T* wt;    // [R, n, d_in, d_out]
  const T* vin;   // [R, n, d_in, K, d_out]: vin[r, l, i, j, o] = V_j[r, l, o, i]
  const T* vout;  // [R, n, d_out, K, d_in]: vout[r, l, o, j, i] = V_j[r, l, o, i]
  int64_t R, n, d, K;
  bool shortcut;
  Acts acts;
  // Gauss-Newton products G V = J^T H_l J V instead of H V: the tangent backward keeps only the terms of
  // R{g} (the loss's curvature), none of g (the net's second derivatives, zero in G): no gz^T R{a}, gz V
  // nor g s''(z) R{z}, and the reverse pass needs no tangent forward.
  bool gn = false;
  // blocks of d*d per layer in a slot's chunk buffer: the gradient, then the K products' terms
  // R{gz}^T a and (not for G) gz^T R{a}
  int64_t blocks() const { return 1 + (gn ? 1 : 2) * K; }
};

// One unit's forward and tangent-forward values for a tile, as the reverse pass needs them.
// Sub-buffers are laid out for m_max rows; a tile of m <= m_max rows uses the first m of each.
template <typename T>
struct Record {
  T* hin;   // [m, d]      unit input
  T* rho;   // [m, K, d]   its tangents
  T* act;   // [n][m, d]   layer inputs a_l (none where Record::a passes h and z on: stored_inputs)
  T* z;     // [n][m, d]   layer outputs z_l (before activation)
  T* ract;  // [n][m, K, d]
  T* rz;    // [n][m, K, d]

  // Layers whose input has room of its own (act, ract): none where s_pre and s_mid are identities (see a()).
  static int64_t stored_inputs(int64_t n, const Acts& acts) {
    return acts.pre == Act::Identity && acts.mid == Act::Identity ? 0 : n;
  }
  static int64_t size(int64_t n, int64_t K, int64_t m_max, int64_t d, const Acts& acts) {
    return (n + stored_inputs(n, acts) + 1) * (1 + K) * m_max * d;
  }
  // Layer l's input a_l and its tangents.  Through an identity it is the value before it, not a copy:
  // a_0 = h (identity s_pre), a_l = z_{l-1} (identity s_mid); act / ract then hold nothing there.
  const T* a(int64_t l, const Acts& acts, int64_t s1) const {
    if (l == 0) return acts.pre == Act::Identity ? hin : act;
    return acts.mid == Act::Identity ? z + (l - 1) * s1 : act + l * s1;
  }
  const T* ra(int64_t l, const Acts& acts, int64_t sk) const {
    if (l == 0) return acts.pre == Act::Identity ? rho : ract;
    return acts.mid == Act::Identity ? rz + (l - 1) * sk : ract + l * sk;
  }
  static Record at(T* base, int64_t n, int64_t K, int64_t m_max, int64_t d, const Acts& acts) {
    const int64_t s1 = m_max * d, sk = K * s1, ni = stored_inputs(n, acts);
    Record r;
    r.hin = base;
    r.rho = r.hin + s1;
    r.act = r.rho + sk;
    r.z = r.act + ni * s1;
    r.ract = r.z + n * s1;
    r.rz = r.ract + ni * sk;
    return r;
  }
};

// d1 = s'(z), d2 = s''(z) (d2 may be null) of tanh or ssigmoid from s = s(z), a loop per activation so that
// each vectorises (one loop with the activation's switch inside ran element by element: as long as the
// vector tanh itself in a tanh net's k = 1 product).
template <typename T>
inline void tanh_derivs_from_s(Act a, const T* s, int64_t count, T* d1, T* d2) {
  if (a == Act::Tanh) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) d1[i] = T(1) - s[i] * s[i];
    if (d2) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) d2[i] = T(-2) * s[i] * (T(1) - s[i] * s[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) d1[i] = T(0.5) * (T(1) - s[i] * s[i]);
    if (d2) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) d2[i] = T(-0.5) * s[i] * (T(1) - s[i] * s[i]);
    }
  }
}

// d1 = s'(z), d2 = s''(z) (d2 may be null); s_out = s(z) (may be null).  Relu (and the identity)
// get their own loops so that they vectorise; relu'' = 0 and relu'(0) = 0, as autograd.  `s_known`
// (may be null): s(z), already computed (the forward's record keeps each layer's input s(z)); tanh and
// ssigmoid then take their derivatives from it, with no tanh computed again, to the same bits.
template <typename T>
inline void act_derivs(Act a, const T* z, int64_t count, T* s_out, T* d1, T* d2, const T* s_known = nullptr) {
  if (a == Act::Relu || a == Act::Identity) {
    const bool relu = a == Act::Relu;
    if (s_out) {
#pragma omp simd
      for (int64_t i = 0; i < count; ++i) s_out[i] = (relu && z[i] < T(0)) ? T(0) : z[i];  // NaN propagates
    }
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) d1[i] = (relu && z[i] <= T(0)) ? T(0) : T(1);
    if (d2) std::fill(d2, d2 + count, T(0));
    return;
  }
  if (s_known) {
    if (s_out && s_out != s_known) std::copy(s_known, s_known + count, s_out);
    tanh_derivs_from_s<T>(a, s_known, count, d1, d2);
    return;
  }
  // tanh, ssigmoid: s(z) by the vector tanh, into s_out or a chunk at a time
  if (s_out) {
    tanh_scaled(z, s_out, count, T(tanh_scale(a)));
    tanh_derivs_from_s<T>(a, s_out, count, d1, d2);
    return;
  }
  for_tanh_chunks(z, count, T(tanh_scale(a)), [&](int64_t i0, const T* s, int64_t len) {
    tanh_derivs_from_s<T>(a, s, len, d1 + i0, d2 ? d2 + i0 : nullptr);
  });
}

// Whether s'' is not identically zero (tanh, ssigmoid): otherwise the curvature terms
// g s''(z) R{z} of the tangent backward vanish and are skipped.
inline bool has_curvature(Act a) { return a == Act::Tanh || a == Act::SSigmoid; }

// One row of rows_mul: o[c] = (accumulate ? o[c] : 0) + (select ? (f[c] != 0 ? t[c] : 0) : t[c] * f[c]).
template <typename T>
inline void row_mul(T* o, const T* t, const T* f, int64_t d, bool accumulate, bool select) {
#if defined(__AVX512F__)
  // in vectors of 16 floats (8 doubles), the row's tail masked: the compilers' loops finished d % 16 values
  // one by one, a fifth of a d = 20 HVP's time (d = 17..23 ran at 110-128 GFLOP/s, d = 24 at 184)
  if (std::is_same<T, float>::value) {
    float* of = reinterpret_cast<float*>(o);
    const float* tf = reinterpret_cast<const float*>(t);
    const float* ff = reinterpret_cast<const float*>(f);
    for (int64_t c = 0; c < d; c += 16) {
      const __mmask16 k = d - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (d - c)) - 1u);
      const __m512 tv = _mm512_maskz_loadu_ps(k, tf + c), fv = _mm512_maskz_loadu_ps(k, ff + c);
      __m512 r;
      if (select) {
        r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(fv, _mm512_setzero_ps(), _CMP_NEQ_UQ), tv);
        if (accumulate) r = _mm512_add_ps(_mm512_maskz_loadu_ps(k, of + c), r);
      } else {
        r = accumulate ? _mm512_fmadd_ps(tv, fv, _mm512_maskz_loadu_ps(k, of + c)) : _mm512_mul_ps(tv, fv);
      }
      _mm512_mask_storeu_ps(of + c, k, r);
    }
    return;
  }
  if (std::is_same<T, double>::value) {
    double* od = reinterpret_cast<double*>(o);
    const double* td = reinterpret_cast<const double*>(t);
    const double* fd = reinterpret_cast<const double*>(f);
    for (int64_t c = 0; c < d; c += 8) {
      const __mmask8 k = d - c >= 8 ? __mmask8(0xFF) : __mmask8((1u << (d - c)) - 1u);
      const __m512d tv = _mm512_maskz_loadu_pd(k, td + c), fv = _mm512_maskz_loadu_pd(k, fd + c);
      __m512d r;
      if (select) {
        r = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(fv, _mm512_setzero_pd(), _CMP_NEQ_UQ), tv);
        if (accumulate) r = _mm512_add_pd(_mm512_maskz_loadu_pd(k, od + c), r);
      } else {
        r = accumulate ? _mm512_fmadd_pd(tv, fv, _mm512_maskz_loadu_pd(k, od + c)) : _mm512_mul_pd(tv, fv);
      }
      _mm512_mask_storeu_pd(od + c, k, r);
    }
    return;
  }
#elif defined(SHORTCUT_EXT_AVX2_KERNELS)
  // AVX2 builds the same way: 8 floats (4 doubles) a vector, the tail by maskload / maskstore
  using X = Avx2Vec<T>;
  constexpr int64_t L = X::kLanes;
  for (int64_t c = 0; c < d; c += L) {
    const bool full = d - c >= L;
    const __m256i k = X::mask(d - c);
    const auto tv = full ? X::load(t + c) : X::load(t + c, k);
    const auto fv = full ? X::load(f + c) : X::load(f + c, k);
    decltype(X::zero()) r;
    if (select) {
      r = X::select_nonzero(fv, tv);
      if (accumulate) r = X::add(full ? X::load(o + c) : X::load(o + c, k), r);
    } else {
      r = accumulate ? X::fmadd(tv, fv, full ? X::load(o + c) : X::load(o + c, k)) : X::mul(tv, fv);
    }
    if (full)
      X::store(o + c, r);
    else
      X::store(o + c, k, r);
  }
  return;
#endif
  for (int64_t c = 0; c < d; ++c) {
    const T v = select ? (f[c] != T(0) ? t[c] : T(0)) : t[c] * f[c];
    o[c] = accumulate ? o[c] + v : v;
  }
}

// out[i, j, c] = (accumulate ? out : 0) + t[i, j, c] * f[i, c]   (t, out: [m, K, d]; f: [m, d]).
// `select`: f is a ReLU derivative (0 or 1): pick, as autograd's threshold_backward does.
template <typename T>
inline void rows_mul(T* out, const T* t, const T* f, int64_t m, int64_t K, int64_t d, bool accumulate,
                     bool select = false) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < K; ++j)
      row_mul(out + (i * K + j) * d, t + (i * K + j) * d, f + i * d, d, accumulate, select);
}

// x * s'(z) for an activation's derivative d1: a select for ReLU (0 where inactive, even for a NaN or
// inf x, as autograd's threshold_backward), a product otherwise (0 * NaN = NaN, as autograd's tanh).
template <typename T>
inline T times_deriv(T x, T d1, bool relu) {
  return relu ? (d1 != T(0) ? x : T(0)) : x * d1;
}

// Forward and tangent forward of unit r for a tile of m rows.  Reads rec.hin, rec.rho; fills the
// rest of `rec`; writes the unit output and its tangents to h_out, rho_out when they are not null
// (they may alias rec.hin, rec.rho).  `d1` is [m_max, d] scratch.  tangents=false: the forward alone
// (rec's tangents and rho_out are left untouched; the Gauss-Newton reverse pass needs none).
template <typename T>
void unit_forward(const Net<T>& net, int64_t r, int64_t m, int64_t m_max, const Record<T>& rec, T* h_out, T* rho_out,
                  T* d1, bool tangents = true) {
  const int64_t n = net.n, d = net.d, K = net.K, dd = d * d;
  const int64_t md = m * d, s1 = m_max * d, sk = K * s1;
  const Acts& acts = net.acts;
  // layer 0 input (an identity's is h itself: Record::a)
  if (acts.pre != Act::Identity) {
    act_derivs<T>(acts.pre, rec.hin, md, rec.act, d1, nullptr);
    if (tangents) rows_mul<T>(rec.ract, rec.rho, d1, m, K, d, false, acts.pre == Act::Relu);
  }
  for (int64_t l = 0; l < n; ++l) {
    const T* a = rec.a(l, acts, s1);
    const T* ra = rec.ra(l, acts, sk);
    T* z = rec.z + l * s1;
    T* rz = rec.rz + l * sk;
    const T* wt = net.wt + (r * n + l) * dd;
    gemm_nn<T>(m, d, d, a, d, wt, d, z, d, false);
    if (tangents) {
      gemm_nn<T>(m * K, d, d, ra, d, wt, d, rz, d, false);
      gemm_nn<T>(m, K * d, d, a, d, net.vin + (r * n + l) * K * dd, K * d, rz, K * d, true);
    }
    if (l < n - 1 && acts.mid != Act::Identity) {  // an identity's output is z itself (Record::a)
      T* a_next = rec.act + (l + 1) * s1;
      T* ra_next = rec.ract + (l + 1) * sk;
      act_derivs<T>(acts.mid, z, md, a_next, d1, nullptr);
      if (tangents) rows_mul<T>(ra_next, rz, d1, m, K, d, false, acts.mid == Act::Relu);
    }
  }
  if (!h_out) return;
  const T* z = rec.z + (n - 1) * s1;
  const T* rz = rec.rz + (n - 1) * sk;
  if (acts.post == Act::Identity) {
    if (net.shortcut) {
#pragma omp simd
      for (int64_t i = 0; i < md; ++i) h_out[i] = rec.hin[i] + z[i];
      if (tangents) {
#pragma omp simd
        for (int64_t i = 0; i < K * md; ++i) rho_out[i] = rec.rho[i] + rz[i];
      }
    } else {
      std::copy(z, z + md, h_out);
      if (tangents) std::copy(rz, rz + K * md, rho_out);
    }
    return;
  }
  // d1 = s_post'(z); the branch output goes through h_out directly (elementwise, so aliasing is safe)
  const auto post = [&](int64_t i, T s) {
    d1[i] = act_deriv<T>(acts.post, z[i], s);
    h_out[i] = net.shortcut ? rec.hin[i] + s : s;
  };
  if (has_curvature(acts.post)) {  // tanh, ssigmoid: the vector tanh, and loops that vectorise
    const bool shortcut = net.shortcut;
    const T* hin = rec.hin;
    for_tanh_chunks(z, md, T(tanh_scale(acts.post)), [&](int64_t i0, const T* s, int64_t len) {
      tanh_derivs_from_s<T>(acts.post, s, len, d1 + i0, nullptr);
      T* ho = h_out + i0;
      if (shortcut) {
        const T* hi = hin + i0;
#pragma omp simd
        for (int64_t j = 0; j < len; ++j) ho[j] = hi[j] + s[j];
      } else {
        std::copy(s, s + len, ho);
      }
    });
  } else {
    for (int64_t i = 0; i < md; ++i) post(i, act_apply<T>(acts.post, z[i]));
  }
  if (!tangents) return;
  if (net.shortcut) {
    if (rho_out != rec.rho) std::copy(rec.rho, rec.rho + K * md, rho_out);
    rows_mul<T>(rho_out, rz, d1, m, K, d, true, acts.post == Act::Relu);
  } else {
    rows_mul<T>(rho_out, rz, d1, m, K, d, false, acts.post == Act::Relu);
  }
}

// Working buffers of the reverse pass, [m_max, d] or [m_max, K, d] each.
template <typename T>
struct RevScratch {
  T *gz, *ga, *rgz, *rga, *d1, *d2, *t, *tscratch;
};

// Back through an activation s applied to z (tangents rz): gout = gin s'(z) and
// R{gout} = R{gin} s'(z) + gin s''(z) R{z}, the second term only where s'' is not identically zero.
template <typename T>
void through_act(Act a, const T* z, const T* rz, const T* gin, const T* rgin, T* gout, T* rgout, int64_t m, int64_t K,
                 int64_t d, const RevScratch<T>& ws, bool second_order, const T* s_known = nullptr) {
  const int64_t md = m * d;
  const bool curv = second_order && has_curvature(a);
  act_derivs<T>(a, z, md, nullptr, ws.d1, curv ? ws.d2 : nullptr, s_known);
  const bool relu = a == Act::Relu;
#pragma omp simd
  for (int64_t i = 0; i < md; ++i) gout[i] = times_deriv(gin[i], ws.d1[i], relu);
  rows_mul<T>(rgout, rgin, ws.d1, m, K, d, false, relu);
  if (curv) {
    for (int64_t i = 0; i < md; ++i) ws.t[i] = gin[i] * ws.d2[i];
    rows_mul<T>(rgout, rz, ws.t, m, K, d, true);
  }
}

// Reverse (backward + tangent backward) through unit r for one tile.  `g` [m, d] and `rg`
// [m, K, d] hold dL/d(unit output) and its tangents on entry, dL/d(unit input) and its tangents on
// exit.  Adds to `dw` = the slot buffer of unit r, per layer: the gradient [d_out, d_in], then the
// two HVP terms as [d_in][K][d_out] (R{gz}_j^T a) and [d_out][K][d_in] (gz^T R{a}_j): written
// (the slot's first tile) or added to (`accumulate`).
template <typename T>
void unit_reverse(const Net<T>& net, int64_t r, int64_t m, int64_t m_max, const Record<T>& rec, T* g, T* rg, T* dw,
                  bool accumulate, const RevScratch<T>& ws, const Prefetch& next) {
  const int64_t n = net.n, d = net.d, K = net.K, dd = d * d;
  const int64_t md = m * d, s1 = m_max * d, sk = K * s1;
  const Acts& acts = net.acts;
  // gz, R{gz} (the layer's output gradient and tangents) and ga, R{ga} (what it passes down) live in two
  // buffer pairs taken in turn, so that an identity hands its input on as a pointer, not a copy: g itself
  // at the top, a layer's ga below it.
  T* const bufs[2] = {ws.gz, ws.ga};
  T* const rbufs[2] = {ws.rgz, ws.rga};
  int64_t free_buf = 0;  // the pair the next ga, R{ga} go to; gz is never in it
  const T* gz = g;
  const T* rgz = rg;
  T* ga = nullptr;
  T* rga = nullptr;
  // seed: gz = g s_post'(z), R{gz} = R{g} s_post'(z) + g s_post''(z) R{z}
  if (acts.post != Act::Identity) {
    const T* z = rec.z + (n - 1) * s1;
    const T* rz = rec.rz + (n - 1) * sk;
    through_act<T>(acts.post, z, rz, g, rg, bufs[1], rbufs[1], m, K, d, ws, !net.gn);
    gz = bufs[1];
    rgz = rbufs[1];
  }
  for (int64_t l = n - 1; l >= 0; --l) {
    const T* a = rec.a(l, acts, s1);
    const T* ra = rec.ra(l, acts, sk);
    ga = bufs[free_buf];
    rga = rbufs[free_buf];
    T* out = dw + l * net.blocks() * dd;
    // C = A^T B over the tile: only a and gz ([m, d]) get transposed (in gemm_tn; not at all by the
    // d = 16, K = 1 register kernel), never the K-fold tangents ([m, K, d])
    // (each requests its share of the next unit's record: `next`)
    gemm_tn<T>(d, d, m, gz, d, a, d, out, d, accumulate, ws.tscratch, next);                     // grad: gz^T a
    gemm_tn<T>(d, K * d, m, a, d, rgz, K * d, out + dd, K * d, accumulate, ws.tscratch, next);  // [i][j][o] = (R{gz}_j^T a)[o, i]
    if (!net.gn)
      gemm_tn<T>(d, K * d, m, gz, d, ra, K * d, out + (1 + K) * dd, K * d, accumulate, ws.tscratch, next);  // [o][j][i]
    const T* w = net.w + (r * n + l) * dd;
    gemm_nn<T>(m, d, d, gz, d, w, d, ga, d, false);
    gemm_nn<T>(m * K, d, d, rgz, d, w, d, rga, d, false);
    if (!net.gn) gemm_nn<T>(m, K * d, d, gz, d, net.vout + (r * n + l) * K * dd, K * d, rga, K * d, true);
    if (l > 0) {
      if (acts.mid == Act::Identity) {  // the next layer's gz is this ga: the other pair takes its ga
        gz = ga;
        rgz = rga;
        free_buf = 1 - free_buf;
      } else {  // into the other pair (the old gz, done with); the next ga reuses this one
        // s_mid(z_{l-1}) is layer l's input, kept in the record
        through_act<T>(acts.mid, rec.z + (l - 1) * s1, rec.rz + (l - 1) * sk, ga, rga, bufs[1 - free_buf],
                       rbufs[1 - free_buf], m, K, d, ws, !net.gn, rec.act + l * s1);
        gz = bufs[1 - free_buf];
        rgz = rbufs[1 - free_buf];
      }
    }
  }
  // through s_pre and the shortcut: ga, R{ga} are dL/da_0 and its tangents
  if (acts.pre == Act::Identity) {
    if (net.shortcut) {
      for (int64_t i = 0; i < md; ++i) g[i] += ga[i];
      for (int64_t i = 0; i < K * md; ++i) rg[i] += rga[i];
    } else {
      std::copy(ga, ga + md, g);
      std::copy(rga, rga + K * md, rg);
    }
    return;
  }
  const bool curv = !net.gn && has_curvature(acts.pre);
  act_derivs<T>(acts.pre, rec.hin, md, nullptr, ws.d1, curv ? ws.d2 : nullptr, rec.act);  // rec.act: s_pre(h)
  const bool relu = acts.pre == Act::Relu;
  for (int64_t i = 0; i < md; ++i) {
    const T gi = times_deriv(ga[i], ws.d1[i], relu);
    g[i] = net.shortcut ? g[i] + gi : gi;
  }
  rows_mul<T>(rg, rga, ws.d1, m, K, d, net.shortcut, relu);
  if (curv) {
    for (int64_t i = 0; i < md; ++i) ws.t[i] = ga[i] * ws.d2[i];
    rows_mul<T>(rg, rec.rho, ws.t, m, K, d, true);
  }
}

// Loss of one tile (returned, summed over its rows, not yet divided by B) and the seeds
// g = dL/df [m, d], rg = R{dL/df} [m, K, d], from the output f [m, d] and its tangents rf [m, K, d].
template <typename T>
double loss_seed(Loss loss, const T* f, const T* rf, const T* y, const int64_t* cls, int64_t m, int64_t K, int64_t d,
                 double inv_b, T* g, T* rg, T* p) {
  double total = 0.0;
  const T ib = static_cast<T>(inv_b);
  if (loss == Loss::Mse) {
    for (int64_t i = 0; i < m * d; ++i) {
      const T diff = f[i] - y[i];
      total += 0.5 * static_cast<double>(diff) * static_cast<double>(diff);
      g[i] = diff * ib;
    }
    for (int64_t i = 0; i < m * K * d; ++i) rg[i] = rf[i] * ib;
    return total;
  }
  for (int64_t i = 0; i < m; ++i) {
    const T* fi = f + i * d;
    T mx = fi[0];
    for (int64_t c = 1; c < d; ++c) mx = std::max(mx, fi[c]);
    T se = 0;
    for (int64_t c = 0; c < d; ++c) {
      p[c] = std::exp(fi[c] - mx);
      se += p[c];
    }
    for (int64_t c = 0; c < d; ++c) p[c] /= se;
    // the loss from the shifted logits f - mx, as log_softmax: mx + log(se) would round log(se) away
    // against a large mx before f_t were subtracted (the loss of logits [1e7, 1e7, 0] came out 1, not log 2)
    const double lse = std::log(static_cast<double>(se));
    T mass;  // sum_c y_c
    T* gi = g + i * d;
    if (cls) {
      const int64_t t = cls[i];
      mass = T(1);
      total += lse - (static_cast<double>(fi[t]) - static_cast<double>(mx));
      for (int64_t c = 0; c < d; ++c) gi[c] = p[c] * ib;
      gi[t] -= ib;
    } else {
      const T* yi = y + i * d;
      mass = 0;
      double yf = 0.0;
      for (int64_t c = 0; c < d; ++c) {
        mass += yi[c];
        yf += static_cast<double>(yi[c]) * (static_cast<double>(fi[c]) - static_cast<double>(mx));
      }
      total += static_cast<double>(mass) * lse - yf;
      for (int64_t c = 0; c < d; ++c) gi[c] = (mass * p[c] - yi[c]) * ib;
    }
    const T scale = mass * ib;
    for (int64_t j = 0; j < K; ++j) {
      const T* rfi = rf + (i * K + j) * d;
      T* rgi = rg + (i * K + j) * d;
      T pr = 0;
      for (int64_t c = 0; c < d; ++c) pr += p[c] * rfi[c];
      for (int64_t c = 0; c < d; ++c) rgi[c] = scale * p[c] * (rfi[c] - pr);
    }
  }
  return total;
}

// The seeds through a frozen read-out P [q, d]: the loss is that of z = f P^T [m, q] (tangents R{z} =
// R{f} P^T), so loss_seed gives dL/dz and R{dL/dz} in q columns, and g = (dL/dz) P, rg = R{dL/dz} P.
// `work` holds (2 + 2K) m q + q elements.  Plain loops: per tile they cost 2 (1 + K) m q d multiply-adds,
// against (4 + 8K) n d^2 m for each of the R units.
template <typename T>
double loss_seed_readout(Loss loss, const T* P, int64_t q, const T* f, const T* rf, const T* y, const int64_t* cls,
                         int64_t m, int64_t K, int64_t d, double inv_b, T* g, T* rg, T* work) {
  T* z = work;            // [m, q]
  T* rz = z + m * q;      // [m, K, q]
  T* gz = rz + m * K * q;  // [m, q]
  T* rgz = gz + m * q;    // [m, K, q]
  T* p = rgz + m * K * q;  // [q]
  const auto times_pt = [&](const T* a, int64_t rows, T* out) {  // out [rows, q] = a [rows, d] P^T
    for (int64_t i = 0; i < rows; ++i) {
      const T* ai = a + i * d;
      for (int64_t c = 0; c < q; ++c) {
        const T* pc = P + c * d;
        T acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t k = 0; k < d; ++k) acc += ai[k] * pc[k];
        out[i * q + c] = acc;
      }
    }
  };
  const auto times_p = [&](const T* a, int64_t rows, T* out) {  // out [rows, d] = a [rows, q] P
    for (int64_t i = 0; i < rows; ++i) {
      T* oi = out + i * d;
      std::fill(oi, oi + d, T(0));
      for (int64_t c = 0; c < q; ++c) {
        const T aic = a[i * q + c];
        const T* pc = P + c * d;
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) oi[k] += aic * pc[k];
      }
    }
  };
  times_pt(f, m, z);
  times_pt(rf, m * K, rz);
  const double total = loss_seed<T>(loss, z, rz, y, cls, m, K, q, inv_b, gz, rgz, p);
  times_p(gz, m, g);
  times_p(rgz, m * K, rg);
  return total;
}

// vin[r, l, i, j, o] = vout[r, l, o, j, i] = V_j[r, l, o, i] for directions V [K, R, n, d, d]: the K
// directions of a layer side by side, as the K-fold GEMMs read them.  From the buffer cache (a fresh
// K-fold copy of the weights on every call paid its page faults: ~5% of a call at d = 64, K = 16),
// one (unit, layer) a task, each d x d block read once and transposed in 16 x 16 blocks.
template <typename T>
void interleave_directions(const at::Tensor& directions, at::Tensor& vin, at::Tensor& vout) {
  const int64_t K = directions.size(0), R = directions.size(1), n = directions.size(2), d = directions.size(3);
  const int64_t dd = d * d, mats = R * n;
  vin = pooled_empty({R, n, d, K, d}, directions.options());
  vout = pooled_empty({R, n, d, K, d}, directions.options());
  const T* src = directions.data_ptr<T>();
  T* in_p = vin.data_ptr<T>();
  T* out_p = vout.data_ptr<T>();
  constexpr int64_t blk = 16;
  at::parallel_for(0, mats, std::max<int64_t>(1, 65536 / (K * dd)), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      T* vi = in_p + q * K * dd;
      T* vo = out_p + q * K * dd;
      for (int64_t j = 0; j < K; ++j) {
        const T* v = src + (j * mats + q) * dd;  // V_j[r, l] as [o, i]
        for (int64_t o = 0; o < d; ++o) std::copy(v + o * d, v + (o + 1) * d, vo + (o * K + j) * d);
        for (int64_t o0 = 0; o0 < d; o0 += blk)
          for (int64_t i0 = 0; i0 < d; i0 += blk)
            for (int64_t o = o0; o < std::min(d, o0 + blk); ++o)
              for (int64_t i = i0; i < std::min(d, i0 + blk); ++i) vi[(i * K + j) * d + o] = v[o * d + i];
      }
    }
  });
}

// Segment records of one slot, bytes: two slots' segments and the directions they read stay in a 32 MB L3.
// Each slot recomputes a segment of C units (writing their records), then walks it backwards (reading them);
// a segment larger than the slot's share of the cache goes to memory and back.  4M elements a slot (the
// bound until 2026-12) was 32 MB in float64: d = 16, R = 1000, B = 512, K = 16 took 58.7 ms per product,
// 31.1 ms with 8 MB; float32 K = 16 18.0 -> 15.6 ms; d = 64 and 128 within noise (2-core AMD EPYC).
constexpr int64_t kSegmentBytes = int64_t(8) << 20;
// Checkpoints (unit inputs and tangents every C units) in all, bytes, before kSegmentBytes gives way.
constexpr int64_t kCheckpointBytes = int64_t(256) << 20;

// Whether the HVP kernel keeps every unit's record (`mb` megabytes) instead of checkpointing and
// recomputing.  SHORTCUT_EXT_HVP_STORE_MB unset: for d >= 32 within 256 MB; set: whenever they fit
// in that many MB (0: never).
bool hvp_store_records(double mb, int64_t d) {
  const char* env = std::getenv("SHORTCUT_EXT_HVP_STORE_MB");
  if (!env || !*env) return d >= 32 && mb <= 256.0;
  char* end = nullptr;
  const double budget = std::strtod(env, &end);
  TORCH_CHECK_VALUE(end && *end == '\0' && budget >= 0, "SHORTCUT_EXT_HVP_STORE_MB must be a number of megabytes >= 0 ",
                    "(0 always checkpoints and recomputes), got '", env, "'");
  return mb <= budget;
}

template <typename T>
void hvp_impl(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& targets, const at::Tensor& directions,
              bool shortcut, Acts acts, Loss loss, const c10::optional<at::Tensor>& readout, bool gn, bool functional,
              bool fisher, at::Tensor& loss_out, at::Tensor& grad_w, at::Tensor& hvps) {
  const int64_t B = x.size(0), d = x.size(1), R = weights.size(0), n = weights.size(1), K = directions.size(0);
  const int64_t dd = d * d;
  const at::Tensor wt = transpose_weights<T>(weights);  // [R, n, d_in, d_out]
  at::Tensor vin, vout;                                  // [R, n, d_in, K, d_out], [R, n, d_out, K, d_in]
  interleave_directions<T>(directions, vin, vout);
  const Net<T> net{weights.data_ptr<T>(), wt.data_ptr<T>(), vin.data_ptr<T>(), vout.data_ptr<T>(),
                   R, n, d, K, shortcut, acts, gn};
  const T* x_p = x.data_ptr<T>();
  const bool by_class = targets.dim() == 1;
  const T* y_p = by_class ? nullptr : targets.data_ptr<T>();
  const int64_t* cls_p = by_class ? targets.data_ptr<int64_t>() : nullptr;
  const T* ro_p = readout.has_value() ? readout->data_ptr<T>() : nullptr;  // P [q, d] (contiguous)
  const int64_t q = readout.has_value() ? readout->size(0) : d;             // the loss's columns

  // schedule (cpu_hvp_schedule): slots of equal tiles, a tile's record of one unit up to ~2^19 elements
  const CpuSchedule sch = cpu_hvp_schedule(B, d, R, n, K);
  const int64_t m_max = sch.tile_rows, tiles = sch.tiles, slots = sch.slots;
  const int64_t tiles_per_slot = (tiles + slots - 1) / slots;
  const int64_t rec_size = Record<T>::size(n, K, m_max, d, acts);
  // units per chunk of slot buffers (~2M elements in all: they stay in cache, and a chunk costs one
  // fork/join), segment length C <= U0
  const int64_t per_unit = n * net.blocks() * dd;
  const int64_t U0 = std::max<int64_t>(1, (int64_t(1) << 21) / (slots * per_unit));
  int64_t C = static_cast<int64_t>(std::ceil(std::sqrt(double(R) * double(tiles_per_slot) / double(2 * n + 1))));
  // A slot's segment of records within kSegmentBytes, so that it is read back from the caches, unless its
  // checkpoints would then pass kCheckpointBytes in all (many directions: C is then as small as they allow).
  const double rec_bytes = double(rec_size) * double(sizeof(T));
  const int64_t C_cache = std::max<int64_t>(1, static_cast<int64_t>(double(kSegmentBytes) / rec_bytes));
  const int64_t C_mem = static_cast<int64_t>(
      std::ceil(double(R) * double((1 + K) * B * d) * double(sizeof(T)) / double(kCheckpointBytes)));
  C = std::max<int64_t>(1, std::min({C, R, U0, std::max(C_cache, C_mem)}));
  const int64_t nseg = (R + C - 1) / C;
  const int64_t seg_per_chunk = std::max<int64_t>(1, std::min(U0 / C, nseg));
  const int64_t U = seg_per_chunk * C;
  // every unit's record of every tile kept from pass 1 (no recompute), where it fits the budget
  const double store_mb = double(tiles) * double(R) * double(rec_size) * double(sizeof(T)) / double(1 << 20);
  const bool store_all = hvp_store_records(store_mb, d);

  const auto opts = x.options();
  at::Tensor ck_h = pooled_empty({store_all ? 0 : nseg, B, d}, opts);       // unit inputs at r = s * C
  // and their tangents (not for G: its reverse pass recomputes no tangents)
  at::Tensor ck_rho = pooled_empty({store_all || gn ? 0 : nseg, B, K, d}, opts);
  at::Tensor records = pooled_empty({store_all ? tiles * R * rec_size : 0}, opts);  // [tiles, R] records
  T* rec_p = records.data_ptr<T>();
  at::Tensor g_all = at::empty({B, d}, opts);            // carried dL/dh per row
  at::Tensor rg_all = at::empty({B, K, d}, opts);        // and its tangents
  T* ckh_p = ck_h.data_ptr<T>();
  T* ckr_p = ck_rho.data_ptr<T>();
  T* g_p = g_all.data_ptr<T>();
  T* rg_p = rg_all.data_ptr<T>();
  std::vector<double> tile_loss(tiles, 0.0);
  const double inv_b = 1.0 / double(B);

  // ---- 1. forward + tangent forward, checkpoints, loss seeds
  // per-slot scratch from the buffer cache, warm and uninitialised (a fresh zeroed vector per call and, in
  // pass 2, per chunk, cost page faults and the zeroing: ~5% of a call at d = 16, K = 8)
  const int64_t head_scratch = ro_p ? (2 + 2 * K) * m_max * q + q : 0;  // loss_seed_readout's work
  const int64_t fwd_scratch = rec_size + 2 * m_max * d + head_scratch;
  at::Tensor fwd_buf = pooled_empty({slots, fwd_scratch}, opts);
  for_each_slot(slots, [&](int64_t s0, int64_t s1) {
    const int64_t S1 = m_max * d;
    T* scratch = fwd_buf.data_ptr<T>() + s0 * fwd_scratch;  // the task's first slot: one buffer per task
    const Record<T> rec = Record<T>::at(scratch, n, K, m_max, d, acts);
    T* d1 = scratch + rec_size;
    T* p = d1 + S1;
    T* head = p + S1;
    for (int64_t s = s0; s < s1; ++s) {
      for (int64_t t = s * tiles / slots; t < (s + 1) * tiles / slots; ++t) {
        const int64_t row0 = t * m_max, m = std::min(m_max, B - row0);
        if (store_all) {  // record r + 1 takes unit r's output; the last output goes to `rec`
          const Record<T> first = Record<T>::at(rec_p + t * R * rec_size, n, K, m_max, d, acts);
          std::copy(x_p + row0 * d, x_p + (row0 + m) * d, first.hin);
          std::fill(first.rho, first.rho + m * K * d, T(0));
          for (int64_t r = 0; r < R; ++r) {
            const Record<T> cur = Record<T>::at(rec_p + (t * R + r) * rec_size, n, K, m_max, d, acts);
            const Record<T> out = r + 1 < R ? Record<T>::at(rec_p + (t * R + r + 1) * rec_size, n, K, m_max, d, acts) : rec;
            unit_forward<T>(net, r, m, m_max, cur, out.hin, out.rho, d1);
          }
        } else {
          std::copy(x_p + row0 * d, x_p + (row0 + m) * d, rec.hin);
          std::fill(rec.rho, rec.rho + m * K * d, T(0));
          for (int64_t r = 0; r < R; ++r) {
            if (r % C == 0) {
              std::copy(rec.hin, rec.hin + m * d, ckh_p + ((r / C) * B + row0) * d);
              if (!gn) std::copy(rec.rho, rec.rho + m * K * d, ckr_p + ((r / C) * B + row0) * K * d);
            }
            unit_forward<T>(net, r, m, m_max, rec, rec.hin, rec.rho, d1);
          }
        }
        tile_loss[t] = ro_p ? loss_seed_readout<T>(loss, ro_p, q, rec.hin, rec.rho, y_p ? y_p + row0 * q : nullptr,
                                                   cls_p ? cls_p + row0 : nullptr, m, K, d, inv_b, g_p + row0 * d,
                                                   rg_p + row0 * K * d, head)
                            : loss_seed<T>(loss, rec.hin, rec.rho, y_p ? y_p + row0 * d : nullptr,
                                           cls_p ? cls_p + row0 : nullptr, m, K, d, inv_b, g_p + row0 * d,
                                           rg_p + row0 * K * d, p);
        if (functional) std::fill(rg_p + row0 * K * d, rg_p + (row0 + m) * K * d, T(0));  // F: g's terms alone
        if (fisher) {  // R{g}_i = B g_i (g_i . R{f}_i): the sample's gradient outer product, not H_l
          for (int64_t i = 0; i < m; ++i) {
            const T* gi = g_p + (row0 + i) * d;
            for (int64_t j = 0; j < K; ++j) {
              const T* rfi = rec.rho + (i * K + j) * d;
              T* rgi = rg_p + ((row0 + i) * K + j) * d;
              T dot = 0;
              for (int64_t c = 0; c < d; ++c) dot += gi[c] * rfi[c];
              dot *= T(B);
              for (int64_t c = 0; c < d; ++c) rgi[c] = dot * gi[c];
            }
          }
        }
      }
    }
    gemm_release();
  });
  double total = 0.0;
  for (double v : tile_loss) total += v;
  loss_out.fill_(static_cast<T>(total * inv_b));

  // ---- 2. reverse pass in chunks of whole segments
  T* gw_p = grad_w.data_ptr<T>();
  T* hv_p = hvps.data_ptr<T>();
  at::Tensor partial_buf = pooled_empty({slots * U * per_unit}, opts);  // never zeroed: first tiles write
  T* const partial = partial_buf.data_ptr<T>();
  const int64_t rev_scratch = (store_all ? 0 : C * rec_size) + 5 * m_max * d + 3 * K * m_max * d;
  at::Tensor rev_buf = pooled_empty({slots, rev_scratch}, opts);
  // Where every record was kept (store_all), the reverse pass reads each from memory: its weight-gradient
  // GEMMs request the next unit's record meanwhile (see Prefetch), where a record fits well within L2 (at
  // most 256 KB: K = 1, d up to 32).  A segment's records were just recomputed and come from the caches:
  // requesting them, or the next weights, measured no faster there (float64 d = 16: 5% slower).
  const bool prefetch_records = store_all && rec_size * int64_t(sizeof(T)) <= (int64_t(256) << 10);
  for (int64_t s_hi = nseg; s_hi > 0; s_hi -= seg_per_chunk) {
    const int64_t s_lo = std::max<int64_t>(0, s_hi - seg_per_chunk);
    const int64_t r_lo = s_lo * C, r_hi = std::min(R, s_hi * C);
    for_each_slot(slots, [&](int64_t s0, int64_t s1) {
      const int64_t S1 = m_max * d, SK = K * S1;
      const int64_t seg_records = store_all ? 0 : C * rec_size;
      T* const seg_buf = rev_buf.data_ptr<T>() + s0 * rev_scratch;  // segment records, then the work buffers
      T* base = seg_buf + seg_records;
      RevScratch<T> ws;
      ws.gz = base;
      ws.ga = ws.gz + S1;
      ws.d1 = ws.ga + S1;
      ws.d2 = ws.d1 + S1;
      ws.t = ws.d2 + S1;
      ws.rgz = ws.t + S1;
      ws.rga = ws.rgz + SK;
      ws.tscratch = ws.rga + SK;
      for (int64_t s = s0; s < s1; ++s) {
        T* dw = partial + s * U * per_unit;  // the slot's first tile writes it, the others add
        const int64_t first_tile = s * tiles / slots;
        for (int64_t t = first_tile; t < (s + 1) * tiles / slots; ++t) {
          const int64_t row0 = t * m_max, m = std::min(m_max, B - row0);
          T* g = g_p + row0 * d;
          T* rg = rg_p + row0 * K * d;
          if (store_all) {
            for (int64_t r = std::min(R, s_hi * C) - 1; r >= s_lo * C; --r) {
              const Record<T> rec = Record<T>::at(rec_p + (t * R + r) * rec_size, n, K, m_max, d, acts);
              Prefetch next = prefetch_records && r > 0 ? Prefetch(rec_p + (t * R + r - 1) * rec_size, rec_size) : Prefetch();
              next.parts = (gn ? 2 : 3) * n;
              unit_reverse<T>(net, r, m, m_max, rec, g, rg, dw + (r - r_lo) * per_unit, t != first_tile, ws, next);
            }
            continue;
          }
          for (int64_t seg = s_hi - 1; seg >= s_lo; --seg) {
            const int64_t u0 = seg * C, u1 = std::min(R, u0 + C);
            Record<T> first = Record<T>::at(seg_buf, n, K, m_max, d, acts);
            std::copy(ckh_p + (seg * B + row0) * d, ckh_p + (seg * B + row0 + m) * d, first.hin);
            if (!gn) std::copy(ckr_p + (seg * B + row0) * K * d, ckr_p + (seg * B + row0 + m) * K * d, first.rho);
            for (int64_t r = u0; r < u1; ++r) {
              const Record<T> rec = Record<T>::at(seg_buf + (r - u0) * rec_size, n, K, m_max, d, acts);
              if (r + 1 < u1) {
                const Record<T> next = Record<T>::at(seg_buf + (r + 1 - u0) * rec_size, n, K, m_max, d, acts);
                // G: the unit's output alone (its tangents served pass 1's seeds only)
                unit_forward<T>(net, r, m, m_max, rec, next.hin, gn ? nullptr : next.rho, ws.d1, !gn);
              } else {
                unit_forward<T>(net, r, m, m_max, rec, nullptr, nullptr, ws.d1, !gn);
              }
            }
            for (int64_t r = u1 - 1; r >= u0; --r) {
              const Record<T> rec = Record<T>::at(seg_buf + (r - u0) * rec_size, n, K, m_max, d, acts);
              unit_reverse<T>(net, r, m, m_max, rec, g, rg, dw + (r - r_lo) * per_unit, t != first_tile, ws, kNoPrefetch);
            }
          }
        }
      }
      gemm_release();
    });
    // fixed-order reduction of the slots: grad [d, d]; hvp_j[o, i] = h2[o, j, i] + h1[i, j, o], each term
    // summed over the slots in slot order along contiguous rows, then h1's sum transposed in blocks (from
    // a [d, d] buffer in cache: a strided gather straight from the chunk buffers took ~10% of a call)
    const int64_t Q = (r_hi - r_lo) * n;
    const int64_t slot_stride = U * per_unit;
    const int64_t blocks = net.blocks();
    at::parallel_for(0, Q, std::max<int64_t>(1, 4096 / (blocks * dd)), [&](int64_t q0, int64_t q1) {
      std::vector<T> h1t(dd);
      // dst[c] = sum over slots s (in order) of src[s * slot_stride + c], c < count
      const auto sum_slots = [&](const T* src, int64_t count, T* dst) {
        std::copy(src, src + count, dst);
        for (int64_t s = 1; s < slots; ++s) {
          const T* p = src + s * slot_stride;
#pragma omp simd
          for (int64_t c = 0; c < count; ++c) dst[c] += p[c];
        }
      };
      constexpr int64_t blk = 16;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t rl = r_lo * n + q;  // flat (unit, layer) index
        const T* src0 = partial + q * blocks * dd;
        sum_slots(src0, dd, gw_p + rl * dd);
        const T* h1 = src0 + dd;            // [d_in][K][d_out]
        const T* h2 = src0 + (1 + K) * dd;  // [d_out][K][d_in] (not for G)
        for (int64_t j = 0; j < K; ++j) {
          T* hout = hv_p + (j * R * n + rl) * dd;
          if (gn)
            std::fill(hout, hout + dd, T(0));
          else
            for (int64_t o = 0; o < d; ++o) sum_slots(h2 + (o * K + j) * d, d, hout + o * d);
          for (int64_t i = 0; i < d; ++i) sum_slots(h1 + (i * K + j) * d, d, h1t.data() + i * d);
          for (int64_t o0 = 0; o0 < d; o0 += blk)
            for (int64_t i0 = 0; i0 < d; i0 += blk)
              for (int64_t o = o0; o < std::min(d, o0 + blk); ++o)
                for (int64_t i = i0; i < std::min(d, i0 + blk); ++i) hout[o * d + i] += h1t[i * d + o];
        }
      }
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hvp_cpu(
    const at::Tensor& x_arg,       // [B, d]
    const at::Tensor& weights_arg,  // [R, n, d, d]
    const at::Tensor& targets_arg,  // [B, q], or [B] int64 class indices (cross_entropy); q = d without a read-out
    const at::Tensor& directions_arg,  // [k, R, n, d, d]
    bool shortcut, c10::string_view act_pre, c10::string_view act_mid, c10::string_view act_post,
    c10::string_view loss_name, const c10::optional<at::Tensor>& readout_arg, HvpMatrix part) {
  const StackShape s = check_stack(x_arg, weights_arg, "x");
  const Acts acts{parse_activation("act_pre", act_pre), parse_activation("act_mid", act_mid),
                  parse_activation("act_post", act_post)};
  const Loss loss = check_hvp_args(x_arg, weights_arg, targets_arg, directions_arg, loss_name, s, readout_arg);
  const at::Tensor x = x_arg.contiguous(), weights = weights_arg.contiguous();
  const at::Tensor targets = targets_arg.contiguous(), directions = directions_arg.contiguous();
  const c10::optional<at::Tensor> readout =
      readout_arg.has_value() ? c10::optional<at::Tensor>(readout_arg->contiguous()) : c10::nullopt;
  at::Tensor loss_out = at::zeros({}, x.options());
  at::Tensor grad_w = pooled_empty(weights.sizes(), weights.options());
  at::Tensor hvps = pooled_empty(directions.sizes(), directions.options());
  // B == 0: the loss of no samples is 0 (as reference.loss_fn), and so are its derivatives.  Otherwise the
  // slot reduction writes every element of both.
  if (s.B == 0) {
    grad_w.zero_();
    hvps.zero_();
    return {loss_out, grad_w, hvps};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_stack_hvp_cpu", [&] {
    hvp_impl<scalar_t>(x, weights, targets, directions, shortcut, acts, loss, readout,
                       part == HvpMatrix::Ggn || part == HvpMatrix::EmpiricalFisher, part == HvpMatrix::Functional,
                       part == HvpMatrix::EmpiricalFisher, loss_out, grad_w, hvps);
  });
  return {loss_out, grad_w, hvps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_hvp_cpu(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& targets, const at::Tensor& directions,
    bool shortcut, c10::string_view act_pre, c10::string_view act_mid, c10::string_view act_post,
    c10::string_view loss, const c10::optional<at::Tensor>& readout) {
  return hvp_cpu(x, weights, targets, directions, shortcut, act_pre, act_mid, act_post, loss, readout, HvpMatrix::Hessian);
}

// The products with one part of the Hessian: matrix "ggn" (G = J^T H_l J), "functional" (F = H - G) or
// "hessian"; or with the empirical Fisher ("empirical_fisher"); the loss and gradient are the loss's either way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_hvp_part_cpu(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& targets, const at::Tensor& directions,
    bool shortcut, c10::string_view act_pre, c10::string_view act_mid, c10::string_view act_post,
    c10::string_view loss, c10::string_view matrix, const c10::optional<at::Tensor>& readout) {
  return hvp_cpu(x, weights, targets, directions, shortcut, act_pre, act_mid, act_post, loss, readout,
                 parse_hvp_matrix(matrix));
}

}  // namespace

CpuSchedule cpu_hvp_schedule(int64_t B, int64_t d, int64_t R, int64_t n, int64_t K) {
  const int64_t dd = d * d;
  const int64_t rec_row = (2 * n + 1) * (1 + K) * d;
  const int64_t P = num_slots(B, (4 + 8 * K) * R * n * dd);
  // a tile's record of one unit up to ~2^19 elements, at least 8 rows
  const int64_t m_max = balanced_tile_rows(B, P, std::max<int64_t>(8, (int64_t(1) << 19) / rec_row));
  const int64_t tiles = (B + m_max - 1) / m_max;
  return {m_max, tiles, std::min(P, tiles), 0};
}

TORCH_LIBRARY_IMPL(shortcut_ext, CPU, m) {
  m.impl("residual_stack_hvp", &residual_stack_hvp_cpu);
  m.impl("residual_stack_hvp_part", &residual_stack_hvp_part_cpu);
}

}  // namespace shortcut_ext
