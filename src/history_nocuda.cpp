// Compiled instead of src/cuda/history.cu when mhc is built without CUDA: the front end never
// dispatches here (select_backend throws first), but the symbols must exist.
#include "history_backend.hpp"

namespace mhc::cuda_impl {

namespace {
[[noreturn]] void unavailable() { throw DeviceError("mhc: this build of mhc has no CUDA support"); }
}  // namespace

#define MHC_UNAVAILABLE_HISTORY_OP(name, Args) \
  void name(const Args&, const HistoryConfig&, const Context&) { unavailable(); }
MHC_FOR_EACH_HISTORY_OP(MHC_UNAVAILABLE_HISTORY_OP)

std::size_t history_mix_backward_workspace_bytes(const HistoryMixBackward&, const HistoryConfig&, const Context&) {
  unavailable();
}
std::size_t history_skip_backward_workspace_bytes(const HistorySkipBackward&, const HistoryConfig&, const Context&) {
  unavailable();
}

}  // namespace mhc::cuda_impl
