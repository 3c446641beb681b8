// Bindings of the multi-history skip ops (include/mhc/history.hpp).
//
// Same conventions as bind_nstream.cpp: tensors arrive as DLPack capsules (None for an absent
// optional tensor, a Python list for a list of states), outputs are allocated by torch and passed in,
// views are built with the GIL held and the op runs without it.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>
#include <vector>

#include "mhc/history.hpp"
#include "views.hpp"

namespace mhc::python {

namespace {

using ArrayList = std::vector<Array>;
using OptArrayList = std::vector<OptArray>;  // None entries: absent (a gradient that is not wanted)

// The argument structs of the two backward ops, built from Python arguments (views kept alive here).
struct MixBackwardArgs {
  std::vector<TensorView> states, grad_states;
  HistoryMixBackward a;
  MixBackwardArgs(const Array& grad_out, const ArrayList& states_in, const Array& weights, const OptArray& gate,
                  const Array& grad_weights, const OptArray& grad_gate, const OptArrayList& grad_states_in,
                  const OptArray& workspace)
      : states(to_views(states_in, "states")), grad_states(to_views(grad_states_in, "grad_states")) {
    a.grad_out = to_view(grad_out, "grad_out");
    a.states = states;
    a.weights = to_view(weights, "weights");
    a.gate = to_view(gate, "gate");
    a.grad_weights = to_view(grad_weights, "grad_weights");
    a.grad_gate = to_view(grad_gate, "grad_gate");
    a.grad_states = grad_states;
    a.workspace = to_view(workspace, "workspace");
  }
};

struct SkipBackwardArgs {
  std::vector<TensorView> states, grad_states;
  HistorySkipBackward a;
  SkipBackwardArgs(const Array& grad_out, const ArrayList& states_in, const Array& logits, const Array& weights,
                   const OptArray& gate, const Array& grad_logits, const OptArray& grad_gate,
                   const OptArrayList& grad_states_in, const OptArray& workspace)
      : states(to_views(states_in, "states")), grad_states(to_views(grad_states_in, "grad_states")) {
    a.grad_out = to_view(grad_out, "grad_out");
    a.states = states;
    a.logits = to_view(logits, "logits");
    a.weights = to_view(weights, "weights");
    a.gate = to_view(gate, "gate");
    a.grad_logits = to_view(grad_logits, "grad_logits");
    a.grad_gate = to_view(grad_gate, "grad_gate");
    a.grad_states = grad_states;
    a.workspace = to_view(workspace, "workspace");
  }
};

}  // namespace

void bind_history(nb::module_& m) {
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

  m.def(
      "project_logits_forward",
      [](const Array& logits, const Array& weights, const HistoryConfig& cfg, const std::string& backend,
         Stream stream) {
        ProjectLogitsForward a;
        a.logits = to_view(logits, "logits");
        a.weights = to_view(weights, "weights");
        run(project_logits_forward, a, cfg, backend, stream);
      },
      nb::arg("logits"), nb::arg("weights"), MHC_EXEC_ARGS,
      "Projects logits [..., H] (doubly_stochastic: [..., H, H]) onto the constraint's manifold.");

  m.def(
      "project_logits_backward",
      [](const Array& logits, const Array& weights, const Array& grad_weights, const Array& grad_logits,
         const HistoryConfig& cfg, const std::string& backend, Stream stream) {
        ProjectLogitsBackward a;
        a.logits = to_view(logits, "logits");
        a.weights = to_view(weights, "weights");
        a.grad_weights = to_view(grad_weights, "grad_weights");
        a.grad_logits = to_view(grad_logits, "grad_logits");
        run(project_logits_backward, a, cfg, backend, stream);
      },
      nb::arg("logits"), nb::arg("weights"), nb::arg("grad_weights"), nb::arg("grad_logits"), MHC_EXEC_ARGS,
      "Backward of project_logits_forward.");

  m.def(
      "history_mix_forward",
      [](const OptArray& x, const ArrayList& states, const Array& weights, const OptArray& gate, const Array& out,
         const HistoryConfig& cfg, const std::string& backend, Stream stream) {
        const std::vector<TensorView> state_views = to_views(states, "states");
        HistoryMixForward a;
        a.x = to_view(x, "x");
        a.states = state_views;
        a.weights = to_view(weights, "weights");
        a.gate = to_view(gate, "gate");
        a.out = to_view(out, "out");
        run(history_mix_forward, a, cfg, backend, stream);
      },
      nb::arg("x").none(), nb::arg("states"), nb::arg("weights"), nb::arg("gate").none(), nb::arg("out"),
      MHC_EXEC_ARGS, "out = x + gate * sum_k weights[..., k] * states[k].");

  m.def(
      "history_mix_backward_workspace_bytes",
      [](const Array& grad_out, const ArrayList& states, const Array& weights, const OptArray& gate,
         const Array& grad_weights, const OptArray& grad_gate, const OptArrayList& grad_states, const HistoryConfig& cfg,
         const std::string& backend, Stream stream) {
        MixBackwardArgs args(grad_out, states, weights, gate, grad_weights, grad_gate, grad_states, std::nullopt);
        return history_mix_backward_workspace_bytes(args.a, cfg, make_context(backend.c_str(), stream));
      },
      nb::arg("grad_out"), nb::arg("states"), nb::arg("weights"), nb::arg("gate").none(), nb::arg("grad_weights"),
      nb::arg("grad_gate").none(), nb::arg("grad_states"), MHC_EXEC_ARGS,
      "Bytes of workspace history_mix_backward needs for these arguments.");

  m.def(
      "history_mix_backward",
      [](const Array& grad_out, const ArrayList& states, const Array& weights, const OptArray& gate,
         const Array& grad_weights, const OptArray& grad_gate, const OptArrayList& grad_states,
         const OptArray& workspace, const HistoryConfig& cfg, const std::string& backend, Stream stream) {
        MixBackwardArgs args(grad_out, states, weights, gate, grad_weights, grad_gate, grad_states, workspace);
        run(history_mix_backward, args.a, cfg, backend, stream);
      },
      nb::arg("grad_out"), nb::arg("states"), nb::arg("weights"), nb::arg("gate").none(), nb::arg("grad_weights"),
      nb::arg("grad_gate").none(), nb::arg("grad_states"), nb::arg("workspace").none(), MHC_EXEC_ARGS,
      "Backward of history_mix_forward: grad_weights, grad_gate, grad_states (grad_x is grad_out).");

  m.def(
      "history_skip_forward",
      [](const Array& x, const ArrayList& states, const Array& logits, const OptArray& gate, const Array& out,
         const Array& weights, const HistoryConfig& cfg, const std::string& backend, Stream stream) {
        const std::vector<TensorView> state_views = to_views(states, "states");
        HistorySkipForward a;
        a.x = to_view(x, "x");
        a.states = state_views;
        a.logits = to_view(logits, "logits");
        a.gate = to_view(gate, "gate");
        a.out = to_view(out, "out");
        a.weights = to_view(weights, "weights");
        run(history_skip_forward, a, cfg, backend, stream);
      },
      nb::arg("x"), nb::arg("states"), nb::arg("logits"), nb::arg("gate").none(), nb::arg("out"), nb::arg("weights"),
      MHC_EXEC_ARGS, "Fused projection + weighted sum: out = x + gate * sum_k project(logits)[k] * states[k].");

  m.def(
      "history_skip_backward_workspace_bytes",
      [](const Array& grad_out, const ArrayList& states, const Array& logits, const Array& weights,
         const OptArray& gate, const Array& grad_logits, const OptArray& grad_gate, const OptArrayList& grad_states,
         const HistoryConfig& cfg, const std::string& backend, Stream stream) {
        SkipBackwardArgs args(grad_out, states, logits, weights, gate, grad_logits, grad_gate, grad_states,
                              std::nullopt);
        return history_skip_backward_workspace_bytes(args.a, cfg, make_context(backend.c_str(), stream));
      },
      nb::arg("grad_out"), nb::arg("states"), nb::arg("logits"), nb::arg("weights"), nb::arg("gate").none(),
      nb::arg("grad_logits"), nb::arg("grad_gate").none(), nb::arg("grad_states"), MHC_EXEC_ARGS,
      "Bytes of workspace history_skip_backward needs for these arguments.");

  m.def(
      "history_skip_backward",
      [](const Array& grad_out, const ArrayList& states, const Array& logits, const Array& weights,
         const OptArray& gate, const Array& grad_logits, const OptArray& grad_gate, const OptArrayList& grad_states,
         const OptArray& workspace, const HistoryConfig& cfg, const std::string& backend, Stream stream) {
        SkipBackwardArgs args(grad_out, states, logits, weights, gate, grad_logits, grad_gate, grad_states,
                              workspace);
        run(history_skip_backward, args.a, cfg, backend, stream);
      },
      nb::arg("grad_out"), nb::arg("states"), nb::arg("logits"), nb::arg("weights"), nb::arg("gate").none(),
      nb::arg("grad_logits"), nb::arg("grad_gate").none(), nb::arg("grad_states"), nb::arg("workspace").none(),
      MHC_EXEC_ARGS, "Backward of history_skip_forward: grad_logits, grad_gate, grad_states.");
}

}  // namespace mhc::python
