#include "cpu/cpu_gemm.h"

#include <cstdlib>

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

std::string cpu_gemm_path() { return use_brgemm() ? "brgemm" : "portable"; }

}  // namespace shortcut_ext
