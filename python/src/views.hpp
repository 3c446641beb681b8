// DLPack arrays (torch tensors) -> mhc::TensorView, shared by every binding file.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>

#include "mhc/config.hpp"
#include "mhc/tensor.hpp"

namespace mhc::python {

namespace nb = nanobind;
using Array = nb::ndarray<>;
using OptArray = std::optional<nb::ndarray<>>;

// Throws mhc::DTypeError / InvalidArgument (-> TypeError / ValueError) naming `name`.
TensorView to_view(const Array& a, const char* name);
TensorView to_view(const OptArray& a, const char* name);  // None -> TensorView::absent()

// Execution context from the Python side: backend name ("auto", "reference", "fast", "cuda")
// and the raw cudaStream_t of torch's current stream (0 = default stream).
Context make_context(const char* backend, std::uintptr_t stream);

void bind_nstream(nb::module_& m);  // python/src/bind_nstream.cpp
void bind_history(nb::module_& m);  // python/src/bind_history.cpp

}  // namespace mhc::python
