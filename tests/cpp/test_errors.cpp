// Bad input raises the documented exception, and its message names the offending argument;
// nan_policy = check names the argument holding a NaN or Inf.
#include "test_util.hpp"

namespace mhc::test {
namespace {

class Errors : public ::testing::Test {
 protected:
  std::mt19937_64 rng{99};
  const Shape s{3, 4, 5, DType::f32};
  const MhcConfig cfg = config_for(4);
};

TEST(TensorViewLayout, EmptyViewIsContiguousWhateverItsStrides) {
  TensorView empty = TensorView::contiguous(nullptr, DType::f32, {0, 4, 5});
  empty.strides[2] = 2;  // every other element of a wider buffer: what torch leaves on a sliced empty tensor
  EXPECT_TRUE(empty.is_contiguous());
  TensorView full = TensorView::contiguous(nullptr, DType::f32, {2, 4, 5});
  full.strides[2] = 2;
  EXPECT_FALSE(full.is_contiguous());
}

TEST_F(Errors, WrongRank) {
  PreProblem p(s, rng);
  p.x = Tensor(DType::f32, {s.T, s.n * s.C});
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(cfg, kFast); }, "x: expected a 3-D tensor"));
}

TEST_F(Errors, WrongOutputShape) {
  PreProblem p(s, rng);
  p.layer_input = Tensor(DType::f32, {s.T, s.C + 1});
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(cfg, kFast); }, "layer_input: expected shape"));
  PreProblem q(s, rng);
  q.mixes = Tensor(DType::f32, {s.T, 3});
  EXPECT_TRUE(throws<InvalidArgument>([&] { q.run(cfg, kFast); }, "mixes"));
}

TEST_F(Errors, StreamCountMismatchBetweenTensors) {
  PostProblem p(s, rng);
  p.h_post = Tensor(DType::f32, {s.T, s.n + 1});
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(cfg, kFast); }, "h_post"));
  PostProblem q(s, rng);
  q.comb = Tensor(DType::f32, {s.T, s.n, s.n - 1});
  EXPECT_TRUE(throws<InvalidArgument>([&] { q.run(cfg, kFast); }, "comb"));
}

TEST_F(Errors, WidthMismatchBetweenTensors) {
  PostProblem p(s, rng);
  p.y = Tensor(DType::f32, {s.T, s.C + 2});
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(cfg, kFast); }, "y: expected shape"));
  PreProblem q(s, rng);
  q.p.fn = Tensor(DType::f32, {q.m, s.n * (s.C + 1)});
  EXPECT_TRUE(throws<InvalidArgument>([&] { q.run(cfg, kFast); }, "fn: expected shape"));
}

TEST_F(Errors, TokenCountMismatch) {
  ResidualAddAggProblem p(s, rng);
  p.res = Tensor(DType::f32, {s.T + 1, s.n, s.C});
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.forward(cfg, kFast); }, "res"));
}

TEST_F(Errors, NullPointer) {
  PreProblem p(s, rng);
  PreForward a = p.args();
  a.x.data = nullptr;
  EXPECT_TRUE(throws<InvalidArgument>([&] { pre_forward(a, cfg, kFast); }, "x: data pointer is null"));
  a = p.args();
  a.comb.data = nullptr;
  EXPECT_TRUE(throws<InvalidArgument>([&] { pre_forward(a, cfg, kFast); }, "comb: data pointer is null"));
}

TEST_F(Errors, UnsupportedOrMismatchedDtype) {
  PreProblem p(s, rng);
  p.p.fn = Tensor(DType::f16, {p.m, s.n * s.C});
  EXPECT_TRUE(throws<DTypeError>([&] { p.run(cfg, kFast); }, "fn: expected dtype float32"));
  PreProblem q(s, rng);
  q.layer_input = Tensor(DType::bf16, {s.T, s.C});
  EXPECT_TRUE(throws<DTypeError>([&] { q.run(cfg, kFast); }, "layer_input: expected dtype float32"));
  SinkhornProblem k(2, 4, DType::bf16, rng);
  EXPECT_TRUE(throws<DTypeError>([&] { k.forward(cfg, kFast); }, "logits: expected dtype float32 or float64"));
  // bf16 streams keep fp32 coefficients.
  PreProblem b({3, 4, 5, DType::bf16}, rng);
  b.h_pre = Tensor(DType::bf16, {3, 4});
  EXPECT_TRUE(throws<DTypeError>([&] { b.run(cfg, kFast); }, "h_pre: expected dtype float32"));
}

