// Cross-entropy rows on the CPU. Compiled once per ISA by cpu/capability/*.cpp (never on its own).
// Rows handed out to threads in chunks. Pass 1 reads the row from memory once: an online max and sum of exp
// (a rescale only when a lane's max grows, so about one exp per element), plus the target terms. The row then sits
// in L2 (32000 fp32 = 125 KiB), and the gradient is written from it (see three_pass in ce_row).
// The math is fusedopt/reference.py's.
#include "cpu/kernels.h"
#include "cpu/vec_io.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace {

template <typename S>
struct CeConsts {
  S one_minus_ls, ls_over_c, z_loss, cap, inv_cap, weight_sum;
  bool smoothing, softcap;
};

template <typename V>
inline V fast_exp(const V& v) {  // exp_u20: fp32 exp within 20 ulp, several times cheaper than Sleef's
  if constexpr (std::is_same_v<V, at::vec::Vectorized<float>>)
    return v.exp_u20();
  else
    return v.exp();
}

// v's first `count` lanes, `fill` in the others: a row's tail.
template <typename V, typename S>
inline V keep_first(const V& v, int64_t count, S fill) {
  if (count >= V::size()) return v;
  if (count <= 0) return V(fill);
  return V::set(V(fill), v, count);
}

// `count` opmath values (weights) from ptr, zeros after; V(1) without weights.
template <typename V, typename S>
inline V load_weight(const S* ptr, int64_t count) {
  if (ptr == nullptr) return V(S(1));
  if (count <= 0) return V(S(0));
  return V::loadu(ptr, std::min<int64_t>(count, V::size()));
}

template <typename V, typename S>
inline V softcap_v(const V& x, const CeConsts<S>& k) {
  return k.softcap ? V(k.cap) * (x * V(k.inv_cap)).tanh() : x;
}

template <typename S>
inline S softcap_s(S x, const CeConsts<S>& k) {
  return k.softcap ? k.cap * std::tanh(x * k.inv_cap) : x;
}

// q_c of reference.py for one vector: the smoothing share ls/C * w_c (class indices; the target's own share is added
// separately), or w_c * ((1 - ls) * y_c + ls/C) (probabilities).
template <bool kProb, typename V, typename S>
inline V target_weights(const V& w, const V& y, const CeConsts<S>& k) {
  if constexpr (kProb)
    return w * (y * V(k.one_minus_ls) + V(k.ls_over_c));
  else
    return w * V(k.ls_over_c);
}

template <typename T>
Block<T> zero_block() {
  Block<T> b;
  for (auto& lane : b.lane) lane = typename Block<T>::Vec(opmath_t<T>(0));
  return b;
}

template <typename T>
void fill_row(T* g, int64_t n, float value) {
  std::fill(g, g + n, static_cast<T>(value));
}

