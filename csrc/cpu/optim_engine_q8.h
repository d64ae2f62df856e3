// The CPU engine's path for block-wise quantized states, int8, int4 and fp8 (common/optim_q8.h,
// docs/LOW_BIT_STATES.md). A chunk (32K elements, so block-aligned) is processed one quantization block (256 or 128
// elements) at a time: each used state's codes are dequantized into a stack buffer in opmath, the op's update runs
// on it through the engine's run_range (the same loads, stores and math as a full-precision step), then each
// state's block gets its new absmax and every value the nearest code. One read and one write of the codes; no
// full-precision state in memory.
// Included only from cpu/optim_engine.h.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/quant_format.h"
#include "cpu/vec_io.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace optim_engine {

constexpr int64_t kQBlock = 256;   // int8's block, the largest
constexpr int64_t kQBlock4 = 128;  // int4's
constexpr int kLevels4 = 16;

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kHasGather = true;  // at::vec::gather is one instruction (and honours a byte scale)
#else
constexpr bool kHasGather = false;
#endif

// out[i] = map[codes[i]] * absmax.
inline void dequantize_block(const uint8_t* codes, float absmax, const float* map, float* out, int64_t n) {
  using V = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  constexpr int64_t kW = V::size();
  int64_t i = 0;
  if constexpr (kHasGather) {
    alignas(64) int32_t idx[kW];
    for (; i + kW <= n; i += kW) {
      for (int64_t j = 0; j < kW; ++j) idx[j] = codes[i + j];
      (at::vec::gather<sizeof(float)>(map, VI::loadu(idx)) * V(absmax)).store(out + i);
    }
  }
  for (; i < n; ++i) out[i] = map[codes[i]] * absmax;
}

// int4: out[i] = map[code i] * absmax, codes two per byte (element 2j in the high nibble of byte j).
inline void dequantize_block4(const uint8_t* packed, float absmax, const float* map, float* out, int64_t n) {
  int64_t i = 0;
  if constexpr (kHasGather) {  // as dequantize_block: the nibbles as gather indices (i and the width are even)
    using V = at::vec::Vectorized<float>;
    using VI = at::vec::Vectorized<int32_t>;
    constexpr int64_t kW = V::size();
    alignas(64) int32_t idx[kW];
    for (; i + kW <= n; i += kW) {
      for (int64_t j = 0; j < kW; j += 2) {
        idx[j] = packed[(i + j) / 2] >> 4;
        idx[j + 1] = packed[(i + j) / 2] & 15;
      }
      (at::vec::gather<sizeof(float)>(map, VI::loadu(idx)) * V(absmax)).store(out + i);
    }
  }
  for (; i + 1 < n; i += 2) {
    out[i] = map[packed[i / 2] >> 4] * absmax;
    out[i + 1] = map[packed[i / 2] & 15] * absmax;
  }
  if (n % 2 != 0) out[n - 1] = map[packed[n / 2] >> 4] * absmax;
}

// The block's absmax (max |v|, NaN if a value is NaN); v is divided by d, the absmax (1 when it is 0 or NaN).
inline float scale_block(float* v, int64_t n) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t kW = V::size();
  V acc(0.0f);
  for (int64_t i = 0; i < n; i += kW)
    acc = at::vec::maximum(acc, V::loadu(v + i, std::min<int64_t>(kW, n - i)).abs());  // maximum keeps NaN
  std::array<float, kW> lanes;
  acc.store(lanes.data());
  float absmax = 0.0f;
  bool nan = false;
  for (float x : lanes) {
    nan = nan || std::isnan(x);
    absmax = std::max(absmax, x);
  }
  if (nan) absmax = std::numeric_limits<float>::quiet_NaN();
  const V d(absmax > 0.0f ? absmax : 1.0f);
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t m = std::min<int64_t>(kW, n - i);
    (V::loadu(v + i, m) / d).store(v + i, m);
  }
  return absmax;
}

