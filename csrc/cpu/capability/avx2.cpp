// AVX2 + FMA build of the CPU kernels, chosen at run time (see dispatch in bindings_cpu.cpp).
#include "cpu/capability/prelude.h"
#if defined(__x86_64__) && !defined(_MSC_VER)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// g++ does not define the ISA macros for #pragma GCC target in C++; ATen's and Sleef's headers need them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/capability/all_kernels.inc"
#pragma GCC pop_options
#else
// Not x86-64: alias the slot to the baseline kernels under this namespace.
#define CPU_CAPABILITY AVX2
#include "cpu/capability/all_kernels.inc"
#endif
