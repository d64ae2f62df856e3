// SGD (momentum, dampening, Nesterov) on the CPU. Compiled once per ISA by cpu/capability/*.cpp.
// sgd_math is the whole update; the body and the tail of every chunk both go through it.
#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec_io.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace {

template <typename S>
struct SgdCoefs {
  S lr, momentum, one_minus_dampening, weight_decay, grad_factor;
  bool nesterov, maximize, write_back_grads;
};

// torch.optim.SGD's update on one opmath vector. buf is null without momentum; `first` makes the buffer a copy of
// the grad, as torch does on a buffer's first step.
template <typename V, typename S>
inline void sgd_math(V& param, V grad, V* buf, bool first, const SgdCoefs<S>& c) {
  if (c.maximize) grad = V(S(0)) - grad;
  if (c.weight_decay != S(0)) grad = grad + param * V(c.weight_decay);
  if (buf != nullptr) {
    *buf = first ? grad : *buf * V(c.momentum) + grad * V(c.one_minus_dampening);
    grad = c.nesterov ? grad + *buf * V(c.momentum) : *buf;
  }
  param = param - V(c.lr) * grad;
}

template <typename T>
void sgd_chunk(const SgdArgs& a, int64_t t, int64_t begin, int64_t end, const SgdCoefs<opmath_t<T>>& c) {
  using B = Block<T>;
  using V = typename B::Vec;
  auto* param = static_cast<T*>(a.param[t]);
  auto* grad = static_cast<T*>(a.grad[t]);
  auto* buf = a.momentum_buffer.empty() ? nullptr : static_cast<T*>(a.momentum_buffer[t]);
  const bool first = !a.first_flag.empty() && *a.first_flag[t] != 0.0f;
  for (int64_t i = begin; i < end; i += B::kSize) {
    const int64_t n = std::min<int64_t>(B::kSize, end - i);
    B p = B::load(param + i, n), g = B::load(grad + i, n);
    B mb;
    if (buf && !first) mb = B::load(buf + i, n);
    for (int k = 0; k < B::kLanes; ++k) g.lane[k] = g.lane[k] * V(c.grad_factor);
    if (c.write_back_grads) g.store(grad + i, n);  // GradScaler: .grad holds the unscaled grad
    for (int k = 0; k < B::kLanes; ++k) sgd_math(p.lane[k], g.lane[k], buf ? &mb.lane[k] : nullptr, first, c);
    p.store(param + i, n);
    if (buf) mb.store(buf + i, n);
  }
}

template <typename T>
void sgd_typed(const SgdArgs& a) {
  using S = opmath_t<T>;
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // skipped: first-step flags stay set too
  SgdCoefs<S> c{};
  c.lr = S(a.lr);
  c.momentum = S(a.momentum);
  c.one_minus_dampening = S(1.0 - a.dampening);
  c.weight_decay = S(a.weight_decay);
  c.grad_factor = S(a.grad_divisor != nullptr ? 1.0 / static_cast<double>(*a.grad_divisor) : 1.0);
  c.nesterov = a.nesterov;
  c.maximize = a.maximize;
  c.write_back_grads = a.write_back_grads;
  for_each_chunk(a.numel, [&](int64_t t, int64_t begin, int64_t end) { sgd_chunk<T>(a, t, begin, end, c); });
  for (float* flag : a.first_flag) *flag = 0.0f;  // after every chunk has read it
}

}  // namespace

void sgd_step(const SgdArgs& a) {
  switch (a.kind) {
    case ScalarKind::Float: return sgd_typed<float>(a);
    case ScalarKind::Double: return sgd_typed<double>(a);
    case ScalarKind::BFloat16: return sgd_typed<c10::BFloat16>(a);
    case ScalarKind::Half: return sgd_typed<c10::Half>(a);
  }
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
