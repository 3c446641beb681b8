// Streaming pre and fused post+pre (n in {2, 4, 8}, 16-bit streams): no thread-block clusters, x read at
// full bandwidth, two launches, deterministic (fixed-order sums, no float atomics).
//
//   A. project_kernel: mixes = x @ fn^T and the sum of squares of x, as a split-K GEMM on tensor cores.
//      The (token tile, k chunk) pairs of the whole op form one sequence cut into equal runs, one run per
//      block of a persistent grid (stream-K: every block gets the same number of chunks whatever T and C).
//      x and fn pass through a 3-stage cp.async ring in shared memory; 16-bit x is exact in the mma and fn
//      is split into hi + lo halves of x's type (two mma: fp32-level accuracy). Each (tile, run) pair
//      yields one partial row of m + 1 floats per token, parked in the token's own layer_input row
//      (C * sizeof(S) bytes; B writes that row only after reading them), so the op needs no workspace.
//      When B splits the channels into slices, every slice gets its own copy, inside its own channels.
//      The fused post+pre loads x and y of the post instead, computes the x_next tile in shared memory
//      (storing it to device memory) and projects that.
//   B. coef_aggregate_kernel: a block per group of tokens (and channel slice): fixed-order sum of the
//      parked partials, rstd, the sigmoids and, on one warp, Sinkhorn (a thread per token, matrix in
//      registers) while the other warps stream layer_input = sum_i h_pre[i] x[i].
//
// Bytes per token: pre reads x in A and again in B and writes layer_input: (2n + 1)C. Post+pre reads x, y
// and writes x_next in A, reads x_next in B and writes layer_input: (3n + 2)C, the floor of a chained site.
// On sm_90 B is a programmatic dependent launch of A: its blocks start as A's finish and, for pre, load
// their first x packs before waiting for A's partials.
#include "cuda/pre_stream.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda/coefficients.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/sinkhorn.cuh"
#include "cuda/tuning.hpp"

