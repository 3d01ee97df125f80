// A CPU stand-in for the few CUDA features the kernels in csrc/cuda use, so that the same kernel
// source can run (slowly) on a machine without a GPU: each thread block runs as blockDim OS threads
// with a real barrier for __syncthreads, dynamic shared memory is a per-block buffer poisoned with
// NaN bytes, and cp.async copies are deferred until cp.async.wait_group retires their group (so a
// missing wait or barrier shows up as wrong results, and ThreadSanitizer sees shared-memory races), or,
// with se_emu_set_cp_async_at_issue, land as they are issued (so a refill of a buffer that other threads
// are still reading overwrites what they read): a GPU lands them anywhere between the two.
//
// What a GPU would trap on, or compute-sanitizer report, is an error of the launch (EmuError, returned
// by the C entry points): a 16-byte access (cp.async, vector loads and stores) at a misaligned address
// or outside the launch's dynamic shared memory, a store into the guard after it, a thread that exits
// with cp.async copies it never waited for, threads that diverge around a barrier.
//
// Warps exist only for the one warp-collective operation the kernels use, the tensor-core
// mma.sync (m16n8k8, TF32): the 32 threads of a warp meet at a warp barrier, exchange their operand
// registers in the layout the PTX ISA documents, and each computes its own accumulator elements.
//
// It is a test harness, not a simulator: no memory model beyond the barriers, no timing. Blocks run one
// after another unless se_emu_set_concurrent_blocks asks for several at a time: only then can blocks that
// share global memory by mistake (overlapping per-block scratch) race, and even then only as the OS
// interleaves them (a likely failure, not a certain one, unlike compute-sanitizer's racecheck on a GPU).
// Used only when SHORTCUT_EXT_CUDA_EMULATE is defined (tests/test_cuda.py builds it with g++).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// Under AddressSanitizer (csrc/cuda/emulate/sanitizer_check.cpp) the guard after each block's shared
// memory is poisoned, so any access past the launch's size is reported where it happens.
#if defined(__SANITIZE_ADDRESS__)
#define SE_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SE_EMU_ASAN 1
#endif
#endif
#ifdef SE_EMU_ASAN
#include <sanitizer/asan_interface.h>
#define SE_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define SE_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define SE_EMU_POISON(p, n) ((void)(p), (void)(n))
#define SE_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

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
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrComputeCapabilityMajor };
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

// What a GPU would trap on or compute-sanitizer report: thrown from the emulated thread, the launch
// stops every thread of the block and rethrows it to the caller (the C entry points return it).
struct EmuError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    if (broken_) throw EmuError("another thread of the block failed");
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    // A thread that never arrives (a barrier under divergent control flow) would hang the kernel.
    if (!cv_.wait_for(lk, std::chrono::seconds(60), [&] { return gen_ != gen || broken_; }))
      throw EmuError("emulated __syncthreads timed out: threads diverged around a barrier");
    if (gen_ == gen) throw EmuError("another thread of the block failed");
  }
  // A failed thread releases the others (they throw at their next barrier instead of waiting).
  void break_all() {
    std::lock_guard<std::mutex> lk(m_);
    broken_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
  bool broken_ = false;
};

struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
  int n;
};

// The operand registers of one warp's mma.sync, exchanged at the warp barrier.
struct WarpSync {
  explicit WarpSync(int n) : bar(n), size(n) {}
  Barrier bar;
  int size;
  uint32_t a[32][4];
  uint32_t b[32][2];
};

struct ThreadState {
  dim3 thread, block;
  WarpSync* warp = nullptr;
  int lane = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;  // the launch's dynamic shared-memory size
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

// What the GPU would trap on (misaligned vector access) or what memcheck would report (shared
// memory outside the launch's dynamic size), checked at every 16-byte access the kernels make.
inline void fail(const char* what, const void* p) {
  char msg[256];
  std::snprintf(msg, sizeof msg, "emulated CUDA: %s (address %p)", what, p);
  throw EmuError(msg);
}
inline void check_aligned16(const void* p, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) fail(what, p);
}
// [p, p + n) lies inside the block's dynamic shared memory (n bytes).
inline void check_smem(const void* p, size_t n, const char* what) {
  const ThreadState& s = tls();
  const auto* b = static_cast<const unsigned char*>(p);
  if (s.smem == nullptr || b < s.smem || b + n > s.smem + s.smem_bytes) fail(what, p);
}
inline bool in_smem(const void* p) {
  const ThreadState& s = tls();
  const auto* b = static_cast<const unsigned char*>(p);
  return s.smem != nullptr && b >= s.smem && b < s.smem + s.smem_bytes + 4096;
}

