// common/value_ops.h for at::vec::Vectorized: the same names, so one math template (common/<op>_math.h) runs on
// SIMD vectors here and on scalars in CUDA. Include before any math header (its calls bind at definition).
// Included only from a capability translation unit, after CPU_CAPABILITY is defined.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "common/value_ops.h"

namespace fusedopt {

template <typename T>
struct ValueTraits<at::vec::Vectorized<T>> {
  using Scalar = T;
};

template <typename T>
inline at::vec::Vectorized<T> vsqrt(const at::vec::Vectorized<T>& x) {
  return x.sqrt();
}

template <typename T>
inline at::vec::Vectorized<T> vfma(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b,
                                   const at::vec::Vectorized<T>& c) {
  return at::vec::fmadd(a, b, c);
}

template <typename T>
inline at::vec::Vectorized<T> vmax_nan(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);  // propagates NaN, as torch.maximum
}

template <typename T>
inline at::vec::Vectorized<T> vsign(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  const V zero(T(0));
  V s = V::blendv(zero, V(T(1)), x > zero);
  s = V::blendv(s, V(T(-1)), x < zero);
  return V::blendv(s, x, x != x);  // NaN stays NaN
}

}  // namespace fusedopt
