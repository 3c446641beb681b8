// Multi-history skip connections (docs/MATH.md section 2), forward and backward.
//
// A skip keeps the last H states h_0..h_{H-1} of a network (index 0 is the newest) and adds a learned
// combination of them to the current tensor x:
//
//     out = x + gate * sum_k w[k] * h_k,        w = project(logits)
//
// where `project` keeps w on a manifold: the probability simplex (sparsemax: exact zeros possible),
// a softmax with temperature, an identity-preserving softmax, or (matrix variant) the doubly
// stochastic matrices. The matrix variant mixes the H states into R outputs:
// out[r] = x[r] + gate * sum_k w[r, k] * h_k.
//
// Dtypes: x/out ("stream") and the states ("storage") are f32, f16, bf16 or f64. States share one
// dtype, which may differ from the stream's: same dtype, or f32 stream with f16/bf16 states (history
// stored at half the memory), or f16/bf16 stream with f32 states. Weights, logits, gate and their
// gradients are f32, or f64 when the stream is f64. Math is fp32 (fp64 for f64); the CPU reference
// accumulates in fp64.
//
// Zero weights: a state whose weight is exactly 0 is never read, on every backend (so the one-hot
// weights that sparsemax produces cost one residual add, decided on the device with no host sync).
// Consequently a non-finite value in such a state does not reach the output.
//
// Every tensor is contiguous, on one device, and owned by the caller; ops write into the given
// outputs and never allocate. Outputs are overwritten, not accumulated into. Optional tensors are
// TensorView::absent(); optional lists are empty spans.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "mhc/config.hpp"
#include "mhc/errors.hpp"
#include "mhc/tensor.hpp"

namespace mhc {

inline constexpr int kMaxHistory = 64;  // states per skip, and rows of a matrix skip

enum class Constraint : std::uint8_t {
  simplex,            // sparsemax(z / T): Euclidean projection onto the simplex, exact zeros
  softmax,            // softmax(z / T)
  identity,           // (1 - epsilon) * softmax(z / T) + epsilon * e_0: never loses the newest state
  doubly_stochastic,  // Sinkhorn(z / T) of a square [H, H] matrix, as in docs/MATH.md section 1.1
};
const char* constraint_name(Constraint c);
Constraint parse_constraint(const std::string& name);  // throws InvalidArgument for an unknown name

struct HistoryConfig {
  Constraint constraint = Constraint::simplex;
  double temperature = 1.0;    // T > 0: logits are divided by it
  double epsilon = 0.1;        // identity: weight kept on the newest state, in [0, 1]
  int sinkhorn_iters = 20;     // doubly_stochastic: iterations, >= 1
  double sinkhorn_eps = 1e-6;  // doubly_stochastic: epsilon, >= 0
  NanPolicy nan_policy = NanPolicy::propagate;
};

// ---- projection of logits onto the manifold (last dim) ----------------------------------------
// Vector constraints: logits [R, H] -> weights [R, H], one projection per row.
// doubly_stochastic:  logits [R, H, H] -> weights [R, H, H], one Sinkhorn per matrix.
// f32 or f64; weights have the logits' dtype.
struct ProjectLogitsForward {
  TensorView logits;
  TensorView weights;  // out
};
void project_logits_forward(const ProjectLogitsForward& args, const HistoryConfig& cfg, const Context& ctx = {});

struct ProjectLogitsBackward {
  TensorView logits;        // as in the forward
  TensorView weights;       // the forward's output
  TensorView grad_weights;  // like weights
  TensorView grad_logits;   // out, like logits: exact (sparsemax's Jacobian; Sinkhorn by reverse mode)
};
void project_logits_backward(const ProjectLogitsBackward& args, const HistoryConfig& cfg, const Context& ctx = {});

// ---- weighted sum of states plus the skip input -------------------------------------------------
// Vector: weights [H], x/out [*shape].     Matrix: weights [R, H], x/out [R, *shape].
// Every state is [*shape]. x absent means zeros (then out's dtype is the stream dtype).
struct HistoryMixForward {
  TensorView x;                        // optional
  std::span<const TensorView> states;  // H >= 1 tensors, newest first
  TensorView weights;
  TensorView gate;                     // optional [1]: scales the weighted sum
  TensorView out;
};
void history_mix_forward(const HistoryMixForward& args, const HistoryConfig& cfg, const Context& ctx = {});

// grad_x is grad_out itself (the op is x + ...), so it has no output here.
struct HistoryMixBackward {
  TensorView grad_out;                 // like out
  std::span<const TensorView> states;  // as in the forward
  TensorView weights;
  TensorView gate;                          // optional [1]
  TensorView grad_weights;                  // out, like weights: gate * <grad_out[r], h_k>
  TensorView grad_gate;                     // optional out [1] (only with gate)
  std::span<const TensorView> grad_states;  // optional outs, like states: gate * sum_r w[r, k] grad_out[r];
                                            // empty, or H entries of which absent ones are not written
  TensorView workspace;                     // bytes, at least history_mix_backward_workspace_bytes()
};
std::size_t history_mix_backward_workspace_bytes(const HistoryMixBackward& args, const HistoryConfig& cfg,
                                                 const Context& ctx = {});
void history_mix_backward(const HistoryMixBackward& args, const HistoryConfig& cfg, const Context& ctx = {});

// ---- fused skip: projection + weighted sum in one pass over the states ----------------------------
// Vector constraints only (simplex, softmax, identity): logits [H], x/out/states [*shape].
struct HistorySkipForward {
  TensorView x;
  std::span<const TensorView> states;  // H tensors, newest first
  TensorView logits;                   // [H]
  TensorView gate;                     // optional [1]
  TensorView out;
  TensorView weights;  // out [H]: project(logits), for the backward and for inspection
};
void history_skip_forward(const HistorySkipForward& args, const HistoryConfig& cfg, const Context& ctx = {});

// grad_x is grad_out. States whose weight is 0 are not read: their logits get an exactly zero
// gradient from every vector constraint.
struct HistorySkipBackward {
  TensorView grad_out;
  std::span<const TensorView> states;
  TensorView logits;   // [H]
  TensorView weights;  // [H] from the forward
  TensorView gate;     // optional [1]
  TensorView grad_logits;                   // out [H]
  TensorView grad_gate;                     // optional out [1] (only with gate)
  std::span<const TensorView> grad_states;  // optional outs (empty, or H entries, absent ones not written)
  TensorView workspace;
};
std::size_t history_skip_backward_workspace_bytes(const HistorySkipBackward& args, const HistoryConfig& cfg,
                                                  const Context& ctx = {});
void history_skip_backward(const HistorySkipBackward& args, const HistoryConfig& cfg, const Context& ctx = {});

// ---- helpers ------------------------------------------------------------------------------------
// Views of the H slots of a contiguous stacked tensor [H, *shape] (no copy).
std::vector<TensorView> unstack(const TensorView& stacked);

// Bytes a history of H states of [B, C, S] holds: B x C x S x H x bytes(dtype) (docs/MATH.md section 2).
inline std::int64_t history_memory_bytes(std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                                         std::int64_t history, DType dtype) {
  return batch * channels * spatial * history * static_cast<std::int64_t>(dtype_size(dtype));
}

}  // namespace mhc