TEST_F(Errors, NonContiguousStrides) {
  PreProblem p(s, rng);
  PreForward a = p.args();
  std::swap(a.x.strides[1], a.x.strides[2]);
  EXPECT_TRUE(throws<InvalidArgument>([&] { pre_forward(a, cfg, kFast); }, "x: expected a contiguous tensor"));
  a = p.args();
  a.comb.strides[0] = 2 * s.n * s.n;
  EXPECT_TRUE(throws<InvalidArgument>([&] { pre_forward(a, cfg, kFast); }, "comb: expected a contiguous tensor"));
}

TEST_F(Errors, TooManyStreams) {
  MhcConfig c = cfg;
  c.n = 65;
  PostProblem p({1, 65, 2, DType::f32}, rng);
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(c, kFast); }, "x: the number of streams n must be in [1, 64]"));
}

TEST_F(Errors, StreamsDisagreeWithConfig) {
  PreProblem p(s, rng);
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(config_for(8), kFast); }, "config says n = 8"));
  ExpandProblem e(s, rng);
  EXPECT_TRUE(throws<InvalidArgument>([&] { e.forward(config_for(3), kFast); }, "out: expected shape"));
}

TEST_F(Errors, BadConfig) {
  PreProblem p(s, rng);
  MhcConfig c = cfg;
  c.iters = 0;
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(c, kFast); }, "iters: expected >= 1, got 0"));
  c = cfg;
  c.eps = -1e-3f;
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(c, kFast); }, "eps"));
  c = cfg;
  c.norm_eps = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(c, kFast); }, "norm_eps"));
}

TEST_F(Errors, MissingRequiredTensor) {
  PreProblem p(s, rng);
  p.layer_input = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { p.run(cfg, kFast); }, "layer_input: required tensor is missing"));
  PreProblem q(s, rng);
  q.p.scale = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { q.run(cfg, kFast); }, "scale: required when fn is given"));
  PreProblem u(s, rng);  // a scale with nothing to scale (static mode) is refused, not ignored
  u.p.fn = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { u.run(cfg, kFast); }, "scale: expected absent when fn is absent"));
  PreBackwardProblem b(s, rng, cfg);
  b.grad_fn = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { b.run(cfg, kFast); }, "grad_fn: required tensor is missing"));
  PreBackwardProblem r(s, rng, cfg);
  r.f.rstd = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { r.run(cfg, kFast); }, "rstd: required tensor is missing"));
  PostBackwardProblem pb(s, rng);
  pb.grad_comb = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { pb.run(cfg, kFast); }, "grad_comb: required tensor is missing"));
  HeadProblem h(s, rng);
  h.weights = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { h.forward(cfg, kFast); }, "weights: required tensor is missing"));
  ResidualAddAggProblem ra(s, rng);
  ra.agg = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { ra.forward(cfg, kFast); }, "agg: required tensor is missing"));
  SinkhornProblem sk(2, 4, DType::f32, rng);
  sk.grad_logits = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { sk.backward(cfg, kFast); }, "grad_logits: required tensor is missing"));
  ExpandProblem e(s, rng);
  e.grad_x = Tensor();
  EXPECT_TRUE(throws<InvalidArgument>([&] { e.backward(cfg, kFast); }, "grad_x: required tensor is missing"));
}

TEST_F(Errors, StaticModeRejectsParameterGradientsItCannotHave) {
  PreBackwardProblem b(s, rng, cfg, /*static_mode=*/true);
  b.grad_fn = Tensor(DType::f32, {b.f.m, s.n * s.C});
  EXPECT_TRUE(throws<InvalidArgument>([&] { b.run(cfg, kFast); }, "grad_fn: given but fn is absent"));
}

TEST_F(Errors, WorkspaceTooSmall) {
  PreBackwardProblem b(s, rng, cfg);
  const std::size_t need = pre_backward_workspace_bytes(b.args(), cfg, kFast);
  ASSERT_GT(need, 8u);
  b.workspace = Tensor(DType::f32, {static_cast<int64_t>(need / 4) - 1});
  PreBackward a = b.args();
  EXPECT_TRUE(throws<InvalidArgument>([&] { pre_backward(a, cfg, kFast); }, "workspace: expected at least"));
  a.workspace = TensorView::absent();
  EXPECT_TRUE(throws<InvalidArgument>([&] { pre_backward(a, cfg, kFast); }, "workspace: required tensor is missing"));
  HeadProblem h(s, rng);
  h.forward(cfg, kFast);
  HeadBackward ha = h.backward_args();
  ha.workspace = Tensor(DType::f32, {1}).view();
  EXPECT_TRUE(throws<InvalidArgument>([&] { head_backward(ha, cfg, kFast); }, "workspace: expected at least"));
}

