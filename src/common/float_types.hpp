// Host-side 16-bit float storage types and typed load/store used by the CPU backends.
// Not for .cu files: CUDA code uses cuda_bf16.h / cuda_fp16.h.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "mhc/errors.hpp"
#include "mhc/tensor.hpp"

namespace mhc::detail {

struct f16 {
  std::uint16_t bits;
};
struct bf16 {
  std::uint16_t bits;
};

inline float to_float(f16 v) { return static_cast<float>(std::bit_cast<_Float16>(v.bits)); }
inline float to_float(bf16 v) { return std::bit_cast<float>(std::uint32_t(v.bits) << 16); }

inline f16 to_f16(float v) { return {std::bit_cast<std::uint16_t>(static_cast<_Float16>(v))}; }
inline bf16 to_bf16(float v) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {std::uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return {std::uint16_t(u >> 16)};
}

// Math type of a storage type: fp64 for f64 tensors, fp32 otherwise.
template <class S> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <class S> using math_t = typename MathOf<S>::type;

template <class S> inline math_t<S> load(const S* p, std::int64_t i) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) return p[i];
  else return to_float(p[i]);
}
template <class S, class M> inline void store(S* p, std::int64_t i, M v) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) p[i] = static_cast<S>(v);
  else if constexpr (std::is_same_v<S, f16>) p[i] = to_f16(static_cast<float>(v));
  else p[i] = to_bf16(static_cast<float>(v));
}

// Calls f(S{}) with S the C++ storage type of `dtype`.
template <class F> decltype(auto) dispatch_storage(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: return std::forward<F>(f)(float{});
    case DType::f64: return std::forward<F>(f)(double{});
    case DType::f16: return std::forward<F>(f)(f16{});
    case DType::bf16: return std::forward<F>(f)(bf16{});
  }
  throw DTypeError("unsupported dtype");
}

}  // namespace mhc::detail
