// A cache of large CPU buffers for the outputs of the fused ops (saved activations, weight
// gradients, HVPs, checkpoints).
//
// Why: a buffer of more than ~32 MB comes from glibc as a fresh mmap on every call and goes back to
// the kernel when freed, so every training step paid page faults and the kernel's zeroing of every
// page (measured: ~15% of a d = 128 forward+backward).  Freed buffers land here instead and the next
// call of the same size reuses them, warm.  Like PyTorch's CUDA caching allocator, memory held in the
// cache is not returned to the system until `cpu_pool_empty()` (Python: shortcut_ext.empty_cache())
// or until the cache would exceed its limit, SHORTCUT_EXT_CPU_CACHE_MB (default 2048; 0 disables the
// cache: every buffer then comes from and goes back to the system).  Buffers are 2 MB aligned and
// advised to transparent huge pages.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace shortcut_ext {

// An uninitialised tensor of `sizes` / `strides` (dense: the strides are a permutation of a
// contiguous layout) on the CPU, from the cache where it is large enough to matter (>= 1 MB).
at::Tensor pooled_empty(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options);
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return pooled_empty(sizes, c10::contiguous_strides(sizes), options);
}

struct CpuPoolStats {
  int64_t cached_bytes, cached_blocks, in_use_bytes, in_use_blocks, hits, misses, limit_bytes;
};
CpuPoolStats cpu_pool_stats();
// Frees every cached (unused) buffer; buffers in use are freed when their tensors die.
void cpu_pool_empty();

}  // namespace shortcut_ext
