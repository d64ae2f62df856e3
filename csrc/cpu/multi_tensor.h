// The CPU multi-tensor engine: one parallel region over fixed-size chunks of every tensor of a group,
// so 2000 small tensors cost one fork/join, not 2000.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fusedopt::cpu {

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// 32K elements: big enough to amortise the per-chunk setup, small enough to balance 2 to 64 threads.
constexpr int64_t kChunkElems = 32768;

inline std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numel) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numel.size()); ++t)
    for (int64_t b = 0; b < numel[t]; b += kChunkElems) chunks.push_back({t, b, std::min(numel[t], b + kChunkElems)});
  return chunks;
}

// Calls fn(tensor_index, begin, end) for every chunk, in parallel.
template <typename Fn>
void for_each_chunk(const std::vector<int64_t>& numel, const Fn& fn) {
  const std::vector<Chunk> chunks = split_into_chunks(numel);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) fn(chunks[i].tensor, chunks[i].begin, chunks[i].end);
  });
}

// The reduction form: fn(tensor_index, begin, end) returns each chunk's partial, in parallel; the partials are
// then combined in chunk order, so the result does not depend on the thread count.
template <typename Acc, typename Fn, typename Combine>
Acc reduce_chunks(const std::vector<int64_t>& numel, Acc init, const Fn& fn, const Combine& combine) {
  const std::vector<Chunk> chunks = split_into_chunks(numel);
  std::vector<Acc> partial(chunks.size(), init);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) partial[i] = fn(chunks[i].tensor, chunks[i].begin, chunks[i].end);
  });
  Acc total = init;
  for (const Acc& x : partial) total = combine(total, x);
  return total;
}

}  // namespace fusedopt::cpu
