// CPU reference of the multi-history skip ops: plain loops, fp64 accumulation, the textbook
// sort-based sparsemax. The oracle every fast path is tested against; clarity over speed.
#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "common/float_types.hpp"
#include "backend.hpp"
#include "cpu/reference_sinkhorn.hpp"

namespace mhc::cpu_ref {

using detail::dispatch_storage;
using detail::load;
using detail::store;

namespace {

// Reads element i of a coefficient tensor (f32 or f64) as double.
double coef_at(const TensorView& t, std::int64_t i) {
  return t.dtype == DType::f64 ? t.ptr<const double>()[i] : t.ptr<const float>()[i];
}
void coef_set(const TensorView& t, std::int64_t i, double v) {
  if (t.dtype == DType::f64) t.ptr<double>()[i] = v;
  else t.ptr<float>()[i] = static_cast<float>(v);
}
double gate_of(const TensorView& gate) { return gate.present() ? coef_at(gate, 0) : 1.0; }

// Element i of any stream/storage tensor as double.
double value_at(const TensorView& t, std::int64_t i) {
  return dispatch_storage(t.dtype, [&](auto tag) -> double {
    using S = decltype(tag);
    return static_cast<double>(load(t.ptr<const S>(), i));
  });
}
void value_set(const TensorView& t, std::int64_t i, double v) {
  dispatch_storage(t.dtype, [&](auto tag) {
    using S = decltype(tag);
    if constexpr (std::is_same_v<S, double>) t.ptr<double>()[i] = v;
    else store(t.ptr<S>(), i, static_cast<float>(v));
  });
}

// ---- projections of one row / matrix, in double -----------------------------------------------------

void softmax_row(const double* u, double* s, int H) {
  double m = u[0];
  for (int k = 1; k < H; ++k) m = std::max(m, u[k]);
  double sum = 0;
  for (int k = 0; k < H; ++k) sum += (s[k] = std::exp(u[k] - m));
  for (int k = 0; k < H; ++k) s[k] /= sum;
}

// Sparsemax by sorting (Martins & Astudillo 2016): k* = max{k : 1 + k u_(k) > sum_{j<=k} u_(j)}.
void sparsemax_row(const double* u, double* w, int H) {
  std::vector<double> sorted(u, u + H);
  std::sort(sorted.begin(), sorted.end(), std::greater<double>());
  double prefix = 0, tau_sum = 0;
  int support = 0;
  for (int k = 1; k <= H; ++k) {
    prefix += sorted[k - 1];
    if (1.0 + k * sorted[k - 1] > prefix) {
      support = k;
      tau_sum = prefix;
    }
  }
  const double tau = (tau_sum - 1.0) / support;
  for (int k = 0; k < H; ++k) w[k] = std::max(u[k] - tau, 0.0);
}

void project_row(const double* z, double* w, int H, const HistoryConfig& cfg) {
  std::vector<double> u(H);
  for (int k = 0; k < H; ++k) u[k] = z[k] / cfg.temperature;
  switch (cfg.constraint) {
    case Constraint::simplex: sparsemax_row(u.data(), w, H); break;
    case Constraint::softmax: softmax_row(u.data(), w, H); break;
    case Constraint::identity:
      softmax_row(u.data(), w, H);
      for (int k = 0; k < H; ++k) w[k] = (1.0 - cfg.epsilon) * w[k] + (k == 0 ? cfg.epsilon : 0.0);
      break;
    case Constraint::doubly_stochastic: break;  // matrices: see doubly_stochastic below
  }
}

// grad_z of one row given the forward weights w (support of sparsemax) and grad_w.
void project_row_backward(const double* z, const double* w, const double* g, double* grad_z, int H,
                          const HistoryConfig& cfg) {
  const double inv_t = 1.0 / cfg.temperature;
  if (cfg.constraint == Constraint::simplex) {
    double sum = 0;
    int count = 0;
    for (int k = 0; k < H; ++k)
      if (w[k] > 0) {
        sum += g[k];
        ++count;
      }
    const double mean = count ? sum / count : 0.0;
    for (int k = 0; k < H; ++k) grad_z[k] = w[k] > 0 ? (g[k] - mean) * inv_t : 0.0;
    return;
  }
  // softmax and identity: d w / d u = c * (diag(s) - s s^T), c = 1 or (1 - epsilon).
  std::vector<double> u(H), s(H);
  for (int k = 0; k < H; ++k) u[k] = z[k] * inv_t;
  softmax_row(u.data(), s.data(), H);
  const double c = cfg.constraint == Constraint::identity ? 1.0 - cfg.epsilon : 1.0;
  double gs = 0;
  for (int k = 0; k < H; ++k) gs += g[k] * s[k];
  for (int k = 0; k < H; ++k) grad_z[k] = c * s[k] * (g[k] - gs) * inv_t;
}

// The doubly stochastic projection: the reference Sinkhorn (cpu/reference_sinkhorn.hpp) of z / T.
void doubly_stochastic(const double* z, double* out, int H, const HistoryConfig& cfg) {
  std::vector<double> u(z, z + static_cast<std::size_t>(H) * H);
  for (double& v : u) v /= cfg.temperature;
  const auto trace = sinkhorn::sinkhorn_trace(u, H, cfg.sinkhorn_iters, cfg.sinkhorn_eps);
  std::copy(trace.steps.back().begin(), trace.steps.back().end(), out);
}

void doubly_stochastic_backward(const double* z, const double* grad_out, double* grad_z, int H, const HistoryConfig& cfg) {
  std::vector<double> u(z, z + static_cast<std::size_t>(H) * H);
  for (double& v : u) v /= cfg.temperature;
  const auto trace = sinkhorn::sinkhorn_trace(u, H, cfg.sinkhorn_iters, cfg.sinkhorn_eps);
  const auto g = sinkhorn::sinkhorn_trace_backward(trace, std::vector<double>(grad_out, grad_out + u.size()),
                                                   cfg.sinkhorn_eps);
  for (std::size_t e = 0; e < g.size(); ++e) grad_z[e] = g[e] / cfg.temperature;
}

// ---- helpers shared by the mix ops ---------------------------------------------------------------------

std::int64_t state_numel(std::span<const TensorView> states) { return states[0].numel(); }

}  // namespace

// ---- projection -----------------------------------------------------------------------------------

void project_logits_forward(const ProjectLogitsForward& a, const HistoryConfig& cfg, const Context&) {
  const int H = static_cast<int>(a.logits.shape[a.logits.rank - 1]);
  const std::int64_t block = cfg.constraint == Constraint::doubly_stochastic ? std::int64_t(H) * H : H;
  const std::int64_t rows = block ? a.logits.numel() / block : 0;
  std::vector<double> z(block), w(block);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t i = 0; i < block; ++i) z[i] = coef_at(a.logits, r * block + i);
    if (cfg.constraint == Constraint::doubly_stochastic) doubly_stochastic(z.data(), w.data(), H, cfg);
    else project_row(z.data(), w.data(), H, cfg);
    for (std::int64_t i = 0; i < block; ++i) coef_set(a.weights, r * block + i, w[i]);
  }
}

