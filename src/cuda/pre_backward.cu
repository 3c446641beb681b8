// Backward of the projection-based ops: pre and head (docs/MATH.md section 1, exact reverse mode).
//
// Four stages, all deterministic (fixed-order sums, no float atomics):
//   A. dots:   U[t, i] = <grad_layer_input[t], x[t, i]>                    (one pass over x)
//   B. coefs:  per token, the reverse of the coefficient math (sigmoids, Sinkhorn through every
//              iteration, recomputed on chip from mixes), giving d_logit[t, :], the projection's
//              gradient DP[t, j] = d_logit * scale * rstd and the rstd term XC[t]
//   C. grad_x[t, k] = h[t, i] g[t, c] + sum_j DP[t, j] fn[j, k] + XC[t] x[t, k] (+ accum),
//      and the token-chunk partials of grad_fn[j, k] = sum_t DP[t, j] x[t, k]  (one pass over x)
//   D. fixed-order reductions: grad_fn over chunks, grad_base and grad_scale over tokens.
// The workspace holds U, d_logit, DP, XC, h, the per-token scale terms, the Sinkhorn divisors and
// the grad_fn partials; its size depends only on (T, n, C, fn present, iters, device).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/coefficients.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/pre_backward_split.hpp"
#include "cuda/sinkhorn.cuh"
#include "cuda/tuning.hpp"

namespace mhc::cuda_impl {

namespace {

using std::int64_t;

enum class Site { pre, head };

// ---- workspace layout ---------------------------------------------------------------------------
struct BackwardLayout {
  int64_t T = 0, n = 0, C = 0, m = 0, steps = 0, chunks = 0, chunks_v4 = 0, chunks_v4w = 0, chunks_head = 0;
  std::size_t elem = 4;
  // byte offsets
  std::size_t U = 0, DL = 0, DP = 0, XC = 0, H = 0, SC = 0, DIV = 0, GF = 0, total = 0;
};

// Token chunks of the grad_fn partials: enough blocks to fill the GPU, >= 32 tokens per chunk.
constexpr int kColsPerBlock = 128;  // columns of x per block in the tensor-core stage C

int grad_fn_chunks(int64_t T, int64_t nC, int m) {
  const int64_t kblocks = (nC + kColsPerBlock - 1) / kColsPerBlock;
  const int64_t want = (2 * int64_t(current_device_info().sm_count) + kblocks - 1) / kblocks;
  return static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(want, (T + 31) / 32), 1, 64));
}

// ---- stage C version (MHC_CUDA_PRE_BWD) ----------------------------------------------------------------
// v2 (MHC_CUDA_PRE_BWD=v2): grad_x_fn_mma below (bf16, 128-column blocks, 32-token tiles, x alone prefetched);
// it also serves every shape v4 does not take.
// v4 (the default): grad_x_fn_v4 (bf16, 256- or 128-column blocks, 16-token tiles, a cp.async ring of x, g, accum, DP,
// h and XC, one wave of resident blocks), and a packed static-mode kernel.
// v4-wide: the same kernel with 512 threads and twice the columns per block (1 KB runs per token row for n <= 4,
// 512 bytes for n = 8), one block per SM: the same bytes in flight per SM as v4, so the pair measures the
// run-length reading of docs/cuda_notes.md directly.
// v5: grad_x_fn_v4 with one block barrier per tile (kLean, below). Read at every call.
enum class BwdVersion { v2, v4, v4_wide, v5 };
BwdVersion bwd_version() {  // v4 by default: 20-21 % less time than v2 at n = 4 and 8 on the H200 (docs/cuda_notes.md)
  const char* v = std::getenv("MHC_CUDA_PRE_BWD");
  if (v && std::strcmp(v, "v2") == 0) return BwdVersion::v2;
  if (v && std::strcmp(v, "v4-wide") == 0) return BwdVersion::v4_wide;
  if (v && std::strcmp(v, "v5") == 0) return BwdVersion::v5;
  return BwdVersion::v4;
}

// v4 geometry the host needs too (work split and workspace): columns per block by m, tokens per tile,
// the resident blocks per SM the kernel is built for (__launch_bounds__ and shared memory).
constexpr int v4_cols(int64_t m, bool wide) { return (m <= 24 ? 256 : 128) * (wide ? 2 : 1); }
constexpr int kV4Tokens = 16;
constexpr int v4_blocks_per_sm(bool wide) { return wide ? 1 : 2; }
constexpr bool v4_rows(int64_t m) { return m == 8 || m == 24 || m == 80; }  // n = 2, 4, 8

// Token chunks of v4: as many as fill the resident slots once (one wave), whole tiles per chunk.
int v4_chunks(int64_t T, int64_t nC, int64_t m, bool wide) {
  const int64_t colblocks = (nC + v4_cols(m, wide) - 1) / v4_cols(m, wide);
  const int64_t slots = int64_t(v4_blocks_per_sm(wide)) * current_device_info().sm_count;
  const int64_t tiles = (T + kV4Tokens - 1) / kV4Tokens;
  return static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(slots / colblocks, tiles), 1, 64));
}

// The head's packed stage C (head_grad_x_packed): blocks of 256 threads x one 16-byte pack of columns (2048 for
// 16-bit streams, 1024 for f32), token chunks for 2 blocks per SM (128 registers at n = 4), counted for the widest
// blocks (f32 launches more column blocks over the same chunks).
constexpr int kHeadThreads = 256;
template <class S> constexpr int kHeadCols = kHeadThreads * kPack<S>;
int head_grad_chunks(int64_t T, int64_t nC) {
  const int64_t colblocks = (nC + kHeadCols<__nv_bfloat16> - 1) / kHeadCols<__nv_bfloat16>;
  const int64_t want = (2 * int64_t(current_device_info().sm_count) + colblocks - 1) / colblocks;
  return static_cast<int>(std::clamp<int64_t>(std::min<int64_t>(want, (T + 31) / 32), 1, 256));
}

BackwardLayout backward_layout(int64_t T, int64_t n, int64_t C, int64_t m, bool has_fn, bool has_sinkhorn,
                               int iters, DType dtype) {
  BackwardLayout L;
  L.T = T;
  L.n = n;
  L.C = C;
  L.m = m;
  L.elem = dtype == DType::f64 ? 8 : 4;
  L.steps = has_sinkhorn ? sinkhorn_steps(iters) : 0;
  L.chunks = has_fn ? grad_fn_chunks(T, n * C, static_cast<int>(m)) : 0;
  L.chunks_v4 = has_fn && has_sinkhorn && v4_rows(m) ? v4_chunks(T, n * C, m, false) : 0;  // pre only
  L.chunks_v4w = has_fn && has_sinkhorn && v4_rows(m) ? v4_chunks(T, n * C, m, true) : 0;
  std::size_t off = 0;
  auto take = [&](int64_t count) {
    const std::size_t at = off;
    off += (static_cast<std::size_t>(count) * L.elem + 255) / 256 * 256;
    return at;
  };
  L.U = take(T * n);
  L.DL = take(T * m);
  L.DP = take(has_fn ? T * m : 0);
  L.XC = take(has_fn ? T : 0);
  L.H = take(T * n);
  L.SC = take(T * 3);
  L.DIV = take(T * L.steps * n);
  // sized for every version of stage C (MHC_CUDA_PRE_BWD may change between the query and the call)
  const int64_t split_chunks = has_sinkhorn ? pre_bwd_split_chunks(dtype, T, n, C, has_fn) : 0;  // pre only
  L.chunks_head = has_fn && !has_sinkhorn ? head_grad_chunks(T, n * C) : 0;                     // head only
  L.GF = take(has_fn ? std::max({L.chunks, L.chunks_v4, L.chunks_v4w, split_chunks, L.chunks_head}) * m * n * C : 0);
  L.total = off;
  return L;
}

template <class M> M* at(void* ws, std::size_t off) { return reinterpret_cast<M*>(static_cast<char*>(ws) + off); }


// ---- A. U[t, i] = <g[t], x[t, i]> ---------------------------------------------------------------------
template <class S, int N>
__global__ void __launch_bounds__(256) stream_dots_packed(const S* __restrict__ g, const S* __restrict__ x,
                                                          float* __restrict__ U, int64_t T, int64_t C) {
  constexpr int P = kPack<S>;
  __shared__ float scratch[(256 / 32) * N];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
    for (int64_t c = threadIdx.x * P; c < C; c += blockDim.x * P) {
      const Pack<S> gp = load_pack(g + t * C + c);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const Pack<S> xp = load_pack_stream(x + (t * N + i) * C + c);
#pragma unroll
        for (int e = 0; e < P; ++e) acc[i] += to_math(gp.v[e]) * to_math(xp.v[e]);
      }
    }
    block_sum<N>(acc, scratch);
    if (threadIdx.x == 0)
#pragma unroll
      for (int i = 0; i < N; ++i) U[t * N + i] = acc[i];
  }
}

template <class S>
__global__ void stream_dots_generic(const S* __restrict__ g, const S* __restrict__ x, math_t<S>* __restrict__ U,
                                    int64_t T, int n, int64_t C) {
  using M = math_t<S>;
  const int warps = blockDim.x >> 5;
  for (int64_t q = int64_t(blockIdx.x) * warps + (threadIdx.x >> 5); q < T * n; q += int64_t(gridDim.x) * warps) {
    const int64_t t = q / n;
    M acc = 0;
    for (int64_t c = threadIdx.x & 31; c < C; c += 32) acc += to_math(g[t * C + c]) * to_math(x[q * C + c]);
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) U[q] = acc;
  }
}

