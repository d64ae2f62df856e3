// The AVX-512 bodies of the low-bit engine's block helpers (cpu/optim_engine_q8.h): whole vectors here, a block's
// partial tail by the portable scalar code there. The byte-permute (VBMI) variants run only where the CPU has them
// (cpu::byte_permutes()): they look up 64 table entries per few permutes where a gather looks up 16, and a gather is
// the costliest instruction here (on Zen 4 about 0.2 ns per value: bench/results/cpu/adamw-int8-zen4-2026-12-03.md).
// Included only from cpu/optim_engine_q8.h (after its constants), for CPU_CAPABILITY_AVX512.
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <limits>

namespace fusedopt::cpu::CPU_CAPABILITY::optim_engine::avx512 {

constexpr int64_t kW = 16;

// A 4 x 4 transpose of 4-byte groups: byte packs and unpacks interleave within 128-bit lanes, and this permute (of
// their input or of their output) puts 64 bytes back in element order.
inline __m512i lane_transpose() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }

// 64 int32 values in 0..255, four vectors in element order, as 64 bytes in element order: two packing steps
// (cheaper than four narrowing stores), then the transpose that undoes their per-lane interleave.
inline __m512i narrow64(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i words01 = _mm512_packus_epi32(v0, v1), words23 = _mm512_packus_epi32(v2, v3);
  return _mm512_permutexvar_epi32(lane_transpose(), _mm512_packus_epi16(words01, words23));
}

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

// --- VBMI: byte permutes (Ice Lake and later; used where cpu::byte_permutes()) --------------------------------------
// A 256-float map as four 256-byte planes, plane p holding byte p of every value: two 128-byte permutes and a blend
// on the code's top bit look up one byte of 64 codes at once, where a gather looks up 16 whole values. The planes
// are made once per chunk.
#define FUSEDOPT_TARGET_VBMI __attribute__((target("avx512f,avx512bw,avx512vbmi")))

struct BytePlanes {
  alignas(64) uint8_t plane[4][256];
};

FUSEDOPT_TARGET_VBMI inline void split_bytes(const float* map, BytePlanes& out) {
  for (int i = 0; i < 256; i += kW) {
    const __m512i bits = _mm512_loadu_si512(map + i);
    for (int p = 0; p < 4; ++p)
      _mm_store_si128(reinterpret_cast<__m128i*>(out.plane[p] + i),
                      _mm512_cvtepi32_epi8(_mm512_srli_epi32(bits, 8 * p)));  // truncates: byte p
  }
}

// A split 256-float table held in registers: [plane][quarter], 64 bytes each.
struct PlaneRegisters {
  __m512i table[4][4];
};
FUSEDOPT_TARGET_VBMI inline void load_planes(const BytePlanes& planes, PlaneRegisters& out) {
  for (int p = 0; p < 4; ++p)
    for (int q = 0; q < 4; ++q) out.table[p][q] = _mm512_load_si512(planes.plane[p] + 64 * q);
}

// 64 bytes of a 256-byte table (four 64-byte registers) at 64 byte indices: two 128-byte permutes and a blend on
// the index's top bit.
FUSEDOPT_TARGET_VBMI inline __m512i byte_lookup(const __m512i (&quarter)[4], __m512i index) {
  return _mm512_mask_blend_epi8(_mm512_movepi8_mask(index), _mm512_permutex2var_epi8(quarter[0], index, quarter[1]),
                                _mm512_permutex2var_epi8(quarter[2], index, quarter[3]));
}

// The table's floats at 64 byte indices (element order): element 16k + j in out[k] lane j. One byte_lookup per
// plane, then the planes interleaved back into floats.
FUSEDOPT_TARGET_VBMI inline void lookup64(const PlaneRegisters& t, __m512i index, __m512i out[4]) {
  // The byte and word unpacks below interleave within 128-bit lanes: output vector k, lane l, holds the bytes at
  // 16l + 4k .. 16l + 4k + 3. Moving index 16k + 4l + j there first (a 4 x 4 transpose of 4-byte groups) makes
  // output vector k hold elements 16k .. 16k + 15 in order.
  index = _mm512_permutexvar_epi32(lane_transpose(), index);
  __m512i byte[4];
  for (int p = 0; p < 4; ++p) byte[p] = byte_lookup(t.table[p], index);
  const __m512i low01 = _mm512_unpacklo_epi8(byte[0], byte[1]), high01 = _mm512_unpackhi_epi8(byte[0], byte[1]);
  const __m512i low23 = _mm512_unpacklo_epi8(byte[2], byte[3]), high23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
  out[0] = _mm512_unpacklo_epi16(low01, low23);
  out[1] = _mm512_unpackhi_epi16(low01, low23);
  out[2] = _mm512_unpacklo_epi16(high01, high23);
  out[3] = _mm512_unpackhi_epi16(high01, high23);
}

