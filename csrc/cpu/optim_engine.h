// The CPU optimizer engine: everything of a step but the math. One dtype switch, the found_inf skip and step
// increment, then one parallel pass over 32K-element chunks of every tensor (first-step flags cleared after it); per
// chunk the op's coefficients (they may depend on the tensor's step or flag), per SIMD block the loads, the grad divisor, write_back_grads, maximize,
// the op's update (common/<op>_math.h) and the stores. Body and tail run the same code (Block takes a count).
// Included only from a capability translation unit (cpu/optimizers.cpp via all_kernels.inc).
#pragma once
#include <array>

#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec_io.h"
#include "cpu/vec_ops.h"
// Math headers after vec_ops.h: their unqualified vsqrt/vsign/... calls must see the Vectorized overloads.
#include "common/optimizers.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace optim_engine {

template <typename Op, typename T>
void run_chunk(const OptimStepArgs<typename Op::Hyper>& a, int64_t t, int64_t begin, int64_t end,
               opmath_t<T> grad_factor) {
  using B = Block<T>;
  using V = typename B::Vec;
  constexpr int kStates = Op::kStates;
  constexpr int kSlots = kStates > 0 ? kStates : 1;
  const auto c = Op::template coefs<V>(a.hyper, a.lr, a.scalar.empty() ? 0.0 : static_cast<double>(*a.scalar[t]));
  auto* param = static_cast<T*>(a.param[t]);
  auto* grad = static_cast<T*>(a.grad[t]);
  std::array<T*, kSlots> state{};
  for (int k = 0; k < kStates; ++k) state[k] = a.states[k].empty() ? nullptr : static_cast<T*>(a.states[k][t]);
  for (int64_t i = begin; i < end; i += B::kSize) {
    const int64_t n = std::min<int64_t>(B::kSize, end - i);
    B p = B::load(param + i, n), g = B::load(grad + i, n);
    std::array<B, kSlots> st;
    for (int k = 0; k < kStates; ++k)
      if (state[k]) st[k] = B::load(state[k] + i, n);
    for (int l = 0; l < B::kLanes; ++l) g.lane[l] = g.lane[l] * V(grad_factor);
    if (a.write_back_grads) g.store(grad + i, n);  // GradScaler: .grad holds the unscaled grad
    for (int l = 0; l < B::kLanes; ++l) {
      std::array<V, kSlots> s;
      for (int k = 0; k < kStates; ++k) s[k] = st[k].lane[l];
      Op::template update<V>(c, p.lane[l], a.maximize ? g.lane[l].neg() : g.lane[l], s.data());
      for (int k = 0; k < kStates; ++k) st[k].lane[l] = s[k];
    }
    p.store(param + i, n);
    for (int k = 0; k < kStates; ++k)
      if (state[k]) st[k].store(state[k] + i, n);
  }
}

template <typename Op, typename T>
void run_typed(const OptimStepArgs<typename Op::Hyper>& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/nan: skip, steps too
  if constexpr (Op::kScalar == TensorScalar::kStep)
    for (float* step : a.scalar) *step += 1.0f;
  const double grad_factor = a.grad_divisor != nullptr ? 1.0 / static_cast<double>(*a.grad_divisor) : 1.0;
  for_each_chunk(a.numel, [&](int64_t t, int64_t begin, int64_t end) {
    run_chunk<Op, T>(a, t, begin, end, opmath_t<T>(grad_factor));
  });
  if constexpr (Op::kScalar == TensorScalar::kFirstFlag)
    for (float* flag : a.scalar) *flag = 0.0f;  // after every chunk has read it
}

}  // namespace optim_engine

template <typename Op>
void optim_step(const OptimStepArgs<typename Op::Hyper>& a) {
  switch (a.kind) {
    case ScalarKind::Float: return optim_engine::run_typed<Op, float>(a);
    case ScalarKind::Double: return optim_engine::run_typed<Op, double>(a);
    case ScalarKind::BFloat16: return optim_engine::run_typed<Op, c10::BFloat16>(a);
    case ScalarKind::Half: return optim_engine::run_typed<Op, c10::Half>(a);
  }
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
