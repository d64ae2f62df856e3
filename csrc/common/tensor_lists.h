// Checks shared by the CPU and CUDA bindings for the lists of tensors an optimizer step receives.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

namespace fusedopt {

using TensorList = std::vector<at::Tensor>;

inline void check_list(const TensorList& list, const TensorList& ref, const char* name, const char* op) {
  TORCH_CHECK(list.size() == ref.size(), op, ": ", name, " has ", list.size(), " tensors, params has ", ref.size());
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(list[i].defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(!list[i].is_sparse(), op, ": ", name, "[", i, "] is sparse; fusedopt supports dense tensors only");
    TORCH_CHECK(list[i].device() == ref[i].device(), op, ": ", name, "[", i, "] is on ", list[i].device(),
                " but its param is on ", ref[i].device());
    TORCH_CHECK(list[i].numel() == ref[i].numel(), op, ": ", name, "[", i, "] has ", list[i].numel(),
                " elements, its param ", ref[i].numel());
  }
}

inline void check_same_dtype(const TensorList& list, at::ScalarType dtype, const char* name, const char* op) {
  for (size_t i = 0; i < list.size(); ++i)
    TORCH_CHECK(list[i].scalar_type() == dtype, op, ": ", name, "[", i, "] is ", list[i].scalar_type(),
                ", expected ", dtype, " (one call handles one dtype group)");
}

inline void check_steps(const TensorList& steps, const TensorList& params, const char* op) {
  TORCH_CHECK(steps.size() == params.size(), op, ": steps has ", steps.size(), " tensors, params ", params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat, op,
                ": state 'step' must be a float32 scalar tensor (got ", steps[i].scalar_type(), ")");
    TORCH_CHECK(steps[i].device() == params[i].device(), op, ": step[", i, "] is on ", steps[i].device(),
                ", its param on ", params[i].device());
  }
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

inline std::optional<at::Tensor> scalar_tensor_arg(const std::optional<at::Tensor>& t, const at::Tensor& param,
                                                   const char* name, const char* op) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, got ", t->numel());
  TORCH_CHECK(t->device() == param.device(), op, ": ", name, " is on ", t->device(), ", params on ", param.device());
  return t->to(at::kFloat);
}

}  // namespace fusedopt