// int8 / fp8 codes -> values (map[code] * absmax), 64 at a time. Returns how many it wrote.
FUSEDOPT_TARGET_VBMI inline int64_t dequantize_vbmi(const uint8_t* codes, float absmax, const BytePlanes& planes,
                                                    float* out, int64_t n) {
  PlaneRegisters map;
  load_planes(planes, map);
  const __m512 scale = _mm512_set1_ps(absmax);
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    __m512i value[4];
    lookup64(map, _mm512_loadu_si512(codes + i), value);
    for (int k = 0; k < 4; ++k)
      _mm512_storeu_ps(out + i + k * kW, _mm512_mul_ps(_mm512_castsi512_ps(value[k]), scale));
  }
  return i;
}

// int8 codes of 64 quotients x (element order) from their slots' codes c (bytes): c + (x >= mid[c]) +
// (x >= mid[c + 1]) by float comparisons, the midpoints looked up by byte permutes from `mid_planes` (the 256
// midpoints split; mid[255] is the NaN, never passed). A c of 255 (a slot above mid[254]) is taken as 254, which
// gives 255 again. quantize_vbmi's exact path.
FUSEDOPT_TARGET_VBMI inline __m512i codes_by_midpoints(const __m512 (&x)[4], __m512i code,
                                                       const BytePlanes& mid_planes) {
  PlaneRegisters mid;
  load_planes(mid_planes, mid);
  const __m512i one = _mm512_set1_epi8(1);
  code = _mm512_min_epu8(code, _mm512_set1_epi8(static_cast<char>(254)));
  __m512i below[4], above[4];  // mid[c], mid[c + 1]
  lookup64(mid, code, below);
  lookup64(mid, _mm512_add_epi8(code, one), above);
  __mmask16 up1[4], up2[4];
  for (int k = 0; k < 4; ++k) {
    up1[k] = _mm512_cmp_ps_mask(x[k], _mm512_castsi512_ps(below[k]), _CMP_GE_OQ);
    up2[k] = _mm512_cmp_ps_mask(x[k], _mm512_castsi512_ps(above[k]), _CMP_GE_OQ);
  }
  const __mmask64 first = _mm512_kunpackd(_mm512_kunpackw(up1[3], up1[2]), _mm512_kunpackw(up1[1], up1[0]));
  const __mmask64 second = _mm512_kunpackd(_mm512_kunpackw(up2[3], up2[2]), _mm512_kunpackw(up2[1], up2[0]));
  code = _mm512_mask_add_epi8(code, first, code, one);
  return _mm512_mask_add_epi8(code, second, code, one);
}

// The register lookup's slot and 15-bit position (fusedopt/lowbit.py _slot_tables, _slot_position) of 32 floats,
// given as their top and low 16-bit halves: sign, exponent (clamped to the 32 octaves 2^-31 .. 2^0) and top 7
// mantissa bits choose the slot, base + (top mantissa >> s) with s = shift - 16 (`entry` holds base | s << 8 for
// the 64 sign-octaves); the position is the next 15 mantissa bits, complemented for a negative float.
struct SlotPositions {
  __m512i slot, position;
};
FUSEDOPT_TARGET_VBMI inline SlotPositions slot_positions(__m512i top, __m512i low, __m512i entry_lo,
                                                         __m512i entry_hi) {
  const __m512i exponent = _mm512_and_si512(_mm512_srli_epi16(top, 7), _mm512_set1_epi16(0xff));
  const __m512i octave =
      _mm512_min_epu16(_mm512_subs_epu16(exponent, _mm512_set1_epi16(127 - 31)), _mm512_set1_epi16(31));
  const __m512i sign32 = _mm512_and_si512(_mm512_srli_epi16(top, 10), _mm512_set1_epi16(32));  // bit 15 -> bit 5
  const __m512i entry = _mm512_permutex2var_epi16(entry_lo, _mm512_or_si512(octave, sign32), entry_hi);
  const __m512i s = _mm512_srli_epi16(entry, 8);
  const __m512i slot = _mm512_add_epi16(_mm512_and_si512(entry, _mm512_set1_epi16(0xff)),
                                        _mm512_srlv_epi16(_mm512_and_si512(top, _mm512_set1_epi16(0x7f)), s));
  // bits s + 1 .. s + 15 of the 32-bit float, (top:low) >> (s + 1), then xor-ed with the sign's copies and masked
  const __m512i r = _mm512_add_epi16(s, _mm512_set1_epi16(1));
  const __m512i raw =
      _mm512_or_si512(_mm512_sllv_epi16(top, _mm512_sub_epi16(_mm512_set1_epi16(16), r)), _mm512_srlv_epi16(low, r));
  constexpr int kXorThenAnd = 0x28;  // (a ^ b) & c
  return {slot, _mm512_ternarylogic_epi32(raw, _mm512_srai_epi16(top, 15), _mm512_set1_epi16(0x7fff), kXorThenAnd)};
}

