// 8-bit block-wise quantized optimizer states (docs/LOW_BIT_STATES.md), shared by the CPU and CUDA bindings: the
// checks of a quantized step's lists and the Python entries <name>_step_q8.
//
// A quantized state k is two tensors per param: codes (uint8, the param's shape, contiguous) and absmax (float32,
// ceil(numel / 256), one per block of 256 consecutive elements), and its map table (float32, kQuantMapSize: the 256
// sorted code values, the 255 midpoints between neighbours and a NaN, then 65536 bytes of lookup table and 4 of padding, see
// fusedopt/lowbit.py). value = map[code] * absmax; a new value x of a block whose largest |x| is a gets the code
// #{j : x / a >= mid[j]} (ties round up): an 8-step binary search over the midpoints (CUDA, Triton, the torch
// backend) or the lookup table and one comparison (CPU), the same codes.
// The engines dequantize a block, run the op's update on it and requantize it in the same pass (one read and one
// write of the codes, no full-precision copy of the state).
#pragma once
#include <torch/extension.h>

#include <array>
#include <string>
#include <vector>

#include "common/optim_binding.h"

namespace fusedopt {

constexpr int64_t kQuantBlock = 256;  // values per absmax
constexpr int64_t kQuantMapSize = 512 + 65536 / 4 + 1;  // code values, midpoints, lookup table, padding

inline int64_t quant_blocks(int64_t numel) { return (numel + kQuantBlock - 1) / kQuantBlock; }

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
};

template <typename Op>
OptimStepQ8Inputs<Op> check_optim_step_q8(const std::string& op, at::DeviceType device, ContiguousScope& scope,
                                          const TensorList& params, const TensorList& grads,
                                          const std::vector<TensorList>& codes,
                                          const std::vector<TensorList>& absmax, const TensorList& qmaps,
                                          const TensorList& scalars, const HyperValues& hyper, bool maximize,
                                          const std::optional<at::Tensor>& grad_divisor,
                                          const std::optional<at::Tensor>& found_inf, bool write_back_grads) {
  const char* name = op.c_str();
  TORCH_CHECK(codes.size() == Op::kStates && absmax.size() == Op::kStates && qmaps.size() == Op::kStates, op, ": ",
              codes.size(), " code lists, ", absmax.size(), " absmax lists and ", qmaps.size(),
              " maps, the op has ", Op::kStates, " states");
  OptimStepQ8Inputs<Op> in;
  in.hyper = fill_hyper<typename Op::Hyper>(hyper, op);
  check_params(params, name);
  TORCH_CHECK(params[0].scalar_type() != at::kDouble, op,
              ": quantized (int8) states need float32, bfloat16 or float16 params, got torch.float64");
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
    TORCH_CHECK(m.defined() && m.scalar_type() == at::kFloat && m.numel() == kQuantMapSize && m.is_contiguous() &&
                    m.device() == params[0].device(),
                op, ": the map of ", sname, " must be a contiguous float32 tensor of ", kQuantMapSize,
                " values on the params' device");
    in.qmap[k] = m;
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& c = codes[k][i];
      const at::Tensor& a = absmax[k][i];
      TORCH_CHECK(c.defined() && c.scalar_type() == at::kByte && c.sizes() == params[i].sizes() &&
                      c.is_contiguous() && c.device() == params[i].device(),
                  op, ": ", sname, "[", i, "] codes must be a contiguous torch.uint8 tensor of its param's shape ",
                  params[i].sizes(), " and device");
      TORCH_CHECK(a.defined() && a.scalar_type() == at::kFloat && a.dim() == 1 &&
                      a.numel() == quant_blocks(params[i].numel()) && a.is_contiguous() &&
                      a.device() == params[i].device(),
                  op, ": ", sname, "[", i, "] absmax must be a contiguous 1-D torch.float32 tensor of ",
                  quant_blocks(params[i].numel()), " values (one per 256 elements) on its param's device");
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

// <name>_step_q8(params, grads, codes, absmax, qmaps, scalars, lr, lr_tensor, hyper, maximize, grad_divisor,
// found_inf, write_back_grads): codes and absmax one list per state (an unused one empty), qmaps one map per state.
template <typename Backend>
void bind_optimizer_steps_q8(pybind11::module_& m) {
#define FUSEDOPT_BIND_Q8(Op)                                                                              \
  m.def((std::string(Op::kName) + "_step_q8").c_str(), &Backend::template run_q8<Op>,                    \
        "Engine-driven optimizer step with 8-bit block-wise quantized states");
  FUSEDOPT_FOR_EACH_OPTIMIZER(FUSEDOPT_BIND_Q8)
#undef FUSEDOPT_BIND_Q8
}

}  // namespace fusedopt
