// Adam / AdamW on CUDA through the multi-tensor engine. adam_math is the whole update; the 16-byte vector body
// and the scalar tail both call it, in opmath (float for 16-bit params, double for float64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "common/lerp.h"
#include "cuda/kernels.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

enum AdamList { kParam = 0, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kStep, kAdamLists };

template <typename S>
struct AdamCoefs {
  S one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size, bias_correction2_sqrt,
      grad_factor;
};

template <typename S>
__device__ __forceinline__ void adam_math(S& param, S grad, S& exp_avg, S& exp_avg_sq, S* max_exp_avg_sq,
                                          const AdamCoefs<S>& c, bool maximize, bool decoupled) {
  if (maximize) grad = -grad;
  if (c.weight_decay != S(0)) {
    if (decoupled)
      param *= c.decay_factor;
    else
      grad += c.weight_decay * param;
  }
  exp_avg = fusedopt::lerp(exp_avg, grad, c.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * grad * grad;
  S second_moment = exp_avg_sq;
  if (max_exp_avg_sq != nullptr) {
    *max_exp_avg_sq = nan_propagating_max(*max_exp_avg_sq, exp_avg_sq);  // torch.maximum keeps NaN
    second_moment = *max_exp_avg_sq;
  }
  const S denom = sqrt(second_moment) / c.bias_correction2_sqrt + c.eps;
  param -= c.step_size * exp_avg / denom;
}

template <typename T>
struct AdamFunctor {
  using S = at::opmath_type<T>;
  double lr, beta1, beta2, eps, weight_decay;
  const float* lr_ptr;        // overrides lr when set (a tensor lr, read on the device)
  const float* grad_divisor;  // GradScaler scale (/ clip coefficient), or null
  const float* found_inf;     // nonzero: skip
  bool amsgrad, maximize, decoupled, write_back_grads;

  __device__ void operator()(const TensorTable<kAdamLists>& tab, int64_t t, int64_t begin, int64_t end) const {
    if (found_inf != nullptr && *found_inf != 0.0f) return;
    const double step = *tab.template ptr<float>(kStep, t);
    const double lr_now = lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : lr;
    AdamCoefs<S> c;
    c.one_minus_beta1 = S(1.0 - beta1);
    c.beta2 = S(beta2);
    c.one_minus_beta2 = S(1.0 - beta2);
    c.eps = S(eps);
    c.weight_decay = S(weight_decay);
    c.decay_factor = S(1.0 - lr_now * weight_decay);
    c.step_size = S(lr_now / (1.0 - ::pow(beta1, step)));
    c.bias_correction2_sqrt = S(::sqrt(1.0 - ::pow(beta2, step)));
    c.grad_factor = grad_divisor != nullptr ? S(1.0 / static_cast<double>(*grad_divisor)) : S(1);

    T* param = tab.template ptr<T>(kParam, t);
    T* grad = tab.template ptr<T>(kGrad, t);
    T* exp_avg = tab.template ptr<T>(kExpAvg, t);
    T* exp_avg_sq = tab.template ptr<T>(kExpAvgSq, t);
    T* max_sq = amsgrad ? tab.template ptr<T>(kMaxExpAvgSq, t) : nullptr;

    auto update = [&](int64_t i) {  // the scalar path: tail and unaligned tensors
      S p = param[i], m = exp_avg[i], v = exp_avg_sq[i], vmax = max_sq ? S(max_sq[i]) : S(0);
      const S g = unscaled_grad<T>(grad[i], c.grad_factor, write_back_grads);
      adam_math<S>(p, g, m, v, max_sq ? &vmax : nullptr, c, maximize, decoupled);
      param[i] = T(p);
      exp_avg[i] = T(m);
      exp_avg_sq[i] = T(v);
      if (max_sq) max_sq[i] = T(vmax);
    };

    int64_t vector_end = begin;
    constexpr int kVec = Vec16<T>::kVec;
    if (all_aligned16(tab, t, amsgrad ? kMaxExpAvgSq + 1 : kMaxExpAvgSq)) {
      vector_end = begin + (end - begin) / kVec * kVec;
      for (int64_t i = begin + threadIdx.x * kVec; i < vector_end; i += static_cast<int64_t>(blockDim.x) * kVec) {
        Vec16<T> pv = *reinterpret_cast<const Vec16<T>*>(param + i);
        Vec16<T> gv = *reinterpret_cast<const Vec16<T>*>(grad + i);
        Vec16<T> mv = *reinterpret_cast<const Vec16<T>*>(exp_avg + i);
        Vec16<T> vv = *reinterpret_cast<const Vec16<T>*>(exp_avg_sq + i);
        Vec16<T> xv;
        if (max_sq) xv = *reinterpret_cast<const Vec16<T>*>(max_sq + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          S p = pv.v[k], m = mv.v[k], v = vv.v[k], vmax = max_sq ? S(xv.v[k]) : S(0);
          const S g = unscaled_grad<T>(gv.v[k], c.grad_factor, write_back_grads);
          adam_math<S>(p, g, m, v, max_sq ? &vmax : nullptr, c, maximize, decoupled);
          pv.v[k] = T(p);
          mv.v[k] = T(m);
          vv.v[k] = T(v);
          if (max_sq) xv.v[k] = T(vmax);
        }
        *reinterpret_cast<Vec16<T>*>(param + i) = pv;
        *reinterpret_cast<Vec16<T>*>(exp_avg + i) = mv;
        if (write_back_grads) *reinterpret_cast<Vec16<T>*>(grad + i) = gv;
        *reinterpret_cast<Vec16<T>*>(exp_avg_sq + i) = vv;
        if (max_sq) *reinterpret_cast<Vec16<T>*>(max_sq + i) = xv;
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < end; i += blockDim.x) update(i);
  }
};

}  // namespace

void adam_step(const AdamLaunch& a) {
  const auto& params = *a.params;
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto table = build_table<kAdamLists>(
      {a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.amsgrad ? a.max_exp_avg_sqs : a.empty, a.steps});
  increment_steps(table, kStep, a.found_inf);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fusedopt_adam_cuda", [&] {
    AdamFunctor<scalar_t> fn{a.lr,       a.beta1,        a.beta2,     a.eps,     a.weight_decay, a.lr_ptr,
                             a.grad_divisor, a.found_inf, a.amsgrad, a.maximize, a.decoupled_weight_decay,
                             a.write_back_grads};
    launch(table, fn);
  });
}

}  // namespace fusedopt::cuda
