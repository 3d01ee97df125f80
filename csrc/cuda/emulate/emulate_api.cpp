// C entry points to the CUDA kernels compiled for CPU emulation (see emulation.h), loaded by
// tests/test_cuda.py through ctypes on machines without a GPU:
//   g++ -std=c++17 -O1 -pthread -fPIC -shared -fno-strict-aliasing -DSHORTCUT_EXT_CUDA_EMULATE \
//       -Icsrc -I<torch>/include csrc/cuda/emulate/emulate_api.cpp -L<torch>/lib -lc10 -o emu.so
// Pointers are host memory; the allocator is malloc.  Returns 0, or 1 with a message in `err`.
#ifndef SHORTCUT_EXT_CUDA_EMULATE
#define SHORTCUT_EXT_CUDA_EMULATE
#endif

#include "cuda/residual_stack_fused_f32.cu"
#include "cuda/residual_stack_fused_f64.cu"
#include "cuda/residual_stack_fused_tf32.cu"
#include "cuda/residual_stack_fused_3xtf32.cu"
#include "cuda/residual_stack_kernels.cu"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

namespace {

using shortcut_ext::Act;
namespace sc = shortcut_ext::cuda;

// Tests only: SE_EMU_WORKSPACE_SHORTFALL=<n> hands the kernels n bytes less workspace than they
// asked for, so that a sanitizer run can show that it catches the overflow.
size_t workspace_shortfall() {
  const char* s = std::getenv("SE_EMU_WORKSPACE_SHORTFALL");
  return s ? size_t(std::strtoull(s, nullptr, 10)) : 0;
}

struct HostAllocator {
  std::vector<std::unique_ptr<unsigned char[]>> held;
  sc::Allocator get() {
    return [this](size_t bytes) -> void* {
      // poison: NaN for float and double, so unwritten workspace shows in the results; exactly
      // `bytes`, so that AddressSanitizer reports any access past the end
      bytes -= std::min(bytes, workspace_shortfall());
      held.emplace_back(new unsigned char[bytes]);
      std::memset(held.back().get(), 0xFF, bytes);
      return held.back().get();
    };
  }
};

sc::StackArgs args(int64_t B, int64_t d, int64_t R, int64_t n, int shortcut, int pre, int mid, int post) {
  return {B, d, R, n, shortcut != 0, Act(pre), Act(mid), Act(post)};
}

int g_tf32 = 0;  // se_emu_set_tf32: Options::tf32

sc::Options options(int path, int tile_rows, int atomic, int64_t ws_bytes) {
  sc::Options o;
  o.tf32 = g_tf32;
  o.path = path;
  o.tile_rows = tile_rows;
  o.atomic_grad = atomic != 0;
  if (ws_bytes > 0) o.workspace_bytes = ws_bytes;
  return o;
}

int fail(const char* what, char* err, int errlen) {
  std::snprintf(err, size_t(errlen), "%s", what);
  return 1;
}

}  // namespace

extern "C" {

// Number of emulated multiprocessors (the fused tile choice and the generic grid depend on it).
void se_emu_set_sms(int sms) { se_emu::sm_count() = sms; }

// How many blocks of a launch run at the same time (1: one after another).
void se_emu_set_concurrent_blocks(int n) { se_emu::concurrent_blocks() = n; }

// The most blocks of a grid-stride launch (65,535 as on the GPU; lower: the loops run several rounds).
void se_emu_set_grid_stride_cap(int64_t blocks) { se_emu::grid_stride_cap() = blocks; }

// When cp.async copies land: 0 at the wait that retires them (the latest), 1 as they are issued (the earliest).
void se_emu_set_cp_async_at_issue(int on) { se_emu::cp_async_at_issue() = on != 0; }

// The TF32 tensor-core mode of later calls (Options::tf32: 0 off, 1 TF32, 2 3xTF32).
void se_emu_set_tf32(int mode) { g_tf32 = mode; }

int se_emu_forward(int is_double, const void* x, const void* w, void* y, void* saved, int64_t B, int64_t d, int64_t R,
                   int64_t n, int shortcut, int pre, int mid, int post, int path, int tile_rows, char* err,
                   int errlen) {
  try {
    HostAllocator alloc;
    const auto a = args(B, d, R, n, shortcut, pre, mid, post);
    const auto o = options(path, tile_rows, 0, 0);
    const int rc = is_double ? sc::launch_residual_stack_forward<double>(a, (const double*)x, (const double*)w,
                                                                         (double*)y, (double*)saved, o, alloc.get(), nullptr)
                             : sc::launch_residual_stack_forward<float>(a, (const float*)x, (const float*)w, (float*)y,
                                                                        (float*)saved, o, alloc.get(), nullptr);
    return rc == cudaSuccess ? 0 : fail("emulated launch failed", err, errlen);
  } catch (const std::exception& e) {
    return fail(e.what(), err, errlen);
  }
}

int se_emu_backward(int is_double, const void* grad_y, const void* w, const void* saved, void* grad_x, void* grad_w,
                    int64_t B, int64_t d, int64_t R, int64_t n, int shortcut, int pre, int mid, int post, int path,
                    int tile_rows, int atomic, int64_t ws_bytes, char* err, int errlen) {
  try {
    HostAllocator alloc;
    const auto a = args(B, d, R, n, shortcut, pre, mid, post);
    const auto o = options(path, tile_rows, atomic, ws_bytes);
    const int rc = is_double
                       ? sc::launch_residual_stack_backward<double>(a, (const double*)grad_y, (const double*)w,
                                                                    (const double*)saved, (double*)grad_x,
                                                                    (double*)grad_w, o, alloc.get(), nullptr)
                       : sc::launch_residual_stack_backward<float>(a, (const float*)grad_y, (const float*)w,
                                                                   (const float*)saved, (float*)grad_x, (float*)grad_w,
                                                                   o, alloc.get(), nullptr);
    return rc == cudaSuccess ? 0 : fail("emulated launch failed", err, errlen);
  } catch (const std::exception& e) {
    return fail(e.what(), err, errlen);
  }
}

int se_emu_describe(int is_double, int backward, int64_t B, int64_t d, int64_t R, int64_t n, int path, int tile_rows,
                    int atomic, int64_t ws_bytes, int want_w, char* out, int outlen) {
  const std::string s = sc::describe_plan(args(B, d, R, n, 1, 0, 0, 0), is_double != 0, backward != 0,
                                          options(path, tile_rows, atomic, ws_bytes), want_w != 0);
  std::snprintf(out, size_t(outlen), "%s", s.c_str());
  return 0;
}

}  // extern "C"
