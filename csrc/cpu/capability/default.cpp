// Baseline x86-64 / any-arch build of the CPU kernels (ATen's generic Vectorized, auto-vectorised).
#include "cpu/capability/prelude.h"
#define CPU_CAPABILITY DEFAULT
#include "cpu/capability/all_kernels.inc"
