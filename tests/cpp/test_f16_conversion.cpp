// fp16 <-> fp32 conversions of the CPU backends, bit for bit: the integer version (scalar and 16-lane
// vector), and the F16C vector and scalar code of the x86-64-v3 and -v4 entry points (when this CPU
// has them), against the compiler's _Float16 conversion (libgcc's soft float on the baseline, which
// the library used before). Every half value, and a sweep of floats with every exponent, the exact
// midpoints between neighbouring halves, NaNs with payloads, infinities and subnormals.
#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/fast_kernels.hpp"

namespace mhc::test {
namespace {

using cpu_fast::kernels::vf32;
using detail::f16;

std::uint32_t bits_of(float v) { return std::bit_cast<std::uint32_t>(v); }

// The conversions the library used before (and what any correct one returns).
[[gnu::noinline]] float oracle_to_float(std::uint16_t h) { return static_cast<float>(std::bit_cast<_Float16>(h)); }
[[gnu::noinline]] std::uint16_t oracle_to_half(float v) { return std::bit_cast<std::uint16_t>(static_cast<_Float16>(v)); }

// Converters over arrays of 16 elements, one set per code path.
using HalfToFloat = void (*)(const std::uint16_t*, float*);
using FloatToHalf = void (*)(const float*, std::uint16_t*);

template <class S> MHC_INLINE void vector_to_float(const std::uint16_t* in, float* out) {
  const vf32 v = cpu_fast::kernels::vload(reinterpret_cast<const S*>(in));
  std::memcpy(out, &v, sizeof(v));
}
template <class S> MHC_INLINE void vector_to_half(const float* in, std::uint16_t* out) {
  vf32 v;
  std::memcpy(&v, in, sizeof(v));
  cpu_fast::kernels::vstore(reinterpret_cast<S*>(out), v);
}
template <class S> MHC_INLINE void scalar_to_float(const std::uint16_t* in, float* out) {
  for (int i = 0; i < 16; ++i) out[i] = detail::load(reinterpret_cast<const S*>(in), i);
}
template <class S> MHC_INLINE void scalar_to_half(const float* in, std::uint16_t* out) {
  for (int i = 0; i < 16; ++i) detail::store(reinterpret_cast<S*>(out), i, in[i]);
}

void soft_vector_to_float(const std::uint16_t* in, float* out) { vector_to_float<f16>(in, out); }
void soft_vector_to_half(const float* in, std::uint16_t* out) { vector_to_half<f16>(in, out); }
void soft_scalar_to_float(const std::uint16_t* in, float* out) {
  for (int i = 0; i < 16; ++i) out[i] = detail::half_bits_to_float(in[i]);
}
void soft_scalar_to_half(const float* in, std::uint16_t* out) {
  for (int i = 0; i < 16; ++i) out[i] = detail::float_to_half_bits(in[i]);
}

struct Path {
  const char* name;
  HalfToFloat to_float;
  FloatToHalf to_half;
  bool available;
};

#if MHC_CPU_F16_LEVELS
using cpu_fast::kernels::f16_hw;
MHC_TARGET_V4 void v4_vector_to_float(const std::uint16_t* in, float* out) { vector_to_float<f16_hw<4>>(in, out); }
MHC_TARGET_V4 void v4_vector_to_half(const float* in, std::uint16_t* out) { vector_to_half<f16_hw<4>>(in, out); }
MHC_TARGET_V3 void v3_vector_to_float(const std::uint16_t* in, float* out) { vector_to_float<f16_hw<3>>(in, out); }
MHC_TARGET_V3 void v3_vector_to_half(const float* in, std::uint16_t* out) { vector_to_half<f16_hw<3>>(in, out); }
MHC_TARGET_V3 void v3_scalar_to_float(const std::uint16_t* in, float* out) { scalar_to_float<f16_hw<3>>(in, out); }
MHC_TARGET_V3 void v3_scalar_to_half(const float* in, std::uint16_t* out) { scalar_to_half<f16_hw<3>>(in, out); }
#endif

std::vector<Path> paths() {
  std::vector<Path> p = {{"integer scalar", soft_scalar_to_float, soft_scalar_to_half, true},
                         {"f16 vector (integer, or F16C when the build targets it)", soft_vector_to_float, soft_vector_to_half, true}};
#if MHC_CPU_F16_LEVELS
  const bool v3 = __builtin_cpu_supports("x86-64-v3"), v4 = __builtin_cpu_supports("x86-64-v4");
  p.push_back({"F16C scalar (x86-64-v3)", v3_scalar_to_float, v3_scalar_to_half, v3});
  p.push_back({"F16C 8 lanes (x86-64-v3)", v3_vector_to_float, v3_vector_to_half, v3});
  p.push_back({"F16C 16 lanes (x86-64-v4)", v4_vector_to_float, v4_vector_to_half, v4});
#endif
  return p;
}

// Floats that exercise every rounding case of float -> half.
std::vector<float> float_sweep() {
  std::vector<std::uint32_t> u;
  for (std::uint64_t b = 0; b < (std::uint64_t(1) << 32); b += 65521) u.push_back(static_cast<std::uint32_t>(b));
  for (std::uint32_t e = 0; e < 256; ++e)  // every exponent, mantissas around the 13 dropped bits
    for (std::uint32_t m : {0u, 1u, 0xfffu, 0x1000u, 0x1001u, 0x1fffu, 0x2000u, 0x3000u, 0x400000u, 0x7fffffu})
      for (std::uint32_t sign : {0u, 0x80000000u}) u.push_back(sign | (e << 23) | m);
  // Exact midpoints between neighbouring finite halves (ties go to even), and their float neighbours.
  for (std::uint32_t h = 0; h < 0x7bff; h += 3) {
    const std::uint32_t mid = (bits_of(oracle_to_float(h)) + bits_of(oracle_to_float(h + 1))) / 2;
    for (std::uint32_t d : {mid - 1, mid, mid + 1}) {
      u.push_back(d);
      u.push_back(d | 0x80000000u);
    }
  }
  for (std::uint32_t special : {0x7f800000u, 0x7f800001u, 0x7fc00000u, 0x7fa00000u, 0x7fffffffu, 0x7f802000u,
                                0x477fe000u /* 65504 */, 0x477ff000u /* 65520: rounds to inf */, 0x477fefffu,
                                0x33800000u /* 2^-24 */, 0x33000000u /* 2^-25: tie to 0 */, 0x33000001u, 0x00000001u})
    for (std::uint32_t sign : {0u, 0x80000000u}) u.push_back(sign | special);
  while (u.size() % 16) u.push_back(0);
  std::vector<float> f(u.size());
  std::memcpy(f.data(), u.data(), u.size() * sizeof(float));
  return f;
}

TEST(F16Conversion, EveryHalfToFloatMatchesTheOldConversion) {
  for (const Path& path : paths()) {
    if (!path.available) {
      std::printf("  skipped (this CPU lacks it): %s\n", path.name);
      continue;
    }
    SCOPED_TRACE(path.name);
    int mismatches = 0;
    for (std::uint32_t h0 = 0; h0 < 65536; h0 += 16) {
      std::uint16_t in[16];
      float out[16];
      for (int i = 0; i < 16; ++i) in[i] = static_cast<std::uint16_t>(h0 + i);
      path.to_float(in, out);
      for (int i = 0; i < 16; ++i)
        if (bits_of(out[i]) != bits_of(oracle_to_float(in[i])) && ++mismatches <= 5)
          ADD_FAILURE() << std::hex << "half 0x" << in[i] << ": got 0x" << bits_of(out[i]) << ", want 0x"
                        << bits_of(oracle_to_float(in[i]));
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(F16Conversion, FloatSweepToHalfMatchesTheOldConversion) {
  const std::vector<float> sweep = float_sweep();
  for (const Path& path : paths()) {
    if (!path.available) continue;
    SCOPED_TRACE(path.name);
    int mismatches = 0;
    for (std::size_t j = 0; j < sweep.size(); j += 16) {
      std::uint16_t out[16];
      path.to_half(sweep.data() + j, out);
      for (int i = 0; i < 16; ++i) {
        const float v = sweep[j + i];
        if (out[i] != oracle_to_half(v) && ++mismatches <= 5)
          ADD_FAILURE() << std::hex << "float 0x" << bits_of(v) << ": got 0x" << out[i] << ", want 0x"
                        << oracle_to_half(v);
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(F16Conversion, PublicScalarConversionsMatchTheOldConversion) {
  for (std::uint32_t h = 0; h < 65536; ++h)
    ASSERT_EQ(bits_of(detail::to_float(f16{static_cast<std::uint16_t>(h)})), bits_of(oracle_to_float(h))) << h;
  for (float v : float_sweep()) ASSERT_EQ(detail::to_f16(v).bits, oracle_to_half(v)) << bits_of(v);
}

}  // namespace
}  // namespace mhc::test
