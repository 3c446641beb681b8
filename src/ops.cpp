// Front end of every n-stream op: validate, optionally scan for non-finite inputs, dispatch.
#include "mhc/ops.hpp"

#include "backend.hpp"
#include "common/validate.hpp"

namespace mhc {

using detail::ArgChecker;
using detail::check_finite;
using detail::coef_dtype;
using detail::Dim;

namespace {

// Shapes and types fixed by the leading stream tensor x [T, n, C].
struct Streams {
  Dim T, n, C, m, nC;
  DType storage, coef;
  Device device;
};

Streams leading_streams(const ArgChecker& check, const TensorView& x, const char* name, const MhcConfig& cfg) {
  check.config(cfg);
  check.leading(x, name, 3, "[T, n, C]");
  check.streams(x.shape[1], cfg, name);
  if (x.shape[2] < 1) check.fail(std::string(name) + ": the width C must be >= 1, got 0");
  const std::int64_t n = x.shape[1];
  return {{x.shape[0], "T"},   {n, "n"},          {x.shape[2], "C"}, {n * n + 2 * n, "n*n+2n"},
          {n * x.shape[2], "n*C"}, x.dtype, coef_dtype(x.dtype), x.device};
}

// fn/base/scale of a pre site (m rows) or a head (n rows); static mode when fn is absent.
void check_params(const ArgChecker& check, const Streams& s, Dim rows, Dim scales, const TensorView& fn,
                  const TensorView& base, const TensorView& scale) {
  check.optional(fn, "fn", {rows, s.nC}, s.coef, s.device);
  check.tensor(base, "base", {rows}, s.coef, s.device);
  if (fn.present() && !scale.present()) check.fail("scale: required when fn is given");
  if (!fn.present() && scale.present()) check.fail("scale: expected absent when fn is absent (static mode)");
  check.optional(scale, "scale", {scales}, s.coef, s.device);
}

void check_param_grads(const ArgChecker& check, const Streams& s, Dim rows, Dim scales, const TensorView& fn,
                       const TensorView& scale, const TensorView& grad_fn, const TensorView& grad_base,
                       const TensorView& grad_scale) {
  if (fn.present()) check.tensor(grad_fn, "grad_fn", {rows, s.nC}, s.coef, s.device);
  else if (grad_fn.present()) check.fail("grad_fn: given but fn is absent (static mode)");
  check.tensor(grad_base, "grad_base", {rows}, s.coef, s.device);
  if (scale.present()) check.tensor(grad_scale, "grad_scale", {scales}, s.coef, s.device);
  else if (grad_scale.present()) check.fail("grad_scale: given but scale is absent");
}

void check_pre_outputs(const ArgChecker& check, const Streams& s, const TensorView& layer_input,
                       const TensorView& h_pre, const TensorView& h_post, const TensorView& comb,
                       const TensorView& mixes, const TensorView& rstd, const char* h_post_name,
                       const char* comb_name) {
  check.tensor(layer_input, "layer_input", {s.T, s.C}, s.storage, s.device);
  check.tensor(h_pre, "h_pre", {s.T, s.n}, s.coef, s.device);
  check.tensor(h_post, h_post_name, {s.T, s.n}, s.coef, s.device);
  check.tensor(comb, comb_name, {s.T, s.n, s.n}, s.coef, s.device);
  check.optional(mixes, "mixes", {s.T, s.m}, s.coef, s.device);
  check.optional(rstd, "rstd", {s.T}, s.coef, s.device);
}

// Logits [T, n, n] of the Sinkhorn ops: square, f32 or f64 (coefficients have no 16-bit storage).
struct SinkhornShape {
  Dim T, n;
  DType coef;
};
SinkhornShape sinkhorn_logits(const ArgChecker& check, const TensorView& logits, const MhcConfig& cfg) {
  check.config(cfg);
  check.leading(logits, "logits", 3, "[T, n, n]");
  const Dim T{logits.shape[0], "T"}, n{logits.shape[1], "n"};
  check.streams(n.value, cfg, "logits");
  if (logits.shape[2] != n.value) check.fail("logits: expected square [T, n, n] matrices, got " + logits.shape_string());
  if (logits.dtype != DType::f32 && logits.dtype != DType::f64)
    check.fail_dtype(std::string("logits: expected dtype float32 or float64, got ") + dtype_name(logits.dtype));
  return {T, n, logits.dtype};
}

// The forward pre's workspace is optional: present, it must be big enough and on the op's device.
void optional_workspace(const ArgChecker& check, const TensorView& ws, std::size_t needed, Device device) {
  if (ws.present()) check.workspace(ws, needed, device);
}
std::size_t forward_workspace(const PreForward& a, const MhcConfig& cfg, const Context& ctx) {
  MHC_DISPATCH(a.x.device, ctx, pre_forward_workspace_bytes(a, cfg, ctx));
}
std::size_t forward_workspace(const PostPreForward& a, const MhcConfig& cfg, const Context& ctx) {
  MHC_DISPATCH(a.x.device, ctx, post_pre_forward_workspace_bytes(a, cfg, ctx));
}

std::size_t backward_workspace(const PreBackward& a, const MhcConfig& cfg, const Context& ctx) {
  MHC_DISPATCH(a.x.device, ctx, pre_backward_workspace_bytes(a, cfg, ctx));
}
std::size_t backward_workspace(const HeadBackward& a, const MhcConfig& cfg, const Context& ctx) {
  MHC_DISPATCH(a.x.device, ctx, head_backward_workspace_bytes(a, cfg, ctx));
}

}  // namespace

void pre_forward(const PreForward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("pre_forward");
  const Streams s = leading_streams(check, a.x, "x", cfg);
  check_params(check, s, s.m, {3, "3"}, a.fn, a.base, a.scale);
  check_pre_outputs(check, s, a.layer_input, a.h_pre, a.h_post, a.comb, a.mixes, a.rstd, "h_post", "comb");
  check.disjoint({{a.layer_input, "layer_input"}, {a.h_pre, "h_pre"}, {a.h_post, "h_post"}, {a.comb, "comb"},
                  {a.mixes, "mixes"}, {a.rstd, "rstd"}},
                 {{a.x, "x"}, {a.fn, "fn"}, {a.base, "base"}, {a.scale, "scale"}});
  optional_workspace(check, a.workspace, forward_workspace(a, cfg, ctx), s.device);
  check_finite(a.x, "x", "pre_forward", cfg, ctx);
  check_finite(a.fn, "fn", "pre_forward", cfg, ctx);
  check_finite(a.base, "base", "pre_forward", cfg, ctx);
  check_finite(a.scale, "scale", "pre_forward", cfg, ctx);
  MHC_DISPATCH(a.x.device, ctx, pre_forward(a, cfg, ctx));
}

std::size_t pre_forward_workspace_bytes(const PreForward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("pre_forward");
  leading_streams(check, a.x, "x", cfg);
  return forward_workspace(a, cfg, ctx);
}

std::size_t post_pre_forward_workspace_bytes(const PostPreForward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("post_pre_forward");
  leading_streams(check, a.x, "x", cfg);
  return forward_workspace(a, cfg, ctx);
}

std::size_t pre_backward_workspace_bytes(const PreBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("pre_backward");
  leading_streams(check, a.x, "x", cfg);
  return backward_workspace(a, cfg, ctx);
}

void pre_backward(const PreBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("pre_backward");
  const Streams s = leading_streams(check, a.x, "x", cfg);
  check_params(check, s, s.m, {3, "3"}, a.fn, a.base, a.scale);
  check.tensor(a.mixes, "mixes", {s.T, s.m}, s.coef, s.device);
  check.tensor(a.rstd, "rstd", {s.T}, s.coef, s.device);
  check.optional(a.grad_layer_input, "grad_layer_input", {s.T, s.C}, s.storage, s.device);
  check.optional(a.grad_h_pre, "grad_h_pre", {s.T, s.n}, s.coef, s.device);
  check.optional(a.grad_h_post, "grad_h_post", {s.T, s.n}, s.coef, s.device);
  check.optional(a.grad_comb, "grad_comb", {s.T, s.n, s.n}, s.coef, s.device);
  check.optional(a.grad_x_accum, "grad_x_accum", {s.T, s.n, s.C}, s.storage, s.device);
  check.tensor(a.grad_x, "grad_x", {s.T, s.n, s.C}, s.storage, s.device);
  check_param_grads(check, s, s.m, {3, "3"}, a.fn, a.scale, a.grad_fn, a.grad_base, a.grad_scale);
  check.workspace(a.workspace, backward_workspace(a, cfg, ctx), s.device);
  check.disjoint({{a.grad_x, "grad_x"}, {a.grad_fn, "grad_fn"}, {a.grad_base, "grad_base"},
                  {a.grad_scale, "grad_scale"}},
                 {{a.x, "x"}, {a.fn, "fn"}, {a.base, "base"}, {a.scale, "scale"}, {a.mixes, "mixes"}, {a.rstd, "rstd"},
                  {a.grad_layer_input, "grad_layer_input"}, {a.grad_h_pre, "grad_h_pre"},
                  {a.grad_h_post, "grad_h_post"}, {a.grad_comb, "grad_comb"}});
  // grad_x may be grad_x_accum itself (accumulated elementwise)
  check.disjoint({{a.grad_fn, "grad_fn"}, {a.grad_base, "grad_base"}, {a.grad_scale, "grad_scale"}},
                 {{a.grad_x_accum, "grad_x_accum"}});
  for (auto [t, name] : {std::pair{&a.grad_layer_input, "grad_layer_input"}, {&a.grad_h_pre, "grad_h_pre"},
                         {&a.grad_h_post, "grad_h_post"}, {&a.grad_comb, "grad_comb"},
                         {&a.grad_x_accum, "grad_x_accum"}})
    check_finite(*t, name, "pre_backward", cfg, ctx);
  MHC_DISPATCH(a.x.device, ctx, pre_backward(a, cfg, ctx));
}

void post_forward(const PostForward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("post_forward");
  const Streams s = leading_streams(check, a.x, "x", cfg);
  check.tensor(a.y, "y", {s.T, s.C}, s.storage, s.device);
  check.tensor(a.h_post, "h_post", {s.T, s.n}, s.coef, s.device);
  check.tensor(a.comb, "comb", {s.T, s.n, s.n}, s.coef, s.device);
  check.tensor(a.x_next, "x_next", {s.T, s.n, s.C}, s.storage, s.device);
  check.disjoint({{a.x_next, "x_next"}}, {{a.x, "x"}, {a.y, "y"}, {a.h_post, "h_post"}, {a.comb, "comb"}});
  check_finite(a.x, "x", "post_forward", cfg, ctx);
  check_finite(a.y, "y", "post_forward", cfg, ctx);
  check_finite(a.h_post, "h_post", "post_forward", cfg, ctx);
  check_finite(a.comb, "comb", "post_forward", cfg, ctx);
  MHC_DISPATCH(a.x.device, ctx, post_forward(a, cfg, ctx));
}

void post_backward(const PostBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("post_backward");
  const Streams s = leading_streams(check, a.x, "x", cfg);
  check.tensor(a.grad_x_next, "grad_x_next", {s.T, s.n, s.C}, s.storage, s.device);
  check.tensor(a.y, "y", {s.T, s.C}, s.storage, s.device);
  check.tensor(a.h_post, "h_post", {s.T, s.n}, s.coef, s.device);
  check.tensor(a.comb, "comb", {s.T, s.n, s.n}, s.coef, s.device);
  check.tensor(a.grad_x, "grad_x", {s.T, s.n, s.C}, s.storage, s.device);
  check.tensor(a.grad_y, "grad_y", {s.T, s.C}, s.storage, s.device);
  check.tensor(a.grad_h_post, "grad_h_post", {s.T, s.n}, s.coef, s.device);
  check.tensor(a.grad_comb, "grad_comb", {s.T, s.n, s.n}, s.coef, s.device);
  check.disjoint({{a.grad_x, "grad_x"}, {a.grad_y, "grad_y"}, {a.grad_h_post, "grad_h_post"},
                  {a.grad_comb, "grad_comb"}},
                 {{a.grad_x_next, "grad_x_next"}, {a.x, "x"}, {a.y, "y"}, {a.h_post, "h_post"}, {a.comb, "comb"}});
  check_finite(a.grad_x_next, "grad_x_next", "post_backward", cfg, ctx);
  MHC_DISPATCH(a.x.device, ctx, post_backward(a, cfg, ctx));
}

void post_pre_forward(const PostPreForward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("post_pre_forward");
  const Streams s = leading_streams(check, a.x, "x", cfg);
  check.tensor(a.y, "y", {s.T, s.C}, s.storage, s.device);
  check.tensor(a.h_post, "h_post", {s.T, s.n}, s.coef, s.device);
  check.tensor(a.comb, "comb", {s.T, s.n, s.n}, s.coef, s.device);
  check_params(check, s, s.m, {3, "3"}, a.fn, a.base, a.scale);
  check.tensor(a.x_next, "x_next", {s.T, s.n, s.C}, s.storage, s.device);
  check_pre_outputs(check, s, a.layer_input, a.h_pre, a.h_post_next, a.comb_next, a.mixes, a.rstd,
                    "h_post_next", "comb_next");
  check.disjoint({{a.x_next, "x_next"}, {a.layer_input, "layer_input"}, {a.h_pre, "h_pre"},
                  {a.h_post_next, "h_post_next"}, {a.comb_next, "comb_next"}, {a.mixes, "mixes"}, {a.rstd, "rstd"}},
                 {{a.x, "x"}, {a.y, "y"}, {a.h_post, "h_post"}, {a.comb, "comb"}, {a.fn, "fn"}, {a.base, "base"},
                  {a.scale, "scale"}});
  optional_workspace(check, a.workspace, forward_workspace(a, cfg, ctx), s.device);
  for (auto [t, name] : {std::pair{&a.x, "x"}, {&a.y, "y"}, {&a.h_post, "h_post"}, {&a.comb, "comb"},
                         {&a.fn, "fn"}, {&a.base, "base"}, {&a.scale, "scale"}})
    check_finite(*t, name, "post_pre_forward", cfg, ctx);
  MHC_DISPATCH(a.x.device, ctx, post_pre_forward(a, cfg, ctx));
}

void sinkhorn_forward(const SinkhornForward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("sinkhorn_forward");
  const auto [T, n, k] = sinkhorn_logits(check, a.logits, cfg);
  check.tensor(a.comb, "comb", {T, n, n}, k, a.logits.device);
  check_finite(a.logits, "logits", "sinkhorn_forward", cfg, ctx);
  MHC_DISPATCH(a.logits.device, ctx, sinkhorn_forward(a, cfg, ctx));
}

void sinkhorn_backward(const SinkhornBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("sinkhorn_backward");
  const auto [T, n, k] = sinkhorn_logits(check, a.logits, cfg);
  check.tensor(a.grad_comb, "grad_comb", {T, n, n}, k, a.logits.device);
  check.tensor(a.grad_logits, "grad_logits", {T, n, n}, k, a.logits.device);
  check_finite(a.grad_comb, "grad_comb", "sinkhorn_backward", cfg, ctx);
  MHC_DISPATCH(a.logits.device, ctx, sinkhorn_backward(a, cfg, ctx));
}

void expand_forward(const ExpandForward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("expand_forward");
  check.config(cfg);
  check.leading(a.x, "x", 2, "[T, C]");
  check.streams(cfg.n, cfg, "n");
  if (a.x.shape[1] < 1) check.fail("x: the width C must be >= 1, got 0");
  check.tensor(a.out, "out", {{a.x.shape[0], "T"}, {cfg.n, "n"}, {a.x.shape[1], "C"}}, a.x.dtype, a.x.device);
  check.disjoint({{a.out, "out"}}, {{a.x, "x"}});
  check_finite(a.x, "x", "expand_forward", cfg, ctx);
  MHC_DISPATCH(a.x.device, ctx, expand_forward(a, cfg, ctx));
}

void expand_backward(const ExpandBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("expand_backward");
  const Streams s = leading_streams(check, a.grad_out, "grad_out", cfg);
  check.tensor(a.grad_x, "grad_x", {s.T, s.C}, s.storage, s.device);
  check.disjoint({{a.grad_x, "grad_x"}}, {{a.grad_out, "grad_out"}});
  MHC_DISPATCH(a.grad_out.device, ctx, expand_backward(a, cfg, ctx));
}

void head_forward(const HeadForward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("head_forward");
  const Streams s = leading_streams(check, a.x, "x", cfg);
  check_params(check, s, s.n, {1, "1"}, a.fn, a.base, a.scale);
  check.tensor(a.out, "out", {s.T, s.C}, s.storage, s.device);
  check.tensor(a.weights, "weights", {s.T, s.n}, s.coef, s.device);
  check.optional(a.mixes, "mixes", {s.T, s.n}, s.coef, s.device);
  check.optional(a.rstd, "rstd", {s.T}, s.coef, s.device);
  check.disjoint({{a.out, "out"}, {a.weights, "weights"}, {a.mixes, "mixes"}, {a.rstd, "rstd"}},
                 {{a.x, "x"}, {a.fn, "fn"}, {a.base, "base"}, {a.scale, "scale"}});
  check_finite(a.x, "x", "head_forward", cfg, ctx);
  check_finite(a.fn, "fn", "head_forward", cfg, ctx);
  check_finite(a.base, "base", "head_forward", cfg, ctx);
  check_finite(a.scale, "scale", "head_forward", cfg, ctx);
  MHC_DISPATCH(a.x.device, ctx, head_forward(a, cfg, ctx));
}

std::size_t head_backward_workspace_bytes(const HeadBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("head_backward");
  leading_streams(check, a.x, "x", cfg);
  return backward_workspace(a, cfg, ctx);
}

void head_backward(const HeadBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("head_backward");
  const Streams s = leading_streams(check, a.x, "x", cfg);
  check_params(check, s, s.n, {1, "1"}, a.fn, a.base, a.scale);
  check.tensor(a.mixes, "mixes", {s.T, s.n}, s.coef, s.device);
  check.tensor(a.rstd, "rstd", {s.T}, s.coef, s.device);
  check.optional(a.grad_out, "grad_out", {s.T, s.C}, s.storage, s.device);
  check.optional(a.grad_weights, "grad_weights", {s.T, s.n}, s.coef, s.device);
  check.tensor(a.grad_x, "grad_x", {s.T, s.n, s.C}, s.storage, s.device);
  check_param_grads(check, s, s.n, {1, "1"}, a.fn, a.scale, a.grad_fn, a.grad_base, a.grad_scale);
  check.workspace(a.workspace, backward_workspace(a, cfg, ctx), s.device);
  check.disjoint({{a.grad_x, "grad_x"}, {a.grad_fn, "grad_fn"}, {a.grad_base, "grad_base"},
                  {a.grad_scale, "grad_scale"}},
                 {{a.x, "x"}, {a.fn, "fn"}, {a.base, "base"}, {a.scale, "scale"}, {a.mixes, "mixes"}, {a.rstd, "rstd"},
                  {a.grad_out, "grad_out"}, {a.grad_weights, "grad_weights"}});
  check_finite(a.grad_out, "grad_out", "head_backward", cfg, ctx);
  MHC_DISPATCH(a.x.device, ctx, head_backward(a, cfg, ctx));
}

void residual_add_agg_forward(const ResidualAddAggForward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("residual_add_agg_forward");
  const Streams s = leading_streams(check, a.x, "x", cfg);
  check.tensor(a.res, "res", {s.T, s.n, s.C}, s.storage, s.device);
  check.tensor(a.h_pre, "h_pre", {s.T, s.n}, s.coef, s.device);
  check.tensor(a.x_out, "x_out", {s.T, s.n, s.C}, s.storage, s.device);
  check.tensor(a.agg, "agg", {s.T, s.C}, s.storage, s.device);
  // x_out may be x or res itself (elementwise); agg sums every stream of a token
  check.disjoint({{a.agg, "agg"}}, {{a.x, "x"}, {a.res, "res"}, {a.h_pre, "h_pre"}, {a.x_out, "x_out"}});
  check_finite(a.x, "x", "residual_add_agg_forward", cfg, ctx);
  check_finite(a.res, "res", "residual_add_agg_forward", cfg, ctx);
  check_finite(a.h_pre, "h_pre", "residual_add_agg_forward", cfg, ctx);
  MHC_DISPATCH(a.x.device, ctx, residual_add_agg_forward(a, cfg, ctx));
}

void residual_add_agg_backward(const ResidualAddAggBackward& a, const MhcConfig& cfg, const Context& ctx) {
  const ArgChecker check("residual_add_agg_backward");
  const Streams s = leading_streams(check, a.x_out, "x_out", cfg);
  check.optional(a.grad_x_out, "grad_x_out", {s.T, s.n, s.C}, s.storage, s.device);
  check.optional(a.grad_agg, "grad_agg", {s.T, s.C}, s.storage, s.device);
  check.tensor(a.h_pre, "h_pre", {s.T, s.n}, s.coef, s.device);
  check.tensor(a.grad_sum, "grad_sum", {s.T, s.n, s.C}, s.storage, s.device);
  check.tensor(a.grad_h_pre, "grad_h_pre", {s.T, s.n}, s.coef, s.device);
  check.disjoint({{a.grad_h_pre, "grad_h_pre"}, {a.grad_sum, "grad_sum"}},
                 {{a.x_out, "x_out"}, {a.h_pre, "h_pre"}, {a.grad_agg, "grad_agg"}});
  check.disjoint({{a.grad_h_pre, "grad_h_pre"}}, {{a.grad_x_out, "grad_x_out"}});
  check_finite(a.grad_x_out, "grad_x_out", "residual_add_agg_backward", cfg, ctx);
  check_finite(a.grad_agg, "grad_agg", "residual_add_agg_backward", cfg, ctx);
  MHC_DISPATCH(a.x_out.device, ctx, residual_add_agg_backward(a, cfg, ctx));
}

const char* version() { return MHC_VERSION_STRING; }

bool built_with_cuda() {
#ifdef MHC_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() { return built_with_cuda() ? cuda_impl::device_count() : 0; }

TuningStatus tuning_status() { return cuda_impl::tuning_status(); }
TuningStatus reload_tuning() { return cuda_impl::reload_tuning(); }
void set_tuning_json(const std::string& json) { cuda_impl::set_tuning_json(json); }

}  // namespace mhc
