// Adam / AdamW on the CPU. Compiled once per ISA by cpu/capability/*.cpp (never on its own).
// adam_math is the whole update; the body and the tail of every chunk both go through it.
#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec_io.h"
#include "common/lerp.h"

#include <cmath>

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace {

template <typename S>
struct AdamCoefs {
  S beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  S weight_decay, decay_factor;  // decay_factor = 1 - lr * wd for AdamW
  S step_size, bias_correction2_sqrt, grad_factor;
  bool amsgrad, maximize, decoupled, write_back_grads;
};

// V is Vectorized<float> or Vectorized<double>; the same code runs for full and partial blocks. `grad` comes
// already divided by the grad divisor (see adam_chunk).
template <typename V, typename S>
inline void adam_math(V& param, V grad, V& exp_avg, V& exp_avg_sq, V* max_exp_avg_sq, const AdamCoefs<S>& c) {
  if (c.maximize) grad = V(S(0)) - grad;
  if (c.weight_decay != S(0)) {
    if (c.decoupled)
      param = param * V(c.decay_factor);
    else
      grad = grad + param * V(c.weight_decay);
  }
  exp_avg = fusedopt::lerp(exp_avg, grad, c.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * V(c.beta2) + grad * grad * V(c.one_minus_beta2);
  V second_moment = exp_avg_sq;
  if (max_exp_avg_sq != nullptr) {
    *max_exp_avg_sq = at::vec::maximum(*max_exp_avg_sq, exp_avg_sq);
    second_moment = *max_exp_avg_sq;
  }
  const V denom = second_moment.sqrt() / V(c.bias_correction2_sqrt) + V(c.eps);
  param = param - V(c.step_size) * exp_avg / denom;
}

template <typename T>
void adam_chunk(const AdamArgs& a, int64_t t, int64_t begin, int64_t end, const AdamCoefs<opmath_t<T>>& c) {
  using B = Block<T>;
  using V = typename B::Vec;
  auto* param = static_cast<T*>(a.param[t]);
  auto* grad = static_cast<T*>(a.grad[t]);
  auto* exp_avg = static_cast<T*>(a.exp_avg[t]);
  auto* exp_avg_sq = static_cast<T*>(a.exp_avg_sq[t]);
  auto* max_sq = c.amsgrad ? static_cast<T*>(a.max_exp_avg_sq[t]) : nullptr;
  for (int64_t i = begin; i < end; i += B::kSize) {
    const int64_t n = std::min<int64_t>(B::kSize, end - i);
    B p = B::load(param + i, n), g = B::load(grad + i, n), m = B::load(exp_avg + i, n), v = B::load(exp_avg_sq + i, n);
    B vmax;
    if (max_sq) vmax = B::load(max_sq + i, n);
    for (int k = 0; k < B::kLanes; ++k) g.lane[k] = g.lane[k] * V(c.grad_factor);
    if (c.write_back_grads) g.store(grad + i, n);  // GradScaler: .grad holds the unscaled grad, as torch's fused
    for (int k = 0; k < B::kLanes; ++k)
      adam_math(p.lane[k], g.lane[k], m.lane[k], v.lane[k], max_sq ? &vmax.lane[k] : nullptr, c);
    p.store(param + i, n);
    m.store(exp_avg + i, n);
    v.store(exp_avg_sq + i, n);
    if (max_sq) vmax.store(max_sq + i, n);
  }
}

template <typename T>
void adam_typed(const AdamArgs& a) {
  using S = opmath_t<T>;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/nan: skip, steps too
  for (float* step : a.step) *step += 1.0f;
  const double grad_factor = a.grad_divisor != nullptr ? 1.0 / static_cast<double>(*a.grad_divisor) : 1.0;
  for_each_chunk(a.numel, [&](int64_t t, int64_t begin, int64_t end) {
    // Bias corrections in double, as torch computes them, then rounded once to opmath.
    const double step = *a.step[t];
    const double bias_correction1 = 1.0 - std::pow(a.beta1, step);
    const double bias_correction2 = 1.0 - std::pow(a.beta2, step);
    AdamCoefs<S> c{};
    c.beta1 = S(a.beta1);
    c.beta2 = S(a.beta2);
    c.one_minus_beta1 = S(1.0 - a.beta1);
    c.one_minus_beta2 = S(1.0 - a.beta2);
    c.eps = S(a.eps);
    c.weight_decay = S(a.weight_decay);
    c.decay_factor = S(1.0 - a.lr * a.weight_decay);
    c.step_size = S(a.lr / bias_correction1);
    c.bias_correction2_sqrt = S(std::sqrt(bias_correction2));
    c.grad_factor = S(grad_factor);
    c.amsgrad = a.amsgrad;
    c.maximize = a.maximize;
    c.decoupled = a.decoupled_weight_decay;
    c.write_back_grads = a.write_back_grads;
    adam_chunk<T>(a, t, begin, end, c);
  });
}

}  // namespace

void adam_step(const AdamArgs& a) {
  switch (a.kind) {
    case ScalarKind::Float: return adam_typed<float>(a);
    case ScalarKind::Double: return adam_typed<double>(a);
    case ScalarKind::BFloat16: return adam_typed<c10::BFloat16>(a);
    case ScalarKind::Half: return adam_typed<c10::Half>(a);
  }
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
