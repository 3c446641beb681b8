// Forward of the projection-based ops: pre, the fused post+pre, and the head.
//
// The streaming kernels of pre_stream.cu run first for 16-bit streams (MHC_CUDA_PRE selects: see
// pre_stream.hpp); the cluster kernel below takes f32 and the shapes they do not, and MHC_CUDA_PRE=cluster.
//
// Cluster path (n in {2, 4, 8}; f32/f16/bf16; rows of 16-byte packs; sm_90): one launch, one pass over x.
// A thread-block cluster of S blocks owns a tile of MT tokens; block s holds channels
// [s*cs, (s+1)*cs) of every stream of those tokens in shared memory. Each block projects its slice on
// tensor cores (bf16/f16 mma with fn split into hi + lo halves, or 3xTF32 for f32: fp32-level
// accuracy either way) and sums its squares; the S partial projections are reduced through
// distributed shared memory in a fixed order; each block then computes the coefficients (with
// Sinkhorn in registers) of the tokens it owns, the cluster exchanges h_pre, and every block
// aggregates layer_input for its own slice straight from shared memory. x is read from device
// memory once. The fused post+pre computes the x_next tile in the load phase instead of copying x.
//
// Generic path (any n, any C, f64, pre-Hopper): three launches per site, projection (block per
// token), coefficients (warp per token, Sinkhorn in shared memory) and aggregation. Without a
// workspace the projection parks the mixes in the coefficient outputs themselves
// (h_pre | h_post | comb hold exactly n*n + 2n values per token) until the coefficient kernel
// overwrites them.
#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "cuda/coefficients.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/pre_stream.hpp"
#include "cuda/sinkhorn.cuh"
#include "cuda/tuning.hpp"

namespace mhc::cuda_impl {

namespace {

using std::int64_t;

// ================================ generic path =======================================================

// The coefficient outputs of one token, seen as the m = n*n + 2n slots of its mixes.
template <class M> struct MixSlots {
  M* h_pre;   // [T, n]
  M* h_post;  // [T, n] (null for the head: m = n)
  M* comb;    // [T, n, n]
  __device__ M& operator()(int64_t t, int j, int n) const {
    if (j < n) return h_pre[t * n + j];
    if (j < 2 * n) return h_post[t * n + j - n];
    return comb[(t * n + (j - 2 * n) / n) * n + (j - 2 * n) % n];
  }
};

// mixes[t, j] = rstd(x[t]) * <x[t], fn[j]>, parked in the slots; also the optional mixes/rstd outputs.
template <class S>
__global__ void project_generic(const S* __restrict__ x, const math_t<S>* __restrict__ fn, MixSlots<math_t<S>> slots,
                                math_t<S>* mixes_out, math_t<S>* rstd_out, int64_t T, int n, int64_t C, int m,
                                math_t<S> norm_eps) {
  using M = math_t<S>;
  __shared__ M scratch[32];
  __shared__ M rstd_shared;
  const int64_t nC = n * C;
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const S* xt = x + t * nC;
    M ss[1] = {0};
    for (int64_t k = threadIdx.x; k < nC; k += blockDim.x) ss[0] += to_math(xt[k]) * to_math(xt[k]);
    block_sum<1>(ss, scratch);
    if (threadIdx.x == 0) {
      rstd_shared = rstd_from(ss[0], M(nC), norm_eps);
      if (rstd_out) rstd_out[t] = rstd_shared;
    }
    __syncthreads();
    const M rstd = rstd_shared;
    for (int j = warp; j < m; j += warps) {
      M acc = 0;
      if (fn)
        for (int64_t k = lane; k < nC; k += 32) acc += to_math(xt[k]) * fn[j * nC + k];
      acc = warp_sum(acc) * rstd;
      if (lane == 0) {
        slots(t, j, n) = acc;
        if (mixes_out) mixes_out[t * m + j] = acc;
      }
    }
    __syncthreads();
  }
}

// One warp per token: mixes (in the slots) -> h_pre, h_post, comb in place. Shared: warps * n*n.
template <class M>
__global__ void pre_coefficients_generic(MixSlots<M> slots, const M* __restrict__ base, const M* __restrict__ scale,
                                         int64_t T, int n, SiteConsts<M> k) {
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  M* p = reinterpret_cast<M*>(smem_raw) + warp * n * n;
  const M s_pre = scale_of(scale, 0), s_post = scale_of(scale, 1), s_res = scale_of(scale, 2);
  for (int64_t t = int64_t(blockIdx.x) * warps + warp; t < T; t += int64_t(gridDim.x) * warps) {
    for (int r = lane; r < n * n; r += 32) p[r] = slots(t, 2 * n + r, n) * s_res + base[2 * n + r];
    for (int i = lane; i < n; i += 32) {
      slots.h_pre[t * n + i] = sigmoid(slots.h_pre[t * n + i] * s_pre + base[i]) + k.pre_eps;
      slots.h_post[t * n + i] = sigmoid(slots.h_post[t * n + i] * s_post + base[n + i]) * k.post_mult;
    }
    __syncwarp();
    sinkhorn_forward_warp(p, n, k.eps, k.iters);
    for (int r = lane; r < n * n; r += 32) slots.comb[t * n * n + r] = p[r];
    __syncwarp();
  }
}

template <class M>
__global__ void head_weights_generic(M* __restrict__ weights, const M* __restrict__ base, const M* __restrict__ scale,
                                     int64_t T, int n, M pre_eps) {
  const M s = scale_of(scale, 0);
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < T * n; q += int64_t(gridDim.x) * blockDim.x)
    weights[q] = sigmoid(weights[q] * s + base[q % n]) + pre_eps;
}

// out[t, c] = sum_i w[t, i] * x[t, i, c]
template <class S>
__global__ void aggregate_generic(const S* __restrict__ x, const math_t<S>* __restrict__ w, S* __restrict__ out,
                                  int64_t T, int n, int64_t C) {
  using M = math_t<S>;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < T * C; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = q / C, c = q % C;
    M acc = 0;
    for (int i = 0; i < n; ++i) acc += w[t * n + i] * to_math(x[(t * n + i) * C + c]);
    out[q] = from_math<S>(acc);
  }
}


