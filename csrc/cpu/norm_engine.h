// The CPU engine of the two-pass optimizers (FUSEDOPT_FOR_EACH_NORM_OPTIMIZER, e.g. LAMB): everything of a step but
// the math, as cpu/optim_engine.h does for the elementwise ones. One dtype switch, the found_inf skip and step
// increment, then
//   pass 1: one parallel region over the 32K-element chunks of every tensor: loads of p, g and the states, the grad
//           divisor, maximize, Op::stage1 (Op::kNorms sums per element; nothing stored); each chunk's sums folded
//           into doubles (per 1024 elements) and kept per chunk;
//   between: each tensor's sums added in chunk order (deterministic, whatever the thread count), and
//           Op::step_size(hyper, lr, sums) per tensor, in double;
//   pass 2: one parallel region: the same loads, write_back_grads, Op::stage2 with the tensor's step size, stores
//           of p (bf16 by stochastic rounding when a.stochastic_round is set) and the states.
// Included only from a capability translation unit (cpu/norm_optimizers.cpp via all_kernels.inc).
#pragma once
#include <array>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cpu/optim_engine.h"  // store_stochastic_bf16, param_round_key
#include "cpu/vec_io.h"
#include "cpu/vec_ops.h"
// Math headers after vec_ops.h: their unqualified vsqrt/vsign/... calls must see the Vectorized overloads.
#include "common/optimizers.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace norm_engine {

constexpr int64_t kSubBlock = 1024;  // opmath vectors accumulate this many elements before a fold into double

template <typename Op>
using Sums = std::array<double, Op::kNorms>;

// Stage 1 reads p, g and the states (write_back_grads and the state stores wait for stage 2, which computes the
// same values again); stage 2 reads them again and stores p, the states and, under GradScaler, the unscaled grad.
template <typename Op, typename T, int kStage>
Sums<Op> run_chunk(const OptimStepArgs<typename Op::Hyper>& a, int64_t t, int64_t begin, int64_t end,
                   opmath_t<T> grad_factor, double step) {
  using B = Block<T>;
  using V = typename B::Vec;
  using S = opmath_t<T>;
  const auto c = Op::template coefs<V>(a.hyper, a.lr, static_cast<double>(*a.scalar[t]));
  auto* param = static_cast<T*>(a.param[t]);
  auto* grad = static_cast<T*>(a.grad[t]);
  std::array<T*, Op::kStates> state{};
  for (int k = 0; k < Op::kStates; ++k) state[k] = static_cast<T*>(a.states[k][t]);
  const uint32_t round_key = kStage == 2 ? optim_engine::param_round_key(a, t) : 0;
  Sums<Op> total{};
  for (int64_t sub = begin; sub < end; sub += kSubBlock) {
    const int64_t sub_end = std::min(end, sub + kSubBlock);
    std::array<V, Op::kNorms> acc;
    acc.fill(V(S(0)));
    for (int64_t i = sub; i < sub_end; i += B::kSize) {
      const int64_t n = std::min<int64_t>(B::kSize, sub_end - i);
      B p = B::load(param + i, n), g = B::load(grad + i, n);
      std::array<B, Op::kStates> st;
      for (int k = 0; k < Op::kStates; ++k) st[k] = B::load(state[k] + i, n);
      for (int l = 0; l < B::kLanes; ++l) g.lane[l] = g.lane[l] * V(grad_factor);
      if (kStage == 2 && a.write_back_grads) g.store(grad + i, n);  // GradScaler: .grad holds the unscaled grad
      for (int l = 0; l < B::kLanes; ++l) {
        std::array<V, Op::kStates> s;
        for (int k = 0; k < Op::kStates; ++k) s[k] = st[k].lane[l];
        const V gl = a.maximize ? g.lane[l].neg() : g.lane[l];
        if constexpr (kStage == 1) {
          std::array<V, Op::kNorms> part;
          part.fill(V(S(0)));
          Op::template stage1<V>(c, p.lane[l], gl, s.data(), part.data());
          // Lanes past the tensor's end (zero-filled loads) add nothing, whatever the math made of them.
          const int64_t valid = std::clamp<int64_t>(n - int64_t(l) * V::size(), 0, V::size());
          for (int k = 0; k < Op::kNorms; ++k) acc[k] = acc[k] + V::set(V(S(0)), part[k], valid);
        } else {
          Op::template stage2<V>(c, S(step), p.lane[l], gl, s.data());
          for (int k = 0; k < Op::kStates; ++k) st[k].lane[l] = s[k];
        }
      }
      if constexpr (kStage == 2) {
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (a.stochastic_round != nullptr) {  // bf16 stochastic rounding (common/stochastic_round.h)
            optim_engine::store_stochastic_bf16(p, param + i, n, round_key, i);
          } else {
            p.store(param + i, n);
          }
        } else {
          p.store(param + i, n);
        }
        for (int k = 0; k < Op::kStates; ++k) st[k].store(state[k] + i, n);
      }
    }
    if constexpr (kStage == 1) {
      for (int k = 0; k < Op::kNorms; ++k) {
        S lanes[V::size()];
        acc[k].store(lanes);
        for (int l = 0; l < V::size(); ++l) total[k] += static_cast<double>(lanes[l]);
      }
    }
  }
  return total;
}

template <typename Op, typename T>
void run_typed(const OptimStepArgs<typename Op::Hyper>& a) {
  using V = typename Block<T>::Vec;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/nan: skip, steps too
  if constexpr (Op::kScalar == TensorScalar::kStep)
    for (float* step : a.scalar) *step += 1.0f;
  const double grad_factor = a.grad_divisor != nullptr ? 1.0 / static_cast<double>(*a.grad_divisor) : 1.0;
  const std::vector<Chunk> chunks = split_into_chunks(a.numel);
  const auto n_chunks = static_cast<int64_t>(chunks.size());
  std::vector<Sums<Op>> partial(chunks.size());
  at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      partial[i] = run_chunk<Op, T, 1>(a, chunks[i].tensor, chunks[i].begin, chunks[i].end, opmath_t<T>(grad_factor),
                                       0.0);
  });
  // The chunks of a tensor are consecutive: its sums in chunk order, then its step size.
  std::vector<double> step(a.numel.size(), 0.0);
  for (int64_t i = 0; i < n_chunks;) {
    const int64_t t = chunks[i].tensor;
    Sums<Op> sums{};
    for (; i < n_chunks && chunks[i].tensor == t; ++i)
      for (int k = 0; k < Op::kNorms; ++k) sums[k] += partial[i][k];
    step[t] = Op::template step_size<V>(a.hyper, a.lr, sums.data());
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      run_chunk<Op, T, 2>(a, chunks[i].tensor, chunks[i].begin, chunks[i].end, opmath_t<T>(grad_factor),
                          step[chunks[i].tensor]);
  });
}

}  // namespace norm_engine

template <typename Op>
void norm_optim_step(const OptimStepArgs<typename Op::Hyper>& a) {
  switch (a.kind) {
    case ScalarKind::Float: return norm_engine::run_typed<Op, float>(a);
    case ScalarKind::Double: return norm_engine::run_typed<Op, double>(a);
    case ScalarKind::BFloat16: return norm_engine::run_typed<Op, c10::BFloat16>(a);
    case ScalarKind::Half: return norm_engine::run_typed<Op, c10::Half>(a);
  }
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
