// fusedopt._C: the CPU kernels, bound for fusedopt/ops/*.py. The only C++ file of _C that knows Python.
#include <torch/extension.h>

#include "common/tensor_lists.h"
#include "cpu/kernels.h"

namespace fusedopt::cpu {
namespace {

ScalarKind scalar_kind(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return ScalarKind::Float;
    case at::kDouble: return ScalarKind::Double;
    case at::kBFloat16: return ScalarKind::BFloat16;
    case at::kHalf: return ScalarKind::Half;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t, " (float32, float64, bfloat16, float16 are)");
  }
}

// The per-ISA copy of a kernel for this CPU.
template <typename Fn>
Fn for_this_cpu(Fn default_fn, Fn avx2_fn, Fn avx512_fn) {
  switch (capability()) {
    case Capability::AVX512: return avx512_fn;
    case Capability::AVX2: return avx2_fn;
    default: return default_fn;
  }
}
#define FUSEDOPT_CPU_KERNEL(name) for_this_cpu(DEFAULT::name, AVX2::name, AVX512::name)

void adam_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
               const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs, const TensorList& steps, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_divisor,
               const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fusedopt adam_step (cpu)";
  if (params.empty()) return;
  const at::ScalarType dtype = params[0].scalar_type();
  for (const auto* list : {&params, &grads, &exp_avgs, &exp_avg_sqs}) check_list(*list, params, "tensor list", op);
  for (const auto* list : {&params, &grads, &exp_avgs, &exp_avg_sqs}) check_same_dtype(*list, dtype, "tensor", op);
  if (amsgrad) {
    check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs", op);
    check_same_dtype(max_exp_avg_sqs, dtype, "max_exp_avg_sqs", op);
  }
  check_steps(steps, params, op);
  TORCH_CHECK(params[0].device().is_cpu(), op, ": params must be on the CPU, got ", params[0].device());

  AdamArgs a;
  a.kind = scalar_kind(dtype, op);
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.amsgrad = amsgrad;
  a.maximize = maximize;
  a.decoupled_weight_decay = decoupled_weight_decay;
  const auto divisor = scalar_tensor_arg(grad_divisor, params[0], "grad_divisor", op);
  const auto inf = scalar_tensor_arg(found_inf, params[0], "found_inf", op);
  a.grad_divisor = divisor ? divisor->data_ptr<float>() : nullptr;
  a.found_inf = inf ? inf->data_ptr<float>() : nullptr;

  ContiguousScope scope;  // copies back on exit, after the kernel ran
  const size_t n = params.size();
  a.numel.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    a.numel.push_back(params[i].numel());
    a.param.push_back(scope.write(params[i]).data_ptr());
    a.grad.push_back(scope.read(grads[i]).data_ptr());
    a.exp_avg.push_back(scope.write(exp_avgs[i]).data_ptr());
    a.exp_avg_sq.push_back(scope.write(exp_avg_sqs[i]).data_ptr());
    if (amsgrad) a.max_exp_avg_sq.push_back(scope.write(max_exp_avg_sqs[i]).data_ptr());
    a.step.push_back(steps[i].data_ptr<float>());
  }
  FUSEDOPT_CPU_KERNEL(adam_step)(a);
}

}  // namespace
}  // namespace fusedopt::cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedopt CPU kernels (SIMD + threads)";
  m.def("adam_step", &fusedopt::cpu::adam_step, "Fused Adam/AdamW step over a list of CPU tensors");
  m.def("cpu_capability", &fusedopt::cpu::capability_name, "ISA the CPU kernels run with");
}
