// Fused-path kernels on 3xTF32 tensor cores: every float32 operand split into two TF32 parts and
// three mma per product (float32 accuracy), used only when asked for (shortcut_ext.cuda_tf32("3xtf32"))
// on sm_80+.  The tiles of residual_stack_fused_tf32.cu, less the 128 x 128 one (whose doubled
// operand fragments would not fit in the register file).
#include "cuda/residual_stack_kernels.cuh"

namespace shortcut_ext {
namespace cuda_detail {

const std::vector<FusedEntry<float>>& fused_3xtf32_entries() {
  static const std::vector<FusedEntry<float>> v{
      make_fused_entry<TcConfig<16, 128, 8, 1, true>>(),  make_fused_entry<TcConfig<16, 32, 2, 1, true>>(),
      make_fused_entry<TcConfig<32, 128, 8, 1, true>>(),  make_fused_entry<TcConfig<32, 32, 2, 1, true>>(),
      make_fused_entry<TcConfig<64, 128, 4, 2, true>>(),  make_fused_entry<TcConfig<64, 32, 2, 2, true>>(),
      make_fused_entry<TcConfig<128, 64, 2, 4, true>>(),  make_fused_entry<TcConfig<128, 32, 2, 4, true>>(),
  };
  return v;
}

}  // namespace cuda_detail
}  // namespace shortcut_ext
