// The projection GEMMs and the per-token Sinkhorn of the fast CPU backend, each instantiated
// once per dtype behind the out-of-line entry points declared in fast_kernels.hpp.
//
// The GEMMs are register-tiled on 64-byte vectors: the projection keeps kTokenTile x 4 (token,
// row) accumulators so each vector of fn feeds kTokenTile tokens; the input gradient keeps
// 16 tokens x 1 vector (or kTokenTile x 2) of output per row of fn; the parameter gradient keeps
// 8 rows x 2 vectors of grad_fn while streaming over tokens.
#include "cpu/fast_kernels.hpp"

namespace mhc::cpu_fast::kernels {

namespace {

// ---- the projection GEMMs ------------------------------------------------------------------------------
// K is walked in chunks of kChunk elements so a tile's chunk of x stays in L1 while every row group
// of fn passes over it; 16-bit streams are converted to fp32 once per chunk into a stack tile.
// Streaming x from memory would otherwise stall the compute of each chunk, so the loops prefetch
// the next chunk (or the next tile's first chunk) into L2, one cache line per vector step.
constexpr int64_t kChunk = 2048;

// Walks the cache lines of up to kTokenTile regions, one per step.
struct Prefetcher {
  const char* base[kTokenTile];
  int64_t lines = 0;  // per region
  int regions = 0;
  int region = 0;
  int64_t line = 0;
  MHC_INLINE void step() {
    if (region < regions) {
      __builtin_prefetch(base[region] + line * 64, 0, 2);
      if (++line == lines) {
        line = 0;
        ++region;
      }
    }
  }
};

// raw[tb * rows + r] += x[tb] . fn[r] over one chunk of kc elements, for r in [r0, r0 + RB), and
// optionally sumsq[tb] += x[tb] . x[tb]. x rows are ldx apart, fn rows ldf apart.
template <class M, int TB, int RB, bool kSumSq>
MHC_INLINE void project_tile(const M* x, int64_t ldx, int64_t kc, const M* fn, int64_t ldf, int64_t rows,
                             int64_t r0, M* raw, M* sumsq, Prefetcher& pf) {
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  V acc[TB][RB] = {};
  V sq[TB] = {};
  const M* f = fn + r0 * ldf;
  int64_t k = 0;
  for (; k + L <= kc; k += L) {
    V xv[TB];
    for (int tb = 0; tb < TB; ++tb) xv[tb] = vload(x + tb * ldx + k);
    for (int rb = 0; rb < RB; ++rb) {
      const V fv = vload(f + rb * ldf + k);
      for (int tb = 0; tb < TB; ++tb) acc[tb][rb] += xv[tb] * fv;
    }
    if constexpr (kSumSq)
      for (int tb = 0; tb < TB; ++tb) sq[tb] += xv[tb] * xv[tb];
    pf.step();
  }
  for (int tb = 0; tb < TB; ++tb) {
    M r[RB], s = 0;
    for (int rb = 0; rb < RB; ++rb) r[rb] = hsum(acc[tb][rb]);
    if constexpr (kSumSq) s = hsum(sq[tb]);
    for (int64_t kk = k; kk < kc; ++kk) {
      const M xv = x[tb * ldx + kk];
      for (int rb = 0; rb < RB; ++rb) r[rb] += xv * f[rb * ldf + kk];
      if constexpr (kSumSq) s += xv * xv;
    }
    for (int rb = 0; rb < RB; ++rb) raw[tb * rows + r0 + rb] += r[rb];
    if constexpr (kSumSq) sumsq[tb] += s;
  }
}

template <class M, int TB>
MHC_INLINE void sum_squares_tile(const M* x, int64_t ldx, int64_t kc, M* sumsq, Prefetcher& pf) {
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  V sq[TB] = {};
  int64_t k = 0;
  for (; k + L <= kc; k += L) {
    for (int tb = 0; tb < TB; ++tb) {
      const V xv = vload(x + tb * ldx + k);
      sq[tb] += xv * xv;
    }
    pf.step();
    pf.step();
  }
  for (int tb = 0; tb < TB; ++tb) {
    M s = hsum(sq[tb]);
    for (int64_t kk = k; kk < kc; ++kk) s += x[tb * ldx + kk] * x[tb * ldx + kk];
    sumsq[tb] += s;
  }
}

// raw [TB, rows] = x [TB, K] @ fn^T and sumsq [TB]; fn == nullptr (static mode) gives sums only.
template <class S, int TB>
MHC_INLINE void project_tokens(const S* x, int64_t K, const math_t<S>* fn, int64_t rows, math_t<S>* raw,
                               math_t<S>* sumsq) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  constexpr int RB = 4;
  constexpr bool kConvert = !std::is_same_v<S, M>;
  alignas(64) M tile[kConvert ? TB * kChunk : 1];
  for (int tb = 0; tb < TB; ++tb) {
    sumsq[tb] = 0;
    if (fn)
      for (int64_t r = 0; r < rows; ++r) raw[tb * rows + r] = 0;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, K - k0);
    // Next: the following chunk of each token, or the first chunk of the next tile.
    Prefetcher pf;
    const bool last = k0 + kChunk >= K;
    const int64_t next_len = last ? std::min(kChunk, K) : std::min(kChunk, K - k0 - kChunk);
    pf.regions = TB;
    pf.lines = (next_len * static_cast<int64_t>(sizeof(S)) + 63) / 64;
    for (int tb = 0; tb < TB; ++tb)
      pf.base[tb] = reinterpret_cast<const char*>(last ? x + (TB + tb) * K : x + tb * K + k0 + kChunk);