// int8 codes of x = v / d (the float32 quotient) with no gather, 64 at a time, from the register lookup's tables
// (`slots`: the table's SLOT_WORDS words, fusedopt/lowbit.py _slot_tables). The 64 slots' code c and thresholds
// t1, t2 are looked up by byte permutes, and code = c + (p > t1) + (p > t2) on 16-bit lanes, p the position;
// where some p equals a threshold (1 value in 30000 on spread data) the 64 take codes_by_midpoints instead. The
// caller's block has a finite absmax: x is finite and not NaN. Returns how many it wrote.
FUSEDOPT_TARGET_VBMI inline int64_t quantize_vbmi(const float* v, float d, const uint8_t* slots,
                                                  const BytePlanes& mid_planes, uint8_t* codes, int64_t n) {
  const __m512 divisor = _mm512_set1_ps(d);
  __m512i entry[2];  // base | (shift - 16) << 8, the 64 sign-octaves in 16-bit lanes
  for (int h = 0; h < 2; ++h) {
    const auto* bytes = reinterpret_cast<const __m256i*>(slots + 32 * h);
    const __m512i base = _mm512_cvtepu8_epi16(_mm256_loadu_si256(bytes));
    const __m512i shift = _mm512_cvtepu8_epi16(_mm256_loadu_si256(bytes + 2));  // 64 bytes on
    entry[h] = _mm512_or_si512(base, _mm512_slli_epi16(_mm512_sub_epi16(shift, _mm512_set1_epi16(16)), 8));
  }
  constexpr int kCode = 0, kTables = 5;  // the slot codes, then the thresholds' bytes: t1 low, t1 high, t2 ...
  __m512i table[kTables][4];
  for (int t = 0; t < kTables; ++t)
    for (int q = 0; q < 4; ++q) table[t][q] = _mm512_loadu_si512(slots + 128 + 256 * t + 64 * q);
  // the 16-bit halves of two float vectors, each set of 32 in element order
  const __m512i top_halves = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                              27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i low_halves = _mm512_sub_epi16(top_halves, _mm512_set1_epi16(1));
  // a 16-bit pack interleaves its two inputs by 8-byte groups in each 128-bit lane; this restores element order
  const __m512i pack_order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
  const __m512i one = _mm512_set1_epi16(1), zero = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    __m512 x[4];
    for (int k = 0; k < 4; ++k) x[k] = _mm512_div_ps(_mm512_loadu_ps(v + i + k * kW), divisor);
    SlotPositions at[2];  // elements 0..31 and 32..63
    for (int h = 0; h < 2; ++h) {
      const __m512i a = _mm512_castps_si512(x[2 * h]), b = _mm512_castps_si512(x[2 * h + 1]);
      at[h] = slot_positions(_mm512_permutex2var_epi16(a, top_halves, b), _mm512_permutex2var_epi16(a, low_halves, b),
                             entry[0], entry[1]);
    }
    const __m512i index = _mm512_packus_epi16(at[0].slot, at[1].slot);  // in pack order
    __m512i looked_up[kTables];
    for (int t = 0; t < kTables; ++t) looked_up[t] = byte_lookup(table[t], index);
    __mmask32 tie = 0;
    __m512i code16[2];
    for (int h = 0; h < 2; ++h) {  // the low (high) bytes of each lane in pack order: elements 32h .. 32h + 31
      const auto widen = [h](__m512i low_byte, __m512i high_byte) {
        return h == 0 ? _mm512_unpacklo_epi8(low_byte, high_byte) : _mm512_unpackhi_epi8(low_byte, high_byte);
      };
      const __m512i c = widen(looked_up[kCode], zero), p = at[h].position;
      const __m512i t1 = widen(looked_up[1], looked_up[2]), t2 = widen(looked_up[3], looked_up[4]);
      tie |= _mm512_cmpeq_epi16_mask(p, t1) | _mm512_cmpeq_epi16_mask(p, t2);
      const __m512i up1 = _mm512_mask_add_epi16(c, _mm512_cmpgt_epu16_mask(p, t1), c, one);
      code16[h] = _mm512_mask_add_epi16(up1, _mm512_cmpgt_epu16_mask(p, t2), up1, one);
    }
    __m512i code = _mm512_permutexvar_epi64(pack_order, _mm512_packus_epi16(code16[0], code16[1]));
    if (__builtin_expect(tie != 0, 0))
      code = codes_by_midpoints(x, _mm512_permutexvar_epi64(pack_order, looked_up[kCode]), mid_planes);
    _mm512_storeu_si512(codes + i, code);
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

// Where 16 values x fall in the int8 lookup table (see quantize_block): the gathered word of x's bucket (code and
// threshold, fusedopt/lowbit.py _lookup_table) and x's position in the bucket, its low 16 bits (reversed for a
// negative x, so that a larger position is a larger x).
struct Lookup16 {
  __m512i word, position;
};
inline Lookup16 look_up(__m512 x, const uint32_t* lut) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i low16 = _mm512_set1_epi32(0xffff);
  return {_mm512_i32gather_epi32(_mm512_srli_epi32(bits, 16), lut, 4),
          _mm512_xor_si512(_mm512_and_si512(bits, low16), _mm512_and_si512(_mm512_srai_epi32(bits, 31), low16))};
}

