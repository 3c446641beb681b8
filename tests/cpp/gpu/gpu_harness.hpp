// The harness of the GPU suites, on the shared test support (test_util.hpp: the host tensor, the random
// inputs, the comparisons): device copies of host tensors (optionally misaligned to force the generic
// kernels), NaN poisoning, copies back, and the check of each output against the fp64 CPU reference
// together with the bitwise repeat of the run.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "mhc/mhc.hpp"
#include "test_util.hpp"

namespace mhc::gpu_test {

using test::coef_of;
using test::poisoned_tensor;
using test::Tensor;

inline int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

#define MHC_REQUIRE_GPU()                                                                             \
  do {                                                                                                \
    if (!::mhc::built_with_cuda() || ::mhc::gpu_test::device_count() == 0) GTEST_SKIP() << "no CUDA device"; \
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

// The shared generators (test_util.hpp) drawing from the seeded engine above.
inline Tensor random_tensor(DType d, std::vector<std::int64_t> shape, double lo, double hi) {
  return test::random_tensor(d, std::move(shape), rng(), lo, hi);
}
inline Tensor normal_tensor(DType d, std::vector<std::int64_t> shape, double stddev) {
  return test::normal_tensor(d, std::move(shape), rng(), stddev);
}

// Device copy; `offset` extra elements in front make the data pointer not 16-byte aligned.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  DeviceTensor(DType d, std::vector<std::int64_t> shape, int offset = 0) : host_(d, std::move(shape)), offset_(offset) {
    void* p = nullptr;
    if (cudaMalloc(&p, allocated_bytes()) != cudaSuccess) throw std::runtime_error("cudaMalloc failed");
    base_.reset(p);
    poison();
  }
  explicit DeviceTensor(const Tensor& h, int offset = 0) : DeviceTensor(h.dtype(), h.shape(), offset) { upload(h); }

  void* data() const { return static_cast<unsigned char*>(base_.get()) + offset_ * dtype_size(host_.dtype()); }
  std::size_t nbytes() const { return host_.nbytes(); }
  void upload(const Tensor& h) {
    if (nbytes() == 0) return;
    if (cudaMemcpy(data(), h.data(), nbytes(), cudaMemcpyHostToDevice) != cudaSuccess)
      throw std::runtime_error("upload failed");
  }
  Tensor download() const {
    Tensor h(host_.dtype(), host_.shape());
    if (cudaDeviceSynchronize() != cudaSuccess ||
        (nbytes() && cudaMemcpy(h.data(), data(), nbytes(), cudaMemcpyDeviceToHost) != cudaSuccess))
      throw std::runtime_error(std::string("download failed: ") + cudaGetErrorString(cudaGetLastError()));
    return h;
  }
  // All-ones bytes are NaN in every float format: unwritten elements show up in the comparison.
  void poison() {
    if (cudaMemset(base_.get(), 0xFF, allocated_bytes()) != cudaSuccess) throw std::runtime_error("poison failed");
  }
  TensorView view() const {
    if (host_.empty_tensor()) return TensorView::absent();  // never shaped: an absent optional argument
    TensorView t = host_.view();
    t.data = data();
    t.device = {DeviceType::cuda, 0};
    return t;
  }

 private:
  struct Free {
    void operator()(void* p) const { cudaFree(p); }
  };
  std::size_t allocated_bytes() const {
    return (static_cast<std::size_t>(host_.numel()) + offset_) * dtype_size(host_.dtype()) + 16;
  }
  Tensor host_;  // dtype and shape; its bytes are not used
  int offset_ = 0;
  std::unique_ptr<void, Free> base_;
};

