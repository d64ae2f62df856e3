// The CUDA engine of the two-pass optimizers (FUSEDOPT_FOR_EACH_NORM_OPTIMIZER, e.g. LAMB): one table
// [params, grads, states..., steps] per (device, dtype) group (multi_tensor_apply.cuh), the step prologue, then two
// launches over every chunk of every tensor:
//   stage 1: per element the grad divisor, maximize and Op::stage1 (reads only); each block reduces its Op::kNorms
//            sums (opmath, fixed-order tree) to partials[block][k] in double;
//   stage 2: each block adds the partials of its tensor's blocks (they are consecutive in the block map) in a fixed
//            order, takes Op::step_size in double, and applies Op::stage2 to its chunk (write_back_grads, the
//            states and the params stored; bf16 params by stochastic rounding when a.stochastic_round is set).
// Deterministic (no atomics), no host sync; 64-bit offsets. The vectorised/aligned split of optim_engine.cuh is
// left out: this engine reads elements with a block-stride loop.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "common/optimizers.h"
#include "common/stochastic_round.h"
#include "cuda/kernels.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedopt::cuda {
namespace norm_engine {

// Sum over the block, the same tree every time; the result is valid in thread 0.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_partials[kBlockThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // warp_partials may still be read by a previous call
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x / 32) ? warp_partials[lane] : A(0);
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename Op, typename T>
struct Common {
  using S = at::opmath_type<T>;
  static constexpr int kLists = Op::kStates + 3;  // params, grads, states..., steps
  static constexpr int kStepList = Op::kStates + 2;

  typename Op::Hyper hyper;
  double lr;
  const float* lr_ptr;        // overrides lr when set (a tensor lr, read on the device)
  const float* grad_divisor;  // GradScaler scale (/ clip coefficient), or null
  const float* found_inf;     // nonzero: skip
  const int64_t* stochastic_round;  // [seed, counter]: bf16 params stored by stochastic rounding, or null
  bool maximize, write_back_grads;
  double* partials;  // [blocks][Op::kNorms]

  __device__ double lr_value() const { return lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : lr; }
  __device__ typename Op::template Coefs<S> coefs(const TensorTable<kLists>& tab, int64_t t) const {
    return Op::template coefs<S>(hyper, lr_value(), static_cast<double>(*tab.template ptr<float>(kStepList, t)));
  }
};

template <typename Op, typename T>
struct Stage1 : Common<Op, T> {
  using S = typename Common<Op, T>::S;
  __device__ void operator()(const TensorTable<Common<Op, T>::kLists>& tab, int64_t t, int64_t begin,
                             int64_t end) const {
    if (this->found_inf != nullptr && *this->found_inf != 0.0f) return;
    const auto c = this->coefs(tab, t);
    const S grad_factor = this->grad_divisor != nullptr ? S(1.0 / static_cast<double>(*this->grad_divisor)) : S(1);
    T* param = tab.template ptr<T>(0, t);
    T* grad = tab.template ptr<T>(1, t);
    T* state[Op::kStates];
    for (int k = 0; k < Op::kStates; ++k) state[k] = tab.template ptr<T>(2 + k, t);
    S sums[Op::kNorms];
    for (int k = 0; k < Op::kNorms; ++k) sums[k] = S(0);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const S p = param[i];
      S g = S(grad[i]) * grad_factor;  // written back (GradScaler) by stage 2
      if (this->maximize) g = -g;
      S s[Op::kStates];
      for (int k = 0; k < Op::kStates; ++k) s[k] = S(state[k][i]);
      Op::template stage1<S>(c, p, g, s, sums);  // nothing stored: stage 2 computes the states again
    }
    for (int k = 0; k < Op::kNorms; ++k) {
      const S total = block_sum(sums[k]);
      if (threadIdx.x == 0) this->partials[blockIdx.x * static_cast<int64_t>(Op::kNorms) + k] = double(total);
    }
  }
};

