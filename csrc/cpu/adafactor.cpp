// Adafactor (torch.optim.Adafactor, single-tensor form) on the CPU, in three passes over a bucket (see
// fusedopt/optim/adafactor.py): 1. ||p||^2 per tensor, per matrix the row and column sums of g^2, for the other
// params the variance update and ||u||^2; then the small factors (row_var, col_var, row means); 2. ||u||^2 of the
// matrices; 3. the param update. Work is split into tasks (a block of rows of one matrix, or a 32K-element chunk of a
// vector); every sum is kept per task and combined in task order, so results do not depend on the thread count.
// Compiled once per ISA by cpu/capability/*.cpp (never on its own).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
#include "cpu/vec_io.h"
#include "cpu/vec_ops.h"
// After vec_ops.h: lerp's unqualified vfma must see the Vectorized overloads.
#include "common/lerp.h"

namespace fusedopt::cpu::CPU_CAPABILITY {
namespace adafactor {

struct Task {
  int64_t tensor, begin, end;  // matrices: rows [begin, end) of the flattened (batch * rows); vectors: elements
};

// Rows per task of a matrix with `cols` columns: about 32K elements, 16 to 1024 rows (the per-task column
// partials are kept in opmath over at most 1024 rows, then added in double).
inline int64_t rows_per_task(int64_t cols) { return std::clamp<int64_t>(kChunkElems / std::max<int64_t>(cols, 1), 16, 1024); }

template <typename T>
struct Typed {
  using B = Block<T>;
  using V = typename B::Vec;
  using S = opmath_t<T>;

  const AdafactorArgs& a;
  S grad_factor, eps1_sq;
  std::vector<Task> tasks;
  std::vector<int64_t> col_offset;        // per task: start of its column partials in col_part
  std::vector<S> col_part;                // per task: sum over its rows of g^2, per column
  std::vector<double> row_sum;            // per matrix row (flattened over the bucket): sum of g^2
  std::vector<int64_t> row_offset;        // per tensor: start of its rows in row_sum / rmean index
  std::vector<double> p_part, u_part;     // per task
  std::vector<double> weight, decay, alpha, scale;  // per tensor
  std::vector<S> rmean;                   // per matrix of the batch: clamp(mean(row_var), eps1)
  std::vector<int64_t> rmean_offset;      // per tensor

  // The lanes of a block's opmath vector l that lie inside the first n elements.
  static V masked(const V& x, int64_t n, int l) {
    return V::set(V(S(0)), x, std::clamp<int64_t>(n - int64_t(l) * V::size(), 0, V::size()));
  }
  // sum of x^2 over the first `valid` lanes, squared in double (see norm_sum for torch's float32 overflow).
  static double sum_sq(const V& x, int64_t valid) {
    S lanes[V::size()];
    x.store(lanes);
    double total = 0.0;
    for (int64_t l = 0; l < valid; ++l) total += static_cast<double>(lanes[l]) * static_cast<double>(lanes[l]);
    return total;
  }
  static int64_t valid_lanes(int64_t n, int l) { return std::clamp<int64_t>(n - int64_t(l) * V::size(), 0, V::size()); }
  // A tensor's sum of squares as torch's norm sees it: for float opmath, a sum beyond float's range is inf (torch's
  // float32 norm overflows there), but a one-element tensor's norm is its |x| (torch takes no square there).
  double norm_sum(double sum, int64_t t) const {
    const bool overflows = sizeof(S) == 4 && a.numel[t] > 1 && sum > static_cast<double>(std::numeric_limits<float>::max());
    return overflows ? std::numeric_limits<double>::infinity() : sum;
  }
  static double fold(const V& x) {
    S lanes[V::size()];
    x.store(lanes);
    double total = 0.0;
    for (int l = 0; l < V::size(); ++l) total += static_cast<double>(lanes[l]);
    return total;
  }
  V grad_lane(const B& g, int l) const {
    const V x = g.lane[l] * V(grad_factor);
    return a.maximize ? x.neg() : x;
  }
  bool is_matrix(int64_t t) const { return t < a.factored; }