// Generic pre on x (already in device memory): projection, coefficients, aggregation.
template <class S>
void pre_generic(const S* x, const TensorView& fn, const TensorView& base, const TensorView& scale,
                 const TensorView& layer_input, const TensorView& h_pre, const TensorView& h_post,
                 const TensorView& comb, const TensorView& mixes, const TensorView& rstd, int64_t T, int n, int64_t C,
                 const MhcConfig& cfg, cudaStream_t stream) {
  using M = math_t<S>;
  const int m = n * n + 2 * n;
  const MixSlots<M> slots{h_pre.ptr<M>(), h_post.ptr<M>(), comb.ptr<M>()};
  project_generic<S><<<token_grid(T), 256, 0, stream>>>(x, data_or_null<const M>(fn), slots, data_or_null<M>(mixes),
                                                        data_or_null<M>(rstd), T, n, C, m, M(cfg.norm_eps));
  MHC_CUDA_CHECK_LAUNCH();
  const int warps = static_cast<int>(std::clamp<int64_t>(32768 / (int64_t(n) * n * sizeof(M)), 1, 8));
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((T + warps - 1) / warps, 1 << 30));
  pre_coefficients_generic<M><<<blocks, warps * 32, warps * n * n * sizeof(M), stream>>>(
      slots, base.ptr<M>(), data_or_null<const M>(scale), T, n, site_consts<M>(cfg));
  MHC_CUDA_CHECK_LAUNCH();
  aggregate_generic<S><<<grid_for(T * C, 256), 256, 0, stream>>>(x, h_pre.ptr<M>(), layer_input.ptr<S>(), T, n, C);
  MHC_CUDA_CHECK_LAUNCH();
}

// ================================ fused cluster path ================================================

// Everything the fused kernel reads and writes; pointers are device pointers.
template <class S> struct FusedArgs {
  const S* x;              // pre input [T, N, C]; for the fused post+pre: the post's x
  const S* y;              // post+pre only: [T, C]
  const float* post_h;     // post+pre only: h_post of the post [T, N]
  const float* post_comb;  // post+pre only: comb of the post [T, N, N]
  S* x_next;               // post+pre only: [T, N, C]
  const float* fn;         // [M, N*C], null in static mode
  const float* base;       // [M]
  const float* scale;      // [3], may be null
  S* layer_input;          // [T, C]
  float* h_pre;            // [T, N]
  float* h_post;           // [T, N]
  float* comb;             // [T, N, N]
  float* mixes;            // [T, M] or null
  float* rstd;             // [T] or null
  int64_t T, C;
  int cs;          // channels of every stream per block (multiple of the k chunk)
  int tok_stride;  // elements between consecutive tokens of the shared tile (padded against bank conflicts)
  int buffers;     // 2: the next tile's load overlaps this tile's work (persistent grid); 1: no prefetch
  SiteConsts<float> k;
};

constexpr int kFusedThreads = 256;
constexpr int kFusedWarps = kFusedThreads / 32;
constexpr int kMaxCluster = 16;
constexpr int kCoefWarp = kFusedWarps - 1;  // computes the owned tokens' coefficients while the rest aggregate

// Tiling of the fused kernel for N streams and a tile of MT tokens: each warp owns all m-tiles and
// NTW of the NT = M/8 column tiles of the projection, and every WK-th k chunk.
template <int N, int MT> struct FusedShape {
  static constexpr int M = N * N + 2 * N;
  static constexpr int NT = M / 8;             // 1, 3 or 10 column tiles of 8
  static constexpr int WN = N == 8 ? 2 : 1;    // warps splitting the column tiles
  static constexpr int NTW = NT / WN;          // column tiles per warp
  static constexpr int WK = kFusedWarps / WN;  // warps splitting the k chunks
  static constexpr int MTILES = MT / 16;
  static constexpr int PART = M + 1;  // projection row + sum of squares
  static_assert(NT * 8 == M && NTW * WN == NT, "projection columns must tile by 8");
  static_assert(MT <= 32, "one lane of the coefficient warp per owned token");
};

// Shared memory layout (bytes) of the fused kernel.
struct FusedSmem {
  int x_tile[2], warp_part, block_part[2], owned, hp_all, total;
};
template <class S, int N, int MT> FusedSmem fused_smem(int tok_stride, int buffers) {
  using Sh = FusedShape<N, MT>;
  FusedSmem l{};
  auto up = [](int v) { return (v + 127) / 128 * 128; };
  int off = 0;
  for (int b = 0; b < 2; ++b) {
    l.x_tile[b] = off;
    if (b < buffers) off += up(MT * tok_stride * int(sizeof(S)));
  }
  l.warp_part = off;
  off += up(Sh::WK * MT * Sh::PART * 4);
  for (int b = 0; b < 2; ++b) {
    l.block_part[b] = off;
    off += up(MT * Sh::PART * 4);
  }
  l.owned = off;
  off += up(MT * Sh::PART * 4);
  l.hp_all = off;
  off += up(MT * N * 4);
  l.total = off;
  return l;
}

template <class S> constexpr int k_chunk() { return std::is_same_v<S, float> ? 8 : 16; }

// B fragments (fn, split hi + lo) of one k chunk for the warp's NTW column tiles.
template <class S, int NTW> struct BFrag {
  std::uint32_t hi[NTW][2], lo[NTW][2];
};

template <class S, int NTW>
__device__ __forceinline__ void load_b(BFrag<S, NTW>& b, const float* fn, int64_t K, int64_t kg, int64_t c_at,
                                       int64_t C, int wn, int g, int tq) {
#pragma unroll
  for (int nt = 0; nt < NTW; ++nt) {
    const float* row = fn + int64_t((wn * NTW + nt) * 8 + g) * K + kg;
    if constexpr (std::is_same_v<S, float>) {
      const float f0 = fn && c_at + tq < C ? __ldg(row + tq) : 0.f;
      const float f1 = fn && c_at + tq + 4 < C ? __ldg(row + tq + 4) : 0.f;
      split_tf32(f0, b.hi[nt][0], b.lo[nt][0]);
      split_tf32(f1, b.hi[nt][1], b.lo[nt][1]);
    } else {
      const float2 f0 = fn && c_at + 2 * tq < C ? __ldg(reinterpret_cast<const float2*>(row + 2 * tq)) : float2{0.f, 0.f};
      const float2 f1 =
          fn && c_at + 2 * tq + 8 < C ? __ldg(reinterpret_cast<const float2*>(row + 2 * tq + 8)) : float2{0.f, 0.f};
      split_pair<S>(f0, b.hi[nt][0], b.lo[nt][0]);
      split_pair<S>(f1, b.hi[nt][1], b.lo[nt][1]);
    }
  }
}

