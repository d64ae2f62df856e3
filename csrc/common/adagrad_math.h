// Adagrad (torch.optim.Adagrad, single-tensor form), for the CPU (Vectorized) and CUDA (scalar) engines.
#pragma once
#include "common/optim_op.h"

namespace fusedopt {

struct AdagradHyper {
  double lr_decay = 0.0, eps = 1e-10, weight_decay = 0.0;
  static constexpr std::array<HyperField<AdagradHyper>, 3> fields() {
    return {{{"lr_decay", &AdagradHyper::lr_decay},
             {"eps", &AdagradHyper::eps},
             {"weight_decay", &AdagradHyper::weight_decay}}};
  }
};

struct Adagrad {
  static constexpr const char* kName = "adagrad";
  static constexpr int kStates = 1;
  static constexpr const char* kStateNames[kStates] = {"state_sums"};
  static constexpr TensorScalar kScalar = TensorScalar::kStep;
  using Hyper = AdagradHyper;

  template <typename S>
  struct Coefs {
    S neg_clr, eps, weight_decay;
  };

  // torch's clr = lr / (1 + (step - 1) * lr_decay), in double, rounded once.
  template <typename V>
  FUSEDOPT_HOST_DEVICE static Coefs<scalar_of<V>> coefs(const Hyper& h, double lr, double step) {
    using S = scalar_of<V>;
    return {S(-lr / (1.0 + (step - 1.0) * h.lr_decay)), S(h.eps), S(h.weight_decay)};
  }

  template <typename V>
  FUSEDOPT_HOST_DEVICE static void update(const Coefs<scalar_of<V>>& c, V& param, V grad, V* state) {
    V& sum = state[0];
    // torch's roundings: grad.add(param, alpha=wd) and addcmul_(grad, grad) one fused multiply-add each,
    // addcdiv_(grad, std, value=-clr) as param + (-clr * grad) / std
    if (c.weight_decay != 0) grad = vfma(param, V(c.weight_decay), grad);
    sum = vfma(grad, grad, sum);
    const V std = vsqrt(sum) + V(c.eps);
    param = param + (V(c.neg_clr) * grad) / std;
  }
};

}  // namespace fusedopt
