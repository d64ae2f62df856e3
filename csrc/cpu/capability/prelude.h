// Headers every capability TU shares, included BEFORE the ISA pragma so that std/c10/ATen inline functions are
// compiled for the baseline ISA only (an AVX2 copy of a shared inline function could win at link time and run
// on a CPU without AVX2). Only code in the CPU_CAPABILITY namespaces is compiled for the wider ISA.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/value_ops.h"
#include "cpu/kernels.h"
#include "cpu/multi_tensor.h"
