// Adafactor (torch.optim.Adafactor) on CUDA: the passes of csrc/cpu/adafactor.cpp and triton_kernels/adafactor.py
// (see fusedopt/optim/adafactor.py) as launches over the whole bucket, no host sync:
//   step prologue; pass 1: matrix tasks (kRows rows x all columns of one matrix, one thread per column: ||p||^2,
//   each row's sum of g^2, the task's column sums) and vector chunks (variance update, ||p||^2, ||u||^2);
//   one block per tensor (alpha) and per matrix of a batch (new row_var, col_var, clamped row mean);
//   pass 2: matrix tasks, ||u||^2; one block per tensor (alpha / max(1, rms(u) / d)); pass 3: the update.
// Sums are per task and added in task order by one block: deterministic, no atomics. The task tables are built on the
// host from the shapes and copied like the multi-tensor tables (pinned, asynchronous; by launches under capture).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <vector>

#include <math_constants.h>

#include "common/lerp.h"
#include "cuda/kernels.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/norm_engine.cuh"

namespace fusedopt::cuda {
namespace adafactor {

constexpr int kThreads = 256;
constexpr int kRows = 16;              // rows per matrix task
constexpr int64_t kVecChunk = 4096;    // elements per vector task
enum TabRow { kP, kG, kRow, kCol, kVar, kStep, kNumel, kRowsRow, kColsRow, kTabRows };

struct Tables {
  const int64_t* tab;  // [kTabRows][n]
  int64_t n;
  const int64_t* tasks;  // [6][n_mt]: tensor, first row, end row (flattened over the batch), col_off, row_off, rm_off
  int64_t n_mt;
  const int64_t* vtasks;  // [2][n_vt]: tensor, first element
  int64_t n_vt;
  const int64_t* mats;  // [6][n_mats]: tensor, batch index, first task, tasks, row_sum offset, rmean offset
  int64_t n_mats;
  const int64_t* ranges;  // [2][n]: each tensor's first and end task (matrix tasks, then vector chunks)
};

struct Params {
  double lr, beta2_decay, eps1, eps2, d, weight_decay;
  const float *lr_ptr, *grad_divisor, *found_inf;
  bool maximize, write_back;
  bool float_norm;  // opmath is float: sums of squares past float's range are inf, as torch's norm
};

template <typename S>
struct Scratch {
  double *row_sum, *p_part, *u_part, *alpha, *scale;
  S *col_part, *rmean;
};

__device__ __forceinline__ bool skipped(const Params& h) { return h.found_inf != nullptr && *h.found_inf != 0.0f; }
__device__ __forceinline__ double lr_of(const Params& h) {
  return h.lr_ptr != nullptr ? static_cast<double>(*h.lr_ptr) : h.lr;
}
template <typename X>
__device__ __forceinline__ X* at_row(const Tables& tb, int row, int64_t t) {
  return reinterpret_cast<X*>(tb.tab[row * tb.n + t]);
}
__device__ __forceinline__ double step_of(const Tables& tb, int64_t t) {
  return static_cast<double>(*at_row<float>(tb, kStep, t));
}
template <typename S>
__device__ __forceinline__ S grad_factor(const Params& h) {
  return h.grad_divisor != nullptr ? S(1.0 / static_cast<double>(*h.grad_divisor)) : S(1);
}
// g / sqrt(max(estimate, eps1^2)), the max keeping NaN as torch's clamp.
template <typename S>
__device__ __forceinline__ S update_of(S g, S estimate, S eps1_sq) {
  return g / sqrt(estimate < eps1_sq ? eps1_sq : estimate);
}

__global__ void increment_kernel(Tables tb, Params h) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t < tb.n && !skipped(h)) *at_row<float>(tb, kStep, t) += 1.0f;
}

