// The one binding template of the engine-driven optimizers, shared by the CPU and CUDA bindings: hyperparameters
// filled by name, the boundary checks of tensor_lists.h (the messages of fusedopt/_checks.py) on every list,
// contiguous copies of what the kernel writes, and the scalar tensors of the step context.
#pragma once
#include <torch/extension.h>

#include <array>
#include <map>
#include <string>
#include <vector>

#include "common/master_bits.h"
#include "common/optim_op.h"
#include "common/optimizers.h"
#include "common/tensor_bucket.h"
#include "common/tensor_lists.h"

namespace fusedopt {

using HyperValues = std::map<std::string, double>;

// Op::Hyper from {name: value}: every field must be given, and nothing else. A bool field is value != 0.
template <typename H>
H fill_hyper(const HyperValues& values, const std::string& op) {
  H h{};
  constexpr auto fields = H::fields();
  for (const auto& f : fields) {
    const auto it = values.find(f.name);
    TORCH_CHECK(it != values.end(), op, ": hyperparameter '", f.name, "' is missing");
    if (f.flag != nullptr)
      h.*(f.flag) = it->second != 0.0;
    else
      h.*(f.member) = it->second;
  }
  TORCH_CHECK(values.size() == fields.size(), op, ": got ", values.size(), " hyperparameters, the op has ",
              fields.size());
  return h;
}

// The hyperparameter names in order, a bool one as "name:bool" (the schema's `bool name`).
template <typename Op>
std::vector<std::string> hyper_names() {
  std::vector<std::string> names;
  for (const auto& f : Op::Hyper::fields()) names.emplace_back(std::string(f.name) + (f.flag ? ":bool" : ""));
  return names;
}

template <typename Op>
constexpr const char* scalar_list_name() {
  return Op::kScalar == TensorScalar::kFirstFlag ? "first_flags" : "steps";
}

template <typename Op>
std::vector<std::string> state_names() {
  return std::vector<std::string>(Op::kStateNames, Op::kStateNames + Op::kStates);
}

// One step's inputs after the checks; tensors the kernel writes are contiguous (copies written back by the scope).
template <typename Op>
struct OptimStepInputs {
  TensorList params, grads, scalars;              // scalars: Op::kScalar's list, or empty
  std::array<TensorList, Op::kStates> states;  // an unused state list (Op::uses_state) is empty
  typename Op::Hyper hyper{};
  std::optional<at::Tensor> grad_divisor, found_inf;  // float32, on the params' device
  std::optional<at::Tensor> stochastic_round;          // int64 [seed, counter], bf16 params only
  TensorList masters;  // master weights (common/master_bits.h): float32 copies or int16 remainders, or empty
  MasterKind master_kind = MasterKind::kNone;
  bool maximize = false, write_back_grads = false;
};

// The [seed, counter] of bf16 stochastic rounding (common/stochastic_round.h), checked; nullopt when not asked.
inline std::optional<at::Tensor> checked_stochastic_round(const std::optional<at::Tensor>& stochastic_round,
                                                          const TensorList& params, const std::string& op) {
  if (!stochastic_round.has_value() || !stochastic_round->defined()) return std::nullopt;
  const at::Tensor& sr = *stochastic_round;
  TORCH_CHECK(params[0].scalar_type() == at::kBFloat16, op, ": stochastic rounding applies to bfloat16 params, got ",
              dtype_name(params[0].scalar_type()));
  TORCH_CHECK(sr.scalar_type() == at::kLong && sr.numel() == 2 && sr.is_contiguous() &&
                  sr.device() == params[0].device(),
              op, ": stochastic_round must be a contiguous int64 tensor [seed, counter] on the params' device");
  return sr;
}

// Master weights (common/master_bits.h): 16-bit params, one float32 master or int16 remainder (bf16) per param, no
// stochastic rounding; kNone when `masters` is empty. Shared by the full-precision and the low-bit (optim_q8.h) steps.
template <typename Op>
MasterKind checked_masters(const std::string& op, const TensorList& params, const TensorList& masters,
                           const std::optional<at::Tensor>& stochastic_round) {
  if (masters.empty()) return MasterKind::kNone;
  TORCH_CHECK(ServesMasters<Op>::value, op, ": master weights are not supported by this optimizer");
  const at::ScalarType pt = params[0].scalar_type(), mt = masters[0].scalar_type();
  TORCH_CHECK(pt == at::kBFloat16 || pt == at::kHalf, op, ": master weights apply to bfloat16 and float16 params, got ",
              dtype_name(pt));
  TORCH_CHECK(mt == at::kFloat || (mt == at::kShort && pt == at::kBFloat16), op,
              ": masters must be float32 copies, or int16 remainders of bfloat16 params; got ", dtype_name(mt));
  check_list(masters, params, "masters", op.c_str(), mt);
  TORCH_CHECK(!(stochastic_round.has_value() && stochastic_round->defined()), op,
              ": stochastic rounding does not apply with master weights (the params are the rounded masters)");
  return mt == at::kFloat ? MasterKind::kFloat32 : MasterKind::kRemainder;
}

template <typename Op>
OptimStepInputs<Op> check_optim_step(const std::string& op, at::DeviceType device, ContiguousScope& scope,
                                     const TensorList& params, const TensorList& grads,
                                     const std::array<const TensorList*, Op::kStates>& states,
                                     const TensorList& scalars, const HyperValues& hyper, bool maximize,
                                     const std::optional<at::Tensor>& grad_divisor,
                                     const std::optional<at::Tensor>& found_inf, bool write_back_grads,
                                     const std::optional<at::Tensor>& stochastic_round, const TensorList& masters) {
  const char* name = op.c_str();
  OptimStepInputs<Op> in;
  in.hyper = fill_hyper<typename Op::Hyper>(hyper, op);
  check_params(params, name);
  check_list(grads, params, "grads", name);
  // Master weights: the states are then float32 whatever the params' dtype.
  in.master_kind = checked_masters<Op>(op, params, masters, stochastic_round);
  std::optional<at::ScalarType> state_dtype;
  if (in.master_kind != MasterKind::kNone) state_dtype = at::kFloat;
  std::array<bool, Op::kStates> used{};
  for (int k = 0; k < Op::kStates; ++k) {
    used[k] = state_used<Op>(in.hyper, k);
    if (used[k]) check_list(*states[k], params, Op::kStateNames[k], name, state_dtype);  // an unused list: not read
  }
  // Steps are required; first-step flags may be absent (no tensor is on its first step).
  const bool has_scalars =
      Op::kScalar == TensorScalar::kStep || (Op::kScalar == TensorScalar::kFirstFlag && !scalars.empty());
  if (has_scalars) check_scalars(scalars, params, scalar_list_name<Op>(), name);
  if (device == at::kCPU) {
    TORCH_CHECK(params[0].device().is_cpu(), op, ": params must be on the CPU, got ", params[0].device());
  } else {
    TORCH_CHECK(params[0].is_cuda(), op, ": params must be CUDA tensors, got ", params[0].device());
  }

  in.maximize = maximize;
  in.grad_divisor = scalar_tensor_arg(grad_divisor, params[0], "grad_divisor", name);
  in.found_inf = scalar_tensor_arg(found_inf, params[0], "found_inf", name);
  in.write_back_grads = write_back_grads && in.grad_divisor.has_value();
  in.stochastic_round = checked_stochastic_round(stochastic_round, params, op);
  const size_t n = params.size();
  in.params.reserve(n);
  in.grads.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    in.params.push_back(scope.write(params[i]));
    in.grads.push_back(scope.grad(grads[i], in.write_back_grads));
  }
  for (int k = 0; k < Op::kStates; ++k)
    if (used[k])
      for (const auto& t : *states[k]) in.states[k].push_back(scope.write(t));
  for (const auto& t : masters) in.masters.push_back(scope.write(t));
  if (has_scalars) in.scalars = scalars;
  return in;
}

