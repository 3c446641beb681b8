// Fast CPU backend of the multi-history skip ops: OpenMP over fixed chunks of elements, inner loops
// the compiler vectorises, fp32 math (fp64 for f64 streams). Reductions (the dot products behind the
// weight gradients) go through per-thread partial sums in the workspace, combined in a fixed order,
// so results are deterministic for a given thread count. Sparsemax is computed without sorting
// (O(H^2) comparisons, the same scheme as the CUDA kernel), which cross-checks the sort-based reference.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#ifdef MHC_WITH_OPENMP
#include <omp.h>
#endif

#include "common/float_types.hpp"
#include "backend.hpp"
#include "cpu/fast_kernels.hpp"

namespace mhc::cpu_fast {

using detail::dispatch_storage;
using detail::load;
using detail::store;

namespace {

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

template <class M> void softmax_row(const M* u, M* s, int H) {
  M m = u[0];
  for (int k = 1; k < H; ++k) m = std::max(m, u[k]);
  M sum = 0;
  for (int k = 0; k < H; ++k) sum += (s[k] = std::exp(u[k] - m));
  const M inv = M(1) / sum;
  for (int k = 0; k < H; ++k) s[k] *= inv;
}

// Sort-free sparsemax: element j is in the support iff 1 + c_j u_j > s_j, where c_j and s_j count and
// sum the elements >= u_j; ties evaluate identically to the sorted formula, and the support size is
// the largest such c_j.
template <class M> void sparsemax_row(const M* u, M* w, int H) {
  int best_count = 0;
  M best_sum = 0;
  for (int j = 0; j < H; ++j) {
    int count = 0;
    M sum = 0;
    for (int i = 0; i < H; ++i)
      if (u[i] >= u[j]) {
        ++count;
        sum += u[i];
      }
    if (M(1) + count * u[j] > sum && count > best_count) {
      best_count = count;
      best_sum = sum;
    }
  }
  const M tau = (best_sum - M(1)) / best_count;
  for (int k = 0; k < H; ++k) w[k] = std::max(u[k] - tau, M(0));
}

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

// The doubly stochastic projection is the n-stream Sinkhorn (MATH.md section 1.1) of z / T: the one
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

// out[r] = x[r] + sum_k scaled[r, k] * h_k over R rows of N elements; scaled = gate * w, and a state
// whose weight is 0 is skipped (not read).
template <class X, class S, class M>
void mix_rows(const X* x, std::span<const TensorView> states, const M* w, M gate, std::int64_t R, std::int64_t N,
              X* out, int threads) {
  const int H = static_cast<int>(states.size());
  const S* h[kMaxHistory];
  for (int k = 0; k < H; ++k) h[k] = states[k].ptr<const S>();
#pragma omp parallel for schedule(static) num_threads(threads) if (N * R * (H + 2) > kParallelMinWork)
  for (std::int64_t c = 0; c < chunks_of(N); ++c) {
    const std::int64_t n0 = c * kChunk, len = std::min(kChunk, N - n0);
    M acc[kChunk];
    for (std::int64_t r = 0; r < R; ++r) {
      if (x) for (std::int64_t i = 0; i < len; ++i) acc[i] = load(x + r * N + n0, i);
      else std::fill(acc, acc + len, M(0));
      for (int k = 0; k < H; ++k) {
        const M wk = w[r * H + k];
        if (wk == M(0)) continue;
        const M scaled = gate * wk;
        const S* hk = h[k] + n0;
        for (std::int64_t i = 0; i < len; ++i) acc[i] += scaled * load(hk, i);
      }
      for (std::int64_t i = 0; i < len; ++i) store(out + r * N + n0, i, acc[i]);
    }
  }
}

template <class S, class M> M dot_chunk(const M* g, const S* h, std::int64_t len) {
  M lane[kLanes] = {};
  std::int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane[j] += g[i + j] * load(h, i + j);
  M sum = 0;
  for (int j = 0; j < kLanes; ++j) sum += lane[j];
  for (; i < len; ++i) sum += g[i] * load(h, i);
  return sum;
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
  const S* h[kMaxHistory];
  S* gh[kMaxHistory] = {};
  for (int k = 0; k < H; ++k) h[k] = states[k].ptr<const S>();
  for (std::size_t k = 0; k < grad_states.size(); ++k) gh[k] = grad_states[k].present() ? grad_states[k].ptr<S>() : nullptr;
  std::fill(partials, partials + threads * RH, 0.0);
  const std::int64_t chunks = chunks_of(N);
#pragma omp parallel num_threads(threads) if (N * R * (H + 2) > kParallelMinWork)
  {
    const int tid = thread_id(), team = team_size();
    // Contiguous static ranges of chunks: each thread's partial sums have a fixed order.
    const std::int64_t lo = chunks * tid / team, hi = chunks * (tid + 1) / team;
    double* mine = partials + tid * RH;
    M g[kChunk], acc[kChunk];
    for (std::int64_t c = lo; c < hi; ++c) {
      const std::int64_t n0 = c * kChunk, len = std::min(kChunk, N - n0);
      for (std::int64_t r = 0; r < R; ++r) {
        for (std::int64_t i = 0; i < len; ++i) g[i] = load(grad_out + r * N + n0, i);
        for (int k = 0; k < H; ++k)
          if (need_dot[r * H + k]) mine[r * H + k] += static_cast<double>(dot_chunk(g, h[k] + n0, len));
      }
      if (!grad_states.empty())
        for (int k = 0; k < H; ++k) {
          if (!gh[k]) continue;  // not wanted
          std::fill(acc, acc + len, M(0));
          for (std::int64_t r = 0; r < R; ++r) {
            const M scaled = gate * w[r * H + k];
            if (scaled == M(0)) continue;
            const X* gr = grad_out + r * N + n0;
            for (std::int64_t i = 0; i < len; ++i) acc[i] += scaled * load(gr, i);
          }
          for (std::int64_t i = 0; i < len; ++i) store(gh[k] + n0, i, acc[i]);
        }
    }
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
    M z[kMaxHistory], w[kMaxHistory];
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
