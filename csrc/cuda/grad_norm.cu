// The fused grad norm and grad scaling of clip_grad_norm_ on CUDA, through the multi-tensor engine.
// grad_norm: each block reduces its chunk to one partial (sum |x|^p, or max |x| for inf) in opmath, written to
// partials[blockIdx.x]; the partials are then combined by one device reduction. No host sync.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cmath>
#include <type_traits>

#include "cuda/kernels.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace {

enum NormKind { kOne = 0, kTwo, kP, kInf };

// One element's contribution; the max keeps NaN, as torch's amax does.
template <int K, typename A>
__device__ __forceinline__ A norm_acc(A acc, A x, A p) {
  const A a = x < A(0) ? -x : x;
  if constexpr (K == kOne) return acc + a;
  if constexpr (K == kTwo) return acc + a * a;
  if constexpr (K == kP) return acc + pow(a, p);
  return (a != a || a > acc) ? a : acc;
}

template <int K, typename A>
__device__ __forceinline__ A norm_combine(A x, A y) {
  if constexpr (K == kInf) return (x != x || x > y) ? x : y;
  return x + y;
}

template <int K, typename A>
__device__ A block_reduce(A v) {
  __shared__ A warp_partials[kBlockThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v = norm_combine<K>(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_partials[lane] : A(0);
    for (int offset = 16; offset > 0; offset /= 2) v = norm_combine<K>(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  return v;  // valid in thread 0
}

template <typename T, int K>
struct NormFunctor {
  using A = at::opmath_type<T>;
  A* partials;  // one per block of the launch
  double p;

  __device__ void operator()(const TensorTable<1>& tab, int64_t t, int64_t begin, int64_t end) const {
    const T* x = tab.template ptr<T>(0, t);
    const A pa = A(p);
    A acc = A(0);
    int64_t vector_end = begin;
    constexpr int kVec = Vec16<T>::kVec;
    if (all_aligned16(tab, t, 1)) {
      vector_end = begin + (end - begin) / kVec * kVec;
      for (int64_t i = begin + threadIdx.x * kVec; i < vector_end; i += static_cast<int64_t>(blockDim.x) * kVec) {
        const Vec16<T> xv = *reinterpret_cast<const Vec16<T>*>(x + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc = norm_acc<K>(acc, A(xv.v[k]), pa);
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < end; i += blockDim.x) acc = norm_acc<K>(acc, A(x[i]), pa);
    acc = block_reduce<K>(acc);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
  }
};

template <typename T>
struct ScaleFunctor {
  using S = at::opmath_type<T>;
  const double* coef;  // device scalar

  __device__ void operator()(const TensorTable<1>& tab, int64_t t, int64_t begin, int64_t end) const {
    T* x = tab.template ptr<T>(0, t);
    const S c = S(*coef);
    int64_t vector_end = begin;
    constexpr int kVec = Vec16<T>::kVec;
    if (all_aligned16(tab, t, 1)) {
      vector_end = begin + (end - begin) / kVec * kVec;
      for (int64_t i = begin + threadIdx.x * kVec; i < vector_end; i += static_cast<int64_t>(blockDim.x) * kVec) {
        Vec16<T> xv = *reinterpret_cast<const Vec16<T>*>(x + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) xv.v[k] = T(S(xv.v[k]) * c);
        *reinterpret_cast<Vec16<T>*>(x + i) = xv;
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < end; i += blockDim.x) x[i] = T(S(x[i]) * c);
  }
};

template <typename T, int K>
at::Tensor norm_launch(const DeviceTable<1>& table, double p, const at::Tensor& like) {
  using A = at::opmath_type<T>;
  const auto acc_type = std::is_same_v<A, double> ? at::kDouble : at::kFloat;
  at::Tensor partials = at::zeros({std::max<int64_t>(table.blocks, 1)}, like.options().dtype(acc_type));
  launch(table, NormFunctor<T, K>{partials.data_ptr<A>(), p});
  return K == kInf ? partials.amax() : partials.sum();
}

}  // namespace

at::Tensor grad_norm_power_sum(const TensorList& tensors, double p) {
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  auto table = build_table<1>({&tensors});
  const int kind = std::isinf(p) ? kInf : p == 1.0 ? kOne : p == 2.0 ? kTwo : kP;
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "fusedopt_grad_norm_cuda", [&] {
    switch (kind) {
      case kOne: out = norm_launch<scalar_t, kOne>(table, p, tensors[0]); break;
      case kTwo: out = norm_launch<scalar_t, kTwo>(table, p, tensors[0]); break;
      case kP: out = norm_launch<scalar_t, kP>(table, p, tensors[0]); break;
      default: out = norm_launch<scalar_t, kInf>(table, p, tensors[0]); break;
    }
  });
  return out;
}

void scale_tensors(const TensorList& tensors, const at::Tensor& coef) {
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  auto table = build_table<1>({&tensors});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors[0].scalar_type(), "fusedopt_scale_cuda", [&] {
    launch(table, ScaleFunctor<scalar_t>{coef.data_ptr<double>()});
  });
}

}  // namespace fusedopt::cuda
