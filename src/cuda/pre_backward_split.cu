// Stage C of the pre backward as two streaming kernels (MHC_CUDA_PRE_BWD=split; docs/MATH.md section 1,
// the stage letters of src/cuda/pre_backward.cu):
//
//   C1. grad_x[t, k] = h[t, i(k)] g[t, c(k)] + XC[t] x[t, k] + sum_j DP[t, j] fn[j, k] (+ accum[t, k])
//       CUDA cores, fp32 math, fn exact. A block owns W consecutive columns of x viewed as [T, nC], holds
//       fn[:, its columns] in registers (KC columns per thread) for a whole chunk of tokens and streams the
//       chunk's token rows through: every row is read in W-column contiguous runs (2 KB / 1 KB / 512 B for
//       n = 2 / 4 / 8), DP/XC/h of a 32-token tile are staged in shared memory (double-buffered cp.async) and
//       read as broadcasts, the x/g/accum loads of the next U tokens are in flight while the current U are
//       computed, and the rows 8 tokens ahead are prefetched into L2.
//   C2. GF[chunk, j, k] = sum_{t in chunk} DP[t, j] x[t, k] on tensor cores: DP^T (rows j) split into
//       bf16 hi + lo (once per tile, shared by the block's warps), x exact, fp32 accumulation in registers
//       over the chunk; x and DP through a 4-stage cp.async ring of 16-token tiles. Stage D
//       (pre_backward.cu) sums the chunks in fixed order.
//
// Deterministic: every output element is written by one thread with a fixed order of additions, the
// work split depends only on (T, n, C, device). bf16 streams, n in {2, 4, 8}, C % 8 == 0 only; the
// caller runs v2 otherwise.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/pre_backward_split.hpp"

