// The CPU optimizer engine: everything of a step but the math. One dtype switch, the found_inf skip and step
// increment, then one parallel pass over 32K-element chunks of every tensor (first-step flags cleared after it); per
// chunk the op's coefficients (they may depend on the tensor's step or flag), per SIMD block the loads, the grad
// divisor, write_back_grads, maximize, the op's update (common/<op>_math.h) and the stores (bf16 params by stochastic
// rounding when asked). Body and tail run the same code (Block takes a count).
// Included only from a capability translation unit (cpu/optimizers.cpp via all_kernels.inc).
#pragma once
#include <array>
#include <cstring>

#include "common/master_bits.h"
#include "common/stochastic_round.h"
#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec_io.h"
#include "cpu/vec_ops.h"
// Math headers after vec_ops.h: their unqualified vsqrt/vsign/... calls must see the Vectorized overloads.
#include "common/optimizers.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace optim_engine {

template <typename Op>
constexpr int kSlots = Op::kStates > 0 ? Op::kStates : 1;

// A block of bf16 params stored by stochastic rounding (common/stochastic_round.h); `first` is the index of
// dst[0] in its tensor.
template <typename B>
void store_stochastic_bf16(const B& block, c10::BFloat16* dst, int64_t count, uint32_t key, int64_t first) {
  float values[B::kSize];
  for (int l = 0; l < B::kLanes; ++l) block.lane[l].store(values + l * B::Vec::size());
  for (int64_t j = 0; j < count; ++j) {
    uint32_t bits;
    std::memcpy(&bits, &values[j], sizeof(bits));
    dst[j] = c10::BFloat16(stochastic_round_bf16_bits(bits, key, first + j), c10::BFloat16::from_bits());
  }
}

// The stochastic-rounding key of tensor t (0 when the step rounds to nearest).
template <typename Hyper>
uint32_t param_round_key(const OptimStepArgs<Hyper>& a, int64_t t) {
  return stochastic_round_key(a.stochastic_round, t);
}

// A 16-bit param's exact value in the master-weight modes (common/master_bits.h), at element 0 of the range; both
// null: the param itself.
struct MasterPtrs {
  float* fp32 = nullptr;
  int16_t* remainder = nullptr;
};

template <typename T>
constexpr bool kTakesMaster = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// The block of params in opmath: from the float32 master (the param where it no longer is the master rounded), the
// bf16 param joined with its remainder, or the params.
template <typename B, typename T>
B load_param(const T* param, const MasterPtrs& master, int64_t count) {
  if constexpr (kTakesMaster<T>) {
    if (master.fp32 != nullptr) {  // the master, or the param where it was changed outside the optimizer
      float values[B::kSize] = {};
      for (int64_t j = 0; j < count; ++j) {
        const float m = master.fp32[j], p = static_cast<float>(param[j]);
        values[j] = param_left_master(param[j].x, T(m).x, p != p, m) ? p : m;
      }
      return B::load_opmath(values, count);
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (master.remainder != nullptr) {
        float joined[B::kSize] = {};
        for (int64_t j = 0; j < count; ++j) {
          const uint32_t bits = join_master_bits(param[j].x, master.remainder[j]);
          std::memcpy(&joined[j], &bits, sizeof(bits));
        }
        return B::load_opmath(joined, count);
      }
    }
  }
  return B::load(param, count);
}

// The updated block: to the master and the param rounded to nearest; split into param and remainder; or to the
// param (bf16 by stochastic rounding when asked: `first` is the index of param[0] in its tensor).
template <typename B, typename T, typename Hyper>
void store_param(const OptimStepArgs<Hyper>& a, const B& p, T* param, const MasterPtrs& master, int64_t count,
                 int64_t first, uint32_t round_key) {
  if constexpr (kTakesMaster<T>) {
    if (master.fp32 != nullptr) {
      p.store_opmath(master.fp32, count);
      return p.store(param, count);
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (master.remainder != nullptr) {
        float values[B::kSize];
        p.store_opmath(values, count);
        for (int64_t j = 0; j < count; ++j) {
          uint32_t bits;
          std::memcpy(&bits, &values[j], sizeof(bits));
          uint16_t high;
          split_master_bits(bits, high, master.remainder[j]);
          param[j] = c10::BFloat16(high, c10::BFloat16::from_bits());
        }
        return;
      }
      if (a.stochastic_round != nullptr) return store_stochastic_bf16(p, param, count, round_key, first);
    }
  }
  p.store(param, count);
}

template <typename Op, typename T>
auto chunk_coefs(const OptimStepArgs<typename Op::Hyper>& a, int64_t t) {
  using V = typename Block<T>::Vec;
  return Op::template coefs<V>(a.hyper, a.lr, a.scalar.empty() ? 0.0 : static_cast<double>(*a.scalar[t]));
}

