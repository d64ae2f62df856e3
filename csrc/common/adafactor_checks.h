// The boundary checks of an Adafactor bucket for the CPU and CUDA bindings, with the messages of
// fusedopt.reference.check_adafactor (the triton and torch backends): the first row_vars.size() params are matrices
// (dim >= 2) with torch's row_var (..., R, 1) and col_var (..., 1, C); the others have a `variance` of their shape.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

#include "common/tensor_lists.h"

namespace fusedopt {

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline void check_adafactor_factor(const at::Tensor& t, const std::vector<int64_t>& shape, const at::Tensor& p,
                                   const std::string& name, const std::string& op) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided, op, ": ", name,
              " is undefined or not a dense (strided) tensor");
  TORCH_CHECK(t.device() == p.device() && t.scalar_type() == p.scalar_type() && t.sizes() == at::IntArrayRef(shape),
              op, ": ", name, " must be a ", dtype_name(p.scalar_type()), " tensor of shape ", shape_str(shape),
              " on ", p.device().str(), " for its param of shape ", shape_str(p.sizes()), ", got ",
              dtype_name(t.scalar_type()), " ", shape_str(t.sizes()), " on ", t.device().str());
}

inline void check_adafactor(const std::string& op, const TensorList& params, const TensorList& grads,
                            const TensorList& row_vars, const TensorList& col_vars, const TensorList& variances,
                            const TensorList& steps) {
  const auto n = static_cast<int64_t>(params.size()), n_f = static_cast<int64_t>(row_vars.size());
  check_params(params, op.c_str());
  check_list(grads, params, "grads", op.c_str());
  check_scalars(steps, params, "steps", op.c_str());
  TORCH_CHECK(static_cast<int64_t>(col_vars.size()) == n_f && static_cast<int64_t>(variances.size()) == n - n_f, op,
              ": ", n_f, " row_vars, ", col_vars.size(), " col_vars and ", variances.size(), " variances for ", n,
              " params (a row_var and a col_var per matrix, a variance per other param)");
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK((i < n_f) == (p.dim() >= 2), op, ": params[", i, "] has ", p.dim(),
                " dims: the matrices (dim >= 2) come first, then the rest");
    if (p.numel() == 0) {  // torch.optim.Adafactor raises ZeroDivisionError (it divides by numel ** 0.5)
      const std::string msg = op + ": params[" + std::to_string(i) +
                              "] is empty: Adafactor divides by its size (torch.optim.Adafactor raises "
                              "ZeroDivisionError too)";
      PyErr_SetString(PyExc_ZeroDivisionError, msg.c_str());
      throw pybind11::error_already_set();
    }
    if (i < n_f) {
      std::vector<int64_t> row(p.sizes().begin(), p.sizes().end()), col = row;
      row.back() = 1;
      col[col.size() - 2] = 1;
      check_adafactor_factor(row_vars[i], row, p, "row_vars[" + std::to_string(i) + "]", op);
      check_adafactor_factor(col_vars[i], col, p, "col_vars[" + std::to_string(i) + "]", op);
    } else {
      const std::vector<int64_t> same(p.sizes().begin(), p.sizes().end());
      check_adafactor_factor(variances[i - n_f], same, p, "variances[" + std::to_string(i - n_f) + "]", op);
    }
  }
}

}  // namespace fusedopt