// PASS 1: sums; 2: ||u||^2; 3: the update.
template <typename T, int PASS>
__global__ void __launch_bounds__(kThreads) matrix_kernel(Tables tb, Scratch<at::opmath_type<T>> sc, Params h) {
  using S = at::opmath_type<T>;
  if (skipped(h)) return;
  const int64_t k = blockIdx.x, m = tb.n_mt;
  const int64_t t = tb.tasks[k], r0 = tb.tasks[m + k], r1 = tb.tasks[2 * m + k];
  const int64_t cols = tb.tab[kColsRow * tb.n + t], rows = tb.tab[kRowsRow * tb.n + t];
  T* param = at_row<T>(tb, kP, t);
  T* grad = at_row<T>(tb, kG, t);
  const S factor = grad_factor<S>(h), sign = h.maximize ? S(-1) : S(1);
  if constexpr (PASS == 1) {
    S row_acc[kRows];
    double p_acc = 0.0;  // squared in double: a |p| of 1e30 keeps a finite rms (as torch's CPU norm)
    for (int i = 0; i < kRows; ++i) row_acc[i] = S(0);
    S* col_part = sc.col_part + tb.tasks[3 * m + k];
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      S col_acc = S(0);
      for (int64_t r = r0; r < r1; ++r) {
        const S g = S(grad[r * cols + c]) * factor, p = S(param[r * cols + c]);
        row_acc[r - r0] += g * g;
        col_acc += g * g;
        p_acc += static_cast<double>(p) * static_cast<double>(p);
      }
      col_part[c] = col_acc;
    }
    const int64_t row_off = tb.tasks[4 * m + k];
    for (int i = 0; i < kRows; ++i) {
      const S s = norm_engine::block_sum(row_acc[i]);
      if (threadIdx.x == 0 && r0 + i < r1) sc.row_sum[row_off + r0 + i] = static_cast<double>(s);
    }
    const double ps = norm_engine::block_sum(p_acc);
    if (threadIdx.x == 0) sc.p_part[k] = ps;
  } else {
    __shared__ S row_sh[kRows];
    const int64_t b = r0 / rows;
    const T* row_var = at_row<T>(tb, kRow, t);
    const T* col_var = at_row<T>(tb, kCol, t) + b * cols;
    if (threadIdx.x < r1 - r0) row_sh[threadIdx.x] = S(row_var[r0 + threadIdx.x]);
    __syncthreads();
    const S mean = sc.rmean[tb.tasks[5 * m + k] + b], eps1_sq = S(h.eps1 * h.eps1);
    const S decay = S(1.0 - lr_of(h) * h.weight_decay), scale = S(sc.scale[t]);
    double u_acc = 0.0;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const S col = S(col_var[c]);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r * cols + c;
        const S g = S(grad[i]) * factor;
        const S u = update_of(sign * g, (row_sh[r - r0] * col) / mean, eps1_sq);
        if constexpr (PASS == 2) {
          u_acc += static_cast<double>(u) * static_cast<double>(u);
        } else {
          param[i] = T(S(param[i]) * decay - scale * u);
          if (h.write_back) grad[i] = T(g);
        }
      }
    }
    if constexpr (PASS == 2) {
      const double us = norm_engine::block_sum(u_acc);
      if (threadIdx.x == 0) sc.u_part[k] = us;
    }
  }
}

