// fusedopt._cuda: the CUDA kernels, bound for fusedopt/ops/*.py. The only C++ file of _cuda that knows Python.
#include <torch/extension.h>

#include "common/tensor_bucket.h"
#include "common/tensor_lists.h"
#include "cuda/kernels.h"

// The Python-facing wrappers live in their own namespace: in fusedopt::cuda itself, `&fusedopt::cuda::bind::adam_step`
// would name the kernel entry of cuda/kernels.h (qualified lookup never reaches an unnamed namespace's members when
// the namespace declares the name directly), and pybind11 would bind the wrong function.
namespace fusedopt::cuda::bind {
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
               const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& found_inf,
               bool write_back_grads) {
  constexpr const char* op = "fusedopt adam_step (cuda)";
  if (params.empty()) return;
  check_params(params, op);
  check_list(grads, params, "grads", op);
  check_list(exp_avgs, params, "exp_avgs", op);
  check_list(exp_avg_sqs, params, "exp_avg_sqs", op);
  if (amsgrad) check_list(max_exp_avg_sqs, params, "max_exp_avg_sqs", op);
  check_scalars(steps, params, "steps", op);
  check_cuda_group(params, op);
  write_back_grads = write_back_grads && tensor_given(grad_divisor);
  ContiguousScope scope;
  TensorList p, g, m, v, vmax;
  for (size_t i = 0; i < params.size(); ++i) {
    p.push_back(scope.write(params[i]));
    g.push_back(scope.grad(grads[i], write_back_grads));
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
               amsgrad, maximize, decoupled_weight_decay, write_back_grads};
  fusedopt::cuda::adam_step(a);
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

void rmsprop_step(const TensorList& params, const TensorList& grads, const TensorList& square_avgs,
                  const TensorList& grad_avgs, const TensorList& momentum_buffers, const TensorList& steps, double lr,
                  const std::optional<at::Tensor>& lr_tensor, double alpha, double eps, double weight_decay,
                  double momentum, bool centered, bool maximize, const std::optional<at::Tensor>& grad_divisor,
                  const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  constexpr const char* op = "fusedopt rmsprop_step (cuda)";
  if (params.empty()) return;
  check_params(params, op);
  check_list(grads, params, "grads", op);
  check_list(square_avgs, params, "square_avgs", op);
  if (centered) check_list(grad_avgs, params, "grad_avgs", op);
  if (momentum > 0) check_list(momentum_buffers, params, "momentum_buffers", op);
  check_scalars(steps, params, "steps", op);
  check_cuda_group(params, op);
  write_back_grads = write_back_grads && tensor_given(grad_divisor);
  ContiguousScope scope;
  TensorList p, g, s, ga, mb;
  for (size_t i = 0; i < params.size(); ++i) {
    p.push_back(scope.write(params[i]));
    g.push_back(scope.grad(grads[i], write_back_grads));
    s.push_back(scope.write(square_avgs[i]));
    if (centered) ga.push_back(scope.write(grad_avgs[i]));
    if (momentum > 0) mb.push_back(scope.write(momentum_buffers[i]));
  }
  const auto lr_dev = device_scalar(lr_tensor, params[0], "lr", op);
  const auto divisor = device_scalar(grad_divisor, params[0], "grad_divisor", op);
  const auto inf = device_scalar(found_inf, params[0], "found_inf", op);
  const TensorList empty;
  RmspropLaunch a{&p,  &g,        &s,      &ga,          &mb,      &steps,        &empty,
                  lr,  alpha,     eps,     weight_decay, momentum, float_ptr(lr_dev), float_ptr(divisor),
                  float_ptr(inf), centered, maximize, write_back_grads};
  fusedopt::cuda::rmsprop_step(a);
}

void sgd_step(const TensorList& params, const TensorList& grads, const TensorList& momentum_buffers,
              const TensorList& first_flags, double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
              double dampening, double weight_decay, bool nesterov, bool maximize,
              const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& found_inf,
              bool write_back_grads) {
  constexpr const char* op = "fusedopt sgd_step (cuda)";
  if (params.empty()) return;
  check_params(params, op);
  check_list(grads, params, "grads", op);
  if (momentum != 0) check_list(momentum_buffers, params, "momentum_buffers", op);
  if (momentum != 0 && !first_flags.empty()) check_scalars(first_flags, params, "first_flags", op);
  check_cuda_group(params, op);
  write_back_grads = write_back_grads && tensor_given(grad_divisor);
  ContiguousScope scope;
  TensorList p, g, mb;
  for (size_t i = 0; i < params.size(); ++i) {
    p.push_back(scope.write(params[i]));
    g.push_back(scope.grad(grads[i], write_back_grads));
    if (momentum != 0) mb.push_back(scope.write(momentum_buffers[i]));
  }
  const auto lr_dev = device_scalar(lr_tensor, params[0], "lr", op);
  const auto divisor = device_scalar(grad_divisor, params[0], "grad_divisor", op);
  const auto inf = device_scalar(found_inf, params[0], "found_inf", op);
  const TensorList empty;
  SgdLaunch a{&p,           &g,        &mb,       &first_flags,    &empty,           lr,           momentum,
              dampening,    weight_decay, float_ptr(lr_dev), float_ptr(divisor), float_ptr(inf), nesterov, maximize, write_back_grads};
  fusedopt::cuda::sgd_step(a);
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

// adam_step on a TensorBucket [params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps]; false if a grad is None.
bool adam_step_bucket(TensorBucket& b, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                      double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                      bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_divisor,
                      const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  const TensorList* grads = b.grads();
  if (grads == nullptr) return false;
  adam_step(b.list(0), *grads, b.list(1), b.list(2), b.list(3), b.list(4), lr, lr_tensor, beta1, beta2, eps,
            weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_divisor, found_inf, write_back_grads);
  b.release_grads();
  return true;
}

// rmsprop_step on a TensorBucket [params, square_avgs, grad_avgs, momentum_buffers, steps]; false if a grad is None.
bool rmsprop_step_bucket(TensorBucket& b, double lr, const std::optional<at::Tensor>& lr_tensor, double alpha,
                         double eps, double weight_decay, double momentum, bool centered, bool maximize,
                         const std::optional<at::Tensor>& grad_divisor, const std::optional<at::Tensor>& found_inf,
                         bool write_back_grads) {
  const TensorList* grads = b.grads();
  if (grads == nullptr) return false;
  rmsprop_step(b.list(0), *grads, b.list(1), b.list(2), b.list(3), b.list(4), lr, lr_tensor, alpha, eps, weight_decay,
               momentum, centered, maximize, grad_divisor, found_inf, write_back_grads);
  b.release_grads();
  return true;
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
  m.def("adam_step", &fusedopt::cuda::bind::adam_step, "Fused Adam/AdamW step over a list of CUDA tensors");
  fusedopt::bind_tensor_bucket(m);
  m.def("adam_step_bucket", &fusedopt::cuda::bind::adam_step_bucket,
        "adam_step on a TensorBucket; False if a grad is None");
  m.def("rmsprop_step", &fusedopt::cuda::bind::rmsprop_step, "Fused RMSprop step over a list of CUDA tensors");
  m.def("rmsprop_step_bucket", &fusedopt::cuda::bind::rmsprop_step_bucket,
        "rmsprop_step on a TensorBucket; False if a grad is None");
  m.def("sgd_step", &fusedopt::cuda::bind::sgd_step, "Fused SGD step over a list of CUDA tensors");
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