// Q > 0: the warp's fn fragments (at most Q k chunks) stay in registers for the whole kernel.
// Q == 0: they are streamed from L2 with one chunk of prefetch.
template <class S, int N, int MT, bool kPostPrologue, int Q>
__global__ void __launch_bounds__(kFusedThreads, 1) pre_fused_kernel(const FusedArgs<S> a, const FusedSmem L) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Sh = FusedShape<N, MT>;
  constexpr int M = Sh::M, PART = Sh::PART, P = kPack<S>, KC = k_chunk<S>();
  extern __shared__ __align__(128) unsigned char smem[];
  float* warp_part = reinterpret_cast<float*>(smem + L.warp_part);
  float* owned = reinterpret_cast<float*>(smem + L.owned);
  float* hp_all = reinterpret_cast<float*>(smem + L.hp_all);

  unsigned cluster_size;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(cluster_size));
  const unsigned rank = cluster_rank();
  const int64_t clusters = gridDim.x / cluster_size, cid = blockIdx.x / cluster_size;
  const int64_t C = a.C, K = N * C, tiles = (a.T + MT - 1) / MT;
  const int cs = a.cs;
  const int64_t c_begin = int64_t(rank) * cs;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int wn = warp % Sh::WN, wk = warp / Sh::WN;
  const int packs_per_row = cs / P, chunks_per_row = cs / KC;
  const int total_chunks = N * chunks_per_row;
  // chunk kc of this block: stream kc / chunks_per_row, channels c_begin + (kc % chunks_per_row) * KC
  auto chunk_col = [&](int kc) { return c_begin + int64_t(kc % chunks_per_row) * KC; };
  auto chunk_kg = [&](int kc) { return int64_t(kc / chunks_per_row) * C + chunk_col(kc); };

  BFrag<S, Sh::NTW> resident[Q > 0 ? Q : 1];
  if constexpr (Q > 0) {
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      const int kc = wk + q * Sh::WK;
      const bool live = kc < total_chunks && chunk_col(kc) < C;
      load_b<S, Sh::NTW>(resident[q], live ? a.fn : nullptr, K, live ? chunk_kg(kc) : 0, live ? chunk_col(kc) : C, C,
                         wn, g, tq);
    }
  }

  // cp.async of one tile into buffer `buf` (zero-filled past T and C), one commit group.
  auto issue_tile = [&](int64_t tile, int buf) {
    S* xs = reinterpret_cast<S*>(smem + L.x_tile[buf]);
    const int64_t t0 = tile * MT;
    for (int q = threadIdx.x; q < MT * N * packs_per_row; q += kFusedThreads) {
      const int tl = q / (N * packs_per_row), rem = q % (N * packs_per_row);
      const int i = rem / packs_per_row, cp = (rem % packs_per_row) * P;
      const int64_t t = t0 + tl, c = c_begin + cp;
      const bool valid = t < a.T && c < C;
      cp_async16(xs + tl * a.tok_stride + i * cs + cp, valid ? a.x + (t * N + i) * C + c : a.x, valid);
    }
    cp_async_commit();
  };

  // post+pre: the tile is x_next = h_post * y + comb^T x, rounded to storage and written out.
  auto post_tile = [&](int64_t tile, int buf) {
    S* xs = reinterpret_cast<S*>(smem + L.x_tile[buf]);
    const int64_t t0 = tile * MT;
    for (int q = threadIdx.x; q < MT * packs_per_row; q += kFusedThreads) {
      const int tl = q / packs_per_row, cp = (q % packs_per_row) * P;
      const int64_t t = t0 + tl, c = c_begin + cp;
      Pack<S> out[N];
      if (t < a.T && c < C) {
        Pack<S> xp[N];
#pragma unroll
        for (int i = 0; i < N; ++i) xp[i] = load_pack_stream(a.x + (t * N + i) * C + c);
        const Pack<S> yp = load_pack_stream(a.y + t * C + c);
        float cb[N * N], hpv[N];
#pragma unroll
        for (int r = 0; r < N * N; ++r) cb[r] = __ldg(a.post_comb + t * N * N + r);
#pragma unroll
        for (int o = 0; o < N; ++o) hpv[o] = __ldg(a.post_h + t * N + o);
#pragma unroll
        for (int o = 0; o < N; ++o) {
#pragma unroll
          for (int e = 0; e < P; ++e) {
            float acc = hpv[o] * to_math(yp.v[e]);
#pragma unroll
            for (int i = 0; i < N; ++i) acc += cb[i * N + o] * to_math(xp[i].v[e]);
            out[o].v[e] = from_math<S>(acc);
          }
          store_pack(a.x_next + (t * N + o) * C + c, out[o]);
        }
      } else {
#pragma unroll
        for (int o = 0; o < N; ++o)
#pragma unroll
          for (int e = 0; e < P; ++e) out[o].v[e] = from_math<S>(0.f);
      }
#pragma unroll
      for (int o = 0; o < N; ++o) store_pack(xs + tl * a.tok_stride + o * cs + cp, out[o]);
    }
  };

  if constexpr (!kPostPrologue) {
    if (cid < tiles) issue_tile(cid, 0);
  }
  int buf = 0, parity = 0;
  for (int64_t tile = cid; tile < tiles; tile += clusters) {
    const int64_t t0 = tile * MT, next = tile + clusters;
    // ---- 1. the tile in shared memory; the next one starts loading into the other buffer
    if constexpr (!kPostPrologue) {
      if (tile != cid && a.buffers == 1) issue_tile(tile, 0);
      cp_async_wait<0>();
    } else {
      post_tile(tile, buf);
    }
    __syncthreads();
    const S* xs = reinterpret_cast<const S*>(smem + L.x_tile[buf]);

    // ---- 2. partial projection and sum of squares of this slice (tensor cores)
    float acc[Sh::MTILES][Sh::NTW][4];
    float sq[Sh::MTILES][2];
#pragma unroll
    for (int mt = 0; mt < Sh::MTILES; ++mt) {
      sq[mt][0] = sq[mt][1] = 0.f;
#pragma unroll
      for (int nt = 0; nt < Sh::NTW; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
    }
    auto mma_chunk = [&](int kc, const BFrag<S, Sh::NTW>& b) {
      const int i = kc / chunks_per_row, c0 = (kc % chunks_per_row) * KC;
#pragma unroll
      for (int mt = 0; mt < Sh::MTILES; ++mt) {
        if constexpr (std::is_same_v<S, float>) {
          // 3xTF32: x_hi*fn_hi + x_hi*fn_lo + x_lo*fn_hi
          const float* r0 = xs + (mt * 16 + g) * a.tok_stride + i * cs + c0;
          const float* r1 = r0 + 8 * a.tok_stride;
          const float v[4] = {r0[tq], r1[tq], r0[tq + 4], r1[tq + 4]};
          if (wn == 0) {
            sq[mt][0] += v[0] * v[0] + v[2] * v[2];
            sq[mt][1] += v[1] * v[1] + v[3] * v[3];
          }
          if (a.fn) {
            std::uint32_t ah[4], al[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) split_tf32(v[e], ah[e], al[e]);
#pragma unroll
            for (int nt = 0; nt < Sh::NTW; ++nt) {
              mma_1688_tf32(acc[mt][nt], al, b.hi[nt]);
              mma_1688_tf32(acc[mt][nt], ah, b.lo[nt]);
              mma_1688_tf32(acc[mt][nt], ah, b.hi[nt]);
            }
          }
        } else {
          // 16-bit x is exact; fn = hi + lo in the same 16-bit type: x*fn_lo + x*fn_hi
          std::uint32_t af[4];
          ldmatrix_x4(af, xs + (mt * 16 + (lane & 15)) * a.tok_stride + i * cs + c0 + (lane >> 4) * 8);
          if (wn == 0) {
            sq[mt][0] += sum_sq_pair<S>(af[0]) + sum_sq_pair<S>(af[2]);
            sq[mt][1] += sum_sq_pair<S>(af[1]) + sum_sq_pair<S>(af[3]);
          }
          if (a.fn) {
#pragma unroll
            for (int nt = 0; nt < Sh::NTW; ++nt) {
              mma_16816<S>(acc[mt][nt], af, b.lo[nt]);
              mma_16816<S>(acc[mt][nt], af, b.hi[nt]);
            }
          }
        }
      }
    };
    if constexpr (Q > 0) {
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const int kc = wk + q * Sh::WK;
        if (kc < total_chunks && chunk_col(kc) < C) mma_chunk(kc, resident[q]);
      }
    } else {
      BFrag<S, Sh::NTW> cur, nxt;
      int kc = wk;
      const bool first_live = kc < total_chunks && chunk_col(kc) < C;
      load_b<S, Sh::NTW>(cur, first_live ? a.fn : nullptr, K, first_live ? chunk_kg(kc) : 0, first_live ? chunk_col(kc) : C,
                         C, wn, g, tq);
#pragma unroll 1
      for (; kc < total_chunks; kc += Sh::WK) {
        const int kn = kc + Sh::WK;
        const bool live_next = kn < total_chunks && chunk_col(kn) < C;
        load_b<S, Sh::NTW>(nxt, live_next ? a.fn : nullptr, K, live_next ? chunk_kg(kn) : 0,
                           live_next ? chunk_col(kn) : C, C, wn, g, tq);
        if (chunk_col(kc) < C) mma_chunk(kc, cur);
        cur = nxt;
      }
    }

    // ---- 3. warp partials -> this block's partial (fixed order over the k-splitting warps)
    float* wp = warp_part + wk * MT * PART;
#pragma unroll
    for (int mt = 0; mt < Sh::MTILES; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sq[mt][h] += __shfl_xor_sync(0xffffffffu, sq[mt][h], 1);
        sq[mt][h] += __shfl_xor_sync(0xffffffffu, sq[mt][h], 2);
      }
#pragma unroll
      for (int nt = 0; nt < Sh::NTW; ++nt) {
        const int col = (wn * Sh::NTW + nt) * 8 + 2 * tq, row = mt * 16 + g;
        wp[row * PART + col] = acc[mt][nt][0];
        wp[row * PART + col + 1] = acc[mt][nt][1];
        wp[(row + 8) * PART + col] = acc[mt][nt][2];
        wp[(row + 8) * PART + col + 1] = acc[mt][nt][3];
      }
      if (wn == 0 && tq == 0) {
        wp[(mt * 16 + g) * PART + M] = sq[mt][0];
        wp[(mt * 16 + g + 8) * PART + M] = sq[mt][1];
      }
    }
    __syncthreads();
    float* block_part = reinterpret_cast<float*>(smem + L.block_part[parity]);
    for (int q = threadIdx.x; q < MT * PART; q += kFusedThreads) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < Sh::WK; ++w) s += warp_part[w * MT * PART + q];
      block_part[q] = s;
    }

    // ---- 4. one cluster barrier; then every block reduces, in the same fixed order, the pre
    // columns and sums of squares of all tokens (for its own aggregation) and the full rows of the
    // tokens it owns (tl % cluster_size == rank: their coefficients are its to write).
    cluster_sync();
    // The next tile's load starts only now: a barrier with release semantics would otherwise wait
    // for it, serialising the load with this tile's work instead of overlapping them.
    if constexpr (!kPostPrologue) {
      if (a.buffers == 2 && next < tiles) issue_tile(next, buf ^ 1);
    }
    const float s_pre = scale_of(a.scale, 0);
    const int owned_count = (MT - int(rank) + int(cluster_size) - 1) / int(cluster_size);
    // All peers' values are loaded before the fixed-order sum: the loads overlap instead of
    // paying the distributed-shared-memory latency once per peer.
    auto cluster_sum = [&](int offset) {
      float v[kMaxCluster];
#pragma unroll
      for (int r = 0; r < kMaxCluster; ++r)
        v[r] = r < int(cluster_size) ? cluster_peer(block_part, unsigned(r))[offset] : 0.f;
      float s = 0.f;
#pragma unroll
      for (int r = 0; r < kMaxCluster; ++r) s += v[r];
      return s;
    };
    for (int q = threadIdx.x; q < MT * (N + 1); q += kFusedThreads) {
      const int tl = q / (N + 1), j = q % (N + 1);
      const int col = j < N ? j : M;
      owned[tl * PART + col] = cluster_sum(tl * PART + col);  // every token: pre columns, sum of squares
    }
    __syncthreads();
    for (int q = threadIdx.x; q < MT * N; q += kFusedThreads) {
      const int tl = q / N, i = q % N;
      const float rstd = rstd_from(owned[tl * PART + M], float(K), a.k.norm_eps);
      hp_all[q] = sigmoid_fast(owned[tl * PART + i] * rstd * s_pre + __ldg(a.base + i)) + a.k.pre_eps;
    }
    for (int q = threadIdx.x; q < owned_count * PART; q += kFusedThreads) {
      const int tl = int(rank) + (q / PART) * int(cluster_size), col = q % PART;
      if (col >= N && col < M) owned[tl * PART + col] = cluster_sum(tl * PART + col);
    }
    __syncthreads();

    // ---- 5. coefficients of the owned tokens (one lane each, on their own warp) while the other
    // warps aggregate layer_input of this slice
    if (warp == kCoefWarp) {
      if (lane < owned_count) {
        const int tl = int(rank) + lane * int(cluster_size);
        const int64_t t = t0 + tl;
        if (t < a.T) {
          const float* row = owned + tl * PART;
          const float rstd = rstd_from(row[M], float(K), a.k.norm_eps);
#pragma unroll
          for (int i = 0; i < N; ++i) a.h_pre[t * N + i] = hp_all[tl * N + i];
          store_post_coefficients<N>(row, rstd, scale_of(a.scale, 1), a.base, a.k, t, a.h_post, a.mixes, a.rstd);
          store_comb<N>(row, rstd, scale_of(a.scale, 2), a.base, a.k, t, a.comb);
        }
      }
    } else {
      for (int q = threadIdx.x; q < MT * packs_per_row; q += kCoefWarp * 32) {
        const int tl = q / packs_per_row, cp = (q % packs_per_row) * P;
        const int64_t t = t0 + tl, c = c_begin + cp;
        if (t >= a.T || c >= C) continue;
        float accv[P];
#pragma unroll
        for (int e = 0; e < P; ++e) accv[e] = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float w = hp_all[tl * N + i];
          const Pack<S> v = *reinterpret_cast<const Pack<S>*>(xs + tl * a.tok_stride + i * cs + cp);
#pragma unroll
          for (int e = 0; e < P; ++e) accv[e] += w * to_math(v.v[e]);
        }
        Pack<S> out;
#pragma unroll
        for (int e = 0; e < P; ++e) out.v[e] = from_math<S>(accv[e]);
        store_pack(a.layer_input + t * C + c, out);
      }
    }
    __syncthreads();  // the tile buffer, owned rows and h_pre are reused by the next tile
    if (a.buffers == 2) buf ^= 1;
    parity ^= 1;
  }

  // ---- 6. no block leaves while a peer may still read its shared memory
  cluster_sync();
