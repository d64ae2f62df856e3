// Loads and stores between storage dtype T and opmath vectors (float for 16-bit types), so each kernel's
// math sees only opmath. A partial count handles the tail with the same code as the body.
// Included only from a capability translation unit, after CPU_CAPABILITY is defined.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

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

  void store(T* ptr, int64_t count) const {
    if constexpr (std::is_same_v<T, opmath_t<T>>) {
      lane[0].store(ptr, count);
    } else {
      at::vec::convert_from_float<T>(lane[0], lane[1]).store(ptr, count);
    }
  }
};

}  // namespace fusedopt::cpu::CPU_CAPABILITY
