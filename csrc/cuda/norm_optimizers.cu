// The two-pass optimizers (FUSEDOPT_FOR_EACH_NORM_OPTIMIZER in common/optimizers.h) on CUDA: one instantiation of
// the engine per op.
#include "cuda/norm_engine.cuh"

namespace fusedopt::cuda {

#define FUSEDOPT_INSTANTIATE(Op) template void norm_optim_step<Op>(const OptimLaunch<Op::Hyper>&);
FUSEDOPT_FOR_EACH_NORM_OPTIMIZER(FUSEDOPT_INSTANTIATE)
#undef FUSEDOPT_INSTANTIATE

}  // namespace fusedopt::cuda