namespace mhc::cuda_impl {

namespace {

using std::int64_t;

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kChunk = 128;   // k elements of x per chunk and token: 256 bytes of 16-bit x
constexpr int kMaxGroup = 8;  // tokens per block of B

// ---- programmatic dependent launch (sm_90; no-ops when the launch did not ask for it) ---------------
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// ================================ A. projection partials ===========================================

// Warp tiling of one chunk for N streams and MT tokens: warp (wm, wn, wk) holds MTW of the MTILES
// m-tiles, NTW of the NT column tiles and KSW of the 8 k-steps of 16.
template <int N, int MT> struct ProjShape {
  static constexpr int M = N * N + 2 * N;
  static constexpr int PART = M + 1;                 // projection row + sum of squares
  static constexpr int NT = M / 8;                   // column tiles of 8: 1, 3 or 10
  static constexpr int MTILES = MT / 16;
  static constexpr int WM = MT == 128 ? 2 : 1;       // warps splitting the m-tiles
  static constexpr int WN = N == 8 ? 2 : 1;          // warps splitting the column tiles
  static constexpr int WK = kWarps / (WM * WN);      // warps splitting the k-steps of a chunk
  static constexpr int MTW = MTILES / WM, NTW = NT / WN;
  static constexpr int KSW = kChunk / 16 / WK;       // k-steps per warp and chunk
  static constexpr int KCC = kChunk / N;             // post+pre: channels of every stream per chunk
  // Row strides of a stage. x: 272 bytes, an odd number of 16-byte units (ldmatrix rows hit distinct
  // banks). fn: 136 floats = 8 mod 32 (the float2 reads of a B fragment hit distinct banks).
  static constexpr int XROW = kChunk + 8;
  static constexpr int FROW = kChunk + 8;
  // Register budget: two blocks per SM for n <= 4 with 16- and 64-token tiles, else one.
  static constexpr int MIN_BLOCKS = (N == 8 || MT == 128) ? 1 : 2;
  static_assert(NT * 8 == M && NTW * WN == NT && MTW * WM == MTILES && KSW * WK * 16 == kChunk,
                "chunk must tile the warps");
};

// Shared memory of project_kernel (bytes): STAGES stages of {x tile, y tile (post+pre), fn chunk}, then
// the scratch in which the warps' partials are summed. The ring is as deep as the SM's shared memory
// allows for MIN_BLOCKS blocks (at most 5): the loads of a stage complete together, so the bytes in flight
// per SM, not the bandwidth, bound a shallow ring (measured: 3 stages of 64-token tiles moved 2.2 TB/s).
constexpr int kSmemPerSm = 233472, kSmemPerBlockMax = 232448, kSmemReserved = 1024;
template <class S, int N, int MT, bool kPost> struct ProjSmem {
  using Sh = ProjShape<N, MT>;
  static constexpr int X = MT * Sh::XROW * int(sizeof(S));
  static constexpr int Y = kPost ? MT * Sh::KCC * int(sizeof(S)) : 0;
  static constexpr int F = Sh::M * Sh::FROW * 4;
  static constexpr int STAGE = (X + Y + F + 127) / 128 * 128;
  static constexpr int SCRATCH = MT * Sh::PART * 4;
  static constexpr int BUDGET = std::min(kSmemPerBlockMax, kSmemPerSm / Sh::MIN_BLOCKS - kSmemReserved);
  static constexpr int STAGES = std::min(5, (BUDGET - SCRATCH) / STAGE);
  static constexpr int TOTAL = STAGES * STAGE + SCRATCH;
  static_assert(STAGES >= 2, "a ring needs two stages");
};

template <class S> struct ProjArgs {
  const S* x;               // pre: [T, N, C]; post+pre: the post's x
  const S* y;               // post+pre: [T, C]
  const float* post_h;      // post+pre: [T, N]
  const float* post_comb;   // post+pre: [T, N, N]
  S* x_next;                // post+pre: [T, N, C]
  const float* fn;          // [M, N*C]
  S* layer_input;           // [T, C]: the partials are parked in its rows
  int copies;               // one copy of every partial row per channel slice of B ...
  int64_t copy_stride;      // ... this many floats apart
  int64_t T, C;
  int64_t chunks_per_tile;  // k chunks of one token tile
  int64_t total_chunks;     // tiles * chunks_per_tile
  int64_t per_block;        // chunks of each block's run
};

// Token t's parked partials: partial row `slot` at [slot * PART, (slot + 1) * PART).
template <class S> __device__ __forceinline__ float* parked(S* layer_input, int64_t t, int64_t C) {
  return reinterpret_cast<float*>(layer_input + t * C);
}

// Block of the first run that touches tile `tile`: partial row `slot` of the tile is block first + slot's.
__host__ __device__ __forceinline__ int64_t first_run(int64_t tile, int64_t chunks_per_tile, int64_t per_block) {
  return tile * chunks_per_tile / per_block;
}
__host__ __device__ __forceinline__ int runs_of_tile(int64_t tile, int64_t chunks_per_tile, int64_t per_block) {
  return static_cast<int>(((tile + 1) * chunks_per_tile - 1) / per_block - first_run(tile, chunks_per_tile, per_block) + 1);
}

// Position of a chunk in the op's sequence: token tile and k chunk within the tile (32-bit: a tile has at
// least 16 tokens of at least 8 elements, so tiles < 2^31 for any tensor that fits in memory).
struct ChunkCursor {
  int tile, kc;
  __device__ void advance(int chunks_per_tile) {
    if (++kc == chunks_per_tile) kc = 0, ++tile;
  }
};

// Post of one pack: x_next[t, o, c..] = h_post[t, o] y[t, c..] + sum_i comb[t, i, o] x[t, i, c..], in the post
// kernel's order of operations (so x_next is bit-identical whichever kernel writes it).
template <class S, int N>
__device__ __forceinline__ Pack<S> post_pack(const float* post_h, const float* post_comb, int64_t t, int o,
                                             const Pack<S> (&xp)[N], const Pack<S>& yp) {
  const float hp = __ldg(post_h + t * N + o);
  float cb[N];
#pragma unroll
  for (int i = 0; i < N; ++i) cb[i] = __ldg(post_comb + (t * N + i) * N + o);
  Pack<S> out;
#pragma unroll
  for (int e = 0; e < kPack<S>; ++e) {
    float acc = hp * to_math(yp.v[e]);
#pragma unroll
    for (int i = 0; i < N; ++i) acc += cb[i] * to_math(xp[i].v[e]);
    out.v[e] = from_math<S>(acc);
  }
  return out;
}

template <class S, int N, int MT, bool kPost>
__global__ void __launch_bounds__(kThreads, ProjShape<N, MT>::MIN_BLOCKS) project_kernel(const ProjArgs<S> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Sh = ProjShape<N, MT>;
  using L = ProjSmem<S, N, MT, kPost>;
  constexpr int M = Sh::M, PART = Sh::PART, P = kPack<S>, KCC = Sh::KCC, STAGES = L::STAGES;
  extern __shared__ __align__(128) unsigned char smem[];
  float* scratch = reinterpret_cast<float*>(smem + STAGES * L::STAGE);
  allow_dependent_launch();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int wn = warp % Sh::WN, wm = warp / Sh::WN % Sh::WM, wk = warp / (Sh::WN * Sh::WM);
  const int64_t C = a.C, K = int64_t(N) * C;
  const int cpt = static_cast<int>(a.chunks_per_tile);
  const int64_t q_begin = int64_t(blockIdx.x) * a.per_block;
  const int count = static_cast<int>(std::min(a.total_chunks, q_begin + a.per_block) - q_begin);  // chunks of the run
  auto stage_x = [&](int s) { return reinterpret_cast<S*>(smem + s * L::STAGE); };
  auto stage_y = [&](int s) { return reinterpret_cast<S*>(smem + s * L::STAGE + L::X); };
  auto stage_f = [&](int s) { return reinterpret_cast<float*>(smem + s * L::STAGE + L::X + L::Y); };

  // ---- 1. loads: chunk `at` into stage s, zero-filled past T and the row; one commit group per call
  // (empty past the run's end, so the group count stays uniform)
  auto issue = [&](bool live, ChunkCursor at, int s) {
    if (live) {
      const int64_t t0 = int64_t(at.tile) * MT;
      S* xs = stage_x(s);
      float* fs = stage_f(s);
      if constexpr (!kPost) {
        // x rows and fn rows are contiguous over k = i * C + c: chunk kc is k in [kc * 128, +128)
        const int64_t k0 = int64_t(at.kc) * kChunk;
        for (int i = threadIdx.x; i < MT * (kChunk / P); i += kThreads) {
          const int tl = i / (kChunk / P), kp = (i % (kChunk / P)) * P;
          const int64_t t = t0 + tl, k = k0 + kp;
          const bool valid = t < a.T && k < K;
          cp_async16(xs + tl * Sh::XROW + kp, valid ? a.x + t * K + k : a.x, valid);
        }
        for (int i = threadIdx.x; i < M * (kChunk / 4); i += kThreads) {
          const int j = i / (kChunk / 4), kp = (i % (kChunk / 4)) * 4;
          const bool valid = k0 + kp < K;
          cp_async16(fs + j * Sh::FROW + kp, valid ? a.fn + j * K + k0 + kp : a.fn, valid);
        }
      } else {
        // chunk kc is channels [kc * KCC, +KCC) of every stream: tile column st * KCC + cl
        const int64_t c0 = int64_t(at.kc) * KCC;
        for (int i = threadIdx.x; i < MT * N * (KCC / P); i += kThreads) {
          const int tl = i / (N * (KCC / P)), r = i % (N * (KCC / P));
          const int st = r / (KCC / P), cl = (r % (KCC / P)) * P;
          const int64_t t = t0 + tl, c = c0 + cl;
          const bool valid = t < a.T && c < C;
          cp_async16(xs + tl * Sh::XROW + st * KCC + cl, valid ? a.x + (t * N + st) * C + c : a.x, valid);
        }
        S* ys = stage_y(s);
        for (int i = threadIdx.x; i < MT * (KCC / P); i += kThreads) {
          const int tl = i / (KCC / P), cl = (i % (KCC / P)) * P;
          const int64_t t = t0 + tl, c = c0 + cl;
          const bool valid = t < a.T && c < C;
          cp_async16(ys + tl * KCC + cl, valid ? a.y + t * C + c : a.y, valid);
        }
        for (int i = threadIdx.x; i < M * N * (KCC / 4); i += kThreads) {
          const int j = i / (N * (KCC / 4)), r = i % (N * (KCC / 4));
          const int st = r / (KCC / 4), cl = (r % (KCC / 4)) * 4;
          const int64_t c = c0 + cl;
          const bool valid = c < C;
          cp_async16(fs + j * Sh::FROW + st * KCC + cl, valid ? a.fn + j * K + st * C + c : a.fn, valid);
        }
      }
    }
    cp_async_commit();
  };

  // ---- 2. post+pre: x_next = h_post * y + comb^T x, in place in the stage's x tile and to device memory
  auto post_chunk = [&](ChunkCursor at, int s) {
    const int64_t t0 = int64_t(at.tile) * MT, c0 = int64_t(at.kc) * KCC;
    S* xs = stage_x(s);
    const S* ys = stage_y(s);
    for (int i = threadIdx.x; i < MT * (KCC / P); i += kThreads) {
      const int tl = i / (KCC / P), cl = (i % (KCC / P)) * P;
      const int64_t t = t0 + tl, c = c0 + cl;
      if (t >= a.T || c >= C) continue;  // zero-filled: x_next is zero there too
      Pack<S> xp[N];
#pragma unroll
      for (int st = 0; st < N; ++st) xp[st] = *reinterpret_cast<const Pack<S>*>(xs + tl * Sh::XROW + st * KCC + cl);
      const Pack<S> yp = *reinterpret_cast<const Pack<S>*>(ys + tl * KCC + cl);
#pragma unroll 1  // one output stream at a time: the accumulators of the projection stay in registers
      for (int o = 0; o < N; ++o) {
        const Pack<S> out = post_pack<S, N>(a.post_h, a.post_comb, t, o, xp, yp);
        *reinterpret_cast<Pack<S>*>(xs + tl * Sh::XROW + o * KCC + cl) = out;
        store_pack(a.x_next + (t * N + o) * C + c, out);
      }
    }
  };

  // ---- 3. the chunk's projection and squares on tensor cores
  float acc[Sh::MTW][Sh::NTW][4];
  float sq[Sh::MTW][2];
  auto clear = [&] {
#pragma unroll
    for (int mt = 0; mt < Sh::MTW; ++mt) {
      sq[mt][0] = sq[mt][1] = 0.f;
#pragma unroll
      for (int nt = 0; nt < Sh::NTW; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
    }
  };
  auto mma_chunk = [&](const S* xs, const float* fs) {
#pragma unroll
    for (int ks = 0; ks < Sh::KSW; ++ks) {
      const int kk = (wk * Sh::KSW + ks) * 16;
      std::uint32_t hi[Sh::NTW][2], lo[Sh::NTW][2];
#pragma unroll
      for (int nt = 0; nt < Sh::NTW; ++nt) {
        const float* row = fs + ((wn * Sh::NTW + nt) * 8 + g) * Sh::FROW + kk + 2 * tq;
        split_pair<S>(*reinterpret_cast<const float2*>(row), hi[nt][0], lo[nt][0]);
        split_pair<S>(*reinterpret_cast<const float2*>(row + 8), hi[nt][1], lo[nt][1]);
      }
#pragma unroll
      for (int mt = 0; mt < Sh::MTW; ++mt) {
        std::uint32_t af[4];
        ldmatrix_x4(af, xs + ((wm * Sh::MTW + mt) * 16 + (lane & 15)) * Sh::XROW + kk + (lane >> 4) * 8);
        if (wn == 0) {
          sq[mt][0] += sum_sq_pair<S>(af[0]) + sum_sq_pair<S>(af[2]);
          sq[mt][1] += sum_sq_pair<S>(af[1]) + sum_sq_pair<S>(af[3]);
        }
#pragma unroll
        for (int nt = 0; nt < Sh::NTW; ++nt) {
          mma_16816<S>(acc[mt][nt], af, lo[nt]);
          mma_16816<S>(acc[mt][nt], af, hi[nt]);
        }
      }
    }
  };

  // ---- 4. end of the run's part of a tile: the warps' partials summed in scratch in a fixed order
  // (k-warp 0 first), then parked in the tile's layer_input rows as this run's partial row
  auto finish_tile = [&](int tile) {
#pragma unroll
    for (int mt = 0; mt < Sh::MTW; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sq[mt][h] += __shfl_xor_sync(0xffffffffu, sq[mt][h], 1);
        sq[mt][h] += __shfl_xor_sync(0xffffffffu, sq[mt][h], 2);
      }
    for (int round = 0; round < Sh::WK; ++round) {
      if (wk == round) {
#pragma unroll
        for (int mt = 0; mt < Sh::MTW; ++mt) {
          const int row = (wm * Sh::MTW + mt) * 16 + g;
#pragma unroll
          for (int nt = 0; nt < Sh::NTW; ++nt) {
            float* d = scratch + row * PART + (wn * Sh::NTW + nt) * 8 + 2 * tq;
            if (round == 0) {
              d[0] = acc[mt][nt][0];
              d[1] = acc[mt][nt][1];
              d[8 * PART] = acc[mt][nt][2];
              d[8 * PART + 1] = acc[mt][nt][3];
            } else {
              d[0] += acc[mt][nt][0];
              d[1] += acc[mt][nt][1];
              d[8 * PART] += acc[mt][nt][2];
              d[8 * PART + 1] += acc[mt][nt][3];
            }
          }
          if (wn == 0 && tq == 0) {
            float* d = scratch + row * PART + M;
            if (round == 0) {
              d[0] = sq[mt][0];
              d[8 * PART] = sq[mt][1];
            } else {
              d[0] += sq[mt][0];
              d[8 * PART] += sq[mt][1];
            }
          }
        }
      }
      __syncthreads();
    }
    const int slot = static_cast<int>(int64_t(blockIdx.x) - first_run(tile, cpt, a.per_block));
    for (int i = threadIdx.x; i < MT * PART; i += kThreads) {
      const int64_t t = int64_t(tile) * MT + i / PART;
      if (t >= a.T) continue;
      float* row = parked(a.layer_input, t, C) + slot * PART + i % PART;
      for (int c = 0; c < a.copies; ++c) row[c * a.copy_stride] = scratch[i];
    }
  };

  // ---- the run: a STAGES-deep ring; chunk q + STAGES - 1 loads while chunk q is worked on
  ChunkCursor at{static_cast<int>(q_begin / cpt), static_cast<int>(q_begin % cpt)}, ahead = at;
  clear();
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    issue(s < count, ahead, s);
    ahead.advance(cpt);
  }
  int stage = 0;
  for (int q = 0; q < count; ++q) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // chunk q visible to all; every warp is done with the stage refilled next
    issue(q + STAGES - 1 < count, ahead, (stage + STAGES - 1) % STAGES);
    ahead.advance(cpt);
    if constexpr (kPost) {
      post_chunk(at, stage);
      __syncthreads();
    }
    mma_chunk(stage_x(stage), stage_f(stage));
    if (at.kc == cpt - 1 || q + 1 == count) {
      finish_tile(at.tile);
      clear();
    }
    at.advance(cpt);
    stage = stage == STAGES - 1 ? 0 : stage + 1;
  }
  cp_async_wait<0>();
#endif
}

// ================================ A'. the direct projection (v6) ====================================

// Why: project_kernel moves ~2.2 TB/s whatever its tile and ring, one 256-thread block per SM. A probe of plain
// loads (docs/cuda_notes.md, v6) moved 2.0-2.9 TB/s with 8 warps per SM and 3.3-3.9 TB/s with 16-64, whatever the
// run length per row: the warps per SM, not the access pattern, set the rate.
//
// Design: every warp streams its own token tiles over one k-slice, with no shared-memory x and no block barrier in
// its loop. Lane (g, t) loads each of its token rows (g and g + 8 of every m-tile) as 16-byte vectors of 8
// elements, and those registers ARE its mma A fragments, two k-steps per vector: inside a chunk the k order is
// permuted (a permutation of k applied to x and fn alike leaves every dot product unchanged). The block's k-slice
// of fn sits in shared memory, split into hi + lo halves of x's type once per block, in the same permuted order as
// B fragments. The next chunk's loads are in flight while this one multiplies; two blocks of 8 warps per SM. A warp
// tile yields one partial row per token and k-slice, parked in layer_input at slot = slice: the layout B reads
// (runs of one chunk, chunks_per_tile = slices).
//   pre (kPost = false): a chunk is 64 consecutive k, vector v of lane t holds k = 32 v + 8 t + 0..7; warp tiles
//     of 32 tokens (two m-tiles).
//   post+pre (kPost = true): a chunk is 32 channels of every stream, vector v = stream v, channels 8 t + 0..7;
//     the lane computes x_next = h_post y + comb^T x for its vectors, stores it and projects the stored values;
//     warp tiles of 16 tokens (registers). Bytes per token: x, y, x_next here, x_next and layer_input in B: the
//     (3n + 2)C floor of a chained site.
template <int N, bool kPost> struct DirectShape {
  static constexpr int M = N * N + 2 * N, PART = M + 1, NT = M / 8;
  static constexpr int V = kPost ? N : 2;      // 16-byte vectors per token row and chunk
  static constexpr int MTW = kPost ? 1 : 2;    // m-tiles (16 tokens) per warp tile
  static constexpr int TOK = 16 * MTW;         // tokens per warp tile
  static constexpr int CK = 32 * V;            // k elements per chunk
  static constexpr int MAX_KS = 1024;          // most k elements per slice (fn resident per block)
  // fn fragments of one chunk: [column tile][part: hi of vector v, then lo of vector v][k-step half h][lane] uint2
  static constexpr int CHUNK_FRAGS = NT * 2 * V * 2 * 32;  // uint2 per chunk
  static constexpr int smem_bytes(int chunks) { return chunks * CHUNK_FRAGS * 8; }
  static_assert(NT * 8 == M, "n * n + 2n must be a multiple of 8");
};
constexpr int kDirectWarps = 8, kDirectThreads = 32 * kDirectWarps;

template <class S> struct DirectArgs {
  ProjArgs<S> io;          // the op's tensors and sizes (x .. layer_input, T, C); its work-split fields are unused
  int ks;                  // k elements per slice (a multiple of the chunk; post+pre: ks / N channels)
  int slices;              // k-slices
  int warps_per_slice;     // blocks per slice * kDirectWarps
  int probe;               // diagnosis (MHC_CUDA_DIRECT_PROBE, bits; wrong results): 1 skips the lo mma, 2 every
                           // mma, 8 returns once fn is staged; post+pre: 16 skips the stores of x_next, 32 the
                           // post arithmetic too (x projected as loaded)
  int prefetch;            // chunks ahead whose rows are prefetched into L2 (0: none)
  int prefetch_bulk;       // 1: the prefetch by the bulk-copy unit (cp.async.bulk.prefetch) instead of per line
};

// One token row's span of x (16-byte aligned, a multiple of 16 bytes) into L2: no registers, no completion to wait
// for; the register loads of that chunk then find it there.
// (The bulk unit exists from sm_90; below, every prefetch is per line.)
__device__ __forceinline__ void prefetch_l2(const void* p, int bytes, bool bulk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (bulk) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
    return;
  }
#endif
  for (int b = 0; b < bytes; b += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(p) + b));
}

