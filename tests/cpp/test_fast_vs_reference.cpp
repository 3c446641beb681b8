// The fast CPU path against the fp64 reference, op by op, on fresh random inputs over odd widths,
// every stream count up to 64, empty / single / many tokens and every storage dtype. Outputs are
// NaN-poisoned before each run, so an element the fast path forgets to write fails the test.
#include "test_util.hpp"

namespace mhc::test {
namespace {

class FastVsReference : public ::testing::TestWithParam<Shape> {
 protected:
  std::mt19937_64 rng{0x5eed0000u + static_cast<unsigned>(GetParam().T * 131 + GetParam().n * 17 + GetParam().C)};
  const Shape s = GetParam();
  const MhcConfig cfg = config_for(GetParam().n);
  const double tol = tolerance(GetParam().dtype);
};

TEST_P(FastVsReference, PreForward) {
  for (bool static_mode : {false, true}) {
    SCOPED_TRACE(static_mode ? "static mode" : "dynamic");
    PreProblem p(s, rng, static_mode);
    p.run(cfg, kRef);
    const PreProblem want = p;
    p.run(cfg, kFast);
    EXPECT_TRUE(close("layer_input", p.layer_input, want.layer_input, tol));
    EXPECT_TRUE(close("h_pre", p.h_pre, want.h_pre, tol));
    EXPECT_TRUE(close("h_post", p.h_post, want.h_post, tol));
    EXPECT_TRUE(close("comb", p.comb, want.comb, tol));
    EXPECT_TRUE(close("mixes", p.mixes, want.mixes, tol));
    EXPECT_TRUE(close("rstd", p.rstd, want.rstd, tol));
  }
}

TEST_P(FastVsReference, PreForwardWithoutOptionalOutputs) {
  PreProblem p(s, rng);
  p.run(cfg, kRef);
  const PreProblem want = p;
  p.mixes = Tensor();
  p.rstd = Tensor();
  p.run(cfg, kFast);
  EXPECT_TRUE(close("layer_input", p.layer_input, want.layer_input, tol));
  EXPECT_TRUE(close("comb", p.comb, want.comb, tol));
}

TEST_P(FastVsReference, PreBackward) {
  for (bool static_mode : {false, true}) {
    SCOPED_TRACE(static_mode ? "static mode" : "dynamic");
    PreBackwardProblem p(s, rng, cfg, static_mode);
    p.run(cfg, kRef);
    const PreBackwardProblem want = p;
    p.run(cfg, kFast);
    EXPECT_TRUE(close("grad_x", p.grad_x, want.grad_x, tol));
    EXPECT_TRUE(close("grad_base", p.grad_base, want.grad_base, tol));
    if (!static_mode) {
      EXPECT_TRUE(close("grad_fn", p.grad_fn, want.grad_fn, tol));
      EXPECT_TRUE(close("grad_scale", p.grad_scale, want.grad_scale, tol));
    }
  }
}

// Every optional gradient input absent but one, in turn.
TEST_P(FastVsReference, PreBackwardPartialGrads) {
  PreBackwardProblem full(s, rng, cfg);
  for (int keep = 0; keep < 5; ++keep) {
    SCOPED_TRACE("only grad input " + std::to_string(keep));
    PreBackwardProblem p = full;
    Tensor* grads[] = {&p.g_layer_input, &p.g_h_pre, &p.g_h_post, &p.g_comb, &p.g_x_accum};
    for (int g = 0; g < 5; ++g)
      if (g != keep) *grads[g] = Tensor();
    p.run(cfg, kRef);
    const PreBackwardProblem want = p;
    p.run(cfg, kFast);
    EXPECT_TRUE(close("grad_x", p.grad_x, want.grad_x, tol));
    EXPECT_TRUE(close("grad_fn", p.grad_fn, want.grad_fn, tol));
    EXPECT_TRUE(close("grad_base", p.grad_base, want.grad_base, tol));
    EXPECT_TRUE(close("grad_scale", p.grad_scale, want.grad_scale, tol));
  }
}

TEST_P(FastVsReference, PostForward) {
  PostProblem p(s, rng);
  p.run(cfg, kRef);
  const Tensor want = p.x_next;
  p.run(cfg, kFast);
  EXPECT_TRUE(close("x_next", p.x_next, want, tol));
}

TEST_P(FastVsReference, PostBackward) {
  PostBackwardProblem p(s, rng);
  p.run(cfg, kRef);
  const PostBackwardProblem want = p;
  p.run(cfg, kFast);
  EXPECT_TRUE(close("grad_x", p.grad_x, want.grad_x, tol));
  EXPECT_TRUE(close("grad_y", p.grad_y, want.grad_y, tol));
  EXPECT_TRUE(close("grad_h_post", p.grad_h_post, want.grad_h_post, tol));
  EXPECT_TRUE(close("grad_comb", p.grad_comb, want.grad_comb, tol));
}

TEST_P(FastVsReference, PostPreForward) {
  for (bool static_mode : {false, true}) {
    SCOPED_TRACE(static_mode ? "static mode" : "dynamic");
    PostPreProblem p(s, rng, static_mode);
    p.run(cfg, kRef);
    const PostPreProblem want = p;
    p.run(cfg, kFast);
    EXPECT_TRUE(close("x_next", p.post.x_next, want.post.x_next, tol));
    EXPECT_TRUE(close("layer_input", p.pre.layer_input, want.pre.layer_input, tol));
    EXPECT_TRUE(close("h_pre", p.pre.h_pre, want.pre.h_pre, tol));
    EXPECT_TRUE(close("h_post_next", p.pre.h_post, want.pre.h_post, tol));
    EXPECT_TRUE(close("comb_next", p.pre.comb, want.pre.comb, tol));
    EXPECT_TRUE(close("mixes", p.pre.mixes, want.pre.mixes, tol));
    EXPECT_TRUE(close("rstd", p.pre.rstd, want.pre.rstd, tol));

    // The fused op is exactly the fast post followed by the fast pre on the stored x_next.
    PostProblem post = p.post;
    post.run(cfg, kFast);
    PreProblem pre = p.pre;
    pre.x = post.x_next;
    pre.run(cfg, kFast);
    EXPECT_TRUE(post.x_next.bitwise_equal(p.post.x_next));
    EXPECT_TRUE(pre.layer_input.bitwise_equal(p.pre.layer_input));
    EXPECT_TRUE(pre.comb.bitwise_equal(p.pre.comb));
    EXPECT_TRUE(pre.mixes.bitwise_equal(p.pre.mixes));
  }
}

TEST_P(FastVsReference, Sinkhorn) {
  const DType k = coef_of(s.dtype);
  SinkhornProblem p(s.T, s.n, k, rng);
  p.forward(cfg, kRef);
  p.backward(cfg, kRef);
  const SinkhornProblem want = p;
  p.forward(cfg, kFast);
  p.backward(cfg, kFast);
  EXPECT_TRUE(close("comb", p.comb, want.comb, tolerance(k)));
  EXPECT_TRUE(close("grad_logits", p.grad_logits, want.grad_logits, tolerance(k)));
}

TEST_P(FastVsReference, Expand) {
  ExpandProblem p(s, rng);
  p.forward(cfg, kRef);
  p.backward(cfg, kRef);
  const ExpandProblem want = p;
  p.forward(cfg, kFast);
  p.backward(cfg, kFast);
  EXPECT_TRUE(p.out.bitwise_equal(want.out));
  EXPECT_TRUE(close("grad_x", p.grad_x, want.grad_x, tol));
}

TEST_P(FastVsReference, Head) {
  for (bool static_mode : {false, true}) {
    SCOPED_TRACE(static_mode ? "static mode" : "dynamic");
    HeadProblem p(s, rng, static_mode);
    p.forward(cfg, kRef);
    p.backward(cfg, kRef);
    const HeadProblem want = p;
    p.forward(cfg, kFast);
    EXPECT_TRUE(close("out", p.out, want.out, tol));
    EXPECT_TRUE(close("weights", p.weights, want.weights, tol));
    EXPECT_TRUE(close("mixes", p.mixes, want.mixes, tol));
    EXPECT_TRUE(close("rstd", p.rstd, want.rstd, tol));
    p.mixes = want.mixes;  // both backwards from the same saved values
    p.rstd = want.rstd;
    p.backward(cfg, kFast);
    EXPECT_TRUE(close("grad_x", p.grad_x, want.grad_x, tol));
    EXPECT_TRUE(close("grad_base", p.grad_base, want.grad_base, tol));
    if (!static_mode) {
      EXPECT_TRUE(close("grad_fn", p.grad_fn, want.grad_fn, tol));
      EXPECT_TRUE(close("grad_scale", p.grad_scale, want.grad_scale, tol));
    }
  }
}

TEST_P(FastVsReference, ResidualAddAgg) {
  ResidualAddAggProblem p(s, rng);
  p.forward(cfg, kRef);
  p.backward(cfg, kRef);
  const ResidualAddAggProblem want = p;
  p.forward(cfg, kFast);
  EXPECT_TRUE(close("x_out", p.x_out, want.x_out, tol));
  EXPECT_TRUE(close("agg", p.agg, want.agg, tol));
  p.x_out = want.x_out;
  p.backward(cfg, kFast);
  EXPECT_TRUE(close("grad_sum", p.grad_sum, want.grad_sum, tol));
  EXPECT_TRUE(close("grad_h_pre", p.grad_h_pre, want.grad_h_pre, tol));
  for (int absent = 0; absent < 2; ++absent) {  // one of the two gradient inputs absent
    ResidualAddAggProblem q = want;
    (absent == 0 ? q.g_x_out : q.g_agg) = Tensor();
    q.backward(cfg, kRef);
    const ResidualAddAggProblem want_q = q;
    q.backward(cfg, kFast);
    EXPECT_TRUE(close("grad_sum", q.grad_sum, want_q.grad_sum, tol));
    EXPECT_TRUE(close("grad_h_pre", q.grad_h_pre, want_q.grad_h_pre, tol));
  }
}

// Odd widths (vector tails everywhere), n in {1, 2, 3, 4, 8, 16, 32, 64}, T in {0, 1, many}
// (many: not a multiple of the token tile or the parallel grain), and every dtype.
const Shape kShapes[] = {
    {1, 1, 1, DType::f32},   {5, 1, 33, DType::f32},  {0, 4, 7, DType::f32},    {1, 4, 257, DType::f32},
    {37, 4, 33, DType::f32}, {9, 2, 3, DType::f32},   {13, 3, 7, DType::f32},   {6, 8, 33, DType::f32},
    {3, 16, 7, DType::f32},  {2, 32, 3, DType::f32},  {1, 64, 3, DType::f32},   {19, 4, 64, DType::f32},
    {7, 4, 1, DType::f32},   {0, 8, 3, DType::f64},   {21, 4, 33, DType::f64},  {3, 8, 7, DType::f64},
    {2, 3, 257, DType::f64}, {37, 4, 33, DType::bf16}, {5, 8, 257, DType::bf16}, {3, 2, 7, DType::bf16},
    {37, 4, 33, DType::f16}, {5, 3, 257, DType::f16},  {1, 16, 7, DType::f16},
};

INSTANTIATE_TEST_SUITE_P(Shapes, FastVsReference, ::testing::ValuesIn(kShapes),
                         [](const auto& info) { return shape_name(info.param); });

// ---- determinism: parameter gradients do not depend on the thread count ---------------------------------
TEST(FastDeterminism, ParameterGradientsIndependentOfThreads) {
  std::mt19937_64 rng(77);
  const Shape s{97, 4, 65, DType::f32};
  const MhcConfig cfg = config_for(s.n);
  PreBackwardProblem pre(s, rng, cfg);
  HeadProblem head(s, rng);
  head.forward(cfg, kRef);
  pre.run(cfg, Context{.backend = Backend::cpu_fast, .num_threads = 1});
  head.backward(cfg, Context{.backend = Backend::cpu_fast, .num_threads = 1});
  const PreBackwardProblem pre1 = pre;
  const HeadProblem head1 = head;
  for (int threads : {2, 3, 0}) {
    SCOPED_TRACE("threads " + std::to_string(threads));
    const Context ctx{.backend = Backend::cpu_fast, .num_threads = threads};
    pre.run(cfg, ctx);
    head.backward(cfg, ctx);
    EXPECT_TRUE(pre.grad_fn.bitwise_equal(pre1.grad_fn));
    EXPECT_TRUE(pre.grad_base.bitwise_equal(pre1.grad_base));
    EXPECT_TRUE(pre.grad_scale.bitwise_equal(pre1.grad_scale));
    EXPECT_TRUE(pre.grad_x.bitwise_equal(pre1.grad_x));
    EXPECT_TRUE(head.grad_fn.bitwise_equal(head1.grad_fn));
    EXPECT_TRUE(head.grad_base.bitwise_equal(head1.grad_base));
    EXPECT_TRUE(head.grad_scale.bitwise_equal(head1.grad_scale));
  }
}

// The workspace query of the fast backward is what it uses: a buffer of exactly that size works,
// nothing past it is touched (a canary follows it), and what it held before does not matter.
TEST(FastWorkspace, ExactSizeSuffices) {
  std::mt19937_64 rng(5);
  const Shape s{10, 4, 9, DType::bf16};
  const MhcConfig cfg = config_for(s.n);
  PreBackwardProblem p(s, rng, cfg);
  const std::size_t bytes = pre_backward_workspace_bytes(p.args(), cfg, kFast);
  ASSERT_GT(bytes, 0u);
  ASSERT_EQ(bytes % 2, 0u);
  const int64_t exact = static_cast<int64_t>(bytes / 2), canary = 64;
  Tensor buffer(DType::bf16, {exact + canary});
  buffer.poison();
  for (int64_t i = exact; i < exact + canary; ++i) buffer.set(i, 1024.0);  // exact in bf16
  for (Tensor* t : {&p.grad_x, &p.grad_fn, &p.grad_base, &p.grad_scale}) t->poison();
  PreBackward a = p.args();
  a.workspace = buffer.view();
  a.workspace.shape[0] = exact;
  pre_backward(a, cfg, kFast);
  for (int64_t i = exact; i < exact + canary; ++i) ASSERT_EQ(buffer.get(i), 1024.0) << "canary " << i - exact;
  PreBackwardProblem want = p;
  want.run(cfg, kRef);
  EXPECT_TRUE(close("grad_fn", p.grad_fn, want.grad_fn, 1e-2));
  EXPECT_TRUE(close("grad_x", p.grad_x, want.grad_x, 1e-2));
}

}  // namespace
}  // namespace mhc::test
