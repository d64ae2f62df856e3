// Muon's param update (torch.optim.Muon, single-tensor form), for the CPU (Vectorized) and CUDA (scalar) engines:
//   param = param * (1 - lr * weight_decay) - lr * lr_ratio * O
// with O the orthogonalized momentum, passed in the engine's `grads` list (no grad divisor: the grads were unscaled
// by muon_momentum), and lr_ratio torch's adjust_lr_fn factor of the tensor's shape (one launch per shape).
#pragma once
#include "common/optim_op.h"

namespace fusedopt {

struct MuonUpdateHyper {
  double weight_decay = 0.1, lr_ratio = 1.0;
  static constexpr std::array<HyperField<MuonUpdateHyper>, 2> fields() {
    return {{{"weight_decay", &MuonUpdateHyper::weight_decay}, {"lr_ratio", &MuonUpdateHyper::lr_ratio}}};
  }
};

struct MuonUpdate {
  static constexpr const char* kName = "muon_update";
  static constexpr int kStates = 0;
  static constexpr const char* kStateNames[1] = {""};  // no state lists (a zero-length array is not C++)
  static constexpr TensorScalar kScalar = TensorScalar::kNone;
  using Hyper = MuonUpdateHyper;

  template <typename S>
  struct Coefs {
    S decay, neg_lr;
  };

  // torch: param.mul_(1 - lr * wd); param.add_(O, alpha=-(lr * ratio)); both factors in double, rounded once.
  template <typename V>
  FUSEDOPT_HOST_DEVICE static Coefs<scalar_of<V>> coefs(const Hyper& h, double lr, double /*scalar*/) {
    using S = scalar_of<V>;
    return {S(1.0 - lr * h.weight_decay), S(-(lr * h.lr_ratio))};
  }

  template <typename V>
  FUSEDOPT_HOST_DEVICE static void update(const Coefs<scalar_of<V>>& c, V& param, V ortho, V* /*state*/) {
    param = vfma(ortho, V(c.neg_lr), param * V(c.decay));  // torch's p.mul_(decay).add_(O, alpha=-lr): one rounding
  }
};

}  // namespace fusedopt
