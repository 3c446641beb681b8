// Host-side 16-bit float storage types and typed load/store used by the CPU backends.
// Not for .cu files: CUDA code uses cuda_bf16.h / cuda_fp16.h.
#pragma once

#include <bit>
#include <cstdint>
#include <type_traits>
#include <utility>

#ifdef __F16C__
#include <immintrin.h>
#endif

#include "mhc/errors.hpp"
#include "mhc/tensor.hpp"

namespace mhc::detail {

struct f16 {
  std::uint16_t bits;
};
struct bf16 {
  std::uint16_t bits;
};

// IEEE binary16 <-> binary32 in integer and fp32 arithmetic, bit-identical to the hardware (F16C)
// and to libgcc: round to nearest even, subnormals exact, NaN kept (quiet bit set, payload's top bits
// kept). Neither reads nor produces fp32 subnormals, so flush-to-zero modes do not change it.
inline float half_bits_to_float(std::uint16_t h) {
  std::uint32_t u = std::uint32_t(h & 0x7fffu) << 13;  // exponent and mantissa in place
  const std::uint32_t exponent = u & (0x7c00u << 13);
  u += (127u - 15u) << 23;                             // rebias
  if (exponent == 0x7c00u << 13) {                     // Inf / NaN
    u += (128u - 16u) << 23;
    if (u & 0x7fffffu) u |= 0x400000u;
  } else if (exponent == 0) {                          // zero / subnormal: renormalise in fp32
    u = std::bit_cast<std::uint32_t>(std::bit_cast<float>(u + (1u << 23)) - std::bit_cast<float>(113u << 23));
  }
  return std::bit_cast<float>(u | (std::uint32_t(h & 0x8000u) << 16));
}
inline std::uint16_t float_to_half_bits(float v) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(v);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  std::uint32_t h;
  if (u >= (143u << 23)) {  // >= 65536: Inf, NaN or overflow to Inf
    h = u > 0x7f800000u ? 0x7e00u | ((u >> 13) & 0x3ffu) : 0x7c00u;
  } else if (u < (113u << 23)) {  // below 2^-14: fp16 subnormal or zero; the fp32 add rounds to nearest even
    h = std::bit_cast<std::uint32_t>(std::bit_cast<float>(u) + 0.5f) - std::bit_cast<std::uint32_t>(0.5f);
  } else {  // normal: rebias and round the 13 dropped bits to nearest even
    h = (u + ((15u - 127u) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  }
  return static_cast<std::uint16_t>(h | sign);
}

// Scalar conversions: F16C instructions when the translation unit is compiled for them, else the
// exact integer version above (never libgcc's soft-float __extendhfsf2 / __truncsfhf2). The fast CPU
// kernels convert whole vectors with F16C at run time (src/cpu/fast_kernels.hpp).
inline float to_float(f16 v) {
#ifdef __F16C__
  return _cvtsh_ss(v.bits);
#else
  return half_bits_to_float(v.bits);
#endif
}
inline float to_float(bf16 v) { return std::bit_cast<float>(std::uint32_t(v.bits) << 16); }

inline f16 to_f16(float v) {
#ifdef __F16C__
  return {static_cast<std::uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT))};
#else
  return {float_to_half_bits(v)};
#endif
}
inline bf16 to_bf16(float v) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {std::uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return {std::uint16_t(u >> 16)};
}
// Overloads by storage type for store(): kernels add their own 16-bit types (found by ADL).
inline f16 round_to(f16, float v) { return to_f16(v); }
inline bf16 round_to(bf16, float v) { return to_bf16(v); }

// Math type of a storage type: fp64 for f64 tensors, fp32 otherwise.
template <class S> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <class S> using math_t = typename MathOf<S>::type;

// Always inlined: kernels compiled for another ISA (fast_kernels.hpp) inline them with their own
// conversions; an out-of-line copy would be compiled for the baseline.
template <class S> [[gnu::always_inline]] inline math_t<S> load(const S* p, std::int64_t i) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) return p[i];
  else return to_float(p[i]);
}
template <class S, class M> [[gnu::always_inline]] inline void store(S* p, std::int64_t i, M v) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) p[i] = static_cast<S>(v);
  else p[i] = round_to(S{}, static_cast<float>(v));
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
