// The backends behind the public ops of both families (include/mhc/ops.hpp: n-stream; include/mhc/history.hpp:
// multi-history skip). The front ends (src/ops.cpp, src/history.cpp) validate every argument and then call exactly
// one of these with the same argument structs; backends may assume valid input.
//
// One table: every op, its argument struct and its config. The declarations of each backend, the no-CUDA
// stubs (src/ops_nocuda.cpp) and the front ends' dispatch follow from it. Adding an op is a row here.
#pragma once

#include <cstddef>
#include <cstdint>

#include "mhc/history.hpp"
#include "mhc/ops.hpp"

// X(op_name, ArgsStruct, ConfigStruct) for every op that a backend implements.
#define MHC_FOR_EACH_OP(X)                                            \
  X(pre_forward, PreForward, MhcConfig)                               \
  X(pre_backward, PreBackward, MhcConfig)                             \
  X(post_forward, PostForward, MhcConfig)                             \
  X(post_backward, PostBackward, MhcConfig)                           \
  X(post_pre_forward, PostPreForward, MhcConfig)                      \
  X(sinkhorn_forward, SinkhornForward, MhcConfig)                     \
  X(sinkhorn_backward, SinkhornBackward, MhcConfig)                   \
  X(expand_forward, ExpandForward, MhcConfig)                         \
  X(expand_backward, ExpandBackward, MhcConfig)                       \
  X(head_forward, HeadForward, MhcConfig)                             \
  X(head_backward, HeadBackward, MhcConfig)                           \
  X(residual_add_agg_forward, ResidualAddAggForward, MhcConfig)       \
  X(residual_add_agg_backward, ResidualAddAggBackward, MhcConfig)     \
  X(project_logits_forward, ProjectLogitsForward, HistoryConfig)      \
  X(project_logits_backward, ProjectLogitsBackward, HistoryConfig)    \
  X(history_mix_forward, HistoryMixForward, HistoryConfig)            \
  X(history_mix_backward, HistoryMixBackward, HistoryConfig)          \
  X(history_skip_forward, HistorySkipForward, HistoryConfig)          \
  X(history_skip_backward, HistorySkipBackward, HistoryConfig)

// X(query_name, ArgsStruct, ConfigStruct): the workspace bytes of the backward ops that reduce parameter
// gradients over tokens and of the forward pre's fastest kernel (the caller allocates the workspace).
#define MHC_FOR_EACH_WORKSPACE_QUERY(X)                                          \
  X(pre_forward_workspace_bytes, PreForward, MhcConfig)                          \
  X(post_pre_forward_workspace_bytes, PostPreForward, MhcConfig)                 \
  X(pre_backward_workspace_bytes, PreBackward, MhcConfig)                        \
  X(head_backward_workspace_bytes, HeadBackward, MhcConfig)                      \
  X(history_mix_backward_workspace_bytes, HistoryMixBackward, HistoryConfig)     \
  X(history_skip_backward_workspace_bytes, HistorySkipBackward, HistoryConfig)

#define MHC_DECLARE_OP(name, Args, Config) void name(const Args& args, const Config& cfg, const Context& ctx);
#define MHC_DECLARE_WORKSPACE_QUERY(name, Args, Config) \
  std::size_t name(const Args& args, const Config& cfg, const Context& ctx);
#define MHC_DECLARE_BACKEND                          \
  MHC_FOR_EACH_OP(MHC_DECLARE_OP)                    \
  MHC_FOR_EACH_WORKSPACE_QUERY(MHC_DECLARE_WORKSPACE_QUERY)

namespace mhc {

namespace cpu_ref {  // src/cpu/reference.cpp, history_reference.cpp: plain loops, fp64 accumulation
MHC_DECLARE_BACKEND
}  // namespace cpu_ref

namespace cpu_fast {  // src/cpu/fast*.cpp, history_fast.cpp: threaded, vectorisable
MHC_DECLARE_BACKEND
}  // namespace cpu_fast

namespace cuda_impl {  // src/cuda/*.cu (or src/ops_nocuda.cpp when built without CUDA)
MHC_DECLARE_BACKEND
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
