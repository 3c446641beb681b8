// Bindings of the n-stream mHC ops (include/mhc/ops.hpp).
//
// Every op takes its tensors as DLPack arrays (the Python layer passes torch.utils.dlpack.to_dlpack
// capsules: no stream handshake, no requires_grad refusal), None for an absent optional tensor, a
// Config, the backend name and the raw cudaStream_t of torch's current stream. Outputs are
// allocated by torch and passed in. Views are built with the GIL held; the op runs without it.
#include <nanobind/stl/string.h>

#include <cstdint>
#include <string>

#include "mhc/ops.hpp"
#include "views.hpp"

namespace mhc::python {

void bind_nstream(nb::module_& m) {
  // ---- pre -----------------------------------------------------------------------------------
  m.def(
      "pre_forward",
      [](const Array& x, const OptArray& fn, const Array& base, const OptArray& scale, const Array& layer_input,
         const Array& h_pre, const Array& h_post, const Array& comb, const OptArray& mixes, const OptArray& rstd,
         const MhcConfig& cfg, const std::string& backend, Stream stream) {
        PreForward a;
        a.x = to_view(x, "x");
        a.fn = to_view(fn, "fn");
        a.base = to_view(base, "base");
        a.scale = to_view(scale, "scale");
        a.layer_input = to_view(layer_input, "layer_input");
        a.h_pre = to_view(h_pre, "h_pre");
        a.h_post = to_view(h_post, "h_post");
        a.comb = to_view(comb, "comb");
        a.mixes = to_view(mixes, "mixes");
        a.rstd = to_view(rstd, "rstd");
        run(pre_forward, a, cfg, backend, stream);
      },
      nb::arg("x"), nb::arg("fn").none(), nb::arg("base"), nb::arg("scale").none(), nb::arg("layer_input"),
      nb::arg("h_pre"), nb::arg("h_post"), nb::arg("comb"), nb::arg("mixes").none() = nb::none(),
      nb::arg("rstd").none() = nb::none(), MHC_EXEC_ARGS,
      "mHC pre: RMS-normalised projection, coefficients, Sinkhorn and aggregation into caller-owned outputs.");

  m.def(
      "pre_backward_workspace_bytes",
      [](const Array& x, const OptArray& fn, const Array& base, const OptArray& scale, const MhcConfig& cfg,
         const std::string& backend, Stream stream) {
        PreBackward a;
        a.x = to_view(x, "x");
        a.fn = to_view(fn, "fn");
        a.base = to_view(base, "base");
        a.scale = to_view(scale, "scale");
        return pre_backward_workspace_bytes(a, cfg, make_context(backend.c_str(), stream));
      },
      nb::arg("x"), nb::arg("fn").none(), nb::arg("base"), nb::arg("scale").none(), MHC_EXEC_ARGS,
      "Bytes of workspace pre_backward needs for these inputs (possibly 0).");

  m.def(
      "pre_backward",
      [](const Array& x, const OptArray& fn, const Array& base, const OptArray& scale, const Array& mixes,
         const Array& rstd, const OptArray& grad_layer_input, const OptArray& grad_h_pre,
         const OptArray& grad_h_post, const OptArray& grad_comb, const OptArray& grad_x_accum,
         const Array& grad_x, const OptArray& grad_fn, const Array& grad_base, const OptArray& grad_scale,
         const OptArray& workspace, const MhcConfig& cfg, const std::string& backend, Stream stream) {
        PreBackward a;
        a.x = to_view(x, "x");
        a.fn = to_view(fn, "fn");
        a.base = to_view(base, "base");
        a.scale = to_view(scale, "scale");
        a.mixes = to_view(mixes, "mixes");
        a.rstd = to_view(rstd, "rstd");
        a.grad_layer_input = to_view(grad_layer_input, "grad_layer_input");
        a.grad_h_pre = to_view(grad_h_pre, "grad_h_pre");
        a.grad_h_post = to_view(grad_h_post, "grad_h_post");
        a.grad_comb = to_view(grad_comb, "grad_comb");
        a.grad_x_accum = to_view(grad_x_accum, "grad_x_accum");
        a.grad_x = to_view(grad_x, "grad_x");
        a.grad_fn = to_view(grad_fn, "grad_fn");
        a.grad_base = to_view(grad_base, "grad_base");
        a.grad_scale = to_view(grad_scale, "grad_scale");
        a.workspace = to_view(workspace, "workspace");
        run(pre_backward, a, cfg, backend, stream);
      },
      nb::arg("x"), nb::arg("fn").none(), nb::arg("base"), nb::arg("scale").none(), nb::arg("mixes"),
      nb::arg("rstd"), nb::arg("grad_layer_input").none(), nb::arg("grad_h_pre").none(),
      nb::arg("grad_h_post").none(), nb::arg("grad_comb").none(), nb::arg("grad_x_accum").none(),
      nb::arg("grad_x"), nb::arg("grad_fn").none(), nb::arg("grad_base"), nb::arg("grad_scale").none(),
      nb::arg("workspace").none(), MHC_EXEC_ARGS, "Backward of pre_forward.");

  // ---- post ----------------------------------------------------------------------------------
  m.def(
      "post_forward",
      [](const Array& x, const Array& y, const Array& h_post, const Array& comb, const Array& x_next,
         const MhcConfig& cfg, const std::string& backend, Stream stream) {
        PostForward a;
        a.x = to_view(x, "x");
        a.y = to_view(y, "y");
        a.h_post = to_view(h_post, "h_post");
        a.comb = to_view(comb, "comb");
        a.x_next = to_view(x_next, "x_next");
        run(post_forward, a, cfg, backend, stream);
      },
      nb::arg("x"), nb::arg("y"), nb::arg("h_post"), nb::arg("comb"), nb::arg("x_next"), MHC_EXEC_ARGS,
      "mHC post: x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i].");

  m.def(
      "post_backward",
      [](const Array& grad_x_next, const Array& x, const Array& y, const Array& h_post, const Array& comb,
         const Array& grad_x, const Array& grad_y, const Array& grad_h_post, const Array& grad_comb,
         const MhcConfig& cfg, const std::string& backend, Stream stream) {
        PostBackward a;
        a.grad_x_next = to_view(grad_x_next, "grad_x_next");
        a.x = to_view(x, "x");
        a.y = to_view(y, "y");
        a.h_post = to_view(h_post, "h_post");
        a.comb = to_view(comb, "comb");
        a.grad_x = to_view(grad_x, "grad_x");
        a.grad_y = to_view(grad_y, "grad_y");
        a.grad_h_post = to_view(grad_h_post, "grad_h_post");
        a.grad_comb = to_view(grad_comb, "grad_comb");
        run(post_backward, a, cfg, backend, stream);
      },
      nb::arg("grad_x_next"), nb::arg("x"), nb::arg("y"), nb::arg("h_post"), nb::arg("comb"), nb::arg("grad_x"),
      nb::arg("grad_y"), nb::arg("grad_h_post"), nb::arg("grad_comb"), MHC_EXEC_ARGS, "Backward of post_forward.");

  // ---- post of one site fused with pre of the next ---------------------------------------------
  m.def(
      "post_pre_forward",
      [](const Array& x, const Array& y, const Array& h_post, const Array& comb, const OptArray& fn,
         const Array& base, const OptArray& scale, const Array& x_next, const Array& layer_input, const Array& h_pre,
         const Array& h_post_next, const Array& comb_next, const OptArray& mixes, const OptArray& rstd,
         const MhcConfig& cfg, const std::string& backend, Stream stream) {
        PostPreForward a;
        a.x = to_view(x, "x");
        a.y = to_view(y, "y");
        a.h_post = to_view(h_post, "h_post");
        a.comb = to_view(comb, "comb");
        a.fn = to_view(fn, "fn");
        a.base = to_view(base, "base");
        a.scale = to_view(scale, "scale");
        a.x_next = to_view(x_next, "x_next");
        a.layer_input = to_view(layer_input, "layer_input");
        a.h_pre = to_view(h_pre, "h_pre");
        a.h_post_next = to_view(h_post_next, "h_post_next");
        a.comb_next = to_view(comb_next, "comb_next");
        a.mixes = to_view(mixes, "mixes");
        a.rstd = to_view(rstd, "rstd");
        run(post_pre_forward, a, cfg, backend, stream);
      },
      nb::arg("x"), nb::arg("y"), nb::arg("h_post"), nb::arg("comb"), nb::arg("fn").none(), nb::arg("base"),
      nb::arg("scale").none(), nb::arg("x_next"), nb::arg("layer_input"), nb::arg("h_pre"), nb::arg("h_post_next"),
      nb::arg("comb_next"), nb::arg("mixes").none() = nb::none(), nb::arg("rstd").none() = nb::none(),
      MHC_EXEC_ARGS, "post of this site and pre of the next site in one pass over the residual.");

  // ---- Sinkhorn ------------------------------------------------------------------------------
  m.def(
      "sinkhorn_forward",
      [](const Array& logits, const Array& comb, const MhcConfig& cfg, const std::string& backend, Stream stream) {
        SinkhornForward a;
        a.logits = to_view(logits, "logits");
        a.comb = to_view(comb, "comb");
        run(sinkhorn_forward, a, cfg, backend, stream);
      },
      nb::arg("logits"), nb::arg("comb"), MHC_EXEC_ARGS, "Sinkhorn normalisation of [T, n, n] logits.");

  m.def(
      "sinkhorn_backward",
      [](const Array& logits, const Array& grad_comb, const Array& grad_logits, const MhcConfig& cfg,
         const std::string& backend, Stream stream) {
        SinkhornBackward a;
        a.logits = to_view(logits, "logits");
        a.grad_comb = to_view(grad_comb, "grad_comb");
        a.grad_logits = to_view(grad_logits, "grad_logits");
        run(sinkhorn_backward, a, cfg, backend, stream);
      },
      nb::arg("logits"), nb::arg("grad_comb"), nb::arg("grad_logits"), MHC_EXEC_ARGS,
      "Backward of sinkhorn_forward (reverse mode through every iteration).");

  // ---- stream expand -------------------------------------------------------------------------
  m.def(
      "expand_forward",
      [](const Array& x, const Array& out, const MhcConfig& cfg, const std::string& backend, Stream stream) {
        ExpandForward a;
        a.x = to_view(x, "x");
        a.out = to_view(out, "out");
        run(expand_forward, a, cfg, backend, stream);
      },
      nb::arg("x"), nb::arg("out"), MHC_EXEC_ARGS, "out[t, i] = x[t] for every stream i.");

  m.def(
      "expand_backward",
      [](const Array& grad_out, const Array& grad_x, const MhcConfig& cfg, const std::string& backend,
         Stream stream) {
        ExpandBackward a;
        a.grad_out = to_view(grad_out, "grad_out");
        a.grad_x = to_view(grad_x, "grad_x");
        run(expand_backward, a, cfg, backend, stream);
      },
      nb::arg("grad_out"), nb::arg("grad_x"), MHC_EXEC_ARGS, "grad_x = sum over streams of grad_out.");

  // ---- head ----------------------------------------------------------------------------------
  m.def(
      "head_forward",
      [](const Array& x, const OptArray& fn, const Array& base, const OptArray& scale, const Array& out,
         const Array& weights, const OptArray& mixes, const OptArray& rstd, const MhcConfig& cfg,
         const std::string& backend, Stream stream) {
        HeadForward a;
        a.x = to_view(x, "x");
        a.fn = to_view(fn, "fn");
        a.base = to_view(base, "base");
        a.scale = to_view(scale, "scale");
        a.out = to_view(out, "out");
        a.weights = to_view(weights, "weights");
        a.mixes = to_view(mixes, "mixes");
        a.rstd = to_view(rstd, "rstd");
        run(head_forward, a, cfg, backend, stream);
      },
      nb::arg("x"), nb::arg("fn").none(), nb::arg("base"), nb::arg("scale").none(), nb::arg("out"),
      nb::arg("weights"), nb::arg("mixes").none() = nb::none(), nb::arg("rstd").none() = nb::none(), MHC_EXEC_ARGS,
      "Head collapse: w = sigmoid(mixes * scale + base) + pre_eps; out = sum_i w[i] x[i].");

  m.def(
      "head_backward_workspace_bytes",
      [](const Array& x, const OptArray& fn, const Array& base, const OptArray& scale, const MhcConfig& cfg,
         const std::string& backend, Stream stream) {
        HeadBackward a;
        a.x = to_view(x, "x");
        a.fn = to_view(fn, "fn");
        a.base = to_view(base, "base");
        a.scale = to_view(scale, "scale");
        return head_backward_workspace_bytes(a, cfg, make_context(backend.c_str(), stream));
      },
      nb::arg("x"), nb::arg("fn").none(), nb::arg("base"), nb::arg("scale").none(), MHC_EXEC_ARGS,
      "Bytes of workspace head_backward needs for these inputs (possibly 0).");

  m.def(
      "head_backward",
      [](const Array& x, const OptArray& fn, const Array& base, const OptArray& scale, const Array& mixes,
         const Array& rstd, const OptArray& grad_out, const OptArray& grad_weights, const Array& grad_x,
         const OptArray& grad_fn, const Array& grad_base, const OptArray& grad_scale, const OptArray& workspace,
         const MhcConfig& cfg, const std::string& backend, Stream stream) {
        HeadBackward a;
        a.x = to_view(x, "x");
        a.fn = to_view(fn, "fn");
        a.base = to_view(base, "base");
        a.scale = to_view(scale, "scale");
        a.mixes = to_view(mixes, "mixes");
        a.rstd = to_view(rstd, "rstd");
        a.grad_out = to_view(grad_out, "grad_out");
        a.grad_weights = to_view(grad_weights, "grad_weights");
        a.grad_x = to_view(grad_x, "grad_x");
        a.grad_fn = to_view(grad_fn, "grad_fn");
        a.grad_base = to_view(grad_base, "grad_base");
        a.grad_scale = to_view(grad_scale, "grad_scale");
        a.workspace = to_view(workspace, "workspace");
        run(head_backward, a, cfg, backend, stream);
      },
      nb::arg("x"), nb::arg("fn").none(), nb::arg("base"), nb::arg("scale").none(), nb::arg("mixes"),
      nb::arg("rstd"), nb::arg("grad_out").none(), nb::arg("grad_weights").none(), nb::arg("grad_x"),
      nb::arg("grad_fn").none(), nb::arg("grad_base"), nb::arg("grad_scale").none(), nb::arg("workspace").none(),
      MHC_EXEC_ARGS, "Backward of head_forward.");

  // ---- residual add + aggregate ----------------------------------------------------------------
  m.def(
      "residual_add_agg_forward",
      [](const Array& x, const Array& res, const Array& h_pre, const Array& x_out, const Array& agg,
         const MhcConfig& cfg, const std::string& backend, Stream stream) {
        ResidualAddAggForward a;
        a.x = to_view(x, "x");
        a.res = to_view(res, "res");
        a.h_pre = to_view(h_pre, "h_pre");
        a.x_out = to_view(x_out, "x_out");
        a.agg = to_view(agg, "agg");
        run(residual_add_agg_forward, a, cfg, backend, stream);
      },
      nb::arg("x"), nb::arg("res"), nb::arg("h_pre"), nb::arg("x_out"), nb::arg("agg"), MHC_EXEC_ARGS,
      "x_out = x + res; agg = sum_i h_pre[i] * x_out[i].");

  m.def(
      "residual_add_agg_backward",
      [](const OptArray& grad_x_out, const OptArray& grad_agg, const Array& x_out, const Array& h_pre,
         const Array& grad_sum, const Array& grad_h_pre, const MhcConfig& cfg, const std::string& backend,
         Stream stream) {
        ResidualAddAggBackward a;
        a.grad_x_out = to_view(grad_x_out, "grad_x_out");
        a.grad_agg = to_view(grad_agg, "grad_agg");
        a.x_out = to_view(x_out, "x_out");
        a.h_pre = to_view(h_pre, "h_pre");
        a.grad_sum = to_view(grad_sum, "grad_sum");
        a.grad_h_pre = to_view(grad_h_pre, "grad_h_pre");
        run(residual_add_agg_backward, a, cfg, backend, stream);
      },
      nb::arg("grad_x_out").none(), nb::arg("grad_agg").none(), nb::arg("x_out"), nb::arg("h_pre"),
      nb::arg("grad_sum"), nb::arg("grad_h_pre"), MHC_EXEC_ARGS,
      "Backward of residual_add_agg_forward: grad_sum is the gradient of both x and res.");
}

#undef MHC_EXEC_ARGS

}  // namespace mhc::python
