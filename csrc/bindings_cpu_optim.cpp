// fusedopt._C: the engine-driven optimizers (common/optimizers.h) on the CPU, bound from one template.
#include <torch/extension.h>

#include "common/optim_binding.h"
#include "common/optim_q8.h"
#include "common/optimizers.h"
#include "common/tensor_bucket.h"
#include "cpu/kernels.h"
#include "cpu/select.h"

namespace fusedopt::cpu {
namespace {

// How this backend checks and launches one engine-driven step (optim_binding.h does the Python entries).
struct CpuOptimBackend {
  static constexpr const char* kDevice = "cpu";

  template <typename Op>
  static void run(const TensorList& params, const TensorList& grads,
                  const std::array<const TensorList*, Op::kStates>& states, const TensorList& scalars, double lr,
                  const std::optional<at::Tensor>& lr_tensor, const HyperValues& hyper, bool maximize,
                  const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& found_inf,
                  bool write_back_grads, const std::optional<at::Tensor>& stochastic_round,
                  const TensorList& masters) {
    const std::string op = std::string("fusedopt ") + Op::kName + "_step (cpu)";
    if (params.empty()) return;
    ContiguousScope scope;  // copies back on exit, after the kernel ran
    const auto in = check_optim_step<Op>(op, at::kCPU, scope, params, grads, states, scalars, hyper, maximize,
                                         grad_divisor, found_inf, write_back_grads, stochastic_round, masters);
    OptimStepArgs<typename Op::Hyper> a;
    a.kind = scalar_kind(params[0].scalar_type(), op.c_str());
    a.hyper = in.hyper;
    if (lr_tensor.has_value() && lr_tensor->defined()) {
      TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->device().is_cpu(), op, ": lr must be one CPU element");
      lr = lr_tensor->item<double>();  // a CPU scalar: no device sync
    }
    a.lr = lr;
    a.maximize = in.maximize;
    a.write_back_grads = in.write_back_grads;
    a.grad_divisor = float_ptr(in.grad_divisor);
    a.found_inf = float_ptr(in.found_inf);
    a.stochastic_round = in.stochastic_round ? in.stochastic_round->template data_ptr<int64_t>() : nullptr;
    a.states.resize(Op::kStates);
    a.master_kind = in.master_kind;
    for (size_t i = 0; i < in.params.size(); ++i) {
      a.numel.push_back(in.params[i].numel());
      a.param.push_back(in.params[i].data_ptr());
      a.grad.push_back(in.grads[i].data_ptr());
      if (!in.masters.empty()) a.master.push_back(in.masters[i].data_ptr());
      for (int k = 0; k < Op::kStates; ++k)
        if (!in.states[k].empty()) a.states[k].push_back(in.states[k][i].data_ptr());
      if (!in.scalars.empty()) a.scalar.push_back(in.scalars[i].template data_ptr<float>());
    }
    if constexpr (is_norm_optimizer<Op>::value) {
      FUSEDOPT_CPU_KERNEL(norm_optim_step<Op>)(a);
    } else {
      FUSEDOPT_CPU_KERNEL(optim_step<Op>)(a);
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
    const std::string op = std::string("fusedopt ") + Op::kName + "_step_q8 (cpu)";
    if (params.empty()) return;
    ContiguousScope scope;
    const auto in = check_optim_step_q8<Op>(op, at::kCPU, scope, params, grads, codes, absmax, qmaps, state_dtype,
                                            scalars, hyper, maximize, grad_divisor, found_inf, write_back_grads,
                                            stochastic_round, masters);
    OptimStepArgs<typename Op::Hyper> a;
    a.kind = scalar_kind(params[0].scalar_type(), op.c_str());
    a.hyper = in.hyper;
    if (lr_tensor.has_value() && lr_tensor->defined()) {
      TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->device().is_cpu(), op, ": lr must be one CPU element");
      lr = lr_tensor->item<double>();
    }
    a.lr = lr;
    a.maximize = in.maximize;
    a.write_back_grads = in.write_back_grads;
    a.grad_divisor = float_ptr(in.grad_divisor);
    a.found_inf = float_ptr(in.found_inf);
    a.stochastic_round = in.stochastic_round ? in.stochastic_round->template data_ptr<int64_t>() : nullptr;
    a.states.resize(Op::kStates);
    a.absmax.resize(Op::kStates);
    a.qmap.assign(Op::kStates, nullptr);
    a.qkind = in.kind;
    a.master_kind = in.master_kind;
    for (int k = 0; k < Op::kStates; ++k)
      if (!in.codes[k].empty()) a.qmap[k] = in.qmap[k].template data_ptr<float>();
    for (size_t i = 0; i < in.params.size(); ++i) {
      a.numel.push_back(in.params[i].numel());
      a.param.push_back(in.params[i].data_ptr());
      a.grad.push_back(in.grads[i].data_ptr());
      if (!in.masters.empty()) a.master.push_back(in.masters[i].data_ptr());
      for (int k = 0; k < Op::kStates; ++k) {
        if (in.codes[k].empty()) continue;
        a.states[k].push_back(in.codes[k][i].data_ptr());
        a.absmax[k].push_back(in.absmax[k][i].template data_ptr<float>());
      }
      if (!in.scalars.empty()) a.scalar.push_back(in.scalars[i].template data_ptr<float>());
    }
    FUSEDOPT_CPU_KERNEL(optim_step<Op>)(a);  // the engine takes the q8 path when a.absmax is set
  }

};

}  // namespace

void bind_optimizers(pybind11::module_& m) {
  bind_optimizer_steps<CpuOptimBackend>(m);
  bind_optimizer_steps_q8<CpuOptimBackend>(m);
}

}  // namespace fusedopt::cpu