  explicit Typed(const AdafactorArgs& args) : a(args) {
    const double factor = a.grad_divisor != nullptr ? 1.0 / static_cast<double>(*a.grad_divisor) : 1.0;
    grad_factor = S(factor);
    eps1_sq = S(a.eps1 * a.eps1);
    const auto n = static_cast<int64_t>(a.numel.size());
    row_offset.assign(n + 1, 0);
    rmean_offset.assign(n + 1, 0);
    for (int64_t t = 0; t < n; ++t) {
      const bool m = is_matrix(t);
      row_offset[t + 1] = row_offset[t] + (m ? a.numel[t] / a.cols[t] : 0);
      rmean_offset[t + 1] = rmean_offset[t] + (m ? a.numel[t] / (a.cols[t] * a.rows[t]) : 0);
      if (m) {  // a task never spans two matrices of the batch: its column partials belong to one matrix
        const int64_t rows = a.rows[t], batch = a.numel[t] / (rows * a.cols[t]), step = rows_per_task(a.cols[t]);
        for (int64_t b = 0; b < batch; ++b)
          for (int64_t r = 0; r < rows; r += step) tasks.push_back({t, b * rows + r, b * rows + std::min(rows, r + step)});
      } else {
        for (int64_t b = 0; b < a.numel[t]; b += kChunkElems) tasks.push_back({t, b, std::min(a.numel[t], b + kChunkElems)});
      }
    }
    col_offset.assign(tasks.size() + 1, 0);
    for (size_t k = 0; k < tasks.size(); ++k)
      col_offset[k + 1] = col_offset[k] + (is_matrix(tasks[k].tensor) ? a.cols[tasks[k].tensor] : 0);
    col_part.assign(col_offset.back(), S(0));
    row_sum.assign(row_offset.back(), 0.0);
    p_part.assign(tasks.size(), 0.0);
    u_part.assign(tasks.size(), 0.0);
    rmean.assign(rmean_offset.back(), S(0));
    weight.resize(n);
    decay.resize(n);
    alpha.resize(n);
    scale.resize(n);
    for (int64_t t = 0; t < n; ++t) {
      const double step = static_cast<double>(*a.step[t]);
      weight[t] = std::pow(step, a.beta2_decay);
      decay[t] = 1.0 - a.lr * a.weight_decay;
      alpha[t] = std::min(a.lr, 1.0 / std::sqrt(step));  // rho; times max(eps2, rms(p)) after pass 1
    }
  }

