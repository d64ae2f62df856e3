// The few math functions an optimizer's or loss's per-element update needs beyond + - * /, for plain scalars (CUDA,
// and any host use) here, and for at::vec::Vectorized in cpu/vec_ops.h. A `common/<op>_math.h` template written
// against these names compiles to SIMD on the CPU and to scalar code in a CUDA thread: one copy of the math.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define FUSEDOPT_HOST_DEVICE __host__ __device__
#else
#define FUSEDOPT_HOST_DEVICE
#endif

namespace fusedopt {

// The scalar type a value type holds (float for Vectorized<float>, float for float).
template <typename V>
struct ValueTraits {
  using Scalar = V;
};
template <typename V>
using scalar_of = typename ValueTraits<V>::Scalar;

FUSEDOPT_HOST_DEVICE inline float vsqrt(float x) { return sqrtf(x); }
FUSEDOPT_HOST_DEVICE inline double vsqrt(double x) { return sqrt(x); }

// a * b + c with one rounding.
FUSEDOPT_HOST_DEVICE inline float vfma(float a, float b, float c) { return fmaf(a, b, c); }
FUSEDOPT_HOST_DEVICE inline double vfma(double a, double b, double c) { return fma(a, b, c); }

// torch.maximum: NaN when either side is NaN (fmax would drop it).
FUSEDOPT_HOST_DEVICE inline float vmax_nan(float a, float b) { return (a > b || a != a) ? a : b; }
FUSEDOPT_HOST_DEVICE inline double vmax_nan(double a, double b) { return (a > b || a != a) ? a : b; }

// -1, 0 or 1, and NaN stays NaN (torch.sign gives 0 for NaN, a copysign +-1: both hide a NaN grad).
FUSEDOPT_HOST_DEVICE inline float vsign(float x) { return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x); }
FUSEDOPT_HOST_DEVICE inline double vsign(double x) { return x > 0.0 ? 1.0 : (x < 0.0 ? -1.0 : x); }

}  // namespace fusedopt
