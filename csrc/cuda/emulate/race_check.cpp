// Runs a few emulated fused (float32, float64, TF32, 3xTF32), generic and HVP launches under ThreadSanitizer, which then reports any
// shared-memory access between two emulated CUDA threads of a block that no __syncthreads() orders
// (a missing barrier).  It found a barrier removed on purpose from forward_fused_kernel; the kernels
// as committed ran clean (2026-11, ~5 min on 2 cores).  Not part of any build:
//   TP=$(python -c 'import torch,os;print(os.path.dirname(torch.__file__))')
//   g++ -std=c++17 -O1 -g -fsanitize=thread -pthread -fno-strict-aliasing -w -DSHORTCUT_EXT_CUDA_EMULATE \
//       -Icsrc -I$TP/include -I$TP/include/torch/csrc/api/include csrc/cuda/emulate/race_check.cpp \
//       -L$TP/lib -lc10 -Wl,-rpath,$TP/lib -o /tmp/race_check
//   setarch $(uname -m) -R /tmp/race_check      # TSan needs ASLR off on some kernels
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cuda/emulate/emulate_api.cpp"
#include "cuda/residual_stack_hvp_cuda.cu"

template <typename T>
static int one(int64_t B, int64_t d, int64_t R, int64_t n, int path, int tile) {
  std::mt19937 gen(1);
  std::normal_distribution<double> nd;
  std::vector<T> x(B * d), w(R * n * d * d), y(B * d), saved(R * B * d), gy(B * d), gx(B * d), gw(R * n * d * d);
  for (auto& v : x) v = T(nd(gen));
  for (auto& v : gy) v = T(nd(gen));
  for (auto& v : w) v = T(nd(gen) * 0.3 / std::sqrt(double(d)));
  char err[512];
  const int dbl = sizeof(T) == 8;
  // relu before, tanh between, ssigmoid after the layers of each unit
  if (se_emu_forward(dbl, x.data(), w.data(), y.data(), saved.data(), B, d, R, n, 1, 1, 2, 3, path, tile, err, 512) ||
      se_emu_backward(dbl, gy.data(), w.data(), saved.data(), gx.data(), gw.data(), B, d, R, n, 1, 1, 2, 3, path, tile,
                      0, 0, err, 512)) {
    std::printf("error: %s\n", err);
    return 1;
  }
  std::printf("ran d=%lld path=%d tile=%d\n", (long long)d, path, tile);
  return 0;
}

// The HVP kernels: loss, gradient and K products (mse, or cross entropy on class indices).
template <typename T>
static int hvp(int64_t B, int64_t d, int64_t R, int64_t n, int64_t K, bool ce) {
  std::mt19937 gen(2);
  std::normal_distribution<double> nd;
  std::vector<T> x(B * d), w(R * n * d * d), y(B * d), v(K * R * n * d * d), gw(R * n * d * d), hv(K * R * n * d * d);
  std::vector<int64_t> cls(B);
  T lo = 0;
  for (auto& e : x) e = T(nd(gen));
  for (auto& e : y) e = T(nd(gen));
  for (auto& e : v) e = T(nd(gen));
  for (auto& e : w) e = T(nd(gen) * 0.5 / std::sqrt(double(d)));
  for (int64_t b = 0; b < B; ++b) cls[b] = b % d;
  HostAllocator alloc;
  const sc::StackArgs a{B, d, R, n, true, Act::Tanh, Act::Relu, Act::SSigmoid};
  const cudaError_t rc = sc::launch_residual_stack_hvp<T>(
      a, K, ce ? shortcut_ext::Loss::CrossEntropy : shortcut_ext::Loss::Mse, x.data(), w.data(),
      ce ? nullptr : y.data(), ce ? cls.data() : nullptr, v.data(), &lo, gw.data(), hv.data(), alloc.get(), nullptr);
  std::printf("ran hvp d=%lld K=%lld ce=%d rc=%d loss=%g\n", (long long)d, (long long)K, int(ce), int(rc), double(lo));
  return rc != cudaSuccess;
}

int main() {
  int bad = 0;
  bad |= hvp<float>(40, 12, 2, 2, 3, false);
  bad |= hvp<double>(33, 7, 2, 3, 1, true);
  bad |= one<float>(40, 16, 2, 2, 1, 32);
  bad |= one<double>(40, 20, 2, 3, 1, 16);
  bad |= one<float>(40, 64, 2, 2, 1, 32);
  bad |= one<float>(40, 128, 2, 2, 1, 32);
  bad |= one<float>(70, 40, 2, 2, 2, 0);
  se_emu_set_tf32(1);  // the TF32 tensor-core kernels
  bad |= one<float>(40, 16, 2, 2, 1, 32);
  bad |= one<float>(40, 64, 2, 2, 1, 32);
  bad |= one<float>(40, 100, 2, 2, 1, 32);
  se_emu_set_tf32(2);  // 3xTF32
  bad |= one<float>(40, 64, 2, 2, 1, 32);
  se_emu_set_tf32(0);
  return bad;
}
