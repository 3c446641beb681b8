// Multi-history skip ops on CUDA.
//
// - Forward (history_mix / history_skip): one kernel, one pass over the states. Each block first
//   puts the H weights in shared memory (for the fused skip it projects the logits itself: sort-free
//   sparsemax or softmax over H <= 64 values, a few hundred cycles), then streams its elements with
//   16-byte loads. A state whose weight is exactly 0 is skipped by a block-uniform branch, so it is
//   never loaded: one-hot weights cost one residual add (read x and one state, write out), decided
//   on the device with no host sync.
// - Backward: a kernel computes per-block partial dot products <grad_out, h_k> (and writes
//   grad_states), a single-block kernel sums the partials in a fixed order (fp64) and applies the
//   projection's backward. Deterministic run to run.
// - project_logits: one thread per row for the vector constraints; one block per matrix for Sinkhorn,
//   the n-stream ops' (sinkhorn.cuh), whose backward keeps each step's divisors and walks them in reverse.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/projection.hpp"
#include "cuda/common.cuh"
#include "cuda/sinkhorn.cuh"
#include "backend.hpp"

namespace mhc::cuda_impl {

namespace {

using detail::softmax_row;
using detail::sparsemax_row;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxH = kMaxHistory;
constexpr int kBlocksPerSm = 4;

struct StatePtrs {
  const void* p[kMaxH];
};
struct GradPtrs {
  void* p[kMaxH];
};

enum ProjKind : int { kSimplex = 0, kSoftmax = 1, kIdentity = 2 };

struct Projection {
  int kind;
  double inv_t;
  double epsilon;
};

Projection projection_of(const HistoryConfig& cfg) {
  const int kind = cfg.constraint == Constraint::simplex ? kSimplex
                   : cfg.constraint == Constraint::softmax ? kSoftmax
                                                           : kIdentity;
  return {kind, 1.0 / cfg.temperature, cfg.epsilon};
}

// ---- vector loads and stores --------------------------------------------------------------------------

template <class T, int V> __device__ __forceinline__ void load_vec(const T* p, T (&out)[V]) {
  if constexpr (V == 1) {
    out[0] = p[0];
  } else {
    static_assert(sizeof(T) * V % 16 == 0, "vector width must fill whole 16-byte words");
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(T) * V / 16); ++i)
      reinterpret_cast<uint4*>(out)[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  }
}

template <class T, int V> __device__ __forceinline__ void store_vec(T* p, const T (&in)[V]) {
  if constexpr (V == 1) {
    p[0] = in[0];
  } else {
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(T) * V / 16); ++i)
      reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(in)[i];
  }
}

// Elements per thread and iteration: 16 bytes of the narrower type.
template <class X, class S> constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(X) < sizeof(S) ? sizeof(X) : sizeof(S));
}

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// ---- projections on the device ------------------------------------------------------------------------

// The vector projection of logits [H] into w_s (shared) by the whole block. scratch: 2 * kMaxH + 1 values.
template <class M>
__device__ void project_in_block(const M* __restrict__ logits, int H, const Projection& p, M* w_s, M* scratch) {
  const int t = threadIdx.x;
  M* u = scratch;
  M* aux = scratch + kMaxH;
  M* shared_value = scratch + 2 * kMaxH;
  if (t < H) u[t] = logits[t] * static_cast<M>(p.inv_t);
  __syncthreads();
  if (p.kind == kSimplex) {
    // Sort-free sparsemax: j is in the support iff 1 + c_j u_j > s_j (c_j, s_j: count and sum of the
    // elements >= u_j); the support size is the largest such c_j.
    if (t < H) {
      const M uj = u[t];
      int count = 0;
      M sum = 0;
      for (int i = 0; i < H; ++i)
        if (u[i] >= uj) {
          ++count;
          sum += u[i];
        }
      w_s[t] = (M(1) + count * uj > sum) ? static_cast<M>(count) : M(0);
      aux[t] = sum;
    }
    __syncthreads();
    if (t == 0) {
      int best = 0;
      M best_sum = 0;
      for (int j = 0; j < H; ++j) {
        const int c = static_cast<int>(w_s[j]);
        if (c > best) {
          best = c;
          best_sum = aux[j];
        }
      }
      *shared_value = (best_sum - M(1)) / best;  // tau
    }
    __syncthreads();
    if (t < H) w_s[t] = max(u[t] - *shared_value, M(0));
  } else {
    if (t == 0) {
      M m = u[0];
      for (int k = 1; k < H; ++k) m = max(m, u[k]);
      M sum = 0;
      for (int k = 0; k < H; ++k) sum += (aux[k] = exp(u[k] - m));
      *shared_value = M(1) / sum;
    }
    __syncthreads();
    if (t < H) {
      M w = aux[t] * *shared_value;
      if (p.kind == kIdentity) w = w * (M(1) - static_cast<M>(p.epsilon)) + (t == 0 ? static_cast<M>(p.epsilon) : M(0));
      w_s[t] = w;
    }
  }
  __syncthreads();
}

