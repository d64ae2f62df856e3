// The CPU engine's path for block-wise quantized states, int8, int4 and fp8 (common/optim_q8.h,
// docs/LOW_BIT_STATES.md). A chunk (32K elements, so block-aligned) is processed one quantization block (256 or 128
// elements) at a time: each used state's codes are dequantized into a stack buffer in opmath, the op's update runs
// on it through the engine's run_range (the same loads, stores and math as a full-precision step; under master
// weights the param is read from and written to its master), then each state's block gets its new absmax and every
// value the nearest code. One read and one write of the codes; no full-precision state in memory.
// Included only from cpu/optim_engine.h.
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/int8_tables.h"
#include "common/quant_format.h"
#include "cpu/vec_io.h"

namespace fusedopt::cpu::CPU_CAPABILITY::optim_engine {
constexpr int64_t kQBlock = 256;   // int8's block, the largest
constexpr int64_t kQBlock4 = 128;  // int4's
constexpr int kLevels4 = 16;
}  // namespace fusedopt::cpu::CPU_CAPABILITY::optim_engine

#if defined(CPU_CAPABILITY_AVX512)
#include "cpu/quant_avx512.h"  // the AVX-512 bodies of the helpers below
#endif

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace optim_engine {

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr bool kHasGather = true;  // at::vec::gather is one instruction (and honours a byte scale)
#else
constexpr bool kHasGather = false;
#endif

#if defined(CPU_CAPABILITY_AVX512)
using BytePlanes = avx512::BytePlanes;
#else
struct BytePlanes {};  // byte permutes are AVX-512 VBMI only
#endif

// out[i] = map[codes[i]] * absmax; by byte permutes where `planes` (the map's, cpu::byte_permutes()) is given.
inline void dequantize_block(const uint8_t* codes, float absmax, const float* map, const BytePlanes* planes,
                             float* out, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if (planes != nullptr) i = avx512::dequantize_vbmi(codes, absmax, *planes, out, n);
  i += avx512::dequantize(codes + i, absmax, map, out + i, n - i);
#else
  using V = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  constexpr int64_t kW = V::size();
  if constexpr (kHasGather) {
    alignas(64) int32_t idx[kW];
    for (; i + kW <= n; i += kW) {
      for (int64_t j = 0; j < kW; ++j) idx[j] = codes[i + j];
      (at::vec::gather<sizeof(float)>(map, VI::loadu(idx)) * V(absmax)).store(out + i);
    }
  }
#endif
  for (; i < n; ++i) out[i] = map[codes[i]] * absmax;
}

// int4: out[i] = map[code i] * absmax, codes two per byte (element 2j in the high nibble of byte j).
inline void dequantize_block4(const uint8_t* packed, float absmax, const float* map, float* out, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  i = avx512::dequantize4(packed, absmax, map, out, n);  // i is even
#else
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
#endif
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

// x's int8 code by the lookup table (quantize_block); NaN: 0.
inline uint8_t code_of(float x, const float* mid, const uint32_t* lut) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint8_t c = static_cast<uint8_t>(lut[bits >> 16] & 0xffU);
  return x == x ? static_cast<uint8_t>(c + (x >= mid[c] ? 1 : 0)) : uint8_t(0);
}

// x's int4 code: #{j < 15 : x >= mid[j]} (NaN: 0).
inline int code4_of(float x, const float* mid) {
  int c = 0;
  for (int j = 0; j < kLevels4 - 1; ++j) c += x >= mid[j] ? 1 : 0;
  return c;
}

// The block's absmax (scale_block), then codes[i] = #{j : v[i] / d >= mid[j]}: what lowbit.quantize's 8-step binary
// search gives, found here with the map's lookup table (common/optim_q8.h): lut[bits(x) >> 16] holds the code of
// the lowest x of those 2^16 floats, which hold at most one midpoint, so one comparison finishes it (mid[255] is
// NaN: never passed); the AVX-512 path compares x's low bits with the word's threshold instead of the midpoint.
// A NaN gets code 0; its block reads back NaN through its NaN absmax. The portable path overwrites `v`
// (x = v / d); the AVX-512 one divides in registers and leaves it.
// Where `mid_planes` (the midpoints split into byte planes, cpu::byte_permutes()) is given and the absmax is finite,
// whole groups of 64 take the register lookup instead (avx512::quantize_vbmi, with the table's `slots`): no gather.
inline float quantize_block(float* v, int64_t n, const float* mid, const uint32_t* lut, const uint8_t* slots,
                            const BytePlanes* mid_planes, uint8_t* codes) {
#if defined(CPU_CAPABILITY_AVX512)
  // One pass for the absmax, one that divides and finds the codes.
  const float absmax = avx512::block_absmax(v, n);
  const float d = absmax > 0.0f ? absmax : 1.0f;
  int64_t i = 0;
  if (mid_planes != nullptr && std::isfinite(absmax)) i = avx512::quantize_vbmi(v, d, slots, *mid_planes, codes, n);
  for (i += avx512::quantize(v + i, d, lut, codes + i, n - i); i < n; ++i) codes[i] = code_of(v[i] / d, mid, lut);
  return absmax;
#else
  (void)slots;
  (void)mid_planes;
  using V = at::vec::Vectorized<float>;
  constexpr int64_t kW = V::size();
  const float absmax = scale_block(v, n);
  int64_t i = 0;
  if constexpr (kHasGather) {  // the same lookup, a vector at a time: the words' low bytes by a gather
    using VI = at::vec::Vectorized<int32_t>;
    alignas(64) int32_t c[kW];
    for (; i + kW <= n; i += kW) {
      const V x = V::loadu(v + i);
      const VI index = at::vec::cast<int32_t>(x) >> VI(16);  // arithmetic shift: mask the sign's copies off
      const auto* words = reinterpret_cast<const float*>(lut);
      const VI code = at::vec::cast<int32_t>(at::vec::gather<4>(words, index & VI(0xffff))) & VI(0xff);
      const V t = at::vec::gather<sizeof(float)>(mid, code);
      const VI up = at::vec::cast<int32_t>(x >= t) & VI(1);  // NaN compares false
      const VI keep = at::vec::cast<int32_t>(x == x);        // NaN: code 0
      ((code + up) & keep).store(c);
      for (int64_t j = 0; j < kW; ++j) codes[i + j] = static_cast<uint8_t>(c[j]);
    }
  }
  for (; i < n; ++i) codes[i] = code_of(v[i], mid, lut);  // independent lookups: neighbouring loads overlap
  return absmax;
#endif
}

// int4: the block's absmax (scale_block), then each code #{j < 15 : v[i] / d >= mid[j]} (lowbit.quantize's 4-step
// binary search gives the same count; the portable path by 15 vector comparisons, the AVX-512 one by that search),
// no table (NaN compares false: code 0), packed two per byte, a missing last element's nibble 0. The portable path
// overwrites `v`.
inline float quantize_block4(float* v, int64_t n, const float* mid, uint8_t* packed) {
#if defined(CPU_CAPABILITY_AVX512)
  const float absmax = avx512::block_absmax(v, n);
  const float d = absmax > 0.0f ? absmax : 1.0f;
  for (int64_t i = avx512::quantize4(v, d, mid, packed, n); i < n; i += 2) {  // i is even
    const int second = i + 1 < n ? code4_of(v[i + 1] / d, mid) : 0;
    packed[i / 2] = static_cast<uint8_t>((code4_of(v[i] / d, mid) << 4) | second);
  }
  return absmax;
#else
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
#endif
}

// fp8: the block's absmax, then each code the float8_e4m3fn bits of v[i] / d * 448, to nearest even:
// common/quant_format.h's e4m3fn_code, here a vector at a time in the same integer steps. The portable path divides
// `v` in place first (scale_block); the AVX-512 one divides in registers and leaves it.
inline float quantize_block_fp8(float* v, int64_t n, uint8_t* codes) {
  using V = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  constexpr int64_t kW = V::size();
#if defined(CPU_CAPABILITY_AVX512)
  const float absmax = avx512::block_absmax(v, n);
  const float d = absmax > 0.0f ? absmax : 1.0f;
  const auto scaled = [d](V x) { return x / V(d); };  // a true division: the codes are exact
#else
  const float absmax = scale_block(v, n);
  const float d = 1.0f;  // v is divided already
  const auto scaled = [](V x) { return x; };
#endif
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const VI bits = at::vec::cast<int32_t>(scaled(V::loadu(v + i)) * V(kFp8Max));
    const VI abs_bits = bits & VI(0x7fffffff);
    const VI normal = ((abs_bits + VI(0x7ffff) + ((abs_bits >> VI(20)) & VI(1))) >> VI(20)) - VI(120 << 3);
    const VI significand = (abs_bits & VI(0x7fffff)) | VI(0x800000);
    const VI shift = at::vec::minimum(VI(141) - (abs_bits >> VI(23)), VI(25));
    const VI subnormal =
        (significand + (VI(1) << (shift - VI(1))) - VI(1) + ((significand >> shift) & VI(1))) >> shift;
    const VI is_normal = abs_bits >= VI(0x3c800000);  // all bits set where true
    VI code = at::vec::minimum((normal & is_normal) | (subnormal & (is_normal ^ VI(-1))), VI(0x7e));
    code = (code | ((bits >> VI(24)) & VI(0x80))) & (abs_bits <= VI(0x7f800000));  // NaN: code 0
#if defined(CPU_CAPABILITY_AVX512)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(__m512i(code)));
#else
    alignas(64) int32_t c[kW];
    code.store(c);
    for (int64_t j = 0; j < kW; ++j) codes[i + j] = static_cast<uint8_t>(c[j]);
#endif
  }
  for (; i < n; ++i) {
    uint32_t bits;
    const float y = (v[i] / d) * kFp8Max;
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
  std::array<BytePlanes, kSlots<Op>> planes, mid_planes;  // the map's values; int8's midpoints
#if defined(CPU_CAPABILITY_AVX512)
  const bool permutes = !int4 && byte_permutes();  // int8 and fp8 codes index a 256-float map
  if (permutes)
    for (int k = 0; k < kStates; ++k) {
      if (!codes[k]) continue;
      avx512::split_bytes(a.qmap[k], planes[k]);
      if (!fp8) avx512::split_bytes(a.qmap[k] + kQBlock, mid_planes[k]);
    }
#else
  constexpr bool permutes = false;
#endif
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
        dequantize_block(codes[k] + b, absmax[k][q], a.qmap[k], permutes ? &planes[k] : nullptr, buf[k], n);
    }
    run_range<Op, T, float>(a, c, param + b, grad + b, state, n, grad_factor, b, param_round_key(a, t),
                            master_at(a, t, b));
    for (int k = 0; k < kStates; ++k) {
      if (!codes[k]) continue;
      if (int4)
        absmax[k][q] = quantize_block4(buf[k], n, a.qmap[k] + kLevels4, codes[k] + b / 2);
      else if (fp8)
        absmax[k][q] = quantize_block_fp8(buf[k], n, codes[k] + b);
      else
        absmax[k][q] = quantize_block(buf[k], n, a.qmap[k] + kQBlock,
                                      reinterpret_cast<const uint32_t*>(a.qmap[k] + 2 * kQBlock),
                                      reinterpret_cast<const uint8_t*>(a.qmap[k] + 2 * kQBlock + kInt8LutWords),
                                      permutes ? &mid_planes[k] : nullptr, codes[k] + b);
    }
  }
}

}  // namespace optim_engine
}  // namespace fusedopt::cpu::CPU_CAPABILITY
