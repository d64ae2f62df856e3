// Every optimizer that runs through the shared engines (common/optim_op.h). Adding one: include its math header
// and add it to the list; the CPU and CUDA engines are instantiated and the bindings registered from the list.
#pragma once
#include "common/adagrad_math.h"
#include "common/adam_math.h"
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
