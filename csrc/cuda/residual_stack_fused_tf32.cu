// Fused-path kernels on TF32 tensor cores (float32 inputs rounded to TF32, float32 accumulation),
// used only when asked for (shortcut_ext.cuda_tf32()) on sm_80+: <D, BM (tile rows), WARPS_M x
// WARPS_N warps>.  128-row tiles for large batches, 32-row tiles for small ones and for the
// backward at large n.  Largest tile first per D (the planner's order).
#include "cuda/residual_stack_kernels.cuh"

namespace shortcut_ext {
namespace cuda_detail {

const std::vector<FusedEntry<float>>& fused_tf32_entries() {
  static const std::vector<FusedEntry<float>> v{
      make_fused_entry<TcConfig<16, 128, 8, 1>>(),  make_fused_entry<TcConfig<16, 32, 2, 1>>(),
      make_fused_entry<TcConfig<32, 128, 8, 1>>(),  make_fused_entry<TcConfig<32, 32, 2, 1>>(),
      make_fused_entry<TcConfig<64, 128, 4, 2>>(),  make_fused_entry<TcConfig<64, 32, 2, 2>>(),
      make_fused_entry<TcConfig<128, 128, 4, 2>>(), make_fused_entry<TcConfig<128, 64, 2, 4>>(),
      make_fused_entry<TcConfig<128, 32, 2, 4>>(),
  };
  return v;
}

}  // namespace cuda_detail
}  // namespace shortcut_ext