// The forward pre's workspace queries validate x like the op and need no bytes on the CPU backends; the ops take the
// optional workspace present as well as absent.
TEST_F(Errors, ForwardWorkspaceQueries) {
  PreProblem p(s, rng);
  PostPreProblem pp(s, rng);
  for (const Context& ctx : {kRef, kFast}) {
    EXPECT_EQ(pre_forward_workspace_bytes(p.args(), cfg, ctx), 0u);
    EXPECT_EQ(post_pre_forward_workspace_bytes(pp.args(), cfg, ctx), 0u);
  }
  PreForward bad = p.args();
  const Tensor flat(DType::f32, {s.T, s.n * s.C});
  bad.x = flat.view();
  EXPECT_TRUE(throws<InvalidArgument>([&] { pre_forward_workspace_bytes(bad, cfg, kFast); }, "x: expected a 3-D tensor"));
  PostPreForward bad_pp = pp.args();
  bad_pp.x = flat.view();
  EXPECT_TRUE(
      throws<InvalidArgument>([&] { post_pre_forward_workspace_bytes(bad_pp, cfg, kFast); }, "x: expected a 3-D tensor"));
  const Tensor ws(DType::f32, {4});
  PreForward a = p.args();
  a.workspace = ws.view();
  EXPECT_NO_THROW(pre_forward(a, cfg, kFast));
  PostPreForward b = pp.args();
  b.workspace = ws.view();
  EXPECT_NO_THROW(post_pre_forward(b, cfg, kFast));
}

TEST_F(Errors, CudaTensors) {
  PreProblem p(s, rng);
  PreForward a = p.args();
  // One tensor on another device than x.
  a.fn.device = {DeviceType::cuda, 0};
  EXPECT_TRUE(throws<DeviceError>([&] { pre_forward(a, cfg, kFast); }, "fn: expected a tensor on cpu"));
  // Every tensor on CUDA.
  for (TensorView* v : {&a.x, &a.fn, &a.base, &a.scale, &a.layer_input, &a.h_pre, &a.h_post, &a.comb, &a.mixes,
                        &a.rstd})
    v->device = {DeviceType::cuda, 0};
  if (!built_with_cuda()) {
    EXPECT_TRUE(throws<DeviceError>([&] { pre_forward(a, cfg); }, "no CUDA support"));
    EXPECT_EQ(cuda_device_count(), 0);
  }
  EXPECT_TRUE(throws<DeviceError>([&] { pre_forward(a, cfg, kFast); }, "a CPU backend was requested"));
  EXPECT_TRUE(throws<DeviceError>([&] { pre_forward(p.args(), cfg, Context{.backend = Backend::cuda}); },
                                  "backend cuda was requested for CPU tensors"));
}

// ---- sizes, dtype and device values, aliasing --------------------------------------------------------

// An element count that overflows int64 would wrap numel() (to 0, hiding the null pointer): refused by name.
TEST_F(Errors, SizeOverflowIsRefused) {
  MhcConfig c = config_for(4);
  const std::int64_t T = std::int64_t(1) << 62;
  const ExpandForward huge{TensorView::contiguous(nullptr, DType::f32, {T, 4}),
                           TensorView::contiguous(nullptr, DType::f32, {T, 4, 4})};
  EXPECT_TRUE(throws<InvalidArgument>([&] { expand_forward(huge, c, kFast); }, "x: shape"));
  PostProblem p(s, rng);
  PostForward a = p.args();
  a.x = TensorView::contiguous(nullptr, DType::f32, {std::int64_t(1) << 40, s.n, std::int64_t(1) << 30});
  EXPECT_TRUE(throws<InvalidArgument>([&] { post_forward(a, cfg, kFast); }, "too large"));
}

TEST_F(Errors, InvalidDtypeAndDeviceValuesAreNamed) {
  PostProblem p(s, rng);
  PostForward a = p.args();
  a.y.dtype = static_cast<DType>(7);
  EXPECT_TRUE(throws<DTypeError>([&] { post_forward(a, cfg, kFast); }, "y: invalid dtype value 7"));
  a = p.args();
  a.comb.device = {static_cast<DeviceType>(9), 0};
  EXPECT_TRUE(throws<DeviceError>([&] { post_forward(a, cfg, kFast); }, "comb: invalid device type"));
  a = p.args();
  a.x.device.index = -3;
  EXPECT_TRUE(throws<DeviceError>([&] { post_forward(a, cfg, kFast); }, "x: negative device index"));
}

