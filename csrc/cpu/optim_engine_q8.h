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
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

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

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512 (F, BW, VL, DQ) bodies of the helpers below: whole vectors of 16 here, a block's partial tail by the
// portable scalar code.
namespace avx512 {

constexpr int64_t kW = 16;

// max |v[i]| over the block, compared as bits (sign cleared): a NaN's bits exceed inf's, which exceed every finite
// value's, so one integer max finds the absmax and any NaN (returned as the canonical quiet NaN).
inline float block_absmax(const float* v, int64_t n) {
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512i acc = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc = _mm512_max_epu32(acc, _mm512_and_si512(_mm512_loadu_si512(v + i), magnitude));
  if (i < n) {
    const __mmask16 tail = _cvtu32_mask16((1u << (n - i)) - 1);
    acc = _mm512_max_epu32(acc, _mm512_and_si512(_mm512_maskz_loadu_epi32(tail, v + i), magnitude));
  }
  const uint32_t bits = _mm512_reduce_max_epu32(acc);
  if (bits > 0x7f800000u) return std::numeric_limits<float>::quiet_NaN();
  float absmax;
  std::memcpy(&absmax, &bits, sizeof(absmax));
  return absmax;
}

// int8 codes -> values, 16 at a time: the bytes widened to gather indices in one instruction.
inline int64_t dequantize(const uint8_t* codes, float absmax, const float* map, float* out, int64_t n) {
  const __m512 scale = _mm512_set1_ps(absmax);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_i32gather_ps(index, map, sizeof(float)), scale));
  }
  return i;
}

// int4 codes -> values, 32 (16 bytes) at a time: the 16-value map sits in one register, so a permute is the lookup.
inline int64_t dequantize4(const uint8_t* packed, float absmax, const float* map, float* out, int64_t n) {
  const __m512 table = _mm512_loadu_ps(map);
  const __m512 scale = _mm512_set1_ps(absmax);
  // Element 2j is byte j's high nibble, 2j + 1 its low one: interleave the high nibbles (0-15) with the low (16-31).
  const __m512i first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second_half = _mm512_add_epi32(first_half, _mm512_set1_epi32(8));
  int64_t i = 0;
  for (; i + 2 * kW <= n; i += 2 * kW) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)));
    const __m512i high = _mm512_srli_epi32(bytes, 4);
    const __m512i low = _mm512_and_si512(bytes, _mm512_set1_epi32(15));
    const __m512i code0 = _mm512_permutex2var_epi32(high, first_half, low);
    const __m512i code1 = _mm512_permutex2var_epi32(high, second_half, low);
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_permutexvar_ps(code0, table), scale));
    _mm512_storeu_ps(out + i + kW, _mm512_mul_ps(_mm512_permutexvar_ps(code1, table), scale));
  }
  return i;
}

// The int8 codes of 16 values of x = v / d, as int32 (see quantize_block): one gather of the bucket's word (code and
// threshold, fusedopt/lowbit.py _lookup_table), plus one where x's low 16 bits (reversed for a negative x) reach
// the threshold: x >= the midpoint above the code, without reading it. A NaN needs no mask: a division's NaN is
// quiet, and the table gives every quiet NaN's bucket code 0 and an unreachable threshold.
inline __m512i codes16(const float* v, __m512 divisor, const uint32_t* lut) {
  const __m512 x = _mm512_div_ps(_mm512_loadu_ps(v), divisor);  // a true division: the codes are exact
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i word = _mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), lut, 4);
  const __m512i low16 = _mm512_set1_epi32(0xffff);
  const __m512i position = _mm512_xor_si512(_mm512_and_si512(bits, low16),
                                            _mm512_and_si512(_mm512_srai_epi32(bits, 31), low16));
  const __mmask16 up = _mm512_cmpge_epu32_mask(position, _mm512_srli_epi32(word, 8));
  const __m512i code = _mm512_and_si512(word, _mm512_set1_epi32(0xff));
  return _mm512_mask_add_epi32(code, up, code, _mm512_set1_epi32(1));
}

// int8 codes of x = v / d for whole vectors: 64 at a time narrowed by two packing steps (cheaper than four narrowing
// stores), then 16 at a time. Returns how many it wrote.
inline int64_t quantize(const float* v, float d, const uint32_t* lut, uint8_t* codes, int64_t n) {
  const __m512 divisor = _mm512_set1_ps(d);
  // The packs interleave per 128-bit lane: lane l holds codes 4l..4l+3 of each of the four vectors in turn.
  const __m512i pack_order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    const __m512i words01 = _mm512_packus_epi32(codes16(v + i, divisor, lut), codes16(v + i + kW, divisor, lut));
    const __m512i words23 =
        _mm512_packus_epi32(codes16(v + i + 2 * kW, divisor, lut), codes16(v + i + 3 * kW, divisor, lut));
    const __m512i bytes = _mm512_packus_epi16(words01, words23);
    _mm512_storeu_si512(codes + i, _mm512_permutexvar_epi32(pack_order, bytes));
  }
  for (; i + kW <= n; i += kW)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), _mm512_cvtepi32_epi8(codes16(v + i, divisor, lut)));
  return i;
}

// int4 codes of x = v / d, 16 at a time: the 4-step binary search of lowbit._search with the 16 midpoints (the
// last a NaN, never passed) in one register, then each pair of codes packed into a byte by 64-bit shifts.
inline int64_t quantize4(const float* v, float d, const float* mid, uint8_t* packed, int64_t n) {
  const __m512 divisor = _mm512_set1_ps(d);
  const __m512 mids = _mm512_loadu_ps(mid);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const __m512 x = _mm512_div_ps(_mm512_loadu_ps(v + i), divisor);  // a true division: the codes are exact
    __m512i code = _mm512_setzero_si512();
    for (int step = kLevels4 / 2; step >= 1; step /= 2) {
      const __m512 threshold = _mm512_permutexvar_ps(_mm512_add_epi32(code, _mm512_set1_epi32(step - 1)), mids);
      code = _mm512_mask_add_epi32(code, _mm512_cmp_ps_mask(x, threshold, _CMP_GE_OQ), code, _mm512_set1_epi32(step));
    }
    // a 64-bit lane holds codes 2j (low half) and 2j + 1 (high half): (2j << 4) | (2j + 1) in its low byte
    const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(code, 4), _mm512_srli_epi64(code, 32));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + i / 2), _mm512_cvtepi64_epi8(pairs));
  }
  return i;
}

}  // namespace avx512
#endif

// out[i] = map[codes[i]] * absmax.
inline void dequantize_block(const uint8_t* codes, float absmax, const float* map, float* out, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  i = avx512::dequantize(codes, absmax, map, out, n);
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
inline float quantize_block(float* v, int64_t n, const float* mid, const uint32_t* lut, uint8_t* codes) {
#if defined(CPU_CAPABILITY_AVX512)
  // One pass for the absmax, one that divides and finds the codes.
  const float absmax = avx512::block_absmax(v, n);
  const float d = absmax > 0.0f ? absmax : 1.0f;
  for (int64_t i = avx512::quantize(v, d, lut, codes, n); i < n; ++i) codes[i] = code_of(v[i] / d, mid, lut);
  return absmax;
#else
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
                                      reinterpret_cast<const uint32_t*>(a.qmap[k] + 2 * kQBlock), codes[k] + b);
    }
  }
}

}  // namespace optim_engine
}  // namespace fusedopt::cpu::CPU_CAPABILITY
