// The CUDA engine's path for int8 / int4 / fp8 block-wise states (common/optim_q8.h, docs/LOW_BIT_STATES.md): one
// warp per quantization block (int8 and fp8: 256 elements, 8 consecutive values per lane; int4: 128, 4 per lane, so
// a lane's codes are two whole bytes). Each lane dequantizes its values through the state's map (in shared memory),
// runs the op's update (common/<op>_math.h) as the full-precision engine does, then the warp reduces the block's
// absmax by shuffles (NaN if a value is NaN) and every lane requantizes its values by the branchless binary search
// over the midpoints (8 or 4 steps, fusedopt/lowbit.py's definition), or for fp8 by common/quant_format.h's
// e4m3fn_code; int4 codes are packed two per byte, the even element in the high nibble. The table is [params,
// grads, codes..., scalars, absmax..., masters]; under master weights (a runtime kind, warp-uniform: no further
// instantiations) the param is read from and written to its master as optim_engine.cuh does. Compile-checked; run by scripts/gpu_check.sh on a GPU machine (int4 and fp8
// not yet run on a GPU).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdint>

#include "common/optimizers.h"
#include "common/quant_format.h"
#include "common/stochastic_round.h"
#include "cuda/kernels.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/optim_engine.cuh"

namespace fusedopt::cuda {

// A format's block, the map's levels, the part of its table the kernel reads (values, and midpoints for the
// searched formats) and each lane's share of a block.
template <QuantKind kKind>
struct QuantFormatCuda {
  static constexpr int kBlock = kKind == QuantKind::kInt4 ? 128 : 256;
  static constexpr int kLevels = kKind == QuantKind::kInt4 ? 16 : 256;
  static constexpr int kMapSize = kKind == QuantKind::kFp8 ? kLevels : 2 * kLevels;
  static constexpr int kPerLane = kBlock / 32;  // even: a lane's int4 codes are whole bytes
};

// Element i's code: int8 / fp8 one byte each; int4 element 2j the high nibble of byte j, 2j + 1 the low one.
template <QuantKind kKind>
__device__ __forceinline__ int load_code(const uint8_t* codes, int64_t i) {
  if constexpr (kKind == QuantKind::kInt4) {
    const int byte = codes[i >> 1];
    return (i & 1) == 0 ? byte >> 4 : byte & 15;
  } else {
    return codes[i];
  }
}

template <typename Op, typename T, QuantKind kKind>
struct OptimQ8Functor {
  using F = QuantFormatCuda<kKind>;
  using S = float;  // low-bit states take float32, bfloat16 and float16 params: opmath is float
  static constexpr int kStates = Op::kStates;
  static constexpr int kSlots = kStates > 0 ? kStates : 1;
  static constexpr int kLists = 2 * kStates + 4;  // params, grads, codes..., scalars, absmax..., masters
  static constexpr int kScalarList = kStates + 2;
  static constexpr int kMasterList = 2 * kStates + 3;

  typename Op::Hyper hyper;
  double lr;
  const float* lr_ptr;
  const float* grad_divisor;
  const float* found_inf;
  const int64_t* stochastic_round;  // [seed, counter]: bf16 params stored by stochastic rounding, or null
  bool maximize, write_back_grads;
  const float* qmap[kSlots];  // per state: the codes' values, then (int8 / int4) the midpoints (device); null: unused
  MasterKind master_kind;     // kFloat32 / kRemainder: 16-bit params with masters (the bindings check the dtypes)

  // The param's value and its store, through its master when there is one.
  __device__ __forceinline__ S load_param(const T& param, void* master, int64_t i) const {
    if (master_kind == MasterKind::kFloat32)
      return load_param_value<MasterKind::kFloat32, T, S>(param, static_cast<const float*>(master), i);
    if (master_kind == MasterKind::kRemainder)
      return load_param_value<MasterKind::kRemainder, T, S>(param, static_cast<const int16_t*>(master), i);
    return S(param);
  }
  __device__ __forceinline__ void store_param(S p, T& param, void* master, int64_t i, uint32_t sr_key) const {
    if (master_kind == MasterKind::kFloat32)
      return store_param_value<MasterKind::kFloat32>(p, param, static_cast<float*>(master), i, false, sr_key);
    if (master_kind == MasterKind::kRemainder)
      return store_param_value<MasterKind::kRemainder>(p, param, static_cast<int16_t*>(master), i, false, sr_key);
    param = stored_param<T>(p, stochastic_round != nullptr, sr_key, i);
  }