#endif
}

// Launch configuration of the fused kernel.
struct FusedConfig {
  int cluster = 0;  // blocks per cluster (channel slices); 0 = fused path not usable
  int tile = 0;     // tokens per tile
  int q = 0;        // fn chunks per warp held in registers (0 = streamed)
  int buffers = 1;
  int grid_clusters = 0;
  int cs = 0, tok_stride = 0;
  FusedSmem smem{};
};

template <class S, int N, int MT> FusedConfig fused_layout(int64_t C, int cluster, int buffers) {
  FusedConfig f;
  f.cluster = cluster;
  f.tile = MT;
  f.buffers = buffers;
  constexpr int KC = k_chunk<S>();
  const int64_t per = (C + cluster - 1) / cluster;
  f.cs = static_cast<int>((per + KC - 1) / KC * KC);
  // Token rows an odd number of 16-byte units apart: ldmatrix / 4-byte reads hit distinct banks.
  int units = (N * f.cs * int(sizeof(S)) + 15) / 16;
  if (units % 2 == 0) ++units;
  f.tok_stride = units * 16 / int(sizeof(S));
  f.smem = fused_smem<S, N, MT>(f.tok_stride, buffers);
  using Sh = FusedShape<N, MT>;
  const int chunks_per_warp = (N * (f.cs / KC) + Sh::WK - 1) / Sh::WK;
  // fn fragments of 16-bit x stay in registers when they fit the budget of 8 chunks x 3 column tiles
  f.q = (!std::is_same_v<S, float> && N <= 4 && chunks_per_warp <= 8) ? 8 : 0;
  return f;
}

