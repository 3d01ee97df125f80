// The CPU buffer cache of cpu_buffer_pool.h.
#include "cpu/cpu_buffer_pool.h"

#include "common.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace shortcut_ext {
namespace {

constexpr size_t kMinPooled = size_t(1) << 20;  // smaller buffers: malloc keeps them warm itself
constexpr size_t kAlign = size_t(2) << 20;      // one transparent huge page

int64_t limit_from_env() {
  return env_megabytes("SHORTCUT_EXT_CPU_CACHE_MB", 2048, 0, " (0 disables the cache)");
}

struct Block {
  void* ptr;
  size_t bytes;
};

class Pool {
 public:
  // A block of at least `bytes`: the smallest cached one that is no more than twice as large, else
  // a new one.
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        const size_t b = free_[i].bytes;
        if (b >= bytes && b <= 2 * bytes && (best == free_.size() || b < free_[best].bytes)) best = i;
      }
      if (best < free_.size()) {
        const Block blk = free_[best];
        free_.erase(free_.begin() + best);
        cached_ -= blk.bytes;
        in_use_ += blk.bytes;
        ++in_use_blocks_;
        ++hits_;
        return blk;
      }
      ++misses_;
    }
    const size_t rounded = (bytes + kAlign - 1) / kAlign * kAlign;
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, rounded) != 0 || p == nullptr) {
      release_cached();  // give the cache back and try once more
      p = nullptr;
      TORCH_CHECK(posix_memalign(&p, kAlign, rounded) == 0 && p != nullptr, "shortcut_ext: out of CPU memory allocating ",
                  rounded >> 20, " MB");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)madvise(p, rounded, MADV_HUGEPAGE);
#endif
    std::lock_guard<std::mutex> lock(mu_);
    in_use_ += rounded;
    ++in_use_blocks_;
    return {p, rounded};
  }

  void give(Block blk) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      in_use_ -= blk.bytes;
      --in_use_blocks_;
      free_.push_back(blk);
      cached_ += blk.bytes;
      // over the limit: drop the least recently returned blocks
      while (cached_ > limit_ && !free_.empty()) {
        drop.push_back(free_.front().ptr);
        cached_ -= free_.front().bytes;
        free_.erase(free_.begin());
      }
    }
    for (void* p : drop) std::free(p);
  }

  void release_cached() {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      cached_ = 0;
    }
    for (const Block& b : drop) std::free(b.ptr);
  }

  CpuPoolStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(cached_), int64_t(free_.size()), int64_t(in_use_), in_use_blocks_, hits_, misses_, int64_t(limit_)};
  }

 private:
  std::mutex mu_;
  std::vector<Block> free_;  // in the order they came back
  size_t cached_ = 0, in_use_ = 0;
  int64_t in_use_blocks_ = 0, hits_ = 0, misses_ = 0;
  const size_t limit_ = size_t(limit_from_env());
};

// Never destroyed: tensors can outlive static destruction at interpreter exit.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::IntArrayRef strides, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu() && sizes.size() == strides.size());
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinPooled) return at::empty_strided(sizes, strides, options);
  // The block goes back to the cache when the storage lets go of it. With an allocator the storage stays
  // resizable, as a plain tensor's is (untyped_storage().resize_(0) frees a gradient under FSDP / ZeRO): a
  // resize moves the data to the allocator's memory and gives the block back.
  Block* blk = new Block(pool().take(bytes));
  return at::for_blob(blk->ptr, sizes)
      .strides(strides)
      .context(blk,
               [](void* ctx) {
                 Block* b = static_cast<Block*>(ctx);
                 pool().give(*b);
                 delete b;
               })
      .options(options)
      .allocator(c10::GetDefaultCPUAllocator())
      .resizeable_storage()
      .make_tensor();
}

CpuPoolStats cpu_pool_stats() { return pool().stats(); }

void cpu_pool_empty() { pool().release_cached(); }

}  // namespace shortcut_ext