// ---- B. per-token coefficient backward -------------------------------------------------------------------
template <class M> struct CoefBackwardArgs {
  const M* mixes;   // [T, m]
  const M* rstd;    // [T]
  const M* base;    // [m]
  const M* scale;   // [3] or [1], may be null
  const M* g_h;     // grad_h_pre (pre) / grad_weights (head), may be null
  const M* g_post;  // grad_h_post, may be null
  const M* g_comb;  // grad_comb, may be null
  const M* U;       // [T, n] or null (no grad_layer_input / grad_out)
  M* DL;            // [T, m] d logit
  M* DP;            // [T, m] or null (static mode)
  M* XC;            // [T] or null
  M* H;             // [T, n] h_pre / weights
  M* SC;            // [T, 3]
  M* DIV;           // Sinkhorn divisors
  int64_t T;
  int n, m;
  int64_t nC;
  SiteConsts<M> k;
};

// The part shared by both shapes: sigmoid groups, scale terms, projection gradient. d_logit of the
// comb group must already be in DL. Runs for token t on one thread.
template <Site kSite, class M>
__device__ void finish_token(const CoefBackwardArgs<M>& a, int64_t t) {
  const int n = a.n, m = a.m;
  const M rstd = a.rstd[t];
  M sc[3] = {0, 0, 0}, dm_dot = 0;
  for (int j = 0; j < m; ++j) {
    const M mix = a.mixes[t * m + j];
    const int group = kSite == Site::head ? 0 : coef_group(j, n);
    M d;
    if (group == 2) {
      d = a.DL[t * m + j];
    } else {
      const int i = group == 0 ? j : j - n;
      const M sig = sigmoid(mix * scale_of(a.scale, group) + a.base[j]);
      if (group == 0) {
        M dh = a.g_h ? a.g_h[t * n + i] : M(0);
        if (a.U) dh += a.U[t * n + i];
        a.H[t * n + i] = sig + a.k.pre_eps;
        d = dh * sig * (M(1) - sig);
      } else {
        d = (a.g_post ? a.g_post[t * n + i] : M(0)) * a.k.post_mult * sig * (M(1) - sig);
      }
      a.DL[t * m + j] = d;
    }
    sc[group] += d * mix;
    const M dmix = d * scale_of(a.scale, group);
    dm_dot += dmix * mix;
    if (a.DP) a.DP[t * m + j] = dmix * rstd;
  }
  for (int q = 0; q < 3; ++q) a.SC[t * 3 + q] = sc[q];
  // rstd = (sum x^2 / nC + eps)^(-1/2):  d x = grad_rstd * (-rstd^3 / nC) * x, grad_rstd = <dmix, raw>
  if (a.XC) a.XC[t] = -dm_dot * rstd * rstd / M(a.nC);
}

// One thread per token; Sinkhorn in registers, divisors at DIV[(s * N + a) * T + t].
template <Site kSite, int N, class M>
__global__ void coef_backward_reg(const CoefBackwardArgs<M> a) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < a.T; t += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (kSite == Site::pre) {
      constexpr int m = N * N + 2 * N;
      if (a.g_comb) {
        const M s_res = scale_of(a.scale, 2);
        const M* mix = a.mixes + t * m + 2 * N;
        const M* base = a.base + 2 * N;
        M g[N * N];
#pragma unroll
        for (int r = 0; r < N * N; ++r) g[r] = a.g_comb[t * N * N + r];
        sinkhorn_backward_reg<N, true>([&](int r) { return mix[r] * s_res + base[r]; }, g, a.k.eps, a.k.iters, a.DIV + t,
                                 a.T);
#pragma unroll
        for (int r = 0; r < N * N; ++r) a.DL[t * m + 2 * N + r] = g[r];
      } else {
#pragma unroll
        for (int r = 0; r < N * N; ++r) a.DL[t * m + 2 * N + r] = M(0);
      }
    }
    finish_token<kSite>(a, t);
  }
}

// One warp per token (any n); Sinkhorn in shared memory (3 * n*n per warp), divisors at
// DIV[(t * steps + s) * n + a].
template <class M>
__global__ void coef_backward_warp(const CoefBackwardArgs<M> a) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  const int n = a.n, m = a.m;
  M* logits = reinterpret_cast<M*>(smem_raw) + warp * 3 * n * n;
  M* p = logits + n * n;
  M* g = p + n * n;
  const M s_res = scale_of(a.scale, 2);
  for (int64_t t = int64_t(blockIdx.x) * warps + warp; t < a.T; t += int64_t(gridDim.x) * warps) {
    if (a.g_comb) {
      for (int r = lane; r < n * n; r += 32) {
        logits[r] = a.mixes[t * m + 2 * n + r] * s_res + a.base[2 * n + r];
        g[r] = a.g_comb[t * n * n + r];
      }
      __syncwarp();
      sinkhorn_backward_warp(logits, p, g, n, a.k.eps, a.k.iters, a.DIV + t * sinkhorn_steps(a.k.iters) * n);
      for (int r = lane; r < n * n; r += 32) a.DL[t * m + 2 * n + r] = g[r];
    } else {
      for (int r = lane; r < n * n; r += 32) a.DL[t * m + 2 * n + r] = M(0);
    }
    __syncwarp();
    if (lane == 0) finish_token<Site::pre>(a, t);
    __syncwarp();
  }
}

template <class M>
__global__ void coef_backward_head(const CoefBackwardArgs<M> a) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < a.T; t += int64_t(gridDim.x) * blockDim.x)
    finish_token<Site::head>(a, t);
}

// ---- C. grad_x and grad_fn partials ---------------------------------------------------------------------
template <class S> struct GradXArgs {
  const S* x;          // [T, n, C]
  const S* g;          // grad_layer_input / grad_out [T, C] or null
  const S* accum;      // [T, n, C] or null
  S* grad_x;           // [T, n, C]
  const math_t<S>* fn; // [m, nC] or null
  const math_t<S>* H;  // [T, n]
  const math_t<S>* DP; // [T, m] or null
  const math_t<S>* XC; // [T] or null
  math_t<S>* GF;       // [chunks, m, nC] or null
  int64_t T, C;
  int n, m, chunks;
};

// Block: 256 threads x KV consecutive columns k of x viewed as [T, nC]; one chunk of tokens.
// fn[:, k] stays in registers; grad_fn partials accumulate in registers over the chunk.
constexpr int kGradTokens = 32;  // tokens staged per step

