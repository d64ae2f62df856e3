// The two-pass optimizers (FUSEDOPT_FOR_EACH_NORM_OPTIMIZER in common/optimizers.h), instantiated for the ISA named
// by CPU_CAPABILITY. Compiled once per ISA by cpu/capability/*.cpp (never on its own).
#include "cpu/norm_engine.h"

namespace fusedopt::cpu::CPU_CAPABILITY {

#define FUSEDOPT_INSTANTIATE(Op) template void norm_optim_step<Op>(const OptimStepArgs<Op::Hyper>&);
FUSEDOPT_FOR_EACH_NORM_OPTIMIZER(FUSEDOPT_INSTANTIATE)
#undef FUSEDOPT_INSTANTIATE

}  // namespace fusedopt::cpu::CPU_CAPABILITY
