#include "common.h"

#include <torch/library.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <limits>

namespace shortcut_ext {

namespace {
std::atomic<int> g_cuda_tf32{0};
}  // namespace

int cuda_tf32_mode() { return g_cuda_tf32.load(); }
int set_cuda_tf32_mode(int mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "cuda_tf32 mode must be 0 (off), 1 (tf32) or 2 (3xtf32), got ", mode);
  return g_cuda_tf32.exchange(mode);
}

Act parse_activation(const std::string& arg, c10::string_view name) {
  if (name == "identity") return Act::Identity;
  if (name == "relu") return Act::Relu;
  if (name == "tanh") return Act::Tanh;
  if (name == "ssigmoid") return Act::SSigmoid;
  TORCH_CHECK_VALUE(false, arg, " must be one of identity, relu, tanh, ssigmoid, got '", std::string(name), "'");
}

const char* activation_name(Act a) {
  switch (a) {
    case Act::Relu: return "relu";
    case Act::Tanh: return "tanh";
    case Act::SSigmoid: return "ssigmoid";
    default: return "identity";
  }
}

Loss parse_loss(c10::string_view name) {
  if (name == "mse") return Loss::Mse;
  if (name == "cross_entropy") return Loss::CrossEntropy;
  TORCH_CHECK_VALUE(false, "loss must be one of mse, cross_entropy, got '", std::string(name), "'");
}

HvpMatrix parse_hvp_matrix(c10::string_view name) {
  if (name == "hessian") return HvpMatrix::Hessian;
  if (name == "ggn") return HvpMatrix::Ggn;
  if (name == "functional") return HvpMatrix::Functional;
  if (name == "empirical_fisher") return HvpMatrix::EmpiricalFisher;
  TORCH_CHECK_VALUE(false, "matrix must be one of hessian, ggn, functional, empirical_fisher, got '",
                    std::string(name), "'");
}

static std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

int64_t env_megabytes(const char* name, int64_t fallback_mb, int64_t min_mb, const char* hint) {
  const char* env = std::getenv(name);
  if (!env || !*env) return fallback_mb << 20;
  constexpr long long kMaxMb = std::numeric_limits<int64_t>::max() >> 20;  // the byte count fits in int64
  errno = 0;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && errno != ERANGE && mb >= min_mb && mb <= kMaxMb, name,
                    " must be a whole number of megabytes in [", min_mb, ", ", kMaxMb, "]", hint, ", got '", env,
                    "'");
  return int64_t(mb) << 20;
}

StackShape check_stack(const at::Tensor& x, const at::Tensor& weights, const char* x_name) {
  TORCH_CHECK_VALUE(x.layout() == at::kStrided, x_name, " must be a dense (strided) tensor, got layout ", x.layout());
  TORCH_CHECK_VALUE(weights.layout() == at::kStrided, "weights must be a dense (strided) tensor, got layout ",
                    weights.layout());
  TORCH_CHECK_VALUE(x.dim() == 2, x_name, " must have shape [B, d], got ", shape_str(x));
  TORCH_CHECK_VALUE(weights.dim() == 4, "weights must have shape [R, n, d, d], got ", shape_str(weights));
  const int64_t d = x.size(1);
  TORCH_CHECK_VALUE(weights.size(2) == d && weights.size(3) == d,
                    "weights must have shape [R, n, d, d] with d == ", x_name, ".size(1) == ", d, ", got ",
                    shape_str(weights));
  TORCH_CHECK_VALUE(weights.size(0) >= 1 && weights.size(1) >= 1,
                    "weights must have R >= 1 units and n >= 1 layers per unit, got ", shape_str(weights));
  TORCH_CHECK_VALUE(d >= 1, x_name, " must have d >= 1 features, got ", shape_str(x));
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, x_name,
                   " must be float32 or float64, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK_TYPE(weights.scalar_type() == x.scalar_type(), x_name, " and weights must have the same dtype, got ",
                   x_name, ": ", dtype_name(x.scalar_type()), ", weights: ", dtype_name(weights.scalar_type()));
  TORCH_CHECK_VALUE(x.device() == weights.device(), x_name, " and weights must be on the same device, got ", x_name,
                    ": ", x.device(), ", weights: ", weights.device());
  // any strides: the ops take contiguous copies where needed (contiguous_inputs); an exported or traced
  // graph drops a caller's .contiguous() that was a no-op on its example input
  return {x.size(0), d, weights.size(0), weights.size(1)};
}