// Serial (one thread) versions for project_logits rows and for the backward's finish: the row projections of
// src/common/projection.hpp (shared with the CPU).
template <class M> __device__ void project_serial(const M* z, M* w, int H, const Projection& p) {
  M u[kMaxH];
  for (int k = 0; k < H; ++k) u[k] = z[k] * static_cast<M>(p.inv_t);
  if (p.kind == kSimplex) {
    sparsemax_row(u, w, H);
  } else {
    softmax_row(u, w, H);
    if (p.kind == kIdentity) {
      const M keep = M(1) - static_cast<M>(p.epsilon);
      for (int k = 0; k < H; ++k) w[k] *= keep;
      w[0] += static_cast<M>(p.epsilon);
    }
  }
}

template <class M>
__device__ void project_backward_serial(const M* z, const M* w, const M* g, M* grad_z, int H, const Projection& p) {
  const M inv_t = static_cast<M>(p.inv_t);
  if (p.kind == kSimplex) {
    M sum = 0;
    int count = 0;
    for (int k = 0; k < H; ++k)
      if (w[k] > M(0)) {
        sum += g[k];
        ++count;
      }
    const M mean = count ? sum / count : M(0);
    for (int k = 0; k < H; ++k) grad_z[k] = w[k] > M(0) ? (g[k] - mean) * inv_t : M(0);
    return;
  }
  M u[kMaxH], s[kMaxH];
  for (int k = 0; k < H; ++k) u[k] = z[k] * inv_t;
  softmax_row(u, s, H);
  const M c = p.kind == kIdentity ? M(1) - static_cast<M>(p.epsilon) : M(1);
  M gs = 0;
  for (int k = 0; k < H; ++k) gs += g[k] * s[k];
  for (int k = 0; k < H; ++k) grad_z[k] = c * s[k] * (g[k] - gs) * inv_t;
}

// ---- forward: weighted sum (optionally with the projection fused in) -------------------------------------

// out[r] = x[r] + gate * sum_k w[r, k] * h_k. kFused: coef holds logits [H] (R = 1), projected per block,
// and block 0 writes the weights; otherwise coef holds the weights [R, H].
template <class X, class S, class M, int V, bool kFused>
__global__ void __launch_bounds__(kThreads)
    mix_forward_kernel(const X* __restrict__ x, StatePtrs states, int H, int R, const M* __restrict__ coef,
                       const M* __restrict__ gate, X* __restrict__ out, M* __restrict__ weights_out, std::int64_t N,
                       Projection proj) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  M* w_s = reinterpret_cast<M*>(smem_raw);
  if constexpr (kFused) {
    project_in_block(coef, H, proj, w_s, w_s + kMaxH);
    if (blockIdx.x == 0 && threadIdx.x < H) weights_out[threadIdx.x] = w_s[threadIdx.x];
  } else {
    for (int j = threadIdx.x; j < R * H; j += blockDim.x) w_s[j] = coef[j];
    __syncthreads();
  }
  const M g = gate ? gate[0] : M(1);
  const std::int64_t groups = N / V, stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t grp = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; grp < groups;
       grp += stride) {
    const std::int64_t n = grp * V;
    for (int r = 0; r < R; ++r) {
      M acc[V];
      if (x) {
        alignas(16) X xv[V];
        load_vec<X, V>(x + r * N + n, xv);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = to_math(xv[i]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] = M(0);
      }
      for (int k = 0; k < H; ++k) {
        const M wk = w_s[r * H + k];
        if (wk == M(0)) continue;  // block-uniform: the state is not loaded
        const M scaled = g * wk;
        alignas(16) S hv[V];
        load_vec<S, V>(static_cast<const S*>(states.p[k]) + n, hv);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += scaled * to_math(hv[i]);
      }
      alignas(16) X ov[V];
#pragma unroll
      for (int i = 0; i < V; ++i) ov[i] = from_math<X>(acc[i]);
      store_vec<X, V>(out + r * N + n, ov);
    }
  }
}

