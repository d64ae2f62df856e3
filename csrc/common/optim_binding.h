// The one binding template of the engine-driven optimizers, shared by the CPU and CUDA bindings: hyperparameters
// filled by name, the boundary checks of tensor_lists.h (the messages of fusedopt/_checks.py) on every list,
// contiguous copies of what the kernel writes, and the scalar tensors of the step context.
#pragma once
#include <torch/extension.h>

#include <array>
#include <map>
#include <string>
#include <vector>

#include "common/optim_op.h"
#include "common/optimizers.h"
#include "common/tensor_bucket.h"
#include "common/tensor_lists.h"

namespace fusedopt {

using HyperValues = std::map<std::string, double>;

// Op::Hyper from {name: value}: every field must be given, and nothing else.
template <typename H>
H fill_hyper(const HyperValues& values, const std::string& op) {
  H h{};
  constexpr auto fields = H::fields();
  for (const auto& f : fields) {
    const auto it = values.find(f.name);
    TORCH_CHECK(it != values.end(), op, ": hyperparameter '", f.name, "' is missing");
    h.*(f.member) = it->second;
  }
  TORCH_CHECK(values.size() == fields.size(), op, ": got ", values.size(), " hyperparameters, the op has ",
              fields.size());
  return h;
}

template <typename Op>
std::vector<std::string> hyper_names() {
  std::vector<std::string> names;
  for (const auto& f : Op::Hyper::fields()) names.emplace_back(f.name);
  return names;
}

template <typename Op>
std::vector<std::string> state_names() {
  return std::vector<std::string>(Op::kStateNames, Op::kStateNames + Op::kStates);
}

// One step's inputs after the checks; tensors the kernel writes are contiguous (copies written back by the scope).
template <typename Op>
struct OptimStepInputs {
  TensorList params, grads, steps;
  std::array<TensorList, Op::kStates> states;
  typename Op::Hyper hyper{};
  std::optional<at::Tensor> grad_divisor, found_inf;  // float32, on the params' device
  bool maximize = false, write_back_grads = false;
};

template <typename Op>
OptimStepInputs<Op> check_optim_step(const std::string& op, at::DeviceType device, ContiguousScope& scope,
                                     const TensorList& params, const TensorList& grads,
                                     const std::array<const TensorList*, Op::kStates>& states,
                                     const TensorList& steps, const HyperValues& hyper, bool maximize,
                                     const std::optional<at::Tensor>& grad_divisor,
                                     const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  const char* name = op.c_str();
  check_params(params, name);
  check_list(grads, params, "grads", name);
  for (int k = 0; k < Op::kStates; ++k) check_list(*states[k], params, Op::kStateNames[k], name);
  if (Op::kHasStep) check_scalars(steps, params, "steps", name);
  if (device == at::kCPU) {
    TORCH_CHECK(params[0].device().is_cpu(), op, ": params must be on the CPU, got ", params[0].device());
  } else {
    TORCH_CHECK(params[0].is_cuda(), op, ": params must be CUDA tensors, got ", params[0].device());
  }

  OptimStepInputs<Op> in;
  in.hyper = fill_hyper<typename Op::Hyper>(hyper, op);
  in.maximize = maximize;
  in.grad_divisor = scalar_tensor_arg(grad_divisor, params[0], "grad_divisor", name);
  in.found_inf = scalar_tensor_arg(found_inf, params[0], "found_inf", name);
  in.write_back_grads = write_back_grads && in.grad_divisor.has_value();
  const size_t n = params.size();
  in.params.reserve(n);
  in.grads.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    in.params.push_back(scope.write(params[i]));
    in.grads.push_back(scope.grad(grads[i], in.write_back_grads));
  }
  for (int k = 0; k < Op::kStates; ++k)
    for (const auto& t : *states[k]) in.states[k].push_back(scope.write(t));
  if (Op::kHasStep) in.steps = steps;
  return in;
}

// The Python entries of every engine-driven optimizer for one backend: Backend::run<Op>(params, grads, state list
// pointers, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back_grads) checks and launches.
// <name>_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back)
template <typename Backend, typename Op>
void optim_step_entry(const TensorList& params, const TensorList& grads, const std::vector<TensorList>& states,
                      const TensorList& steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                      const HyperValues& hyper, bool maximize, const std::optional<at::Tensor>& grad_divisor,
                      const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  TORCH_CHECK(states.size() == Op::kStates, "fusedopt ", Op::kName, "_step (", Backend::kDevice, "): ",
              states.size(), " state lists, the op has ", Op::kStates);
  std::array<const TensorList*, Op::kStates> lists{};
  for (int k = 0; k < Op::kStates; ++k) lists[k] = &states[k];
  Backend::template run<Op>(params, grads, lists, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                            write_back_grads);
}

// The same on a TensorBucket [params, states..., steps]; false (nothing done) if a param has no grad.
template <typename Backend, typename Op>
bool optim_step_bucket_entry(TensorBucket& b, double lr, const std::optional<at::Tensor>& lr_tensor,
                             const HyperValues& hyper, bool maximize, const std::optional<at::Tensor>& grad_divisor,
                             const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  const TensorList* grads = b.grads();
  if (grads == nullptr) return false;
  std::array<const TensorList*, Op::kStates> lists{};
  for (int k = 0; k < Op::kStates; ++k) lists[k] = &b.list(1 + k);
  Backend::template run<Op>(b.list(0), *grads, lists, b.list(1 + Op::kStates), lr, lr_tensor, hyper, maximize,
                            grad_divisor, found_inf, write_back_grads);
  b.release_grads();
  return true;
}

// Registers <name>_step and <name>_step_bucket for every optimizer of both lists (elementwise and two-pass), and `optimizer_info`:
// name -> (hyperparameter names, state list names, has step), which the contract test compares with the specs.
template <typename Backend>
void bind_optimizer_steps(pybind11::module_& m) {
  pybind11::dict info;
#define FUSEDOPT_BIND(Op)                                                                                   \
  m.def((std::string(Op::kName) + "_step").c_str(), &optim_step_entry<Backend, Op>,                        \
        "Engine-driven optimizer step over a list of tensors");                                            \
  m.def((std::string(Op::kName) + "_step_bucket").c_str(), &optim_step_bucket_entry<Backend, Op>,          \
        "The step on a TensorBucket; False if a grad is None");                                            \
  info[Op::kName] = pybind11::make_tuple(hyper_names<Op>(), state_names<Op>(), Op::kHasStep);
  FUSEDOPT_FOR_EACH_OPTIMIZER(FUSEDOPT_BIND)
  FUSEDOPT_FOR_EACH_NORM_OPTIMIZER(FUSEDOPT_BIND)
#undef FUSEDOPT_BIND
  m.attr("optimizer_info") = info;
}

}  // namespace fusedopt