template <class S, int MR, int KV>
__global__ void __launch_bounds__(256) grad_x_fn_fast(const GradXArgs<S> a) {
  using M = float;
  __shared__ __align__(16) M dp_s[kGradTokens][MR];
  __shared__ M xc_s[kGradTokens];
  const int64_t nC = a.n * a.C;
  const int64_t k0 = (int64_t(blockIdx.x) * 256 + threadIdx.x) * KV;
  const int chunk = blockIdx.y;
  const int64_t per_chunk = (a.T + a.chunks - 1) / a.chunks;
  const int64_t t_begin = chunk * per_chunk, t_end = std::min<int64_t>(a.T, t_begin + per_chunk);
  M fnr[MR][KV], gf[MR][KV];
  int stream[KV];
  int64_t chan[KV];
  bool valid[KV];
#pragma unroll
  for (int e = 0; e < KV; ++e) {
    const int64_t k = k0 + e;
    valid[e] = k < nC;
    stream[e] = valid[e] ? static_cast<int>(k / a.C) : 0;
    chan[e] = valid[e] ? k % a.C : 0;
#pragma unroll
    for (int j = 0; j < MR; ++j) {
      fnr[j][e] = valid[e] ? a.fn[j * nC + k] : 0.f;
      gf[j][e] = 0.f;
    }
  }
  for (int64_t tb = t_begin; tb < t_end; tb += kGradTokens) {
    const int count = static_cast<int>(std::min<int64_t>(kGradTokens, t_end - tb));
    __syncthreads();
    for (int q = threadIdx.x; q < count * MR; q += 256) dp_s[q / MR][q % MR] = a.DP[(tb + q / MR) * MR + q % MR];
    for (int q = threadIdx.x; q < count; q += 256) xc_s[q] = a.XC[tb + q];
    __syncthreads();
    // Four tokens per step, their loads issued together: the loop is latency-bound otherwise.
    constexpr int kBatch = 4;
    for (int tt0 = 0; tt0 < count; tt0 += kBatch) {
      M xv[kBatch][KV], gx[kBatch][KV];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int tt = tt0 + u;
        const int64_t t = tb + tt;
#pragma unroll
        for (int e = 0; e < KV; ++e) {
          const bool ok = valid[e] && tt < count;
          const int64_t off = t * nC + k0 + e;
          xv[u][e] = ok ? to_math(a.x[off]) : 0.f;
          gx[u][e] = 0.f;
          if (ok) {
            if (a.g) gx[u][e] += a.H[t * a.n + stream[e]] * to_math(a.g[t * a.C + chan[e]]);
            if (a.accum) gx[u][e] += to_math(a.accum[off]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int tt = tt0 + u;
        if (tt >= count) break;
#pragma unroll
        for (int e = 0; e < KV; ++e) gx[u][e] += xc_s[tt] * xv[u][e];
#pragma unroll
        for (int j = 0; j < MR; ++j) {
          const M d = dp_s[tt][j];
#pragma unroll
          for (int e = 0; e < KV; ++e) {
            gx[u][e] += d * fnr[j][e];
            gf[j][e] += d * xv[u][e];
          }
        }
#pragma unroll
        for (int e = 0; e < KV; ++e)
          if (valid[e]) a.grad_x[(tb + tt) * nC + k0 + e] = from_math<S>(gx[u][e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < KV; ++e)
    if (valid[e])
#pragma unroll
      for (int j = 0; j < MR; ++j) a.GF[(int64_t(chunk) * MR + j) * nC + k0 + e] = gf[j][e];
}

// ---- C, the head (m = n), packed --------------------------------------------------------------------------
// Why: the head ran grad_x_fn_mma<4> (tensor-core tiles built for m = 24; 378 us at n = 4, C = 4096, 8192 tokens on
// the H200, 2.6x its bytes). With m = n the projection terms are n FMA per element, so CUDA cores suffice: a thread
// owns one 16-byte pack of columns (kHeadCols<S> per block), keeps fn[:, pack] and its grad_fn partials in
// registers over a token chunk, and streams x and g four tokens at a time (their loads issued together).
//   grad_x[t, k] = w[t, i] g[t, c] + XC[t] x[t, k] + sum_j DP[t, j] fn[j, k]    (k = i C + c)
//   grad_fn partial[chunk, j, k] = sum over the chunk's tokens of DP[t, j] x[t, k]
template <class S, int N>
__global__ void __launch_bounds__(kHeadThreads) head_grad_x_packed(const GradXArgs<S> a) {
  constexpr int P = kPack<S>, TB = 32, kBatch = 4;
  __shared__ float dp_s[TB][N], h_s[TB][N], xc_s[TB];
  const int64_t C = a.C, nC = int64_t(N) * C;
  const int64_t k = int64_t(blockIdx.x) * kHeadCols<S> + int64_t(threadIdx.x) * P;
  const bool valid = k < nC;
  const int stream_i = valid ? static_cast<int>(k / C) : 0;
  const int64_t chan = valid ? k % C : 0;
  const int64_t per_chunk = (a.T + a.chunks - 1) / a.chunks;
  const int64_t t_begin = std::min<int64_t>(a.T, blockIdx.y * per_chunk), t_end = std::min<int64_t>(a.T, t_begin + per_chunk);
  // -- fn's columns of the pack, and zeroed partials
  float fnr[N][P], gf[N][P];
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int e = 0; e < P; ++e) {
      fnr[j][e] = valid ? a.fn[j * nC + k + e] : 0.f;
      gf[j][e] = 0.f;
    }
  for (int64_t tb = t_begin; tb < t_end; tb += TB) {
    const int count = static_cast<int>(std::min<int64_t>(TB, t_end - tb));
    // -- the step's per-token coefficients into shared memory
    __syncthreads();
    for (int q = threadIdx.x; q < count * N; q += blockDim.x) {
      dp_s[q / N][q % N] = a.DP[(tb + q / N) * N + q % N];
      h_s[q / N][q % N] = a.g ? a.H[(tb + q / N) * N + q % N] : 0.f;
    }
    for (int q = threadIdx.x; q < count; q += blockDim.x) xc_s[q] = a.XC[tb + q];
    __syncthreads();
    if (!valid) continue;
    for (int u0 = 0; u0 < count; u0 += kBatch) {
      // -- the batch's packs of x and g, loads issued together
      Pack<S> xv[kBatch], gv[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t t = tb + u0 + u;
        const bool ok = u0 + u < count;
        *reinterpret_cast<uint4*>(&xv[u]) = ok ? __ldcs(reinterpret_cast<const uint4*>(a.x + t * nC + k)) : make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(&gv[u]) =
            ok && a.g ? __ldg(reinterpret_cast<const uint4*>(a.g + t * C + chan)) : make_uint4(0, 0, 0, 0);
      }
      // -- grad_x of each token, the partials of grad_fn
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int tt = u0 + u;
        if (tt >= count) break;
        const float h = h_s[tt][stream_i], xc = xc_s[tt];
        float out[P];
#pragma unroll
        for (int e = 0; e < P; ++e) {
          const float xe = to_math(xv[u].v[e]);
          out[e] = h * to_math(gv[u].v[e]) + xc * xe;
        }
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float d = dp_s[tt][j];
#pragma unroll
          for (int e = 0; e < P; ++e) {
            out[e] += d * fnr[j][e];
            gf[j][e] += d * to_math(xv[u].v[e]);
          }
        }
        Pack<S> o;
#pragma unroll
        for (int e = 0; e < P; ++e) o.v[e] = from_math<S>(out[e]);
        __stcs(reinterpret_cast<uint4*>(a.grad_x + (tb + tt) * nC + k), *reinterpret_cast<const uint4*>(&o));
      }
    }
  }
  // -- this chunk's partials (zeros for an empty chunk)
  if (valid)
#pragma unroll
    for (int j = 0; j < N; ++j)
#pragma unroll
      for (int e = 0; e < P; ++e) a.GF[(int64_t(blockIdx.y) * N + j) * nC + k + e] = gf[j][e];
}

// Tensor-core version of stage C for bf16 streams. A block owns 128 columns of x viewed as
// [T, nC] and one chunk of tokens, walked in tiles of 32 tokens (x tile double-buffered with
// cp.async):  grad_x tile = DP tile . fn slice (3 bf16 mma per fragment: DP and fn split hi + lo,
// fp32-level accuracy) plus the elementwise terms, and grad_fn slice += DP^T tile . x tile
// (2 mma: DP hi + lo, x exact), accumulated in registers over the chunk.
constexpr int kTokTile = 32;

template <int MR> struct GradShape {
  static constexpr int MP = (MR + 15) / 16 * 16;  // rows of fn padded to the mma granularity
  static constexpr int KS1 = MP / 16;             // k steps of DP . fn
  static constexpr int MJ = MP / 16;              // row tiles of DP^T . x
  static constexpr int SD = MP + 4;               // row stride (floats) of the DP tile: conflict-free reads
  static constexpr int XS = kColsPerBlock + 8;    // row stride (elements) of the x tile: 17 x 16 bytes
  static constexpr int PS = kColsPerBlock + 4;    // row stride (floats) of the staged DP . fn
};

template <int MR>
__global__ void __launch_bounds__(256) grad_x_fn_mma(const GradXArgs<__nv_bfloat16> a) {
  using S = __nv_bfloat16;
  using Sh = GradShape<MR>;
  constexpr int P = kPack<S>;
  __shared__ __align__(16) S xs[2][kTokTile * Sh::XS];
  __shared__ __align__(16) float dps[kTokTile * Sh::SD];
  __shared__ __align__(16) float part[kTokTile * Sh::PS];
  __shared__ float xc_s[kTokTile];
  const int64_t nC = int64_t(a.n) * a.C;
  const int64_t col0 = int64_t(blockIdx.x) * kColsPerBlock;
  const int chunk = blockIdx.y;
  const int64_t per_chunk = (a.T + a.chunks - 1) / a.chunks;
  const int64_t t_begin = std::min<int64_t>(a.T, chunk * per_chunk), t_end = std::min<int64_t>(a.T, t_begin + per_chunk);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int nb = warp * 16;  // the warp's 16 columns (two column tiles of 8)

  // fn fragments of DP . fn, resident for the whole chunk: B[k = j][n = column]
  std::uint32_t fh[Sh::KS1][2][2], fl[Sh::KS1][2][2];
#pragma unroll
  for (int ks = 0; ks < Sh::KS1; ++ks)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int64_t col = col0 + nb + nt * 8 + g;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = ks * 16 + 2 * tq + h * 8;
        const float f0 = j < MR && col < nC ? a.fn[j * nC + col] : 0.f;
        const float f1 = j + 1 < MR && col < nC ? a.fn[(j + 1) * nC + col] : 0.f;
        split_pair<S>(make_float2(f0, f1), fh[ks][nt][h], fl[ks][nt][h]);
      }
    }
  float gf[Sh::MJ][2][4];
#pragma unroll
  for (int mj = 0; mj < Sh::MJ; ++mj)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) gf[mj][nt][0] = gf[mj][nt][1] = gf[mj][nt][2] = gf[mj][nt][3] = 0.f;

  auto issue_x = [&](int64_t tb, int buf) {
    for (int q = threadIdx.x; q < kTokTile * (kColsPerBlock / P); q += 256) {
      const int tl = q / (kColsPerBlock / P), cp = (q % (kColsPerBlock / P)) * P;
      const int64_t t = tb + tl, col = col0 + cp;
      const bool valid = t < t_end && col < nC;
      cp_async16(&xs[buf][tl * Sh::XS + cp], valid ? a.x + t * nC + col : a.x, valid);
    }
    cp_async_commit();
  };

  int buf = 0;
  if (t_begin < t_end) issue_x(t_begin, 0);
  for (int64_t tb = t_begin; tb < t_end; tb += kTokTile) {
    const int count = static_cast<int>(std::min<int64_t>(kTokTile, t_end - tb));
    for (int q = threadIdx.x; q < kTokTile * Sh::MP; q += 256) {
      const int tl = q / Sh::MP, j = q % Sh::MP;
      dps[tl * Sh::SD + j] = tl < count && j < MR ? a.DP[(tb + tl) * MR + j] : 0.f;
    }
    for (int q = threadIdx.x; q < kTokTile; q += 256) xc_s[q] = q < count ? a.XC[tb + q] : 0.f;
    if (tb + kTokTile < t_end) {
      issue_x(tb + kTokTile, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const S* xt = xs[buf];

    // DP . fn  -> staged in shared memory for the elementwise epilogue
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      float d[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int ks = 0; ks < Sh::KS1; ++ks) {
        const float* r0 = dps + (mt * 16 + g) * Sh::SD + ks * 16 + 2 * tq;
        const float* r1 = r0 + 8 * Sh::SD;
        std::uint32_t ah[4], al[4];
        split_pair<S>(*reinterpret_cast<const float2*>(r0), ah[0], al[0]);
        split_pair<S>(*reinterpret_cast<const float2*>(r1), ah[1], al[1]);
        split_pair<S>(*reinterpret_cast<const float2*>(r0 + 8), ah[2], al[2]);
        split_pair<S>(*reinterpret_cast<const float2*>(r1 + 8), ah[3], al[3]);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          mma_16816<S>(d[nt], al, fh[ks][nt]);
          mma_16816<S>(d[nt], ah, fl[ks][nt]);
          mma_16816<S>(d[nt], ah, fh[ks][nt]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int row = mt * 16 + g, col = nb + nt * 8 + 2 * tq;
        *reinterpret_cast<float2*>(part + row * Sh::PS + col) = make_float2(d[nt][0], d[nt][1]);
        *reinterpret_cast<float2*>(part + (row + 8) * Sh::PS + col) = make_float2(d[nt][2], d[nt][3]);
      }
    }

    // grad_fn += DP^T . x  (A[row = j][k = token], B from the x tile through a transposing load)
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      std::uint32_t bx[4];
      ldmatrix_x4_trans(bx, xt + (ks * 16 + (lane & 15)) * Sh::XS + nb + (lane >> 4) * 8);
      const std::uint32_t b0[2] = {bx[0], bx[1]}, b1[2] = {bx[2], bx[3]};
      const int k0 = ks * 16 + 2 * tq;
#pragma unroll
      for (int mj = 0; mj < Sh::MJ; ++mj) {
        const int j0 = mj * 16 + g;
        std::uint32_t ah[4], al[4];
        split_pair<S>(make_float2(dps[k0 * Sh::SD + j0], dps[(k0 + 1) * Sh::SD + j0]), ah[0], al[0]);
        split_pair<S>(make_float2(dps[k0 * Sh::SD + j0 + 8], dps[(k0 + 1) * Sh::SD + j0 + 8]), ah[1], al[1]);
        split_pair<S>(make_float2(dps[(k0 + 8) * Sh::SD + j0], dps[(k0 + 9) * Sh::SD + j0]), ah[2], al[2]);
        split_pair<S>(make_float2(dps[(k0 + 8) * Sh::SD + j0 + 8], dps[(k0 + 9) * Sh::SD + j0 + 8]), ah[3], al[3]);
        mma_16816<S>(gf[mj][0], al, b0);
        mma_16816<S>(gf[mj][0], ah, b0);
        mma_16816<S>(gf[mj][1], al, b1);
        mma_16816<S>(gf[mj][1], ah, b1);
      }
    }
    __syncthreads();

    // grad_x = DP . fn + XC x + h g (+ accum), in 16-byte packs
    for (int q = threadIdx.x; q < count * (kColsPerBlock / P); q += 256) {
      const int tl = q / (kColsPerBlock / P), cp = (q % (kColsPerBlock / P)) * P;
      const int64_t t = tb + tl, col = col0 + cp;
      if (col >= nC) continue;
      const int i = static_cast<int>(col / a.C);
      const int64_t c = col % a.C;
      const Pack<S> xv = *reinterpret_cast<const Pack<S>*>(xt + tl * Sh::XS + cp);
      float out[P];
#pragma unroll
      for (int e = 0; e < P; ++e) out[e] = part[tl * Sh::PS + cp + e] + xc_s[tl] * to_math(xv.v[e]);
      if (a.g) {
        const float h = a.H[t * a.n + i];
        const Pack<S> gv = load_pack(a.g + t * a.C + c);
#pragma unroll
        for (int e = 0; e < P; ++e) out[e] += h * to_math(gv.v[e]);
      }
      if (a.accum) {
        const Pack<S> av = load_pack_stream(a.accum + t * nC + col);
#pragma unroll
        for (int e = 0; e < P; ++e) out[e] += to_math(av.v[e]);
      }
      Pack<S> o;
#pragma unroll
      for (int e = 0; e < P; ++e) o.v[e] = from_math<S>(out[e]);
      store_pack(a.grad_x + t * nC + col, o);
    }
    __syncthreads();  // x tile, DP tile and staging are reused by the next tile
    buf ^= 1;
  }

  // this chunk's grad_fn partial of the block's columns
#pragma unroll
  for (int mj = 0; mj < Sh::MJ; ++mj)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int64_t col = col0 + nb + nt * 8 + 2 * tq;
      if (col >= nC) continue;
      const int j0 = mj * 16 + g;
      if (j0 < MR)
        *reinterpret_cast<float2*>(a.GF + (int64_t(chunk) * MR + j0) * nC + col) = make_float2(gf[mj][nt][0], gf[mj][nt][1]);
      if (j0 + 8 < MR)
        *reinterpret_cast<float2*>(a.GF + (int64_t(chunk) * MR + j0 + 8) * nC + col) =
            make_float2(gf[mj][nt][2], gf[mj][nt][3]);
    }
}

