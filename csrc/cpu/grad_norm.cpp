// The fused grad norm (one read of every grad of a group) and the fused grad scaling of clip_grad_norm_, on the
// CPU. Compiled once per ISA by cpu/capability/*.cpp (never on its own).
#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec_io.h"

#include <cmath>
#include <limits>

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace {

// Within a chunk, opmath vectors accumulate this many elements before they are folded into a double, so a
// float32 sum never runs long enough to lose the precision torch's reduction keeps.
constexpr int64_t kSubBlock = 1024;

// One element's contribution to the norm: |x|, |x|^2, |x|^p, or |x| kept by a NaN-propagating max (inf norm).
template <NormKind K, typename V, typename S>
inline V norm_accumulate(V acc, V x, S p) {
  const V a = x.abs();
  if constexpr (K == NormKind::One) return acc + a;
  if constexpr (K == NormKind::Two) return acc + a * a;
  if constexpr (K == NormKind::P) return acc + a.pow(V(p));
  if constexpr (K == NormKind::Inf) return at::vec::maximum(acc, a);
}

inline double norm_combine(NormKind kind, double a, double b) {
  if (kind != NormKind::Inf) return a + b;
  return (std::isnan(a) || a > b) ? a : b;  // max that keeps NaN, as torch's amax does
}

template <typename T, NormKind K>
double norm_chunk(const T* x, int64_t begin, int64_t end, double p) {
  using B = Block<T>;
  using V = typename B::Vec;
  using S = opmath_t<T>;
  double total = 0.0;
  for (int64_t sub = begin; sub < end; sub += kSubBlock) {
    const int64_t sub_end = std::min(end, sub + kSubBlock);
    V acc(S(0));
    for (int64_t i = sub; i < sub_end; i += B::kSize) {
      const B b = B::load(x + i, std::min<int64_t>(B::kSize, sub_end - i));  // zero-filled tail adds nothing
      for (int k = 0; k < B::kLanes; ++k) acc = norm_accumulate<K>(acc, b.lane[k], S(p));
    }
    S lanes[V::size()];
    acc.store(lanes);
    for (int l = 0; l < V::size(); ++l) total = norm_combine(K, total, static_cast<double>(lanes[l]));
  }
  return total;
}

template <typename T, NormKind K>
double grad_norm_typed(const GradNormArgs& a) {
  // Partial results per chunk, combined in chunk order: the same bits whatever the thread count.
  return reduce_chunks(a.numel, 0.0, [&](int64_t t, int64_t begin, int64_t end) {
    return norm_chunk<T, K>(static_cast<const T*>(a.data[t]), begin, end, a.p);
  }, [&](double x, double y) { return norm_combine(K, x, y); });
}

template <typename T>
double grad_norm_kind(const GradNormArgs& a) {
  switch (a.norm) {
    case NormKind::One: return grad_norm_typed<T, NormKind::One>(a);
    case NormKind::Two: return grad_norm_typed<T, NormKind::Two>(a);
    case NormKind::P: return grad_norm_typed<T, NormKind::P>(a);
    case NormKind::Inf: return grad_norm_typed<T, NormKind::Inf>(a);
  }
  return 0.0;
}

template <typename T>
void scale_typed(const ScaleArgs& a) {
  using B = Block<T>;
  using S = opmath_t<T>;
  const S coef = S(a.coef);
  for_each_chunk(a.numel, [&](int64_t t, int64_t begin, int64_t end) {
    auto* x = static_cast<T*>(a.data[t]);
    for (int64_t i = begin; i < end; i += B::kSize) {
      const int64_t n = std::min<int64_t>(B::kSize, end - i);
      B b = B::load(x + i, n);
      for (int k = 0; k < B::kLanes; ++k) b.lane[k] = b.lane[k] * typename B::Vec(coef);
      b.store(x + i, n);
    }
  });
}

}  // namespace

double grad_norm_power_sum(const GradNormArgs& a) {
  switch (a.kind) {
    case ScalarKind::Float: return grad_norm_kind<float>(a);
    case ScalarKind::Double: return grad_norm_kind<double>(a);
    case ScalarKind::BFloat16: return grad_norm_kind<c10::BFloat16>(a);
    case ScalarKind::Half: return grad_norm_kind<c10::Half>(a);
  }
  return 0.0;
}

void scale_tensors(const ScaleArgs& a) {
  switch (a.kind) {
    case ScalarKind::Float: return scale_typed<float>(a);
    case ScalarKind::Double: return scale_typed<double>(a);
    case ScalarKind::BFloat16: return scale_typed<c10::BFloat16>(a);
    case ScalarKind::Half: return scale_typed<c10::Half>(a);
  }
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