template <class S, int N, int MT, bool kPost, int Q> auto fused_kernel() { return &pre_fused_kernel<S, N, MT, kPost, Q>; }

// Opt the kernel into large shared memory and non-portable cluster sizes, once per device.
template <class K> void prepare_kernel(K kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, bool> done;
  const int dev = current_device_info().index;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& flag = done[{dev, reinterpret_cast<const void*>(kernel)}];
  if (flag) return;
  MHC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      current_device_info().max_smem_optin));
  MHC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  flag = true;
}

// How many clusters of this shape can be resident at once (0: not launchable), asked once per shape.
template <class K> int resident_clusters(K kernel, int cluster, int smem) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, int>, int> known;
  const auto key = std::make_tuple(current_device_info().index, reinterpret_cast<const void*>(kernel), cluster, smem);
  const std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  cudaLaunchConfig_t lc{};
  lc.gridDim = dim3(static_cast<unsigned>(cluster));
  lc.blockDim = dim3(kFusedThreads);
  lc.dynamicSmemBytes = static_cast<std::size_t>(smem);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  lc.attrs = attr;
  lc.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &lc) != cudaSuccess) {
    cudaGetLastError();
    clusters = 0;
  }
  known[key] = clusters;
  return clusters;
}

// Picks cluster size, tile and buffering, and launches. Returns false when the fused path cannot run.
template <class S, int N, bool kPost>
bool launch_fused(FusedArgs<S> args, DType dtype, const char* op, cudaStream_t stream) {
  const DeviceInfo& info = current_device_info();
  if (!info.clusters) return false;
  const int64_t T = args.T, C = args.C;
  const TuningKey key{op, N, dtype, C, T};
  // Channel slices. Decode (few tokens): as many as keep >= 64 channels each (more SMs, shorter
  // chain). Many tokens: slices of ~256-512 channels (measured on H100, n = 4: C = 1024 -> 4,
  // C = 4096 -> 8), fewer cluster barriers per byte.
  int cluster = 16;
  if (T > 256) {
    cluster = 1;
    while (cluster < 16 && C / cluster > 512) cluster *= 2;
    if (C / cluster < 256 && cluster > 1) cluster /= 2;
    cluster = std::max(cluster, C >= 1024 ? 4 : 1);
  }
  while (cluster > 1 && C / cluster < 64) cluster /= 2;
  cluster = std::clamp(tuned(key, "cluster", cluster), 1, kMaxCluster);
  int tile = tuned(key, "tile", T <= 16 ? 16 : 32);
  if (tile != 16) tile = 32;

  auto run = [&](auto mt_tag) -> bool {
    constexpr int MT = decltype(mt_tag)::value;
    const int64_t tiles = (T + MT - 1) / MT;
    // Double-buffered persistent grid when there are more tiles than resident clusters.
    for (int buffers : {kPost ? 1 : 2, 1}) {
      FusedConfig f = fused_layout<S, N, MT>(C, cluster, buffers);
      if (f.smem.total > info.max_smem_optin) continue;
      auto go = [&](auto kernel) -> bool {
        prepare_kernel(kernel);
        const int resident = resident_clusters(kernel, cluster, f.smem.total);
        if (resident == 0) return false;
        if (buffers == 2 && tiles <= resident) return false;  // nothing to prefetch: use one buffer
        const int64_t grid_clusters = buffers == 2 ? resident : tiles;
        args.cs = f.cs;
        args.tok_stride = f.tok_stride;
        args.buffers = buffers;
        cudaLaunchConfig_t lc{};
        lc.gridDim = dim3(static_cast<unsigned>(grid_clusters * cluster));
        lc.blockDim = dim3(kFusedThreads);
        lc.dynamicSmemBytes = static_cast<std::size_t>(f.smem.total);
        lc.stream = stream;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        lc.attrs = attr;
        lc.numAttrs = 1;
        MHC_CUDA_CHECK(cudaLaunchKernelEx(&lc, kernel, args, f.smem));
        return true;
      };
      bool launched;
      if constexpr (!std::is_same_v<S, float> && N <= 4) {
        launched = f.q ? go(fused_kernel<S, N, MT, kPost, 8>()) : go(fused_kernel<S, N, MT, kPost, 0>());
      } else {
        launched = go(fused_kernel<S, N, MT, kPost, 0>());
      }
      if (launched) return true;
    }
    return false;
  };
  // A 32-token tile that does not fit (wide rows of n = 8) falls back to 16 tokens.
  if (tile == 32 && run(std::integral_constant<int, 32>{})) return true;
  return run(std::integral_constant<int, 16>{});
}

