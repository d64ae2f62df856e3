// fusedopt._cuda: adafactor_step (cuda/adafactor.cu), with the boundary checks of common/adafactor_checks.h
// (fusedopt.reference.check_adafactor's messages) and contiguous copies written back after the launches.
#include <torch/extension.h>

#include <map>
#include <string>

#include "common/adafactor_checks.h"
#include "common/tensor_lists.h"
#include "cuda/kernels.h"

namespace fusedopt::cuda::bind {
namespace {

void adafactor_step(const TensorList& params, const TensorList& grads, const TensorList& row_vars,
                    const TensorList& col_vars, const TensorList& variances, const TensorList& steps, double lr,
                    const std::optional<at::Tensor>& lr_tensor, const std::map<std::string, double>& hyper,
                    bool maximize, const std::optional<at::Tensor>& grad_divisor,
                    const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  const std::string op = "fusedopt adafactor_step (cuda)";
  if (params.empty()) return;
  check_adafactor(op, params, grads, row_vars, col_vars, variances, steps);
  TORCH_CHECK(params[0].is_cuda(), op, ": params must be CUDA tensors, got ", params[0].device());
  auto value = [&](const char* name) {
    const auto it = hyper.find(name);
    TORCH_CHECK(it != hyper.end(), op, ": hyperparameter '", name, "' is missing");
    return it->second;
  };
  const auto lr_dev = scalar_tensor_arg(lr_tensor, params[0], "lr", op.c_str());
  const auto divisor = scalar_tensor_arg(grad_divisor, params[0], "grad_divisor", op.c_str());
  const auto inf = scalar_tensor_arg(found_inf, params[0], "found_inf", op.c_str());
  write_back_grads = write_back_grads && divisor.has_value();
  ContiguousScope scope;  // copies back on exit, after the launches were queued (stream order)
  TensorList p, g, rv, cv, var;
  for (size_t i = 0; i < params.size(); ++i) {
    p.push_back(scope.write(params[i]));
    g.push_back(scope.grad(grads[i], write_back_grads));
  }
  for (const auto& t : row_vars) rv.push_back(scope.write(t));
  for (const auto& t : col_vars) cv.push_back(scope.write(t));
  for (const auto& t : variances) var.push_back(scope.write(t));
  AdafactorLaunch a{&p, &g, &rv, &cv, &var, &steps, lr, value("beta2_decay"), value("eps1"), value("eps2"), value("d"),
                    value("weight_decay"), float_ptr(lr_dev), float_ptr(divisor), float_ptr(inf), maximize,
                    write_back_grads};
  fusedopt::cuda::adafactor_step(a);
}

}  // namespace

void bind_adafactor(pybind11::module_& m) {
  m.def("adafactor_step", &adafactor_step, "Fused Adafactor step over a bucket of CUDA tensors (matrices first)");
}

}  // namespace fusedopt::cuda::bind