template <typename T, bool kProb>
void ce_row(const CrossEntropyArgs& a, const CeConsts<opmath_t<T>>& k, int64_t r, std::atomic<int64_t>& first_bad) {
  using S = opmath_t<T>;
  using B = Block<T>;
  using V = typename B::Vec;
  constexpr int kUnroll = 4;
  constexpr int64_t kLaneSize = V::size();
  const S neg_inf = -std::numeric_limits<S>::infinity();
  const S nan = std::numeric_limits<S>::quiet_NaN();
  const int64_t C = a.classes;
  const T* x = static_cast<const T*>(a.logits) + r * C;
  const T* y = kProb ? static_cast<const T*>(a.target_prob) + r * C : nullptr;
  const S* w = static_cast<const S*>(a.weight);
  T* g = a.grad != nullptr ? static_cast<T*>(a.grad) + r * C : nullptr;
  S& loss = static_cast<S*>(a.loss)[r];
  S& lse_out = static_cast<S*>(a.lse)[r];

  int64_t t = 0;
  S w_t = 1, z_t = 0;
  if constexpr (!kProb) {
    t = a.target_index[r];
    if (t == a.ignore_index) {  // contributes nothing: the row is never read
      loss = 0;
      lse_out = 0;
      if (g) fill_row(g, C, 0.0f);
      return;
    }
    if (t < 0 || t >= C) {  // reported by the caller; NaN so that nothing downstream looks valid
      int64_t prev = first_bad.load();
      while (r < prev && !first_bad.compare_exchange_weak(prev, r)) {
      }
      loss = nan;
      lse_out = nan;
      if (g) fill_row(g, C, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    if (w) w_t = w[t];
    z_t = softcap_s(static_cast<S>(x[t]), k);  // read before pass 2, which may overwrite x (in-place mode)
  }

  // Pass 1: per-lane running max m and sum s of exp(z - m); sums for the target terms. Full groups take the
  // unmasked path, the row's last group the masked one; both are this one function.
  // With a gradient and no softcap, pass 1 takes only the max, pass 2 stores exp(z - max) in opmath (into the
  // gradient row itself for fp32/fp64, else into a per-thread row buffer) and sums it, and pass 3 rescales it in
  // cache into the gradient: one exp per element, not two.
  const bool three_pass = g != nullptr && !k.softcap;
  thread_local std::vector<S> scratch;  // plain scalars: std::vector does not honour AVX-512 vector alignment
  S* exps = nullptr;
  if (three_pass) {
    if constexpr (std::is_same_v<T, S>) {
      exps = g;
    } else {
      if (static_cast<int64_t>(scratch.size()) < C) scratch.resize(static_cast<size_t>(C));
      exps = scratch.data();
    }
  }
  // m_safe is m with -inf lanes at 0; the rescale is skipped for groups that raise no lane's max (most of them).
  // The target sums are kept relative to the max too, as sums of q (z - shift) with shift = m (0 while m is -inf),
  // moved by W (new shift - old shift) when a lane's max grows (W: the q seen so far): lse - z = log(sum) - (z - max)
  // keeps its precision where lse = max + log(sum) would round log(sum) away (a large max: 1e30, or 1e4 in fp32).
  V m(neg_inf), m_safe(S(0)), s(S(0)), shift(S(0)), acc_w(S(0)), acc_wz(S(0));
  const bool target_sums = kProb || k.smoothing;
  constexpr int kAllLanes = static_cast<int>((int64_t{1} << kLaneSize) - 1);
  auto group = [&](int64_t i, auto tail_tag) {
    constexpr bool kTail = decltype(tail_tag)::value;
    constexpr int kVecs = kUnroll * B::kLanes;
    V z[kVecs], q[kVecs];  // q: per-class target weights (probabilities) or class weights (smoothing), 0 past the end
    int64_t count[kVecs];  // valid lanes of each vector (the tail only)
    for (int b = 0; b < kUnroll; ++b) {
      const int64_t off = i + b * B::kSize;
      const int64_t n = kTail ? std::clamp<int64_t>(C - off, 0, B::kSize) : B::kSize;
      B xb = zero_block<T>(), yb = zero_block<T>();
      if (!kTail || n > 0) xb = B::load(x + off, n);
      if constexpr (kProb) {
        if (!kTail || n > 0) yb = B::load(y + off, n);
      }
      for (int l = 0; l < B::kLanes; ++l) {
        const int j = b * B::kLanes + l;
        const int64_t nl = kTail ? n - l * kLaneSize : kLaneSize;
        count[j] = nl;
        const V zl = softcap_v(xb.lane[l], k);
        if (target_sums) {
          const V wl = load_weight<V>(w ? w + off + l * kLaneSize : w, nl);
          V ql;
          if constexpr (kProb)
            ql = target_weights<true>(wl, yb.lane[l], k);
          else
            ql = wl;
          q[j] = kTail ? keep_first(ql, nl, S(0)) : ql;
        }
        z[j] = kTail ? keep_first(zl, nl, neg_inf) : zl;  // -inf past the end: no effect
      }
    }
    V group_max = z[0];
    for (int j = 1; j < kVecs; ++j) group_max = at::vec::maximum(group_max, z[j]);  // NaN-propagating
    const V m_new = at::vec::maximum(m, group_max);
    if (target_sums) {
      const V shift_new = V::blendv(m_new, V(S(0)), m_new == V(neg_inf));
      V acc = acc_wz - acc_w * (shift_new - shift), w_seen = acc_w;
      for (int j = 0; j < kVecs; ++j) {
        V term = q[j] * (z[j] - shift_new);
        if (kTail) term = keep_first(term, count[j], S(0));  // past the end: 0 * -inf
        acc = acc + term;
        w_seen = w_seen + q[j];
      }
      acc_wz = acc;
      acc_w = w_seen;
      shift = shift_new;
    }
    if (three_pass) {
      m = m_new;
      return;
    }
    if ((m_new != m).zero_mask() != kAllLanes) {  // some lane's max grew (or is NaN): rescale its sum
      m_safe = V::blendv(m_new, V(S(0)), m_new == V(neg_inf));  // a lane of only -inf so far: exp(-inf) = 0
      s = s * fast_exp(m - m_safe);
      m = m_new;
    }
    V sum = s;
    for (const V& zv : z) sum = sum + fast_exp(zv - m_safe);
    s = sum;
  };
  constexpr int64_t kGroup = kUnroll * B::kSize;
  int64_t i = 0;
  for (; i + kGroup <= C; i += kGroup) group(i, std::false_type{});
  if (i < C) group(i, std::true_type{});

  // Combine the lanes.
  alignas(64) S ms[kLaneSize], ss[kLaneSize], shifts[kLaneSize], ws[kLaneSize], wzs[kLaneSize];
  m.store(ms);
  s.store(ss);
  shift.store(shifts);
  acc_w.store(ws);
  acc_wz.store(wzs);
  S row_max = neg_inf;
  bool has_nan = false;
  for (int64_t l = 0; l < kLaneSize; ++l) {
    has_nan |= std::isnan(ms[l]);
    row_max = std::max(row_max, ms[l]);
  }
  const S max_safe = row_max == neg_inf ? S(0) : row_max;
  S total = 0, big_w = 0, sum_wz = 0;  // sum_wz: sum of q (z - max_safe) over the row
  for (int64_t l = 0; target_sums && l < kLaneSize; ++l) {
    big_w += ws[l];
    sum_wz += wzs[l] - ws[l] * (max_safe - shifts[l]);
  }
  if (!three_pass) {
    for (int64_t l = 0; l < kLaneSize; ++l) total += ss[l] * std::exp(ms[l] - max_safe);
  } else if (!has_nan) {  // pass 2 of three, from cache
    V acc(S(0));
    for (int64_t i = 0; i < C; i += B::kSize) {
      const int64_t n = std::min<int64_t>(B::kSize, C - i);
      const B xb = B::load(x + i, n);
      for (int l = 0; l < B::kLanes; ++l) {
        const int64_t nl = std::min<int64_t>(n - l * kLaneSize, kLaneSize);
        if (nl <= 0) break;
        const V e = keep_first(fast_exp(xb.lane[l] - V(max_safe)), nl, S(0));
        e.store(exps + i + l * kLaneSize, nl);
        acc = acc + e;
      }
    }
    total = at::vec::vec_reduce_all<S>([](V p, V q) { return p + q; }, acc);
  }
  const S log_sum = has_nan ? nan : std::log(total);
  const S lse = max_safe + log_sum;  // what return_lse gives; the loss uses log_sum

  S big_q;
  if constexpr (kProb) {
    big_q = big_w;
    loss = big_q * log_sum - sum_wz;
  } else {
    big_q = k.one_minus_ls * w_t + k.ls_over_c * k.weight_sum;
    loss = k.one_minus_ls * w_t * (log_sum - (z_t - max_safe));
    if (k.smoothing) loss += k.ls_over_c * (k.weight_sum * log_sum - sum_wz);
  }
  loss += k.z_loss * lse * lse;
  lse_out = lse;
  if (g == nullptr) return;
  if (has_nan) {  // as torch: a NaN logit makes the whole row's gradient NaN
    fill_row(g, C, std::numeric_limits<float>::quiet_NaN());
    return;
  }

  // Pass 2, from cache: g_c = scale * ((Q + 2 z_loss lse) softmax_c - q_c), times the softcap derivative
  // 1 - (z/cap)^2. scale is the mean's 1/denominator when the caller knows it, else 1.
  const S scale = a.grad_scale != nullptr ? *static_cast<const S*>(a.grad_scale) : S(1);
  const S coef = scale * (big_q + 2 * k.z_loss * lse);
  if (three_pass) {  // exps holds exp(z - max): softmax = exps / total
    const V factor(coef / total);
    for (int64_t i = 0; i < C; i += B::kSize) {
      const int64_t n = std::min<int64_t>(B::kSize, C - i);
      B yb = zero_block<T>(), out = zero_block<T>();
      if constexpr (kProb) yb = B::load(y + i, n);
      for (int l = 0; l < B::kLanes; ++l) {
        const int64_t nl = std::min<int64_t>(n - l * kLaneSize, kLaneSize);
        if (nl <= 0) break;
        V gl = V::loadu(exps + i + l * kLaneSize, nl) * factor;
        if (kProb || k.smoothing)
          gl = gl - V(scale) * target_weights<kProb>(load_weight<V>(w ? w + i + l * kLaneSize : w, nl), yb.lane[l], k);
        out.lane[l] = gl;
      }
      out.store(g + i, n);
    }
  }
  for (int64_t i = 0; !three_pass && i < C; i += B::kSize) {
    const int64_t n = std::min<int64_t>(B::kSize, C - i);
    const B xb = B::load(x + i, n);
    B yb = zero_block<T>(), out;
    if constexpr (kProb) yb = B::load(y + i, n);
    for (int l = 0; l < B::kLanes; ++l) {
      const int64_t nl = n - l * kLaneSize;
      const V zl = softcap_v(xb.lane[l], k);
      V gl = V(coef / total) * fast_exp(zl - V(max_safe));  // softmax = exp(z - max) / sum, never exp(z - lse)
      if (kProb || k.smoothing)  // else q is zero but for the target's element, done below
        gl = gl - V(scale) * target_weights<kProb>(load_weight<V>(w ? w + i + l * kLaneSize : w, nl), yb.lane[l], k);
      if (k.softcap) gl = gl * (V(S(1)) - zl * V(k.inv_cap) * zl * V(k.inv_cap));
      out.lane[l] = gl;
    }
    out.store(g + i, n);
  }
  if constexpr (!kProb) {  // the target's own share of q, on one element
    S gt = coef / total * std::exp(z_t - max_safe) - scale * (k.ls_over_c * w_t + k.one_minus_ls * w_t);
    if (k.softcap) gt *= S(1) - (z_t * k.inv_cap) * (z_t * k.inv_cap);
    g[t] = static_cast<T>(gt);
  }
}

template <typename T>
CrossEntropyStatus cross_entropy_typed(const CrossEntropyArgs& a) {
  using S = opmath_t<T>;
  CeConsts<S> k{};
  k.one_minus_ls = S(1.0 - a.label_smoothing);
  k.ls_over_c = S(a.label_smoothing / static_cast<double>(a.classes));
  k.z_loss = S(a.z_loss);
  k.softcap = a.softcap != 0.0;
  k.cap = S(a.softcap);
  k.inv_cap = k.softcap ? S(1.0 / a.softcap) : S(0);
  k.smoothing = a.label_smoothing != 0.0;
  S weight_sum = static_cast<S>(a.classes);
  if (a.weight != nullptr) {
    weight_sum = 0;
    for (int64_t c = 0; c < a.classes; ++c) weight_sum += static_cast<const S*>(a.weight)[c];
  }
  k.weight_sum = weight_sum;

  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  // Threads take chunks of rows from a shared counter rather than a fixed half each: on a shared machine a thread
  // that gets descheduled then delays only its current chunk, not half of the work.
  const int64_t chunk = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.classes, 1));
  const int64_t chunks = (a.rows + chunk - 1) / chunk;
  std::atomic<int64_t> next_chunk{0};
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), chunks);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    for (int64_t c = next_chunk.fetch_add(1); c < chunks; c = next_chunk.fetch_add(1)) {
      const int64_t end = std::min(a.rows, (c + 1) * chunk);
      for (int64_t r = c * chunk; r < end; ++r) {
        if (a.target_prob != nullptr)
          ce_row<T, true>(a, k, r, first_bad);
        else
          ce_row<T, false>(a, k, r, first_bad);
      }
    }
  });
  CrossEntropyStatus st;
  const int64_t bad_row = first_bad.load();
  if (bad_row != std::numeric_limits<int64_t>::max()) {
    st.bad_target = true;
    st.target = a.target_index[bad_row];
  }
  return st;
}

