// The streaming (cluster-free) pre and fused post+pre of src/cuda/pre_stream.cu, called by the entry
// points in src/cuda/pre.cu. The *_forward functions return false, having launched nothing, when the shape
// is not one they handle (the caller then runs the cluster kernel or the generic path).
#pragma once

#include "cuda/host.hpp"

namespace mhc::cuda_impl {

// Which fast pre forward runs, from MHC_CUDA_PRE (read at every call, so benchmarks can switch at run time):
//   stream (default, or unset): the streaming pre, projecting with the direct kernel (v6) for n in {2, 4} from
//     1024 tokens; post+pre is fused into the ring projection for
//     n <= 4 and at most kFusedPostPreTokens tokens, else the post kernel followed by the streaming pre (each
//     measured the faster on H200 there: docs/cuda_notes.md, v5)
//   direct: the direct projection wherever it runs (n in {2, 4}), post+pre fused into it
//   ring: the streaming pre with its ring projection (project_kernel) at every size
//   fused: the streaming pre, post+pre always fused into it
//   cluster: the cluster kernels of pre.cu
//   wave: the wave pre (pre_wave.cu) wherever it can run and the caller gives its workspace, the streaming pre
//     elsewhere (off by default: slower than the streaming pre on the H200 so far)
enum class PrePath { stream, fused, cluster };
PrePath pre_path();
constexpr std::int64_t kFusedPostPreTokens = 16;

bool pre_stream_supported(const PreForward& a);  // pre_stream_forward would run (default work split)
bool pre_stream_forward(const PreForward& a, const MhcConfig& cfg, cudaStream_t stream);
// direct_only: run only the fused post + direct projection (false where that does not run: the caller then
// decides between the other paths).
bool post_pre_stream_forward(const PostPreForward& a, const MhcConfig& cfg, cudaStream_t stream,
                             bool direct_only = false);

// The wave pre of src/cuda/pre_wave.cu (x read from device memory once): the workspace it needs for this call
// (0 when it would not run), and the launch (false, having launched nothing, without that workspace or when
// the shape is not one it takes).
std::size_t pre_wave_workspace_bytes(const PreForward& a);
bool pre_wave_forward(const PreForward& a, const MhcConfig& cfg, cudaStream_t stream);

}  // namespace mhc::cuda_impl
