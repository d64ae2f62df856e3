// fusedopt._cuda: the engine-driven optimizers (common/optimizers.h) on CUDA, bound from one template.
#include <torch/extension.h>

#include "common/optim_binding.h"
#include "common/optimizers.h"
#include "common/tensor_bucket.h"
#include "cuda/kernels.h"

namespace fusedopt::cuda::bind {
namespace {

template <typename Op>
void run_step(const TensorList& params, const TensorList& grads,
              const std::array<const TensorList*, Op::kStates>& states, const TensorList& steps, double lr,
              const std::optional<at::Tensor>& lr_tensor, const HyperValues& hyper, bool maximize,
              const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& found_inf,
              bool write_back_grads) {
  const std::string op = std::string("fusedopt ") + Op::kName + "_step (cuda)";
  if (params.empty()) return;
  ContiguousScope scope;  // copies back on exit, after the launch was queued (stream order)
  const auto in = check_optim_step<Op>(op, at::kCUDA, scope, params, grads, states, steps, hyper, maximize,
                                       grad_divisor, found_inf, write_back_grads);
  const auto lr_dev = scalar_tensor_arg(lr_tensor, params[0], "lr", op.c_str());
  const TensorList empty;
  OptimLaunch<typename Op::Hyper> a{};
  a.params = &in.params;
  a.grads = &in.grads;
  for (int k = 0; k < Op::kStates; ++k) a.states.push_back(&in.states[k]);
  a.steps = &in.steps;
  a.empty = &empty;
  a.lr = lr;
  a.lr_ptr = float_ptr(lr_dev);
  a.grad_divisor = float_ptr(in.grad_divisor);
  a.found_inf = float_ptr(in.found_inf);
  a.maximize = in.maximize;
  a.write_back_grads = in.write_back_grads;
  a.hyper = in.hyper;
  fusedopt::cuda::optim_step<Op>(a);
}

template <typename Op>
void step(const TensorList& params, const TensorList& grads, const std::vector<TensorList>& states,
          const TensorList& steps, double lr, const std::optional<at::Tensor>& lr_tensor, const HyperValues& hyper,
          bool maximize, const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& found_inf,
          bool write_back_grads) {
  TORCH_CHECK(states.size() == Op::kStates, "fusedopt ", Op::kName, "_step (cuda): ", states.size(),
              " state lists, the op has ", Op::kStates);
  std::array<const TensorList*, Op::kStates> lists{};
  for (int k = 0; k < Op::kStates; ++k) lists[k] = &states[k];
  run_step<Op>(params, grads, lists, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
               write_back_grads);
}

template <typename Op>
bool step_bucket(TensorBucket& b, double lr, const std::optional<at::Tensor>& lr_tensor, const HyperValues& hyper,
                 bool maximize, const std::optional<at::Tensor>& grad_divisor,
                 const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  const TensorList* grads = b.grads();
  if (grads == nullptr) return false;
  std::array<const TensorList*, Op::kStates> lists{};
  for (int k = 0; k < Op::kStates; ++k) lists[k] = &b.list(1 + k);
  run_step<Op>(b.list(0), *grads, lists, b.list(1 + Op::kStates), lr, lr_tensor, hyper, maximize, grad_divisor,
               found_inf, write_back_grads);
  b.release_grads();
  return true;
}

}  // namespace

void bind_optimizers(pybind11::module_& m) {
  pybind11::dict info;
#define FUSEDOPT_BIND(Op)                                                                                     \
  m.def((std::string(Op::kName) + "_step").c_str(), &step<Op>, "Engine-driven optimizer step (CUDA lists)");  \
  m.def((std::string(Op::kName) + "_step_bucket").c_str(), &step_bucket<Op>,                                \
        "The step on a TensorBucket; False if a grad is None");                                              \
  info[Op::kName] = pybind11::make_tuple(hyper_names<Op>(), state_names<Op>(), Op::kHasStep);
  FUSEDOPT_FOR_EACH_OPTIMIZER(FUSEDOPT_BIND)
#undef FUSEDOPT_BIND
  m.attr("optimizer_info") = info;  // name -> (hyperparameter names, state list names, has step)
}

}  // namespace fusedopt::cuda::bind