__device__ __forceinline__ std::uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// kCoalesced (pre only, the default): whole-row loads arranged into fragments by shuffles (MHC_CUDA_DIRECT_LOADS=fragment
// turns it off). A template parameter, not a runtime flag: with the flag's branches in its loop the default kernel
// measured 150 us instead of 96.8 at 4 / 4096 / 8192 (H200), so each variant is compiled on its own.
template <class S, int N, bool kPost, bool kCoalesced>
__global__ void __launch_bounds__(kDirectThreads, 2) project_direct_kernel(const DirectArgs<S> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Sh = DirectShape<N, kPost>;
  constexpr int M = Sh::M, PART = Sh::PART, NT = Sh::NT, V = Sh::V, MTW = Sh::MTW, TOK = Sh::TOK, CK = Sh::CK;
  extern __shared__ __align__(16) uint2 fn_frag[];
  allow_dependent_launch();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int64_t T = a.io.T, C = a.io.C, K = int64_t(N) * C;
  const int slice = static_cast<int>(blockIdx.x % a.slices);
  // pre: k of the slice; post+pre: channels of the slice (every stream)
  const int64_t s0 = kPost ? int64_t(slice) * (a.ks / N) : int64_t(slice) * a.ks;
  const int64_t span = kPost ? C - s0 : K - s0;
  constexpr int unit = kPost ? 32 : CK;  // slice elements (post+pre: channels) per chunk
  const int chunks = static_cast<int>((std::min<int64_t>(kPost ? a.ks / N : a.ks, span) + unit - 1) / unit);
  const int64_t tiles = (T + TOK - 1) / TOK;
  const int64_t first_tile = int64_t(blockIdx.x / a.slices) * kDirectWarps + warp;
  const int64_t my_tiles = first_tile < tiles ? (tiles - 1 - first_tile) / a.warps_per_slice + 1 : 0;
  // Offset of vector v's first element in a token's row of x (zero past T or the row: K % 8 == 0, so a vector is
  // whole or absent), and whether it is inside the row.
  auto vec_k = [&](int c, int v) -> int64_t {
    return kPost ? int64_t(v) * C + s0 + int64_t(c) * 32 + 8 * tq : s0 + int64_t(c) * CK + 32 * v + 8 * tq;
  };
  auto vec_in = [&](int c, int v) -> bool {
    return kPost ? s0 + int64_t(c) * 32 + 8 * tq < C : s0 + int64_t(c) * CK + 32 * v + 8 * tq < K;
  };

  // ---- 1. a chunk of the tile into registers: rows g and g + 8 of each m-tile (post+pre: and y's channels), in
  // fragment order: a load instruction reads 8 half rows (64 bytes each) of the chunk.
  // coalesced (pre, the default; MHC_CUDA_DIRECT_LOADS=fragment turns it off): a load instruction reads 4 whole
  // 128-byte rows instead; the chunk lands as [m-tile][row half r][h], lane l holding row 16 mt + 8 r + 4 h + l / 8,
  // 16-byte piece (l % 8 + 4 h) % 8, and arrange() moves it into fragment order by shuffles, after the next chunk's
  // loads are issued (two chunks in flight). H200, 4 / 4096 / 8192: A 100.5 us against 109.2 for fragment order;
  // arranged before the next loads it was 140 us (one chunk in flight).
  using Frags = uint4[MTW][2][V];  // [m-tile][row g, g + 8][vector]
  using YFrags = uint4[kPost ? MTW : 1][2];
  constexpr bool coalesced = !kPost && kCoalesced;
  auto load = [&](int64_t tile, int c, Frags& v, YFrags& yv) {
#pragma unroll
    for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if constexpr (coalesced) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int64_t t = tile * TOK + mt * 16 + 8 * r + 4 * h + lane / 8;
            const int64_t k = s0 + int64_t(c) * CK + 8 * ((lane % 8 + 4 * h) % 8);
            v[mt][r][h] = t < T && k < K ? __ldcs(reinterpret_cast<const uint4*>(a.io.x + t * K + k))
                                         : make_uint4(0, 0, 0, 0);
          }
          continue;
        }
        const int64_t t = tile * TOK + mt * 16 + g + 8 * r;
