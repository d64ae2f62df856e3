// Checks shared by the CPU and CUDA bindings for the lists of tensors an optimizer step receives.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

namespace fusedopt {

using TensorList = std::vector<at::Tensor>;

// The checks every backend makes on an optimizer step's lists, with the same messages: fusedopt/_checks.py is the
// Python twin used by the triton and torch backends. Order: the params group, then each list, then the scalars.
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline std::string device_name(const at::Device& d) { return d.str(); }

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// params: dense, of one device and one supported floating dtype (one call handles one (device, dtype) group).
inline void check_params(const TensorList& params, const char* op) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), op, ": params[", i, "] is undefined (None)");
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i,
                "] is not a dense (strided) tensor; fusedopt supports dense tensors only");
    TORCH_CHECK(p.device() == params[0].device(), op, ": params[", i, "] is on ", device_name(p.device()),
                ", params[0] on ", device_name(params[0].device()), " (one call handles one device)");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), op, ": params[", i, "] is ", dtype_name(p.scalar_type()),
                ", params[0] ", dtype_name(params[0].scalar_type()), " (one call handles one dtype)");
  }
  if (!params.empty())
    TORCH_CHECK(is_supported_float(params[0].scalar_type()), op, ": params of dtype ",
                dtype_name(params[0].scalar_type()),
                " are not supported (torch.float32, torch.float64, torch.bfloat16 and torch.float16 are)");
}

// One tensor per param, matching it in device, shape and dtype (a kernel reads each with its param's extent); the
// dtype is `dtype` when given (float32 states beside 16-bit params with master weights, int16 remainders).
inline void check_list(const TensorList& list, const TensorList& params, const char* name, const char* op,
                       std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(list.size() == params.size(), op, ": ", name, " has ", list.size(), " tensors, params has ",
              params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined (None)");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i,
                "] is not a dense (strided) tensor; fusedopt supports dense tensors only");
    TORCH_CHECK(t.device() == p.device(), op, ": ", name, "[", i, "] is on ", device_name(t.device()),
                ", its param on ", device_name(p.device()));
    TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), ", its param ",
                p.sizes());
    if (dtype.has_value()) {
      TORCH_CHECK(t.scalar_type() == *dtype, op, ": ", name, "[", i, "] is ", dtype_name(t.scalar_type()),
                  ", expected ", dtype_name(*dtype), " (master weights)");
    } else {
      TORCH_CHECK(t.scalar_type() == p.scalar_type(), op, ": ", name, "[", i, "] is ", dtype_name(t.scalar_type()),
                  ", its param ", dtype_name(p.scalar_type()));
    }
  }
}

// One float32 scalar per param on its device (the state 'step', SGD's first-step flags).
inline void check_scalars(const TensorList& list, const TensorList& params, const char* name, const char* op) {
  TORCH_CHECK(list.size() == params.size(), op, ": ", name, " has ", list.size(), " tensors, params has ",
              params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.defined() && t.layout() == at::kStrided && t.numel() == 1 && t.scalar_type() == at::kFloat &&
                    t.device() == params[i].device(),
                op, ": ", name, "[", i, "] must be a one-element torch.float32 tensor on its param's device");
  }
}

// Tensors of one dtype group (grad norms, scaling).
inline void check_same_dtype(const TensorList& list, at::ScalarType dtype, const char* name, const char* op) {
  for (size_t i = 0; i < list.size(); ++i)
    TORCH_CHECK(list[i].scalar_type() == dtype, op, ": ", name, "[", i, "] is ", dtype_name(list[i].scalar_type()),
                ", expected ", dtype_name(dtype), " (one call handles one dtype group)");
}

// Kernels read every tensor of an index with one flat offset, so a tensor whose layout differs (non-contiguous
// param, grad with other strides) runs on contiguous copies that are written back afterwards. Rare in practice.
class ContiguousScope {
 public:
  at::Tensor read(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    keepalive_.push_back(t.contiguous());
    return keepalive_.back();
  }
  // A grad the kernel reads, or also writes (the unscaled grad stored back under GradScaler).
  at::Tensor grad(const at::Tensor& t, bool written) { return written ? write(t) : read(t); }
  at::Tensor write(const at::Tensor& t) {
    if (t.is_contiguous()) return t;
    at::Tensor copy = t.contiguous();
    writebacks_.emplace_back(t, copy);
    return copy;
  }
  ~ContiguousScope() noexcept(false) {
    for (auto& [dst, src] : writebacks_) dst.copy_(src);
  }

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks_;
  std::vector<at::Tensor> keepalive_;
};

inline const float* float_ptr(const std::optional<at::Tensor>& t) { return t ? t->data_ptr<float>() : nullptr; }

// Whether an optional scalar argument (grad_divisor, found_inf) was given.
inline bool tensor_given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline std::optional<at::Tensor> scalar_tensor_arg(const std::optional<at::Tensor>& t, const at::Tensor& param,
                                                   const char* name, const char* op) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, got ", t->numel());
  TORCH_CHECK(t->device() == param.device(), op, ": ", name, " is on ", t->device(), ", params on ", param.device());
  return t->to(at::kFloat);
}

}  // namespace fusedopt