void project_logits_backward(const ProjectLogitsBackward& a, const HistoryConfig& cfg, const Context&) {
  const int H = static_cast<int>(a.logits.shape[a.logits.rank - 1]);
  const std::int64_t block = cfg.constraint == Constraint::doubly_stochastic ? std::int64_t(H) * H : H;
  const std::int64_t rows = block ? a.logits.numel() / block : 0;
  std::vector<double> z(block), w(block), g(block), gz(block);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t i = 0; i < block; ++i) {
      z[i] = coef_at(a.logits, r * block + i);
      w[i] = coef_at(a.weights, r * block + i);
      g[i] = coef_at(a.grad_weights, r * block + i);
    }
    if (cfg.constraint == Constraint::doubly_stochastic) doubly_stochastic_backward(z.data(), g.data(), gz.data(), H, cfg);
    else project_row_backward(z.data(), w.data(), g.data(), gz.data(), H, cfg);
    for (std::int64_t i = 0; i < block; ++i) coef_set(a.grad_logits, r * block + i, gz[i]);
  }
}

// ---- mix ------------------------------------------------------------------------------------------

void history_mix_forward(const HistoryMixForward& a, const HistoryConfig&, const Context&) {
  const int H = static_cast<int>(a.states.size());
  const std::int64_t R = a.weights.rank == 2 ? a.weights.shape[0] : 1, N = state_numel(a.states);
  const double gate = gate_of(a.gate);
  for (std::int64_t r = 0; r < R; ++r)
    for (std::int64_t n = 0; n < N; ++n) {
      double sum = 0;
      for (int k = 0; k < H; ++k) {
        const double w = coef_at(a.weights, r * H + k);
        if (w != 0) sum += w * value_at(a.states[k], n);  // zero weights: the state is not read
      }
      const double base = a.x.present() ? value_at(a.x, r * N + n) : 0.0;
      value_set(a.out, r * N + n, base + gate * sum);
    }
}