// ---- C, version 4 -------------------------------------------------------------------------------------------
// Same math and split as grad_x_fn_mma; what changes is how the bytes arrive (docs/cuda_notes.md, pre backward
// stage C v4): v2 is latency-bound (one 32-token x tile in flight per block, DP and g / accum loaded synchronously
// inside the tile, 256-byte runs per token row; v3, the same with everything prefetched at 2 blocks per SM, put
// its 384 blocks into 1.5 waves). v4:
//   - a ring of kStages tiles of 16 tokens: x, g, accum, DP, h and XC of a tile are all cp.async copies issued
//     kStages - 1 tiles ahead, so every byte a tile needs is in shared memory before it starts and no load
//     waits inside a tile (up to 2 x 24 KB in flight per block at n = 4, 2 blocks per SM);
//   - 256 columns per block for n <= 4 (512-byte runs per token row), 128 for n = 8 (registers: fn and the
//     grad_fn partials of 80 rows); kWide (v4-wide): 512 threads, twice the columns, one block per SM;
//   - one wave: token chunks = resident slots / column blocks, so no block waits for a second wave;
//   - blocks of the same channels of the n streams adjacent in launch order (one g row serves n blocks from L2).
// kLean (v5, MHC_CUDA_PRE_BWD=v5): one block barrier per tile instead of three. ncu found v4 latency-bound (58 % of
// cycles with no eligible warp, 0.66 eligible warps a scheduler): every tile waits at a barrier for the block's DP
// fragments and at another for the staged DP . fn. In v5 each warp splits the DP fragments it needs itself (16
// fragment words a lane at n = 4, from shared memory), and the epilogue runs in the mma's output layout (a lane
// finishes the 2 x 2 elements of each 8-column tile it accumulated, reading x, g and accum from the stage), so
// nothing is staged between warps; the freed shared memory (no `part`, no fragments) buys a fourth stage at n <= 4.
template <int MR, bool kWide, bool kLean = false> struct V4Geom {
  static constexpr int kThreads = kWide ? 512 : 256, kWarps = kThreads / 32;
  static constexpr int kBlocksPerSm = v4_blocks_per_sm(kWide);
  static constexpr int N = MR == 8 ? 2 : MR == 24 ? 4 : 8;  // streams: m = n^2 + 2n
  static constexpr int MP = (MR + 15) / 16 * 16;  // rows of fn padded to the mma granularity
  static constexpr int KS = MP / 16;              // k steps of DP . fn = row tiles of DP^T . x
  static constexpr int W = v4_cols(MR, kWide);    // columns of x ([T, nC]) per block
  static constexpr int TT = kV4Tokens;            // tokens per tile (one m tile of DP . fn, one k step of DP^T . x)
  static constexpr int kStages = MR <= 24 ? (kLean ? 4 : 3) : 4;
  static constexpr int WC = W / kWarps;           // columns per warp
  static constexpr int NT = WC / 8;               // 8-column mma tiles per warp
  static constexpr int PR = W / 8;                // 16-byte packs per tile row
  static constexpr int PPT = TT * PR / kThreads;  // packs per thread per tile (per stream tensor)
  static constexpr int XS = W + 8;                // x row stride (elements): ldmatrix rows 16 bytes apart mod 128
  static constexpr int SD = MP + 4;               // DP row stride (floats): conflict-free DP^T fragment reads
  static constexpr int PS = W + 8;                // staged DP . fn row stride (floats): conflict-free float2 stores
  static constexpr int HS = 8;                    // h row stride (floats), n <= 8
  // g and accum row stride (elements): v5 reads them in the mma output layout, 4 bytes a lane, conflict-free as x
  static constexpr int GS = kLean ? W + 8 : W;
  // one ring stage, byte offsets
  static constexpr int kX = 0, kG = kX + TT * XS * 2, kA = kG + TT * GS * 2, kDP = kA + TT * GS * 2,
                       kH = kDP + TT * SD * 4, kXC = kH + TT * HS * 4, kStage = kXC + TT * 4;
  static constexpr int kPart = kStages * kStage;
  // DP of the current tile as bf16 hi / lo mma A fragments, [layout][k step][lane] 16 bytes each:
  // layout 0 = A of DP . fn (rows = tokens), layout 1 = A of DP^T . x (rows = j); v5 has neither these nor `part`
  static constexpr int kFragH = kPart + TT * PS * 4, kFragL = kFragH + 2 * KS * 32 * 16;
  static constexpr int kSmem = kLean ? kPart : kFragL + 2 * KS * 32 * 16;
  static_assert(NT % 2 == 0 && PPT >= 1 && TT * PR % kThreads == 0 && kThreads % PR == 0, "v4 geometry");
  static_assert(!kLean || !kWide, "v5 has the 256-thread geometry");
  static_assert(N * N + 2 * N == MR && N <= HS, "n in {2, 4, 8}");
  static_assert(MR % 4 == 0 && kStage % 16 == 0, "16-byte copies of DP rows and stages");
  static_assert(kBlocksPerSm * (kSmem + 1024) <= 228 * 1024, "shared memory of the resident blocks");
};

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
}

