// Building blocks of the fast CPU backend (src/cpu/fast*.cpp): threading, 64-byte SIMD vectors
// with load/store conversion from every storage dtype, the three small GEMM shapes of the
// projection, and the per-token Sinkhorn forward and exact reverse mode.
//
// Vectorisation: the kernels are always-inline templates instantiated in per-dtype entry points
// that carry MHC_CPU_KERNEL. On x86-64 with GCC that attribute clones each entry point for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline, picked once at load time (ifunc),
// so one portable binary runs full-width vectors on the machine it lands on. Every helper an
// entry point uses must be MHC_INLINE: one left out of line is compiled for the baseline only.
//
// fp16: GCC 12 converts _Float16 vectors one element at a time (or through libgcc on the baseline),
// and a target_clones body cannot tell which clone it is. So fp16 entry points are instead compiled
// as three functions over three storage types of the same layout: f16_hw<4> (x86-64-v4: 16 lanes per
// F16C instruction), f16_hw<3> (x86-64-v3: 8 lanes) and f16 (baseline: the exact integer conversion),
// and a dispatcher picks one by the CPU (f16_isa_level). All three round identically. The F16C code
// calls GCC's builtins rather than the <immintrin.h> wrappers: a wrapper is an always-inline function
// of its own target and cannot be inlined into these (default-target) templates, while a builtin is
// only checked where it is finally expanded, inside the entry point compiled for that level.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <immintrin.h>  // declares the F16C builtins

#ifdef MHC_WITH_OPENMP
#include <omp.h>
#endif

#include "backend.hpp"
#include "common/float_types.hpp"

// MHC_CPU_NO_CLONES (a compile definition) builds one version for the -march in effect: how the
// baseline and x86-64-v3 code paths are tested on a machine that would pick the AVX-512 clone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__) && !defined(MHC_CPU_NO_CLONES)
#define MHC_CPU_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MHC_CPU_F16_LEVELS 1
#define MHC_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define MHC_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define MHC_CPU_KERNEL
#define MHC_CPU_F16_LEVELS 0
#endif
#define MHC_INLINE [[gnu::always_inline]] inline
// For lambdas inside kernels: an outlined lambda would be compiled for the baseline ISA only.
#define MHC_INLINE_LAMBDA __attribute__((always_inline))

// Every vector helper is inlined into its caller, so the vector ABI of the baseline never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace mhc::cpu_fast::kernels {

using std::int64_t;
using detail::bf16;
using detail::f16;
using detail::load;
using detail::math_t;
using detail::store;

inline constexpr int kMaxRows = kMaxStreams * kMaxStreams + 2 * kMaxStreams;  // m = n*n + 2n at n = 64
inline constexpr int kTokenTile = 4;  // tokens that share each load of fn in the projection GEMMs

// ---- threading -----------------------------------------------------------------------------------
inline int thread_budget(const Context& ctx) {
#ifdef MHC_WITH_OPENMP
  const int available = omp_get_max_threads();
  return ctx.num_threads > 0 ? std::min(available, ctx.num_threads) : available;
#else
  return 1;
#endif
}

// Calls body(begin, end) over [0, count) in chunks of `grain`, spread over the threads the context
// allows. Chunk boundaries do not depend on the thread count, so neither do the results.
template <class Body>
void parallel_for(int64_t count, int64_t grain, const Context& ctx, Body&& body) {
  if (count <= 0) return;
  const int64_t chunks = (count + grain - 1) / grain;
  const int threads = static_cast<int>(std::min<int64_t>(thread_budget(ctx), chunks));
#ifdef MHC_WITH_OPENMP
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < chunks; ++c) body(c * grain, std::min(count, (c + 1) * grain));
    return;
  }
#endif
  (void)threads;
  for (int64_t c = 0; c < chunks; ++c) body(c * grain, std::min(count, (c + 1) * grain));
}

