// Wave pre (n in {2, 4}, 16-bit streams): one persistent launch that reads x from device memory once.
//
// The streaming pre (pre_stream.cu) reads x twice, once to project it and once to aggregate it: (2n + 1)C bytes
// per token against the floor's (n + 1)C. Here the tokens are cut into waves of about 16 MB of x, small enough to
// stay in L2 between the two reads. Every block keeps one k-slice of fn in shared memory for the whole launch and,
// for each wave w:
//   1. project: the split-K partial projection (mixes and sum of squares) of its token tile of wave w over its
//      k-slice, on tensor cores (16-bit x exact, fn = hi + lo as in pre_stream.cu), x through a cp.async ring.
//      The partial row is parked in the token's layer_input row at slot = k-slice, then the block raises wave
//      w's arrival counter.
//   2. coefficients and aggregate of wave w - 1, once every block has arrived there: for the block's share of
//      that wave's tokens, the fixed-order sum of the k-slices' partial rows, rstd, the sigmoids and layer_input =
//      sum_i h_pre[i] x[i], x now read from L2 (comb's Sinkhorns wait for the end of the launch).
// Only the ring's prefetched stages load while step 2 runs: measured on the H200, step 2 takes 44 % of a block's
// cycles with DRAM idle, and the kernel is slower than the streaming pre, so it is off by default (MHC_CUDA_PRE=wave
// selects it; docs/cuda_notes.md, "The wave pre", has the figures and the warp-specialised fix). Deterministic: every
// sum has a fixed order and the counters are integers. Every block must be resident at once (a block waits for
// all the others): the launch is cooperative, and the counters (one int per wave) are a caller-owned workspace
// that the host zeroes on the stream before the launch.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cuda/coefficients.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/pre_stream.hpp"
#include "cuda/sinkhorn.cuh"
#include "cuda/tuning.hpp"

