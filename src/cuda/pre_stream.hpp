// The streaming (cluster-free) pre and fused post+pre of src/cuda/pre_stream.cu, called by the entry
// points in src/cuda/pre.cu. Each returns false, having launched nothing, when the shape is not one it
// handles (the caller then runs the cluster kernel or the generic path).
#pragma once

#include "cuda/host.hpp"

namespace mhc::cuda_impl {

// Which fast pre forward is tried first: MHC_CUDA_PRE=cluster selects the cluster kernel of pre.cu,
// anything else (or unset) the streaming one. Read at every call, so benchmarks can switch at run time.
enum class PrePath { stream, cluster };
PrePath pre_path();

bool pre_stream_forward(const PreForward& a, const MhcConfig& cfg, cudaStream_t stream);
bool post_pre_stream_forward(const PostPreForward& a, const MhcConfig& cfg, cudaStream_t stream);

}  // namespace mhc::cuda_impl
