// The one CUDA multi-tensor engine: every tensor of a (device, dtype) group is cut into fixed-size chunks and the
// whole group is updated by ONE launch, one block per chunk. The table of addresses lives in device memory (built
// in pinned host memory, copied asynchronously), so 10000 tensors cost one small copy and one launch, no sync.
// Under CUDA graph capture the table is written by kernels instead (see build_table).
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

namespace fusedopt::cuda {

constexpr int kBlockThreads = 512;
constexpr int64_t kChunkElems = 65536;  // per block; a multiple of every vector width

// Device view of the table. Sizes and offsets are 64-bit: a tensor may have more than 2^31 elements.
template <int kLists>
struct TensorTable {
  const int64_t* addrs;      // [kLists][n] raw addresses (0 for an absent list)
  const int64_t* numel;      // [n]
  const int64_t* block_map;  // [blocks]: tensor index << 32 | chunk index
  int64_t n;

  template <typename T>
  __device__ __forceinline__ T* ptr(int list, int64_t t) const {
    return reinterpret_cast<T*>(addrs[list * n + t]);
  }
};

template <int kLists, typename Functor>
__global__ void __launch_bounds__(kBlockThreads) multi_tensor_kernel(TensorTable<kLists> table, Functor fn) {
  const int64_t entry = table.block_map[blockIdx.x];
  const int64_t t = entry >> 32;
  const int64_t begin = (entry & 0xffffffffLL) * kChunkElems;
  const int64_t end = min(table.numel[t], begin + kChunkElems);
  fn(table, t, begin, end);
}

// The per-tensor float32 scalars of list `list`: s = s * keep + add, unless GradScaler found an inf. One thread per
// tensor. The step prologue is (1, 1); the first-step flags' epilogue, stream-ordered after the update, (0, 0).
template <int kLists>
__global__ void update_scalars_kernel(TensorTable<kLists> table, int list, const float* found_inf, float keep,
                                      float add) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= table.n) return;
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  float* s = table.template ptr<float>(list, t);
  *s = *s * keep + add;
}

// Owns the device copy of a table for the duration of the launches on the current stream.
template <int kLists>
struct DeviceTable {
  at::Tensor storage;
  TensorTable<kLists> view;
  int64_t blocks = 0;
};

// Under CUDA graph capture the table must not come from a host buffer: the graph replays the recorded copy from
// the same host address every time, long after the pinned allocator may have handed that buffer to someone else.
// There the values travel as kernel parameters instead (a graph keeps its kernels' parameters by value), in chunks
// that fit the 4 KB parameter limit. The captured table then describes the captured tensors, as the graph does.
constexpr int kFillValues = 480;
template <int kN>
struct FillChunk {
  int64_t v[kN];
};

template <int kN>
__global__ void fill_table_kernel(FillChunk<kN> chunk, int64_t* dst, int count) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) dst[i] = chunk.v[i];
}

inline void fill_table_by_launches(const std::vector<int64_t>& values, int64_t* dst) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  for (size_t begin = 0; begin < values.size(); begin += kFillValues) {
    const int count = static_cast<int>(std::min<size_t>(kFillValues, values.size() - begin));
    FillChunk<kFillValues> chunk;
    std::copy(values.begin() + begin, values.begin() + begin + count, chunk.v);
    fill_table_kernel<kFillValues><<<1, 256, 0, stream>>>(chunk, dst + begin, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// lists[l] is empty or has one tensor per param. All tensors must be contiguous and on one device.
template <int kLists>
DeviceTable<kLists> build_table(const std::array<const std::vector<at::Tensor>*, kLists>& lists) {
  const auto& first = *lists[0];
  const int64_t n = static_cast<int64_t>(first.size());
  std::vector<int64_t> block_map;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t chunks = (first[t].numel() + kChunkElems - 1) / kChunkElems;
    for (int64_t c = 0; c < chunks; ++c) block_map.push_back((t << 32) | c);
  }
  const int64_t total = kLists * n + n + static_cast<int64_t>(block_map.size());
  auto write = [&](int64_t* h) {
    for (int l = 0; l < kLists; ++l)
      for (int64_t t = 0; t < n; ++t)
        h[l * n + t] = lists[l]->empty() ? 0 : reinterpret_cast<int64_t>((*lists[l])[t].data_ptr());
    for (int64_t t = 0; t < n; ++t) h[kLists * n + t] = first[t].numel();
    std::copy(block_map.begin(), block_map.end(), h + kLists * n + n);
  };

  DeviceTable<kLists> out;
  at::Tensor device_copy;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    at::Tensor host = at::empty({total}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    write(host.data_ptr<int64_t>());
    device_copy = host.to(first[0].device(), /*non_blocking=*/true);
  } else {
    std::vector<int64_t> values(static_cast<size_t>(total));
    write(values.data());
    device_copy = at::empty({total}, first[0].options().dtype(at::kLong));  // from the graph's private pool
    fill_table_by_launches(values, device_copy.data_ptr<int64_t>());
  }
  out.storage = device_copy;
  const int64_t* d = device_copy.data_ptr<int64_t>();
  out.view = TensorTable<kLists>{d, d + kLists * n, d + kLists * n + n, n};
  out.blocks = static_cast<int64_t>(block_map.size());
  return out;
}

template <int kLists, typename Functor>
void launch(const DeviceTable<kLists>& table, const Functor& fn) {
  if (table.blocks == 0) return;
  TORCH_CHECK(table.blocks < (1LL << 31), "fusedopt: too many chunks for one launch");
  multi_tensor_kernel<kLists><<<static_cast<unsigned>(table.blocks), kBlockThreads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(table.view, fn);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int kLists>
void update_scalars(const DeviceTable<kLists>& table, int list, const float* found_inf, float keep, float add) {
  if (table.view.n == 0) return;
  const unsigned grid = static_cast<unsigned>((table.view.n + 255) / 256);
  update_scalars_kernel<kLists>
      <<<grid, 256, 0, at::cuda::getCurrentCUDAStream()>>>(table.view, list, found_inf, keep, add);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte vectors: kVec elements of T.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

// True when every listed address of tensor t allows 16-byte vector access.
template <int kLists>
__device__ __forceinline__ bool all_aligned16(const TensorTable<kLists>& table, int64_t t, int lists_used) {
  int64_t bits = 0;
  for (int l = 0; l < lists_used; ++l) bits |= table.addrs[l * table.n + t];
  return (bits & 15) == 0;
}

// The grad in opmath, divided by the grad divisor (GradScaler's scale / folded clip). Under GradScaler the result is
// also stored back in place (`write_back`), as torch's fused optimizers leave .grad unscaled.
template <typename T, typename S>
__device__ __forceinline__ S unscaled_grad(T& grad, S grad_factor, bool write_back) {
  const S g = S(grad) * grad_factor;
  if (write_back) grad = T(g);
  return g;
}

// max that returns NaN when either side is NaN, as torch.maximum does (fmax would drop it).
template <typename S>
__device__ __forceinline__ S nan_propagating_max(S a, S b) {
  return (a > b || a != a) ? a : b;
}

}  // namespace fusedopt::cuda
