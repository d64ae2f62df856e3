// fusedopt._cuda: the CUDA kernels, bound for fusedopt/ops/*.py. The only C++ file of _cuda that knows Python.
#include <torch/extension.h>

#include "common/tensor_bucket.h"
#include "common/tensor_lists.h"
#include "cuda/kernels.h"

// The Python-facing wrappers live in their own namespace: in fusedopt::cuda itself, `&fusedopt::cuda::bind::grad_norm_power_sum`
// would name the kernel entry of cuda/kernels.h (qualified lookup never reaches an unnamed namespace's members when
// the namespace declares the name directly), and pybind11 would bind the wrong function.
namespace fusedopt::cuda::bind {
namespace {

void check_cuda_group(const TensorList& params, const char* op) {
  TORCH_CHECK(params[0].is_cuda(), op, ": params must be CUDA tensors, got ", params[0].device());
}

// ---- Pointwise losses: flat input/target of one dtype; weights flat, applied as w[i % period] ----
std::optional<at::Tensor> loss_weight(const std::optional<at::Tensor>& w, int64_t period, const at::Tensor& x,
                                      const char* name, const char* op) {
  if (!w.has_value() || !w->defined()) return std::nullopt;
  TORCH_CHECK(period >= 1 && w->numel() == period, op, ": ", name, " has ", w->numel(), " elements, period ", period);
  TORCH_CHECK(w->scalar_type() == x.scalar_type() && w->device() == x.device(), op, ": ", name, " must be a ",
              x.scalar_type(), " tensor on ", x.device());
  return w->contiguous();
}

template <typename Fn>
auto pointwise_loss(Fn kernel, const char* op, const at::Tensor& input, const at::Tensor& target,
                    const std::optional<at::Tensor>& weight, int64_t weight_period,
                    const std::optional<at::Tensor>& pos_weight, int64_t pos_weight_period, double scale,
                    const std::optional<at::Tensor>& scale_tensor, int64_t reduction, bool need_grad,
                    at::ScalarType out_dtype) {
  TORCH_CHECK(input.is_cuda(), op, ": input must be a CUDA tensor, got ", input.device());
  TORCH_CHECK(target.device() == input.device() && target.scalar_type() == input.scalar_type(), op,
              ": target must be a ", input.scalar_type(), " tensor on ", input.device());
  TORCH_CHECK(target.numel() == input.numel(), op, ": target has ", target.numel(), " elements, input ",
              input.numel());
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum)");
  if (scale_tensor.has_value() && scale_tensor->defined())
    TORCH_CHECK(scale_tensor->numel() == 1 && scale_tensor->device() == input.device(), op,
                ": scale_tensor must be one element on ", input.device());
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  const auto w = loss_weight(weight, weight_period, x, "weight", op);
  const auto pw = loss_weight(pos_weight, pos_weight_period, x, "pos_weight", op);
  const PointwiseLossLaunch l{&x, &t, &w, &pw, &scale_tensor, weight_period, pos_weight_period, reduction, scale,
                              need_grad, out_dtype};
  return kernel(l);
}

std::tuple<at::Tensor, at::Tensor> mse_loss_fwd(const at::Tensor& input, const at::Tensor& target,
                                                const std::optional<at::Tensor>& weight, int64_t weight_period,
                                                double scale, const std::optional<at::Tensor>& scale_tensor,
                                                int64_t reduction, bool need_grad, at::ScalarType out_dtype) {
  return pointwise_loss(&fusedopt::cuda::mse_loss_fwd, "fusedopt mse_loss_fwd (cuda)", input, target, weight,
                        weight_period, std::nullopt, 1, scale, scale_tensor, reduction, need_grad, out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bce_loss_fwd(const at::Tensor& input, const at::Tensor& target,
                                                            const std::optional<at::Tensor>& weight,
                                                            int64_t weight_period, double scale, int64_t reduction,
                                                            bool need_grad, at::ScalarType out_dtype) {
  return pointwise_loss(&fusedopt::cuda::bce_loss_fwd, "fusedopt bce_loss_fwd (cuda)", input, target, weight,
                        weight_period, std::nullopt, 1, scale, std::nullopt, reduction, need_grad, out_dtype);
}

std::tuple<at::Tensor, at::Tensor> bce_with_logits_fwd(const at::Tensor& input, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight, int64_t weight_period,
                                                       const std::optional<at::Tensor>& pos_weight,
                                                       int64_t pos_weight_period, double scale, int64_t reduction,
                                                       bool need_grad, at::ScalarType out_dtype) {
  return pointwise_loss(&fusedopt::cuda::bce_with_logits_fwd, "fusedopt bce_with_logits_fwd (cuda)", input, target,
                        weight, weight_period, pos_weight, pos_weight_period, scale, std::nullopt, reduction,
                        need_grad, out_dtype);
}

at::Tensor grad_norm_power_sum(const TensorList& tensors, double norm_type) {
  constexpr const char* op = "fusedopt grad_norm (cuda)";
  TORCH_CHECK(!tensors.empty(), op, ": needs at least one tensor");
  TORCH_CHECK(norm_type > 0, op, ": norm_type must be > 0 or inf, got ", norm_type);
  check_cuda_group(tensors, op);
  check_same_dtype(tensors, tensors[0].scalar_type(), "tensor", op);
  TensorList xs;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device() == tensors[0].device(), op, ": tensors on ", t.device(), " and ", tensors[0].device());
    TORCH_CHECK(!t.is_sparse(), op, ": sparse tensors are not supported");
    xs.push_back(t.contiguous());  // a read: a contiguous copy is enough
  }
  return fusedopt::cuda::grad_norm_power_sum(xs, norm_type);
}

void scale_tensors(const TensorList& tensors, const at::Tensor& coef) {
  constexpr const char* op = "fusedopt scale_grads (cuda)";
  if (tensors.empty()) return;
  check_cuda_group(tensors, op);
  check_same_dtype(tensors, tensors[0].scalar_type(), "tensor", op);
  TORCH_CHECK(coef.numel() == 1 && coef.device() == tensors[0].device(), op, ": coef must be one element on ",
              tensors[0].device());
  ContiguousScope scope;
  TensorList xs;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device() == tensors[0].device(), op, ": tensors on ", t.device(), " and ", tensors[0].device());
    xs.push_back(scope.write(t));
  }
  const at::Tensor c = coef.to(at::kDouble).reshape({});  // async on the stream
  fusedopt::cuda::scale_tensors(xs, c);
}