// Environment switch for tests and benchmarks: MHC_CUDA_PATH=generic forces the generic kernels.
bool generic_forced() {
  static const bool forced = [] {
    const char* v = std::getenv("MHC_CUDA_PATH");
    return v && std::string(v) == "generic";
  }();
  return forced;
}

// Runs the fused pre (or post+pre) when the shape allows; returns false to ask for the generic path.
template <bool kPost>
bool try_fused(const TensorView& x, const TensorView* y, const TensorView* post_h, const TensorView* post_comb,
               const TensorView* x_next, const TensorView& fn, const TensorView& base, const TensorView& scale,
               const TensorView& layer_input, const TensorView& h_pre, const TensorView& h_post,
               const TensorView& comb, const TensorView& mixes, const TensorView& rstd, const MhcConfig& cfg,
               cudaStream_t stream) {
  if (generic_forced()) return false;
  const int64_t T = x.shape[0], C = x.shape[2];
  const int n = static_cast<int>(x.shape[1]);
  if (x.dtype == DType::f64 || (n != 2 && n != 4 && n != 8)) return false;
  const bool aligned = aligned16({&x, &layer_input}) && (!kPost || aligned16({y, x_next})) &&
                       (!fn.present() || (reinterpret_cast<std::uintptr_t>(fn.data) & 7u) == 0);
  if (!aligned) return false;
  return dispatch_storage(x.dtype, [&](auto tag) -> bool {
    using S = typename decltype(tag)::type;
    if constexpr (std::is_same_v<S, double>) {
      return false;
    } else {
      if (C % kPack<S> != 0) return false;
      return dispatch_streams(n, [&](auto nc) -> bool {
        constexpr int N = decltype(nc)::value;
        if constexpr (N == 0) {
          return false;
        } else {
          FusedArgs<S> args{};
          args.x = x.ptr<const S>();
          if constexpr (kPost) {
            args.y = y->ptr<const S>();
            args.post_h = post_h->ptr<const float>();
            args.post_comb = post_comb->ptr<const float>();
            args.x_next = x_next->ptr<S>();
          }
          args.fn = data_or_null<const float>(fn);
          args.base = base.ptr<const float>();
          args.scale = data_or_null<const float>(scale);
          args.layer_input = layer_input.ptr<S>();
          args.h_pre = h_pre.ptr<float>();
          args.h_post = h_post.ptr<float>();
          args.comb = comb.ptr<float>();
          args.mixes = data_or_null<float>(mixes);
          args.rstd = data_or_null<float>(rstd);
          args.T = T;
          args.C = C;
          args.k = site_consts<float>(cfg);
          return launch_fused<S, N, kPost>(args, x.dtype, kPost ? "post_pre_forward" : "pre_forward", stream);
        }
      });
    }
  });
}

}  // namespace

// ================================ entry points ======================================================

