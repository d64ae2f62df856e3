// fusedopt._C: the CPU kernels, bound for fusedopt/ops/*.py. The only C++ file of _C that knows Python.
#include <torch/extension.h>

#include <cmath>

#include "common/tensor_bucket.h"
#include "common/tensor_lists.h"
#include "cpu/grad_buffer.h"
#include "cpu/kernels.h"
#include "cpu/select.h"

namespace fusedopt::cpu {
namespace {

void check_cpu_group(const TensorList& params, const char* op) {
  TORCH_CHECK(params[0].device().is_cpu(), op, ": params must be on the CPU, got ", params[0].device());
}

// ---- Pointwise losses: flat contiguous input/target of one dtype; weights flat, applied as w[i % period] ----
using LossKernel = PointwiseLossResult (*)(const PointwiseLossArgs&);

// Shortest weight period handed to the kernel: shorter ones are tiled so each contiguous run is long enough to
// vectorise (a per-class weight of 3 classes would otherwise give 3-element runs).
constexpr int64_t kMinWeightRun = 1024;

const void* weight_arg(const std::optional<at::Tensor>& w, int64_t& period, const at::Tensor& input,
                       std::vector<at::Tensor>& keep, const char* name, const char* op) {
  if (!w.has_value() || !w->defined()) return nullptr;
  const int64_t n = input.numel();
  TORCH_CHECK(period >= 1 && w->numel() == period, op, ": ", name, " has ", w->numel(), " elements, period ", period);
  TORCH_CHECK(w->scalar_type() == input.scalar_type() && w->device() == input.device(), op, ": ", name,
              " must be a ", input.scalar_type(), " tensor on ", input.device());
  at::Tensor t = w->contiguous();
  if (period < kMinWeightRun && period < n) {
    const int64_t reps = (kMinWeightRun + period - 1) / period;
    t = t.repeat({reps});
    period *= reps;
  }
  keep.push_back(t);
  return t.data_ptr();
}

// Runs `kernel`; returns (loss, grad, flags). loss: (numel,) for reduction none, else the 0-d sum * scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pointwise_loss(
    LossKernel kernel, const char* op, const at::Tensor& input, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, int64_t weight_period, const std::optional<at::Tensor>& pos_weight,
    int64_t pos_weight_period, double scale, const std::optional<at::Tensor>& scale_tensor, int64_t reduction,
    bool need_grad, at::ScalarType out_dtype) {
  TORCH_CHECK(input.device().is_cpu(), op, ": input must be on the CPU, got ", input.device());
  TORCH_CHECK(target.device() == input.device() && target.scalar_type() == input.scalar_type(), op,
              ": target must be a ", input.scalar_type(), " tensor on the CPU");
  TORCH_CHECK(target.numel() == input.numel(), op, ": target has ", target.numel(), " elements, input ",
              input.numel());
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum)");
  if (scale_tensor.has_value() && scale_tensor->defined()) {
    TORCH_CHECK(scale_tensor->numel() == 1 && scale_tensor->device().is_cpu(), op, ": scale_tensor: 1 CPU element");
    scale *= scale_tensor->to(at::kDouble).item<double>();  // a CPU scalar: no device sync
  }
  std::vector<at::Tensor> keep;
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  PointwiseLossArgs a;
  a.kind = scalar_kind(input.scalar_type(), op);
  a.numel = x.numel();
  a.input = x.data_ptr();
  a.target = t.data_ptr();
  a.weight = weight_arg(weight, weight_period, x, keep, "weight", op);
  a.weight_period = weight_period;
  a.pos_weight = weight_arg(pos_weight, pos_weight_period, x, keep, "pos_weight", op);
  a.pos_weight_period = pos_weight_period;
  a.scale = scale;
  at::Tensor loss = reduction == 0 ? at::empty({a.numel}, x.options()) : at::Tensor();
  at::Tensor grad = at::empty({need_grad ? a.numel : 0}, x.options());
  a.loss = reduction == 0 ? loss.data_ptr() : nullptr;
  a.grad = need_grad ? grad.data_ptr() : nullptr;
  const PointwiseLossResult r = a.numel > 0 ? kernel(a) : PointwiseLossResult{};
  if (reduction != 0) loss = at::scalar_tensor(r.sum * scale, x.options().dtype(out_dtype));
  at::Tensor flags = at::full({1}, r.flags, x.options().dtype(at::kInt));
  return {loss, grad, flags};
}

