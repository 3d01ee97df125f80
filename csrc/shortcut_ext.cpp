// Every op schema of shortcut_ext, in one place.  Kernels register per device in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA) with TORCH_LIBRARY_IMPL.
//
// Shapes: x [B, d], weights [R, n, d, d] (units x layers x out x in), saved [R, B, d] (the input of
// every unit) or [R, n, B, d] (the input of every layer), directions [k, R, n, d, d].  A plain stack is shortcut=false.
#include <torch/library.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "cpu/cpu_buffer_pool.h"
#include "cpu/cpu_gemm.h"
#include "cpu/cpu_schedule.h"

TORCH_LIBRARY(shortcut_ext, m) {
  // -> (y [B, d], saved): saved is [0] when save_inputs is false, else the unit inputs [R, B, d]; with
  // save_layers (CPU) every layer's input [R, n, B, d] (saved[r, 0] the unit input, saved[r, k] =
  // act_mid(z_{k-1})), and the backward recomputes nothing.  The CUDA kernels ignore save_layers:
  // their backward recomputes each unit on chip.
  m.def("residual_stack_forward(Tensor x, Tensor weights, bool shortcut, str act_pre, str act_mid, "
        "str act_post, bool save_inputs, bool save_layers=False) -> (Tensor, Tensor)");
  // -> (grad_x [B, d], grad_weights [R, n, d, d]); grad_weights=False: the weights are frozen, the second
  // output is empty ([0]) and the kernels skip the weight-gradient products (grad_x has the same bits)
  m.def("residual_stack_backward(Tensor grad_y, Tensor weights, Tensor saved, bool shortcut, str act_pre, "
        "str act_mid, str act_post, bool grad_weights=True) -> (Tensor, Tensor)");
  // -> (loss [] , grad [R, n, d, d], hvps [k, R, n, d, d]); targets [B, d], or [B] int64 class indices
  // with loss="cross_entropy"; directions [k, R, n, d, d]; readout: a frozen P [q, d], the loss then of
  // f P^T with targets [B, q] (or class indices in [0, q))
  m.def("residual_stack_hvp(Tensor x, Tensor weights, Tensor targets, Tensor directions, bool shortcut, "
        "str act_pre, str act_mid, str act_post, str loss, Tensor? readout=None) -> (Tensor, Tensor, Tensor)");
  // -> (loss [], grad [R, n, d, d], products [k, R, n, d, d]): residual_stack_hvp's, the products with one part
  // of the Hessian H = G + F: matrix "ggn" (the generalised Gauss-Newton matrix G = J^T H_l J), "functional"
  // (F = H - G) or "hessian"; or "empirical_fisher" ((1/B) sum_i grad l_i grad l_i^T).  CPU only: on CUDA,
  // shortcut_ext.residual_stack_hvp(..., matrix=) takes residual_stack_hvp at the outputs' own targets (G, F)
  // or the reference (the empirical Fisher).
  m.def("residual_stack_hvp_part(Tensor x, Tensor weights, Tensor targets, Tensor directions, bool shortcut, "
        "str act_pre, str act_mid, str act_post, str loss, str matrix, Tensor? readout=None) -> (Tensor, Tensor, Tensor)");
}

// residual_stack_hvp's outputs are values, not differentiable functions of its inputs: a backward
// through them raises "derivative for shortcut_ext::residual_stack_hvp is not implemented" instead of
// silently giving no gradient (shortcut_ext.residual_stack_hvp passes detached inputs anyway).
TORCH_LIBRARY_IMPL(shortcut_ext, Autograd, m) {
  m.impl("residual_stack_hvp", torch::autograd::autogradNotImplementedFallback());
  m.impl("residual_stack_hvp_part", torch::autograd::autogradNotImplementedFallback());
}

#ifndef SHORTCUT_EXT_TORCH_VERSION
#define SHORTCUT_EXT_TORCH_VERSION ""
#endif

