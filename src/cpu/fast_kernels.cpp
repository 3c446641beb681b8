// The projection GEMMs and the per-token Sinkhorn of the fast CPU backend, each instantiated
// once per dtype behind the out-of-line entry points declared in fast_kernels.hpp.
//
// The GEMMs are register-tiled on 64-byte vectors: the projection keeps kTokenTile x 4 (token,
// row) accumulators so each vector of fn feeds kTokenTile tokens; the input gradient keeps
// kTokenTile x 2 vectors of output per row of fn; the parameter gradient keeps 8 rows x 2 vectors
// of grad_fn while streaming over tokens.
#include "cpu/fast_kernels.hpp"

namespace mhc::cpu_fast::kernels {

namespace {

// ---- the projection GEMMs ------------------------------------------------------------------------------
// NT: raw[tb * rows + r] = x[tb] . fn[r] for r in [r0, r0 + RB), and optionally the sums of squares.
template <class S, int TB, int RB, bool kSumSq>
MHC_INLINE void project_tile(const S* x, int64_t K, const math_t<S>* fn, int64_t rows, int64_t r0,
                             math_t<S>* raw, math_t<S>* sumsq) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  V acc[TB][RB] = {};
  V sq[TB] = {};
  const M* f = fn + r0 * K;
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    V xv[TB];
    for (int tb = 0; tb < TB; ++tb) xv[tb] = vload(x + tb * K + k);
    for (int rb = 0; rb < RB; ++rb) {
      const V fv = vload(f + rb * K + k);
      for (int tb = 0; tb < TB; ++tb) acc[tb][rb] += xv[tb] * fv;
    }
    if constexpr (kSumSq)
      for (int tb = 0; tb < TB; ++tb) sq[tb] += xv[tb] * xv[tb];
  }
  for (int tb = 0; tb < TB; ++tb) {
    M r[RB], s = 0;
    for (int rb = 0; rb < RB; ++rb) r[rb] = hsum(acc[tb][rb]);
    if constexpr (kSumSq) s = hsum(sq[tb]);
    for (int64_t kk = k; kk < K; ++kk) {
      const M xv = load(x + tb * K, kk);
      for (int rb = 0; rb < RB; ++rb) r[rb] += xv * f[rb * K + kk];
      if constexpr (kSumSq) s += xv * xv;
    }
    for (int rb = 0; rb < RB; ++rb) raw[tb * rows + r0 + rb] = r[rb];
    if constexpr (kSumSq) sumsq[tb] = s;
  }
}

template <class S, int TB> MHC_INLINE void sum_squares_tile(const S* x, int64_t K, math_t<S>* sumsq) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  V sq[TB] = {};
  int64_t k = 0;
  for (; k + L <= K; k += L)
    for (int tb = 0; tb < TB; ++tb) {
      const V xv = vload(x + tb * K + k);
      sq[tb] += xv * xv;
    }
  for (int tb = 0; tb < TB; ++tb) {
    M s = hsum(sq[tb]);
    for (int64_t kk = k; kk < K; ++kk) s += load(x + tb * K, kk) * load(x + tb * K, kk);
    sumsq[tb] = s;
  }
}

// raw [TB, rows] = x [TB, K] @ fn^T and sumsq [TB]; fn == nullptr (static mode) gives sums only.
template <class S, int TB>
MHC_INLINE void project_tokens(const S* x, int64_t K, const math_t<S>* fn, int64_t rows, math_t<S>* raw,
                               math_t<S>* sumsq) {
  constexpr int RB = 4;
  if (fn == nullptr || rows == 0) {
    sum_squares_tile<S, TB>(x, K, sumsq);
    return;
  }
  int64_t r = 0;
  if (rows >= RB) {
    project_tile<S, TB, RB, true>(x, K, fn, rows, 0, raw, sumsq);
    for (r = RB; r + RB <= rows; r += RB) project_tile<S, TB, RB, false>(x, K, fn, rows, r, raw, sumsq);
  } else {
    project_tile<S, TB, 1, true>(x, K, fn, rows, 0, raw, sumsq);
    r = 1;
  }
  for (; r < rows; ++r) project_tile<S, TB, 1, false>(x, K, fn, rows, r, raw, sumsq);
}