// ---- 64-byte vectors (16 floats or 8 doubles) ------------------------------------------------------
typedef float vf32 __attribute__((vector_size(64)));
typedef double vf64 __attribute__((vector_size(64)));
typedef std::uint32_t vu32x16 __attribute__((vector_size(64)));
typedef std::uint16_t vu16x16 __attribute__((vector_size(32)));
typedef short vi16x16 __attribute__((vector_size(32)));
typedef short vi16x8 __attribute__((vector_size(16)));
typedef float vf32x8 __attribute__((vector_size(32)));
typedef float vf32x4 __attribute__((vector_size(16)));

// fp16 storage inside code compiled for x86-64-v<Level> (3 or 4; both have F16C). Same layout as f16.
template <int Level> struct f16_hw {
  std::uint16_t bits;
};
// The F16C width a storage type converts with: f16 uses it only when the whole build targets F16C
// (MHC_CPU_NO_CLONES with -march=...), else the exact integer version.
template <class S> inline constexpr int kF16Level = 0;
template <int L> inline constexpr int kF16Level<f16_hw<L>> = L;
#if defined(__F16C__) && defined(__AVX512F__)
template <> inline constexpr int kF16Level<f16> = 4;
#elif defined(__F16C__)
template <> inline constexpr int kF16Level<f16> = 3;
#endif
template <class S> inline constexpr bool kIsF16 = std::is_same_v<S, f16> || kF16Level<S> > 0;

// Scalar conversions of f16_hw (load / store find them by ADL): one F16C instruction each.
// (Rounding immediate 0: to nearest even.)
template <int L> MHC_INLINE float to_float(f16_hw<L> v) {
  return __builtin_ia32_vcvtph2ps(vi16x8{static_cast<short>(v.bits)})[0];
}
template <int L> MHC_INLINE f16_hw<L> round_to(f16_hw<L>, float v) {
  return {static_cast<std::uint16_t>(__builtin_ia32_vcvtps2ph(vf32x4{v}, 0)[0])};
}

// 0: no F16C (the baseline f16 entry points), else the x86-64 level (3 or 4) whose fp16 entry points run.
int f16_isa_level();

template <class M> using vec_t = std::conditional_t<std::is_same_v<M, double>, vf64, vf32>;
template <class M> inline constexpr int kLanes = 64 / sizeof(M);

// kLanes<math_t<S>> consecutive elements of storage type S, converted to the math type.
template <class S> MHC_INLINE vec_t<math_t<S>> vload(const S* p) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
    vec_t<S> v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else if constexpr (std::is_same_v<S, bf16>) {
    vu16x16 h;
    std::memcpy(&h, p, sizeof(h));
    const vu32x16 w = __builtin_convertvector(h, vu32x16) << 16;
    vf32 v;
    std::memcpy(&v, &w, sizeof(v));
    return v;
  } else if constexpr (kF16Level<S> == 4) {
    vi16x16 h;
    std::memcpy(&h, p, sizeof(h));
    return __builtin_ia32_vcvtph2ps512_mask(h, vf32{}, static_cast<unsigned short>(-1), _MM_FROUND_CUR_DIRECTION);
  } else if constexpr (kF16Level<S> == 3) {
    vi16x8 lo, hi;
    std::memcpy(&lo, p, sizeof(lo));
    std::memcpy(&hi, p + 8, sizeof(hi));
    const vf32x8 parts[2] = {__builtin_ia32_vcvtph2ps256(lo), __builtin_ia32_vcvtph2ps256(hi)};
    vf32 v;
    std::memcpy(&v, parts, sizeof(v));
    return v;
  } else {  // f16 without F16C: detail::half_bits_to_float on 16 lanes
    vu16x16 h16;
    std::memcpy(&h16, p, sizeof(h16));
    const vu32x16 h = __builtin_convertvector(h16, vu32x16);
    const vu32x16 u = ((h & 0x7fffu) << 13) + ((127u - 15u) << 23);
    const vu32x16 exponent = h & 0x7c00u;
    const vu32x16 inf_nan = (u + ((128u - 16u) << 23)) | ((h & 0x3ffu) != 0 ? vu32x16{} + 0x400000u : vu32x16{});
    vf32 sub;
    const vu32x16 sub_bits = u + (1u << 23);
    std::memcpy(&sub, &sub_bits, sizeof(sub));
    sub -= std::bit_cast<float>(113u << 23);
    vu32x16 renormalised;
    std::memcpy(&renormalised, &sub, sizeof(sub));
    vu32x16 r = exponent == 0x7c00u ? inf_nan : (exponent == 0 ? renormalised : u);
    r |= (h & 0x8000u) << 16;
    vf32 v;
    std::memcpy(&v, &r, sizeof(v));
    return v;
  }
}

