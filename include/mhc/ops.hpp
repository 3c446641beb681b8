// The n-stream mHC ops (docs/MATH.md section 1), forward and backward.
//
// Shapes: T tokens (any leading batch dims flattened by the caller), n streams, C width,
// m = n*n + 2n coefficients per token, laid out pre [0:n], post [n:2n], comb [2n + j*n + k].
//
// Dtypes: stream tensors (x, y, layer_input, x_next, ...) are stored in f32, f16, bf16 or f64.
// Coefficients and parameters (fn, base, scale, h_pre, h_post, comb, mixes, rstd, their grads)
// are f32, or f64 when the stream dtype is f64. Math is fp32 (fp64 for f64; the CPU reference
// always accumulates in fp64).
//
// Every tensor is contiguous, on one device, and owned by the caller: ops write into the given
// outputs and never allocate. Outputs are overwritten, not accumulated into. Optional tensors are
// TensorView::absent(). Backward ops that reduce parameter gradients over tokens take a workspace
// whose size the matching *_workspace_bytes query returns (possibly 0); the forward pre and post+pre take an
// optional one that lets a kernel needing it run (without it they run another).
//
// No output may share memory with an input or another output (InvalidArgument names both), except where the op is
// elementwise: residual_add_agg_forward's x_out may be x or res, pre_backward's grad_x may be grad_x_accum, and
// (history.hpp) history_mix / history_skip's out may be x.
//
// Bad arguments throw InvalidArgument / DTypeError / DeviceError naming the argument.
#pragma once

#include <cstddef>
#include <string>

#include "mhc/config.hpp"
#include "mhc/errors.hpp"
#include "mhc/tensor.hpp"

