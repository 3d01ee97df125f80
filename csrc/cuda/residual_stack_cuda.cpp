// CUDA host code of the residual-stack ops: argument checks (the CPU path's messages, from
// common.h), device guard, output allocation, current stream; kernels and their planning are in
// residual_stack_kernels.cu.
//
// Environment switches (read on every call; for tests and benchmarks):
//   SHORTCUT_EXT_CUDA_PATH=auto|fused|generic  force the fused (d <= 128) or the generic kernels
//   SHORTCUT_EXT_CUDA_TILE_ROWS=N              rows per batch tile of the fused kernels
//   SHORTCUT_EXT_CUDA_ATOMIC_GRAD=1            weight gradients by atomicAdd (not bitwise reproducible)
//   SHORTCUT_EXT_CUDA_WORKSPACE_MB=N           bound on the weight-gradient partial sums, and on the
//                                              generic backward's scratch (default 1024)
//   SHORTCUT_EXT_CUDA_VERBOSE=1                print the chosen kernels of each call to stderr
//   SHORTCUT_EXT_CUDA_HVP_MB=N                 scratch bound of residual_stack_hvp (default: half the
//                                              free device memory), the (1 + K) R n d^2 weight and
//                                              direction copies included; larger batches run in row
//                                              chunks (set it for bitwise-reproducible chunking)
// TF32 tensor cores for float32 are a process-wide setting (shortcut_ext.cuda_tf32), not a switch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "cuda/residual_stack_cuda.h"