// ---- backward ----------------------------------------------------------------------------------------------

// Row r = blockIdx.y: partials[(r * gridDim.x + block) * H + k] = this block's part of <grad_out[r], h_k>,
// for k with need (all k, or only w[r, k] != 0 when skip_zero). With write_grad_states (R = 1 only),
// grad_states[k] = gate * w[k] * grad_out.
template <class X, class S, class M, int V, int HMAX>
__global__ void __launch_bounds__(kThreads)
    mix_backward_kernel(const X* __restrict__ grad_out, StatePtrs states, GradPtrs grad_states, int H,
                        const M* __restrict__ weights, const M* __restrict__ gate, bool skip_zero,
                        bool write_grad_states, std::int64_t N, M* __restrict__ partials) {
  __shared__ M w_s[kMaxH];
  __shared__ M red[kWarps][HMAX];
  const int r = blockIdx.y;
  for (int k = threadIdx.x; k < H; k += blockDim.x) w_s[k] = weights[r * H + k];
  __syncthreads();
  const M g = gate ? gate[0] : M(1);
  M acc[HMAX];
#pragma unroll
  for (int k = 0; k < HMAX; ++k) acc[k] = M(0);
  const X* go = grad_out + r * N;
  const std::int64_t groups = N / V, stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t grp = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; grp < groups;
       grp += stride) {
    const std::int64_t n = grp * V;
    alignas(16) X gv[V];
    load_vec<X, V>(go + n, gv);
    M gm[V];
#pragma unroll
    for (int i = 0; i < V; ++i) gm[i] = to_math(gv[i]);
#pragma unroll
    for (int k = 0; k < HMAX; ++k) {
      if (k < H) {
        const M wk = w_s[k];
        if (!skip_zero || wk != M(0)) {
          alignas(16) S hv[V];
          load_vec<S, V>(static_cast<const S*>(states.p[k]) + n, hv);
#pragma unroll
          for (int i = 0; i < V; ++i) acc[k] += gm[i] * to_math(hv[i]);
        }
        if (write_grad_states && grad_states.p[k]) {  // block-uniform; null: not wanted
          const M scaled = g * wk;
          alignas(16) S sv[V];
#pragma unroll
          for (int i = 0; i < V; ++i) sv[i] = from_math<S>(scaled * gm[i]);
          store_vec<S, V>(static_cast<S*>(grad_states.p[k]) + n, sv);
        }
      }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < HMAX; ++k) {
    if (k < H) {
      const M v = warp_sum(acc[k]);
      if (lane == 0) red[warp][k] = v;
    }
  }
  __syncthreads();
  for (int k = threadIdx.x; k < H; k += blockDim.x) {
    M total = 0;
    for (int w = 0; w < kWarps; ++w) total += red[w][k];
    partials[(static_cast<std::int64_t>(r) * gridDim.x + blockIdx.x) * H + k] = total;
  }
}

// Matrix form: grad_states[k] = gate * sum_r w[r, k] * grad_out[r].
template <class X, class S, class M, int V>
__global__ void __launch_bounds__(kThreads)
    matrix_grad_states_kernel(const X* __restrict__ grad_out, GradPtrs grad_states, int H, int R,
                              const M* __restrict__ weights, const M* __restrict__ gate, std::int64_t N) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  M* w_s = reinterpret_cast<M*>(smem_raw);
  for (int j = threadIdx.x; j < R * H; j += blockDim.x) w_s[j] = weights[j];
  __syncthreads();
  const M g = gate ? gate[0] : M(1);
  const std::int64_t groups = N / V, stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t grp = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; grp < groups;
       grp += stride) {
    const std::int64_t n = grp * V;
    for (int k = 0; k < H; ++k) {
      if (!grad_states.p[k]) continue;  // not wanted
      M acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = M(0);
      for (int r = 0; r < R; ++r) {
        const M wk = w_s[r * H + k];
        if (wk == M(0)) continue;
        const M scaled = g * wk;
        alignas(16) X gv[V];
        load_vec<X, V>(grad_out + r * N + n, gv);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += scaled * to_math(gv[i]);
      }
      alignas(16) S sv[V];
#pragma unroll
      for (int i = 0; i < V; ++i) sv[i] = from_math<S>(acc[i]);
      store_vec<S, V>(static_cast<S*>(grad_states.p[k]) + n, sv);
    }
  }
}