template <typename Op, typename T>
struct Stage2 : Common<Op, T> {
  using S = typename Common<Op, T>::S;
  __device__ void operator()(const TensorTable<Common<Op, T>::kLists>& tab, int64_t t, int64_t begin,
                             int64_t end) const {
    if (this->found_inf != nullptr && *this->found_inf != 0.0f) return;
    __shared__ double step_size;
    // This tensor's blocks: from (this block - its chunk index), one per chunk.
    const int64_t first = static_cast<int64_t>(blockIdx.x) - begin / kChunkElems;
    const int64_t count = (tab.numel[t] + kChunkElems - 1) / kChunkElems;
    double sums[Op::kNorms];
    for (int k = 0; k < Op::kNorms; ++k) {
      double x = 0.0;
      for (int64_t b = threadIdx.x; b < count; b += blockDim.x) x += this->partials[(first + b) * Op::kNorms + k];
      sums[k] = block_sum(x);
    }
    if (threadIdx.x == 0) step_size = Op::template step_size<S>(this->hyper, this->lr_value(), sums);
    __syncthreads();
    const auto c = this->coefs(tab, t);
    const S step = S(step_size);
    const S grad_factor = this->grad_divisor != nullptr ? S(1.0 / static_cast<double>(*this->grad_divisor)) : S(1);
    const uint32_t sr_key = stochastic_round_key(this->stochastic_round, t);
    T* param = tab.template ptr<T>(0, t);
    T* grad = tab.template ptr<T>(1, t);
    T* state[Op::kStates];
    for (int k = 0; k < Op::kStates; ++k) state[k] = tab.template ptr<T>(2 + k, t);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      S p = param[i];
      S g = unscaled_grad<T>(grad[i], grad_factor, this->write_back_grads);
      if (this->maximize) g = -g;
      S s[Op::kStates];
      for (int k = 0; k < Op::kStates; ++k) s[k] = S(state[k][i]);
      Op::template stage2<S>(c, step, p, g, s);
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (this->stochastic_round != nullptr) {
          param[i] = at::BFloat16(stochastic_round_bf16_bits(__float_as_uint(p), sr_key, i), at::BFloat16::from_bits());
        } else {
          param[i] = T(p);
        }
      } else {
        param[i] = T(p);
      }
      for (int k = 0; k < Op::kStates; ++k) state[k][i] = T(s[k]);
    }
  }
};

}  // namespace norm_engine

template <typename Op>
void norm_optim_step(const OptimLaunch<typename Op::Hyper>& a) {
  constexpr int kLists = Op::kStates + 3;
  constexpr int kStepList = Op::kStates + 2;
  static_assert(Op::kScalar == TensorScalar::kStep, "the two-pass engine reads each tensor's step");
  const auto& params = *a.params;
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::array<const TensorList*, kLists> lists{};
  lists[0] = a.params;
  lists[1] = a.grads;
  for (int k = 0; k < Op::kStates; ++k) lists[2 + k] = a.states[k];
  lists[kStepList] = a.scalars;
  auto table = build_table<kLists>(lists);
  update_scalars(table, kStepList, a.found_inf, 1.0f, 1.0f);  // step += 1 unless found_inf
  if (table.blocks == 0) return;
  at::Tensor partials = at::empty({table.blocks * Op::kNorms}, params[0].options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fusedopt_norm_optim_cuda", [&] {
    norm_engine::Common<Op, scalar_t> common{a.hyper,        a.lr,      a.lr_ptr,           a.grad_divisor,
                                             a.found_inf,    a.stochastic_round, a.maximize, a.write_back_grads,
                                             partials.data_ptr<double>()};
    launch(table, norm_engine::Stage1<Op, scalar_t>{common});
    launch(table, norm_engine::Stage2<Op, scalar_t>{common});
  });
}

}  // namespace fusedopt::cuda
