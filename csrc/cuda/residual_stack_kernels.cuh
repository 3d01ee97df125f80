// CUDA kernels of the fused residual stack (templates; instantiated in residual_stack_kernels.cu).
//
// Notation as shortcut_ext/reference.py: rows are samples, a layer maps a -> a @ W^T, weights are
// [R, n, d_out, d_in].  Unit r:  h -> (shortcut ? h : 0) + s_post(W[r,n-1] s_mid(... W[r,0] s_pre(h))).
//
// Fused path (d <= 128, padded to D in {16, 32, 64, 128} with zero weights, which keeps the padded
// features exactly zero: every activation maps 0 to 0):
//   * one thread block per tile of BM rows; the tile lives in shared memory, feature-major
//     ([D][BM + pad], so the k-loop of every GEMM reads 16-byte vectors along rows), and the
//     residual stream h (forward) or its gradient g (backward) lives in registers, for all units;
//   * the weights stream through shared memory in chunks of KC rows with a 3-stage cp.async
//     pipeline: the next chunks load while the current one is multiplied;
//   * each thread owns a TM x TN micro-tile of every [BM, D] product (FFMA in fp32/fp64, no TF32);
//   * float32 only, when asked (shortcut_ext.cuda_tf32()): TcConfig runs the same kernels with every
//     product on TF32 tensor cores (mma.sync m16n8k8, float32 accumulation), each warp owning
//     16x8 accumulator fragments; activations and the residual stream stay float32.  3xTF32 splits
//     every operand into two TF32 parts for float32 accuracy (three mma per product).
//   Forward reads W^T (a transposed copy made per call), backward reads W^T to recompute a unit's
//   inner activations from its saved input and W for the data gradient.
//   Backward keeps the n recomputed layer inputs of a unit on chip ([n][D][BM + pad]); weight
//   gradients are per-tile partial sums (workspace [tiles, U, n, D, D]) reduced over tiles in a
//   fixed order by reduce_partials_kernel, or atomicAdd'ed when asked.
//
// Generic path (any d, any n): the same schedule with the activations of a 32-row tile in global
// scratch (per block, L2-resident) and smem-tiled GEMMs; blocks loop over tiles (persistent), and
// weight gradients are per-block partial sums accumulated over the block's tiles in a fixed order.
#pragma once

#include <vector>

#include "common.h"
#include "cuda/device_utils.cuh"

namespace shortcut_ext {
namespace cuda_detail {

// s'(z) from s = s(z) alone: for relu s > 0 iff z > 0, tanh and ssigmoid need only s, identity 1.
// Lets the backward keep only post-activation values.
template <typename T>
__device__ __forceinline__ T deriv_from_output(Act a, T s) {
  return act_deriv<T>(a, s, s);
}

// ----------------------------------------------------------------------------------- parameters
template <typename T>
struct ForwardParams {
  const T* x;      // [B, d]
  const T* wt;     // [R, n, D, D] W^T, zero-padded to D (generic path: D == d)
  T* y;            // [B, d]
  T* saved;        // [R, B, d] or nullptr
  int64_t B, d, R, n;
  bool shortcut;
  Act pre, mid, post;
  T* scratch;      // generic path: [gridDim.x, 2, 32, d]
};

template <typename T>
struct BackwardParams {
  const T* g_in;   // [B, d] gradient w.r.t. the output of unit r_hi - 1
  T* g_out;        // [B, d] gradient w.r.t. the input of unit r_lo (may alias g_in)
  const T* saved;  // [R, B, d]
  const T* wt;     // [R, n, D, D] W^T padded
  const T* w;      // [R, n, D, D] W padded
  T* ws;           // weight-gradient partials (see kernels), unused when atomic
  T* grad_w;       // [R, n, d, d]; atomicAdd target when atomic; null: no weight gradients (frozen weights)
  int64_t B, d, R, n;
  int64_t r_lo, r_hi;  // units of this launch, processed from r_hi - 1 down to r_lo
  int64_t tile0;       // fused path: first tile of this launch (blockIdx.x + tile0)
  bool shortcut, atomic;
  Act pre, mid, post;
  T* scratch;      // generic path: [gridDim.x, n + 2, 32, d]
};

// ----------------------------------------------------------------------------- fused-path config
// FFMA configuration: each thread owns a TM x TN micro-tile of every [BM, D] product.
template <typename T_, int D_, int BM_, int TM_, int TN_>
struct FusedConfig {
  using T = T_;
  static constexpr bool kTensorCore = false, kSplit = false;
  static constexpr int D = D_, BM = BM_, TM = TM_, TN = TN_;
  static constexpr int VEC = Vec16<T>::lanes;           // elements per 16-byte access
  static constexpr int TX = D / TN, TY = BM / TM;       // thread grid over a [BM, D] product
  static constexpr int THREADS = TX * TY;
  static constexpr int FRAG = TM * TN;                  // owned elements of a [BM, D] product
  static constexpr int MV = TM / VEC, NV = TN / VEC;    // 16-byte vectors per thread (rows, cols)
  static constexpr int LDA = BM + VEC;                  // row stride of feature-major tiles [D][LDA]
  static constexpr int LDW = D;                         // row stride of a streamed weight chunk
  static constexpr int KC = D < 32 ? D : 32;            // weight rows per streamed chunk
  static constexpr int CPL = D / KC;                    // chunks per layer
  static constexpr int STAGES = 3;                      // cp.async pipeline depth
  static constexpr int CHUNK_VECS = KC * D / VEC;       // 16-byte pieces per chunk
  // Weight-gradient product dW[o][i] = sum_b dz[b][o] a[b][i]: WX threads along i (interleaved, so
  // a warp reads consecutive feature rows: conflict-free 16-byte loads), WY along o; WM_TOTAL rows
  // of o per thread, WM of them per pass.
  static constexpr int WN = (sizeof(T) == 4 && D >= 64) ? 8 : 4;
  static constexpr int WX = D / WN, WY = THREADS / WX, WM_TOTAL = D / WY;
  static constexpr int WM_CAP = sizeof(T) == 4 ? 8 : 4;
  static constexpr int WM = WM_TOTAL < WM_CAP ? WM_TOTAL : WM_CAP;
  static constexpr int WPASSES = WM_TOTAL / WM;

