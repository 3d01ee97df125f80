#include "cpu/cpu_gemm.h"

#include <c10/util/Exception.h>

#include <cstdlib>

#include "cpu/cpu_schedule.h"

namespace shortcut_ext {

namespace {
std::string gemm_env() {
  const char* env = std::getenv("SHORTCUT_EXT_CPU_GEMM");
  const std::string v = env ? env : "";
  TORCH_CHECK_VALUE(v.empty() || v == "auto" || v == "brgemm" || v == "portable",
                    "SHORTCUT_EXT_CPU_GEMM must be auto, brgemm or portable (or unset), got '", v, "'");
  return v;
}
}  // namespace

bool use_brgemm() {
#ifdef SHORTCUT_EXT_NO_BRGEMM
  return false;
#else
  static const bool on = gemm_env() != "portable";
  return on;
#endif
}

// The register kernels (kernel16 for float32, kernel64 for float64): on AVX-512 and AVX2 builds, unless
// SHORTCUT_EXT_CPU_GEMM selects the libraries only (brgemm) or the loops (portable).
static bool use_register_kernels() {
#if defined(__AVX512F__) || defined(SHORTCUT_EXT_AVX2_KERNELS)
  static const bool on = gemm_env() != "portable" && gemm_env() != "brgemm";
  return on;
#else
  return false;
#endif
}

bool use_kernel16() { return use_register_kernels(); }

bool use_blas64() {
  static const bool on = gemm_env() != "portable" && dgemm_ != nullptr;
  return on;
}

bool use_kernel64() { return use_register_kernels(); }

std::string cpu_gemm64_path() { return use_kernel64() ? "kernel64" : use_blas64() ? "blas" : "portable"; }

// SHORTCUT_EXT_CPU_LAYOUT's layout, or nothing (unset, empty or auto: the defaults)
static c10::optional<TileLayout> layout_override() {
  const char* env = std::getenv("SHORTCUT_EXT_CPU_LAYOUT");
  const std::string v = env ? env : "";
  if (v == "batch") return TileLayout::BatchMajor;
  if (v == "feature") return TileLayout::FeatureMajor;
  TORCH_CHECK_VALUE(v.empty() || v == "auto", "SHORTCUT_EXT_CPU_LAYOUT must be batch, feature or auto (or unset), got '",
                    v, "'");
  return c10::nullopt;
}

TileLayout cpu_tile_layout(int64_t d, bool is_double) {
  const auto o = layout_override();
  return o ? *o : cpu_saved_layout(d, is_double);
}

TileLayout cpu_forward_tile_layout(int64_t d, bool is_double, bool saves) {
  const auto o = layout_override();
  if (o) return *o;
  if (!saves && (!is_double || d < 16)) return TileLayout::FeatureMajor;
  return cpu_saved_layout(d, is_double);
}

TileLayout cpu_saved_layout(int64_t d, bool is_double) {
  return d >= cpu_saved_feature_major_from(is_double) ? TileLayout::FeatureMajor : TileLayout::BatchMajor;
}

std::string cpu_gemm_path() {
  if (!use_brgemm()) return "portable";
  return use_kernel16() ? "brgemm+kernel16" : "brgemm";
}

}  // namespace shortcut_ext
