// Test harness of the GPU suites: host tensors with random contents, device copies (optionally
// misaligned to force the generic kernels), NaN poisoning, and the norm-relative comparison
// against the fp64 CPU reference.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/float_types.hpp"
#include "mhc/mhc.hpp"

namespace mhc::gpu_test {

inline int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

#define MHC_REQUIRE_GPU()                                                        \
  do {                                                                           \
    if (::mhc::gpu_test::device_count() == 0) GTEST_SKIP() << "no CUDA device";  \
  } while (0)

#define MHC_CHECK_CUDA(expr)                                                             \
  do {                                                                                   \
    const cudaError_t e_ = (expr);                                                       \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(e_);               \
  } while (0)

// Fresh inputs for every run; the seed is printed so a failure can be replayed (MHC_TEST_SEED).
inline std::mt19937_64& rng() {
  static std::mt19937_64 gen = [] {
    std::uint64_t seed = std::random_device{}();
    if (const char* s = std::getenv("MHC_TEST_SEED")) seed = std::stoull(s);
    std::printf("[gpu tests] seed %llu\n", static_cast<unsigned long long>(seed));
    return std::mt19937_64(seed);
  }();
  return gen;
}

struct HostTensor {
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;

  HostTensor() = default;
  HostTensor(DType d, std::vector<std::int64_t> s) : dtype(d), shape(std::move(s)) {
    bytes.assign(static_cast<std::size_t>(numel()) * dtype_size(dtype), 0);
  }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  double get(std::int64_t i) const {
    switch (dtype) {
      case DType::f32: return reinterpret_cast<const float*>(bytes.data())[i];
      case DType::f64: return reinterpret_cast<const double*>(bytes.data())[i];
      case DType::f16: return detail::to_float(reinterpret_cast<const detail::f16*>(bytes.data())[i]);
      case DType::bf16: return detail::to_float(reinterpret_cast<const detail::bf16*>(bytes.data())[i]);
    }
    return 0;
  }
  void set(std::int64_t i, double v) {
    switch (dtype) {
      case DType::f32: reinterpret_cast<float*>(bytes.data())[i] = static_cast<float>(v); break;
      case DType::f64: reinterpret_cast<double*>(bytes.data())[i] = v; break;
      case DType::f16: reinterpret_cast<detail::f16*>(bytes.data())[i] = detail::to_f16(static_cast<float>(v)); break;
      case DType::bf16: reinterpret_cast<detail::bf16*>(bytes.data())[i] = detail::to_bf16(static_cast<float>(v)); break;
    }
  }
  TensorView view() {
    TensorView t;
    t.data = bytes.data();
    t.dtype = dtype;
    t.rank = static_cast<int>(shape.size());
    std::int64_t stride = 1;
    for (int d = t.rank - 1; d >= 0; --d) {
      t.shape[d] = shape[d];
      t.strides[d] = stride;
      stride *= shape[d];
    }
    return t;
  }
};

inline HostTensor random_tensor(DType d, std::vector<std::int64_t> shape, double lo, double hi) {
  HostTensor t(d, std::move(shape));
  std::uniform_real_distribution<double> u(lo, hi);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, u(rng()));
  return t;
}
inline HostTensor normal_tensor(DType d, std::vector<std::int64_t> shape, double stddev) {
  HostTensor t(d, std::move(shape));
  std::normal_distribution<double> nd(0.0, stddev);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.set(i, nd(rng()));
  return t;
}

// Device copy; `offset` extra elements in front make the data pointer not 16-byte aligned.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(DType d, std::vector<std::int64_t> shape, int offset = 0) : host_(d, std::move(shape)), offset_(offset) {
    const std::size_t bytes = (static_cast<std::size_t>(host_.numel()) + offset_) * dtype_size(d) + 16;
    void* p = nullptr;
    if (cudaMalloc(&p, bytes) != cudaSuccess) throw std::runtime_error("cudaMalloc failed");
    base_.reset(p);
    poison();
  }
  explicit DeviceTensor(const HostTensor& h, int offset = 0) : DeviceTensor(h.dtype, h.shape, offset) { upload(h); }

  void* data() const { return static_cast<unsigned char*>(base_.get()) + offset_ * dtype_size(host_.dtype); }
  std::size_t nbytes() const { return static_cast<std::size_t>(host_.numel()) * dtype_size(host_.dtype); }
  void upload(const HostTensor& h) {
    if (cudaMemcpy(data(), h.bytes.data(), nbytes(), cudaMemcpyHostToDevice) != cudaSuccess)
      throw std::runtime_error("upload failed");
  }
  HostTensor download() const {
    HostTensor h(host_.dtype, host_.shape);
    if (cudaDeviceSynchronize() != cudaSuccess || cudaMemcpy(h.bytes.data(), data(), nbytes(), cudaMemcpyDeviceToHost) != cudaSuccess)
      throw std::runtime_error(std::string("download failed: ") + cudaGetErrorString(cudaGetLastError()));
    return h;
  }
  // All-ones bytes are NaN in every float format: unwritten elements show up in the comparison.
  void poison() {
    if (cudaMemset(base_.get(), 0xFF, (static_cast<std::size_t>(host_.numel()) + offset_) * dtype_size(host_.dtype) + 16) != cudaSuccess)
      throw std::runtime_error("poison failed");
  }
  TensorView view() const {
    TensorView t;
    t.data = data();
    t.dtype = host_.dtype;
    t.device = {DeviceType::cuda, 0};
    t.rank = static_cast<int>(host_.shape.size());
    std::int64_t stride = 1;
    for (int d = t.rank - 1; d >= 0; --d) {
      t.shape[d] = host_.shape[d];
      t.strides[d] = stride;
      stride *= host_.shape[d];
    }
    return t;
  }

 private:
  struct Free {
    void operator()(void* p) const { cudaFree(p); }
  };
  HostTensor host_;
  int offset_ = 0;
  std::unique_ptr<void, Free> base_;
};

// ||a - ref|| / ||ref|| (absolute when ref is all zeros); NaN anywhere in a gives +inf.
inline double rel_error(const HostTensor& a, const HostTensor& ref) {
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < ref.numel(); ++i) {
    const double x = a.get(i), r = ref.get(i);
    if (!std::isfinite(x) && std::isfinite(r)) return INFINITY;
    num += (x - r) * (x - r);
    den += r * r;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

inline bool bit_identical(const HostTensor& a, const HostTensor& b) {
  return a.bytes.size() == b.bytes.size() && std::memcmp(a.bytes.data(), b.bytes.data(), a.bytes.size()) == 0;
}

// Tolerance of a stream output (rounded to its dtype) and of an f32/f64 coefficient output.
inline double stream_tol(DType d) {
  switch (d) {
    case DType::f64: return 1e-10;
    case DType::f32: return 2e-5;
    case DType::f16: return 3e-3;
    case DType::bf16: return 1.5e-2;
  }
  return 0;
}
inline double coef_tol(DType stream) { return stream == DType::f64 ? 1e-10 : 1e-4; }

inline Context cuda_ctx(cudaStream_t s = nullptr) { return {Backend::cuda, s, 0}; }
inline Context ref_ctx() { return {Backend::cpu_reference, nullptr, 0}; }

inline const char* name(DType d) { return dtype_name(d); }

}  // namespace mhc::gpu_test
