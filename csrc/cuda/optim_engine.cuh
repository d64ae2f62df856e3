// The CUDA optimizer engine: everything of a step but the math, for every op of common/optimizers.h. One table
// [params, grads, states..., scalars] and one launch per (device, dtype) group (multi_tensor_apply.cuh); the step
// prologue or the first-step flags' epilogue; per block the lr (float or device tensor), found_inf skip and the op's coefficients (from the tensor's
// step); per element the grad divisor, write_back_grads, maximize and the op's update (common/<op>_math.h). 16-byte
// vector loads and stores when every address of the tensor allows them, a scalar tail, both through the same math.
// Master weights (common/master_bits.h): a further list of float32 masters or int16 remainders, float32 states, the
// param's value read from its master and written back with the rounded param (the scalar loop only).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "common/master_bits.h"
#include "common/optimizers.h"
#include "common/stochastic_round.h"
#include "cuda/kernels.h"
#include "cuda/multi_tensor_apply.cuh"

namespace fusedopt::cuda {

// A param's value in opmath: from its float32 master, the bf16 param joined with its int16 remainder, or the param.
template <MasterKind M, typename T, typename S, typename MasterT>
__device__ __forceinline__ S load_param_value(const T& param, const MasterT* master, int64_t index) {
  if constexpr (M == MasterKind::kFloat32) {  // the param where it no longer is the master rounded
    const S m = master[index];
    if constexpr (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) {
      const S p = S(param);
      return param_left_master(param.x, T(m).x, p != p, m) ? p : m;
    }
    return m;
  } else if constexpr (M == MasterKind::kRemainder && std::is_same_v<T, at::BFloat16>) {
    return __uint_as_float(join_master_bits(param.x, master[index]));
  } else {
    return S(param);
  }
}

// The updated value: to the master and the param rounded to nearest, split into the param and its remainder, or to
// the param (stored_param: bf16 by stochastic rounding when `stochastic`).
template <MasterKind M, typename T, typename S, typename MasterT>
__device__ __forceinline__ void store_param_value(S p, T& param, MasterT* master, int64_t index, bool stochastic,
                                                  uint32_t sr_key) {
  if constexpr (M == MasterKind::kFloat32) {
    master[index] = p;
    param = T(p);
  } else if constexpr (M == MasterKind::kRemainder && std::is_same_v<T, at::BFloat16>) {
    uint16_t high;
    split_master_bits(__float_as_uint(p), high, master[index]);
    param = at::BFloat16(high, at::BFloat16::from_bits());
  } else {
    param = stored_param<T>(p, stochastic, sr_key, index);
  }
}

template <typename Op, typename T, MasterKind M = MasterKind::kNone>
struct OptimFunctor {
  using S = at::opmath_type<T>;
  using StateT = std::conditional_t<M == MasterKind::kNone, T, S>;  // float32 states beside a master
  using MasterT = std::conditional_t<M == MasterKind::kRemainder, int16_t, float>;
  static constexpr int kStates = Op::kStates;
  static constexpr int kSlots = kStates > 0 ? kStates : 1;
  static constexpr int kScalarList = kStates + 2;
  static constexpr int kMasterList = kStates + 3;
  static constexpr int kLists = kStates + (M == MasterKind::kNone ? 3 : 4);  // params, grads, states..., scalars
                                                                             // (, masters)

  typename Op::Hyper hyper;
  double lr;
  const float* lr_ptr;        // overrides lr when set (a tensor lr, read on the device)
  const float* grad_divisor;  // GradScaler scale (/ clip coefficient), or null
  const float* found_inf;     // nonzero: skip
  const int64_t* stochastic_round;  // [seed, counter]: bf16 params stored by stochastic rounding, or null
  bool maximize, write_back_grads;

  // One element: grad (storage) is divided, maybe written back, maybe negated; then the op's update. `index` (in
  // the tensor) and `sr_key` feed stochastic rounding.
  __device__ __forceinline__ void element(const typename Op::template Coefs<S>& c, S grad_factor, T& param, T& grad,
                                          S* state, int64_t index, uint32_t sr_key, MasterT* master = nullptr) const {
    S p = load_param_value<M, T, S>(param, master, index);
    S g = unscaled_grad<T>(grad, grad_factor, write_back_grads);
    if (maximize) g = -g;
    Op::template update<S>(c, p, g, state);
    store_param_value<M>(p, param, master, index, stochastic_round != nullptr, sr_key);
  }

