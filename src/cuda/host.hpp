// Host-side plumbing of the CUDA backend (plain C++: also included by the .cpp files of src/cuda):
// error checks, the device guard, device properties and the dispatch over dtype and stream count.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "backend.hpp"

namespace mhc::cuda_impl {

// ---- errors and launch plumbing ------------------------------------------------------------------
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);

#define MHC_CUDA_CHECK(expr)                                                             \
  do {                                                                                   \
    const cudaError_t mhc_err_ = (expr);                                                 \
    if (mhc_err_ != cudaSuccess) ::mhc::cuda_impl::throw_cuda_error(mhc_err_, #expr, __FILE__, __LINE__); \
  } while (0)
// After every launch: configuration errors surface here, not at the next sync.
#define MHC_CUDA_CHECK_LAUNCH() MHC_CUDA_CHECK(cudaGetLastError())

inline cudaStream_t stream_of(const Context& ctx) { return static_cast<cudaStream_t>(ctx.stream); }

// Makes the tensors' device current for the duration of an op and restores the caller's.
class DeviceGuard {
 public:
  explicit DeviceGuard(const Device& device) {
    MHC_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device.index) MHC_CUDA_CHECK(cudaSetDevice(device.index));
    else previous_ = -1;
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Properties of the current device, read once per device.
struct DeviceInfo {
  int index = 0;
  int sm_count = 0;
  int major = 0;
  int max_smem_optin = 0;  // bytes of shared memory a block may opt into
  bool clusters = false;   // thread-block clusters (sm_90+)
};
const DeviceInfo& current_device_info();

inline int ceil_div(std::int64_t a, std::int64_t b) { return static_cast<int>((a + b - 1) / b); }

// ---- launch grids (one set for every kernel file) -----------------------------------------------------
// Grid-stride kernels over `items`: enough blocks of `threads` to cover them, at most 16 per SM.
inline unsigned grid_for(std::int64_t items, int threads) {
  const std::int64_t cap = std::int64_t(current_device_info().sm_count) * 16;
  return static_cast<unsigned>(std::clamp<std::int64_t>((items + threads - 1) / threads, 1, cap));
}
// One block per token, grid-striding past the x-dimension limit kept well inside 2^31 - 1.
inline unsigned token_grid(std::int64_t T) { return static_cast<unsigned>(std::min<std::int64_t>(T, 1 << 30)); }
// One block per `per_block` items, no grid-stride cap below the same limit.
inline unsigned blocks_for(std::int64_t items, int per_block) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((items + per_block - 1) / per_block, 1, std::int64_t(1) << 30));
}

// ---- host-side dispatch ---------------------------------------------------------------------------
// f(std::integral_constant<int, N>{}) for the specialised stream counts, N = 0 for the generic path.
template <class F> decltype(auto) dispatch_streams(int n, F&& f) {
  switch (n) {
    case 2: return std::forward<F>(f)(std::integral_constant<int, 2>{});
    case 4: return std::forward<F>(f)(std::integral_constant<int, 4>{});
    case 8: return std::forward<F>(f)(std::integral_constant<int, 8>{});
    default: return std::forward<F>(f)(std::integral_constant<int, 0>{});
  }
}

// True when every present tensor's data is 16-byte aligned (views with an odd storage offset are not).
inline bool aligned16(std::initializer_list<const TensorView*> ts) {
  for (const TensorView* t : ts)
    if (t->present() && (reinterpret_cast<std::uintptr_t>(t->data) & 15u) != 0) return false;
  return true;
}

template <class T> T* data_or_null(const TensorView& t) { return t.present() ? t.ptr<T>() : nullptr; }

}  // namespace mhc::cuda_impl
