// Picks the widest ISA this CPU supports for the per-ISA kernel copies.
#include <cstdlib>
#include <cstring>

#include "cpu/kernels.h"

namespace fusedopt::cpu {

static Capability detect() {
#if defined(__x86_64__) && !defined(_MSC_VER)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  Capability best = avx512 ? Capability::AVX512 : (avx2 ? Capability::AVX2 : Capability::DEFAULT);
#else
  Capability best = Capability::DEFAULT;
#endif
  // FUSEDOPT_CPU_CAPABILITY (or ATen's ATEN_CPU_CAPABILITY) can only lower the choice, e.g. to test each path.
  const char* env = std::getenv("FUSEDOPT_CPU_CAPABILITY");
  if (env == nullptr) env = std::getenv("ATEN_CPU_CAPABILITY");
  if (env != nullptr) {
    Capability asked = best;
    if (std::strcmp(env, "default") == 0) asked = Capability::DEFAULT;
    if (std::strcmp(env, "avx2") == 0) asked = Capability::AVX2;
    if (std::strcmp(env, "avx512") == 0) asked = Capability::AVX512;
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;
  }
  return best;
}

Capability capability() {
  static const Capability cached = detect();
  return cached;
}

bool byte_permutes() {
  static const bool cached = [] {
#if defined(__x86_64__) && !defined(_MSC_VER)
    // FUSEDOPT_CPU_CAPABILITY=avx512 asks for the base AVX-512 (F, BW, VL, DQ) paths: lower, so honoured
    const char* env = std::getenv("FUSEDOPT_CPU_CAPABILITY");
    const bool base_asked = env != nullptr && std::strcmp(env, "avx512") == 0;
    return capability() == Capability::AVX512 && __builtin_cpu_supports("avx512vbmi") && !base_asked;
#else
    return false;
#endif
  }();
  return cached;
}

const char* capability_name() {
  switch (capability()) {
    case Capability::AVX512: return byte_permutes() ? "avx512_vbmi" : "avx512";
    case Capability::AVX2: return "avx2";
    default: return "default";
  }
}

}  // namespace fusedopt::cpu