namespace mhc {

// ---- pre: RMS-normalised projection, coefficients, Sinkhorn, aggregate ----------------------
struct PreForward {
  TensorView x;      // [T, n, C]
  TensorView fn;     // [m, n*C]; absent = static mode (mixes = 0)
  TensorView base;   // [m]
  TensorView scale;  // [3] = (alpha_pre, alpha_post, alpha_res); absent only in static mode
  TensorView layer_input;  // out [T, C], x's dtype: sum_i h_pre[i] * x[i]
  TensorView h_pre;        // out [T, n]
  TensorView h_post;       // out [T, n]
  TensorView comb;         // out [T, n, n]; comb[i, o] = H_res[o, i]
  TensorView mixes;        // optional out [T, m]: (vec(x) @ fn^T) * rstd, saved for backward
  TensorView rstd;         // optional out [T]: rsqrt(mean(x^2) + norm_eps), saved for backward
  TensorView workspace;    // optional bytes, pre_forward_workspace_bytes(): lets the fastest CUDA pre run
};
void pre_forward(const PreForward& args, const MhcConfig& cfg, const Context& ctx = {});
// Workspace bytes that let pre_forward run its fastest kernel (0: it needs none). Without it the op still runs.
std::size_t pre_forward_workspace_bytes(const PreForward& args, const MhcConfig& cfg, const Context& ctx = {});

struct PreBackward {
  TensorView x, fn, base, scale;  // as in the forward (fn, scale absent in static mode)
  TensorView mixes;               // [T, m] from the forward
  TensorView rstd;                // [T] from the forward
  TensorView grad_layer_input;    // optional [T, C]
  TensorView grad_h_pre;          // optional [T, n]
  TensorView grad_h_post;         // optional [T, n]
  TensorView grad_comb;           // optional [T, n, n]
  TensorView grad_x_accum;        // optional [T, n, C]: added into grad_x (fuses a residual's grad)
  TensorView grad_x;              // out [T, n, C]
  TensorView grad_fn;             // out [m, n*C] (required when fn is present)
  TensorView grad_base;           // out [m]
  TensorView grad_scale;          // out [3] (required when scale is present)
  TensorView workspace;           // bytes, at least pre_backward_workspace_bytes()
};
std::size_t pre_backward_workspace_bytes(const PreBackward& args, const MhcConfig& cfg,
                                         const Context& ctx = {});
void pre_backward(const PreBackward& args, const MhcConfig& cfg, const Context& ctx = {});

// ---- post: x_next[o] = h_post[o] * y + sum_i comb[i, o] * x[i] ------------------------------
struct PostForward {
  TensorView x;       // [T, n, C]
  TensorView y;       // [T, C], x's dtype
  TensorView h_post;  // [T, n]
  TensorView comb;    // [T, n, n]
  TensorView x_next;  // out [T, n, C]
};
void post_forward(const PostForward& args, const MhcConfig& cfg, const Context& ctx = {});

struct PostBackward {
  TensorView grad_x_next;  // [T, n, C]
  TensorView x, y, h_post, comb;
  TensorView grad_x;       // out [T, n, C]
  TensorView grad_y;       // out [T, C]
  TensorView grad_h_post;  // out [T, n]
  TensorView grad_comb;    // out [T, n, n]
};
void post_backward(const PostBackward& args, const MhcConfig& cfg, const Context& ctx = {});

// ---- post of layer l fused with pre of layer l+1: one pass over the residual --------------------
// Backward is pre_backward (with grad_x_accum = grad of x_next) followed by post_backward.
struct PostPreForward {
  TensorView x, y, h_post, comb;  // post of this site
  TensorView fn, base, scale;     // parameters of the next site
  TensorView x_next;              // out [T, n, C]
  TensorView layer_input, h_pre, h_post_next, comb_next, mixes, rstd;  // outs of the next pre
  TensorView workspace;  // optional bytes, post_pre_forward_workspace_bytes()
};
void post_pre_forward(const PostPreForward& args, const MhcConfig& cfg, const Context& ctx = {});
std::size_t post_pre_forward_workspace_bytes(const PostPreForward& args, const MhcConfig& cfg,
                                             const Context& ctx = {});

// ---- Sinkhorn on [T, n, n] logits ------------------------------------------------------------
// comb = softmax(logits, -1) + eps; comb /= colsum + eps; (iters-1) x {rows; columns}.
struct SinkhornForward {
  TensorView logits;  // [T, n, n]
  TensorView comb;    // out [T, n, n]
};
void sinkhorn_forward(const SinkhornForward& args, const MhcConfig& cfg, const Context& ctx = {});

struct SinkhornBackward {
  TensorView logits;       // [T, n, n]
  TensorView grad_comb;    // [T, n, n]
  TensorView grad_logits;  // out [T, n, n]; exact reverse mode through every iteration
};
void sinkhorn_backward(const SinkhornBackward& args, const MhcConfig& cfg, const Context& ctx = {});

// ---- stream expand: out[t, i] = x[t] for every stream i ------------------------------------
struct ExpandForward {
  TensorView x;    // [T, C]
  TensorView out;  // out [T, n, C]
};
void expand_forward(const ExpandForward& args, const MhcConfig& cfg, const Context& ctx = {});

struct ExpandBackward {
  TensorView grad_out;  // [T, n, C]
  TensorView grad_x;    // out [T, C] = sum over streams
};
void expand_backward(const ExpandBackward& args, const MhcConfig& cfg, const Context& ctx = {});

// ---- head collapse: w = sigmoid(mixes * scale + base) + pre_eps; out = sum_i w[i] x[i] ----------
// mixes = (vec(x) @ fn^T) * rstd as in pre, with fn [n, n*C].
struct HeadForward {
  TensorView x;        // [T, n, C]
  TensorView fn;       // [n, n*C]; absent = static weights from base
  TensorView base;     // [n]
  TensorView scale;    // [1]; absent only in static mode
  TensorView out;      // out [T, C]
  TensorView weights;  // out [T, n]
  TensorView mixes;    // optional out [T, n]
  TensorView rstd;     // optional out [T]
};
void head_forward(const HeadForward& args, const MhcConfig& cfg, const Context& ctx = {});

struct HeadBackward {
  TensorView x, fn, base, scale, mixes, rstd;
  TensorView grad_out;      // optional [T, C]
  TensorView grad_weights;  // optional [T, n]
  TensorView grad_x;        // out [T, n, C]
  TensorView grad_fn;       // out [n, n*C] (required when fn is present)
  TensorView grad_base;     // out [n]
  TensorView grad_scale;    // out [1] (required when scale is present)
  TensorView workspace;
};
std::size_t head_backward_workspace_bytes(const HeadBackward& args, const MhcConfig& cfg,
                                          const Context& ctx = {});
void head_backward(const HeadBackward& args, const MhcConfig& cfg, const Context& ctx = {});

// ---- residual_add_agg: x_out = x + res; agg = sum_i h_pre[i] * x_out[i] --------------------------
struct ResidualAddAggForward {
  TensorView x;      // [T, n, C]
  TensorView res;    // [T, n, C]
  TensorView h_pre;  // [T, n]
  TensorView x_out;  // out [T, n, C]
  TensorView agg;    // out [T, C]
};
void residual_add_agg_forward(const ResidualAddAggForward& args, const MhcConfig& cfg,
                              const Context& ctx = {});

struct ResidualAddAggBackward {
  TensorView grad_x_out;  // optional [T, n, C]
  TensorView grad_agg;    // optional [T, C]
  TensorView x_out;       // [T, n, C] from the forward
  TensorView h_pre;       // [T, n]
  TensorView grad_sum;    // out [T, n, C]: the gradient of both x and res
  TensorView grad_h_pre;  // out [T, n]
};
void residual_add_agg_backward(const ResidualAddAggBackward& args, const MhcConfig& cfg,
                               const Context& ctx = {});

// ---- build information ---------------------------------------------------------------------
bool built_with_cuda();
int cuda_device_count();  // 0 without CUDA or without a device
const char* version();

// ---- the tuning table of the CUDA backend (docs/TUNING.md) ---------------------------------
struct TuningStatus {
  std::string path;   // the file the table was read from; "" when none was found or it was ignored
  int entries = 0;    // entries that apply to this GPU (0 for a file made on another GPU model)
  std::string error;  // why the file was ignored (malformed); "" otherwise
};
// The table in use, read from the tuning file at the first CUDA op that consults it (or now).
// Without CUDA: an empty status.
TuningStatus tuning_status();
// Reads the tuning file again (e.g. after `mhc tune` wrote it) and returns the new status.
TuningStatus reload_tuning();
// Replaces this process's table by `json` (the file format): how the tuner tries a candidate.
// Throws InvalidArgument for malformed text, DeviceError without CUDA.
void set_tuning_json(const std::string& json);

}  // namespace mhc