  static_assert(TM % VEC == 0 && TN % VEC == 0, "micro-tile must be whole 16-byte vectors");
  static_assert(D % TN == 0 && BM % TM == 0, "micro-tile must divide the tile");
  static_assert(THREADS >= 32 && THREADS <= 1024, "block size out of range");
  static_assert(THREADS % WX == 0 && D % WY == 0 && WM_TOTAL % WM == 0, "bad weight-gradient thread grid");
  static_assert(BM % VEC == 0 && D % KC == 0, "bad tile");

  static constexpr size_t weight_elems = size_t(STAGES) * KC * LDW;
  static constexpr size_t tile_elems = size_t(D) * LDA;
  static size_t smem_bytes(bool backward, int64_t n) {
    return (weight_elems + (backward ? size_t(n + 1) : size_t(1)) * tile_elems) * sizeof(T);
  }
};

// Weight-gradient warp grid of the tensor-core kernels: WG_M warps along o, the rest along i, so
// that one warp's k-step (2 units per mma, 1 per fragment load) is cheapest.
constexpr int tc_wgrad_cost(int D, int warps, int wgm) {
  const int wgn = warps / wgm < D / 8 ? warps / wgm : D / 8;
  const int mi = D / 16 / wgm, ni = D / 8 / wgn;
  return 2 * mi * ni + 4 * mi + 2 * ni;
}
constexpr int tc_wgrad_warps_m(int D, int warps) {
  int best = 1;
  for (int wgm = 2; wgm <= warps && wgm <= D / 16; wgm *= 2)
    if (tc_wgrad_cost(D, warps, wgm) < tc_wgrad_cost(D, warps, best)) best = wgm;
  return best;
}

// TF32 tensor-core configuration (float32 only, opt-in; see residual_stack_fused_tf32.cu): the same
// schedule, with every product on mma.sync m16n8k8.  WARPS_M x WARPS_N warps each own a
// [BM / WARPS_M, D / WARPS_N] block of a [BM, D] product as MI x NI accumulator fragments.
// SPLIT (3xTF32): every operand x = big + small, both TF32, and a*b = a_big*b_big + a_big*b_small +
// a_small*b_big (the dropped a_small*b_small is ~2^-22 relative): float32 accuracy from three mma
// per product, with the same shared-memory traffic as one.
template <int D_, int BM_, int WARPS_M_, int WARPS_N_, bool SPLIT_ = false>
struct TcConfig {
  using T = float;
  static constexpr bool kTensorCore = true, kSplit = SPLIT_;
  static constexpr int D = D_, BM = BM_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int WARPS = WARPS_M * WARPS_N, THREADS = 32 * WARPS;
  static constexpr int WTM = BM / WARPS_M, WTN = D / WARPS_N;  // a warp's block of a product
  static constexpr int MI = WTM / 16, NI = WTN / 8;            // its 16x8 accumulator fragments
  static constexpr int FRAG = MI * NI * 4;
  static constexpr int VEC = 4;
  // Feature-major tiles with a row stride of 8 mod 32 words: the A fragments of a product (lanes
  // read rows t and columns g) hit 32 distinct banks; likewise the weight rows.
  static constexpr int LDA = BM + 8;
  static constexpr int LDW = D + 8;
  static constexpr int KC = D < 32 ? D : 32;
  static constexpr int CPL = D / KC;
  static constexpr int STAGES = 3;
  static constexpr int CHUNK_VECS = KC * D / VEC;
  static constexpr int WG_M = tc_wgrad_warps_m(D, WARPS);
  static constexpr int WG_N = WARPS / WG_M < D / 8 ? WARPS / WG_M : D / 8;
  static constexpr int WMI = D / 16 / WG_M, WNI = D / 8 / WG_N;  // weight-gradient fragments per warp

  static_assert(WTM % 16 == 0 && WTN % 8 == 0, "a warp's block must be whole 16x8 fragments");
  static_assert(BM % 32 == 0 && KC % 8 == 0 && D % KC == 0, "bad tile");
  static_assert((D / 16) % WG_M == 0 && (D / 8) % WG_N == 0, "bad weight-gradient warp grid");
  static_assert(THREADS <= 1024, "block size out of range");

  static constexpr size_t weight_elems = size_t(STAGES) * KC * LDW;
  static constexpr size_t tile_elems = size_t(D) * LDA;
  static size_t smem_bytes(bool backward, int64_t n) {
    return (weight_elems + (backward ? size_t(n + 1) : size_t(1)) * tile_elems) * sizeof(T);
  }
};

// ------------------------------------------------------------------------------ weight streaming
// Streams a sequence of [KC][D] weight chunks through STAGES shared-memory buffers (rows LDW apart).
// Every thread of the block calls acquire()/release() in the same order; chunk c is issued STAGES-1
// acquires ahead of its use.  Group accounting: each issue commits exactly one (possibly empty)
// group, so when chunk c is acquired STAGES-1+c groups were committed and wait<STAGES-2> retires 0..c.
template <class Cfg, class Source>
struct WeightStream {
  using T = typename Cfg::T;
  static constexpr int STAGE = Cfg::KC * Cfg::LDW;  // elements per buffer
  T* buf;           // [STAGES][KC][LDW] shared
  Source src;       // chunk index -> global pointer of KC*D contiguous elements
  int64_t total;    // chunks in the stream
  int64_t issued = 0, used = 0;

  __device__ WeightStream(T* b, Source s, int64_t n) : buf(b), src(s), total(n) {}

