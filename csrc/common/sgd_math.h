// SGD (torch.optim.SGD: momentum, dampening, Nesterov), for the CPU (Vectorized) and CUDA (scalar) engines.
// momentum_buffers exists only with momentum != 0. On a buffer's first step (the per-tensor first-step flag) torch
// starts it as a copy of the grad, not (1 - dampening) * grad.
#pragma once
#include "common/optim_op.h"

namespace fusedopt {

struct SgdHyper {
  double momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false;
  static constexpr std::array<HyperField<SgdHyper>, 4> fields() {
    return {{{"momentum", &SgdHyper::momentum},
             {"dampening", &SgdHyper::dampening},
             {"weight_decay", &SgdHyper::weight_decay},
             {"nesterov", &SgdHyper::nesterov}}};
  }
};

struct Sgd {
  static constexpr const char* kName = "sgd";
  static constexpr int kStates = 1;
  static constexpr const char* kStateNames[kStates] = {"momentum_buffers"};
  static constexpr TensorScalar kScalar = TensorScalar::kFirstFlag;
  using Hyper = SgdHyper;

  static bool uses_state(const Hyper& h, int /*k*/) { return h.momentum != 0; }

  template <typename S>
  struct Coefs {
    S lr, momentum, one_minus_dampening, weight_decay;
    bool use_momentum, first, nesterov;
  };

  template <typename V>
  FUSEDOPT_HOST_DEVICE static Coefs<scalar_of<V>> coefs(const Hyper& h, double lr, double first_flag) {
    using S = scalar_of<V>;
    return {S(lr), S(h.momentum), S(1.0 - h.dampening), S(h.weight_decay), h.momentum != 0, first_flag != 0,
            h.nesterov};
  }

  template <typename V>
  FUSEDOPT_HOST_DEVICE static void update(const Coefs<scalar_of<V>>& c, V& param, V grad, V* state) {
    // Each `x.add(y, alpha=a)` of torch's rounds once, as a fused multiply-add: vfma(y, a, x).
    if (c.weight_decay != 0) grad = vfma(param, V(c.weight_decay), grad);
    if (c.use_momentum) {
      V& buf = state[0];
      buf = c.first ? grad : vfma(grad, V(c.one_minus_dampening), buf * V(c.momentum));
      grad = c.nesterov ? vfma(buf, V(c.momentum), grad) : buf;
    }
    param = vfma(grad, V(-c.lr), param);
  }
};

}  // namespace fusedopt
