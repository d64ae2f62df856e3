// fusedopt._C: adafactor_step (cpu/adafactor.cpp), with the boundary checks of common/adafactor_checks.h
// (fusedopt.reference.check_adafactor's messages) and contiguous copies written back after the kernel.
#include <torch/extension.h>

#include <map>
#include <string>

#include "common/adafactor_checks.h"
#include "common/tensor_lists.h"
#include "cpu/kernels.h"
#include "cpu/select.h"

namespace fusedopt::cpu {
namespace {

void adafactor_step(const TensorList& params, const TensorList& grads, const TensorList& row_vars,
                    const TensorList& col_vars, const TensorList& variances, const TensorList& steps, double lr,
                    const std::optional<at::Tensor>& lr_tensor, const std::map<std::string, double>& hyper,
                    bool maximize, const std::optional<at::Tensor>& grad_divisor,
                    const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  const std::string op = "fusedopt adafactor_step (cpu)";
  if (params.empty()) return;
  const auto n = static_cast<int64_t>(params.size()), n_f = static_cast<int64_t>(row_vars.size());
  check_adafactor(op, params, grads, row_vars, col_vars, variances, steps);
  TORCH_CHECK(params[0].device().is_cpu(), op, ": params must be on the CPU, got ", params[0].device());
  auto value = [&](const char* name) {
    const auto it = hyper.find(name);
    TORCH_CHECK(it != hyper.end(), op, ": hyperparameter '", name, "' is missing");
    return it->second;
  };

  ContiguousScope scope;  // copies back on exit, after the kernel ran
  AdafactorArgs a;
  a.kind = scalar_kind(params[0].scalar_type(), op.c_str());
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->device().is_cpu(), op, ": lr must be one CPU element");
    lr = lr_tensor->item<double>();  // a CPU scalar: no device sync
  }
  a.lr = lr;
  a.beta2_decay = value("beta2_decay");
  a.eps1 = value("eps1");
  a.eps2 = value("eps2");
  a.d = value("d");
  a.weight_decay = value("weight_decay");
  a.maximize = maximize;
  const auto divisor = scalar_tensor_arg(grad_divisor, params[0], "grad_divisor", op.c_str());
  const auto inf = scalar_tensor_arg(found_inf, params[0], "found_inf", op.c_str());
  a.write_back_grads = write_back_grads && divisor.has_value();
  a.grad_divisor = float_ptr(divisor);
  a.found_inf = float_ptr(inf);
  a.factored = n_f;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    a.numel.push_back(p.numel());
    a.rows.push_back(i < n_f ? p.size(-2) : 0);
    a.cols.push_back(i < n_f ? p.size(-1) : 0);
    a.param.push_back(scope.write(p).data_ptr());
    a.grad.push_back(scope.grad(grads[i], a.write_back_grads).data_ptr());
    if (i < n_f) {
      a.row_var.push_back(scope.write(row_vars[i]).data_ptr());
      a.col_var.push_back(scope.write(col_vars[i]).data_ptr());
    } else {
      a.variance.push_back(scope.write(variances[i - n_f]).data_ptr());
    }
    a.step.push_back(steps[i].data_ptr<float>());
  }
  FUSEDOPT_CPU_KERNEL(adafactor_step)(a);
}

}  // namespace

void bind_adafactor(pybind11::module_& m) {
  m.def("adafactor_step", &adafactor_step, "Fused Adafactor step over a bucket of CPU tensors (matrices first)");
}

}  // namespace fusedopt::cpu
