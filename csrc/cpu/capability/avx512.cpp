// AVX-512 (F, BW, VL, DQ) build of the CPU kernels, chosen at run time.
#include "cpu/capability/prelude.h"
#if defined(__x86_64__) && !defined(_MSC_VER)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/capability/all_kernels.inc"
#pragma GCC pop_options
#else
#define CPU_CAPABILITY AVX512
#include "cpu/capability/all_kernels.inc"
#endif