template <typename T>
void scale_rows_typed(const CrossEntropyScaleArgs& a) {
  using S = opmath_t<T>;
  using B = Block<T>;
  using V = typename B::Vec;
  const S* scale = static_cast<const S*>(a.scale);
  if (!a.scale_per_row && scale[0] == S(1)) return;  // loss.backward(): not even a parallel region
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.classes, 1));
  at::parallel_for(0, a.rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const S f = scale[a.scale_per_row ? r : 0];
      if (f == S(1)) continue;  // loss.backward(): nothing to do, the common case
      T* g = static_cast<T*>(a.grad) + r * a.classes;
      for (int64_t i = 0; i < a.classes; i += B::kSize) {
        const int64_t n = std::min<int64_t>(B::kSize, a.classes - i);
        B b = B::load(g + i, n);
        for (auto& lane : b.lane) lane = lane * V(f);
        b.store(g + i, n);
      }
    }
  });
}

}  // namespace

void cross_entropy_scale_grad(const CrossEntropyScaleArgs& a) {
  switch (a.kind) {
    case ScalarKind::Float: return scale_rows_typed<float>(a);
    case ScalarKind::Double: return scale_rows_typed<double>(a);
    case ScalarKind::BFloat16: return scale_rows_typed<c10::BFloat16>(a);
    case ScalarKind::Half: return scale_rows_typed<c10::Half>(a);
  }
}

CrossEntropyStatus cross_entropy_fwd(const CrossEntropyArgs& a) {
  switch (a.kind) {
    case ScalarKind::Float: return cross_entropy_typed<float>(a);
    case ScalarKind::Double: return cross_entropy_typed<double>(a);
    case ScalarKind::BFloat16: return cross_entropy_typed<c10::BFloat16>(a);
    case ScalarKind::Half: return cross_entropy_typed<c10::Half>(a);
  }
  return {};
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