#pragma unroll
        for (int vv = 0; vv < V; ++vv)
          v[mt][r][vv] = t < T && vec_in(c, vv) ? __ldcs(reinterpret_cast<const uint4*>(a.io.x + t * K + vec_k(c, vv)))
                                                : make_uint4(0, 0, 0, 0);
        if constexpr (kPost)
          yv[mt][r] = t < T && vec_in(c, 0)
                          ? __ldcs(reinterpret_cast<const uint4*>(a.io.y + t * C + s0 + int64_t(c) * 32 + 8 * tq))
                          : make_uint4(0, 0, 0, 0);
      }
  };
  // pre: a landed chunk into fragment order, in place (lane (g, t), vector v = row 16 mt + 8 r + g, piece 4 v + t, as
  // vec_k says). That piece sits in landing register h = g / 4 of lane 8 (g % 4) + 4 (v ^ h) + t; for a fixed v these
  // source lanes are distinct, so each source lane selects the register its one reader needs (h = bit 2 of its
  // lane ^ v).
  auto arrange = [&](Frags& v) {
    if constexpr (coalesced) {
      const bool odd = (lane >> 2) & 1;
#pragma unroll
      for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          uint4 out[V];
#pragma unroll
          for (int vv = 0; vv < V; ++vv) {
            const int src = 8 * (g % 4) + 4 * (vv ^ (g >> 2)) + tq;
            // selected word by word: a reference chosen at run time would put the buffers in local memory
            const bool hi = odd != (vv != 0);
            const uint4 a0 = v[mt][r][0], a1 = v[mt][r][1];
            out[vv] = make_uint4(__shfl_sync(0xffffffffu, hi ? a1.x : a0.x, src),
                                 __shfl_sync(0xffffffffu, hi ? a1.y : a0.y, src),
                                 __shfl_sync(0xffffffffu, hi ? a1.z : a0.z, src),
                                 __shfl_sync(0xffffffffu, hi ? a1.w : a0.w, src));
          }
#pragma unroll
          for (int vv = 0; vv < V; ++vv) v[mt][r][vv] = out[vv];
        }
    }
  };
  // ---- 1b. chunk c of a tile into L2 ahead of its loads: lane l takes token row l of the tile (post+pre: row l % 16,
  // streams l / 16, l / 16 + 2, .., and y from the lanes of the first half)
  auto prefetch = [&](int64_t tile, int c) {
    if (tile >= tiles) return;
    const bool bulk = a.prefetch_bulk != 0;
    if constexpr (kPost) {
      const int64_t t = tile * TOK + (lane & 15), ch = s0 + int64_t(c) * 32;
      if (t >= T || ch >= C) return;
      const int bytes = static_cast<int>(std::min<int64_t>(32, C - ch)) * int(sizeof(S));
      for (int v = lane >> 4; v < N; v += 2) prefetch_l2(a.io.x + t * K + int64_t(v) * C + ch, bytes, bulk);
      if (lane < 16) prefetch_l2(a.io.y + t * C + ch, bytes, bulk);
    } else {
      const int64_t t = tile * TOK + lane, k = s0 + int64_t(c) * CK;
      if (t >= T || k >= K) return;
      prefetch_l2(a.io.x + t * K + k, static_cast<int>(std::min<int64_t>(CK, K - k)) * int(sizeof(S)), bulk);
    }
  };
  auto prefetch_ahead = [&](int64_t tile, int ahead) {  // the chunk `ahead` chunks after tile's first, in warp order
    prefetch(tile + int64_t(ahead / chunks) * a.warps_per_slice, ahead % chunks);
  };
  Frags buf0, buf1;  // chunks alternate between the two: one is worked on while the next lands in the other
  YFrags ybuf0, ybuf1;
  if (my_tiles > 0) {
    load(first_tile, 0, buf0, ybuf0);  // in flight while fn is staged
    for (int d = 1; d < a.prefetch; ++d) prefetch_ahead(first_tile, d);
  }

  // ---- 2. fn's k-slice as hi/lo B fragments in the permuted order: lane (g, t), vector v of chunk c holds fn[row][k]
  // for row = column tile * 8 + g and k = vec_k(c, v) + 0..7 of lane t; k-step half h takes words 2h, 2h + 1
  // Six items per thread and round, their loads issued together: one L2 round trip per round, not per item (12 items
  // a thread at n = 4: two rounds). On the H200, four at a time took the kernel from 107.7 to 96.8 us; this stage
  // alone (probe 8, launch included) then took 11.9 us, and 10.1 six at a time.
  constexpr int kBatch = 6;
  const int items = chunks * NT * V * 32;
  for (int i0 = threadIdx.x; i0 < items; i0 += kBatch * kDirectThreads) {
    float4 f[kBatch][2];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int i = i0 + b * kDirectThreads;
      const int l = i % 32, vv = i / 32 % V, nt = i / (32 * V) % NT, c = i / (32 * V * NT);
      const int lt = l & 3;
      const int64_t row = nt * 8 + (l >> 2);
      const int64_t k = kPost ? int64_t(vv) * C + s0 + int64_t(c) * 32 + 8 * lt : s0 + int64_t(c) * CK + 32 * vv + 8 * lt;
      const bool in = i < items && (kPost ? s0 + int64_t(c) * 32 + 8 * lt < C : k < K);
      f[b][0] = in ? __ldg(reinterpret_cast<const float4*>(a.io.fn + row * K + k)) : make_float4(0.f, 0.f, 0.f, 0.f);
      f[b][1] = in ? __ldg(reinterpret_cast<const float4*>(a.io.fn + row * K + k + 4)) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int i = i0 + b * kDirectThreads;
      if (i >= items) break;
      const int l = i % 32, vv = i / 32 % V, nt = i / (32 * V) % NT, c = i / (32 * V * NT);
      std::uint32_t hi[4], lo[4];
      split_pair<S>(make_float2(f[b][0].x, f[b][0].y), hi[0], lo[0]);
      split_pair<S>(make_float2(f[b][0].z, f[b][0].w), hi[1], lo[1]);
      split_pair<S>(make_float2(f[b][1].x, f[b][1].y), hi[2], lo[2]);
      split_pair<S>(make_float2(f[b][1].z, f[b][1].w), hi[3], lo[3]);
      uint2* d = fn_frag + (c * Sh::CHUNK_FRAGS) + (nt * 2 * V * 2) * 32 + l;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        d[(vv * 2 + h) * 32] = make_uint2(hi[2 * h], hi[2 * h + 1]);
        d[((V + vv) * 2 + h) * 32] = make_uint2(lo[2 * h], lo[2 * h + 1]);
      }
    }
  }
  __syncthreads();
  if (my_tiles == 0 || (a.probe & 8)) return;

  // ---- 3. post+pre: x_next = h_post y + comb^T x of the lane's vectors, stored, and kept (as stored) for the mma
  auto post = [&](int64_t tile, int c, Frags& v, const YFrags& yv) {
    if constexpr (kPost) {
      if (a.probe & 32) return;  // diagnosis: x projected as loaded, nothing computed or stored
#pragma unroll
      for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t t = tile * TOK + mt * 16 + g + 8 * r;
          if (t >= T || !vec_in(c, 0)) continue;  // zero in, zero out: the projection sees zeros there
          Pack<S> xp[N], yp;
#pragma unroll
          for (int i = 0; i < N; ++i) *reinterpret_cast<uint4*>(&xp[i]) = v[mt][r][i];
          *reinterpret_cast<uint4*>(&yp) = yv[mt][r];
#pragma unroll 1  // one output stream at a time: registers for the next chunk's loads
          for (int o = 0; o < N; ++o) {
            const Pack<S> out = post_pack<S, N>(a.io.post_h, a.io.post_comb, t, o, xp, yp);
            if (!(a.probe & 16)) store_pack(a.io.x_next + t * K + vec_k(c, o), out);
            // registers are indexed at compile time only: select the output vector by a switch on o
#pragma unroll
            for (int q = 0; q < N; ++q)
              if (q == o) v[mt][r][q] = *reinterpret_cast<const uint4*>(&out);
          }
        }
    }
  };

  // ---- 4. one chunk on tensor cores (lo, then hi: the order of every partial is fixed), squares on the ALUs
  float acc[MTW][NT][4], sq[MTW][2];
  auto clear = [&] {
#pragma unroll
    for (int mt = 0; mt < MTW; ++mt) {
      sq[mt][0] = sq[mt][1] = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
    }
  };
  auto multiply = [&](const Frags& v, int c) {
    const uint2* fc = fn_frag + c * Sh::CHUNK_FRAGS + lane;
#pragma unroll
    for (int vv = 0; vv < V; ++vv)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        std::uint32_t bhi[NT][2], blo[NT][2];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint2 fh = fc[((nt * 2 * V + vv) * 2 + h) * 32], fl = fc[((nt * 2 * V + V + vv) * 2 + h) * 32];
          bhi[nt][0] = fh.x, bhi[nt][1] = fh.y, blo[nt][0] = fl.x, blo[nt][1] = fl.y;
        }