namespace shortcut_ext {
// How this library was built; the Python module returns it as a dict.
std::map<std::string, std::string> build_info() {
  std::map<std::string, std::string> d;
#ifdef SHORTCUT_EXT_WITH_CUDA
  d["cuda"] = "1";
  d["cuda_version"] = SHORTCUT_EXT_CUDA_VERSION;
#else
  d["cuda"] = "";
  d["cuda_version"] = "";
#endif
  try {
    d["cpu_gemm"] = cpu_gemm_path();
    d["cpu_gemm_float64"] = cpu_gemm64_path();
  } catch (const c10::Error& e) {  // a bad SHORTCUT_EXT_CPU_GEMM: the kernels raise it; importing still works
    d["cpu_gemm"] = std::string("invalid: ") + e.what_without_backtrace();
    d["cpu_gemm_float64"] = d["cpu_gemm"];
  }
  d["cpu_tanh"] = cpu_tanh_path();
  d["torch_version"] = SHORTCUT_EXT_TORCH_VERSION;
#ifdef _OPENMP
  d["openmp"] = "1";
#else
  d["openmp"] = "";
#endif
  return d;
}
}  // namespace shortcut_ext

#ifdef TORCH_EXTENSION_NAME  // the Python module (setup.py); the CMake library has no Python
#include <torch/extension.h>

// C (+)= op(A) @ B in place, by the GEMM routine the CPU kernels use (gemm_nn, or gemm_tn when a_transposed:
// A is then [K, M]), on row-major views (last stride 1, the first stride the leading dimension), so that
// tests reach every path (SHORTCUT_EXT_CPU_GEMM) with any shape and leading dimension.  Returns the routine that
// ran (kernel16, brgemm, kernel64, blas, portable).
static std::string py_cpu_gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, bool a_transposed,
                               bool accumulate) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"a", &a}, {"b", &b}, {"c", &c}}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->device().is_cpu() && t->scalar_type() == c.scalar_type() &&
                          (t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble),
                      name, " must be a 2-D float32 or float64 CPU tensor of c's dtype, got ", t->sizes(), " ",
                      t->scalar_type(), " on ", t->device());
    TORCH_CHECK_VALUE(t->stride(1) == 1 && t->stride(0) >= std::max<int64_t>(1, t->size(1)),
                      name, " must be row-major (strides [ld >= columns, 1]), got strides ", t->strides());
  }
  const int64_t M = c.size(0), N = c.size(1), K = b.size(0);
  const int64_t am = a_transposed ? a.size(1) : a.size(0), ak = a_transposed ? a.size(0) : a.size(1);
  TORCH_CHECK_VALUE(am == M && ak == K && b.size(1) == N, "shapes do not chain: op(a) ", am, " x ", ak, ", b ",
                    b.sizes(), ", c ", c.sizes());
  std::string routine;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "cpu_gemm", [&] {
    std::vector<scalar_t> scratch(std::max<int64_t>(1, M * K));
    if (a_transposed)
      routine = shortcut_ext::gemm_tn<scalar_t>(M, N, K, a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(),
                                      b.stride(0), c.data_ptr<scalar_t>(), c.stride(0), accumulate, scratch.data());
    else
      routine = shortcut_ext::gemm_nn<scalar_t>(M, N, K, a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(),
                                      b.stride(0), c.data_ptr<scalar_t>(), c.stride(0), accumulate);
    shortcut_ext::gemm_release();
  });
  return routine;
}

// The lines that the kernels' prefetch cursor (cpu_gemm.h: Prefetch) requests for a panel of `rows` x
// `cols` elements (leading dimension ld) of x's dtype starting at x.data_ptr(), spread over `parts`
// kernel calls of `steps` steps each: per call, the byte offsets of the lines from x.data_ptr().
static std::vector<std::vector<int64_t>> py_prefetch_plan(const at::Tensor& x, int64_t rows, int64_t cols, int64_t ld,
                                                          int64_t parts, int64_t steps) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(parts >= 1 && steps >= 1, "parts and steps must be >= 1, got ", parts, " and ", steps);
  std::vector<std::vector<int64_t>> out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "prefetch_plan", [&] {
    shortcut_ext::Prefetch pf(x.data_ptr<scalar_t>(), rows, cols, ld);
    pf.parts = parts;
    const char* base = reinterpret_cast<const char*>(x.data_ptr<scalar_t>());
    for (int64_t c = 0; c < parts; ++c) {  // `parts` kernel calls of `steps` steps
      out.emplace_back();
      shortcut_ext::Prefetch::Pacer pace = pf.pacer(steps);
      for (int64_t s = 0; s < steps; ++s) pace.step([&](const char* line) { out.back().push_back(int64_t(line - base)); });
    }
  });
  return out;
}

