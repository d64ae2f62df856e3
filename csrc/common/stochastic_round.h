// bf16 stochastic rounding, the same bits on every backend (the CPU and CUDA engines include this; Triton's
// `store_param` and fusedopt/reference_optim.py's `stochastic_round_bf16` compute the same hash).
//
// A float32 value rounds to the bfloat16 above or below it with probability proportional to its distance from
// each: add 16 random bits to its bit pattern and keep the high half. The random bits come from a counter-based
// hash of (seed, step counter, tensor position in the call, element index), so a run is reproducible and needs no
// generator state. NaN stays NaN (the addition could carry into the sign); +-inf stays inf; a value above bf16's
// largest finite one can round to inf, as round-up does.
#pragma once
#include <cstdint>
#include <type_traits>

#include "common/value_ops.h"
#if defined(__CUDACC__)
#include <c10/util/BFloat16.h>
#endif

namespace fusedopt {

// Chris Wellons' "lowbias32" integer hash.
FUSEDOPT_HOST_DEVICE inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// The per-tensor key from the optimizer's [seed, counter] state and the tensor's position in the call.
FUSEDOPT_HOST_DEVICE inline uint32_t stochastic_round_key(int64_t seed, int64_t counter, int64_t tensor) {
  const uint32_t seed_hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  const uint32_t seed_mix = static_cast<uint32_t>(seed) ^ mix32(seed_hi);
  return mix32(seed_mix ^ mix32(static_cast<uint32_t>(counter) + 0x9E3779B9U * static_cast<uint32_t>(tensor + 1)));
}

// The key of tensor `tensor` from an optimizer's [seed, counter] state; 0 when there is none (round to nearest).
FUSEDOPT_HOST_DEVICE inline uint32_t stochastic_round_key(const int64_t* state, int64_t tensor) {
  return state != nullptr ? stochastic_round_key(state[0], state[1], tensor) : 0;
}

// The bfloat16 bits of `bits` (a float32's), stochastically rounded; `index` is the element's index in its tensor.
FUSEDOPT_HOST_DEVICE inline uint16_t stochastic_round_bf16_bits(uint32_t bits, uint32_t key, int64_t index) {
  if ((bits & 0x7fffffffU) > 0x7f800000U) return static_cast<uint16_t>((bits >> 16) | 0x40U);  // NaN, quiet
  const uint64_t i = static_cast<uint64_t>(index);
  const uint32_t r = mix32(key ^ static_cast<uint32_t>(i) ^ mix32(static_cast<uint32_t>(i >> 32)));
  return static_cast<uint16_t>((bits + (r & 0xffffU)) >> 16);
}

#if defined(__CUDACC__)
// A CUDA engine's stored param: a bf16 param by stochastic rounding when `stochastic`, else the dtype's rounding.
// `value` is in opmath (float for a bf16 param).
template <typename T, typename S>
__device__ __forceinline__ T stored_param(S value, bool stochastic, uint32_t key, int64_t index) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    static_assert(std::is_same_v<S, float>, "bf16 params update in float32");
    if (stochastic)
      return at::BFloat16(stochastic_round_bf16_bits(__float_as_uint(value), key, index), at::BFloat16::from_bits());
  }
  return T(value);
}
#endif

}  // namespace fusedopt
