// The engine-driven optimizers (common/optimizers.h) on CUDA: one instantiation per op of the engine and of the
// low-bit engine's driver, with the int8 and int4 kernels. The fp8 kernels are instantiated in optimizers_fp8.cu:
// this unit alone took 6 minutes of a fresh build while the other ninja job sat idle.
#include "cuda/optim_engine.cuh"
#include "cuda/optim_engine_q8.cuh"

namespace fusedopt::cuda {

#define FUSEDOPT_INSTANTIATE(Op)                                     \
  FUSEDOPT_Q8_LAUNCHES(extern, Op, QuantKind::kFp8)                  \
  template void optim_step<Op>(const OptimLaunch<Op::Hyper>&); \
  template void optim_step_q8<Op>(const OptimQ8Launch<Op::Hyper>&);
FUSEDOPT_FOR_EACH_OPTIMIZER(FUSEDOPT_INSTANTIATE)
#undef FUSEDOPT_INSTANTIATE

}  // namespace fusedopt::cuda
