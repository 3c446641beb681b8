// Finite-difference checks (fp64, central differences) of every backward op, on the reference and
// on the fast path, for every input and parameter: the loss is <random weights, every output>.
#include "test_util.hpp"

namespace mhc::test {
namespace {

constexpr double kFdTol = 1e-6;

struct GradCase {
  bool fast;
  Shape shape;
};

class Gradients : public ::testing::TestWithParam<GradCase> {
 protected:
  std::mt19937_64 rng{0xfd00u + static_cast<unsigned>(GetParam().shape.n * 7 + GetParam().shape.C)};
  const Shape s = GetParam().shape;
  const Context ctx = GetParam().fast ? kFast : kRef;
  const MhcConfig cfg = config_for(GetParam().shape.n);
};

TEST_P(Gradients, Pre) {
  for (bool static_mode : {false, true}) {
    SCOPED_TRACE(static_mode ? "static mode" : "dynamic");
    PreBackwardProblem b(s, rng, cfg, static_mode);
    b.g_x_accum = Tensor();  // checked separately below: it only adds
    b.run(cfg, ctx);
    PreProblem f = b.f;
    auto loss = [&] {
      f.run(cfg, ctx);
      return weighted_sum(f.layer_input, b.g_layer_input) + weighted_sum(f.h_pre, b.g_h_pre) +
             weighted_sum(f.h_post, b.g_h_post) + weighted_sum(f.comb, b.g_comb);
    };
    EXPECT_TRUE(finite_difference("x", f.x, b.grad_x, loss, kFdTol, rng));
    EXPECT_TRUE(finite_difference("base", f.p.base, b.grad_base, loss, kFdTol, rng));
    if (!static_mode) {
      EXPECT_TRUE(finite_difference("fn", f.p.fn, b.grad_fn, loss, kFdTol, rng));
      EXPECT_TRUE(finite_difference("scale", f.p.scale, b.grad_scale, loss, kFdTol, rng));
    }
  }
}

TEST_P(Gradients, PreAccumulatesIntoGradX) {
  PreBackwardProblem with(s, rng, cfg);
  PreBackwardProblem without = with;
  without.g_x_accum = Tensor();
  with.run(cfg, ctx);
  without.run(cfg, ctx);
  Tensor want = without.grad_x;
  for (int64_t i = 0; i < want.numel(); ++i) want.set(i, want.get(i) + with.g_x_accum.get(i));
  EXPECT_TRUE(close("grad_x", with.grad_x, want, 1e-12));
}

TEST_P(Gradients, Post) {
  PostBackwardProblem b(s, rng);
  b.run(cfg, ctx);
  PostProblem f = b.f;
  auto loss = [&] {
    f.run(cfg, ctx);
    return weighted_sum(f.x_next, b.g_x_next);
  };
  EXPECT_TRUE(finite_difference("x", f.x, b.grad_x, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("y", f.y, b.grad_y, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("h_post", f.h_post, b.grad_h_post, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("comb", f.comb, b.grad_comb, loss, kFdTol, rng));
}

// post_pre_forward's backward is pre_backward (grad_x_accum = grad of x_next) then post_backward.
TEST_P(Gradients, PostPreComposition) {
  PostPreProblem f(s, rng);
  const DType k = coef_of(s.dtype);
  const Tensor g_x_next = random_tensor(s.dtype, {s.T, s.n, s.C}, rng);
  const Tensor g_li = random_tensor(s.dtype, {s.T, s.C}, rng), g_hpre = random_tensor(k, {s.T, s.n}, rng),
               g_hpost = random_tensor(k, {s.T, s.n}, rng), g_comb = random_tensor(k, {s.T, s.n, s.n}, rng);
  f.run(cfg, ctx);

  PreBackwardProblem pre_b(s, rng, cfg);
  pre_b.f = f.pre;
  pre_b.f.x = f.post.x_next;
  pre_b.g_layer_input = g_li;
  pre_b.g_h_pre = g_hpre;
  pre_b.g_h_post = g_hpost;
  pre_b.g_comb = g_comb;
  pre_b.g_x_accum = g_x_next;
  pre_b.run(cfg, ctx);
  PostBackwardProblem post_b(s, rng);
  post_b.f = f.post;
  post_b.g_x_next = pre_b.grad_x;
  post_b.run(cfg, ctx);

  auto loss = [&] {
    f.run(cfg, ctx);
    return weighted_sum(f.post.x_next, g_x_next) + weighted_sum(f.pre.layer_input, g_li) +
           weighted_sum(f.pre.h_pre, g_hpre) + weighted_sum(f.pre.h_post, g_hpost) + weighted_sum(f.pre.comb, g_comb);
  };
  EXPECT_TRUE(finite_difference("x", f.post.x, post_b.grad_x, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("y", f.post.y, post_b.grad_y, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("h_post", f.post.h_post, post_b.grad_h_post, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("comb", f.post.comb, post_b.grad_comb, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("fn", f.pre.p.fn, pre_b.grad_fn, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("base", f.pre.p.base, pre_b.grad_base, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("scale", f.pre.p.scale, pre_b.grad_scale, loss, kFdTol, rng));
}

TEST_P(Gradients, Head) {
  for (bool static_mode : {false, true}) {
    SCOPED_TRACE(static_mode ? "static mode" : "dynamic");
    HeadProblem b(s, rng, static_mode);
    b.forward(cfg, kRef);
    b.backward(cfg, ctx);
    HeadProblem f = b;
    auto loss = [&] {
      f.forward(cfg, ctx);
      return weighted_sum(f.out, b.g_out) + weighted_sum(f.weights, b.g_weights);
    };
    EXPECT_TRUE(finite_difference("x", f.x, b.grad_x, loss, kFdTol, rng));
    EXPECT_TRUE(finite_difference("base", f.p.base, b.grad_base, loss, kFdTol, rng));
    if (!static_mode) {
      EXPECT_TRUE(finite_difference("fn", f.p.fn, b.grad_fn, loss, kFdTol, rng));
      EXPECT_TRUE(finite_difference("scale", f.p.scale, b.grad_scale, loss, kFdTol, rng));
    }
  }
}

TEST_P(Gradients, Expand) {
  ExpandProblem p(s, rng);
  p.backward(cfg, ctx);
  auto loss = [&] {
    p.forward(cfg, ctx);
    return weighted_sum(p.out, p.g_out);
  };
  EXPECT_TRUE(finite_difference("x", p.x, p.grad_x, loss, kFdTol, rng));
}

TEST_P(Gradients, ResidualAddAgg) {
  ResidualAddAggProblem p(s, rng);
  p.forward(cfg, ctx);
  p.backward(cfg, ctx);
  const Tensor grad_sum = p.grad_sum, grad_h_pre = p.grad_h_pre;
  auto loss = [&] {
    p.forward(cfg, ctx);
    return weighted_sum(p.x_out, p.g_x_out) + weighted_sum(p.agg, p.g_agg);
  };
  EXPECT_TRUE(finite_difference("x", p.x, grad_sum, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("res", p.res, grad_sum, loss, kFdTol, rng));
  EXPECT_TRUE(finite_difference("h_pre", p.h_pre, grad_h_pre, loss, kFdTol, rng));
}

TEST_P(Gradients, Sinkhorn) {
  for (int iters : {1, 2, 20}) {
    SCOPED_TRACE("iters " + std::to_string(iters));
    MhcConfig c = cfg;
    c.iters = iters;
    SinkhornProblem p(std::max<int64_t>(s.T, 1), s.n, DType::f64, rng);
    p.backward(c, ctx);
    auto loss = [&] {
      p.forward(c, ctx);
      return weighted_sum(p.comb, p.g_comb);
    };
    EXPECT_TRUE(finite_difference("logits", p.logits, p.grad_logits, loss, kFdTol, rng));
  }
}

std::vector<GradCase> grad_cases() {
  std::vector<GradCase> cases;
  for (bool fast : {false, true})
    for (Shape s : {Shape{2, 1, 3, DType::f64}, Shape{3, 2, 5, DType::f64}, Shape{2, 3, 7, DType::f64},
                    Shape{5, 4, 17, DType::f64}})
      cases.push_back({fast, s});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Fp64, Gradients, ::testing::ValuesIn(grad_cases()), [](const auto& info) {
  return std::string(info.param.fast ? "fast_" : "reference_") + shape_name(info.param.shape);
});

// The fast Sinkhorn backward checkpoints the forward in a fixed stack buffer and recomputes the
// rest when the iterations do not fit (n = 32 and 64 at 20 iterations; n = 16 at 100).
TEST(GradientsCheckpointed, SinkhornRecomputationIsExact) {
  std::mt19937_64 rng(3232);
  for (auto [n, iters] : {std::pair{32, 20}, {64, 20}, {16, 100}}) {
    SCOPED_TRACE("n " + std::to_string(n) + ", iters " + std::to_string(iters));
    MhcConfig cfg = config_for(n);
    cfg.iters = iters;
    SinkhornProblem p(1, n, DType::f64, rng);
    p.backward(cfg, kFast);
    const Tensor fast = p.grad_logits;
    p.backward(cfg, kRef);
    EXPECT_TRUE(close("grad_logits vs reference", fast, p.grad_logits, 1e-10));
    auto loss = [&] {
      p.forward(cfg, kFast);
      return weighted_sum(p.comb, p.g_comb);
    };
    EXPECT_TRUE(finite_difference("logits", p.logits, fast, loss, kFdTol, rng, 12));
  }
}

}  // namespace
}  // namespace mhc::test
