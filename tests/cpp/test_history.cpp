// Multi-history skip ops on the CPU: the fast backend against the fp64 reference on fresh random
// inputs (several shapes, odd sizes, every dtype pair), the reference against finite differences,
// the manifold properties of each projection, the zero-weight rule, and argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "mhc/history.hpp"
#include "test_util.hpp"

namespace mhc::history_test {
namespace {

using test::close_elementwise;
using test::coef_of;
using test::history_tol;
using test::kFast;
using test::kRef;
using test::logits_shape;
using test::MixInputs;
using test::poisoned_tensor;
using test::random_states;
using test::random_tensor;
using test::SkipInputs;
using test::StoragePair;
using test::throws;
using test::Tensor;
using test::views;

HistoryConfig config_of(Constraint c, float temperature = 0.7f, float epsilon = 0.15f) {
  HistoryConfig cfg;
  cfg.constraint = c;
  cfg.temperature = temperature;
  cfg.epsilon = epsilon;
  cfg.sinkhorn_iters = 7;
  return cfg;
}

const Constraint kVectorConstraints[] = {Constraint::simplex, Constraint::softmax, Constraint::identity};
const Constraint kAllConstraints[] = {Constraint::simplex, Constraint::softmax, Constraint::identity,
                                      Constraint::doubly_stochastic};

// ---- projections ----------------------------------------------------------------------------------

TEST(ProjectLogits, FastMatchesReferenceAndStaysOnTheManifold) {
  std::mt19937 rng(1);
  for (Constraint c : kAllConstraints)
    for (DType dt : {DType::f32, DType::f64})
      for (std::int64_t H : {1, 2, 5, 8, 33})
        for (std::int64_t R : {1, 3, 7}) {
          if (c == Constraint::doubly_stochastic && H > 8) continue;
          const HistoryConfig cfg = config_of(c);
          Tensor logits = random_tensor(dt, logits_shape(c, R, H), rng, -2.0, 2.0);
          Tensor ref = poisoned_tensor(dt, logits.shape()), fast = poisoned_tensor(dt, logits.shape());
          project_logits_forward({logits.view(), ref.view()}, cfg, kRef);
          project_logits_forward({logits.view(), fast.view()}, cfg, kFast);
          const std::string what = std::string(constraint_name(c)) + " " + dtype_name(dt) + " H=" +
                                   std::to_string(H) + " R=" + std::to_string(R);
          EXPECT_TRUE(
              close_elementwise(what, fast, ref, dt == DType::f64 ? 1e-12 : 1e-5, dt == DType::f64 ? 1e-13 : 1e-6));
          // On the manifold: non-negative, rows (and columns for Sinkhorn) sum to 1.
          const std::int64_t rows = c == Constraint::doubly_stochastic ? R * H : R;
          for (std::int64_t r = 0; r < rows; ++r) {
            double sum = 0;
            for (std::int64_t k = 0; k < H; ++k) {
              const double v = ref.get(r * H + k);
              EXPECT_GE(v, 0.0) << what;
              sum += v;
            }
            // Sinkhorn ends on a column normalisation; 7 iterations leave rows approximate.
            EXPECT_NEAR(sum, 1.0, c == Constraint::doubly_stochastic ? 5e-2 : 1e-6) << what;
          }
          if (c == Constraint::doubly_stochastic)
            for (std::int64_t m = 0; m < R; ++m)
              for (std::int64_t j = 0; j < H; ++j) {
                double col = 0;
                for (std::int64_t i = 0; i < H; ++i) col += ref.get(m * H * H + i * H + j);
                EXPECT_NEAR(col, 1.0, 1e-5) << what;
              }
          if (c == Constraint::identity)
            for (std::int64_t r = 0; r < R; ++r) EXPECT_GE(ref.get(r * H), cfg.epsilon - 1e-7) << what;
        }
}

TEST(ProjectLogits, SinkhornColumnsSumToOne) {
  std::mt19937 rng(2);
  HistoryConfig cfg = config_of(Constraint::doubly_stochastic, 1.0f);
  cfg.sinkhorn_iters = 30;
  Tensor logits = random_tensor(DType::f64, {2, 5, 5}, rng), w = poisoned_tensor(DType::f64, {2, 5, 5});
  project_logits_forward({logits.view(), w.view()}, cfg, kRef);
  for (int m = 0; m < 2; ++m)
    for (int j = 0; j < 5; ++j) {
      double col = 0;
      for (int i = 0; i < 5; ++i) col += w.get(m * 25 + i * 5 + j);
      EXPECT_NEAR(col, 1.0, 1e-5);
    }
}

TEST(ProjectLogits, SparsemaxMakesExactZerosAndMatchesTheClosedForm) {
  HistoryConfig cfg = config_of(Constraint::simplex, 1.0f);
  Tensor logits = poisoned_tensor(DType::f32, {2, 4}), ref = poisoned_tensor(DType::f32, {2, 4}),
         fast = poisoned_tensor(DType::f32, {2, 4});
  const double z[8] = {3.0, 1.0, 0.2, -1.0,   // one-hot: margin >= 1
                       0.5, 0.0, 0.0, -0.4};  // support {0, 1, 2}: tau = (0.5 - 1) / 3
  for (int i = 0; i < 8; ++i) logits.set(i, z[i]);
  project_logits_forward({logits.view(), ref.view()}, cfg, kRef);
  project_logits_forward({logits.view(), fast.view()}, cfg, kFast);
  const double want[8] = {1, 0, 0, 0, 0.5 + 1.0 / 6, 1.0 / 6, 1.0 / 6, 0};
  for (int i = 0; i < 8; ++i) {
    EXPECT_NEAR(ref.get(i), want[i], 1e-7) << i;
    EXPECT_NEAR(fast.get(i), want[i], 1e-7) << i;
    if (want[i] == 0) {
      EXPECT_EQ(ref.get(i), 0.0) << i;  // exactly zero, not tiny
      EXPECT_EQ(fast.get(i), 0.0) << i;
    }
  }
}

TEST(ProjectLogits, TiesMatchTheSortedFormula) {
  // Ties at the support boundary: the sort-free fast path must agree with the sort-based reference.
  HistoryConfig cfg = config_of(Constraint::simplex, 1.0f);
  Tensor logits = poisoned_tensor(DType::f64, {3, 5}), ref = poisoned_tensor(DType::f64, {3, 5}),
         fast = poisoned_tensor(DType::f64, {3, 5});
  const double z[15] = {1, 1, 1, 1, 1, 0.5, 0.5, 0, 0, -3, 2, 1, 1, 1, 0.25};
  for (int i = 0; i < 15; ++i) logits.set(i, z[i]);
  project_logits_forward({logits.view(), ref.view()}, cfg, kRef);
  project_logits_forward({logits.view(), fast.view()}, cfg, kFast);
  EXPECT_TRUE(close_elementwise("ties", fast, ref, 1e-14, 1e-15));
  for (int k = 0; k < 5; ++k) EXPECT_NEAR(ref.get(k), 0.2, 1e-15);
}

// d/dz of sum(g * project(z)) by central differences, fp64 reference.
TEST(ProjectLogits, BackwardMatchesFiniteDifferences) {
  std::mt19937 rng(3);
  for (Constraint c : kAllConstraints)
    for (std::int64_t H : {1, 3, 6}) {
      const HistoryConfig cfg = config_of(c);
      const std::int64_t R = 2;
      Tensor logits = random_tensor(DType::f64, logits_shape(c, R, H), rng, -1.5, 1.5);
      const Tensor g = random_tensor(DType::f64, logits.shape(), rng);
      Tensor w = poisoned_tensor(DType::f64, logits.shape());
      project_logits_forward({logits.view(), w.view()}, cfg, kRef);
      Tensor ref = poisoned_tensor(DType::f64, logits.shape()), fast = poisoned_tensor(DType::f64, logits.shape());
      project_logits_backward({logits.view(), w.view(), g.view(), ref.view()}, cfg, kRef);
      project_logits_backward({logits.view(), w.view(), g.view(), fast.view()}, cfg, kFast);
      const std::string what = std::string(constraint_name(c)) + " H=" + std::to_string(H);
      EXPECT_TRUE(close_elementwise(what + " fast", fast, ref, 1e-10, 1e-12));
      const double h = 1e-6;
      for (std::int64_t i = 0; i < logits.numel(); ++i) {
        auto loss = [&](double dz) {
          Tensor zz = logits, ww = poisoned_tensor(DType::f64, logits.shape());
          zz.set(i, logits.get(i) + dz);
          project_logits_forward({zz.view(), ww.view()}, cfg, kRef);
          double s = 0;
          for (std::int64_t j = 0; j < ww.numel(); ++j) s += g.get(j) * ww.get(j);
          return s;
        };
        const double fd = (loss(h) - loss(-h)) / (2 * h);
        EXPECT_NEAR(ref.get(i), fd, 1e-6) << what << " [" << i << "]";
      }
    }
}

// ---- mix ------------------------------------------------------------------------------------------

using MixCase = test::MixSpec;

std::vector<MixCase> mix_cases() {
  std::vector<MixCase> cases;
  for (const StoragePair& p : test::kStoragePairs) {
    cases.push_back({p, 4, 0, {2, 3, 5}, true, false});
    cases.push_back({p, 1, 0, {7}, true, true});
    cases.push_back({p, 5, 0, {3, 2049}, true, true});
    cases.push_back({p, 3, 3, {1, 613}, false, true});
    cases.push_back({p, 2, 4, {5, 5}, true, false});
  }
  return cases;
}

TEST(HistoryMix, ForwardFastMatchesReference) {
  std::mt19937 rng(4);
  for (const MixCase& c : mix_cases()) {
    const MixInputs m(c, rng);
    const auto sv = views(m.states);
    Tensor ref = poisoned_tensor(c.pair.stream, m.out_shape), fast = poisoned_tensor(c.pair.stream, m.out_shape);
    HistoryMixForward a{c.with_x ? m.x.view() : TensorView::absent(), sv, m.weights.view(),
                        c.with_gate ? m.gate.view() : TensorView::absent(), ref.view()};
    history_mix_forward(a, {}, kRef);
    a.out = fast.view();
    history_mix_forward(a, {}, kFast);
    const std::string what = test::pair_name(c.pair) + " H=" + std::to_string(c.H) + " R=" + std::to_string(c.R);
    EXPECT_TRUE(close_elementwise(what, fast, ref, history_tol(c.pair.stream), history_tol(c.pair.stream)));
    // Spot-check the reference against the formula itself.
    const std::int64_t N = m.states[0].numel(), R = c.R ? c.R : 1;
    for (std::int64_t r = 0; r < R; ++r) {
      const std::int64_t n = (r * 7 + 3) % N;
      double want = c.with_x ? m.x.get(r * N + n) : 0.0, sum = 0;
      for (int k = 0; k < c.H; ++k) sum += m.weights.get(r * c.H + k) * m.states[k].get(n);
      want += (c.with_gate ? m.gate.get(0) : 1.0) * sum;
      EXPECT_NEAR(ref.get(r * N + n), want, 4 * history_tol(c.pair.stream) * (1 + std::abs(want))) << what;
    }
  }
}

TEST(HistoryMix, BackwardFastMatchesReference) {
  std::mt19937 rng(5);
  for (const MixCase& c : mix_cases()) {
    const MixInputs m(c, rng);
    const auto sv = views(m.states);
    const DType coef = coef_of(c.pair.stream);
    Tensor grad_out = random_tensor(c.pair.stream, m.out_shape, rng);
    struct Outs {
      Tensor gw, gg;
      std::vector<Tensor> gs;
    } out[2];
    for (int b = 0; b < 2; ++b) {
      const Context& ctx = b ? kFast : kRef;
      out[b].gw = poisoned_tensor(coef, m.weights.shape());
      out[b].gg = poisoned_tensor(coef, {1});
      out[b].gs = test::poisoned_states(c.H, c.pair.storage, c.shape);
      const auto gsv = views(out[b].gs);
      HistoryMixBackward a{.grad_out = grad_out.view(),
                           .states = sv,
                           .weights = m.weights.view(),
                           .gate = c.with_gate ? m.gate.view() : TensorView::absent(),
                           .grad_weights = out[b].gw.view(),
                           .grad_gate = c.with_gate ? out[b].gg.view() : TensorView::absent(),
                           .grad_states = gsv};
      const Tensor ws = test::make_workspace(history_mix_backward_workspace_bytes(a, {}, ctx));
      a.workspace = ws.view();
      history_mix_backward(a, {}, ctx);
    }
    const std::string what = test::pair_name(c.pair) + " H=" + std::to_string(c.H) + " R=" + std::to_string(c.R);
    // Dot products over N elements: tolerance relative to their scale.
    const double dot_scale = std::sqrt(static_cast<double>(m.states[0].numel()));
    const double coef_tol = c.pair.stream == DType::f64 ? 1e-12 : 1e-5;
    EXPECT_TRUE(close_elementwise(what + " grad_weights", out[1].gw, out[0].gw, coef_tol, coef_tol * dot_scale));
    if (c.with_gate)
      EXPECT_TRUE(close_elementwise(what + " grad_gate", out[1].gg, out[0].gg, coef_tol, coef_tol * dot_scale));
    for (int k = 0; k < c.H; ++k)
      EXPECT_TRUE(close_elementwise(what + " grad_states[" + std::to_string(k) + "]", out[1].gs[k], out[0].gs[k],
                                    history_tol(c.pair.storage), history_tol(c.pair.storage)));
  }
}

TEST(HistoryMix, LargeInputsTakeTheThreadedPath) {
  // Above the fast path's threading threshold (N * (H + 2) > 2^21 element reads): compared with the
  // reference like the small cases, forward and backward.
  std::mt19937 rng(13);
  MixCase c{{DType::f32, DType::bf16}, 4, 0, {3, 1 << 17}, true, true};
  const MixInputs m(c, rng);
  const auto sv = views(m.states);
  Tensor ref = poisoned_tensor(DType::f32, m.out_shape), fast = poisoned_tensor(DType::f32, m.out_shape);
  HistoryMixForward a{m.x.view(), sv, m.weights.view(), m.gate.view(), ref.view()};
  history_mix_forward(a, {}, kRef);
  a.out = fast.view();
  history_mix_forward(a, {}, kFast);
  EXPECT_TRUE(close_elementwise("threaded forward", fast, ref, 2e-5, 2e-5));
  Tensor grad_out = random_tensor(DType::f32, m.out_shape, rng);
  Tensor gw[2] = {poisoned_tensor(DType::f32, {4}), poisoned_tensor(DType::f32, {4})};
  for (int b = 0; b < 2; ++b) {
    const Context& ctx = b ? kFast : kRef;
    HistoryMixBackward back{
        .grad_out = grad_out.view(), .states = sv, .weights = m.weights.view(), .grad_weights = gw[b].view()};
    const Tensor ws = test::make_workspace(history_mix_backward_workspace_bytes(back, {}, ctx));
    back.workspace = ws.view();
    history_mix_backward(back, {}, ctx);
  }
  EXPECT_TRUE(close_elementwise("threaded backward", gw[1], gw[0], 1e-5, 1e-5 * std::sqrt(3.0 * (1 << 17))));
}

TEST(HistoryMix, AbsentGradStatesAreNotWrittenAndTheRestUnchanged) {
  // Detached states: their gradient buffers are absent; the others come out as with every buffer given.
  std::mt19937 rng(14);
  for (const Context& ctx : {kRef, kFast}) {
    MixCase c{{DType::f32, DType::f32}, 3, 0, {5, 37}, true, true};
    const MixInputs m(c, rng);
    const auto sv = views(m.states);
    Tensor grad_out = random_tensor(DType::f32, m.out_shape, rng);
    std::vector<Tensor> full = test::poisoned_states(3, DType::f32, c.shape),
                        part = test::poisoned_states(3, DType::f32, c.shape);
    Tensor gw = poisoned_tensor(DType::f32, {3}), gw2 = poisoned_tensor(DType::f32, {3});
    auto run = [&](std::vector<Tensor>& outs, Tensor& grad_w, bool partial) {
      std::vector<TensorView> gsv = views(outs);
      if (partial) gsv[1] = TensorView::absent();
      HistoryMixBackward b{.grad_out = grad_out.view(),
                           .states = sv,
                           .weights = m.weights.view(),
                           .gate = m.gate.view(),
                           .grad_weights = grad_w.view(),
                           .grad_states = gsv};
      const Tensor ws = test::make_workspace(history_mix_backward_workspace_bytes(b, {}, ctx));
      b.workspace = ws.view();
      history_mix_backward(b, {}, ctx);
    };
    run(full, gw, false);
    run(part, gw2, true);
    EXPECT_TRUE(close_elementwise("grad_weights", gw2, gw, 0, 0));
    EXPECT_TRUE(close_elementwise("grad_states[0]", part[0], full[0], 0, 0));
    EXPECT_TRUE(close_elementwise("grad_states[2]", part[2], full[2], 0, 0));
    for (std::int64_t i = 0; i < part[1].numel(); ++i) ASSERT_TRUE(std::isnan(part[1].get(i)));  // untouched
  }
}

// Gradients of L = sum(grad_out * out) by central differences, fp64 reference.
TEST(HistoryMix, BackwardMatchesFiniteDifferences) {
  std::mt19937 rng(6);
  for (std::int64_t R : {0, 2}) {
    MixCase c{{DType::f64, DType::f64}, 3, R, {2, 3}, true, true};
    MixInputs m(c, rng);
    Tensor grad_out = random_tensor(DType::f64, m.out_shape, rng);
    auto loss = [&]() {
      Tensor out = poisoned_tensor(DType::f64, m.out_shape);
      const auto sv = views(m.states);
      history_mix_forward({m.x.view(), sv, m.weights.view(), m.gate.view(), out.view()}, {}, kRef);
      double s = 0;
      for (std::int64_t i = 0; i < out.numel(); ++i) s += grad_out.get(i) * out.get(i);
      return s;
    };
    Tensor gw = poisoned_tensor(DType::f64, m.weights.shape()), gg = poisoned_tensor(DType::f64, {1});
    std::vector<Tensor> gs = test::poisoned_states(c.H, DType::f64, c.shape);
    const auto sv = views(m.states);
    const auto gsv = views(gs);
    HistoryMixBackward a{.grad_out = grad_out.view(),
                         .states = sv,
                         .weights = m.weights.view(),
                         .gate = m.gate.view(),
                         .grad_weights = gw.view(),
                         .grad_gate = gg.view(),
                         .grad_states = gsv};
    history_mix_backward(a, {}, kRef);
    auto fd = [&](Tensor& param, std::int64_t i) { return test::central_difference(param, i, loss); };
    for (std::int64_t i = 0; i < m.weights.numel(); ++i) EXPECT_NEAR(gw.get(i), fd(m.weights, i), 1e-7) << i;
    EXPECT_NEAR(gg.get(0), fd(m.gate, 0), 1e-7);
    for (int k = 0; k < c.H; ++k)
      for (std::int64_t i = 0; i < gs[k].numel(); ++i) EXPECT_NEAR(gs[k].get(i), fd(m.states[k], i), 1e-7);
  }
}

TEST(HistoryMix, ZeroWeightStatesAreNotRead) {
  std::mt19937 rng(7);
  for (const Context& ctx : {kRef, kFast}) {
    auto states = random_states(3, DType::f32, {64}, rng);
    for (std::int64_t i = 0; i < 64; ++i) states[2].set(i, std::numeric_limits<double>::quiet_NaN());
    Tensor x = random_tensor(DType::f32, {64}, rng), w = poisoned_tensor(DType::f32, {3}),
           out = poisoned_tensor(DType::f32, {64});
    w.set(0, 0.0);
    w.set(1, 1.0);
    w.set(2, 0.0);
    const auto sv = views(states);
    history_mix_forward({x.view(), sv, w.view(), TensorView::absent(), out.view()}, {}, ctx);
    for (std::int64_t i = 0; i < 64; ++i)
      EXPECT_FLOAT_EQ(out.get(i), static_cast<float>(x.get(i) + states[1].get(i))) << i;  // a residual add
  }
}

// ---- fused skip -----------------------------------------------------------------------------------

TEST(HistorySkip, FusedMatchesProjectThenMix) {
  std::mt19937 rng(8);
  for (Constraint con : kVectorConstraints)
    for (const StoragePair& p : test::kStoragePairs)
      for (int H : {1, 4, 9}) {
        const HistoryConfig cfg = config_of(con);
        const std::vector<std::int64_t> shape{3, 1031};
        const SkipInputs in(p, H, shape, rng, 1.5, 1.3);
        const Tensor &x = in.x, &logits = in.logits, &gate = in.gate;
        const auto sv = views(in.states);
        const DType coef = coef_of(p.stream);
        // Reference composition: project, then mix.
        Tensor w_ref = poisoned_tensor(coef, {H}), out_ref = poisoned_tensor(p.stream, shape);
        Tensor logits2 = poisoned_tensor(coef, {1, H});
        for (int k = 0; k < H; ++k) logits2.set(k, logits.get(k));
        Tensor w2 = poisoned_tensor(coef, {1, H});
        project_logits_forward({logits2.view(), w2.view()}, cfg, kRef);
        for (int k = 0; k < H; ++k) w_ref.set(k, w2.get(k));
        history_mix_forward({x.view(), sv, w_ref.view(), gate.view(), out_ref.view()}, cfg, kRef);
        const std::string what =
            std::string(constraint_name(con)) + " " + test::pair_name(p) + " H=" + std::to_string(H);
        for (const Context& ctx : {kRef, kFast}) {
          Tensor w = poisoned_tensor(coef, {H}), out = poisoned_tensor(p.stream, shape);
          history_skip_forward({x.view(), sv, logits.view(), gate.view(), out.view(), w.view()}, cfg, ctx);
          EXPECT_TRUE(close_elementwise(what + " weights", w, w_ref, p.stream == DType::f64 ? 1e-12 : 1e-6, 1e-7));
          EXPECT_TRUE(close_elementwise(what + " out", out, out_ref, history_tol(p.stream), history_tol(p.stream)));
        }
      }
}

TEST(HistorySkip, BackwardMatchesFiniteDifferencesAndFast) {
  std::mt19937 rng(9);
  for (Constraint con : kVectorConstraints)
    for (int H : {1, 3, 6}) {
      HistoryConfig cfg = config_of(con);
      const std::vector<std::int64_t> shape{4, 3};
      SkipInputs in({DType::f64, DType::f64}, H, shape, rng, 1.0, 0.9);  // perturbed by the differences below
      std::vector<Tensor>& states = in.states;
      Tensor &x = in.x, &logits = in.logits, &gate = in.gate;
      const Tensor grad_out = random_tensor(DType::f64, shape, rng);
      auto forward = [&](Tensor* w_out) {
        Tensor w = poisoned_tensor(DType::f64, {H}), out = poisoned_tensor(DType::f64, shape);
        const auto sv = views(states);
        history_skip_forward({x.view(), sv, logits.view(), gate.view(), out.view(), w.view()}, cfg, kRef);
        if (w_out) *w_out = w;
        double s = 0;
        for (std::int64_t i = 0; i < out.numel(); ++i) s += grad_out.get(i) * out.get(i);
        return s;
      };
      Tensor w;
      forward(&w);
      struct Outs {
        Tensor gz, gg;
        std::vector<Tensor> gs;
      } out[2];
      const auto sv = views(states);
      for (int b = 0; b < 2; ++b) {
        const Context& ctx = b ? kFast : kRef;
        out[b].gz = poisoned_tensor(DType::f64, {H});
        out[b].gg = poisoned_tensor(DType::f64, {1});
        out[b].gs = test::poisoned_states(H, DType::f64, shape);
        const auto gsv = views(out[b].gs);
        HistorySkipBackward a{.grad_out = grad_out.view(),
                              .states = sv,
                              .logits = logits.view(),
                              .weights = w.view(),
                              .gate = gate.view(),
                              .grad_logits = out[b].gz.view(),
                              .grad_gate = out[b].gg.view(),
                              .grad_states = gsv};
        const Tensor ws = test::make_workspace(history_skip_backward_workspace_bytes(a, cfg, ctx));
        a.workspace = ws.view();
        history_skip_backward(a, cfg, ctx);
      }
      const std::string what = std::string(constraint_name(con)) + " H=" + std::to_string(H);
      EXPECT_TRUE(close_elementwise(what + " fast grad_logits", out[1].gz, out[0].gz, 1e-10, 1e-12));
      EXPECT_TRUE(close_elementwise(what + " fast grad_gate", out[1].gg, out[0].gg, 1e-10, 1e-12));
      auto fd = [&](Tensor& param, std::int64_t i) {
        return test::central_difference(param, i, [&] { return forward(nullptr); });
      };
      for (int k = 0; k < H; ++k) EXPECT_NEAR(out[0].gz.get(k), fd(logits, k), 1e-6) << what << " logit " << k;
      EXPECT_NEAR(out[0].gg.get(0), fd(gate, 0), 1e-6) << what;
      for (int k = 0; k < H; ++k)
        for (std::int64_t i = 0; i < states[k].numel(); ++i)
          EXPECT_NEAR(out[0].gs[k].get(i), fd(states[k], i), 1e-6) << what << " state " << k;
    }
}

TEST(HistorySkip, OneHotSimplexReadsOnlyTheChosenState) {
  // Logits with a margin >= 1 make sparsemax one-hot: the output is a residual add, and the states
  // with zero weight (NaN-filled here) are read neither forward nor backward.
  std::mt19937 rng(10);
  const HistoryConfig cfg = config_of(Constraint::simplex, 1.0f);
  for (const Context& ctx : {kRef, kFast}) {
    auto states = random_states(4, DType::bf16, {300}, rng);
    for (int k : {0, 2, 3})
      for (std::int64_t i = 0; i < 300; ++i) states[k].set(i, std::numeric_limits<double>::quiet_NaN());
    Tensor x = random_tensor(DType::f32, {300}, rng), logits = poisoned_tensor(DType::f32, {4}),
           w = poisoned_tensor(DType::f32, {4}), out = poisoned_tensor(DType::f32, {300});
    const double z[4] = {0.1, 2.0, -0.5, 0.3};
    for (int k = 0; k < 4; ++k) logits.set(k, z[k]);
    const auto sv = views(states);
    history_skip_forward({x.view(), sv, logits.view(), TensorView::absent(), out.view(), w.view()}, cfg, ctx);
    EXPECT_EQ(w.get(1), 1.0);
    for (std::int64_t i = 0; i < 300; ++i)
      EXPECT_FLOAT_EQ(out.get(i), static_cast<float>(x.get(i) + states[1].get(i)));
    Tensor grad_out = random_tensor(DType::f32, {300}, rng), gz = poisoned_tensor(DType::f32, {4});
    HistorySkipBackward a{.grad_out = grad_out.view(),
                          .states = sv,
                          .logits = logits.view(),
                          .weights = w.view(),
                          .grad_logits = gz.view()};
    const Tensor ws = test::make_workspace(history_skip_backward_workspace_bytes(a, cfg, ctx));
    a.workspace = ws.view();
    history_skip_backward(a, cfg, ctx);
    for (int k = 0; k < 4; ++k) EXPECT_EQ(gz.get(k), 0.0) << k;  // a vertex of the simplex: zero Jacobian
  }
}

// ---- errors ---------------------------------------------------------------------------------------

TEST(HistoryErrors, BadArgumentsNameTheArgument) {
  std::mt19937 rng(11);
  auto states = random_states(3, DType::f32, {4, 5}, rng);
  Tensor odd = random_tensor(DType::f32, {4, 6}, rng);
  Tensor x = random_tensor(DType::f32, {4, 5}, rng), w = random_tensor(DType::f32, {3}, rng);
  Tensor out = poisoned_tensor(DType::f32, {4, 5}), w2 = poisoned_tensor(DType::f32, {2});
  auto sv = views(states);
  EXPECT_TRUE(throws<InvalidArgument>(
      [&] {
        std::vector<TensorView> bad = sv;
        bad[2] = odd.view();
        history_mix_forward({x.view(), bad, w.view(), {}, out.view()}, {});
      },
      "states[2]"));
  EXPECT_TRUE(throws<InvalidArgument>(
      [&] {
        history_mix_forward({x.view(), sv, w2.view(), {}, out.view()}, {});
      },
      "weights"));
  EXPECT_TRUE(throws<InvalidArgument>(
      [&] {
        history_mix_forward({x.view(), {}, w.view(), {}, out.view()}, {});
      },
      "states"));
  Tensor out64 = poisoned_tensor(DType::f64, {4, 5});
  EXPECT_TRUE(throws<DTypeError>([&] { history_mix_forward({{}, sv, w.view(), {}, out64.view()}, {}); }, "states"));
  HistoryConfig cfg;
  cfg.temperature = 0.0f;
  Tensor logits = random_tensor(DType::f32, {3}, rng), wo = poisoned_tensor(DType::f32, {3});
  EXPECT_TRUE(throws<InvalidArgument>(
      [&] {
        history_skip_forward({x.view(), sv, logits.view(), {}, out.view(), wo.view()}, cfg);
      },
      "temperature"));
  cfg = {};
  cfg.constraint = Constraint::doubly_stochastic;
  EXPECT_TRUE(throws<InvalidArgument>(
      [&] {
        history_skip_forward({x.view(), sv, logits.view(), {}, out.view(), wo.view()}, cfg);
      },
      "constraint"));
  Tensor notsquare = poisoned_tensor(DType::f32, {2, 3, 4}), nsw = poisoned_tensor(DType::f32, {2, 3, 4});
  EXPECT_TRUE(throws<InvalidArgument>([&] { project_logits_forward({notsquare.view(), nsw.view()}, cfg); }, "logits"));
  Tensor half = poisoned_tensor(DType::f16, {3}), halfw = poisoned_tensor(DType::f16, {3});
  EXPECT_TRUE(throws<DTypeError>([&] { project_logits_forward({half.view(), halfw.view()}, {}); }, "logits"));
  Tensor grad_w = poisoned_tensor(DType::f32, {3}), grad_gate = poisoned_tensor(DType::f32, {1});
  HistoryMixBackward b{.grad_out = out.view(),
                       .states = sv,
                       .weights = w.view(),
                       .grad_weights = grad_w.view(),
                       .grad_gate = grad_gate.view()};
  EXPECT_TRUE(throws<InvalidArgument>([&] { history_mix_backward(b, {}); }, "grad_gate"));
  b.grad_gate = {};
  EXPECT_TRUE(throws<InvalidArgument>([&] { history_mix_backward(b, {}, kFast); }, "workspace"));
  EXPECT_THROW(parse_constraint("orthogonal"), InvalidArgument);
  EXPECT_EQ(parse_constraint("sparsemax"), Constraint::simplex);
}

TEST(HistoryErrors, NanPolicyCheckNamesTheTensor) {
  std::mt19937 rng(12);
  auto states = random_states(2, DType::f32, {8}, rng);
  states[1].set(3, std::numeric_limits<double>::infinity());
  Tensor x = random_tensor(DType::f32, {8}, rng), w = random_tensor(DType::f32, {2}, rng);
  Tensor out = poisoned_tensor(DType::f32, {8});
  HistoryConfig cfg;
  cfg.nan_policy = NanPolicy::check;
  const auto sv = views(states);
  EXPECT_TRUE(throws<NonFiniteError>([&] { history_mix_forward({x.view(), sv, w.view(), {}, out.view()}, cfg); },
                               "states[1]"));
}

// An output over an input (or another output) is refused; out over x itself is elementwise and allowed.
TEST(HistoryErrors, OutputsOverlappingInputsAreRefused) {
  std::mt19937 rng(12);
  auto states = random_states(3, DType::f32, {4, 5}, rng);
  Tensor x = random_tensor(DType::f32, {4, 5}, rng), w = random_tensor(DType::f32, {3}, rng);
  Tensor out = poisoned_tensor(DType::f32, {4, 5});
  auto sv = views(states);
  EXPECT_TRUE(throws<InvalidArgument>([&] { history_mix_forward({x.view(), sv, w.view(), {}, sv[1]}, {}); },
                                      "out: shares memory with the input states[1]"));
  history_mix_forward({x.view(), sv, w.view(), {}, out.view()}, {});
  Tensor in_place = x;
  history_mix_forward({in_place.view(), sv, w.view(), {}, in_place.view()}, {});
  for (std::int64_t i = 0; i < out.numel(); ++i) ASSERT_EQ(in_place.get(i), out.get(i));

  Tensor grad_out = random_tensor(DType::f32, {4, 5}, rng), grad_w = poisoned_tensor(DType::f32, {3});
  std::vector<Tensor> gs;
  for (int k = 0; k < 3; ++k) gs.push_back(poisoned_tensor(DType::f32, {4, 5}));
  std::vector<TensorView> gsv = views(gs);
  gsv[0] = sv[2];  // a state's gradient written over another state
  Tensor ws(DType::f32, {1 << 16});
  EXPECT_TRUE(throws<InvalidArgument>(
      [&] { history_mix_backward({grad_out.view(), sv, w.view(), {}, grad_w.view(), {}, gsv, ws.view()}, {}); },
      "grad_states[0]: shares memory with the input states[2]"));
}

TEST(HistoryHelpers, UnstackAndMemoryFormula) {
  Tensor stacked = poisoned_tensor(DType::bf16, {3, 2, 5});
  const auto slots = unstack(stacked.view());
  ASSERT_EQ(slots.size(), 3u);
  EXPECT_EQ(slots[2].rank, 2);
  EXPECT_EQ(slots[2].shape[1], 5);
  EXPECT_EQ(static_cast<unsigned char*>(slots[2].data) - static_cast<const unsigned char*>(stacked.data()), 2 * 10 * 2);
  EXPECT_EQ(history_memory_bytes(8, 64, 32 * 32, 4, DType::f16), 8LL * 64 * 1024 * 4 * 2);
  const TensorView huge = TensorView::contiguous(stacked.data(), DType::bf16, {std::int64_t(1) << 50, 1});
  EXPECT_TRUE(throws<InvalidArgument>([&] { unstack(huge); }, "stacked: expected at most 64 states"));
}

}  // namespace
}  // namespace mhc::history_test
