// What an optimizer's math header (common/<op>_math.h) declares, and what the engines give it.
//
// An optimizer is a struct Op with
//   kName          "adagrad": the op is fusedopt::<kName>_step, the bindings <kName>_step / <kName>_step_bucket
//   kStates        its state lists besides params and grads, in the order the Python spec lists them
//   kStateNames    those lists' names in error messages (the Python spec's names)
//   kScalar        the per-tensor float32 scalar list (TensorScalar below) and kScalarName, its name
//   Hyper          its hyperparameters, doubles and bools with defaults; Hyper::fields() names every one, so the
//                  bindings fill it by name (fill_hyper in common/optim_binding.h), never by position
//   Coefs<S>       what coefs() derives once per tensor (per chunk) in opmath S
//   coefs<V>(h, lr, scalar)                    -> Coefs<scalar_of<V>>; scalar: the tensor's step or flag (else 0)
//   update<V>(coefs, param, grad, state)       one element (CUDA) or one SIMD vector (CPU)
//   uses_state(h, k)  (optional)               false: state list k is unused under h (amsgrad off), passed empty
//   kServesMasters    (optional, default true) false: the op refuses master weights (common/master_bits.h)
//   Hyper::quantized_states (optional bool, not in fields()): set true by the low-bit step (common/optim_q8.h), so
//                  the math may guard what quantization breaks (RMSprop's centered variance); false otherwise
// The engines own everything else: loads and stores, the dtype switch, lr (float or device tensor), the grad
// divisor (GradScaler and folded clipping), found_inf, maximize (grad negated before update), write_back_grads, and
// the per-tensor scalar (the step incremented before the update; a first-step flag cleared after it).
#pragma once
#include <array>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "common/lerp.h"
#include "common/value_ops.h"

namespace fusedopt {

// A hyperparameter: a double, or a bool (passed as 0/1 by the bindings; `bool name` in the op schema).
template <typename H>
struct HyperField {
  const char* name;
  double H::*member = nullptr;
  bool H::*flag = nullptr;
  constexpr HyperField(const char* n, double H::*m) : name(n), member(m) {}
  constexpr HyperField(const char* n, bool H::*f) : name(n), flag(f) {}
};

// The per-tensor scalar list of an op (float32, one per param, on its device).
enum class TensorScalar {
  kNone,
  kStep,       // torch's state 'step': incremented by the engine before the update (unless found_inf)
  kFirstFlag,  // nonzero: the op's first step for this tensor (SGD's buffer starts as the grad); the engine clears
               // it after the update unless found_inf. The list may be empty: no tensor is on its first step.
};

template <typename Op, typename = void>
struct HasOptionalStates : std::false_type {};
template <typename Op>
struct HasOptionalStates<Op, std::void_t<decltype(Op::uses_state(std::declval<const typename Op::Hyper&>(), 0))>>
    : std::true_type {};

// Whether state list k is read and written under hyperparameters h (host side; the engines pass the answer on).
template <typename Op>
bool state_used(const typename Op::Hyper& h, int k) {
  if constexpr (HasOptionalStates<Op>::value) {
    return Op::uses_state(h, k);
  } else {
    return true;
  }
}

template <typename Op, typename = void>
struct ServesMasters : std::true_type {};
template <typename Op>
struct ServesMasters<Op, std::void_t<decltype(Op::kServesMasters)>> : std::bool_constant<Op::kServesMasters> {};

template <typename H, typename = void>
struct HasQuantizedStatesFlag : std::false_type {};
template <typename H>
struct HasQuantizedStatesFlag<H, std::void_t<decltype(std::declval<H&>().quantized_states = true)>> : std::true_type {};

}  // namespace fusedopt