// The block's absmax (scale_block), then codes[i] = #{j : v[i] / d >= mid[j]}: what lowbit.quantize's 8-step binary
// search gives, found here with the map's lookup table (common/optim_q8.h): lut[bits(x) >> 16] is the code of the
// lowest x of those 2^16 floats, which hold at most one midpoint, so one comparison finishes it (mid[255] is NaN:
// never passed). A NaN gets code 0; its block reads back NaN through its NaN absmax. `v` is overwritten (x = v / d).
inline float quantize_block(float* v, int64_t n, const float* mid, const uint8_t* lut, uint8_t* codes) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t kW = V::size();
  const float absmax = scale_block(v, n);
  int64_t i = 0;
  if constexpr (kHasGather) {  // the same lookup, a vector at a time: lut bytes by a byte-scaled gather
    using VI = at::vec::Vectorized<int32_t>;
    alignas(64) int32_t c[kW];
    for (; i + kW <= n; i += kW) {
      const V x = V::loadu(v + i);
      const VI index = at::vec::cast<int32_t>(x) >> VI(16);  // arithmetic shift: mask the sign's copies off
      const auto* lut4 = reinterpret_cast<const float*>(lut);  // 4 bytes at each byte index: the low one is ours
      const VI code = at::vec::cast<int32_t>(at::vec::gather<1>(lut4, index & VI(0xffff))) & VI(0xff);
      const V t = at::vec::gather<sizeof(float)>(mid, code);
      const VI up = at::vec::cast<int32_t>(x >= t) & VI(1);  // NaN compares false
      const VI keep = at::vec::cast<int32_t>(x == x);        // NaN: code 0
      ((code + up) & keep).store(c);
      for (int64_t j = 0; j < kW; ++j) codes[i + j] = static_cast<uint8_t>(c[j]);
    }
  }
  for (; i < n; ++i) {  // independent lookups: the loads of neighbouring elements overlap
    const float x = v[i];
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    const uint8_t c = lut[bits >> 16];
    codes[i] = x == x ? static_cast<uint8_t>(c + (x >= mid[c] ? 1 : 0)) : uint8_t(0);
  }
  return absmax;
}

// int4: the block's absmax (scale_block), then each code #{j < 15 : v[i] / d >= mid[j]} (lowbit.quantize's 4-step
// binary search gives the same count) by 15 vector comparisons, no table (NaN compares false: code 0), packed two
// per byte, a missing last element's nibble 0. `v` is overwritten.
inline float quantize_block4(float* v, int64_t n, const float* mid, uint8_t* packed) {
  using V = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  constexpr int64_t kW = V::size();
  const float absmax = scale_block(v, n);
  alignas(64) int32_t code[kQBlock4];
  for (int64_t i = 0; i < n; i += kW) {
    const int64_t m = std::min<int64_t>(kW, n - i);
    const V x = V::loadu(v + i, m);
    VI c(0);
    for (int j = 0; j < kLevels4 - 1; ++j) c = c - at::vec::cast<int32_t>(x >= V(mid[j]));  // true: all bits, -1
    c.store(code + i, m);
  }
  for (int64_t i = 0; i + 1 < n; i += 2) packed[i / 2] = static_cast<uint8_t>((code[i] << 4) | code[i + 1]);
  if (n % 2 != 0) packed[n / 2] = static_cast<uint8_t>(code[n - 1] << 4);
  return absmax;
}