  __device__ void operator()(const TensorTable<kLists>& tab, int64_t t, int64_t begin, int64_t end) const {
    __shared__ float smap[kSlots][F::kMapSize];
    for (int k = 0; k < kStates; ++k)
      if (qmap[k] != nullptr)
        for (int i = threadIdx.x; i < F::kMapSize; i += blockDim.x) smap[k][i] = qmap[k][i];
    __syncthreads();
    if (found_inf != nullptr && *found_inf != 0.0f) return;
    const double lr_value = lr_ptr != nullptr ? static_cast<double>(*lr_ptr) : lr;
    const float* scalar = tab.template ptr<float>(kScalarList, t);
    const auto c = Op::template coefs<S>(hyper, lr_value, scalar != nullptr ? static_cast<double>(*scalar) : 0.0);
    const S grad_factor = grad_divisor != nullptr ? S(1.0 / static_cast<double>(*grad_divisor)) : S(1);
    const uint32_t sr_key =
        stochastic_round_key(stochastic_round, t);
    T* param = tab.template ptr<T>(0, t);
    T* grad = tab.template ptr<T>(1, t);
    void* master = tab.template ptr<char>(kMasterList, t);  // null without master weights
    uint8_t* codes[kSlots];
    float* absmax[kSlots];
    for (int k = 0; k < kStates; ++k) {
      codes[k] = tab.template ptr<uint8_t>(2 + k, t);  // null: unused (uses_state)
      absmax[k] = tab.template ptr<float>(kScalarList + 1 + k, t);
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    // begin is a multiple of kChunkElems, so of 256: every warp iteration is one whole quantization block.
    for (int64_t qb = begin + static_cast<int64_t>(warp) * F::kBlock; qb < end;
         qb += static_cast<int64_t>(warps) * F::kBlock) {
      const int64_t q = qb / F::kBlock;
      const int64_t base = qb + lane * F::kPerLane;
      S s[F::kPerLane][kSlots];
#pragma unroll
      for (int e = 0; e < F::kPerLane; ++e) {
        const int64_t i = base + e;
        for (int k = 0; k < kStates; ++k)
          s[e][k] = (codes[k] != nullptr && i < end) ? smap[k][load_code<kKind>(codes[k], i)] * absmax[k][q] : S(0);
        if (i < end) {
          S p = load_param(param[i], master, i);
          S g = unscaled_grad<T>(grad[i], grad_factor, write_back_grads);
          if (maximize) g = -g;
          Op::template update<S>(c, p, g, s[e]);
          store_param(p, param[i], master, i, sr_key);
        }
      }
      for (int k = 0; k < kStates; ++k) {
        if (codes[k] == nullptr) continue;
        float m = 0.0f;
        bool nan = false;
#pragma unroll
        for (int e = 0; e < F::kPerLane; ++e) {
          const float a = base + e < end ? fabsf(s[e][k]) : 0.0f;
          nan = nan || a != a;
          m = fmaxf(m, a);
        }
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, offset));
        nan = __any_sync(0xffffffffu, nan);
        const float a = nan ? __int_as_float(0x7fc00000) : m;
        const float d = a > 0.0f ? a : 1.0f;
        const float* mid = smap[k] + F::kLevels;
        int code[F::kPerLane];
#pragma unroll
        for (int e = 0; e < F::kPerLane; ++e) {
          code[e] = 0;  // past the end: int4's padding nibble is 0
          if (base + e >= end) continue;
          const float x = __fdiv_rn(s[e][k], d);
          if constexpr (kKind == QuantKind::kFp8) {
            code[e] = e4m3fn_code(__float_as_uint(__fmul_rn(x, 448.0f)));
          } else {
#pragma unroll
            for (int step = F::kLevels / 2; step >= 1; step >>= 1) code[e] += x >= mid[code[e] + step - 1] ? step : 0;
          }
        }
#pragma unroll
        for (int e = 0; e < F::kPerLane; e += (kKind == QuantKind::kInt4 ? 2 : 1)) {
          if (base + e >= end) continue;
          if constexpr (kKind == QuantKind::kInt4) {
            codes[k][(base + e) >> 1] = static_cast<uint8_t>((code[e] << 4) | code[e + 1]);
          } else {
            codes[k][base + e] = static_cast<uint8_t>(code[e]);
          }
        }
        if (lane == 0) absmax[k][q] = a;
      }
    }
  }
};

