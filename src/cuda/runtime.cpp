// Host-side plumbing of the CUDA backend: error translation, device properties, device count.
#include <cuda_runtime.h>

#include <array>
#include <mutex>
#include <string>

#include "cuda/host.hpp"

namespace mhc::cuda_impl {

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw CudaError(std::string("mhc: CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                  ") in " + expr + " at " + file + ":" + std::to_string(line));
}

const DeviceInfo& current_device_info() {
  constexpr int kMaxDevices = 64;
  static std::array<DeviceInfo, kMaxDevices> infos;
  static std::array<std::once_flag, kMaxDevices> once;
  int dev = 0;
  MHC_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices) throw DeviceError("mhc: CUDA device index " + std::to_string(dev) + " out of range");
  std::call_once(once[dev], [dev] {
    DeviceInfo& d = infos[dev];
    d.index = dev;
    MHC_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, dev));
    MHC_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev));
    MHC_CUDA_CHECK(cudaDeviceGetAttribute(&d.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    d.clusters = d.major >= 9;
  });
  return infos[dev];
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: report none
    return 0;
  }
  return count;
}

}  // namespace mhc::cuda_impl