  __device__ __forceinline__ void issue() {
    if (issued < total) {
      const T* g = src(issued);
      T* s = buf + (issued % Cfg::STAGES) * STAGE;
      constexpr int RV = Cfg::D / Cfg::VEC;  // 16-byte pieces per row
      for (int v = threadIdx.x; v < Cfg::CHUNK_VECS; v += Cfg::THREADS)
        cp_async16(s + (v / RV) * Cfg::LDW + (v % RV) * Cfg::VEC, g + v * Cfg::VEC);
    }
    cp_async_commit();
    ++issued;
  }
  __device__ __forceinline__ void prologue() {
#pragma unroll
    for (int s = 0; s < Cfg::STAGES - 1; ++s) issue();
  }
  // Returns chunk `used`, visible to the whole block; the barrier also orders every thread's use of
  // chunk used-1 before its buffer is refilled, and publishes shared-memory writes made before it.
  __device__ __forceinline__ const T* acquire() {
    cp_async_wait<Cfg::STAGES - 2>();
    __syncthreads();
    issue();
    return buf + (used % Cfg::STAGES) * STAGE;
  }
  __device__ __forceinline__ void release() { ++used; }
};

template <typename T, int D, int KC>
struct ForwardSource {  // layers in order: chunk c is at wt + c*KC*D
  const T* wt;
  __device__ const T* operator()(int64_t c) const { return wt + c * (KC * D); }
};

template <typename T, int D, int KC>
struct BackwardSource {  // per unit (r_hi-1 down): W^T[r, 0..n-1], then W[r, n-1..0]
  const T* wt;
  const T* w;
  int64_t r_hi, n;
  __device__ const T* operator()(int64_t c) const {
    constexpr int CPL = D / KC;
    const int64_t q = c / CPL, part = c % CPL;
    const int64_t step = q / (2 * n), j = q % (2 * n);
    const int64_t r = r_hi - 1 - step;
    const T* base = j < n ? wt + (r * n + j) * (D * D) : w + (r * n + (2 * n - 1 - j)) * (D * D);
    return base + part * (KC * D);
  }
};

// --------------------------------------------------------------------------- fused-path pieces
// Which elements of a [BM, D] product a thread owns, as a flat register array v[Cfg::FRAG]:
// element e sits at row(e), col(e) of the product.
template <class Cfg, bool TC = Cfg::kTensorCore>
struct Owner;

// FFMA: thread (tx, ty) owns rows ((p*TY + ty)*VEC + w) and columns ((q*TX + tx)*VEC + v) for
// p < MV, q < NV, w, v < VEC; register v[(p*VEC + w)*TN + q*VEC + v].
template <class Cfg>
struct Owner<Cfg, false> {
  int tx, ty;
  static __device__ __forceinline__ Owner make() { return {int(threadIdx.x % Cfg::TX), int(threadIdx.x / Cfg::TX)}; }
  __device__ __forceinline__ int row(int p, int w) const { return (p * Cfg::TY + ty) * Cfg::VEC + w; }
  __device__ __forceinline__ int col(int q, int v) const { return (q * Cfg::TX + tx) * Cfg::VEC + v; }
  // The owned rows ri < ROWS and columns cj < COLS; element (ri, cj) is v[at(ri, cj)].
  static constexpr int ROWS = Cfg::TM, COLS = Cfg::TN;
  __device__ __forceinline__ int row_i(int ri) const { return row(ri / Cfg::VEC, ri % Cfg::VEC); }
  __device__ __forceinline__ int col_j(int cj) const { return col(cj / Cfg::VEC, cj % Cfg::VEC); }
  static __device__ __forceinline__ int at(int ri, int cj) { return ri * Cfg::TN + cj; }
};

// Tensor cores: warp (wm, wn), lane (g = lane / 4, t = lane % 4) owns fragment (mi, ni) of its
// block: element e = (mi*NI + ni)*4 + c sits where mma's accumulator register c does.
template <class Cfg>
struct Owner<Cfg, true> {
  int wm, wn, g, t;
  static __device__ __forceinline__ Owner make() {
    const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
    return {warp % Cfg::WARPS_M, warp / Cfg::WARPS_M, lane / 4, lane % 4};
  }
  __device__ __forceinline__ int row(int e) const { return wm * Cfg::WTM + (e / 4 / Cfg::NI) * 16 + g + 8 * (e % 4 / 2); }
  __device__ __forceinline__ int col(int e) const { return wn * Cfg::WTN + (e / 4 % Cfg::NI) * 8 + 2 * t + e % 2; }
  // The owned rows ri = 2 mi + h and columns cj = 2 ni + c; element (ri, cj) is v[at(ri, cj)].
  static constexpr int ROWS = 2 * Cfg::MI, COLS = 2 * Cfg::NI;
  __device__ __forceinline__ int row_i(int ri) const { return wm * Cfg::WTM + (ri / 2) * 16 + g + 8 * (ri % 2); }
  __device__ __forceinline__ int col_j(int cj) const { return wn * Cfg::WTN + (cj / 2) * 8 + 2 * t + cj % 2; }
  static __device__ __forceinline__ int at(int ri, int cj) { return ((ri / 2) * Cfg::NI + cj / 2) * 4 + (ri % 2) * 2 + cj % 2; }
};

template <class Cfg>
using Frag = typename Cfg::T[Cfg::FRAG];

// The 4 accumulator registers of fragment (mi, ni).
template <class Cfg>
__device__ __forceinline__ float (&fragment(float (&v)[Cfg::FRAG], int mi, int ni))[4] {
  return *reinterpret_cast<float(*)[4]>(v + (mi * Cfg::NI + ni) * 4);
}

// Operand registers of N values: TF32 (rounded here unless `rounded`), or 3xTF32 big and small parts.
template <bool SPLIT, int N>
__device__ __forceinline__ void tc_operands(const float (&v)[N], uint32_t (&big)[N], uint32_t (&small)[N], bool rounded) {
#pragma unroll
  for (int c = 0; c < N; ++c) {
    if constexpr (SPLIT)
      split_tf32(v[c], big[c], small[c]);
    else
      big[c] = rounded ? f32_bits(v[c]) : to_tf32(v[c]);
  }
}

// d += A B from TF32 operands, or (3xTF32) d += As B + A Bs + A B, the small terms first.
template <bool SPLIT>
__device__ __forceinline__ void tc_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&as)[4],
                                       const uint32_t (&b)[2], const uint32_t (&bs)[2]) {
  if constexpr (SPLIT) {
    mma_tf32_16x8x8(d, as, b);
    mma_tf32_16x8x8(d, a, bs);
  }
  mma_tf32_16x8x8(d, a, b);
}

