// Bindings of the n-stream mHC ops (include/mhc/ops.hpp).
#include "views.hpp"

namespace mhc::python {
void bind_nstream(nb::module_&) {}
}  // namespace mhc::python