namespace mhc::cuda_impl {

namespace {

using std::int64_t;

// ---- geometry ------------------------------------------------------------------------------------------------
constexpr int kThreads = 256;
constexpr int kChunk = 128;          // k elements per ring stage and token (256 bytes of 16-bit x)
constexpr int kTile = 64;            // tokens of a block's tile in each wave
constexpr int kStages = 5;           // ring depth
constexpr int kMaxSliceChunks = 8;   // chunks of fn resident per block (its k-slice)
constexpr int kMaxShare = 64;        // tokens a block aggregates per wave (kTile / slices, slices >= 1)
constexpr int kXRow = kChunk + 8;    // 272 bytes: an odd number of 16-byte units (ldmatrix rows on distinct banks)
constexpr int64_t kWaveBytes = int64_t(24) << 20;  // most x bytes per wave (two waves live in the 60 MB L2)

// Warp tiling of a stage (kTile tokens x kChunk k): warp w holds k-step w (16 k) of every chunk for all the
// stage's m-tiles (16 tokens each) and column tiles, so each B fragment it loads serves every m-tile.
template <int N> struct WaveShape {
  static constexpr int M = N * N + 2 * N;
  static constexpr int PART = M + 1;  // projection row + sum of squares
  static constexpr int NT = M / 8;    // column tiles of 8: 1 or 3
  static constexpr int MTILES = kTile / 16;
  static constexpr int KSTEPS = kChunk / 16;  // = warps
  static constexpr int SLOTS = 4;             // scratch copies the 8 warps' sums meet in (two rounds)
  static_assert(NT * 8 == M && KSTEPS * 32 == kThreads && 2 * SLOTS * 32 == kThreads, "stage must tile the warps");
};

// Dynamic shared memory (bytes), in order: the ring, the resident fn slice (split into hi + lo halves of x's type
// and laid out as B fragments: per chunk [k-step][row][t] of {hi b0, hi b1, lo b0, lo b1}, one 16-byte load per
// fragment pair and lane), the warps' partial sums, and the aggregate's token sums, h_pre and scratch.
template <class S, int N> struct WaveSmem {
  using Sh = WaveShape<N>;
  static constexpr int STAGE = kTile * kXRow * int(sizeof(S));
  static constexpr int FN_CHUNK = Sh::KSTEPS * Sh::M * 4 * 16;
  static constexpr int RING = kStages * STAGE;
  static constexpr int TAIL = (Sh::SLOTS * kTile * Sh::PART + kMaxShare * Sh::PART + kMaxShare * N + kThreads) * 4;
  static int bytes(int slice_chunks) { return RING + slice_chunks * FN_CHUNK + TAIL; }
  static_assert(STAGE % 128 == 0 && FN_CHUNK % 16 == 0, "stages stay 128-byte aligned");
};

template <class S> struct WaveArgs {
  const S* x;            // [T, N, C]
  const float* fn;       // [M, N*C]
  const float* base;     // [M]
  const float* scale;    // [3] or null
  S* layer_input;        // [T, C]: holds the parked partial rows until the aggregate overwrites it
  float* h_pre;          // [T, N]
  float* h_post;         // [T, N]
  float* comb;           // [T, N, N]
  float* mixes;          // [T, M] or null
  float* rstd;           // [T] or null
  int* arrived;          // [waves]: blocks done projecting each wave (zero on entry)
  int64_t T, C;
  int slices;            // k-slices; block b projects slice b / tiles ...
  int slice_chunks;      // ... of this many chunks ...
  int tiles;             // ... for token tile b % tiles of every wave
  int waves;
  int probe;             // MHC_CUDA_WAVE_PROBE (diagnosis only): 1 prints per-phase cycles of a few blocks,
                         // 2 also skips the waits (wrong results), 3 skips the aggregates (wrong results)
  SiteConsts<float> k;
};

template <class S> __device__ __forceinline__ float* parked(S* layer_input, int64_t t, int64_t C) {
  return reinterpret_cast<float*>(layer_input + t * C);
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

template <class S, int N>
__global__ void __launch_bounds__(kThreads, 1) pre_wave_kernel(const WaveArgs<S> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Sh = WaveShape<N>;
  using L = WaveSmem<S, N>;
  constexpr int M = Sh::M, PART = Sh::PART, P = kPack<S>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int cps = a.slice_chunks;
  S* const ring = reinterpret_cast<S*>(smem);
  uint4* const fn_s = reinterpret_cast<uint4*>(smem + L::RING);
  float* const scratch = reinterpret_cast<float*>(smem + L::RING + cps * L::FN_CHUNK);  // [SLOTS, kTile, PART]
  float* const sums = scratch + Sh::SLOTS * kTile * PART;                              // [kMaxShare, PART]
  float* const hp = sums + kMaxShare * PART;                                           // [kMaxShare, N]
  float* const ways_sum = hp + kMaxShare * N;                                          // [kThreads]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int64_t T = a.T, C = a.C, K = int64_t(N) * C;
  const int grid = static_cast<int>(gridDim.x);
  const int slice = static_cast<int>(blockIdx.x) / a.tiles, tile = static_cast<int>(blockIdx.x) % a.tiles;
  const int64_t k_begin = int64_t(slice) * cps * kChunk;
  const int64_t wave_tokens = int64_t(a.tiles) * kTile;
  const int total = a.waves * cps;  // the block's chunks: wave-major, then the slice's chunks

  // ---- 1. ring loads: chunk q of the block's sequence into stage s, zero past T and K; one commit group per
  // call (empty past the end, so the group count stays uniform)
  auto issue = [&](int q, int s) {
    if (q < total) {
      const int w = q / cps, c = q % cps;
      const int64_t t0 = w * wave_tokens + int64_t(tile) * kTile, k0 = k_begin + int64_t(c) * kChunk;
      S* xs = ring + s * (kTile * kXRow);
      for (int i = tid; i < kTile * (kChunk / P); i += kThreads) {
        const int tl = i / (kChunk / P), kp = (i % (kChunk / P)) * P;
        const int64_t t = t0 + tl, k = k0 + kp;
        const bool valid = t < T && k < K;
        cp_async16(xs + tl * kXRow + kp, valid ? a.x + t * K + k : a.x, valid);
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s, s);

  // ---- 2. the block's fn slice, split into hi + lo once and resident for the whole launch (made while the
  // ring's first loads are in flight; zero past K)
  for (int i = tid; i < cps * Sh::KSTEPS * M * 4; i += kThreads) {
    const int t4 = i % 4, j = i / 4 % M, ks = i / (4 * M) % Sh::KSTEPS, c = i / (4 * M * Sh::KSTEPS);
    const int64_t k = k_begin + int64_t(c) * kChunk + ks * 16 + 2 * t4;  // even, and K is a multiple of 8
    const float* row = a.fn + j * K;
    const float2 b0 = k < K ? __ldg(reinterpret_cast<const float2*>(row + k)) : float2{0.f, 0.f};
    const float2 b1 = k + 8 < K ? __ldg(reinterpret_cast<const float2*>(row + k + 8)) : float2{0.f, 0.f};
    uint4 o;
    split_pair<S>(b0, o.x, o.z);
    split_pair<S>(b1, o.y, o.w);
    fn_s[i] = o;
  }

  // ---- 3. a stage's projection and squares on tensor cores. The squares are the diagonal of the m-tile's
  // x x^T, from the A fragments already loaded (two more mma per m-tile instead of unpacking and squaring on
  // the ALUs): D[r][c] of the first holds tokens (r, c), of the second (r, c + 8).
  float acc[Sh::MTILES][Sh::NT][4];
  float gram[Sh::MTILES][2][4];
  auto clear = [&] {
#pragma unroll
    for (int mt = 0; mt < Sh::MTILES; ++mt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) gram[mt][0][e] = gram[mt][1][e] = 0.f;
#pragma unroll
      for (int nt = 0; nt < Sh::NT; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
    }
  };
  auto mma_stage = [&](const S* xs, const uint4* fc) {
    std::uint32_t hi[Sh::NT][2], lo[Sh::NT][2];
#pragma unroll
    for (int nt = 0; nt < Sh::NT; ++nt) {
      const uint4 v = fc[(warp * M + nt * 8 + g) * 4 + tq];
      hi[nt][0] = v.x, hi[nt][1] = v.y, lo[nt][0] = v.z, lo[nt][1] = v.w;
    }
#pragma unroll
    for (int mt = 0; mt < Sh::MTILES; ++mt) {
      std::uint32_t af[4];
      ldmatrix_x4(af, xs + (mt * 16 + (lane & 15)) * kXRow + warp * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nt = 0; nt < Sh::NT; ++nt) {
        mma_16816<S>(acc[mt][nt], af, lo[nt]);
        mma_16816<S>(acc[mt][nt], af, hi[nt]);
      }
      const std::uint32_t first[2] = {af[0], af[2]}, second[2] = {af[1], af[3]};
      mma_16816<S>(gram[mt][0], af, first);
      mma_16816<S>(gram[mt][1], af, second);
    }
  };

  // ---- 4. end of wave w's projection: the 8 warps' sums meet in SLOTS scratch copies in two rounds (warps 0-3
  // store, warps 4-7 add), are summed over the copies in a fixed order and parked as partial row `slice` of the
  // tile's tokens; then the wave's counter is raised
  auto finish_wave = [&](int w) {
    float* slot = scratch + (warp % Sh::SLOTS) * (kTile * PART);
    const bool diag = (g >> 1) == tq;  // this lane holds x x^T's diagonal for tokens g and g + 8
    const int e = g & 1;
    for (int round = 0; round < 2; ++round) {
      if (warp / Sh::SLOTS == round) {
#pragma unroll
        for (int mt = 0; mt < Sh::MTILES; ++mt) {
          const int row = mt * 16 + g;
#pragma unroll
          for (int nt = 0; nt < Sh::NT; ++nt) {
            float* d = slot + row * PART + nt * 8 + 2 * tq;
            if (round == 0) {
              d[0] = acc[mt][nt][0], d[1] = acc[mt][nt][1];
              d[8 * PART] = acc[mt][nt][2], d[8 * PART + 1] = acc[mt][nt][3];
            } else {
              d[0] += acc[mt][nt][0], d[1] += acc[mt][nt][1];
              d[8 * PART] += acc[mt][nt][2], d[8 * PART + 1] += acc[mt][nt][3];
            }
          }
          if (diag) {  // selects, not indexing by e: the accumulators stay in registers
            const float own = e ? gram[mt][0][1] : gram[mt][0][0], own8 = e ? gram[mt][1][3] : gram[mt][1][2];
            float* d = slot + row * PART + M;
            if (round == 0) d[0] = own, d[8 * PART] = own8;
            else d[0] += own, d[8 * PART] += own8;
          }
        }
      }
      __syncthreads();
    }
    const int64_t t0 = w * wave_tokens + int64_t(tile) * kTile;
    for (int i = tid; i < kTile * PART; i += kThreads) {
      const int64_t t = t0 + i / PART;
      float v = scratch[i];
#pragma unroll
      for (int c = 1; c < Sh::SLOTS; ++c) v += scratch[c * (kTile * PART) + i];
      if (t < T) parked(a.layer_input, t, C)[slice * PART + i % PART] = v;
    }
    __threadfence();  // this thread's parked rows are visible device-wide before the count says so
    __syncthreads();
    if (tid == 0) atomicAdd(a.arrived + w, 1);
  };

  // ---- 5. coefficients and aggregate of wave w, for the block's share of its tokens
  const float s_pre = scale_of(a.scale, 0), s_post = scale_of(a.scale, 1), s_res = scale_of(a.scale, 2);
  long long cycles_wait = 0, cycles_agg = 0, cycles_begin = clock64();
  auto coefficients_and_aggregate = [&](int w) {
    const long long c0 = clock64();
    if (tid == 0 && a.probe != 2)
      while (load_acquire(a.arrived + w) < grid) __nanosleep(64);
    __syncthreads();
    const long long c1 = clock64();
    cycles_wait += c1 - c0;
    if (a.probe == 3) return;
    const int64_t w0 = w * wave_tokens, in_wave = std::min(T, w0 + wave_tokens) - w0;
    const int64_t t0 = w0 + in_wave * blockIdx.x / grid;
    const int tokens = static_cast<int>(w0 + in_wave * (blockIdx.x + 1) / grid - t0);
    if (tokens == 0) return;  // block-uniform

    // 5a. fixed-order sum over the k-slices; `ways` threads share a (token, column) pair when pairs are few,
    // each summing a contiguous range of slices (read through L2: other blocks wrote them)
    const int pairs = tokens * PART;
    const int ways = std::max(1, std::min(a.slices, kThreads / pairs));
    const int per_way = (a.slices + ways - 1) / ways;
    for (int q = tid; q < pairs * ways; q += kThreads) {
      const int p = q / ways, wy = q % ways;
      const float* src = parked(a.layer_input, t0 + p / PART, C) + p % PART;
      const int s_end = std::min(a.slices, (wy + 1) * per_way);
      float v = 0.f;
      int s = wy * per_way;
      for (; s + 4 <= s_end; s += 4) {  // four loads in flight, added in order
        const float v0 = __ldcg(src + s * PART), v1 = __ldcg(src + (s + 1) * PART);
        const float v2 = __ldcg(src + (s + 2) * PART), v3 = __ldcg(src + (s + 3) * PART);
        v = (((v + v0) + v1) + v2) + v3;
      }
      for (; s < s_end; ++s) v += __ldcg(src + s * PART);
      if (ways == 1) sums[p] = v;
      else ways_sum[q] = v;
    }
    __syncthreads();
    if (ways > 1) {
      for (int p = tid; p < pairs; p += kThreads) {
        float v = 0.f;
        for (int wy = 0; wy < ways; ++wy) v += ways_sum[p * ways + wy];
        sums[p] = v;
      }
      __syncthreads();
    }

    // 5b. rstd, the sigmoids and comb's Sinkhorn input, a thread per token (the Sinkhorns run at the end, all
    // the block's tokens at once: one warp's serial chain per wave would hold the whole block)
    if (tid < tokens) {
      const int64_t t = t0 + tid;
      const float* row = sums + tid * PART;
      const float rstd = rstd_from(row[M], float(N * C), a.k.norm_eps);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        hp[tid * N + i] = sigmoid_fast(row[i] * rstd * s_pre + __ldg(a.base + i)) + a.k.pre_eps;
        a.h_pre[t * N + i] = hp[tid * N + i];
      }
      store_post_coefficients<N>(row, rstd, s_post, a.base, a.k, t, a.h_post, a.mixes, a.rstd);
#pragma unroll
      for (int r = 0; r < N * N; ++r) a.comb[t * N * N + r] = row[2 * N + r] * rstd * s_res + __ldg(a.base + 2 * N + r);
    }
    __syncthreads();  // h_pre of every token; the parked rows are all read: layer_input may be written

    // 5c. layer_input = sum_i h_pre[i] x[i], x from L2, kBatch work items (token tl, pack pk) in flight per thread
    constexpr int kBatch = N <= 2 ? 4 : 3;
    const int packs = static_cast<int>(C / P);
    int tl = tid / packs, pk = tid % packs;
    while (tl < tokens) {
      Pack<S> xp[kBatch][N];
      int at_t[kBatch], at_p[kBatch];
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        at_t[b] = tl, at_p[b] = pk;
        if (tl < tokens) {
#pragma unroll
          for (int i = 0; i < N; ++i) xp[b][i] = load_pack_stream(a.x + (t0 + tl) * K + i * C + int64_t(pk) * P);
        }
        pk += kThreads;
        if (pk >= packs) tl += pk / packs, pk %= packs;
      }
#pragma unroll
      for (int b = 0; b < kBatch; ++b) {
        if (at_t[b] >= tokens) break;
        float v[P];
#pragma unroll
        for (int e = 0; e < P; ++e) v[e] = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) {
          const float h = hp[at_t[b] * N + i];
#pragma unroll
          for (int e = 0; e < P; ++e) v[e] += h * to_math(xp[b][i].v[e]);
        }
        Pack<S> out;
#pragma unroll
        for (int e = 0; e < P; ++e) out.v[e] = from_math<S>(v[e]);
        store_pack(a.layer_input + (t0 + at_t[b]) * C + int64_t(at_p[b]) * P, out);
      }
    }
  };

  // ---- 6. comb = Sinkhorn of the inputs 5b stored there, for every token the block aggregated
  auto sinkhorns = [&] {
    __syncthreads();  // this block's comb inputs are written (by other threads of the block)
    for (int w = 0; w < a.waves; ++w) {
      const int64_t w0 = w * wave_tokens, in_wave = std::min(T, w0 + wave_tokens) - w0;
      const int64_t t0 = w0 + in_wave * blockIdx.x / grid;
      const int tokens = static_cast<int>(w0 + in_wave * (blockIdx.x + 1) / grid - t0);
      for (int tl = tid; tl < tokens; tl += kThreads) {
        float* c = a.comb + (t0 + tl) * N * N;
        float p[N * N];
#pragma unroll
        for (int r = 0; r < N * N; ++r) p[r] = c[r];
        sinkhorn_forward_reg<N, true>(p, a.k.eps, a.k.iters);
#pragma unroll
        for (int r = 0; r < N * N; ++r) c[r] = p[r];
      }
    }
  };

  // ---- the launch: project wave w through the ring, then aggregate wave w - 1 while wave w + 1 loads
  clear();
  int stage = 0;
  for (int q = 0; q < total; ++q) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // chunk q (and fn) visible to all; every warp is done with the stage refilled next
    issue(q + kStages - 1, stage == 0 ? kStages - 1 : stage - 1);
    mma_stage(ring + stage * (kTile * kXRow), fn_s + (q % cps) * (L::FN_CHUNK / 16));
    stage = stage == kStages - 1 ? 0 : stage + 1;
    if (q % cps == cps - 1) {
      const int w = q / cps;
      finish_wave(w);
      if (w >= 1) {
        const long long c = clock64();
        coefficients_and_aggregate(w - 1);
        cycles_agg += clock64() - c;
      }
      clear();  // after the aggregate: the zeros need no registers there
    }
  }
  cp_async_wait<0>();
  const long long c_last = clock64();
  coefficients_and_aggregate(a.waves - 1);
  cycles_agg += clock64() - c_last;
  sinkhorns();
  if (a.probe && tid == 0 && (blockIdx.x == 0 || blockIdx.x == 1 || blockIdx.x == gridDim.x - 1))
    printf("wave probe block %d: total %lld cycles, waiting %lld, aggregating (with the waits) %lld, waves %d\n", int(blockIdx.x),
           clock64() - cycles_begin, cycles_wait, cycles_agg, a.waves);
#endif
}

// ---- host side ------------------------------------------------------------------------------------------------

struct WavePlan {
  int slices = 0, slice_chunks = 0, tiles = 0, waves = 0;
  int64_t wave_tokens = 0;
  int blocks() const { return slices * tiles; }
};

// The k-slicing that keeps the most SMs busy on real chunks: slices x tiles blocks (at most one per SM), each
// slice at most kMaxSliceChunks chunks, every token's partial rows parked in its layer_input row. Ties go to the
// longer slices (fewer partial rows). False when no slicing fits.
bool plan_wave(WavePlan& p, int64_t T, int64_t C, int n, int part, int elem_bytes, int sms) {
  const int64_t chunks = (int64_t(n) * C + kChunk - 1) / kChunk;
  const int64_t parked_rows = C * elem_bytes / (4 * int64_t(part));
  double best = 0;
  for (int cps = 1; cps <= kMaxSliceChunks; ++cps) {
    const int64_t slices = (chunks + cps - 1) / cps;
    if (slices > parked_rows || slices > sms) continue;
    const int64_t tiles_by_sm = sms / slices;
    const char* mb = std::getenv("MHC_CUDA_WAVE_MB");  // diagnosis: another wave size
    const int64_t wave_bytes = mb && std::atoi(mb) > 0 ? (int64_t(std::atoi(mb)) << 20) : kWaveBytes;
    const int64_t tiles_by_l2 = std::max<int64_t>(1, wave_bytes / (int64_t(kTile) * n * C * elem_bytes));
    const int64_t tiles = std::min(tiles_by_sm, tiles_by_l2);
    const double use = double(chunks) / double(slices * cps) * double(slices * tiles) / sms;
    if (use >= best - 1e-9) {
      best = use;
      p.slices = static_cast<int>(slices), p.slice_chunks = cps, p.tiles = static_cast<int>(tiles);
    }
  }
  if (best == 0) return false;
  p.wave_tokens = int64_t(p.tiles) * kTile;
  const int64_t waves = (T + p.wave_tokens - 1) / p.wave_tokens;
  if (waves > (int64_t(1) << 30)) return false;
  p.waves = static_cast<int>(waves);
  return true;
}

// The shapes the wave kernel takes: 16-bit streams, n in {2, 4}, fn present, 16-byte aligned rows, a workspace.
bool wave_shape_ok(const PreForward& a) {
  const int n = static_cast<int>(a.x.shape[1]);
  return a.fn.present() && (a.x.dtype == DType::bf16 || a.x.dtype == DType::f16) && (n == 2 || n == 4) &&
         a.x.shape[2] % 8 == 0 && aligned16({&a.x, &a.layer_input, &a.fn});
}

// Whether the wave kernel runs for this call: MHC_CUDA_PRE=wave forces it where it can run, `stream` / `fused` /
// `cluster` turn it off. By default it is off (tuning key `wave` = 1 turns it on for a shape): on the H200 it is
// slower than the streaming pre at every measured shape (docs/cuda_notes.md, "The wave pre").
bool wave_wanted(const PreForward& a) {
  const char* v = std::getenv("MHC_CUDA_PRE");
  if (v && *v) return std::strcmp(v, "wave") == 0;
  const TuningKey key{"pre_forward", static_cast<int>(a.x.shape[1]), a.x.dtype, a.x.shape[2], a.x.shape[0]};
  return tuned(key, "wave", 0) != 0;
}

// f(TypeTag<S>{}, integral_constant<int, N>{}) through the backend's dtype and stream-count dispatch, instantiated
// only for what wave_shape_ok admits (16-bit S, N in {2, 4}); false for anything else.
template <class F> bool with_wave_types(const PreForward& a, F&& f) {
  return dispatch_storage(a.x.dtype, [&](auto tag) -> bool {
    using S = typename decltype(tag)::type;
    return dispatch_streams(static_cast<int>(a.x.shape[1]), [&](auto nc) -> bool {
      constexpr int N = decltype(nc)::value;
      if constexpr ((std::is_same_v<S, __nv_bfloat16> || std::is_same_v<S, __half>) && (N == 2 || N == 4))
        return f(tag, nc);
      else
        return false;
    });
  });
}

// The plan of a call, or false when the wave kernel does not run for it.
bool wave_plan_for(const PreForward& a, WavePlan& p) {
  if (a.x.shape[0] == 0 || !wave_shape_ok(a) || !wave_wanted(a)) return false;
  const int n = static_cast<int>(a.x.shape[1]);
  const int elem = 2, part = n * n + 2 * n + 1;
  const DeviceInfo& dev = current_device_info();
  if (dev.major < 9) return false;
  if (!plan_wave(p, a.x.shape[0], a.x.shape[2], n, part, elem, dev.sm_count)) return false;
  return with_wave_types(a, [&](auto tag, auto nc) {
    using S = typename decltype(tag)::type;
    constexpr int N = decltype(nc)::value;
    const int smem = WaveSmem<S, N>::bytes(p.slice_chunks);
    if (smem > dev.max_smem_optin) return false;
    allow_dynamic_smem(&pre_wave_kernel<S, N>, std::size_t(smem));
    return resident_blocks_per_sm(&pre_wave_kernel<S, N>, kThreads, smem) >= 1;
  });
}

}  // namespace