// One block: dots[r, k] = sum over blocks of the partials (fp64; a warp per (r, k), its lanes striding over
// the blocks, then a fixed-order warp sum: deterministic), then mix: grad_weights = gate * dots; skip:
// grad_logits = project_backward(gate * dots) on thread 0; both: grad_gate = sum_{w != 0} w * dots.
template <class M>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const M* __restrict__ partials, int blocks, int R, int H, const M* __restrict__ weights,
                    const M* __restrict__ logits, const M* __restrict__ gate, M* __restrict__ grad_weights,
                    M* __restrict__ grad_logits, M* __restrict__ grad_gate, Projection proj) {
  __shared__ double dots_s[kMaxH];
  __shared__ double red[kWarps];
  const double g = gate ? static_cast<double>(gate[0]) : 1.0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double gate_part = 0;
  for (int j = warp; j < R * H; j += kWarps) {
    const int r = j / H, k = j % H;
    double d = 0;
    for (int b = lane; b < blocks; b += 32)
      d += static_cast<double>(partials[(static_cast<std::int64_t>(r) * blocks + b) * H + k]);
    d = warp_sum(d);
    if (lane == 0) {
      const M wj = weights[j];
      if (grad_logits) dots_s[j] = wj != M(0) ? d : 0.0;  // skip: R = 1, zero-weight states were not read
      else grad_weights[j] = static_cast<M>(g * d);
      if (wj != M(0)) gate_part += static_cast<double>(wj) * d;
    }
  }
  if (lane == 0) red[warp] = gate_part;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0;
    for (int w = 0; w < kWarps; ++w) total += red[w];
    if (grad_gate) grad_gate[0] = static_cast<M>(total);
    if (grad_logits) {
      M z[kMaxH], w[kMaxH], gw[kMaxH], gz[kMaxH];
      for (int k = 0; k < H; ++k) {
        z[k] = logits[k];
        w[k] = weights[k];
        gw[k] = static_cast<M>(g * dots_s[k]);
      }
      project_backward_serial(z, w, gw, gz, H, proj);
      for (int k = 0; k < H; ++k) grad_logits[k] = gz[k];
    }
  }
}

// ---- project_logits ----------------------------------------------------------------------------------------

template <class M>
__global__ void project_rows_kernel(const M* __restrict__ logits, M* __restrict__ weights, std::int64_t rows, int H,
                                    Projection proj) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  M z[kMaxH], w[kMaxH];
  for (int k = 0; k < H; ++k) z[k] = logits[r * H + k];
  project_serial(z, w, H, proj);
  for (int k = 0; k < H; ++k) weights[r * H + k] = w[k];
}

template <class M>
__global__ void project_rows_backward_kernel(const M* __restrict__ logits, const M* __restrict__ weights,
                                             const M* __restrict__ grad_weights, M* __restrict__ grad_logits,
                                             std::int64_t rows, int H, Projection proj) {
  const std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  M z[kMaxH], w[kMaxH], g[kMaxH], gz[kMaxH];
  for (int k = 0; k < H; ++k) {
    z[k] = logits[r * H + k];
    w[k] = weights[r * H + k];
    g[k] = grad_weights[r * H + k];
  }
  project_backward_serial(z, w, g, gz, H, proj);
  for (int k = 0; k < H; ++k) grad_logits[r * H + k] = gz[k];
}

// The doubly stochastic projection: the Sinkhorn of sinkhorn.cuh (docs/MATH.md section 1.1) of z / T, one
// H x H matrix per block of sinkhorn_threads(H) threads (BlockGroup: one row or column a thread). The logits
// are scaled as the fast CPU path scales them, z * (1 / T) with 1 / T rounded to M once, and the gradient
// is scaled by 1 / T after the softmax backward, so the two backends round alike.
template <class M> struct ScaledLogits {
  const M* z;
  M inv_t;
  __device__ M operator()(int idx) const { return z[idx] * inv_t; }
};

