// Fused-path kernels, float64: half the float32 micro-tile area (registers are 64-bit), and one
// 32-row tile at D = 128 (a 64-row tile's backward would not fit in shared memory for n >= 2).
// Largest tile first per D (the planner's order).
#include "cuda/residual_stack_kernels.cuh"

namespace shortcut_ext {
namespace cuda_detail {

template <>
const std::vector<FusedEntry<double>>& fused_entries<double>() {
  static const std::vector<FusedEntry<double>> v{
      make_fused_entry<FusedConfig<double, 16, 64, 4, 4>>(), make_fused_entry<FusedConfig<double, 16, 16, 2, 2>>(),
      make_fused_entry<FusedConfig<double, 32, 64, 4, 4>>(), make_fused_entry<FusedConfig<double, 32, 16, 2, 4>>(),
      make_fused_entry<FusedConfig<double, 64, 64, 4, 4>>(), make_fused_entry<FusedConfig<double, 64, 16, 2, 4>>(),
      make_fused_entry<FusedConfig<double, 128, 32, 4, 4>>(),
  };
  return v;
}

}  // namespace cuda_detail
}  // namespace shortcut_ext