// fp8: the block's absmax (scale_block), then each code the float8_e4m3fn bits of v[i] / d * 448, to nearest even:
// common/quant_format.h's e4m3fn_code, here a vector at a time in the same integer steps. `v` is overwritten.
inline float quantize_block_fp8(float* v, int64_t n, uint8_t* codes) {
  using V = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  constexpr int64_t kW = V::size();
  const float absmax = scale_block(v, n);
  int64_t i = 0;
  alignas(64) int32_t c[kW];
  for (; i + kW <= n; i += kW) {
    const VI bits = at::vec::cast<int32_t>(V::loadu(v + i) * V(kFp8Max));
    const VI abs_bits = bits & VI(0x7fffffff);
    const VI normal = ((abs_bits + VI(0x7ffff) + ((abs_bits >> VI(20)) & VI(1))) >> VI(20)) - VI(120 << 3);
    const VI significand = (abs_bits & VI(0x7fffff)) | VI(0x800000);
    const VI shift = at::vec::minimum(VI(141) - (abs_bits >> VI(23)), VI(25));
    const VI subnormal =
        (significand + (VI(1) << (shift - VI(1))) - VI(1) + ((significand >> shift) & VI(1))) >> shift;
    const VI is_normal = abs_bits >= VI(0x3c800000);  // all bits set where true
    VI code = at::vec::minimum((normal & is_normal) | (subnormal & (is_normal ^ VI(-1))), VI(0x7e));
    code = (code | ((bits >> VI(24)) & VI(0x80))) & (abs_bits <= VI(0x7f800000));  // NaN: code 0
    code.store(c);
    for (int64_t j = 0; j < kW; ++j) codes[i + j] = static_cast<uint8_t>(c[j]);
  }
  for (; i < n; ++i) {
    uint32_t bits;
    const float y = v[i] * kFp8Max;
    std::memcpy(&bits, &y, sizeof(bits));
    codes[i] = e4m3fn_code(bits);
  }
  return absmax;
}

template <typename Op, typename T>
void run_chunk_q8(const OptimStepArgs<typename Op::Hyper>& a, int64_t t, int64_t begin, int64_t end,
                  opmath_t<T> grad_factor) {
  static_assert(std::is_same_v<opmath_t<T>, float>, "low-bit states: float32, bfloat16 and float16 params");
  const bool int4 = a.qkind == QuantKind::kInt4;
  const bool fp8 = a.qkind == QuantKind::kFp8;  // read like int8: map[code] * absmax
  const int64_t block = quant_block_of(a.qkind);
  constexpr int kStates = Op::kStates;
  const auto c = chunk_coefs<Op, T>(a, t);
  std::array<uint8_t*, kSlots<Op>> codes{};
  std::array<float*, kSlots<Op>> absmax{};
  for (int k = 0; k < kStates; ++k) {
    if (a.states[k].empty()) continue;
    codes[k] = static_cast<uint8_t*>(a.states[k][t]);
    absmax[k] = a.absmax[k][t];
  }
  alignas(64) float buf[kSlots<Op>][kQBlock];
  std::array<float*, kSlots<Op>> state{};
  auto* param = static_cast<T*>(a.param[t]);
  auto* grad = static_cast<T*>(a.grad[t]);
  for (int64_t b = begin; b < end; b += block) {  // b is even: int4's byte b / 2 starts the block
    const int64_t n = std::min<int64_t>(block, end - b);
    const int64_t q = b / block;
    for (int k = 0; k < kStates; ++k) {
      state[k] = codes[k] ? buf[k] : nullptr;
      if (!codes[k]) continue;
      if (int4)
        dequantize_block4(codes[k] + b / 2, absmax[k][q], a.qmap[k], buf[k], n);
      else
        dequantize_block(codes[k] + b, absmax[k][q], a.qmap[k], buf[k], n);
    }
    run_range<Op, T, float>(a, c, param + b, grad + b, state, n, grad_factor, b, param_round_key(a, t));
    for (int k = 0; k < kStates; ++k) {
      if (!codes[k]) continue;
      if (int4)
        absmax[k][q] = quantize_block4(buf[k], n, a.qmap[k] + kLevels4, codes[k] + b / 2);
      else if (fp8)
        absmax[k][q] = quantize_block_fp8(buf[k], n, codes[k] + b);
      else
        absmax[k][q] = quantize_block(buf[k], n, a.qmap[k] + kQBlock,
                                      reinterpret_cast<const uint8_t*>(a.qmap[k] + 2 * kQBlock), codes[k] + b);
    }
  }
}

}  // namespace optim_engine
}  // namespace fusedopt::cpu::CPU_CAPABILITY