struct SinkhornShape {
  int H;
  int iters;
  int window;  // backward: the steps whose divisors fit in shared memory at once
};

template <class M>
__global__ void sinkhorn_project_kernel(const M* __restrict__ logits, M* __restrict__ weights, std::int64_t matrices,
                                        SinkhornShape shape, M inv_t, M eps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  M* p = reinterpret_cast<M*>(smem_raw);
  const std::int64_t HH = static_cast<std::int64_t>(shape.H) * shape.H;
  for (std::int64_t m = blockIdx.x; m < matrices; m += gridDim.x) {
    sinkhorn_forward_group<BlockGroup>(ScaledLogits<M>{logits + m * HH, inv_t}, p, shape.H, eps, shape.iters);
    for (std::int64_t i = threadIdx.x; i < HH; i += blockDim.x) weights[m * HH + i] = p[i];
    __syncthreads();  // p is rewritten by the next matrix
  }
}

// Shared memory: p and g (H x H each), then the divisors of `window` steps.
template <class M>
__global__ void sinkhorn_project_backward_kernel(const M* __restrict__ logits, const M* __restrict__ grad_weights,
                                                 M* __restrict__ grad_logits, std::int64_t matrices,
                                                 SinkhornShape shape, M inv_t, M eps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const std::int64_t HH = static_cast<std::int64_t>(shape.H) * shape.H;
  M* p = reinterpret_cast<M*>(smem_raw);
  M* g = p + HH;
  M* divisors = g + HH;
  for (std::int64_t m = blockIdx.x; m < matrices; m += gridDim.x) {
    for (std::int64_t i = threadIdx.x; i < HH; i += blockDim.x) g[i] = grad_weights[m * HH + i];
    __syncthreads();
    sinkhorn_backward_group<BlockGroup>(ScaledLogits<M>{logits + m * HH, inv_t}, p, g, shape.H, eps, shape.iters,
                                        divisors, shape.window);
    for (std::int64_t i = threadIdx.x; i < HH; i += blockDim.x) grad_logits[m * HH + i] = g[i] * inv_t;
    __syncthreads();  // g is rewritten by the next matrix
  }
}

// ---- host side -----------------------------------------------------------------------------------------

template <class T> struct Tag {
  using type = T;
};

// f(Tag<X>, Tag<S>) for the supported (stream, storage) pairs.
template <class F> void dispatch_pair(DType stream, DType storage, F&& f) {
  auto same = [&](auto tag) { f(tag, tag); };
  if (stream == storage) {
    switch (stream) {
      case DType::f32: return same(Tag<float>{});
      case DType::f64: return same(Tag<double>{});
      case DType::f16: return same(Tag<__half>{});
      case DType::bf16: return same(Tag<__nv_bfloat16>{});
    }
  }
  if (stream == DType::f32 && storage == DType::f16) return f(Tag<float>{}, Tag<__half>{});
  if (stream == DType::f32 && storage == DType::bf16) return f(Tag<float>{}, Tag<__nv_bfloat16>{});
  if (stream == DType::f16 && storage == DType::f32) return f(Tag<__half>{}, Tag<float>{});
  if (stream == DType::bf16 && storage == DType::f32) return f(Tag<__nv_bfloat16>{}, Tag<float>{});
  throw DTypeError("mhc: unsupported stream/storage dtype pair");
}

// Grid of the mix kernels: a thread per group of packs, at most kBlocksPerSm blocks per SM (fewer than
// host.hpp's grid_for allows: the backward's per-block partial sums scale with the grid).
int mix_grid(std::int64_t groups) {
  const int cap = current_device_info().sm_count * kBlocksPerSm;
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(cap, (groups + kThreads - 1) / kThreads)));
}

// The backward's grid depends only on N (not on the vector width), so the workspace query agrees.
int backward_grid(std::int64_t N) { return mix_grid((N + 7) / 8); }

std::int64_t rows_of(const TensorView& weights) { return weights.rank == 2 ? weights.shape[0] : 1; }

StatePtrs state_ptrs(std::span<const TensorView> states) {
  StatePtrs p{};
  for (std::size_t k = 0; k < states.size(); ++k) p.p[k] = states[k].data;
  return p;
}
GradPtrs grad_ptrs(std::span<const TensorView> grads) {
  GradPtrs p{};
  for (std::size_t k = 0; k < grads.size(); ++k) p.p[k] = grads[k].data;
  return p;
}