// The kernels read inputs at other elements than they write: an output over an input is refused, not garbage.
TEST_F(Errors, OutputsOverlappingInputsAreRefused) {
  PostProblem p(s, rng);
  PostForward a = p.args();
  a.x_next = a.x;
  EXPECT_TRUE(throws<InvalidArgument>([&] { post_forward(a, cfg, kFast); }, "x_next: shares memory with the input x"));
  PostBackwardProblem b(s, rng);
  PostBackward g = b.args();
  g.grad_x = g.grad_x_next;
  EXPECT_TRUE(throws<InvalidArgument>([&] { post_backward(g, cfg, kRef); }, "grad_x: shares memory with the input"));
  PreProblem q(s, rng);
  PreForward f = q.args();
  f.h_pre = f.h_post;
  EXPECT_TRUE(throws<InvalidArgument>([&] { pre_forward(f, cfg, kFast); }, "h_pre: shares memory with the output"));
  // In place where the op is elementwise: residual_add_agg's x_out over x.
  ResidualAddAggProblem r(s, rng);
  ResidualAddAggProblem ref = r;
  residual_add_agg_forward({r.x.view(), r.res.view(), r.h_pre.view(), r.x.view(), r.agg.view()}, cfg, kFast);
  ref.forward(cfg, kFast);
  for (std::int64_t i = 0; i < r.x.numel(); ++i) ASSERT_EQ(r.x.get(i), ref.x_out.get(i));
}

// ---- nan_policy = check ---------------------------------------------------------------------------
class NanPolicyCheck : public Errors {
 protected:
  MhcConfig checked() const {
    MhcConfig c = cfg;
    c.nan_policy = NanPolicy::check;
    return c;
  }
};

TEST_F(NanPolicyCheck, NamesTheArgument) {
  PreProblem p(s, rng);
  p.x.set(7, std::numeric_limits<double>::quiet_NaN());
  EXPECT_TRUE(throws<NonFiniteError>([&] { p.run(checked(), kFast); }, "pre_forward: x: contains 1 NaN or Inf"));
  p.run(cfg, kFast);  // propagate (the default) runs

  PreProblem q(s, rng);
  q.p.base.set(0, std::numeric_limits<double>::infinity());
  EXPECT_TRUE(throws<NonFiniteError>([&] { q.run(checked(), kFast); }, "base: contains"));

  PostProblem post(s, rng);
  post.y.set(2, -std::numeric_limits<double>::infinity());
  EXPECT_TRUE(throws<NonFiniteError>([&] { post.run(checked(), kRef); }, "y: contains"));

  PostBackwardProblem pb(s, rng);
  pb.g_x_next.set(0, std::numeric_limits<double>::quiet_NaN());
  EXPECT_TRUE(throws<NonFiniteError>([&] { pb.run(checked(), kFast); }, "grad_x_next: contains"));

  PreBackwardProblem b(s, rng, cfg);
  b.g_comb.set(3, std::numeric_limits<double>::quiet_NaN());
  EXPECT_TRUE(throws<NonFiniteError>([&] { b.run(checked(), kFast); }, "grad_comb: contains"));

  SinkhornProblem sk(2, 4, DType::f32, rng);
  sk.logits.set(5, std::numeric_limits<double>::quiet_NaN());
  EXPECT_TRUE(throws<NonFiniteError>([&] { sk.forward(checked(), kFast); }, "logits: contains"));

  ResidualAddAggProblem ra({2, 4, 5, DType::bf16}, rng);
  ra.res.set(1, std::numeric_limits<double>::quiet_NaN());
  EXPECT_TRUE(throws<NonFiniteError>([&] { ra.forward(checked(), kFast); }, "res: contains"));
}

TEST_F(NanPolicyCheck, HeadScansItsParameters) {
  HeadProblem h(s, rng);
  h.p.base.set(1, std::numeric_limits<double>::quiet_NaN());
  EXPECT_TRUE(throws<NonFiniteError>([&] { h.forward(checked(), kFast); }, "head_forward: base: contains"));
  HeadProblem g(s, rng);
  g.p.scale.set(0, std::numeric_limits<double>::infinity());
  EXPECT_TRUE(throws<NonFiniteError>([&] { g.forward(checked(), kFast); }, "head_forward: scale: contains"));
}

// A NonFiniteError is an InvalidArgument (Python: ValueError).
TEST_F(NanPolicyCheck, IsAnInvalidArgument) {
  HeadProblem h(s, rng);
  h.x.set(0, std::numeric_limits<double>::quiet_NaN());
  EXPECT_TRUE(throws<InvalidArgument>([&] { h.forward(checked(), kFast); }, "x: contains"));
}

// Under the default policy NaN flows through like any arithmetic and nothing is thrown.
TEST_F(NanPolicyCheck, PropagateLetsNanThrough) {
  PostProblem p(s, rng);
  p.x.set(0, std::numeric_limits<double>::quiet_NaN());
  p.run(cfg, kFast);
  EXPECT_TRUE(std::isnan(p.x_next.get(0)));
}

}  // namespace
}  // namespace mhc::test
