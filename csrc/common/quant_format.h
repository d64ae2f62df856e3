// The block-wise quantized state formats (fusedopt/lowbit.py has the definitions, docs/LOW_BIT_STATES.md the
// layout), shared by the CPU and CUDA engines: which format a step runs, its block, and fp8's encoder.
// - int8: 256 codes of a sorted dynamic map, blocks of 256, one code byte per element;
// - int4: 16 codes, blocks of 128, two codes per byte (element 2j in the high nibble of byte j);
// - fp8: float8_e4m3fn codes, blocks of 256: value = e4m3(code) / 448 * absmax, read through a 256-entry map like
//   int8's; a value x of a block of absmax a (d = a, or 1 when a is 0 or NaN) gets code e4m3fn_code(x / d * 448).
#pragma once
#include <cstdint>

#include "common/value_ops.h"

namespace fusedopt {

enum class QuantKind : int { kInt8 = 0, kInt4 = 1, kFp8 = 2 };

FUSEDOPT_HOST_DEVICE constexpr int64_t quant_block_of(QuantKind kind) { return kind == QuantKind::kInt4 ? 128 : 256; }

constexpr float kFp8Max = 448.0f;  // the largest finite float8_e4m3fn

// The float8_e4m3fn bits of y (|y| <= 448, as x / d * 448 always is) rounded to nearest even, as torch's
// .to(torch.float8_e4m3fn) gives them; a NaN gets code 0 (its block's absmax is NaN). Integer operations only, so
// no compiler may fuse the rounding into a neighbouring multiply (the Triton kernel computes the same bits).
FUSEDOPT_HOST_DEVICE inline uint8_t e4m3fn_code(uint32_t y_bits) {
  const uint32_t abs_bits = y_bits & 0x7fffffffU;
  if (abs_bits > 0x7f800000U) return 0;  // NaN
  uint32_t code;
  if (abs_bits >= 0x3c800000U) {  // >= 2^-6: an e4m3 normal; keep 3 mantissa bits, ties to even, rebias 127 -> 7
    code = ((abs_bits + 0x7ffffU + ((abs_bits >> 20) & 1U)) >> 20) - (120U << 3);
  } else {  // an e4m3 subnormal k * 2^-9: k = the float's significand m * 2^(e - 150) * 2^9, ties to even
    const uint32_t exponent = abs_bits >> 23;
    const uint32_t significand = (abs_bits & 0x7fffffU) | 0x800000U;
    const uint32_t shift = 141U - exponent < 25U ? 141U - exponent : 25U;  // >= 21; 25 leaves 0 (m < 2^24)
    code = (significand + (1U << (shift - 1)) - 1U + ((significand >> shift) & 1U)) >> shift;
  }
  code = code < 0x7eU ? code : 0x7eU;  // 448: never above it (0x7f is NaN)
  return static_cast<uint8_t>(code | ((y_bits >> 24) & 0x80U));
}

}  // namespace fusedopt
