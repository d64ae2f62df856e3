// Loads and stores between storage dtype T and opmath vectors (float for 16-bit types), so each kernel's
// math sees only opmath. A partial count handles the tail with the same code as the body.
// Included only from a capability translation unit, after CPU_CAPABILITY is defined.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <type_traits>

namespace fusedopt::cpu::CPU_CAPABILITY {

template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One block = one Vectorized<T> of storage = kLanes opmath vectors.
template <typename T>
struct Block {
  using Storage = at::vec::Vectorized<T>;
  using Vec = at::vec::Vectorized<opmath_t<T>>;
  static constexpr int64_t kSize = Storage::size();
  static constexpr int kLanes = static_cast<int>(Storage::size() / Vec::size());
  std::array<Vec, kLanes> lane;

  static Block load(const T* ptr, int64_t count) {
    Block b;
    if constexpr (std::is_same_v<T, opmath_t<T>>) {
      b.lane[0] = Vec::loadu(ptr, count);
    } else {
      auto [lo, hi] = at::vec::convert_to_float<T>(Storage::loadu(ptr, count));
      b.lane[0] = lo;
      b.lane[1] = hi;
    }
    return b;
  }

  // The same block from opmath storage (a low-bit state's dequantized values): lane by lane.
  static Block load_opmath(const opmath_t<T>* ptr, int64_t count) {
    Block b;
    for (int l = 0; l < kLanes; ++l)
      b.lane[l] = Vec::loadu(ptr + l * Vec::size(), std::clamp<int64_t>(count - l * Vec::size(), 0, Vec::size()));
    return b;
  }

  void store_opmath(opmath_t<T>* ptr, int64_t count) const {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t c = std::clamp<int64_t>(count - l * Vec::size(), 0, Vec::size());
      if (c > 0) lane[l].store(ptr + l * Vec::size(), c);
    }
  }

  void store(T* ptr, int64_t count) const {
    if constexpr (std::is_same_v<T, opmath_t<T>>) {
      lane[0].store(ptr, count);
    } else {
      at::vec::convert_from_float<T>(lane[0], lane[1]).store(ptr, count);
    }
  }
};

}  // namespace fusedopt::cpu::CPU_CAPABILITY