// The bf16 hi / lo A fragment words of DP (the tile in shared memory, row stride SD floats) that lane `ln` holds for
// k step (or row tile) idx: layout 0 = A of DP . fn (rows = tokens, k = j), 1 = A of DP^T . x (rows = j, k = tokens).
template <int SD>
__device__ __forceinline__ void dp_fragment(const float* dps, int layout, int idx, int ln, uint4& hi, uint4& lo) {
  const int gq = ln >> 2, tl4 = ln & 3;
  float2 v[4];
  if (layout == 0) {
    const float* r0 = dps + gq * SD + idx * 16 + 2 * tl4;
    const float* r1 = r0 + 8 * SD;
    v[0] = *reinterpret_cast<const float2*>(r0);
    v[1] = *reinterpret_cast<const float2*>(r1);
    v[2] = *reinterpret_cast<const float2*>(r0 + 8);
    v[3] = *reinterpret_cast<const float2*>(r1 + 8);
  } else {
    const int j0 = idx * 16 + gq, k0 = 2 * tl4;
    v[0] = make_float2(dps[k0 * SD + j0], dps[(k0 + 1) * SD + j0]);
    v[1] = make_float2(dps[k0 * SD + j0 + 8], dps[(k0 + 1) * SD + j0 + 8]);
    v[2] = make_float2(dps[(k0 + 8) * SD + j0], dps[(k0 + 9) * SD + j0]);
    v[3] = make_float2(dps[(k0 + 8) * SD + j0 + 8], dps[(k0 + 9) * SD + j0 + 8]);
  }
  split_pair<__nv_bfloat16>(v[0], hi.x, lo.x);
  split_pair<__nv_bfloat16>(v[1], hi.y, lo.y);
  split_pair<__nv_bfloat16>(v[2], hi.z, lo.z);
  split_pair<__nv_bfloat16>(v[3], hi.w, lo.w);
}

template <int MR, bool kWide, bool kLean>
__global__ void __launch_bounds__(V4Geom<MR, kWide, kLean>::kThreads, V4Geom<MR, kWide, kLean>::kBlocksPerSm)
    grad_x_fn_v4(const GradXArgs<__nv_bfloat16> a) {
  using S = __nv_bfloat16;
  using G = V4Geom<MR, kWide, kLean>;
  extern __shared__ __align__(16) unsigned char smem[];
  float* part = reinterpret_cast<float*>(smem + G::kPart);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g8 = lane >> 2, tq = lane & 3;
  constexpr int n = G::N;
  const int64_t C = a.C, nC = int64_t(n) * C;

  // -- where this block works: columns [col0, col0 + W) of x viewed as [T, nC], tokens [t_begin, t_end).
  // With W | C the n blocks of one channel range (one per stream) are consecutive in blockIdx.x.
  int64_t col0;
  if (C % G::W == 0) {
    const int64_t b = blockIdx.x;
    col0 = (b % n) * C + (b / n) * G::W;
  } else {
    col0 = int64_t(blockIdx.x) * G::W;
  }
  const int64_t per_chunk = ((a.T + a.chunks - 1) / a.chunks + G::TT - 1) / G::TT * G::TT;
  const int64_t t_begin = std::min<int64_t>(a.T, blockIdx.y * per_chunk);
  const int64_t t_end = std::min<int64_t>(a.T, t_begin + per_chunk);
  const int tiles = static_cast<int>((t_end - t_begin + G::TT - 1) / G::TT);

  // -- this thread's pack of every tile row it copies and finishes: the same 8 columns for every tile.
  const int pk = tid % G::PR;
  const int64_t col = col0 + pk * 8;
  const bool col_ok = col < nC;
  const int stream_i = col_ok ? static_cast<int>(col / C) : 0;
  const int64_t chan = col_ok ? col - stream_i * C : 0;

  // -- ring of tiles: tile `it` goes to stage it % kStages; one commit group per tile (empty past the end).
  auto issue = [&](int it) {
    if (it < tiles) {
      unsigned char* st = smem + (it % G::kStages) * G::kStage;
      S* xs = reinterpret_cast<S*>(st + G::kX);
      S* gs = reinterpret_cast<S*>(st + G::kG);
      S* as = reinterpret_cast<S*>(st + G::kA);
      float* dps = reinterpret_cast<float*>(st + G::kDP);
      float* hs = reinterpret_cast<float*>(st + G::kH);
      float* xcs = reinterpret_cast<float*>(st + G::kXC);
      const int64_t tb = t_begin + int64_t(it) * G::TT;
#pragma unroll
      for (int r = 0; r < G::PPT; ++r) {
        const int tl = (tid + r * G::kThreads) / G::PR;
        const int64_t t = tb + tl;
        const bool ok = col_ok && t < t_end;
        cp_async16(xs + tl * G::XS + pk * 8, ok ? a.x + t * nC + col : a.x, ok);
        if (a.g) cp_async16(gs + tl * G::GS + pk * 8, ok ? a.g + t * C + chan : a.g, ok);
        if (a.accum) cp_async16(as + tl * G::GS + pk * 8, ok ? a.accum + t * nC + col : a.accum, ok);
      }
      for (int q = tid; q < G::TT * (MR / 4); q += G::kThreads) {
        const int tl = q / (MR / 4), c4 = q % (MR / 4);
        const bool ok = tb + tl < t_end;
        cp_async16(dps + tl * G::SD + c4 * 4, ok ? a.DP + (tb + tl) * MR + c4 * 4 : a.DP, ok);
      }
      if (a.g)
        for (int q = tid; q < G::TT * n; q += G::kThreads) {
          const int tl = q / n, i = q % n;
          const bool ok = tb + tl < t_end;
          cp_async4(hs + tl * G::HS + i, ok ? a.H + (tb + tl) * n + i : a.H, ok);
        }
      for (int q = tid; q < G::TT; q += G::kThreads) {
        const bool ok = tb + q < t_end;
        cp_async4(xcs + q, ok ? a.XC + tb + q : a.XC, ok);
      }
    }
    cp_async_commit();
  };

  // -- prologue: the first kStages - 1 tiles in flight before anything else.
#pragma unroll
  for (int s = 0; s < G::kStages - 1; ++s) issue(s);

  // Padded DP columns [MR, MP) of every stage: never copied, zero for the whole kernel.
  if constexpr (G::MP > MR)
    for (int q = tid; q < G::kStages * G::TT * (G::MP - MR); q += G::kThreads) {
      const int s = q / (G::TT * (G::MP - MR)), r = q % (G::TT * (G::MP - MR));
      reinterpret_cast<float*>(smem + s * G::kStage + G::kDP)[(r / (G::MP - MR)) * G::SD + MR + r % (G::MP - MR)] = 0.f;
    }

  // -- fn fragments of DP . fn (B[k = j][n = column], hi + lo), resident for the whole chunk; grad_fn partials.
  const int nb = warp * G::WC;
  std::uint32_t fh[G::KS][G::NT][2], fl[G::KS][G::NT][2];
#pragma unroll
  for (int ks = 0; ks < G::KS; ++ks)
#pragma unroll
    for (int nt = 0; nt < G::NT; ++nt) {
      const int64_t c = col0 + nb + nt * 8 + g8;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = ks * 16 + 2 * tq + h * 8;
        const float f0 = j < MR && c < nC ? a.fn[j * nC + c] : 0.f;
        const float f1 = j + 1 < MR && c < nC ? a.fn[(j + 1) * nC + c] : 0.f;
        split_pair<S>(make_float2(f0, f1), fh[ks][nt][h], fl[ks][nt][h]);
      }
    }
  // v5: the stream of each of the lane's 8-column tiles (h's column in the epilogue)
  int lean_stream[G::NT];
#pragma unroll
  for (int nt = 0; nt < G::NT; ++nt) {
    const int64_t c = col0 + nb + nt * 8;
    lean_stream[nt] = c < nC ? static_cast<int>(c / C) : 0;
  }
  float gf[G::KS][G::NT][4];
#pragma unroll
  for (int mj = 0; mj < G::KS; ++mj)