// PASS 1: variance update, ||p||^2, ||u||^2; PASS 3: the update.
template <typename T, int PASS>
__global__ void __launch_bounds__(kThreads) vector_kernel(Tables tb, Scratch<at::opmath_type<T>> sc, Params h) {
  using S = at::opmath_type<T>;
  if (skipped(h)) return;
  const int64_t k = blockIdx.x, t = tb.vtasks[k], begin = tb.vtasks[tb.n_vt + k];
  const int64_t end = min(tb.tab[kNumel * tb.n + t], begin + kVecChunk);
  T* param = at_row<T>(tb, kP, t);
  T* grad = at_row<T>(tb, kG, t);
  T* var = at_row<T>(tb, kVar, t);
  const S factor = grad_factor<S>(h), sign = h.maximize ? S(-1) : S(1), eps1_sq = S(h.eps1 * h.eps1);
  const S w = S(pow(step_of(tb, t), h.beta2_decay));
  const S decay = S(1.0 - lr_of(h) * h.weight_decay);
  double p_acc = 0.0, u_acc = 0.0;  // squared in double, as in matrix_kernel
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const S g = S(grad[i]) * factor, p = S(param[i]);
    if constexpr (PASS == 1) {
      const T v = T(lerp(S(var[i]), g * g, w));
      var[i] = v;
      const S u = update_of(sign * g, S(v), eps1_sq);  // the stored (rounded) variance, as torch reads it
      p_acc += static_cast<double>(p) * static_cast<double>(p);
      u_acc += static_cast<double>(u) * static_cast<double>(u);
    } else {
      param[i] = T(p * decay - S(sc.scale[t]) * update_of(sign * g, S(var[i]), eps1_sq));
      if (h.write_back) grad[i] = T(g);
    }
  }
  if constexpr (PASS == 1) {
    const double ps = norm_engine::block_sum(p_acc);
    const double us = norm_engine::block_sum(u_acc);
    if (threadIdx.x == 0) {
      sc.p_part[tb.n_mt + k] = ps;
      sc.u_part[tb.n_mt + k] = us;
    }
  }
}

// One block per tensor, its task partials in order. PASS 1: alpha = max(eps2, rms(p)) * min(lr, 1 / sqrt(step))
// (Python's max: a NaN rms gives eps2); PASS 2: scale = alpha / max(1, rms(u) / d) (a NaN gives 1).
template <int PASS>
__global__ void __launch_bounds__(kThreads) tensor_kernel(Tables tb, double* part, double* alpha, double* scale,
                                                           Params h) {
  if (skipped(h)) return;
  const int64_t t = blockIdx.x, k0 = tb.ranges[t], k1 = tb.ranges[tb.n + t];
  double x = 0.0;
  for (int64_t k = k0 + threadIdx.x; k < k1; k += blockDim.x) x += part[k];
  double total = norm_engine::block_sum(x);
  if (threadIdx.x != 0) return;
  const int64_t numel = tb.tab[kNumel * tb.n + t];
  // torch's float32 norm overflows past float's range (a one-element tensor's norm is its |x|): the same here.
  if (h.float_norm && numel > 1 && total > 3.4028234663852886e38) total = CUDART_INF;
  const double rms = sqrt(total) / sqrt(static_cast<double>(numel));
  if constexpr (PASS == 1) {
    const double inv_root = 1.0 / sqrt(step_of(tb, t)), lr = lr_of(h);
    alpha[t] = (rms > h.eps2 ? rms : h.eps2) * (inv_root < lr ? inv_root : lr);
  } else {
    const double ratio = rms / h.d;
    scale[t] = alpha[t] / (ratio > 1.0 ? ratio : 1.0);
  }
}

// One block per matrix of a batch: row_var and col_var lerp towards the new means (stored, then used rounded), and
// rmean = max(mean(row_var), eps1) with NaN kept.
template <typename T>
__global__ void __launch_bounds__(kThreads) factor_kernel(Tables tb, Scratch<at::opmath_type<T>> sc, Params h) {
  using S = at::opmath_type<T>;
  if (skipped(h)) return;
  const int64_t i = blockIdx.x, q = tb.n_mats;
  const int64_t t = tb.mats[i], b = tb.mats[q + i], k0 = tb.mats[2 * q + i], nk = tb.mats[3 * q + i];
  const int64_t rows = tb.tab[kRowsRow * tb.n + t], cols = tb.tab[kColsRow * tb.n + t];
  const S w = S(pow(step_of(tb, t), h.beta2_decay));
  T* row_var = at_row<T>(tb, kRow, t) + b * rows;
  T* col_var = at_row<T>(tb, kCol, t) + b * cols;
  const double* row_sum = sc.row_sum + tb.mats[4 * q + i];
  double acc = 0.0;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const T v = T(lerp(S(row_var[r]), S(row_sum[r] / static_cast<double>(cols)), w));
    row_var[r] = v;
    acc += static_cast<double>(S(v));
  }
  const double total = norm_engine::block_sum(acc);
  if (threadIdx.x == 0) {
    const S mean = S(total / static_cast<double>(rows)), eps1 = S(h.eps1);
    sc.rmean[tb.mats[5 * q + i]] = mean < eps1 ? eps1 : mean;
  }
  const int64_t* col_off = tb.tasks + 3 * tb.n_mt;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    double s = 0.0;
    for (int64_t k = k0; k < k0 + nk; ++k) s += static_cast<double>(sc.col_part[col_off[k] + c]);
    col_var[c] = T(lerp(S(col_var[c]), S(s / static_cast<double>(rows)), w));
  }
}