namespace mhc::cuda_impl {

namespace {

using std::int64_t;
using bf16 = __nv_bfloat16;

// ---- geometry ---------------------------------------------------------------------------------------
// C1. fn[M][KC] lives in registers: 64 / 96 / 160 floats for n = 2 / 4 / 8. KC = 8 / 4 / 2 bf16 columns per
// thread = 16 / 8 / 4-byte loads; 128 threads; W = 1024 / 512 / 256 columns per block. kU tokens per step:
// 2 (3 blocks per SM, n <= 4), or 4 (MHC_CUDA_PRE_BWD=split-u4, n <= 4: half the per-step overhead per
// element, 2 blocks per SM for the registers of the second pair of tokens).
template <int N, int kU = 2> struct GxGeom {
  static constexpr int M = N * N + 2 * N;
  static constexpr int KC = N == 2 ? 8 : N == 4 ? 4 : 2;
  static constexpr int kThreads = 128;
  static constexpr int kMinBlocks = N == 8 || kU == 4 ? 2 : 3;  // register budget: 170 / 255
  static constexpr int W = kThreads * KC;
  static constexpr int TT = 32;                        // tokens per staged DP/XC/h tile
  static constexpr int U = kU;                         // tokens per step (loads one step ahead)
  static constexpr int PD = 8;                         // L2 prefetch distance (tokens) of the DRAM streams
  static constexpr int R = (M + 1 + N + 3) / 4 * 4;    // floats per staged token row: DP[0, M), XC, h[0, N)
  static_assert(TT % (2 * U) == 0 && M % 4 == 0 && PD > U);
};

// C2. Warp w owns 16 * NT2 columns, all M rows (MJ row tiles of 16); block = 8 warps. DP arrives raw (fp32)
// through the ring and is split into bf16 hi + lo once per tile, one tile ahead of its use, into a
// [token][row] layout that ldmatrix.trans turns into A fragments.
template <int N> struct GfGeom {
  static constexpr int M = N * N + 2 * N;
  static constexpr int MP = (M + 15) / 16 * 16;
  static constexpr int MJ = MP / 16;
  static constexpr int kThreads = 256, kWarps = 8;
  static constexpr int NT2 = N == 8 ? 2 : 4;   // accumulators MJ * 2 * NT2 * 4: 32 / 64 / 80 floats
  static constexpr int W = kWarps * 16 * NT2;  // 512 / 512 / 256 columns per block
  static constexpr int KT = 16;                // tokens per stage: one k step of m16n8k16
  static constexpr int kStages = 4;            // ring depth; tiles it + 1 .. it + 2 in flight while it computes
  static constexpr int XS = W + 8;             // x tile row stride (elements): odd count of 16-byte units
  static constexpr int HS = MP + 8;            // hi / lo tile row stride (elements): odd count of 16-byte units
  static constexpr int kBlocksPerSm = 2;
  static constexpr int kMinChunkTokens = 128;  // partial rows (4M bytes per column) small against x (2 per token)
  static constexpr int kXCopies = KT * (W / 8) / kThreads;  // 16-byte copies of x per thread and tile
  static constexpr int kDCopies = (KT * (M / 4) + kThreads - 1) / kThreads;
  static constexpr std::size_t kXBytes = std::size_t(KT) * XS * sizeof(bf16);
  static constexpr std::size_t kDBytes = std::size_t(KT) * M * sizeof(float);
  static constexpr std::size_t kHBytes = std::size_t(KT) * HS * sizeof(bf16);
  static constexpr std::size_t kSmem = kStages * (kXBytes + kDBytes) + 2 * 2 * kHBytes;
  static_assert(kXBytes % 16 == 0 && kDBytes % 16 == 0 && M % 4 == 0 && (KT * (W / 8)) % kThreads == 0);
  static_assert((XS * 2 / 16) % 2 == 1 && (HS * 2 / 16) % 2 == 1);
};

// Brings a line towards L2 without a register: the loads one step ahead alone keep too few bytes in
// flight per SM at 168 registers a thread.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}

// KC bf16 values as KC / 2 packed pairs.
template <int KC> struct Bf16Vec {
  std::uint32_t w[KC / 2];
};

template <int KC, bool kStreaming> __device__ __forceinline__ Bf16Vec<KC> load_vec(const bf16* p) {
  Bf16Vec<KC> r;
  if constexpr (KC == 8) {
    const uint4 v = kStreaming ? __ldcs(reinterpret_cast<const uint4*>(p)) : __ldg(reinterpret_cast<const uint4*>(p));
    r.w[0] = v.x, r.w[1] = v.y, r.w[2] = v.z, r.w[3] = v.w;
  } else if constexpr (KC == 4) {
    const uint2 v = kStreaming ? __ldcs(reinterpret_cast<const uint2*>(p)) : __ldg(reinterpret_cast<const uint2*>(p));
    r.w[0] = v.x, r.w[1] = v.y;
  } else {
    const unsigned v = kStreaming ? __ldcs(reinterpret_cast<const unsigned*>(p)) : __ldg(reinterpret_cast<const unsigned*>(p));
    r.w[0] = v;
  }
  return r;
}

template <int KC> __device__ __forceinline__ void store_vec(bf16* p, const Bf16Vec<KC>& v) {
  if constexpr (KC == 8) *reinterpret_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
  else if constexpr (KC == 4) *reinterpret_cast<uint2*>(p) = make_uint2(v.w[0], v.w[1]);
  else *reinterpret_cast<unsigned*>(p) = v.w[0];
}

// Element e of a packed vector as fp32 (bf16 -> fp32 is exact: the bits moved up).
template <int KC> __device__ __forceinline__ float elem(const Bf16Vec<KC>& v, int e) {
  const std::uint32_t w = v.w[e >> 1];
  return __uint_as_float((e & 1) ? (w & 0xffff0000u) : (w << 16));
}

template <int KC> __device__ __forceinline__ Bf16Vec<KC> zero_vec() {
  Bf16Vec<KC> r;
#pragma unroll
  for (int q = 0; q < KC / 2; ++q) r.w[q] = 0u;
  return r;
}

// ---- C1. grad_x -------------------------------------------------------------------------------------------
template <int N, int kU> struct StepLoads {
  static constexpr int U = GxGeom<N, kU>::U, KC = GxGeom<N, kU>::KC;
  Bf16Vec<KC> x[U], g[U], acc[U];
};

// kFn: projection terms (absent in static mode); kG: grad_layer_input present; kAcc: grad_x_accum present.
template <int N, int kU, bool kFn, bool kG, bool kAcc>
__global__ void __launch_bounds__(GxGeom<N, kU>::kThreads, GxGeom<N, kU>::kMinBlocks)
    grad_x_split(const PreBwdSplitArgs a, int64_t per_chunk) {
  using G = GxGeom<N, kU>;
  constexpr int M = G::M, KC = G::KC, U = G::U, R = G::R, TT = G::TT;
  __shared__ __align__(16) float rows[2][TT * R];
  const bf16* x = static_cast<const bf16*>(a.x);
  const bf16* gp = static_cast<const bf16*>(a.g);
  const bf16* accp = static_cast<const bf16*>(a.accum);
  bf16* gx = static_cast<bf16*>(a.grad_x);
  const int64_t C = a.C, nC = int64_t(N) * C, T = a.T;
  const int64_t k = (int64_t(blockIdx.x) * G::kThreads + threadIdx.x) * KC;
  const bool valid = k < nC;  // nC % KC == 0: the thread's KC columns are all valid or all not
  const int i = valid ? static_cast<int>(k / C) : 0;  // C % KC == 0: one stream per thread
  const int64_t c = valid ? k - i * C : 0;
  const int64_t t_begin = std::min<int64_t>(T, blockIdx.y * per_chunk);
  const int64_t t_end = std::min<int64_t>(T, t_begin + per_chunk);

  float fr[kFn ? M : 1][KC];  // fn[:, k .. k + KC) for the whole chunk, loaded after the first stream loads

  auto stage = [&](int64_t tb, int buf) {
    const int count = static_cast<int>(std::min<int64_t>(TT, t_end - tb));
    float* r = rows[buf];
    if constexpr (kFn) {
      for (int q = threadIdx.x; q < count * (M / 4); q += G::kThreads) {
        const int tl = q / (M / 4), j4 = q % (M / 4);
        cp_async16(r + tl * R + 4 * j4, a.DP + (tb + tl) * M + 4 * j4, true);
      }
      for (int q = threadIdx.x; q < count; q += G::kThreads) cp_async4(r + q * R + M, a.XC + tb + q);
    }
    for (int q = threadIdx.x; q < count * N; q += G::kThreads) {
      const int tl = q / N, s = q % N;
      cp_async4(r + tl * R + M + 1 + s, a.H + (tb + tl) * N + s);
    }
    cp_async_commit();
  };

  // Running row pointers: loads run one step (U tokens) ahead of the computation and the stores.
  const bf16* lx = x + t_begin * nC + k;
  const bf16* lg = kG ? gp + t_begin * C + c : nullptr;
  const bf16* la = kAcc ? accp + t_begin * nC + k : nullptr;
  bf16* so = gx + t_begin * nC + k;
  // 32-bit token counters relative to the chunk (a chunk is far below 2^31 tokens); vlen folds `valid` in
  const int vlen = valid ? static_cast<int>(t_end - t_begin) : 0;  // tokens this thread loads and stores
  int lt = 0;                                                       // next token to load
  auto load_step = [&](StepLoads<N, kU>& l) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool ok = lt + u < vlen;
      if (lt + u + G::PD < vlen) {
        if constexpr (kFn) prefetch_l2(lx + (u + G::PD) * nC);
        if constexpr (kG) prefetch_l2(lg + (u + G::PD) * C);
        if constexpr (kAcc) prefetch_l2(la + (u + G::PD) * nC);
      }
      if constexpr (kFn) l.x[u] = ok ? load_vec<KC, true>(lx + u * nC) : zero_vec<KC>();
      if constexpr (kG) l.g[u] = ok ? load_vec<KC, false>(lg + u * C) : zero_vec<KC>();  // g: n blocks read it, via L2
      if constexpr (kAcc) l.acc[u] = ok ? load_vec<KC, true>(la + u * nC) : zero_vec<KC>();
    }
    lt += U;
    lx += U * nC;
    if constexpr (kG) lg += U * C;
    if constexpr (kAcc) la += U * nC;
  };

