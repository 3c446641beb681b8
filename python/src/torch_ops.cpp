// The ops of both families (n-stream and multi-history) registered with PyTorch's dispatcher in C++, through the
// LibTorch stable ABI (torch >= 2.10): `torch.ops.mhc.<op>` reaches the core without Python. Each kernel allocates
// its outputs with torch (the caching allocator on CUDA), builds the core's argument struct and runs the op on
// torch's current stream; the schemas are defined here, the fake implementations and autograd formulas in
// python/mhc/ops.py and python/mhc/history_ops.py (registered on these ops).
//
// The eager Python route calls these kernels directly (a redispatch to the tensor's backend key); torch.compile,
// fake tensors and tensor subclasses go through the whole dispatcher. Errors of the core keep their type
// (InvalidArgument -> ValueError; a bad dtype -> RuntimeError, after the Python checks have named it).
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "mhc/mhc.hpp"
#include "torch_ops.hpp"
#include "views.hpp"

namespace mhc::python {

// A `str` argument of a kernel. The stable ABI's own conversion to std::string (the headers of torch 2.11, which this
// is built against) leaks a heap std::string per argument and call (48 bytes; pytorch/pytorch#190493); this one,
// defined below, does not.
struct Str : std::string {};

}  // namespace mhc::python

HIDDEN_NAMESPACE_BEGIN(torch, stable, detail)
template <>
struct ToImpl<mhc::python::Str> {
  static mhc::python::Str call(StableIValue val, [[maybe_unused]] uint64_t extension_build_version,
                               [[maybe_unused]] bool is_internal) {
    StringHandle handle = torch::stable::detail::to<StringHandle>(val);
    std::size_t length = 0;
    const char* data = nullptr;
    TORCH_ERROR_CODE_CHECK(torch_string_length(handle, &length));
    TORCH_ERROR_CODE_CHECK(torch_string_c_str(handle, &data));
    mhc::python::Str out;
    out.assign(data, length);
    TORCH_ERROR_CODE_CHECK(torch_delete_string(handle));
    return out;
  }
};
HIDDEN_NAMESPACE_END(torch, stable, detail)

namespace mhc::python {

namespace {

using torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;

std::atomic<bool> poison{false};

void check(AOTITorchError err, const char* what) {
  if (err != AOTI_TORCH_SUCCESS) throw Error(std::string("mhc: torch call failed: ") + what);
}

// ---- tensors: views of torch tensors, outputs allocated by torch ---------------------------------------------

DType dtype_of(const Tensor& t, const char* name) {
  int32_t d = 0;
  check(aoti_torch_get_dtype(t.get(), &d), "dtype");
  if (d == aoti_torch_dtype_float32()) return DType::f32;
  if (d == aoti_torch_dtype_bfloat16()) return DType::bf16;
  if (d == aoti_torch_dtype_float16()) return DType::f16;
  if (d == aoti_torch_dtype_float64()) return DType::f64;
  throw InvalidArgument(std::string(name) + ": unsupported dtype (expected float32, float64, float16 or bfloat16)");
}

int32_t torch_dtype(DType d) {
  switch (d) {
    case DType::f32: return aoti_torch_dtype_float32();
    case DType::bf16: return aoti_torch_dtype_bfloat16();
    case DType::f16: return aoti_torch_dtype_float16();
    case DType::f64: return aoti_torch_dtype_float64();
  }
  return aoti_torch_dtype_float32();
}

Device device_of(const Tensor& t, const char* name) {
  int32_t type = 0, index = 0;
  check(aoti_torch_get_device_type(t.get(), &type), "device type");
  check(aoti_torch_get_device_index(t.get(), &index), "device index");
  if (type == aoti_torch_device_type_cpu()) return {DeviceType::cpu, 0};
  if (type == aoti_torch_device_type_cuda()) return {DeviceType::cuda, index};
  throw DeviceError(std::string(name) + ": unsupported device (expected CPU or CUDA)");
}

TensorView view(const Tensor& t, const char* name) {
  TensorView v;
  const int64_t rank = t.dim();
  if (rank > kMaxRank)
    throw InvalidArgument(std::string(name) + ": rank " + std::to_string(rank) + " exceeds " + std::to_string(kMaxRank));
  v.dtype = dtype_of(t, name);
  v.device = device_of(t, name);
  v.data = t.data_ptr();
  v.rank = static_cast<int>(rank);
  int64_t *sizes = nullptr, *strides = nullptr;
  check(aoti_torch_get_sizes(t.get(), &sizes), "sizes");
  check(aoti_torch_get_strides(t.get(), &strides), "strides");
  for (int d = 0; d < v.rank; ++d) v.shape[d] = sizes[d], v.strides[d] = strides[d];
  return v;
}

TensorView view(const OptTensor& t, const char* name) { return t ? view(*t, name) : TensorView::absent(); }

// The views of one kernel call. The core takes contiguous tensors; a strided one (a transposed or expanded input
// from Python) is copied contiguous here, the copy held until the call ends, so the Python side need not ask.
class Views {
 public:
  TensorView operator()(const Tensor& t, const char* name) {
    if (t.is_contiguous()) return view(t, name);
    copies_.push_back(torch::stable::contiguous(t));
    return view(copies_.back(), name);
  }
  TensorView operator()(const OptTensor& t, const char* name) { return t ? (*this)(*t, name) : TensorView::absent(); }