    const M* xt;
    int64_t ldx;
    if constexpr (kConvert) {
      for (int tb = 0; tb < TB; ++tb) {
        const S* src = x + tb * K + k0;
        M* dst = tile + tb * kChunk;
        int64_t k = 0;
        for (; k + L <= kc; k += L) {
          const V v = vload(src + k);
          std::memcpy(dst + k, &v, sizeof(v));
        }
        for (; k < kc; ++k) dst[k] = load(src, k);
      }
      xt = tile;
      ldx = kChunk;
    } else {
      xt = x + k0;
      ldx = K;
    }
    if (fn == nullptr || rows == 0) {
      sum_squares_tile<M, TB>(xt, ldx, kc, sumsq, pf);
      continue;
    }
    const M* f = fn + k0;
    int64_t r = 0;
    if (rows >= RB) {
      project_tile<M, TB, RB, true>(xt, ldx, kc, f, K, rows, 0, raw, sumsq, pf);
      for (r = RB; r + RB <= rows; r += RB) project_tile<M, TB, RB, false>(xt, ldx, kc, f, K, rows, r, raw, sumsq, pf);
    } else {
      project_tile<M, TB, 1, true>(xt, ldx, kc, f, K, rows, 0, raw, sumsq, pf);
      r = 1;
    }
    for (; r < rows; ++r) project_tile<M, TB, 1, false>(xt, ldx, kc, f, K, rows, r, raw, sumsq, pf);
  }
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
  constexpr int64_t kAhead = 8 * L;
  const int64_t K = a.n * a.C, k = i * a.C + c;
  V acc[TB][KV];
  for (int tb = 0; tb < TB; ++tb)
    for (int kv = 0; kv < KV; ++kv) {
      const int64_t e = tb * K + k + kv * L;
      // TB interleaved streams per array are too many for the hardware prefetcher: the ones that
      // come from memory (accum; out, which is written) are fetched kAhead elements early.
      if (a.accum) __builtin_prefetch(a.accum + e + kAhead, 0, 3);
      __builtin_prefetch(a.out + e + kAhead, 1, 3);
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

template <class S, int TB, int KV> MHC_INLINE void input_grad_tile(const InputGradArgs<S>& a) {
  using M = math_t<S>;
  constexpr int L = kLanes<M>;
  const int64_t K = a.n * a.C;
  for (int64_t i = 0; i < a.n; ++i) {
    int64_t c = 0;
    for (; c + KV * L <= a.C; c += KV * L) input_grad_chunk<S, TB, KV>(a, i, c);
    if constexpr (KV > 1)
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

// 16 tokens share each vector of fn (a group of the batched Sinkhorn), else kTokenTile, else one.
static_assert(kSinkhornBatch == 16, "input_grad_impl: the tile of a full group");
template <class S> MHC_INLINE void input_grad_impl(int tokens, const InputGradArgs<S>& a) {
  if (tokens == 16) return input_grad_tile<S, 16, 1>(a);
  if (tokens == kTokenTile) return input_grad_tile<S, kTokenTile, 2>(a);
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
    input_grad_tile<S, 1, 2>(one);
  }
}

// TN: grad_fn = dP^T @ x, output-stationary. A block of kGradColumns columns of grad_fn (all rows)
// stays in L1 while tiles of kGradTokens tokens of x stream through it; each tile is read from
// memory once (rows of 512 contiguous bytes) and reused by every row group from L1. The next tile
// is prefetched into L2 during the current one.
constexpr int64_t kGradTokens = 32;

// grad_fn[r0 : r0+RB, k0 : k0+KV*L] (+)= dP[t0:t1, r0 : r0+RB]^T @ x[t0:t1, k0 : k0+KV*L]; the first
// tile (t0 == 0) starts from zero.
template <class S, int RB, int KV>
MHC_INLINE void param_grad_rows(const S* x, int64_t T, int64_t K, const math_t<S>* dP, int64_t rows, int64_t r0,
                                int64_t k0, int64_t t0, int64_t t1, math_t<S>* grad_fn, int64_t prefetch_bytes) {
  using M = math_t<S>;
  using V = vec_t<M>;
  constexpr int L = kLanes<M>;
  V acc[RB][KV];
  for (int rb = 0; rb < RB; ++rb)
    for (int kv = 0; kv < KV; ++kv)
      acc[rb][kv] = t0 == 0 ? V{} : vload(grad_fn + (r0 + rb) * K + k0 + kv * L);
  for (int64_t t = t0; t < t1; ++t) {
    if (prefetch_bytes > 0 && t + kGradTokens < T) {  // this token's row of the next tile
      const char* next = reinterpret_cast<const char*>(x + (t + kGradTokens) * K + k0);
      for (int64_t b = 0; b < prefetch_bytes; b += 64) __builtin_prefetch(next + b, 0, 2);
    }
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

template <class S>
MHC_INLINE void param_grad_scalar_columns(const S* x, int64_t K, const math_t<S>* dP, int64_t rows, int64_t k0,
                                          int64_t k1, int64_t t0, int64_t t1, math_t<S>* grad_fn) {
  using M = math_t<S>;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = k0; k < k1; ++k) {
      M s = t0 == 0 ? M(0) : grad_fn[r * K + k];
      for (int64_t t = t0; t < t1; ++t) s += load(x, t * K + k) * dP[t * rows + r];
      grad_fn[r * K + k] = s;
    }
}

// The first call of a tile (r0 == 0) prefetches the next tile's part of the column block.
template <class S, int RB>
MHC_INLINE void param_grad_row_group(const S* x, int64_t T, int64_t K, const math_t<S>* dP, int64_t rows,
                                     int64_t r0, int64_t kb0, int64_t kb1, int64_t kb_end, int64_t t0, int64_t t1,
                                     math_t<S>* grad_fn) {
  constexpr int L = kLanes<math_t<S>>;
  int64_t prefetch = r0 == 0 ? (kb_end - kb0) * static_cast<int64_t>(sizeof(S)) : 0;
  int64_t k = kb0;
  for (; k + 2 * L <= kb1; k += 2 * L, prefetch = 0)
    param_grad_rows<S, RB, 2>(x, T, K, dP, rows, r0, k, t0, t1, grad_fn, prefetch);
  for (; k + L <= kb1; k += L, prefetch = 0) param_grad_rows<S, RB, 1>(x, T, K, dP, rows, r0, k, t0, t1, grad_fn, prefetch);
}

template <class S>
MHC_INLINE void param_grad_impl(const S* x, int64_t T, int64_t K, const math_t<S>* dP, int64_t rows,
                                int64_t block_begin, int64_t block_end, math_t<S>* grad_fn) {
  using M = math_t<S>;
  constexpr int L = kLanes<M>;
  constexpr int64_t kWidth = 8 * L;
  static_assert(kWidth == (sizeof(M) == 8 ? 64 : 128), "param_grad_block_width");
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t kb0 = b * kWidth, kb1 = std::min(K, kb0 + kWidth);
    const int64_t kv_end = kb0 + (kb1 - kb0) / L * L;  // columns past kv_end go one at a time
    if (T == 0)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = kb0; k < kb1; ++k) grad_fn[r * K + k] = 0;
    for (int64_t t0 = 0; t0 < T; t0 += kGradTokens) {
      const int64_t t1 = std::min(T, t0 + kGradTokens);
      int64_t r = 0;
      for (; r + 8 <= rows; r += 8) param_grad_row_group<S, 8>(x, T, K, dP, rows, r, kb0, kv_end, kb1, t0, t1, grad_fn);
      for (; r + 4 <= rows; r += 4) param_grad_row_group<S, 4>(x, T, K, dP, rows, r, kb0, kv_end, kb1, t0, t1, grad_fn);
      for (; r < rows; ++r) param_grad_row_group<S, 1>(x, T, K, dP, rows, r, kb0, kv_end, kb1, t0, t1, grad_fn);
      param_grad_scalar_columns(x, K, dP, rows, kv_end, kb1, t0, t1, grad_fn);
    }
  }
}

// The Sinkhorn code below (one matrix and batches, and their entry points) is compiled without floating-point
// contraction: the batch entries are target clones (x86-64-v4 / v3 have FMA) and the one-matrix ones are not, so with
// GCC's default contraction a token's bits depended on how many tokens shared the call on an AVX2 machine (seen on
// a Zen without AVX-512: grad_logits of fp64 n = 3 differed in the last bit). Without it every path does the same
// IEEE operations in the same order.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
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
    const M inv = M(1) / sum;
    for (int k = 0; k < n; ++k) p[j * n + k] = p[j * n + k] * inv + eps;
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
    for (int k = 0; k < n; ++k) colsum[k] = M(1) / (colsum[k] + eps);
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < n; ++k) a[j * n + k] *= colsum[k];
  } else {
    for (int j = 0; j < n; ++j) {
      M sum = 0;
      for (int k = 0; k < n; ++k) sum += a[j * n + k];
      const M inv = M(1) / (sum + eps);
      for (int k = 0; k < n; ++k) a[j * n + k] *= inv;
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
      d[k] = M(1) / (d[k] + eps);  // now 1 / d
      dotv[k] *= d[k] * d[k];
    }
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < n; ++k) g[j * n + k] = g[j * n + k] * d[k] - dotv[k];
  } else {
    for (int j = 0; j < n; ++j) {
      M d = 0, dotv = 0;
      for (int k = 0; k < n; ++k) {
        d += a[j * n + k];
        dotv += g[j * n + k] * a[j * n + k];
      }
      const M inv = M(1) / (d + eps);
      dotv *= inv * inv;
      for (int k = 0; k < n; ++k) g[j * n + k] = g[j * n + k] * inv - dotv;
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
    const M inv = M(1) / sum;
    for (int k = 0; k < n; ++k) {
      sm[k] *= inv;
      dotv += g[j * n + k] * sm[k];
    }
    for (int k = 0; k < n; ++k) grad_logits[j * n + k] = sm[k] * (g[j * n + k] - dotv);
  }
}