  // Computes and stores the U tokens of `cur` (rows s.. of the staged tile r, first token t0) after
  // issuing the next step's loads into `nxt`.
  auto step = [&](const StepLoads<N, kU>& cur, StepLoads<N, kU>& nxt, const float* r, int s, int t0) {
    if (lt < vlen) load_step(nxt);
    float out[U][KC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const float* row = r + (s + u) * R;  // rows past the tile's count are stale: their results are not stored
      const float h = row[M + 1 + i];
      const float xc = kFn ? row[M] : 0.f;
#pragma unroll
      for (int e = 0; e < KC; ++e) {
        float v = kAcc ? elem(cur.acc[u], e) : 0.f;
        if constexpr (kG) v = fmaf(h, elem(cur.g[u], e), v);
        if constexpr (kFn) v = fmaf(xc, elem(cur.x[u], e), v);
        out[u][e] = v;
      }
    }
    if constexpr (kFn) {
#pragma unroll
      for (int j4 = 0; j4 < M / 4; ++j4)
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const float4 d = *reinterpret_cast<const float4*>(r + (s + u) * R + 4 * j4);
#pragma unroll
          for (int e = 0; e < KC; ++e) {
            out[u][e] = fmaf(d.x, fr[4 * j4][e], out[u][e]);
            out[u][e] = fmaf(d.y, fr[4 * j4 + 1][e], out[u][e]);
            out[u][e] = fmaf(d.z, fr[4 * j4 + 2][e], out[u][e]);
            out[u][e] = fmaf(d.w, fr[4 * j4 + 3][e], out[u][e]);
          }
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (t0 + u < vlen) {
        Bf16Vec<KC> o;
#pragma unroll
        for (int e = 0; e < KC; e += 2) {
          const __nv_bfloat162 p = __floats2bfloat162_rn(out[u][e], out[u][e + 1]);
          o.w[e >> 1] = *reinterpret_cast<const std::uint32_t*>(&p);
        }
        store_vec<KC>(so + u * nC, o);
      }
    }
    so += U * nC;
  };

