// C++ test (ctest): the registered CPU ops against a libtorch reference built from at:: ops and
// differentiated by torch::autograd, through the dispatcher exactly as Python calls them.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  } else {
    std::printf("ok: %s\n", what.c_str());
  }
}

torch::Tensor act(const std::string& a, const torch::Tensor& z) {
  if (a == "relu") return torch::relu(z);
  if (a == "tanh") return torch::tanh(z);
  if (a == "ssigmoid") return 2 * torch::sigmoid(z) - 1;
  return z;
}

torch::Tensor reference(const torch::Tensor& x, const torch::Tensor& w, bool shortcut, const std::string& pre,
                        const std::string& mid, const std::string& post) {
  torch::Tensor h = x;
  for (int64_t r = 0; r < w.size(0); ++r) {
    torch::Tensor a = act(pre, h);
    for (int64_t k = 0; k < w.size(1); ++k) {
      a = torch::matmul(a, w[r][k].t());
      if (k + 1 < w.size(1)) a = act(mid, a);
    }
    a = act(post, a);
    h = shortcut ? h + a : a;
  }
  return h;
}

using FwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, bool, c10::string_view,
                                                 c10::string_view, c10::string_view, bool, bool);
using BwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                                 c10::string_view, c10::string_view, c10::string_view, bool);

void check_case(int64_t B, int64_t d, int64_t R, int64_t n, bool shortcut, const std::string& pre,
                const std::string& mid, const std::string& post, bool layers) {
  auto fwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("shortcut_ext::residual_stack_forward", "")
                 .typed<FwdFn>();
  auto bwd = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("shortcut_ext::residual_stack_backward", "")
                 .typed<BwdFn>();
  auto opts = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor x = torch::randn({B, d}, opts).requires_grad_(true);
  torch::Tensor w = (torch::randn({R, n, d, d}, opts) * (0.6 / std::sqrt(double(d)))).requires_grad_(true);
  torch::Tensor gy = torch::randn({B, d}, opts);
  at::Tensor y, saved;
  {
    torch::NoGradGuard ng;
    std::tie(y, saved) = fwd.call(x.detach(), w.detach(), shortcut, pre, mid, post, true, layers);
  }
  torch::Tensor y_ref = reference(x, w, shortcut, pre, mid, post);
  auto grads = torch::autograd::grad({y_ref}, {x, w}, {gy});
  at::Tensor gx, gw;
  std::tie(gx, gw) = bwd.call(gy, w.detach(), saved, shortcut, pre, mid, post, true);
  // frozen weights (grad_weights=false): the same grad_x bit for bit, and an empty second output
  at::Tensor gx_only, gw_none;
  std::tie(gx_only, gw_none) = bwd.call(gy, w.detach(), saved, shortcut, pre, mid, post, false);
  const std::string name = "B=" + std::to_string(B) + " d=" + std::to_string(d) + " R=" + std::to_string(R) +
                           " n=" + std::to_string(n) + (layers ? " layers" : "") + (shortcut ? " shortcut " : " plain ") + pre + "/" + mid +
                           "/" + post;
  expect(torch::allclose(y, y_ref.detach(), 1e-10, 1e-12), "forward " + name);
  expect(torch::allclose(gx, grads[0], 1e-10, 1e-12), "grad_x " + name);
  expect(torch::allclose(gw, grads[1], 1e-10, 1e-12), "grad_weights " + name);
  expect(torch::equal(gx_only, gx), "grad_x without weight gradients " + name);
  expect(gw_none.numel() == 0, "empty grad_weights when not asked for " + name);
}

}  // namespace

int main() {
  torch::manual_seed(0);
  for (bool layers : {false, true}) {  // recompute from unit inputs / every layer's input saved
    check_case(17, 5, 4, 2, true, "identity", "relu", "identity", layers);
    check_case(33, 8, 3, 3, true, "tanh", "ssigmoid", "tanh", layers);
    check_case(9, 4, 1, 6, false, "identity", "tanh", "identity", layers);
    check_case(1, 1, 2, 1, true, "relu", "relu", "relu", layers);
    check_case(40, 70, 3, 2, true, "ssigmoid", "relu", "relu", layers);  // feature-major tiles (d >= 32 in float64)
    // feature-major tiles at d < 32 (float32's default from d = 17; here by the variable): the feature-major
    // data gradient, carried feature-major between chunks of units
    setenv("SHORTCUT_EXT_CPU_LAYOUT", "feature", 1);
    check_case(23, 20, 3, 2, true, "tanh", "relu", "ssigmoid", layers);
    unsetenv("SHORTCUT_EXT_CPU_LAYOUT");
  }
  // argument checks give a clear error rather than a crash
  bool threw = false;
  try {
    auto fwd = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("shortcut_ext::residual_stack_forward", "")
                   .typed<FwdFn>();
    fwd.call(torch::zeros({4, 3}), torch::zeros({2, 2, 3, 4}), true, "identity", "identity", "identity", true,
             false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("weights must have shape [R, n, d, d]") != std::string::npos;
  }
  expect(threw, "bad weight shape raises a clear error");
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
