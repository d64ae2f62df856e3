// Every optimizer that runs through the shared engines (common/optim_op.h). Adding one: include its math header
// and add it to its list; the CPU and CUDA engines are instantiated and the bindings registered from the lists.
//   FUSEDOPT_FOR_EACH_OPTIMIZER       elementwise: coefs + update, one pass (cpu/optim_engine.h, cuda/optim_engine.cuh)
//   FUSEDOPT_FOR_EACH_NORM_OPTIMIZER  two passes with per-tensor sums between them: coefs, stage1 (states and kNorms
//                                     sums per tensor), step_size (per tensor, from the sums), stage2
//                                     (cpu/norm_engine.h, cuda/norm_engine.cuh)
#pragma once
#include <type_traits>

#include "common/adagrad_math.h"
#include "common/adam_math.h"
#include "common/lamb_math.h"
#include "common/lion_math.h"
#include "common/muon_momentum_math.h"
#include "common/muon_update_math.h"
#include "common/rmsprop_math.h"
#include "common/sgd_math.h"

#define FUSEDOPT_FOR_EACH_OPTIMIZER(X) \
  X(::fusedopt::Adagrad)               \
  X(::fusedopt::Adam)                  \
  X(::fusedopt::Lion)                  \
  X(::fusedopt::MuonMomentum)          \
  X(::fusedopt::MuonUpdate)            \
  X(::fusedopt::Rmsprop)               \
  X(::fusedopt::Sgd)

#define FUSEDOPT_FOR_EACH_NORM_OPTIMIZER(X) X(::fusedopt::LAMB)

namespace fusedopt {

// Whether Op runs through the two-pass engine (it declares kNorms).
template <typename Op, typename = void>
struct is_norm_optimizer : std::false_type {};
template <typename Op>
struct is_norm_optimizer<Op, std::void_t<decltype(Op::kNorms)>> : std::true_type {};

}  // namespace fusedopt
