// Shared pieces of the CUDA backend: error checks, storage types, 16-byte packs, reductions and
// the host-side dispatch over dtype and stream count.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda/host.hpp"

namespace mhc::cuda_impl {

// ---- storage types -----------------------------------------------------------------------------
// Math is fp32 for f32/f16/bf16 storage and fp64 for f64 storage.
template <class S> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <class S> using math_t = typename MathOf<S>::type;

__device__ __forceinline__ float to_math(float v) { return v; }
__device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class S> __device__ __forceinline__ S from_math(float v);
template <> __device__ __forceinline__ float from_math<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_math<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <class S> __device__ __forceinline__ S from_math(double v) { return static_cast<S>(v); }

// Value after a round trip through the storage type: what a later op reads back.
template <class S, class M> __device__ __forceinline__ M round_to_storage(M v) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) return v;
  else return to_math(from_math<S>(v));
}

// 16 bytes of storage elements: the unit of every vectorised load and store.
template <class S> struct alignas(16) Pack {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(S));
  S v[kSize];
};
template <class S> inline constexpr int kPack = Pack<S>::kSize;

template <class S> __device__ __forceinline__ Pack<S> load_pack(const S* p) {
  Pack<S> r;
  *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
  return r;
}
// Non-caching load for data read exactly once (keeps L1 for reused coefficients).
template <class S> __device__ __forceinline__ Pack<S> load_pack_stream(const S* p) {
  Pack<S> r;
  *reinterpret_cast<uint4*>(&r) = __ldcs(reinterpret_cast<const uint4*>(p));
  return r;
}
template <class S> __device__ __forceinline__ void store_pack(S* p, const Pack<S>& v) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
}

// ---- reductions (fixed order: bit-identical from run to run) -------------------------------------
template <class M> __device__ __forceinline__ M warp_sum(M v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums R values per thread over the whole block. Every thread gets the totals back in v.
// scratch holds (blockDim.x / 32) * R values. Order of additions is fixed.
template <int R, class M> __device__ __forceinline__ void block_sum(M (&v)[R], M* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = warp_sum(v[r]);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) scratch[warp * R + r] = v[r];
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < R; ++r) {
    M total = 0;
    for (int w = 0; w < warps; ++w) total += scratch[w * R + r];
    v[r] = total;
  }
}

template <class M> __device__ __forceinline__ M sigmoid(M v) { return M(1) / (M(1) + exp(-v)); }

// 1/v for positive normal v: hardware approximation plus one Newton step (~1 ulp), branch-free.
// __frcp_rn and 1.f/v compile to a subroutine call with special-case branches: far longer chains.
__device__ __forceinline__ float fast_rcp(float v) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r * (2.f - v * r);
}

// ---- host-side launch helpers -------------------------------------------------------------------
// Lets `kernel` launch with `bytes` of dynamic shared memory: above the 48 KiB default it must opt in. The
// attribute is set once per (device, kernel) and again only when a call needs more than was granted; with
// `prefer_max_shared` the carveout hint also asks for the largest shared-memory configuration (kernels built for
// several large blocks per SM).
template <class K> void allow_dynamic_smem(K kernel, std::size_t bytes, bool prefer_max_shared = false) {
  if (bytes <= 48 * 1024 && !prefer_max_shared) return;
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, std::size_t> granted;
  const std::lock_guard<std::mutex> lock(mutex);
  std::size_t& have = granted.try_emplace({current_device_info().index, reinterpret_cast<const void*>(kernel)},
                                          std::size_t{0}).first->second;
  if (have >= bytes && have != 0) return;
  MHC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  if (prefer_max_shared)
    MHC_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  have = bytes > 0 ? bytes : 1;
}

// Blocks of `threads` threads and `smem` bytes of dynamic shared memory that one SM holds at once (0: the kernel
// does not fit), asked once per (device, kernel, threads, smem bytes).
template <class K> int resident_blocks_per_sm(K kernel, int threads, int smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, int>, int> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(current_device_info().index, reinterpret_cast<const void*>(kernel), threads, smem);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess) {
    cudaGetLastError();
    blocks = 0;
  }
  return known[key] = blocks;
}

// ---- host-side dispatch over the storage type -------------------------------------------------
template <class T> struct TypeTag { using type = T; };

// f(TypeTag<S>{}) with S the device storage type of `dtype`.
template <class F> decltype(auto) dispatch_storage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return std::forward<F>(f)(TypeTag<float>{});
    case DType::f16: return std::forward<F>(f)(TypeTag<__half>{});
    case DType::bf16: return std::forward<F>(f)(TypeTag<__nv_bfloat16>{});
    case DType::f64: return std::forward<F>(f)(TypeTag<double>{});
  }
  throw DTypeError("mhc: unsupported dtype");
}

// Fast paths: n in {2, 4, 8}, 16-bit or f32 storage, rows of 16-byte packs, aligned data.
template <class S> inline bool packable(std::int64_t C) {
  return !std::is_same_v<S, double> && C % kPack<S> == 0;
}

}  // namespace mhc::cuda_impl
