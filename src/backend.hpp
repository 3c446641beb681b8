// The backends behind the public ops. The front end (src/ops.cpp) validates every argument and
// then calls exactly one of these with the same argument structs; backends may assume valid input.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mhc/ops.hpp"

// X(op_name, ArgsStruct) for every op that a backend implements.
#define MHC_FOR_EACH_OP(X)                         \
  X(pre_forward, PreForward)                       \
  X(pre_backward, PreBackward)                     \
  X(post_forward, PostForward)                     \
  X(post_backward, PostBackward)                   \
  X(post_pre_forward, PostPreForward)              \
  X(sinkhorn_forward, SinkhornForward)             \
  X(sinkhorn_backward, SinkhornBackward)           \
  X(expand_forward, ExpandForward)                 \
  X(expand_backward, ExpandBackward)               \
  X(head_forward, HeadForward)                     \
  X(head_backward, HeadBackward)                   \
  X(residual_add_agg_forward, ResidualAddAggForward) \
  X(residual_add_agg_backward, ResidualAddAggBackward)

#define MHC_DECLARE_OP(name, Args) void name(const Args& args, const MhcConfig& cfg, const Context& ctx);

// Workspace queries of the backward ops that reduce parameter gradients over tokens.
#define MHC_DECLARE_WORKSPACE_QUERIES                                                               \
  std::size_t pre_backward_workspace_bytes(const PreBackward& args, const MhcConfig& cfg,          \
                                           const Context& ctx);                                    \
  std::size_t head_backward_workspace_bytes(const HeadBackward& args, const MhcConfig& cfg,        \
                                            const Context& ctx);

namespace mhc {

namespace cpu_ref {  // src/cpu/reference.cpp: plain loops, fp64 accumulation
MHC_FOR_EACH_OP(MHC_DECLARE_OP)
MHC_DECLARE_WORKSPACE_QUERIES
}  // namespace cpu_ref

namespace cpu_fast {  // src/cpu/fast*.cpp: threaded, vectorisable
MHC_FOR_EACH_OP(MHC_DECLARE_OP)
MHC_DECLARE_WORKSPACE_QUERIES
}  // namespace cpu_fast

namespace cuda_impl {  // src/cuda/*.cu (or src/ops_nocuda.cpp when built without CUDA)
MHC_FOR_EACH_OP(MHC_DECLARE_OP)
MHC_DECLARE_WORKSPACE_QUERIES
std::int64_t count_nonfinite(const TensorView& t, const Context& ctx);  // synchronises the stream
int device_count();
TuningStatus tuning_status();  // src/cuda/tuning.cpp
TuningStatus reload_tuning();
void set_tuning_json(const std::string& json);
}  // namespace cuda_impl

}  // namespace mhc

// Runs `call` (e.g. pre_forward(args, cfg, ctx)) on the backend chosen for `device`.
#define MHC_DISPATCH(device, ctx, call)                            \
  switch (::mhc::detail::select_backend(device, ctx)) {            \
    case ::mhc::Backend::cpu_reference: return ::mhc::cpu_ref::call;  \
    case ::mhc::Backend::cpu_fast: return ::mhc::cpu_fast::call;      \
    default: return ::mhc::cuda_impl::call;                         \
  }
