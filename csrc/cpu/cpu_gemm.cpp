#include "cpu/cpu_gemm.h"

#include <c10/util/Exception.h>

#include <cstdlib>

#include "cpu/cpu_schedule.h"

namespace shortcut_ext {

bool use_brgemm() {
#ifdef SHORTCUT_EXT_NO_BRGEMM
  return false;
#else
  static const bool on = [] {
    const char* v = std::getenv("SHORTCUT_EXT_CPU_GEMM");
    return !(v && std::string(v) == "portable");
  }();
  return on;
#endif
}

TileLayout cpu_tile_layout(int64_t d) {
  const char* env = std::getenv("SHORTCUT_EXT_CPU_LAYOUT");
  const std::string v = env ? env : "";
  if (v == "batch") return TileLayout::BatchMajor;
  if (v == "feature") return TileLayout::FeatureMajor;
  TORCH_CHECK_VALUE(v.empty() || v == "auto", "SHORTCUT_EXT_CPU_LAYOUT must be batch, feature or auto (or unset), got '",
                    v, "'");
  return d >= 32 ? TileLayout::FeatureMajor : TileLayout::BatchMajor;
}

std::string cpu_gemm_path() { return use_brgemm() ? "brgemm" : "portable"; }

}  // namespace shortcut_ext