// Stores a vector rounded to S (round to nearest even, NaN kept quiet), as detail::store does.
template <class S> MHC_INLINE void vstore(S* p, vec_t<math_t<S>> v) {
  if constexpr (std::is_same_v<S, float> || std::is_same_v<S, double>) {
    std::memcpy(p, &v, sizeof(v));
  } else if constexpr (std::is_same_v<S, bf16>) {
    vu32x16 u;
    std::memcpy(&u, &v, sizeof(u));
    const vu32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vu32x16 quiet_nan = (u >> 16) | 0x40u;
    const vu32x16 r = (u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded;
    const vu16x16 h = __builtin_convertvector(r, vu16x16);
    std::memcpy(p, &h, sizeof(h));
  } else if constexpr (kF16Level<S> == 4) {
    const vi16x16 h = __builtin_ia32_vcvtps2ph512_mask(v, 0, vi16x16{}, static_cast<unsigned short>(-1));
    std::memcpy(p, &h, sizeof(h));
  } else if constexpr (kF16Level<S> == 3) {
    vf32x8 parts[2];
    std::memcpy(parts, &v, sizeof(v));
    const vi16x8 lo = __builtin_ia32_vcvtps2ph256(parts[0], 0), hi = __builtin_ia32_vcvtps2ph256(parts[1], 0);
    std::memcpy(p, &lo, sizeof(lo));
    std::memcpy(p + 8, &hi, sizeof(hi));
  } else {  // f16 without F16C: detail::float_to_half_bits on 16 lanes
    vu32x16 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const vu32x16 sign = (bits >> 16) & 0x8000u;
    const vu32x16 u = bits & 0x7fffffffu;
    const vu32x16 inf_nan = u > 0x7f800000u ? (0x7e00u | ((u >> 13) & 0x3ffu)) : vu32x16{} + 0x7c00u;
    vf32 sub;
    std::memcpy(&sub, &u, sizeof(sub));
    sub += 0.5f;  // aligns the subnormal's bits at the bottom, rounding to nearest even
    vu32x16 subnormal;
    std::memcpy(&subnormal, &sub, sizeof(sub));
    subnormal -= std::bit_cast<std::uint32_t>(0.5f);
    const vu32x16 normal = (u + ((15u - 127u) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
    const vu32x16 h = u >= (143u << 23) ? inf_nan : (u < (113u << 23) ? subnormal : normal);
    const vu16x16 h16 = __builtin_convertvector(h | sign, vu16x16);
    std::memcpy(p, &h16, sizeof(h16));
  }
}

template <class V> MHC_INLINE auto hsum(V v) {
  auto s = v[0];
  for (int l = 1; l < static_cast<int>(sizeof(V) / sizeof(s)); ++l) s += v[l];
  return s;
}

// sum_k a[k] * b[k], both in storage types, in the math type of A.
template <class A, class B> MHC_INLINE math_t<A> dot(const A* a, const B* b, int64_t len) {
  using M = math_t<A>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  V acc0{}, acc1{};
  int64_t k = 0;
  for (; k + 2 * L <= len; k += 2 * L) {
    acc0 += vload(a + k) * vload(b + k);
    acc1 += vload(a + k + L) * vload(b + k + L);
  }
  if (k + L <= len) {
    acc0 += vload(a + k) * vload(b + k);
    k += L;
  }
  M s = hsum(acc0 + acc1);
  for (; k < len; ++k) s += load(a, k) * load(b, k);
  return s;
}

// ---- the projection GEMMs and Sinkhorn (src/cpu/fast_kernels.cpp) ---------------------------------------
// Out-of-line, one clone set per dtype, called once per tile of tokens: each is instantiated once
// instead of being inlined into every op. K = n*C is a token's flattened block; fn is [rows, K].

// NT: raw [tokens, rows] = x [tokens, K] @ fn^T and sumsq [tokens] = sum(x^2) per token, for
// 1 <= tokens <= kTokenTile consecutive tokens. fn == nullptr (static mode) gives the sums only.
#define MHC_DECLARE_PROJECT(S)                                                                         \
  void project(int tokens, const S* x, int64_t K, const math_t<S>* fn, int64_t rows, math_t<S>* raw,   \
               math_t<S>* sumsq);
MHC_DECLARE_PROJECT(float)
MHC_DECLARE_PROJECT(double)
MHC_DECLARE_PROJECT(f16)
MHC_DECLARE_PROJECT(bf16)

// NN with the elementwise terms of the input gradient, for `tokens` consecutive tokens t:
//   out[t, i, c] = accum[t, i, c] + w[t, i] * g[t, c] + coef[t] * x[t, i, c]
//                  + sum_r dP[t, r] * fn[r, i*C + c]
// accum and g may be null (absent); fn null (static mode) drops the GEMM term.
template <class S> struct InputGradArgs {
  using M = math_t<S>;
  const S* x;      // [tokens, n, C]
  const S* accum;  // [tokens, n, C] or null
  const S* g;      // [tokens, C] or null: gradient of the aggregate
  const M* w;      // [tokens, kMaxStreams]: aggregation weights, used with g
  const M* coef;   // [tokens]: the rstd term
  const M* dP;     // [tokens, rows]
  const M* fn;     // [rows, n*C] or null
  S* out;          // [tokens, n, C]
  int64_t n, C, rows;
};
void input_grad(int tokens, const InputGradArgs<float>& a);
void input_grad(int tokens, const InputGradArgs<double>& a);
void input_grad(int tokens, const InputGradArgs<f16>& a);
void input_grad(int tokens, const InputGradArgs<bf16>& a);
#define MHC_DECLARE_INPUT_GRAD(S) void input_grad(int tokens, const InputGradArgs<S>& a);

// TN: grad_fn[r, k] = sum_t dP[t, r] * x[t, k] over all T tokens, for the column blocks
// [block_begin, block_end) of param_grad_block_width(dtype) columns (the last one takes the rest).
// Each element is a sum over tokens in order, so it does not depend on how blocks are spread
// over threads.
#define MHC_DECLARE_PARAM_GRAD(S)                                                                      \
  void param_grad(const S* x, int64_t T, int64_t K, const math_t<S>* dP, int64_t rows,                 \
                  int64_t block_begin, int64_t block_end, math_t<S>* grad_fn);
MHC_DECLARE_PARAM_GRAD(float)
MHC_DECLARE_PARAM_GRAD(double)
MHC_DECLARE_PARAM_GRAD(f16)
MHC_DECLARE_PARAM_GRAD(bf16)

// The f16 overloads above pick the f16_hw ones by the CPU; these are called from the f16_hw kernels.
#if MHC_CPU_F16_LEVELS
#define MHC_DECLARE_GEMMS_AT(level, target) \
  target MHC_DECLARE_PROJECT(f16_hw<level>) \
  target MHC_DECLARE_INPUT_GRAD(f16_hw<level>) \
  target MHC_DECLARE_PARAM_GRAD(f16_hw<level>)
MHC_DECLARE_GEMMS_AT(4, MHC_TARGET_V4)
MHC_DECLARE_GEMMS_AT(3, MHC_TARGET_V3)
#undef MHC_DECLARE_GEMMS_AT
#endif
#undef MHC_DECLARE_PROJECT
#undef MHC_DECLARE_INPUT_GRAD
#undef MHC_DECLARE_PARAM_GRAD
inline int64_t param_grad_block_width(DType dtype) { return dtype == DType::f64 ? 64 : 128; }

// Sinkhorn on one n x n matrix (docs/MATH.md section 1): comb = softmax(logits, rows) + eps, then 2*iters-1
// normalisations alternating column sums + eps (first) and row sums + eps. comb may alias logits.
void sinkhorn_forward_matrix(const float* logits, float* comb, int n, int iters, float eps);
void sinkhorn_forward_matrix(const double* logits, double* comb, int n, int iters, double eps);
// grad_logits = J^T grad_comb by reverse mode through every normalisation and the softmax.
// grad_logits may alias grad_comb.
void sinkhorn_backward_matrix(const float* logits, const float* grad_comb, float* grad_logits, int n, int iters,
                              float eps);
void sinkhorn_backward_matrix(const double* logits, const double* grad_comb, double* grad_logits, int n,
                              int iters, double eps);

// The same for count <= kSinkhornBatch tokens at once (n <= kSinkhornBatchMaxN), one vector lane
// per token: token t's matrix is at logits + t * ld_logits (and likewise for the others).
inline constexpr int kSinkhornBatch = 16;
inline constexpr int kSinkhornBatchMaxN = 8;
void sinkhorn_forward_batch(int count, const float* logits, int64_t ld_logits, float* comb, int64_t ld_comb, int n,
                            int iters, float eps);
void sinkhorn_forward_batch(int count, const double* logits, int64_t ld_logits, double* comb, int64_t ld_comb, int n,
                            int iters, double eps);
void sinkhorn_backward_batch(int count, const float* logits, int64_t ld_logits, const float* grad_comb,
                             int64_t ld_grad, float* grad_logits, int64_t ld_out, int n, int iters, float eps);
void sinkhorn_backward_batch(int count, const double* logits, int64_t ld_logits, const double* grad_comb,
                             int64_t ld_grad, double* grad_logits, int64_t ld_out, int n, int iters, double eps);

// ---- per-token stream mixing ---------------------------------------------------------------------------
// out[c] = sum_i w[i] * x[i, c] for one token's [n, C] block.
template <class S>
MHC_INLINE void aggregate_token(const S* x, const math_t<S>* w, int64_t n, int64_t C, S* out) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    V acc = vload(x + c) * w[0];
    for (int64_t i = 1; i < n; ++i) acc += vload(x + i * C + c) * w[i];
    vstore(out + c, acc);
  }
  for (; c < C; ++c) {
    M acc = 0;
    for (int64_t i = 0; i < n; ++i) acc += w[i] * load(x, i * C + c);
    store(out, c, acc);
  }
}

// x_next[o, c] = h_post[o] * y[c] + sum_i comb[i, o] * x[i, c] for one token. Each vector of x is
// converted once and reused for every output stream.
template <class S>
MHC_INLINE void post_token(const S* x, const S* y, const math_t<S>* h_post, const math_t<S>* comb, int64_t n,
                           int64_t C, S* x_next) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  int64_t c = 0;
  for (; c + L <= C; c += L) {
    V xv[kMaxStreams];
    for (int64_t i = 0; i < n; ++i) xv[i] = vload(x + i * C + c);
    const V yv = vload(y + c);
    for (int64_t o = 0; o < n; ++o) {
      V acc = yv * h_post[o];
      for (int64_t i = 0; i < n; ++i) acc += xv[i] * comb[i * n + o];
      vstore(x_next + o * C + c, acc);
    }
  }
  for (; c < C; ++c)
    for (int64_t o = 0; o < n; ++o) {
      M acc = h_post[o] * load(y, c);
      for (int64_t i = 0; i < n; ++i) acc += comb[i * n + o] * load(x, i * C + c);
      store(x_next, o * C + c, acc);
    }
}