template <typename Op>
using Q8Table = DeviceTable<OptimQ8Functor<Op, float, QuantKind::kInt8>::kLists>;

template <typename Op, typename T, QuantKind kKind>
void launch_q8(const Q8Table<Op>& table, const OptimQ8Launch<typename Op::Hyper>& a) {
  OptimQ8Functor<Op, T, kKind> fn{a.hyper,     a.lr,       a.lr_ptr,           a.grad_divisor, a.found_inf,
                                  a.stochastic_round, a.maximize, a.write_back_grads, {},       a.master_kind};
  for (int k = 0; k < Op::kStates; ++k) fn.qmap[k] = a.qmap[k];
  launch(table, fn);
}

// One format's launches for every param dtype, as explicit instantiations (Prefix empty) or declarations of them
// (Prefix extern). fp8's kernels are compiled in a translation unit of their own (cuda/optimizers_fp8.cu), so that
// a two-job build compiles them beside the rest (cuda/optimizers.cu, which declares them extern).
#define FUSEDOPT_Q8_LAUNCHES(Prefix, Op, Kind)                                                                 \
  Prefix template void launch_q8<Op, float, Kind>(const Q8Table<Op>&, const OptimQ8Launch<Op::Hyper>&);        \
  Prefix template void launch_q8<Op, at::Half, Kind>(const Q8Table<Op>&, const OptimQ8Launch<Op::Hyper>&);     \
  Prefix template void launch_q8<Op, at::BFloat16, Kind>(const Q8Table<Op>&, const OptimQ8Launch<Op::Hyper>&);

template <typename Op>
void optim_step_q8(const OptimQ8Launch<typename Op::Hyper>& a) {
  constexpr int kLists = OptimQ8Functor<Op, float, QuantKind::kInt8>::kLists;
  constexpr int kScalarList = OptimQ8Functor<Op, float, QuantKind::kInt8>::kScalarList;
  const auto& params = *a.params;
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::array<const TensorList*, kLists> lists{};
  lists[0] = a.params;
  lists[1] = a.grads;
  for (int k = 0; k < Op::kStates; ++k) {
    lists[2 + k] = a.codes[k];  // an unused state's lists are empty: null addresses
    lists[kScalarList + 1 + k] = a.absmax[k];
  }
  lists[kScalarList] = a.scalars;
  const TensorList no_masters;
  lists[OptimQ8Functor<Op, float, QuantKind::kInt8>::kMasterList] = a.masters != nullptr ? a.masters : &no_masters;
  auto table = build_table<kLists>(lists);
  const bool has_scalars = !a.scalars->empty();
  if (Op::kScalar == TensorScalar::kStep && has_scalars) update_scalars(table, kScalarList, a.found_inf, 1.0f, 1.0f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "fusedopt_optim_step_q8", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (a.kind == QuantKind::kInt4)
        launch_q8<Op, scalar_t, QuantKind::kInt4>(table, a);
      else if (a.kind == QuantKind::kFp8)
        launch_q8<Op, scalar_t, QuantKind::kFp8>(table, a);
      else
        launch_q8<Op, scalar_t, QuantKind::kInt8>(table, a);
    } else {
      TORCH_CHECK(false, "fusedopt ", Op::kName, "_step_q8 (cuda): float64 params have no low-bit states");
    }
  });
  if (Op::kScalar == TensorScalar::kFirstFlag && has_scalars)
    update_scalars(table, kScalarList, a.found_inf, 0.0f, 0.0f);  // the first step is done
}

}  // namespace fusedopt::cuda