// The Python entries of every engine-driven optimizer for one backend: Backend::run<Op>(params, grads, state list
// pointers, scalars, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back_grads, stochastic_round,
// masters) checks and launches.
// <name>_step(params, grads, states, scalars, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back,
//             stochastic_round, masters)
template <typename Backend, typename Op>
void optim_step_entry(const TensorList& params, const TensorList& grads, const std::vector<TensorList>& states,
                      const TensorList& scalars, double lr, const std::optional<at::Tensor>& lr_tensor,
                      const HyperValues& hyper, bool maximize, const std::optional<at::Tensor>& grad_divisor,
                      const std::optional<at::Tensor>& found_inf, bool write_back_grads,
                      const std::optional<at::Tensor>& stochastic_round, const TensorList& masters) {
  TORCH_CHECK(states.size() == Op::kStates, "fusedopt ", Op::kName, "_step (", Backend::kDevice, "): ",
              states.size(), " state lists, the op has ", Op::kStates);
  std::array<const TensorList*, Op::kStates> lists{};
  for (int k = 0; k < Op::kStates; ++k) lists[k] = &states[k];
  Backend::template run<Op>(params, grads, lists, scalars, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                            write_back_grads, stochastic_round, masters);
}

// The same on a TensorBucket [params, states..., scalars]; false (nothing done) if a param has no grad.
template <typename Backend, typename Op>
bool optim_step_bucket_entry(TensorBucket& b, double lr, const std::optional<at::Tensor>& lr_tensor,
                             const HyperValues& hyper, bool maximize, const std::optional<at::Tensor>& grad_divisor,
                             const std::optional<at::Tensor>& found_inf, bool write_back_grads,
                             const std::optional<at::Tensor>& stochastic_round) {
  const TensorList* grads = b.grads();
  if (grads == nullptr) return false;
  std::array<const TensorList*, Op::kStates> lists{};
  for (int k = 0; k < Op::kStates; ++k) lists[k] = &b.list(1 + k);
  Backend::template run<Op>(b.list(0), *grads, lists, b.list(1 + Op::kStates), lr, lr_tensor, hyper, maximize,
                            grad_divisor, found_inf, write_back_grads, stochastic_round, TensorList{});
  b.release_grads();
  return true;
}