void check_saved(const at::Tensor& saved, const at::Tensor& weights, const StackShape& s, bool allow_layers) {
  const bool units = saved.dim() == 3 && saved.size(0) == s.R && saved.size(1) == s.B && saved.size(2) == s.d;
  const bool layers = allow_layers && saved.dim() == 4 && saved.size(0) == s.R && saved.size(1) == s.n &&
                      saved.size(2) == s.B && saved.size(3) == s.d;
  if (allow_layers) {
    TORCH_CHECK_VALUE(units || layers, "saved must be the unit inputs of shape [R, B, d] = [", s.R, ", ", s.B, ", ",
                      s.d, "] or the layer inputs of shape [R, n, B, d] = [", s.R, ", ", s.n, ", ", s.B, ", ", s.d,
                      "] returned by residual_stack_forward(save_inputs=True), got ", shape_str(saved));
  } else {
    TORCH_CHECK_VALUE(units, "saved must be the unit inputs of shape [R, B, d] = [", s.R, ", ", s.B, ", ", s.d,
                      "] returned by residual_stack_forward(save_inputs=True) on this device, got ",
                      shape_str(saved));
  }
  TORCH_CHECK_TYPE(saved.scalar_type() == weights.scalar_type(), "saved must have dtype ", dtype_name(weights.scalar_type()),
                   ", got ", dtype_name(saved.scalar_type()));
  TORCH_CHECK_VALUE(saved.device() == weights.device(), "saved must be on ", weights.device(), ", got ",
                    saved.device());
  // the CPU forward stores activations feature-major: strides [B d, 1, B] ([n d B, d B, 1, B])
  const bool feature_major =
      allow_layers && ((units && saved.stride(0) == s.B * s.d && saved.stride(1) == 1 && saved.stride(2) == s.B) ||
                       (layers && saved.stride(0) == s.n * s.d * s.B && saved.stride(1) == s.d * s.B &&
                        saved.stride(2) == 1 && saved.stride(3) == s.B));
  TORCH_CHECK_VALUE(saved.is_contiguous() || feature_major, "saved must be contiguous",
                    allow_layers ? " (or feature-major: strides [B*d, 1, B], or [n*d*B, d*B, 1, B] for layer inputs)"
                                 : "",
                    " as residual_stack_forward returns it, got strides ", saved.strides());
}

// Checks targets and directions against the stack shape; returns the loss.
Loss check_hvp_args(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& targets,
                    const at::Tensor& directions, c10::string_view loss_name, const StackShape& s,
                    const c10::optional<at::Tensor>& readout) {
  const Loss loss = parse_loss(loss_name);
  // directions [K, R, n, d, d]
  TORCH_CHECK_VALUE(directions.dim() == 5 && directions.size(1) == s.R && directions.size(2) == s.n &&
                        directions.size(3) == s.d && directions.size(4) == s.d,
                    "directions must have shape [k, R, n, d, d] = [k, ", s.R, ", ", s.n, ", ", s.d, ", ", s.d,
                    "], got ", shape_str(directions));
  TORCH_CHECK_VALUE(directions.size(0) >= 1,
                    "directions must hold k >= 1 directions (shape [k, R, n, d, d]), got ", shape_str(directions));
  TORCH_CHECK_TYPE(directions.scalar_type() == weights.scalar_type(), "directions must have dtype ",
                   dtype_name(weights.scalar_type()), " like weights, got ", dtype_name(directions.scalar_type()));
  TORCH_CHECK_VALUE(directions.device() == weights.device(), "directions must be on ", weights.device(), " like weights, got ",
                    directions.device());
  // the read-out P [q, d]: the loss is that of f P^T [B, q], the targets are in its q columns
  int64_t q = s.d;
  const char* w = "d";  // the targets' width as the messages name it
  if (readout.has_value()) {
    const at::Tensor& P = *readout;
    TORCH_CHECK_VALUE(P.dim() == 2 && P.size(1) == s.d && P.size(0) >= 1,
                      "readout must have shape [q, d] = [q, ", s.d, "] with q >= 1 (it maps the stack's output to "
                      "the loss's q columns), got ", shape_str(P));
    TORCH_CHECK_TYPE(P.scalar_type() == x.scalar_type(), "readout must have dtype ", dtype_name(x.scalar_type()),
                     " like x, got ", dtype_name(P.scalar_type()));
    TORCH_CHECK_VALUE(P.device() == x.device(), "readout must be on ", x.device(), " like x, got ", P.device());
    q = P.size(0);
    w = "q";
  }
  // targets
  TORCH_CHECK_VALUE(targets.device() == x.device(), "targets must be on ", x.device(), " like x, got ", targets.device());
  if (targets.dim() == 1) {
    TORCH_CHECK_VALUE(loss == Loss::CrossEntropy, "targets must have shape [B, ", w, "] = [", s.B, ", ", q,
                      "] for loss='mse', got ", shape_str(targets),
                      " (class indices [B] are accepted only with loss='cross_entropy')");
    TORCH_CHECK_VALUE(targets.size(0) == s.B, "targets must have shape [B] = [", s.B,
                      "] (class indices) or [B, ", w, "] = [", s.B, ", ", q, "] (probabilities), got ",
                      shape_str(targets));
    TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "class-index targets [B] must be int64, got ",
                     dtype_name(targets.scalar_type()));
    if (s.B > 0) {
      const int64_t lo = targets.min().item<int64_t>(), hi = targets.max().item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < q, "class-index targets must lie in [0, ", w, ") = [0, ", q,
                        "), got values in [", lo, ", ", hi, "]");
    }
  } else {
    TORCH_CHECK_VALUE(targets.dim() == 2 && targets.size(0) == s.B && targets.size(1) == q,
                      "targets must have shape [B, ", w, "] = [", s.B, ", ", q, "]",
                      loss == Loss::CrossEntropy ? " (probabilities) or [B] (class indices)" : "",
                      ", got ", shape_str(targets));
    TORCH_CHECK_TYPE(targets.scalar_type() == x.scalar_type(), "targets [B, ", w, "] must have dtype ",
                     dtype_name(x.scalar_type()), " like x, got ", dtype_name(targets.scalar_type()));
  }
  return loss;
}

}  // namespace shortcut_ext