namespace shortcut_ext {
namespace {

std::string env_str(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

int64_t env_int(const char* name, int64_t fallback) {
  const std::string v = env_str(name);
  if (v.empty()) return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  TORCH_CHECK_VALUE(end && *end == '\0', name, " must be an integer, got '", v, "'");
  return x;
}

cuda::Options read_options() {
  cuda::Options o;
  const std::string path = env_str("SHORTCUT_EXT_CUDA_PATH");
  if (path == "fused") {
    o.path = 1;
  } else if (path == "generic") {
    o.path = 2;
  } else {
    TORCH_CHECK_VALUE(path.empty() || path == "auto", "SHORTCUT_EXT_CUDA_PATH must be auto, fused or generic, got '",
                      path, "'");
  }
  o.tile_rows = int(env_int("SHORTCUT_EXT_CUDA_TILE_ROWS", 0));
  o.atomic_grad = env_int("SHORTCUT_EXT_CUDA_ATOMIC_GRAD", 0) != 0;
  o.workspace_bytes = env_megabytes("SHORTCUT_EXT_CUDA_WORKSPACE_MB", 1024, 1, "");
  o.tf32 = cuda_tf32_mode();
  return o;
}

cuda::StackArgs stack_args(const StackShape& s, bool shortcut, c10::string_view pre, c10::string_view mid,
                           c10::string_view post) {
  return {s.B,
          s.d,
          s.R,
          s.n,
          shortcut,
          parse_activation("act_pre", pre),
          parse_activation("act_mid", mid),
          parse_activation("act_post", post)};
}

// Workspaces from the caching allocator: freed when the call returns, reused only by later work
// on the same stream, so the kernels queued on it may still use them.
struct Workspaces {
  at::TensorOptions opts;
  std::vector<at::Tensor> held;
  cuda::Allocator allocator() {
    return [this](size_t bytes) -> void* {
      held.push_back(at::empty({int64_t(bytes)}, opts.dtype(at::kByte)));
      return held.back().data_ptr();
    };
  }
};

void maybe_report(const cuda::StackArgs& a, bool is_double, bool backward, const cuda::Options& o,
                  bool want_w = true) {
  if (env_int("SHORTCUT_EXT_CUDA_VERBOSE", 0) == 0) return;
  std::fprintf(stderr, "shortcut_ext cuda %s B=%lld d=%lld R=%lld n=%lld: %s\n", backward ? "backward" : "forward",
               (long long)a.B, (long long)a.d, (long long)a.R, (long long)a.n,
               cuda::describe_plan(a, is_double, backward, o, want_w).c_str());
}

std::tuple<at::Tensor, at::Tensor> residual_stack_forward_cuda(const at::Tensor& x_arg, const at::Tensor& weights_arg,
                                                               bool shortcut, c10::string_view act_pre,
                                                               c10::string_view act_mid, c10::string_view act_post,
                                                               bool save_inputs, bool save_layers) {
  (void)save_layers;  // the CUDA backward recomputes each unit on chip: it always saves unit inputs
  const StackShape s = check_stack(x_arg, weights_arg, "x");
  const cuda::StackArgs a = stack_args(s, shortcut, act_pre, act_mid, act_post);
  const c10::cuda::CUDAGuard guard(x_arg.device());
  const at::Tensor x = x_arg.contiguous(), weights = weights_arg.contiguous();
  const cuda::Options opt = read_options();
  at::Tensor y = at::empty_like(x);
  at::Tensor saved = save_inputs ? at::empty({s.R, s.B, s.d}, x.options()) : at::empty({0}, x.options());
  Workspaces ws{x.options()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  maybe_report(a, x.scalar_type() == at::kDouble, false, opt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_stack_forward_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_residual_stack_forward<scalar_t>(
        a, x.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
        save_inputs ? saved.data_ptr<scalar_t>() : nullptr, opt, ws.allocator(), stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, saved};
}

std::tuple<at::Tensor, at::Tensor> residual_stack_backward_cuda(const at::Tensor& grad_y_arg, const at::Tensor& weights_arg,
                                                                const at::Tensor& saved, bool shortcut,
                                                                c10::string_view act_pre, c10::string_view act_mid,
                                                                c10::string_view act_post, bool grad_weights) {
  const StackShape s = check_stack(grad_y_arg, weights_arg, "grad_y");
  check_saved(saved, weights_arg, s, /*allow_layers=*/false);
  const cuda::StackArgs a = stack_args(s, shortcut, act_pre, act_mid, act_post);
  const c10::cuda::CUDAGuard guard(grad_y_arg.device());
  const at::Tensor grad_y = grad_y_arg.contiguous(), weights = weights_arg.contiguous();
  const cuda::Options opt = read_options();
  at::Tensor grad_x = at::empty_like(grad_y);
  at::Tensor grad_w = grad_weights ? at::empty_like(weights) : at::empty({0}, weights.options());
  Workspaces ws{grad_y.options()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  maybe_report(a, grad_y.scalar_type() == at::kDouble, true, opt, grad_weights);
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "residual_stack_backward_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_residual_stack_backward<scalar_t>(
        a, grad_y.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>(),
        grad_x.data_ptr<scalar_t>(), grad_weights ? grad_w.data_ptr<scalar_t>() : nullptr, opt, ws.allocator(),
        stream));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_w};  // grad_weights=false: [0], as on the CPU (the kernels skipped the weight gradients)
}



std::tuple<at::Tensor, at::Tensor, at::Tensor> hvp_cuda(
    const at::Tensor& x_arg,       // [B, d]
    const at::Tensor& weights_arg,  // [R, n, d, d]
    const at::Tensor& targets_arg,  // [B, d], or [B] int64 class indices (cross_entropy)
    const at::Tensor& directions_arg,  // [k, R, n, d, d]
    bool shortcut, c10::string_view act_pre, c10::string_view act_mid, c10::string_view act_post,
    c10::string_view loss_name, const c10::optional<at::Tensor>& readout, HvpMatrix matrix) {
  const StackShape s = check_stack(x_arg, weights_arg, "x");
  const cuda::StackArgs a = stack_args(s, shortcut, act_pre, act_mid, act_post);
  const Loss loss = check_hvp_args(x_arg, weights_arg, targets_arg, directions_arg, loss_name, s, readout);
  const c10::cuda::CUDAGuard guard(x_arg.device());
  const at::Tensor x = x_arg.contiguous(), weights = weights_arg.contiguous();
  const at::Tensor targets = targets_arg.contiguous(), directions = directions_arg.contiguous();
  const at::Tensor P = readout.has_value() ? readout->contiguous() : at::Tensor();  // [q, d]: the loss of f P^T
  const int64_t q = P.defined() ? P.size(0) : 0;
  at::Tensor loss_out = at::zeros({}, x.options());
  at::Tensor grad_w = at::zeros_like(weights);
  at::Tensor hvps = at::zeros_like(directions);
  // B == 0: the loss of no samples is 0 (as reference.loss_fn), and so are its derivatives.
  if (s.B == 0) return {loss_out, grad_w, hvps};
  const bool by_class = targets.dim() == 1;
  // The kernels keep every unit's input and tangents for the rows they run (no checkpointing): a batch
  // whose scratch exceeds the budget runs in row chunks (hvp_bytes_per_row each).
  int64_t budget = env_megabytes("SHORTCUT_EXT_CUDA_HVP_MB", 0, 0, " (0: half the free device memory)");
  if (budget == 0) {
    size_t free_b = 0, total_b = 0;
    C10_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    budget = int64_t(free_b / 2);
  }
  const int64_t per_row = cuda::hvp_bytes_per_row(a, directions.size(0), x.element_size(), q, matrix);
  // the transposed copies of the weights and the K directions are allocated whatever the chunk size
  const int64_t fixed = (1 + directions.size(0)) * weights.numel() * x.element_size();
  const int64_t max_rows = std::max<int64_t>(1, std::max<int64_t>(budget - fixed, 0) / per_row);
  Workspaces ws{x.options()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_stack_hvp_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_residual_stack_hvp<scalar_t>(
        a, directions.size(0), loss, x.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
        by_class ? nullptr : targets.data_ptr<scalar_t>(), by_class ? targets.data_ptr<int64_t>() : nullptr,
        directions.data_ptr<scalar_t>(), loss_out.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>(),
        hvps.data_ptr<scalar_t>(), ws.allocator(), stream, max_rows, P.defined() ? P.data_ptr<scalar_t>() : nullptr,
        q, matrix));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss_out, grad_w, hvps};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_hvp_cuda(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& targets, const at::Tensor& directions,
    bool shortcut, c10::string_view act_pre, c10::string_view act_mid, c10::string_view act_post,
    c10::string_view loss, const c10::optional<at::Tensor>& readout) {
  return hvp_cuda(x, weights, targets, directions, shortcut, act_pre, act_mid, act_post, loss, readout,
                  HvpMatrix::Hessian);
}

// The products with G, F or the empirical Fisher (as residual_stack_hvp_part_cpu): the same kernels with the
// matrix's seeds and terms (residual_stack_hvp_cuda.cu, HvpParams::gn / functional / fisher).
std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_hvp_part_cuda(
    const at::Tensor& x, const at::Tensor& weights, const at::Tensor& targets, const at::Tensor& directions,
    bool shortcut, c10::string_view act_pre, c10::string_view act_mid, c10::string_view act_post,
    c10::string_view loss, c10::string_view matrix, const c10::optional<at::Tensor>& readout) {
  return hvp_cuda(x, weights, targets, directions, shortcut, act_pre, act_mid, act_post, loss, readout,
                  parse_hvp_matrix(matrix));
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_ext, CUDA, m) {
  m.impl("residual_stack_forward", &residual_stack_forward_cuda);
  m.impl("residual_stack_backward", &residual_stack_backward_cuda);
  m.impl("residual_stack_hvp", &residual_stack_hvp_cuda);
  m.impl("residual_stack_hvp_part", &residual_stack_hvp_part_cuda);
}

}  // namespace shortcut_ext
