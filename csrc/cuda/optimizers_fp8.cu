// The fp8-state kernels of the engine-driven optimizers (common/optimizers.h), one per op and param dtype;
// optimizers.cu holds the rest and declares these extern, so a two-job build compiles the two units side by side.
#include "cuda/optim_engine_q8.cuh"

namespace fusedopt::cuda {

#define FUSEDOPT_INSTANTIATE(Op) FUSEDOPT_Q8_LAUNCHES(, Op, QuantKind::kFp8)
FUSEDOPT_FOR_EACH_OPTIMIZER(FUSEDOPT_INSTANTIATE)
#undef FUSEDOPT_INSTANTIATE

}  // namespace fusedopt::cuda