template <class Cfg, class Stream>
__device__ __forceinline__ void tc_row_gemm(const float* A, Stream& ws, const Owner<Cfg>& me, Frag<Cfg>& acc) {
#pragma unroll
  for (int e = 0; e < Cfg::FRAG; ++e) acc[e] = 0.f;
#pragma unroll 1
  for (int part = 0; part < Cfg::CPL; ++part) {
    const float* wc = ws.acquire();
    const float* a_base = A + (part * Cfg::KC + me.t) * Cfg::LDA + me.wm * Cfg::WTM + me.g;
    const float* b_base = wc + me.t * Cfg::LDW + me.wn * Cfg::WTN + me.g;
#pragma unroll
    for (int kk = 0; kk < Cfg::KC; kk += 8) {
      uint32_t a[Cfg::MI][4], b[Cfg::NI][2], as[Cfg::MI][4], bs[Cfg::NI][2];  // big and (3xTF32) small parts
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi) {
        const float* q = a_base + kk * Cfg::LDA + mi * 16;
        tc_operands<Cfg::kSplit>({q[0], q[8], q[4 * Cfg::LDA], q[4 * Cfg::LDA + 8]}, a[mi], as[mi], false);
      }
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni) {  // TF32: the weights were rounded once, on the host side
        const float* q = b_base + kk * Cfg::LDW + ni * 8;
        tc_operands<Cfg::kSplit>({q[0], q[4 * Cfg::LDW]}, b[ni], bs[ni], true);
      }
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < Cfg::NI; ++ni) tc_mma<Cfg::kSplit>(fragment<Cfg>(acc, mi, ni), a[mi], as[mi], b[ni], bs[ni]);
    }
    ws.release();
  }
}

// acc[b][j] = sum_k A[k][b] * Wc[k][j] over the D rows k of a feature-major tile A [D][LDA] and one
// layer of streamed chunks Wc [KC][LDW] (W^T rows for a forward product, W rows for a data gradient).
template <class Cfg, class Stream>
__device__ __forceinline__ void row_gemm(const typename Cfg::T* A, Stream& ws, const Owner<Cfg>& me, Frag<Cfg>& acc) {
  if constexpr (Cfg::kTensorCore) {
    tc_row_gemm<Cfg>(A, ws, me, acc);
  } else {
    using T = typename Cfg::T;
    constexpr int VEC = Cfg::VEC;
#pragma unroll
    for (int e = 0; e < Cfg::FRAG; ++e) acc[e] = T(0);
#pragma unroll 1
    for (int part = 0; part < Cfg::CPL; ++part) {
      const T* wc = ws.acquire();
      const T* a_base = A + part * Cfg::KC * Cfg::LDA + me.ty * VEC;
      const T* w_base = wc + me.tx * VEC;
#pragma unroll 8
      for (int kk = 0; kk < Cfg::KC; ++kk) {
        T a[Cfg::TM], w[Cfg::TN];
#pragma unroll
        for (int p = 0; p < Cfg::MV; ++p) load_vec<VEC>(a + p * VEC, a_base + kk * Cfg::LDA + p * Cfg::TY * VEC);
#pragma unroll
        for (int q = 0; q < Cfg::NV; ++q) load_vec<VEC>(w + q * VEC, w_base + kk * Cfg::LDW + q * Cfg::TX * VEC);
#pragma unroll
        for (int m = 0; m < Cfg::TM; ++m)
#pragma unroll
          for (int j = 0; j < Cfg::TN; ++j) acc[m * Cfg::TN + j] = fma(a[m], w[j], acc[m * Cfg::TN + j]);
      }
      ws.release();
    }
  }
}

// A[col][row] = act(v[row][col]) for the owned positions of a feature-major tile.
template <class Cfg>
__device__ __forceinline__ void store_tile(typename Cfg::T* A, const Frag<Cfg>& v, Act act, const Owner<Cfg>& me) {
  using T = typename Cfg::T;
  if constexpr (Cfg::kTensorCore) {
#pragma unroll
    for (int e = 0; e < Cfg::FRAG; ++e) A[me.col(e) * Cfg::LDA + me.row(e)] = act_apply<T>(act, v[e]);
  } else {
    constexpr int VEC = Cfg::VEC;
#pragma unroll
    for (int q = 0; q < Cfg::NV; ++q)
#pragma unroll
      for (int c = 0; c < VEC; ++c)
#pragma unroll
        for (int p = 0; p < Cfg::MV; ++p) {
          T t[VEC];
#pragma unroll
          for (int w = 0; w < VEC; ++w) t[w] = act_apply<T>(act, v[(p * VEC + w) * Cfg::TN + q * VEC + c]);
          store_vec<VEC>(A + me.col(q, c) * Cfg::LDA + me.row(p, 0), t);
        }
  }
}

// f(e, A[col(e)][row(e)]) for every owned element e, without holding a copy of the tile's values.
template <class Cfg, class F>
__device__ __forceinline__ void for_tile(const typename Cfg::T* A, const Owner<Cfg>& me, F f) {
  using T = typename Cfg::T;
  if constexpr (Cfg::kTensorCore) {
#pragma unroll
    for (int e = 0; e < Cfg::FRAG; ++e) f(e, A[me.col(e) * Cfg::LDA + me.row(e)]);
  } else {
    constexpr int VEC = Cfg::VEC;
#pragma unroll
    for (int q = 0; q < Cfg::NV; ++q)
#pragma unroll
      for (int c = 0; c < VEC; ++c)
#pragma unroll
        for (int p = 0; p < Cfg::MV; ++p) {
          T t[VEC];
          load_vec<VEC>(t, A + me.col(q, c) * Cfg::LDA + me.row(p, 0));
#pragma unroll
          for (int w = 0; w < VEC; ++w) f((p * VEC + w) * Cfg::TN + q * VEC + c, t[w]);
        }
  }
}

// v = src[row0 + row, col] (rows >= B and columns >= d read as 0); src is [B, d] row-major.
template <class Cfg>
__device__ __forceinline__ void load_global(const typename Cfg::T* src, int64_t row0, int64_t B, int64_t d,
                                            Frag<Cfg>& v, const Owner<Cfg>& me) {
  using T = typename Cfg::T;
  using O = Owner<Cfg>;
#pragma unroll
  for (int ri = 0; ri < O::ROWS; ++ri) {
    const int64_t b = row0 + me.row_i(ri);
#pragma unroll
    for (int cj = 0; cj < O::COLS; ++cj) {
      const int64_t col = me.col_j(cj);
      v[O::at(ri, cj)] = (b < B && col < d) ? src[b * d + col] : T(0);
    }
  }
}

