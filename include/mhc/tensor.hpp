// Non-owning tensor views: the only way data crosses the mhc API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace mhc {

enum class DType : std::uint8_t { f32, f16, bf16, f64 };
enum class DeviceType : std::uint8_t { cpu, cuda };

struct Device {
  DeviceType type = DeviceType::cpu;
  int index = 0;
  friend bool operator==(const Device&, const Device&) = default;
};

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
std::string device_name(Device device);

inline constexpr int kMaxRank = 8;

// A strided view of memory owned by the caller. Strides are in elements.
// A default-constructed view (rank 0, no data) means "absent" for optional arguments;
// an empty tensor (some dimension 0) has rank >= 1 and is present.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::f32;
  Device device{};
  int rank = 0;
  std::int64_t shape[kMaxRank]{};
  std::int64_t strides[kMaxRank]{};

  // Contiguous (row-major) view of `data` with the given shape.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                               Device device = {});
  static TensorView absent() { return {}; }

  bool present() const { return rank > 0 || data != nullptr; }
  std::int64_t size(int dim) const { return shape[dim < 0 ? dim + rank : dim]; }
  std::int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_string() const;  // "[2, 4, 7]"

  template <class T>
  T* ptr() const { return static_cast<T*>(data); }
};

}  // namespace mhc
