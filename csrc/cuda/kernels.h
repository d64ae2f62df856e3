// The CUDA kernels' host entry points, called from bindings_cuda.cpp after the argument checks.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace fusedopt::cuda {

using TensorList = std::vector<at::Tensor>;

struct AdamLaunch {
  const TensorList *params, *grads, *exp_avgs, *exp_avg_sqs, *max_exp_avg_sqs, *steps, *empty;
  double lr, beta1, beta2, eps, weight_decay;
  const float* lr_ptr;        // device float32, or null
  const float* grad_divisor;  // device float32, or null
  const float* found_inf;     // device float32, or null
  bool amsgrad, maximize, decoupled_weight_decay;
};
void adam_step(const AdamLaunch& args);

}  // namespace fusedopt::cuda
