// Binary cross-entropy (on probabilities, and on logits) on the CPU (compiled once per ISA by
// cpu/capability/*.cpp). The engine is cpu/pointwise_loss.h; this file is the per-element math, torch's formulas.
#include "cpu/pointwise_loss.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace {

template <typename V>
struct BceMath {
  using S = typename V::value_type;
  static constexpr bool kCheckRange = true;  // torch raises for input or target outside [0, 1]
  void operator()(V x, V t, const V* /*pos_weight*/, V& loss, V& dloss) const {
    const V one(S(1)), clamp(S(-100));
    // Both logs clamped at -100, as torch does, so a saturated probability gives a finite loss.
    const V log_x = at::vec::maximum(x.log(), clamp);
    const V log_1mx = at::vec::maximum(pointwise::log1p_via_log(x.neg()), clamp);
    loss = (t - one) * log_1mx - t * log_x;
    // torch's epsilon is the float32 1e-12, also for float64
    dloss = (x - t) / at::vec::maximum((one - x) * x, V(static_cast<S>(1e-12f)));
  }
};

template <typename V>
struct BceWithLogitsMath {
  using S = typename V::value_type;
  static constexpr bool kCheckRange = false;
  void operator()(V x, V t, const V* pos_weight, V& loss, V& dloss) const {
    const V zero(S(0)), one(S(1));
    // exp(-|x|) never overflows: log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)), and sigmoid from the same exp.
    const V e = x.abs().neg().exp();
    const V log_sigmoid = at::vec::minimum(x, zero) - pointwise::log1p_via_log(e);
    const V r = (one + e).reciprocal();
    const V sigmoid = V::blendv(e * r, r, x >= zero);
    if (pos_weight == nullptr) {
      loss = (one - t) * x - log_sigmoid;
      dloss = sigmoid - t;
    } else {
      const V p = *pos_weight;
      loss = (one - t) * x - ((p - one) * t + one) * log_sigmoid;
      dloss = (p * t + one - t) * sigmoid - p * t;
    }
  }
};

}  // namespace

PointwiseLossResult bce_loss_fwd(const PointwiseLossArgs& a) { return pointwise::dispatch<BceMath>(a); }
PointwiseLossResult bce_with_logits_fwd(const PointwiseLossArgs& a) {
  return pointwise::dispatch<BceWithLogitsMath>(a);
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
