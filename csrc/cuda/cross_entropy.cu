// Cross-entropy on CUDA: one block per row. Pass 1 reads the row once from memory (16-byte vectors when the row
// allows it): an online max and sum of exp per thread, merged across the block, plus the target terms. Pass 2 sweeps
// the same row again (an L2 hit for all but the longest rows) and writes the gradient. Each thread loops over the
// row, so any vocabulary (256k and beyond) runs with the same few registers. The math is fusedopt/reference.py's:
//   loss = sum_c q_c (lse - z_c) + z_loss lse^2,  g_c = scale ((Q + 2 z_loss lse) softmax_c - q_c) (1 - (z_c/cap)^2)
// computed relative to the row max (see pass 1). The softcap's tanh is the device's tanhf/tanh, as torch's.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "cuda/kernels.h"

namespace fusedopt::cuda {
namespace {

constexpr int kMaxThreads = 1024;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

struct CeParams {
  const void* logits;
  const int64_t* target_index;  // class-index targets, or null
  const void* target_prob;      // probability targets, or null
  const void* weight;           // opmath, or null
  const void* weight_sum;       // opmath scalar on the device (sum of weight), or null
  void* grad;                   // or null; may alias logits
  const void* grad_scale;       // opmath scalar on the device, or null
  void* loss;                   // opmath
  void* lse;                    // opmath
  int64_t classes, ignore_index;
  double one_minus_ls, ls_over_c, z_loss, cap;
  bool softcap, smoothing;
};

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

template <typename S>
__device__ __forceinline__ S softcap_of(S x, bool on, S cap, S inv_cap) {
  return on ? cap * tanh(x * inv_cap) : x;
}

// Merges two (max, sum of exp(z - max)) pairs. Maxes never hold NaN (fmax drops it; NaN is tracked apart).
template <typename S>
__device__ __forceinline__ void merge_lse(S& m, S& s, S m2, S s2) {
  const S big = fmax(m, m2);
  const S safe = big == -INFINITY ? S(0) : big;  // both empty so far: exp(-inf) = 0
  s = s * fast_exp(m - safe) + s2 * fast_exp(m2 - safe);
  m = big;
}

template <typename S>
__device__ __forceinline__ S warp_sum(S v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block, returned to every thread. `shared` holds 32 values; blockDim.x is a multiple of 32.
template <typename S>
__device__ S block_sum(S v, S* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : S(0);
  return warp_sum(v);
}

template <typename S>
__device__ void block_merge_lse(S& m, S& s, S* shared_m, S* shared_s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge_lse(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
  __syncthreads();
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  m = lane < warps ? shared_m[lane] : S(-INFINITY);
  s = lane < warps ? shared_s[lane] : S(0);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge_lse(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
}

template <typename T, int kVec>
__device__ void fill_row(T* g, int64_t classes, T value) {
  using P = Pack<T, kVec>;
  P pack;
#pragma unroll
  for (int k = 0; k < kVec; ++k) pack.v[k] = value;
  for (int64_t v = threadIdx.x; v < classes / kVec; v += blockDim.x) reinterpret_cast<P*>(g)[v] = pack;
}

// kVec > 1 only when every row starts 16-byte aligned and classes % kVec == 0 (checked by the host).
template <typename T, int kVec, bool kProb>
__global__ void __launch_bounds__(kMaxThreads) cross_entropy_fwd_kernel(CeParams p) {
  using S = at::opmath_type<T>;
  using P = Pack<T, kVec>;
  __shared__ S shared_a[32], shared_b[32];
  const int64_t row = blockIdx.x;
  const int64_t C = p.classes;
  const int64_t packs = C / kVec;
  const T* x = static_cast<const T*>(p.logits) + row * C;
  const T* y = kProb ? static_cast<const T*>(p.target_prob) + row * C : nullptr;
  const S* w = static_cast<const S*>(p.weight);
  T* g = p.grad != nullptr ? static_cast<T*>(p.grad) + row * C : nullptr;
  S* loss_out = static_cast<S*>(p.loss);
  S* lse_out = static_cast<S*>(p.lse);
  const S one_minus_ls = S(p.one_minus_ls), ls_over_c = S(p.ls_over_c), z_loss = S(p.z_loss);
  const S cap = S(p.cap), inv_cap = p.softcap ? S(1.0 / p.cap) : S(0);
  const S nan = S(NAN);

  int64_t t = -1;
  S w_t = S(1), z_t = S(0);
  if constexpr (!kProb) {
    t = p.target_index[row];
    const bool valid = t != p.ignore_index;
    const bool bad = valid && (t < 0 || t >= C);
    CUDA_KERNEL_ASSERT(!bad);  // torch's "Target t is out of bounds", as a device-side assert
    if (!valid || bad) {       // ignored: the row is never read; out of range: NaN, never a plausible loss
      if (threadIdx.x == 0) {
        loss_out[row] = bad ? nan : S(0);
        lse_out[row] = bad ? nan : S(0);
      }
      if (g != nullptr) fill_row<T, kVec>(g, C, T(bad ? nan : S(0)));
      return;
    }
    if (w != nullptr) w_t = w[t];
    z_t = softcap_of(S(x[t]), p.softcap, cap, inv_cap);  // read before pass 2 may overwrite x (in-place mode)
  }

  // Pass 1. Everything is kept relative to the max (lse - z = log(s) - (z - max)): lse = max + log(s) would round
  // log(s) away against a large max (1e30, or 1e4 in fp32). So the target sums are sums of q (z - shift), shift = m
  // (0 while m is -inf), moved by W (new shift - old shift) when m grows, W being the q seen so far.
  S m = S(-INFINITY), s = S(0), shift = S(0), acc_w = S(0), acc_wz = S(0);
  const bool target_sums = kProb || p.smoothing;
  bool has_nan = false;
  for (int64_t v = threadIdx.x; v < packs; v += blockDim.x) {
    const P xp = reinterpret_cast<const P*>(x)[v];
    P yp;
    if constexpr (kProb) yp = reinterpret_cast<const P*>(y)[v];
    S z[kVec], q[kVec];
    S pack_max = S(-INFINITY);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t c = v * kVec + k;
      z[k] = softcap_of(S(xp.v[k]), p.softcap, cap, inv_cap);
      has_nan |= z[k] != z[k];
      pack_max = fmax(pack_max, z[k]);
      const S wc = target_sums && w != nullptr ? w[c] : S(1);  // class weights: only the sums read them
      if constexpr (kProb)
        q[k] = wc * (S(yp.v[k]) * one_minus_ls + ls_over_c);
      else
        q[k] = wc;
    }
    const S m_new = fmax(m, pack_max);
    const S safe = m_new == -INFINITY ? S(0) : m_new;
    S sum = s * fast_exp(m - safe);
#pragma unroll
    for (int k = 0; k < kVec; ++k) sum += fast_exp(z[k] - safe);
    s = sum;
    m = m_new;
    if (target_sums) {
      acc_wz -= acc_w * (safe - shift);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        acc_wz += q[k] * (z[k] - safe);
        acc_w += q[k];
      }
      shift = safe;
    }
  }
  block_merge_lse(m, s, shared_a, shared_b);
  has_nan = __syncthreads_or(has_nan);
  const S max_safe = m == -INFINITY ? S(0) : m;
  const S log_s = has_nan ? nan : log(s);
  const S lse = max_safe + log_s;  // what return_lse gives; the loss uses log_s
  // This thread's q (z - max), from its own shift.
  const S wz = target_sums ? acc_wz - acc_w * (max_safe - shift) : S(0);

  S big_q, loss;
  if constexpr (kProb) {
    big_q = block_sum(acc_w, shared_a);
    loss = big_q * log_s - block_sum(wz, shared_b);
  } else {
    const S w_sum = p.weight_sum != nullptr ? *static_cast<const S*>(p.weight_sum) : S(C);
    big_q = one_minus_ls * w_t + ls_over_c * w_sum;
    loss = one_minus_ls * w_t * (log_s - (z_t - max_safe));
    if (p.smoothing) loss += ls_over_c * (w_sum * log_s - block_sum(wz, shared_a));
  }
  loss += z_loss * lse * lse;
  if (threadIdx.x == 0) {
    loss_out[row] = loss;
    lse_out[row] = lse;
  }
  if (g == nullptr) return;
  if (has_nan) {  // as torch: a NaN logit makes the whole row's gradient NaN
    fill_row<T, kVec>(g, C, T(nan));
    return;
  }

  // Pass 2.
  const S scale = p.grad_scale != nullptr ? *static_cast<const S*>(p.grad_scale) : S(1);
  const S coef = scale * (big_q + S(2) * z_loss * lse) / s;  // softmax = exp(z - max) / s, never exp(z - lse)
  for (int64_t v = threadIdx.x; v < packs; v += blockDim.x) {
    const P xp = reinterpret_cast<const P*>(x)[v];
    P yp, out;
    if constexpr (kProb) yp = reinterpret_cast<const P*>(y)[v];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const int64_t c = v * kVec + k;
      const S z = softcap_of(S(xp.v[k]), p.softcap, cap, inv_cap);
      const S wc = w != nullptr ? w[c] : S(1);
      S q;
      if constexpr (kProb)
        q = wc * (S(yp.v[k]) * one_minus_ls + ls_over_c);
      else
        q = ls_over_c * wc + (c == t ? one_minus_ls * w_t : S(0));
      S gk = coef * fast_exp(z - max_safe) - scale * q;
      if (p.softcap) gk *= S(1) - (z * inv_cap) * (z * inv_cap);
      out.v[k] = T(gk);
    }
    reinterpret_cast<P*>(g)[v] = out;
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kMaxThreads)
    scale_rows_kernel(T* grad, const at::opmath_type<T>* scale, int64_t classes, bool per_row) {
  using S = at::opmath_type<T>;
  using P = Pack<T, kVec>;
  const int64_t row = blockIdx.x;
  const S f = scale[per_row ? row : 0];
  if (f == S(1)) return;  // loss.backward(): the launch touches no gradient memory
  P* g = reinterpret_cast<P*>(grad + row * classes);
  for (int64_t v = threadIdx.x; v < classes / kVec; v += blockDim.x) {
    P pack = g[v];
#pragma unroll
    for (int k = 0; k < kVec; ++k) pack.v[k] = T(S(pack.v[k]) * f);
    g[v] = pack;
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Enough threads for a few packs each, in whole warps.
int threads_for(int64_t packs) {
  int threads = 32;
  while (threads < kMaxThreads && threads * 4 < packs) threads *= 2;
  return threads;
}

}  // namespace

void launch_cross_entropy_fwd(const CrossEntropyLaunch& a) {
  const at::Tensor& logits = *a.logits;
  const int64_t rows = logits.size(0), classes = logits.size(1);
  if (rows == 0) return;
  TORCH_CHECK(rows < (int64_t{1} << 31), "fusedopt cross_entropy (cuda): at most 2^31 - 1 rows per call");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor weight_sum;
  CeParams p{};
  p.logits = logits.data_ptr();
  p.target_index = a.prob_target ? nullptr : a.target->data_ptr<int64_t>();
  p.target_prob = a.prob_target ? a.target->data_ptr() : nullptr;
  if (a.weight != nullptr) {
    weight_sum = a.weight->sum();  // on the device: no sync
    p.weight = a.weight->data_ptr();
    p.weight_sum = weight_sum.data_ptr();
  }
  p.grad = a.grad != nullptr ? a.grad->data_ptr() : nullptr;
  p.grad_scale = a.grad_scale != nullptr ? a.grad_scale->data_ptr() : nullptr;
  p.loss = a.loss->data_ptr();
  p.lse = a.lse->data_ptr();
  p.classes = classes;
  p.ignore_index = a.ignore_index;
  p.one_minus_ls = 1.0 - a.label_smoothing;
  p.ls_over_c = a.label_smoothing / static_cast<double>(classes);
  p.z_loss = a.z_loss;
  p.softcap = a.softcap != 0.0;
  p.cap = p.softcap ? a.softcap : 1.0;
  p.smoothing = a.label_smoothing != 0.0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fusedopt_cross_entropy_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = classes % kVec == 0 && aligned16(p.logits) && aligned16(p.target_prob) && aligned16(p.grad);
    const int64_t packs = vec ? classes / kVec : classes;
    const int threads = threads_for(packs);
    const unsigned grid = static_cast<unsigned>(rows);
    if (vec) {
      if (a.prob_target)
        cross_entropy_fwd_kernel<scalar_t, kVec, true><<<grid, threads, 0, stream>>>(p);
      else
        cross_entropy_fwd_kernel<scalar_t, kVec, false><<<grid, threads, 0, stream>>>(p);
    } else {
      if (a.prob_target)
        cross_entropy_fwd_kernel<scalar_t, 1, true><<<grid, threads, 0, stream>>>(p);
      else
        cross_entropy_fwd_kernel<scalar_t, 1, false><<<grid, threads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_cross_entropy_scale_grad(const at::Tensor& grad, const at::Tensor& scale) {
  const int64_t rows = grad.size(0), classes = grad.size(1);
  if (rows == 0 || classes == 0) return;
  TORCH_CHECK(rows < (int64_t{1} << 31), "fusedopt cross_entropy (cuda): at most 2^31 - 1 rows per call");
  const c10::cuda::CUDAGuard guard(grad.device());
  const bool per_row = scale.numel() != 1 || rows == 1;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fusedopt_ce_scale_cuda", [&] {
    using S = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto* g = grad.data_ptr<scalar_t>();
    const auto* f = scale.data_ptr<S>();
    const unsigned grid = static_cast<unsigned>(rows);
    if (classes % kVec == 0 && aligned16(g)) {
      scale_rows_kernel<scalar_t, kVec><<<grid, threads_for(classes / kVec), 0, stream>>>(g, f, classes, per_row);
    } else {
      scale_rows_kernel<scalar_t, 1><<<grid, threads_for(classes), 0, stream>>>(g, f, classes, per_row);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fusedopt::cuda