inline void retire(std::vector<PendingCopy>& g) {
  for (auto& c : g) std::memcpy(c.dst, c.bytes, c.n);
  g.clear();
}

// When a cp.async copy lands in shared memory. A GPU may land it at any moment between the cp.async and the
// cp.async.wait_group that retires its group; the emulation takes one end. false (default): at the wait, the
// latest, so a thread reading the buffer without its wait (or without the barrier after the waits of the other
// threads) reads the NaN poison or the previous chunk. true: at issue, the earliest, so a copy issued into a
// buffer that other threads of the block still read (a refill before the barrier that ends the buffer's use)
// changes what they read, as on a GPU; the copy's bookkeeping (groups, the check at thread exit) is the same.
inline bool& cp_async_at_issue() {
  static bool v = false;
  return v;
}

// How many blocks of a launch run at the same time (default 1: one block after another). With more, blocks
// that share global memory by mistake (overlapping per-block scratch) race and compute wrong numbers, as they
// would on a GPU; tests set it through se_emu_set_concurrent_blocks.
inline int& concurrent_blocks() {
  static int v = 1;
  return v;
}

// The most blocks a grid-stride kernel is launched with (device_utils.cuh: grid_stride_blocks_cap; 65,535 as on
// the GPU). Tests lower it so that the grid-stride loops run several rounds on small problems.
inline int64_t& grid_stride_cap() {
  static int64_t v = 65535;
  return v;
}

// Runs kernel(args...) on grid x block threads, concurrent_blocks() blocks at a time.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  block_dim() = block;
  grid_dim() = grid;
  const int nthreads = int(block.x * block.y * block.z);
#ifdef SE_EMU_SMEM_SHORTFALL  // tests only: a launch that asks for too little shared memory must be caught
  smem_bytes -= smem_bytes < size_t(SE_EMU_SMEM_SHORTFALL) ? smem_bytes : size_t(SE_EMU_SMEM_SHORTFALL);
