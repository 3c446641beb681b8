// Sinkhorn of one n x n matrix on the device, forward and exact reverse mode (docs/MATH.md section 1):
//   P0 = softmax(logits, rows) + eps; then 2*iters - 1 normalisations, alternating columns
//   (first) and rows: P_s = P_{s-1} / (sum_axis(P_{s-1}) + eps).
// The backward stores only the divisor vectors (one n-vector per step) and walks the steps in
// reverse, rebuilding P_{s-1} = P_s * divisor exactly, so no O(iters^2) recomputation and no
// per-step matrices. Two shapes: one thread per matrix with the matrix in registers (n = 2, 4, 8)
// and one thread group per matrix (a warp, or a whole block) with the matrix in shared memory (any n up
// to 64). The multi-history doubly stochastic projection (history.cu) runs the block form.
#pragma once

#include "cuda/common.cuh"

namespace mhc::cuda_impl {

__host__ __device__ constexpr int sinkhorn_steps(int iters) { return 2 * iters - 1; }

// ---- one thread per matrix -------------------------------------------------------------------------
// kFast (fp32 only): reciprocals by fast_rcp and exponentials by __expf (a few ulp each): a short,
// branch-free dependency chain per step (the accurate versions are subroutine calls).
template <bool kFast, class M> __device__ __forceinline__ M sk_recip(M v) {
  if constexpr (kFast && std::is_same_v<M, float>) return fast_rcp(v);
  else return M(1) / v;
}
template <bool kFast, class M> __device__ __forceinline__ M sk_exp(M v) {
  if constexpr (kFast && std::is_same_v<M, float>) return __expf(v);
  else return exp(v);
}

// p holds the logits on entry and P0 on exit.
template <int N, bool kFast, class M> __device__ __forceinline__ void softmax_rows_plus_eps(M (&p)[N * N], M eps) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    M row_max = p[j * N];
#pragma unroll
    for (int k = 1; k < N; ++k) row_max = max(row_max, p[j * N + k]);
    M sum = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      p[j * N + k] = sk_exp<kFast>(p[j * N + k] - row_max);
      sum += p[j * N + k];
    }
    const M inv = sk_recip<kFast>(sum);
#pragma unroll
    for (int k = 0; k < N; ++k) p[j * N + k] = p[j * N + k] * inv + eps;
  }
}

// Divides columns (kByColumn) or rows by their sums + eps; records the divisors when `divisors` is
// non-null: divisors[a * stride] for a = 0..N-1. The axis is a template parameter so that every
// index into p is a compile-time constant (p stays in registers).
template <int N, bool kFast, bool kByColumn, class M>
__device__ __forceinline__ void normalise(M (&p)[N * N], M eps, M* divisors, std::int64_t stride) {
#pragma unroll
  for (int a = 0; a < N; ++a) {
    M sum = 0;
#pragma unroll
    for (int b = 0; b < N; ++b) sum += kByColumn ? p[b * N + a] : p[a * N + b];
    const M d = sum + eps;
    if (divisors) divisors[a * stride] = d;
    const M inv = sk_recip<kFast>(d);
#pragma unroll
    for (int b = 0; b < N; ++b) (kByColumn ? p[b * N + a] : p[a * N + b]) *= inv;
  }
}

// p: logits in, comb out. divisors (optional): step s, entry a at divisors[(s * N + a) * stride].
template <int N, bool kFast = false, class M>
__device__ void sinkhorn_forward_reg(M (&p)[N * N], M eps, int iters, M* divisors = nullptr,
                                     std::int64_t stride = 1) {
  softmax_rows_plus_eps<N, kFast>(p, eps);
  auto at = [&](int s) { return divisors ? divisors + s * N * stride : nullptr; };
  normalise<N, kFast, true>(p, eps, at(0), stride);
  for (int it = 1; it < iters; ++it) {
    normalise<N, kFast, false>(p, eps, at(2 * it - 1), stride);
    normalise<N, kFast, true>(p, eps, at(2 * it), stride);
  }
}

// Reverse of one normalisation: g (d output -> d input) and p (output -> input), divisors dv.
template <int N, bool kFast, bool kByColumn, class M>
__device__ __forceinline__ void normalise_backward(M (&p)[N * N], M (&g)[N * N], const M* dv, std::int64_t stride) {
#pragma unroll
  for (int a = 0; a < N; ++a) {
    const M d = dv[a * stride];
    M dot = 0;
#pragma unroll
    for (int b = 0; b < N; ++b) {
      const int idx = kByColumn ? b * N + a : a * N + b;
      dot += g[idx] * p[idx];
    }
    const M inv = sk_recip<kFast>(d);
#pragma unroll
    for (int b = 0; b < N; ++b) {
      const int idx = kByColumn ? b * N + a : a * N + b;
      g[idx] = (g[idx] - dot) * inv;
      p[idx] *= d;  // rebuild the step's input
    }
  }
}