// Full tiles of kTokenTile tokens share each load of fn; a partial tile goes token by token.
template <class S>
MHC_INLINE void project_impl(int tokens, const S* x, int64_t K, const math_t<S>* fn, int64_t rows,
                             math_t<S>* raw, math_t<S>* sumsq) {
  if (tokens == kTokenTile) return project_tokens<S, kTokenTile>(x, K, fn, rows, raw, sumsq);
  for (int t = 0; t < tokens; ++t) project_tokens<S, 1>(x + t * K, K, fn, rows, raw + t * rows, sumsq + t);
}

// NN of the input gradient (InputGradArgs in fast_kernels.hpp) for TB tokens.
template <class S, int TB, int KV>
MHC_INLINE void input_grad_chunk(const InputGradArgs<S>& a, int64_t i, int64_t c) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  const int64_t K = a.n * a.C, k = i * a.C + c;
  V acc[TB][KV];
  for (int tb = 0; tb < TB; ++tb)
    for (int kv = 0; kv < KV; ++kv) {
      const int64_t e = tb * K + k + kv * L;
      V v = vload(a.x + e) * a.coef[tb];
      if (a.accum) v += vload(a.accum + e);
      if (a.g) v += vload(a.g + tb * a.C + c + kv * L) * a.w[tb * kMaxStreams + i];
      acc[tb][kv] = v;
    }
  if (a.fn)
    for (int64_t r = 0; r < a.rows; ++r) {
      V fv[KV];
      for (int kv = 0; kv < KV; ++kv) fv[kv] = vload(a.fn + r * K + k + kv * L);
      for (int tb = 0; tb < TB; ++tb) {
        const M d = a.dP[tb * a.rows + r];
        for (int kv = 0; kv < KV; ++kv) acc[tb][kv] += fv[kv] * d;
      }
    }
  for (int tb = 0; tb < TB; ++tb)
    for (int kv = 0; kv < KV; ++kv) vstore(a.out + tb * K + k + kv * L, acc[tb][kv]);
}

template <class S, int TB> MHC_INLINE void input_grad_tile(const InputGradArgs<S>& a) {
  using M = math_t<S>;
  constexpr int L = kLanes<M>;
  constexpr int KV = 2;
  const int64_t K = a.n * a.C;
  for (int64_t i = 0; i < a.n; ++i) {
    int64_t c = 0;
    for (; c + KV * L <= a.C; c += KV * L) input_grad_chunk<S, TB, KV>(a, i, c);
    for (; c + L <= a.C; c += L) input_grad_chunk<S, TB, 1>(a, i, c);
    for (; c < a.C; ++c)
      for (int tb = 0; tb < TB; ++tb) {
        const int64_t e = tb * K + i * a.C + c;
        M v = load(a.x, e) * a.coef[tb];
        if (a.accum) v += load(a.accum, e);
        if (a.g) v += load(a.g, tb * a.C + c) * a.w[tb * kMaxStreams + i];
        if (a.fn)
          for (int64_t r = 0; r < a.rows; ++r) v += a.fn[r * K + i * a.C + c] * a.dP[tb * a.rows + r];
        store(a.out, e, v);
      }
  }
}

template <class S> MHC_INLINE void input_grad_impl(int tokens, const InputGradArgs<S>& a) {
  if (tokens == kTokenTile) return input_grad_tile<S, kTokenTile>(a);
  const int64_t K = a.n * a.C;
  for (int t = 0; t < tokens; ++t) {
    InputGradArgs<S> one = a;
    one.x += t * K;
    if (one.accum) one.accum += t * K;
    if (one.g) one.g += t * a.C;
    one.w += t * kMaxStreams;
    one.coef += t;
    one.dP += t * a.rows;
    one.out += t * K;
    input_grad_tile<S, 1>(one);
  }
}

