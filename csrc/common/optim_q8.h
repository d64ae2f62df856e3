// Block-wise quantized optimizer states, int8, int4 and fp8 (docs/LOW_BIT_STATES.md, common/quant_format.h), shared
// by the CPU and CUDA bindings: the checks of a quantized step's lists and the Python entries <name>_step_q8 and
// <name>_step_q8_bucket (`state_dtype` "int8", "int4" or "fp8").
//
// A quantized state k is two tensors per param, codes (contiguous) and absmax (float32, one per block of consecutive
// elements), and its map table (float32). int8: uint8 codes of the param's shape, blocks of 256, the table
// kQuantMapSize floats (the 256 sorted code values, the 255 midpoints between neighbours and a NaN, then the
// kInt8LutWords 32-bit words of the CPU's lookup table, see fusedopt/lowbit.py _lookup_table, and the kInt8SlotWords
// of its register lookup, _slot_tables). int4: uint8 codes packed two per byte,
// (ceil(numel / 2),), element 2j in the high nibble of byte j; blocks of 128; the table kQuant4MapSize floats (16
// values, 15 midpoints, a NaN). fp8: float8_e4m3fn codes of the param's shape, blocks of 256, the table the 256 codes'
// values / 448, indexed by the code's bits. value = map[code] * absmax. A new value x of a block whose largest |x| is a
// gets, for int8 / int4, the code #{j : x / a >= mid[j]} (ties round up): a branchless binary search over the midpoints
// (CUDA, Triton, the torch backend), or on the CPU the lookup table and one comparison (int8) or 15 vector comparisons
// (int4), the same codes; for fp8 the float8_e4m3fn of x / a * 448, to nearest even. The engines dequantize a block,
// run the op's update on it and requantize it in the same pass (one read and one write of the codes, no full-precision
// copy of the state).
#pragma once
#include <torch/extension.h>

#include <array>
#include <string>
#include <vector>

#include "common/int8_tables.h"
#include "common/optim_binding.h"
#include "common/quant_format.h"
#include "common/tensor_bucket.h"