std::size_t pre_wave_workspace_bytes(const PreForward& a) {
  WavePlan p;
  if (!wave_plan_for(a, p)) return 0;
  return (std::size_t(p.waves) * sizeof(int) + 15) / 16 * 16;
}

bool pre_wave_forward(const PreForward& a, const MhcConfig& cfg, cudaStream_t stream) {
  WavePlan p;
  if (!a.workspace.present() || !wave_plan_for(a, p)) return false;
  if (a.workspace.numel() * dtype_size(a.workspace.dtype) < std::int64_t(p.waves) * int64_t(sizeof(int))) return false;
  return with_wave_types(a, [&](auto tag, auto nc) {
    using S = typename decltype(tag)::type;
    constexpr int N = decltype(nc)::value;
    WaveArgs<S> w{};
    w.x = a.x.ptr<const S>();
    w.fn = a.fn.ptr<const float>();
    w.base = a.base.ptr<const float>();
    w.scale = data_or_null<const float>(a.scale);
    w.layer_input = a.layer_input.ptr<S>();
    w.h_pre = a.h_pre.ptr<float>();
    w.h_post = a.h_post.ptr<float>();
    w.comb = a.comb.ptr<float>();
    w.mixes = data_or_null<float>(a.mixes);
    w.rstd = data_or_null<float>(a.rstd);
    w.arrived = static_cast<int*>(a.workspace.data);
    w.T = a.x.shape[0];
    w.C = a.x.shape[2];
    w.slices = p.slices;
    w.slice_chunks = p.slice_chunks;
    w.tiles = p.tiles;
    w.waves = p.waves;
    w.k = site_consts<float>(cfg);
    const char* probe = std::getenv("MHC_CUDA_WAVE_PROBE");
    w.probe = probe ? std::atoi(probe) : 0;
    MHC_CUDA_CHECK(cudaMemsetAsync(w.arrived, 0, std::size_t(p.waves) * sizeof(int), stream));
    cudaLaunchConfig_t lc{};
    lc.gridDim = dim3(static_cast<unsigned>(p.blocks()));
    lc.blockDim = dim3(kThreads);
    lc.dynamicSmemBytes = std::size_t(WaveSmem<S, N>::bytes(p.slice_chunks));
    lc.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;  // every block resident at once, or the launch fails
    attr[0].val.cooperative = 1;
    lc.attrs = attr;
    lc.numAttrs = 1;
    MHC_CUDA_CHECK(cudaLaunchKernelEx(&lc, &pre_wave_kernel<S, N>, w));
    return true;
  });
}

}  // namespace mhc::cuda_impl
