// Exact bf16 master weights kept as an int16 remainder (master_weights="remainder", docs/MASTER_WEIGHTS.md): the
// float32 master's bit pattern is split into the bf16 param (its high half, rounded to nearest) and a signed 16-bit
// remainder, so that (param << 16) + remainder, in 32-bit wrap-around arithmetic, is the master bit for bit.
// Rounding the high half to nearest with ties away from zero (add 0x8000, keep the high half) is what keeps the
// remainder within int16: it is then in [-0x8000, 0x7fff]. A NaN master becomes a quiet NaN param with remainder 0
// (the rounding could carry a NaN's payload into the sign or exponent). fusedopt/master_weights.py's `split` / `join`
// compute the same bits; so does triton_kernels/optim_engine.py.
#pragma once
#include <cstdint>

#include "common/value_ops.h"

namespace fusedopt {

// Where a step finds a 16-bit param's exact value: the param itself, a float32 master copy (master_weights=True),
// or the param joined with its int16 remainder (master_weights="remainder", bf16 only).
enum class MasterKind { kNone, kFloat32, kRemainder };

// A zero param with a negative remainder, or an infinite one with a positive remainder, is no split's output: the
// param was changed outside the optimizer (zeroed, loaded) beside a stale remainder, and wrapping around would make
// the master a NaN. The param alone is the master there; every pair a split makes joins as before (an infinite
// param with a negative remainder is a master rounded up to inf: +-3.4e38 and its neighbours).
FUSEDOPT_HOST_DEVICE inline uint32_t join_master_bits(uint16_t param_bits, int16_t remainder) {
  const uint32_t magnitude = param_bits & 0x7fffU;
  if ((magnitude == 0 && remainder < 0) || (magnitude == 0x7f80U && remainder > 0))
    return static_cast<uint32_t>(param_bits) << 16;
  return (static_cast<uint32_t>(param_bits) << 16) + static_cast<uint32_t>(static_cast<int32_t>(remainder));
}

// master_weights=True: whether the 16-bit param (its bits) is no longer its float32 master rounded to nearest even
// (`rounded_bits`; a NaN equal to a NaN): changed outside the optimizer, it is the value the step starts from.
FUSEDOPT_HOST_DEVICE inline bool param_left_master(uint16_t param_bits, uint16_t rounded_bits, bool param_nan,
                                                   float master) {
  return param_bits != rounded_bits && !(param_nan && master != master);
}

// bits -> (bf16 param bits, remainder).
FUSEDOPT_HOST_DEVICE inline void split_master_bits(uint32_t bits, uint16_t& param_bits, int16_t& remainder) {
  if ((bits & 0x7fffffffU) > 0x7f800000U) {  // NaN
    param_bits = static_cast<uint16_t>((bits >> 16) | 0x40U);
    remainder = 0;
    return;
  }
  param_bits = static_cast<uint16_t>((bits + 0x8000U) >> 16);
  remainder = static_cast<int16_t>(static_cast<int32_t>(bits - (static_cast<uint32_t>(param_bits) << 16)));
}

}  // namespace fusedopt
