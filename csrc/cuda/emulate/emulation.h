// A CPU stand-in for the few CUDA features the kernels in csrc/cuda use, so that the same kernel
// source can run (slowly) on a machine without a GPU: each thread block runs as blockDim OS threads
// with a real barrier for __syncthreads, dynamic shared memory is a per-block buffer poisoned with
// NaN bytes, and cp.async copies are deferred until cp.async.wait_group retires their group (so a
// missing wait or barrier shows up as wrong results, and ThreadSanitizer sees shared-memory races).
//
// It is a test harness, not a simulator: no warps, no memory model beyond the barrier, no timing.
// Used only when SHORTCUT_EXT_CUDA_EMULATE is defined (tests/test_cuda.py builds it with g++).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

using cudaStream_t = void*;
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice };

namespace se_emu {

// Emulated device: a few multiprocessors (so tiling and chunking logic is exercised on tiny
// problems) and Hopper's opt-in shared-memory limit per block.
inline int& sm_count() {
  static int v = 4;
  return v;
}
inline int& smem_optin() {
  static int v = 232448;
  return v;
}

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    // A thread that never arrives (a barrier under divergent control flow) would hang the kernel.
    if (!cv_.wait_for(lk, std::chrono::seconds(60), [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "emulated __syncthreads timed out: threads diverged around a barrier\n");
      std::abort();
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
  int n;
};

struct ThreadState {
  dim3 thread, block;
  unsigned char* smem = nullptr;
  Barrier* barrier = nullptr;
  std::vector<PendingCopy> open;                 // copies issued since the last commit
  std::vector<std::vector<PendingCopy>> groups;  // committed, not yet retired (oldest first)
};

inline ThreadState& tls() {
  static thread_local ThreadState s;
  return s;
}
inline dim3& block_dim() {
  static dim3 v;
  return v;
}
inline dim3& grid_dim() {
  static dim3 v;
  return v;
}
inline std::mutex& atomic_mutex() {
  static std::mutex m;
  return m;
}

inline void retire(std::vector<PendingCopy>& g) {
  for (auto& c : g) std::memcpy(c.dst, c.bytes, c.n);
  g.clear();
}

// Runs kernel(args...) on grid x block threads, one block after another.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  block_dim() = block;
  grid_dim() = grid;
  const int nthreads = int(block.x * block.y * block.z);
  std::vector<unsigned char> smem(smem_bytes + 16);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(smem.data(), 0xFF, smem.size());  // NaN: reads of unwritten shared memory show
        Barrier bar(nthreads);
        std::vector<std::thread> ts;
        ts.reserve(nthreads);
        for (int t = 0; t < nthreads; ++t) {
          ts.emplace_back([&, t] {
            ThreadState& s = tls();
            s.thread = dim3(unsigned(t % block.x), unsigned((t / block.x) % block.y), unsigned(t / (block.x * block.y)));
            s.block = dim3(bx, by, bz);
            s.smem = smem.data();
            s.barrier = &bar;
            s.open.clear();
            s.groups.clear();
            kernel(args...);
          });
        }
        for (auto& th : ts) th.join();
      }
}

}  // namespace se_emu

#define threadIdx (se_emu::tls().thread)
#define blockIdx (se_emu::tls().block)
#define blockDim (se_emu::block_dim())
#define gridDim (se_emu::grid_dim())

inline void __syncthreads() { se_emu::tls().barrier->wait(); }

template <typename T>
inline T atomicAdd(T* p, T v) {
  std::lock_guard<std::mutex> lk(se_emu::atomic_mutex());
  const T old = *p;
  *p = old + v;
  return old;
}

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? se_emu::sm_count() : se_emu::smem_optin();
  return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int bytes) {
  return bytes <= se_emu::smem_optin() ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, n);
  return cudaSuccess;
}