// logits (M, C); target (M,) int64 or (M, C) in the logits' dtype; weight (C,) in opmath; grad_out (M, C) or none
// (it may be logits itself). Returns per-row (loss, lse) in opmath; the reductions are done by the caller.
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& target,
                                                     const std::optional<at::Tensor>& weight,
                                                     const std::optional<at::Tensor>& grad_out,
                                                     const std::optional<at::Tensor>& grad_scale, int64_t ignore_index,
                                                     double label_smoothing, double z_loss,
                                                     std::optional<double> softcap, bool prob_target) {
  constexpr const char* op = "fusedopt cross_entropy_fwd (cuda)";
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), op, ": logits must be a contiguous (rows, classes) matrix");
  const int64_t rows = logits.size(0), classes = logits.size(1);
  const at::ScalarType opmath = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (prob_target) {
    TORCH_CHECK(target.sizes() == logits.sizes() && target.scalar_type() == logits.scalar_type() &&
                    target.is_contiguous() && target.device() == logits.device(),
                op, ": probability targets must be contiguous, shaped and typed like the logits");
  } else {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == rows && target.scalar_type() == at::kLong &&
                    target.is_contiguous() && target.device() == logits.device(),
                op, ": class-index targets must be a contiguous int64 vector of ", rows, " rows");
  }
  const bool has_weight = weight.has_value() && weight->defined();
  if (has_weight)
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == classes && weight->scalar_type() == opmath &&
                    weight->is_contiguous() && weight->device() == logits.device(),
                op, ": weight must be a contiguous ", opmath, " vector of ", classes, " classes on the logits' device");
  const bool has_grad = grad_out.has_value() && grad_out->defined();
  if (has_grad)
    TORCH_CHECK(grad_out->sizes() == logits.sizes() && grad_out->scalar_type() == logits.scalar_type() &&
                    grad_out->is_contiguous() && grad_out->device() == logits.device(),
                op, ": grad_out must be contiguous, shaped and typed like the logits (", logits.scalar_type(),
                "), got ", grad_out->scalar_type(), " ", grad_out->sizes());
  const bool has_scale = grad_scale.has_value() && grad_scale->defined();
  if (has_scale)
    TORCH_CHECK(grad_scale->numel() == 1 && grad_scale->scalar_type() == opmath &&
                    grad_scale->device() == logits.device(),
                op, ": grad_scale must be one ", opmath, " value on the logits' device");
  TORCH_CHECK(rows == 0 || classes > 0, op, ": zero classes");
  at::Tensor loss = at::empty({rows}, logits.options().dtype(opmath));
  at::Tensor lse = at::empty({rows}, logits.options().dtype(opmath));
  CrossEntropyLaunch a{&logits, &target, has_weight ? &*weight : nullptr, has_grad ? &*grad_out : nullptr,
                       has_scale ? &*grad_scale : nullptr, &loss, &lse, ignore_index, label_smoothing, z_loss,
                       softcap.value_or(0.0), prob_target};
  launch_cross_entropy_fwd(a);
  return {loss, lse};
}

