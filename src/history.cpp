// Front end of the multi-history skip ops: validate, optionally scan for non-finite inputs, dispatch.
#include "mhc/history.hpp"

#include <cmath>
#include <string>

#include "common/validate.hpp"
#include "backend.hpp"

namespace mhc {

using detail::ArgChecker;
using detail::Dim;

const char* constraint_name(Constraint c) {
  switch (c) {
    case Constraint::simplex: return "simplex";
    case Constraint::softmax: return "softmax";
    case Constraint::identity: return "identity";
    case Constraint::doubly_stochastic: return "doubly_stochastic";
  }
  return "unknown";
}

Constraint parse_constraint(const std::string& name) {
  if (name == "simplex" || name == "sparsemax") return Constraint::simplex;
  if (name == "softmax") return Constraint::softmax;
  if (name == "identity") return Constraint::identity;
  if (name == "doubly_stochastic" || name == "sinkhorn") return Constraint::doubly_stochastic;
  throw InvalidArgument("constraint: expected 'simplex', 'softmax', 'identity' or 'doubly_stochastic', got '" +
                        name + "'");
}

std::vector<TensorView> unstack(const TensorView& stacked) {
  const ArgChecker check("unstack");
  check.present(stacked, "stacked");
  if (stacked.rank < 1) check.fail("stacked: expected a tensor [H, *shape]");
  if (!stacked.is_contiguous()) check.fail("stacked: expected a contiguous tensor");
  if (stacked.shape[0] > kMaxHistory)  // no op takes more states (and a vector of 2^50 views is no error message)
    check.fail("stacked: expected at most " + std::to_string(kMaxHistory) + " states [H, *shape], got H = " +
               std::to_string(stacked.shape[0]));
  std::vector<TensorView> slots(static_cast<std::size_t>(stacked.shape[0]));
  const std::int64_t slot_elems = stacked.shape[0] ? stacked.numel() / stacked.shape[0] : 0;
  for (std::size_t k = 0; k < slots.size(); ++k) {
    TensorView& v = slots[k];
    v.data = static_cast<char*>(stacked.data) + k * slot_elems * dtype_size(stacked.dtype);
    v.dtype = stacked.dtype;
    v.device = stacked.device;
    v.rank = stacked.rank - 1;
    for (int d = 1; d < stacked.rank; ++d) {
      v.shape[d - 1] = stacked.shape[d];
      v.strides[d - 1] = stacked.strides[d];
    }
  }
  return slots;
}

namespace {

DType coef_dtype_of(DType stream) { return stream == DType::f64 ? DType::f64 : DType::f32; }

bool supported_pair(DType stream, DType storage) {
  if (stream == storage) return true;
  if (stream == DType::f32) return storage == DType::f16 || storage == DType::bf16;
  if (stream == DType::f16 || stream == DType::bf16) return storage == DType::f32;
  return false;
}

void check_config(const ArgChecker& check, const HistoryConfig& cfg) {
  if (!(cfg.temperature > 0.0) || !std::isfinite(cfg.temperature))
    check.fail("temperature: expected a finite value > 0, got " + std::to_string(cfg.temperature));
  if (!(cfg.epsilon >= 0.0 && cfg.epsilon <= 1.0))
    check.fail("epsilon: expected a value in [0, 1], got " + std::to_string(cfg.epsilon));
  if (cfg.sinkhorn_iters < 1) check.fail("sinkhorn_iters: expected >= 1, got " + std::to_string(cfg.sinkhorn_iters));
  if (!(cfg.sinkhorn_eps >= 0.0) || !std::isfinite(cfg.sinkhorn_eps))
    check.fail("sinkhorn_eps: expected a finite value >= 0");
  if (cfg.nan_policy != NanPolicy::propagate && cfg.nan_policy != NanPolicy::check)
    check.fail("nan_policy: expected propagate or check");
  if (static_cast<int>(cfg.constraint) > static_cast<int>(Constraint::doubly_stochastic))
    check.fail("constraint: unknown value " + std::to_string(static_cast<int>(cfg.constraint)));
}

void check_finite(const TensorView& t, const std::string& name, const char* op, const HistoryConfig& cfg,
                  const Context& ctx) {
  if (cfg.nan_policy != NanPolicy::check) return;
  MhcConfig mc;
  mc.nan_policy = cfg.nan_policy;
  detail::check_finite(t, name.c_str(), op, mc, ctx);
}

std::string join_shape(const std::int64_t* dims, int rank) {
  std::string s = "[";
  for (int d = 0; d < rank; ++d) s += (d ? ", " : "") + std::to_string(dims[d]);
  return s + "]";
}

// A present, contiguous tensor of shape [lead..., *shape] with this dtype and device.
void check_shaped(const ArgChecker& check, const TensorView& t, const std::string& name,
                  std::initializer_list<std::int64_t> lead, const TensorView& like, DType dtype, Device device,
                  const char* like_name) {
  check.present(t, name.c_str());
  std::int64_t expect[kMaxRank + 1];
  int rank = 0;
  for (std::int64_t v : lead) expect[rank++] = v;
  if (rank + like.rank > kMaxRank) check.fail(name + ": too many dimensions");
  for (int d = 0; d < like.rank; ++d) expect[rank++] = like.shape[d];
  bool same = t.rank == rank;
  for (int d = 0; same && d < rank; ++d) same = t.shape[d] == expect[d];
  if (!same)
    check.fail(name + ": expected shape " + join_shape(expect, rank) + " (" + like_name + "), got " +
               t.shape_string());
  if (t.dtype != dtype)
    check.fail_dtype(name + ": expected dtype " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
  if (!(t.device == device))
    check.fail_device(name + ": expected a tensor on " + device_name(device) + ", got one on " +
                      device_name(t.device));
  if (!t.is_contiguous()) check.fail(name + ": expected a contiguous tensor");
}

void check_small(const ArgChecker& check, const TensorView& t, const char* name, std::initializer_list<Dim> shape,
                 DType dtype, Device device) {
  check.tensor(t, name, shape, dtype, device);
}

// The states: 1..kMaxHistory present, contiguous tensors of one shape and dtype, on `device`.
// Returns their dtype.
DType check_states(const ArgChecker& check, std::span<const TensorView> states, const char* name, Device device) {
  const std::size_t H = states.size();
  if (H < 1 || H > static_cast<std::size_t>(kMaxHistory))
    check.fail(std::string(name) + ": expected 1 to " + std::to_string(kMaxHistory) + " states, got " +
               std::to_string(H));
  const TensorView& first = states[0];
  const std::string first_name = std::string(name) + "[0]";
  check.present(first, first_name.c_str());
  for (std::size_t k = 0; k < H; ++k) {
    const std::string nk = std::string(name) + "[" + std::to_string(k) + "]";
    check_shaped(check, states[k], nk, {}, first, first.dtype, device, "like states[0]");
  }
  return first.dtype;
}

void check_grad_states(const ArgChecker& check, std::span<const TensorView> grad_states,
                       std::span<const TensorView> states, Device device) {
  if (grad_states.empty()) return;
  if (grad_states.size() != states.size())
    check.fail("grad_states: expected " + std::to_string(states.size()) + " tensors (one per state) or none, got " +
               std::to_string(grad_states.size()));
  for (std::size_t k = 0; k < grad_states.size(); ++k)
    if (grad_states[k].present())  // absent: that state's gradient is not wanted
      check_shaped(check, grad_states[k], "grad_states[" + std::to_string(k) + "]", {}, states[0], states[0].dtype,
                 device, "like the states");
}

void check_pair(const ArgChecker& check, DType stream, DType storage, const char* stream_name) {
  if (!supported_pair(stream, storage))
    check.fail_dtype(std::string("states: dtype ") + dtype_name(storage) + " cannot be mixed into a " +
                     dtype_name(stream) + " " + stream_name +
                     " (supported: the same dtype, float32 with float16/bfloat16 states, float16/bfloat16 with "
                     "float32 states)");
}

// Layout shared by the mix ops: rows R (1 for vector weights), H states, the state shape.
struct MixLayout {
  std::int64_t R;
  int H;
  bool matrix;
  DType storage, coef;
};

// Validates states and weights; `lead` is the stream tensor (out or grad_out) whose dtype and device rule.
MixLayout check_mix(const ArgChecker& check, const TensorView& lead, const char* lead_name,
                    std::span<const TensorView> states, const TensorView& weights, const TensorView& gate) {
  check.present(lead, lead_name);
  const Device device = lead.device;
  const DType storage = check_states(check, states, "states", device);
  check_pair(check, lead.dtype, storage, lead_name);
  const DType coef = coef_dtype_of(lead.dtype);
  const int H = static_cast<int>(states.size());
  check.present(weights, "weights");
  MixLayout L{1, H, weights.rank == 2, storage, coef};
  if (weights.rank == 1) {
    check_small(check, weights, "weights", {{H, "H"}}, coef, device);
  } else if (weights.rank == 2) {
    L.R = weights.shape[0];
    if (L.R < 1 || L.R > kMaxHistory)
      check.fail("weights: expected 1 to " + std::to_string(kMaxHistory) + " rows [R, H], got " +
                 weights.shape_string());
    check_small(check, weights, "weights", {{L.R, "R"}, {H, "H"}}, coef, device);
  } else {
    check.fail("weights: expected [H] or [R, H] with H = " + std::to_string(H) + " states, got " +
               weights.shape_string());
  }
  check.optional(gate, "gate", {{1, "1"}}, coef, device);
  if (L.matrix) check_shaped(check, lead, lead_name, {L.R}, states[0], lead.dtype, device, "[R, *state shape]");
  else check_shaped(check, lead, lead_name, {}, states[0], lead.dtype, device, "like the states");
  return L;
}

void check_vector_constraint(const ArgChecker& check, const HistoryConfig& cfg) {
  if (cfg.constraint == Constraint::doubly_stochastic)
    check.fail("constraint: doubly_stochastic projects a square matrix; use project_logits + history_mix "
               "(the matrix variant) instead of the fused skip");
}

}  // namespace

// ---- projection -----------------------------------------------------------------------------------

namespace {
// logits: vector constraints [..., H]; doubly_stochastic [..., H, H]. Returns H.
int check_logits(const ArgChecker& check, const TensorView& logits, const HistoryConfig& cfg) {
  check.present(logits, "logits");
  if (logits.dtype != DType::f32 && logits.dtype != DType::f64)
    check.fail_dtype(std::string("logits: expected dtype float32 or float64, got ") + dtype_name(logits.dtype));
  if (!logits.is_contiguous()) check.fail("logits: expected a contiguous tensor");
  const bool square = cfg.constraint == Constraint::doubly_stochastic;
  if (logits.rank < (square ? 2 : 1))
    check.fail(std::string("logits: expected ") + (square ? "[..., H, H]" : "[..., H]") + ", got " +
               logits.shape_string());
  const std::int64_t H = logits.shape[logits.rank - 1];
  if (H < 1 || H > kMaxHistory)
    check.fail("logits: the last dim H must be in [1, " + std::to_string(kMaxHistory) + "], got " + std::to_string(H));
  if (square && logits.shape[logits.rank - 2] != H)
    check.fail("logits: doubly_stochastic needs square matrices [..., H, H], got " + logits.shape_string());
  return static_cast<int>(H);
}
}  // namespace

void project_logits_forward(const ProjectLogitsForward& a, const HistoryConfig& cfg, const Context& ctx) {
  const ArgChecker check("project_logits_forward");
  check_config(check, cfg);
  check_logits(check, a.logits, cfg);
  check_shaped(check, a.weights, "weights", {}, a.logits, a.logits.dtype, a.logits.device, "like logits");
  check_finite(a.logits, "logits", "project_logits_forward", cfg, ctx);
  MHC_DISPATCH(a.logits.device, ctx, project_logits_forward(a, cfg, ctx));
}

void project_logits_backward(const ProjectLogitsBackward& a, const HistoryConfig& cfg, const Context& ctx) {
  const ArgChecker check("project_logits_backward");
  check_config(check, cfg);
  check_logits(check, a.logits, cfg);
  for (auto [t, name] : {std::pair{&a.weights, "weights"}, {&a.grad_weights, "grad_weights"},
                         {&a.grad_logits, "grad_logits"}})
    check_shaped(check, *t, name, {}, a.logits, a.logits.dtype, a.logits.device, "like logits");
  check_finite(a.grad_weights, "grad_weights", "project_logits_backward", cfg, ctx);
  MHC_DISPATCH(a.logits.device, ctx, project_logits_backward(a, cfg, ctx));
}

// ---- mix ------------------------------------------------------------------------------------------

namespace {
// The states (or their gradients) as named views for ArgChecker::disjoint; absent entries are skipped there.
void add_named(std::vector<ArgChecker::Named>& into, std::span<const TensorView> views, const char* name) {
  for (std::size_t k = 0; k < views.size(); ++k) into.push_back({views[k], name, static_cast<int>(k)});
}
}  // namespace

void history_mix_forward(const HistoryMixForward& a, const HistoryConfig& cfg, const Context& ctx) {
  const ArgChecker check("history_mix_forward");
  check_config(check, cfg);
  const MixLayout L = check_mix(check, a.out, "out", a.states, a.weights, a.gate);
  if (a.x.present()) {
    if (L.matrix) check_shaped(check, a.x, "x", {L.R}, a.states[0], a.out.dtype, a.out.device, "like out");
    else check_shaped(check, a.x, "x", {}, a.states[0], a.out.dtype, a.out.device, "like out");
  }
  {  // out may be x itself (elementwise), not a state (the matrix form's rows lie over other elements)
    std::vector<ArgChecker::Named> inputs{{a.weights, "weights"}, {a.gate, "gate"}};
    add_named(inputs, a.states, "states");
    const ArgChecker::Named outputs[] = {{a.out, "out"}};
    check.disjoint(outputs, inputs);
  }
  const char* op = "history_mix_forward";
  check_finite(a.x, "x", op, cfg, ctx);
  check_finite(a.weights, "weights", op, cfg, ctx);
  check_finite(a.gate, "gate", op, cfg, ctx);
  for (std::size_t k = 0; k < a.states.size(); ++k)
    check_finite(a.states[k], "states[" + std::to_string(k) + "]", op, cfg, ctx);
  MHC_DISPATCH(a.out.device, ctx, history_mix_forward(a, cfg, ctx));
}

namespace {
void check_mix_backward(const ArgChecker& check, const HistoryMixBackward& a, const HistoryConfig& cfg) {
  check_config(check, cfg);
  const MixLayout L = check_mix(check, a.grad_out, "grad_out", a.states, a.weights, a.gate);
  const Device device = a.grad_out.device;
  if (L.matrix) check_small(check, a.grad_weights, "grad_weights", {{L.R, "R"}, {L.H, "H"}}, L.coef, device);
  else check_small(check, a.grad_weights, "grad_weights", {{L.H, "H"}}, L.coef, device);
  if (a.grad_gate.present() && !a.gate.present()) check.fail("grad_gate: given but gate is absent");
  check.optional(a.grad_gate, "grad_gate", {{1, "1"}}, L.coef, device);
  check_grad_states(check, a.grad_states, a.states, device);
  std::vector<ArgChecker::Named> outputs{{a.grad_weights, "grad_weights"}, {a.grad_gate, "grad_gate"}};
  add_named(outputs, a.grad_states, "grad_states");
  std::vector<ArgChecker::Named> inputs{{a.grad_out, "grad_out"}, {a.weights, "weights"}, {a.gate, "gate"}};
  add_named(inputs, a.states, "states");
  check.disjoint(outputs, inputs);
}
}  // namespace

std::size_t history_mix_backward_workspace_bytes(const HistoryMixBackward& a, const HistoryConfig& cfg,
                                                 const Context& ctx) {
  const ArgChecker check("history_mix_backward");
  check_mix_backward(check, a, cfg);
  MHC_DISPATCH(a.grad_out.device, ctx, history_mix_backward_workspace_bytes(a, cfg, ctx));
}

void history_mix_backward(const HistoryMixBackward& a, const HistoryConfig& cfg, const Context& ctx) {
  const ArgChecker check("history_mix_backward");
  check_mix_backward(check, a, cfg);
  auto query = [&]() -> std::size_t {
    MHC_DISPATCH(a.grad_out.device, ctx, history_mix_backward_workspace_bytes(a, cfg, ctx));
  };
  check.workspace(a.workspace, query(), a.grad_out.device);
  check_finite(a.grad_out, "grad_out", "history_mix_backward", cfg, ctx);
  MHC_DISPATCH(a.grad_out.device, ctx, history_mix_backward(a, cfg, ctx));
}

// ---- fused skip -----------------------------------------------------------------------------------

void history_skip_forward(const HistorySkipForward& a, const HistoryConfig& cfg, const Context& ctx) {
  const ArgChecker check("history_skip_forward");
  check_config(check, cfg);
  check_vector_constraint(check, cfg);
  check.present(a.x, "x");
  const Device device = a.x.device;
  const DType storage = check_states(check, a.states, "states", device);
  check_pair(check, a.x.dtype, storage, "x");
  check_shaped(check, a.x, "x", {}, a.states[0], a.x.dtype, device, "like the states");
  check_shaped(check, a.out, "out", {}, a.x, a.x.dtype, device, "like x");
  const DType coef = coef_dtype_of(a.x.dtype);
  const Dim H{static_cast<std::int64_t>(a.states.size()), "H"};
  check_small(check, a.logits, "logits", {H}, coef, device);
  check_small(check, a.weights, "weights", {H}, coef, device);
  check.optional(a.gate, "gate", {{1, "1"}}, coef, device);
  {  // out may be x itself (elementwise)
    std::vector<ArgChecker::Named> inputs{{a.logits, "logits"}, {a.gate, "gate"}};
    add_named(inputs, a.states, "states");
    const ArgChecker::Named outputs[] = {{a.out, "out"}, {a.weights, "weights"}};
    check.disjoint(outputs, inputs);
    const ArgChecker::Named weights[] = {{a.weights, "weights"}}, x[] = {{a.x, "x"}};
    check.disjoint(weights, x);
  }
  const char* op = "history_skip_forward";
  check_finite(a.x, "x", op, cfg, ctx);
  check_finite(a.logits, "logits", op, cfg, ctx);
  check_finite(a.gate, "gate", op, cfg, ctx);
  for (std::size_t k = 0; k < a.states.size(); ++k)
    check_finite(a.states[k], "states[" + std::to_string(k) + "]", op, cfg, ctx);
  MHC_DISPATCH(device, ctx, history_skip_forward(a, cfg, ctx));
}

namespace {
void check_skip_backward(const ArgChecker& check, const HistorySkipBackward& a, const HistoryConfig& cfg) {
  check_config(check, cfg);
  check_vector_constraint(check, cfg);
  check.present(a.grad_out, "grad_out");
  const Device device = a.grad_out.device;
  const DType storage = check_states(check, a.states, "states", device);
  check_pair(check, a.grad_out.dtype, storage, "grad_out");
  check_shaped(check, a.grad_out, "grad_out", {}, a.states[0], a.grad_out.dtype, device, "like the states");
  const DType coef = coef_dtype_of(a.grad_out.dtype);
  const Dim H{static_cast<std::int64_t>(a.states.size()), "H"};
  check_small(check, a.logits, "logits", {H}, coef, device);
  check_small(check, a.weights, "weights", {H}, coef, device);
  check.optional(a.gate, "gate", {{1, "1"}}, coef, device);
  check_small(check, a.grad_logits, "grad_logits", {H}, coef, device);
  if (a.grad_gate.present() && !a.gate.present()) check.fail("grad_gate: given but gate is absent");
  check.optional(a.grad_gate, "grad_gate", {{1, "1"}}, coef, device);
  check_grad_states(check, a.grad_states, a.states, device);
  std::vector<ArgChecker::Named> outputs{{a.grad_logits, "grad_logits"}, {a.grad_gate, "grad_gate"}};
  add_named(outputs, a.grad_states, "grad_states");
  std::vector<ArgChecker::Named> inputs{{a.grad_out, "grad_out"}, {a.logits, "logits"}, {a.weights, "weights"},
                                        {a.gate, "gate"}};
  add_named(inputs, a.states, "states");
  check.disjoint(outputs, inputs);
}
}  // namespace

std::size_t history_skip_backward_workspace_bytes(const HistorySkipBackward& a, const HistoryConfig& cfg,
                                                  const Context& ctx) {
  const ArgChecker check("history_skip_backward");
  check_skip_backward(check, a, cfg);
  MHC_DISPATCH(a.grad_out.device, ctx, history_skip_backward_workspace_bytes(a, cfg, ctx));
}

void history_skip_backward(const HistorySkipBackward& a, const HistoryConfig& cfg, const Context& ctx) {
  const ArgChecker check("history_skip_backward");
  check_skip_backward(check, a, cfg);
  auto query = [&]() -> std::size_t {
    MHC_DISPATCH(a.grad_out.device, ctx, history_skip_backward_workspace_bytes(a, cfg, ctx));
  };
  check.workspace(a.workspace, query(), a.grad_out.device);
  check_finite(a.grad_out, "grad_out", "history_skip_backward", cfg, ctx);
  MHC_DISPATCH(a.grad_out.device, ctx, history_skip_backward(a, cfg, ctx));
}

}  // namespace mhc
