// The backends behind the multi-history skip ops (include/mhc/history.hpp). The front end
// (src/history.cpp) validates every argument, then calls exactly one of these; backends may assume
// valid input (shapes, dtypes, devices, H <= kMaxHistory, a supported stream/storage dtype pair).
#pragma once

#include <cstddef>

#include "backend.hpp"
#include "mhc/history.hpp"

#define MHC_FOR_EACH_HISTORY_OP(X)                  \
  X(project_logits_forward, ProjectLogitsForward)   \
  X(project_logits_backward, ProjectLogitsBackward) \
  X(history_mix_forward, HistoryMixForward)         \
  X(history_mix_backward, HistoryMixBackward)       \
  X(history_skip_forward, HistorySkipForward)       \
  X(history_skip_backward, HistorySkipBackward)

#define MHC_DECLARE_HISTORY_OP(name, Args) \
  void name(const Args& args, const HistoryConfig& cfg, const Context& ctx);

#define MHC_DECLARE_HISTORY_WORKSPACE_QUERIES                                                           \
  std::size_t history_mix_backward_workspace_bytes(const HistoryMixBackward& args, const HistoryConfig& cfg, \
                                                   const Context& ctx);                                 \
  std::size_t history_skip_backward_workspace_bytes(const HistorySkipBackward& args,                    \
                                                    const HistoryConfig& cfg, const Context& ctx);

namespace mhc {

namespace cpu_ref {  // src/cpu/history_reference.cpp: plain loops, fp64 accumulation, sort-based sparsemax
MHC_FOR_EACH_HISTORY_OP(MHC_DECLARE_HISTORY_OP)
MHC_DECLARE_HISTORY_WORKSPACE_QUERIES
}  // namespace cpu_ref

namespace cpu_fast {  // src/cpu/history_fast.cpp: threaded, vectorisable, sort-free sparsemax
MHC_FOR_EACH_HISTORY_OP(MHC_DECLARE_HISTORY_OP)
MHC_DECLARE_HISTORY_WORKSPACE_QUERIES
}  // namespace cpu_fast

namespace cuda_impl {  // src/cuda/history.cu (or src/history_nocuda.cpp without CUDA)
MHC_FOR_EACH_HISTORY_OP(MHC_DECLARE_HISTORY_OP)
MHC_DECLARE_HISTORY_WORKSPACE_QUERIES
}  // namespace cuda_impl

}  // namespace mhc