// ---- Sinkhorn of kSinkhornBatch matrices at once --------------------------------------------------------
// Layout [n*n][kBatch]: element-major, one lane per token. Every step is then kBatch-wide vector
// arithmetic, and the serial chain of 2*iters - 1 normalisations is paid once per kBatch tokens.
// Same operations, in the same order, as the one-matrix path above.

template <int kBatch, class M> MHC_INLINE void batch_softmax_plus_eps(const M* logits, M* p, int n, M eps) {
  for (int j = 0; j < n; ++j) {
    M mx[kBatch], sum[kBatch];
    for (int b = 0; b < kBatch; ++b) mx[b] = logits[(j * n) * kBatch + b];
    for (int k = 1; k < n; ++k)
      for (int b = 0; b < kBatch; ++b) mx[b] = std::max(mx[b], logits[(j * n + k) * kBatch + b]);
    for (int b = 0; b < kBatch; ++b) sum[b] = 0;
    for (int k = 0; k < n; ++k)
      for (int b = 0; b < kBatch; ++b) {
        p[(j * n + k) * kBatch + b] = std::exp(logits[(j * n + k) * kBatch + b] - mx[b]);
        sum[b] += p[(j * n + k) * kBatch + b];
      }
    for (int b = 0; b < kBatch; ++b) sum[b] = M(1) / sum[b];
    for (int k = 0; k < n; ++k)
      for (int b = 0; b < kBatch; ++b) p[(j * n + k) * kBatch + b] = p[(j * n + k) * kBatch + b] * sum[b] + eps;
  }
}