// The vector width usable for every pointer of an op: 16-byte alignment and N a multiple of it.
template <class X, class S>
bool can_vectorise(std::int64_t N, std::initializer_list<const void*> ptrs, std::span<const TensorView> a,
                   std::span<const TensorView> b = {}) {
  if (N % vec_width<X, S>() != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  for (const TensorView& t : a)
    if (!aligned16(t.data)) return false;
  for (const TensorView& t : b)
    if (!aligned16(t.data)) return false;
  return true;
}

template <class M> const M* coef_ptr(const TensorView& t) { return t.present() ? t.ptr<const M>() : nullptr; }
template <class M> M* coef_out(const TensorView& t) { return t.present() ? t.ptr<M>() : nullptr; }

// Forward launch shared by history_mix_forward (kFused = false) and history_skip_forward (true).
template <bool kFused>
void launch_forward(const TensorView& x, std::span<const TensorView> states, const TensorView& coef,
                    const TensorView& gate, const TensorView& out, const TensorView& weights_out, std::int64_t R,
                    const HistoryConfig& cfg, const Context& ctx) {
  const std::int64_t N = states[0].numel();
  const int H = static_cast<int>(states.size());
  dispatch_pair(out.dtype, states[0].dtype, [&](auto x_tag, auto s_tag) {
    using X = typename decltype(x_tag)::type;
    using S = typename decltype(s_tag)::type;
    using M = math_t<X>;
    const X* xp = x.present() ? x.ptr<const X>() : nullptr;
    X* op = out.ptr<X>();
    const std::size_t smem = (kFused ? 3 * kMaxH + 1 : static_cast<std::size_t>(R) * H) * sizeof(M);
    auto launch = [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int grid = mix_grid(N / V);
      mix_forward_kernel<X, S, M, V, kFused><<<grid, kThreads, smem, stream_of(ctx)>>>(
          xp, state_ptrs(states), H, static_cast<int>(R), coef.ptr<const M>(), coef_ptr<M>(gate), op,
          coef_out<M>(weights_out), N, kFused ? projection_of(cfg) : Projection{});
      MHC_CUDA_CHECK_LAUNCH();
    };
    if (can_vectorise<X, S>(N, {xp, op}, states)) launch(std::integral_constant<int, vec_width<X, S>()>{});
    else launch(std::integral_constant<int, 1>{});
  });
}

// Backward launch shared by history_mix_backward (grad_logits absent) and history_skip_backward.
void launch_backward(const TensorView& grad_out, std::span<const TensorView> states,
                     std::span<const TensorView> grad_states, const TensorView& weights, const TensorView& logits,
                     const TensorView& gate, const TensorView& grad_weights, const TensorView& grad_logits,
                     const TensorView& grad_gate, const TensorView& workspace, std::int64_t R, bool skip_zero,
                     const HistoryConfig& cfg, const Context& ctx) {
  const std::int64_t N = states[0].numel();
  const int H = static_cast<int>(states.size());
  const int grid = backward_grid(N);
  dispatch_pair(grad_out.dtype, states[0].dtype, [&](auto x_tag, auto s_tag) {
    using X = typename decltype(x_tag)::type;
    using S = typename decltype(s_tag)::type;
    using M = math_t<X>;
    M* partials = workspace.ptr<M>();
    const X* go = grad_out.ptr<const X>();
    const bool fused_grad_states = !grad_states.empty() && R == 1;
    const GradPtrs gptrs = grad_ptrs(grad_states);
    const bool vec = can_vectorise<X, S>(N, {go}, states, grad_states);
    auto launch = [&](auto width, auto hmax) {
      constexpr int V = decltype(width)::value, HMAX = decltype(hmax)::value;
      mix_backward_kernel<X, S, M, V, HMAX><<<dim3(grid, static_cast<unsigned>(R)), kThreads, 0, stream_of(ctx)>>>(
          go, state_ptrs(states), gptrs, H, weights.ptr<const M>(), coef_ptr<M>(gate), skip_zero, fused_grad_states,
          N, partials);
      MHC_CUDA_CHECK_LAUNCH();
      if (!grad_states.empty() && R > 1) {
        const std::size_t smem = static_cast<std::size_t>(R) * H * sizeof(M);
        matrix_grad_states_kernel<X, S, M, V><<<mix_grid(N / V), kThreads, smem, stream_of(ctx)>>>(
            go, gptrs, H, static_cast<int>(R), weights.ptr<const M>(), coef_ptr<M>(gate), N);
        MHC_CUDA_CHECK_LAUNCH();
      }
    };
    auto with_width = [&](auto hmax) {
      if (vec) launch(std::integral_constant<int, vec_width<X, S>()>{}, hmax);
      else launch(std::integral_constant<int, 1>{}, hmax);
    };
    if (H <= 8) with_width(std::integral_constant<int, 8>{});
    else with_width(std::integral_constant<int, kMaxH>{});
    finalize_kernel<M><<<1, kThreads, 0, stream_of(ctx)>>>(
        partials, grid, static_cast<int>(R), H, weights.ptr<const M>(), coef_ptr<M>(logits), coef_ptr<M>(gate),
        coef_out<M>(grad_weights), coef_out<M>(grad_logits), coef_out<M>(grad_gate),
        logits.present() ? projection_of(cfg) : Projection{});
    MHC_CUDA_CHECK_LAUNCH();
  });
}

std::size_t backward_workspace(std::span<const TensorView> states, DType stream, std::int64_t R) {
  const std::size_t coef_size = stream == DType::f64 ? sizeof(double) : sizeof(float);
  return static_cast<std::size_t>(R) * backward_grid(states[0].numel()) * states.size() * coef_size;
}

// ---- Sinkhorn launch policy: one matrix per block, one line per thread -------------------------------------

int sinkhorn_threads(int H) { return ((H + 31) / 32) * 32; }

template <class M> M inverse_temperature(const HistoryConfig& cfg) { return M(1) / static_cast<M>(cfg.temperature); }

// Every step's divisors when they fit in shared memory next to p and g (any H at the default 20
// iterations), else as many steps as fit; at least one (p and g of H = kMaxHistory fit on every device).
template <class M> SinkhornShape sinkhorn_backward_shape(int H, int iters) {
  const std::size_t smem_max = static_cast<std::size_t>(current_device_info().max_smem_optin);
  const std::size_t matrices = 2 * static_cast<std::size_t>(H) * H * sizeof(M), per_step = H * sizeof(M);
  const std::size_t fit = smem_max > matrices ? (smem_max - matrices) / per_step : 0;
  const int window = static_cast<int>(std::clamp<std::size_t>(fit, 1, sinkhorn_steps(iters)));
  return {H, iters, window};
}

template <class M> std::size_t sinkhorn_backward_smem(const SinkhornShape& s) {
  return (2 * static_cast<std::size_t>(s.H) * s.H + static_cast<std::size_t>(s.window) * s.H) * sizeof(M);
}

template <class M> void launch_sinkhorn_forward(const ProjectLogitsForward& a, std::int64_t matrices, int H,
                                                const HistoryConfig& cfg, const Context& ctx) {
  const std::size_t smem = static_cast<std::size_t>(H) * H * sizeof(M);
  sinkhorn_project_kernel<M><<<blocks_for(matrices, 1), sinkhorn_threads(H), smem, stream_of(ctx)>>>(
      a.logits.ptr<const M>(), a.weights.ptr<M>(), matrices, SinkhornShape{H, cfg.sinkhorn_iters, 0},
      inverse_temperature<M>(cfg), static_cast<M>(cfg.sinkhorn_eps));
  MHC_CUDA_CHECK_LAUNCH();
}

template <class M> void launch_sinkhorn_backward(const ProjectLogitsBackward& a, std::int64_t matrices, int H,
                                                 const HistoryConfig& cfg, const Context& ctx) {
  const SinkhornShape shape = sinkhorn_backward_shape<M>(H, cfg.sinkhorn_iters);
  const std::size_t smem = sinkhorn_backward_smem<M>(shape);
  allow_dynamic_smem(sinkhorn_project_backward_kernel<M>, smem);
  sinkhorn_project_backward_kernel<M><<<blocks_for(matrices, 1), sinkhorn_threads(H), smem, stream_of(ctx)>>>(
      a.logits.ptr<const M>(), a.grad_weights.ptr<const M>(), a.grad_logits.ptr<M>(), matrices, shape,
      inverse_temperature<M>(cfg), static_cast<M>(cfg.sinkhorn_eps));
  MHC_CUDA_CHECK_LAUNCH();
}

}  // namespace

