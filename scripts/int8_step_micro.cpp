// A standalone microbenchmark of what bounds the CPU int8 AdamW step (csrc/cpu/optim_engine_q8.h run_chunk_q8) on
// L2-resident data, 1 thread: the parts of a block's work timed alone, then the whole block in the engine's order,
// then the Adam update of block b interleaved with the quantizing of block b - 1 (software pipelining: can the
// divider-bound update hide under the shuffle-bound quantizer?). Every part is the project's own: AdamW's update is
// common/adam_math.h's Adam::update on a minimal 16-float vector type (the engine runs it on at::vec::Vectorized,
// which needs ATen), the dequantizer, absmax and quantizer csrc/cpu/quant_avx512.h's. docs/LOW_BIT_STATES.md quotes
// its results.
//   python -c "import fusedopt.lowbit as L
//   for s in (0, 1): L._table_cpu(s, 'int8').numpy().tofile(f'/tmp/int8_{s}.bin')"
//   g++ -O3 -std=c++20 -march=native -Icsrc scripts/int8_step_micro.cpp -o /tmp/int8_step
//   /tmp/int8_step /tmp/int8_1.bin /tmp/int8_0.bin   # the signed (first moment) and unsigned (second) maps
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "common/value_ops.h"

namespace fusedopt {
// 16 floats in a zmm register, with the operations common/<op>_math.h templates use (cpu/vec_ops.h gives them to
// at::vec::Vectorized in the engine).
struct Vec16 {
  __m512 v;
  Vec16() = default;
  explicit Vec16(float x) : v(_mm512_set1_ps(x)) {}
  Vec16(__m512 x) : v(x) {}  // NOLINT: implicit, as Vectorized converts from its register
};
template <>
struct ValueTraits<Vec16> {
  using Scalar = float;
};
inline Vec16 operator+(Vec16 a, Vec16 b) { return _mm512_add_ps(a.v, b.v); }
inline Vec16 operator-(Vec16 a, Vec16 b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec16 operator*(Vec16 a, Vec16 b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec16 operator/(Vec16 a, Vec16 b) { return _mm512_div_ps(a.v, b.v); }
inline Vec16 vfma(Vec16 a, Vec16 b, Vec16 c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
inline Vec16 vsqrt(Vec16 a) { return _mm512_sqrt_ps(a.v); }
inline Vec16 vmax_nan(Vec16 a, Vec16 b) {  // a where a > b or a is NaN (amsgrad only; unused here)
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_NLE_UQ), b.v, a.v);
}
}  // namespace fusedopt

#include "common/adam_math.h"

#define CPU_CAPABILITY AVX512
namespace fusedopt::cpu::AVX512::optim_engine {
constexpr int kLevels4 = 16;  // what quant_avx512.h takes from cpu/optim_engine_q8.h
}
#include "common/int8_tables.h"
#include "cpu/quant_avx512.h"

namespace q = fusedopt::cpu::AVX512::optim_engine::avx512;

namespace {

constexpr int64_t kN = 1 << 16, kBlock = 256, kGroup = 64, kW = 16;

struct Map {  // one state's int8 table (fusedopt.lowbit._table_cpu) as the kernel takes it
  std::vector<float> words = std::vector<float>(512 + fusedopt::kInt8LutWords + fusedopt::kInt8SlotWords);
  q::BytePlanes values, mids;
  const uint8_t* slots() const {
    return reinterpret_cast<const uint8_t*>(words.data() + 512 + fusedopt::kInt8LutWords);
  }
};

// AdamW (torch.optim.AdamW's defaults, lr 1e-3, step 10) on 16 values, by the engine's math: Adam::update.
const auto kAdamW = fusedopt::Adam::coefs<fusedopt::Vec16>(
    [] {
      fusedopt::AdamHyper h;
      h.weight_decay = 0.01;
      h.decoupled_weight_decay = true;
      return h;
    }(),
    1e-3, 10.0);

inline void adam16(float* p, const float* g, float* m, float* v) {
  fusedopt::Vec16 param(_mm512_loadu_ps(p)), state[2] = {_mm512_loadu_ps(m), _mm512_loadu_ps(v)};
  fusedopt::Adam::update(kAdamW, param, fusedopt::Vec16(_mm512_loadu_ps(g)), state);
  _mm512_storeu_ps(p, param.v);
  _mm512_storeu_ps(m, state[0].v);
  _mm512_storeu_ps(v, state[1].v);
}

// The divider alone: one square root and two divisions per 16 values, as Adam::update, on independent vectors.
double divider_ns_per_param() {
  __m512 a[8];
  for (int k = 0; k < 8; ++k) a[k] = _mm512_set1_ps(1.5f + k);
  const __m512 d = _mm512_set1_ps(1.0001f);
  constexpr int kRounds = 1 << 20;
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < kRounds; ++r)
    for (int k = 0; k < 8; ++k) {
      a[k] = _mm512_div_ps(_mm512_div_ps(_mm512_sqrt_ps(a[k]), d), d);
      __asm__ volatile("" : "+v"(a[k]));  // kept in registers, each vector its own chain
    }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return seconds / (double(kRounds) * 8 * kW) * 1e9;
}

float divisor(float absmax) { return absmax > 0.0f ? absmax : 1.0f; }

template <typename F>
double ns_per_param(F&& run) {
  double best = 1e30;
  for (int pass = 0; pass < 200; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    run();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best / kN * 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s SIGNED.bin UNSIGNED.bin (fusedopt.lowbit._table_cpu(signed, 'int8'))\n", argv[0]);
    return 2;
  }
  Map map[2];  // [0]: exp_avg (signed), [1]: exp_avg_sq (unsigned)
  for (int s = 0; s < 2; ++s) {
    FILE* f = std::fopen(argv[1 + s], "rb");
    if (f == nullptr || std::fread(map[s].words.data(), 4, map[s].words.size(), f) != map[s].words.size()) return 2;
    std::fclose(f);
    q::split_bytes(map[s].words.data(), map[s].values);
    q::split_bytes(map[s].words.data() + 256, map[s].mids);
  }
  std::vector<float> param(kN), grad(kN), absmax[2];
  std::vector<uint8_t> codes[2];
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& x : param) x = normal(rng);
  for (float& x : grad) x = normal(rng);
  for (int s = 0; s < 2; ++s) {
    absmax[s].assign(kN / kBlock, 1.0f);
    codes[s].resize(kN);
    for (auto& c : codes[s]) c = static_cast<uint8_t>(rng());
  }
  alignas(64) float buf[2][2][kBlock];  // [block parity][state]

