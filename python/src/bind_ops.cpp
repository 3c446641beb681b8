// Bindings of every op of both families, generated from the op table (src/backend.hpp) and the field tables
// (fields.hpp): `_C.<op>(field=..., ..., config=..., backend="auto", stream=0)` and
// `_C.<query>(field=..., config=...)` for the workspace queries.
//
// Tensors arrive as DLPack arrays (the Python layer passes torch.utils.dlpack.to_dlpack capsules: no stream
// handshake, no requires_grad refusal); a field left out or None is absent, a list field takes a Python list
// (None entries absent). The C++ front end then checks every field and names the one that is wrong. Views are
// built with the GIL held; the op runs without it.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "backend.hpp"
#include "fields.hpp"
#include "views.hpp"

namespace mhc::python {

namespace {

// Reads the keyword arguments of one call into an argument struct; list fields keep their views here.
class Fields {
 public:
  Fields(const char* op, const nb::kwargs& kwargs) : op_(op), kwargs_(kwargs) {}

  void tensor(const char* name, TensorView& field) {
    const nb::handle value = take(name);
    if (!value.is_valid() || value.is_none()) return;
    arrays_.push_back(cast<Array>(value, name));  // the array must outlive the call: it owns the import
    field = to_view(arrays_.back(), name);
  }

  void list(const char* name, std::span<const TensorView>& field) {
    const nb::handle value = take(name);
    if (!value.is_valid() || value.is_none()) return;
    array_lists_.push_back(cast<std::vector<OptArray>>(value, name));
    lists_.push_back(to_views(array_lists_.back(), name));
    field = lists_.back();
  }

  template <class Config> const Config& config() {
    const nb::handle value = take("config");
    if (!value.is_valid()) throw nb::type_error((std::string(op_) + ": config: required argument missing").c_str());
    return cast<const Config&>(value, "config");
  }

  std::string backend() {
    const nb::handle value = take("backend");
    return value.is_valid() ? cast<std::string>(value, "backend") : std::string("auto");
  }

  Stream stream() {
    const nb::handle value = take("stream");
    return value.is_valid() ? cast<Stream>(value, "stream") : Stream{0};
  }

  // Every keyword must have been a field of the op: a misspelt one would otherwise be silently absent.
  void expect_all_used() const {
    if (used_ == static_cast<std::size_t>(PyDict_Size(kwargs_.ptr()))) return;
    for (auto [key, value] : kwargs_) {
      const std::string name = nb::cast<std::string>(key);
      bool known = false;
      for (const std::string& u : used_names_) known = known || u == name;
      if (!known) throw nb::type_error((std::string(op_) + "() got an unexpected keyword argument '" + name + "'").c_str());
    }
  }

 private:
  nb::handle take(const char* name) {
    PyObject* value = PyDict_GetItemString(kwargs_.ptr(), name);  // borrowed
    if (value == nullptr) return {};
    ++used_;
    used_names_.emplace_back(name);
    return nb::handle(value);
  }

  template <class T> T cast(nb::handle value, const char* name) const {
    try {
      return nb::cast<T>(value);
    } catch (const nb::cast_error&) {
      throw nb::type_error((std::string(op_) + ": " + name + ": expected a tensor (DLPack), got " +
                            nb::cast<std::string>(nb::str(value.type().attr("__name__")))).c_str());
    }
  }

  const char* op_;
  const nb::kwargs& kwargs_;
  std::size_t used_ = 0;
  std::vector<std::string> used_names_;
  std::deque<Array> arrays_;
  std::deque<std::vector<OptArray>> array_lists_;
  std::deque<std::vector<TensorView>> lists_;  // deques: growing them never moves what a span points to
};

#define MHC_READ_TENSOR(field) fields.tensor(#field, a.field);
#define MHC_READ_LIST(field) fields.list(#field, a.field);

// One call's keyword arguments read into `a` (the op's argument struct), `cfg`, `backend` and `stream`.
#define MHC_READ_CALL(name, Args, Config)                                        \
  Fields fields(#name, kwargs);                                                  \
  Args a;                                                                        \
  MHC_FIELDS_##Args(MHC_READ_TENSOR, MHC_READ_LIST);                             \
  const Config& cfg = fields.config<Config>();                                   \
  const std::string backend = fields.backend();                                  \
  const Stream stream = fields.stream();                                         \
  fields.expect_all_used();

#define MHC_BIND_OP(name, Args, Config)                                          \
  m.def(#name, [](const nb::kwargs& kwargs) {                                    \
    MHC_READ_CALL(name, Args, Config)                                            \
    run(::mhc::name, a, cfg, backend, stream);                                   \
  });

#define MHC_BIND_QUERY(name, Args, Config)                                       \
  m.def(#name, [](const nb::kwargs& kwargs) {                                    \
    MHC_READ_CALL(name, Args, Config)                                            \
    return ::mhc::name(a, cfg, make_context(backend.c_str(), stream));           \
  });

}  // namespace

void bind_ops(nb::module_& m) {
  MHC_FOR_EACH_OP(MHC_BIND_OP)
  MHC_FOR_EACH_WORKSPACE_QUERY(MHC_BIND_QUERY)
}

}  // namespace mhc::python
