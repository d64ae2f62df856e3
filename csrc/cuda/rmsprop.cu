// RMSprop on CUDA through the multi-tensor engine. rmsprop_math is the whole update; the 16-byte vector body and
// the scalar tail both call it, in opmath (float for 16-bit params, double for float64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "common/lerp.h"
#include "cuda/kernels.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

enum RmspropList { kParam = 0, kGrad, kSquareAvg, kGradAvg, kMomentumBuf, kStep, kRmspropLists };

template <typename S>
struct RmspropCoefs {
  S lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_factor;
};

// torch.optim.RMSprop's update (single-tensor form); grad_avg / buf are null when unused.
template <typename S>
__device__ __forceinline__ void rmsprop_math(S& param, S grad, S& square_avg, S* grad_avg, S* buf,
                                             const RmspropCoefs<S>& c, bool maximize) {
  if (maximize) grad = -grad;
  if (c.weight_decay != S(0)) grad += c.weight_decay * param;
  square_avg = square_avg * c.alpha + c.one_minus_alpha * grad * grad;
  S avg;
  if (grad_avg != nullptr) {
    *grad_avg = fusedopt::lerp(*grad_avg, grad, c.one_minus_alpha);
    avg = sqrt(fma(-*grad_avg, *grad_avg, square_avg)) + c.eps;  // one rounding, as torch's addcmul
  } else {
    avg = sqrt(square_avg) + c.eps;
  }
  if (buf != nullptr) {
    *buf = *buf * c.momentum + grad / avg;
    param -= c.lr * *buf;
  } else {
    param -= c.lr * (grad / avg);
  }
}

template <typename T>
struct RmspropFunctor {
  using S = at::opmath_type<T>;
  double lr, alpha, eps, weight_decay, momentum;
  const float* lr_ptr;        // overrides lr when set (a tensor lr, read on the device)
  const float* grad_divisor;  // GradScaler scale (/ clip coefficient), or null
  const float* found_inf;     // nonzero: skip
  bool centered, maximize, write_back_grads;

  __device__ void operator()(const TensorTable<kRmspropLists>& tab, int64_t t, int64_t begin, int64_t end) const {
    if (found_inf != nullptr && *found_inf != 0.0f) return;
    RmspropCoefs<S> c;
    c.lr = S(lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : lr);
    c.alpha = S(alpha);
    c.one_minus_alpha = S(1.0 - alpha);
    c.eps = S(eps);
    c.weight_decay = S(weight_decay);
    c.momentum = S(momentum);
    c.grad_factor = grad_divisor != nullptr ? S(1.0 / static_cast<double>(*grad_divisor)) : S(1);
    const bool use_buf = momentum > 0.0;

    T* param = tab.template ptr<T>(kParam, t);
    T* grad = tab.template ptr<T>(kGrad, t);
    T* square_avg = tab.template ptr<T>(kSquareAvg, t);
    T* grad_avg = centered ? tab.template ptr<T>(kGradAvg, t) : nullptr;
    T* buf = use_buf ? tab.template ptr<T>(kMomentumBuf, t) : nullptr;

    int64_t vector_end = begin;
    constexpr int kVec = Vec16<T>::kVec;
    if (all_aligned16(tab, t, kMomentumBuf + 1)) {  // absent lists hold address 0: aligned
      vector_end = begin + (end - begin) / kVec * kVec;
      for (int64_t i = begin + threadIdx.x * kVec; i < vector_end; i += static_cast<int64_t>(blockDim.x) * kVec) {
        Vec16<T> pv = *reinterpret_cast<const Vec16<T>*>(param + i);
        Vec16<T> gv = *reinterpret_cast<const Vec16<T>*>(grad + i);
        Vec16<T> sv = *reinterpret_cast<const Vec16<T>*>(square_avg + i);
        Vec16<T> av, bv;
        if (grad_avg) av = *reinterpret_cast<const Vec16<T>*>(grad_avg + i);
        if (buf) bv = *reinterpret_cast<const Vec16<T>*>(buf + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          S p = pv.v[k], s = sv.v[k], a = grad_avg ? S(av.v[k]) : S(0), b = buf ? S(bv.v[k]) : S(0);
          const S g = unscaled_grad<T>(gv.v[k], c.grad_factor, write_back_grads);
          rmsprop_math<S>(p, g, s, grad_avg ? &a : nullptr, buf ? &b : nullptr, c, maximize);
          pv.v[k] = T(p);
          sv.v[k] = T(s);
          if (grad_avg) av.v[k] = T(a);
          if (buf) bv.v[k] = T(b);
        }
        *reinterpret_cast<Vec16<T>*>(param + i) = pv;
        *reinterpret_cast<Vec16<T>*>(square_avg + i) = sv;
        if (write_back_grads) *reinterpret_cast<Vec16<T>*>(grad + i) = gv;
        if (grad_avg) *reinterpret_cast<Vec16<T>*>(grad_avg + i) = av;
        if (buf) *reinterpret_cast<Vec16<T>*>(buf + i) = bv;
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < end; i += blockDim.x) {  // the tail and unaligned tensors
      S p = param[i], s = square_avg[i], a = grad_avg ? S(grad_avg[i]) : S(0), b = buf ? S(buf[i]) : S(0);
      const S g = unscaled_grad<T>(grad[i], c.grad_factor, write_back_grads);
      rmsprop_math<S>(p, g, s, grad_avg ? &a : nullptr, buf ? &b : nullptr, c, maximize);
      param[i] = T(p);
      square_avg[i] = T(s);
      if (grad_avg) grad_avg[i] = T(a);
      if (buf) buf[i] = T(b);
    }
  }
};

}  // namespace

void rmsprop_step(const RmspropLaunch& a) {
  const auto& params = *a.params;
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto table = build_table<kRmspropLists>({a.params, a.grads, a.square_avgs, a.centered ? a.grad_avgs : a.empty,
                                           a.momentum > 0.0 ? a.momentum_buffers : a.empty, a.steps});
  increment_steps(table, kStep, a.found_inf);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fusedopt_rmsprop_cuda", [&] {
    RmspropFunctor<scalar_t> fn{a.lr,     a.alpha,        a.eps,       a.weight_decay, a.momentum,
                                a.lr_ptr, a.grad_divisor, a.found_inf, a.centered,     a.maximize,
                                a.write_back_grads};
    launch(table, fn);
  });
}

}  // namespace fusedopt::cuda