// Registers <name>_step and <name>_step_bucket for every optimizer of both lists (elementwise and two-pass), and
// `optimizer_info`: name -> (hyperparameter names, state list names, scalar list name or None), which the contract
// test compares with the specs.
template <typename Backend>
void bind_optimizer_steps(pybind11::module_& m) {
  pybind11::dict info;
#define FUSEDOPT_BIND(Op)                                                                                   \
  m.def((std::string(Op::kName) + "_step").c_str(), &optim_step_entry<Backend, Op>,                        \
        "Engine-driven optimizer step over a list of tensors");                                            \
  m.def((std::string(Op::kName) + "_step_bucket").c_str(), &optim_step_bucket_entry<Backend, Op>,          \
        "The step on a TensorBucket; False if a grad is None");                                            \
  info[Op::kName] = pybind11::make_tuple(                                                                  \
      hyper_names<Op>(), state_names<Op>(),                                                                \
      Op::kScalar == TensorScalar::kNone ? pybind11::object(pybind11::none())                               \
                                         : pybind11::object(pybind11::str(scalar_list_name<Op>())));
  FUSEDOPT_FOR_EACH_OPTIMIZER(FUSEDOPT_BIND)
  FUSEDOPT_FOR_EACH_NORM_OPTIMIZER(FUSEDOPT_BIND)
#undef FUSEDOPT_BIND
  m.attr("optimizer_info") = info;
}

}  // namespace fusedopt
