// Fused-path kernels, float32: the compiled <D, BM (tile rows), TM x TN (per-thread micro-tile)>.
// 8x8 micro-tiles where the register file allows (64 FFMA per two 16-byte shared loads of each
// operand); 32-row tiles for small batches (one block per SM) and for the backward, whose shared
// memory grows with n.  Largest tile first per D (the planner's order).
#include "cuda/residual_stack_kernels.cuh"

namespace shortcut_ext {
namespace cuda_detail {

template <>
const std::vector<FusedEntry<float>>& fused_entries<float>() {
  static const std::vector<FusedEntry<float>> v{
      make_fused_entry<FusedConfig<float, 16, 128, 8, 4>>(),  make_fused_entry<FusedConfig<float, 16, 32, 4, 4>>(),
      make_fused_entry<FusedConfig<float, 32, 128, 8, 4>>(),  make_fused_entry<FusedConfig<float, 32, 32, 4, 4>>(),
      make_fused_entry<FusedConfig<float, 64, 128, 8, 8>>(),  make_fused_entry<FusedConfig<float, 64, 32, 4, 8>>(),
      make_fused_entry<FusedConfig<float, 128, 128, 8, 8>>(), make_fused_entry<FusedConfig<float, 128, 64, 4, 8>>(),
      make_fused_entry<FusedConfig<float, 128, 32, 4, 4>>(),
  };
  return v;
}

}  // namespace cuda_detail
}  // namespace shortcut_ext