#pragma unroll
    for (int nt = 0; nt < G::NT; ++nt) gf[mj][nt][0] = gf[mj][nt][1] = gf[mj][nt][2] = gf[mj][nt][3] = 0.f;

  for (int it = 0; it < tiles; ++it) {
    // -- wait for tile it; the barrier also says every thread is done with tile it - 1 (its stage, `part`, the
    // fragments).
    cp_async_wait<G::kStages - 2>();
    __syncthreads();
    issue(it + G::kStages - 1);
    const unsigned char* st = smem + (it % G::kStages) * G::kStage;
    const S* xs = reinterpret_cast<const S*>(st + G::kX);
    const float* dps = reinterpret_cast<const float*>(st + G::kDP);
    const S* gs = reinterpret_cast<const S*>(st + G::kG);
    const S* as = reinterpret_cast<const S*>(st + G::kA);
    const float* hs = reinterpret_cast<const float*>(st + G::kH);
    const float* xcs = reinterpret_cast<const float*>(st + G::kXC);
    const int64_t tb = t_begin + int64_t(it) * G::TT;  // the tile's first token
    uint4* frag_h = reinterpret_cast<uint4*>(smem + G::kFragH);
    uint4* frag_l = reinterpret_cast<uint4*>(smem + G::kFragL);

    // -- DP split into bf16 hi + lo A fragments once per block (not once per warp): fragment q is what lane
    // q % 32 holds for k step (q / 32) % KS of layout q / (32 KS), as the per-warp code of v2 computes it.
    // (v5: each warp splits its own, below, with no barrier.)
    if constexpr (!kLean) {
      for (int q = tid; q < 2 * G::KS * 32; q += G::kThreads)
        dp_fragment<G::SD>(dps, q / (32 * G::KS), (q >> 5) % G::KS, q & 31, frag_h[q], frag_l[q]);
      __syncthreads();  // fragments complete
    }
    auto fragment = [&](int layout, int idx, uint4& h4, uint4& l4) {
      if constexpr (kLean) {
        dp_fragment<G::SD>(dps, layout, idx, lane, h4, l4);
      } else {
        h4 = frag_h[(layout * G::KS + idx) * 32 + lane];
        l4 = frag_l[(layout * G::KS + idx) * 32 + lane];
      }
    };

    // -- DP . fn for the tile's 16 tokens x the warp's columns (3 mma: fp32-level), staged for the epilogue.
    {
      float d[G::NT][4];
#pragma unroll
      for (int nt = 0; nt < G::NT; ++nt) d[nt][0] = d[nt][1] = d[nt][2] = d[nt][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < G::KS; ++ks) {
        uint4 h4, l4;
        fragment(0, ks, h4, l4);
        const std::uint32_t ah[4] = {h4.x, h4.y, h4.z, h4.w}, al[4] = {l4.x, l4.y, l4.z, l4.w};
#pragma unroll
        for (int nt = 0; nt < G::NT; ++nt) {
          mma_16816<S>(d[nt], al, fh[ks][nt]);
          mma_16816<S>(d[nt], ah, fl[ks][nt]);
          mma_16816<S>(d[nt], ah, fh[ks][nt]);
        }
      }
      if constexpr (!kLean) {
#pragma unroll
        for (int nt = 0; nt < G::NT; ++nt) {
          const int c = nb + nt * 8 + 2 * tq;
          *reinterpret_cast<float2*>(part + g8 * G::PS + c) = make_float2(d[nt][0], d[nt][1]);
          *reinterpret_cast<float2*>(part + (g8 + 8) * G::PS + c) = make_float2(d[nt][2], d[nt][3]);
        }
      } else {
        // -- v5 epilogue, in the mma's output layout: rows g8, g8 + 8, columns nb + 8 nt + 2 tq (+1). The same terms
        // in the same order as v4's epilogue: DP . fn + XC x + h g (+ accum).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int tl = g8 + 8 * r;
          const int64_t t = tb + tl;
          if (t >= t_end) continue;
          const float xc = xcs[tl];
#pragma unroll
          for (int nt = 0; nt < G::NT; ++nt) {
            const int c = nb + nt * 8 + 2 * tq;
            if (col0 + c >= nC) continue;
            const __nv_bfloat162 xv = *reinterpret_cast<const __nv_bfloat162*>(xs + tl * G::XS + c);
            float o0 = d[nt][2 * r] + xc * __low2float(xv), o1 = d[nt][2 * r + 1] + xc * __high2float(xv);
            if (a.g) {
              const float h = hs[tl * G::HS + lean_stream[nt]];
              const __nv_bfloat162 gv = *reinterpret_cast<const __nv_bfloat162*>(gs + tl * G::GS + c);
              o0 += h * __low2float(gv);
              o1 += h * __high2float(gv);
            }
            if (a.accum) {
              const __nv_bfloat162 av = *reinterpret_cast<const __nv_bfloat162*>(as + tl * G::GS + c);
              o0 += __low2float(av);
              o1 += __high2float(av);
            }
            const __nv_bfloat162 o = __halves2bfloat162(from_math<S>(o0), from_math<S>(o1));
            __stcs(reinterpret_cast<unsigned*>(a.grad_x + t * nC + col0 + c), *reinterpret_cast<const unsigned*>(&o));
          }
        }
      }
    }

    // -- grad_fn += DP^T . x (A[row = j][k = token] from the DP tile, hi + lo; B = x exact, transposing load).
    {
      std::uint32_t bx[G::NT][2];
#pragma unroll
      for (int np = 0; np < G::NT / 2; ++np) {
        std::uint32_t r[4];
        ldmatrix_x4_trans(r, xs + (lane & 15) * G::XS + nb + np * 16 + (lane >> 4) * 8);
        bx[2 * np][0] = r[0];
        bx[2 * np][1] = r[1];
        bx[2 * np + 1][0] = r[2];
        bx[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mj = 0; mj < G::KS; ++mj) {
        uint4 h4, l4;
        fragment(1, mj, h4, l4);
        const std::uint32_t ah[4] = {h4.x, h4.y, h4.z, h4.w}, al[4] = {l4.x, l4.y, l4.z, l4.w};
#pragma unroll
        for (int nt = 0; nt < G::NT; ++nt) {
          mma_16816<S>(gf[mj][nt], al, bx[nt]);
          mma_16816<S>(gf[mj][nt], ah, bx[nt]);
        }
      }
    }
    if constexpr (!kLean) __syncthreads();  // `part` complete

    // -- epilogue: grad_x = DP . fn + XC x + h g (+ accum), every operand already in shared memory (v5: above).
    if constexpr (!kLean) {
#pragma unroll
      for (int r = 0; r < G::PPT; ++r) {
        const int tl = (tid + r * G::kThreads) / G::PR;
        const int64_t t = tb + tl;
        if (!col_ok || t >= t_end) continue;
        const Pack<S> xv = *reinterpret_cast<const Pack<S>*>(xs + tl * G::XS + pk * 8);
        const float4 p0 = *reinterpret_cast<const float4*>(part + tl * G::PS + pk * 8);
        const float4 p1 = *reinterpret_cast<const float4*>(part + tl * G::PS + pk * 8 + 4);
        float out[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
        const float xc = xcs[tl];
#pragma unroll
        for (int e = 0; e < 8; ++e) out[e] += xc * to_math(xv.v[e]);
        if (a.g) {
          const float h = hs[tl * G::HS + stream_i];
          const Pack<S> gv = *reinterpret_cast<const Pack<S>*>(gs + tl * G::GS + pk * 8);
#pragma unroll
          for (int e = 0; e < 8; ++e) out[e] += h * to_math(gv.v[e]);
        }
        if (a.accum) {
          const Pack<S> av = *reinterpret_cast<const Pack<S>*>(as + tl * G::GS + pk * 8);
#pragma unroll
          for (int e = 0; e < 8; ++e) out[e] += to_math(av.v[e]);
        }
        Pack<S> o;
#pragma unroll
        for (int e = 0; e < 8; ++e) o.v[e] = from_math<S>(out[e]);
        __stcs(reinterpret_cast<uint4*>(a.grad_x + t * nC + col), *reinterpret_cast<const uint4*>(&o));
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; leave none behind

  // -- this chunk's grad_fn partial of the block's columns (written even for an empty chunk: zeros).
#pragma unroll
  for (int mj = 0; mj < G::KS; ++mj)
#pragma unroll
    for (int nt = 0; nt < G::NT; ++nt) {
      const int64_t c = col0 + nb + nt * 8 + 2 * tq;
      if (c >= nC) continue;
      const int j0 = mj * 16 + g8;
      float* out = a.GF + int64_t(blockIdx.y) * MR * nC + c;
      if (j0 < MR) *reinterpret_cast<float2*>(out + j0 * nC) = make_float2(gf[mj][nt][0], gf[mj][nt][1]);
      if (j0 + 8 < MR) *reinterpret_cast<float2*>(out + (j0 + 8) * nC) = make_float2(gf[mj][nt][2], gf[mj][nt][3]);
    }
}

// Static mode (no fn), v4: grad_x = h g (+ accum) in 16-byte packs; v2 runs grad_x_generic (one element per
// thread, 64-bit index arithmetic per element). Block-stride over token rows of one stream, packs over C.
template <class S>
__global__ void __launch_bounds__(256) grad_x_static_packed(const GradXArgs<S> a) {
  constexpr int P = kPack<S>;
  const int64_t C = a.C, rows = a.T * a.n;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t t = row / a.n;
    const float h = a.g ? a.H[row] : 0.f;  // H is [T, n]: row = t * n + i
    const S* gr = a.g ? a.g + t * C : nullptr;
    const S* ar = a.accum ? a.accum + row * C : nullptr;
    S* out = a.grad_x + row * C;
    for (int64_t c = int64_t(threadIdx.x) * P; c < C; c += int64_t(blockDim.x) * P) {
      float v[P];
#pragma unroll
      for (int e = 0; e < P; ++e) v[e] = 0.f;
      if (ar) {
        const Pack<S> av = load_pack_stream(ar + c);
#pragma unroll
        for (int e = 0; e < P; ++e) v[e] = to_math(av.v[e]);
      }
      if (gr) {
        const Pack<S> gv = load_pack(gr + c);
#pragma unroll
        for (int e = 0; e < P; ++e) v[e] += h * to_math(gv.v[e]);
      }
      Pack<S> o;
#pragma unroll
      for (int e = 0; e < P; ++e) o.v[e] = from_math<S>(v[e]);
      store_pack(out + c, o);
    }
  }
}

// Any m and dtype: one thread per element of grad_x.
template <class S>
__global__ void grad_x_generic(const GradXArgs<S> a) {
  using M = math_t<S>;
  const int64_t nC = a.n * a.C;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < a.T * nC; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = q / nC, k = q % nC;
    const int i = static_cast<int>(k / a.C);
    const int64_t c = k % a.C;
    M gx = a.accum ? to_math(a.accum[q]) : M(0);
    if (a.g) gx += a.H[t * a.n + i] * to_math(a.g[t * a.C + c]);
    if (a.fn) {
      gx += a.XC[t] * to_math(a.x[q]);
      for (int j = 0; j < a.m; ++j) gx += a.DP[t * a.m + j] * a.fn[j * nC + k];
    }
    a.grad_x[q] = from_math<S>(gx);
  }
}

// Any m and dtype: GF[chunk, j, k] = sum over the chunk's tokens of DP[t, j] x[t, k].
template <class S>
__global__ void grad_fn_generic(const GradXArgs<S> a) {
  using M = math_t<S>;
  const int64_t nC = a.n * a.C;
  const int64_t per_chunk = (a.T + a.chunks - 1) / a.chunks;
  const int64_t total = int64_t(a.chunks) * a.m * nC;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < total; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t chunk = q / (a.m * nC), j = (q / nC) % a.m, k = q % nC;
    const int64_t t_end = std::min<int64_t>(a.T, (chunk + 1) * per_chunk);
    M acc = 0;
    for (int64_t t = chunk * per_chunk; t < t_end; ++t) acc += a.DP[t * a.m + j] * to_math(a.x[t * nC + k]);
    a.GF[q] = acc;
  }
}