// TN: grad_fn[r, k] = sum_t dP[t, r] * x[t, k] for the columns [k0, k0 + KV*L) and every row.
// Tokens are tiled so the column block of x stays in cache across row groups.
template <class S, int RB, int KV>
MHC_INLINE void param_grad_rows(const S* x, int64_t T, int64_t K, const math_t<S>* dP, int64_t rows, int64_t r0,
                                int64_t k0, int64_t t0, int64_t t1, math_t<S>* grad_fn) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  V acc[RB][KV];
  for (int rb = 0; rb < RB; ++rb)
    for (int kv = 0; kv < KV; ++kv)
      acc[rb][kv] = t0 == 0 ? V{} : vload(grad_fn + (r0 + rb) * K + k0 + kv * L);
  for (int64_t t = t0; t < t1; ++t) {
    V xv[KV];
    for (int kv = 0; kv < KV; ++kv) xv[kv] = vload(x + t * K + k0 + kv * L);
    for (int rb = 0; rb < RB; ++rb) {
      const M d = dP[t * rows + r0 + rb];
      for (int kv = 0; kv < KV; ++kv) acc[rb][kv] += xv[kv] * d;
    }
  }
  for (int rb = 0; rb < RB; ++rb)
    for (int kv = 0; kv < KV; ++kv) vstore(grad_fn + (r0 + rb) * K + k0 + kv * L, acc[rb][kv]);
}

template <class S, int KV>
MHC_INLINE void param_grad_columns(const S* x, int64_t T, int64_t K, const math_t<S>* dP, int64_t rows, int64_t k0,
                                   math_t<S>* grad_fn) {
  constexpr int RB = 8;
  constexpr int64_t kTokens = 1024;
  for (int64_t t0 = 0; t0 < std::max<int64_t>(T, 1); t0 += kTokens) {
    const int64_t t1 = std::min(T, t0 + kTokens);
    int64_t r = 0;
    for (; r + RB <= rows; r += RB) param_grad_rows<S, RB, KV>(x, T, K, dP, rows, r, k0, t0, t1, grad_fn);
    for (; r < rows; ++r) param_grad_rows<S, 1, KV>(x, T, K, dP, rows, r, k0, t0, t1, grad_fn);
  }
}

// Columns [k0, K) that do not fill a block of vectors: one column at a time.
template <class S>
MHC_INLINE void param_grad_scalar_columns(const S* x, int64_t T, int64_t K, const math_t<S>* dP, int64_t rows,
                                          int64_t k0, math_t<S>* grad_fn) {
  using M = math_t<S>;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = k0; k < K; ++k) {
      M s = 0;
      for (int64_t t = 0; t < T; ++t) s += load(x, t * K + k) * dP[t * rows + r];
      grad_fn[r * K + k] = s;
    }
}

template <class S>
MHC_INLINE void param_grad_impl(const S* x, int64_t T, int64_t K, const math_t<S>* dP, int64_t rows,
                                int64_t block_begin, int64_t block_end, math_t<S>* grad_fn) {
  constexpr int L = kLanes<math_t<S>>;
  constexpr int64_t kWidth = 2 * L;
  static_assert(kWidth == (sizeof(math_t<S>) == 8 ? 16 : 32), "param_grad_block_width");
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t k0 = b * kWidth;
    if (k0 + kWidth <= K) {
      param_grad_columns<S, 2>(x, T, K, dP, rows, k0, grad_fn);
    } else {
      int64_t k = k0;
      for (; k + L <= K; k += L) param_grad_columns<S, 1>(x, T, K, dP, rows, k, grad_fn);
      param_grad_scalar_columns(x, T, K, dP, rows, k, grad_fn);
    }
  }
}