// g: d(comb) in, d(logits) out. logit(idx) returns logits[idx] (idx = j * N + k); it is called
// twice per entry so the caller need not keep the logits in registers. divisors: scratch for
// (2 * iters - 1) * N values at divisors[(s * N + a) * stride].
template <int N, bool kFast = false, class M, class Logit>
__device__ void sinkhorn_backward_reg(Logit logit, M (&g)[N * N], M eps, int iters, M* divisors,
                                      std::int64_t stride) {
  M p[N * N];
#pragma unroll
  for (int r = 0; r < N * N; ++r) p[r] = logit(r);
  sinkhorn_forward_reg<N, kFast>(p, eps, iters, divisors, stride);
  auto at = [&](int s) { return divisors + s * N * stride; };
  for (int it = iters - 1; it >= 1; --it) {
    normalise_backward<N, kFast, true>(p, g, at(2 * it), stride);
    normalise_backward<N, kFast, false>(p, g, at(2 * it - 1), stride);
  }
  normalise_backward<N, kFast, true>(p, g, at(0), stride);
  // softmax rows: d logits = S * (dP0 - <dP0, S>), S recomputed from the logits.
#pragma unroll
  for (int j = 0; j < N; ++j) {
    M row_max = logit(j * N);
#pragma unroll
    for (int k = 1; k < N; ++k) row_max = max(row_max, logit(j * N + k));
    M sm[N], sum = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      sm[k] = sk_exp<kFast>(logit(j * N + k) - row_max);
      sum += sm[k];
    }
    const M inv = sk_recip<kFast>(sum);
    M dot = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      sm[k] *= inv;
      dot += g[j * N + k] * sm[k];
    }
#pragma unroll
    for (int k = 0; k < N; ++k) g[j * N + k] = sm[k] * (g[j * N + k] - dot);
  }
}

// ---- one thread group per matrix, any n (matrix in shared or global memory) ---------------------------
// Thread r of the group owns the rows and columns r, r + size, ... of the matrix. A warp serves the n-stream
// kernels (several matrices per block, n up to 64: two lines a lane past 32); a whole block serves the
// history projection (one H x H matrix per block of a multiple of 32 threads, one line a thread).
struct WarpGroup {
  static __device__ __forceinline__ int rank() { return threadIdx.x & 31; }
  static __device__ __forceinline__ int size() { return 32; }
  static __device__ __forceinline__ void sync() { __syncwarp(); }
};
struct BlockGroup {
  static __device__ __forceinline__ int rank() { return threadIdx.x; }
  static __device__ __forceinline__ int size() { return blockDim.x; }
  static __device__ __forceinline__ void sync() { __syncthreads(); }
};

// Normalisation s of the forward (even s: columns, odd s: rows) as the shared code numbers them.
__host__ __device__ constexpr bool sinkhorn_step_by_column(int s) { return (s & 1) == 0; }

// p = P0 = softmax(logit, rows) + eps. logit(idx) returns logit idx = j * n + k; it may read p itself
// (the row's owner reads each entry before it writes it), so the softmax can run in place.
template <class G, class M, class Logit>
__device__ void softmax_rows_plus_eps_group(Logit logit, M* p, int n, M eps) {
  for (int j = G::rank(); j < n; j += G::size()) {
    M row_max = logit(j * n);
    for (int k = 1; k < n; ++k) row_max = max(row_max, logit(j * n + k));
    M sum = 0;
    for (int k = 0; k < n; ++k) {
      const M e = exp(logit(j * n + k) - row_max);
      p[j * n + k] = e;
      sum += e;
    }
    const M inv = M(1) / sum;
    for (int k = 0; k < n; ++k) p[j * n + k] = p[j * n + k] * inv + eps;
  }
  G::sync();
}

// Normalisation s of p in place; the divisor of line a goes to dv[a] when dv is non-null.
template <class G, class M> __device__ void normalise_group(M* p, int n, M eps, int s, M* dv) {
  const bool by_column = sinkhorn_step_by_column(s);
  for (int a = G::rank(); a < n; a += G::size()) {
    M sum = 0;
    for (int b = 0; b < n; ++b) sum += by_column ? p[b * n + a] : p[a * n + b];
    const M d = sum + eps;
    if (dv) dv[a] = d;
    const M inv = M(1) / d;
    for (int b = 0; b < n; ++b) (by_column ? p[b * n + a] : p[a * n + b]) *= inv;
  }
  G::sync();
}