namespace fusedopt {

constexpr int64_t kQuantMapSize = 512 + kInt8LutWords + kInt8SlotWords;  // int8: code values, midpoints, lookup tables
constexpr int64_t kQuant4MapSize = 32;  // int4: 16 code values, 15 midpoints and a NaN
constexpr int64_t kQuantFp8MapSize = 256;  // fp8: each code's value

inline QuantKind quant_kind(const std::string& state_dtype, const std::string& op) {
  if (state_dtype == "int8") return QuantKind::kInt8;
  if (state_dtype == "int4") return QuantKind::kInt4;
  if (state_dtype == "fp8") return QuantKind::kFp8;
  TORCH_CHECK(false, op, ": state_dtype must be 'int8', 'int4' or 'fp8', got '", state_dtype, "'");
}
inline int64_t quant_map_size(QuantKind kind) {
  return kind == QuantKind::kInt4 ? kQuant4MapSize : kind == QuantKind::kFp8 ? kQuantFp8MapSize : kQuantMapSize;
}
inline int64_t quant_blocks(int64_t numel, QuantKind kind) {
  return (numel + quant_block_of(kind) - 1) / quant_block_of(kind);
}

// A quantized step's inputs after the checks. params and grads as in OptimStepInputs; codes[k], absmax[k] and
// qmap[k] empty / undefined for an unused state.
template <typename Op>
struct OptimStepQ8Inputs {
  TensorList params, grads, scalars;
  std::array<TensorList, Op::kStates> codes, absmax;
  std::array<at::Tensor, Op::kStates> qmap;
  typename Op::Hyper hyper{};
  std::optional<at::Tensor> grad_divisor, found_inf;
  std::optional<at::Tensor> stochastic_round;  // int64 [seed, counter], bf16 params only
  TensorList masters;  // float32 masters or int16 remainders of 16-bit params (optim_binding.h), or empty
  MasterKind master_kind = MasterKind::kNone;
  bool maximize = false, write_back_grads = false;
  QuantKind kind = QuantKind::kInt8;
};

template <typename Op>
OptimStepQ8Inputs<Op> check_optim_step_q8(const std::string& op, at::DeviceType device, ContiguousScope& scope,
                                          const TensorList& params, const TensorList& grads,
                                          const std::vector<TensorList>& codes,
                                          const std::vector<TensorList>& absmax, const TensorList& qmaps,
                                          const std::string& state_dtype, const TensorList& scalars,
                                          const HyperValues& hyper, bool maximize,
                                          const std::optional<at::Tensor>& grad_divisor,
                                          const std::optional<at::Tensor>& found_inf, bool write_back_grads,
                                          const std::optional<at::Tensor>& stochastic_round,
                                          const TensorList& masters) {
  const char* name = op.c_str();
  TORCH_CHECK(codes.size() == Op::kStates && absmax.size() == Op::kStates && qmaps.size() == Op::kStates, op, ": ",
              codes.size(), " code lists, ", absmax.size(), " absmax lists and ", qmaps.size(),
              " maps, the op has ", Op::kStates, " states");
  OptimStepQ8Inputs<Op> in;
  in.hyper = fill_hyper<typename Op::Hyper>(hyper, op);
  if constexpr (HasQuantizedStatesFlag<typename Op::Hyper>::value) in.hyper.quantized_states = true;
  check_params(params, name);
  const QuantKind kind = in.kind = quant_kind(state_dtype, op);
  const char* format = state_dtype.c_str();
  const int64_t map_size = quant_map_size(kind);
  const at::ScalarType codes_dtype = kind == QuantKind::kFp8 ? at::kFloat8_e4m3fn : at::kByte;
  TORCH_CHECK(params[0].scalar_type() != at::kDouble, op, ": quantized (", format,
              ") states need float32, bfloat16 or float16 params, got torch.float64");
  TORCH_CHECK(params[0].device().type() == device, op, ": params must be ",
              device == at::kCPU ? "on the CPU" : "CUDA tensors", ", got ", params[0].device());
  check_list(grads, params, "grads", name);
  in.master_kind = checked_masters<Op>(op, params, masters, stochastic_round);
  for (int k = 0; k < Op::kStates; ++k) {
    if (!state_used<Op>(in.hyper, k)) continue;
    const std::string sname = Op::kStateNames[k];
    TORCH_CHECK(codes[k].size() == params.size() && absmax[k].size() == params.size(), op, ": ", sname,
                " has ", codes[k].size(), " code tensors and ", absmax[k].size(), " absmax tensors, params has ",
                params.size());
    const at::Tensor& m = qmaps[k];
    TORCH_CHECK(m.defined() && m.scalar_type() == at::kFloat && m.numel() == map_size && m.is_contiguous() &&
                    m.device() == params[0].device(),
                op, ": the map of ", sname, " must be a contiguous float32 tensor of ", map_size,
                " values on the params' device (", format, ")");
    in.qmap[k] = m;
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& c = codes[k][i];
      const at::Tensor& a = absmax[k][i];
      const bool codes_ok = c.defined() && c.scalar_type() == codes_dtype && c.is_contiguous() &&
                            c.device() == params[i].device();
      if (kind != QuantKind::kInt4) {
        TORCH_CHECK(codes_ok && c.sizes() == params[i].sizes(), op, ": ", sname, "[", i,
                    "] codes must be a contiguous ", kind == QuantKind::kFp8 ? "torch.float8_e4m3fn" : "torch.uint8",
                    " tensor of its param's shape ", params[i].sizes(), " and device (", format, ")");
      } else {
        const int64_t packed = (params[i].numel() + 1) / 2;
        TORCH_CHECK(codes_ok && c.dim() == 1 && c.numel() == packed, op, ": ", sname, "[", i,
                    "] codes must be a contiguous torch.uint8 tensor of ", packed,
                    " values (two 4-bit codes per byte) on its param's device");
      }
      const int64_t blocks = quant_blocks(params[i].numel(), kind);
      TORCH_CHECK(a.defined() && a.scalar_type() == at::kFloat && a.dim() == 1 && a.numel() == blocks &&
                      a.is_contiguous() && a.device() == params[i].device(),
                  op, ": ", sname, "[", i, "] absmax must be a contiguous 1-D torch.float32 tensor of ", blocks,
                  " values (one per ", quant_block_of(kind), " elements) on its param's device");
    }
    in.codes[k] = codes[k];
    in.absmax[k] = absmax[k];
  }
  const bool has_scalars =
      Op::kScalar == TensorScalar::kStep || (Op::kScalar == TensorScalar::kFirstFlag && !scalars.empty());
  if (has_scalars) check_scalars(scalars, params, scalar_list_name<Op>(), name);
  in.maximize = maximize;
  in.grad_divisor = scalar_tensor_arg(grad_divisor, params[0], "grad_divisor", name);
  in.found_inf = scalar_tensor_arg(found_inf, params[0], "found_inf", name);
  in.write_back_grads = write_back_grads && in.grad_divisor.has_value();
  in.stochastic_round = checked_stochastic_round(stochastic_round, params, op);
  for (size_t i = 0; i < params.size(); ++i) {
    in.params.push_back(scope.write(params[i]));
    in.grads.push_back(scope.grad(grads[i], in.write_back_grads));
  }
  for (const auto& t : masters) in.masters.push_back(scope.write(t));
  if (has_scalars) in.scalars = scalars;
  return in;
}

