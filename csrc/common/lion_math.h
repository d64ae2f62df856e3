// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2), for the CPU (Vectorized)
// and CUDA (scalar) engines:
//   update = sign(beta1 * m + (1 - beta1) * g);  param = param * (1 - lr * wd) - lr * update;
//   m = beta2 * m + (1 - beta2) * g
// The interpolations are written as the paper writes them, beta * m + (1 - beta) * g, not in torch's lerp form:
// after an infinite grad the momentum is infinite, and lerp's m + w * (g - m) would turn it into NaN.
// sign(0) is 0; sign(NaN) is NaN, so a NaN grad makes the param NaN as in every other optimizer (torch.sign(NaN) = 0
// would freeze the element silently behind a NaN momentum).
#pragma once
#include "common/optim_op.h"

namespace fusedopt {

struct LionHyper {
  double beta1 = 0.9, beta2 = 0.99, weight_decay = 0.0;
  static constexpr std::array<HyperField<LionHyper>, 3> fields() {
    return {{{"beta1", &LionHyper::beta1}, {"beta2", &LionHyper::beta2}, {"weight_decay", &LionHyper::weight_decay}}};
  }
};

struct Lion {
  static constexpr const char* kName = "lion";
  static constexpr int kStates = 1;
  static constexpr const char* kStateNames[kStates] = {"exp_avgs"};
  static constexpr TensorScalar kScalar = TensorScalar::kNone;
  using Hyper = LionHyper;

  template <typename S>
  struct Coefs {
    S lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
  };

  template <typename V>
  FUSEDOPT_HOST_DEVICE static Coefs<scalar_of<V>> coefs(const Hyper& h, double lr, double /*scalar*/) {
    using S = scalar_of<V>;
    return {S(lr), S(1.0 - lr * h.weight_decay), S(h.beta1), S(1.0 - h.beta1), S(h.beta2), S(1.0 - h.beta2)};
  }

  template <typename V>
  FUSEDOPT_HOST_DEVICE static void update(const Coefs<scalar_of<V>>& c, V& param, V grad, V* state) {
    V& exp_avg = state[0];
    const V direction = vsign(exp_avg * V(c.beta1) + grad * V(c.one_minus_beta1));
    param = param * V(c.decay) - V(c.lr) * direction;
    exp_avg = exp_avg * V(c.beta2) + grad * V(c.one_minus_beta2);
  }
};

}  // namespace fusedopt
