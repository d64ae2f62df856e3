// Exact bf16 master weights kept as an int16 remainder (master_weights="remainder", docs/MASTER_WEIGHTS.md): the
// float32 master's bit pattern is split into the bf16 param (its high half, rounded to nearest) and a signed 16-bit
// remainder, so that (param << 16) + remainder, in 32-bit wrap-around arithmetic, is the master bit for bit.
// Rounding the high half to nearest with ties away from zero (add 0x8000, keep the high half) is what keeps the
// remainder within int16: it is then in [-0x8000, 0x7fff]. A NaN master becomes a quiet NaN param with remainder 0
// (the rounding could carry a NaN's payload into the sign or exponent). fusedopt/reference_optim.py's
// `split_master` / `join_master` compute the same bits; so does triton_kernels/optim_engine.py.
#pragma once
#include <cstdint>

#include "common/value_ops.h"

namespace fusedopt {

// Where a step finds a 16-bit param's exact value: the param itself, a float32 master copy (master_weights=True),
// or the param joined with its int16 remainder (master_weights="remainder", bf16 only).
enum class MasterKind { kNone, kFloat32, kRemainder };

FUSEDOPT_HOST_DEVICE inline uint32_t join_master_bits(uint16_t param_bits, int16_t remainder) {
  return (static_cast<uint32_t>(param_bits) << 16) + static_cast<uint32_t>(static_cast<int32_t>(remainder));
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