// Reverse of normalisation s with its divisors dv: g (d output -> d input) and p (output -> input).
template <class G, class M> __device__ void normalise_backward_group(M* p, M* g, int n, int s, const M* dv) {
  const bool by_column = sinkhorn_step_by_column(s);
  for (int a = G::rank(); a < n; a += G::size()) {
    const M d = dv[a];
    M dot = 0;
    for (int b = 0; b < n; ++b) {
      const int idx = by_column ? b * n + a : a * n + b;
      dot += g[idx] * p[idx];
    }
    const M inv = M(1) / d;
    for (int b = 0; b < n; ++b) {
      const int idx = by_column ? b * n + a : a * n + b;
      g[idx] = (g[idx] - dot) * inv;
      p[idx] *= d;  // rebuild the step's input
    }
  }
  G::sync();
}

// The forward up to (not including) normalisation `end`, keeping the divisors of the steps from `first`
// on: step s, entry a at divisors[(s - first) * n + a] (divisors may be null).
template <class G, class M, class Logit>
__device__ void sinkhorn_forward_steps(Logit logit, M* p, int n, M eps, int end, M* divisors, int first) {
  softmax_rows_plus_eps_group<G>(logit, p, n, eps);
  for (int s = 0; s < end; ++s)
    normalise_group<G>(p, n, eps, s, divisors && s >= first ? divisors + (s - first) * n : nullptr);
}

// Softmax rows backward: g = d P0 in, d logits out, S recomputed from the logits.
template <class G, class M, class Logit> __device__ void softmax_rows_backward_group(Logit logit, M* g, int n) {
  for (int j = G::rank(); j < n; j += G::size()) {
    M row_max = logit(j * n);
    for (int k = 1; k < n; ++k) row_max = max(row_max, logit(j * n + k));
    M sum = 0;
    for (int k = 0; k < n; ++k) sum += exp(logit(j * n + k) - row_max);
    const M inv = M(1) / sum;
    M dot = 0;
    for (int k = 0; k < n; ++k) dot += g[j * n + k] * exp(logit(j * n + k) - row_max) * inv;
    for (int k = 0; k < n; ++k) g[j * n + k] = exp(logit(j * n + k) - row_max) * inv * (g[j * n + k] - dot);
  }
  G::sync();
}

// p[n*n]: logit(idx) in, comb out (logit may read p: in place). divisors (optional):
// (2 * iters - 1) * n values, step s entry a at divisors[s * n + a].
template <class G, class M, class Logit>
__device__ void sinkhorn_forward_group(Logit logit, M* p, int n, M eps, int iters, M* divisors = nullptr) {
  sinkhorn_forward_steps<G>(logit, p, n, eps, sinkhorn_steps(iters), divisors, 0);
}

// logit(idx): the logits (read-only, not p); p[n*n] scratch; g[n*n]: d(comb) in, d(logits) out.
// divisors: scratch for `window` steps (window * n values, 1 <= window). With window >= 2 * iters - 1
// the forward runs once and its steps are reversed: O(steps). A smaller window (many iterations in little
// memory) reverses the steps in chunks of `window` from the end, each chunk's divisors kept by a fresh
// forward from the logits: O(steps^2 / window), and any iters fits.
template <class G, class M, class Logit>
__device__ void sinkhorn_backward_group(Logit logit, M* p, M* g, int n, M eps, int iters, M* divisors, int window) {
  for (int end = sinkhorn_steps(iters); end > 0; end -= window) {
    const int first = end > window ? end - window : 0;
    sinkhorn_forward_steps<G>(logit, p, n, eps, end, divisors, first);
    for (int s = end - 1; s >= first; --s) normalise_backward_group<G>(p, g, n, s, divisors + (s - first) * n);
  }
  softmax_rows_backward_group<G>(logit, g, n);
}

// The warp forms of the n-stream kernels. p[n*n]: logits in, comb out.
template <class M>
__device__ void sinkhorn_forward_warp(M* p, int n, M eps, int iters, M* divisors = nullptr) {
  sinkhorn_forward_group<WarpGroup>([p](int r) { return p[r]; }, p, n, eps, iters, divisors);
}

// logits[n*n] (read-only), p[n*n] scratch, g[n*n]: d(comb) in, d(logits) out; divisors scratch
// of (2 * iters - 1) * n values.
template <class M>
__device__ void sinkhorn_backward_warp(const M* logits, M* p, M* g, int n, M eps, int iters, M* divisors) {
  sinkhorn_backward_group<WarpGroup>([logits](int r) { return logits[r]; }, p, g, n, eps, iters, divisors,
                                     sinkhorn_steps(iters));
}

}  // namespace mhc::cuda_impl