// Element (a, b) of the step's group g: column normalisations group by column, rows by row.
MHC_INLINE int group_index(bool by_column, int n, int g, int e) { return by_column ? e * n + g : g * n + e; }

template <int kBatch, class M> MHC_INLINE void batch_step(M* a, int n, int step, M eps) {
  const bool by_column = step & 1;
  for (int g = 0; g < n; ++g) {
    M sum[kBatch];
    for (int b = 0; b < kBatch; ++b) sum[b] = 0;
    for (int e = 0; e < n; ++e)
      for (int b = 0; b < kBatch; ++b) sum[b] += a[group_index(by_column, n, g, e) * kBatch + b];
    for (int b = 0; b < kBatch; ++b) sum[b] = M(1) / (sum[b] + eps);
    for (int e = 0; e < n; ++e)
      for (int b = 0; b < kBatch; ++b) a[group_index(by_column, n, g, e) * kBatch + b] *= sum[b];
  }
}

template <int kBatch, class M> MHC_INLINE void batch_step_backward(const M* a, M* grad, int n, int step, M eps) {
  const bool by_column = step & 1;
  for (int g = 0; g < n; ++g) {
    M inv[kBatch], dotv[kBatch];
    for (int b = 0; b < kBatch; ++b) inv[b] = dotv[b] = 0;
    for (int e = 0; e < n; ++e)
      for (int b = 0; b < kBatch; ++b) {
        const int i = group_index(by_column, n, g, e) * kBatch + b;
        inv[b] += a[i];
        dotv[b] += grad[i] * a[i];
      }
    for (int b = 0; b < kBatch; ++b) {
      inv[b] = M(1) / (inv[b] + eps);
      dotv[b] *= inv[b] * inv[b];
    }
    for (int e = 0; e < n; ++e)
      for (int b = 0; b < kBatch; ++b) {
        const int i = group_index(by_column, n, g, e) * kBatch + b;
        grad[i] = grad[i] * inv[b] - dotv[b];
      }
  }
}

