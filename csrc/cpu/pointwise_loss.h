// The CPU engine of the pointwise losses: one parallel region over 32K-element chunks; each chunk reads input,
// target (and weights) once, writes the loss or adds it to a chunk partial, and writes the gradient in the same
// pass. Chunk partials are added in chunk order, so the sum does not depend on the thread count.
// Included only from a kernel .cpp inside namespace fusedopt::cpu::CPU_CAPABILITY.
#pragma once
#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec_io.h"

#include <limits>

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace pointwise {

// log(1 + y) from one log: Goldberg's correction y / ((1 + y) - 1) undoes the rounding of 1 + y, so the result is
// within a few ulps of log1p. Sleef's log1p is about three times slower than its log.
template <typename V>
inline V log1p_via_log(V y) {
  const V one(typename V::value_type(1));
  const V u = one + y;
  return V::blendv(u.log() * (y / (u - one)), y, u == one);
}

// Elements of lane `lane` that belong to a block of `count` valid elements.
template <typename V>
inline int64_t lane_count(int64_t count, int lane) {
  return std::clamp<int64_t>(count - lane * V::size(), 0, V::size());
}

// Math: `static constexpr bool kCheckRange` (BCE's [0, 1] check on input and target) and
// `void operator()(V x, V t, const V* pos_weight, V& loss, V& dloss) const` for one opmath vector.
template <typename T, typename Math>
PointwiseLossResult run(const PointwiseLossArgs& a, const Math& math) {
  using B = Block<T>;
  using S = opmath_t<T>;
  using V = typename B::Vec;
  const int64_t n = a.numel;
  const int64_t num_chunks = (n + kChunkElems - 1) / kChunkElems;
  std::vector<double> partial(num_chunks, 0.0);
  std::vector<int> chunk_flags(num_chunks, 0);
  const auto* in = static_cast<const T*>(a.input);
  const auto* tg = static_cast<const T*>(a.target);
  const auto* w = static_cast<const T*>(a.weight);
  const auto* pw = static_cast<const T*>(a.pos_weight);
  auto* loss_out = static_cast<T*>(a.loss);
  auto* grad_out = static_cast<T*>(a.grad);
  const bool reduce = loss_out == nullptr;
  const V scale(static_cast<S>(a.scale));

  at::parallel_for(0, num_chunks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const int64_t begin = c * kChunkElems, end = std::min(n, begin + kChunkElems);
      std::array<V, B::kLanes> acc;
      acc.fill(V(S(0)));
      V min_x(std::numeric_limits<S>::infinity()), max_x(-std::numeric_limits<S>::infinity());
      V min_t = min_x, max_t = max_x;
      // Weights repeat with their period: walk segments on which weight[i % period] is contiguous.
      int64_t jw = w ? begin % a.weight_period : 0, jp = pw ? begin % a.pos_weight_period : 0;
      for (int64_t seg = begin; seg < end;) {
        int64_t seg_end = end;
        if (w) seg_end = std::min(seg_end, seg + (a.weight_period - jw));
        if (pw) seg_end = std::min(seg_end, seg + (a.pos_weight_period - jp));
        for (int64_t i = seg; i < seg_end; i += B::kSize) {
          const int64_t cnt = std::min<int64_t>(B::kSize, seg_end - i);
          const B x = B::load(in + i, cnt), t = B::load(tg + i, cnt);
          B wv, pv, lv, dv;
          if (w) wv = B::load(w + jw + (i - seg), cnt);
          if (pw) pv = B::load(pw + jp + (i - seg), cnt);
          for (int k = 0; k < B::kLanes; ++k) {
            math(x.lane[k], t.lane[k], pw ? &pv.lane[k] : nullptr, lv.lane[k], dv.lane[k]);
            if (w) {
              lv.lane[k] = lv.lane[k] * wv.lane[k];
              dv.lane[k] = dv.lane[k] * wv.lane[k];
            }
            if (reduce) {  // padding lanes of a partial block must not add to the sum
              acc[k] = acc[k] + (cnt == B::kSize ? lv.lane[k] : V::set(V(S(0)), lv.lane[k], lane_count<V>(cnt, k)));
            }
            if constexpr (Math::kCheckRange) {  // padding lanes hold 0, inside [0, 1]; NaN propagates
              min_x = at::vec::minimum(min_x, x.lane[k]);
              max_x = at::vec::maximum(max_x, x.lane[k]);
              min_t = at::vec::minimum(min_t, t.lane[k]);
              max_t = at::vec::maximum(max_t, t.lane[k]);
            }
            dv.lane[k] = dv.lane[k] * scale;
          }
          if (!reduce) lv.store(loss_out + i, cnt);
          if (grad_out) dv.store(grad_out + i, cnt);
        }
        if (w) jw = (jw + (seg_end - seg)) % a.weight_period;
        if (pw) jp = (jp + (seg_end - seg)) % a.pos_weight_period;
        seg = seg_end;
      }
      if (reduce) {
        S lanes[V::size()];
        double sum = 0.0;
        for (int k = 0; k < B::kLanes; ++k) {
          acc[k].store(lanes);
          for (int l = 0; l < V::size(); ++l) sum += static_cast<double>(lanes[l]);
        }
        partial[c] = sum;
      }
      if constexpr (Math::kCheckRange) {
        S lo_x[V::size()], hi_x[V::size()], lo_t[V::size()], hi_t[V::size()];
        min_x.store(lo_x);
        max_x.store(hi_x);
        min_t.store(lo_t);
        max_t.store(hi_t);
        int f = 0;
        for (int l = 0; l < V::size(); ++l) {
          if (!(lo_x[l] >= S(0) && hi_x[l] <= S(1))) f |= 1;
          if (!(lo_t[l] >= S(0) && hi_t[l] <= S(1))) f |= 2;
        }
        chunk_flags[c] = f;
      }
    }
  });
  PointwiseLossResult r;
  for (int64_t c = 0; c < num_chunks; ++c) {
    r.sum += partial[c];
    r.flags |= chunk_flags[c];
  }
  return r;
}

template <template <typename> class Math>
PointwiseLossResult dispatch(const PointwiseLossArgs& a) {
  switch (a.kind) {
    case ScalarKind::Float: return run<float>(a, Math<at::vec::Vectorized<float>>{});
    case ScalarKind::Double: return run<double>(a, Math<at::vec::Vectorized<double>>{});
    case ScalarKind::BFloat16: return run<c10::BFloat16>(a, Math<at::vec::Vectorized<float>>{});
    case ScalarKind::Half: return run<c10::Half>(a, Math<at::vec::Vectorized<float>>{});
  }
  return {};
}

}  // namespace pointwise
}  // namespace fusedopt::cpu::CPU_CAPABILITY
