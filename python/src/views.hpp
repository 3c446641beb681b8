// DLPack arrays (torch tensors) -> mhc::TensorView, shared by every binding file.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

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

using Stream = std::uintptr_t;

// Views of a list of arrays, named "name[k]" in errors (None entries of OptArray lists: absent).
template <class A>
std::vector<TensorView> to_views(const std::vector<A>& arrays, const char* name) {
  std::vector<TensorView> views;
  views.reserve(arrays.size());
  for (std::size_t k = 0; k < arrays.size(); ++k)
    views.push_back(to_view(arrays[k], (std::string(name) + "[" + std::to_string(k) + "]").c_str()));
  return views;
}

// Runs `op(args, cfg, ctx)` with the GIL released.
template <class Args, class Config, class Op>
void run(Op op, const Args& args, const Config& cfg, const std::string& backend, Stream stream) {
  const Context ctx = make_context(backend.c_str(), stream);
  nb::gil_scoped_release no_gil;
  op(args, cfg, ctx);
}


void bind_ops(nb::module_& m);  // python/src/bind_ops.cpp: every op of both families

}  // namespace mhc::python