// Token-major [count][stride] <-> lanes [n*n][kBatch]; lanes past count hold zeros.
template <int kBatch, class M> MHC_INLINE void to_lanes(const M* src, int64_t stride, int count, int nn, M* dst) {
  for (int e = 0; e < nn; ++e)
    for (int b = 0; b < kBatch; ++b) dst[e * kBatch + b] = b < count ? src[b * stride + e] : M(0);
}
template <int kBatch, class M> MHC_INLINE void from_lanes(const M* src, int count, int nn, M* dst, int64_t stride) {
  for (int b = 0; b < count; ++b)
    for (int e = 0; e < nn; ++e) dst[b * stride + e] = src[e * kBatch + b];
}

template <int kBatch, class M>
MHC_INLINE void sinkhorn_forward_batch_impl(int count, const M* logits, int64_t ld_logits, M* comb, int64_t ld_comb,
                                            int n, int iters, M eps) {
  alignas(64) M l[kSinkhornBatchMaxN * kSinkhornBatchMaxN * kBatch], p[kSinkhornBatchMaxN * kSinkhornBatchMaxN * kBatch];
  to_lanes<kBatch>(logits, ld_logits, count, n * n, l);
  batch_softmax_plus_eps<kBatch>(l, p, n, eps);
  for (int step = 1; step <= 2 * iters - 1; ++step) batch_step<kBatch>(p, n, step, eps);
  from_lanes<kBatch>(p, count, n * n, comb, ld_comb);
}

