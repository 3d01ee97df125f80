// Launchers of the residual-stack kernels (residual_stack_kernels.cuh): choose a path and tile size,
// allocate workspaces through the caller's allocator, and run everything on the caller's stream.
//
// Compiles with nvcc; with SHORTCUT_EXT_CUDA_EMULATE it also compiles as host C++ and runs the same
// kernels on CPU threads (tests/test_cuda.py uses that where no GPU is present).
#include "cuda/residual_stack_cuda.h"
#include "cuda/residual_stack_kernels.cuh"

#include <algorithm>
#include <sstream>
#include <type_traits>
#include <vector>

namespace shortcut_ext {
namespace cuda {
namespace {

using namespace cuda_detail;

struct Device {
  int sms = 1, smem_optin = 48 * 1024, cc_major = 0;
};

Device query_device() {
  Device dev;
  int id = 0;
  const bool ok = cudaGetDevice(&id) == cudaSuccess &&
                  cudaDeviceGetAttribute(&dev.sms, cudaDevAttrMultiProcessorCount, id) == cudaSuccess &&
                  cudaDeviceGetAttribute(&dev.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, id) == cudaSuccess &&
                  cudaDeviceGetAttribute(&dev.cc_major, cudaDevAttrComputeCapabilityMajor, id) == cudaSuccess;
  // a failed query leaves the defaults, and its error is cleared so that the next launch check does not
  // report it; a pending error of someone else's earlier launch is left alone
  if (!ok) cudaGetLastError();
  return dev;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tensor-core configurations of T (float32 only) for Options::tf32 mode 1 or 2.
template <typename T>
const std::vector<FusedEntry<T>>& tf32_entries(int) {
  static const std::vector<FusedEntry<T>> none;
  return none;
}
template <>
const std::vector<FusedEntry<float>>& tf32_entries<float>(int mode) {
  return mode == 2 ? fused_3xtf32_entries() : fused_tf32_entries();
}

template <typename T>
struct Plan {
  const FusedEntry<T>* fused = nullptr;  // nullptr: generic path
  int64_t D = 0;                         // padded width (fused) or d (generic)
  int64_t tiles = 0;                     // row tiles of the batch
  int64_t grid = 0;                      // blocks per launch
  size_t smem = 0;
  int smem_limit = 48 * 1024;            // the device's opt-in maximum: the kernels' permitted dynamic smem
  int64_t units = 0;                     // backward: units per launch
  int64_t tiles_per_launch = 0;          // backward fused: row tiles per launch
  std::string error;
};

// want_w false (a backward without weight gradients, frozen weights): no partial sums to hold, so the
// workspace budget does not chunk the units or the row tiles, and every unit runs in one launch.
template <typename T>
Plan<T> make_plan(const StackArgs& a, bool backward, const Options& opt, bool want_w = true) {
  Plan<T> plan;
  const Device dev = query_device();
  // the kernels' dynamic shared-memory limit is set to the device's maximum (every call sets the same
  // value), not to each call's size: two threads launching one kernel never lower it under each other
  plan.smem_limit = dev.smem_optin;
  if (opt.path == 1 && a.d > 128) {
    std::ostringstream os;
    os << "the fused CUDA path needs d <= 128, got d = " << a.d << " (unset SHORTCUT_EXT_CUDA_PATH)";
    plan.error = os.str();
    return plan;
  }
  if (opt.path != 2 && a.d <= 128) {
    const int64_t D = a.d <= 16 ? 16 : a.d <= 32 ? 32 : a.d <= 64 ? 64 : 128;
    // TF32 when asked for, on float32 and sm_80+, where a tensor-core tile fits; else FFMA.
    std::vector<const std::vector<FusedEntry<T>>*> lists;
    if (opt.tf32 && std::is_same<T, float>::value && dev.cc_major >= 8) lists.push_back(&tf32_entries<T>(opt.tf32));
    lists.push_back(&fused_entries<T>());
    std::ostringstream available;
    for (const auto* list : lists) {
      std::vector<const FusedEntry<T>*> fits;
      for (const auto& e : *list) {
        if (e.D != D) continue;
        available << " " << e.BM << (e.tensor_core ? (e.split ? "(3xtf32)" : "(tf32)") : "");
        if (e.smem(backward, a.n) <= size_t(dev.smem_optin)) fits.push_back(&e);
      }
      if (opt.tile_rows > 0) {
        auto it = std::find_if(fits.begin(), fits.end(), [&](const FusedEntry<T>* e) { return e->BM == opt.tile_rows; });
        if (it != fits.end()) plan.fused = *it;
      } else if (!fits.empty()) {
        // The largest tile that still gives every SM a block; else the smallest tile.
        plan.fused = fits.back();
        for (const auto* e : fits)
          if (ceil_div(a.B, e->BM) >= dev.sms) {
            plan.fused = e;
            break;
          }
      }
      if (plan.fused) break;
    }
    if (plan.fused == nullptr && opt.tile_rows > 0) {
      std::ostringstream os;
      os << "SHORTCUT_EXT_CUDA_TILE_ROWS=" << opt.tile_rows << " is not a fused tile size that fits for D = " << D
         << ", n = " << a.n << (backward ? " (backward)" : " (forward)") << "; compiled:" << available.str();
      plan.error = os.str();
      return plan;
    }
    if (plan.fused == nullptr && opt.path == 1) {
      std::ostringstream os;
      os << "the fused CUDA path does not fit in shared memory for d = " << a.d << ", n = " << a.n
         << " (unset SHORTCUT_EXT_CUDA_PATH to use the generic path)";
      plan.error = os.str();
      return plan;
    }
  }
  if (plan.fused) {
    plan.D = plan.fused->D;
    plan.tiles = ceil_div(a.B, plan.fused->BM);
    plan.smem = plan.fused->smem(backward, a.n);
    plan.grid = plan.tiles;
    if (backward) {
      if (opt.atomic_grad || !want_w) {
        plan.units = a.R;
        plan.tiles_per_launch = plan.tiles;
      } else {
        const int64_t part = a.n * plan.D * plan.D * int64_t(sizeof(T));  // one tile, one unit
        const int64_t budget = std::max<int64_t>(opt.workspace_bytes, part);
        plan.units = std::max<int64_t>(1, std::min<int64_t>(a.R, budget / (part * std::max<int64_t>(1, plan.tiles))));
        plan.tiles_per_launch = std::max<int64_t>(1, std::min<int64_t>(plan.tiles, budget / (part * plan.units)));
      }
      plan.grid = plan.tiles_per_launch;
    }
  } else {
    plan.D = a.d;
    plan.tiles = ceil_div(a.B, kGenericRows);
    plan.smem = generic_smem_bytes<T>();
    if (!backward) {
      plan.grid = std::max<int64_t>(1, std::min<int64_t>(plan.tiles, 8 * int64_t(dev.sms)));
    } else {
      int64_t grid = std::max<int64_t>(1, std::min<int64_t>(plan.tiles, 2 * int64_t(dev.sms)));
      // each block's scratch holds n + 2 row tiles (8.7 GB for 264 blocks of a 2000-layer plain net at
      // d = 128): the workspace budget bounds it too (blocks loop over the tiles, so fewer is only slower)
      const int64_t scratch = (a.n + 2) * kGenericRows * a.d * int64_t(sizeof(T));
      grid = std::max<int64_t>(1, std::min<int64_t>(grid, opt.workspace_bytes / scratch));
      if (opt.atomic_grad || !want_w) {
        plan.units = a.R;
      } else {
        const int64_t part = a.n * a.d * a.d * int64_t(sizeof(T));  // one block, one unit
        grid = std::max<int64_t>(1, std::min<int64_t>(grid, opt.workspace_bytes / part));
        plan.units = std::max<int64_t>(1, std::min<int64_t>(a.R, opt.workspace_bytes / (part * grid)));
      }
      plan.grid = grid;
    }
  }
  return plan;
}

template <typename T>
T* alloc_elems(const Allocator& alloc, int64_t count) {
  return static_cast<T*>(alloc(size_t(std::max<int64_t>(count, 1)) * sizeof(T)));
}

// Transposed (and, if wp, plain) copies of the weights zero-padded to D, rounded to TF32 if tf32.
template <typename T>
cudaError_t prepare_weights(const T* w, int64_t layers, int64_t d, int64_t D, T* wt, T* wp, bool tf32,
                            cudaStream_t stream) {
  const int64_t total = layers * D * D;
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, threads), grid_stride_blocks_cap()));
  SE_LAUNCH(prepare_weights_kernel<T>, dim3(unsigned(blocks)), dim3(threads), 0, stream, w, layers, d, D, wt, wp,
            tf32);
  return cudaGetLastError();
}

template <typename T>
cudaError_t reduce_partials(const T* ws, int64_t parts, int64_t units, int64_t n, int64_t Dws, int64_t d, T* out,
                            bool accumulate, cudaStream_t stream) {
  const int64_t total = units * n * d * d;
  const int threads = 256;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(total, threads), grid_stride_blocks_cap()));
  SE_LAUNCH(reduce_partials_kernel<T>, dim3(unsigned(blocks)), dim3(threads), 0, stream, ws, parts, units, n, Dws, d,
            out, accumulate);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_residual_stack_forward(const StackArgs& a, const T* x, const T* weights, T* y, T* saved,
                                          const Options& opt, const Allocator& alloc, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  const Plan<T> plan = make_plan<T>(a, false, opt);
  TORCH_CHECK_VALUE(plan.error.empty(), plan.error);
  const int64_t layers = a.R * a.n;
  T* wt = alloc_elems<T>(alloc, layers * plan.D * plan.D);
  const bool tf32 = plan.fused && plan.fused->tensor_core && !plan.fused->split;  // 3xTF32 splits in registers
  cudaError_t err = prepare_weights<T>(weights, layers, a.d, plan.D, wt, nullptr, tf32, stream);
  if (err != cudaSuccess) return err;

  ForwardParams<T> p{x, wt, y, saved, a.B, a.d, a.R, a.n, a.shortcut, a.pre, a.mid, a.post, nullptr};
  if (plan.fused) {
    err = plan.fused->set_smem(false, std::max(int(plan.smem), plan.smem_limit));
    if (err != cudaSuccess) return err;
    plan.fused->forward(p, dim3(unsigned(plan.grid)), plan.smem, stream);
    return cudaGetLastError();
  }
  p.scratch = alloc_elems<T>(alloc, plan.grid * 2 * kGenericRows * a.d);
  SE_LAUNCH(forward_generic_kernel<T>, dim3(unsigned(plan.grid)), dim3(kGenericThreads), plan.smem, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_residual_stack_backward(const StackArgs& a, const T* grad_y, const T* weights, const T* saved,
                                           T* grad_x, T* grad_w, const Options& opt, const Allocator& alloc,
                                           cudaStream_t stream) {
  const int64_t layers = a.R * a.n;
  cudaError_t err;
  // grad_w null: no weight gradients (frozen weights); the kernels skip their products and partial sums
  if (a.B == 0) return grad_w ? cudaMemsetAsync(grad_w, 0, size_t(layers * a.d * a.d) * sizeof(T), stream) : cudaSuccess;
  const bool want_w = grad_w != nullptr;
  const Plan<T> plan = make_plan<T>(a, true, opt, want_w);
  TORCH_CHECK_VALUE(plan.error.empty(), plan.error);
  const int64_t D = plan.D;

  // Padded W^T for the recompute, padded W for the data gradient (the user's weights when no
  // padding or rounding is needed: same layout, and cp.async needs only 16-byte alignment).
  const bool tf32 = plan.fused && plan.fused->tensor_core && !plan.fused->split;  // 3xTF32 splits in registers
  T* wt = alloc_elems<T>(alloc, layers * D * D);
  const bool reuse_w = D == a.d && !tf32 && (reinterpret_cast<uintptr_t>(weights) % 16 == 0);
  T* wp = reuse_w ? nullptr : alloc_elems<T>(alloc, layers * D * D);
  err = prepare_weights<T>(weights, layers, a.d, D, wt, wp, tf32, stream);
  if (err != cudaSuccess) return err;

  BackwardParams<T> p{};
  p.saved = saved;
  p.wt = wt;
  p.w = reuse_w ? weights : wp;
  p.grad_w = grad_w;
  p.B = a.B;
  p.d = a.d;
  p.R = a.R;
  p.n = a.n;
  p.shortcut = a.shortcut;
  p.atomic = opt.atomic_grad;
  p.pre = a.pre;
  p.mid = a.mid;
  p.post = a.post;
  if (opt.atomic_grad && want_w) {
    err = cudaMemsetAsync(grad_w, 0, size_t(layers * a.d * a.d) * sizeof(T), stream);
    if (err != cudaSuccess) return err;
  }

  if (plan.fused) {
    err = plan.fused->set_smem(true, std::max(int(plan.smem), plan.smem_limit));
    if (err != cudaSuccess) return err;
    const int64_t U = plan.units, TPL = plan.tiles_per_launch;
    if (!opt.atomic_grad && want_w) p.ws = alloc_elems<T>(alloc, TPL * U * a.n * D * D);
    // Row chunks are independent; within one, unit chunks run last to first, carrying the
    // gradient of the chunk boundary in grad_x.
    for (int64_t t0 = 0; t0 < plan.tiles; t0 += TPL) {
      const int64_t tiles = std::min<int64_t>(TPL, plan.tiles - t0);
      bool first = true;
      for (int64_t r_hi = a.R; r_hi > 0; r_hi -= U) {
        p.r_hi = r_hi;
        p.r_lo = std::max<int64_t>(0, r_hi - U);
        p.tile0 = t0;
        p.g_in = first ? grad_y : grad_x;
        p.g_out = grad_x;
        first = false;
        plan.fused->backward(p, dim3(unsigned(tiles)), plan.smem, stream);
        if ((err = cudaGetLastError()) != cudaSuccess) return err;
        if (!opt.atomic_grad && want_w) {
          err = reduce_partials<T>(p.ws, tiles, p.r_hi - p.r_lo, a.n, D, a.d, grad_w + p.r_lo * a.n * a.d * a.d,
                                   t0 > 0, stream);
          if (err != cudaSuccess) return err;
        }
      }
    }
    return cudaSuccess;
  }

  // generic: the kernel updates the gradient in place in grad_x
  err = cudaMemcpyAsync(grad_x, grad_y, size_t(a.B * a.d) * sizeof(T), cudaMemcpyDeviceToDevice, stream);
  if (err != cudaSuccess) return err;
  const int64_t U = plan.units;
  p.g_in = grad_x;
  p.g_out = grad_x;
  p.scratch = alloc_elems<T>(alloc, plan.grid * (a.n + 2) * kGenericRows * a.d);
  if (!opt.atomic_grad && want_w) p.ws = alloc_elems<T>(alloc, plan.grid * U * a.n * a.d * a.d);
  for (int64_t r_hi = a.R; r_hi > 0; r_hi -= U) {
    p.r_hi = r_hi;
    p.r_lo = std::max<int64_t>(0, r_hi - U);
    SE_LAUNCH(backward_generic_kernel<T>, dim3(unsigned(plan.grid)), dim3(kGenericThreads), plan.smem, stream, p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    if (!opt.atomic_grad && want_w) {
      err = reduce_partials<T>(p.ws, plan.grid, p.r_hi - p.r_lo, a.n, a.d, a.d, grad_w + p.r_lo * a.n * a.d * a.d,
                               false, stream);
      if (err != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

std::string describe_plan(const StackArgs& a, bool is_double, bool backward, const Options& opt, bool want_w) {
  auto describe = [&](auto plan) {
    std::ostringstream os;
    if (!plan.error.empty()) return "error: " + plan.error;
    if (plan.fused)
      os << (!plan.fused->tensor_core ? "fused D=" : plan.fused->split ? "fused-3xtf32 D=" : "fused-tf32 D=") << plan.D << " BM=" << plan.fused->BM << " threads=" << plan.fused->threads;
    else
      os << "generic BM=" << kGenericRows << " threads=" << kGenericThreads;
    os << " smem=" << plan.smem << " grid=" << plan.grid;
    if (backward)
      os << " units_per_launch=" << plan.units << (plan.fused ? " tiles_per_launch=" + std::to_string(plan.tiles_per_launch) : "")
         << (!want_w ? " no-weight-gradients" : opt.atomic_grad ? " atomic" : " deterministic");
    return os.str();
  };
  return is_double ? describe(make_plan<double>(a, backward, opt, want_w))
                   : describe(make_plan<float>(a, backward, opt, want_w));
}

template cudaError_t launch_residual_stack_forward<float>(const StackArgs&, const float*, const float*, float*,
                                                          float*, const Options&, const Allocator&, cudaStream_t);
template cudaError_t launch_residual_stack_forward<double>(const StackArgs&, const double*, const double*, double*,
                                                           double*, const Options&, const Allocator&, cudaStream_t);
template cudaError_t launch_residual_stack_backward<float>(const StackArgs&, const float*, const float*, const float*,
                                                           float*, float*, const Options&, const Allocator&,
                                                           cudaStream_t);
template cudaError_t launch_residual_stack_backward<double>(const StackArgs&, const double*, const double*,
                                                            const double*, double*, double*, const Options&,
                                                            const Allocator&, cudaStream_t);

}  // namespace cuda
}  // namespace shortcut_ext