#pragma unroll
        for (int mt = 0; mt < MTW; ++mt) {
          const std::uint32_t af[4] = {word(v[mt][0][vv], 2 * h), word(v[mt][1][vv], 2 * h),
                                       word(v[mt][0][vv], 2 * h + 1), word(v[mt][1][vv], 2 * h + 1)};
          if (a.probe & 2) continue;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            if (!(a.probe & 1)) mma_16816<S>(acc[mt][nt], af, blo[nt]);
            mma_16816<S>(acc[mt][nt], af, bhi[nt]);
          }
        }
      }
#pragma unroll
    for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int vv = 0; vv < V; ++vv) {
          const uint4& p = v[mt][r][vv];
          sq[mt][r] += (sum_sq_pair<S>(p.x) + sum_sq_pair<S>(p.y)) + (sum_sq_pair<S>(p.z) + sum_sq_pair<S>(p.w));
        }
  };

  // ---- 5. end of a tile: the partial rows of its tokens for this slice, parked at slot = slice
  auto finish = [&](int64_t tile) {
#pragma unroll
    for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float s = sq[mt][r];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        const int64_t t = tile * TOK + mt * 16 + g + 8 * r;
        if (t >= T) continue;
        float* row = parked(a.io.layer_input, t, C) + slice * PART;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          row[nt * 8 + 2 * tq] = acc[mt][nt][2 * r];
          row[nt * 8 + 2 * tq + 1] = acc[mt][nt][2 * r + 1];
        }
        if (tq == 0) row[M] = s;
      }
  };

  // ---- the warp's tiles: first_tile, + warps_per_slice, ...; chunk c + 1 lands while chunk c is worked on. The
  // next loads are issued before this chunk's registers are read (arranged, multiplied), so two chunks are in flight
  // while a warp waits. Loads in fragment order need no arranging and the copy at the end of a step only renames
  // registers; coalesced loads are arranged in place, so there the buffers alternate, the loop unrolled by two.
  clear();
  int64_t tile = first_tile, left = my_tiles;
  int c = 0;
  auto step = [&](Frags& now, YFrags& ynow, Frags& later, YFrags& ylater) -> bool {
    const bool last_chunk = c + 1 == chunks;
    const bool more = !last_chunk || left > 1;
    const int64_t next_tile = last_chunk ? tile + a.warps_per_slice : tile;
    const int next_c = last_chunk ? 0 : c + 1;
    if (a.prefetch > 0) prefetch_ahead(tile, c + a.prefetch);
    if (more) load(next_tile, next_c, later, ylater);
    arrange(now);
    post(tile, c, now, ynow);
    multiply(now, c);
    if (last_chunk) {
      finish(tile);
      clear();
      if (--left == 0) return false;
    }
    tile = next_tile;
    c = next_c;
    return true;
  };
  if constexpr (coalesced) {  // (never for post+pre)
    while (step(buf0, ybuf0, buf1, ybuf1) && step(buf1, ybuf1, buf0, ybuf0)) {
    }
  } else {  // fragment-order loads: a copy renames them (unrolled by two, post+pre spills twice as much)
    while (step(buf0, ybuf0, buf1, ybuf1)) {
#pragma unroll
      for (int mt = 0; mt < MTW; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
#pragma unroll
          for (int vv = 0; vv < V; ++vv) buf0[mt][r][vv] = buf1[mt][r][vv];
          if constexpr (kPost) ybuf0[mt][r] = ybuf1[mt][r];
        }
    }
  }