std::tuple<at::Tensor, at::Tensor> mse_loss_fwd(const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t weight_period,
                                                double scale, const std::optional<at::Tensor>& scale_tensor,
                                                int64_t reduction, bool need_grad, at::ScalarType out_dtype) {
  auto [loss, grad, flags] =
      pointwise_loss(FUSEDOPT_CPU_KERNEL(mse_loss_fwd), "fusedopt mse_loss_fwd (cpu)", input, target, weight,
                     weight_period, std::nullopt, 1, scale, scale_tensor, reduction, need_grad, out_dtype);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bce_loss_fwd(const at::Tensor& input, const at::Tensor& target,
                                                            const std::optional<at::Tensor>& weight,
                                                            int64_t weight_period, double scale, int64_t reduction,
                                                            bool need_grad, at::ScalarType out_dtype) {
  return pointwise_loss(FUSEDOPT_CPU_KERNEL(bce_loss_fwd), "fusedopt bce_loss_fwd (cpu)", input, target, weight,
                        weight_period, std::nullopt, 1, scale, std::nullopt, reduction, need_grad, out_dtype);
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_fwd(const at::Tensor& input, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight, int64_t weight_period,
                                                       const std::optional<at::Tensor>& pos_weight,
                                                       int64_t pos_weight_period, double scale, int64_t reduction,
                                                       bool need_grad, at::ScalarType out_dtype) {
  auto [loss, grad, flags] = pointwise_loss(FUSEDOPT_CPU_KERNEL(bce_with_logits_fwd),
                                            "fusedopt bce_with_logits_fwd (cpu)", input, target, weight,
                                            weight_period, pos_weight, pos_weight_period, scale, std::nullopt,
                                            reduction, need_grad, out_dtype);
  return {loss, grad};
}

NormKind norm_kind(double p, const char* op) {
  if (std::isinf(p) && p > 0) return NormKind::Inf;
  TORCH_CHECK(p > 0 && std::isfinite(p), op, ": norm_type must be > 0 or inf, got ", p);
  return p == 1.0 ? NormKind::One : p == 2.0 ? NormKind::Two : NormKind::P;
}

// sum |x|^p (or max |x| for inf) over all tensors, all of one dtype, in double. The caller takes the root.
double grad_norm_power_sum(const TensorList& tensors, double norm_type) {
  constexpr const char* op = "fusedopt grad_norm (cpu)";
  if (tensors.empty()) return 0.0;
  check_cpu_group(tensors, op);
  check_same_dtype(tensors, tensors[0].scalar_type(), "tensor", op);
  GradNormArgs a;
  a.kind = scalar_kind(tensors[0].scalar_type(), op);
  a.norm = norm_kind(norm_type, op);
  a.p = norm_type;
  ContiguousScope scope;
  for (const auto& t : tensors) {
    TORCH_CHECK(!t.is_sparse(), op, ": sparse tensors are not supported");
    a.numel.push_back(t.numel());
    a.data.push_back(scope.read(t).data_ptr());
  }
  return FUSEDOPT_CPU_KERNEL(grad_norm_power_sum)(a);
}

void scale_tensors(const TensorList& tensors, double coef) {
  constexpr const char* op = "fusedopt scale_grads (cpu)";
  if (tensors.empty()) return;
  check_cpu_group(tensors, op);
  check_same_dtype(tensors, tensors[0].scalar_type(), "tensor", op);
  ScaleArgs a;
  a.kind = scalar_kind(tensors[0].scalar_type(), op);
  a.coef = coef;
  ContiguousScope scope;
  for (const auto& t : tensors) {
    a.numel.push_back(t.numel());
    a.data.push_back(scope.write(t).data_ptr());
  }
  FUSEDOPT_CPU_KERNEL(scale_tensors)(a);
}

// logits (M, C); target (M,) int64 or (M, C) in the logits' dtype; weight (C,) in opmath; grad_out (M, C) or none
// (it may be logits itself). Returns per-row (loss, lse) in opmath; the reductions are done by the caller.
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& grad_out,
                                                     const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                                                     double label_smoothing, double z_loss,
                                                     std::optional<double> softcap, bool prob_target) {
  constexpr const char* op = "fusedopt cross_entropy_fwd (cpu)";
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be on the CPU, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), op, ": logits must be a contiguous (rows, classes) matrix");
  const int64_t rows = logits.size(0), classes = logits.size(1);
  const at::ScalarType opmath = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  CrossEntropyArgs a;
  a.kind = scalar_kind(logits.scalar_type(), op);
  a.rows = rows;
  a.classes = classes;
  a.logits = logits.data_ptr();
  if (prob_target) {
    TORCH_CHECK(target.sizes() == logits.sizes() && target.scalar_type() == logits.scalar_type() &&
                    target.is_contiguous() && target.device() == logits.device(),
                op, ": probability targets must be contiguous, shaped and typed like the logits");
    a.target_prob = target.data_ptr();
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong &&
                    target.is_contiguous() && target.device() == logits.device(),
                op, ": class-index targets must be a contiguous int64 vector of ", rows, " rows");
    a.target_index = target.data_ptr<int64_t>();
  }
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == classes && weight->scalar_type() == opmath &&
                    weight->is_contiguous() && weight->device() == logits.device(),
                op, ": weight must be a contiguous ", opmath, " vector of ", classes, " classes");
    a.weight = weight->data_ptr();
  }
  if (grad_out.has_value() && grad_out->defined()) {
    TORCH_CHECK(grad_out->sizes() == logits.sizes() && grad_out->scalar_type() == logits.scalar_type() &&
                    grad_out->is_contiguous() && grad_out->device() == logits.device(),
                op, ": grad_out must be contiguous, shaped and typed like the logits (", logits.scalar_type(),
                "), got ", grad_out->scalar_type(), " ", grad_out->sizes());
    a.grad = grad_out->data_ptr();
  }
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == opmath && grad_scale->device().is_cpu(), op,
                ": grad_scale must be one ", opmath, " value on the CPU");
    a.grad_scale = grad_scale->data_ptr();
  }
  at::Tensor loss = at::empty({rows}, logits.options().dtype(opmath));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(opmath));
  a.loss = loss.data_ptr();
  a.lse = lse.data_ptr();
  a.ignore_index = ignore_index;
  a.label_smoothing = label_smoothing;
  a.z_loss = z_loss;
  a.softcap = softcap.value_or(0.0);
  if (rows == 0) return {loss, lse};
  TORCH_CHECK(classes > 0, op, ": zero classes");
  const CrossEntropyStatus st = FUSEDOPT_CPU_KERNEL(cross_entropy_fwd)(a);
  TORCH_CHECK_INDEX(!st.bad_target, "Target ", st.target, " is out of bounds.");
  return {loss, lse};
}