// ---- D. fixed-order reductions --------------------------------------------------------------------------
template <class M>
__global__ void reduce_chunks(const M* __restrict__ GF, M* __restrict__ grad_fn, int chunks, int64_t count) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < count; q += int64_t(gridDim.x) * blockDim.x) {
    M acc = 0;
    for (int p = 0; p < chunks; ++p) acc += GF[p * count + q];
    grad_fn[q] = acc;
  }
}

// Block b sums column b of src [T, cols] over tokens: grad_base (src = DL) and grad_scale (src = SC).
// Eight independent partial sums a thread, added in a fixed order: with one, its loads formed a serial chain
// (14.8 us a call at 8192 tokens on the H200, two calls a site).
template <class M>
__global__ void reduce_tokens(const M* __restrict__ src, int cols, int64_t T, M* __restrict__ out, int out_count) {
  constexpr int U = 8;
  __shared__ M scratch[32];
  for (int col = blockIdx.x; col < out_count; col += gridDim.x) {
    M part[U] = {};
    for (int64_t t0 = threadIdx.x; t0 < T; t0 += int64_t(blockDim.x) * U)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t t = t0 + int64_t(u) * blockDim.x;
        if (t < T) part[u] += src[t * cols + col];
      }
    M acc[1] = {((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))};
    block_sum<1>(acc, scratch);
    if (threadIdx.x == 0) out[col] = acc[0];
  }
}

// MHC_CUDA_PATH=generic also routes stage C to the fp32 FMA kernels (tests compare both).
bool grad_generic_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("MHC_CUDA_PATH");
    return v && std::string(v) == "generic";
  }();
  return forced;
}

// ---- driver shared by pre and head -------------------------------------------------------------------------
struct BackwardIo {
  const TensorView *x, *fn, *base, *scale, *mixes, *rstd;
  const TensorView *g;           // grad_layer_input / grad_out
  const TensorView *g_h;         // grad_h_pre / grad_weights
  const TensorView *g_post;      // pre only
  const TensorView *g_comb;      // pre only
  const TensorView *accum;       // pre only
  const TensorView *grad_x, *grad_fn, *grad_base, *grad_scale, *workspace;
};

// ---- stage C launch policy ---------------------------------------------------------------------------------

// v4 of stage C where it applies (pre, MHC_CUDA_PRE_BWD=v4 or v4-wide): bf16 streams with n in {2, 4, 8}, C a multiple
// of 8 and 16-byte aligned data; static mode for any 16-bit or f32 streams in packs. Returns false, having
// launched nothing, otherwise (the caller runs v2). Sets ga.chunks to the chunks it wrote.
template <class S>
bool stage_c_v4(GradXArgs<S>& ga, const BackwardIo& io, const BackwardLayout& L, BwdVersion version,
                cudaStream_t stream) {
  const bool wide = version == BwdVersion::v4_wide, lean = version == BwdVersion::v5;
  if (grad_generic_forced()) return false;
  const int64_t C = L.C, nC = L.n * L.C;
  const bool accum_ok = !io.accum || aligned16({io.accum});
  if (!io.fn->present()) {
    if constexpr (std::is_same_v<S, double>) {
      return false;
    } else {
      if (C % kPack<S> != 0 || !accum_ok || !aligned16({io.g, io.grad_x})) return false;
      const int64_t rows = L.T * L.n;
      const int threads = static_cast<int>(std::clamp<int64_t>((C / kPack<S> + 31) / 32 * 32, 32, 256));
      const unsigned blocks =
          static_cast<unsigned>(std::min<int64_t>(rows, int64_t(current_device_info().sm_count) * 64));
      grad_x_static_packed<S><<<blocks, threads, 0, stream>>>(ga);
      MHC_CUDA_CHECK_LAUNCH();
      return true;
    }
  }
  if constexpr (!std::is_same_v<S, __nv_bfloat16>) {
    return false;
  } else {
    const int64_t chunks = wide ? L.chunks_v4w : L.chunks_v4;
    if (!v4_rows(L.m) || C % 8 != 0 || !accum_ok || !aligned16({io.x, io.g, io.grad_x, io.workspace}) || chunks < 1)
      return false;
    ga.chunks = static_cast<int>(chunks);
    auto launch = [&](auto mr_tag, auto wide_tag, auto lean_tag) {
      constexpr int MR = decltype(mr_tag)::value;
      constexpr bool kWide = decltype(wide_tag)::value, kLean = decltype(lean_tag)::value;
      using G = V4Geom<MR, kWide, kLean>;
      const auto kernel = &grad_x_fn_v4<MR, kWide, kLean>;
      // The largest shared-memory carveout: v4's resident blocks need it (2 x 105 KB at n = 4).
      allow_dynamic_smem(kernel, std::size_t(G::kSmem), /*prefer_max_shared=*/true);
      const dim3 grid(static_cast<unsigned>((nC + G::W - 1) / G::W), static_cast<unsigned>(ga.chunks));
      kernel<<<grid, G::kThreads, G::kSmem, stream>>>(ga);
      MHC_CUDA_CHECK_LAUNCH();
    };
    auto by_rows = [&](auto wide_tag, auto lean_tag) {
      using std::integral_constant;
      if (L.m == 8) launch(integral_constant<int, 8>{}, wide_tag, lean_tag);
      else if (L.m == 24) launch(integral_constant<int, 24>{}, wide_tag, lean_tag);
      else launch(integral_constant<int, 80>{}, wide_tag, lean_tag);
    };
    if (wide) by_rows(std::true_type{}, std::false_type{});
    else if (lean) by_rows(std::false_type{}, std::true_type{});
    else by_rows(std::false_type{}, std::false_type{});
    return true;
  }
}

template <Site kSite>
BackwardLayout layout_for(const TensorView& x, const TensorView& fn, const MhcConfig& cfg) {
  const int64_t T = x.shape[0], n = x.shape[1], C = x.shape[2];
  const int64_t m = kSite == Site::pre ? n * n + 2 * n : n;
  return backward_layout(T, n, C, m, fn.present(), kSite == Site::pre, cfg.iters, x.dtype);
}