  const auto dequantize = [&](int64_t b, float* (&state)[2]) {
    for (int s = 0; s < 2; ++s)
      q::dequantize_vbmi(codes[s].data() + b, absmax[s][b / kBlock], map[s].values, state[s], kBlock);
  };
  const auto new_absmax = [&](int64_t b, float* (&state)[2]) {
    for (int s = 0; s < 2; ++s) absmax[s][b / kBlock] = q::block_absmax(state[s], kBlock);
  };
  const auto quantize = [&](int64_t b, float* (&state)[2], int s, int64_t at, int64_t n) {
    q::quantize_vbmi(state[s] + at, divisor(absmax[s][b / kBlock]), map[s].slots(), map[s].mids,
                     codes[s].data() + b + at, n);
  };
  const auto update = [&](int64_t b, float* (&state)[2], int64_t at) {
    adam16(param.data() + b + at, grad.data() + b + at, state[0] + at, state[1] + at);
  };
  float* even[2] = {buf[0][0], buf[0][1]};
  float* odd[2] = {buf[1][0], buf[1][1]};
  dequantize(0, even);  // states of the maps' range: the parts timed alone see no garbage (NaN, subnormals)
  dequantize(0, odd);

  const auto update_only = [&] {
    for (int64_t b = 0; b < kN; b += kBlock)
      for (int64_t i = 0; i < kBlock; i += kW) update(b, even, i);
  };
  const auto quantize_only = [&] {
    for (int64_t b = 0; b < kN; b += kBlock)
      for (int s = 0; s < 2; ++s) quantize(b, even, s, 0, kBlock);
  };
  const auto dequantize_absmax_only = [&] {
    for (int64_t b = 0; b < kN; b += kBlock) {
      dequantize(b, even);
      new_absmax(b, even);
    }
  };
  const auto in_order = [&] {  // the engine's order: a block's dequantizing, update, absmax, quantizing
    for (int64_t b = 0; b < kN; b += kBlock) {
      dequantize(b, even);
      for (int64_t i = 0; i < kBlock; i += kW) update(b, even, i);
      new_absmax(b, even);
      for (int s = 0; s < 2; ++s) quantize(b, even, s, 0, kBlock);
    }
  };
  // Block b's 16 update vectors spread over block b - 1's 8 quantizing groups, `per` before each group.
  const auto pipelined = [&](int per) {
    for (int64_t b = 0; b <= kN; b += kBlock) {
      auto& now = (b / kBlock) % 2 ? odd : even;
      auto& before = (b / kBlock) % 2 ? even : odd;
      const bool updating = b < kN, quantizing = b > 0;
      if (updating) dequantize(b, now);
      int64_t i = 0;
      for (int group = 0; group < 2 * kBlock / kGroup; ++group) {
        for (int j = 0; updating && j < per && i < kBlock; ++j, i += kW) update(b, now, i);
        const int s = group / (kBlock / kGroup);
        if (quantizing) quantize(b - kBlock, before, s, group % (kBlock / kGroup) * kGroup, kGroup);
      }
      for (; updating && i < kBlock; i += kW) update(b, now, i);
      if (updating) new_absmax(b, now);
    }
  };
  std::printf("ns per param: the divider alone (sqrt + 2 divisions) %.3f\n", divider_ns_per_param());
  for (int round = 0; round < 3; ++round)
    std::printf("ns per param: update %.3f, quantize 2 states %.3f, dequantize + absmax %.3f | in order %.3f, "
                "pipelined 1 vector per group %.3f, 2 per group %.3f\n",
                ns_per_param(update_only), ns_per_param(quantize_only), ns_per_param(dequantize_absmax_only),
                ns_per_param(in_order), ns_per_param([&] { pipelined(1); }), ns_per_param([&] { pipelined(2); }));
  return 0;
}
