// RMSprop on the CPU. Compiled once per ISA by cpu/capability/*.cpp (never on its own).
// rmsprop_math is the whole update; the body and the tail of every chunk both go through it.
#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec_io.h"
#include "common/lerp.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace {

template <typename S>
struct RmspropCoefs {
  S lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_factor;
  bool centered, use_momentum, maximize, write_back_grads;
};

// torch.optim.RMSprop's update (single-tensor form) on one opmath vector; grad_avg / buf are null when unused.
template <typename V, typename S>
inline void rmsprop_math(V& param, V grad, V& square_avg, V* grad_avg, V* buf, const RmspropCoefs<S>& c) {
  if (c.maximize) grad = V(S(0)) - grad;
  if (c.weight_decay != S(0)) grad = grad + param * V(c.weight_decay);
  square_avg = square_avg * V(c.alpha) + grad * grad * V(c.one_minus_alpha);
  V avg;
  if (grad_avg != nullptr) {
    *grad_avg = fusedopt::lerp(*grad_avg, grad, c.one_minus_alpha);
    // One rounding, as torch's addcmul: an overflowing grad_avg^2 must not turn inf - inf into NaN.
    avg = at::vec::fmadd(V(S(0)) - *grad_avg, *grad_avg, square_avg).sqrt() + V(c.eps);
  } else {
    avg = square_avg.sqrt() + V(c.eps);
  }
  if (buf != nullptr) {
    *buf = *buf * V(c.momentum) + grad / avg;
    param = param - V(c.lr) * *buf;
  } else {
    param = param - V(c.lr) * (grad / avg);
  }
}

template <typename T>
void rmsprop_chunk(const RmspropArgs& a, int64_t t, int64_t begin, int64_t end, const RmspropCoefs<opmath_t<T>>& c) {
  using B = Block<T>;
  using V = typename B::Vec;
  auto* param = static_cast<T*>(a.param[t]);
  auto* grad = static_cast<T*>(a.grad[t]);
  auto* square_avg = static_cast<T*>(a.square_avg[t]);
  auto* grad_avg = c.centered ? static_cast<T*>(a.grad_avg[t]) : nullptr;
  auto* buf = c.use_momentum ? static_cast<T*>(a.momentum_buffer[t]) : nullptr;
  for (int64_t i = begin; i < end; i += B::kSize) {
    const int64_t n = std::min<int64_t>(B::kSize, end - i);
    B p = B::load(param + i, n), g = B::load(grad + i, n), v = B::load(square_avg + i, n);
    B ga, mb;
    if (grad_avg) ga = B::load(grad_avg + i, n);
    if (buf) mb = B::load(buf + i, n);
    for (int k = 0; k < B::kLanes; ++k) g.lane[k] = g.lane[k] * V(c.grad_factor);
    if (c.write_back_grads) g.store(grad + i, n);  // GradScaler: .grad holds the unscaled grad
    for (int k = 0; k < B::kLanes; ++k)
      rmsprop_math(p.lane[k], g.lane[k], v.lane[k], grad_avg ? &ga.lane[k] : nullptr, buf ? &mb.lane[k] : nullptr, c);
    p.store(param + i, n);
    v.store(square_avg + i, n);
    if (grad_avg) ga.store(grad_avg + i, n);
    if (buf) mb.store(buf + i, n);
  }
}

template <typename T>
void rmsprop_typed(const RmspropArgs& a) {
  using S = opmath_t<T>;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/nan: skip, steps too
  for (float* step : a.step) *step += 1.0f;
  RmspropCoefs<S> c{};
  c.lr = S(a.lr);
  c.alpha = S(a.alpha);
  c.one_minus_alpha = S(1.0 - a.alpha);
  c.eps = S(a.eps);
  c.weight_decay = S(a.weight_decay);
  c.momentum = S(a.momentum);
  c.grad_factor = S(a.grad_divisor != nullptr ? 1.0 / static_cast<double>(*a.grad_divisor) : 1.0);
  c.centered = a.centered;
  c.use_momentum = a.momentum > 0.0;
  c.maximize = a.maximize;
  c.write_back_grads = a.write_back_grads;
  for_each_chunk(a.numel, [&](int64_t t, int64_t begin, int64_t end) { rmsprop_chunk<T>(a, t, begin, end, c); });
}

}  // namespace

void rmsprop_step(const RmspropArgs& a) {
  switch (a.kind) {
    case ScalarKind::Float: return rmsprop_typed<float>(a);
    case ScalarKind::Double: return rmsprop_typed<double>(a);
    case ScalarKind::BFloat16: return rmsprop_typed<c10::BFloat16>(a);
    case ScalarKind::Half: return rmsprop_typed<c10::Half>(a);
  }
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