  if (t_begin >= t_end) return;
  int buf = 0;
  stage(t_begin, 0);
  // two register sets used in turn (no copies): A holds the step being computed at even steps
  StepLoads<N, kU> A, B;
  load_step(A);
  // fn from L2 after the first DRAM requests are out (every block of the wave loads its slice at once)
  if constexpr (kFn) {
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float* src = a.fn + int64_t(j) * nC + k;
#pragma unroll
      for (int e = 0; e < KC; e += 2) {
        const float2 v = valid ? __ldg(reinterpret_cast<const float2*>(src + e)) : make_float2(0.f, 0.f);
        fr[j][e] = v.x;
        fr[j][e + 1] = v.y;
      }
    }
  }
  const int len = static_cast<int>(t_end - t_begin);
  for (int tb = 0; tb < len; tb += TT) {
    const int count = std::min(TT, len - tb);
    if (tb + TT < len) {
      stage(t_begin + tb + TT, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const float* r = rows[buf];
    // TT / U is even: every full tile ends with A holding the first step of the next tile
    for (int s = 0; s < count; s += 2 * U) {
      step(A, B, r, s, tb + s);
      if (s + U < count) step(B, A, r, s + U, tb + s + U);
    }
    __syncthreads();  // the staged rows of this tile are restaged two tiles on
    buf ^= 1;
  }
}

// ---- C2. grad_fn partials ---------------------------------------------------------------------------------
template <int N>
__global__ void __launch_bounds__(GfGeom<N>::kThreads, GfGeom<N>::kBlocksPerSm)
    grad_fn_split(const PreBwdSplitArgs a, int64_t per_chunk) {
  using G = GfGeom<N>;
  constexpr int M = G::M, MP = G::MP, MJ = G::MJ, NT2 = G::NT2, W = G::W, KT = G::KT, XS = G::XS, HS = G::HS;
  constexpr int kStages = G::kStages;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* xs = reinterpret_cast<bf16*>(smem_raw);                                      // [kStages][KT][XS]
  float* dps = reinterpret_cast<float*>(smem_raw + kStages * G::kXBytes);           // [kStages][KT][M]
  bf16* hl = reinterpret_cast<bf16*>(smem_raw + kStages * (G::kXBytes + G::kDBytes));  // [2][hi, lo][KT][HS]
  const bf16* x = static_cast<const bf16*>(a.x);
  const int64_t nC = int64_t(N) * a.C, T = a.T;
  const int64_t col0 = int64_t(blockIdx.x) * W;
  const int chunk = blockIdx.y;
  const int64_t t_begin = std::min<int64_t>(T, chunk * per_chunk);
  const int64_t t_end = std::min<int64_t>(T, t_begin + per_chunk);
  const int tiles = static_cast<int>((t_end - t_begin + KT - 1) / KT);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int nb = warp * 16 * NT2;

  // This thread's copies of every tile: x rows xr + r * (KT / kXCopies) at column xc; DP elements q.
  constexpr int kXRowStep = KT / G::kXCopies;
  const int xr = threadIdx.x / (W / 8), xc = (threadIdx.x % (W / 8)) * 8;
  const bool x_col_ok = col0 + xc < nC;  // nC % 8 == 0: a pack is all in or all out
  auto issue = [&](int tile, int st) {
    const int64_t tb = t_begin + int64_t(tile) * KT;
    bf16* xt = xs + st * KT * XS;
#pragma unroll
    for (int r = 0; r < G::kXCopies; ++r) {
      const int tl = xr + r * kXRowStep;
      const bool ok = x_col_ok && tb + tl < t_end;
      cp_async16(xt + tl * XS + xc, ok ? x + (tb + tl) * nC + col0 + xc : x, ok);
    }
    float* dt = dps + st * KT * M;
#pragma unroll
    for (int r = 0; r < G::kDCopies; ++r) {
      const int q = threadIdx.x + r * G::kThreads;
      if (q < KT * (M / 4)) {
        const int tl = q / (M / 4), j4 = q % (M / 4);
        const bool ok = tb + tl < t_end;  // tokens past the chunk: zero DP and zero x
        cp_async16(dt + tl * M + 4 * j4, ok ? a.DP + (tb + tl) * M + 4 * j4 : a.DP, ok);
      }
    }
  };
  // DP tile of ring stage st -> hi / lo pair hb (rows j >= M are the mma's zero padding)
  auto split_tile = [&](int st, int hb) {
    const float* dt = dps + st * KT * M;
    bf16* hi = hl + hb * 2 * KT * HS;
    bf16* lo = hi + KT * HS;
    constexpr int kPairs = KT * (MP / 2);
#pragma unroll
    for (int r = 0; r < (kPairs + G::kThreads - 1) / G::kThreads; ++r) {
      const int q = threadIdx.x + r * G::kThreads;
      if (kPairs % G::kThreads != 0 && q >= kPairs) break;
      const int tl = q / (MP / 2), j = (q % (MP / 2)) * 2;
      const float2 v = j < M ? *reinterpret_cast<const float2*>(dt + tl * M + j) : make_float2(0.f, 0.f);
      std::uint32_t h, l;
      split_pair<bf16>(v, h, l);
      *reinterpret_cast<std::uint32_t*>(hi + tl * HS + j) = h;
      *reinterpret_cast<std::uint32_t*>(lo + tl * HS + j) = l;
    }
  };

  float acc[MJ][2 * NT2][4];
#pragma unroll
  for (int mj = 0; mj < MJ; ++mj)
#pragma unroll
    for (int nt = 0; nt < 2 * NT2; ++nt) acc[mj][nt][0] = acc[mj][nt][1] = acc[mj][nt][2] = acc[mj][nt][3] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) issue(s, s);
    cp_async_commit();
  }
  if (tiles > 0) {
    cp_async_wait<kStages - 2>();  // tile 0
    __syncthreads();
    split_tile(0, 0);
  }
  // ldmatrix lane addresses: A (trans, [token][row] storage) and B (trans, [token][column] storage)
  const int a_row = (lane & 7) + ((lane >> 4) << 3), a_col = ((lane >> 3) & 1) * 8;
  for (int it = 0; it < tiles; ++it) {
    cp_async_wait<kStages - 3>();  // tiles <= it + 1 landed (this thread's copies)
    __syncthreads();  // ... for all threads; hi / lo of tile it visible; iteration it - 1 done everywhere
    if (it + kStages - 1 < tiles) issue(it + kStages - 1, (it + kStages - 1) % kStages);
    cp_async_commit();
    if (it + 1 < tiles) split_tile((it + 1) % kStages, (it + 1) & 1);
    const bf16* xt = xs + (it % kStages) * KT * XS;
    const bf16* hi = hl + (it & 1) * 2 * KT * HS;
    const bf16* lo = hi + KT * HS;
    std::uint32_t bx[NT2][4];
#pragma unroll
    for (int q = 0; q < NT2; ++q) ldmatrix_x4_trans(bx[q], xt + (lane & 15) * XS + nb + q * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int mj = 0; mj < MJ; ++mj) {
      std::uint32_t ah[4], al[4];
      ldmatrix_x4_trans(ah, hi + a_row * HS + mj * 16 + a_col);
      ldmatrix_x4_trans(al, lo + a_row * HS + mj * 16 + a_col);
#pragma unroll
      for (int q = 0; q < NT2; ++q) {
        const std::uint32_t b0[2] = {bx[q][0], bx[q][1]}, b1[2] = {bx[q][2], bx[q][3]};
        mma_16816<bf16>(acc[mj][2 * q], al, b0);
        mma_16816<bf16>(acc[mj][2 * q], ah, b0);
        mma_16816<bf16>(acc[mj][2 * q + 1], al, b1);
        mma_16816<bf16>(acc[mj][2 * q + 1], ah, b1);
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mj = 0; mj < MJ; ++mj)
#pragma unroll
    for (int nt = 0; nt < 2 * NT2; ++nt) {
      const int64_t col = col0 + nb + nt * 8 + 2 * tq;
      if (col >= nC) continue;
      const int j0 = mj * 16 + g;
      if (j0 < M)
        *reinterpret_cast<float2*>(a.GF + (int64_t(chunk) * M + j0) * nC + col) = make_float2(acc[mj][nt][0], acc[mj][nt][1]);
      if (j0 + 8 < M)
        *reinterpret_cast<float2*>(a.GF + (int64_t(chunk) * M + j0 + 8) * nC + col) =
            make_float2(acc[mj][nt][2], acc[mj][nt][3]);
    }
}

// ---- host policy ----------------------------------------------------------------------------------------

// Tokens per chunk: one wave of resident blocks over (column blocks x chunks), whole tiles per chunk.
int64_t chunk_tokens(int64_t T, int64_t col_blocks, int blocks_per_sm, int tile, int64_t min_tokens) {
  const int64_t slots = int64_t(blocks_per_sm) * current_device_info().sm_count;
  const int64_t chunks = std::max<int64_t>(1, slots / col_blocks);
  const int64_t per = (T + chunks - 1) / chunks;
  return std::max<int64_t>(min_tokens, (per + tile - 1) / tile * tile);
}

template <int N> int64_t grad_fn_chunk_tokens(int64_t T, int64_t C) {
  using G = GfGeom<N>;
  return chunk_tokens(T, (int64_t(N) * C + G::W - 1) / G::W, G::kBlocksPerSm, G::KT, G::kMinChunkTokens);
}

template <int N, int kU> void launch_grad_x(const PreBwdSplitArgs& a, cudaStream_t stream) {
  const int64_t nC = int64_t(N) * a.C;
  using G = GxGeom<N, kU>;
  const int64_t col_blocks = (nC + G::W - 1) / G::W;
  const int64_t per = chunk_tokens(a.T, col_blocks, G::kMinBlocks, G::TT, G::TT);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>((a.T + per - 1) / per));
  // the present terms as template flags: no per-token branches on null pointers
  auto run = [&](auto fn_t, auto g_t, auto acc_t) {
    grad_x_split<N, kU, decltype(fn_t)::value, decltype(g_t)::value, decltype(acc_t)::value>
        <<<grid, G::kThreads, 0, stream>>>(a, per);
    MHC_CUDA_CHECK_LAUNCH();
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  const bool g = a.g != nullptr, ac = a.accum != nullptr;
  if (a.fn) {
    if (g && ac) run(T_{}, T_{}, T_{});
    else if (g) run(T_{}, T_{}, F_{});
    else if (ac) run(T_{}, F_{}, T_{});
    else run(T_{}, F_{}, F_{});
  } else if constexpr (kU == 2) {  // static mode streams only h g + accum: bandwidth-bound either way
    if (g && ac) run(F_{}, T_{}, T_{});
    else if (g) run(F_{}, T_{}, F_{});
    else if (ac) run(F_{}, F_{}, T_{});
    else run(F_{}, F_{}, F_{});  // every upstream gradient absent: grad_x = 0
  }
}

template <int N> int launch_n(const PreBwdSplitArgs& a, bool u4, cudaStream_t stream) {
  const int64_t nC = int64_t(N) * a.C;
  bool done = false;
  if constexpr (N <= 4) {
    if (u4 && a.fn) launch_grad_x<N, 4>(a, stream), done = true;
  }
  if (!done) launch_grad_x<N, 2>(a, stream);
  if (!a.fn) return 0;
  using G = GfGeom<N>;
  const int64_t per = grad_fn_chunk_tokens<N>(a.T, a.C);
  const int chunks = static_cast<int>((a.T + per - 1) / per);
  allow_dynamic_smem(grad_fn_split<N>, G::kSmem);
  const dim3 grid(static_cast<unsigned>((nC + G::W - 1) / G::W), static_cast<unsigned>(chunks));
  grad_fn_split<N><<<grid, G::kThreads, G::kSmem, stream>>>(a, per);
  MHC_CUDA_CHECK_LAUNCH();
  return chunks;
}

}  // namespace