// ---- Sinkhorn on one n x n matrix ------------------------------------------------------------------------
// p = softmax(logits, rows) + eps. `e` may alias p.
template <class M> MHC_INLINE void softmax_plus_eps(const M* logits, M* p, int n, M eps) {
  for (int j = 0; j < n; ++j) {
    const M* l = logits + j * n;
    M mx = l[0];
    for (int k = 1; k < n; ++k) mx = std::max(mx, l[k]);
    M sum = 0;
    for (int k = 0; k < n; ++k) {
      p[j * n + k] = std::exp(l[k] - mx);
      sum += p[j * n + k];
    }
    for (int k = 0; k < n; ++k) p[j * n + k] = p[j * n + k] / sum + eps;
  }
}

// Normalisation step `step` (1-based) of the forward: odd steps divide by column sums + eps, even
// steps by row sums + eps. Step 1 follows the softmax; 2*iters - 1 steps in all.
template <class M> MHC_INLINE void sinkhorn_step(M* a, int n, int step, M eps) {
  if (step & 1) {
    M colsum[kMaxStreams];
    for (int k = 0; k < n; ++k) colsum[k] = 0;
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < n; ++k) colsum[k] += a[j * n + k];
    for (int k = 0; k < n; ++k) colsum[k] += eps;
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < n; ++k) a[j * n + k] /= colsum[k];
  } else {
    for (int j = 0; j < n; ++j) {
      M sum = 0;
      for (int k = 0; k < n; ++k) sum += a[j * n + k];
      sum += eps;
      for (int k = 0; k < n; ++k) a[j * n + k] /= sum;
    }
  }
}

// Reverse of step `step` with input `a` (the matrix before the step): g <- d(input).
// For y = a / (sum(a) + eps) along a group: da = g / d - <g, a> / d^2, d = sum(a) + eps.
template <class M> MHC_INLINE void sinkhorn_step_backward(const M* a, M* g, int n, int step, M eps) {
  if (step & 1) {
    M d[kMaxStreams], dotv[kMaxStreams];
    for (int k = 0; k < n; ++k) d[k] = dotv[k] = 0;
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < n; ++k) {
        d[k] += a[j * n + k];
        dotv[k] += g[j * n + k] * a[j * n + k];
      }
    for (int k = 0; k < n; ++k) {
      d[k] += eps;
      dotv[k] /= d[k] * d[k];
    }
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < n; ++k) g[j * n + k] = g[j * n + k] / d[k] - dotv[k];
  } else {
    for (int j = 0; j < n; ++j) {
      M d = 0, dotv = 0;
      for (int k = 0; k < n; ++k) {
        d += a[j * n + k];
        dotv += g[j * n + k] * a[j * n + k];
      }
      d += eps;
      dotv /= d * d;
      for (int k = 0; k < n; ++k) g[j * n + k] = g[j * n + k] / d - dotv;
    }
  }
}

// comb = Sinkhorn(logits); comb may alias logits.
template <class M> MHC_INLINE void sinkhorn_forward_impl(const M* logits, M* comb, int n, int iters, M eps) {
  softmax_plus_eps(logits, comb, n, eps);
  for (int step = 1; step <= 2 * iters - 1; ++step) sinkhorn_step(comb, n, step, eps);
}