// The same step on a TensorBucket [params, codes..., absmax..., scalars] (one codes and one absmax list per state,
// an unused one empty), without masters; false (nothing done) if a param has no grad. The lists are checked as
// <name>_step_q8 checks them, every step.
template <typename Backend, typename Op>
bool optim_step_q8_bucket_entry(TensorBucket& b, const TensorList& qmaps, const std::string& state_dtype, double lr,
                                const std::optional<at::Tensor>& lr_tensor, const HyperValues& hyper, bool maximize,
                                const std::optional<at::Tensor>& grad_divisor,
                                const std::optional<at::Tensor>& found_inf, bool write_back_grads,
                                const std::optional<at::Tensor>& stochastic_round) {
  const TensorList* grads = b.grads();
  if (grads == nullptr) return false;
  std::vector<TensorList> codes, absmax;
  for (int k = 0; k < Op::kStates; ++k) {
    codes.push_back(b.list(1 + k));
    absmax.push_back(b.list(1 + Op::kStates + k));
  }
  Backend::template run_q8<Op>(b.list(0), *grads, codes, absmax, qmaps, state_dtype, b.list(1 + 2 * Op::kStates), lr,
                               lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back_grads,
                               stochastic_round, TensorList{});
  b.release_grads();
  return true;
}

// <name>_step_q8(params, grads, codes, absmax, qmaps, state_dtype, scalars, lr, lr_tensor, hyper, maximize,
// grad_divisor, found_inf, write_back_grads, stochastic_round, masters): codes and absmax one list per state (an
// unused one empty), qmaps one map per state, state_dtype "int8", "int4" or "fp8", stochastic_round [seed, counter]
// or None, masters empty or one float32 master / int16 remainder per 16-bit param. <name>_step_q8_bucket(bucket,
// qmaps, state_dtype, lr, ...): the same on a TensorBucket, as optim_step_bucket_entry.
template <typename Backend>
void bind_optimizer_steps_q8(pybind11::module_& m) {
#define FUSEDOPT_BIND_Q8(Op)                                                                              \
  m.def((std::string(Op::kName) + "_step_q8").c_str(), &Backend::template run_q8<Op>,                    \
        "Engine-driven optimizer step with int8 / int4 / fp8 block-wise quantized states");             \
  m.def((std::string(Op::kName) + "_step_q8_bucket").c_str(), &optim_step_q8_bucket_entry<Backend, Op>, \
        "The low-bit step on a TensorBucket; False if a grad is None");
  FUSEDOPT_FOR_EACH_OPTIMIZER(FUSEDOPT_BIND_Q8)
#undef FUSEDOPT_BIND_Q8
}

}  // namespace fusedopt