#endif
}

// ================================ B. coefficients and aggregate ====================================

template <class S> struct CoefArgs {
  const S* x;            // [T, N, C]: the streams aggregated (pre's x, post+pre's x_next)
  const float* base;     // [M]
  const float* scale;    // [3]
  S* layer_input;        // [T, C]; holds A's parked partials on entry
  float* h_pre;          // [T, N]
  float* h_post;         // [T, N]
  float* comb;           // [T, N, N]
  float* mixes;          // [T, M] or null
  float* rstd;           // [T] or null
  int64_t T, C;
  int64_t chunks_per_tile, per_block;  // A's runs: where each tile's partial rows are
  int tile;              // A's tokens per tile (a multiple of group)
  int group;             // tokens per block
  int64_t slice;         // channels per block along blockIdx.y (a multiple of the pack)
  int64_t copy_stride;   // floats between the copies of the partials (one per slice)
  bool x_ready;          // x was complete before A ran (pre): load the first packs before waiting for A
  SiteConsts<float> k;
};

template <class S, int N>
__global__ void __launch_bounds__(kThreads) coef_aggregate_kernel(const CoefArgs<S> a) {
  constexpr int M = N * N + 2 * N, PART = M + 1, P = kPack<S>;
  __shared__ float sums[kMaxGroup * PART];
  __shared__ float partial[kThreads];
  __shared__ float hp[kMaxGroup * N];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t0 = int64_t(blockIdx.x) * a.group;
  const int tokens = static_cast<int>(std::min<int64_t>(a.group, a.T - t0));
  const int64_t c_begin = int64_t(blockIdx.y) * a.slice;
  const int packs = static_cast<int>(std::min<int64_t>(a.slice, a.C - c_begin) / P);  // per token
  const int work = tokens * packs;
  // Only the first slice writes the coefficients; its warp 0 runs Sinkhorn while the others aggregate.
  const bool coef_block = blockIdx.y == 0;
  const int agg_first = coef_block ? 32 : 0, agg_threads = kThreads - agg_first;
  const int rank = static_cast<int>(threadIdx.x) - agg_first;
  auto x_at = [&](int q) { return a.x + ((t0 + q / packs) * N) * a.C + c_begin + (q % packs) * P; };

  // ---- 1. the first packs of this thread's aggregate (x of pre is ready before A's partials are)
  Pack<S> first[N];
  const bool has_first = rank >= 0 && rank < work;
  auto load_first = [&] {
#pragma unroll
    for (int i = 0; i < N; ++i) first[i] = load_pack_stream(x_at(rank) + i * a.C);
  };
  if (a.x_ready && has_first) load_first();
  wait_for_prerequisite_grid();
  if (!a.x_ready && has_first) load_first();

  // ---- 2. fixed-order sum of the tile's partial rows; `ways` threads share a (token, column) pair
  // when there are few pairs (decode), each summing a contiguous range of rows
  const int64_t tile = t0 / a.tile;
  const int runs = runs_of_tile(tile, a.chunks_per_tile, a.per_block);
  const int pairs = tokens * PART;
  const int ways = std::max(1, std::min(runs, kThreads / pairs));
  const int per_way = (runs + ways - 1) / ways;
  for (int q = threadIdx.x; q < pairs * ways; q += kThreads) {
    const int p = q / ways, w = q % ways;
    const float* src = parked(a.layer_input, t0 + p / PART, a.C) + blockIdx.y * a.copy_stride + p % PART;
    const int s_end = std::min(runs, (w + 1) * per_way);
    float v = 0.f;
    int s = w * per_way;
    for (; s + 4 <= s_end; s += 4) {
      const float v0 = src[s * PART], v1 = src[(s + 1) * PART], v2 = src[(s + 2) * PART], v3 = src[(s + 3) * PART];
      v = (((v + v0) + v1) + v2) + v3;
    }
    for (; s < s_end; ++s) v += src[s * PART];
    if (ways == 1) sums[p] = v;
    else partial[q] = v;
  }
  __syncthreads();
  if (ways > 1) {
    for (int p = threadIdx.x; p < pairs; p += kThreads) {
      float v = 0.f;
      for (int w = 0; w < ways; ++w) v += partial[p * ways + w];
      sums[p] = v;
    }
    __syncthreads();
  }

  // ---- 3. rstd and the sigmoids, a thread per token
  const float s_pre = scale_of(a.scale, 0), s_post = scale_of(a.scale, 1), s_res = scale_of(a.scale, 2);
  if (static_cast<int>(threadIdx.x) < tokens) {
    const int tl = threadIdx.x;
    const int64_t t = t0 + tl;
    const float* row = sums + tl * PART;
    const float rstd = rstd_from(row[M], float(N * a.C), a.k.norm_eps);
#pragma unroll
    for (int i = 0; i < N; ++i) hp[tl * N + i] = sigmoid_fast(row[i] * rstd * s_pre + __ldg(a.base + i)) + a.k.pre_eps;
    if (coef_block) {
#pragma unroll
      for (int i = 0; i < N; ++i) a.h_pre[t * N + i] = hp[tl * N + i];
      store_post_coefficients<N>(row, rstd, s_post, a.base, a.k, t, a.h_post, a.mixes, a.rstd);
    }
  }
  __syncthreads();  // h_pre of every token; the parked partials are all read: layer_input may be written

  // ---- 4. Sinkhorn on warp 0 of the first slice; layer_input = sum_i h_pre[i] x[i] on the others
  if (coef_block && warp == 0) {
    if (lane < tokens) {
      const int64_t t = t0 + lane;
      const float* row = sums + lane * PART;
      store_comb<N>(row, rstd_from(row[M], float(N * a.C), a.k.norm_eps), s_res, a.base, a.k, t, a.comb);
    }
    return;
  }
  auto aggregate = [&](int q, const Pack<S> (&xp)[N]) {
    const int tl = q / packs;
    float accv[P];
#pragma unroll
    for (int e = 0; e < P; ++e) accv[e] = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float w = hp[tl * N + i];
#pragma unroll
      for (int e = 0; e < P; ++e) accv[e] += w * to_math(xp[i].v[e]);
    }
    Pack<S> out;
#pragma unroll
    for (int e = 0; e < P; ++e) out.v[e] = from_math<S>(accv[e]);
    store_pack(a.layer_input + (t0 + tl) * a.C + c_begin + (q % packs) * P, out);
  };
  if (!has_first) return;
  if constexpr (N <= 4) {
    // The next packs load while these are summed: two iterations of loads in flight per thread (n <= 4
    // leaves the registers for it), which halves the latency of few-token calls.
    Pack<S> cur[N];
#pragma unroll
    for (int i = 0; i < N; ++i) cur[i] = first[i];
    for (int q = rank;; q += agg_threads) {
      const bool more = q + agg_threads < work;
      Pack<S> nxt[N];
      if (more)
#pragma unroll
        for (int i = 0; i < N; ++i) nxt[i] = load_pack_stream(x_at(q + agg_threads) + i * a.C);
      aggregate(q, cur);
      if (!more) break;
#pragma unroll
      for (int i = 0; i < N; ++i) cur[i] = nxt[i];
    }
  } else {
    aggregate(rank, first);
    for (int q = rank + agg_threads; q < work; q += agg_threads) {
      Pack<S> xp[N];
#pragma unroll
      for (int i = 0; i < N; ++i) xp[i] = load_pack_stream(x_at(q) + i * a.C);
      aggregate(q, xp);
    }
  }
}

// ================================ host side ========================================================

// Most partial rows a tile of `cpt` chunks gets from runs of `per_block` chunks.
int64_t max_runs_per_tile(int64_t cpt, int64_t per_block) {
  if (per_block % cpt == 0) return 1;
  if (cpt % per_block == 0) return cpt / per_block;
  return (cpt - 1) / per_block + 2;
}

