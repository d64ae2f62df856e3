// Binary cross-entropy on probabilities and on logits, CUDA: the per-element math (torch's formulas); the one-pass
// engine is cuda/pointwise_loss.cuh.
#include "cuda/kernels.h"
#include "cuda/pointwise_loss.cuh"

namespace fusedopt::cuda {
namespace {

__device__ __forceinline__ float d_log(float v) { return logf(v); }
__device__ __forceinline__ double d_log(double v) { return log(v); }
__device__ __forceinline__ float d_log1p(float v) { return log1pf(v); }
__device__ __forceinline__ double d_log1p(double v) { return log1p(v); }
__device__ __forceinline__ float d_abs(float v) { return fabsf(v); }
__device__ __forceinline__ double d_abs(double v) { return fabs(v); }
__device__ __forceinline__ float d_exp(float v) { return expf(v); }
__device__ __forceinline__ double d_exp(double v) { return exp(v); }

template <typename S>
struct BceMath {
  static constexpr bool kCheckRange = true;  // torch asserts input and target are in [0, 1]; flagged, see the caller
  __device__ __forceinline__ void operator()(S x, S t, bool, S, S& loss, S& dloss) const {
    // Both logs clamped at -100 as torch does (NaN stays NaN).
    S log_x = d_log(x), log_1mx = d_log1p(-x);
    if (log_x < S(-100)) log_x = S(-100);
    if (log_1mx < S(-100)) log_1mx = S(-100);
    loss = (t - S(1)) * log_1mx - t * log_x;
    S denom = (S(1) - x) * x;
    const S eps = static_cast<S>(1e-12f);  // torch's epsilon is a float32, also for float64
    if (denom < eps) denom = eps;
    dloss = (x - t) / denom;
  }
};

template <typename S>
struct BceWithLogitsMath {
  static constexpr bool kCheckRange = false;
  __device__ __forceinline__ void operator()(S x, S t, bool has_pos_weight, S p, S& loss, S& dloss) const {
    // exp(-|x|) never overflows: log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)); sigmoid from the same exp.
    const S e = d_exp(-d_abs(x));
    const S log_sigmoid = (x < S(0) ? x : S(0)) - d_log1p(e);
    const S r = S(1) / (S(1) + e);
    const S sigmoid = x >= S(0) ? r : e * r;
    if (has_pos_weight) {
      loss = (S(1) - t) * x - ((p - S(1)) * t + S(1)) * log_sigmoid;
      dloss = (p * t + S(1) - t) * sigmoid - p * t;
    } else {
      loss = (S(1) - t) * x - log_sigmoid;
      dloss = sigmoid - t;
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bce_loss_fwd(const PointwiseLossLaunch& l) {
  return pointwise::run<BceMath>(*l.input, *l.target, *l.weight, l.weight_period, std::nullopt, 1, l.scale,
                                 std::nullopt, l.reduction, l.need_grad, l.out_dtype);
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_fwd(const PointwiseLossLaunch& l) {
  auto [loss, grad, flags] =
      pointwise::run<BceWithLogitsMath>(*l.input, *l.target, *l.weight, l.weight_period, *l.pos_weight,
                                        l.pos_weight_period, l.scale, std::nullopt, l.reduction, l.need_grad,
                                        l.out_dtype);
  return {loss, grad};
}

}  // namespace fusedopt::cuda