// Reverse mode as in sinkhorn_backward_impl, with the same checkpointing, kBatch tokens at a time.
template <int kBatch, class M>
MHC_INLINE void sinkhorn_backward_batch_impl(int count, const M* logits, int64_t ld_logits, const M* grad_comb,
                                             int64_t ld_grad, M* grad_logits, int64_t ld_out, int n, int iters, M eps) {
  constexpr int kScratch = 16384;
  constexpr int kMaxNN = kSinkhornBatchMaxN * kSinkhornBatchMaxN;
  alignas(64) M scratch[kScratch];
  alignas(64) M l[kMaxNN * kBatch], g[kMaxNN * kBatch];
  const int nn = n * n, state = nn * kBatch, steps = 2 * iters - 1;
  const int slots = kScratch / state;  // >= 16 at n <= 8
  const int stride = (steps + slots - 2) / (slots - 1);
  M* work = scratch + static_cast<int64_t>(slots - 1) * state;

  to_lanes<kBatch>(logits, ld_logits, count, nn, l);
  to_lanes<kBatch>(grad_comb, ld_grad, count, nn, g);
  batch_softmax_plus_eps<kBatch>(l, work, n, eps);
  for (int s = 0; s < steps; ++s) {
    if (s % stride == 0) std::memcpy(scratch + static_cast<int64_t>(s / stride) * state, work, state * sizeof(M));
    if (s + 1 < steps) batch_step<kBatch>(work, n, s + 1, eps);
  }
  for (int step = steps; step >= 1; --step) {
    const int st = step - 1, ckpt = st / stride;
    const M* in = scratch + static_cast<int64_t>(ckpt) * state;
    if (st != ckpt * stride) {
      std::memcpy(work, in, state * sizeof(M));
      for (int s = ckpt * stride + 1; s <= st; ++s) batch_step<kBatch>(work, n, s, eps);
      in = work;
    }
    batch_step_backward<kBatch>(in, g, n, step, eps);
  }
  // Softmax rows: dl = s * (g - <g, s>), s recomputed from the logits.
  for (int j = 0; j < n; ++j) {
    M mx[kBatch], sum[kBatch], dotv[kBatch], sm[kSinkhornBatchMaxN][kBatch];
    for (int b = 0; b < kBatch; ++b) mx[b] = l[(j * n) * kBatch + b];
    for (int k = 1; k < n; ++k)
      for (int b = 0; b < kBatch; ++b) mx[b] = std::max(mx[b], l[(j * n + k) * kBatch + b]);
    for (int b = 0; b < kBatch; ++b) sum[b] = dotv[b] = 0;
    for (int k = 0; k < n; ++k)
      for (int b = 0; b < kBatch; ++b) {
        sm[k][b] = std::exp(l[(j * n + k) * kBatch + b] - mx[b]);
        sum[b] += sm[k][b];
      }
    for (int b = 0; b < kBatch; ++b) sum[b] = M(1) / sum[b];
    for (int k = 0; k < n; ++k)
      for (int b = 0; b < kBatch; ++b) {
        sm[k][b] *= sum[b];
        dotv[b] += g[(j * n + k) * kBatch + b] * sm[k][b];
      }
    for (int k = 0; k < n; ++k)
      for (int b = 0; b < kBatch; ++b) l[(j * n + k) * kBatch + b] = sm[k][b] * (g[(j * n + k) * kBatch + b] - dotv[b]);
  }
  from_lanes<kBatch>(l, count, nn, grad_logits, ld_out);
}

}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

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
MHC_GEMM_ENTRIES(bf16)
#undef MHC_GEMM_ENTRIES