template <Site kSite, class S>
void run_backward(const BackwardIo& io, const MhcConfig& cfg, cudaStream_t stream) {
  using M = math_t<S>;
  const BackwardLayout L = layout_for<kSite>(*io.x, *io.fn, cfg);
  const int64_t T = L.T, C = L.C, nC = L.n * L.C;
  const int n = static_cast<int>(L.n), m = static_cast<int>(L.m);
  const bool has_fn = io.fn->present();
  void* ws = io.workspace->data;
  const S* x = io.x->ptr<const S>();
  const S* g = data_or_null<const S>(*io.g);
  constexpr bool kFloat = !std::is_same_v<S, double>;
  const bool packed = kFloat && C % kPack<S> == 0 && aligned16({io.x, io.g});

  // A. dots of the upstream gradient with every stream
  M* U = g ? at<M>(ws, L.U) : nullptr;
  if (g) {
    bool done = false;
    if constexpr (kFloat) {
      if (packed)
        dispatch_streams(n, [&](auto nc) {
          constexpr int N = decltype(nc)::value;
          if constexpr (N > 0) {
            const int threads = static_cast<int>(std::clamp<int64_t>((C / kPack<S> + 31) / 32 * 32, 32, 256));
            stream_dots_packed<S, N><<<token_grid(T), threads, 0, stream>>>(g, x, U, T, C);
            MHC_CUDA_CHECK_LAUNCH();
            done = true;
          }
        });
    }
    if (!done) {
      stream_dots_generic<S><<<grid_for(T * n * 32, 256), 256, 0, stream>>>(g, x, U, T, n, C);
      MHC_CUDA_CHECK_LAUNCH();
    }
  }

  // B. coefficient backward
  CoefBackwardArgs<M> ca{};
  ca.mixes = io.mixes->ptr<const M>();
  ca.rstd = io.rstd->ptr<const M>();
  ca.base = io.base->ptr<const M>();
  ca.scale = data_or_null<const M>(*io.scale);
  ca.g_h = data_or_null<const M>(*io.g_h);
  ca.g_post = io.g_post ? data_or_null<const M>(*io.g_post) : nullptr;
  ca.g_comb = io.g_comb ? data_or_null<const M>(*io.g_comb) : nullptr;
  ca.U = U;
  ca.DL = at<M>(ws, L.DL);
  ca.DP = has_fn ? at<M>(ws, L.DP) : nullptr;
  ca.XC = has_fn ? at<M>(ws, L.XC) : nullptr;
  ca.H = at<M>(ws, L.H);
  ca.SC = at<M>(ws, L.SC);
  ca.DIV = at<M>(ws, L.DIV);
  ca.T = T;
  ca.n = n;
  ca.m = m;
  ca.nC = nC;
  ca.k = site_consts<M>(cfg);
  if constexpr (kSite == Site::head) {
    coef_backward_head<M><<<grid_for(T, 128), 128, 0, stream>>>(ca);
    MHC_CUDA_CHECK_LAUNCH();
  } else {
    bool done = false;
    dispatch_streams(n, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      if constexpr (N > 0) {
        coef_backward_reg<Site::pre, N, M><<<grid_for(T, 64), 64, 0, stream>>>(ca);
        MHC_CUDA_CHECK_LAUNCH();
        done = true;
      }
    });
    if (!done) {
      const std::size_t per_warp = 3 * std::size_t(n) * n * sizeof(M);
      const int warps = static_cast<int>(std::clamp<std::size_t>(32768 / per_warp, 1, 4));
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((T + warps - 1) / warps, 1 << 30));
      coef_backward_warp<M><<<blocks, warps * 32, warps * per_warp, stream>>>(ca);
      MHC_CUDA_CHECK_LAUNCH();
    }
  }

  // C. grad_x and the grad_fn partials
  GradXArgs<S> ga{};
  ga.x = x;
  ga.g = g;
  ga.accum = io.accum ? data_or_null<const S>(*io.accum) : nullptr;
  ga.grad_x = io.grad_x->ptr<S>();
  ga.fn = has_fn ? io.fn->ptr<const M>() : nullptr;
  ga.H = ca.H;
  ga.DP = ca.DP;
  ga.XC = ca.XC;
  ga.GF = has_fn ? at<M>(ws, L.GF) : nullptr;
  ga.T = T;
  ga.C = C;
  ga.n = n;
  ga.m = m;
  ga.chunks = static_cast<int>(L.chunks);
  bool fast_done = false;
  // MHC_CUDA_PRE_BWD=split / split-u4: stage C as two streaming kernels (src/cuda/pre_backward_split.cu)
  if constexpr (kSite == Site::pre && std::is_same_v<S, __nv_bfloat16>) {
    if (pre_bwd_split_requested() && !grad_generic_forced() && pre_bwd_split_shape_ok(io.x->dtype, n, C) &&
        aligned16({io.x, io.g, io.accum, io.grad_x, io.fn, io.workspace})) {
      const PreBwdSplitArgs sa{ga.x, ga.g, ga.accum, ga.grad_x, ga.fn, ga.H, ga.DP, ga.XC, ga.GF, T, C, n};
      ga.chunks = pre_bwd_split_launch(sa, stream);
      fast_done = true;
    }
  }
  if constexpr (kSite == Site::head && kFloat) {
    if (has_fn && C % kPack<S> == 0 && aligned16({io.x, io.g, io.grad_x}) && !grad_generic_forced())
      dispatch_streams(n, [&](auto nc) {
        constexpr int N = decltype(nc)::value;
        if constexpr (N > 0) {
          ga.chunks = static_cast<int>(L.chunks_head);
          const dim3 grid(static_cast<unsigned>((nC + kHeadCols<S> - 1) / kHeadCols<S>), static_cast<unsigned>(ga.chunks));
          head_grad_x_packed<S, N><<<grid, kHeadThreads, 0, stream>>>(ga);
          MHC_CUDA_CHECK_LAUNCH();
          fast_done = true;
        }
      });
  }
  if (const BwdVersion v = bwd_version(); !fast_done && kSite == Site::pre && v != BwdVersion::v2)
    fast_done = stage_c_v4<S>(ga, io, L, v, stream);
  if constexpr (std::is_same_v<S, __nv_bfloat16>) {
    const bool vec_ok = C % kPack<S> == 0 && aligned16({io.x, io.g, io.grad_x}) &&
                        (!io.accum || aligned16({io.accum})) && (reinterpret_cast<std::uintptr_t>(io.fn->data) & 7u) == 0;
    if (has_fn && vec_ok && !grad_generic_forced() && !fast_done) {
      auto launch = [&](auto mr_tag) {
        constexpr int MR = decltype(mr_tag)::value;
        const dim3 grid(static_cast<unsigned>((nC + kColsPerBlock - 1) / kColsPerBlock), static_cast<unsigned>(L.chunks));
        grad_x_fn_mma<MR><<<grid, 256, 0, stream>>>(ga);
        MHC_CUDA_CHECK_LAUNCH();
        fast_done = true;
      };
      using std::integral_constant;
      if (m == 8) launch(integral_constant<int, 8>{});
      else if (m == 24) launch(integral_constant<int, 24>{});
      else if (m == 80) launch(integral_constant<int, 80>{});
      else if (m == 4) launch(integral_constant<int, 4>{});  // head, n = 4
    }
  }
  if constexpr (kFloat) {
    if (has_fn && !fast_done) {
      auto launch = [&](auto mr_tag, auto kv_tag) {
        constexpr int MR = decltype(mr_tag)::value, KV = decltype(kv_tag)::value;
        const dim3 grid(static_cast<unsigned>((nC + 256 * KV - 1) / (256 * KV)), static_cast<unsigned>(L.chunks));
        grad_x_fn_fast<S, MR, KV><<<grid, 256, 0, stream>>>(ga);
        MHC_CUDA_CHECK_LAUNCH();
        fast_done = true;
      };
      using std::integral_constant;
      if (m == 8) launch(integral_constant<int, 8>{}, integral_constant<int, 2>{});
      else if (m == 24) launch(integral_constant<int, 24>{}, integral_constant<int, 2>{});
      else if (m == 80) launch(integral_constant<int, 80>{}, integral_constant<int, 1>{});
      else if (m == 4) launch(integral_constant<int, 4>{}, integral_constant<int, 2>{});  // head, n = 4
    }
  }
  if (!fast_done) {
    grad_x_generic<S><<<grid_for(T * nC, 256), 256, 0, stream>>>(ga);
    MHC_CUDA_CHECK_LAUNCH();
    if (has_fn) {
      grad_fn_generic<S><<<grid_for(L.chunks * m * nC, 256), 256, 0, stream>>>(ga);
      MHC_CUDA_CHECK_LAUNCH();
    }
  }

  // D. reductions
  if (has_fn) {
    reduce_chunks<M><<<grid_for(int64_t(m) * nC, 256), 256, 0, stream>>>(ga.GF, io.grad_fn->ptr<M>(), ga.chunks,
                                                                         int64_t(m) * nC);
    MHC_CUDA_CHECK_LAUNCH();
  }
  reduce_tokens<M><<<static_cast<unsigned>(m), 256, 0, stream>>>(ca.DL, m, T, io.grad_base->ptr<M>(), m);
  MHC_CUDA_CHECK_LAUNCH();
  if (io.scale->present()) {
    const int groups = kSite == Site::pre ? 3 : 1;
    reduce_tokens<M><<<static_cast<unsigned>(groups), 256, 0, stream>>>(ca.SC, 3, T, io.grad_scale->ptr<M>(),
                                                                        groups);
    MHC_CUDA_CHECK_LAUNCH();
  }
}

// Parameter gradients of an empty batch are zeros.
void zero_param_grads(const TensorView& grad_fn, const TensorView& grad_base, const TensorView& grad_scale,
                      cudaStream_t stream) {
  for (const TensorView* t : {&grad_fn, &grad_base, &grad_scale})
    if (t->present() && t->numel() > 0)
      MHC_CUDA_CHECK(cudaMemsetAsync(t->data, 0, t->numel() * dtype_size(t->dtype), stream));
}

}  // namespace

std::size_t pre_backward_workspace_bytes(const PreBackward& a, const MhcConfig& cfg, const Context&) {
  if (a.x.shape[0] == 0) return 0;
  const DeviceGuard guard(a.x.device);
  return layout_for<Site::pre>(a.x, a.fn, cfg).total;
}

std::size_t head_backward_workspace_bytes(const HeadBackward& a, const MhcConfig& cfg, const Context&) {
  if (a.x.shape[0] == 0) return 0;
  const DeviceGuard guard(a.x.device);
  return layout_for<Site::head>(a.x, a.fn, cfg).total;
}

void pre_backward(const PreBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const DeviceGuard guard(a.x.device);
  const cudaStream_t stream = stream_of(ctx);
  if (a.x.shape[0] == 0) {
    zero_param_grads(a.grad_fn, a.grad_base, a.grad_scale, stream);
    return;
  }
  const BackwardIo io{&a.x,         &a.fn,         &a.base,   &a.scale,   &a.mixes,   &a.rstd,
                      &a.grad_layer_input, &a.grad_h_pre, &a.grad_h_post, &a.grad_comb, &a.grad_x_accum,
                      &a.grad_x,    &a.grad_fn,    &a.grad_base, &a.grad_scale, &a.workspace};
  dispatch_storage(a.x.dtype, [&](auto tag) { run_backward<Site::pre, typename decltype(tag)::type>(io, cfg, stream); });
}

void head_backward(const HeadBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const DeviceGuard guard(a.x.device);
  const cudaStream_t stream = stream_of(ctx);
  if (a.x.shape[0] == 0) {
    zero_param_grads(a.grad_fn, a.grad_base, a.grad_scale, stream);
    return;
  }
  const BackwardIo io{&a.x,      &a.fn,   &a.base,  &a.scale,      &a.mixes,     &a.rstd,
                      &a.grad_out, &a.grad_weights, nullptr, nullptr, nullptr,
                      &a.grad_x, &a.grad_fn, &a.grad_base, &a.grad_scale, &a.workspace};
  dispatch_storage(a.x.dtype,
                   [&](auto tag) { run_backward<Site::head, typename decltype(tag)::type>(io, cfg, stream); });
}

}  // namespace mhc::cuda_impl
