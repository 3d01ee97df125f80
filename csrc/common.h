// Shared by the CPU and CUDA host code: activation codes, their derivatives, argument checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <string>

namespace shortcut_ext {

enum class Act : int { Identity = 0, Relu = 1, Tanh = 2, SSigmoid = 3 };

// Parses an activation name; `arg` names the argument in the error message.
Act parse_activation(const std::string& arg, c10::string_view name);
const char* activation_name(Act a);

enum class Loss : int { Mse = 0, CrossEntropy = 1 };
Loss parse_loss(c10::string_view name);

// The matrix of residual_stack_hvp_part's products: the Hessian, its Gauss-Newton part G = J^T H_l J, its
// functional part F = H - G, or the empirical Fisher (1/B) sum_i grad l_i grad l_i^T.
enum class HvpMatrix : int { Hessian = 0, Ggn = 1, Functional = 2, EmpiricalFisher = 3 };
HvpMatrix parse_hvp_matrix(c10::string_view name);

// s(z).  ssigmoid(z) = 2 sigmoid(z) - 1 = tanh(z / 2).  relu is written so that NaN propagates, as
// in torch.relu (z > 0 ? z : 0 would turn NaN into 0 and hide a diverged run).
template <typename T>
C10_HOST_DEVICE inline T act_apply(Act a, T z) {
  switch (a) {
    case Act::Relu: return z < T(0) ? T(0) : z;
    case Act::Tanh: return std::tanh(z);
    case Act::SSigmoid: return std::tanh(z * T(0.5));
    default: return z;
  }
}

// s'(z) written through s = s(z) where that is cheaper (relu'(0) = 0, as autograd; at NaN the gradient
// passes, as torch's threshold_backward does).
template <typename T>
C10_HOST_DEVICE inline T act_deriv(Act a, T z, T s) {
  switch (a) {
    case Act::Relu: return z <= T(0) ? T(0) : T(1);
    case Act::Tanh: return T(1) - s * s;
    case Act::SSigmoid: return T(0.5) * (T(1) - s * s);
    default: return T(1);
  }
}

// s''(z) through s = s(z) (relu'' = 0, as autograd).
template <typename T>
C10_HOST_DEVICE inline T act_deriv2(Act a, T z, T s) {
  switch (a) {
    case Act::Tanh: return T(-2) * s * (T(1) - s * s);
    case Act::SSigmoid: return T(-0.5) * s * (T(1) - s * s);
    default: return T(0);
  }
}

// "float32", "float64", "int64", ...: dtype names as Python spells them, for error messages.
std::string dtype_name(at::ScalarType t);

struct StackShape {
  int64_t B, d, R, n;
};

// Checks x [B, d] and weights [R, n, d, d]: rank, shape, dtype (float32/float64, equal), device,
// contiguity.  `x_name` names the batch argument ("x" or "grad_y").
StackShape check_stack(const at::Tensor& x, const at::Tensor& weights, const char* x_name);

// Checks saved [R, B, d] against a stack shape.
// saved: the unit inputs [R, B, d], or (allow_layers) every layer's input [R, n, B, d].  With
// allow_layers (CPU) either may also be stored feature-major (strides [B d, 1, B], [n d B, d B, 1, B]).
void check_saved(const at::Tensor& saved, const at::Tensor& weights, const StackShape& s, bool allow_layers);

// Whether the CUDA residual-stack kernels run float32 products on TF32 tensor cores (process-wide,
// off by default; sm_80+, fused path, d <= 128): 0 no (float32 FMA), 1 TF32, 2 3xTF32 (each operand
// split into two TF32 parts, three products: float32 accuracy).  The setter returns the previous mode.
int cuda_tf32_mode();
int set_cuda_tf32_mode(int mode);

// A size in megabytes from the environment variable `name`, in bytes (`fallback_mb` when unset or
// empty): a whole number in [min_mb, INT64_MAX >> 20], else a ValueError naming the variable; `hint`
// follows the range in the message (e.g. " (0 disables the cache)").
int64_t env_megabytes(const char* name, int64_t fallback_mb, int64_t min_mb, const char* hint);

// Checks the HVP op's directions [k, R, n, d, d], its optional frozen read-out [q, d] (the loss is then
// taken of f P^T) and its targets [B, q] (q = d without a read-out; or [B] int64 class indices in [0, q)
// with cross_entropy) against the stack shape; returns the parsed loss.  Shared by CPU and CUDA.
Loss check_hvp_args(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& targets,
                    const at::Tensor& directions, c10::string_view loss_name, const StackShape& s,
                    const c10::optional<at::Tensor>& readout = c10::nullopt);

}  // namespace shortcut_ext
