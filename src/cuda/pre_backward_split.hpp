// "split" version of the pre backward's stage C (src/cuda/pre_backward_split.cu), selected by
// MHC_CUDA_PRE_BWD=split (read at every call; the default is v4, src/cuda/pre_backward.cu).
// Two streaming kernels instead of v2's fused tensor-core kernel:
//   grad_x:  CUDA cores, fp32, fn resident in registers, many tokens streamed through each block;
//   grad_fn: per-token-chunk partials DP^T x on tensor cores (DP = hi + lo bf16, x exact), written to
//            the workspace for stage D's fixed-order reduction over chunks.
#pragma once

#include <cstdint>

#include "cuda/host.hpp"

namespace mhc::cuda_impl {

struct PreBwdSplitArgs {
  const void* x;       // [T, n, C] bf16
  const void* g;       // grad_layer_input [T, C] bf16, or null
  const void* accum;   // grad_x_accum [T, n, C] bf16, or null
  void* grad_x;        // [T, n, C] bf16
  const float* fn;     // [m, nC], or null (static mode)
  const float* H;      // [T, n]
  const float* DP;     // [T, m], null in static mode
  const float* XC;     // [T], null in static mode
  float* GF;           // [chunks, m, nC] grad_fn partials, null in static mode
  std::int64_t T, C;
  int n;
};

bool pre_bwd_split_requested();  // MHC_CUDA_PRE_BWD == "split"
// Shape-level support (bf16 streams, n in {2, 4, 8}, C a multiple of 8); alignment is the caller's check.
bool pre_bwd_split_shape_ok(DType dtype, std::int64_t n, std::int64_t C);
// Token chunks of the grad_fn partials (0 when the shape is not supported or there is no fn): the
// workspace must hold this many [m, nC] partials. Depends only on (T, n, C, device).
int pre_bwd_split_chunks(DType dtype, std::int64_t T, std::int64_t n, std::int64_t C, bool has_fn);
// Launches grad_x and, with fn, the grad_fn partials; returns the chunks written to GF (0 in static mode).
int pre_bwd_split_launch(const PreBwdSplitArgs& a, cudaStream_t stream);

}  // namespace mhc::cuda_impl
