// torch's lerp, shared by the CPU kernels (on at::vec::Vectorized) and the CUDA kernels (on scalars):
// start + w * (end - start) for |w| < 0.5, else end - (end - start) * (1 - w). The second form is exact at w = 1
// (Adam with beta1 = 0 keeps the grad itself); the first would round a small grad away against a large start.
#pragma once
#include "common/value_ops.h"

namespace fusedopt {

template <typename V, typename S>
FUSEDOPT_HOST_DEVICE inline V lerp(const V& start, const V& end, S weight) {
  const bool small = (weight < S(0) ? -weight : weight) < S(0.5);
  return small ? start + (end - start) * V(weight) : end - (end - start) * V(S(1) - weight);
}

}  // namespace fusedopt
