// Shared by the CPU bindings: tensor dtype -> ScalarKind, and the per-ISA copy of a kernel for this CPU.
#pragma once
#include <torch/extension.h>

#include "cpu/kernels.h"

namespace fusedopt::cpu {

inline ScalarKind scalar_kind(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return ScalarKind::Float;
    case at::kDouble: return ScalarKind::Double;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kHalf: return ScalarKind::Half;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (float32, float64, bfloat16, float16 are)");
  }
}

template <typename Fn>
Fn for_this_cpu(Fn default_fn, Fn avx2_fn, Fn avx512_fn) {
  switch (capability()) {
    case Capability::AVX512: return avx512_fn;
    case Capability::AVX2: return avx2_fn;
    default: return default_fn;
  }
}
#define FUSEDOPT_CPU_KERNEL(name) for_this_cpu(DEFAULT::name, AVX2::name, AVX512::name)

}  // namespace fusedopt::cpu