// Calls body(n) with n a compile-time constant after inlining for the common stream counts, so
// per-stream arrays of vectors live in registers; other n run the same code with n at run time.
template <class Body> MHC_INLINE void with_stream_count(int64_t n, Body&& body) {
  switch (n) {
    case 2: return body(int64_t{2});
    case 4: return body(int64_t{4});
    case 8: return body(int64_t{8});
    default: return body(n);
  }
}

// ---- coefficients ----------------------------------------------------------------------------------
template <class M> MHC_INLINE M sigmoid(M v) { return M(1) / (M(1) + std::exp(-v)); }

// ---- per-dtype entry points ------------------------------------------------------------------------
// Picks the instantiation for a storage dtype among four functions (f32, f64, f16, bf16).
template <class Fn> Fn pick(DType dtype, Fn f32, Fn f64, Fn f16_fn, Fn bf16_fn) {
  switch (dtype) {
    case DType::f32: return f32;
    case DType::f64: return f64;
    case DType::f16: return f16_fn;
    case DType::bf16: return bf16_fn;
  }
  return f32;
}

// Defines name_f32 .. name_bf16(const Args&, const MhcConfig&, int64_t begin, int64_t end), each a
// clone set of name<S>; name_f16 runs name<f16_hw<4>>, name<f16_hw<3>> or name<f16> by the CPU.
#define MHC_CPU_ENTRY(name, S, suffix, Args)                                                           \
  MHC_CPU_KERNEL void name##_##suffix(const Args& a, const MhcConfig& cfg, std::int64_t begin,         \
                                      std::int64_t end) {                                              \
    name<S>(a, cfg, begin, end);                                                                       \
  }