// n elements from param, grad and the states (each null: unused); param[0] is element `first` of its tensor, and
// `round_key` its stochastic-rounding key (a.stochastic_round set). S is the state storage: T, or opmath_t<T> for
// the dequantized block of a low-bit state (cpu/optim_engine_q8.h); only the state loads and stores depend on it.
template <typename Op, typename T, typename S, typename C>
void run_range(const OptimStepArgs<typename Op::Hyper>& a, const C& c, T* param, T* grad,
               const std::array<S*, kSlots<Op>>& state, int64_t n, opmath_t<T> grad_factor, int64_t first,
               uint32_t round_key, const MasterPtrs& master = {}) {
  using B = Block<T>;
  using V = typename B::Vec;
  constexpr int kStates = Op::kStates;
  for (int64_t i = 0; i < n; i += B::kSize) {
    const int64_t m = std::min<int64_t>(B::kSize, n - i);
    const MasterPtrs at{master.fp32 ? master.fp32 + i : nullptr, master.remainder ? master.remainder + i : nullptr};
    B p = load_param<B>(param + i, at, m), g = B::load(grad + i, m);
    std::array<B, kSlots<Op>> st;
    for (int k = 0; k < kStates; ++k) {
      if (!state[k]) continue;
      if constexpr (std::is_same_v<S, T>)
        st[k] = B::load(state[k] + i, m);
      else
        st[k] = B::load_opmath(state[k] + i, m);
    }
    for (int l = 0; l < B::kLanes; ++l) g.lane[l] = g.lane[l] * V(grad_factor);
    if (a.write_back_grads) g.store(grad + i, m);  // GradScaler: .grad holds the unscaled grad
    for (int l = 0; l < B::kLanes; ++l) {
      std::array<V, kSlots<Op>> s;
      for (int k = 0; k < kStates; ++k) s[k] = st[k].lane[l];
      Op::template update<V>(c, p.lane[l], a.maximize ? g.lane[l].neg() : g.lane[l], s.data());
      for (int k = 0; k < kStates; ++k) st[k].lane[l] = s[k];
    }
    store_param(a, p, param + i, at, m, first + i, round_key);
    for (int k = 0; k < kStates; ++k) {
      if (!state[k]) continue;
      if constexpr (std::is_same_v<S, T>)
        st[k].store(state[k] + i, m);
      else
        st[k].store_opmath(state[k] + i, m);
    }
  }
}

// Tensor t's master at element `first` (both null without master weights).
template <typename Hyper>
MasterPtrs master_at(const OptimStepArgs<Hyper>& a, int64_t t, int64_t first) {
  MasterPtrs master;
  if (a.master_kind == MasterKind::kFloat32) master.fp32 = static_cast<float*>(a.master[t]) + first;
  if (a.master_kind == MasterKind::kRemainder) master.remainder = static_cast<int16_t*>(a.master[t]) + first;
  return master;
}

// The master-weight modes: states in opmath (float32), the param's value from its master (common/master_bits.h).
template <typename Op, typename T>
void run_chunk_master(const OptimStepArgs<typename Op::Hyper>& a, int64_t t, int64_t begin, int64_t end,
                      opmath_t<T> grad_factor) {
  std::array<opmath_t<T>*, kSlots<Op>> state{};
  for (int k = 0; k < Op::kStates; ++k)
    state[k] = a.states[k].empty() ? nullptr : static_cast<opmath_t<T>*>(a.states[k][t]) + begin;
  run_range<Op, T, opmath_t<T>>(a, chunk_coefs<Op, T>(a, t), static_cast<T*>(a.param[t]) + begin,
                                static_cast<T*>(a.grad[t]) + begin, state, end - begin, grad_factor, begin, 0,
                                master_at(a, t, begin));
}

template <typename Op, typename T>
void run_chunk(const OptimStepArgs<typename Op::Hyper>& a, int64_t t, int64_t begin, int64_t end,
               opmath_t<T> grad_factor) {
  if constexpr (kTakesMaster<T>) {
    if (a.master_kind != MasterKind::kNone) return run_chunk_master<Op, T>(a, t, begin, end, grad_factor);
  }
  std::array<T*, kSlots<Op>> state{};
  for (int k = 0; k < Op::kStates; ++k)
    state[k] = a.states[k].empty() ? nullptr : static_cast<T*>(a.states[k][t]) + begin;
  run_range<Op, T, T>(a, chunk_coefs<Op, T>(a, t), static_cast<T*>(a.param[t]) + begin,
                      static_cast<T*>(a.grad[t]) + begin, state, end - begin, grad_factor, begin,
                      param_round_key(a, t));
}

}  // namespace optim_engine
}  // namespace fusedopt::cpu::CPU_CAPABILITY

#include "cpu/optim_engine_q8.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace optim_engine {

template <typename Op, typename T>
void run_typed(const OptimStepArgs<typename Op::Hyper>& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/nan: skip, steps too
  if constexpr (Op::kScalar == TensorScalar::kStep)
    for (float* step : a.scalar) *step += 1.0f;
  const double grad_factor = a.grad_divisor != nullptr ? 1.0 / static_cast<double>(*a.grad_divisor) : 1.0;
  for_each_chunk(a.numel, [&](int64_t t, int64_t begin, int64_t end) {
    if constexpr (!std::is_same_v<T, double>) {
      if (!a.absmax.empty()) return run_chunk_q8<Op, T>(a, t, begin, end, opmath_t<T>(grad_factor));
    }
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
