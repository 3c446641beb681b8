// Compiled instead of src/cuda/ when mhc is built without CUDA: the front end never dispatches
// here (select_backend throws first), but the symbols must exist.
#include "backend.hpp"

namespace mhc::cuda_impl {

namespace {
[[noreturn]] void unavailable() { throw DeviceError("mhc: this build of mhc has no CUDA support"); }
}  // namespace

#define MHC_UNAVAILABLE_OP(name, Args) \
  void name(const Args&, const MhcConfig&, const Context&) { unavailable(); }
MHC_FOR_EACH_OP(MHC_UNAVAILABLE_OP)

std::size_t pre_backward_workspace_bytes(const PreBackward&, const MhcConfig&, const Context&) { unavailable(); }
std::size_t head_backward_workspace_bytes(const HeadBackward&, const MhcConfig&, const Context&) { unavailable(); }
std::int64_t count_nonfinite(const TensorView&, const Context&) { unavailable(); }
int device_count() { return 0; }
TuningStatus tuning_status() { return {}; }
TuningStatus reload_tuning() { return {}; }
void set_tuning_json(const std::string&) { unavailable(); }

}  // namespace mhc::cuda_impl