  __device__ void operator()(const TensorTable<kLists>& tab, int64_t t, int64_t begin, int64_t end) const {
    if (found_inf != nullptr && *found_inf != 0.0f) return;
    const double lr_value = lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : lr;
    const float* scalar = tab.template ptr<float>(kScalarList, t);  // null: the op has none, or no flag is set
    const auto c = Op::template coefs<S>(hyper, lr_value, scalar != nullptr ? static_cast<double>(*scalar) : 0.0);
    const S grad_factor = grad_divisor != nullptr ? S(1.0 / static_cast<double>(*grad_divisor)) : S(1);
    const uint32_t sr_key =
        stochastic_round_key(stochastic_round, t);
    T* param = tab.template ptr<T>(0, t);
    T* grad = tab.template ptr<T>(1, t);
    StateT* state[kSlots];
    for (int k = 0; k < kStates; ++k) state[k] = tab.template ptr<StateT>(2 + k, t);  // null: unused (uses_state)
    MasterT* master = nullptr;
    if constexpr (M != MasterKind::kNone) master = tab.template ptr<MasterT>(kMasterList, t);

    int64_t vector_end = begin;
    constexpr int kVec = Vec16<T>::kVec;
    if (M == MasterKind::kNone && all_aligned16(tab, t, kScalarList)) {
      vector_end = begin + (end - begin) / kVec * kVec;
      for (int64_t i = begin + threadIdx.x * kVec; i < vector_end; i += static_cast<int64_t>(blockDim.x) * kVec) {
        Vec16<T> pv = *reinterpret_cast<const Vec16<T>*>(param + i);
        Vec16<T> gv = *reinterpret_cast<const Vec16<T>*>(grad + i);
        Vec16<T> sv[kSlots];
        for (int k = 0; k < kStates; ++k)
          if (state[k] != nullptr) sv[k] = *reinterpret_cast<const Vec16<T>*>(state[k] + i);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          S s[kSlots];
          for (int k = 0; k < kStates; ++k) s[k] = state[k] != nullptr ? S(sv[k].v[e]) : S(0);
          element(c, grad_factor, pv.v[e], gv.v[e], s, i + e, sr_key);
          for (int k = 0; k < kStates; ++k) sv[k].v[e] = T(s[k]);
        }
        *reinterpret_cast<Vec16<T>*>(param + i) = pv;
        if (write_back_grads) *reinterpret_cast<Vec16<T>*>(grad + i) = gv;
        for (int k = 0; k < kStates; ++k)
          if (state[k] != nullptr) *reinterpret_cast<Vec16<T>*>(state[k] + i) = sv[k];
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < end; i += blockDim.x) {  // the tail and unaligned tensors
      S s[kSlots];
      for (int k = 0; k < kStates; ++k) s[k] = state[k] != nullptr ? S(state[k][i]) : S(0);
      element(c, grad_factor, param[i], grad[i], s, i, sr_key, master);
      for (int k = 0; k < kStates; ++k)
        if (state[k] != nullptr) state[k][i] = StateT(s[k]);
    }
  }
};

// One launch of the step over `a`'s lists for the master kind M (dtypes: any without a master, bf16/fp16 with a
// float32 master, bf16 with a remainder).
template <typename Op, MasterKind M>
void optim_step_lists(const OptimLaunch<typename Op::Hyper>& a) {
  constexpr int kLists = OptimFunctor<Op, float, M>::kLists;
  constexpr int kScalarList = OptimFunctor<Op, float, M>::kScalarList;
  std::array<const TensorList*, kLists> lists{};
  lists[0] = a.params;
  lists[1] = a.grads;
  for (int k = 0; k < Op::kStates; ++k) lists[2 + k] = a.states[k];  // an unused list is empty: null addresses
  lists[kScalarList] = a.scalars;
  if constexpr (M != MasterKind::kNone) lists[OptimFunctor<Op, float, M>::kMasterList] = a.masters;
  auto table = build_table<kLists>(lists);
  const bool has_scalars = !a.scalars->empty();
  if (Op::kScalar == TensorScalar::kStep && has_scalars) update_scalars(table, kScalarList, a.found_inf, 1.0f, 1.0f);
  const auto run = [&](auto typed) {
    using scalar_t = decltype(typed);
    OptimFunctor<Op, scalar_t, M> fn{a.hyper,     a.lr,        a.lr_ptr,   a.grad_divisor,    a.found_inf,
                                     a.stochastic_round, a.maximize, a.write_back_grads};
    launch(table, fn);
  };
  const at::ScalarType dtype = (*a.params)[0].scalar_type();
  if constexpr (M == MasterKind::kNone) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedopt_optim_step_cuda",
                                    [&] { run(scalar_t{}); });
  } else if constexpr (M == MasterKind::kFloat32) {
    if (dtype == at::kHalf) {
      run(at::Half{});
    } else {
      run(at::BFloat16{});  // the bindings allow bf16 and fp16 only
    }
  } else {
    run(at::BFloat16{});
  }
  if (Op::kScalar == TensorScalar::kFirstFlag && has_scalars)
    update_scalars(table, kScalarList, a.found_inf, 0.0f, 0.0f);  // the first step is done
}

template <typename Op>
void optim_step(const OptimLaunch<typename Op::Hyper>& a) {
  if (a.params->empty()) return;
  const c10::cuda::CUDAGuard guard((*a.params)[0].device());
  switch (a.master_kind) {
    case MasterKind::kNone: return optim_step_lists<Op, MasterKind::kNone>(a);
    case MasterKind::kFloat32: return optim_step_lists<Op, MasterKind::kFloat32>(a);
    case MasterKind::kRemainder: return optim_step_lists<Op, MasterKind::kRemainder>(a);
  }
}

}  // namespace fusedopt::cuda