// One training step of a stack under the mean squared error 0.5 * sum((out - t)^2) / m, where out is the stack's
// output y or, with a frozen read-out P [q, d], y @ P^T: the fused forward, the loss, its gradient grad_y and the
// fused backward, -> (loss, grad_weights [R, n, d, d]).  For train()'s direct step (shortcut_ext/train.py), where
// Python around the two ops cost as much as the kernels of a small net.  The ops are called below autograd (no
// graph is wanted), with autocast off, and the loss and grad_y by the same ATen ops, in the same order and on
// operands of the same strides, as the Python they replace (loss_fn, model.read's y @ P.T, and autograd's
// backward of them: DivBackward, MulBackward, PowBackward, then MmBackward's grad_out.mm(P)), so that the loss
// and the gradient are the same bits as model(x) and autograd give.
static std::tuple<double, at::Tensor> py_mse_step(const at::Tensor& x, const at::Tensor& weights,
                                                  const at::Tensor& targets, bool shortcut, c10::string_view act_pre,
                                                  c10::string_view act_mid, c10::string_view act_post,
                                                  bool save_layers, const c10::optional<at::Tensor>& readout) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape [B, d], got ", x.sizes());
  if (readout.has_value()) {
    const at::Tensor& P = *readout;
    TORCH_CHECK_VALUE(P.dim() == 2 && P.size(1) == x.size(1) && P.scalar_type() == x.scalar_type() &&
                          P.device() == x.device(),
                      "readout must have shape [q, d] = [q, ", x.size(1), "], dtype ", x.scalar_type(),
                      " and device ", x.device(), ", got ", P.sizes(), " ", P.scalar_type(), " on ",
                      P.device());
  }
  const int64_t q = readout.has_value() ? readout->size(0) : x.size(1);
  TORCH_CHECK_VALUE(targets.dim() == 2 && targets.size(0) == x.size(0) && targets.size(1) == q &&
                        targets.scalar_type() == x.scalar_type() && targets.device() == x.device(),
                    "targets must have shape [", x.size(0), ", ", q, "]", readout.has_value() ? " (the read-out's)" : "",
                    ", dtype ", x.scalar_type(), " and device ", x.device(), ", got ", targets.sizes(), " ",
                    targets.scalar_type(), " on ", targets.device());
  static const auto forward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("shortcut_ext::residual_stack_forward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, bool, c10::string_view,
                                                    c10::string_view, c10::string_view, bool, bool)>();
  static const auto backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("shortcut_ext::residual_stack_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                                    c10::string_view, c10::string_view, c10::string_view, bool)>();
  pybind11::gil_scoped_release no_gil;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  at::AutoDispatchBelowADInplaceOrView no_autograd;
  const at::Tensor xc = x.contiguous(), tc = targets.contiguous(), wc = weights.contiguous();
  auto [y, saved] = forward.call(xc, wc, shortcut, act_pre, act_mid, act_post, true, save_layers);
  // model.read: y @ P.T, a matmul of 2-d tensors (mm), P as the model holds it
  const at::Tensor out = readout.has_value() ? at::mm(y, readout->t()) : y;
  const int64_t m = std::max<int64_t>(out.size(0), 1);
  at::Tensor diff = at::sub(out, tc);
  const double loss = at::div(at::mul(at::pow(diff, 2).sum(), 0.5), m).item<double>();
  const at::Tensor half = at::ones({}, out.options()).div_(m).mul_(0.5);
  at::Tensor grad_y = diff.mul_(2.0).mul_(half);
  // MmBackward's gradient for y: grad_out.mm(mat2.t()), mat2 = P.t(), so P with its own strides
  if (readout.has_value()) grad_y = at::mm(grad_y, *readout).contiguous();
  return {loss, std::get<1>(backward.call(grad_y, wc, saved, shortcut, act_pre, act_mid, act_post, true))};
}

