// Fast CPU backend of the multi-history skip ops: OpenMP over fixed chunks of elements, inner loops
// the compiler vectorises, fp32 math (fp64 for f64 streams). Reductions (the dot products behind the
// weight gradients) go through per-thread partial sums in the workspace, combined in a fixed order,
// so results are deterministic for a given thread count. Sparsemax is computed without sorting
// (O(H^2) comparisons, the same scheme as the CUDA kernel), which cross-checks the sort-based reference.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef MHC_WITH_OPENMP
#include <omp.h>
#endif

#include "common/float_types.hpp"
#include "common/projection.hpp"
#include "backend.hpp"
#include "cpu/fast_kernels.hpp"

namespace mhc::cpu_fast {

using detail::dispatch_storage;
using detail::load;
using detail::store;

namespace {

using detail::softmax_row;
using detail::sparsemax_row;

constexpr std::int64_t kChunk = 2048;  // elements per work item: a few KiB per state, L1-resident
constexpr int kLanes = 16;             // independent accumulators of a dot product (vectorisable)
// Element reads below which an op runs on the calling thread alone: waking a second OpenMP team costs
// more than it saves there, and next to PyTorch's own thread pool (a separate OpenMP runtime) it
// makes both fight for the cores.
constexpr std::int64_t kParallelMinWork = std::int64_t(1) << 21;

int thread_count(const Context& ctx) {
#ifdef MHC_WITH_OPENMP
  return ctx.num_threads > 0 ? ctx.num_threads : omp_get_max_threads();
#else
  (void)ctx;
  return 1;
#endif
}
int thread_id() {
#ifdef MHC_WITH_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
int team_size() {
#ifdef MHC_WITH_OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

std::int64_t chunks_of(std::int64_t n) { return (n + kChunk - 1) / kChunk; }

// Calls f(X{}, S{}) for the stream and storage types of a supported (stream, storage) pair.
template <class F> void dispatch_pair(DType stream, DType storage, F&& f) {
  dispatch_storage(stream, [&](auto x_tag) {
    dispatch_storage(storage, [&](auto s_tag) { f(x_tag, s_tag); });
  });
}

template <class M> M coef_at(const TensorView& t, std::int64_t i) {
  return t.dtype == DType::f64 ? static_cast<M>(t.ptr<const double>()[i]) : static_cast<M>(t.ptr<const float>()[i]);
}
template <class M> void coef_set(const TensorView& t, std::int64_t i, M v) {
  if (t.dtype == DType::f64) t.ptr<double>()[i] = static_cast<double>(v);
  else t.ptr<float>()[i] = static_cast<float>(v);
}

// ---- projections in M precision -------------------------------------------------------------------

template <class M> void project_row(const M* z, M* w, int H, const HistoryConfig& cfg) {
  M u[kMaxHistory] = {};
  const M inv_t = M(1) / static_cast<M>(cfg.temperature);
  for (int k = 0; k < H; ++k) u[k] = z[k] * inv_t;
  if (cfg.constraint == Constraint::simplex) {
    sparsemax_row(u, w, H);
  } else {
    softmax_row(u, w, H);
    if (cfg.constraint == Constraint::identity) {
      const M keep = M(1) - static_cast<M>(cfg.epsilon);
      for (int k = 0; k < H; ++k) w[k] *= keep;
      w[0] += static_cast<M>(cfg.epsilon);
    }
  }
}

// grad_z of one row; only entries with w > 0 of grad_w matter (see history.hpp).
template <class M> void project_row_backward(const M* z, const M* w, const M* g, M* grad_z, int H,
                                             const HistoryConfig& cfg) {
  const M inv_t = M(1) / static_cast<M>(cfg.temperature);
  if (cfg.constraint == Constraint::simplex) {
    M sum = 0;
    int count = 0;
    for (int k = 0; k < H; ++k)
      if (w[k] > 0) {
        sum += g[k];
        ++count;
      }
    const M mean = count ? sum / count : M(0);
    for (int k = 0; k < H; ++k) grad_z[k] = w[k] > 0 ? (g[k] - mean) * inv_t : M(0);
    return;
  }
  M u[kMaxHistory] = {}, s[kMaxHistory] = {};
  for (int k = 0; k < H; ++k) u[k] = z[k] * inv_t;
  softmax_row(u, s, H);
  const M c = cfg.constraint == Constraint::identity ? M(1) - static_cast<M>(cfg.epsilon) : M(1);
  M gs = 0;
  for (int k = 0; k < H; ++k) gs += g[k] * s[k];
  for (int k = 0; k < H; ++k) grad_z[k] = c * s[k] * (g[k] - gs) * inv_t;
}

// The doubly stochastic projection is the n-stream Sinkhorn (docs/MATH.md section 1.1) of z / T: the one
// implementation of the fast CPU backend (fast_kernels.cpp), whose reverse mode keeps checkpoints instead of
// recomputing every step from the logits.
template <class M> void sinkhorn_of_scaled(const M* z, M* w, int H, const HistoryConfig& cfg) {
  const M inv_t = M(1) / static_cast<M>(cfg.temperature);
  const int HH = H * H;
  for (int e = 0; e < HH; ++e) w[e] = z[e] * inv_t;
  kernels::sinkhorn_forward_matrix(w, w, H, cfg.sinkhorn_iters, static_cast<M>(cfg.sinkhorn_eps));
}

template <class M> void sinkhorn_of_scaled_backward(const M* z, const M* grad_w, M* grad_z, int H,
                                                    const HistoryConfig& cfg) {
  const M inv_t = M(1) / static_cast<M>(cfg.temperature);
  const int HH = H * H;
  thread_local std::vector<M> scaled;  // grows once per thread, reused by later calls
  scaled.resize(static_cast<std::size_t>(HH));
  M* u = scaled.data();
  for (int e = 0; e < HH; ++e) u[e] = z[e] * inv_t;
  kernels::sinkhorn_backward_matrix(u, grad_w, grad_z, H, cfg.sinkhorn_iters, static_cast<M>(cfg.sinkhorn_eps));
  for (int e = 0; e < HH; ++e) grad_z[e] *= inv_t;
}

template <class M> void project_forward_typed(const ProjectLogitsForward& a, const HistoryConfig& cfg, int threads) {
  const int H = static_cast<int>(a.logits.shape[a.logits.rank - 1]);
  const bool square = cfg.constraint == Constraint::doubly_stochastic;
  const std::int64_t block = square ? std::int64_t(H) * H : H;
  const std::int64_t rows = a.logits.numel() / block;
  const M* z = a.logits.ptr<const M>();
  M* w = a.weights.ptr<M>();
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * block * block > kParallelMinWork)
  for (std::int64_t r = 0; r < rows; ++r) {
    if (square) sinkhorn_of_scaled(z + r * block, w + r * block, H, cfg);
    else project_row(z + r * block, w + r * block, H, cfg);
  }
}

template <class M> void project_backward_typed(const ProjectLogitsBackward& a, const HistoryConfig& cfg, int threads) {
  const int H = static_cast<int>(a.logits.shape[a.logits.rank - 1]);
  const bool square = cfg.constraint == Constraint::doubly_stochastic;
  const std::int64_t block = square ? std::int64_t(H) * H : H;
  const std::int64_t rows = a.logits.numel() / block;
  const M *z = a.logits.ptr<const M>(), *w = a.weights.ptr<const M>(), *g = a.grad_weights.ptr<const M>();
  M* gz = a.grad_logits.ptr<M>();
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * block * block > kParallelMinWork)
  for (std::int64_t r = 0; r < rows; ++r) {
    if (square) {
      sinkhorn_of_scaled_backward(z + r * block, g + r * block, gz + r * block, H, cfg);
    } else {
      project_row_backward(z + r * block, w + r * block, g + r * block, gz + r * block, H, cfg);
    }
  }
}

// ---- the weighted sum -------------------------------------------------------------------------------
// Per chunk of kChunk elements; the OpenMP loops below hand chunks to a chunk function picked once per
// call. With an fp16 stream or state on a CPU with F16C it converts 8 lanes per instruction
// (kernels::f16_hw<3>, as the n-stream kernels do); the conversions are exact either way, so the
// results do not depend on the CPU.

using kernels::f16_hw;
using kernels::kIsF16;

// S as code compiled for x86-64 level L sees it: fp16 becomes f16_hw<L>.
template <class S, int L>
using at_level_t = std::conditional_t<std::is_same_v<S, detail::f16>, f16_hw<L>, S>;
template <int L, class S> auto* at_level(S* p) {
  using T = at_level_t<std::remove_const_t<S>, L>;
  return reinterpret_cast<std::conditional_t<std::is_const_v<S>, const T, T>*>(p);
}

// fp16 with fp32 math converts 16 elements per step, as two 8-lane halves: the F16C path runs on AVX2,
// where GCC keeps 8-lane vectors in registers but spills 16-lane ones. Other types convert element by
// element, in loops the compiler vectorises itself.
template <class S, class M> inline constexpr bool kVectorF16 = kIsF16<S> && std::is_same_v<M, float>;
using kernels::vf32;
using kernels::vf32x8;
using kernels::vi16x8;

template <class S> MHC_INLINE void load16(const S* p, vf32x8& lo, vf32x8& hi) {
  if constexpr (kernels::kF16Level<S> >= 3) {
    vi16x8 h[2];
    std::memcpy(h, p, sizeof(h));
    lo = __builtin_ia32_vcvtph2ps256(h[0]);
    hi = __builtin_ia32_vcvtph2ps256(h[1]);
  } else {
    const vf32 v = kernels::vload(p);
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  }
}
template <class S> MHC_INLINE void store16(S* p, vf32x8 lo, vf32x8 hi) {
  if constexpr (kernels::kF16Level<S> >= 3) {
    const vi16x8 h[2] = {__builtin_ia32_vcvtps2ph256(lo, 0), __builtin_ia32_vcvtps2ph256(hi, 0)};  // nearest even
    std::memcpy(p, h, sizeof(h));
  } else {
    vf32 v;
    std::memcpy(&v, &lo, sizeof(lo));
    std::memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
    kernels::vstore(p, v);
  }
}
MHC_INLINE void load16(const float* p, vf32x8& lo, vf32x8& hi) {
  std::memcpy(&lo, p, sizeof(lo));
  std::memcpy(&hi, p + 8, sizeof(hi));
}
MHC_INLINE void store16(float* p, vf32x8 lo, vf32x8 hi) {
  std::memcpy(p, &lo, sizeof(lo));
  std::memcpy(p + 8, &hi, sizeof(hi));
}

// dst[i] = src[i] in M.
template <class S, class M> MHC_INLINE void to_math(const S* src, std::int64_t len, M* dst) {
  if constexpr (std::is_same_v<S, M>) {
    std::copy(src, src + len, dst);
  } else {
    std::int64_t i = 0;
    if constexpr (kVectorF16<S, M>)
      for (vf32x8 lo, hi; i + 16 <= len; i += 16) {
        load16(src + i, lo, hi);
        store16(dst + i, lo, hi);
      }
    for (; i < len; ++i) dst[i] = load(src, i);
  }
}
// dst[i] = src[i] rounded to S.
template <class S, class M> MHC_INLINE void store_math(const M* src, std::int64_t len, S* dst) {
  std::int64_t i = 0;
  if constexpr (kVectorF16<S, M>)
    for (vf32x8 lo, hi; i + 16 <= len; i += 16) {
      load16(src + i, lo, hi);
      store16(dst + i, lo, hi);
    }
  for (; i < len; ++i) store(dst, i, src[i]);
}
// acc[i] += scaled * src[i].
template <class S, class M> MHC_INLINE void add_scaled(M* acc, M scaled, const S* src, std::int64_t len) {
  std::int64_t i = 0;
  if constexpr (kVectorF16<S, M>)
    for (vf32x8 a_lo, a_hi, h_lo, h_hi; i + 16 <= len; i += 16) {
      load16(acc + i, a_lo, a_hi);
      load16(src + i, h_lo, h_hi);
      store16(acc + i, a_lo + scaled * h_lo, a_hi + scaled * h_hi);
    }
  for (; i < len; ++i) acc[i] += scaled * load(src, i);
}
// <g, h> over len elements: kLanes partial sums, then their sum in order, then the tail.
template <class S, class M> MHC_INLINE M dot_chunk(const M* g, const S* h, std::int64_t len) {
  static_assert(kLanes == 16, "the fp16 path holds one partial sum per lane of two 8-lane vectors");
  M lane[kLanes] = {};
  std::int64_t i = 0;
  if constexpr (kVectorF16<S, M>) {
    vf32x8 lo{}, hi{};
    for (vf32x8 g_lo, g_hi, h_lo, h_hi; i + kLanes <= len; i += kLanes) {
      load16(g + i, g_lo, g_hi);
      load16(h + i, h_lo, h_hi);
      lo += g_lo * h_lo;
      hi += g_hi * h_hi;
    }
    store16(lane, lo, hi);
  } else {
    for (; i + kLanes <= len; i += kLanes)
      for (int j = 0; j < kLanes; ++j) lane[j] += g[i + j] * load(h, i + j);
  }
  M sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += lane[j];
  for (; i < len; ++i) sum += g[i] * load(h, i);
  return sum;
}

template <class X, class S, class M> struct MixArgs {
  const X* x;  // [R, N] or null
  const S* h[kMaxHistory];
  const M* w;  // [R, H]: scaled by gate
  M gate;
  int H;
  std::int64_t R, N;
  X* out;
};
template <int L, class X, class S, class M> MixArgs<at_level_t<X, L>, at_level_t<S, L>, M> at_level(const MixArgs<X, S, M>& a) {
  MixArgs<at_level_t<X, L>, at_level_t<S, L>, M> b{at_level<L>(a.x), {}, a.w, a.gate, a.H, a.R, a.N, at_level<L>(a.out)};
  for (int k = 0; k < a.H; ++k) b.h[k] = at_level<L>(a.h[k]);
  return b;
}

// out[r] = x[r] + sum_k scaled[r, k] * h_k on chunk c; a state whose weight is 0 is skipped (not read).
template <class X, class S, class M> MHC_INLINE void mix_chunk(const MixArgs<X, S, M>& a, std::int64_t c) {
  const std::int64_t n0 = c * kChunk, len = std::min(kChunk, a.N - n0);
  M acc[kChunk];
  for (std::int64_t r = 0; r < a.R; ++r) {
    if (a.x) to_math(a.x + r * a.N + n0, len, acc);
    else std::fill(acc, acc + len, M(0));
    for (int k = 0; k < a.H; ++k) {
      const M wk = a.w[r * a.H + k];
      if (wk != M(0)) add_scaled(acc, a.gate * wk, a.h[k] + n0, len);
    }
    store_math(acc, len, a.out + r * a.N + n0);
  }
}

template <class X, class S, class M> struct MixBackwardArgs {
  const X* grad_out;  // [R, N]
  const S* h[kMaxHistory];
  S* gh[kMaxHistory];  // null: that state's gradient is not wanted
  const M* w;
  M gate;
  const bool* need_dot;  // [R, H]
  int H;
  std::int64_t R, N;
};
template <int L, class X, class S, class M>
MixBackwardArgs<at_level_t<X, L>, at_level_t<S, L>, M> at_level(const MixBackwardArgs<X, S, M>& a) {
  MixBackwardArgs<at_level_t<X, L>, at_level_t<S, L>, M> b{at_level<L>(a.grad_out), {}, {}, a.w, a.gate,
                                                            a.need_dot, a.H, a.R, a.N};
  for (int k = 0; k < a.H; ++k) {
    b.h[k] = at_level<L>(a.h[k]);
    b.gh[k] = at_level<L>(a.gh[k]);
  }
  return b;
}

// Backward of mix_chunk on chunk c: adds <grad_out[r], h_k> to dots[r * H + k] where need_dot, and
// writes grad_states[k] = gate * sum_r w[r, k] grad_out[r].
template <class X, class S, class M>
MHC_INLINE void mix_backward_chunk(const MixBackwardArgs<X, S, M>& a, std::int64_t c, double* dots) {
  const std::int64_t n0 = c * kChunk, len = std::min(kChunk, a.N - n0);
  M g[kChunk], acc[kChunk];
  for (std::int64_t r = 0; r < a.R; ++r) {
    to_math(a.grad_out + r * a.N + n0, len, g);
    for (int k = 0; k < a.H; ++k)
      if (a.need_dot[r * a.H + k]) dots[r * a.H + k] += static_cast<double>(dot_chunk(g, a.h[k] + n0, len));
  }
  for (int k = 0; k < a.H; ++k) {
    if (!a.gh[k]) continue;
    std::fill(acc, acc + len, M(0));
    for (std::int64_t r = 0; r < a.R; ++r) {
      const M scaled = a.gate * a.w[r * a.H + k];
      if (scaled != M(0)) add_scaled(acc, scaled, a.grad_out + r * a.N + n0, len);
    }
    store_math(acc, len, a.gh[k] + n0);
  }
}

// The chunk functions, and the one for this CPU. The F16C one is compiled for AVX2 + F16C without FMA:
// a fused multiply-add would round differently from the baseline's multiply then add, and these loops
// are bound by memory, not by arithmetic.
template <class X, class S, class M> void mix_chunk_baseline(const MixArgs<X, S, M>& a, std::int64_t c) {
  mix_chunk(a, c);
}
template <class X, class S, class M>
void mix_backward_chunk_baseline(const MixBackwardArgs<X, S, M>& a, std::int64_t c, double* dots) {
  mix_backward_chunk(a, c, dots);
}
#if MHC_CPU_F16_LEVELS
#define MHC_TARGET_F16C_NO_FMA __attribute__((target("avx2,f16c,no-fma")))
template <class X, class S, class M>
MHC_TARGET_F16C_NO_FMA void mix_chunk_f16c(const MixArgs<X, S, M>& a, std::int64_t c) {
  mix_chunk(at_level<3>(a), c);
}
template <class X, class S, class M>
MHC_TARGET_F16C_NO_FMA void mix_backward_chunk_f16c(const MixBackwardArgs<X, S, M>& a, std::int64_t c,
                                                    double* dots) {
  mix_backward_chunk(at_level<3>(a), c, dots);
}
#undef MHC_TARGET_F16C_NO_FMA
#endif
template <class X, class S> inline constexpr bool uses_f16 = std::is_same_v<X, detail::f16> || std::is_same_v<S, detail::f16>;

// out[r] = x[r] + sum_k scaled[r, k] * h_k over R rows of N elements; scaled = gate * w.
template <class X, class S, class M>
void mix_rows(const X* x, std::span<const TensorView> states, const M* w, M gate, std::int64_t R, std::int64_t N,
              X* out, int threads) {
  const int H = static_cast<int>(states.size());
  MixArgs<X, S, M> a{x, {}, w, gate, H, R, N, out};
  for (int k = 0; k < H; ++k) a.h[k] = states[k].ptr<const S>();
  auto chunk = &mix_chunk_baseline<X, S, M>;
#if MHC_CPU_F16_LEVELS
  if constexpr (uses_f16<X, S>)
    if (kernels::f16_isa_level() >= 3) chunk = &mix_chunk_f16c<X, S, M>;
#endif
#pragma omp parallel for schedule(static) num_threads(threads) if (N * R * (H + 2) > kParallelMinWork)
  for (std::int64_t c = 0; c < chunks_of(N); ++c) chunk(a, c);
}

// Backward of mix_rows. dots[r * H + k] = <grad_out[r], h_k> (fp64 across chunks), computed for every
// k with need_dot[r * H + k]; grad_states[k] = gate * sum_r w[r, k] grad_out[r] when given.
// partials: threads x R x H doubles from the workspace.
template <class X, class S, class M>
void mix_rows_backward(const X* grad_out, std::span<const TensorView> states, std::span<const TensorView> grad_states,
                       const M* w, M gate, const bool* need_dot, std::int64_t R, std::int64_t N, double* partials,
                       double* dots, int threads) {
  const int H = static_cast<int>(states.size());
  const std::int64_t RH = R * H;
  MixBackwardArgs<X, S, M> a{grad_out, {}, {}, w, gate, need_dot, H, R, N};
  for (int k = 0; k < H; ++k) a.h[k] = states[k].ptr<const S>();
  for (std::size_t k = 0; k < grad_states.size(); ++k)
    a.gh[k] = grad_states[k].present() ? grad_states[k].ptr<S>() : nullptr;
  auto chunk = &mix_backward_chunk_baseline<X, S, M>;
#if MHC_CPU_F16_LEVELS
  if constexpr (uses_f16<X, S>)
    if (kernels::f16_isa_level() >= 3) chunk = &mix_backward_chunk_f16c<X, S, M>;
#endif
  std::fill(partials, partials + threads * RH, 0.0);
  const std::int64_t chunks = chunks_of(N);
#pragma omp parallel num_threads(threads) if (N * R * (H + 2) > kParallelMinWork)
  {
    const int tid = thread_id(), team = team_size();
    // Contiguous static ranges of chunks: each thread's partial sums have a fixed order.
    const std::int64_t lo = chunks * tid / team, hi = chunks * (tid + 1) / team;
    for (std::int64_t c = lo; c < hi; ++c) chunk(a, c, partials + tid * RH);
  }
  for (std::int64_t j = 0; j < RH; ++j) {
    double sum = 0;
    for (int t = 0; t < threads; ++t) sum += partials[t * RH + j];
    dots[j] = sum;
  }
}

template <class M> M gate_of(const TensorView& gate) { return gate.present() ? coef_at<M>(gate, 0) : M(1); }

std::int64_t rows_of(const TensorView& weights) { return weights.rank == 2 ? weights.shape[0] : 1; }

}  // namespace

// ---- projection -----------------------------------------------------------------------------------

void project_logits_forward(const ProjectLogitsForward& a, const HistoryConfig& cfg, const Context& ctx) {
  if (a.logits.numel() == 0) return;
  if (a.logits.dtype == DType::f64) project_forward_typed<double>(a, cfg, thread_count(ctx));
  else project_forward_typed<float>(a, cfg, thread_count(ctx));
}

void project_logits_backward(const ProjectLogitsBackward& a, const HistoryConfig& cfg, const Context& ctx) {
  if (a.logits.numel() == 0) return;
  if (a.logits.dtype == DType::f64) project_backward_typed<double>(a, cfg, thread_count(ctx));
  else project_backward_typed<float>(a, cfg, thread_count(ctx));
}

// ---- mix ------------------------------------------------------------------------------------------

void history_mix_forward(const HistoryMixForward& a, const HistoryConfig&, const Context& ctx) {
  const std::int64_t R = rows_of(a.weights), N = a.states[0].numel();
  dispatch_pair(a.out.dtype, a.states[0].dtype, [&](auto x_tag, auto s_tag) {
    using X = decltype(x_tag);
    using S = decltype(s_tag);
    using M = detail::math_t<X>;
    M w[kMaxHistory * kMaxHistory];
    const int H = static_cast<int>(a.states.size());
    for (std::int64_t j = 0; j < R * H; ++j) w[j] = coef_at<M>(a.weights, j);
    mix_rows<X, S, M>(a.x.present() ? a.x.ptr<const X>() : nullptr, a.states, w, gate_of<M>(a.gate), R, N,
                      a.out.ptr<X>(), thread_count(ctx));
  });
}

std::size_t history_mix_backward_workspace_bytes(const HistoryMixBackward& a, const HistoryConfig&,
                                                 const Context& ctx) {
  return static_cast<std::size_t>(thread_count(ctx)) * rows_of(a.weights) * a.states.size() * sizeof(double);
}

void history_mix_backward(const HistoryMixBackward& a, const HistoryConfig&, const Context& ctx) {
  const std::int64_t R = rows_of(a.weights), N = a.states[0].numel();
  const int H = static_cast<int>(a.states.size()), threads = thread_count(ctx);
  dispatch_pair(a.grad_out.dtype, a.states[0].dtype, [&](auto x_tag, auto s_tag) {
    using X = decltype(x_tag);
    using S = decltype(s_tag);
    using M = detail::math_t<X>;
    M w[kMaxHistory * kMaxHistory];
    bool need[kMaxHistory * kMaxHistory];
    double dots[kMaxHistory * kMaxHistory];
    for (std::int64_t j = 0; j < R * H; ++j) {
      w[j] = coef_at<M>(a.weights, j);
      need[j] = true;  // every weight's gradient is an output
    }
    const M gate = gate_of<M>(a.gate);
    mix_rows_backward<X, S, M>(a.grad_out.ptr<const X>(), a.states, a.grad_states, w, gate, need, R, N,
                               a.workspace.ptr<double>(), dots, threads);
    double grad_gate = 0;
    for (std::int64_t j = 0; j < R * H; ++j) {
      coef_set<M>(a.grad_weights, j, static_cast<M>(static_cast<double>(gate) * dots[j]));
      if (w[j] != M(0)) grad_gate += static_cast<double>(w[j]) * dots[j];
    }
    if (a.grad_gate.present()) coef_set<M>(a.grad_gate, 0, static_cast<M>(grad_gate));
  });
}

// ---- fused skip -----------------------------------------------------------------------------------

void history_skip_forward(const HistorySkipForward& a, const HistoryConfig& cfg, const Context& ctx) {
  const std::int64_t N = a.states[0].numel();
  const int H = static_cast<int>(a.states.size());
  dispatch_pair(a.x.dtype, a.states[0].dtype, [&](auto x_tag, auto s_tag) {
    using X = decltype(x_tag);
    using S = decltype(s_tag);
    using M = detail::math_t<X>;
    M z[kMaxHistory] = {}, w[kMaxHistory];  // (zeroed: GCC cannot see that H entries are written)
    for (int k = 0; k < H; ++k) z[k] = coef_at<M>(a.logits, k);
    project_row(z, w, H, cfg);
    for (int k = 0; k < H; ++k) coef_set<M>(a.weights, k, w[k]);
    mix_rows<X, S, M>(a.x.ptr<const X>(), a.states, w, gate_of<M>(a.gate), 1, N, a.out.ptr<X>(), thread_count(ctx));
  });
}

std::size_t history_skip_backward_workspace_bytes(const HistorySkipBackward& a, const HistoryConfig&,
                                                  const Context& ctx) {
  return static_cast<std::size_t>(thread_count(ctx)) * a.states.size() * sizeof(double);
}

void history_skip_backward(const HistorySkipBackward& a, const HistoryConfig& cfg, const Context& ctx) {
  const std::int64_t N = a.states[0].numel();
  const int H = static_cast<int>(a.states.size()), threads = thread_count(ctx);
  dispatch_pair(a.grad_out.dtype, a.states[0].dtype, [&](auto x_tag, auto s_tag) {
    using X = decltype(x_tag);
    using S = decltype(s_tag);
    using M = detail::math_t<X>;
    M z[kMaxHistory], w[kMaxHistory], grad_w[kMaxHistory], grad_z[kMaxHistory];
    bool need[kMaxHistory];
    double dots[kMaxHistory];
    for (int k = 0; k < H; ++k) {
      z[k] = coef_at<M>(a.logits, k);
      w[k] = coef_at<M>(a.weights, k);
      need[k] = w[k] != M(0);  // zero weight: zero logit gradient, the state is not read
    }
    const M gate = gate_of<M>(a.gate);
    mix_rows_backward<X, S, M>(a.grad_out.ptr<const X>(), a.states, a.grad_states, w, gate, need, 1, N,
                               a.workspace.ptr<double>(), dots, threads);
    double grad_gate = 0;
    for (int k = 0; k < H; ++k) {
      grad_w[k] = need[k] ? static_cast<M>(static_cast<double>(gate) * dots[k]) : M(0);
      if (need[k]) grad_gate += static_cast<double>(w[k]) * dots[k];
    }
    project_row_backward(z, w, grad_w, grad_z, H, cfg);
    for (int k = 0; k < H; ++k) coef_set<M>(a.grad_logits, k, grad_z[k]);
    if (a.grad_gate.present()) coef_set<M>(a.grad_gate, 0, static_cast<M>(grad_gate));
  });
}

}  // namespace mhc::cpu_fast