// ---- fp16: one instantiation per x86-64 level, picked by the CPU (see fast_kernels.hpp) ----------
int f16_isa_level() {
#if MHC_CPU_F16_LEVELS
  static const int level = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 0;
  return level;
#else
  return 0;
#endif
}

#if MHC_CPU_F16_LEVELS
#define MHC_GEMM_ENTRIES_AT(level, target)                                                             \
  target void project(int tokens, const f16_hw<level>* x, int64_t K, const float* fn, int64_t rows,    \
                      float* raw, float* sumsq) {                                                      \
    project_impl<f16_hw<level>>(tokens, x, K, fn, rows, raw, sumsq);                                  \
  }                                                                                                    \
  target void input_grad(int tokens, const InputGradArgs<f16_hw<level>>& a) {                          \
    input_grad_impl<f16_hw<level>>(tokens, a);                                                         \
  }                                                                                                    \
  target void param_grad(const f16_hw<level>* x, int64_t T, int64_t K, const float* dP, int64_t rows,  \
                         int64_t block_begin, int64_t block_end, float* grad_fn) {                     \
    param_grad_impl<f16_hw<level>>(x, T, K, dP, rows, block_begin, block_end, grad_fn);               \
  }
MHC_GEMM_ENTRIES_AT(4, MHC_TARGET_V4)
MHC_GEMM_ENTRIES_AT(3, MHC_TARGET_V3)
#undef MHC_GEMM_ENTRIES_AT

namespace {
template <int L> const f16_hw<L>* at_level(const f16* p) { return reinterpret_cast<const f16_hw<L>*>(p); }
template <int L> InputGradArgs<f16_hw<L>> at_level(const InputGradArgs<f16>& a) {
  return {at_level<L>(a.x), at_level<L>(a.accum), at_level<L>(a.g), a.w, a.coef, a.dP, a.fn,
          reinterpret_cast<f16_hw<L>*>(a.out), a.n, a.C, a.rows};
}
}  // namespace
#define MHC_BY_F16_LEVEL(call_at_4, call_at_3, call_baseline) \
  switch (f16_isa_level()) {                                   \
    case 4: return call_at_4;                                  \
    case 3: return call_at_3;                                  \
    default: return call_baseline;                             \
  }
#else
#define MHC_BY_F16_LEVEL(call_at_4, call_at_3, call_baseline) return call_baseline;
#endif

void project(int tokens, const f16* x, int64_t K, const float* fn, int64_t rows, float* raw, float* sumsq) {
  MHC_BY_F16_LEVEL(project(tokens, at_level<4>(x), K, fn, rows, raw, sumsq),
                   project(tokens, at_level<3>(x), K, fn, rows, raw, sumsq),
                   project_impl<f16>(tokens, x, K, fn, rows, raw, sumsq))
}
void input_grad(int tokens, const InputGradArgs<f16>& a) {
  MHC_BY_F16_LEVEL(input_grad(tokens, at_level<4>(a)), input_grad(tokens, at_level<3>(a)),
                   input_grad_impl<f16>(tokens, a))
}
void param_grad(const f16* x, int64_t T, int64_t K, const float* dP, int64_t rows, int64_t block_begin,
                int64_t block_end, float* grad_fn) {
  MHC_BY_F16_LEVEL(param_grad(at_level<4>(x), T, K, dP, rows, block_begin, block_end, grad_fn),
                   param_grad(at_level<3>(x), T, K, dP, rows, block_begin, block_end, grad_fn),
                   param_grad_impl<f16>(x, T, K, dP, rows, block_begin, block_end, grad_fn))
}
#undef MHC_BY_F16_LEVEL

