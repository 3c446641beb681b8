// mhc._C: the nanobind extension. Tensors arrive through DLPack; torch allocates every output.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#include "mhc/mhc.hpp"
#include "torch_ops.hpp"
#include "views.hpp"

namespace nb = nanobind;

namespace mhc::python {

namespace {
DType dtype_of(const nb::dlpack::dtype& dt, const char* name) {
  using nb::dlpack::dtype_code;
  const auto code = static_cast<dtype_code>(dt.code);
  if (dt.lanes == 1) {
    if (code == dtype_code::Float && dt.bits == 32) return DType::f32;
    if (code == dtype_code::Float && dt.bits == 64) return DType::f64;
    if (code == dtype_code::Float && dt.bits == 16) return DType::f16;
    if (code == dtype_code::Bfloat && dt.bits == 16) return DType::bf16;
  }
  throw DTypeError(std::string(name) + ": unsupported dtype (expected float32, float64, float16 or bfloat16)");
}
}  // namespace

TensorView to_view(const Array& a, const char* name) {
  TensorView t;
  if (a.ndim() > static_cast<std::size_t>(kMaxRank))
    throw InvalidArgument(std::string(name) + ": rank " + std::to_string(a.ndim()) + " exceeds " +
                          std::to_string(kMaxRank));
  t.dtype = dtype_of(a.dtype(), name);
  t.data = a.data();
  t.rank = static_cast<int>(a.ndim());
  for (int d = 0; d < t.rank; ++d) {
    t.shape[d] = static_cast<std::int64_t>(a.shape(d));
    t.strides[d] = static_cast<std::int64_t>(a.stride(d));
  }
  const int dev = a.device_type();
  if (dev == nb::device::cpu::value) t.device = {DeviceType::cpu, 0};
  else if (dev == nb::device::cuda::value) t.device = {DeviceType::cuda, a.device_id()};
  else throw DeviceError(std::string(name) + ": unsupported device type " + std::to_string(dev) + " (expected CPU or CUDA)");
  return t;
}

TensorView to_view(const OptArray& a, const char* name) {
  return a ? to_view(*a, name) : TensorView::absent();
}

Context make_context(const char* backend, std::uintptr_t stream) {
  Context ctx;
  const std::string b = backend;
  if (b == "auto") ctx.backend = Backend::automatic;
  else if (b == "reference") ctx.backend = Backend::cpu_reference;
  else if (b == "fast") ctx.backend = Backend::cpu_fast;
  else if (b == "cuda") ctx.backend = Backend::cuda;
  else throw InvalidArgument("backend: expected 'auto', 'reference', 'fast' or 'cuda', got '" + b + "'");
  ctx.stream = reinterpret_cast<void*>(stream);
  return ctx;
}

}  // namespace mhc::python

NB_MODULE(_C, m) {
  using namespace mhc;
  m.doc() = "mhc C++/CUDA core (nanobind, DLPack)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const DTypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  nb::enum_<NanPolicy>(m, "NanPolicy")
      .value("propagate", NanPolicy::propagate)
      .value("check", NanPolicy::check);

  nb::class_<MhcConfig>(m, "Config")
      .def(
          "__init__",
          [](MhcConfig* c, int n, int iters, float eps, float norm_eps, float pre_eps, float post_mult,
             NanPolicy nan_policy) {
            new (c) MhcConfig{n, iters, eps, norm_eps, pre_eps, post_mult, nan_policy};
          },
          nb::kw_only(), nb::arg("n") = 4, nb::arg("iters") = 20, nb::arg("eps") = 1e-6f,
          nb::arg("norm_eps") = 1e-6f, nb::arg("pre_eps") = 1e-6f, nb::arg("post_mult") = 2.0f,
          nb::arg("nan_policy") = NanPolicy::propagate)
      .def_rw("n", &MhcConfig::n)
      .def_rw("iters", &MhcConfig::iters)
      .def_rw("eps", &MhcConfig::eps)
      .def_rw("norm_eps", &MhcConfig::norm_eps)
      .def_rw("pre_eps", &MhcConfig::pre_eps)
      .def_rw("post_mult", &MhcConfig::post_mult)
      .def_rw("nan_policy", &MhcConfig::nan_policy);

  m.def("version", &mhc::version);
  m.def("set_poison_outputs", &mhc::python::set_poison_outputs, nb::arg("on"));
  m.def("built_with_cuda", &mhc::built_with_cuda);
  m.def("cuda_device_count", &mhc::cuda_device_count);

  nb::class_<HistoryConfig>(m, "HistoryConfig")
      .def(
          "__init__",
          [](HistoryConfig* c, const std::string& constraint, double temperature, double epsilon, int sinkhorn_iters,
             double sinkhorn_eps, NanPolicy nan_policy) {
            new (c) HistoryConfig{parse_constraint(constraint), temperature, epsilon, sinkhorn_iters, sinkhorn_eps,
                                  nan_policy};
          },
          nb::kw_only(), nb::arg("constraint") = "simplex", nb::arg("temperature") = 1.0,
          nb::arg("epsilon") = 0.1, nb::arg("sinkhorn_iters") = 20, nb::arg("sinkhorn_eps") = 1e-6,
          nb::arg("nan_policy") = NanPolicy::propagate)
      .def_prop_ro("constraint", [](const HistoryConfig& c) { return std::string(constraint_name(c.constraint)); })
      .def_rw("temperature", &HistoryConfig::temperature)
      .def_rw("epsilon", &HistoryConfig::epsilon)
      .def_rw("sinkhorn_iters", &HistoryConfig::sinkhorn_iters)
      .def_rw("sinkhorn_eps", &HistoryConfig::sinkhorn_eps)
      .def_rw("nan_policy", &HistoryConfig::nan_policy);
  m.attr("MAX_HISTORY") = kMaxHistory;

  // The CUDA tuning table: {"path", "entries", "error"} (see mhc/ops.hpp and docs/TUNING.md).
  auto status_dict = [](const TuningStatus& s) {
    nb::dict d;
    d["path"] = s.path;
    d["entries"] = s.entries;
    d["error"] = s.error;
    return d;
  };
  m.def("tuning_status", [status_dict] { return status_dict(mhc::tuning_status()); });
  m.def("reload_tuning", [status_dict] { return status_dict(mhc::reload_tuning()); });
  m.def("set_tuning_json", &mhc::set_tuning_json, nb::arg("json"));

  python::bind_ops(m);
}
