// RMSprop (torch.optim.RMSprop, single-tensor form), for the CPU (Vectorized) and CUDA (scalar) engines.
// grad_avgs exists only when centered, momentum_buffers only with momentum > 0.
#pragma once
#include "common/optim_op.h"

namespace fusedopt {

struct RmspropHyper {
  double alpha = 0.99, eps = 1e-8, weight_decay = 0.0, momentum = 0.0;
  bool centered = false;
  // Not a hyperparameter (not in fields()): set by the low-bit path (common/optim_q8.h), off in full precision.
  bool quantized_states = false;
  static constexpr std::array<HyperField<RmspropHyper>, 5> fields() {
    return {{{"alpha", &RmspropHyper::alpha},
             {"eps", &RmspropHyper::eps},
             {"weight_decay", &RmspropHyper::weight_decay},
             {"momentum", &RmspropHyper::momentum},
             {"centered", &RmspropHyper::centered}}};
  }
};

struct Rmsprop {
  static constexpr const char* kName = "rmsprop";
  static constexpr int kStates = 3;
  static constexpr const char* kStateNames[kStates] = {"square_avgs", "grad_avgs", "momentum_buffers"};
  static constexpr TensorScalar kScalar = TensorScalar::kStep;
  using Hyper = RmspropHyper;

  static bool uses_state(const Hyper& h, int k) { return k == 0 || (k == 1 ? h.centered : h.momentum > 0); }

  template <typename S>
  struct Coefs {
    S lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
    bool centered, use_momentum, clamp_variance;
  };

  template <typename V>
  FUSEDOPT_HOST_DEVICE static Coefs<scalar_of<V>> coefs(const Hyper& h, double lr, double /*step*/) {
    using S = scalar_of<V>;
    return {S(lr), S(h.alpha), S(1.0 - h.alpha), S(h.eps), S(h.weight_decay), S(h.momentum),
            h.centered, h.momentum > 0, h.quantized_states};
  }

  template <typename V>
  FUSEDOPT_HOST_DEVICE static void update(const Coefs<scalar_of<V>>& c, V& param, V grad, V* state) {
    V& square_avg = state[0];
    // torch's roundings: x.add(y, alpha=a) and addcmul are one fused multiply-add each, addcdiv(t1, t2, value=v)
    // is x + (v * t1) / t2
    if (c.weight_decay != 0) grad = vfma(param, V(c.weight_decay), grad);
    square_avg = vfma(grad * V(c.one_minus_alpha), grad, square_avg * V(c.alpha));
    V avg;
    if (c.centered) {
      V& grad_avg = state[1];
      grad_avg = lerp(grad_avg, grad, c.one_minus_alpha);
      // One rounding, as torch's addcmul: an overflowing grad_avg^2 must not turn inf - inf into NaN.
      V variance = vfma(V(scalar_of<V>(0)) - grad_avg, grad_avg, square_avg);
      // Low-bit states (docs/LOW_BIT_STATES.md): square_avg and grad_avg are quantized apart, so the difference
      // can go below 0; it is clamped at 0 there (a NaN stays NaN). Full precision keeps torch's math, unclamped.
      if (c.clamp_variance) variance = vmax_nan(variance, V(scalar_of<V>(0)));
      avg = vsqrt(variance) + V(c.eps);
    } else {
      avg = vsqrt(square_avg) + V(c.eps);
    }
    if (c.use_momentum) {
      V& buf = state[2];
      buf = buf * V(c.momentum) + grad / avg;
      param = vfma(buf, V(-c.lr), param);
    } else {
      param = param + (V(-c.lr) * grad) / avg;
    }
  }
};

}  // namespace fusedopt
