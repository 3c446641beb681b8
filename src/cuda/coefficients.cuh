// Per-token coefficient math shared by the forward and backward kernels (docs/MATH.md section 1):
//   h_pre  = sigmoid(mixes[0:n]  * scale[0] + base[0:n])  + pre_eps
//   h_post = sigmoid(mixes[n:2n] * scale[1] + base[n:2n]) * post_mult
//   comb   = Sinkhorn(mixes[2n:] * scale[2] + base[2n:])
//   head: w = sigmoid(mixes * scale[0] + base) + pre_eps
#pragma once

#include "cuda/common.cuh"

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

}  // namespace mhc::cuda_impl
