// An optimizer bucket's tensor lists held in C++ across steps, for the CPU and CUDA bindings: a step then converts
// no Python lists, and the grads are read from the params here (p.grad() costs nanoseconds; boxing 10^4 tensors
// through pybind costs milliseconds).
#pragma once
#include <torch/extension.h>

#include <utility>
#include <vector>

#include "common/tensor_lists.h"

namespace fusedopt {

class TensorBucket {
 public:
  // lists[0] are the params; the others (optimizer state) have one tensor per param, or none.
  explicit TensorBucket(std::vector<TensorList> lists) : lists_(std::move(lists)) {
    TORCH_CHECK(!lists_.empty(), "fusedopt TensorBucket: needs the params list");
  }

  const TensorList& list(size_t i) const { return lists_.at(i); }

  // The params' current grads, or nullptr when one has none (the caller then takes the Python list path).
  const TensorList* grads() {
    grads_.clear();
    grads_.reserve(lists_[0].size());
    for (const auto& p : lists_[0]) {
      const at::Tensor& g = p.grad();
      if (!g.defined()) return nullptr;
      grads_.push_back(g);
    }
    return &grads_;
  }

  void release_grads() { grads_.clear(); }  // hold no grad between steps

 private:
  std::vector<TensorList> lists_;
  TensorList grads_;
};

// Binds the class into one extension. module_local: _C and _cuda each register their own copy.
inline void bind_tensor_bucket(pybind11::module_& m) {
  pybind11::class_<TensorBucket>(m, "TensorBucket", pybind11::module_local(),
                                 "An optimizer bucket's tensor lists kept in C++ across steps")
      .def(pybind11::init<std::vector<TensorList>>());
}

}  // namespace fusedopt