 private:
  std::vector<Tensor> copies_;  // only data pointers are kept in the views, so growing it is safe
};

// A contiguous output on like's device; NaN-filled while the tests poison outputs (mhc._C.set_poison_outputs).
Tensor empty(const Tensor& like, std::span<const int64_t> shape, int32_t dtype) {
  if (shape.size() > static_cast<std::size_t>(kMaxRank))
    throw InvalidArgument("mhc: an output of rank " + std::to_string(shape.size()) + " exceeds " +
                          std::to_string(kMaxRank));
  const int64_t rank = static_cast<int64_t>(shape.size());
  int64_t strides[kMaxRank];
  for (int64_t d = rank - 1, step = 1; d >= 0; --d) strides[d] = step, step *= shape[d];
  int32_t type = 0, index = 0;
  check(aoti_torch_get_device_type(like.get(), &type), "device type");
  check(aoti_torch_get_device_index(like.get(), &index), "device index");
  AtenTensorHandle out = nullptr;
  check(aoti_torch_empty_strided(rank, shape.data(), strides, dtype, type, index, &out), "empty_strided");
  Tensor t(out);
  // Only floating outputs take NaN: a kernel handed an integer input allocates its output before the view of that
  // input names the bad dtype, and filling an integer tensor with NaN would fail first, less clearly.
  const bool floating = dtype == aoti_torch_dtype_float32() || dtype == aoti_torch_dtype_float64() ||
                        dtype == aoti_torch_dtype_float16() || dtype == aoti_torch_dtype_bfloat16();
  if (floating && poison.load(std::memory_order_relaxed)) torch::stable::fill_(t, std::nan(""));
  return t;
}

Tensor empty(const Tensor& like, std::initializer_list<int64_t> shape, int32_t dtype) {
  return empty(like, std::span<const int64_t>(shape.begin(), shape.size()), dtype);
}

int32_t dtype_code(const Tensor& t) {
  int32_t d = 0;
  check(aoti_torch_get_dtype(t.get(), &d), "dtype");
  return d;
}

// float64 coefficients for float64 streams, float32 otherwise (docs/MATH.md, dtypes).
int32_t coef_dtype(const Tensor& x) {
  return dtype_code(x) == aoti_torch_dtype_float64() ? aoti_torch_dtype_float64() : aoti_torch_dtype_float32();
}

std::span<const int64_t> sizes_of(const Tensor& t) {
  int64_t* sizes = nullptr;
  check(aoti_torch_get_sizes(t.get(), &sizes), "sizes");
  return {sizes, static_cast<std::size_t>(t.dim())};
}

Tensor like(const Tensor& t) { return empty(t, sizes_of(t), dtype_code(t)); }  // same shape and dtype, contiguous

// Custom ops cannot return None: an absent parameter's gradient is a [0] placeholder.
Tensor like_or_placeholder(const OptTensor& t, const Tensor& other) {
  return t ? like(*t) : empty(other, {0}, dtype_code(other));
}

// ---- running an op: device guard, torch's current stream -----------------------------------------------------

// torch's current CUDA stream: the shim's entry point lives in libtorch_cuda, looked up once in the loaded
// library (this extension is built and linked without it, so a CPU-only torch loads it too).
void* current_cuda_stream(int index) {
  using GetStream = AOTITorchError (*)(int32_t, void**);
  static const GetStream get = [] {
    void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib ? reinterpret_cast<GetStream>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  if (get == nullptr) throw DeviceError("mhc: a CUDA tensor, but torch's CUDA library is not loaded");
  void* stream = nullptr;
  check(get(index, &stream), "current CUDA stream");
  return stream;
}

template <class Args, class Config, class Op>
void run(Op op, const Args& args, const Config& cfg, const std::string& backend, const Tensor& on) {
  Context ctx = make_context(backend.c_str(), 0);
  const Device device = device_of(on, "x");
  if (device.type != DeviceType::cuda) {
    op(args, cfg, ctx);
    return;
  }
  std::optional<torch::stable::accelerator::DeviceGuard> guard;
  if (torch::stable::accelerator::getCurrentDeviceIndex() != device.index) guard.emplace(device.index);
  ctx.stream = current_cuda_stream(device.index);
  op(args, cfg, ctx);
}

Tensor workspace(std::size_t bytes, const Tensor& like_tensor) {
  return empty(like_tensor, {static_cast<int64_t>((bytes + 3) / 4)}, aoti_torch_dtype_float32());
}

// An op's workspace, sized by the core's query and attached to its argument struct; the returned tensor
// owns the bytes for the call.
template <class Args, class Config, class Query>
Tensor attach_workspace(Args& a, Query query, const Config& cfg, const std::string& backend, const Tensor& on) {
  const std::size_t bytes = query(a, cfg, make_context(backend.c_str(), 0));
  if (bytes == 0) return Tensor();
  Tensor ws = workspace(bytes, on);
  a.workspace = view(ws, "workspace");
  return ws;
}

MhcConfig site_config(int64_t n, int64_t iters = 20, double post_mult = 2.0, double eps = 1e-6, double norm_eps = 1e-6,
                      double pre_eps = 1e-6) {
  return MhcConfig{static_cast<int>(n), static_cast<int>(iters), static_cast<float>(eps), static_cast<float>(norm_eps),
                   static_cast<float>(pre_eps), static_cast<float>(post_mult), NanPolicy::propagate};
}

// ---- pre / post / post_pre -----------------------------------------------------------------------------------

using PreOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// (layer_input [T, C], h_pre [T, n], h_post [T, n], comb [T, n, n], mixes [T, m], rstd [T]).
PreOutputs pre_outputs(const Tensor& x) {
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2), m = n * n + 2 * n;
  const int32_t k = coef_dtype(x);
  return {empty(x, {T, C}, dtype_code(x)), empty(x, {T, n}, k), empty(x, {T, n}, k), empty(x, {T, n, n}, k),
          empty(x, {T, m}, k), empty(x, {T}, k)};
}

void fill_pre_outputs(Views& v, PreForward& a, const PreOutputs& o) {
  a.layer_input = v(std::get<0>(o), "layer_input");
  a.h_pre = v(std::get<1>(o), "h_pre");
  a.h_post = v(std::get<2>(o), "h_post");
  a.comb = v(std::get<3>(o), "comb");
  a.mixes = v(std::get<4>(o), "mixes");
  a.rstd = v(std::get<5>(o), "rstd");
}

PreOutputs pre(Tensor x, OptTensor fn, Tensor base, OptTensor scale, int64_t iters, double post_mult, double eps,
               double norm_eps, double pre_eps, Str backend) {
  Views v;
  PreOutputs out = pre_outputs(x);
  PreForward a;
  a.x = v(x, "x"), a.fn = v(fn, "fn"), a.base = v(base, "base"), a.scale = v(scale, "scale");
  fill_pre_outputs(v, a, out);
  const MhcConfig cfg = site_config(x.size(1), iters, post_mult, eps, norm_eps, pre_eps);
  const Tensor ws = attach_workspace(a, mhc::pre_forward_workspace_bytes, cfg, backend, x);
  run(mhc::pre_forward, a, cfg, backend, x);
  return out;
}

// The tensors the pre's and the head's backward share: the forward's inputs and saved mixes / rstd in, and out
// (grad_x, grad_fn, grad_base, grad_scale), grad_fn / grad_scale a [0] placeholder, not written, without fn / scale.
template <class Args>
std::tuple<Tensor, Tensor, Tensor, Tensor> site_backward_tensors(Views& v, Args& a, const Tensor& x, const OptTensor& fn,
                                                                 const Tensor& base, const OptTensor& scale,
                                                                 const Tensor& mixes, const Tensor& rstd) {
  Tensor grad_x = like(x), grad_fn = like_or_placeholder(fn, base), grad_base = like(base),
         grad_scale = like_or_placeholder(scale, base);
  a.x = v(x, "x"), a.fn = v(fn, "fn"), a.base = v(base, "base"), a.scale = v(scale, "scale");
  a.mixes = v(mixes, "mixes"), a.rstd = v(rstd, "rstd");
  a.grad_x = v(grad_x, "grad_x"), a.grad_base = v(grad_base, "grad_base");
  if (fn) a.grad_fn = v(grad_fn, "grad_fn");
  if (scale) a.grad_scale = v(grad_scale, "grad_scale");
  return {grad_x, grad_fn, grad_base, grad_scale};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pre_backward(Tensor x, OptTensor fn, Tensor base, OptTensor scale,
                                                        Tensor mixes, Tensor rstd, OptTensor grad_layer_input,
                                                        OptTensor grad_h_pre, OptTensor grad_h_post,
                                                        OptTensor grad_comb, OptTensor grad_x_accum, int64_t iters,
                                                        double post_mult, double eps, double norm_eps, double pre_eps,
                                                        Str backend) {
  Views v;
  PreBackward a;
  auto grads = site_backward_tensors(v, a, x, fn, base, scale, mixes, rstd);
  a.grad_layer_input = v(grad_layer_input, "grad_layer_input"), a.grad_h_pre = v(grad_h_pre, "grad_h_pre");
  a.grad_h_post = v(grad_h_post, "grad_h_post"), a.grad_comb = v(grad_comb, "grad_comb");
  a.grad_x_accum = v(grad_x_accum, "grad_x_accum");
  const MhcConfig cfg = site_config(x.size(1), iters, post_mult, eps, norm_eps, pre_eps);
  const Tensor ws = attach_workspace(a, mhc::pre_backward_workspace_bytes, cfg, backend, x);
  run(mhc::pre_backward, a, cfg, backend, x);
  return grads;
}

Tensor post(Tensor x, Tensor y, Tensor h_post, Tensor comb, Str backend) {
  Views v;
  Tensor x_next = like(x);
  PostForward a;
  a.x = v(x, "x"), a.y = v(y, "y"), a.h_post = v(h_post, "h_post"), a.comb = v(comb, "comb");
  a.x_next = v(x_next, "x_next");
  run(mhc::post_forward, a, site_config(x.size(1)), backend, x);
  return x_next;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> post_backward(Tensor grad_x_next, Tensor x, Tensor y, Tensor h_post,
                                                         Tensor comb, Str backend) {
  Views v;
  Tensor grad_x = like(x), grad_y = like(y), grad_h_post = like(h_post), grad_comb = like(comb);
  PostBackward a;
  a.grad_x_next = v(grad_x_next, "grad_x_next");
  a.x = v(x, "x"), a.y = v(y, "y"), a.h_post = v(h_post, "h_post"), a.comb = v(comb, "comb");
  a.grad_x = v(grad_x, "grad_x"), a.grad_y = v(grad_y, "grad_y");
  a.grad_h_post = v(grad_h_post, "grad_h_post"), a.grad_comb = v(grad_comb, "grad_comb");
  run(mhc::post_backward, a, site_config(x.size(1)), backend, x);
  return {grad_x, grad_y, grad_h_post, grad_comb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> post_pre(
    Tensor x, Tensor y, Tensor h_post, Tensor comb, OptTensor fn, Tensor base, OptTensor scale, int64_t iters,
    double post_mult, double eps, double norm_eps, double pre_eps, Str backend) {
  Views v;
  Tensor x_next = like(x);
  PreOutputs next = pre_outputs(x);
  PostPreForward a;
  a.x = v(x, "x"), a.y = v(y, "y"), a.h_post = v(h_post, "h_post"), a.comb = v(comb, "comb");
  a.fn = v(fn, "fn"), a.base = v(base, "base"), a.scale = v(scale, "scale");
  a.x_next = v(x_next, "x_next");
  a.layer_input = v(std::get<0>(next), "layer_input"), a.h_pre = v(std::get<1>(next), "h_pre");
  a.h_post_next = v(std::get<2>(next), "h_post_next"), a.comb_next = v(std::get<3>(next), "comb_next");
  a.mixes = v(std::get<4>(next), "mixes"), a.rstd = v(std::get<5>(next), "rstd");
  const MhcConfig cfg = site_config(x.size(1), iters, post_mult, eps, norm_eps, pre_eps);
  const Tensor ws = attach_workspace(a, mhc::post_pre_forward_workspace_bytes, cfg, backend, x);
  run(mhc::post_pre_forward, a, cfg, backend, x);
  return {x_next, std::get<0>(next), std::get<1>(next), std::get<2>(next), std::get<3>(next), std::get<4>(next),
          std::get<5>(next)};
}

// ---- Sinkhorn, expand, head, residual add + aggregate --------------------------------------------------------

Tensor sinkhorn(Tensor logits, int64_t iters, double eps, Str backend) {
  Views v;
  Tensor comb = like(logits);
  SinkhornForward a;
  a.logits = v(logits, "logits"), a.comb = v(comb, "comb");
  run(mhc::sinkhorn_forward, a, site_config(logits.size(-1), iters, 2.0, eps), backend, logits);
  return comb;
}

Tensor sinkhorn_backward(Tensor logits, Tensor grad_comb, int64_t iters, double eps, Str backend) {
  Views v;
  Tensor grad_logits = like(logits);
  SinkhornBackward a;
  a.logits = v(logits, "logits"), a.grad_comb = v(grad_comb, "grad_comb");
  a.grad_logits = v(grad_logits, "grad_logits");
  run(mhc::sinkhorn_backward, a, site_config(logits.size(-1), iters, 2.0, eps), backend, logits);
  return grad_logits;
}

Tensor expand_streams(Tensor x, int64_t n, Str backend) {
  Views v;
  Tensor out = empty(x, {x.size(0), n, x.size(1)}, dtype_code(x));
  ExpandForward a;
  a.x = v(x, "x"), a.out = v(out, "out");
  run(mhc::expand_forward, a, site_config(n), backend, x);
  return out;
}

Tensor expand_streams_backward(Tensor grad_out, Str backend) {
  Views v;
  Tensor grad_x = empty(grad_out, {grad_out.size(0), grad_out.size(2)}, dtype_code(grad_out));
  ExpandBackward a;
  a.grad_out = v(grad_out, "grad_out"), a.grad_x = v(grad_x, "grad_x");
  run(mhc::expand_backward, a, site_config(grad_out.size(1)), backend, grad_out);
  return grad_x;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> head(Tensor x, OptTensor fn, Tensor base, OptTensor scale, double eps,
                                                Str backend) {
  Views v;
  const int64_t T = x.size(0), n = x.size(1), C = x.size(2);
  const int32_t k = coef_dtype(x);
  Tensor out = empty(x, {T, C}, dtype_code(x)), weights = empty(x, {T, n}, k), mixes = empty(x, {T, n}, k),
         rstd = empty(x, {T}, k);
  HeadForward a;
  a.x = v(x, "x"), a.fn = v(fn, "fn"), a.base = v(base, "base"), a.scale = v(scale, "scale");
  a.out = v(out, "out"), a.weights = v(weights, "weights"), a.mixes = v(mixes, "mixes");
  a.rstd = v(rstd, "rstd");
  run(mhc::head_forward, a, site_config(n, 20, 2.0, 1e-6, 1e-6, eps), backend, x);
  return {out, weights, mixes, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> head_backward(Tensor x, OptTensor fn, Tensor base, OptTensor scale,
                                                         Tensor mixes, Tensor rstd, OptTensor grad_out,
                                                         OptTensor grad_weights, double eps, Str backend) {
  Views v;
  HeadBackward a;
  auto grads = site_backward_tensors(v, a, x, fn, base, scale, mixes, rstd);
  a.grad_out = v(grad_out, "grad_out"), a.grad_weights = v(grad_weights, "grad_weights");
  const MhcConfig cfg = site_config(x.size(1), 20, 2.0, 1e-6, 1e-6, eps);
  const Tensor ws = attach_workspace(a, mhc::head_backward_workspace_bytes, cfg, backend, x);
  run(mhc::head_backward, a, cfg, backend, x);
  return grads;
}

std::tuple<Tensor, Tensor> residual_add_agg(Tensor x, Tensor res, Tensor h_pre, Str backend) {
  Views v;
  Tensor x_out = like(x), agg = empty(x, {x.size(0), x.size(2)}, dtype_code(x));
  ResidualAddAggForward a;
  a.x = v(x, "x"), a.res = v(res, "res"), a.h_pre = v(h_pre, "h_pre");
  a.x_out = v(x_out, "x_out"), a.agg = v(agg, "agg");
  run(mhc::residual_add_agg_forward, a, site_config(x.size(1)), backend, x);
  return {x_out, agg};
}

std::tuple<Tensor, Tensor> residual_add_agg_backward(OptTensor grad_x_out, OptTensor grad_agg, Tensor x_out,
                                                     Tensor h_pre, Str backend) {
  Views v;
  Tensor grad_sum = like(x_out), grad_h_pre = like(h_pre);
  ResidualAddAggBackward a;
  a.grad_x_out = v(grad_x_out, "grad_x_out"), a.grad_agg = v(grad_agg, "grad_agg");
  a.x_out = v(x_out, "x_out"), a.h_pre = v(h_pre, "h_pre");
  a.grad_sum = v(grad_sum, "grad_sum"), a.grad_h_pre = v(grad_h_pre, "grad_h_pre");
  run(mhc::residual_add_agg_backward, a, site_config(x_out.size(1)), backend, x_out);
  return {grad_sum, grad_h_pre};
}

// ---- multi-history: projection, weighted mix, fused skip -----------------------------------------------------
// Schemas as the Python custom ops had them (history_ops.py). The public functions there check the arguments
// first, in the caller's terms; the core checks them again (a direct torch.ops.mhc call) and names what is wrong.

using States = std::vector<Tensor>;
using OptStates = std::vector<OptTensor>;
// (grad of the coefficients, grad_gate, grad_states): the backwards give all states' gradients or none, the
// *_per_state_backward ones those of the states marked in need_states (absent for the others).
using GradOutputs = std::tuple<Tensor, Tensor, States>;
using PerStateGradOutputs = std::tuple<Tensor, Tensor, OptStates>;

HistoryConfig history_config(const std::string& constraint = "simplex", double temperature = 1.0,
                             double epsilon = 0.1, int64_t sinkhorn_iters = 20, double sinkhorn_eps = 1e-6) {
  return HistoryConfig{parse_constraint(constraint), temperature, epsilon, static_cast<int>(sinkhorn_iters),
                       sinkhorn_eps, NanPolicy::propagate};
}

// Views of a list of tensors (absent ones: absent views); the vector owns what the argument struct's span points to
// during the call. Named by the list only: the core's checks name the entry (states[k]) of anything wrong with one.
template <class List>
std::vector<TensorView> views(const List& ts, const char* name) {
  std::vector<TensorView> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(view(t, name));
  return out;
}

// The states' gradients: those of the states marked in need, absent for the others (the core neither computes nor
// writes them); none at all when no state needs one.
OptStates grad_states_for(const States& states, const std::vector<bool>& need) {
  OptStates grads;
  if (std::find(need.begin(), need.end(), true) == need.end()) return grads;
  if (need.size() != states.size())
    throw InvalidArgument("need_states: expected " + std::to_string(states.size()) + " flags (one per state), got " +
                          std::to_string(need.size()));
  grads.reserve(states.size());
  for (std::size_t k = 0; k < states.size(); ++k) grads.push_back(need[k] ? OptTensor(like(states[k])) : std::nullopt);
  return grads;
}

std::vector<bool> all_or_none(const States& states, bool need) { return std::vector<bool>(states.size(), need); }

// The backwards' grad_states: every state's gradient (need_states) or none.
States present(OptStates grads) {
  States out;
  out.reserve(grads.size());
  for (OptTensor& g : grads) out.push_back(std::move(*g));
  return out;
}

// grad_gate: [1] with a gate, a [0] placeholder without (custom ops cannot return None).
Tensor grad_gate_for(const OptTensor& gate, const Tensor& coef) {
  return empty(coef, {gate ? 1 : 0}, dtype_code(coef));
}

Tensor project_logits(Tensor logits, Str constraint, double temperature, double epsilon,
                      int64_t sinkhorn_iters, double sinkhorn_eps, Str backend) {
  Tensor weights = like(logits);
  ProjectLogitsForward a;
  a.logits = view(logits, "logits"), a.weights = view(weights, "weights");
  run(mhc::project_logits_forward, a, history_config(constraint, temperature, epsilon, sinkhorn_iters, sinkhorn_eps),
      backend, logits);
  return weights;
}

Tensor project_logits_backward(Tensor logits, Tensor weights, Tensor grad_weights, Str constraint,
                               double temperature, double epsilon, int64_t sinkhorn_iters, double sinkhorn_eps,
                               Str backend) {
  Tensor grad_logits = like(logits);
  ProjectLogitsBackward a;
  a.logits = view(logits, "logits"), a.weights = view(weights, "weights");
  a.grad_weights = view(grad_weights, "grad_weights"), a.grad_logits = view(grad_logits, "grad_logits");
  run(mhc::project_logits_backward, a,
      history_config(constraint, temperature, epsilon, sinkhorn_iters, sinkhorn_eps), backend, logits);
  return grad_logits;
}

// out: the states' shape, [R, *shape] for matrix weights [R, H]; x's dtype, or the states' without x.
Tensor mix_output(const OptTensor& x, const States& states, const Tensor& weights) {
  const Tensor& s = states.at(0);
  const std::span<const int64_t> shape = sizes_of(s);
  int64_t sizes[kMaxRank];
  std::size_t rank = 0;
  if (weights.dim() == 2) sizes[rank++] = weights.size(0);
  if (rank + shape.size() > static_cast<std::size_t>(kMaxRank))
    throw InvalidArgument("history_mix: out [R, *state shape] exceeds rank " + std::to_string(kMaxRank));
  for (int64_t d : shape) sizes[rank++] = d;
  return empty(s, std::span<const int64_t>(sizes, rank), dtype_code(x ? *x : s));
}

Tensor history_mix(OptTensor x, States states, Tensor weights, OptTensor gate, Str backend) {
  Tensor out = mix_output(x, states, weights);
  const std::vector<TensorView> state_views = views(states, "states");
  HistoryMixForward a;
  a.x = view(x, "x"), a.states = state_views, a.weights = view(weights, "weights"), a.gate = view(gate, "gate");
  a.out = view(out, "out");
  run(mhc::history_mix_forward, a, history_config(), backend, out);
  return out;
}

PerStateGradOutputs mix_backward(const Tensor& grad_out, const States& states, const Tensor& weights,
                                 const OptTensor& gate, const std::vector<bool>& need, const std::string& backend) {
  Tensor grad_weights = like(weights), grad_gate = grad_gate_for(gate, weights);
  OptStates grad_states = grad_states_for(states, need);
  const std::vector<TensorView> state_views = views(states, "states"), grad_views = views(grad_states, "grad_states");
  HistoryMixBackward a;
  a.grad_out = view(grad_out, "grad_out"), a.states = state_views, a.weights = view(weights, "weights");
  a.gate = view(gate, "gate"), a.grad_weights = view(grad_weights, "grad_weights");
  if (gate) a.grad_gate = view(grad_gate, "grad_gate");
  a.grad_states = grad_views;
  const HistoryConfig cfg = history_config();
  const Tensor ws = attach_workspace(a, mhc::history_mix_backward_workspace_bytes, cfg, backend, grad_out);
  run(mhc::history_mix_backward, a, cfg, backend, grad_out);
  return {grad_weights, grad_gate, grad_states};
}

GradOutputs history_mix_backward(Tensor grad_out, States states, Tensor weights, OptTensor gate, bool need_states,
                                 Str backend) {
  auto [grad_weights, grad_gate, grad_states] =
      mix_backward(grad_out, states, weights, gate, all_or_none(states, need_states), backend);
  return {grad_weights, grad_gate, present(std::move(grad_states))};
}

PerStateGradOutputs history_mix_per_state_backward(Tensor grad_out, States states, Tensor weights, OptTensor gate,
                                                   std::vector<bool> need_states, Str backend) {
  return mix_backward(grad_out, states, weights, gate, need_states, backend);
}

std::tuple<Tensor, Tensor> history_skip(Tensor x, States states, Tensor logits, OptTensor gate, Str constraint,
                                        double temperature, double epsilon, Str backend) {
  Tensor out = like(x), weights = like(logits);
  const std::vector<TensorView> state_views = views(states, "states");
  HistorySkipForward a;
  a.x = view(x, "x"), a.states = state_views, a.logits = view(logits, "logits"), a.gate = view(gate, "gate");
  a.out = view(out, "out"), a.weights = view(weights, "weights");
  run(mhc::history_skip_forward, a, history_config(constraint, temperature, epsilon), backend, x);
  return {out, weights};
}

PerStateGradOutputs skip_backward(const Tensor& grad_out, const States& states, const Tensor& logits,
                                  const Tensor& weights, const OptTensor& gate, const std::vector<bool>& need,
                                  const std::string& constraint, double temperature, double epsilon,
                                  const std::string& backend) {
  Tensor grad_logits = like(logits), grad_gate = grad_gate_for(gate, logits);
  OptStates grad_states = grad_states_for(states, need);
  const std::vector<TensorView> state_views = views(states, "states"), grad_views = views(grad_states, "grad_states");
  HistorySkipBackward a;
  a.grad_out = view(grad_out, "grad_out"), a.states = state_views, a.logits = view(logits, "logits");
  a.weights = view(weights, "weights"), a.gate = view(gate, "gate");
  a.grad_logits = view(grad_logits, "grad_logits");
  if (gate) a.grad_gate = view(grad_gate, "grad_gate");
  a.grad_states = grad_views;
  const HistoryConfig cfg = history_config(constraint, temperature, epsilon);
  const Tensor ws = attach_workspace(a, mhc::history_skip_backward_workspace_bytes, cfg, backend, grad_out);
  run(mhc::history_skip_backward, a, cfg, backend, grad_out);
  return {grad_logits, grad_gate, grad_states};
}

GradOutputs history_skip_backward(Tensor grad_out, States states, Tensor logits, Tensor weights, OptTensor gate,
                                  bool need_states, Str constraint, double temperature, double epsilon,
                                  Str backend) {
  auto [grad_logits, grad_gate, grad_states] = skip_backward(
      grad_out, states, logits, weights, gate, all_or_none(states, need_states), constraint, temperature, epsilon,
      backend);
  return {grad_logits, grad_gate, present(std::move(grad_states))};
}

PerStateGradOutputs history_skip_per_state_backward(Tensor grad_out, States states, Tensor logits, Tensor weights,
                                                    OptTensor gate, std::vector<bool> need_states, Str constraint,
                                                    double temperature, double epsilon, Str backend) {
  return skip_backward(grad_out, states, logits, weights, gate, need_states, constraint, temperature, epsilon,
                       backend);
}

}  // namespace

void set_poison_outputs(bool on) { poison.store(on, std::memory_order_relaxed); }

}  // namespace mhc::python

// ---- the op table as torch sees it: schemas and kernels ----------------------------------------------------------

namespace {
constexpr const char* kSite = "int iters, float post_mult, float eps, float norm_eps, float pre_eps, str backend";
}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(mhc, m) {
  using std::string;
  const string site = kSite;
  m.def(("pre(Tensor x, Tensor? fn, Tensor base, Tensor? scale, " + site +
         ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)").c_str());
  m.def(("pre_backward(Tensor x, Tensor? fn, Tensor base, Tensor? scale, Tensor mixes, Tensor rstd, "
         "Tensor? grad_layer_input, Tensor? grad_h_pre, Tensor? grad_h_post, Tensor? grad_comb, Tensor? grad_x_accum, " +
         site + ") -> (Tensor, Tensor, Tensor, Tensor)").c_str());
  m.def("post(Tensor x, Tensor y, Tensor h_post, Tensor comb, str backend) -> Tensor");
  m.def("post_backward(Tensor grad_x_next, Tensor x, Tensor y, Tensor h_post, Tensor comb, str backend) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def(("post_pre(Tensor x, Tensor y, Tensor h_post, Tensor comb, Tensor? fn, Tensor base, Tensor? scale, " + site +
         ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)").c_str());
  m.def("sinkhorn(Tensor logits, int iters, float eps, str backend) -> Tensor");
  m.def("sinkhorn_backward(Tensor logits, Tensor grad_comb, int iters, float eps, str backend) -> Tensor");
  m.def("expand_streams(Tensor x, int n, str backend) -> Tensor");
  m.def("expand_streams_backward(Tensor grad_out, str backend) -> Tensor");
  m.def("head(Tensor x, Tensor? fn, Tensor base, Tensor? scale, float eps, str backend) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("head_backward(Tensor x, Tensor? fn, Tensor base, Tensor? scale, Tensor mixes, Tensor rstd, "
        "Tensor? grad_out, Tensor? grad_weights, float eps, str backend) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("residual_add_agg(Tensor x, Tensor res, Tensor h_pre, str backend) -> (Tensor, Tensor)");
  m.def("residual_add_agg_backward(Tensor? grad_x_out, Tensor? grad_agg, Tensor x_out, Tensor h_pre, str backend) -> "
        "(Tensor, Tensor)");

  // multi-history
  const string projection = "str constraint, float temperature, float epsilon, int sinkhorn_iters, float sinkhorn_eps";
  m.def(("project_logits(Tensor logits, " + projection + ", str backend) -> Tensor").c_str());
  m.def(("project_logits_backward(Tensor logits, Tensor weights, Tensor grad_weights, " + projection +
         ", str backend) -> Tensor").c_str());
  m.def("history_mix(Tensor? x, Tensor[] states, Tensor weights, Tensor? gate, str backend) -> Tensor");
  m.def("history_mix_backward(Tensor grad_out, Tensor[] states, Tensor weights, Tensor? gate, bool need_states, "
        "str backend) -> (Tensor, Tensor, Tensor[])");
  m.def("history_skip(Tensor x, Tensor[] states, Tensor logits, Tensor? gate, str constraint, float temperature, "
        "float epsilon, str backend) -> (Tensor, Tensor)");
  m.def("history_skip_backward(Tensor grad_out, Tensor[] states, Tensor logits, Tensor weights, Tensor? gate, "
        "bool need_states, str constraint, float temperature, float epsilon, str backend) -> "
        "(Tensor, Tensor, Tensor[])");
  // The eager autograd.Functions' backwards: gradients of the states marked in need_states only (one flag per
  // state; the others' entries are None), so detached states cost nothing.
  m.def("history_mix_per_state_backward(Tensor grad_out, Tensor[] states, Tensor weights, Tensor? gate, "
        "bool[] need_states, str backend) -> (Tensor, Tensor, Tensor?[])");
  m.def("history_skip_per_state_backward(Tensor grad_out, Tensor[] states, Tensor logits, Tensor weights, "
        "Tensor? gate, bool[] need_states, str constraint, float temperature, float epsilon, str backend) -> "
        "(Tensor, Tensor, Tensor?[])");
}

#define MHC_TORCH_KERNELS(m)                                                                           \
  m.impl("pre", TORCH_BOX(&mhc::python::pre));                                                         \
  m.impl("pre_backward", TORCH_BOX(&mhc::python::pre_backward));                                       \
  m.impl("post", TORCH_BOX(&mhc::python::post));                                                       \
  m.impl("post_backward", TORCH_BOX(&mhc::python::post_backward));                                     \
  m.impl("post_pre", TORCH_BOX(&mhc::python::post_pre));                                               \
  m.impl("sinkhorn", TORCH_BOX(&mhc::python::sinkhorn));                                               \
  m.impl("sinkhorn_backward", TORCH_BOX(&mhc::python::sinkhorn_backward));                             \
  m.impl("expand_streams", TORCH_BOX(&mhc::python::expand_streams));                                   \
  m.impl("expand_streams_backward", TORCH_BOX(&mhc::python::expand_streams_backward));                 \
  m.impl("head", TORCH_BOX(&mhc::python::head));                                                       \
  m.impl("head_backward", TORCH_BOX(&mhc::python::head_backward));                                     \
  m.impl("residual_add_agg", TORCH_BOX(&mhc::python::residual_add_agg));                               \
  m.impl("residual_add_agg_backward", TORCH_BOX(&mhc::python::residual_add_agg_backward));             \
  m.impl("project_logits", TORCH_BOX(&mhc::python::project_logits));                                   \
  m.impl("project_logits_backward", TORCH_BOX(&mhc::python::project_logits_backward));                 \
  m.impl("history_mix", TORCH_BOX(&mhc::python::history_mix));                                         \
  m.impl("history_mix_backward", TORCH_BOX(&mhc::python::history_mix_backward));                       \
  m.impl("history_skip", TORCH_BOX(&mhc::python::history_skip));                                       \
  m.impl("history_skip_backward", TORCH_BOX(&mhc::python::history_skip_backward));                     \
  m.impl("history_mix_per_state_backward", TORCH_BOX(&mhc::python::history_mix_per_state_backward));   \
  m.impl("history_skip_per_state_backward", TORCH_BOX(&mhc::python::history_skip_per_state_backward));

STABLE_TORCH_LIBRARY_IMPL(mhc, CPU, m) { MHC_TORCH_KERNELS(m) }
STABLE_TORCH_LIBRARY_IMPL(mhc, CUDA, m) { MHC_TORCH_KERNELS(m) }
