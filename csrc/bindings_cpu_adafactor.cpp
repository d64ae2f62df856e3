// fusedopt._C: adafactor_step (cpu/adafactor.cpp), with the boundary checks of fusedopt.reference.check_adafactor
// (same messages) and contiguous copies written back after the kernel.
#include <torch/extension.h>

#include <map>
#include <string>

#include "common/tensor_lists.h"
#include "cpu/kernels.h"
#include "cpu/select.h"

namespace fusedopt::cpu {
namespace {

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void check_factor(const at::Tensor& t, const std::vector<int64_t>& shape, const at::Tensor& p, const std::string& name,
                  const std::string& op) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op, ": ", name,
              " is undefined or not a dense (strided) tensor");
  TORCH_CHECK(t.device() == p.device() && t.scalar_type() == p.scalar_type() && t.sizes() == at::IntArrayRef(shape),
              op, ": ", name, " must be a ", dtype_name(p.scalar_type()), " tensor of shape ", shape_str(shape),
              " on ", p.device().str(), " for its param of shape ", shape_str(p.sizes()), ", got ",
              dtype_name(t.scalar_type()), " ", shape_str(t.sizes()), " on ", t.device().str());
}

void adafactor_step(const TensorList& params, const TensorList& grads, const TensorList& row_vars,
                    const TensorList& col_vars, const TensorList& variances, const TensorList& steps, double lr,
                    const std::optional<at::Tensor>& lr_tensor, const std::map<std::string, double>& hyper,
                    bool maximize, const std::optional<at::Tensor>& grad_divisor,
                    const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  const std::string op = "fusedopt adafactor_step (cpu)";
  if (params.empty()) return;
  const auto n = static_cast<int64_t>(params.size()), n_f = static_cast<int64_t>(row_vars.size());
  check_params(params, op.c_str());
  check_list(grads, params, "grads", op.c_str());
  check_scalars(steps, params, "steps", op.c_str());
  TORCH_CHECK(static_cast<int64_t>(col_vars.size()) == n_f && static_cast<int64_t>(variances.size()) == n - n_f, op,
              ": ", n_f, " row_vars, ", col_vars.size(), " col_vars and ", variances.size(), " variances for ", n,
              " params (a row_var and a col_var per matrix, a variance per other param)");
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK((i < n_f) == (p.dim() >= 2), op, ": params[", i, "] has ", p.dim(),
                " dims: the matrices (dim >= 2) come first, then the rest");
    if (p.numel() == 0) {
      const std::string msg = op + ": params[" + std::to_string(i) +
                              "] is empty: Adafactor divides by its size (torch.optim.Adafactor raises "
                              "ZeroDivisionError too)";
      PyErr_SetString(PyExc_ZeroDivisionError, msg.c_str());
      throw pybind11::error_already_set();
    }
    if (i < n_f) {
      std::vector<int64_t> row(p.sizes().begin(), p.sizes().end()), col = row;
      row.back() = 1;
      col[col.size() - 2] = 1;
      check_factor(row_vars[i], row, p, "row_vars[" + std::to_string(i) + "]", op);
      check_factor(col_vars[i], col, p, "col_vars[" + std::to_string(i) + "]", op);
    } else {
      const std::vector<int64_t> same(p.sizes().begin(), p.sizes().end());
      check_factor(variances[i - n_f], same, p, "variances[" + std::to_string(i - n_f) + "]", op);
    }
  }
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
