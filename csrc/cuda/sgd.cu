// SGD (momentum, dampening, Nesterov) on CUDA through the multi-tensor engine. sgd_math is the whole update; the
// 16-byte vector body and the scalar tail both call it, in opmath.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "cuda/kernels.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

enum SgdList { kParam = 0, kGrad, kMomentumBuf, kFirstFlag, kSgdLists };

template <typename S>
struct SgdCoefs {
  S lr, momentum, one_minus_dampening, weight_decay, grad_factor;
};

// torch.optim.SGD's update. buf is null without momentum; `first` starts the buffer as a copy of the grad.
template <typename S>
__device__ __forceinline__ void sgd_math(S& param, S grad, S* buf, bool first, const SgdCoefs<S>& c, bool nesterov,
                                         bool maximize) {
  if (maximize) grad = -grad;
  if (c.weight_decay != S(0)) grad += c.weight_decay * param;
  if (buf != nullptr) {
    *buf = first ? grad : *buf * c.momentum + c.one_minus_dampening * grad;
    grad = nesterov ? grad + c.momentum * *buf : *buf;
  }
  param -= c.lr * grad;
}

template <typename T>
struct SgdFunctor {
  using S = at::opmath_type<T>;
  double lr, momentum, dampening, weight_decay;
  const float* lr_ptr;
  const float* grad_divisor;
  const float* found_inf;
  bool use_buf, nesterov, maximize, write_back_grads;

  __device__ void operator()(const TensorTable<kSgdLists>& tab, int64_t t, int64_t begin, int64_t end) const {
    if (found_inf != nullptr && *found_inf != 0.0f) return;
    SgdCoefs<S> c;
    c.lr = S(lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : lr);
    c.momentum = S(momentum);
    c.one_minus_dampening = S(1.0 - dampening);
    c.weight_decay = S(weight_decay);
    c.grad_factor = grad_divisor != nullptr ? S(1.0 / static_cast<double>(*grad_divisor)) : S(1);
    const float* flag = tab.template ptr<float>(kFirstFlag, t);
    const bool first = flag != nullptr && *flag != 0.0f;  // cleared by clear_flags_kernel after this launch

    T* param = tab.template ptr<T>(kParam, t);
    T* grad = tab.template ptr<T>(kGrad, t);
    T* buf = use_buf ? tab.template ptr<T>(kMomentumBuf, t) : nullptr;

    int64_t vector_end = begin;
    constexpr int kVec = Vec16<T>::kVec;
    if (all_aligned16(tab, t, kMomentumBuf + 1)) {
      vector_end = begin + (end - begin) / kVec * kVec;
      for (int64_t i = begin + threadIdx.x * kVec; i < vector_end; i += static_cast<int64_t>(blockDim.x) * kVec) {
        Vec16<T> pv = *reinterpret_cast<const Vec16<T>*>(param + i);
        Vec16<T> gv = *reinterpret_cast<const Vec16<T>*>(grad + i);
        Vec16<T> bv;
        if (buf && !first) bv = *reinterpret_cast<const Vec16<T>*>(buf + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          S p = pv.v[k], b = (buf && !first) ? S(bv.v[k]) : S(0);
          const S g = unscaled_grad<T>(gv.v[k], c.grad_factor, write_back_grads);
          sgd_math<S>(p, g, buf ? &b : nullptr, first, c, nesterov, maximize);
          pv.v[k] = T(p);
          if (buf) bv.v[k] = T(b);
        }
        *reinterpret_cast<Vec16<T>*>(param + i) = pv;
        if (buf) *reinterpret_cast<Vec16<T>*>(buf + i) = bv;
        if (write_back_grads) *reinterpret_cast<Vec16<T>*>(grad + i) = gv;
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < end; i += blockDim.x) {
      S p = param[i], b = (buf && !first) ? S(buf[i]) : S(0);
      const S g = unscaled_grad<T>(grad[i], c.grad_factor, write_back_grads);
      sgd_math<S>(p, g, buf ? &b : nullptr, first, c, nesterov, maximize);
      param[i] = T(p);
      if (buf) buf[i] = T(b);
    }
  }
};

// After the update (stream order): a buffer that was started is no longer first, unless the step was skipped.
__global__ void clear_flags_kernel(TensorTable<kSgdLists> table, const float* found_inf) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= table.n) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  *table.template ptr<float>(kFirstFlag, t) = 0.0f;
}

}  // namespace

void sgd_step(const SgdLaunch& a) {
  const auto& params = *a.params;
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const bool use_buf = a.momentum != 0.0;
  const bool flags = use_buf && !a.first_flags->empty();
  auto table = build_table<kSgdLists>(
      {a.params, a.grads, use_buf ? a.momentum_buffers : a.empty, flags ? a.first_flags : a.empty});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fusedopt_sgd_cuda", [&] {
    SgdFunctor<scalar_t> fn{a.lr,           a.momentum,  a.dampening, a.weight_decay, a.lr_ptr,
                            a.grad_divisor, a.found_inf, use_buf,     a.nesterov,     a.maximize,
                            a.write_back_grads};
    launch(table, fn);
  });
  if (flags) {
    const unsigned grid = static_cast<unsigned>((table.view.n + 255) / 256);
    clear_flags_kernel<<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(table.view, a.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace fusedopt::cuda