// Device copies of a list of host tensors (the states of a history op) and their views.
inline std::vector<DeviceTensor> to_device(const std::vector<Tensor>& hosts, int offset = 0) {
  std::vector<DeviceTensor> d;
  for (const Tensor& h : hosts) d.emplace_back(h, offset);
  return d;
}
inline std::vector<DeviceTensor> device_outputs(std::size_t count, DType dtype, const std::vector<std::int64_t>& shape,
                                                int offset = 0) {
  std::vector<DeviceTensor> d;
  for (std::size_t k = 0; k < count; ++k) d.emplace_back(dtype, shape, offset);
  return d;
}
inline std::vector<TensorView> views(const std::vector<DeviceTensor>& tensors) {
  std::vector<TensorView> v;
  for (const DeviceTensor& t : tensors) v.push_back(t.view());
  return v;
}
using test::views;

// A backward op's scratch on the device: poisoned (backends must not assume zeros), absent when the op
// needs none.
class DeviceWorkspace {
 public:
  explicit DeviceWorkspace(std::size_t bytes)
      : bytes_(bytes), buffer_(DType::f32, {static_cast<std::int64_t>((bytes + 3) / 4)}) {}
  TensorView view() const { return bytes_ ? buffer_.view() : TensorView::absent(); }

 private:
  std::size_t bytes_;
  DeviceTensor buffer_;
};

// ||a - ref|| / ||ref|| (absolute when ref is all zeros); NaN anywhere in a gives +inf.
inline double rel_error(const Tensor& a, const Tensor& ref) {
  double num = 0, den = 0;
  for (std::int64_t i = 0; i < ref.numel(); ++i) {
    const double x = a.get(i), r = ref.get(i);
    if (!std::isfinite(x) && std::isfinite(r)) return INFINITY;
    num += (x - r) * (x - r);
    den += r * r;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

inline bool bit_identical(const Tensor& a, const Tensor& b) { return a.bitwise_equal(b); }

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

// How an output is judged against its reference: the norm-relative error (a plain number: the n-stream
// suites) or every element within atol + rtol * |want| (elementwise(): the history suites).
struct Tolerance {
  double norm = 0;
  double rtol = -1, atol = 0;  // rtol >= 0: elementwise
  Tolerance(double norm_tol) : norm(norm_tol) {}  // NOLINT: a plain number is a norm tolerance
  static Tolerance elementwise(double rtol, double atol) {
    Tolerance t(0);
    t.rtol = rtol;
    t.atol = atol;
    return t;
  }
  ::testing::AssertionResult judge(const std::string& name, const Tensor& got, const Tensor& want) const {
    if (rtol >= 0) return test::close_elementwise(name, got, want, rtol, atol);
    const double err = rel_error(got, want);
    if (err <= norm) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << name << " rel error " << err << " > " << norm;
  }
};

// Runs `cuda_run` twice into poisoned outputs, checks each output against the reference and the
// two runs against each other.
struct Output {
  const char* name;
  Tensor* ref;
  DeviceTensor* dev;
  Tolerance tol;
};
inline void check_outputs(const std::function<void()>& cuda_run, std::vector<Output> outs, const std::string& what) {
  for (auto& o : outs) o.dev->poison();
  cuda_run();
  std::vector<Tensor> first;
  for (auto& o : outs) {
    first.push_back(o.dev->download());
    EXPECT_TRUE(o.tol.judge(o.name, first.back(), *o.ref)) << what;
    o.dev->poison();
  }
  cuda_run();
  for (size_t i = 0; i < outs.size(); ++i)
    EXPECT_TRUE(bit_identical(outs[i].dev->download(), first[i]))
        << what << ": " << outs[i].name << " not bit-identical";
}

// MHC_GPU_TEST_QUICK=1 (used under compute-sanitizer): fewer shapes and dtypes, every kernel variant.
inline bool quick() {
  static const bool q = std::getenv("MHC_GPU_TEST_QUICK") != nullptr;
  return q;
}

inline Context cuda_ctx(cudaStream_t s = nullptr) { return {Backend::cuda, s, 0}; }
inline Context ref_ctx() { return {Backend::cpu_reference, nullptr, 0}; }

inline const char* name(DType d) { return dtype_name(d); }

}  // namespace mhc::gpu_test
