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
    in.grads.push_back(in.write_back_grads ? scope.write(grads[i]) : scope.read(grads[i]));
  }
  for (int k = 0; k < Op::kStates; ++k)
    for (const auto& t : *states[k]) in.states[k].push_back(scope.write(t));
  if (Op::kHasStep) in.steps = steps;
  return in;
}

inline const float* float_ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

}  // namespace fusedopt