void cross_entropy_scale_grad(const at::Tensor& grad, const at::Tensor& scale) {
  constexpr const char* op = "fusedopt cross_entropy_scale_grad (cuda)";
  TORCH_CHECK(grad.is_cuda() && grad.dim() == 2 && grad.is_contiguous(), op,
              ": grad must be a contiguous (rows, classes) CUDA matrix");
  const at::ScalarType dtype = grad.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": grad must be float32, float64, bfloat16 or float16, got ", dtype);
  const at::ScalarType opmath = dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.device() == grad.device() && scale.scalar_type() == opmath && scale.is_contiguous() &&
                  (scale.numel() == 1 || scale.numel() == grad.size(0)),
              op, ": scale (the loss's grad_output) must hold one ", opmath, " value, or one per row, for a ", dtype,
              " grad on the grad's device; got ", scale.scalar_type(), " ", scale.sizes());
  launch_cross_entropy_scale_grad(grad, scale);
}

std::string torch_version() { return FUSEDOPT_TORCH_VERSION; }

}  // namespace
}  // namespace fusedopt::cuda::bind

namespace fusedopt::cuda::bind {
void bind_optimizers(pybind11::module_& m);  // bindings_cuda_optim.cpp
void bind_adafactor(pybind11::module_& m);   // bindings_cuda_adafactor.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedopt CUDA kernels (multi-tensor apply)";
  fusedopt::bind_tensor_bucket(m);
  m.def("grad_norm_power_sum", &fusedopt::cuda::bind::grad_norm_power_sum,
        "sum |x|^p (max |x| for p=inf) over CUDA tensors of one dtype, as a device scalar");
  m.def("scale_tensors", &fusedopt::cuda::bind::scale_tensors, "x *= coef over CUDA tensors of one dtype, coef on device");
  m.def("mse_loss_fwd", &fusedopt::cuda::bind::mse_loss_fwd, "Fused MSE loss: loss and input gradient in one pass");
  m.def("bce_loss_fwd", &fusedopt::cuda::bind::bce_loss_fwd, "Fused BCE loss: loss, input gradient, range flags");
  m.def("bce_with_logits_fwd", &fusedopt::cuda::bind::bce_with_logits_fwd,
        "Fused BCE-with-logits loss: loss and input gradient in one pass");
  m.def("cross_entropy_fwd", &fusedopt::cuda::bind::cross_entropy_fwd,
        "Per-row cross-entropy loss and logsumexp of CUDA logits, with the gradient written in the same pass");
  m.def("cross_entropy_scale_grad", &fusedopt::cuda::bind::cross_entropy_scale_grad,
        "Scales a saved cross-entropy gradient in place by grad_output (a factor of 1 touches nothing)");
  fusedopt::cuda::bind::bind_optimizers(m);
  fusedopt::cuda::bind::bind_adafactor(m);
  m.def("torch_version", &fusedopt::cuda::bind::torch_version, "torch version this extension was built against");
}