namespace {
// The pre of the next site that the unfused post+pre runs on the stored x_next.
PreForward next_pre(const PostPreForward& a) {
  return {a.x_next, a.fn, a.base, a.scale, a.layer_input, a.h_pre, a.h_post_next, a.comb_next, a.mixes, a.rstd,
          a.workspace};
}
// Whether post+pre runs as the post kernel followed by the streaming (or wave) pre.
bool post_pre_unfused(const PostPreForward& a) {
  const int n = static_cast<int>(a.x.shape[1]);
  return pre_path() == PrePath::stream && (a.x.shape[0] > kFusedPostPreTokens || n > 4) &&
         pre_stream_supported(next_pre(a));
}
}  // namespace

std::size_t pre_forward_workspace_bytes(const PreForward& a, const MhcConfig&, const Context&) {
  if (a.x.shape[0] == 0 || generic_forced() || pre_path() == PrePath::cluster) return 0;
  const DeviceGuard guard(a.x.device);
  return pre_wave_workspace_bytes(a);
}

std::size_t post_pre_forward_workspace_bytes(const PostPreForward& a, const MhcConfig&, const Context&) {
  if (a.x.shape[0] == 0 || generic_forced()) return 0;
  const DeviceGuard guard(a.x.device);
  return post_pre_unfused(a) ? pre_wave_workspace_bytes(next_pre(a)) : 0;
}

void pre_forward(const PreForward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.x.shape[0], C = a.x.shape[2];
  const int n = static_cast<int>(a.x.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.x.device);
  const cudaStream_t stream = stream_of(ctx);
  if (!generic_forced() && pre_path() != PrePath::cluster &&
      (pre_wave_forward(a, cfg, stream) || pre_stream_forward(a, cfg, stream)))
    return;
  if (try_fused<false>(a.x, nullptr, nullptr, nullptr, nullptr, a.fn, a.base, a.scale, a.layer_input, a.h_pre,
                       a.h_post, a.comb, a.mixes, a.rstd, cfg, stream))
    return;
  dispatch_storage(a.x.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    pre_generic<S>(a.x.ptr<const S>(), a.fn, a.base, a.scale, a.layer_input, a.h_pre, a.h_post, a.comb, a.mixes,
                   a.rstd, T, n, C, cfg, stream);
  });
}

void post_pre_forward(const PostPreForward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.x.shape[0];
  if (T == 0) return;
  const DeviceGuard guard(a.x.device);
  const cudaStream_t stream = stream_of(ctx);
  const PreForward next = next_pre(a);
  if (!generic_forced()) {
    const PrePath path = pre_path();
    if (path == PrePath::stream && post_pre_stream_forward(a, cfg, stream, /*direct_only=*/true)) return;
    const bool unfused = post_pre_unfused(a);
    if (path != PrePath::cluster && !unfused && post_pre_stream_forward(a, cfg, stream)) return;
    if (!unfused && try_fused<true>(a.x, &a.y, &a.h_post, &a.comb, &a.x_next, a.fn, a.base, a.scale, a.layer_input,
                                    a.h_pre, a.h_post_next, a.comb_next, a.mixes, a.rstd, cfg, stream))
      return;
  }
  // Unfused: post into x_next, then pre reading x_next as stored.
  cuda_impl::post_forward({.x = a.x, .y = a.y, .h_post = a.h_post, .comb = a.comb, .x_next = a.x_next}, cfg, ctx);
  cuda_impl::pre_forward(next, cfg, ctx);
}

namespace {

// ---- head, packed path (16-byte packs, n in {2, 4, 8}, with fn) --------------------------------------------------
// Why: project_generic reads a token's row once per mix with 2-byte loads, and aggregate_generic reads x element by
// element: 652 us for the head's projection at n = 4, C = 4096, 8192 tokens on the H200, ~10x its bytes. Two
// streaming kernels instead, x read once by each:
//   1. head_project_packed: a block owns kHeadSlice columns of x's rows ([T, nC]) with fn's slice in shared memory;
//      a warp takes whole tokens, a lane 16-byte packs, and parks the slice's n dots and sum of squares in the
//      token's row of `out` (slice s at floats s * (n + 1), as the pre parks its partials in layer_input).
//   2. head_aggregate_packed: a block per token sums the parked rows in slice order (fixed: the same bits every run),
//      writes rstd, mixes and weights, then out = sum_i w_i x_i over the row in packs.
constexpr int kHeadSlice = 2048;  // columns of nC per projection block: fn's slice, n * 8 KB of shared memory

// fn's slice in shared memory as [k][n]; k's position swizzled inside each group of 8 so that the 8 lanes of a
// shared-memory phase, reading element e of their packs (k = 8 lane + e), hit different banks.
__device__ __forceinline__ int head_slot(int k) { return k ^ ((k >> 3) & 7); }

template <class S, int N>
__global__ void __launch_bounds__(256) head_project_packed(const S* __restrict__ x, const float* __restrict__ fn,
                                                           S* __restrict__ out, int64_t T, int64_t C) {
  constexpr int P = kPack<S>, PART = N + 1;
  extern __shared__ __align__(16) float fs[];  // [kHeadSlice][N]
  const int64_t nC = int64_t(N) * C, k0 = int64_t(blockIdx.x) * kHeadSlice;
  const int width = static_cast<int>(std::min<int64_t>(kHeadSlice, nC - k0));
  // -- stage fn[:, k0 .. k0 + width) (coalesced along k)
  for (int i = threadIdx.x; i < N * width; i += blockDim.x) {
    const int j = i / width, k = i % width;
    fs[head_slot(k) * N + j] = fn[j * nC + k0 + k];
  }
  __syncthreads();
  // -- a warp per token: n dots and the sum of squares of the slice, parked in out's row
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t t = int64_t(blockIdx.y) * warps + warp; t < T; t += int64_t(gridDim.y) * warps) {
    const S* xt = x + t * nC + k0;
    float acc[PART] = {};
    for (int k = lane * P; k < width; k += 32 * P) {
      const Pack<S> v = load_pack_stream(xt + k);
#pragma unroll
      for (int e = 0; e < P; ++e) {
        const float xe = to_math(v.v[e]);
        const float* f = fs + head_slot(k + e) * N;
        acc[N] += xe * xe;
#pragma unroll
        for (int j = 0; j < N; ++j) acc[j] += xe * f[j];
      }
    }
#pragma unroll
    for (int r = 0; r < PART; ++r) acc[r] = warp_sum(acc[r]);
    if (lane == 0) {
      float* row = reinterpret_cast<float*>(out + t * C) + blockIdx.x * PART;
#pragma unroll
      for (int r = 0; r < PART; ++r) row[r] = acc[r];
    }
  }
}

