// Compiled instead of src/cuda/ when mhc is built without CUDA: the front ends never dispatch here
// (select_backend throws first), but every symbol of the op table must exist.
#include "backend.hpp"

namespace mhc::cuda_impl {

namespace {
[[noreturn]] void unavailable() { throw DeviceError("mhc: this build of mhc has no CUDA support"); }
}  // namespace

#define MHC_UNAVAILABLE_OP(name, Args, Config) \
  void name(const Args&, const Config&, const Context&) { unavailable(); }
#define MHC_UNAVAILABLE_QUERY(name, Args, Config) \
  std::size_t name(const Args&, const Config&, const Context&) { unavailable(); }
MHC_FOR_EACH_OP(MHC_UNAVAILABLE_OP)
MHC_FOR_EACH_WORKSPACE_QUERY(MHC_UNAVAILABLE_QUERY)

std::int64_t count_nonfinite(const TensorView&, const Context&) { unavailable(); }
int device_count() { return 0; }
TuningStatus tuning_status() { return {}; }
TuningStatus reload_tuning() { return {}; }
void set_tuning_json(const std::string&) { unavailable(); }

}  // namespace mhc::cuda_impl
