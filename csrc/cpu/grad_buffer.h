// Large CPU gradient buffers, pre-faulted on huge pages and reused (see grad_buffer.cpp).
#pragma once
#include <ATen/ATen.h>

namespace fusedopt::cpu {

// An uninitialised contiguous tensor shaped and typed like `like` (a CPU tensor).
at::Tensor empty_grad_buffer(const at::Tensor& like);

}  // namespace fusedopt::cpu
