// A standalone microbenchmark of the int8 quantizer for VBMI CPUs (csrc/cpu/quant_avx512.h quantize_vbmi) on
// L1-resident blocks of 256, 1 thread, with its codes checked against the 8-step binary search (lowbit._search):
// on 32768 m-like (signed) or v-like (unsigned) values, and on every midpoint +-3 ulps.
//   python -c "import fusedopt.lowbit as L
//   for s in (0, 1): L._table_cpu(s, 'int8').numpy().tofile(f'/tmp/int8_{s}.bin')"
//   g++ -O3 -std=c++20 -march=native -Icsrc scripts/quantize_vbmi_micro.cpp -o /tmp/qmicro
//   /tmp/qmicro /tmp/int8_1.bin   # signed map; /tmp/int8_0.bin: unsigned
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#define CPU_CAPABILITY AVX512
namespace fusedopt::cpu::AVX512::optim_engine {
constexpr int kLevels4 = 16;  // what quant_avx512.h takes from cpu/optim_engine_q8.h
}
#include "common/int8_tables.h"
#include "cpu/quant_avx512.h"

namespace q = fusedopt::cpu::AVX512::optim_engine::avx512;

static uint8_t search(float x, const float* mid) {  // lowbit._search
  int c = 0;
  for (int step = 128; step >= 1; step /= 2) c += x >= mid[c + step - 1] ? step : 0;
  return static_cast<uint8_t>(c);
}

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s TABLE.bin (fusedopt.lowbit._table_cpu(signed, 'int8'))\n", argv[0]);
    return 2;
  }
  std::vector<float> table(512 + fusedopt::kInt8LutWords + fusedopt::kInt8SlotWords);
  FILE* f = std::fopen(argv[1], "rb");
  if (f == nullptr || std::fread(table.data(), sizeof(float), table.size(), f) != table.size()) return 2;
  std::fclose(f);
  const float* mid = table.data() + 256;
  const bool is_signed = table[0] < 0;
  const auto* slots = reinterpret_cast<const uint8_t*>(table.data() + 512 + fusedopt::kInt8LutWords);
  q::BytePlanes mid_planes;
  q::split_bytes(mid, mid_planes);

  constexpr int64_t kN = 32768, kBlock = 256;
  std::vector<float> v(kN), divisor(kN / kBlock);
  std::vector<uint8_t> codes(kN);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  for (float& x : v) {
    const float g = normal(rng) * std::exp(normal(rng));
    x = is_signed ? g : g * g * 1e-4f;
  }
  for (int64_t b = 0; b < kN; b += kBlock) {
    const float absmax = q::block_absmax(v.data() + b, kBlock);
    divisor[b / kBlock] = absmax > 0 ? absmax : 1.0f;
  }
  double best = 1e30;
  for (int pass = 0; pass < 400; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    for (int64_t b = 0; b < kN; b += kBlock)
      q::quantize_vbmi(v.data() + b, divisor[b / kBlock], slots, mid_planes, codes.data() + b, kBlock);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  int64_t wrong = 0, near_wrong = 0, near = 0;
  for (int64_t i = 0; i < kN; ++i) wrong += codes[i] != search(v[i] / divisor[i / kBlock], mid);
  std::vector<float> block(kBlock, 1.0f);
  for (int m = 0; m < 255; ++m)
    for (int ulps = -3; ulps <= 3; ++ulps) {
      uint32_t bits;
      std::memcpy(&bits, &mid[m], sizeof(bits));
      bits += ulps;
      float x;
      std::memcpy(&x, &bits, sizeof(x));
      std::fill(block.begin() + 1, block.end(), x);  // block[0] = 1: the absmax
      q::quantize_vbmi(block.data(), 1.0f, slots, mid_planes, codes.data(), kBlock);
      for (int64_t i = 1; i < kBlock; ++i, ++near) near_wrong += codes[i] != search(x, mid);
    }
  std::printf("%s: %.2f ns per 64 values; wrong codes %lld of %lld, next to midpoints %lld of %lld\n",
              is_signed ? "signed" : "unsigned", best / kN * 64e9, static_cast<long long>(wrong),
              static_cast<long long>(kN), static_cast<long long>(near_wrong), static_cast<long long>(near));
  return wrong + near_wrong == 0 ? 0 : 1;
}