// grad (rows, classes) *= scale, scale having one opmath value per row or one in all (the backward's grad_output).
void cross_entropy_scale_grad(const at::Tensor& grad, const at::Tensor& scale) {
  constexpr const char* op = "fusedopt cross_entropy_scale_grad (cpu)";
  TORCH_CHECK(grad.device().is_cpu() && grad.dim() == 2 && grad.is_contiguous(), op,
              ": grad must be a contiguous (rows, classes) CPU matrix");
  const at::ScalarType dtype = grad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": grad must be float32, float64, bfloat16 or float16, got ", dtype);
  const at::ScalarType opmath = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == opmath && scale.is_contiguous() &&
                  (scale.numel() == 1 || scale.numel() == grad.size(0)),
              op, ": scale (the loss's grad_output) must hold one ", opmath, " value, or one per row, for a ", dtype,
              " grad; got ", scale.scalar_type(), " ", scale.sizes());
  CrossEntropyScaleArgs a;
  a.kind = scalar_kind(grad.scalar_type(), op);
  a.rows = grad.size(0);
  a.classes = grad.size(1);
  a.grad = grad.data_ptr();
  a.scale = scale.data_ptr();
  a.scale_per_row = scale.numel() != 1 || grad.size(0) == 1;
  if (a.rows == 0 || a.classes == 0) return;
  FUSEDOPT_CPU_KERNEL(cross_entropy_scale_grad)(a);
}

}  // namespace
}  // namespace fusedopt::cpu

namespace fusedopt::cpu {
void bind_optimizers(pybind11::module_& m);  // bindings_cpu_optim.cpp
void bind_adafactor(pybind11::module_& m);   // bindings_cpu_adafactor.cpp
void bind_state_snapshot(pybind11::module_& m);  // bindings_cpu_state_snapshot.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedopt CPU kernels (SIMD + threads)";
  fusedopt::bind_tensor_bucket(m);
  m.def("grad_norm_power_sum", &fusedopt::cpu::grad_norm_power_sum,
        "sum |x|^p (max |x| for p=inf) over CPU tensors of one dtype, in double");
  m.def("scale_tensors", &fusedopt::cpu::scale_tensors, "x *= coef over CPU tensors of one dtype");
  m.def("mse_loss_fwd", &fusedopt::cpu::mse_loss_fwd, "Fused MSE loss: loss and input gradient in one pass");
  m.def("bce_loss_fwd", &fusedopt::cpu::bce_loss_fwd, "Fused BCE loss: loss, input gradient, range flags");
  m.def("bce_with_logits_fwd", &fusedopt::cpu::bce_with_logits_fwd,
        "Fused BCE-with-logits loss: loss and input gradient in one pass");
  m.def("cross_entropy_fwd", &fusedopt::cpu::cross_entropy_fwd,
        "Per-row cross-entropy loss and logsumexp of CPU logits, with the gradient written in the same pass");
  m.def("cross_entropy_scale_grad", &fusedopt::cpu::cross_entropy_scale_grad,
        "Scales a saved cross-entropy gradient in place by grad_output (rows whose factor is 1 are skipped)");
  m.def("empty_grad_buffer", &fusedopt::cpu::empty_grad_buffer,
        "Uninitialised tensor like the argument; large ones pre-faulted on huge pages and reused after they die");
  fusedopt::cpu::bind_optimizers(m);
  fusedopt::cpu::bind_adafactor(m);
  fusedopt::cpu::bind_state_snapshot(m);
  m.def("cpu_capability", &fusedopt::cpu::capability_name, "ISA the CPU kernels run with");
}
