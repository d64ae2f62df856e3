// fusedopt._cuda: the CUDA kernels, bound for fusedopt/ops/*.py. The only C++ file of _cuda that knows Python.
#include <torch/extension.h>

#include "common/tensor_lists.h"
#include "cuda/kernels.h"

namespace fusedopt::cuda {
namespace {

// Device float32 copy of an optional scalar tensor (an async device op, no sync).
std::optional<at::Tensor> device_scalar(const std::optional<at::Tensor>& t, const at::Tensor& param, const char* name,
                                        const char* op) {
  return scalar_tensor_arg(t, param, name, op);
}

void check_cuda_group(const TensorList& params, const char* op) {
  TORCH_CHECK(params[0].is_cuda(), op, ": params must be CUDA tensors, got ", params[0].device());
}

void adam_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
               const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs, const TensorList& steps, double lr,
               const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps, double weight_decay,
               bool amsgrad, bool maximize, bool decoupled_weight_decay,
               const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fusedopt adam_step (cuda)";
  if (params.empty()) return;
  const at::ScalarType dtype = params[0].scalar_type();
  for (const auto* list : {&grads, &exp_avgs, &exp_avg_sqs}) check_list(*list, params, "tensor list", op);
  for (const auto* list : {&params, &grads, &exp_avgs, &exp_avg_sqs}) check_same_dtype(*list, dtype, "tensor", op);
  if (amsgrad) {
    check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs", op);
    check_same_dtype(max_exp_avg_sqs, dtype, "max_exp_avg_sqs", op);
  }
  check_steps(steps, params, op);
  check_cuda_group(params, op);
  ContiguousScope scope;
  TensorList p, g, m, v, vmax;
  for (size_t i = 0; i < params.size(); ++i) {
    p.push_back(scope.write(params[i]));
    g.push_back(scope.read(grads[i]));
    m.push_back(scope.write(exp_avgs[i]));
    v.push_back(scope.write(exp_avg_sqs[i]));
    if (amsgrad) vmax.push_back(scope.write(max_exp_avg_sqs[i]));
  }
  const auto lr_dev = device_scalar(lr_tensor, params[0], "lr", op);
  const auto divisor = device_scalar(grad_divisor, params[0], "grad_divisor", op);
  const auto inf = device_scalar(found_inf, params[0], "found_inf", op);
  const TensorList empty;
  AdamLaunch a{&p, &g, &m, &v, &vmax, &steps, &empty, lr, beta1, beta2, eps, weight_decay,
               lr_dev ? lr_dev->data_ptr<float>() : nullptr,
               divisor ? divisor->data_ptr<float>() : nullptr,
               inf ? inf->data_ptr<float>() : nullptr,
               amsgrad, maximize, decoupled_weight_decay};
  fusedopt::cuda::adam_step(a);
}

std::string torch_version() { return FUSEDOPT_TORCH_VERSION; }

}  // namespace
}  // namespace fusedopt::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedopt CUDA kernels (multi-tensor apply)";
  m.def("adam_step", &fusedopt::cuda::adam_step, "Fused Adam/AdamW step over a list of CUDA tensors");
  m.def("torch_version", &fusedopt::cuda::torch_version, "torch version this extension was built against");
}