// The code: the word's, plus one where x reaches the threshold (x >= the midpoint above the code, without reading
// it). A NaN needs no mask: a quiet NaN's bucket has code 0 and an unreachable threshold.
inline __m512i code16(const Lookup16& at) {
  const __mmask16 up = _mm512_cmpge_epu32_mask(at.position, _mm512_srli_epi32(at.word, 8));
  const __m512i code = _mm512_and_si512(at.word, _mm512_set1_epi32(0xff));
  return _mm512_mask_add_epi32(code, up, code, _mm512_set1_epi32(1));
}

// The int8 codes of 16 values of x = v / d (the float32 quotient, correctly rounded), as int32. x is first taken as
// v * (1 / d), which (d in [2^-126, 2^126]) is within one ulp of it: one step of x's bits at most, so the code
// can differ only where x's position is next to the threshold or at a bucket's edge. Those vectors (about 1 in 300)
// are redone with the true division; the division is the slowest instruction here otherwise.
inline __m512i codes16(const float* v, __m512 divisor, __m512 reciprocal, const uint32_t* lut) {
  const __m512 y = _mm512_loadu_ps(v);
  Lookup16 at = look_up(_mm512_mul_ps(y, reciprocal), lut);
  const __m512i threshold = _mm512_srli_epi32(at.word, 8);
  // position - threshold in {-1, 0} (one step from the other side): offset + 1 in {0, 1}, compared unsigned
  const __m512i offset = _mm512_add_epi32(_mm512_sub_epi32(at.position, threshold), _mm512_set1_epi32(1));
  const __mmask16 near = _mm512_cmple_epu32_mask(offset, _mm512_set1_epi32(1));
  // position 0xffff or 0 (one step may cross into the next bucket): position + 1 is 0x10000 or 1
  const __m512i edge = _mm512_and_si512(_mm512_add_epi32(at.position, _mm512_set1_epi32(1)), _mm512_set1_epi32(0xfffe));
  const __mmask16 at_edge = _mm512_cmpeq_epi32_mask(edge, _mm512_setzero_si512());
  if (__builtin_expect(_kortestz_mask16_u8(near, at_edge) == 0, 0)) at = look_up(_mm512_div_ps(y, divisor), lut);
  return code16(at);
}

// int8 codes of x = v / d for whole vectors: 64 at a time (narrow64), then 16 at a time. Returns how many it
// wrote. d outside [2^-126, 2^126] (its reciprocal not a normal float32, or infinite) takes the true division
// throughout.
inline int64_t quantize(const float* v, float d, const uint32_t* lut, uint8_t* codes, int64_t n) {
  const __m512 divisor = _mm512_set1_ps(d);
  const bool reciprocal_ok = d >= 0x1p-126f && d <= 0x1p126f;
  // otherwise a NaN reciprocal: a number times it is that NaN, whose position (0) is a bucket's edge, so every
  // vector is redone with the division (a NaN v gets code 0 either way)
  const __m512 reciprocal = _mm512_set1_ps(reciprocal_ok ? 1.0f / d : std::numeric_limits<float>::quiet_NaN());
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    __m512i code[4];
    for (int k = 0; k < 4; ++k) code[k] = codes16(v + i + k * kW, divisor, reciprocal, lut);
    _mm512_storeu_si512(codes + i, narrow64(code[0], code[1], code[2], code[3]));
  }
  for (; i + kW <= n; i += kW)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm512_cvtepi32_epi8(codes16(v + i, divisor, reciprocal, lut)));
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

}  // namespace fusedopt::cpu::CPU_CAPABILITY::optim_engine::avx512

#undef FUSEDOPT_TARGET_VBMI