template <typename X>
unsigned grid_of(X count) {
  TORCH_CHECK(count < (int64_t(1) << 31), "fusedopt adafactor_step (cuda): too many tasks for one launch");
  return static_cast<unsigned>(count);
}

}  // namespace adafactor

void adafactor_step(const AdafactorLaunch& a) {
  using namespace adafactor;
  const TensorList& params = *a.params;
  const auto n = static_cast<int64_t>(params.size()), n_f = static_cast<int64_t>(a.row_vars->size());
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // Host tables (shapes only).
  std::vector<int64_t> tab(kTabRows * n, 0), tasks[6], vtasks[2], mats[6], first(n), last(n);
  int64_t col_off = 0, row_off = 0, rm_off = 0;
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    tab[kP * n + t] = reinterpret_cast<int64_t>(p.data_ptr());
    tab[kG * n + t] = reinterpret_cast<int64_t>((*a.grads)[t].data_ptr());
    tab[kStep * n + t] = reinterpret_cast<int64_t>((*a.steps)[t].data_ptr());
    tab[kNumel * n + t] = p.numel();
    if (t < n_f) {
      const int64_t rows = p.size(-2), cols = p.size(-1), batch = p.numel() / (rows * cols);
      tab[kRow * n + t] = reinterpret_cast<int64_t>((*a.row_vars)[t].data_ptr());
      tab[kCol * n + t] = reinterpret_cast<int64_t>((*a.col_vars)[t].data_ptr());
      tab[kRowsRow * n + t] = rows;
      tab[kColsRow * n + t] = cols;
      first[t] = static_cast<int64_t>(tasks[0].size());
      for (int64_t b = 0; b < batch; ++b) {
        const auto k0 = static_cast<int64_t>(tasks[0].size());
        for (int64_t r = 0; r < rows; r += kRows) {
          const int64_t v[6] = {t, b * rows + r, b * rows + std::min(rows, r + kRows), col_off, row_off, rm_off};
          for (int j = 0; j < 6; ++j) tasks[j].push_back(v[j]);
          col_off += cols;
        }
        const int64_t v[6] = {t, b, k0, static_cast<int64_t>(tasks[0].size()) - k0, row_off + b * rows, rm_off + b};
        for (int j = 0; j < 6; ++j) mats[j].push_back(v[j]);
      }
      row_off += batch * rows;
      rm_off += batch;
      last[t] = static_cast<int64_t>(tasks[0].size());
    } else {
      tab[kVar * n + t] = reinterpret_cast<int64_t>((*a.variances)[t - n_f].data_ptr());
    }
  }
  const auto n_mt = static_cast<int64_t>(tasks[0].size());
  for (int64_t t = n_f; t < n; ++t) {
    first[t] = n_mt + static_cast<int64_t>(vtasks[0].size());
    for (int64_t s = 0; s < params[t].numel(); s += kVecChunk) {
      vtasks[0].push_back(t);
      vtasks[1].push_back(s);
    }
    last[t] = n_mt + static_cast<int64_t>(vtasks[0].size());
  }
  const auto n_vt = static_cast<int64_t>(vtasks[0].size()), n_mats = static_cast<int64_t>(mats[0].size());
  std::vector<int64_t> all(tab);
  const auto append = [&](const std::vector<int64_t>& v) { all.insert(all.end(), v.begin(), v.end()); };
  for (auto& v : tasks) append(v);
  for (auto& v : vtasks) append(v);
  for (auto& v : mats) append(v);
  append(first);
  append(last);
  at::Tensor table;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    at::Tensor host = at::empty({static_cast<int64_t>(all.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::copy(all.begin(), all.end(), host.data_ptr<int64_t>());
    table = host.to(params[0].device(), /*non_blocking=*/true);
  } else {
    table = at::empty({static_cast<int64_t>(all.size())}, params[0].options().dtype(at::kLong));
    fill_table_by_launches(all, table.data_ptr<int64_t>());
  }
  const int64_t* d = table.data_ptr<int64_t>();
  Tables tb{d, n, d + kTabRows * n, n_mt, d + kTabRows * n + 6 * n_mt, n_vt,
            d + kTabRows * n + 6 * n_mt + 2 * n_vt, n_mats, d + kTabRows * n + 6 * n_mt + 2 * n_vt + 6 * n_mats};
  const Params h{a.lr, a.beta2_decay, a.eps1, a.eps2, a.d, a.weight_decay, a.lr_ptr, a.grad_divisor, a.found_inf,
                 a.maximize, a.write_back_grads, params[0].scalar_type() != at::kDouble};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto f64 = params[0].options().dtype(at::kDouble);
  at::Tensor row_sum = at::empty({std::max<int64_t>(row_off, 1)}, f64);
  at::Tensor p_part = at::empty({std::max<int64_t>(n_mt + n_vt, 1)}, f64);
  at::Tensor u_part = at::empty({std::max<int64_t>(n_mt + n_vt, 1)}, f64);
  at::Tensor alpha = at::empty({n}, f64), scale = at::empty({n}, f64);
  increment_kernel<<<grid_of((n + 255) / 256), 256, 0, stream>>>(tb, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fusedopt_adafactor_cuda", [&] {
    using S = at::opmath_type<scalar_t>;
    const auto opmath = params[0].options().dtype(c10::CppTypeToScalarType<S>::value);
    at::Tensor col_part = at::empty({std::max<int64_t>(col_off, 1)}, opmath);
    at::Tensor rmean = at::empty({std::max<int64_t>(rm_off, 1)}, opmath);
    const Scratch<S> sc{row_sum.data_ptr<double>(), p_part.data_ptr<double>(), u_part.data_ptr<double>(),
                        alpha.data_ptr<double>(),   scale.data_ptr<double>(),  col_part.data_ptr<S>(),
                        rmean.data_ptr<S>()};
    if (n_mt > 0) matrix_kernel<scalar_t, 1><<<grid_of(n_mt), kThreads, 0, stream>>>(tb, sc, h);
    if (n_vt > 0) vector_kernel<scalar_t, 1><<<grid_of(n_vt), kThreads, 0, stream>>>(tb, sc, h);
    tensor_kernel<1><<<grid_of(n), kThreads, 0, stream>>>(tb, sc.p_part, sc.alpha, sc.scale, h);
    if (n_mats > 0) factor_kernel<scalar_t><<<grid_of(n_mats), kThreads, 0, stream>>>(tb, sc, h);
    if (n_mt > 0) matrix_kernel<scalar_t, 2><<<grid_of(n_mt), kThreads, 0, stream>>>(tb, sc, h);
    tensor_kernel<2><<<grid_of(n), kThreads, 0, stream>>>(tb, sc.u_part, sc.alpha, sc.scale, h);
    if (n_mt > 0) matrix_kernel<scalar_t, 3><<<grid_of(n_mt), kThreads, 0, stream>>>(tb, sc, h);
    if (n_vt > 0) vector_kernel<scalar_t, 3><<<grid_of(n_vt), kThreads, 0, stream>>>(tb, sc, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fusedopt::cuda
