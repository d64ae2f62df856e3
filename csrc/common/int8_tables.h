// int8's map table after its 256 code values and 256 midpoints: the CPU's lookup table, then its register lookup's
// tables, in 32-bit words (fusedopt/lowbit.py _lookup_table and LUT_SHIFT, _slot_tables and SLOT_WORDS).
#pragma once
#include <cstdint>

namespace fusedopt {
constexpr int64_t kInt8LutWords = 65536;
constexpr int64_t kInt8SlotWords = 352;
}  // namespace fusedopt