// Without contraction, as the Sinkhorn code above (same options: the entries inline it).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
// Sinkhorn is a few hundred scalar operations per token at the usual n: the baseline ISA will do,
// but the common stream counts get their own instantiation (n a constant: loops fully unrolled).
#define MHC_SINKHORN_BY_N(call) \
  switch (n) {                  \
    case 2: n = 2; return call; \
    case 4: n = 4; return call; \
    case 8: n = 8; return call; \
    default: return call;       \
  }
void sinkhorn_forward_matrix(const float* logits, float* comb, int n, int iters, float eps) {
  MHC_SINKHORN_BY_N(sinkhorn_forward_impl(logits, comb, n, iters, eps))
}
void sinkhorn_forward_matrix(const double* logits, double* comb, int n, int iters, double eps) {
  MHC_SINKHORN_BY_N(sinkhorn_forward_impl(logits, comb, n, iters, eps))
}
void sinkhorn_backward_matrix(const float* logits, const float* grad_comb, float* grad_logits, int n, int iters,
                              float eps) {
  MHC_SINKHORN_BY_N(sinkhorn_backward_impl(logits, grad_comb, grad_logits, n, iters, eps))
}
void sinkhorn_backward_matrix(const double* logits, const double* grad_comb, double* grad_logits, int n,
                              int iters, double eps) {
  MHC_SINKHORN_BY_N(sinkhorn_backward_impl(logits, grad_comb, grad_logits, n, iters, eps))
}

// A batch computes all of its lanes whatever the count: a few tokens (decode, tiny calls) take a narrow batch.
// Lanes are independent and see the same operations whatever the width, so the bits do not change (tested).
constexpr int kSinkhornNarrowBatch = 2;

#define MHC_SINKHORN_BATCH_ENTRIES(M)                                                                   \
  MHC_CPU_KERNEL void sinkhorn_forward_batch(int count, const M* logits, int64_t ld_logits, M* comb,      \
                                             int64_t ld_comb, int n, int iters, M eps) {                \
    if (count <= kSinkhornNarrowBatch)                                                                  \
      MHC_SINKHORN_BY_N(sinkhorn_forward_batch_impl<kSinkhornNarrowBatch>(count, logits, ld_logits, comb, ld_comb, n, iters, eps)) \
    MHC_SINKHORN_BY_N(sinkhorn_forward_batch_impl<kSinkhornBatch>(count, logits, ld_logits, comb, ld_comb, n, iters, eps)) \
  }                                                                                                     \
  MHC_CPU_KERNEL void sinkhorn_backward_batch(int count, const M* logits, int64_t ld_logits,              \
                                              const M* grad_comb, int64_t ld_grad, M* grad_logits,      \
                                              int64_t ld_out, int n, int iters, M eps) {                \
    if (count <= kSinkhornNarrowBatch)                                                                  \
      MHC_SINKHORN_BY_N(sinkhorn_backward_batch_impl<kSinkhornNarrowBatch>(count, logits, ld_logits, grad_comb, ld_grad, \
                                                                          grad_logits, ld_out, n, iters, eps)) \
    MHC_SINKHORN_BY_N(sinkhorn_backward_batch_impl<kSinkhornBatch>(count, logits, ld_logits, grad_comb, ld_grad, \
                                                                   grad_logits, ld_out, n, iters, eps))  \
  }
MHC_SINKHORN_BATCH_ENTRIES(float)
MHC_SINKHORN_BATCH_ENTRIES(double)
#undef MHC_SINKHORN_BATCH_ENTRIES
#undef MHC_SINKHORN_BY_N
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace mhc::cpu_fast::kernels
