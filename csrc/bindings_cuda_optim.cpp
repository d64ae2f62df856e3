// fusedopt._cuda: the engine-driven optimizers (common/optimizers.h) on CUDA, bound from one template.
#include <torch/extension.h>

#include "common/optim_binding.h"
#include "common/optim_q8.h"
#include "common/optimizers.h"
#include "common/tensor_bucket.h"
#include "cuda/kernels.h"

namespace fusedopt::cuda::bind {
namespace {

// How this backend checks and launches one engine-driven step (optim_binding.h does the Python entries).
struct CudaOptimBackend {
  static constexpr const char* kDevice = "cuda";

  template <typename Op>
  static void run(const TensorList& params, const TensorList& grads,
                  const std::array<const TensorList*, Op::kStates>& states, const TensorList& scalars, double lr,
                  const std::optional<at::Tensor>& lr_tensor, const HyperValues& hyper, bool maximize,
                  const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& found_inf,
                  bool write_back_grads, const std::optional<at::Tensor>& stochastic_round,
                  const TensorList& masters) {
    const std::string op = std::string("fusedopt ") + Op::kName + "_step (cuda)";
    if (params.empty()) return;
    ContiguousScope scope;  // copies back on exit, after the launch was queued (stream order)
    const auto in = check_optim_step<Op>(op, at::kCUDA, scope, params, grads, states, scalars, hyper, maximize,
                                         grad_divisor, found_inf, write_back_grads, stochastic_round, masters);
    const auto lr_dev = scalar_tensor_arg(lr_tensor, params[0], "lr", op.c_str());
    const TensorList empty;
    OptimLaunch<typename Op::Hyper> a{};
    a.params = &in.params;
    a.grads = &in.grads;
    for (int k = 0; k < Op::kStates; ++k) a.states.push_back(&in.states[k]);
    a.scalars = &in.scalars;
    a.empty = &empty;
    a.lr = lr;
    a.lr_ptr = float_ptr(lr_dev);
    a.grad_divisor = float_ptr(in.grad_divisor);
    a.found_inf = float_ptr(in.found_inf);
    a.stochastic_round = in.stochastic_round ? in.stochastic_round->template data_ptr<int64_t>() : nullptr;
    a.maximize = in.maximize;
    a.write_back_grads = in.write_back_grads;
    a.hyper = in.hyper;
    a.master_kind = in.master_kind;
    a.masters = &in.masters;
    if constexpr (is_norm_optimizer<Op>::value) {
      fusedopt::cuda::norm_optim_step<Op>(a);
    } else {
      fusedopt::cuda::optim_step<Op>(a);
    }
  }

  // The step with int8 / int4 / fp8 block-wise states (common/optim_q8.h).
  template <typename Op>
  static void run_q8(const TensorList& params, const TensorList& grads, const std::vector<TensorList>& codes,
                     const std::vector<TensorList>& absmax, const TensorList& qmaps,
                     const std::string& state_dtype,
                     const TensorList& scalars, double lr, const std::optional<at::Tensor>& lr_tensor,
                     const HyperValues& hyper, bool maximize,
                     const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& found_inf,
                     bool write_back_grads, const std::optional<at::Tensor>& stochastic_round,
                     const TensorList& masters) {
    const std::string op = std::string("fusedopt ") + Op::kName + "_step_q8 (cuda)";
    if (params.empty()) return;
    ContiguousScope scope;
    const auto in = check_optim_step_q8<Op>(op, at::kCUDA, scope, params, grads, codes, absmax, qmaps, state_dtype,
                                            scalars, hyper, maximize, grad_divisor, found_inf, write_back_grads,
                                            stochastic_round, masters);
    const auto lr_dev = scalar_tensor_arg(lr_tensor, params[0], "lr", op.c_str());
    OptimQ8Launch<typename Op::Hyper> a{};
    a.kind = in.kind;
    a.params = &in.params;
    a.grads = &in.grads;
    for (int k = 0; k < Op::kStates; ++k) {
      a.codes.push_back(&in.codes[k]);
      a.absmax.push_back(&in.absmax[k]);
      a.qmap.push_back(in.codes[k].empty() ? nullptr : in.qmap[k].template data_ptr<float>());
    }
    a.scalars = &in.scalars;
    a.lr = lr;
    a.lr_ptr = float_ptr(lr_dev);
    a.grad_divisor = float_ptr(in.grad_divisor);
    a.found_inf = float_ptr(in.found_inf);
    a.stochastic_round = in.stochastic_round ? in.stochastic_round->template data_ptr<int64_t>() : nullptr;
    a.maximize = in.maximize;
    a.write_back_grads = in.write_back_grads;
    a.hyper = in.hyper;
    a.master_kind = in.master_kind;
    a.masters = &in.masters;
    fusedopt::cuda::optim_step_q8<Op>(a);
  }
};

}  // namespace

void bind_optimizers(pybind11::module_& m) {
  bind_optimizer_steps<CudaOptimBackend>(m);
  bind_optimizer_steps_q8<CudaOptimBackend>(m);
}

}  // namespace fusedopt::cuda::bind
