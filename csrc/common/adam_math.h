// Adam and AdamW (torch.optim.Adam / AdamW, single-tensor form), for the CPU (Vectorized) and CUDA (scalar) engines.
// AdamW is Adam with decoupled_weight_decay. max_exp_avg_sqs exists only with amsgrad.
#pragma once
#include "common/optim_op.h"

namespace fusedopt {

struct AdamHyper {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  bool amsgrad = false, decoupled_weight_decay = false;
  static constexpr std::array<HyperField<AdamHyper>, 6> fields() {
    return {{{"beta1", &AdamHyper::beta1},
             {"beta2", &AdamHyper::beta2},
             {"eps", &AdamHyper::eps},
             {"weight_decay", &AdamHyper::weight_decay},
             {"amsgrad", &AdamHyper::amsgrad},
             {"decoupled_weight_decay", &AdamHyper::decoupled_weight_decay}}};
  }
};

struct Adam {
  static constexpr const char* kName = "adam";
  static constexpr int kStates = 3;
  static constexpr const char* kStateNames[kStates] = {"exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};
  static constexpr TensorScalar kScalar = TensorScalar::kStep;
  using Hyper = AdamHyper;

  static bool uses_state(const Hyper& h, int k) { return k < 2 || h.amsgrad; }

  template <typename S>
  struct Coefs {
    S one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size, bias_correction2_sqrt;
    bool amsgrad, decoupled;
  };

  // The bias corrections in double, as torch computes them from Python floats, then rounded once.
  template <typename V>
  FUSEDOPT_HOST_DEVICE static Coefs<scalar_of<V>> coefs(const Hyper& h, double lr, double step) {
    using S = scalar_of<V>;
    const double bias_correction1 = 1.0 - pow(h.beta1, step);
    const double bias_correction2 = 1.0 - pow(h.beta2, step);
    return {S(1.0 - h.beta1),       S(h.beta2),
            S(1.0 - h.beta2),       S(h.eps),
            S(h.weight_decay),      S(1.0 - lr * h.weight_decay),
            S(lr / bias_correction1), S(sqrt(bias_correction2)),
            h.amsgrad,              h.decoupled_weight_decay};
  }

  template <typename V>
  FUSEDOPT_HOST_DEVICE static void update(const Coefs<scalar_of<V>>& c, V& param, V grad, V* state) {
    V& exp_avg = state[0];
    V& exp_avg_sq = state[1];
    if (c.weight_decay != 0) {
      if (c.decoupled)
        param = param * V(c.decay_factor);
      else
        grad = vfma(param, V(c.weight_decay), grad);  // torch's grad.add(param, alpha=wd): one rounding
    }
    exp_avg = lerp(exp_avg, grad, c.one_minus_beta1);
    // torch's exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2): fma((1 - beta2) * grad, grad, .)
    exp_avg_sq = vfma(grad * V(c.one_minus_beta2), grad, exp_avg_sq * V(c.beta2));
    V second_moment = exp_avg_sq;
    if (c.amsgrad) {
      state[2] = vmax_nan(state[2], exp_avg_sq);  // torch.maximum keeps NaN
      second_moment = state[2];
    }
    const V denom = vsqrt(second_moment) / V(c.bias_correction2_sqrt) + V(c.eps);
    param = param - V(c.step_size) * exp_avg / denom;
  }
};

}  // namespace fusedopt