#if MHC_CPU_F16_LEVELS
#define MHC_CPU_ENTRY_F16(name, Args)                                                                  \
  MHC_TARGET_V4 void name##_f16_v4(const Args& a, const MhcConfig& cfg, std::int64_t begin,            \
                                   std::int64_t end) {                                                 \
    name<::mhc::cpu_fast::kernels::f16_hw<4>>(a, cfg, begin, end);                                    \
  }                                                                                                    \
  MHC_TARGET_V3 void name##_f16_v3(const Args& a, const MhcConfig& cfg, std::int64_t begin,            \
                                   std::int64_t end) {                                                 \
    name<::mhc::cpu_fast::kernels::f16_hw<3>>(a, cfg, begin, end);                                    \
  }                                                                                                    \
  void name##_f16(const Args& a, const MhcConfig& cfg, std::int64_t begin, std::int64_t end) {         \
    switch (::mhc::cpu_fast::kernels::f16_isa_level()) {                                               \
      case 4: return name##_f16_v4(a, cfg, begin, end);                                                \
      case 3: return name##_f16_v3(a, cfg, begin, end);                                                \
      default: return name<::mhc::detail::f16>(a, cfg, begin, end);                                    \
    }                                                                                                  \
  }
#else
#define MHC_CPU_ENTRY_F16(name, Args) MHC_CPU_ENTRY(name, ::mhc::detail::f16, f16, Args)
#endif
#define MHC_CPU_ENTRIES(name, Args)                                                                    \
  MHC_CPU_ENTRY(name, float, f32, Args)                                                                \
  MHC_CPU_ENTRY(name, double, f64, Args)                                                               \
  MHC_CPU_ENTRY_F16(name, Args)                                                                        \
  MHC_CPU_ENTRY(name, ::mhc::detail::bf16, bf16, Args)
#define MHC_CPU_PICK(name, dtype) \
  ::mhc::cpu_fast::kernels::pick(dtype, &name##_f32, &name##_f64, &name##_f16, &name##_bf16)

}  // namespace mhc::cpu_fast::kernels