// grad_logits = d Sinkhorn(logits)^T grad_comb, by reverse mode through every step and the softmax.
// The inputs of the steps are checkpointed in a fixed stack buffer: all of them when they fit
// (n <= 16 at the default 20 iterations), else every stride-th, the others recomputed from the
// nearest checkpoint. grad_logits may alias grad_comb.
template <class M>
MHC_INLINE void sinkhorn_backward_impl(const M* logits, const M* grad_comb, M* grad_logits, int n, int iters,
                                         M eps) {
  constexpr int kScratch = 16384;
  alignas(64) M scratch[kScratch];
  alignas(64) M g[kMaxStreams * kMaxStreams];
  const int nn = n * n, steps = 2 * iters - 1;
  const int slots = kScratch / nn;  // >= 4: nn <= 4096
  const int stride = (steps + slots - 2) / (slots - 1);
  M* work = scratch + static_cast<int64_t>(slots - 1) * nn;

  // Forward: the input of step s + 1 (state s) is checkpointed when s % stride == 0.
  softmax_plus_eps(logits, work, n, eps);
  for (int s = 0; s < steps; ++s) {
    if (s % stride == 0) std::memcpy(scratch + static_cast<int64_t>(s / stride) * nn, work, nn * sizeof(M));
    if (s + 1 < steps) sinkhorn_step(work, n, s + 1, eps);
  }

  for (int e = 0; e < nn; ++e) g[e] = grad_comb[e];
  for (int step = steps; step >= 1; --step) {
    const int state = step - 1, ckpt = state / stride;
    const M* in = scratch + static_cast<int64_t>(ckpt) * nn;
    if (state != ckpt * stride) {
      std::memcpy(work, in, nn * sizeof(M));
      for (int s = ckpt * stride + 1; s <= state; ++s) sinkhorn_step(work, n, s, eps);
      in = work;
    }
    sinkhorn_step_backward(in, g, n, step, eps);
  }

  // Softmax rows: dl = s * (g - <g, s>). The row max is a constant shift: no gradient of its own.
  for (int j = 0; j < n; ++j) {
    const M* l = logits + j * n;
    M mx = l[0];
    for (int k = 1; k < n; ++k) mx = std::max(mx, l[k]);
    M sm[kMaxStreams], sum = 0;
    for (int k = 0; k < n; ++k) {
      sm[k] = std::exp(l[k] - mx);
      sum += sm[k];
    }
    M dotv = 0;
    for (int k = 0; k < n; ++k) {
      sm[k] /= sum;
      dotv += g[j * n + k] * sm[k];
    }
    for (int k = 0; k < n; ++k) grad_logits[j * n + k] = sm[k] * (g[j * n + k] - dotv);
  }
}

}  // namespace

#define MHC_GEMM_ENTRIES(S)                                                                            \
  MHC_CPU_KERNEL void project(int tokens, const S* x, int64_t K, const math_t<S>* fn, int64_t rows,    \
                              math_t<S>* raw, math_t<S>* sumsq) {                                      \
    project_impl<S>(tokens, x, K, fn, rows, raw, sumsq);                                               \
  }                                                                                                    \
  MHC_CPU_KERNEL void input_grad(int tokens, const InputGradArgs<S>& a) { input_grad_impl<S>(tokens, a); } \
  MHC_CPU_KERNEL void param_grad(const S* x, int64_t T, int64_t K, const math_t<S>* dP, int64_t rows,  \
                                 int64_t block_begin, int64_t block_end, math_t<S>* grad_fn) {         \
    param_grad_impl<S>(x, T, K, dP, rows, block_begin, block_end, grad_fn);                            \
  }
MHC_GEMM_ENTRIES(float)
MHC_GEMM_ENTRIES(double)
MHC_GEMM_ENTRIES(f16)
MHC_GEMM_ENTRIES(bf16)

// Sinkhorn is a few hundred scalar operations per token at the usual n = 4: the baseline ISA will do.
void sinkhorn_forward_matrix(const float* logits, float* comb, int n, int iters, float eps) {
  sinkhorn_forward_impl(logits, comb, n, iters, eps);
}
void sinkhorn_forward_matrix(const double* logits, double* comb, int n, int iters, double eps) {
  sinkhorn_forward_impl(logits, comb, n, iters, eps);
}
void sinkhorn_backward_matrix(const float* logits, const float* grad_comb, float* grad_logits, int n, int iters,
                              float eps) {
  sinkhorn_backward_impl(logits, grad_comb, grad_logits, n, iters, eps);
}
void sinkhorn_backward_matrix(const double* logits, const double* grad_comb, double* grad_logits, int n,
                              int iters, double eps) {
  sinkhorn_backward_impl(logits, grad_comb, grad_logits, n, iters, eps);
}

}  // namespace mhc::cpu_fast::kernels