  template <typename Fn>
  void parallel_tasks(const Fn& fn) {
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) fn(k, tasks[k]);
    });
  }

  // The update u = g / sqrt(max(estimate, eps1^2)) of one block; matrices: estimate = row * col / rmean.
  V update(const V& g, const V& estimate) const { return g / vsqrt(vmax_nan(estimate, V(eps1_sq))); }

  // Pass 1 on one task.
  void pass1(int64_t k, const Task& task) {
    const int64_t t = task.tensor;
    const auto* param = static_cast<const T*>(a.param[t]);
    const auto* grad = static_cast<const T*>(a.grad[t]);
    double p_total = 0.0, u_total = 0.0;
    if (is_matrix(t)) {
      const int64_t cols = a.cols[t];
      S* col = col_part.data() + col_offset[k];
      for (int64_t r = task.begin; r < task.end; ++r) {
        V row_acc(S(0));
        for (int64_t c = 0; c < cols; c += B::kSize) {
          const int64_t n = std::min<int64_t>(B::kSize, cols - c);
          const B p = B::load(param + r * cols + c, n), g = B::load(grad + r * cols + c, n);
          for (int l = 0; l < B::kLanes; ++l) {
            const V g2 = grad_lane(g, l) * grad_lane(g, l);
            p_total += sum_sq(p.lane[l], valid_lanes(n, l));
            row_acc = row_acc + masked(g2, n, l);
            const int64_t off = c + int64_t(l) * V::size();
            const int64_t cnt = std::clamp<int64_t>(cols - off, 0, V::size());
            if (cnt > 0) (V::loadu(col + off, cnt) + g2).store(col + off, cnt);
          }
        }
        row_sum[row_offset[t] + r] = fold(row_acc);
      }
    } else {
      auto* var = static_cast<T*>(a.variance[t - a.factored]);
      const S w = S(weight[t]);
      for (int64_t i = task.begin; i < task.end; i += kChunkElems / 32) {
        const int64_t sub_end = std::min(task.end, i + kChunkElems / 32);
        for (int64_t j = i; j < sub_end; j += B::kSize) {
          const int64_t n = std::min<int64_t>(B::kSize, sub_end - j);
          const B p = B::load(param + j, n), g = B::load(grad + j, n);
          B v = B::load(var + j, n);
          for (int l = 0; l < B::kLanes; ++l) {
            const V gl = grad_lane(g, l);
            v.lane[l] = lerp(v.lane[l], gl * gl, w);
          }
          v.store(var + j, n);
          v = B::load(var + j, n);  // the stored (rounded) variance, as torch's update reads it
          for (int l = 0; l < B::kLanes; ++l) {
            p_total += sum_sq(p.lane[l], valid_lanes(n, l));
            u_total += sum_sq(update(grad_lane(g, l), v.lane[l]), valid_lanes(n, l));
          }
        }
      }
    }
    p_part[k] = p_total;
    u_part[k] = u_total;
  }

  // Between passes 1 and 2: per tensor alpha; per matrix the new factors (stored, then read back rounded) and the
  // clamped mean of its row factor.
  void factors() {
    const auto n = static_cast<int64_t>(a.numel.size());
    std::vector<double> p_sum(n, 0.0), col_sum;
    for (size_t k = 0; k < tasks.size(); ++k) p_sum[tasks[k].tensor] += p_part[k];
    for (int64_t t = 0; t < n; ++t)
      alpha[t] *= std::max(a.eps2, std::sqrt(norm_sum(p_sum[t], t)) / std::sqrt(static_cast<double>(a.numel[t])));
    size_t k = 0;
    for (int64_t t = 0; t < a.factored; ++t) {
      const int64_t rows = a.rows[t], cols = a.cols[t], batch = a.numel[t] / (rows * cols);
      auto* row_var = static_cast<T*>(a.row_var[t]);
      auto* col_var = static_cast<T*>(a.col_var[t]);
      const S w = S(weight[t]);
      for (int64_t b = 0; b < batch; ++b) {
        col_sum.assign(cols, 0.0);
        for (; k < tasks.size() && tasks[k].tensor == t && tasks[k].begin < (b + 1) * rows; ++k)
          for (int64_t c = 0; c < cols; ++c) col_sum[c] += static_cast<double>(col_part[col_offset[k] + c]);
        for (int64_t c = 0; c < cols; ++c) {
          const S mean = S(col_sum[c] / static_cast<double>(rows));
          col_var[b * cols + c] = T(lerp(S(col_var[b * cols + c]), mean, w));
        }
        double row_total = 0.0;
        for (int64_t r = 0; r < rows; ++r) {
          const S mean = S(row_sum[row_offset[t] + b * rows + r] / static_cast<double>(cols));
          const T stored = T(lerp(S(row_var[b * rows + r]), mean, w));
          row_var[b * rows + r] = stored;
          row_total += static_cast<double>(S(stored));
        }
        rmean[rmean_offset[t] + b] = std::max(S(row_total / static_cast<double>(rows)), S(a.eps1));
      }
    }
  }

  // Passes 2 (kUpdate false: ||u||^2 of a matrix task) and 3 (kUpdate true: the param update).
  template <bool kUpdate>
  void matrix_pass(int64_t k, const Task& task) {
    const int64_t t = task.tensor, cols = a.cols[t], rows = a.rows[t];
    auto* param = static_cast<T*>(a.param[t]);
    auto* grad = static_cast<T*>(a.grad[t]);
    const auto* row_var = static_cast<const T*>(a.row_var[t]);
    const auto* col_var = static_cast<const T*>(a.col_var[t]);
    double u_total = 0.0;
    for (int64_t r = task.begin; r < task.end; ++r) {
      const int64_t b = r / rows;
      const S row = S(row_var[r]), mean = rmean[rmean_offset[t] + b];
      for (int64_t c = 0; c < cols; c += B::kSize) {
        const int64_t n = std::min<int64_t>(B::kSize, cols - c);
        B g = B::load(grad + r * cols + c, n);
        const B col = B::load(col_var + b * cols + c, n);
        if constexpr (kUpdate) {
          B p = B::load(param + r * cols + c, n);
          for (int l = 0; l < B::kLanes; ++l) {
            const V u = update(grad_lane(g, l), (V(row) * col.lane[l]) / V(mean));
            p.lane[l] = p.lane[l] * V(S(decay[t])) - V(S(scale[t])) * u;
          }
          p.store(param + r * cols + c, n);
          if (a.write_back_grads) {
            for (int l = 0; l < B::kLanes; ++l) g.lane[l] = g.lane[l] * V(grad_factor);
            g.store(grad + r * cols + c, n);
          }
        } else {
          for (int l = 0; l < B::kLanes; ++l) {
            u_total += sum_sq(update(grad_lane(g, l), (V(row) * col.lane[l]) / V(mean)), valid_lanes(n, l));
          }
        }
      }
    }
    if constexpr (!kUpdate) u_part[k] = u_total;
  }

  void vector_update(const Task& task) {
    const int64_t t = task.tensor;
    auto* param = static_cast<T*>(a.param[t]);
    auto* grad = static_cast<T*>(a.grad[t]);
    const auto* var = static_cast<const T*>(a.variance[t - a.factored]);
    for (int64_t j = task.begin; j < task.end; j += B::kSize) {
      const int64_t n = std::min<int64_t>(B::kSize, task.end - j);
      B p = B::load(param + j, n), g = B::load(grad + j, n);
      const B v = B::load(var + j, n);
      for (int l = 0; l < B::kLanes; ++l)
        p.lane[l] = p.lane[l] * V(S(decay[t])) - V(S(scale[t])) * update(grad_lane(g, l), v.lane[l]);
      p.store(param + j, n);
      if (a.write_back_grads) {
        for (int l = 0; l < B::kLanes; ++l) g.lane[l] = g.lane[l] * V(grad_factor);
        g.store(grad + j, n);
      }
    }
  }

  void run() {
    parallel_tasks([&](int64_t k, const Task& task) { pass1(k, task); });
    factors();
    parallel_tasks([&](int64_t k, const Task& task) {
      if (is_matrix(task.tensor)) matrix_pass<false>(k, task);
    });
    std::vector<double> u_sum(a.numel.size(), 0.0);
    for (size_t k = 0; k < tasks.size(); ++k) u_sum[tasks[k].tensor] += u_part[k];
    for (size_t t = 0; t < a.numel.size(); ++t) {
      const double root_n = std::sqrt(static_cast<double>(a.numel[t]));
      scale[t] = alpha[t] / std::max(1.0, std::sqrt(norm_sum(u_sum[t], static_cast<int64_t>(t))) / (root_n * a.d));
    }
    parallel_tasks([&](int64_t, const Task& task) {
      if (is_matrix(task.tensor)) {
        matrix_pass<true>(0, task);
      } else {
        vector_update(task);
      }
    });
  }
};

template <typename T>
void run(const AdafactorArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/nan: skip, steps too
  for (float* step : a.step) *step += 1.0f;
  Typed<T>(a).run();
}

}  // namespace adafactor

void adafactor_step(const AdafactorArgs& a) {
  switch (a.kind) {
    case ScalarKind::Float: return adafactor::run<float>(a);
    case ScalarKind::Double: return adafactor::run<double>(a);
    case ScalarKind::BFloat16: return adafactor::run<c10::BFloat16>(a);
    case ScalarKind::Half: return adafactor::run<c10::Half>(a);
  }
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
