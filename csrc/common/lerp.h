// torch's lerp, shared by the CPU kernels (on at::vec::Vectorized) and the CUDA kernels (on scalars):
// start + w * (end - start) for |w| < 0.5, else end + (w - 1) * (end - start), each as one fused multiply-add, as
// ATen's vectorized lerp computes it. The second form is exact at w = 1 (Adam with beta1 = 0 keeps the grad itself);
// the first would round a small grad away against a large start. Include cpu/vec_ops.h first on the CPU (vfma).
#pragma once
#include "common/value_ops.h"

namespace fusedopt {

template <typename V, typename S>
FUSEDOPT_HOST_DEVICE inline V lerp(const V& start, const V& end, S weight) {
  const bool small = (weight < S(0) ? -weight : weight) < S(0.5);
  return small ? vfma(V(weight), end - start, start) : vfma(V(weight - S(1)), end - start, end);
}

}  // namespace fusedopt