// ---- the ops ------------------------------------------------------------------------------------------------

void project_logits_forward(const ProjectLogitsForward& a, const HistoryConfig& cfg, const Context& ctx) {
  const DeviceGuard guard(a.logits.device);
  const int H = static_cast<int>(a.logits.shape[a.logits.rank - 1]);
  const bool square = cfg.constraint == Constraint::doubly_stochastic;
  const std::int64_t block = square ? std::int64_t(H) * H : H, rows = a.logits.numel() / block;
  if (rows == 0) return;
  auto run = [&](auto tag) {
    using M = typename decltype(tag)::type;
    if (square) return launch_sinkhorn_forward<M>(a, rows, H, cfg, ctx);
    project_rows_kernel<M><<<ceil_div(rows, 128), 128, 0, stream_of(ctx)>>>(a.logits.ptr<const M>(),
                                                                          a.weights.ptr<M>(), rows, H,
                                                                          projection_of(cfg));
    MHC_CUDA_CHECK_LAUNCH();
  };
  if (a.logits.dtype == DType::f64) run(Tag<double>{});
  else run(Tag<float>{});
}

void project_logits_backward(const ProjectLogitsBackward& a, const HistoryConfig& cfg, const Context& ctx) {
  const DeviceGuard guard(a.logits.device);
  const int H = static_cast<int>(a.logits.shape[a.logits.rank - 1]);
  const bool square = cfg.constraint == Constraint::doubly_stochastic;
  const std::int64_t block = square ? std::int64_t(H) * H : H, rows = a.logits.numel() / block;
  if (rows == 0) return;
  auto run = [&](auto tag) {
    using M = typename decltype(tag)::type;
    if (square) return launch_sinkhorn_backward<M>(a, rows, H, cfg, ctx);
    project_rows_backward_kernel<M><<<ceil_div(rows, 128), 128, 0, stream_of(ctx)>>>(
        a.logits.ptr<const M>(), a.weights.ptr<const M>(), a.grad_weights.ptr<const M>(), a.grad_logits.ptr<M>(),
        rows, H, projection_of(cfg));
    MHC_CUDA_CHECK_LAUNCH();
  };
  if (a.logits.dtype == DType::f64) run(Tag<double>{});
  else run(Tag<float>{});
}

