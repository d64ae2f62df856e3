// The engine-driven optimizers (common/optimizers.h) on CUDA: one instantiation of the engine per op.
#include "cuda/optim_engine.cuh"
#include "cuda/optim_engine_q8.cuh"

namespace fusedopt::cuda {

#define FUSEDOPT_INSTANTIATE(Op)                                       \
  template void optim_step<Op>(const OptimLaunch<Op::Hyper>&); \
  template void optim_step_q8<Op>(const OptimQ8Launch<Op::Hyper>&);
FUSEDOPT_FOR_EACH_OPTIMIZER(FUSEDOPT_INSTANTIATE)
#undef FUSEDOPT_INSTANTIATE

}  // namespace fusedopt::cuda
