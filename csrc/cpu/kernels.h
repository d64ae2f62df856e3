// The CPU kernels' interface: plain pointers and sizes, no Tensor, so the per-ISA translation units
// (cpu/capability/*.cpp) stay light. bindings_cpu.cpp turns tensors into these structs.
#pragma once
#include <cstdint>
#include <vector>

#include "common/master_bits.h"
#include "common/quant_format.h"

namespace fusedopt::cpu {

enum class ScalarKind { Float, Double, BFloat16, Half };

// One step of an engine-driven optimizer (cpu/optim_engine.h): the lists, the step context the engine owns, and
// the op's hyperparameters (filled by name in common/optim_binding.h).
template <typename Hyper>
struct OptimStepArgs {
  ScalarKind kind = ScalarKind::Float;
  std::vector<int64_t> numel;
  std::vector<void*> param, grad;
  std::vector<std::vector<void*>> states;  // Op::kStates lists, each empty (unused) or one pointer per param
  std::vector<float*> scalar;              // Op::kScalar's list (steps, first-step flags), or empty
  double lr = 0.0;
  // Grads are divided by *grad_divisor when set: the GradScaler scale, divided by the clip coefficient when
  // clipping is folded into the step. found_inf nonzero: skip the whole step, steps included (GradScaler).
  // write_back_grads: the divided (unscaled) grad is stored back to grad, as torch's fused optimizers do.
  const float* grad_divisor = nullptr;
  const float* found_inf = nullptr;
  const int64_t* stochastic_round = nullptr;  // [seed, counter]: bf16 params stored by stochastic rounding
  bool maximize = false, write_back_grads = false;
  Hyper hyper{};
  // Block-wise quantized states (common/optim_q8.h, cpu/optim_engine_q8.h): when `absmax` is not empty, states[k]
  // point at the codes (int8 / fp8: one byte per element; int4: two per byte), absmax[k] at one float per block
  // (256 or 128 elements) and qmap[k] at the state's map table.
  std::vector<std::vector<float*>> absmax;
  std::vector<const float*> qmap;
  QuantKind qkind = QuantKind::kInt8;
  // Master weights (common/master_bits.h): one float32 master or int16 remainder per 16-bit param; the states are
  // then float32 (opmath) whatever the param's dtype.
  MasterKind master_kind = MasterKind::kNone;
  std::vector<void*> master;
};

// One Adafactor step (torch.optim.Adafactor) over a bucket: the first `factored` tensors are matrices viewed as
// (batch, rows, cols) with row_var (batch * rows) and col_var (batch * cols); the others have a full variance.
struct AdafactorArgs {
  ScalarKind kind = ScalarKind::Float;
  std::vector<int64_t> numel, rows, cols;  // rows/cols of the last two dims (matrices only)
  std::vector<void*> param, grad, row_var, col_var, variance;  // row/col_var: matrices; variance: the others
  std::vector<float*> step;                                     // incremented by the kernel
  int64_t factored = 0;
  double lr = 1e-2, beta2_decay = -0.8, eps1 = 1e-7, eps2 = 1e-3, d = 1.0, weight_decay = 0.0;
  const float* grad_divisor = nullptr;  // as AdamArgs
  const float* found_inf = nullptr;
  bool maximize = false, write_back_grads = false;
};

enum class NormKind { One, Two, P, Inf };

// The p-norm of all tensors of one dtype group, before the root: sum |x|^p (One, Two, P) or max |x| (Inf).
struct GradNormArgs {
  ScalarKind kind = ScalarKind::Float;
  std::vector<int64_t> numel;
  std::vector<const void*> data;
  NormKind norm = NormKind::Two;
  double p = 2.0;
};

// x *= coef for every tensor of one dtype group (clip_grad_norm_'s scaling).
struct ScaleArgs {
  ScalarKind kind = ScalarKind::Float;
  std::vector<int64_t> numel;
  std::vector<void*> data;
  double coef = 1.0;
};

// One pointwise loss (MSE, BCE, BCE with logits) over flat contiguous tensors of one dtype.
struct PointwiseLossArgs {
  ScalarKind kind = ScalarKind::Float;
  int64_t numel = 0;
  const void* input = nullptr;
  const void* target = nullptr;
  const void* weight = nullptr;  // null: unweighted; else the weight of element i is weight[i % weight_period]
  int64_t weight_period = 1;
  const void* pos_weight = nullptr;  // BCE with logits only; same convention
  int64_t pos_weight_period = 1;
  void* loss = nullptr;  // reduction "none": numel elements written; null: only the sum is wanted
  void* grad = nullptr;  // d loss_i / d input_i * scale, or null when no gradient is wanted
  double scale = 1.0;
};
struct PointwiseLossResult {
  double sum = 0.0;  // sum of loss_i (when loss == null), chunk partials added in a fixed order
  int flags = 0;     // BCE: bit 0 an input outside [0, 1] (or NaN), bit 1 a target outside [0, 1]
};

// Cross-entropy over rows of a contiguous (rows, classes) matrix; see fusedopt/reference.py for the math.
struct CrossEntropyArgs {
  ScalarKind kind = ScalarKind::Float;  // of logits, target_prob and grad; loss, lse and weight are opmath
  int64_t rows = 0, classes = 0;
  const void* logits = nullptr;
  const int64_t* target_index = nullptr;  // (rows,) class indices, or null for probability targets
  const void* target_prob = nullptr;      // (rows, classes) probabilities, or null
  const void* weight = nullptr;           // (classes,) opmath, or null
  void* grad = nullptr;                   // (rows, classes), or null (no gradient); may alias logits
  const void* grad_scale = nullptr;       // one opmath value multiplying the gradient, or null
  void* loss = nullptr;                   // (rows,) opmath
  void* lse = nullptr;                    // (rows,) opmath
  int64_t ignore_index = -100;
  double label_smoothing = 0.0, z_loss = 0.0, softcap = 0.0;  // softcap 0: off
};
// The first out-of-range class index met (torch's "Target t is out of bounds"), if any.
struct CrossEntropyStatus {
  bool bad_target = false;
  int64_t target = 0;
};

// grad (rows, classes) *= scale (one opmath value per row, or one for all); rows whose scale is 1 are skipped.
struct CrossEntropyScaleArgs {
  ScalarKind kind = ScalarKind::Float;
  int64_t rows = 0, classes = 0;
  void* grad = nullptr;
  const void* scale = nullptr;
  bool scale_per_row = false;
};

// Each ISA gets its own copy of every kernel (see cpu/capability/*.cpp); dispatch.cpp picks one at run time.
#define FUSEDOPT_DECLARE_CPU_KERNELS(CAP)                                \
  namespace CAP {                                                        \
  void adafactor_step(const AdafactorArgs& args);                        \
  double grad_norm_power_sum(const GradNormArgs& args);                  \
  void scale_tensors(const ScaleArgs& args);                             \
  PointwiseLossResult mse_loss_fwd(const PointwiseLossArgs& args);      \
  PointwiseLossResult bce_loss_fwd(const PointwiseLossArgs& args);      \
  PointwiseLossResult bce_with_logits_fwd(const PointwiseLossArgs& args); \
  CrossEntropyStatus cross_entropy_fwd(const CrossEntropyArgs& args);    \
  void cross_entropy_scale_grad(const CrossEntropyScaleArgs& args);      \
  template <typename Op>                                                 \
  void optim_step(const OptimStepArgs<typename Op::Hyper>& args);        \
  template <typename Op>                                                 \
  void norm_optim_step(const OptimStepArgs<typename Op::Hyper>& args);   \
  }
FUSEDOPT_DECLARE_CPU_KERNELS(DEFAULT)
FUSEDOPT_DECLARE_CPU_KERNELS(AVX2)
FUSEDOPT_DECLARE_CPU_KERNELS(AVX512)
#undef FUSEDOPT_DECLARE_CPU_KERNELS

enum class Capability { DEFAULT, AVX2, AVX512 };
Capability capability();          // best ISA of this CPU, lowered by FUSEDOPT_CPU_CAPABILITY=default|avx2
bool byte_permutes();             // AVX-512 VBMI byte permutes too (not with FUSEDOPT_CPU_CAPABILITY=avx512)
const char* capability_name();

}  // namespace fusedopt::cpu