void history_mix_forward(const HistoryMixForward& a, const HistoryConfig& cfg, const Context& ctx) {
  const DeviceGuard guard(a.out.device);
  launch_forward<false>(a.x, a.states, a.weights, a.gate, a.out, TensorView::absent(), rows_of(a.weights), cfg, ctx);
}

std::size_t history_mix_backward_workspace_bytes(const HistoryMixBackward& a, const HistoryConfig&, const Context&) {
  const DeviceGuard guard(a.grad_out.device);
  return backward_workspace(a.states, a.grad_out.dtype, rows_of(a.weights));
}

void history_mix_backward(const HistoryMixBackward& a, const HistoryConfig& cfg, const Context& ctx) {
  const DeviceGuard guard(a.grad_out.device);
  launch_backward(a.grad_out, a.states, a.grad_states, a.weights, TensorView::absent(), a.gate, a.grad_weights,
                  TensorView::absent(), a.grad_gate, a.workspace, rows_of(a.weights), /*skip_zero=*/false, cfg, ctx);
}

void history_skip_forward(const HistorySkipForward& a, const HistoryConfig& cfg, const Context& ctx) {
  const DeviceGuard guard(a.x.device);
  launch_forward<true>(a.x, a.states, a.logits, a.gate, a.out, a.weights, 1, cfg, ctx);
}

std::size_t history_skip_backward_workspace_bytes(const HistorySkipBackward& a, const HistoryConfig&,
                                                  const Context&) {
  const DeviceGuard guard(a.grad_out.device);
  return backward_workspace(a.states, a.grad_out.dtype, 1);
}

void history_skip_backward(const HistorySkipBackward& a, const HistoryConfig& cfg, const Context& ctx) {
  const DeviceGuard guard(a.grad_out.device);
  launch_backward(a.grad_out, a.states, a.grad_states, a.weights, a.logits, a.gate, TensorView::absent(),
                  a.grad_logits, a.grad_gate, a.workspace, 1, /*skip_zero=*/true, cfg, ctx);
}

}  // namespace mhc::cuda_impl