static pybind11::dict py_build_info() {
  pybind11::dict d;
  for (const auto& kv : shortcut_ext::build_info()) {
    if (kv.first == "cuda" || kv.first == "openmp")
      d[kv.first.c_str()] = !kv.second.empty();
    else
      d[kv.first.c_str()] = kv.second;
  }
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shortcut_ext compiled kernels (ops are registered under torch.ops.shortcut_ext)";
  m.def("build_info", &py_build_info, "How the extension was built");
  m.def(
      "cpu_tile_layout",
      [](int64_t d, bool saves, bool float64) {
        const auto t = saves ? shortcut_ext::cpu_tile_layout(d, float64) : shortcut_ext::cpu_forward_tile_layout(d, float64, false);
        return t == shortcut_ext::TileLayout::FeatureMajor ? "feature" : "batch";
      },
      pybind11::arg("d"), pybind11::arg("saves") = true, pybind11::arg("float64") = false,
      "Tile layout of the CPU kernels at width d ('feature' or 'batch'; SHORTCUT_EXT_CPU_LAYOUT overrides); "
      "saves=False: of a forward that saves nothing (inference), in float32 or float64");
  m.def(
      "cpu_schedule",
      [](const std::string& op, int64_t B, int64_t d, int64_t R, int64_t n, int64_t K) {
        TORCH_CHECK_VALUE(op == "backward" || op == "hvp", "op must be 'backward' or 'hvp', got '", op, "'");
        for (const auto& [name, v] : {std::pair<const char*, int64_t>{"B", B}, {"d", d}, {"R", R}, {"n", n}, {"K", K}}) {
          TORCH_CHECK_VALUE(v >= 1, name, " must be >= 1, got ", v);
        }
        const auto s = op == "backward" ? shortcut_ext::cpu_backward_schedule(B, d, R, n)
                                        : shortcut_ext::cpu_hvp_schedule(B, d, R, n, K);
        pybind11::dict out;
        out["tile_rows"] = s.tile_rows;
        out["tiles"] = s.tiles;
        out["slots"] = s.slots;
        out["chunk_units"] = s.chunk_units;
        return out;
      },
      pybind11::arg("op"), pybind11::arg("B"), pybind11::arg("d"), pybind11::arg("R"), pybind11::arg("n"),
      pybind11::arg("K") = 1,
      "The CPU kernels' row tiles at the current thread count (for tests: which paths a shape reaches)");
  m.def("cpu_gemm", &py_cpu_gemm, pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("c"),
        pybind11::arg("a_transposed") = false, pybind11::arg("accumulate") = false,
        "c (+)= op(a) @ b in place by the CPU kernels' GEMM (for tests: every path, any shape and leading dimension); "
        "returns the routine that ran: kernel16, brgemm, kernel64, blas or portable");
  m.def("prefetch_plan", &py_prefetch_plan, pybind11::arg("x"), pybind11::arg("rows"), pybind11::arg("cols"),
        pybind11::arg("ld"), pybind11::arg("parts") = 1, pybind11::arg("steps") = 1,
        "The cache lines the CPU kernels request ahead for a panel at x.data_ptr() (for tests): per call of `parts`, "
        "each of `steps` steps, the lines' byte offsets from x.data_ptr()");
  m.def("cpu_saved_feature_major_from", &shortcut_ext::cpu_saved_feature_major_from, pybind11::arg("float64") = false,
        "The least width d at which the CPU forward saves activations feature-major (by width and dtype only)");
  m.def(
      "cpu_cache_stats",
      []() {
        const auto st = shortcut_ext::cpu_pool_stats();
        pybind11::dict d;
        d["cached_bytes"] = st.cached_bytes;
        d["cached_blocks"] = st.cached_blocks;
        d["in_use_bytes"] = st.in_use_bytes;
        d["in_use_blocks"] = st.in_use_blocks;
        d["hits"] = st.hits;
        d["misses"] = st.misses;
        d["limit_bytes"] = st.limit_bytes;
        return d;
      },
      "The CPU output-buffer cache: bytes and blocks cached (free) and in use, hits, misses, limit");
  m.def("cuda_tf32_mode", &shortcut_ext::cuda_tf32_mode,
        "How float32 products of the CUDA residual-stack kernels run: 0 float32 FMA, 1 TF32, 2 3xTF32");
  m.def("set_cuda_tf32_mode", &shortcut_ext::set_cuda_tf32_mode, pybind11::arg("mode"),
        "Sets the TF32 tensor-core mode of the CUDA residual-stack kernels (0, 1, 2); returns the previous one");
  m.def("mse_step", &py_mse_step, pybind11::arg("x"), pybind11::arg("weights"), pybind11::arg("targets"),
        pybind11::arg("shortcut"), pybind11::arg("act_pre"), pybind11::arg("act_mid"), pybind11::arg("act_post"),
        pybind11::arg("save_layers") = false, pybind11::arg("readout") = pybind11::none(),
        "(loss, grad_weights) of 0.5 * sum((out - targets)^2) / B, out the stack's output y, or y @ readout.T with a "
        "frozen read-out [q, d]: the fused forward and backward and the loss in one call, the same bits as the op "
        "under autograd (train()'s direct step)");
  m.def("cpu_empty_cache", &shortcut_ext::cpu_pool_empty, "Frees every cached (unused) CPU output buffer");
}
#endif
