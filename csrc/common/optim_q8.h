// Block-wise quantized optimizer states, int8 and int4 (docs/LOW_BIT_STATES.md), shared by the CPU and CUDA
// bindings: the checks of a quantized step's lists and the Python entries <name>_step_q8 (`bits` 8 or 4).
//
// A quantized state k is two tensors per param, codes (uint8, contiguous) and absmax (float32, one per block of
// consecutive elements), and its map table (float32). int8: codes of the param's shape, blocks of 256, the table
// kQuantMapSize floats (the 256 sorted code values, the 255 midpoints between neighbours and a NaN, then 65536 bytes
// of lookup table and 4 of padding, see fusedopt/lowbit.py). int4: codes packed two per byte, (ceil(numel / 2),),
// element 2j in the high nibble of byte j; blocks of 128; the table kQuant4MapSize floats (16 values, 15 midpoints,
// a NaN). value = map[code] * absmax; a new value x of a block whose largest |x| is a gets the code
// #{j : x / a >= mid[j]} (ties round up): a branchless binary search over the midpoints (CUDA, Triton, the torch
// backend), or on the CPU the lookup table and one comparison (int8) or 15 vector comparisons (int4), the same codes.
// The engines dequantize a block, run the op's update on it and requantize it in the same pass (one read and one
// write of the codes, no full-precision copy of the state).
#pragma once
#include <torch/extension.h>

#include <array>
#include <string>
#include <vector>

#include "common/optim_binding.h"

namespace fusedopt {

constexpr int64_t kQuantBlock = 256;  // int8: values per absmax
constexpr int64_t kQuantMapSize = 512 + 65536 / 4 + 1;  // code values, midpoints, lookup table, padding
constexpr int64_t kQuant4Block = 128;  // int4: values per absmax
constexpr int64_t kQuant4MapSize = 32;  // 16 code values, 15 midpoints and a NaN

inline int64_t quant_block_size(int64_t bits) { return bits == 4 ? kQuant4Block : kQuantBlock; }
inline int64_t quant_blocks(int64_t numel, int64_t bits = 8) {
  return (numel + quant_block_size(bits) - 1) / quant_block_size(bits);
}
inline int64_t quant_codes_numel(int64_t numel, int64_t bits) { return bits == 4 ? (numel + 1) / 2 : numel; }

// A quantized step's inputs after the checks. params and grads as in OptimStepInputs; codes[k], absmax[k] and
// qmap[k] empty / undefined for an unused state.
template <typename Op>
struct OptimStepQ8Inputs {
  TensorList params, grads, scalars;
  std::array<TensorList, Op::kStates> codes, absmax;
  std::array<at::Tensor, Op::kStates> qmap;
  typename Op::Hyper hyper{};
  std::optional<at::Tensor> grad_divisor, found_inf;
  bool maximize = false, write_back_grads = false;
  int64_t bits = 8;  // 8: int8 codes, 4: int4 codes
};

template <typename Op>
OptimStepQ8Inputs<Op> check_optim_step_q8(const std::string& op, at::DeviceType device, ContiguousScope& scope,
                                          const TensorList& params, const TensorList& grads,
                                          const std::vector<TensorList>& codes,
                                          const std::vector<TensorList>& absmax, const TensorList& qmaps,
                                          int64_t bits, const TensorList& scalars, const HyperValues& hyper,
                                          bool maximize,
                                          const std::optional<at::Tensor>& grad_divisor,
                                          const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  const char* name = op.c_str();
  TORCH_CHECK(codes.size() == Op::kStates && absmax.size() == Op::kStates && qmaps.size() == Op::kStates, op, ": ",
              codes.size(), " code lists, ", absmax.size(), " absmax lists and ", qmaps.size(),
              " maps, the op has ", Op::kStates, " states");
  OptimStepQ8Inputs<Op> in;
  in.hyper = fill_hyper<typename Op::Hyper>(hyper, op);
  if constexpr (HasQuantizedStatesFlag<typename Op::Hyper>::value) in.hyper.quantized_states = true;
  check_params(params, name);
  TORCH_CHECK(bits == 8 || bits == 4, op, ": bits must be 8 (int8 states) or 4 (int4 states), got ", bits);
  in.bits = bits;
  const char* format = bits == 4 ? "int4" : "int8";
  const int64_t map_size = bits == 4 ? kQuant4MapSize : kQuantMapSize;
  TORCH_CHECK(params[0].scalar_type() != at::kDouble, op, ": quantized (", format,
              ") states need float32, bfloat16 or float16 params, got torch.float64");
  TORCH_CHECK(params[0].device().type() == device, op, ": params must be ",
              device == at::kCPU ? "on the CPU" : "CUDA tensors", ", got ", params[0].device());
  check_list(grads, params, "grads", name);
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
      const bool codes_ok = c.defined() && c.scalar_type() == at::kByte && c.is_contiguous() &&
                            c.device() == params[i].device();
      if (bits == 8) {
        TORCH_CHECK(codes_ok && c.sizes() == params[i].sizes(), op, ": ", sname, "[", i,
                    "] codes must be a contiguous torch.uint8 tensor of its param's shape ", params[i].sizes(),
                    " and device");
      } else {
        const int64_t packed = quant_codes_numel(params[i].numel(), bits);
        TORCH_CHECK(codes_ok && c.dim() == 1 && c.numel() == packed, op, ": ", sname, "[", i,
                    "] codes must be a contiguous torch.uint8 tensor of ", packed,
                    " values (two 4-bit codes per byte) on its param's device");
      }
      const int64_t blocks = quant_blocks(params[i].numel(), bits);
      TORCH_CHECK(a.defined() && a.scalar_type() == at::kFloat && a.dim() == 1 && a.numel() == blocks &&
                      a.is_contiguous() && a.device() == params[i].device(),
                  op, ": ", sname, "[", i, "] absmax must be a contiguous 1-D torch.float32 tensor of ", blocks,
                  " values (one per ", quant_block_size(bits), " elements) on its param's device");
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
  for (size_t i = 0; i < params.size(); ++i) {
    in.params.push_back(scope.write(params[i]));
    in.grads.push_back(scope.grad(grads[i], in.write_back_grads));
  }
  if (has_scalars) in.scalars = scalars;
  return in;
}

// <name>_step_q8(params, grads, codes, absmax, qmaps, bits, scalars, lr, lr_tensor, hyper, maximize, grad_divisor,
// found_inf, write_back_grads): codes and absmax one list per state (an unused one empty), qmaps one map per state,
// bits 8 (int8) or 4 (int4).
template <typename Backend>
void bind_optimizer_steps_q8(pybind11::module_& m) {
#define FUSEDOPT_BIND_Q8(Op)                                                                              \
  m.def((std::string(Op::kName) + "_step_q8").c_str(), &Backend::template run_q8<Op>,                    \
        "Engine-driven optimizer step with int8 / int4 block-wise quantized states");
  FUSEDOPT_FOR_EACH_OPTIMIZER(FUSEDOPT_BIND_Q8)
#undef FUSEDOPT_BIND_Q8
}

}  // namespace fusedopt