template <class Cfg>
__device__ __forceinline__ void store_global(typename Cfg::T* dst, int64_t row0, int64_t B, int64_t d,
                                             const Frag<Cfg>& v, const Owner<Cfg>& me) {
  using O = Owner<Cfg>;
#pragma unroll
  for (int ri = 0; ri < O::ROWS; ++ri) {
    const int64_t b = row0 + me.row_i(ri);
    if (b >= B) continue;
#pragma unroll
    for (int cj = 0; cj < O::COLS; ++cj) {
      const int64_t col = me.col_j(cj);
      if (col < d) dst[b * d + col] = v[O::at(ri, cj)];
    }
  }
}

// Tensor cores: warp w < WG_M*WG_N owns WMI x WNI fragments of dW (M = o, N = i, K = the BM rows).
template <class Cfg>
__device__ __forceinline__ void tc_weight_gemm(const float* DZ, const float* A, float* out, bool atomic,
                                               float* grad_w, int64_t d) {
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
  if (warp >= Cfg::WG_M * Cfg::WG_N) return;  // warp-uniform: no barrier or mma is skipped by half a warp
  const int o0 = (warp % Cfg::WG_M) * Cfg::WMI * 16, i0 = (warp / Cfg::WG_M) * Cfg::WNI * 8;
  float acc[Cfg::WMI][Cfg::WNI][4];
#pragma unroll
  for (int mi = 0; mi < Cfg::WMI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::WNI; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;
#pragma unroll 2
  for (int kb = 0; kb < Cfg::BM; kb += 8) {
    uint32_t a[Cfg::WMI][4], b[Cfg::WNI][2], as[Cfg::WMI][4], bs[Cfg::WNI][2];
#pragma unroll
    for (int mi = 0; mi < Cfg::WMI; ++mi) {  // A = DZ as [o][b]: a0 (o g, b t), a1 (g + 8, t), a2 (g, t + 4), a3
      const float* q = DZ + (o0 + mi * 16 + g) * Cfg::LDA + kb + t;
      tc_operands<Cfg::kSplit>({q[0], q[8 * Cfg::LDA], q[4], q[8 * Cfg::LDA + 4]}, a[mi], as[mi], false);
    }
#pragma unroll
    for (int ni = 0; ni < Cfg::WNI; ++ni) {  // B = Act as [b][i]: b0 (b t, i g), b1 (t + 4, g)
      const float* q = A + (i0 + ni * 8 + g) * Cfg::LDA + kb + t;
      tc_operands<Cfg::kSplit>({q[0], q[4]}, b[ni], bs[ni], false);
    }
#pragma unroll
    for (int mi = 0; mi < Cfg::WMI; ++mi)
#pragma unroll
      for (int ni = 0; ni < Cfg::WNI; ++ni) tc_mma<Cfg::kSplit>(acc[mi][ni], a[mi], as[mi], b[ni], bs[ni]);
  }
#pragma unroll
  for (int mi = 0; mi < Cfg::WMI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::WNI; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int o = o0 + mi * 16 + g + 8 * (c / 2), i = i0 + ni * 8 + 2 * t + c % 2;
        if (atomic) {
          if (o < d && i < d) atomicAdd(grad_w + o * d + i, acc[mi][ni][c]);
        } else {
          out[o * Cfg::D + i] = acc[mi][ni][c];
        }
      }
}

// dW[o][i] = sum_b DZ[o][b] * A[i][b] over the tile (both feature-major [D][LDA]); written to
// `out` ([D][D], stride D) or, when atomic, added to grad_w ([d][d]) for o, i < d.
template <class Cfg>
__device__ __forceinline__ void weight_gemm(const typename Cfg::T* DZ, const typename Cfg::T* A, typename Cfg::T* out,
                                            bool atomic, typename Cfg::T* grad_w, int64_t d) {
  if constexpr (Cfg::kTensorCore) {
    tc_weight_gemm<Cfg>(DZ, A, out, atomic, grad_w, d);
  } else {
    using T = typename Cfg::T;
    constexpr int VEC = Cfg::VEC;
    const int wx = threadIdx.x % Cfg::WX, wy = threadIdx.x / Cfg::WX;
#pragma unroll 1
    for (int pass = 0; pass < Cfg::WPASSES; ++pass) {
      T acc[Cfg::WM][Cfg::WN];
#pragma unroll
      for (int m = 0; m < Cfg::WM; ++m)
#pragma unroll
        for (int j = 0; j < Cfg::WN; ++j) acc[m][j] = T(0);
#pragma unroll 2
      for (int b = 0; b < Cfg::BM; b += VEC) {
        T a[Cfg::WN][VEC];
#pragma unroll
        for (int j = 0; j < Cfg::WN; ++j) load_vec<VEC>(a[j], A + (wx + j * Cfg::WX) * Cfg::LDA + b);
#pragma unroll
        for (int m = 0; m < Cfg::WM; ++m) {
          T z[VEC];
          load_vec<VEC>(z, DZ + (wy + (pass * Cfg::WM + m) * Cfg::WY) * Cfg::LDA + b);
#pragma unroll
          for (int j = 0; j < Cfg::WN; ++j)
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[m][j] = fma(z[v], a[j][v], acc[m][j]);
        }
      }
#pragma unroll
      for (int m = 0; m < Cfg::WM; ++m) {
        const int o = wy + (pass * Cfg::WM + m) * Cfg::WY;
#pragma unroll
        for (int j = 0; j < Cfg::WN; ++j) {
          const int i = wx + j * Cfg::WX;
          if (atomic) {
            if (o < d && i < d) atomicAdd(grad_w + o * d + i, acc[m][j]);
          } else {
            out[o * Cfg::D + i] = acc[m][j];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------- fused kernels
template <class Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 1) forward_fused_kernel(ForwardParams<typename Cfg::T> p) {
  using T = typename Cfg::T;
  SE_DYNAMIC_SMEM(T, smem);
  T* wbuf = smem;                      // [STAGES][KC][LDW]
  T* At = smem + Cfg::weight_elems;    // [D][LDA]: input of the current layer, feature-major
  const auto me = Owner<Cfg>::make();
  const int64_t row0 = int64_t(blockIdx.x) * Cfg::BM;

  using Src = ForwardSource<T, Cfg::D, Cfg::KC>;
  WeightStream<Cfg, Src> ws(wbuf, Src{p.wt}, p.R * p.n * Cfg::CPL);
  ws.prologue();

  T h[Cfg::FRAG];  // the residual stream of the owned positions
  load_global<Cfg>(p.x, row0, p.B, p.d, h, me);
  store_tile<Cfg>(At, h, p.pre, me);
#pragma unroll 1
  for (int64_t r = 0; r < p.R; ++r) {
    if (p.saved) store_global<Cfg>(p.saved + r * p.B * p.d, row0, p.B, p.d, h, me);
#pragma unroll 1
    for (int64_t k = 0; k < p.n; ++k) {
      T acc[Cfg::FRAG];
      row_gemm<Cfg>(At, ws, me, acc);  // its first acquire() publishes At
      __syncthreads();                 // every thread is done reading At
      if (k + 1 < p.n) {
        store_tile<Cfg>(At, acc, p.mid, me);
      } else {
#pragma unroll
        for (int e = 0; e < Cfg::FRAG; ++e) {
          const T s = act_apply<T>(p.post, acc[e]);
          h[e] = p.shortcut ? h[e] + s : s;
        }
        store_tile<Cfg>(At, h, p.pre, me);
      }
    }
  }
  store_global<Cfg>(p.y, row0, p.B, p.d, h, me);
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::THREADS, 1) backward_fused_kernel(BackwardParams<typename Cfg::T> p) {
  using T = typename Cfg::T;
  SE_DYNAMIC_SMEM(T, smem);
  T* wbuf = smem;                              // [STAGES][KC][LDW]
  T* DZ = smem + Cfg::weight_elems;            // [D][LDA]: gradient w.r.t. a layer's output z
  T* Act0 = DZ + Cfg::tile_elems;              // [n][D][LDA]: recomputed input of every layer
  const auto me = Owner<Cfg>::make();
  const int64_t tile = int64_t(blockIdx.x) + p.tile0;
  const int64_t row0 = tile * Cfg::BM;
  const int64_t units = p.r_hi - p.r_lo;
  constexpr int64_t DD = int64_t(Cfg::D) * Cfg::D;

  using Src = BackwardSource<T, Cfg::D, Cfg::KC>;
  WeightStream<Cfg, Src> ws(wbuf, Src{p.wt, p.w, p.r_hi, p.n}, units * 2 * p.n * Cfg::CPL);
  ws.prologue();

  T g[Cfg::FRAG];  // dL/dh at the output of the current unit (0 on padded rows/columns)
  load_global<Cfg>(p.g_in, row0, p.B, p.d, g, me);
#pragma unroll 1
  for (int64_t r = p.r_hi - 1; r >= p.r_lo; --r) {
    T acc[Cfg::FRAG];
    // Recompute: Act[0] = s_pre(h_r); Act[k+1] = s_mid(Act[k] W^T); DZ = g * s_post'(z_{n-1}).
    load_global<Cfg>(p.saved + r * p.B * p.d, row0, p.B, p.d, acc, me);
    store_tile<Cfg>(Act0, acc, p.pre, me);
#pragma unroll 1
    for (int64_t k = 0; k < p.n; ++k) {
      row_gemm<Cfg>(Act0 + k * Cfg::tile_elems, ws, me, acc);
      if (k + 1 < p.n) {
        store_tile<Cfg>(Act0 + (k + 1) * Cfg::tile_elems, acc, p.mid, me);
      } else {
#pragma unroll
        for (int e = 0; e < Cfg::FRAG; ++e)
          acc[e] = g[e] * act_deriv<T>(p.post, acc[e], act_apply<T>(p.post, acc[e]));
        store_tile<Cfg>(DZ, acc, Act::Identity, me);
      }
    }
    __syncthreads();  // DZ and the last Act[k] are read by weight_gemm before any acquire()
#pragma unroll 1
    for (int64_t k = p.n - 1; k >= 0; --k) {
      const T* Ak = Act0 + k * Cfg::tile_elems;
      if (p.grad_w != nullptr)  // block-uniform (null: frozen weights, no weight gradients); no barrier inside
        weight_gemm<Cfg>(DZ, Ak, p.atomic ? nullptr : p.ws + ((int64_t(blockIdx.x) * units + (r - p.r_lo)) * p.n + k) * DD,
                         p.atomic, p.grad_w + (r * p.n + k) * p.d * p.d, p.d);
      row_gemm<Cfg>(DZ, ws, me, acc);  // dL/dAct[k] = DZ W[r, k]
      __syncthreads();                 // all reads of DZ done
      if (k > 0) {
        for_tile<Cfg>(Ak, me, [&](int e, T s) { acc[e] *= deriv_from_output<T>(p.mid, s); });
        store_tile<Cfg>(DZ, acc, Act::Identity, me);
        __syncthreads();  // publish DZ for the next weight_gemm
      } else {
        for_tile<Cfg>(Ak, me, [&](int e, T s) {
          const T gi = acc[e] * deriv_from_output<T>(p.pre, s);
          g[e] = p.shortcut ? g[e] + gi : gi;
        });
        __syncthreads();  // Act[0] is rewritten by the next unit
      }
    }
  }
  store_global<Cfg>(p.g_out, row0, p.B, p.d, g, me);
}

// -------------------------------------------------------------------------------- generic path
constexpr int kGenericRows = 32;     // rows per tile
constexpr int kGenericThreads = 256;
constexpr int kGenericKC = 32;       // k per smem stage
constexpr int kGenericNC = 64;       // output columns per pass

template <typename T>
constexpr size_t generic_smem_bytes() {
  return size_t(kGenericKC) * (kGenericRows + 1 + kGenericNC) * sizeof(T);
}

// out[b][j] = sum_k A[b][k] Bm[k][j] for b < 32, j < d; A [32][d] (global scratch), Bm [d][d];
// epi(b, j, value) receives each result (thread-owned, so epi may read-modify-write per position).
template <typename T, class Epi>
__device__ __forceinline__ void generic_gemm(const T* A, const T* Bm, int64_t d, T* smem, Epi epi) {
  T* As = smem;                                   // [KC][32 + 1]
  T* Bs = smem + kGenericKC * (kGenericRows + 1);  // [KC][NC]
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  for (int64_t n0 = 0; n0 < d; n0 += kGenericNC) {
    T acc[2][4] = {};
    for (int64_t k0 = 0; k0 < d; k0 += kGenericKC) {
      __syncthreads();  // previous stage fully consumed
      for (int e = tid; e < kGenericRows * kGenericKC; e += kGenericThreads) {
        const int b = e / kGenericKC, kk = e % kGenericKC;
        As[kk * (kGenericRows + 1) + b] = (k0 + kk < d) ? A[b * d + k0 + kk] : T(0);
      }
      for (int e = tid; e < kGenericKC * kGenericNC; e += kGenericThreads) {
        const int kk = e / kGenericNC, j = e % kGenericNC;
        Bs[e] = (k0 + kk < d && n0 + j < d) ? Bm[(k0 + kk) * d + n0 + j] : T(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kGenericKC; ++kk) {
        T a[2], bv[4];
#pragma unroll
        for (int m = 0; m < 2; ++m) a[m] = As[kk * (kGenericRows + 1) + ty + 16 * m];
#pragma unroll
        for (int q = 0; q < 4; ++q) bv[q] = Bs[kk * kGenericNC + tx + 16 * q];
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[m][q] = fma(a[m], bv[q], acc[m][q]);
      }
    }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t j = n0 + tx + 16 * q;
        if (j < d) epi(ty + 16 * m, j, acc[m][q]);
      }
  }
}

template <typename T>
__global__ void __launch_bounds__(kGenericThreads) forward_generic_kernel(ForwardParams<T> p) {
  SE_DYNAMIC_SMEM(T, smem);
  const int64_t d = p.d, tile_elems = kGenericRows * d;
  T* bufs[2] = {p.scratch + int64_t(blockIdx.x) * 2 * tile_elems,
                p.scratch + int64_t(blockIdx.x) * 2 * tile_elems + tile_elems};
  const int64_t tiles = (p.B + kGenericRows - 1) / kGenericRows;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * kGenericRows;
    const int64_t rows = p.B - row0 < kGenericRows ? p.B - row0 : kGenericRows;
    T* h = p.y + row0 * d;  // the residual stream lives in the output rows
    for (int64_t e = threadIdx.x; e < rows * d; e += kGenericThreads) h[e] = p.x[row0 * d + e];
    for (int64_t r = 0; r < p.R; ++r) {
      __syncthreads();  // h complete (last layer's epilogue / the copy above)
      for (int64_t e = threadIdx.x; e < tile_elems; e += kGenericThreads) {
        const bool valid = e / d < rows;
        const T v = valid ? h[e] : T(0);
        if (p.saved && valid) p.saved[(r * p.B + row0) * d + e] = v;
        bufs[0][e] = act_apply<T>(p.pre, v);
      }
      __syncthreads();
      for (int64_t k = 0; k < p.n; ++k) {
        const T* cur = bufs[k % 2];
        T* nxt = bufs[(k + 1) % 2];
        const T* wk = p.wt + (r * p.n + k) * d * d;
        if (k + 1 < p.n) {
          generic_gemm<T>(cur, wk, d, smem, [&](int b, int64_t j, T v) { nxt[b * d + j] = act_apply<T>(p.mid, v); });
        } else {
          generic_gemm<T>(cur, wk, d, smem, [&](int b, int64_t j, T v) {
            if (b < rows) {
              const T s = act_apply<T>(p.post, v);
              h[b * d + j] = p.shortcut ? h[b * d + j] + s : s;
            }
          });
        }
        __syncthreads();  // nxt / h complete before the next layer reads them
      }
    }
  }
}

// Weight-gradient partials of the generic path: ws [gridDim.x, U, n, d, d], each block summing
// over its tiles in order (first tile stores), so the result is deterministic.
template <typename T>
__global__ void __launch_bounds__(kGenericThreads) backward_generic_kernel(BackwardParams<T> p) {
  SE_DYNAMIC_SMEM(T, smem);
  const int64_t d = p.d, n = p.n, tile_elems = kGenericRows * d, dd = d * d;
  const int64_t units = p.r_hi - p.r_lo;
  T* act = p.scratch + int64_t(blockIdx.x) * (n + 2) * tile_elems;  // [n][32][d]
  T* dzb[2] = {act + n * tile_elems, act + (n + 1) * tile_elems};  // [32][d] each
  const int64_t tiles = (p.B + kGenericRows - 1) / kGenericRows;
  int64_t it = 0;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++it) {
    const int64_t row0 = tile * kGenericRows;
    const int64_t rows = p.B - row0 < kGenericRows ? p.B - row0 : kGenericRows;
    T* g = p.g_out + row0 * d;  // g_out holds g_in on entry (the host copies it), updated in place
    for (int64_t r = p.r_hi - 1; r >= p.r_lo; --r) {
      __syncthreads();
      for (int64_t e = threadIdx.x; e < tile_elems; e += kGenericThreads) {
        const T v = e / d < rows ? p.saved[(r * p.B + row0) * d + e] : T(0);
        act[e] = act_apply<T>(p.pre, v);
      }
      __syncthreads();
      for (int64_t k = 0; k < n; ++k) {
        const T* ak = act + k * tile_elems;
        const T* wtk = p.wt + (r * n + k) * dd;
        if (k + 1 < n) {
          T* nxt = act + (k + 1) * tile_elems;
          generic_gemm<T>(ak, wtk, d, smem, [&](int b, int64_t j, T v) { nxt[b * d + j] = act_apply<T>(p.mid, v); });
        } else {
          T* dz = dzb[0];
          generic_gemm<T>(ak, wtk, d, smem, [&](int b, int64_t j, T v) {
            const T gv = b < rows ? g[b * d + j] : T(0);
            dz[b * d + j] = gv * act_deriv<T>(p.post, v, act_apply<T>(p.post, v));
          });
        }
        __syncthreads();
      }
      int cur = 0;
      for (int64_t k = n - 1; k >= 0; --k) {
        const T* ak = act + k * tile_elems;
        const T* dz = dzb[cur];
        T* dzn = dzb[1 - cur];
        T* slot = p.grad_w == nullptr ? nullptr : p.ws + ((int64_t(blockIdx.x) * units + (r - p.r_lo)) * n + k) * dd;
        T* gw = p.grad_w == nullptr ? nullptr : p.grad_w + (r * n + k) * dd;
        // (grad_w null: frozen weights, no weight gradients)
        for (int64_t e = threadIdx.x; gw != nullptr && e < dd; e += kGenericThreads) {
          const int64_t o = e / d, i = e % d;
          T s = T(0);
          for (int b = 0; b < kGenericRows; ++b) s = fma(dz[b * d + o], ak[b * d + i], s);
          if (p.atomic)
            atomicAdd(gw + e, s);
          else
            slot[e] = it == 0 ? s : slot[e] + s;
        }
        const T* wk = p.w + (r * n + k) * dd;
        if (k > 0) {
          generic_gemm<T>(dz, wk, d, smem, [&](int b, int64_t j, T v) {
            dzn[b * d + j] = v * deriv_from_output<T>(p.mid, ak[b * d + j]);
          });
        } else {
          generic_gemm<T>(dz, wk, d, smem, [&](int b, int64_t j, T v) {
            if (b < rows) {
              const T gi = v * deriv_from_output<T>(p.pre, ak[b * d + j]);
              g[b * d + j] = p.shortcut ? g[b * d + j] + gi : gi;
            }
          });
        }
        __syncthreads();
        cur = 1 - cur;
      }
    }
  }
}

// --------------------------------------------------------------------------------- utilities
// wt[L][a][b] = w[L][b][a] and (if wp) wp[L][a][b] = w[L][a][b], zero-padded from d to D; rounded
// to TF32 when tf32 (the tensor-core kernels read them as mma operands as they are).
template <typename T>
__global__ void prepare_weights_kernel(const T* w, int64_t layers, int64_t d, int64_t D, T* wt, T* wp, bool tf32) {
  const int64_t total = layers * D * D;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t L = idx / (D * D), rem = idx % (D * D), a = rem / D, b = rem % D;
    const bool in = a < d && b < d;
    const T vt = in ? w[(L * d + b) * d + a] : T(0);
    wt[idx] = tf32 ? round_tf32(vt) : vt;
    if (wp) {
      const T v = in ? w[(L * d + a) * d + b] : T(0);
      wp[idx] = tf32 ? round_tf32(v) : v;
    }
  }
}

// out[u][k][o][i] (o, i < d; out has stride d) = sum over parts of ws[part][u][k][o][i] (stride
// Dws), in part order, accumulated in double; `accumulate` adds to out instead of overwriting.
template <typename T>
__global__ void reduce_partials_kernel(const T* ws, int64_t parts, int64_t units, int64_t n, int64_t Dws, int64_t d,
                                       T* out, bool accumulate) {
  const int64_t total = units * n * d * d;
  const int64_t part_stride = units * n * Dws * Dws;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % d, t = idx / d, o = t % d, uk = t / d;
    const T* src = ws + uk * Dws * Dws + o * Dws + i;
    double s = accumulate ? double(out[idx]) : 0.0;
    for (int64_t q = 0; q < parts; ++q) s += double(src[q * part_stride]);
    out[idx] = T(s);
  }
}

// --------------------------------------------------------------------- fused-config registry
// One compiled fused configuration, type-erased for the planner.  The lists live in
// residual_stack_fused_f32.cu / _f64.cu (separate translation units: they compile in parallel).
template <typename T>
struct FusedEntry {
  int D, BM, threads;
  bool tensor_core;  // TF32 mma.sync kernels (float32, sm_80+)
  bool split;        // 3xTF32: operands split into two TF32 parts (float32 accuracy)
  size_t (*smem)(bool backward, int64_t n);
  void (*forward)(const ForwardParams<T>&, dim3, size_t, cudaStream_t);
  void (*backward)(const BackwardParams<T>&, dim3, size_t, cudaStream_t);
  cudaError_t (*set_smem)(bool backward, int bytes);  // opt in to > 48 KiB of dynamic shared memory
};

template <class Cfg>
FusedEntry<typename Cfg::T> make_fused_entry() {
  using T = typename Cfg::T;
  FusedEntry<T> e;
  e.D = Cfg::D;
  e.BM = Cfg::BM;
  e.threads = Cfg::THREADS;
  e.tensor_core = Cfg::kTensorCore;
  e.split = Cfg::kSplit;
  e.smem = &Cfg::smem_bytes;
  e.forward = [](const ForwardParams<T>& p, dim3 grid, size_t smem, cudaStream_t s) {
    SE_LAUNCH(forward_fused_kernel<Cfg>, grid, dim3(Cfg::THREADS), smem, s, p);
  };
  e.backward = [](const BackwardParams<T>& p, dim3 grid, size_t smem, cudaStream_t s) {
    SE_LAUNCH(backward_fused_kernel<Cfg>, grid, dim3(Cfg::THREADS), smem, s, p);
  };
  e.set_smem = [](bool backward, int bytes) -> cudaError_t {
    return backward ? cudaFuncSetAttribute(backward_fused_kernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
                    : cudaFuncSetAttribute(forward_fused_kernel<Cfg>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  };
  return e;
}

// The compiled configurations of each dtype, largest tile first per D.
template <typename T>
const std::vector<FusedEntry<T>>& fused_entries();
template <>
const std::vector<FusedEntry<float>>& fused_entries<float>();
template <>
const std::vector<FusedEntry<double>>& fused_entries<double>();
// The TF32 and 3xTF32 tensor-core configurations (residual_stack_fused_tf32.cu, _3xtf32.cu),
// largest tile first per D.
const std::vector<FusedEntry<float>>& fused_tf32_entries();
const std::vector<FusedEntry<float>>& fused_3xtf32_entries();

}  // namespace cuda_detail
}  // namespace shortcut_ext
