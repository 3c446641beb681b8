// Bindings of the multi-history skip ops (issue 6) go here.
#include "views.hpp"

namespace mhc::python {
void bind_history(nb::module_&) {}
}  // namespace mhc::python