// Work split of both kernels.
struct StreamPlan {
  int64_t chunks_per_tile = 0, total = 0, per_block = 0;
  int blocks = 0;     // A: persistent grid, one run per block
  int group = 1;      // B: tokens per block
  int64_t slice = 0;  // B: channels per block
  int slices = 1;
};

// B's tokens per block: groups of up to 8 while that leaves >= 4 blocks per SM.
int coef_group(int64_t T) {
  int group = 1;
  while (group < kMaxGroup && T / (2 * group) >= 4 * int64_t(current_device_info().sm_count)) group *= 2;
  return group;
}

// False when the partial rows cannot be parked (layer_input rows too short for one).
bool plan_stream(StreamPlan& p, int64_t T, int64_t C, int tile, int64_t cpt, int part_floats, int elem_bytes,
                 int resident_per_sm, const TuningKey& key) {
  const int sms = current_device_info().sm_count;
  p.chunks_per_tile = cpt;
  p.total = (T + tile - 1) / tile * cpt;
  // B's channel slices (default one); each holds its own copy of the partials.
  const int pack = 16 / elem_bytes;
  const int want_slices = std::clamp(tuned(key, "stream_slices", 1), 1, 64);
  p.slice = ((C + want_slices - 1) / want_slices + pack - 1) / pack * pack;
  p.slices = static_cast<int>((C + p.slice - 1) / p.slice);
  const int64_t narrowest = C - (p.slices - 1) * p.slice;
  const int64_t capacity = std::min(p.slice, narrowest) * elem_bytes / (4 * int64_t(part_floats));
  if (capacity < 1) return false;
  // A: as many runs as resident blocks, lengthened until every tile's partial rows fit.
  const int64_t grid = std::max<int64_t>(1, int64_t(resident_per_sm) * sms);
  const int64_t even = std::min<int64_t>((p.total + grid - 1) / grid, 1 << 30);
  int64_t per_block = std::max(1, tuned(key, "stream_chunks", static_cast<int>(even)));
  while (max_runs_per_tile(cpt, per_block) > capacity) ++per_block;
  p.per_block = per_block;
  p.blocks = static_cast<int>((p.total + per_block - 1) / per_block);
  // B: groups of up to 8 tokens while that leaves >= 4 blocks per SM.
  const int group = tuned(key, "stream_group", coef_group(T));
  p.group = (group >= 1 && group <= kMaxGroup && tile % group == 0) ? group : 1;
  return true;
}

bool pdl_enabled() {
  if (current_device_info().major < 9) return false;
  const char* v = std::getenv("MHC_CUDA_PDL");
  return !(v && std::strcmp(v, "0") == 0);
}

// B, as a programmatic dependent launch of A (sm_90; MHC_CUDA_PDL=0: plain stream order): a block per group of
// tokens and channel slice.
template <class S, int N> void launch_coef_aggregate(const CoefArgs<S>& ca, int slices, cudaStream_t stream) {
  cudaLaunchConfig_t lc{};
  lc.gridDim = dim3(static_cast<unsigned>((ca.T + ca.group - 1) / ca.group), static_cast<unsigned>(slices));
  lc.blockDim = dim3(kThreads);
  lc.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  lc.attrs = attr;
  lc.numAttrs = pdl_enabled() ? 1 : 0;
  MHC_CUDA_CHECK(cudaLaunchKernelEx(&lc, &coef_aggregate_kernel<S, N>, ca));
}

template <class S, int N, int MT, bool kPost>
bool launch_stream(ProjArgs<S> pa, CoefArgs<S> ca, const TuningKey& key, cudaStream_t stream) {
  using Sh = ProjShape<N, MT>;
  constexpr int smem = ProjSmem<S, N, MT, kPost>::TOTAL;
  if (smem > current_device_info().max_smem_optin) return false;
  const auto project = &project_kernel<S, N, MT, kPost>;
  allow_dynamic_smem(project, std::size_t(smem));
  const int resident = resident_blocks_per_sm(project, kThreads, smem);
  if (resident == 0) return false;
  const int64_t cpt = kPost ? (pa.C + Sh::KCC - 1) / Sh::KCC : (int64_t(N) * pa.C + kChunk - 1) / kChunk;
  StreamPlan plan;
  if (!plan_stream(plan, pa.T, pa.C, MT, cpt, Sh::PART, int(sizeof(S)), resident, key)) return false;
  pa.chunks_per_tile = ca.chunks_per_tile = plan.chunks_per_tile;
  pa.total_chunks = plan.total;
  pa.per_block = ca.per_block = plan.per_block;
  pa.copies = plan.slices;
  pa.copy_stride = ca.copy_stride = plan.slice * int64_t(sizeof(S)) / 4;
  project<<<plan.blocks, kThreads, smem, stream>>>(pa);
  MHC_CUDA_CHECK_LAUNCH();

  ca.tile = MT;
  ca.group = plan.group;
  ca.slice = plan.slice;
  launch_coef_aggregate<S, N>(ca, plan.slices, stream);
  return true;
}

// The direct projection (A') and B: false, having launched nothing, where it does not run (B's parked partial rows
// must fit in a layer_input row: one per k-slice).
template <class S, int N, bool kPost>
bool launch_direct(DirectArgs<S> da, CoefArgs<S> ca, const TuningKey& key, cudaStream_t stream) {
  using Sh = DirectShape<N, kPost>;
  const int sms = current_device_info().sm_count;
  const int64_t T = da.io.T, C = da.io.C, K = int64_t(N) * C;
  const int64_t capacity = C * int64_t(sizeof(S)) / (4 * int64_t(Sh::PART));  // partial rows per layer_input row
  const char* loads = std::getenv("MHC_CUDA_DIRECT_LOADS");
  // Coalesced loads by default (pre): 100.5 against 109.2 us for A at 4 / 4096 / 8192, 44.6 against 49.4 at n = 2, the
  // same at the other shapes (H200); MHC_CUDA_DIRECT_LOADS=fragment keeps the fragment-order loads.
  const bool coalesced = !kPost && !(loads && std::strcmp(loads, "fragment") == 0);
  const auto project = coalesced ? &project_direct_kernel<S, N, kPost, !kPost> : &project_direct_kernel<S, N, kPost, false>;
  const int max_smem = Sh::smem_bytes(Sh::MAX_KS / Sh::CK);
  allow_dynamic_smem(project, std::size_t(max_smem));
  const int resident = resident_blocks_per_sm(project, kDirectThreads, max_smem);
  if (resident == 0) return false;
  const int64_t warps = int64_t(resident) * sms * kDirectWarps, tiles = (T + Sh::TOK - 1) / Sh::TOK;
  // Slices of up to 1024 k (post+pre: 1024 / n channels of every stream), halved down to 256 k while the
  // (tile, slice) units are fewer than the resident warps.
  auto slices_of = [&](int ks) { return kPost ? (C + ks / N - 1) / (ks / N) : (K + ks - 1) / ks; };
  int ks = std::clamp(tuned(key, "direct_ks", Sh::MAX_KS), Sh::CK, Sh::MAX_KS) / Sh::CK * Sh::CK;
  while (ks / 2 >= std::max(256, Sh::CK) && ks / 2 % Sh::CK == 0 && tiles * slices_of(ks) < warps &&
         slices_of(ks / 2) <= capacity)
    ks /= 2;
  const int64_t slices = slices_of(ks);
  if (slices > capacity || slices > (1 << 20)) return false;
  const int64_t per_slice = std::max<int64_t>(1, int64_t(resident) * sms / slices);
  da.ks = ks;
  da.slices = static_cast<int>(slices);
  da.warps_per_slice = static_cast<int>(per_slice * kDirectWarps);
  const char* probe = std::getenv("MHC_CUDA_DIRECT_PROBE");
  da.probe = probe ? std::atoi(probe) : 0;
  const char* prefetch = std::getenv("MHC_CUDA_DIRECT_PREFETCH");  // chunks ahead; a leading 'b': the bulk unit
  da.prefetch_bulk = prefetch && prefetch[0] == 'b';
  // Off by default: with fn staged in batches it measured 1-5 % slower at every distance (pre and post+pre, H200).
  const int prefetch_default = 0;
  da.prefetch = std::clamp(
      prefetch ? std::atoi(prefetch + da.prefetch_bulk) : tuned(key, "direct_prefetch", prefetch_default), 0, 64);
  const int smem = Sh::smem_bytes(ks / Sh::CK);
  project<<<static_cast<unsigned>(per_slice * slices), kDirectThreads, smem, stream>>>(da);
  MHC_CUDA_CHECK_LAUNCH();

  // B reads slice s's partial row at slot s: runs of one chunk, slices chunks per tile.
  ca.chunks_per_tile = slices;
  ca.per_block = 1;
  ca.copy_stride = 0;
  ca.tile = Sh::TOK;
  ca.group = coef_group(T);
  ca.slice = C;
  launch_coef_aggregate<S, N>(ca, 1, stream);
  return true;
}

