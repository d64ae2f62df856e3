// Mean squared error on the CPU (compiled once per ISA by cpu/capability/*.cpp). The engine is
// cpu/pointwise_loss.h; this file is the per-element math.
#include "cpu/pointwise_loss.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace {

template <typename V>
struct MseMath {
  static constexpr bool kCheckRange = false;
  void operator()(V x, V t, const V* /*pos_weight*/, V& loss, V& dloss) const {
    const V diff = x - t;
    loss = diff * diff;
    dloss = diff + diff;
  }
};

}  // namespace

PointwiseLossResult mse_loss_fwd(const PointwiseLossArgs& a) { return pointwise::dispatch<MseMath>(a); }

}  // namespace fusedopt::cpu::CPU_CAPABILITY