#endif
  // 16-byte aligned, followed by a 4 KiB guard: a plain store past the launch's shared-memory size
  // (which a GPU would report or silently corrupt) changes the guard and aborts the launch.
  constexpr size_t kGuard = 4096;
  struct BlockRun {  // one block's shared memory, barriers and first error
    dim3 idx;
    std::vector<unsigned char> raw;
    unsigned char* smem = nullptr;
    std::unique_ptr<Barrier> bar;
    std::vector<std::unique_ptr<WarpSync>> warps;
    std::mutex failed_m;
    std::string failed;
  };
  std::vector<dim3> blocks;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) blocks.push_back(dim3(bx, by, bz));
  const size_t group = size_t(std::max(1, concurrent_blocks()));
  for (size_t g0 = 0; g0 < blocks.size(); g0 += group) {
    std::vector<std::unique_ptr<BlockRun>> runs;
    for (size_t i = g0; i < std::min(blocks.size(), g0 + group); ++i) {
      std::unique_ptr<BlockRun> r(new BlockRun);
      r->idx = blocks[i];
      r->raw.resize(smem_bytes + kGuard + 16);
      r->smem = r->raw.data() + (16 - reinterpret_cast<std::uintptr_t>(r->raw.data()) % 16) % 16;
      std::memset(r->smem, 0xFF, smem_bytes + kGuard);  // NaN: reads of unwritten shared memory show
      SE_EMU_POISON(r->raw.data(), size_t(r->smem - r->raw.data()));
      SE_EMU_POISON(r->smem + smem_bytes, kGuard);
      r->bar.reset(new Barrier(nthreads));
      for (int w0 = 0; w0 < nthreads; w0 += 32) r->warps.emplace_back(new WarpSync(std::min(32, nthreads - w0)));
      runs.push_back(std::move(r));
    }
    std::vector<std::thread> ts;
    ts.reserve(runs.size() * size_t(nthreads));
    for (auto& run : runs) {
      for (int t = 0; t < nthreads; ++t) {
        ts.emplace_back([&, t, r = run.get()] {
          ThreadState& s = tls();
          try {
            s.thread = dim3(unsigned(t % block.x), unsigned((t / block.x) % block.y), unsigned(t / (block.x * block.y)));
            s.block = r->idx;
            s.smem = r->smem;
            s.smem_bytes = smem_bytes;
            s.barrier = r->bar.get();
            s.warp = r->warps[size_t(t / 32)].get();
            s.lane = t % 32;
            s.open.clear();
            s.groups.clear();
            kernel(args...);
            bool pending = !s.open.empty();
            for (const auto& g : s.groups) pending |= !g.empty();
            if (pending) fail("a thread exited with cp.async copies it never waited for", r->smem);
          } catch (const std::exception& e) {
            {
              std::lock_guard<std::mutex> lk(r->failed_m);
              if (r->failed.empty() || r->failed == "another thread of the block failed") r->failed = e.what();
            }
            r->bar->break_all();
            for (auto& w : r->warps) w->bar.break_all();
          }
          s.smem = nullptr;
          s.warp = nullptr;
        });
      }
    }
    for (auto& th : ts) th.join();
    for (auto& r : runs) {
      SE_EMU_UNPOISON(r->raw.data(), r->raw.size());
      if (!r->failed.empty()) throw EmuError(r->failed);
      for (size_t i = 0; i < kGuard; ++i)
        if (r->smem[smem_bytes + i] != 0xFF) fail("a store past the launch's dynamic shared memory", r->smem + smem_bytes + i);
    }
  }
}

// The value a tensor core reads from a .tf32 operand register: the top 19 bits (sign, exponent,
// 10 mantissa bits); the low 13 bits are ignored.
inline double tf32_operand(uint32_t bits) {
  bits &= 0xFFFFE000u;
  float f;
  std::memcpy(&f, &bits, 4);
  return double(f);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, d for the calling lane: every lane
// of the warp must call it (a warp barrier), with its fragment registers as the PTX ISA lays them
// out (groupID g = lane / 4, t = lane % 4):
//   A 16x8 row-major: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
//   B 8x8 (k x n):    b0 (k = t, n = g), b1 (k = t + 4, n = g)
//   C/D 16x8:         d0 (g, 2t), d1 (g, 2t + 1), d2 (g + 8, 2t), d3 (g + 8, 2t + 1)
// Products are exact and summed in double, then added to d (a GPU's accumulation order and
// rounding differ in the last float32 bits).
inline void warp_mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ThreadState& s = tls();
  if (s.warp == nullptr || s.warp->size != 32) fail("mma.sync needs a full warp of 32 threads", nullptr);
  WarpSync& w = *s.warp;
  std::memcpy(w.a[s.lane], a, sizeof a);
  std::memcpy(w.b[s.lane], b, sizeof b);
  w.bar.wait();
  const int g = s.lane / 4, t = s.lane % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    double sum = 0.0;
    for (int k = 0; k < 8; ++k) {
      const double av = tf32_operand(w.a[(row % 8) * 4 + k % 4][(row / 8) + 2 * (k / 4)]);
      const double bv = tf32_operand(w.b[col * 4 + k % 4][k / 4]);
      sum += av * bv;
    }
    out[e] = float(double(d[e]) + sum);
  }
  w.bar.wait();  // every lane has read the exchanged registers before they are overwritten
  for (int e = 0; e < 4; ++e) d[e] = out[e];
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
  *v = a == cudaDevAttrMultiProcessorCount ? se_emu::sm_count()
      : a == cudaDevAttrComputeCapabilityMajor ? 9  // Hopper
                                               : se_emu::smem_optin();
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
