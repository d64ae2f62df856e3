// Muon's momentum (torch.optim.Muon, single-tensor form), for the CPU (Vectorized) and CUDA (scalar) engines:
//   buf = lerp(buf, g, 1 - momentum);  update = nesterov ? lerp(g, buf, momentum) : buf
// The engine's `param` list is the update's output (one matrix of the Newton-Schulz batch per tensor): its old
// value is never used. The orthogonalization and the param update (muon_update_math.h) follow in
// fusedopt/optim/muon.py.
#pragma once
#include "common/optim_op.h"

namespace fusedopt {

struct MuonMomentumHyper {
  double momentum = 0.95;
  bool nesterov = true;
  static constexpr std::array<HyperField<MuonMomentumHyper>, 2> fields() {
    return {{{"momentum", &MuonMomentumHyper::momentum}, {"nesterov", &MuonMomentumHyper::nesterov}}};
  }
};

struct MuonMomentum {
  static constexpr const char* kName = "muon_momentum";
  static constexpr int kStates = 1;
  static constexpr bool kServesMasters = false;  // its "params" are the momentum outputs, not weights
  static constexpr const char* kStateNames[kStates] = {"momentum_buffers"};
  static constexpr TensorScalar kScalar = TensorScalar::kNone;
  using Hyper = MuonMomentumHyper;

  template <typename S>
  struct Coefs {
    S momentum, one_minus_momentum;
    bool nesterov;
  };

  template <typename V>
  FUSEDOPT_HOST_DEVICE static Coefs<scalar_of<V>> coefs(const Hyper& h, double /*lr*/, double /*scalar*/) {
    using S = scalar_of<V>;
    return {S(h.momentum), S(1.0 - h.momentum), h.nesterov};
  }

  template <typename V>
  FUSEDOPT_HOST_DEVICE static void update(const Coefs<scalar_of<V>>& c, V& out, V grad, V* state) {
    V& buf = state[0];
    buf = lerp(buf, grad, c.one_minus_momentum);
    out = c.nesterov ? lerp(grad, buf, c.momentum) : buf;
  }
};

}  // namespace fusedopt