// "split", or "split-u4" (grad_x with 4-token steps for n <= 4, to measure against the default 2)
bool pre_bwd_split_requested() {
  const char* v = std::getenv("MHC_CUDA_PRE_BWD");
  return v && (std::strcmp(v, "split") == 0 || std::strcmp(v, "split-u4") == 0);
}

bool pre_bwd_split_shape_ok(DType dtype, int64_t n, int64_t C) {
  return dtype == DType::bf16 && (n == 2 || n == 4 || n == 8) && C > 0 && C % 8 == 0;
}

int pre_bwd_split_chunks(DType dtype, int64_t T, int64_t n, int64_t C, bool has_fn) {
  if (!has_fn || T <= 0 || !pre_bwd_split_shape_ok(dtype, n, C)) return 0;
  int64_t per = 1;
  dispatch_streams(static_cast<int>(n), [&](auto nc) {
    constexpr int N = decltype(nc)::value;
    if constexpr (N > 0) per = grad_fn_chunk_tokens<N>(T, C);
  });
  return static_cast<int>((T + per - 1) / per);
}

int pre_bwd_split_launch(const PreBwdSplitArgs& a, cudaStream_t stream) {
  const char* v = std::getenv("MHC_CUDA_PRE_BWD");
  const bool u4 = v && std::strcmp(v, "split-u4") == 0;
  int chunks = 0;
  dispatch_streams(a.n, [&](auto nc) {
    constexpr int N = decltype(nc)::value;
    if constexpr (N > 0) chunks = launch_n<N>(a, u4, stream);
  });
  return chunks;
}

}  // namespace mhc::cuda_impl
