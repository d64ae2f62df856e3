// The CUDA engine of the pointwise losses (MSE, BCE, BCE with logits). One pass: a grid-stride loop reads input and
// target once (16-byte vectors when aligned), writes the unreduced loss or adds it to a per-thread float64 sum, and
// writes the scaled gradient in the same pass. Reduction is deterministic in two stages: each block writes its
// partial sum (fixed-order tree), then one block adds the partials in a fixed order, applies the scale on the
// device and writes the 0-d result in its dtype. Offsets are 64-bit. No host sync anywhere.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <tuple>

#include "cuda/multi_tensor_apply.cuh"  // Vec16

namespace fusedopt::cuda::pointwise {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;  // 2048 resident threads per SM
constexpr int kFinishThreads = 1024;

template <typename T>
struct LossArgs {
  const T* x;
  const T* t;
  const T* w;   // null, or weight[i % w_period]
  const T* pw;  // null, or pos_weight[i % pw_period]
  int64_t w_period, pw_period, n;
  T* loss;  // reduction none: n elements; else null
  T* grad;  // null when no gradient is wanted
  double scale;
  const double* scale_dev;  // null, or a device float64 factor (the weighted mean's 1 / sum(weight))
  double* partial;          // [gridDim.x] block sums (when loss == null)
  int* block_flags;         // [gridDim.x] or null (BCE's range check)
  bool vectorized;          // every pointer 16-byte aligned
};

// i % period; 32-bit division when both fit (the common case), 64-bit otherwise.
__device__ __forceinline__ int64_t wrap(int64_t i, int64_t period) {
  if (((i | period) >> 32) == 0) return static_cast<uint32_t>(i) % static_cast<uint32_t>(period);
  return i % period;
}

// Deterministic block sum (shuffle tree, then the warp sums in order). Valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < warps) ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Math<S>: `static constexpr bool kCheckRange` and
// `__device__ void operator()(S x, S t, bool has_pos_weight, S pos_weight, S& loss, S& dloss) const`.
template <typename T, template <typename> class Math>
__global__ void __launch_bounds__(kThreads) loss_stage1(LossArgs<T> a) {
  using S = at::opmath_type<T>;
  const Math<S> math;
  const S scale = static_cast<S>(a.scale * (a.scale_dev != nullptr ? *a.scale_dev : 1.0));
  const bool reduce = a.loss == nullptr;
  double acc = 0.0;
  int flags = 0;
  auto element = [&](int64_t i, S x, S t, S& loss, S& dloss) {
    const S p = a.pw != nullptr ? static_cast<S>(a.pw[wrap(i, a.pw_period)]) : S(1);
    math(x, t, a.pw != nullptr, p, loss, dloss);
    if (a.w != nullptr) {
      const S w = static_cast<S>(a.w[wrap(i, a.w_period)]);
      loss *= w;
      dloss *= w;
    }
    if constexpr (Math<S>::kCheckRange) {
      if (!(x >= S(0) && x <= S(1))) flags |= 1;  // NaN included
      if (!(t >= S(0) && t <= S(1))) flags |= 2;
    }
    if (reduce) acc += static_cast<double>(loss);
    dloss *= scale;
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  constexpr int kVec = Vec16<T>::kVec;
  int64_t scalar_begin = 0;
  if (a.vectorized) {
    const int64_t n_vec = a.n / kVec;
    for (int64_t v = first; v < n_vec; v += stride) {
      const int64_t i0 = v * kVec;
      const Vec16<T> xv = reinterpret_cast<const Vec16<T>*>(a.x)[v];
      const Vec16<T> tv = reinterpret_cast<const Vec16<T>*>(a.t)[v];
      Vec16<T> lv, gv;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        S loss, dloss;
        element(i0 + k, static_cast<S>(xv.v[k]), static_cast<S>(tv.v[k]), loss, dloss);
        lv.v[k] = static_cast<T>(loss);
        gv.v[k] = static_cast<T>(dloss);
      }
      if (!reduce) reinterpret_cast<Vec16<T>*>(a.loss)[v] = lv;
      if (a.grad != nullptr) reinterpret_cast<Vec16<T>*>(a.grad)[v] = gv;
    }
    scalar_begin = n_vec * kVec;
  }
  for (int64_t i = scalar_begin + first; i < a.n; i += stride) {  // the tail, or everything when unaligned
    S loss, dloss;
    element(i, static_cast<S>(a.x[i]), static_cast<S>(a.t[i]), loss, dloss);
    if (!reduce) a.loss[i] = static_cast<T>(loss);
    if (a.grad != nullptr) a.grad[i] = static_cast<T>(dloss);
  }
  if (reduce) {
    const double sum = block_sum(acc);
    if (threadIdx.x == 0) a.partial[blockIdx.x] = sum;
  }
  if (a.block_flags != nullptr) {
    const int bad_x = __syncthreads_or(flags & 1), bad_t = __syncthreads_or(flags & 2);
    if (threadIdx.x == 0) a.block_flags[blockIdx.x] = (bad_x ? 1 : 0) | (bad_t ? 2 : 0);
  }
}

// One block: partials added in a fixed order, times the scale, written as Out; block flags OR-ed.
template <typename Out>
__global__ void __launch_bounds__(kFinishThreads)
    loss_stage2(const double* partial, const int* block_flags, int64_t blocks, double scale, const double* scale_dev,
                Out* out, int* flags_out) {
  double acc = 0.0;
  int flags = 0;
  for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) {
    if (out != nullptr) acc += partial[b];
    if (block_flags != nullptr) flags |= block_flags[b];
  }
  if (out != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) *out = static_cast<Out>(total * scale * (scale_dev != nullptr ? *scale_dev : 1.0));
  }
  if (flags_out != nullptr) {
    const int bad_x = __syncthreads_or(flags & 1), bad_t = __syncthreads_or(flags & 2);
    if (threadIdx.x == 0) *flags_out = (bad_x ? 1 : 0) | (bad_t ? 2 : 0);
  }
}

inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Host side: (loss, grad, flags). x, t contiguous CUDA tensors of one dtype; weights contiguous in that dtype.
template <template <typename> class Math>
std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& x, const at::Tensor& t,
                                                   const std::optional<at::Tensor>& weight, int64_t weight_period,
                                                   const std::optional<at::Tensor>& pos_weight,
                                                   int64_t pos_weight_period, double scale,
                                                   const std::optional<at::Tensor>& scale_tensor, int64_t reduction,
                                                   bool need_grad, at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  const bool reduce = reduction != 0;
  constexpr bool check_range = Math<float>::kCheckRange;
  const at::Tensor scale_dev =
      scale_tensor.has_value() && scale_tensor->defined() ? scale_tensor->to(at::kDouble) : at::Tensor();
  at::Tensor loss = reduce ? at::empty({}, x.options().dtype(out_dtype)) : at::empty({n}, x.options());
  at::Tensor grad = at::empty({need_grad ? n : 0}, x.options());
  at::Tensor flags = check_range ? at::empty({1}, x.options().dtype(at::kInt)) : at::Tensor();
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t max_blocks = static_cast<int64_t>(prop->multiProcessorCount) * kBlocksPerSm;
  const int64_t blocks = std::max<int64_t>(1, std::min(max_blocks, (n + kThreads * 4 - 1) / (kThreads * 4)));
  at::Tensor partial = at::empty({blocks}, x.options().dtype(at::kDouble));
  at::Tensor block_flags = check_range ? at::empty({blocks}, x.options().dtype(at::kInt)) : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedopt_pointwise_loss", [&] {
      LossArgs<scalar_t> a{};
      a.x = x.data_ptr<scalar_t>();
      a.t = t.data_ptr<scalar_t>();
      a.w = weight.has_value() && weight->defined() ? weight->data_ptr<scalar_t>() : nullptr;
      a.pw = pos_weight.has_value() && pos_weight->defined() ? pos_weight->data_ptr<scalar_t>() : nullptr;
      a.w_period = weight_period;
      a.pw_period = pos_weight_period;
      a.n = n;
      a.loss = reduce ? nullptr : loss.data_ptr<scalar_t>();
      a.grad = need_grad ? grad.data_ptr<scalar_t>() : nullptr;
      a.scale = scale;
      a.scale_dev = scale_dev.defined() ? scale_dev.data_ptr<double>() : nullptr;
      a.partial = partial.data_ptr<double>();
      a.block_flags = check_range ? block_flags.data_ptr<int>() : nullptr;
      a.vectorized = aligned16(a.x) && aligned16(a.t) && aligned16(a.loss) && aligned16(a.grad);
      loss_stage1<scalar_t, Math><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  } else {
    partial.zero_();  // the sum of nothing
    if (check_range) block_flags.zero_();
  }
  if (reduce || check_range) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "fusedopt_pointwise_loss_sum", [&] {
      loss_stage2<scalar_t><<<1, kFinishThreads, 0, stream>>>(
          partial.data_ptr<double>(), check_range ? block_flags.data_ptr<int>() : nullptr, blocks, scale,
          scale_dev.defined() ? scale_dev.data_ptr<double>() : nullptr,
          reduce ? loss.data_ptr<scalar_t>() : nullptr, check_range ? flags.data_ptr<int>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {loss, grad, flags};
}

}  // namespace fusedopt::cuda::pointwise
