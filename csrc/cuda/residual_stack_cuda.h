// Interface between the CUDA host code (residual_stack_cuda.cpp: checks, device guard, output
// allocation) and the kernels (residual_stack_kernels.cu: planning, workspaces, launches).  Plain
// pointers and sizes only, so the kernel file needs no torch CUDA headers.
//
// Shapes: x, y, grad_y, grad_x [B, d]; weights, grad_w [R, n, d, d] (units x layers x out x in);
// saved [R, B, d] (the input of every unit).  All row-major and contiguous, on one device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "common.h"

#ifdef SHORTCUT_EXT_CUDA_EMULATE
#include "cuda/emulate/emulation.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace shortcut_ext {
namespace cuda {

struct StackArgs {
  int64_t B;  // rows (samples)
  int64_t d;  // features
  int64_t R;  // units
  int64_t n;  // layers per unit
  bool shortcut;
  Act pre, mid, post;
};

// Knobs read from the environment by the host code (see residual_stack_cuda.cpp); the defaults
// are what a plain call gets.
struct Options {
  // 0: automatic; 1: the fused path templated on d (d <= 128, error if it cannot run); 2: the
  // generic path (any d, activations in global scratch).
  int path = 0;
  // Rows per batch tile of the fused path; 0 chooses.  Must be one of the compiled tile sizes.
  int tile_rows = 0;
  // Weight gradients by atomicAdd from every tile instead of per-tile partial sums reduced in a
  // fixed order.  Faster, but float results then vary from run to run in the last bits.
  bool atomic_grad = false;
  // Bound on the per-tile weight-gradient partial sums; units are processed in chunks to fit.
  int64_t workspace_bytes = int64_t(1) << 30;
  // float32 products on TF32 tensor cores (sm_80+, d <= 128): 1 TF32 (~1e-3 relative error per
  // product instead of float32's ~1e-7), 2 3xTF32 (float32 accuracy, three mma per product).  0
  // (float32 FMA) unless asked for (shortcut_ext.cuda_tf32()).
  int tf32 = 0;
};

// Device memory that stays valid until the stream has run every launch made by the call
// (the host passes the caching allocator; the emulation passes malloc).
using Allocator = std::function<void*(size_t bytes)>;

// y = stack(x); saved[r] = input of unit r when saved != nullptr.  Returns the first CUDA error.
template <typename T>
cudaError_t launch_residual_stack_forward(const StackArgs& a, const T* x, const T* weights, T* y, T* saved,
                                          const Options& opt, const Allocator& alloc, cudaStream_t stream);

// grad_x = dL/dx, grad_w = dL/dweights from grad_y = dL/dy and the saved unit inputs; grad_w null: dL/dx only
// (frozen weights: the weight-gradient products, partial sums and their reduction are skipped).
template <typename T>
cudaError_t launch_residual_stack_backward(const StackArgs& a, const T* grad_y, const T* weights, const T* saved,
                                           T* grad_x, T* grad_w, const Options& opt, const Allocator& alloc,
                                           cudaStream_t stream);

// Loss, gradient and K Hessian-vector products of the stack (Pearlmutter's R-operator, as the CPU
// kernel residual_stack_hvp_cpu.cpp; kernels in residual_stack_hvp_cuda.cu): loss_out [], grad_w
// [R, n, d, d], hvps [K, R, n, d, d] from x [B, d], directions [K, R, n, d, d] and either targets
// [B, d] (classes null) or class indices classes [B] (targets null, cross entropy only).  Every
// output element is written (B == 0 or d == 0: nothing is launched; the host returns zeros).
// max_rows > 0: at most that many rows at a time (row chunks; scratch of hvp_bytes_per_row each).
// readout: a frozen read-out P [q, d] (contiguous), the loss then being that of f P^T with targets
// [B, q] or classes in [0, q); null: the loss of f (q unused).
// matrix: the products with the Hessian, or with its part G or F, or with the empirical Fisher (common.h).
template <typename T>
cudaError_t launch_residual_stack_hvp(const StackArgs& a, int64_t K, Loss loss, const T* x, const T* weights,
                                      const T* targets, const int64_t* classes, const T* directions, T* loss_out,
                                      T* grad_w, T* hvps, const Allocator& alloc, cudaStream_t stream,
                                      int64_t max_rows = 0, const T* readout = nullptr, int64_t q = 0,
                                      HvpMatrix matrix = HvpMatrix::Hessian);

// Scratch bytes per batch row of launch_residual_stack_hvp (q: the read-out's rows, 0 without one; matrix: as its).
int64_t hvp_bytes_per_row(const StackArgs& a, int64_t K, size_t itemsize, int64_t q = 0,
                          HvpMatrix matrix = HvpMatrix::Hessian);

// Which kernels a call with these arguments would use, e.g. "fused D=128 BM=64 threads=256 smem=155648
// units_per_launch=7" or "generic BM=32 ..." (for tests and benchmarks); errors are reported as text
// starting with "error: ".
// want_w false: the backward without weight gradients (frozen weights), which the workspace does not chunk.
std::string describe_plan(const StackArgs& a, bool is_double, bool backward, const Options& opt, bool want_w = true);

}  // namespace cuda
}  // namespace shortcut_ext