std::size_t history_mix_backward_workspace_bytes(const HistoryMixBackward&, const HistoryConfig&, const Context&) {
  return 0;
}

void history_mix_backward(const HistoryMixBackward& a, const HistoryConfig&, const Context&) {
  const int H = static_cast<int>(a.states.size());
  const std::int64_t R = a.weights.rank == 2 ? a.weights.shape[0] : 1, N = state_numel(a.states);
  const double gate = gate_of(a.gate);
  double grad_gate = 0;
  for (std::int64_t r = 0; r < R; ++r)
    for (int k = 0; k < H; ++k) {
      double dot = 0;
      for (std::int64_t n = 0; n < N; ++n) dot += value_at(a.grad_out, r * N + n) * value_at(a.states[k], n);
      coef_set(a.grad_weights, r * H + k, gate * dot);
      const double w = coef_at(a.weights, r * H + k);
      if (w != 0) grad_gate += w * dot;
    }
  if (a.grad_gate.present()) coef_set(a.grad_gate, 0, grad_gate);
  if (!a.grad_states.empty())
    for (int k = 0; k < H; ++k)
      for (std::int64_t n = 0; n < N && a.grad_states[k].present(); ++n) {
        double sum = 0;
        for (std::int64_t r = 0; r < R; ++r) sum += coef_at(a.weights, r * H + k) * value_at(a.grad_out, r * N + n);
        value_set(a.grad_states[k], n, gate * sum);
      }
}

// ---- fused skip -----------------------------------------------------------------------------------

void history_skip_forward(const HistorySkipForward& a, const HistoryConfig& cfg, const Context&) {
  const int H = static_cast<int>(a.states.size());
  const std::int64_t N = state_numel(a.states);
  std::vector<double> z(H), w(H);
  for (int k = 0; k < H; ++k) z[k] = coef_at(a.logits, k);
  project_row(z.data(), w.data(), H, cfg);
  for (int k = 0; k < H; ++k) coef_set(a.weights, k, w[k]);
  const double gate = gate_of(a.gate);
  for (std::int64_t n = 0; n < N; ++n) {
    double sum = 0;
    for (int k = 0; k < H; ++k)
      if (w[k] != 0) sum += w[k] * value_at(a.states[k], n);
    value_set(a.out, n, value_at(a.x, n) + gate * sum);
  }
}

std::size_t history_skip_backward_workspace_bytes(const HistorySkipBackward&, const HistoryConfig&, const Context&) {
  return 0;
}

void history_skip_backward(const HistorySkipBackward& a, const HistoryConfig& cfg, const Context&) {
  const int H = static_cast<int>(a.states.size());
  const std::int64_t N = state_numel(a.states);
  const double gate = gate_of(a.gate);
  std::vector<double> z(H), w(H), grad_w(H, 0.0), grad_z(H);
  double grad_gate = 0;
  for (int k = 0; k < H; ++k) {
    z[k] = coef_at(a.logits, k);
    w[k] = coef_at(a.weights, k);
    if (w[k] == 0) continue;  // its logit's gradient is exactly zero: the state is not read
    double dot = 0;
    for (std::int64_t n = 0; n < N; ++n) dot += value_at(a.grad_out, n) * value_at(a.states[k], n);
    grad_w[k] = gate * dot;
    grad_gate += w[k] * dot;
  }
  project_row_backward(z.data(), w.data(), grad_w.data(), grad_z.data(), H, cfg);
  for (int k = 0; k < H; ++k) coef_set(a.grad_logits, k, grad_z[k]);
  if (a.grad_gate.present()) coef_set(a.grad_gate, 0, grad_gate);
  if (!a.grad_states.empty())
    for (int k = 0; k < H; ++k)
      if (a.grad_states[k].present())
        for (std::int64_t n = 0; n < N; ++n) value_set(a.grad_states[k], n, gate * w[k] * value_at(a.grad_out, n));
}

}  // namespace mhc::cpu_ref
