#include "common/validate.hpp"

#include <cmath>
#include <cstdint>
#include <iterator>
#include <utility>

#include "backend.hpp"
#include "common/float_types.hpp"

namespace mhc::detail {

namespace {

std::string expected_shape(std::initializer_list<Dim> shape) {
  std::string names = "[", values = "[";
  bool first = true;
  for (const Dim& d : shape) {
    if (!first) {
      names += ", ";
      values += ", ";
    }
    names += d.name;
    values += std::to_string(d.value);
    first = false;
  }
  return names + "] = " + values + "]";
}

bool shape_matches(const TensorView& t, std::initializer_list<Dim> shape) {
  if (t.rank != static_cast<int>(shape.size())) return false;
  int d = 0;
  for (const Dim& s : shape)
    if (t.shape[d++] != s.value) return false;
  return true;
}

}  // namespace

void ArgChecker::fail(const std::string& message) const {
  throw InvalidArgument(std::string("mhc.") + op_ + ": " + message);
}
void ArgChecker::fail_dtype(const std::string& message) const {
  throw DTypeError(std::string("mhc.") + op_ + ": " + message);
}
void ArgChecker::fail_device(const std::string& message) const {
  throw DeviceError(std::string("mhc.") + op_ + ": " + message);
}

void ArgChecker::present(const TensorView& t, const char* name) const {
  if (!t.present()) fail(std::string(name) + ": required tensor is missing");
  if (t.rank < 0 || t.rank > kMaxRank) fail(std::string(name) + ": invalid rank " + std::to_string(t.rank));
  if (static_cast<unsigned>(t.dtype) > static_cast<unsigned>(DType::f64))
    fail_dtype(std::string(name) + ": invalid dtype value " + std::to_string(static_cast<unsigned>(t.dtype)));
  if (t.device.type != DeviceType::cpu && t.device.type != DeviceType::cuda)
    fail_device(std::string(name) + ": invalid device type " + std::to_string(static_cast<unsigned>(t.device.type)));
  if (t.device.index < 0) fail_device(std::string(name) + ": negative device index " + std::to_string(t.device.index));
  // The element count and the byte size in int64 (numel() would wrap, and a wrapped 0 hides a null pointer).
  std::int64_t count = 1, bytes = 0;
  bool overflow = false;
  for (int d = 0; d < t.rank; ++d) {
    if (t.shape[d] < 0) fail(std::string(name) + ": negative dimension in shape " + t.shape_string());
    overflow = overflow || __builtin_mul_overflow(count, t.shape[d], &count);
  }
  overflow = overflow || __builtin_mul_overflow(count, static_cast<std::int64_t>(dtype_size(t.dtype)), &bytes);
  if (overflow)
    fail(std::string(name) + ": shape " + t.shape_string() + " is too large (its size overflows int64)");
  if (count > 0 && t.data == nullptr) fail(std::string(name) + ": data pointer is null");
}

void ArgChecker::disjoint(std::span<const Named> outputs, std::span<const Named> inputs) const {
  auto range = [](const TensorView& t) {
    const auto begin = reinterpret_cast<std::uintptr_t>(t.data);
    return std::pair{begin, begin + static_cast<std::uintptr_t>(t.numel()) * dtype_size(t.dtype)};
  };
  auto overlap = [&](const TensorView& a, const TensorView& b) {
    if (!a.present() || !b.present() || a.numel() == 0 || b.numel() == 0) return false;
    const auto [a0, a1] = range(a);
    const auto [b0, b1] = range(b);
    return a0 < b1 && b0 < a1;
  };
  for (auto out = outputs.begin(); out != outputs.end(); ++out) {
    for (const Named& in : inputs)
      if (overlap(out->t, in.t))
        fail(out->label() + ": shares memory with the input " + in.label() + " (outputs must not overlap inputs)");
    for (auto other = std::next(out); other != outputs.end(); ++other)
      if (overlap(out->t, other->t))
        fail(out->label() + ": shares memory with the output " + other->label() +
             " (outputs must not overlap each other)");
  }
}

void ArgChecker::workspace(const TensorView& ws, std::size_t needed, Device device) const {
  if (needed == 0) return;
  present(ws, "workspace");
  const std::size_t have = static_cast<std::size_t>(ws.numel()) * dtype_size(ws.dtype);
  if (have < needed) fail("workspace: expected at least " + std::to_string(needed) + " bytes, got " + std::to_string(have));
  if (!(ws.device == device)) fail_device("workspace: expected a buffer on " + device_name(device));
}

void ArgChecker::leading(const TensorView& t, const char* name, int rank, const char* layout) const {
  present(t, name);
  if (t.rank != rank)
    fail(std::string(name) + ": expected a " + std::to_string(rank) + "-D tensor " + layout + ", got shape " +
         t.shape_string());
  if (!t.is_contiguous()) fail(std::string(name) + ": expected a contiguous tensor, got shape " + t.shape_string() + " with non-contiguous strides");
}

void ArgChecker::tensor(const TensorView& t, const char* name, std::initializer_list<Dim> shape, DType dtype,
                        Device device) const {
  present(t, name);
  if (!shape_matches(t, shape))
    fail(std::string(name) + ": expected shape " + expected_shape(shape) + ", got " + t.shape_string());
  if (t.dtype != dtype)
    fail_dtype(std::string(name) + ": expected dtype " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
  if (!(t.device == device))
    fail_device(std::string(name) + ": expected a tensor on " + device_name(device) + ", got one on " +
                device_name(t.device));
  if (!t.is_contiguous()) fail(std::string(name) + ": expected a contiguous tensor");
}

void ArgChecker::optional(const TensorView& t, const char* name, std::initializer_list<Dim> shape, DType dtype,
                          Device device) const {
  if (t.present()) tensor(t, name, shape, dtype, device);
}

void ArgChecker::streams(std::int64_t n, const MhcConfig& cfg, const char* name) const {
  if (n < 1 || n > kMaxStreams)
    fail(std::string(name) + ": the number of streams n must be in [1, " + std::to_string(kMaxStreams) + "], got " +
         std::to_string(n));
  if (n != cfg.n)
    fail(std::string(name) + ": has n = " + std::to_string(n) + " streams but the config says n = " +
         std::to_string(cfg.n));
}

void ArgChecker::config(const MhcConfig& cfg) const {
  if (cfg.iters < 1) fail("iters: expected >= 1, got " + std::to_string(cfg.iters));
  if (!(cfg.eps >= 0.0f) || !std::isfinite(cfg.eps)) fail("eps: expected a finite value >= 0");
  if (!(cfg.norm_eps >= 0.0f) || !std::isfinite(cfg.norm_eps)) fail("norm_eps: expected a finite value >= 0");
  if (!std::isfinite(cfg.pre_eps)) fail("pre_eps: expected a finite value");
  if (!std::isfinite(cfg.post_mult)) fail("post_mult: expected a finite value");
  if (cfg.nan_policy != NanPolicy::propagate && cfg.nan_policy != NanPolicy::check)
    fail("nan_policy: expected propagate or check");
}

Backend select_backend(Device device, const Context& ctx) {
  if (device.type == DeviceType::cpu) {
    if (ctx.backend == Backend::cuda) throw DeviceError("mhc: backend cuda was requested for CPU tensors");
    return ctx.backend == Backend::cpu_reference ? Backend::cpu_reference : Backend::cpu_fast;
  }
  if (ctx.backend == Backend::cpu_reference || ctx.backend == Backend::cpu_fast)
    throw DeviceError("mhc: a CPU backend was requested for tensors on " + device_name(device));
  if (!built_with_cuda())
    throw DeviceError("mhc: got tensors on " + device_name(device) + " but this build of mhc has no CUDA support");
  return Backend::cuda;
}

void check_finite(const TensorView& t, const char* name, const char* op, const MhcConfig& cfg,
                  const Context& ctx) {
  if (cfg.nan_policy != NanPolicy::check || !t.present() || t.numel() == 0) return;
  std::int64_t bad = 0;
  if (t.device.type == DeviceType::cuda) {
    bad = cuda_impl::count_nonfinite(t, ctx);
  } else {
    dispatch_storage(t.dtype, [&](auto tag) {
      using S = decltype(tag);
      const S* p = t.ptr<const S>();
      for (std::int64_t i = 0, e = t.numel(); i < e; ++i)
        if (!std::isfinite(load(p, i))) ++bad;
    });
  }
  if (bad)
    throw NonFiniteError(std::string("mhc.") + op + ": " + name + ": contains " + std::to_string(bad) +
                         " NaN or Inf value(s) (nan_policy=check)");
}

}  // namespace mhc::detail