template <class S, int N>
__global__ void __launch_bounds__(256) head_aggregate_packed(const S* __restrict__ x, const float* __restrict__ base,
                                                             const float* __restrict__ scale, S* __restrict__ out,
                                                             float* __restrict__ weights, float* __restrict__ mixes,
                                                             float* __restrict__ rstd_out, int64_t T, int64_t C,
                                                             int slices, float norm_eps, float pre_eps) {
  constexpr int P = kPack<S>, PART = N + 1;
  __shared__ float w[N];
  const int lane = threadIdx.x;
  const float s = scale_of(scale, 0);
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    // -- the token's coefficients: lane r < n + 1 sums parked slot r over the slices, in order
    if (threadIdx.x < 32) {
      const float* row = reinterpret_cast<const float*>(out + t * C);
      float v = 0.f;
      if (lane < PART)
        for (int q = 0; q < slices; ++q) v += row[q * PART + lane];
      const float rstd = rstd_from(__shfl_sync(0xffffffffu, v, N), float(N * C), norm_eps);
      if (lane < N) {
        const float mix = v * rstd, wt = sigmoid(mix * s + base[lane]) + pre_eps;
        w[lane] = wt;
        weights[t * N + lane] = wt;
        if (mixes) mixes[t * N + lane] = mix;
      }
      if (lane == 0 && rstd_out) rstd_out[t] = rstd;
    }
    __syncthreads();  // w complete; the parked row read before it is overwritten
    // -- out = sum_i w_i x_i
    const S* xt = x + t * N * C;
    for (int64_t c = int64_t(threadIdx.x) * P; c < C; c += int64_t(blockDim.x) * P) {
      float acc[P] = {};
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const Pack<S> v = load_pack_stream(xt + i * C + c);
#pragma unroll
        for (int e = 0; e < P; ++e) acc[e] += w[i] * to_math(v.v[e]);
      }
      Pack<S> o;
#pragma unroll
      for (int e = 0; e < P; ++e) o.v[e] = from_math<S>(acc[e]);
      store_pack(out + t * C + c, o);
    }
    __syncthreads();  // w is rewritten for the next token
  }
}

// The packed head where it applies: false, having launched nothing, otherwise.
template <class S>
bool head_forward_packed(const HeadForward& a, const MhcConfig& cfg, cudaStream_t stream) {
  if constexpr (!std::is_same_v<math_t<S>, float>) {
    return false;
  } else {
    const int64_t T = a.x.shape[0], C = a.x.shape[2];
    const int n = static_cast<int>(a.x.shape[1]);
    if (!a.fn.present() || C % kPack<S> != 0 || !aligned16({&a.x, &a.out})) return false;
    const int64_t slices = (int64_t(n) * C + kHeadSlice - 1) / kHeadSlice;
    if (slices * (n + 1) > C * int64_t(sizeof(S)) / 4 || slices > 65535) return false;  // the parked rows fit in out
    return dispatch_streams(n, [&](auto nc) {
      constexpr int N = decltype(nc)::value;
      if constexpr (N == 0) {
        return false;
      } else {
        const auto project = &head_project_packed<S, N>;
        const int smem = kHeadSlice * N * int(sizeof(float));
        allow_dynamic_smem(project, std::size_t(smem));
        const int64_t sms = current_device_info().sm_count;
        const int64_t token_blocks = std::clamp<int64_t>((sms * 6 + slices - 1) / slices, 1, (T + 7) / 8);
        const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(std::min<int64_t>(token_blocks, 65535)));
        project<<<grid, 256, smem, stream>>>(a.x.ptr<const S>(), a.fn.ptr<const float>(), a.out.ptr<S>(), T, C);
        MHC_CUDA_CHECK_LAUNCH();
        head_aggregate_packed<S, N><<<token_grid(T), 256, 0, stream>>>(
            a.x.ptr<const S>(), a.base.ptr<const float>(), data_or_null<const float>(a.scale), a.out.ptr<S>(),
            a.weights.ptr<float>(), data_or_null<float>(a.mixes), data_or_null<float>(a.rstd), T, C,
            static_cast<int>(slices), float(cfg.norm_eps), float(cfg.pre_eps));
        MHC_CUDA_CHECK_LAUNCH();
        return true;
      }
    });
  }
}

}  // namespace

void head_forward(const HeadForward& a, const MhcConfig& cfg, const Context& ctx) {
  const int64_t T = a.x.shape[0], C = a.x.shape[2];
  const int n = static_cast<int>(a.x.shape[1]);
  if (T == 0) return;
  const DeviceGuard guard(a.x.device);
  const cudaStream_t stream = stream_of(ctx);
  dispatch_storage(a.x.dtype, [&](auto tag) {
    using S = typename decltype(tag)::type;
    using M = math_t<S>;
    if (head_forward_packed<S>(a, cfg, stream)) return;
    const MixSlots<M> slots{a.weights.ptr<M>(), nullptr, nullptr};
    project_generic<S><<<token_grid(T), 256, 0, stream>>>(a.x.ptr<const S>(), data_or_null<const M>(a.fn), slots,
                                                          data_or_null<M>(a.mixes), data_or_null<M>(a.rstd), T, n, C,
                                                          n, M(cfg.norm_eps));
    MHC_CUDA_CHECK_LAUNCH();
    head_weights_generic<M><<<grid_for(T * n, 256), 256, 0, stream>>>(a.weights.ptr<M>(), a.base.ptr<const M>(),
                                                                      data_or_null<const M>(a.scale), T, n,
                                                                      M(cfg.pre_eps));
    MHC_CUDA_CHECK_LAUNCH();
    aggregate_generic<S><<<grid_for(T * C, 256), 256, 0, stream>>>(a.x.ptr<const S>(), a.weights.ptr<const M>(),
                                                                   a.out.ptr<S>(), T, n, C);
    MHC_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace mhc::cuda_impl
