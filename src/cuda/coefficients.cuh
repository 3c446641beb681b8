// Per-token coefficient math shared by the forward and backward kernels (docs/MATH.md section 1):
//   h_pre  = sigmoid(mixes[0:n]  * scale[0] + base[0:n])  + pre_eps
//   h_post = sigmoid(mixes[n:2n] * scale[1] + base[n:2n]) * post_mult
//   comb   = Sinkhorn(mixes[2n:] * scale[2] + base[2n:])
//   head: w = sigmoid(mixes * scale[0] + base) + pre_eps
#pragma once

#include "cuda/common.cuh"
#include "cuda/sinkhorn.cuh"

namespace mhc::cuda_impl {

// Scalars of MhcConfig in the math type.
template <class M> struct SiteConsts {
  int iters;
  M eps, norm_eps, pre_eps, post_mult;
};
template <class M> SiteConsts<M> site_consts(const MhcConfig& cfg) {
  return {cfg.iters, M(cfg.eps), M(cfg.norm_eps), M(cfg.pre_eps), M(cfg.post_mult)};
}

// Where row j of a pre site's mixes belongs: 0 = pre, 1 = post, 2 = comb.
__host__ __device__ __forceinline__ int coef_group(int j, int n) { return j < n ? 0 : (j < 2 * n ? 1 : 2); }

// Scale of a group, 0 when scale is absent (static mode).
template <class M> __device__ __forceinline__ M scale_of(const M* scale, int group) {
  return scale ? scale[group] : M(0);
}

// fp32 sigmoid with a short, branch-free dependency chain (a few ulp).
__device__ __forceinline__ float sigmoid_fast(float v) { return fast_rcp(1.f + __expf(-v)); }

// rsqrt(mean of squares + norm_eps), as the reference: 1 / sqrt(.).
template <class M> __device__ __forceinline__ M rstd_from(M sum_sq, M count, M norm_eps) {
  return M(1) / sqrt(sum_sq / count + norm_eps);
}

// ---- the epilogue of a forward pre, per token, from its row of projection sums ----------------------------
// row[0, M): the token's mixes before rstd (M = n * n + 2n); row[M]: its sum of squares. Shared by the cluster
// kernel (pre.cu) and the streaming kernel (pre_stream.cu), so both write the same bits.

// h_post, and for the backward the scaled mixes and rstd (either may be absent).
template <int N>
__device__ __forceinline__ void store_post_coefficients(const float* row, float rstd, float s_post, const float* base,
                                                        const SiteConsts<float>& k, std::int64_t t, float* h_post,
                                                        float* mixes, float* rstd_out) {
  constexpr int M = N * N + 2 * N;
#pragma unroll
  for (int i = 0; i < N; ++i) h_post[t * N + i] = sigmoid_fast(row[N + i] * rstd * s_post + __ldg(base + N + i)) * k.post_mult;
  if (mixes)
    for (int j = 0; j < M; ++j) mixes[t * M + j] = row[j] * rstd;
  if (rstd_out) rstd_out[t] = rstd;
}

// comb = Sinkhorn(mixes[2n:] * rstd * scale[2] + base[2n:]), one thread per token.
template <int N>
__device__ __forceinline__ void store_comb(const float* row, float rstd, float s_res, const float* base,
                                           const SiteConsts<float>& k, std::int64_t t, float* comb) {
  float p[N * N];
#pragma unroll
  for (int r = 0; r < N * N; ++r) p[r] = row[2 * N + r] * rstd * s_res + __ldg(base + 2 * N + r);
  sinkhorn_forward_reg<N, true>(p, k.eps, k.iters);
#pragma unroll
  for (int r = 0; r < N * N; ++r) comb[t * N * N + r] = p[r];
}

}  // namespace mhc::cuda_impl