// Whether the pre (and post+pre, fused) projects with the direct kernel: MHC_CUDA_PRE=direct takes it wherever it
// runs (n in {2, 4}), any other set value but `stream` keeps it off (ring: project_kernel everywhere); otherwise a
// tuning table's `direct` entry, else from kDirectMinTokens tokens (below that the warps' tiles are too few to keep
// HBM busy).
// Post+pre fused into it is not the default (measured slower than the post kernel followed by the pre: 454 against
// 358 us at n = 4, C = 4096, 8192 tokens on the H200, docs/cuda_notes.md v6).
constexpr int64_t kDirectMinTokens = 1024;
bool use_direct(const TuningKey& key, int n, int64_t T, bool post) {
  if (n != 2 && n != 4) return false;
  const char* v = std::getenv("MHC_CUDA_PRE");
  if (v && std::strcmp(v, "direct") == 0) return true;
  if (v && *v && std::strcmp(v, "stream") != 0) return false;
  return tuned(key, "direct", !post && T >= kDirectMinTokens ? 1 : 0) != 0;
}

// Outputs of the pre part, shared by both ops.
template <class S>
void set_coefficient_outputs(CoefArgs<S>& ca, const TensorView& base, const TensorView& scale,
                             const TensorView& layer_input, const TensorView& h_pre, const TensorView& h_post,
                             const TensorView& comb, const TensorView& mixes, const TensorView& rstd,
                             const MhcConfig& cfg) {
  ca.base = base.ptr<const float>();
  ca.scale = data_or_null<const float>(scale);
  ca.layer_input = layer_input.ptr<S>();
  ca.h_pre = h_pre.ptr<float>();
  ca.h_post = h_post.ptr<float>();
  ca.comb = comb.ptr<float>();
  ca.mixes = data_or_null<float>(mixes);
  ca.rstd = data_or_null<float>(rstd);
  ca.k = site_consts<float>(cfg);
}

// The shapes the streaming kernels take: 16-bit streams, n in {2, 4, 8}, fn present, 16-byte aligned rows.
bool stream_shape_ok(const TensorView& x, const TensorView& fn, std::initializer_list<const TensorView*> rows) {
  const int n = static_cast<int>(x.shape[1]);
  return fn.present() && (x.dtype == DType::bf16 || x.dtype == DType::f16) && (n == 2 || n == 4 || n == 8) &&
         x.shape[2] % 8 == 0 && aligned16(rows) && aligned16({&fn});
}

// Shape checks and dispatch; `fill` sets the op's pointers of both kernels' arguments.
template <bool kPost, class Fill>
bool run_stream(const TensorView& x, const TensorView& fn, std::initializer_list<const TensorView*> rows,
                const char* op, cudaStream_t stream, Fill fill, bool direct_only = false) {
  const int64_t T = x.shape[0], C = x.shape[2];
  const int n = static_cast<int>(x.shape[1]);
  if (!stream_shape_ok(x, fn, rows)) return false;
  const TuningKey key{op, n, x.dtype, C, T};
  // 128-token tiles (a 4-stage ring for n = 4, half the fn traffic of 64) once there are 4 of them.
  const int tile = tuned(key, "stream_tile", T <= 32 ? 16 : T < 512 ? 64 : 128);
  return dispatch_storage(x.dtype, [&](auto tag) -> bool {
    using S = typename decltype(tag)::type;
    if constexpr (std::is_same_v<S, __nv_bfloat16> || std::is_same_v<S, __half>) {
      return dispatch_streams(n, [&](auto nc) -> bool {
        constexpr int N = decltype(nc)::value;
        if constexpr (N == 0) {
          return false;
        } else {
          ProjArgs<S> pa{};
          CoefArgs<S> ca{};
          pa.T = ca.T = T;
          pa.C = ca.C = C;
          pa.fn = fn.ptr<const float>();
          fill(pa, ca);
          if constexpr (N == 2 || N == 4) {
            if (use_direct(key, n, T, kPost)) {
              if (launch_direct<S, N, kPost>(DirectArgs<S>{pa, 0, 0, 0, 0}, ca, key, stream)) return true;
            }
          }
          if (direct_only) return false;
          if (tile == 16) return launch_stream<S, N, 16, kPost>(pa, ca, key, stream);
          if (tile == 128) return launch_stream<S, N, 128, kPost>(pa, ca, key, stream);
          return launch_stream<S, N, 64, kPost>(pa, ca, key, stream);
        }
      });
    } else {
      return false;
    }
  });
}

template <class Args> using StorageOf = std::remove_const_t<std::remove_pointer_t<decltype(Args::x)>>;

}  // namespace

PrePath pre_path() {
  const char* v = std::getenv("MHC_CUDA_PRE");
  if (v && std::strcmp(v, "cluster") == 0) return PrePath::cluster;
  if (v && std::strcmp(v, "fused") == 0) return PrePath::fused;
  return PrePath::stream;
}

bool pre_stream_supported(const PreForward& a) {
  const int64_t C = a.x.shape[2];
  const int n = static_cast<int>(a.x.shape[1]);
  const int64_t elem = a.x.dtype == DType::f64 ? 8 : a.x.dtype == DType::f32 ? 4 : 2;
  return stream_shape_ok(a.x, a.fn, {&a.x, &a.layer_input}) && C * elem >= 4 * int64_t(n * n + 2 * n + 1);
}

bool pre_stream_forward(const PreForward& a, const MhcConfig& cfg, cudaStream_t stream) {
  return run_stream<false>(a.x, a.fn, {&a.x, &a.layer_input}, "pre_forward", stream, [&](auto& pa, auto& ca) {
    using S = StorageOf<std::remove_reference_t<decltype(pa)>>;
    pa.x = a.x.ptr<const S>();
    pa.layer_input = a.layer_input.ptr<S>();
    ca.x = pa.x;
    ca.x_ready = true;
    set_coefficient_outputs(ca, a.base, a.scale, a.layer_input, a.h_pre, a.h_post, a.comb, a.mixes, a.rstd, cfg);
  });
}

bool post_pre_stream_forward(const PostPreForward& a, const MhcConfig& cfg, cudaStream_t stream, bool direct_only) {
  return run_stream<true>(a.x, a.fn, {&a.x, &a.y, &a.x_next, &a.layer_input}, "post_pre_forward", stream,
                          [&](auto& pa, auto& ca) {
                            using S = StorageOf<std::remove_reference_t<decltype(pa)>>;
                            pa.x = a.x.ptr<const S>();
                            pa.y = a.y.ptr<const S>();
                            pa.post_h = a.h_post.ptr<const float>();
                            pa.post_comb = a.comb.ptr<const float>();
                            pa.x_next = a.x_next.ptr<S>();
                            pa.layer_input = a.layer_input.ptr<S>();
                            ca.x = pa.x_next;
                            ca.x_ready = false;
                            set_coefficient_outputs(ca, a.base, a.scale, a.layer_input, a.h_pre, a.h_post_next,
                                                    a.comb_next, a.mixes, a.rstd, cfg);
                          },
                          direct_only);
}

}  // namespace mhc::cuda_impl
