// LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), with apex FusedLAMB's options, for the CPU
// (Vectorized) and CUDA (scalar) two-pass engines (cpu/norm_engine.h, cuda/norm_engine.cuh):
//   stage 1 (per element, sums per tensor):
//     g += wd * p                                   (adam_w_mode = 0: L2 on the grad)
//     m = beta1 * m + beta3 * g                     (beta3 = 1 - beta1 with grad_averaging, else 1)
//     v = beta2 * v + (1 - beta2) * g * g
//     u = (m / bc1) / (sqrt(v / bc2) + eps)         (bc = 1 - beta^step with bias_correction, else 1)
//     u += wd * p                                   (adam_w_mode = 1: decoupled)
//     sums: ||p||^2 and ||u||^2 of the tensor
//   per tensor: ratio = ||p|| / ||u||, 1 when either norm is 0; only when wd != 0 or use_nvlamb (apex), else 1
//   stage 2 (per element): m, v and u computed again from the same inputs, m and v stored, p -= lr * ratio * u.
// Stage 1 only reads (p, g, m, v); stage 2 reads them again and writes p, m, v. apex instead stores u over the grad
// in stage 1; recomputing keeps .grad untouched (as every fusedopt optimizer) and u unrounded for 16-bit params:
// a u recomputed from stored 16-bit moments would see v underflow to 0 in float16 and step by m / eps.
// The grad reaches stage 1 divided (GradScaler, the folded global clip of max_grad_norm) and negated under maximize.
#pragma once
#include "common/optim_op.h"

namespace fusedopt {

struct LambHyper {
  // The flags are 0 or 1 (the bindings fill every hyperparameter as a double).
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-6, weight_decay = 0.01, bias_correction = 1, grad_averaging = 1,
         adam_w_mode = 1, use_nvlamb = 0;
  static constexpr std::array<HyperField<LambHyper>, 8> fields() {
    return {{{"beta1", &LambHyper::beta1},
             {"beta2", &LambHyper::beta2},
             {"eps", &LambHyper::eps},
             {"weight_decay", &LambHyper::weight_decay},
             {"bias_correction", &LambHyper::bias_correction},
             {"grad_averaging", &LambHyper::grad_averaging},
             {"adam_w_mode", &LambHyper::adam_w_mode},
             {"use_nvlamb", &LambHyper::use_nvlamb}}};
  }
};

struct LAMB {
  static constexpr const char* kName = "lamb";
  static constexpr int kStates = 2;
  static constexpr bool kServesMasters = false;  // the two-pass engine has no master path
  static constexpr const char* kStateNames[kStates] = {"exp_avgs", "exp_avg_sqs"};
  static constexpr TensorScalar kScalar = TensorScalar::kStep;
  static constexpr int kNorms = 2;  // per-tensor sums of stage 1: ||p||^2, ||u||^2
  using Hyper = LambHyper;

  template <typename S>
  struct Coefs {
    S beta1, beta2, beta3, one_minus_beta2, bc1, bc2, eps, weight_decay;
    bool decoupled;
  };

  template <typename V>
  FUSEDOPT_HOST_DEVICE static Coefs<scalar_of<V>> coefs(const Hyper& h, double /*lr*/, double step) {
    using S = scalar_of<V>;
    const bool bias = h.bias_correction != 0;
    const double bc1 = bias ? 1.0 - pow(h.beta1, step) : 1.0;
    const double bc2 = bias ? 1.0 - pow(h.beta2, step) : 1.0;
    const double beta3 = h.grad_averaging != 0 ? 1.0 - h.beta1 : 1.0;
    return {S(h.beta1), S(h.beta2), S(beta3),       S(1.0 - h.beta2),         S(bc1),
            S(bc2),     S(h.eps),   S(h.weight_decay), h.adam_w_mode != 0};
  }

  // The moments (state updated in place) and the update direction u. Both stages call it on the same inputs, so
  // they see the same u, from unrounded moments.
  template <typename V>
  FUSEDOPT_HOST_DEVICE static V moments(const Coefs<scalar_of<V>>& c, const V& param, V grad, V* state) {
    if (!c.decoupled && c.weight_decay != 0) grad = grad + V(c.weight_decay) * param;
    state[0] = state[0] * V(c.beta1) + V(c.beta3) * grad;
    state[1] = state[1] * V(c.beta2) + V(c.one_minus_beta2) * grad * grad;
    V u = (state[0] / V(c.bc1)) / (vsqrt(state[1] / V(c.bc2)) + V(c.eps));
    if (c.decoupled && c.weight_decay != 0) u = u + V(c.weight_decay) * param;
    return u;
  }

  // Stage 1 (reads only; the engine drops the updated state): this element's contributions to the tensor's sums.
  template <typename V>
  FUSEDOPT_HOST_DEVICE static void stage1(const Coefs<scalar_of<V>>& c, const V& param, V grad, V* state,
                                          V* sums) {
    const V u = moments<V>(c, param, grad, state);
    sums[0] = sums[0] + param * param;
    sums[1] = sums[1] + u * u;
  }

  // Per tensor, in double: lr * trust ratio from the stage-1 sums.
  template <typename V>
  FUSEDOPT_HOST_DEVICE static double step_size(const Hyper& h, double lr, const double* sums) {
    if (h.weight_decay == 0 && h.use_nvlamb == 0) return lr;
    const double param_norm = sqrt(sums[0]), update_norm = sqrt(sums[1]);
    return (param_norm != 0 && update_norm != 0) ? lr * (param_norm / update_norm) : lr;
  }

  // Stage 2: the moments again (stored this time) and p -= step_size * u.
  template <typename V>
  FUSEDOPT_HOST_DEVICE static void stage2(const Coefs<scalar_of<V>>& c, scalar_of<V> step, V& param, V grad,
                                          V* state) {
    param = param - V(step) * moments<V>(c, param, grad, state);
  }
};

}  // namespace fusedopt
