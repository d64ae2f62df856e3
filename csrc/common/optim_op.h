// What an optimizer's math header (common/<op>_math.h) declares, and what the engines give it.
//
// An optimizer is a struct Op with
//   kName          "adagrad": the op is fusedopt::<kName>_step, the bindings <kName>_step / <kName>_step_bucket
//   kStates        its state lists besides params and grads, in the order the Python spec lists them
//   kStateNames    those lists' names in error messages (the Python spec's names)
//   kHasStep       whether state has a float32 `step` the engine increments before the update
//   Hyper          its hyperparameters, plain doubles with defaults; Hyper::fields() names every one, so the
//                  bindings fill it by name (fill_hyper in common/optim_binding.h), never by position
//   Coefs<S>       what coefs() derives once per tensor (per chunk) in opmath S
//   coefs<V>(h, lr, step)                      -> Coefs<scalar_of<V>>
//   update<V>(coefs, param, grad, state)       one element (CUDA) or one SIMD vector (CPU)
// The engines own everything else: loads and stores, the dtype switch, lr (float or device tensor), the grad
// divisor (GradScaler and folded clipping), found_inf, maximize (grad negated before update), write_back_grads, and
// the step increment. `grad` reaches update() divided and, under maximize, negated.
#pragma once
#include <array>
#include <cstddef>

#include "common/lerp.h"
#include "common/value_ops.h"

namespace fusedopt {

template <typename H>
struct HyperField {
  const char* name;
  double H::*member;
};

}  // namespace fusedopt
