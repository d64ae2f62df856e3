// The CUDA kernels' host entry points, called from bindings_cuda.cpp after the argument checks.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/master_bits.h"
#include "common/quant_format.h"

namespace fusedopt::cuda {

using TensorList = std::vector<at::Tensor>;

// One Adafactor step over a bucket (cuda/adafactor.cu): the first row_vars->size() params are matrices (dim >= 2),
// the others have a variance. All tensors contiguous and checked (common/adafactor_checks.h).
struct AdafactorLaunch {
  const TensorList *params, *grads, *row_vars, *col_vars, *variances, *steps;
  double lr, beta2_decay, eps1, eps2, d, weight_decay;
  const float* lr_ptr;        // device float32, or null
  const float* grad_divisor;  // device float32, or null
  const float* found_inf;     // device float32, or null
  bool maximize, write_back_grads;
};
void adafactor_step(const AdafactorLaunch& args);

// One step of an engine-driven optimizer (cuda/optim_engine.cuh, ops of common/optimizers.h). All tensors
// contiguous and checked (common/optim_binding.h); hyper filled by name.
template <typename Hyper>
struct OptimLaunch {
  const TensorList *params, *grads;
  std::vector<const TensorList*> states;  // Op::kStates lists
  const TensorList *scalars, *empty;      // Op::kScalar's list (steps, first-step flags), or empty
  double lr;
  const float* lr_ptr;        // device float32, or null
  const float* grad_divisor;  // device float32, or null
  const float* found_inf;     // device float32, or null
  const int64_t* stochastic_round;  // device int64 [seed, counter] (bf16 params only), or null
  bool maximize, write_back_grads;
  Hyper hyper;
  // Master weights (common/master_bits.h): float32 masters or int16 remainders, one per param; states float32.
  MasterKind master_kind = MasterKind::kNone;
  const TensorList* masters = nullptr;
};
template <typename Op>
void optim_step(const OptimLaunch<typename Op::Hyper>& args);
// The two-pass optimizers (FUSEDOPT_FOR_EACH_NORM_OPTIMIZER): stage 1 with per-tensor sums, stage 2 (norm_engine.cuh).
template <typename Op>
void norm_optim_step(const OptimLaunch<typename Op::Hyper>& args);

// The step with int8 / int4 / fp8 block-wise states (common/optim_q8.h, cuda/optim_engine_q8.cuh): codes[k] (one
// byte per element; int4 two per byte) and absmax[k] (float32, one per 256 or 128 elements) per state, an unused
// state's lists empty; qmap[k] the state's map.
template <typename Hyper>
struct OptimQ8Launch {
  QuantKind kind = QuantKind::kInt8;
  const TensorList *params, *grads;
  std::vector<const TensorList*> codes, absmax;
  std::vector<const float*> qmap;
  const TensorList* scalars;
  double lr;
  const float* lr_ptr;
  const float* grad_divisor;
  const float* found_inf;
  const int64_t* stochastic_round;  // [seed, counter]: bf16 params stored by stochastic rounding, or null
  bool maximize, write_back_grads;
  Hyper hyper;
  MasterKind master_kind = MasterKind::kNone;  // master weights of 16-bit params (common/master_bits.h)
  const TensorList* masters = nullptr;         // float32 masters or int16 remainders; empty without
};
template <typename Op>
void optim_step_q8(const OptimQ8Launch<typename Op::Hyper>& args);

// sum |x|^p (max |x| for p = inf) over contiguous tensors of one dtype, as a device scalar (double for float64,
// else float). The caller takes the root.
at::Tensor grad_norm_power_sum(const TensorList& tensors, double p);
// x *= *coef (a device double scalar) over contiguous tensors of one dtype.
void scale_tensors(const TensorList& tensors, const at::Tensor& coef);

// One pointwise loss over flat contiguous CUDA tensors of one dtype (see fusedopt/ops/mse_loss.py for the contract).
struct PointwiseLossLaunch {
  const at::Tensor *input, *target;
  const std::optional<at::Tensor>*weight, *pos_weight, *scale_tensor;
  int64_t weight_period, pos_weight_period, reduction;
  double scale;
  bool need_grad;
  at::ScalarType out_dtype;
};
std::tuple<at::Tensor, at::Tensor> mse_loss_fwd(const PointwiseLossLaunch& args);                  // (loss, grad)
std::tuple<at::Tensor, at::Tensor, at::Tensor> bce_loss_fwd(const PointwiseLossLaunch& args);      // + range flags
std::tuple<at::Tensor, at::Tensor> bce_with_logits_fwd(const PointwiseLossLaunch& args);           // (loss, grad)
// Cross-entropy over the rows of contiguous (rows, classes) logits; see fusedopt/reference.py for the math.
struct CrossEntropyLaunch {
  const at::Tensor* logits;      // (rows, classes)
  const at::Tensor* target;      // (rows,) int64, or (rows, classes) like logits when prob_target
  const at::Tensor* weight;      // (classes,) opmath, or null
  const at::Tensor* grad;        // (rows, classes) like logits, or null; may be logits itself
  const at::Tensor* grad_scale;  // one opmath value multiplying the gradient, or null
  const at::Tensor* loss;        // (rows,) opmath, written
  const at::Tensor* lse;         // (rows,) opmath, written
  int64_t ignore_index;
  double label_smoothing, z_loss, softcap;  // softcap 0: off
  bool prob_target;
};
void launch_cross_entropy_fwd(const CrossEntropyLaunch& args);
// grad (rows, classes) *= scale (one opmath value per row, or one for all); a factor of 1 touches nothing.
void launch_cross_entropy_scale_grad(const at::Tensor& grad, const at::Tensor& scale);

}  // namespace fusedopt::cuda
